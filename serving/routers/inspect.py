"""Line cameras post images here and get pass / review / scrap."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cellinspect.datasets.errors import ImageDecodeError
from cellinspect.serving.errors import decode_error_status, describe_decode_error
from cellinspect.serving.frames import FrameResponse, inspect_frame
from cellinspect.serving.idempotency import (
    REFUSES_KEY,
    REPLAYED,
    REPLAYED_RESPONSE,
    IdempotencyKey,
    idempotency_key_of,
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
from cellinspect.serving.service import ServiceDep, StationRole, authorize
from cellinspect.serving.settings import Role
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
ID_LIMITS: dict[str, Any] = {"max_length": 128, "pattern": ID_PATTERN}
MODEL_REF_LIMITS: dict[str, Any] = {
    "max_length": 130,
    "pattern": MODEL_REF_PATTERN,
    "description": "name, name@version or name@alias",
}
HEATMAP_DESCRIPTION = (
    "add the defect heatmap: png (base64 gray image at the model input size) "
    "or grid (8 x 8 cell means); null in the answer if the model has none "
    "(GET /v1/models says which do)"
)
LineId = Annotated[str | None, Query(**ID_LIMITS)]
ModelRef = Annotated[str | None, Query(**MODEL_REF_LIMITS)]


async def origin_query(
    line_id: LineId = None, station_id: LineId = None, cell_id: LineId = None
) -> Origin:
    """Where on the line the image comes from: the same three query parameters on every route."""
    return Origin(line_id=line_id, station_id=station_id, cell_id=cell_id)


OriginDep = Annotated[Origin, Depends(origin_query)]
HeatmapQuery = Annotated[HeatmapFormat | None, Query(description=HEATMAP_DESCRIPTION)]


class InspectQuery(BaseModel):
    """POST /v1/inspect's query parameters (`origin_query`'s three, `model`, `heatmap`)."""

    model_config = ConfigDict(extra="ignore")  # as FastAPI does with unknown parameters

    line_id: Annotated[str | None, Field(**ID_LIMITS)] = None
    station_id: Annotated[str | None, Field(**ID_LIMITS)] = None
    cell_id: Annotated[str | None, Field(**ID_LIMITS)] = None
    model: Annotated[str | None, Field(**MODEL_REF_LIMITS)] = None
    heatmap: Annotated[HeatmapFormat | None, Field(description=HEATMAP_DESCRIPTION)] = None

    @property
    def origin(self) -> Origin:
        return Origin(line_id=self.line_id, station_id=self.station_id, cell_id=self.cell_id)


class InspectRoute(APIRoute):
    """POST /v1/inspect, the line's hot path, with its endpoint's arguments read directly.

    FastAPI solves a route's dependencies anew on every request, examining each parameter
    of each sub-dependency again: 292 us per request in-process, 14% of the service's CPU
    per image at 16 clients (benchmarks/RESULTS.md, seventh measurement: +16% images/s).
    This handler hands the endpoint the same arguments from the same definitions
    (`authorize`, `InspectQuery`, `idempotency_key_of`), in FastAPI's order: the key's
    401/403 first, then every invalid parameter in one 422. FastAPI still documents the
    endpoint from its signature; tests/serving/test_inspect_route.py checks that FastAPI's
    own solving of that signature answers every request alike.
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        endpoint = self.endpoint

        async def handle(request: Request) -> Response:
            service = request.app.state.service
            headers = request.headers
            role = authorize(
                service, headers.get("x-api-key"), headers.get("authorization"), Role.STATION
            )
            errors: list[Any] = []
            query = key = None
            try:  # a sub-dependency's parameters: FastAPI lists their errors first
                key = idempotency_key_of(headers)
            except RequestValidationError as exc:
                errors += exc.errors()
            try:
                query = InspectQuery.model_validate(dict(request.query_params))
            except ValidationError as exc:
                errors += [
                    {**e, "loc": ("query", *e["loc"])} for e in exc.errors(include_url=False)
                ]
            if errors or query is None:
                raise RequestValidationError(errors)
            response: Response = await endpoint(
                request=request, service=service, _=role, query=query, idempotency_key=key
            )
            return response

        return handle


async def inspect(
    request: Request,
    service: ServiceDep,
    _: StationRole,
    query: Annotated[InspectQuery, Query()],
    idempotency_key: IdempotencyKey = None,
) -> Response:
    started = time.perf_counter()
    upload = await read_single(request)
    result = await inspect_image(
        service,
        upload.data,
        model=query.model,
        origin=query.origin,
        started=started,
        heatmap=query.heatmap,
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


router.add_api_route(
    "",
    inspect,
    methods=["POST"],
    response_model=InspectResponse,
    responses={**IMAGE_ERRORS, **REPLAYED_RESPONSE},
    openapi_extra=IMAGE_BODY,
    summary="Inspect one image",
    route_class_override=InspectRoute,
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
