"""Write synthetic data sets to disk: PNG images, defect masks, truth files and synth.json.

Every image's generator is seeded from (seed, class index, image index) alone, so the
output is byte-identical whatever the worker count or the order jobs finish in.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
from enum import StrEnum
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from cellinspect.datasets.atomic import write_atomic
from cellinspect.datasets.samples import Sample
from cellinspect.datasets.synth.cell import CELL_CLASSES, generate_cell
from cellinspect.datasets.synth.electrode import ELECTRODE_CLASSES, generate_electrode
from cellinspect.datasets.synth.frame import FRAME_DEFECT_CLASSES, frame_from_rng

logger = logging.getLogger(__name__)

# Bump when a change to any generator changes its output for the same seed.
GENERATOR_VERSION = "2"
FRAME_DEFECTS = 6  # defects per written frame, as generate_frame's default


class SynthKind(StrEnum):
    """Which synthetic data set to generate."""

    ELECTRODE = "electrode"
    CELL = "cell"
    FRAME = "frame"


# `size` means: electrode tile side; cell image height (width is twice that);
# frame width (height is four times that, a line-scan strip).
DEFAULT_SIZE = {SynthKind.ELECTRODE: 128, SynthKind.CELL: 128, SynthKind.FRAME: 2048}


def image_seed(seed: int, class_index: int, index: int) -> np.random.Generator:
    """The generator of one image, independent of worker count and generation order."""
    return np.random.default_rng(np.random.SeedSequence([seed, class_index, index]))


def _png(image: np.ndarray) -> bytes:
    if image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".png", image, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()


def _write_one(job: tuple[str, str, int, int, int, str, int]) -> dict[str, Any]:
    """Generate and write one image (or frame); return the Sample's fields."""
    kind, out_text, seed, size, class_idx, label, index = job
    out = Path(out_text)
    rng = image_seed(seed, class_idx, index)
    if kind == SynthKind.FRAME:
        image, _, truth = frame_from_rng(rng, size, 4 * size, FRAME_DEFECTS)
        stem = f"frames/frame_{seed}_{index}"
        write_atomic(out / f"{stem}.png", _png(image), durable=False)
        doc = {"width": size, "height": 4 * size, "seed": seed, "index": index, "truth": truth}
        write_atomic(out / f"{stem}.json", json.dumps(doc, indent=1).encode(), durable=False)
        return {"path": f"{stem}.png", "label": "frame", "metadata": {"truth": f"{stem}.json"}}
    if kind == SynthKind.ELECTRODE:
        image, mask = generate_electrode(label, rng, size)
    else:
        image, mask = generate_cell(label, rng, size, 2 * size)
    name = f"{label}_{seed}_{index:05d}.png"
    write_atomic(out / "images" / label / name, _png(image), durable=False)
    fields: dict[str, Any] = {"path": f"images/{label}/{name}", "label": label, "metadata": {}}
    if label != "ok":
        write_atomic(out / "masks" / label / name, _png(mask), durable=False)
        fields["metadata"] = {"mask": f"masks/{label}/{name}"}
    return fields


def _classes(kind: SynthKind) -> tuple[str, ...]:
    return {
        SynthKind.ELECTRODE: ELECTRODE_CLASSES,
        SynthKind.CELL: CELL_CLASSES,
        SynthKind.FRAME: FRAME_DEFECT_CLASSES,
    }[kind]


def write_synthetic(
    kind: SynthKind,
    out: Path,
    count: int,
    seed: int = 0,
    size: int | None = None,
    workers: int = 1,
) -> list[Sample]:
    """Generate and write a synthetic data set under `out`; return its samples.

    Electrode and cell: `count` images per class in `images/<class>/`, masks for defect
    classes in `masks/<class>/`. Frame: `count` frames with truth JSON in `frames/`.
    Sample paths are relative to `out`.
    """
    try:
        kind = SynthKind(kind)
    except ValueError:
        valid = ", ".join(k.value for k in SynthKind)
        raise ValueError(f"unknown synthetic kind {kind!r}; valid kinds: {valid}") from None
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    size = DEFAULT_SIZE[kind] if size is None else int(size)
    out = Path(out)
    classes = _classes(kind)
    if kind == SynthKind.FRAME:
        (out / "frames").mkdir(parents=True, exist_ok=True)
        jobs = [(kind.value, str(out), seed, size, 0, "frame", i) for i in range(count)]
    else:
        for label in classes:
            (out / "images" / label).mkdir(parents=True, exist_ok=True)
            if label != "ok":
                (out / "masks" / label).mkdir(parents=True, exist_ok=True)
        jobs = [
            (kind.value, str(out), seed, size, ci, label, i)
            for ci, label in enumerate(classes)
            for i in range(count)
        ]
    if workers == 1:
        results = [_write_one(job) for job in jobs]
    else:
        # fork: children inherit the imported generators, no re-import per worker.
        # (Do not call cv2.setNumThreads in the children: it deadlocks after fork.)
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            chunk = max(1, len(jobs) // (workers * 8))
            results = list(pool.imap(_write_one, jobs, chunksize=chunk))
    manifest = {
        "kind": kind.value,
        "seed": seed,
        "count": count,
        "size": size,
        "classes": list(classes),
        "generator_version": GENERATOR_VERSION,
    }
    write_atomic(out / "synth.json", json.dumps(manifest, indent=2).encode(), durable=False)
    logger.info("wrote %d synthetic %s images to %s", len(results), kind.value, out)
    return [Sample(**fields) for fields in results]
