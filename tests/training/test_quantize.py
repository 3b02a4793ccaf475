"""INT8 static quantization: QDQ S8S8 files, the agreement gate, the export path and the CLI."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from cellinspect.cli import app
from cellinspect.cli.data import synthesize
from cellinspect.datasets.preprocess import PreprocessSpec
from cellinspect.datasets.synth import SynthKind
from cellinspect.models.card import (
    HEATMAP_NAME,
    LOGITS_NAME,
    PROBABILITIES_NAME,
    OperatingCriteria,
    ViewSet,
)
from cellinspect.models.predict import LoadedModel
from cellinspect.models.runtime import create_session
from cellinspect.models.store import ModelStore
from cellinspect.training import quantize
from cellinspect.training.config import TrainConfig
from cellinspect.training.export import Checkpoint, export_onnx
from cellinspect.training.fit import fit
from cellinspect.training.quantize import (
    INT8_AGREEMENT_GATE,
    QUANTIZATION_SCHEME,
    QuantizationGateError,
    agreement,
    choose_calibration_samples,
    export_int8,
    quantize_int8,
)

SIZE = 32
CLASSES = ["good", "crack", "spot"]


def patterns(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Preprocessed-looking 1 x 32 x 32 images: plain noise (good), a dark line (crack) or a
    bright blob (spot) at a random place; labels cycle through the classes."""
    rng = np.random.default_rng(seed)
    images = rng.normal(0.0, 0.3, (n, 1, SIZE, SIZE)).astype(np.float32)
    labels = np.arange(n) % 3
    yy, xx = np.mgrid[:SIZE, :SIZE]
    for image, label in zip(images, labels, strict=True):
        r, c = rng.integers(4, SIZE - 4, 2)
        if label == 1:
            if rng.random() < 0.5:
                image[0, r - 1 : r + 1, :] -= 1.5
            else:
                image[0, :, c - 1 : c + 1] -= 1.5
        elif label == 2:
            image[0] += 2.0 * np.exp(-((yy - r) ** 2 + (xx - c) ** 2) / 6.0)
    return images, labels


