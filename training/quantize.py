"""INT8 static quantization for CPU edge boxes, gated on agreement with the FP32 model.

ONNX Runtime QDQ format, signed int8 activations and weights (S8S8), per-channel weights,
ranges calibrated on training images. Export's parity gate becomes an accuracy gate: the INT8
model's top-1 must agree with the FP32 model's on the validation split, else nothing is
published. The INT8 version is evaluated and temperature-calibrated through the same ONNX
Runtime path as the FP32 one, so QA compares like with like.
"""

from __future__ import annotations

import logging
import tempfile
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import numpy_helper
from onnxruntime.quantization import CalibrationDataReader

from cellinspect.datasets.decode import DEFAULT_MAX_PIXELS
from cellinspect.datasets.manifest import load_manifest
from cellinspect.datasets.samples import Sample, Split
from cellinspect.models.card import (
    HEATMAP_NAME,
    INPUT_NAME,
    LOGITS_NAME,
    PROBABILITIES_NAME,
    ModelCard,
    OperatingCriteria,
    ViewSet,
)
from cellinspect.models.evaluate import measure_throughput
from cellinspect.models.predict import LoadedModel
from cellinspect.models.store import ModelStore, sha256_file
from cellinspect.training.choices import ExportCheckpoint, FitSplits
from cellinspect.training.export import (
    evaluate_card,
    export_run,
    fitted_on,
    load_batch,
    read_checkpoint,
    training_files,
)

if TYPE_CHECKING:
    import onnxruntime

log = logging.getLogger(__name__)

INT8_AGREEMENT_GATE = 0.99  # share of validation images whose INT8 top-1 equals the FP32 top-1
QUANTIZATION_SCHEME = "int8-qdq-s8s8"  # ModelCard.quantization of a quantized version
CALIBRATION_SAMPLES = 256  # training images whose activations set the int8 ranges
CALIBRATION_SEED = 0
_CALIBRATION_BATCH = 16
_AGREEMENT_BATCH = 64


class QuantizationGateError(RuntimeError):
    """The INT8 model's top-1 disagrees with the FP32 model's on too many validation images."""


class RangeMethod(StrEnum):
    """How activation ranges are read from the calibration images.

    MinMax is the default, measured: on an ELPV resnet18 (1,051 val+test images) it kept
    99.71% top-1 agreement against Percentile's 99.33%, in a third of the time; its ranges
    are reduced inside the graph, where Percentile holds every activation of every calibration
    image in memory, and Percentile fails outright on the heatmap branch's -inf mask.
    """

    MINMAX = "minmax"  # the observed extremes: nothing clipped
    PERCENTILE = "percentile"  # the 99.999th percentile of |x|, symmetric: outliers clipped


@dataclass(frozen=True)
class Agreement:
    """How closely the INT8 model follows the FP32 model on the same images."""

    top1: float  # share of images on which both pick the same class
    max_abs_prob_diff: float  # largest |P_int8 - P_fp32| over images and classes (softmax output)
    samples: int
    max_abs_heatmap_diff: float | None = None  # the same for the defect heatmap, if any


class ArrayCalibrationReader(CalibrationDataReader):
    """Feeds preprocessed images to ONNX Runtime's calibrator a batch at a time."""

    def __init__(self, images: np.ndarray, *, batch_size: int = _CALIBRATION_BATCH) -> None:
        self.images = np.ascontiguousarray(images, dtype=np.float32)
        self.batch_size = batch_size
        self._next = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._next >= len(self.images):
            return None
        batch = self.images[self._next : self._next + self.batch_size]
        self._next += self.batch_size
        return {INPUT_NAME: batch}

    def rewind(self) -> None:
        self._next = 0


def choose_calibration_samples(
    samples: Sequence[Sample], count: int = CALIBRATION_SAMPLES, *, seed: int = CALIBRATION_SEED
) -> list[Sample]:
    """About `count` samples drawn per label in proportion to its share (at least one each);
    the same samples for the same inputs and seed, whatever their order."""
    if count < 1:
        raise ValueError(f"calibration needs at least 1 image, got {count}")
    if len(samples) <= count:
        return sorted(samples, key=lambda s: s.path)
    by_label: dict[str, list[Sample]] = defaultdict(list)
    for sample in sorted(samples, key=lambda s: s.path):
        by_label[sample.label].append(sample)
    rng = np.random.default_rng(seed)
    chosen: list[Sample] = []
    for label in sorted(by_label):
        group = by_label[label]
        take = min(len(group), max(1, round(count * len(group) / len(samples))))
        chosen.extend(group[i] for i in sorted(rng.choice(len(group), take, replace=False)))
    return chosen


