"""ONNX export with a parity gate, evaluation through ONNX Runtime, and publication to the store.

Export fails loudly (and publishes nothing) unless ONNX Runtime reproduces PyTorch's
probabilities on real preprocessed samples: train/serve skew is caught here, not on the line.
"""

from __future__ import annotations

import json
import logging
import subprocess
import tempfile
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx
import torch

from cellinspect.datasets.decode import DEFAULT_MAX_PIXELS, read_image
from cellinspect.datasets.manifest import Manifest, load_manifest
from cellinspect.datasets.preprocess import PreprocessSpec, preprocess_batch
from cellinspect.datasets.samples import Sample, Split
from cellinspect.models.calibration import (
    calibration_data,
    choose_operating_point,
    fit_temperature,
    measure_operating_point,
    reliability_diagram,
    validation_scores,
)
from cellinspect.models.card import (
    HEATMAP_NAME,
    INPUT_NAME,
    LOGITS_NAME,
    PROBABILITIES_NAME,
    DatasetRef,
    EvalMetrics,
    HeatmapSource,
    ModelCard,
    OperatingCriteria,
    ViewSet,
)
from cellinspect.models.leakage import TRAINING_HASHES_FILE, training_hashes_text
from cellinspect.models.metrics import evaluate_predictions
from cellinspect.models.predict import LoadedModel, softmax
from cellinspect.models.store import ModelStore
from cellinspect.training.choices import ExportCheckpoint, FitSplits
from cellinspect.training.fit import BEST, LAST
from cellinspect.training.networks import ExportableClassifier, create_model, has_aux_cam_weights
from cellinspect.training.views import with_views

log = logging.getLogger(__name__)
# The exporter's graph passes log every rewrite at INFO: noise for the person exporting.
logging.getLogger("onnx_ir").setLevel(logging.WARNING)

OPSET = 18
PARITY_TOLERANCE = 1e-4
# Heatmaps are scaled per image to a peak of 1, so float noise in a dim map is magnified by
# up to 1 / HEATMAP_FLOOR; 1e-3 of the peak is far below one gray level of an 8-bit overlay.
HEATMAP_PARITY_TOLERANCE = 1e-3
RELIABILITY_PLOT = "reliability.png"  # written to the run directory at export


class ExportParityError(RuntimeError):
    """ONNX Runtime's outputs differ from PyTorch's beyond the tolerance."""


@dataclass
class Checkpoint:
    """What export needs from one of a run's checkpoints."""

    model: torch.nn.Module
    class_names: list[str]
    good_class: str
    spec: PreprocessSpec
    config: dict
    manifest_path: Path
    manifest_hash: str
    epoch: int
    which: ExportCheckpoint = ExportCheckpoint.BEST

    @classmethod
    def load(cls, run_dir: Path, which: ExportCheckpoint | None = None) -> Checkpoint:
        """The run's best or last checkpoint (None: the one its training config names)."""
        if which is None:  # the training config names the checkpoint to export
            # A run fitted on train+val has no best.pt; every other trained run has both.
            refit = not (run_dir / BEST).is_file() and (run_dir / LAST).is_file()
            first = ExportCheckpoint.LAST if refit else ExportCheckpoint.BEST
            state = read_checkpoint(run_dir, first)
            which = ExportCheckpoint(state["config"].get("export_checkpoint", "best"))
            if which is not first:
                state = read_checkpoint(run_dir, which)
        else:
            state = read_checkpoint(run_dir, which)
        if which is ExportCheckpoint.LAST:
            warn_if_unfinished(run_dir / LAST, state)
        spec = PreprocessSpec.model_validate(state["preprocessing"])
        # Checkpoints from before the auxiliary CAM head (or trained without it) load and
        # export exactly as they did: no head, the Grad-CAM heatmap.
        net = create_model(
            state["config"]["arch"],
            num_classes=len(state["class_names"]),
            in_chans=spec.channels,
            aux_cam=has_aux_cam_weights(state["model"]),
        )
        net.load_state_dict(state["model"])
        return cls(
            model=ExportableClassifier(
                net, good_index=state["class_names"].index(state["good_class"])
            ).eval(),
            class_names=state["class_names"],
            good_class=state["good_class"],
            spec=spec,
            config=state["config"],
            manifest_path=Path(state["manifest_path"]),
            manifest_hash=state["manifest_hash"],
            epoch=state["epoch"],
            which=which,
        )

    def with_views(self, views: ViewSet | None) -> tuple[Checkpoint, ViewSet]:
        """This checkpoint exporting `views` (None: the training config's
        `test_time_views`, none for runs from before that key), and the views chosen."""
        if views is None:
            views = ViewSet(self.config.get("test_time_views", ViewSet.NONE))
        model = with_views(self.model, views, (self.spec.height, self.spec.width))
        return replace(self, model=model), views


