"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST

from cellinspect.serving.service import ServiceDep, open_or, records_reachable
from cellinspect.serving.settings import Role

router = APIRouter(tags=["health"])
HealthAccess = Annotated[None, Depends(open_or(Role.OPERATOR, lambda s: s.open_health))]
MetricsAccess = Annotated[None, Depends(open_or(Role.OPERATOR, lambda s: s.open_metrics))]


@router.get("/healthz", summary="Liveness: the process answers")
async def healthz(_: HealthAccess) -> dict[str, str]:
    return {"status": "live"}


@router.get(
    "/readyz", summary="Readiness: every model loaded and warmed, the records database answering"
)
async def readyz(service: ServiceDep, _: HealthAccess) -> JSONResponse:
    models = {e.name: e.version for e in service.registry.list()}
    records = await records_reachable(service)
    ready = service.registry.ready and records
    body = {"ready": ready, "models": models, "records": "ok" if records else "unavailable"}
    return JSONResponse(body, status_code=200 if ready else 503)


@router.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse)
async def metrics(service: ServiceDep, _: MetricsAccess) -> Response:
    return Response(service.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