def scheme(*, per_channel: bool) -> str:
    """The card's `quantization` value for this module's output."""
    return QUANTIZATION_SCHEME if per_channel else f"{QUANTIZATION_SCHEME}-per-tensor"


def _check_scales(model: onnx.ModelProto) -> None:
    """Every scale the int8 graph uses must be finite and positive (a NaN or infinite range in
    calibration, e.g. from a NaN image, would otherwise give a model that outputs NaN)."""
    initializers = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and node.input[1] in initializers:
            scale = numpy_helper.to_array(initializers[node.input[1]])
            if not (np.isfinite(scale).all() and (scale > 0).all()):
                raise ValueError(
                    f"quantization gave {node.input[0]!r} an invalid scale {scale.ravel()[:4]}: "
                    "the calibration images produced a non-finite range there"
                )


def float_nodes(model: onnx.ModelProto, *, head: bool = True) -> list[str]:
    """Nodes left in float: everything the logits do not depend on (the probabilities
    softmax, the heatmap branch) and, with `head`, the node that writes the logits.

    The softmax then reads dequantized logits and every output leaves the model in float;
    a float head keeps the logits off an int8 grid, whose step would move the calibrated
    probabilities near the operating point.
    """
    producer = {out: node for node in model.graph.node for out in node.output}
    needed: set[str] = set()
    stack = [LOGITS_NAME]
    while stack:
        node = producer.get(stack.pop())
        if node is None or node.name in needed:
            continue
        needed.add(node.name)
        stack.extend(node.input)
    keep = [n.name for n in model.graph.node if n.name not in needed]
    if head and LOGITS_NAME in producer:
        keep.append(producer[LOGITS_NAME].name)
    return keep


def quantize_int8(
    fp32_onnx: str | Path,
    out: str | Path,
    calibration: np.ndarray,
    *,
    per_channel: bool = True,
    method: RangeMethod = RangeMethod.MINMAX,
    float_head: bool = True,
) -> Path:
    """Write `out`: `fp32_onnx` statically quantized to QDQ S8S8 (per-channel weights), its
    activation ranges calibrated on `calibration` (N x C x H x W preprocessed float32 images).

    The input and both outputs stay float32 and the ONNX metadata (class names, preprocessing)
    is carried over, so the result loads wherever the FP32 model does.
    """
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    fp32_onnx, out = Path(fp32_onnx), Path(out)
    if calibration.ndim != 4 or len(calibration) == 0:
        raise ValueError(
            f"calibration must be a non-empty N x C x H x W batch, got {calibration.shape}"
        )
    source = onnx.load(str(fp32_onnx))
    with tempfile.TemporaryDirectory(prefix="cellinspect-quantize-") as tmp:
        # The documented pre-step: shape inference plus graph optimisation, which folds
        # BatchNorm into the convolutions so each conv has one weight and one range to quantize.
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32_onnx), str(prepared), skip_symbolic_shape=True)
        graph = onnx.load(str(prepared))
        for i, node in enumerate(graph.graph.node):  # exclusion goes by node name
            node.name = node.name or f"{node.op_type}_{i}"
        onnx.save(graph, str(prepared))
        # Ranges are measured for every tensor, also those only the float branches read (the
        # heatmap's -inf mask gives NaN parameters ORT never uses): numpy's warnings are noise.
        with np.errstate(invalid="ignore", divide="ignore"):
            quantize_static(
                str(prepared),
                str(out),
                ArrayCalibrationReader(calibration),
                quant_format=QuantFormat.QDQ,
                activation_type=QuantType.QInt8,
                weight_type=QuantType.QInt8,
                per_channel=per_channel,
                calibrate_method=(
                    CalibrationMethod.MinMax
                    if method is RangeMethod.MINMAX
                    else CalibrationMethod.Percentile
                ),
                nodes_to_exclude=float_nodes(graph, head=float_head),
            )
    model = onnx.load(str(out))
    _check_scales(model)
    meta = {p.key: p.value for p in source.metadata_props}
    meta["cellinspect.quantization"] = scheme(per_channel=per_channel)
    meta["cellinspect.quantized_from_sha256"] = sha256_file(fp32_onnx)
    del model.metadata_props[:]
    for key, value in meta.items():
        model.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(model)
    onnx.save(model, str(out))
    return out


