"""Train -> resume -> export -> publish on a tiny synthetic set, and the gates around it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader
from typer.testing import CliRunner

from cellinspect.cli import app
from cellinspect.cli.data import synthesize
from cellinspect.datasets.decode import read_image
from cellinspect.datasets.manifest import load_manifest
from cellinspect.datasets.preprocess import PreprocessSpec, preprocess_batch
from cellinspect.datasets.samples import Split
from cellinspect.datasets.synth import SynthKind
from cellinspect.models.card import (
    HEATMAP_NAME,
    INPUT_NAME,
    LOGITS_NAME,
    OperatingCriteria,
    ViewSet,
)
from cellinspect.models.predict import LoadedModel
from cellinspect.models.store import ModelStore
from cellinspect.training.augment import AugmentPreset, build_augmentation
from cellinspect.training.choices import ExportCheckpoint
from cellinspect.training.config import TrainConfig
from cellinspect.training.data import (
    CrackPaintingDataset,
    PreparedImageDataset,
    load_training_data,
    prepare_all,
    reseed_worker,
)
from cellinspect.training.export import Checkpoint, ExportParityError, export_run
from cellinspect.training.fit import BEST, CONFIG, LAST, METRICS, build_spec, fit
from cellinspect.training.networks import has_aux_cam_weights
from cellinspect.training.quantize import export_int8


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "electrode"
    synthesize(SynthKind.ELECTRODE, out, count=12, seed=0, size=64, workers=1)
    return out


@pytest.fixture(scope="module")
def trained_run(tiny_data, tmp_path_factory) -> TrainConfig:
    cfg = TrainConfig(
        data=str(tiny_data),
        out=str(tmp_path_factory.mktemp("run")),
        epochs=2,
        img_size=64,
        batch_size=16,
        workers=0,
    )
    fit(cfg, progress=False)
    return cfg


def test_fit_writes_checkpoints_metrics_and_resolved_config(trained_run) -> None:
    run = trained_run.run_dir
    assert (run / BEST).is_file() and (run / LAST).is_file()
    lines = [json.loads(x) for x in (run / METRICS).read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [0, 1]
    assert all(0.0 <= r["val_macro_f1"] <= 1.0 and r["train_loss"] > 0 for r in lines)
    assert "img_size:\n- 64\n- 64" in (run / CONFIG).read_text()
    state = torch.load(run / LAST, weights_only=False)
    assert {"model", "optimizer", "lr_scheduler", "epoch", "config"} <= state.keys()


def test_resume_continues_from_last_epoch(trained_run) -> None:
    more = trained_run.model_copy(update={"epochs": 3})
    result = fit(more, progress=False)
    assert result.epochs_run == 1  # only epoch 3 was left
    epochs = [json.loads(x)["epoch"] for x in (more.run_dir / METRICS).read_text().splitlines()]
    assert epochs == [0, 1, 2]


def test_aux_cam_head_is_trained_and_saved_only_when_its_loss_is_on(
    trained_run, tiny_data, tmp_path
) -> None:
    state = torch.load(trained_run.run_dir / LAST, weights_only=False)["model"]
    assert trained_run.aux_cam_weight > 0  # the default
    assert has_aux_cam_weights(state) and state["aux_cam.weight"].any()  # left its zero init
    cfg = TrainConfig(
        data=str(tiny_data),
        out=str(tmp_path / "run"),
        epochs=1,
        img_size=48,
        batch_size=16,
        workers=0,
        aux_cam_weight=0,
    )
    fit(cfg, progress=False)
    assert not has_aux_cam_weights(torch.load(cfg.run_dir / LAST, weights_only=False)["model"])


def test_resume_refuses_a_checkpoint_made_with_another_aux_cam_setting(
    trained_run, tmp_path
) -> None:
    shutil.copytree(trained_run.run_dir, tmp_path / "run")
    other = trained_run.model_copy(
        update={"out": str(tmp_path / "run"), "aux_cam_weight": 0.0, "epochs": 9}
    )
    with pytest.raises(ValueError, match="made with the auxiliary CAM head; resume with"):
        fit(other, progress=False)


def test_training_eval_path_and_predict_path_feed_identical_arrays(trained_run, tmp_path) -> None:
    store = ModelStore(tmp_path / "store")
    card = export_run(trained_run.run_dir, store=store, name="tiny-electrode")
    data = load_training_data(trained_run)
    spec = build_spec(trained_run, data)
    assert spec == card.preprocessing
    samples = data.splits[Split.VAL][:8]
    train_side = PreparedImageDataset(
        prepare_all(samples, spec, max_pixels=10**7), data.labels(Split.VAL)[:8], spec
    )
    expected = np.stack([train_side[i][0].numpy() for i in range(len(samples))])

    loaded = LoadedModel.load(store, "tiny-electrode@1")
    fed: list[np.ndarray] = []
    run = loaded._run
    loaded._run = lambda batch: (fed.append(batch.copy()), run(batch))[1]  # type: ignore[method-assign]
    loaded.predict([read_image(s.path) for s in samples])
    np.testing.assert_array_equal(np.concatenate(fed), expected)


def test_export_publishes_verified_version_with_parity_and_metrics(trained_run, tmp_path) -> None:
    store = ModelStore(tmp_path / "store")
    card = export_run(trained_run.run_dir, store=store, name="tiny-electrode")
    assert card.version == "1"
    assert card.parity["max_abs_diff"] <= 1e-4 and card.parity["samples"] > 0
    assert set(card.metrics) == {"val", "test"}
    assert card.training_data is not None and card.training_data.count > 0
    stored, onnx_path = store.load_verified("tiny-electrode@1")
    assert stored.onnx_sha256 == card.onnx_sha256
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(onnx_path)).metadata_props}
    assert json.loads(meta["cellinspect.class_names"]) == card.class_names
    assert json.loads(meta["cellinspect.preprocessing"]) == card.preprocessing.model_dump(
        mode="json"
    )
    # The leakage guard's hashes travel with the version, checked against the card's hash.
    hashes = (onnx_path.parent / "training_hashes.txt").read_text().splitlines()
    assert card.training_data.manifest_hash in hashes[0]
    assert len(hashes) - 1 == len(load_manifest(Path(trained_run.data) / "manifest.json").samples)


def test_export_chooses_the_operating_point_for_the_criteria_given(trained_run, tmp_path) -> None:
    store = ModelStore(tmp_path / "store")
    card = export_run(
        trained_run.run_dir,
        store=store,
        name="tiny-electrode",
        criteria=OperatingCriteria(cost_ratio=1.0, target_auto_accuracy=0.5, confidence=0.6),
    )
    point = store.card("tiny-electrode@1").operating_point
    assert point == card.operating_point
    assert point.method == "cost_ratio+target_auto_accuracy+confidence"
    assert (point.cost_ratio, point.target_auto_accuracy, point.confidence) == (1.0, 0.5, 0.6)
    assert point.review_low <= point.scrap_threshold and point.val_review_rate is not None


def test_export_publishes_the_last_checkpoint_when_asked_or_configured(
    trained_run, tmp_path
) -> None:
    # A copy of the run whose last checkpoint is unmistakable: another epoch, other weights.
    run = tmp_path / "run"
    shutil.copytree(trained_run.run_dir, run)
    state = torch.load(run / LAST, weights_only=False)
    state["epoch"] = 99
    state["model"] = {
        k: v + 0.05 if v.is_floating_point() else v for k, v in state["model"].items()
    }
    torch.save(state, run / LAST)
    best_epoch = torch.load(run / BEST, weights_only=False)["epoch"]
    store = ModelStore(tmp_path / "store")
    best = export_run(run, store=store, name="tiny-electrode", score_test=False)
    last = export_run(
        run, store=store, name="tiny-electrode", score_test=False, checkpoint=ExportCheckpoint.LAST
    )
    assert (
        best.training_config["exported_checkpoint"],
        best.training_config["exported_epoch"],
    ) == (
        "best",
        best_epoch,
    )
    assert (
        last.training_config["exported_checkpoint"],
        last.training_config["exported_epoch"],
    ) == (
        "last",
        99,
    )
    assert last.onnx_sha256 != best.onnx_sha256
    # A run whose training config names `last` exports it without being told.
    for name in (BEST, LAST):
        state = torch.load(run / name, weights_only=False)
        state["config"]["export_checkpoint"] = "last"
        torch.save(state, run / name)
    configured = Checkpoint.load(run)
    assert (configured.which, configured.epoch) == (ExportCheckpoint.LAST, 99)
    # Asked for by name, the last checkpoint is read alone: best.pt is not needed.
    (run / BEST).rename(run / "best.pt.away")
    assert Checkpoint.load(run, ExportCheckpoint.LAST).epoch == 99
    (run / "best.pt.away").rename(run / BEST)
    (run / LAST).unlink()
    with pytest.raises(FileNotFoundError, match="last.pt: no last checkpoint"):
        Checkpoint.load(run)


def test_exporting_the_last_checkpoint_of_an_unfinished_run_warns(
    trained_run, tmp_path, caplog
) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained_run.run_dir, run)
    with caplog.at_level("WARNING", logger="cellinspect.training.export"):
        Checkpoint.load(run, ExportCheckpoint.LAST)  # the last of its configured epochs
    assert "unfinished" not in caplog.text
    state = torch.load(run / LAST, weights_only=False)
    done = state["epoch"] + 1
    state["config"]["epochs"] = done + 3  # as if three more epochs were still to come
    torch.save(state, run / LAST)
    with caplog.at_level("WARNING", logger="cellinspect.training.export"):
        Checkpoint.load(run, ExportCheckpoint.LAST)
    assert f"{run / LAST} holds epoch {done} of {done + 3}" in caplog.text
    assert "unfinished" in caplog.text
    caplog.clear()
    state["stale"] = state["config"]["patience"]  # stopped early: finished after all
    torch.save(state, run / LAST)
    with caplog.at_level("WARNING", logger="cellinspect.training.export"):
        Checkpoint.load(run, ExportCheckpoint.LAST)
    assert "unfinished" not in caplog.text


def test_export_refuses_to_publish_when_parity_fails(trained_run, tmp_path) -> None:
    store = ModelStore(tmp_path / "store")
    with pytest.raises(ExportParityError, match="nothing was published"):
        export_run(trained_run.run_dir, store=store, name="tiny-electrode", tolerance=-1.0)
    assert store.list_models() == []


def test_exported_views_average_the_plain_graph_over_flipped_images(trained_run, tmp_path) -> None:
    store = ModelStore(tmp_path / "store")
    plain = export_run(trained_run.run_dir, store=store, name="tiny-electrode")
    card = export_run(
        trained_run.run_dir,
        store=store,
        name="tiny-electrode",
        views=ViewSet.FLIPS,
        score_test=False,  # a screening export: the test split stays unread
    )
    assert plain.test_time_views is ViewSet.NONE and card.test_time_views is ViewSet.FLIPS
    assert set(plain.metrics) == {"val", "test"} and set(card.metrics) == {"val"}
    assert card.parity["max_abs_diff"] <= 1e-4 and card.output_names == plain.output_names
    samples = load_training_data(trained_run).splits[Split.VAL][:4]
    batch = preprocess_batch([read_image(s.path) for s in samples], card.preprocessing)
    flipped = [batch, batch[..., ::-1, ::-1], batch[..., ::-1], batch[..., ::-1, :]]
    names = [LOGITS_NAME, HEATMAP_NAME]
    base = LoadedModel.load(store, "tiny-electrode@1").session
    outputs = [base.run(names, {INPUT_NAME: np.ascontiguousarray(b)}) for b in flipped]
    logits, heatmap = LoadedModel.load(store, "tiny-electrode@2").session.run(
        names, {INPUT_NAME: batch}
    )
    np.testing.assert_allclose(logits, np.mean([o[0] for o in outputs], axis=0), atol=1e-4)
    unflipped = [outputs[0][1], outputs[1][1][:, ::-1, ::-1], outputs[2][1][..., ::-1]]
    unflipped.append(outputs[3][1][:, ::-1, :])
    np.testing.assert_allclose(heatmap, np.mean(unflipped, axis=0), atol=1e-4)
    shown = CliRunner().invoke(
        app, ["models", "show", "tiny-electrode@2", "--store", str(store.root)]
    )
    assert shown.exit_code == 0 and "views      flips: 4 averaged in the graph" in shown.output


def test_export_refuses_quarter_turns_of_a_rectangular_input(tiny_data, tmp_path) -> None:
    cfg = TrainConfig(
        data=str(tiny_data), out=str(tmp_path / "run"), epochs=1, img_size="48x64", workers=0
    )
    fit(cfg, progress=False)
    store = ModelStore(tmp_path / "store")
    with pytest.raises(ValueError, match="needs a square input, not 48x64"):
        export_run(cfg.run_dir, store=store, name="x", views=ViewSet.ISOTROPIC)
    assert store.list_models() == []


@pytest.fixture(scope="module")
def refit_run(trained_run, tmp_path_factory) -> TrainConfig:
    """`trained_run`'s recipe and data (its manifest) fitted on train+val: its refit."""
    cfg = TrainConfig.model_validate(
        {
            **trained_run.model_dump(),
            "data": str(load_training_data(trained_run).manifest_path),
            "out": str(tmp_path_factory.mktemp("refit")),
            "epochs": 1,
            "fit_on": "train+val",
            "export_checkpoint": "last",
        }
    )
    fit(cfg, progress=False)
    return cfg


