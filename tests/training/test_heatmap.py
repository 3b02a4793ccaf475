"""Defect heatmaps: the closed-form maps on every architecture, and the pointing game on
synthetic electrode tiles with masks, through the published ONNX model.

Run with -s to see the figures. The published map is the auxiliary stride-16 head's CAM
(input / 16, an 8 x 8 grid at 128 px) gated by the last feature map's Grad-CAM (input / 32).
A peak lands on (or, at the border, near) a cell centre, so "on the defect" is judged as the
pointing game does (Zhang et al., 2016), within 15 px (Euclidean) of the mask; the strict
on-the-mask rate and chance rates are printed beside it, and every HeatmapSource's figures
on the same model per split (torch, from the checkpoint).
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
from cellinspect.datasets.preprocess import PreprocessSpec, preprocess_batch
from cellinspect.datasets.samples import Sample, Split
from cellinspect.datasets.synth import ELECTRODE_CLASSES, generate_electrode
from cellinspect.datasets.synth.writer import image_seed
from cellinspect.models.card import HEATMAP_NAME
from cellinspect.models.heatmap import pointing_game
from cellinspect.models.predict import LoadedModel
from cellinspect.models.runtime import create_session
from cellinspect.models.store import ModelStore
from cellinspect.training.config import TrainConfig
from cellinspect.training.export import Checkpoint, export_onnx, export_run, heatmap_source
from cellinspect.training.fit import BEST, fit
from cellinspect.training.networks import (
    DEFAULT_AUX_SOURCE,
    Arch,
    ExportableClassifier,
    HeatmapSource,
    _feature_maps,
    _head,
    aux_cam_head,
    class_activation_map,
    create_model,
    forward_with_aux,
    gated_map,
)

# The pointing game's tolerance (Zhang et al., 2016), fixed by the protocol: about half the
# last feature map's stride (32), a whole cell of the auxiliary head's map (stride 16).
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
    features = _feature_maps(net, x)[1].detach().requires_grad_(True)
    z = _head(net)(torch.flatten(net.avgpool(features), 1))
    log_odds = torch.logsumexp(z[:, [0, 2, 3]], dim=1) - z[:, 1]
    (grad,) = torch.autograd.grad(log_odds.sum(), features)
    reference = class_activation_map(features.detach(), grad.sum(dim=(2, 3)), size=(64, 96))
    torch.testing.assert_close(heatmap, reference, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", list(Arch))
def test_aux_head_reads_the_stride_16_map_and_leaves_the_logits_alone(arch: Arch) -> None:
    torch.manual_seed(0)
    net = create_model(arch, num_classes=4, aux_cam=True).eval()
    x = torch.randn(2, 1, 128, 96)
    with torch.no_grad():
        fine, last = _feature_maps(net, x)
        logits, aux_logits = forward_with_aux(net, x)
        expected = net(x)
    assert fine.shape[-2:] == (8, 6) and last.shape[-2:] == (4, 3)
    assert torch.equal(logits, expected) and aux_logits.shape == (2, 4)
    head = aux_cam_head(net)
    assert head is not None and head.in_features == fine.shape[1]
    assert not head.weight.any()  # zero-initialised: an untrained head points nowhere


@pytest.mark.parametrize("arch", [Arch.MOBILENET_V3_SMALL, Arch.RESNET18])
def test_aux_heatmap_is_exact_cam_of_the_aux_heads_defect_log_odds(arch: Arch) -> None:
    torch.manual_seed(0)
    net = create_model(arch, num_classes=4, aux_cam=True).eval()
    head = aux_cam_head(net)
    assert head is not None
    torch.nn.init.normal_(head.weight, std=0.5)
    model = ExportableClassifier(net, good_index=1, source=HeatmapSource.AUX_CAM).eval()
    x = torch.randn(2, 1, 64, 96)
    with torch.no_grad():
        logits, _, heatmap = model(x)
        assert torch.equal(logits, net(x))
    assert heatmap.shape == (2, 64, 96) and heatmap.min() >= 0 and heatmap.max() <= 1
    assert (heatmap.amax(dim=(1, 2)) > 0).all()
    fine = _feature_maps(net, x)[0].detach().requires_grad_(True)
    z = head(fine.mean(dim=(2, 3)))
    log_odds = torch.logsumexp(z[:, [0, 2, 3]], dim=1) - z[:, 1]
    (grad,) = torch.autograd.grad(log_odds.sum(), fine)
    reference = class_activation_map(fine.detach(), grad.sum(dim=(2, 3)), size=(64, 96))
    torch.testing.assert_close(heatmap, reference, atol=1e-5, rtol=1e-4)


def test_gated_map_peaks_where_both_maps_agree_and_a_dim_map_stays_dim() -> None:
    fine = torch.zeros(2, 4, 4)
    fine[:, 0, 0], fine[:, 2, 2] = 1.0, 0.8
    coarse = torch.zeros(2, 4, 4)
    coarse[:, 2:, 2:] = 1.0
    coarse[1] *= 0.3  # the second image: the semantic map sees little
    gated = gated_map(fine, coarse)
    assert gated.min() >= 0
    assert [divmod(int(i), 4) for i in gated.flatten(1).argmax(dim=1)] == [(2, 2), (2, 2)]
    torch.testing.assert_close(gated.amax(dim=(1, 2)), torch.tensor([1.0, 0.3]))
    assert not gated_map(fine, torch.zeros(2, 4, 4)).any()


def test_aux_sources_are_refused_for_a_net_without_the_aux_head() -> None:
    net = create_model("mobilenet_v3_small", num_classes=3)
    assert ExportableClassifier(net, good_index=0).source is HeatmapSource.GRAD_CAM
    with pytest.raises(ValueError, match="needs the auxiliary CAM head.*'grad-cam'"):
        ExportableClassifier(net, good_index=0, source=HeatmapSource.AUX_CAM)
    with pytest.raises(ValueError, match="has no auxiliary CAM head"):
        forward_with_aux(net, torch.zeros(1, 1, 64, 64))


def write_checkpoint(run_dir: Path, net: torch.nn.Module, spec: PreprocessSpec) -> None:
    """A best checkpoint as fit saves it, for `net` (classes ok, crack, pinhole)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    state = {
        "model": net.state_dict(),
        "config": {"arch": "mobilenet_v3_small"},
        "class_names": ["ok", "crack", "pinhole"],
        "good_class": "ok",
        "preprocessing": spec.model_dump(mode="json"),
        "manifest_path": str(run_dir / "manifest.json"),
        "manifest_hash": "0",
        "epoch": 0,
    }
    torch.save(state, run_dir / BEST)


