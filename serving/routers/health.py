"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from cellinspect.serving.service import ServiceDep, open_or
from cellinspect.serving.settings import Role

router = APIRouter(tags=["health"])
HealthAccess = Annotated[None, Depends(open_or(Role.OPERATOR, lambda s: s.open_health))]
MetricsAccess = Annotated[None, Depends(open_or(Role.OPERATOR, lambda s: s.open_metrics))]


@router.get("/healthz", summary="Liveness: the process answers")
async def healthz(_: HealthAccess) -> dict[str, str]:
    return {"status": "live"}


@router.get("/readyz", summary="Readiness: every configured model loaded and warmed")
async def readyz(service: ServiceDep, _: HealthAccess) -> JSONResponse:
    ready = service.registry.ready
    models = {e.name: e.version for e in service.registry.list()}
    return JSONResponse({"ready": ready, "models": models}, status_code=200 if ready else 503)


@router.get("/metrics", summary="Prometheus metrics")
async def metrics(service: ServiceDep, _: MetricsAccess) -> Response:
    return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)