def test_fit_on_train_and_val_trains_on_both_and_validates_nothing(refit_run) -> None:
    data = load_training_data(refit_run)
    manifest = load_manifest(refit_run.data)
    assert sorted(s.sha256 for s in data.splits[Split.TRAIN]) == sorted(
        s.sha256 for s in manifest.samples if s.split in (Split.TRAIN, Split.VAL)
    )
    assert data.splits[Split.VAL] == []
    run = refit_run.run_dir
    assert (run / LAST).is_file() and not (run / BEST).is_file()  # no epoch is picked
    (record,) = [json.loads(x) for x in (run / METRICS).read_text().splitlines()]
    assert record["train_loss"] > 0 and not any(k.startswith("val_") for k in record)


def test_a_refit_exports_only_with_a_twin_fitted_on_train(trained_run, refit_run, tmp_path) -> None:
    store = ModelStore(tmp_path / "store")
    with pytest.raises(ValueError, match=r"fitted on train\+val.*pass --calibrate-with"):
        export_run(refit_run.run_dir, store=store, name="tiny-refit", score_test=False)
    # The twin's final epoch, exported alone: what the refit's calibration must equal.
    alone = export_run(
        trained_run.run_dir,
        store=store,
        name="tiny-twin",
        score_test=False,
        checkpoint=ExportCheckpoint.LAST,
    )
    card = export_run(
        refit_run.run_dir, store=store, name="tiny-refit", calibrate_with=trained_run.run_dir
    )
    assert card.onnx_sha256 != alone.onnx_sha256  # the refit's own weights are published...
    assert card.temperature == alone.temperature  # ...calibrated on the twin's predictions
    assert card.calibration.logits == alone.calibration.logits
    assert card.operating_point == alone.operating_point
    assert card.metrics["val"] == alone.metrics["val"]
    assert "test" in card.metrics and card.metrics["test"] != alone.metrics.get("test")
    manifest = load_manifest(refit_run.data)
    assert (card.training_data.split, card.training_data.count) == (
        "train+val",
        sum(s.split in (Split.TRAIN, Split.VAL) for s in manifest.samples),
    )
    twin = card.training_config["calibrated_with"]
    assert (twin["run"], twin["checkpoint"]) == (str(trained_run.run_dir.absolute()), "last")
    shown = CliRunner().invoke(
        app, ["models", "show", f"tiny-refit@{card.version}", "--store", str(store.root)]
    )
    assert shown.exit_code == 0, shown.output
    assert "images, train+val)" in shown.output and "calibrated with" in shown.output
    # A twin must be fitted on train alone; a run fitted on train needs none.
    with pytest.raises(ValueError, match=r"cannot calibrate .*fitted on train\+val too"):
        export_run(refit_run.run_dir, store=store, name="x", calibrate_with=refit_run.run_dir)
    with pytest.raises(ValueError, match=r"--calibrate-with is for runs fitted on train\+val"):
        export_run(trained_run.run_dir, store=store, name="x", calibrate_with=refit_run.run_dir)
    # INT8 would gate and calibrate its INT8 model on the refit's own training images.
    with pytest.raises(ValueError, match=r"fitted on train\+val: INT8 export"):
        export_int8(refit_run.run_dir, store=store, name="x")
    refused = CliRunner().invoke(
        app,
        ["export", str(refit_run.run_dir), "--name", "x", "--store", str(store.root)]
        + ["--quantize", "int8", "--calibrate-with", str(trained_run.run_dir)],
    )
    # (main() prints a ValueError as one line and exits 2; the runner calls the app under it)
    assert isinstance(refused.exception, ValueError)
    assert "have no INT8 export" in str(refused.exception) and store.versions("x") == []