def test_checkpoint_without_aux_head_exports_the_grad_cam_map_as_before(tmp_path) -> None:
    torch.manual_seed(0)
    net = create_model("mobilenet_v3_small", num_classes=3).eval()
    spec = PreprocessSpec(height=64, width=64, channels=1, mean=(0.5,), std=(0.25,))
    write_checkpoint(tmp_path, net, spec)
    ckpt = Checkpoint.load(tmp_path)
    assert isinstance(ckpt.model, ExportableClassifier)
    assert ckpt.model.source is HeatmapSource.GRAD_CAM and aux_cam_head(ckpt.model.net) is None
    assert heatmap_source(ckpt.model) is HeatmapSource.GRAD_CAM  # what the card will say
    assert heatmap_source(ExportableClassifier(net)) is None  # no good class: no heatmap output
    x = torch.randn(3, 1, 64, 64)
    with torch.no_grad():
        _, _, heatmap = ckpt.model(x)
    # The map as it was computed before the auxiliary head existed: on net.features' output.
    features = net.features(x).detach().requires_grad_(True)
    z = net.classifier(torch.flatten(net.avgpool(features), 1))
    (grad,) = torch.autograd.grad((torch.logsumexp(z[:, 1:], dim=1) - z[:, 0]).sum(), features)
    reference = class_activation_map(features.detach(), grad.sum(dim=(2, 3)), size=(64, 64))
    torch.testing.assert_close(heatmap, reference, atol=1e-5, rtol=1e-4)


