"""Batch prediction: the card's preprocessing, calibration and operating point, applied in order."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cellinspect.datasets.preprocess import preprocess_batch
from cellinspect.models.card import HEATMAP_NAME, LOGITS_NAME, ModelCard, OperatingPoint, Verdict
from cellinspect.models.runtime import ModelLoadError, Provider, create_session
from cellinspect.models.store import ModelRef, ModelStore

if TYPE_CHECKING:
    import onnxruntime

logger = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 32


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of logits / temperature, in float64 with the row max subtracted."""
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def _static_dim(dim: Any) -> int | None:
    """ORT reports symbolic dims as strings (or None); only ints are fixed sizes."""
    return dim if isinstance(dim, int) and dim > 0 else None


def _check_session(session: onnxruntime.InferenceSession, card: ModelCard, source: str) -> None:
    """Raise ModelLoadError unless the session's inputs/outputs are what the card promises."""
    inputs = session.get_inputs()
    names = [i.name for i in inputs]
    if names != [card.input_name]:
        raise ModelLoadError(f"{source}: model inputs {names}, card expects [{card.input_name!r}]")
    tensor = inputs[0]
    if tensor.type != "tensor(float)":
        raise ModelLoadError(f"{source}: input {tensor.name!r} is {tensor.type}, expected float32")
    shape = list(tensor.shape)
    expected = list(card.preprocessing.input_shape)
    if len(shape) != 4 or [_static_dim(d) for d in shape[1:]] != expected:
        raise ModelLoadError(
            f"{source}: input {tensor.name!r} has shape {shape}, but the card's preprocessing "
            f"makes [N, {', '.join(map(str, expected))}]"
        )
    if _static_dim(shape[0]) is not None:
        raise ModelLoadError(
            f"{source}: input {tensor.name!r} has a fixed batch size {shape[0]}; "
            "the artifact contract requires a dynamic batch axis"
        )
    outputs = {o.name: o for o in session.get_outputs()}
    missing = [n for n in card.output_names if n not in outputs]
    if missing:
        raise ModelLoadError(
            f"{source}: model lacks output(s) {missing} named in the card (has {list(outputs)})"
        )
    # Temperature scaling needs the raw logits, not the model's own softmax.
    if LOGITS_NAME not in outputs:
        raise ModelLoadError(f"{source}: model has no {LOGITS_NAME!r} output (has {list(outputs)})")
    out_shape = list(outputs[LOGITS_NAME].shape)
    classes = len(card.class_names)
    if len(out_shape) != 2 or _static_dim(out_shape[1]) not in (None, classes):
        raise ModelLoadError(
            f"{source}: output {LOGITS_NAME!r} has shape {out_shape}, card lists {classes} classes"
        )
    if HEATMAP_NAME in card.output_names:
        heat_shape = list(outputs[HEATMAP_NAME].shape)
        size = [card.preprocessing.height, card.preprocessing.width]
        if len(heat_shape) != 3 or any(
            _static_dim(d) not in (None, s) for d, s in zip(heat_shape[1:], size, strict=True)
        ):
            raise ModelLoadError(
                f"{source}: output {HEATMAP_NAME!r} has shape {heat_shape}, "
                f"expected [N, {size[0]}, {size[1]}] (the input size)"
            )