def _outputs(session: onnxruntime.InferenceSession, batch: np.ndarray) -> dict[str, np.ndarray]:
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, {INPUT_NAME: batch}), strict=True))


def agreement(
    fp32_session: onnxruntime.InferenceSession,
    int8_session: onnxruntime.InferenceSession,
    val_batch: np.ndarray,
    *,
    batch_size: int = _AGREEMENT_BATCH,
) -> Agreement:
    """Top-1 agreement of the two models on `val_batch`, and their largest output gaps."""
    if len(val_batch) == 0:
        raise ValueError("agreement needs at least one image")
    same, prob_gap, heat_gap = 0, 0.0, None
    for i in range(0, len(val_batch), batch_size):
        batch = np.ascontiguousarray(val_batch[i : i + batch_size], dtype=np.float32)
        ref, got = _outputs(fp32_session, batch), _outputs(int8_session, batch)
        same += int((ref[LOGITS_NAME].argmax(axis=1) == got[LOGITS_NAME].argmax(axis=1)).sum())
        gap = np.abs(got[PROBABILITIES_NAME] - ref[PROBABILITIES_NAME]).max()
        prob_gap = max(prob_gap, float(gap))
        if HEATMAP_NAME in ref and HEATMAP_NAME in got:
            gap = np.abs(got[HEATMAP_NAME] - ref[HEATMAP_NAME]).max()
            heat_gap = max(heat_gap or 0.0, float(gap))
    return Agreement(
        top1=same / len(val_batch),
        max_abs_prob_diff=prob_gap,
        samples=len(val_batch),
        max_abs_heatmap_diff=heat_gap,
    )


def check_agreement(
    fp32: LoadedModel,
    int8: LoadedModel,
    samples: list[Sample],
    max_pixels: int,
    *,
    gate: float = INT8_AGREEMENT_GATE,
    chunk: int = 256,
) -> Agreement:
    """`agreement` over `samples` (read `chunk` at a time); QuantizationGateError below `gate`."""
    spec = fp32.card.preprocessing
    parts = [
        agreement(fp32.session, int8.session, load_batch(samples[i : i + chunk], spec, max_pixels))
        for i in range(0, len(samples), chunk)
    ]
    heat = [p.max_abs_heatmap_diff for p in parts if p.max_abs_heatmap_diff is not None]
    found = Agreement(
        top1=sum(p.top1 * p.samples for p in parts) / len(samples),
        max_abs_prob_diff=max(p.max_abs_prob_diff for p in parts),
        samples=len(samples),
        max_abs_heatmap_diff=max(heat) if heat else None,
    )
    log.info(
        "INT8: top-1 agrees with FP32 on %.2f%% of %d images (gate %.0f%%), max |dP| %.3g",
        100 * found.top1,
        found.samples,
        100 * gate,
        found.max_abs_prob_diff,
    )
    if not found.top1 >= gate:
        raise QuantizationGateError(
            f"INT8 top-1 agrees with the FP32 model on {found.top1:.2%} of {found.samples} "
            f"validation images, below the {gate:.0%} gate (max probability difference "
            f"{found.max_abs_prob_diff:.3f}); nothing was published. Export without "
            "--quantize to publish the FP32 model."
        )
    return found


def int8_card(fp32_card: ModelCard, int8_path: Path, *, per_channel: bool) -> ModelCard:
    """The FP32 card's facts (classes, preprocessing, training config and data, operating
    point criteria) for the INT8 file; metrics and calibration are left to be measured."""
    opset = next(o.version for o in onnx.load(str(int8_path)).opset_import if o.domain == "")
    return ModelCard.model_validate(
        {
            **fp32_card.model_dump(),
            "version": "unpublished",
            "onnx_sha256": "",
            "opset": opset,
            "metrics": {},
            "calibration": None,
            "parity": {},
            "created": datetime.now(UTC),
            "quantization": scheme(per_channel=per_channel),
        }
    )


def int8_speedup(
    fp32_path: Path, fp32_card: ModelCard, int8_path: Path, int8_card: ModelCard
) -> float:
    """INT8 images/s over FP32 images/s on this machine (one image at a time, one thread: the
    service's micro-batches are small), and a warning when INT8 is the slower one: ONNX
    Runtime's CPU provider has no fast quantized kernels for some layers (depthwise
    convolutions, Hardswish), and the QDQ graph then runs them in float between conversions
    (benchmarks/RESULTS.md: MobileNetV3-small 4-5x slower in INT8)."""
    rates = [
        measure_throughput(
            LoadedModel.from_files(path, card, threads=1), threads=1, batch_size=1
        ).images_per_second
        for path, card in ((fp32_path, fp32_card), (int8_path, int8_card))
    ]
    ratio = round(rates[1] / rates[0], 3)
    if ratio < 1:
        log.warning(
            "INT8 runs at %.2fx the FP32 speed on this CPU (%.0f vs %.0f images/s): serve the "
            "FP32 version unless the smaller file matters",
            ratio,
            rates[1],
            rates[0],
        )
    return ratio