def read_checkpoint(run_dir: Path, which: ExportCheckpoint) -> dict:
    """The raw state of the run's best or last checkpoint (no model is built)."""
    path = run_dir / (BEST if which is ExportCheckpoint.BEST else LAST)
    if not path.is_file():
        if which is ExportCheckpoint.BEST:
            if (run_dir / LAST).is_file():
                raise FileNotFoundError(
                    f"{path}: no best checkpoint (a run fitted on train+val picks no epoch); "
                    "export its last one"
                )
            raise FileNotFoundError(f"{path}: no best checkpoint; train this run first")
        raise FileNotFoundError(f"{path}: no last checkpoint in this run; train it first")
    return torch.load(path, map_location="cpu", weights_only=False)


def warn_if_unfinished(path: Path, state: dict) -> None:
    """Warn when a last checkpoint is not where its run ends: fewer epochs than configured
    and no early stop. Exporting it is allowed (an interrupted run may be all there is),
    but a run still training would silently publish a half-trained epoch."""
    config = state["config"]
    done, epochs = state["epoch"] + 1, config.get("epochs", 0)
    if done < epochs and state.get("stale", 0) < config.get("patience", epochs):
        log.warning(
            "%s holds epoch %d of %d and the run did not stop early: it is unfinished "
            "(still training, or interrupted); exporting that epoch. To finish it, run "
            "`cellinspect train` again with the same --out, then export.",
            path,
            done,
            epochs,
        )


def code_commit() -> str | None:
    """The git commit of the code that exported the model, when run from a checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def output_names(model: torch.nn.Module) -> list[str]:
    """The ONNX outputs `model` returns, in order (logits, probabilities[, heatmap])."""
    names = getattr(model, "output_names", None)
    return list(names) if names is not None else [LOGITS_NAME, PROBABILITIES_NAME]


def heatmap_source(model: torch.nn.Module) -> HeatmapSource | None:
    """The map `model`'s heatmap output carries, for the card; None without that output."""
    if HEATMAP_NAME not in output_names(model):
        return None
    return getattr(model, "source", None)


def export_onnx(ckpt: Checkpoint, path: Path, *, opset: int = OPSET) -> None:
    """Write `path`: dynamic batch axis, named input/outputs, metadata, checked."""
    example = torch.zeros(2, *ckpt.spec.input_shape)
    batch = torch.export.Dim("batch", min=1, max=4096)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter is chatty about its own internals
        torch.onnx.export(
            ckpt.model,
            (example,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=output_names(ckpt.model),
            dynamic_shapes={"image": {0: batch}},
            opset_version=opset,
            external_data=False,
            dynamo=True,
            verbose=False,
        )
    model = onnx.load(str(path))
    meta = {
        "cellinspect.class_names": json.dumps(ckpt.class_names),
        "cellinspect.good_class": ckpt.good_class,
        "cellinspect.preprocessing": ckpt.spec.to_json(),
        "cellinspect.arch": str(ckpt.config["arch"]),
    }
    del model.metadata_props[:]
    for key, value in meta.items():
        model.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))


def load_batch(samples: list[Sample], spec: PreprocessSpec, max_pixels: int) -> np.ndarray:
    return preprocess_batch([read_image(s.path, max_pixels=max_pixels) for s in samples], spec)


