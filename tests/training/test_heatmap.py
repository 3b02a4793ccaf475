"""Defect heatmaps: the closed-form map on every architecture, and the pointing game on
synthetic electrode tiles with masks, through the published ONNX model.

Run with -s to see the figures. The maps are input / 32 (a 4 x 4 grid at 128 px), so a
peak lands on (or, at the border, near) a cell centre: "on the defect" is judged as the
pointing game does (Zhang et al., 2016), within 15 px (Euclidean) of the mask; the strict
on-the-mask rate and chance rates are printed beside it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from scipy.stats import binomtest

from cellinspect.datasets.decode import encode_png, read_image
from cellinspect.datasets.manifest import build_manifest, load_manifest, write_manifest
from cellinspect.datasets.samples import Sample, Split
from cellinspect.datasets.synth import ELECTRODE_CLASSES, generate_electrode
from cellinspect.datasets.synth.writer import image_seed
from cellinspect.models.card import HEATMAP_NAME
from cellinspect.models.heatmap import pointing_game
from cellinspect.models.predict import LoadedModel
from cellinspect.models.store import ModelStore
from cellinspect.training.config import TrainConfig
from cellinspect.training.export import export_run
from cellinspect.training.fit import fit
from cellinspect.training.networks import (
    Arch,
    ExportableClassifier,
    _feature_map,
    _head,
    class_activation_map,
    create_model,
)

# The pointing game's tolerance (Zhang et al., 2016): about half of the networks' output
# stride (32) here, the coarseness of the maps.
TOLERANCE = 15
DEFECTS = ELECTRODE_CLASSES[1:]


@pytest.mark.parametrize("arch", list(Arch))
def test_heatmap_is_grad_cam_of_defect_log_odds_and_logits_are_unchanged(arch: Arch) -> None:
    torch.manual_seed(0)
    net = create_model(arch, num_classes=4).eval()
    model = ExportableClassifier(net, good_index=1).eval()
    x = torch.randn(2, 1, 64, 96)
    with torch.no_grad():
        logits, probs, heatmap = model(x)
        expected_logits = net(x)
    assert torch.equal(logits, expected_logits)
    assert heatmap.shape == (2, 64, 96) and heatmap.min() >= 0 and heatmap.max() <= 1
    # The same map by autograd: d(log-odds)/dA summed over positions weighs each channel.
    features = _feature_map(net, x).detach().requires_grad_(True)
    z = _head(net)(torch.flatten(net.avgpool(features), 1))
    log_odds = torch.logsumexp(z[:, [0, 2, 3]], dim=1) - z[:, 1]
    (grad,) = torch.autograd.grad(log_odds.sum(), features)
    reference = class_activation_map(features.detach(), grad.sum(dim=(2, 3)), size=(64, 96))
    torch.testing.assert_close(heatmap, reference, atol=1e-5, rtol=1e-4)


def test_without_good_class_the_exportable_model_keeps_two_outputs() -> None:
    model = ExportableClassifier(create_model("resnet18", num_classes=3)).eval()
    assert HEATMAP_NAME not in model.output_names
    with torch.no_grad():
        assert len(model(torch.zeros(1, 1, 64, 64))) == 2


def test_good_index_outside_the_classes_is_refused() -> None:
    with pytest.raises(ValueError, match=r"good_index 3 is not a class index \(0..2\)"):
        ExportableClassifier(create_model("resnet18", num_classes=3), good_index=3)


# ---- pointing game ----------------------------------------------------------------------


@dataclass(frozen=True)
class PointingSetup:
    size: int  # tile side = model input
    counts: dict[str, int]  # generator class -> tiles
    labels: dict[str, str]  # generator class -> training label
    epochs: int
    arch: Arch = Arch.MOBILENET_V3_SMALL


def write_tiles(out: Path, setup: PointingSetup) -> Path:
    """Electrode tiles and masks at `out`, a manifest with a stratified split; its path."""
    samples = []
    for class_index, kind in enumerate(ELECTRODE_CLASSES):
        for i in range(setup.counts.get(kind, 0)):
            image, mask = generate_electrode(kind, image_seed(0, class_index, i), setup.size)
            path = out / "images" / f"{kind}_{i:04d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(encode_png(image))
            metadata = {}
            if kind != "ok":
                mask_path = out / "masks" / path.name
                mask_path.parent.mkdir(parents=True, exist_ok=True)
                mask_path.write_bytes(encode_png(mask))
                metadata = {"mask": str(mask_path), "kind": kind}
            samples.append(Sample(path=str(path), label=setup.labels[kind], metadata=metadata))
    manifest_path = out / "manifest.json"
    write_manifest(build_manifest(samples, out=manifest_path, seed=0), manifest_path)
    return manifest_path


def pointing_figures(tmp: Path, setup: PointingSetup) -> dict[str, Any]:
    """Train, export and publish a model, then play the pointing game with its ONNX heatmaps
    on the correctly classified defect tiles of the validation and test splits."""
    manifest_path = write_tiles(tmp / "data", setup)
    cfg = TrainConfig(
        data=str(manifest_path),
        out=str(tmp / "run"),
        arch=setup.arch,
        img_size=setup.size,
        epochs=setup.epochs,
        patience=setup.epochs,
        batch_size=32,
        workers=0,
        threads=1,  # small on purpose: tests share the machine
    )
    fit(cfg, progress=False)
    store = ModelStore(tmp / "store")
    card = export_run(cfg.run_dir, store=store, name="pointing")
    assert HEATMAP_NAME in card.output_names and card.parity["heatmap_max_abs_diff"] <= 1e-3
    model = LoadedModel.load(store, "pointing@1", threads=1)

    held = [
        s
        for s in load_manifest(manifest_path).samples
        if s.split in (Split.VAL, Split.TEST) and "mask" in s.metadata
    ]
    probs, heatmaps = model.predict_with_heatmaps([read_image(s.path) for s in held])
    masks = np.stack([read_image(s.metadata["mask"]) for s in held])
    predicted = np.array(card.class_names)[probs.argmax(axis=1)]
    right = predicted == np.array([s.label for s in held])
    hits, n = pointing_game(heatmaps[right], masks[right], tolerance=TOLERANCE)
    strict, _ = pointing_game(heatmaps[right], masks[right])
    # Chance: where a peak drawn uniformly at random would land, on the same masks.
    noise = np.random.default_rng(0).random(heatmaps[right].shape)
    chance, _ = pointing_game(noise, masks[right], tolerance=TOLERANCE)
    chance_strict, _ = pointing_game(noise, masks[right])
    print(
        f"\npointing game: {hits}/{n} = {hits / n:.2f} within {TOLERANCE} px "
        f"(chance {chance / n:.2f}); strictly on the mask {strict}/{n} = {strict / n:.2f} "
        f"(chance {chance_strict / n:.2f}); {int(right.sum())}/{len(held)} defect tiles "
        f"classified right; {setup.size} px, {len(held)} defect tiles held out, "
        f"{setup.epochs} epochs"
    )
    kinds = np.array([s.metadata["kind"] for s in held])[right]
    for kind in sorted(set(kinds)):
        mine = kinds == kind
        k_hits, k_n = pointing_game(heatmaps[right][mine], masks[right][mine], tolerance=TOLERANCE)
        print(f"  {kind:18s} {k_hits}/{k_n}")
    return {"hits": hits, "rate": hits / n, "n": n, "chance": chance / n, "strict": strict / n}


def test_heatmaps_point_at_defects_of_a_quickly_trained_pass_scrap_model(tmp_path) -> None:
    """Fast variant (~40 s on one core): ok vs defect, every kind in one class, 30 tiles per
    kind. Too little training for the 0.80 bar (0.65 here and 0.62 on the CI machine, chance
    0.23 and 0.26: float results differ between CPUs, so even the seeded run differs); this
    guards against broken maps (wrong sign, swapped axes, misplaced upsampling), which sit at
    chance: the hits must be far beyond what chance gives on the same masks (binomial test).
    """
    setup = PointingSetup(
        size=128,
        counts={"ok": 210, **{kind: 30 for kind in DEFECTS}},
        labels={"ok": "ok", **{kind: "defect" for kind in DEFECTS}},
        epochs=12,
    )
    figures = pointing_figures(tmp_path, setup)
    assert figures["n"] >= 40
    assert figures["rate"] >= 0.50
    beyond_chance = binomtest(
        figures["hits"], figures["n"], figures["chance"], alternative="greater"
    )
    assert beyond_chance.pvalue < 1e-4


@pytest.mark.slow
def test_heatmaps_point_at_defects_of_an_eight_class_model(tmp_path) -> None:
    """The demo's recipe: every electrode class, 300 tiles each at 128 px, 18 epochs
    (~2.5 min on one core). Two runs measured 0.90 and 0.79 (chance 0.22, 0.26): training
    is not repeatable (augmentation draws unseeded) and the maps vary with it, uncoated
    streaks most (73/90 vs 28/89). The bar sits below that spread so the test is not flaky.
    """
    setup = PointingSetup(
        size=128,
        counts={kind: 300 for kind in ELECTRODE_CLASSES},
        labels={kind: kind for kind in ELECTRODE_CLASSES},
        epochs=18,
    )
    figures = pointing_figures(tmp_path, setup)
    assert figures["n"] >= 500
    assert figures["rate"] >= 0.75
