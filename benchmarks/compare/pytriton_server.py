"""Triton Inference Server through PyTriton, for benchmarks/bench_serving.py (`--compare pytriton`).

Same work per image as benchmarks/naive_server.py: decode the posted PNG with `decode_image`,
`preprocess` with the model card's spec, ONNX Runtime on CPU (`create_session(...,
spin=False)`), probabilities back as JSON. The difference is the batching: the model is bound
with Triton's dynamic batcher (max batch 8), so one `session.run` takes up to 8 images.

    CELLINSPECT_HOME=... BENCH_MODEL=name BENCH_THREADS=2 \\
        .venv-pytriton/bin/python benchmarks/compare/pytriton_server.py --port 8000

Clients talk to Triton's own HTTP endpoint (KServe v2 protocol), `POST
/v2/models/cellinspect/infer`, with the PNG as a raw BYTES tensor through Triton's binary
tensor data extension: a JSON inference header of `Inference-Header-Content-Length` bytes,
then the tensor's bytes (for BYTES: a 4-byte little-endian length, then the PNG).
`request_body` builds that request; it needs only the standard library, so bench_serving
imports it from the project's environment. Readiness: `GET /v2/health/ready`.

The batcher's max queue delay defaults to 2000 µs: the same 2 ms that cellinspect's own
micro-batcher waits for a batch to fill (`max_delay_ms`), so both trade the same latency at
low load for batches at high load (BENCH_TRITON_DELAY_US overrides it).

The inference callable runs in this Python process; tritonserver (a child process, in this
process's group, with a parent-death signal) and its python-backend stub proxy requests to
it over shared memory. SIGTERM stops it as SIGINT does: PyTriton then stops tritonserver and
removes its workspace and shared-memory segments.

Runs in this folder's own virtual environment (`benchmarks/compare/setup.sh`).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import struct
from pathlib import Path

MODEL_NAME = "cellinspect"
MAX_BATCH_SIZE = 8
DEFAULT_DELAY_US = 2000
READY_ROUTE = "/v2/health/ready"
INFER_ROUTE = f"/v2/models/{MODEL_NAME}/infer"


def request_body(image: bytes) -> tuple[bytes, dict[str, str], str]:
    """A KServe v2 inference request for one encoded image: (body, headers, route).

    The body is the JSON inference header followed by the binary BYTES tensor of shape
    [1, 1] (batch of one, one element); the output comes back as JSON, not binary.
    """
    tensor = struct.pack("<I", len(image)) + image
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "image",
                    "shape": [1, 1],
                    "datatype": "BYTES",
                    "parameters": {"binary_data_size": len(tensor)},
                }
            ],
            "outputs": [{"name": "probabilities", "parameters": {"binary_data": False}}],
        },
        separators=(",", ":"),
    ).encode()
    headers = {
        "Content-Type": "application/octet-stream",
        "Inference-Header-Content-Length": str(len(header)),
    }
    return header + tensor, headers, INFER_ROUTE


def probabilities(reply: bytes) -> list[float]:
    """The probabilities from Triton's JSON inference response."""
    outputs = {o["name"]: o for o in json.loads(reply)["outputs"]}
    return [float(p) for p in outputs["probabilities"]["data"]]


def use_own_libpython() -> None:
    """Make Triton's python-backend stub load this interpreter's libpython.

    The stub links `libpython3.X.so.1.0` by name; without a hint the loader takes the
    system's (Debian: /lib/x86_64-linux-gnu, 3.11.2 here) while the stub runs the standard
    library of this venv's interpreter (pyenv 3.11.7 here), and a mismatch fails model
    loading (`'_thread.RLock' object has no attribute '_recursion_count'` in
    multiprocessing). PyTriton passes os.environ on to tritonserver, so prepend our LIBDIR.
    """
    import sysconfig

    libdir, library = sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("LDLIBRARY")
    if not (libdir and library and (Path(libdir) / library).exists()):
        return  # a static interpreter: the stub can only use a system libpython
    paths = [libdir, *filter(None, os.environ.get("LD_LIBRARY_PATH", "").split(":"))]
    os.environ["LD_LIBRARY_PATH"] = ":".join(dict.fromkeys(paths))


def main() -> None:
    import numpy as np
    from pytriton.decorators import batch
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig

    from cellinspect.datasets.decode import decode_image
    from cellinspect.datasets.preprocess import preprocess
    from cellinspect.home import Home
    from cellinspect.models.runtime import create_session
    from cellinspect.models.store import ModelStore

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=8000, help="Triton's HTTP port")
    parser.add_argument("--workspace", type=Path, default=None, help="PyTriton's workspace")
    parser.add_argument(
        "--delay-us",
        type=int,
        default=int(os.environ.get("BENCH_TRITON_DELAY_US", DEFAULT_DELAY_US)),
        help="dynamic batcher max queue delay (µs)",
    )
    args = parser.parse_args()

    card, path = ModelStore(Home.resolve().store).load_verified(os.environ["BENCH_MODEL"])
    session = create_session(
        path, intra_op_threads=int(os.environ.get("BENCH_THREADS", "2")), spin=False
    )
    spec = card.preprocessing

    @batch
    def infer(image: np.ndarray) -> dict[str, np.ndarray]:
        # image: (batch, 1) of object (the encoded bytes of each request)
        x = np.stack([preprocess(decode_image(bytes(item[0])), spec) for item in image])
        (probs,) = session.run(["probabilities"], {"image": x})
        return {"probabilities": np.asarray(probs, dtype=np.float32)}

    # SIGTERM (what bench_serving and most supervisors send) takes the SIGINT path, so that
    # Triton.serve() stops tritonserver and cleans its workspace and shared memory.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    use_own_libpython()
    config = TritonConfig(
        http_address="127.0.0.1",
        http_port=args.port,
        allow_grpc=False,
        allow_metrics=False,
        exit_timeout_secs=5,
    )
    with Triton(config=config, workspace=args.workspace) as triton:
        triton.bind(
            model_name=MODEL_NAME,
            infer_func=infer,
            inputs=[Tensor(name="image", dtype=bytes, shape=(1,))],
            outputs=[Tensor(name="probabilities", dtype=np.float32, shape=(-1,))],
            config=ModelConfig(
                max_batch_size=MAX_BATCH_SIZE,
                batcher=DynamicBatcher(max_queue_delay_microseconds=args.delay_us),
            ),
            strict=True,
        )
        triton.serve()


if __name__ == "__main__":
    main()