def test_a_refit_twin_must_share_data_input_and_network(
    trained_run, refit_run, tiny_data, tmp_path
) -> None:
    other = TrainConfig(
        data=str(tiny_data),
        out=str(tmp_path / "other"),
        epochs=1,
        img_size=48,
        arch="resnet18_half",
        batch_size=16,
        workers=0,
    )
    fit(other, progress=False)
    with pytest.raises(ValueError, match="preprocessing differs; its network differs"):
        export_run(
            refit_run.run_dir,
            store=ModelStore(tmp_path / "store"),
            name="x",
            calibrate_with=other.run_dir,
        )


def test_export_without_training_names_missing_checkpoint(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="best.pt"):
        export_run(tmp_path, store=ModelStore(tmp_path / "store"), name="x")


def test_early_stopping_ends_run_when_validation_stalls(tiny_data, tmp_path) -> None:
    # A learning rate this small cannot move validation macro-F1 after the first epoch.
    cfg = TrainConfig(
        data=str(tiny_data),
        out=str(tmp_path / "run"),
        epochs=6,
        img_size=48,
        batch_size=32,
        workers=0,
        lr=1e-12,
        warmup_epochs=0,
        patience=1,
        balance="sampler",
    )
    result = fit(cfg, progress=False)
    assert result.stopped_early
    assert result.epochs_run == 2 and result.best_epoch == 0


