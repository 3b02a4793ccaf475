"""Tiny torch-free ONNX classifiers and their cards, shared by the models and serving tests.

image [N,1,8,8] -> GlobalAveragePool -> Gemm -> logits -> Softmax -> probabilities: the
class responds to mean brightness, so tests can steer the answer with the pixel values.
With `heatmap=True` a third output, heatmap [N,8,8], is the input's own brightness in
[0, 1] (image * std + mean undoes the card's normalisation), so tests know every value.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from cellinspect.datasets.preprocess import PreprocessSpec
from cellinspect.models.card import ModelCard

SPEC = PreprocessSpec(height=8, width=8, channels=1, mean=(0.5,), std=(0.25,))
CLASS_NAMES = ["good", "crack", "scratch"]
# Gemm weights (1 -> 3) and bias: logits = mean_pixel * W + B, so classes respond to brightness.
WEIGHTS = np.array([[-4.0, 2.0, 6.0]], np.float32)
BIAS = np.array([1.0, 0.0, -0.5], np.float32)


def build_classifier(
    path: Path,
    *,
    input_shape: tuple[int | str, ...] = ("N", 1, 8, 8),
    weights: np.ndarray = WEIGHTS,
    bias: np.ndarray = BIAS,
    heatmap: bool = False,
) -> Path:
    """image [N,1,8,8] -> GlobalAvgPool -> Flatten -> Gemm -> logits -> Softmax -> probabilities
    (and heatmap = image * std + mean, reshaped to [N,8,8])."""
    classes = weights.shape[1]
    nodes = [
        helper.make_node("GlobalAveragePool", ["image"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
        helper.make_node("Gemm", ["flat", "W", "B"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
    ]
    outputs = [
        helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes]),
        helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", classes]),
    ]
    initializers = [numpy_helper.from_array(weights, "W"), numpy_helper.from_array(bias, "B")]
    if heatmap:
        height, width = input_shape[2], input_shape[3]
        nodes += [
            helper.make_node("Mul", ["image", "STD"], ["scaled"]),
            helper.make_node("Add", ["scaled", "MEAN"], ["brightness"]),
            helper.make_node("Reshape", ["brightness", "HW"], ["heatmap"]),
        ]
        outputs.append(
            helper.make_tensor_value_info("heatmap", TensorProto.FLOAT, ["N", height, width])
        )
        initializers += [
            numpy_helper.from_array(np.array(SPEC.std[0], np.float32), "STD"),
            numpy_helper.from_array(np.array(SPEC.mean[0], np.float32), "MEAN"),
            numpy_helper.from_array(np.array([-1, height, width], np.int64), "HW"),
        ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, list(input_shape))],
        outputs,
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # readable by any onnxruntime >= 1.14
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def reference_logits(batch: np.ndarray) -> np.ndarray:
    """What the tiny model computes, in plain numpy."""
    pooled = batch.reshape(len(batch), -1).mean(axis=1, keepdims=True).astype(np.float64)
    return pooled @ WEIGHTS.astype(np.float64) + BIAS


def make_card(name: str = "tiny", **overrides: object) -> ModelCard:
    fields: dict[str, object] = {
        "name": name,
        "arch": "tiny-gemm",
        "class_names": CLASS_NAMES,
        "good_class": "good",
        "preprocessing": SPEC,
        "opset": 17,
    }
    fields.update(overrides)
    return ModelCard.model_validate(fields)


class RecordingSession:
    """An ORT session that records the batch size of every run, and can claim other
    providers (a CPU session standing in for a CUDA one)."""

    def __init__(self, session: Any, providers: list[str] | None = None) -> None:
        self._session = session
        self._providers = providers
        self.batch_sizes: list[int] = []

    def run(self, names: Any, feeds: dict[str, np.ndarray]) -> Any:
        self.batch_sizes.append(len(next(iter(feeds.values()))))
        return self._session.run(names, feeds)

    def get_providers(self) -> list[str]:
        return self._providers or self._session.get_providers()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._session, name)
