"""Line cameras post images here and get pass / review / scrap."""

from __future__ import annotations

import asyncio
import time
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request, Response

from cellinspect.datasets.errors import ImageDecodeError
from cellinspect.serving.errors import decode_error_status, describe_decode_error
from cellinspect.serving.frames import FrameResponse, inspect_frame
from cellinspect.serving.idempotency import (
    REFUSES_KEY,
    REPLAYED,
    REPLAYED_RESPONSE,
    IdempotencyKey,
)
from cellinspect.serving.inspection import Origin, inspect_image
from cellinspect.serving.schemas import (
    ID_PATTERN,
    IMAGE_ERRORS,
    MODEL_REF_PATTERN,
    BatchItem,
    BatchResponse,
    ErrorBody,
    HeatmapFormat,
    InspectResponse,
)
from cellinspect.serving.service import ServiceDep, StationRole
from cellinspect.serving.uploads import read_single, read_uploads

router = APIRouter(prefix="/v1/inspect", tags=["inspect"])

IMAGE_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            **{
                t: {"schema": {"type": "string", "format": "binary"}}
                for t in ("image/png", "image/jpeg", "image/bmp", "image/tiff")
            },
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"image": {"type": "string", "format": "binary"}},
                    "required": ["image"],
                }
            },
        },
    }
}
BATCH_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "images": {"type": "array", "items": {"type": "string", "format": "binary"}}
                    },
                    "required": ["images"],
                }
            }
        },
    }
}
LineId = Annotated[str | None, Query(max_length=128, pattern=ID_PATTERN)]
ModelRef = Annotated[
    str | None,
    Query(
        max_length=130, pattern=MODEL_REF_PATTERN, description="name, name@version or name@alias"
    ),
]


async def origin_query(
    line_id: LineId = None, station_id: LineId = None, cell_id: LineId = None
) -> Origin:
    """Where on the line the image comes from: the same three query parameters on every route."""
    return Origin(line_id=line_id, station_id=station_id, cell_id=cell_id)


OriginDep = Annotated[Origin, Depends(origin_query)]
HeatmapQuery = Annotated[
    HeatmapFormat | None,
    Query(
        description="add the defect heatmap: png (base64 gray image at the model input size) "
        "or grid (8 x 8 cell means); null in the answer if the model has none "
        "(GET /v1/models says which do)"
    ),
]


@router.post(
    "",
    response_model=InspectResponse,
    responses={**IMAGE_ERRORS, **REPLAYED_RESPONSE},
    openapi_extra=IMAGE_BODY,
    summary="Inspect one image",
)
async def inspect(
    request: Request,
    service: ServiceDep,
    _: StationRole,
    origin: OriginDep,
    model: ModelRef = None,
    heatmap: HeatmapQuery = None,
    idempotency_key: IdempotencyKey = None,
) -> Response:
    started = time.perf_counter()
    upload = await read_single(request)
    result = await inspect_image(
        service,
        upload.data,
        model=model,
        origin=origin,
        started=started,
        heatmap=heatmap,
        idempotency_key=idempotency_key,
    )
    # Serialised once by pydantic-core: FastAPI would validate the model again first, and
    # at line rate that second pass is measurable (benchmarks/RESULTS.md).
    return Response(
        result.model_dump_json(),
        media_type="application/json",
        headers={
            "X-Processing-Time": f"{result.timings.total_ms:.2f}ms",
            "X-Model-Version": f"{result.model.name}@{result.model.version}",
            **(REPLAYED if result.replayed else {}),
        },
    )


@router.post(
    "/batch",
    response_model=BatchResponse,
    responses=IMAGE_ERRORS,
    openapi_extra=BATCH_BODY,
    summary="Inspect several images (multipart file parts), one result each, order kept",
    dependencies=REFUSES_KEY,
)
async def inspect_batch(
    request: Request,
    service: ServiceDep,
    _: StationRole,
    origin: OriginDep,
    model: ModelRef = None,
    heatmap: HeatmapQuery = None,
) -> BatchResponse:
    started = time.perf_counter()
    uploads = await read_uploads(request, max_files=service.settings.max_batch_images)
    outcomes = await asyncio.gather(
        *(
            inspect_image(
                service, u.data, model=model, origin=origin, started=started, heatmap=heatmap
            )
            for u in uploads
        ),
        return_exceptions=True,
    )
    items = []
    for index, (upload, outcome) in enumerate(zip(uploads, outcomes, strict=True)):
        if isinstance(outcome, ImageDecodeError):
            _, code = decode_error_status(outcome)
            items.append(
                BatchItem(
                    index=index,
                    filename=upload.filename,
                    error=ErrorBody(detail=describe_decode_error(outcome), code=code),
                )
            )
        elif isinstance(outcome, BaseException):
            raise outcome  # overload, unknown model, records down: the whole request fails alike
        else:
            items.append(BatchItem(index=index, filename=upload.filename, result=outcome))
    return BatchResponse(results=items)


@router.post(
    "/frame",
    response_model=FrameResponse,
    responses=IMAGE_ERRORS,
    openapi_extra=IMAGE_BODY,
    summary="Inspect a line-scan frame: defect regions in pixels (and mm) and a frame verdict",
    dependencies=REFUSES_KEY,
)
async def inspect_frame_route(
    request: Request,
    service: ServiceDep,
    _: StationRole,
    origin: OriginDep,
    model: ModelRef = None,
    overlap: Annotated[float, Query(ge=0.0, lt=0.9, description="tile overlap fraction")] = 0.5,
    pixel_pitch_mm: Annotated[float | None, Query(gt=0, le=100, description="mm per pixel")] = None,
) -> FrameResponse:
    started = time.perf_counter()
    upload = await read_single(request)
    return await inspect_frame(
        service,
        upload.data,
        model=model,
        origin=origin,
        overlap=overlap,
        pixel_pitch_mm=pixel_pitch_mm,
        started=started,
    )
