"""Evaluate a stored model version on a frozen held-out set, as ONNX Runtime serves it.

Images are decoded and preprocessed with the card's spec and run through `LoadedModel`
(the service's code path); the card's temperature and operating point turn the logits into
probabilities and verdicts. The logits are cached under EVALS/cache by (ONNX sha256,
held-out hash, preprocessing), so a second evaluation of the same file runs no inference,
and a version re-published with a new operating point (same ONNX file) reuses them.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, Field

from cellinspect import __version__
from cellinspect.datasets.atomic import write_atomic
from cellinspect.datasets.decode import read_image
from cellinspect.datasets.heldout import load_heldout
from cellinspect.datasets.manifest import Manifest
from cellinspect.datasets.preprocess import preprocess_batch
from cellinspect.datasets.samples import Sample
from cellinspect.models.calibration import expected_calibration_error
from cellinspect.models.card import ModelCard, OperatingPoint, Verdict
from cellinspect.models.figures import ScoredImages, VerdictCode, confusion, figure_table
from cellinspect.models.leakage import LeakageCheck, check_leakage
from cellinspect.models.predict import LoadedModel, softmax
from cellinspect.models.runtime import usable_threads
from cellinspect.models.store import ModelRef, ModelStore

logger = logging.getLogger(__name__)

EVAL_FORMAT: Literal["cellinspect.eval/1"] = "cellinspect.eval/1"
CACHE_VERSION = 1  # bump when what is cached, or how it is computed, changes
THROUGHPUT_BATCH = 8
THROUGHPUT_RUNS = 5  # timed runs; the median is reported
THROUGHPUT_BATCHES_PER_RUN = 4

Progress = Callable[[int, int], None]  # (images done, images in all)
VERDICT_CODE = {
    Verdict.PASS: VerdictCode.PASS,
    Verdict.REVIEW: VerdictCode.REVIEW,
    Verdict.SCRAP: VerdictCode.SCRAP,
}


class ClassFigures(BaseModel):
    precision: float
    recall: float
    f1: float
    support: int


class VerdictFigures(BaseModel):
    """The card's operating point applied to the held-out set (None: undefined there)."""

    scrap_rate: float  # scrapped / all
    escape_rate: float | None  # defective passed / defective
    false_scrap_rate: float | None  # good scrapped / good
    review_rate: float  # sent to review / all
    auto_accuracy: float | None  # correct / decided without review
    counts: dict[str, dict[str, int]]  # "good"/"defect" -> verdict -> images


class EvalFigures(BaseModel):
    """Every figure of one evaluation; `flat()` names them as `figures.figure_table` does."""

    accuracy: float
    balanced_accuracy: float
    macro_f1: float
    roc_auc: float | None  # two classes: defect vs good; more: one-vs-rest macro
    pr_auc: float | None  # average precision, same convention
    defect_roc_auc: float | None  # ranked by 1 - P(good), the operating point's score
    defect_pr_auc: float | None
    ece: float  # top-label, calibration.ECE_BINS bins
    per_class: dict[str, ClassFigures]
    confusion: list[list[int]]  # rows: truth, columns: prediction, in class_names order
    verdicts: VerdictFigures

    def flat(self) -> dict[str, float | None]:
        out: dict[str, float | None] = {
            key: getattr(self, key)
            for key in ("accuracy", "balanced_accuracy", "macro_f1", "roc_auc", "pr_auc")
        }
        out |= {"defect_roc_auc": self.defect_roc_auc, "defect_pr_auc": self.defect_pr_auc}
        out["ece"] = self.ece
        for key in ("precision", "recall", "f1"):
            for name, figures in self.per_class.items():
                out[f"{key}[{name}]"] = getattr(figures, key)
        out |= self.verdicts.model_dump(exclude={"counts"})
        return out


class Throughput(BaseModel):
    """ONNX Runtime alone (no decoding) on preprocessed batches, on the evaluating machine."""

    images_per_second: float
    batch_size: int
    runs: int
    threads: int  # intra-op threads of the session
    provider: str
    host: str
    measured: datetime


class ModelInfo(BaseModel):
    name: str
    version: str
    onnx_sha256: str
    class_names: list[str]
    good_class: str
    temperature: float
    operating_point: OperatingPoint
    quantization: str | None = None


class HeldoutInfo(BaseModel):
    name: str
    manifest_hash: str
    count: int
    class_counts: dict[str, int]


class EvalReport(BaseModel):
    """eval.json."""

    format: Literal["cellinspect.eval/1"] = EVAL_FORMAT
    model: ModelInfo
    heldout: HeldoutInfo
    figures: EvalFigures
    throughput: Throughput
    leakage: LeakageCheck
    cache_key: str
    cached: bool  # predictions came from the cache: no inference was run for this report
    created: datetime = Field(default_factory=lambda: datetime.now(UTC))
    cellinspect_version: str = __version__


