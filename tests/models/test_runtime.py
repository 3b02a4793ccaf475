"""ONNX Runtime session factory: provider fallback, threads, load errors."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest

from cellinspect.models import runtime
from cellinspect.models.runtime import ModelLoadError, Provider, create_session, select_providers


def test_cpu_session_runs(onnx_model):
    session = create_session(onnx_model)
    assert session.get_providers() == ["CPUExecutionProvider"]
    (logits,) = session.run(["logits"], {"image": np.zeros((2, 1, 8, 8), np.float32)})
    assert logits.shape == (2, 3)


def test_unavailable_provider_warns_and_falls_back_to_cpu(onnx_model, caplog, monkeypatch):
    monkeypatch.setattr(runtime, "available_providers", lambda: ["CPUExecutionProvider"])
    with caplog.at_level(logging.WARNING, logger="cellinspect.models.runtime"):
        session = create_session(onnx_model, providers=["CUDAExecutionProvider"])
    assert session.get_providers() == ["CPUExecutionProvider"]
    warning = next(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "CUDAExecutionProvider is not available" in warning
    assert "available: CPUExecutionProvider" in warning
    session.run(None, {"image": np.zeros((1, 1, 8, 8), np.float32)})


def test_cuda_on_this_machine_still_gives_a_working_session(onnx_model, caplog):
    """Unpatched: on a CPU-only machine CUDA is missing (or fails to start) and ORT runs on CPU."""
    with caplog.at_level(logging.WARNING, logger="cellinspect.models.runtime"):
        session = create_session(onnx_model, providers=[Provider.CUDA, Provider.CPU])
    if "CUDAExecutionProvider" not in session.get_providers():
        assert any("CUDAExecutionProvider" in r.getMessage() for r in caplog.records)
    session.run(None, {"image": np.zeros((1, 1, 8, 8), np.float32)})


def test_provider_order_keeps_requested_and_ends_with_cpu(monkeypatch):
    monkeypatch.setattr(
        runtime,
        "available_providers",
        lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
    )
    assert select_providers(["cpu", "CUDAExecutionProvider", "tensorrt", "cuda"]) == [
        "CUDAExecutionProvider",
        "TensorrtExecutionProvider",
        "CPUExecutionProvider",
    ]
    assert select_providers([]) == ["CPUExecutionProvider"]


@pytest.mark.parametrize("bad", ["GPU", "CUDA-EP", "cudaexecutionprovider2"])
def test_unknown_provider_lists_valid_ones(onnx_model, bad):
    with pytest.raises(ValueError) as err:
        create_session(onnx_model, providers=[bad])
    message = str(err.value)
    assert repr(bad) in message
    for provider in Provider:
        assert provider.value in message


def test_threads_default_to_the_cores_this_process_may_use(onnx_model, monkeypatch):
    seen = {}
    import onnxruntime

    real = onnxruntime.InferenceSession

    def spy(path, sess_options=None, providers=None):
        seen["intra"] = sess_options.intra_op_num_threads
        seen["inter"] = sess_options.inter_op_num_threads
        seen["level"] = sess_options.graph_optimization_level
        return real(path, sess_options=sess_options, providers=providers)

    monkeypatch.setattr(onnxruntime, "InferenceSession", spy)
    create_session(onnx_model)
    assert seen == {
        "intra": len(os.sched_getaffinity(0)),
        "inter": 1,
        "level": onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    create_session(onnx_model, intra_op_threads=1, inter_op_threads=2)
    assert (seen["intra"], seen["inter"]) == (1, 2)
    with pytest.raises(ValueError, match="at least 1"):
        create_session(onnx_model, intra_op_threads=0)


def test_corrupt_onnx_is_a_model_load_error_naming_the_file(tmp_path):
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"this is not a protobuf \x00\xff" * 10)
    with pytest.raises(ModelLoadError, match="broken.onnx"):
        create_session(bad)


def test_truncated_onnx_is_a_model_load_error(onnx_model, tmp_path):
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(onnx_model.read_bytes()[:40])
    with pytest.raises(ModelLoadError, match="cut.onnx"):
        create_session(cut)


def test_missing_onnx_is_a_model_load_error(tmp_path):
    with pytest.raises(ModelLoadError, match="no such file"):
        create_session(tmp_path / "nope.onnx")


def test_cuda_libraries_are_preloaded_once_and_only_for_a_gpu_provider(
    onnx_model, monkeypatch, caplog
):
    import onnxruntime

    calls: list[int] = []
    monkeypatch.setattr(onnxruntime, "preload_dlls", lambda: calls.append(1), raising=False)
    monkeypatch.setattr(
        runtime, "available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    runtime._preload_cuda_libraries.cache_clear()
    try:
        create_session(onnx_model)  # CPU only: nothing to preload
        assert calls == []
        for _ in range(2):
            create_session(onnx_model, providers=["cuda"])
        assert calls == [1]
        # A helper that fails is logged, not fatal: the libraries may load from the usual path.
        runtime._preload_cuda_libraries.cache_clear()

        def fail() -> None:
            raise RuntimeError("Invalid parameter of directory")

        monkeypatch.setattr(onnxruntime, "preload_dlls", fail, raising=False)
        with caplog.at_level(logging.WARNING, logger="cellinspect.models.runtime"):
            session = create_session(onnx_model, providers=["cuda"])
        assert "preload_dlls() failed (Invalid parameter" in caplog.text
        session.run(None, {"image": np.zeros((1, 1, 8, 8), np.float32)})
    finally:
        runtime._preload_cuda_libraries.cache_clear()
