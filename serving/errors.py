"""Exceptions from the packages -> precise HTTP answers with a JSON body {detail, code}."""

from __future__ import annotations

import logging
import math

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from cellinspect.datasets.errors import (
    EmptyImageError,
    ImageDecodeError,
    ImageTooLargeError,
    TruncatedImageError,
    UnsupportedImageError,
)
from cellinspect.models.store import IntegrityError, ModelNotFoundError
from cellinspect.serving.batcher import DeadlineExceeded, Overloaded
from cellinspect.serving.limits import BodyTooLarge
from cellinspect.serving.policy import NonFiniteProbabilities
from cellinspect.serving.records import IdempotencyKeyReused, RecordStoreUnavailable

log = logging.getLogger(__name__)

DECODE_STATUS: dict[type[ImageDecodeError], tuple[int, str]] = {
    EmptyImageError: (400, "empty"),
    UnsupportedImageError: (415, "unsupported"),
    TruncatedImageError: (422, "truncated"),
    ImageTooLargeError: (422, "too_large"),
}


class RequestError(Exception):
    """A 4xx the route decides itself (bad content type, malformed multipart, ...)."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        self.status, self.code, self.detail = status, code, detail
        super().__init__(detail)


OVERLOADED_DETAIL = "inspection queue is full; retry shortly"


def retry_after_value(seconds: float) -> str:
    """Retry-After in whole seconds (the header has no fractions), at least 1."""
    return str(max(1, math.ceil(seconds)))


def error_response(
    status: int, code: str, detail: str, retry_after: float | None = None
) -> JSONResponse:
    headers = {"Retry-After": retry_after_value(retry_after)} if retry_after is not None else None
    return JSONResponse({"detail": detail, "code": code}, status_code=status, headers=headers)


def decode_error_status(exc: ImageDecodeError) -> tuple[int, str]:
    for kind, answer in DECODE_STATUS.items():
        if isinstance(exc, kind):
            return answer
    return 422, "decode_error"


def describe_decode_error(exc: ImageDecodeError) -> str:
    # The client's upload has no useful file name on our side: say only what is wrong.
    return exc.problem


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ImageDecodeError)
    async def _decode(_: Request, exc: ImageDecodeError) -> JSONResponse:
        status, code = decode_error_status(exc)
        return error_response(status, code, describe_decode_error(exc))

    @app.exception_handler(BodyTooLarge)
    async def _too_large(_: Request, exc: BodyTooLarge) -> JSONResponse:
        return error_response(413, "body_too_large", str(exc))

    @app.exception_handler(RequestError)
    async def _request(_: Request, exc: RequestError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.detail)

    @app.exception_handler(ModelNotFoundError)
    async def _model(_: Request, exc: ModelNotFoundError) -> JSONResponse:
        return error_response(404, "model_not_found", str(exc).strip("'\""))

    @app.exception_handler(IntegrityError)
    async def _integrity(_: Request, exc: IntegrityError) -> JSONResponse:
        return error_response(409, "integrity", str(exc))

    @app.exception_handler(Overloaded)
    async def _overloaded(request: Request, exc: Overloaded) -> JSONResponse:
        request.app.state.service.metrics.rejected.labels("overloaded").inc()
        return error_response(503, "overloaded", OVERLOADED_DETAIL, exc.retry_after_s)

    @app.exception_handler(DeadlineExceeded)
    async def _deadline(request: Request, exc: DeadlineExceeded) -> JSONResponse:
        request.app.state.service.metrics.rejected.labels("deadline").inc()
        return error_response(
            503,
            "deadline_exceeded",
            "could not answer within the deadline; retry shortly",
            exc.retry_after_s,
        )

    @app.exception_handler(NonFiniteProbabilities)
    async def _non_finite(_: Request, exc: NonFiniteProbabilities) -> JSONResponse:
        # The model's fault, not the request's: a person must look at the model.
        log.error("model output invalid, answered 500: %s", exc)
        return error_response(500, "model_output_invalid", str(exc))

    @app.exception_handler(IdempotencyKeyReused)
    async def _key_reused(_: Request, exc: IdempotencyKeyReused) -> JSONResponse:
        # The draft's answer to a key reused with another payload: nothing was inspected.
        return error_response(422, "idempotency_key_reused", str(exc))

    @app.exception_handler(RecordStoreUnavailable)
    async def _records(_: Request, exc: RecordStoreUnavailable) -> JSONResponse:
        log.error("inspection not recorded, answered 503: %s", exc)
        return error_response(
            503,
            "records_unavailable",
            # A COMMIT whose acknowledgement was lost may have landed: say so (seen in
            # benchmarks/kill_loop.py --restart-postgres, 7 of 1,691 503s).
            "the records database did not confirm this inspection; retry shortly "
            "(if the database failed after committing, it is already recorded: retry with "
            "the same Idempotency-Key to get that answer instead of a second record)",
            2.0,
        )