class TinyCNN(nn.Module):
    """Conv-BN-ReLU twice, global average pool, linear: enough weights for int8 to show."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.Conv2d(64, 64, 3, stride=2, padding=1),
            nn.BatchNorm2d(64),
            nn.ReLU(),
        )
        self.fc = nn.Linear(64, len(CLASSES))

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.fc(self.features(image).mean(dim=(2, 3)))
        return logits, torch.softmax(logits, dim=1)


@pytest.fixture(scope="module")
def fp32_model(tmp_path_factory) -> Path:
    """The tiny CNN trained to near 100% on `patterns`, exported by the production exporter."""
    torch.manual_seed(0)
    net = TinyCNN()
    images, labels = patterns(384, seed=0)
    x, y = torch.from_numpy(images), torch.from_numpy(labels)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    for step in range(120):
        batch = slice((step * 32) % 384, (step * 32) % 384 + 32)
        loss = nn.functional.cross_entropy(net(x[batch])[0], y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    ckpt = Checkpoint(
        model=net.eval(),
        class_names=CLASSES,
        good_class="good",
        spec=PreprocessSpec(height=SIZE, width=SIZE, channels=1),
        config={"arch": "tiny-cnn"},
        manifest_path=Path("unused"),
        manifest_hash="unused",
        epoch=0,
    )
    path = tmp_path_factory.mktemp("fp32") / "model.onnx"
    export_onnx(ckpt, path)
    return path


@pytest.fixture(scope="module")
def int8_model(fp32_model: Path) -> Path:
    calibration, _ = patterns(240, seed=1)
    return quantize_int8(fp32_model, fp32_model.with_name("model.int8.onnx"), calibration)


def test_int8_file_is_qdq_s8s8_smaller_and_keeps_float_outputs(fp32_model, int8_model) -> None:
    model = onnx.load(str(int8_model))
    ops = Counter(n.op_type for n in model.graph.node)
    assert ops["QuantizeLinear"] > 0 and ops["DequantizeLinear"] > 0
    weights = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert weights, "weights should be stored as signed int8"
    assert not any(t.data_type == onnx.TensorProto.UINT8 for t in model.graph.initializer)
    assert int8_model.stat().st_size < 0.5 * fp32_model.stat().st_size
    outputs = {o.name: o.type.tensor_type.elem_type for o in model.graph.output}
    assert outputs == {
        LOGITS_NAME: onnx.TensorProto.FLOAT,
        PROBABILITIES_NAME: onnx.TensorProto.FLOAT,
    }
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["cellinspect.quantization"] == QUANTIZATION_SCHEME
    assert "cellinspect.class_names" in meta and "cellinspect.preprocessing" in meta


def test_int8_agrees_with_fp32_on_held_out_images(fp32_model, int8_model) -> None:
    val, labels = patterns(300, seed=2)
    fp32 = create_session(fp32_model, intra_op_threads=1)
    found = agreement(fp32, create_session(int8_model, intra_op_threads=1), val)
    assert found.samples == 300
    assert found.top1 >= INT8_AGREEMENT_GATE
    assert 0.0 < found.max_abs_prob_diff < 0.2
    accuracy = (fp32.run([LOGITS_NAME], {"image": val})[0].argmax(axis=1) == labels).mean()
    assert accuracy > 0.9  # the model is worth agreeing with


def test_calibration_samples_are_stratified_and_repeatable() -> None:
    from cellinspect.datasets.samples import Sample

    samples = [Sample(path=f"{label}/{i}.png", label=label) for label in "ab" for i in range(100)]
    samples += [Sample(path=f"c/{i}.png", label="c") for i in range(10)]
    chosen = choose_calibration_samples(samples, 42, seed=3)
    assert Counter(s.label for s in chosen) == {"a": 20, "b": 20, "c": 2}
    assert chosen == choose_calibration_samples(list(reversed(samples)), 42, seed=3)
    assert len(choose_calibration_samples(samples[:5], 42)) == 5


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    data = tmp_path_factory.mktemp("data") / "electrode"
    synthesize(SynthKind.ELECTRODE, data, count=8, seed=0, size=32, workers=1)
    cfg = TrainConfig(
        data=str(data),
        out=str(tmp_path_factory.mktemp("run")),
        epochs=1,
        img_size=32,
        batch_size=16,
        workers=0,
    )
    fit(cfg, progress=False)
    return cfg.run_dir


@pytest.fixture(scope="module")
def published(tiny_run, tmp_path_factory):
    store = ModelStore(tmp_path_factory.mktemp("store"))
    # A 1-epoch model's near-tied logits say nothing about int8 accuracy: this checks wiring.
    fp32, int8 = export_int8(tiny_run, store=store, name="tiny", calibration_samples=32, gate=0.0)
    return store, fp32, int8


def test_export_int8_publishes_fp32_then_int8_evaluated_alike(published) -> None:
    store, fp32, int8 = published
    assert (fp32.version, int8.version) == ("1", "2")
    assert fp32.quantization is None and int8.quantization == QUANTIZATION_SCHEME
    assert set(int8.metrics) == set(fp32.metrics) == {"val", "test"}
    assert int8.metrics["val"].data == fp32.metrics["val"].data
    assert 0.0 <= int8.parity["agreement"] <= 1.0
    assert int8.parity["calibration_samples"] == 32
    assert int8.parity["speed_vs_fp32"] > 0  # measured at export, on this machine
    # The heatmap (the auxiliary CAM head's, trained by default) stays a float output.
    assert fp32.output_names[-1] == int8.output_names[-1] == HEATMAP_NAME
    assert "max_abs_heatmap_diff" in int8.parity
    assert int8.training_config == fp32.training_config
    assert int8.calibration is not None and fp32.calibration is not None
    assert int8.calibration.data == fp32.calibration.data
    loaded = LoadedModel.load(store, "tiny@2")
    assert loaded.card.class_names == fp32.class_names
    assert loaded.card.preprocessing == fp32.preprocessing
    ops = {n.op_type for n in onnx.load(str(store.load_verified("tiny@2")[1])).graph.node}
    assert "QuantizeLinear" in ops


def test_int8_of_a_graph_with_test_time_views_keeps_them_criteria_and_skips_the_test_split(
    tiny_run, tmp_path
) -> None:
    store = ModelStore(tmp_path / "store")
    fp32, int8 = export_int8(
        tiny_run,
        store=store,
        name="tiny",
        calibration_samples=16,
        gate=0.0,
        views=ViewSet.FLIPS,
        score_test=False,
        criteria=OperatingCriteria(cost_ratio=1.0, target_auto_accuracy=0.5, confidence=0.6),
    )
    assert fp32.test_time_views is int8.test_time_views is ViewSet.FLIPS
    # The INT8 version is calibrated for the criteria its FP32 twin was.
    criteria = ("method", "cost_ratio", "max_escape", "target_auto_accuracy", "confidence")
    assert [getattr(int8.operating_point, k) for k in criteria] == [
        "cost_ratio+target_auto_accuracy+confidence",
        1.0,
        None,
        0.5,
        0.6,
    ]
    assert [getattr(fp32.operating_point, k) for k in criteria] == [
        getattr(int8.operating_point, k) for k in criteria
    ]
    assert set(fp32.metrics) == set(int8.metrics) == {"val"}
    graph = onnx.load(str(store.load_verified("tiny@2")[1])).graph
    assert "QuantizeLinear" in {n.op_type for n in graph.node}


def test_export_int8_refuses_below_gate_and_publishes_nothing(
    published, tiny_run, tmp_path, monkeypatch
) -> None:
    done, fp32, _ = published

    def exported_already(run_dir, *, store, name, **_):  # skip a second torch export
        return store.publish(done.load_verified("tiny@1")[1], fp32)

    monkeypatch.setattr(quantize, "export_run", exported_already)
    store = ModelStore(tmp_path / "store")
    with pytest.raises(QuantizationGateError, match=r"agrees with the FP32 model on \d+\.\d+%"):
        export_int8(tiny_run, store=store, name="tiny", calibration_samples=16, gate=1.01)
    assert store.list_models() == []


def test_export_cli_offers_int8_and_states_the_gate() -> None:
    result = CliRunner().invoke(app, ["export", "--help"])
    assert result.exit_code == 0
    assert "--quantize" in result.output and "int8" in result.output
    assert f"{INT8_AGREEMENT_GATE:.0%}" in result.output


def test_export_cli_int8_reports_both_versions_or_the_refusal(
    published, tiny_run, monkeypatch
) -> None:
    store, fp32, int8 = published
    args = ["export", str(tiny_run), "--name", "tiny", "--quantize", "int8"]
    args += ["--store", str(store.root)]
    monkeypatch.setattr(quantize, "export_int8", lambda *a, **k: (fp32, int8))
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "published tiny@1 (fp32) and tiny@2 (int8-qdq-s8s8" in result.output
    assert "quantized  int8-qdq-s8s8: top-1 agrees" in result.output

    def refused(*a, **k):
        raise QuantizationGateError("INT8 top-1 agrees with the FP32 model on 97.00% of 100")

    monkeypatch.setattr(quantize, "export_int8", refused)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1
    assert "97.00%" in result.output


def test_int8_slower_than_fp32_is_reported_with_a_warning(
    published, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    store, fp32, int8 = published
    rates = iter([400.0, 100.0])  # FP32 first, then INT8

    def fake(loaded, **_kwargs):
        return SimpleNamespace(images_per_second=next(rates))

    monkeypatch.setattr(quantize, "measure_throughput", fake)
    paths = [store.load_verified(f"tiny@{v}")[1] for v in ("1", "2")]
    with caplog.at_level(logging.WARNING, logger=quantize.__name__):
        ratio = quantize.int8_speedup(paths[0], fp32, paths[1], int8)
    assert ratio == 0.25
    assert "INT8 runs at 0.25x the FP32 speed" in caplog.text
