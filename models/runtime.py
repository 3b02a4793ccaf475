"""ONNX Runtime session factory: provider fallback, thread sizing, load errors naming the file."""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Sequence
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import onnxruntime

logger = logging.getLogger(__name__)


class Provider(StrEnum):
    """ONNX Runtime execution providers this project knows how to use."""

    CUDA = "CUDAExecutionProvider"
    TENSORRT = "TensorrtExecutionProvider"
    OPENVINO = "OpenVINOExecutionProvider"
    CPU = "CPUExecutionProvider"

    @classmethod
    def parse(cls, text: str) -> Provider:
        """Accept the ORT name ("CUDAExecutionProvider") or the short name ("cuda", any case)."""
        for provider in cls:
            if text == provider.value or text.lower() == provider.name.lower():
                return provider
        valid = ", ".join(f"{p.name.lower()} ({p.value})" for p in cls)
        raise ValueError(f"unknown execution provider {text!r}; valid: {valid}")


class ModelLoadError(Exception):
    """An ONNX file that cannot be turned into a usable session for its model card."""


def available_providers() -> list[str]:
    """Providers compiled into the installed onnxruntime."""
    import onnxruntime

    return list(onnxruntime.get_available_providers())


def usable_threads() -> int:
    """Cores this process may run on (respects taskset / cgroup cpusets, unlike os.cpu_count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def select_providers(requested: Sequence[str]) -> list[str]:
    """Keep the requested providers that are available, in order, with CPU last as fallback."""
    wanted = [Provider.parse(p) for p in requested]
    available = available_providers()
    chosen: list[str] = []
    for provider in wanted:
        if provider is Provider.CPU or provider.value in chosen:
            continue
        if provider.value in available:
            chosen.append(provider.value)
        else:
            logger.warning(
                "execution provider %s is not available in this onnxruntime (available: %s); "
                "falling back",
                provider.value,
                ", ".join(available),
            )
    chosen.append(Provider.CPU.value)
    return chosen


_GPU_PROVIDERS = {Provider.CUDA.value, Provider.TENSORRT.value}


@functools.cache
def _preload_cuda_libraries() -> None:
    """Load the CUDA and cuDNN libraries that pip installed beside onnxruntime-gpu
    (`onnxruntime-gpu[cuda,cudnn]`), so its CUDA provider finds them without LD_LIBRARY_PATH
    and without torch imported first (serving never imports torch). ORT's own helper, present
    in onnxruntime-gpu >= 1.21; libraries it does not find there are looked up as usual."""
    import onnxruntime

    preload = getattr(onnxruntime, "preload_dlls", None)
    if preload is None:
        return
    try:
        preload()
    except Exception as exc:  # a helper, not a requirement: the provider may still load
        logger.warning("onnxruntime.preload_dlls() failed (%s); relying on the loader path", exc)


def runs_on_gpu(session: onnxruntime.InferenceSession) -> bool:
    """Whether the session's first (preferred) provider is a GPU one (CUDA or TensorRT)."""
    return session.get_providers()[0] in _GPU_PROVIDERS


def create_session(
    onnx_path: str | Path,
    *,
    providers: Sequence[str] = (Provider.CPU.value,),
    intra_op_threads: int | None = None,
    inter_op_threads: int = 1,
    spin: bool = True,
) -> onnxruntime.InferenceSession:
    """An InferenceSession for `onnx_path` on the best available of `providers`.

    `spin=False` stops ORT's idle worker threads from busy-waiting between runs: right for a
    service whose decoding and event loop share the cores (measured in benchmarks/RESULTS.md),
    wrong for a tight offline loop, where spinning is faster.
    """
    import onnxruntime

    onnx_path = Path(onnx_path)
    chosen = select_providers(providers)
    intra = usable_threads() if intra_op_threads is None else intra_op_threads
    if intra < 1 or inter_op_threads < 1:
        raise ValueError(
            f"thread counts must be at least 1 (intra_op={intra}, inter_op={inter_op_threads})"
        )
    if not onnx_path.is_file():
        raise ModelLoadError(f"cannot load {onnx_path}: no such file")

    if _GPU_PROVIDERS.intersection(chosen):
        _preload_cuda_libraries()
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = intra
    options.inter_op_num_threads = inter_op_threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    try:
        session = onnxruntime.InferenceSession(
            str(onnx_path), sess_options=options, providers=chosen
        )
    except Exception as exc:  # ORT raises its own pybind exception types, not a common base
        raise ModelLoadError(f"onnxruntime cannot load {onnx_path}: {exc}") from exc

    # A provider can be compiled in yet fail to start (missing CUDA libraries); ORT then
    # quietly drops it, so say so rather than let a GPU deployment run on CPU unnoticed.
    active = session.get_providers()
    dropped = [p for p in chosen if p not in active]
    if dropped:
        logger.warning(
            "onnxruntime could not start %s for %s; running on %s", dropped, onnx_path, active
        )
    logger.info(
        "session for %s on %s (intra_op_threads=%d, inter_op_threads=%d)",
        onnx_path,
        active,
        intra,
        inter_op_threads,
    )
    return session
