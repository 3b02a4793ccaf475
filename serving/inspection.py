"""One inspection: decode -> micro-batched inference -> decision -> archive -> durable record
(-> a shadow run of the model's candidate, in the background, when configured).

Shared by the single, batch and Open Inference Protocol routes, so every path records alike.
A lone request goes from decode to committed record on the inference worker in one hop
(`_conclude_alone`); requests batched with others are decided, archived and recorded from
the event loop, their records committed in groups by the records writer.
"""

from __future__ import annotations

import asyncio
import functools
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np

from cellinspect.models.card import Verdict
from cellinspect.serving.batcher import BatchTiming
from cellinspect.serving.engine import DecodedImage, ModelEngine
from cellinspect.serving.heatmaps import encode_heatmap
from cellinspect.serving.idempotency import find_replay, replayed_answer
from cellinspect.serving.policy import Decision, decide
from cellinspect.serving.records import InspectionRecord
from cellinspect.serving.schemas import (
    GridHeatmap,
    HeatmapFormat,
    InspectResponse,
    ModelInfo,
    PngHeatmap,
    Timings,
)
from cellinspect.serving.service import Service

EXTENSIONS = {"image/png": "png", "image/jpeg": "jpg", "image/bmp": "bmp", "image/tiff": "tif"}


@dataclass(frozen=True)
class Origin:
    """Where an image comes from on the line."""

    line_id: str | None = None
    station_id: str | None = None
    cell_id: str | None = None


def sniff_extension(data: bytes) -> str:
    if data.startswith(b"\x89PNG"):
        return "png"
    if data.startswith(b"\xff\xd8"):
        return "jpg"
    if data.startswith(b"BM"):
        return "bmp"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "tif"
    return "bin"


def _save_to_archive(
    service: Service, data: bytes, *, sha256: str, verdict: Verdict, label: str, created: datetime
) -> str | None:
    """`service.archive.save` (blocking: it writes the file) with the extension sniffed."""
    return service.archive.save(
        data,
        sha256=sha256,
        verdict=verdict,
        label=label,
        created=created,
        ext=sniff_extension(data),
    )


async def archive_if_needed(
    service: Service, data: bytes, *, sha256: str, verdict: Verdict, label: str, created: datetime
) -> str | None:
    """The image's archive path when the verdict (or the pass sample) keeps it, else None."""
    if not service.archive.should_archive(verdict):
        return None
    if (stored := service.archive.stored(sha256)) is not None:
        return stored  # no thread hand-off for an image already there
    return await asyncio.to_thread(
        _save_to_archive,
        service,
        data,
        sha256=sha256,
        verdict=verdict,
        label=label,
        created=created,
    )


@dataclass(frozen=True)
class _Request:
    """What one inspection needs beside its image's outcome."""

    service: Service
    data: bytes
    origin: Origin
    started: float
    idempotency_key: str | None
    heatmap: HeatmapFormat | None

    def encode_heatmap(self, heat: np.ndarray | None) -> PngHeatmap | GridHeatmap | None:
        return None if self.heatmap is None or heat is None else encode_heatmap(heat, self.heatmap)


@dataclass(frozen=True)
class _Concluded:
    """An inspection's decision, heatmap answer and record; `stored` as RecordStore.add
    returns it. Everything that can fail is done before the record is committed."""

    decision: Decision
    heatmap: PngHeatmap | GridHeatmap | None
    record: InspectionRecord
    committed: bool
    stored: InspectionRecord | None = None


def _record(
    request: _Request,
    engine: ModelEngine,
    decoded: DecodedImage,
    timing: BatchTiming,
    probs: np.ndarray,
    decision: Decision,
    *,
    created: datetime,
    archived: str | None,
) -> InspectionRecord:
    timings = Timings(
        decode_ms=decoded.decode_ms,
        queue_ms=timing.queue_ms,
        infer_ms=timing.infer_ms,
        total_ms=(time.perf_counter() - request.started) * 1000.0,
    )
    origin = request.origin
    # Built from validated parts (query parameters, the card): no second validation pass.
    return InspectionRecord.model_construct(
        id=uuid.uuid4().hex,
        created=created,
        line_id=origin.line_id,
        station_id=origin.station_id,
        cell_id=origin.cell_id,
        model_name=engine.name,
        model_version=engine.version,
        label=decision.label,
        confidence=decision.confidence,
        probabilities={c: float(p) for c, p in zip(engine.card.class_names, probs, strict=True)},
        verdict=decision.verdict,
        timings=timings,
        image_sha256=decoded.sha256,
        archive_path=archived,
        defect_probability=decision.defect_probability,
        idempotency_key=request.idempotency_key,
    )