def check_parity(
    ckpt: Checkpoint,
    loaded: LoadedModel,
    batch: np.ndarray,
    tolerance: float,
    heatmap_tolerance: float = HEATMAP_PARITY_TOLERANCE,
) -> dict[str, float]:
    """Max |ORT - PyTorch| of the probabilities (and heatmaps, where the model has them),
    at batch size 1 and the full batch."""
    names = [PROBABILITIES_NAME, *([HEATMAP_NAME] if loaded.has_heatmap else [])]
    with torch.inference_mode():
        outputs = dict(
            zip(output_names(ckpt.model), ckpt.model(torch.from_numpy(batch)), strict=True)
        )
    reference = [outputs[n].numpy() for n in names]
    full = loaded.session.run(names, {INPUT_NAME: batch})
    singles = [
        loaded.session.run(names, {INPUT_NAME: batch[i : i + 1]}) for i in range(min(4, len(batch)))
    ]
    single = [np.concatenate([s[k] for s in singles]) for k in range(len(names))]

    def max_diff(k: int) -> float:
        return max(
            float(np.abs(full[k] - reference[k]).max()),
            float(np.abs(single[k] - reference[k][: len(single[k])]).max()),
        )

    result = {"max_abs_diff": max_diff(0), "samples": float(len(batch)), "tolerance": tolerance}
    if loaded.has_heatmap:
        result["heatmap_max_abs_diff"] = max_diff(1)
        result["heatmap_tolerance"] = heatmap_tolerance
    for what, key, limit in (
        ("probabilities", "max_abs_diff", tolerance),
        ("heatmaps", "heatmap_max_abs_diff", heatmap_tolerance),
    ):
        diff = result.get(key)
        if diff is not None and not diff <= limit:
            raise ExportParityError(
                f"ONNX Runtime {what} differ from PyTorch by {diff:.2e} "
                f"(tolerance {limit:.0e}) on {len(batch)} samples; nothing was published"
            )
    return result


def split_logits(
    loaded: LoadedModel, samples: list[Sample], max_pixels: int, batch_size: int = 32
) -> tuple[np.ndarray, np.ndarray]:
    """(raw logits N x classes, true class indices) from ONNX Runtime, a batch at a time."""
    index = {c: i for i, c in enumerate(loaded.card.class_names)}
    unknown = sorted({s.label for s in samples} - index.keys())
    if unknown:
        raise ValueError(f"labels {unknown} are not classes of the model {loaded.card.class_names}")
    spec = loaded.card.preprocessing
    logits = [
        loaded.predict_logits(load_batch(samples[i : i + batch_size], spec, max_pixels))
        for i in range(0, len(samples), batch_size)
    ]
    return np.concatenate(logits), np.array([index[s.label] for s in samples], np.int64)


def evaluate_split(
    loaded: LoadedModel, samples: list[Sample], manifest: Manifest, split: str, max_pixels: int
) -> EvalMetrics:
    """Figures for `samples` computed from ONNX Runtime: exactly what serving will run."""
    logits, labels = split_logits(loaded, samples, max_pixels)
    return evaluate_predictions(
        labels,
        loaded.probabilities(logits),
        loaded.card.class_names,
        DatasetRef(manifest_hash=manifest.hash, split=split, count=len(samples)),
    )


def calibrate(
    card: ModelCard,
    logits: np.ndarray,
    labels: np.ndarray,
    data: DatasetRef,
    criteria: OperatingCriteria,
) -> None:
    """Fit the card's temperature on validation logits, store them, and set its operating point.

    Without criteria the card keeps its operating point (0.5 / 0.5 by default), measured on
    the validation split; with any, the point is chosen for them.
    """
    card.temperature = fit_temperature(logits, labels)
    card.calibration = calibration_data(logits, labels, data, temperature=card.temperature)
    log.info(
        "calibration: temperature %.4g, top-label ECE %.4f -> %.4f on %d validation images",
        card.temperature,
        card.calibration.ece_before,
        card.calibration.ece_after,
        len(labels),
    )
    # Scores from the stored (rounded) logits, so `models set-operating-point` reproduces them.
    p, is_defect = validation_scores(card)
    if criteria.chooses:
        point, curve = choose_operating_point(p, is_defect, criteria)
    else:
        point, curve = measure_operating_point(p, is_defect, card.operating_point)
    card.operating_point = point
    card.calibration.trade_off = curve


def write_reliability_plot(
    card: ModelCard, logits: np.ndarray, labels: np.ndarray, path: Path
) -> Path | None:
    """Before/after reliability diagram; skipped (logged) where matplotlib is not installed."""
    try:
        return reliability_diagram(
            softmax(logits),
            labels,
            path,
            f"{card.name} validation",
            calibrated=softmax(logits, card.temperature),
        )
    except ImportError:
        log.info("matplotlib is not installed: no reliability diagram written")
        return None