class LoadedModel:
    """A model card and its ONNX Runtime session, checked against each other at load."""

    def __init__(
        self,
        card: ModelCard,
        session: onnxruntime.InferenceSession,
        *,
        source: str = "model",
        fixed_batch_size: int | None = None,
    ) -> None:
        _check_session(session, card, source)
        if fixed_batch_size is not None:
            _check_batch_size(fixed_batch_size)
        self.card = card
        self.session = session
        self.source = source
        # Every session run at this one batch size (rows padded with zeros, outputs cut back):
        # ONNX Runtime's CUDA provider re-plans its convolutions whenever the input shape
        # changes, 0.1-1 s each time, so a micro-batcher's varying sizes would stall a GPU
        # (benchmarks/RESULTS.md). None: run each batch at its own size (right on CPU, where
        # padded rows cost their full compute).
        self.fixed_batch_size = fixed_batch_size

    def __repr__(self) -> str:
        return f"LoadedModel({self.card.name}@{self.card.version}, {self.session.get_providers()})"

    @classmethod
    def load(
        cls,
        store: ModelStore,
        ref: str | ModelRef,
        *,
        providers: Sequence[str] = (Provider.CPU.value,),
        threads: int | None = None,
    ) -> LoadedModel:
        """Load a store version after verifying its sha256."""
        card, onnx_path = store.load_verified(ref)
        session = create_session(onnx_path, providers=providers, intra_op_threads=threads)
        return cls(card, session, source=f"{card.name}@{card.version} ({onnx_path})")

    @classmethod
    def from_files(
        cls,
        onnx_path: str | Path,
        card: ModelCard,
        *,
        providers: Sequence[str] = (Provider.CPU.value,),
        threads: int | None = None,
    ) -> LoadedModel:
        """Load an ONNX file and a card that are not (yet) in a store, e.g. right after export."""
        session = create_session(onnx_path, providers=providers, intra_op_threads=threads)
        return cls(card, session, source=str(onnx_path))

    @property
    def num_classes(self) -> int:
        return len(self.card.class_names)

    @property
    def has_heatmap(self) -> bool:
        """Whether the card promises (and load checked) a defect heatmap output."""
        return HEATMAP_NAME in self.card.output_names

    def _session_run(self, names: list[str], batch: np.ndarray) -> list[np.ndarray]:
        """`session.run(names)` on `batch`, in runs of `fixed_batch_size` rows where one is set."""
        fixed = self.fixed_batch_size
        if fixed is None or len(batch) == fixed:
            return self.session.run(names, {self.card.input_name: batch})
        runs = []
        for start in range(0, len(batch), fixed):
            chunk = batch[start : start + fixed]
            rows = len(chunk)
            if rows < fixed:
                padding = np.zeros((fixed - rows, *chunk.shape[1:]), chunk.dtype)
                chunk = np.concatenate([chunk, padding])
            outputs = self.session.run(names, {self.card.input_name: chunk})
            runs.append([output[:rows] for output in outputs])
        return [np.concatenate(parts) for parts in zip(*runs, strict=True)]

    def _run(self, batch: np.ndarray) -> np.ndarray:
        (logits,) = self._session_run([LOGITS_NAME], batch)
        return np.asarray(logits, dtype=np.float32)

    def run_with_heatmaps(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One session run of a preprocessed NxCxHxW batch -> (logits NxK, heatmaps NxHxW).

        The heatmap (in [0, 1], at the input size) comes from the same forward pass;
        ValueError for a model without one (see `has_heatmap`).
        """
        if not self.has_heatmap:
            raise ValueError(f"{self.source} has no {HEATMAP_NAME!r} output")
        logits, heatmaps = self._session_run(
            [LOGITS_NAME, HEATMAP_NAME], np.asarray(batch, np.float32)
        )
        return np.asarray(logits, np.float32), np.asarray(heatmaps, np.float32)

    def predict_logits(self, batch: np.ndarray, batch_size: int = DEFAULT_BATCH_SIZE) -> np.ndarray:
        """Preprocessed float32 NxCxHxW -> raw logits NxK, run `batch_size` rows at a time."""
        _check_batch_size(batch_size)
        batch = np.asarray(batch, dtype=np.float32)
        expected = self.card.preprocessing.input_shape
        if batch.ndim != 4 or batch.shape[1:] != expected:
            raise ValueError(
                f"expected a batch of shape (N, {', '.join(map(str, expected))}), got {batch.shape}"
            )
        if len(batch) == 0:
            return np.empty((0, self.num_classes), np.float32)
        chunks = [
            self._run(np.ascontiguousarray(batch[i : i + batch_size]))
            for i in range(0, len(batch), batch_size)
        ]
        return np.concatenate(chunks)

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """Calibrated probabilities: softmax(logits / card.temperature)."""
        return softmax(logits, self.card.temperature)

    def predict(
        self, images: Sequence[np.ndarray], batch_size: int = DEFAULT_BATCH_SIZE
    ) -> np.ndarray:
        """Decoded images (any size) -> N x classes calibrated probabilities."""
        _check_batch_size(batch_size)
        spec = self.card.preprocessing
        # Preprocess chunk by chunk so a large evaluation never holds every tensor at once.
        logits = [
            self._run(preprocess_batch(list(images[i : i + batch_size]), spec))
            for i in range(0, len(images), batch_size)
        ]
        if not logits:
            return np.empty((0, self.num_classes), np.float64)
        return self.probabilities(np.concatenate(logits))

    def predict_with_heatmaps(
        self, images: Sequence[np.ndarray], batch_size: int = DEFAULT_BATCH_SIZE
    ) -> tuple[np.ndarray, np.ndarray]:
        """Decoded images -> (N x classes calibrated probabilities, N x H x W heatmaps)."""
        _check_batch_size(batch_size)
        spec = self.card.preprocessing
        runs = [
            self.run_with_heatmaps(preprocess_batch(list(images[i : i + batch_size]), spec))
            for i in range(0, len(images), batch_size)
        ]
        if not runs:
            return (
                np.empty((0, self.num_classes), np.float64),
                np.empty((0, spec.height, spec.width), np.float32),
            )
        logits, heatmaps = (np.concatenate(parts) for parts in zip(*runs, strict=True))
        return self.probabilities(logits), heatmaps

    def predict_files(
        self,
        paths: Sequence[str | Path],
        batch_size: int = DEFAULT_BATCH_SIZE,
        *,
        max_pixels: int | None = None,
    ) -> np.ndarray:
        """Image files -> N x classes calibrated probabilities (decoded with size limits)."""
        from cellinspect.datasets.decode import read_image

        _check_batch_size(batch_size)
        limits = {} if max_pixels is None else {"max_pixels": max_pixels}
        probs = [
            self.predict([read_image(p, **limits) for p in paths[i : i + batch_size]], batch_size)
            for i in range(0, len(paths), batch_size)
        ]
        if not probs:
            return np.empty((0, self.num_classes), np.float64)
        return np.concatenate(probs)

    def defect_probabilities(self, probs: np.ndarray) -> np.ndarray:
        """1 - P(good class) per row: the score the operating point thresholds."""
        probs = np.asarray(probs)
        if probs.ndim != 2 or probs.shape[1] != self.num_classes:
            raise ValueError(
                f"expected probabilities of shape (N, {self.num_classes}), got {probs.shape}"
            )
        return 1.0 - probs[:, self.card.good_index]

    def verdicts(
        self, probs: np.ndarray, operating_point: OperatingPoint | None = None
    ) -> list[Verdict]:
        """Verdict per row at the card's operating point, or at `operating_point` if given."""
        point = operating_point or self.card.operating_point
        return [point.verdict(float(p)) for p in self.defect_probabilities(probs)]

    def warmup(self, batch_size: int = 1) -> None:
        """Run one zero batch so the first real request does not pay for lazy initialisation."""
        _check_batch_size(batch_size)
        self._run(np.zeros((batch_size, *self.card.preprocessing.input_shape), np.float32))
        logger.debug("warmed up %s with a batch of %d", self.source, batch_size)


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