def _weights_after_one_epoch(data: Path, out: Path, seed: int) -> dict[str, torch.Tensor]:
    cfg = TrainConfig(
        data=str(data), out=str(out), epochs=1, img_size=48, batch_size=16, workers=0, seed=seed
    )
    fit(cfg, progress=False)
    return torch.load(cfg.run_dir / LAST, weights_only=False)["model"]


def test_training_with_the_same_seed_repeats_exactly(tiny_data, tmp_path) -> None:
    # Augmentation draws included: albumentations keeps its own random state.
    first = _weights_after_one_epoch(tiny_data, tmp_path / "a", seed=0)
    again = _weights_after_one_epoch(tiny_data, tmp_path / "b", seed=0)
    other = _weights_after_one_epoch(tiny_data, tmp_path / "c", seed=1)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


@pytest.mark.parametrize("kind", ["augmentation", "crack painting"])
def test_loader_workers_draw_different_but_repeatable_random_changes(kind: str) -> None:
    spec = PreprocessSpec(height=32, width=32, channels=1)
    same_image = np.tile(np.linspace(0, 1, 32, dtype=np.float32), (4, 32, 1))[..., None]
    labels = np.zeros(4, dtype=np.int64)
    if kind == "augmentation":
        augment = build_augmentation(AugmentPreset.ISOTROPIC, seed=0)
        dataset = PreparedImageDataset(same_image, labels, spec, augment)
    else:  # every image is good and nearly every draw paints a crack
        dataset = CrackPaintingDataset(
            same_image, labels, spec, share=0.99, good=0, defective=1, seed=0
        )

    def batches() -> list[torch.Tensor]:
        loader = DataLoader(
            dataset,
            batch_size=2,
            num_workers=2,
            generator=torch.Generator().manual_seed(0),
            worker_init_fn=reseed_worker,
        )
        return [images for images, _ in loader]

    first, again = batches(), batches()
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    # Batch 0 comes from worker 0 and batch 1 from worker 1: same inputs, other draws.
    assert not torch.equal(first[0], first[1])