@dataclass(frozen=True)
class Evaluation:
    """An evaluation with the per-image data that reports and comparisons need."""

    report: EvalReport
    scored: ScoredImages
    samples: list[Sample]  # canonical order (see `canonical_order`), absolute paths
    card: ModelCard

    @property
    def label(self) -> str:
        return f"{self.card.name}@{self.card.version}"


def canonical_order(samples: Sequence[Sample]) -> list[Sample]:
    """Samples sorted by (sha256, label, split, path): two manifests with the same hash list
    the same images in the same order, so evaluations of different models pair up by row."""
    return sorted(
        samples, key=lambda s: (s.sha256 or "", s.label, s.split.value if s.split else "", s.path)
    )


def cache_key(card: ModelCard, heldout_hash: str) -> str:
    """What decides the logits: the ONNX file, the images and the preprocessing."""
    parts = {
        "cache": CACHE_VERSION,
        "onnx_sha256": card.onnx_sha256,
        "heldout": heldout_hash,
        "preprocessing": card.preprocessing.model_dump(mode="json"),
        "input": card.input_name,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


# ---- inference, throughput and the cache -------------------------------------------------


def run_inference(
    loaded: LoadedModel,
    samples: Sequence[Sample],
    *,
    batch_size: int = 32,
    progress: Progress | None = None,
) -> np.ndarray:
    """Raw logits (N x K) for the samples' files: decode, preprocess, ONNX Runtime."""
    spec = loaded.card.preprocessing
    chunks = []
    for start in range(0, len(samples), batch_size):
        images = [read_image(s.path) for s in samples[start : start + batch_size]]
        chunks.append(loaded.predict_logits(preprocess_batch(images, spec), batch_size))
        if progress is not None:
            progress(min(start + batch_size, len(samples)), len(samples))
    return np.concatenate(chunks) if chunks else np.empty((0, loaded.num_classes), np.float32)


def measure_throughput(
    loaded: LoadedModel,
    *,
    threads: int,
    batch_size: int = THROUGHPUT_BATCH,
    runs: int = THROUGHPUT_RUNS,
    batches_per_run: int = THROUGHPUT_BATCHES_PER_RUN,
) -> Throughput:
    """Images/s of the session on a fixed preprocessed batch: median of `runs` timed runs."""
    batch = np.random.default_rng(0).standard_normal(
        (batch_size, *loaded.card.preprocessing.input_shape), dtype=np.float32
    )
    loaded.warmup(batch_size)
    seconds = []
    for _ in range(runs):
        start = time.perf_counter()
        for _ in range(batches_per_run):
            loaded.predict_logits(batch, batch_size)
        seconds.append(time.perf_counter() - start)
    return Throughput(
        images_per_second=round(batch_size * batches_per_run / statistics.median(seconds), 2),
        batch_size=batch_size,
        runs=runs,
        threads=threads,
        provider=loaded.session.get_providers()[0],
        host=platform.node() or "unknown",
        measured=datetime.now(UTC),
    )


def _cache_dir(evals_root: Path, key: str) -> Path:
    return evals_root / "cache" / key


def load_cached(
    evals_root: Path, key: str, samples: Sequence[Sample]
) -> tuple[np.ndarray, Throughput] | None:
    """Cached (logits, throughput) for `key`, if present and for exactly these images."""
    folder = _cache_dir(evals_root, key)
    try:
        with np.load(folder / "predictions.npz", allow_pickle=False) as data:
            logits, hashes = data["logits"], data["sha256"]
        throughput = Throughput.model_validate_json((folder / "throughput.json").read_text())
    except (OSError, ValueError, KeyError) as exc:
        if (folder / "predictions.npz").exists():
            logger.warning("ignoring unreadable evaluation cache %s: %s", folder, exc)
        return None
    if hashes.tolist() != [s.sha256 for s in samples]:
        logger.warning("evaluation cache %s lists other images; recomputing", folder)
        return None
    return logits, throughput


def save_cached(
    evals_root: Path, key: str, samples: Sequence[Sample], logits: np.ndarray, t: Throughput
) -> None:
    folder = _cache_dir(evals_root, key)
    buffer = io.BytesIO()
    np.savez_compressed(
        buffer, logits=logits, sha256=np.array([s.sha256 for s in samples], dtype="U64")
    )
    write_atomic(folder / "predictions.npz", buffer.getvalue())
    write_atomic(folder / "throughput.json", t.model_dump_json(indent=2) + "\n")


# ---- figures -----------------------------------------------------------------------------


def score(card: ModelCard, logits: np.ndarray, labels: np.ndarray) -> ScoredImages:
    """Calibrated probabilities and the verdict per image, exactly as the card prescribes."""
    probs = softmax(logits, card.temperature)
    point = card.operating_point
    verdicts = np.array(
        [VERDICT_CODE[point.verdict(float(p))] for p in 1.0 - probs[:, card.good_index]], np.int64
    )
    return ScoredImages(labels=labels, probs=probs, good_index=card.good_index, verdicts=verdicts)


def _defined(value: float) -> float | None:
    return None if math.isnan(value) else value


def compute_figures(scored: ScoredImages, class_names: list[str]) -> EvalFigures:
    """The figures of one model's scored images (see `figures.figure_table`)."""
    table = {key: float(values[0]) for key, values in figure_table(scored, class_names).items()}
    k = len(class_names)
    cm = confusion(scored.labels, scored.predicted, k, np.ones((1, len(scored.labels))))[0]
    cells = np.zeros((2, 3), np.int64)
    np.add.at(cells, (scored.is_defect.astype(np.int64), scored.verdicts), 1)
    return EvalFigures(
        accuracy=table["accuracy"],
        balanced_accuracy=table["balanced_accuracy"],
        macro_f1=table["macro_f1"],
        roc_auc=_defined(table["roc_auc"]),
        pr_auc=_defined(table["pr_auc"]),
        defect_roc_auc=_defined(table["defect_roc_auc"]),
        defect_pr_auc=_defined(table["defect_pr_auc"]),
        ece=expected_calibration_error(scored.probs, scored.labels),
        per_class={
            name: ClassFigures(
                precision=table[f"precision[{name}]"],
                recall=table[f"recall[{name}]"],
                f1=table[f"f1[{name}]"],
                support=int(cm[j].sum()),
            )
            for j, name in enumerate(class_names)
        },
        confusion=cm.round().astype(np.int64).tolist(),
        verdicts=VerdictFigures(
            scrap_rate=table["scrap_rate"],
            escape_rate=_defined(table["escape_rate"]),
            false_scrap_rate=_defined(table["false_scrap_rate"]),
            review_rate=table["review_rate"],
            auto_accuracy=_defined(table["auto_accuracy"]),
            counts={
                truth: {v.value: int(cells[row, code]) for v, code in VERDICT_CODE.items()}
                for row, truth in enumerate(("good", "defect"))
            },
        ),
    )


# ---- the evaluation ----------------------------------------------------------------------


def _labels(card: ModelCard, samples: Sequence[Sample], manifest: Manifest) -> np.ndarray:
    index = {c: i for i, c in enumerate(card.class_names)}
    unknown = sorted({s.label for s in samples} - index.keys())
    if unknown:
        raise ValueError(
            f"held-out labels {unknown} are not classes of {card.name}@{card.version} "
            f"({', '.join(card.class_names)}); manifest classes: {', '.join(manifest.classes)}"
        )
    return np.array([index[s.label] for s in samples], np.int64)


def evaluate_model(
    store: ModelStore,
    ref: str | ModelRef,
    heldout: str,
    *,
    heldout_root: Path,
    evals_root: Path,
    allow_overlap: bool = False,
    use_cache: bool = True,
    threads: int | None = None,
    batch_size: int = 32,
    progress: Progress | None = None,
) -> Evaluation:
    """Verify the held-out files and the ONNX file, guard against leakage, then score the
    set with the stored version (from the cache when it holds this file's logits)."""
    entry, manifest = load_heldout(heldout_root, heldout)
    card, onnx_path = store.load_verified(ref)
    leakage = check_leakage(
        card, manifest, version_dir=onnx_path.parent, allow_overlap=allow_overlap
    )
    samples = canonical_order(manifest.samples)
    labels = _labels(card, samples, manifest)
    key = cache_key(card, entry.manifest_hash)
    cached = load_cached(evals_root, key, samples) if use_cache else None
    if cached is not None:
        logits, throughput = cached
        logger.info("%s@%s on %s: cached predictions %s", card.name, card.version, heldout, key)
    else:
        n_threads = threads or usable_threads()
        loaded = LoadedModel.from_files(onnx_path, card, threads=n_threads)
        logits = run_inference(loaded, samples, batch_size=batch_size, progress=progress)
        throughput = measure_throughput(loaded, threads=n_threads)
        save_cached(evals_root, key, samples, logits, throughput)
    scored = score(card, logits, labels)
    report = EvalReport(
        model=ModelInfo(
            name=card.name,
            version=card.version,
            onnx_sha256=card.onnx_sha256,
            class_names=card.class_names,
            good_class=card.good_class,
            temperature=card.temperature,
            operating_point=card.operating_point,
            quantization=getattr(card, "quantization", None),
        ),
        heldout=HeldoutInfo(
            name=entry.name,
            manifest_hash=entry.manifest_hash,
            count=len(samples),
            class_counts=manifest.class_counts,
        ),
        figures=compute_figures(scored, card.class_names),
        throughput=throughput,
        leakage=leakage,
        cache_key=key,
        cached=cached is not None,
    )
    return Evaluation(report=report, scored=scored, samples=samples, card=card)


def default_eval_dir(evals_root: Path, evaluation: Evaluation) -> Path:
    """EVALS/<name>@<version>__<held-out name>."""
    return evals_root / f"{evaluation.label}__{evaluation.report.heldout.name}"
