"""Open Inference Protocol v2 (KServe / Triton clients): health, metadata, infer."""

from __future__ import annotations

import asyncio
import time
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, Path, Request, Response
from fastapi.responses import JSONResponse

from cellinspect.models.card import PROBABILITIES_NAME
from cellinspect.serving.errors import RequestError
from cellinspect.serving.idempotency import REFUSES_KEY
from cellinspect.serving.inspection import Origin, inspect_image
from cellinspect.serving.oip import HEADER_LENGTH, encode_infer_response, parse_infer_request
from cellinspect.serving.schemas import IMAGE_ERRORS
from cellinspect.serving.service import ServiceDep, StationRole, open_or, records_reachable
from cellinspect.serving.settings import Role

router = APIRouter(prefix="/v2", tags=["open inference protocol v2"])
HealthAccess = Annotated[None, Depends(open_or(Role.OPERATOR, lambda s: s.open_health))]
ModelName = Annotated[str, Path(pattern=r"^[a-z0-9][a-z0-9._\-]{0,63}$")]
VERDICT_OUTPUT = "verdict"
# The JSON form of an infer request, for the docs and for schemathesis; the route reads the
# raw body itself, as Triton's binary extension (application/octet-stream) is not JSON.
_TENSOR = {
    "type": "object",
    "required": ["name", "datatype", "shape"],
    "properties": {
        "name": {"type": "string"},
        "datatype": {"type": "string", "enum": ["FP32", "FP64", "FP16", "UINT8", "BYTES"]},
        "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
        "data": {"type": "array", "description": "numbers (nested by shape) or base64 strings"},
        "parameters": {
            "type": "object",
            "properties": {"binary_data_size": {"type": "integer", "minimum": 0}},
        },
    },
}
INFER_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["inputs"],
                    "properties": {
                        "id": {"type": "string"},
                        "inputs": {"type": "array", "minItems": 1, "items": _TENSOR},
                        "outputs": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["name"],
                                "properties": {
                                    "name": {"type": "string"},
                                    "parameters": {
                                        "type": "object",
                                        "properties": {"binary_data": {"type": "boolean"}},
                                    },
                                },
                            },
                        },
                    },
                }
            }
        },
    }
}


@router.get("/health/live")
async def live(_: HealthAccess) -> dict[str, bool]:
    return {"live": True}


@router.get("/health/ready")
async def ready(service: ServiceDep, _: HealthAccess) -> JSONResponse:
    ok = service.registry.ready and await records_reachable(service)
    return JSONResponse({"ready": ok}, status_code=200 if ok else 503)


@router.get("/models/{name}", summary="Model metadata")
async def metadata(service: ServiceDep, _: StationRole, name: ModelName) -> dict[str, Any]:
    engine = service.registry.get(name)
    c, h, w = engine.card.preprocessing.input_shape
    return {
        "name": engine.name,
        "versions": [engine.version],
        "platform": "onnxruntime_onnx",
        "inputs": [{"name": engine.card.input_name, "datatype": "FP32", "shape": [-1, c, h, w]}],
        "outputs": [
            {
                "name": PROBABILITIES_NAME,
                "datatype": "FP32",
                "shape": [-1, len(engine.card.class_names)],
            }
        ],
        "parameters": {
            "class_names": engine.card.class_names,
            "encoded_image_input": "any BYTES input: encoded images (base64 strings in JSON)",
        },
    }


@router.get("/models/{name}/ready")
async def model_ready(service: ServiceDep, _: StationRole, name: ModelName) -> dict[str, Any]:
    engine = service.registry.get(name)
    return {"name": engine.name, "ready": service.registry.ready}


@router.post(
    "/models/{name}/infer",
    responses=IMAGE_ERRORS,
    openapi_extra=INFER_BODY,
    summary="Infer: FP32 image tensors or BYTES encoded images",
    dependencies=REFUSES_KEY,
)
async def infer(request: Request, service: ServiceDep, _: StationRole, name: ModelName) -> Response:
    started = time.perf_counter()
    engine = service.registry.get(name)
    c, h, w = engine.card.preprocessing.input_shape
    max_images = service.settings.max_batch_images
    parsed = parse_infer_request(
        await request.body(),
        request.headers.get(HEADER_LENGTH),
        max_elements=max_images * c * h * w,
    )
    if len(parsed.inputs) != 1:
        raise RequestError(
            400, "bad_infer_request", "send exactly one input: an image tensor or encoded images"
        )
    tensor = parsed.inputs[0]
    outputs: dict[str, np.ndarray | list[str]] = {}
    if tensor.datatype == "BYTES":
        if len(tensor.items) > max_images:
            raise RequestError(413, "too_many_images", f"at most {max_images} images per request")
        results = await asyncio.gather(
            *(
                inspect_image(service, d, model=name, origin=Origin(), started=started)
                for d in tensor.items
            )
        )
        outputs[PROBABILITIES_NAME] = np.array(
            [[r.probabilities[k] for k in engine.card.class_names] for r in results], np.float32
        )
        outputs[VERDICT_OUTPUT] = [r.verdict.value for r in results]
    else:
        array = tensor.array
        assert array is not None
        if tensor.name != engine.card.input_name or array.ndim != 4 or array.shape[1:] != (c, h, w):
            raise RequestError(
                400,
                "bad_infer_request",
                f"input must be {engine.card.input_name!r} FP32 of shape [N, {c}, {h}, {w}]",
            )
        if not np.isfinite(array).all():
            raise RequestError(400, "bad_infer_request", "input contains NaN or infinity")
        deadline = asyncio.get_running_loop().time() + service.settings.deadline_ms / 1000.0
        rows = await asyncio.gather(
            *(engine.infer(np.ascontiguousarray(x), deadline) for x in array)
        )
        outputs[PROBABILITIES_NAME] = np.stack([p for p, _ in rows]).astype(np.float32)
    body, headers = encode_infer_response(
        model=engine.name,
        version=engine.version,
        request_id=parsed.id,
        outputs=outputs,
        binary=parsed.binary_outputs,
    )
    return Response(body, headers=headers)
