"""Line-scan frame inspection: tile at the model's input size, classify through the
micro-batcher, merge defective tiles into regions, decide the frame, record it."""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from datetime import UTC, datetime

import numpy as np
from pydantic import BaseModel

from cellinspect.datasets.decode import decode_image
from cellinspect.datasets.preprocess import preprocess_batch
from cellinspect.datasets.tiling import (
    Region,
    iter_tile_batches,
    merge_regions,
    tile_grid,
    to_millimetres,
)
from cellinspect.models.card import Verdict
from cellinspect.serving.errors import RequestError
from cellinspect.serving.inspection import Origin, archive_if_needed
from cellinspect.serving.policy import operating_point_for
from cellinspect.serving.records import InspectionRecord
from cellinspect.serving.schemas import ModelInfo
from cellinspect.serving.service import Service

SEVERITY = {Verdict.PASS: 0, Verdict.REVIEW: 1, Verdict.SCRAP: 2}


class FrameRegion(BaseModel):
    x: int
    y: int
    w: int
    h: int
    label: str
    confidence: float
    verdict: Verdict
    tiles: int
    x_mm: float | None = None
    y_mm: float | None = None
    w_mm: float | None = None
    h_mm: float | None = None


class FrameResponse(BaseModel):
    inspection_id: str
    verdict: Verdict
    regions: list[FrameRegion]
    width: int
    height: int
    tiles: int
    model: ModelInfo
    timings: dict[str, float]


def _decode_frame(data: bytes, max_pixels: int) -> tuple[np.ndarray, str]:
    return decode_image(data, max_pixels=max_pixels), hashlib.sha256(data).hexdigest()


async def inspect_frame(
    service: Service,
    data: bytes,
    *,
    model: str | None,
    origin: Origin,
    overlap: float,
    pixel_pitch_mm: float | None,
    started: float,
) -> FrameResponse:
    """Decode, tile, classify, merge, record; at most max_frames_in_flight at once (503):
    a decoded frame (up to max_frame_pixels) is held from its decode to its answer."""
    with service.decoder.frame_slot():
        settings = service.settings
        loop = asyncio.get_running_loop()
        # Through the decode pool: its workers and admission bound how many frames (up to
        # max_frame_pixels each) are decoded at once.
        frame, sha256 = await service.decoder.run(_decode_frame, data, settings.max_frame_pixels)
        decode_ms = (time.perf_counter() - started) * 1000.0
        height, width = frame.shape[:2]
        with service.registry.lease(model) as engine:
            card, spec = engine.card, engine.card.preprocessing
            try:
                tiles = tile_grid(
                    height,
                    width,
                    spec.height,
                    spec.width,
                    overlap,
                    max_tiles=settings.max_frame_tiles,
                )
            except ValueError as exc:
                raise RequestError(422, "bad_tiling", str(exc)) from None
            # Frames take many batches: a deadline per frame scaled by its tile count, and chunks
            # no larger than half the queue so single-image requests keep their place in line.
            deadline = loop.time() + settings.deadline_ms / 1000.0 * max(
                1.0, len(tiles) / settings.max_batch_size
            )
            chunk = max(1, min(settings.queue_size // 2, 4 * settings.max_batch_size))
            rows: list[np.ndarray] = []
            infer_ms = 0.0
            for _, crops in iter_tile_batches(frame, tiles, chunk):
                batch = await asyncio.to_thread(preprocess_batch, crops, spec)
                results = await asyncio.gather(*(engine.infer(x, deadline) for x in batch))
                rows.extend(p for p, _ in results)
                infer_ms += max(t.infer_ms for _, t in results)
        probs = np.stack(rows)
        point, _ = operating_point_for(card, origin.line_id, settings.line_operating_points)
        regions = merge_regions(
            tiles, probs, card.class_names, card.good_class, threshold=point.review_low
        )
        answer = [_region(r, point.verdict(r.confidence), pixel_pitch_mm) for r in regions]
        verdict = max((r.verdict for r in answer), key=SEVERITY.__getitem__, default=Verdict.PASS)
        created = datetime.now(UTC)
        label = answer[0].label if answer else card.good_class
        archived = await archive_if_needed(
            service, data, sha256=sha256, verdict=verdict, label=label, created=created
        )
        worst = max(answer, key=lambda r: r.confidence, default=None)
        inspection_id = uuid.uuid4().hex
        timings = {
            "decode_ms": decode_ms,
            "queue_ms": 0.0,
            "infer_ms": infer_ms,
            "total_ms": (time.perf_counter() - started) * 1000.0,
        }
        await service.records.add(
            InspectionRecord(
                id=inspection_id,
                created=created,
                line_id=origin.line_id,
                station_id=origin.station_id,
                cell_id=origin.cell_id,
                model_name=engine.name,
                model_version=engine.version,
                label=worst.label if worst else card.good_class,
                confidence=worst.confidence if worst else float(probs[:, card.good_index].min()),
                probabilities={
                    c: float(p) for c, p in zip(card.class_names, probs.max(axis=0), strict=True)
                },
                verdict=verdict,
                timings=timings,
                image_sha256=sha256,
                archive_path=archived,
                frame_regions=[r.model_dump(mode="json") for r in answer],
            )
        )
        timings["total_ms"] = (time.perf_counter() - started) * 1000.0
        return FrameResponse(
            inspection_id=inspection_id,
            verdict=verdict,
            regions=answer,
            width=width,
            height=height,
            tiles=len(tiles),
            model=ModelInfo(name=engine.name, version=engine.version),
            timings=timings,
        )


def _region(region: Region, verdict: Verdict, pitch: float | None) -> FrameRegion:
    mm = to_millimetres(region, pitch) if pitch else {}
    return FrameRegion(
        x=region.x,
        y=region.y,
        w=region.w,
        h=region.h,
        label=region.label,
        confidence=region.confidence,
        verdict=verdict,
        tiles=region.tiles,
        **mm,
    )
