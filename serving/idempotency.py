"""Idempotency keys on POST /v1/inspect: a retried request gets the recorded answer, not a
second record of the same image.

After a 503 `records_unavailable` the inspection may have been recorded after all (the
database committed, its acknowledgement was lost). A station that retries with the same
`Idempotency-Key` header gets the answer stored then (same inspection id, marked with
`Idempotent-Replayed: true`) instead of a second inspection. Keys are global, not per
station: stations make them unique themselves, e.g. `station-id:cell-serial:uuid`, the
uuid drawn once per image and sent again on each retry of it.
Follows the IETF draft "The Idempotency-Key HTTP Header Field" where it fits: the key may
come as a bare token or as a quoted string, and a key reused for another request is 422.
"""

from __future__ import annotations

import asyncio
import hashlib
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, Header
from fastapi.exceptions import RequestValidationError
from pydantic import StringConstraints, TypeAdapter, ValidationError
from starlette.datastructures import Headers

from cellinspect.serving.errors import RequestError
from cellinspect.serving.records import IdempotencyKeyReused, InspectionRecord, RecordStore
from cellinspect.serving.schemas import InspectResponse, ModelInfo

if TYPE_CHECKING:
    from cellinspect.serving.inspection import Origin

IDEMPOTENCY_HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"
REPLAYED = {REPLAYED_HEADER: "true"}  # the header on a replayed answer
KEY_CHARS = r"[A-Za-z0-9][A-Za-z0-9._:\-]{0,127}"  # an Identifier of at most 128 characters
# Bare, or an RFC 8941 string (the draft's form): "quoted".
KEY_PATTERN = rf'^(?:{KEY_CHARS}|"{KEY_CHARS}")$'
KEY_MAX_LENGTH = 130

REPLAYED_RESPONSE = {
    200: {
        "description": "Successful Response (recorded now, or earlier for the same key)",
        "headers": {
            REPLAYED_HEADER: {
                "description": "`true` when this is the answer recorded earlier under the "
                "request's Idempotency-Key (nothing was inspected or recorded again)",
                "schema": {"type": "string", "enum": ["true"]},
            }
        },
    }
}


async def idempotency_key(
    key: Annotated[
        str | None,
        Header(
            alias=IDEMPOTENCY_HEADER,
            max_length=KEY_MAX_LENGTH,
            pattern=KEY_PATTERN,
            description="make a retry safe: a request repeating a recorded key gets that "
            "answer back (header Idempotent-Replayed: true) instead of a second record. "
            "1-128 of A-Z a-z 0-9 . _ : - (optionally in double quotes), unique per "
            "inspection across all stations, e.g. station-id:cell-serial:uuid (drawn once "
            "per image, the same on every retry)",
        ),
    ] = None,
) -> str | None:
    """The request's idempotency key without the optional quotes, or None."""
    return None if key is None else key.strip('"')


_KEY = TypeAdapter(
    Annotated[str, StringConstraints(max_length=KEY_MAX_LENGTH, pattern=KEY_PATTERN)]
)


def idempotency_key_of(headers: Headers) -> str | None:
    """`idempotency_key` for a route that reads its headers itself (`InspectRoute`): the
    same checks, the same 422 as FastAPI's for the header."""
    key = headers.get(IDEMPOTENCY_HEADER)
    if key is None:
        return None
    try:
        _KEY.validate_python(key)
    except ValidationError as exc:
        raise RequestValidationError(
            [{**e, "loc": ("header", IDEMPOTENCY_HEADER)} for e in exc.errors(include_url=False)]
        ) from None
    return key.strip('"')


IdempotencyKey = Annotated[str | None, Depends(idempotency_key)]


async def refuse_idempotency_key(
    key: Annotated[str | None, Header(alias=IDEMPOTENCY_HEADER, include_in_schema=False)] = None,
) -> None:
    """On the routes that do not honour keys: refuse one rather than ignore it, so a station
    never retries believing it is protected from a second record."""
    if key is not None:
        raise RequestError(
            400,
            "idempotency_key_unsupported",
            f"{IDEMPOTENCY_HEADER} is honoured on POST /v1/inspect only; a retry of this "
            "request would record its images again. Send images one by one to /v1/inspect to "
            "retry safely, or drop the header",
        )


REFUSES_KEY = [Depends(refuse_idempotency_key)]


def replayed_answer(
    record: InspectionRecord, *, image_sha256: str, origin: Origin
) -> InspectResponse:
    """The answer recorded under a key, for a request repeating it; IdempotencyKeyReused when
    the request is another one (other image bytes, or another line, station or cell)."""
    key = record.idempotency_key
    if record.image_sha256 != image_sha256:
        raise IdempotencyKeyReused(
            f"Idempotency-Key {key!r} was used for another image (inspection {record.id}); "
            "use a new key for each inspection"
        )
    asked = (origin.line_id, origin.station_id, origin.cell_id)
    if (record.line_id, record.station_id, record.cell_id) != asked:
        raise IdempotencyKeyReused(
            f"Idempotency-Key {key!r} was used for another line_id, station_id or cell_id "
            f"(inspection {record.id}); use a new key for each inspection"
        )
    answer = InspectResponse(
        inspection_id=record.id,
        verdict=record.verdict,
        label=record.label,
        confidence=record.confidence,
        # Every keyed record stores it (inspect_image writes both); 0.0 only by hand.
        defect_probability=record.defect_probability or 0.0,
        probabilities=record.probabilities,
        model=ModelInfo(name=record.model_name, version=record.model_version),
        timings=record.timings,
        line_id=record.line_id,
        station_id=record.station_id,
        cell_id=record.cell_id,
    )
    return answer.mark_replayed()


def _lookup(records: RecordStore, key: str, data: bytes) -> tuple[InspectionRecord | None, str]:
    record = records.get_by_idempotency_key(key)
    # Hashed only when needed: the image's own hash comes later, from the decoder.
    return record, "" if record is None else hashlib.sha256(data).hexdigest()


async def find_replay(
    records: RecordStore, key: str, data: bytes, origin: Origin
) -> InspectResponse | None:
    """The recorded answer for a repeated key, None for a new key (one indexed lookup, off
    the event loop)."""
    record, sha256 = await asyncio.to_thread(_lookup, records, key, data)
    return None if record is None else replayed_answer(record, image_sha256=sha256, origin=origin)
