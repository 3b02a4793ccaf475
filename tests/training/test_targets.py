"""Training on soft targets (an expert's defect probability) and with an EMA of the weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cellinspect.datasets.decode import encode_png
from cellinspect.datasets.manifest import build_manifest, write_manifest
from cellinspect.datasets.samples import Sample, Split
from cellinspect.training.config import TrainConfig
from cellinspect.training.data import TrainingData, load_training_data
from cellinspect.training.fit import BEST, LAST, fit

# ELPV-like grades: defective iff the probability is above one half.
GRADES = (0.0, 1 / 3, 2 / 3, 1.0)


def graded_set(out: Path, per_grade: int = 12, *, grade_of=lambda p: p) -> Path:
    """Gray 48² images whose brightness rises with a defect probability kept as metadata."""
    rng = np.random.default_rng(0)
    samples = []
    for g, p in enumerate(GRADES):
        for i in range(per_grade):
            image = np.clip(rng.normal(60 + 50 * g, 12, (48, 48)), 0, 255).astype(np.uint8)
            path = out / f"g{g}_{i:02d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(encode_png(image))
            label = "defective" if p > 0.5 else "functional"
            samples.append(Sample(path=str(path), label=label, metadata={"p": grade_of(p)}))
    manifest_path = out / "manifest.json"
    manifest = build_manifest(samples, out=manifest_path, seed=0, val=0.25, test=0.0)
    write_manifest(manifest, manifest_path)
    return manifest_path


def config(data: Path, out: Path, **overrides) -> TrainConfig:
    base = dict(
        data=str(data),
        out=str(out),
        img_size=48,
        epochs=1,
        batch_size=8,
        workers=0,
        good_class="functional",
    )
    return TrainConfig(**(base | overrides))


def training_data(tmp_path: Path, **kwargs) -> TrainingData:
    manifest = graded_set(tmp_path / "data", **kwargs)
    return load_training_data(config(manifest, tmp_path / "run"))


def test_soft_targets_are_the_probability_of_the_defective_class(tmp_path) -> None:
    data = training_data(tmp_path)
    targets = data.soft_targets(Split.TRAIN, "p")
    defective = data.class_names.index("defective")
    truth = [s.metadata["p"] for s in data.splits[Split.TRAIN]]
    np.testing.assert_allclose(targets[:, defective], truth, rtol=1e-6)
    np.testing.assert_allclose(targets.sum(axis=1), 1.0, rtol=1e-6)
    assert set(np.round(targets[:, defective] * 3).astype(int)) == {0, 1, 2, 3}


def test_soft_targets_refuse_a_missing_key_naming_the_image(tmp_path) -> None:
    data = training_data(tmp_path)
    with pytest.raises(ValueError, match=r"g\d_\d\d\.png: metadata 'grade' is None"):
        data.soft_targets(Split.TRAIN, "grade")


def test_soft_targets_refuse_a_probability_that_contradicts_the_label(tmp_path) -> None:
    data = training_data(tmp_path, grade_of=lambda p: 1.0 - p)
    with pytest.raises(ValueError, match=r"label '\w+' disagrees with 'p'"):
        data.soft_targets(Split.TRAIN, "p")


def test_soft_targets_refuse_probabilities_outside_zero_one(tmp_path) -> None:
    data = training_data(tmp_path, grade_of=lambda p: p if p < 0.5 else 3 * p)  # in thirds
    with pytest.raises(ValueError, match=r"'p' = [23]\.0 is outside \[0, 1\]"):
        data.soft_targets(Split.TRAIN, "p")


def test_fit_trains_on_soft_targets_with_weights_smoothing_and_mixing(tmp_path) -> None:
    manifest = graded_set(tmp_path / "data")
    mixing = {"mixup_alpha": 0.2, "cutmix_alpha": 1.0}
    cfg = config(manifest, tmp_path / "run", soft_label_key="p", label_smoothing=0.1, **mixing)
    result = fit(cfg, progress=False)
    assert result.epochs_run == 1 and result.best_val_macro_f1 >= 0


def _state_differs(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return any(
        not torch.equal(a[k], b[k]) for k in a if a[k].is_floating_point() and "running" not in k
    )


def test_ema_checkpoints_the_averaged_weights_and_resumes_from_the_raw_ones(tmp_path) -> None:
    manifest = graded_set(tmp_path / "data")
    cfg = config(manifest, tmp_path / "run", ema_decay=0.5)
    fit(cfg, progress=False)
    first = torch.load(cfg.run_dir / LAST, weights_only=False)
    steps = first["lr_scheduler"]["last_epoch"]
    assert steps > 1 and first["ema_updates"] == steps
    assert _state_differs(first["model"], first["train_model"])
    assert torch.load(cfg.run_dir / BEST, weights_only=False)["ema_updates"] == steps

    fit(cfg.model_copy(update={"epochs": 2}), progress=False)  # resumes at epoch 2
    second = torch.load(cfg.run_dir / LAST, weights_only=False)
    assert second["epoch"] == 1 and second["ema_updates"] == 2 * steps
    assert _state_differs(second["model"], first["model"])


def test_without_ema_the_checkpoint_has_only_the_trained_weights(tmp_path) -> None:
    manifest = graded_set(tmp_path / "data")
    cfg = config(manifest, tmp_path / "run")
    fit(cfg, progress=False)
    state = torch.load(cfg.run_dir / LAST, weights_only=False)
    assert "train_model" not in state and "ema_updates" not in state
