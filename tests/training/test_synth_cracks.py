"""Training with synthetic cracks painted on a share of the good images (`synth_cracks`), and
the threshold-free validation figure such binary runs are judged by."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from qakit import flat_png, manifest_of

from cellinspect.datasets.preprocess import PreprocessSpec
from cellinspect.datasets.samples import Sample, Split
from cellinspect.training.config import ConfigError, TrainConfig, resolve_config
from cellinspect.training.data import CrackPaintingDataset
from cellinspect.training.fit import CONFIG, fit, validate

SPEC = PreprocessSpec(height=32, width=32, channels=1, mean=(0.0,), std=(1.0,))
GOOD, DEFECTIVE = 1, 0


def dataset(share: float, n_good: int = 300, n_bad: int = 100, **kwargs) -> CrackPaintingDataset:
    images = np.full((n_good + n_bad, 32, 32, 1), 0.7, np.float32)
    labels = np.array([GOOD] * n_good + [DEFECTIVE] * n_bad)
    return CrackPaintingDataset(
        images, labels, SPEC, share=share, good=GOOD, defective=DEFECTIVE, seed=0, **kwargs
    )


def test_a_share_of_good_images_becomes_cracked_and_defective() -> None:
    data = dataset(0.3)
    moved = 0
    for index in range(300):
        image, label = data[index]
        cracked = bool((image < 0.7 - 1e-4).any())
        assert cracked == (label == DEFECTIVE)  # painted iff relabelled
        assert (image <= 0.7 + 1e-6).all()
        moved += cracked
    assert 60 <= moved <= 120  # 30% of 300, binomial spread
    for index in range(300, 400):  # defective images stay as they are
        image, label = data[index]
        assert label == DEFECTIVE and torch.allclose(image, torch.tensor(0.7))


def test_each_draw_paints_a_new_crack() -> None:
    data = dataset(0.99)
    first, second = data[0][0], data[0][0]
    assert not torch.equal(first, second)


def test_soft_targets_of_a_cracked_image_are_one_hot_defective() -> None:
    soft = np.tile(np.array([[0.2, 0.8]], np.float32), (400, 1))  # good: P(good) 0.8
    data = dataset(0.5, targets=soft)
    targets = torch.stack([data[i][1] for i in range(300)])
    cracked = targets[:, DEFECTIVE] == 1.0
    assert 0 < cracked.sum() < 300
    assert torch.equal(targets[cracked], torch.tensor([[1.0, 0.0]]).expand(int(cracked.sum()), 2))
    assert torch.allclose(targets[~cracked], torch.tensor([0.2, 0.8]))


def test_expected_counts_move_the_share_of_good_images() -> None:
    np.testing.assert_allclose(dataset(0.3).expected_counts(2), [100 + 90, 300 - 90])


def test_a_share_outside_zero_one_is_refused() -> None:
    with pytest.raises(ValueError, match="share of cracked good images"):
        dataset(1.0)


def test_the_sampler_cannot_balance_classes_that_change_after_sampling(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"synth_cracks": 0.3, "balance": "sampler"}))
    with pytest.raises(ConfigError, match=f"{path}.*balance: loss or none"):
        resolve_config(yaml_path=path, overrides={"data": "d", "out": "o"})


def _flat_set(tmp_path, labels: list[str]):
    samples = [
        Sample(
            path=str(flat_png(tmp_path / label / f"{i}.png", 60 + 30 * k + i, size=32)),
            label=label,
            split=Split.VAL if i % 4 == 0 else Split.TRAIN,
        )
        for k, label in enumerate(labels)
        for i in range(8)
    ]
    return manifest_of(samples, tmp_path / "manifest.json")[0]


def _cfg(tmp_path, manifest, **overrides) -> TrainConfig:
    base = dict(
        data=str(manifest),
        out=str(tmp_path / "run"),
        img_size=32,
        epochs=1,
        batch_size=4,
        workers=0,
        arch="resnet18_half",
        synth_cracks=0.3,
    )
    return TrainConfig(**(base | overrides))


def test_fit_trains_a_binary_task_with_synthetic_cracks(tmp_path) -> None:
    cfg = _cfg(tmp_path, _flat_set(tmp_path, ["functional", "defective"]))
    result = fit(cfg, progress=False)
    assert result.epochs_run == 1
    assert yaml.safe_load((cfg.run_dir / CONFIG).read_text())["synth_cracks"] == 0.3


def test_fit_refuses_synthetic_cracks_for_more_than_two_classes(tmp_path) -> None:
    manifest = _flat_set(tmp_path, ["good", "crack", "dent"])
    with pytest.raises(ValueError, match=r"manifest.json: synth_cracks needs two classes.*3"):
        fit(_cfg(tmp_path, manifest), progress=False)


def _validate_logits(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    x = torch.from_numpy(logits.astype(np.float32))
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, torch.from_numpy(labels)), batch_size=4
    )
    return validate(torch.nn.Identity(), loader, labels, torch.device("cpu"))


def test_binary_validation_reports_the_threshold_free_roc_auc() -> None:
    # Every defective (1) scores above every good one, but all sit below p = 0.5.
    logits = np.array([[2.0, -2.0], [1.5, -1.0], [1.0, 0.2], [0.9, 0.5], [0.8, 0.6]])
    labels = np.array([0, 0, 1, 1, 1])
    record = _validate_logits(logits, labels)
    assert record["val_roc_auc"] == 1.0 and record["val_accuracy"] == 0.4
    flipped = _validate_logits(logits, 1 - labels)
    assert flipped["val_roc_auc"] == 0.0


def test_no_roc_auc_for_more_than_two_classes_or_one_present() -> None:
    three = _validate_logits(np.eye(3)[[0, 1, 2, 1]], np.array([0, 1, 2, 1]))
    assert "val_roc_auc" not in three and three["val_accuracy"] == 1.0
    assert "val_roc_auc" not in _validate_logits(np.eye(2)[[0, 0]], np.array([0, 0]))