def export_int8(
    run_dir: str | Path,
    *,
    store: ModelStore,
    name: str,
    heldout: str | Path | None = None,
    calibration_samples: int = CALIBRATION_SAMPLES,
    seed: int = CALIBRATION_SEED,
    gate: float = INT8_AGREEMENT_GATE,
    per_channel: bool = True,
    criteria: OperatingCriteria | None = None,
    views: ViewSet | None = None,
    score_test: bool = True,
    checkpoint: ExportCheckpoint | None = None,
) -> tuple[ModelCard, ModelCard]:
    """Export the run to FP32 (parity-gated, as `export_run`), quantize it to INT8, gate on
    top-1 agreement on the validation split, evaluate, and publish both: (fp32, int8) cards.

    Both versions are published only when both gates pass; on a refusal the store is untouched.
    """
    run_dir = Path(run_dir)
    # Only the run's manifest and config are read from a checkpoint here, the same in each
    # of them: last.pt, always there (best.pt is not, for a run fitted on train+val),
    # without building its model. Reloading the exported one would repeat its warnings.
    state = read_checkpoint(run_dir, ExportCheckpoint.LAST)
    if fitted_on(state["config"]) is FitSplits.TRAIN_VAL:
        raise ValueError(
            f"{run_dir} was fitted on train+val: INT8 export would gate and calibrate its INT8 "
            "model on its own training images (no INT8 twin); export it in FP32, without "
            "--quantize"
        )
    with tempfile.TemporaryDirectory(prefix="cellinspect-int8-") as tmp:
        # The FP32 export goes to a private store first, so a refused INT8 publishes nothing.
        staging = ModelStore(Path(tmp) / "staging")
        fp32_card = export_run(
            run_dir,
            store=staging,
            name=name,
            heldout=heldout,
            views=views,
            score_test=score_test,
            checkpoint=checkpoint,
            criteria=criteria,
        )
        _, fp32_path = staging.load_verified(f"{name}@{fp32_card.version}")

        manifest = load_manifest(state["manifest_path"])
        # The INT8 version is calibrated for what its FP32 twin was (given or from the config),
        # on images read as the FP32 export read them.
        criteria = fp32_card.operating_point.criteria
        max_pixels = int(fp32_card.training_config.get("max_pixels", DEFAULT_MAX_PIXELS))
        by_split = {split: [s for s in manifest.samples if s.split == split] for split in Split}

        chosen = choose_calibration_samples(by_split[Split.TRAIN], calibration_samples, seed=seed)
        int8_path = quantize_int8(
            fp32_path,
            Path(tmp) / "model.int8.onnx",
            load_batch(chosen, fp32_card.preprocessing, max_pixels),
            per_channel=per_channel,
        )
        card = int8_card(fp32_card, int8_path, per_channel=per_channel)
        int8 = LoadedModel.from_files(int8_path, card)
        if not by_split[Split.VAL]:
            log.warning("no validation split: the INT8 gate measures agreement on training images")
        found = check_agreement(
            LoadedModel.from_files(fp32_path, fp32_card),
            int8,
            by_split[Split.VAL] or by_split[Split.TRAIN],
            max_pixels,
            gate=gate,
        )
        card.parity = {
            "agreement": found.top1,
            "agreement_gate": gate,
            "samples": float(found.samples),
            "max_abs_prob_diff": found.max_abs_prob_diff,
            "calibration_samples": float(len(chosen)),
        }
        if found.max_abs_heatmap_diff is not None:
            card.parity["max_abs_heatmap_diff"] = found.max_abs_heatmap_diff
        card.parity["speed_vs_fp32"] = int8_speedup(fp32_path, fp32_card, int8_path, card)
        evaluate_card(
            card, int8, by_split, manifest, heldout, max_pixels, criteria, score_test=score_test
        )
        files = training_files(manifest)
        published_fp32 = store.publish(fp32_path, fp32_card, extra_files=files)
        return published_fp32, store.publish(int8_path, card, extra_files=files)
