"""Served models: list, hot reload, promotion (admins)."""

from __future__ import annotations

import asyncio
import functools
from typing import Annotated

from fastapi import APIRouter, HTTPException, Path

from cellinspect.models.store import validate_alias
from cellinspect.serving.engine import ModelReloadError
from cellinspect.serving.schemas import (
    PromoteRequest,
    ReloadRequest,
    ReloadResponse,
    ServedModel,
)
from cellinspect.serving.service import AdminRole, ServiceDep, StationRole

router = APIRouter(prefix="/v1/models", tags=["models"])
ModelName = Annotated[str, Path(pattern=r"^[a-z0-9][a-z0-9._\-]{0,63}$")]


@router.get("", response_model=list[ServedModel], summary="Models being served")
async def list_served(service: ServiceDep, _: StationRole) -> list[ServedModel]:
    engines = service.registry.list()
    return [
        ServedModel(
            name=e.name,
            version=e.version,
            ref=e.ref,
            default=i == 0,
            classes=e.card.class_names,
            input_shape=list(e.card.preprocessing.input_shape),
            heatmap=e.has_heatmap,
            operating_point=e.card.operating_point.model_dump(),
            test_time_views=e.card.test_time_views,
            providers=e.loaded.session.get_providers(),
        )
        for i, e in enumerate(engines)
    ]


async def _reload(service: ServiceDep, name: str, selector: str | None) -> ReloadResponse:
    try:
        old, new = await service.registry.reload(name, selector)
    except ModelReloadError as exc:
        raise HTTPException(
            409, f"reload refused, still serving the previous version: {exc}"
        ) from None
    service.publish_served()
    return ReloadResponse(name=name, previous_version=old, version=new)


@router.post(
    "/{name}/reload", response_model=ReloadResponse, summary="Load, warm and swap in a version"
)
async def reload_model(
    service: ServiceDep, _: AdminRole, name: ModelName, body: ReloadRequest | None = None
) -> ReloadResponse:
    return await _reload(service, name, body.version if body else None)


@router.post("/{name}/promote", response_model=ReloadResponse, summary="Move an alias to a version")
async def promote_model(
    service: ServiceDep, _: AdminRole, name: ModelName, body: PromoteRequest
) -> ReloadResponse:
    """The alias moves only after the version has loaded, passed its checks and warmed up
    here: an alias on a version that cannot serve would fail the next start of every
    instance that follows it."""
    try:
        validate_alias(body.alias)
    except ValueError as exc:
        raise HTTPException(422, str(exc)) from None
    move = functools.partial(service.store.promote, name, body.version, alias=body.alias)
    served = {e.name: e.version for e in service.registry.list()}
    try:
        if body.reload and name in served:
            old, new = await service.registry.reload(name, body.version, before_swap=move)
            service.publish_served()
            return ReloadResponse(name=name, previous_version=old, version=new)
        await service.registry.check_servable(f"{name}@{body.version}")
        moved = await asyncio.to_thread(move)
    except ModelReloadError as exc:
        raise HTTPException(
            409, f"promotion refused, {name}@{body.alias} not moved: {exc}"
        ) from None
    except ValueError as exc:
        raise HTTPException(422, str(exc)) from None
    return ReloadResponse(
        name=name, previous_version=served.get(name, ""), version=moved.to_version
    )
