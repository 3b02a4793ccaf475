"""The service's parts and the `Annotated` dependencies route handlers take."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Header, HTTPException, Request, status

from cellinspect.models.store import ModelStore
from cellinspect.serving.archive import ImageArchive
from cellinspect.serving.auth import ApiKeyAuth, allows, presented_key
from cellinspect.serving.engine import DecodePool, ModelRegistry
from cellinspect.serving.metrics import ServiceMetrics
from cellinspect.serving.records import RecordStore
from cellinspect.serving.settings import Role, Settings
from cellinspect.serving.shadow import ShadowRunner


@dataclass
class Service:
    settings: Settings
    store: ModelStore
    registry: ModelRegistry
    records: RecordStore
    archive: ImageArchive
    decoder: DecodePool
    auth: ApiKeyAuth
    metrics: ServiceMetrics
    shadow: ShadowRunner

    def publish_served(self) -> None:
        """Tell the metrics which version of each model serves now (after start or reload)."""
        self.metrics.set_served({e.name: e.version for e in self.registry.list()})


# async: FastAPI runs plain `def` dependencies in a thread pool, a hop per request for nothing.
async def get_service(request: Request) -> Service:
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(get_service)]

PING_TIMEOUT_S = 2.0  # a readiness probe must answer within the probe's own timeout


async def records_reachable(service: Service) -> bool:
    """Whether the records database answers now: a service that cannot record is not ready.

    Probed, not remembered from the last commit: a flag set by a failed commit would keep
    an idle instance out of the load balancer forever after the database came back.
    """
    try:
        return await asyncio.wait_for(asyncio.to_thread(service.records.ping), PING_TIMEOUT_S)
    except TimeoutError:
        return False


def authorize(
    service: Service, x_api_key: str | None, authorization: str | None, needed: Role
) -> Role:
    """The caller's role; 401 without a valid key, 403 when it is below `needed`."""
    role = service.auth.role_for(presented_key(x_api_key, authorization))
    if role is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "missing or unknown API key (send X-API-Key or Authorization: Bearer)",
            headers={"WWW-Authenticate": "Bearer"},
        )
    if not allows(role, needed):
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            f"this key's role ({role.value}) cannot do this; needs {needed.value}",
        )
    return role


def require(needed: Role) -> Callable[..., Coroutine[Any, Any, Role]]:
    """Dependency: `authorize` for `needed`, the key from the request's headers."""

    async def check(
        service: ServiceDep,
        x_api_key: Annotated[str | None, Header()] = None,
        authorization: Annotated[str | None, Header()] = None,
    ) -> Role:
        return authorize(service, x_api_key, authorization, needed)

    return check


StationRole = Annotated[Role, Depends(require(Role.STATION))]
OperatorRole = Annotated[Role, Depends(require(Role.OPERATOR))]
AdminRole = Annotated[Role, Depends(require(Role.ADMIN))]


def open_or(
    needed: Role, is_open: Callable[[Settings], bool]
) -> Callable[..., Coroutine[Any, Any, None]]:
    """Dependency for health and metrics: open when settings say so, else `needed` role."""
    checker = require(needed)

    async def check(
        service: ServiceDep,
        x_api_key: Annotated[str | None, Header()] = None,
        authorization: Annotated[str | None, Header()] = None,
    ) -> None:
        if not is_open(service.settings):
            await checker(service, x_api_key, authorization)

    return check