def evaluate_card(
    card: ModelCard,
    loaded: LoadedModel,
    by_split: dict[Split, list[Sample]],
    manifest: Manifest,
    heldout: str | Path | None,
    max_pixels: int,
    criteria: OperatingCriteria,
    *,
    reliability_plot: Path | None = None,
    score_test: bool = True,
    calibrator: LoadedModel | None = None,
) -> None:
    """Fill `card`'s temperature, operating point and val/test/held-out metrics through ORT.

    One function for every exported model (FP32 and INT8), so QA compares like with like.
    Without `score_test` the test split is not read: screening variants on validation
    leaves it unseen until the final figures. `calibrator` stands in for `loaded` on the
    validation split when `loaded` was fitted on it (train+val): the twin run fitted on
    train alone gives the validation logits, and so the temperature, operating point and
    validation figures.
    """
    val = by_split[Split.VAL]
    if val:
        logits, labels = split_logits(calibrator or loaded, val, max_pixels)
        data = DatasetRef(manifest_hash=manifest.hash, split=Split.VAL.value, count=len(val))
        calibrate(card, logits, labels, data, criteria)
        if reliability_plot is not None:
            write_reliability_plot(card, logits, labels, reliability_plot)
        card.metrics[Split.VAL.value] = evaluate_predictions(
            labels, loaded.probabilities(logits), card.class_names, data
        )
    if score_test and by_split[Split.TEST]:
        card.metrics[Split.TEST.value] = evaluate_split(
            loaded, by_split[Split.TEST], manifest, Split.TEST.value, max_pixels
        )
    if heldout is not None:
        held = load_manifest(Path(heldout))
        card.metrics["heldout"] = evaluate_split(loaded, held.samples, held, "all", max_pixels)


def fitted_on(config: dict) -> FitSplits:
    """The splits a run was fitted on (runs from before `fit_on`: train)."""
    return FitSplits(config.get("fit_on", FitSplits.TRAIN))


def calibration_twin(path: Path, ckpt: Checkpoint, views: ViewSet, run_dir: Path) -> Checkpoint:
    """The run at `path` that calibrates `ckpt`, a run fitted on train+val: the same data,
    classes, input and network, fitted on train alone; at `ckpt`'s checkpoint choice
    (its final epoch), exporting the same `views`."""
    twin, _ = Checkpoint.load(path, ckpt.which).with_views(views)
    problems = []
    if fitted_on(twin.config) is not FitSplits.TRAIN:
        problems.append(
            "it was fitted on train+val too, so its validation predictions are in-sample"
        )
    for what, mine, theirs in (
        ("data (manifest hash)", ckpt.manifest_hash, twin.manifest_hash),
        ("classes", ckpt.class_names, twin.class_names),
        ("good class", ckpt.good_class, twin.good_class),
        ("preprocessing", ckpt.spec, twin.spec),
        ("network", ckpt.config["arch"], twin.config["arch"]),
    ):
        if mine != theirs:
            problems.append(f"its {what} differs")
    if problems:
        raise ValueError(f"{path}: cannot calibrate {run_dir}: {'; '.join(problems)}")
    return twin


def training_files(manifest: Manifest) -> dict[str, bytes]:
    """Files published beside model.onnx: the training images' hashes, so the leakage guard
    of `models eval` still works after the run folder and its manifest are gone."""
    return {TRAINING_HASHES_FILE: training_hashes_text(manifest).encode()}