def _decide(request: _Request, engine: ModelEngine, probs: np.ndarray) -> Decision:
    return decide(
        probs,
        engine.card,
        line_id=request.origin.line_id,
        line_points=request.service.settings.line_operating_points,
    )


def _conclude_alone(
    request: _Request,
    engine: ModelEngine,
    decoded: DecodedImage,
    probs: np.ndarray,
    heat: np.ndarray | None,
    timing: BatchTiming,
) -> _Concluded:
    """Decision, archive and record of a lone request, on the worker thread that ran it
    (see ModelEngine.decode_and_infer): committed there when the record writer is idle,
    which saves the round trip to the writer thread."""
    service = request.service
    decision = _decide(request, engine, probs)
    heatmap = request.encode_heatmap(heat)
    created = datetime.now(UTC)
    archived = None
    if service.archive.should_archive(decision.verdict):
        archived = service.archive.stored(decoded.sha256) or _save_to_archive(
            service,
            request.data,
            sha256=decoded.sha256,
            verdict=decision.verdict,
            label=decision.label,
            created=created,
        )
    record = _record(
        request, engine, decoded, timing, probs, decision, created=created, archived=archived
    )
    committed, stored = service.records.try_commit(record)
    return _Concluded(decision, heatmap, record, committed, stored)


async def inspect_image(
    service: Service,
    data: bytes,
    *,
    model: str | None,
    origin: Origin,
    started: float,
    heatmap: HeatmapFormat | None = None,
    idempotency_key: str | None = None,
) -> InspectResponse:
    """Inspect one encoded image; returns only after the record is durably stored.

    With `heatmap`, the answer carries the model's defect heatmap in that format (null
    for a model without one: the verdict is what the line needs, so it is never refused).
    With `idempotency_key`, a key already recorded answers that record again, marked
    replayed (no heatmap), and nothing is inspected or recorded a second time.
    """
    if idempotency_key is not None:
        replay = await find_replay(service.records, idempotency_key, data, origin)
        if replay is not None:
            return replay
    settings = service.settings
    request = _Request(service, data, origin, started, idempotency_key, heatmap)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + settings.deadline_ms / 1000.0 - (time.perf_counter() - started)
    # A lease keeps this version alive across a concurrent hot reload.
    with service.registry.lease(model) as engine:
        decoded, probs, heat, timing, concluded = await engine.decode_and_infer(
            service.decoder,
            data,
            max_pixels=settings.max_pixels,
            keep_image=service.shadow.needs_image(engine),
            deadline=deadline,
            then=functools.partial(_conclude_alone, request, engine),
        )
    if concluded is None:  # batched with others: decided here, archived on a thread
        decision = _decide(request, engine, probs)
        heatmap_answer = request.encode_heatmap(heat)
        created = datetime.now(UTC)
        archived = await archive_if_needed(
            service,
            data,
            sha256=decoded.sha256,
            verdict=decision.verdict,
            label=decision.label,
            created=created,
        )
        record = _record(
            request, engine, decoded, timing, probs, decision, created=created, archived=archived
        )
        concluded = _Concluded(decision, heatmap_answer, record, committed=False)
    decision, record, stored = concluded.decision, concluded.record, concluded.stored
    if not concluded.committed:
        stored = await service.records.add(record)  # durable before the answer leaves
    if stored is not None:  # a request with the same key was recorded first: answer that
        return replayed_answer(stored, image_sha256=decoded.sha256, origin=origin)
    timings = record.timings.model_copy(
        update={"total_ms": (time.perf_counter() - started) * 1000.0}
    )
    metrics = service.metrics
    metrics.observe_timings(timings.decode_ms, timings.queue_ms, timings.infer_ms, timings.total_ms)
    metrics.verdicts.labels(
        origin.line_id or "", origin.station_id or "", decision.label, decision.verdict.value
    ).inc()
    # Only now, with the answer final and recorded: the candidate can never change or delay it.
    service.shadow.offer(engine, decoded, record)
    return InspectResponse(
        inspection_id=record.id,
        verdict=decision.verdict,
        label=decision.label,
        confidence=decision.confidence,
        defect_probability=decision.defect_probability,
        probabilities=record.probabilities,
        model=ModelInfo(name=engine.name, version=engine.version),
        timings=timings,
        line_id=origin.line_id,
        station_id=origin.station_id,
        cell_id=origin.cell_id,
        heatmap=concluded.heatmap,
    )
