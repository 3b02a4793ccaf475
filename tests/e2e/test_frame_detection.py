"""Defect regions on a large line-scan frame, found by tiling it through a trained model.

The real thing: synthetic electrode tiles -> the project's own fit/export -> ONNX model in
a store -> a synthetic frame (same texture and defect painters, native resolution) tiled
at the model's input size -> regions, checked against the frame's truth boxes.

Slow (~2-3 minutes on 2 cores, mostly training). Set CELLINSPECT_TEST_MODEL_STORE to a
store that holds `electrode-defects` to skip training.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest

from cellinspect.datasets.preprocess import preprocess_batch
from cellinspect.datasets.synth import SynthKind, generate_frame
from cellinspect.datasets.tiling import Region, classify_tiles, merge_regions, tile_grid
from cellinspect.models.predict import LoadedModel
from cellinspect.models.store import ModelStore

MODEL_NAME = "electrode-defects"
TILES_PER_CLASS = 150
EPOCHS = 12
OVERLAP = 0.5
MAX_FALSE_REGIONS = 2  # measured 0 on this frame (seed 7) with the model trained here


def trained_store(tmp_path: Path) -> ModelStore:
    """The store named by CELLINSPECT_TEST_MODEL_STORE, or a freshly trained small model's."""
    given = os.environ.get("CELLINSPECT_TEST_MODEL_STORE")
    if given and MODEL_NAME in ModelStore(given).names():
        return ModelStore(given)
    pytest.importorskip("torch")
    from cellinspect.cli.data import synthesize
    from cellinspect.training.config import TrainConfig
    from cellinspect.training.export import export_run
    from cellinspect.training.fit import fit

    data, run = tmp_path / "electrode", tmp_path / "run"
    synthesize(SynthKind.ELECTRODE, data, count=TILES_PER_CLASS, seed=0, size=128, workers=2)
    fit(TrainConfig(data=str(data), out=str(run), epochs=EPOCHS), progress=False)
    store = ModelStore(tmp_path / "store")
    export_run(run, store=store, name=MODEL_NAME)
    return store


def overlaps(region: Region, box: dict) -> bool:
    return (
        region.x < box["x"] + box["w"]
        and box["x"] < region.x + region.w
        and region.y < box["y"] + box["h"]
        and box["y"] < region.y + region.h
    )


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_tiled_frame_finds_every_defect_with_few_false_regions(tmp_path: Path) -> None:
    t0 = time.perf_counter()
    model = LoadedModel.load(trained_store(tmp_path), MODEL_NAME)
    card, spec = model.card, model.card.preprocessing
    t_model = time.perf_counter() - t0

    image, _, truth = generate_frame(seed=7, width=1024, height=2048, n_defects=4)
    t1 = time.perf_counter()
    tiles = tile_grid(*image.shape[:2], spec.height, spec.width, overlap=OVERLAP)
    probs = classify_tiles(
        image,
        tiles,
        lambda crops: model.probabilities(model.predict_logits(preprocess_batch(crops, spec))),
        batch_size=64,
    )
    regions = merge_regions(tiles, probs, card.class_names, card.good_class)
    t_detect = time.perf_counter() - t1

    found = [any(overlaps(r, box) for r in regions) for box in truth]
    false = [r for r in regions if not any(overlaps(r, box) for box in truth)]
    val_f1 = card.metrics["val"].macro_f1
    print(f"\nmodel {card.name}@{card.version} (val macro-F1 {val_f1:.3f}) ready in {t_model:.1f}s")
    print(
        f"{len(tiles)} tiles of {spec.width}x{spec.height} (overlap {OVERLAP}) in {t_detect:.2f}s"
    )
    print(f"{'truth':<18}{'box (x, y, w, h)':<26}found by")
    for box in truth:
        by = [f"{r.label}@({r.x},{r.y},{r.w},{r.h})" for r in regions if overlaps(r, box)]
        print(f"{box['label']:<18}{str((box['x'], box['y'], box['w'], box['h'])):<26}{by or '-'}")
    for r in false:
        print(f"false region {r}")
    print(f"recall {sum(found)}/{len(truth)}, false regions {len(false)}/{len(regions)}")

    assert all(found), [box for box, hit in zip(truth, found, strict=True) if not hit]
    assert len(false) <= MAX_FALSE_REGIONS, false
    assert np.isclose(probs.sum(axis=1), 1.0).all()