def export_run(
    run_dir: str | Path,
    *,
    store: ModelStore,
    name: str,
    heldout: str | Path | None = None,
    parity_samples: int = 64,
    tolerance: float = PARITY_TOLERANCE,
    criteria: OperatingCriteria | None = None,
    views: ViewSet | None = None,
    score_test: bool = True,
    checkpoint: ExportCheckpoint | None = None,
    calibrate_with: str | Path | None = None,
) -> ModelCard:
    """Export the run's best (or last) checkpoint, gate on parity, calibrate on the
    validation split, evaluate (the test split too unless `score_test` is off), and publish
    a new version.

    Operating-point `criteria`, test-time `views` and the `checkpoint` not given here are
    read from the training config when it has them (each criterion on its own); with no
    criteria, the default point is kept (see `calibrate`). A run fitted on train+val needs
    `calibrate_with`, its twin fitted on train alone (`calibration_twin`): the twin's
    validation predictions fit the temperature and operating point, as scikit-learn's
    CalibratedClassifierCV(ensemble=False) calibrates a model refitted on all data with
    predictions of models that did not see them.
    """
    run_dir = Path(run_dir)
    ckpt, views = Checkpoint.load(run_dir, checkpoint).with_views(views)
    fit_on = fitted_on(ckpt.config)
    refit = fit_on is FitSplits.TRAIN_VAL
    if refit and calibrate_with is None:
        raise ValueError(
            f"{run_dir} was fitted on train+val, so its validation predictions are in-sample: "
            "pass --calibrate-with, a run of the same recipe and data fitted on train, to fit "
            "the temperature and operating point"
        )
    if not refit and calibrate_with is not None:
        raise ValueError(
            f"{run_dir} was fitted on train and calibrates on its own validation split; "
            "--calibrate-with is for runs fitted on train+val"
        )
    twin_dir = None if calibrate_with is None else Path(calibrate_with).absolute()
    twin = None if twin_dir is None else calibration_twin(twin_dir, ckpt, views, run_dir)
    criteria = (criteria or OperatingCriteria()).or_else(
        OperatingCriteria.from_mapping(ckpt.config)
    )
    manifest = load_manifest(ckpt.manifest_path)
    if manifest.hash != ckpt.manifest_hash:
        raise ValueError(
            f"{ckpt.manifest_path}: data changed since training (manifest hash differs)"
        )
    max_pixels = int(ckpt.config.get("max_pixels", DEFAULT_MAX_PIXELS))
    by_split = {split: [s for s in manifest.samples if s.split == split] for split in Split}
    training_config = {
        **ckpt.config,
        "exported_checkpoint": ckpt.which.value,
        "exported_epoch": ckpt.epoch,
    }
    if twin is not None:
        training_config["calibrated_with"] = {
            "run": str(twin_dir),
            "checkpoint": twin.which.value,
            "epoch": twin.epoch,
            "seed": twin.config.get("seed"),
        }
    card = ModelCard(
        name=name,
        arch=str(ckpt.config["arch"]),
        class_names=ckpt.class_names,
        good_class=ckpt.good_class,
        preprocessing=ckpt.spec,
        opset=OPSET,
        training_data=DatasetRef(
            manifest_hash=manifest.hash,
            split=fit_on.value,
            count=sum(len(by_split[split]) for split in fit_on.splits),
        ),
        training_config=training_config,
        code_commit=code_commit(),
        output_names=output_names(ckpt.model),
        heatmap=heatmap_source(ckpt.model),
        test_time_views=views,
    )
    with tempfile.TemporaryDirectory(prefix="cellinspect-export-") as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        export_onnx(ckpt, onnx_path)
        loaded = LoadedModel.from_files(onnx_path, card)
        parity_set = (by_split[Split.VAL] or by_split[Split.TRAIN])[:parity_samples]
        parity_batch = load_batch(parity_set, ckpt.spec, max_pixels)
        card.parity = check_parity(ckpt, loaded, parity_batch, tolerance)
        log.info(
            "parity: max |ORT - torch| = %.2e (heatmaps: %s) on %d samples",
            card.parity["max_abs_diff"],
            f"{card.parity['heatmap_max_abs_diff']:.2e}" if loaded.has_heatmap else "none",
            len(parity_set),
        )
        calibrator = None
        if twin is not None:
            twin_path = Path(tmp) / "twin.onnx"
            export_onnx(twin, twin_path)
            twin_card = card.model_copy(
                update={
                    "output_names": output_names(twin.model),
                    "heatmap": heatmap_source(twin.model),
                }
            )
            calibrator = LoadedModel.from_files(twin_path, twin_card)
            check_parity(twin, calibrator, parity_batch, tolerance)  # same spec: checked
            log.info("calibrating with %s (epoch %d, fitted on train)", twin_dir, twin.epoch + 1)
        if not by_split[Split.VAL]:
            log.warning("no validation split: temperature and operating point left at defaults")
        evaluate_card(
            card,
            loaded,
            by_split,
            manifest,
            heldout,
            max_pixels,
            criteria,
            reliability_plot=run_dir / RELIABILITY_PLOT,
            score_test=score_test,
            calibrator=calibrator,
        )
        return store.publish(onnx_path, card, extra_files=training_files(manifest))
