"""The outermost layer of the service: request counts for /metrics, and admission control.

Admission: while the decode pool already holds its maximum of waiting images (or, when it
decodes on the loop, of image requests in progress), a new image request would be refused
by the pool anyway, after FastAPI had routed it, checked its key and read its body (up to
`max_body_bytes`). Under 5x overload those refusals took most of the CPU the accepted
requests needed (docs/RELIABILITY.md), so this gate answers the same 503 + Retry-After
before any of that: one attribute check per request. A refused caller learns only that the
service is busy, never whether its key is valid. An inline pool has no queue of its own to
refuse from: this gate's count of the image requests in progress is its only bound.

Written as plain ASGI, not Starlette `BaseHTTPMiddleware`, which would add a task and a
memory stream to every request on the hot path.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cellinspect.serving.errors import OVERLOADED_DETAIL, retry_after_value

if TYPE_CHECKING:
    from cellinspect.serving.service import Service


def is_image_route(method: str, path: str) -> bool:
    """The routes that decode images through the shared pool (frames have their own bound)."""
    if method != "POST":
        return False
    return path in ("/v1/inspect", "/v1/inspect/batch") or (
        path.startswith("/v2/models/") and path.endswith("/infer")
    )


def overloaded_body() -> bytes:
    return json.dumps({"detail": OVERLOADED_DETAIL, "code": "overloaded"}).encode()


class RequestGate:
    """Counts every answer by route template and status; refuses image requests at once
    while the decode pool is full."""

    def __init__(self, app: ASGIApp, service: Service) -> None:
        self.app = app
        self.service = service
        self._busy_body = overloaded_body()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        metrics = self.service.metrics
        decoder = self.service.decoder
        image = is_image_route(scope["method"], scope["path"])
        if image and decoder.full:
            decoder.rejected += 1
            metrics.rejected.labels("overloaded").inc()
            metrics.requests.labels("gate", "503").inc()
            await self._refuse(send, decoder.retry_after_s())
            return
        status = 500  # what the client sees if the app dies before answering

        async def counted(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        decoder.admitted += int(image)  # the admission bound of a pool that decodes inline
        try:
            await self.app(scope, receive, counted)
        finally:
            decoder.admitted -= int(image)
            route = scope.get("route")  # set by the router on a match
            template = getattr(route, "path", None) or "unmatched"
            metrics.requests.labels(template, str(status)).inc()

    async def _refuse(self, send: Send, retry_after_s: float) -> None:
        # The body is left unread: uvicorn discards it and keeps the connection alive.
        await send(
            {
                "type": "http.response.start",
                "status": 503,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(self._busy_body)).encode()),
                    (b"retry-after", retry_after_value(retry_after_s).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": self._busy_body})