def test_checkpoint_with_aux_head_exports_its_map_and_onnx_runtime_agrees(tmp_path) -> None:
    torch.manual_seed(0)
    net = create_model("mobilenet_v3_small", num_classes=3, aux_cam=True).eval()
    head = aux_cam_head(net)
    assert head is not None
    torch.nn.init.normal_(head.weight, std=0.5)
    spec = PreprocessSpec(height=64, width=64, channels=1, mean=(0.5,), std=(0.25,))
    write_checkpoint(tmp_path, net, spec)
    ckpt = Checkpoint.load(tmp_path)
    assert ckpt.model.source is DEFAULT_AUX_SOURCE
    assert heatmap_source(ckpt.model) is DEFAULT_AUX_SOURCE
    export_onnx(ckpt, tmp_path / "model.onnx")
    session = create_session(tmp_path / "model.onnx", intra_op_threads=1)
    assert [o.name for o in session.get_outputs()][-1] == HEATMAP_NAME
    x = torch.randn(3, 1, 64, 64)
    with torch.no_grad():
        logits, _, heatmap = ckpt.model(x)
    got_logits, _, got_heatmap = session.run(None, {"image": x.numpy()})
    assert got_heatmap.shape == (3, 64, 64)
    np.testing.assert_allclose(got_logits, logits.numpy(), atol=1e-4)
    np.testing.assert_allclose(got_heatmap, heatmap.numpy(), atol=1e-3)


def test_an_untrained_aux_head_exports_a_dark_map_not_nan(tmp_path) -> None:
    # The zero-initialised head has no evidence anywhere: 0 / 0 must give 0 in ONNX Runtime
    # too (the exporter folds an epsilon in the denominator away).
    torch.manual_seed(0)
    net = create_model("mobilenet_v3_small", num_classes=3, aux_cam=True).eval()
    spec = PreprocessSpec(height=64, width=64, channels=1, mean=(0.5,), std=(0.25,))
    write_checkpoint(tmp_path, net, spec)
    export_onnx(Checkpoint.load(tmp_path), tmp_path / "model.onnx")
    session = create_session(tmp_path / "model.onnx", intra_op_threads=1)
    heatmap = session.run(
        [HEATMAP_NAME],
        {"image": np.random.default_rng(0).normal(size=(2, 1, 64, 64)).astype(np.float32)},
    )[0]
    assert heatmap.shape == (2, 64, 64) and not heatmap.any()


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
    aux_cam_weight: float | None = None  # None: TrainConfig's default
    seed: int = 0  # training seed; the tiles and the split stay the same


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
        seed=setup.seed,
        **({} if setup.aux_cam_weight is None else {"aux_cam_weight": setup.aux_cam_weight}),
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
        f"{setup.epochs} epochs; accuracy (all classes) val "
        f"{card.metrics['val'].accuracy:.4f}, test {card.metrics['test'].accuracy:.4f}"
    )
    kinds = np.array([s.metadata["kind"] for s in held])[right]
    for kind in sorted(set(kinds)):
        mine = kinds == kind
        k_hits, k_n = pointing_game(heatmaps[right][mine], masks[right][mine], tolerance=TOLERANCE)
        print(f"  {kind:18s} {k_hits}/{k_n}")
    sources = source_figures(cfg.run_dir, held, right, masks)
    return {
        "hits": hits,
        "rate": hits / n,
        "n": n,
        "chance": chance / n,
        "strict": strict / n,
        "sources": sources,
    }


def source_figures(
    run_dir: Path, held: list[Sample], right: np.ndarray, masks: np.ndarray
) -> dict[HeatmapSource, dict[str, float]]:
    """Every heatmap source the checkpoint offers, on the same correctly classified tiles:
    hit rates within TOLERANCE per split, printed with the strict rate and the hits per kind.
    Torch maps from the checkpoint (the exported map's twin), so sources compare like with like.
    """
    ckpt = Checkpoint.load(run_dir)
    net = ckpt.model.net
    sources = list(HeatmapSource) if aux_cam_head(net) is not None else [HeatmapSource.GRAD_CAM]
    batch = torch.from_numpy(preprocess_batch([read_image(s.path) for s in held], ckpt.spec))
    splits = np.array([s.split for s in held])
    kinds = np.array([s.metadata["kind"] for s in held])
    figures = {}
    print(f"heatmap sources (shipped: {ckpt.model.source.value}), within {TOLERANCE} px:")
    for source in sources:
        model = ExportableClassifier(net, good_index=ckpt.model.good_index, source=source).eval()
        with torch.inference_mode():
            maps = torch.cat([model(batch[i : i + 64])[2] for i in range(0, len(batch), 64)])
        maps = maps.numpy()
        rates, text = {}, []
        for split in (Split.VAL, Split.TEST):
            mine = right & (splits == split)
            hits, n = pointing_game(maps[mine], masks[mine], tolerance=TOLERANCE)
            rates[split.value] = hits / n
            text.append(f"{split.value} {hits}/{n} = {hits / n:.2f}")
        hits, n = pointing_game(maps[right], masks[right], tolerance=TOLERANCE)
        strict, _ = pointing_game(maps[right], masks[right])
        rates["all"], rates["strict"] = hits / n, strict / n
        per_kind = []
        for kind in sorted(set(kinds[right])):
            mine = right & (kinds == kind)
            k_hits, k_n = pointing_game(maps[mine], masks[mine], tolerance=TOLERANCE)
            per_kind.append(f"{kind} {k_hits}/{k_n}")
        print(
            f"  {source.value:19s} {', '.join(text)}; all {hits}/{n} = {hits / n:.2f}, "
            f"strict {strict / n:.2f}; {', '.join(per_kind)}"
        )
        figures[source] = rates
    return figures


def test_heatmaps_point_at_defects_of_a_quickly_trained_pass_scrap_model(tmp_path) -> None:
    """Fast variant (~45 s on one core): ok vs defect, every kind in one class, 30 tiles per
    kind. The shipped map (auxiliary stride-16 CAM gated by Grad-CAM, head weight 0.25)
    scored 0.90, 0.92 and 0.84 with training seeds 0, 1, 2 on the dev box (weight 0.5: 0.80,
    0.81, 0.90; the last feature map's Grad-CAM alone: 0.53, 0.75, 0.60; chance 0.16-0.23). Floats differ between CPUs, so even the seeded run
    differs elsewhere: the floor sits below that spread. Broken maps (wrong sign, swapped
    axes, misplaced upsampling) sit at chance: the hits must also be far beyond what chance
    gives on the same masks (binomial test).
    """
    setup = PointingSetup(
        size=128,
        counts={"ok": 210, **{kind: 30 for kind in DEFECTS}},
        labels={"ok": "ok", **{kind: "defect" for kind in DEFECTS}},
        epochs=12,
    )
    figures = pointing_figures(tmp_path, setup)
    assert figures["n"] >= 40
    assert figures["rate"] >= 0.65
    beyond_chance = binomtest(
        figures["hits"], figures["n"], figures["chance"], alternative="greater"
    )
    assert beyond_chance.pvalue < 1e-4


@pytest.mark.slow
def test_heatmaps_point_at_defects_of_an_eight_class_model(tmp_path) -> None:
    """The demo's recipe: every electrode class, 300 tiles each at 128 px, 18 epochs
    (~2.5 min on one idle core), training seed 0; issue 4's bar of 0.80. With seeds 0, 1, 2
    the shipped map scored 0.87, 0.97, 0.93 (chance 0.17-0.21; head weight 0.5: 0.84, 0.84,
    0.90); the last feature map's Grad-CAM, which shipped before the auxiliary head, 0.68,
    0.75, 0.57 on the 0.5-weight models.
    """
    setup = PointingSetup(
        size=128,
        counts={kind: 300 for kind in ELECTRODE_CLASSES},
        labels={kind: kind for kind in ELECTRODE_CLASSES},
        epochs=18,
    )
    figures = pointing_figures(tmp_path, setup)
    assert figures["n"] >= 500
    assert figures["rate"] >= 0.80
