"""Service throughput and latency vs the in-process limit and a naive FastAPI baseline.

Side by side in one run, on the same model and image:
  * in-process limit: decode + preprocess + ONNX Runtime (batch 8) in a tight loop;
  * naive: benchmarks/naive_server.py (session.run per request, no batching, no records);
  * cellinspect: `cellinspect serve` (micro-batching, durable records, archive).
Load comes from wrk (C, one thread) on loopback; each cell is the median of the rounds.

    python benchmarks/bench_serving.py [--size 224] [--rounds 3] [--duration 8]

Needs the train extra (torch, to export an untrained mobilenet_v3_small: speed does not
depend on the weights) and `wrk` (Debian package).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

from cellinspect.datasets.decode import decode_image, encode_png
from cellinspect.datasets.preprocess import PreprocessSpec, preprocess_batch
from cellinspect.datasets.synth import generate_electrode
from cellinspect.models.card import ModelCard
from cellinspect.models.runtime import create_session
from cellinspect.models.store import ModelStore

MODEL = "bench"
LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "image/png"
local f = io.open(os.getenv("BENCH_IMAGE"), "rb"); wrk.body = f:read("*all"); f:close()
done = function(summary, latency, requests)
  io.write(string.format("RESULT %d %d %d %d %d %d\\n", summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(95), latency:percentile(99),
    summary.errors.status + summary.errors.connect + summary.errors.read + summary.errors.timeout))
end
"""


def publish_model(home: Path, size: int) -> ModelCard:
    """An untrained mobilenet_v3_small, exported through the project's own exporter."""
    from cellinspect.training.export import OPSET, Checkpoint, export_onnx
    from cellinspect.training.networks import ExportableClassifier, create_model

    spec = PreprocessSpec(height=size, width=size, channels=1)
    classes = ["ok", "pinhole", "scratch", "crack"]
    net = create_model("mobilenet_v3_small", num_classes=len(classes), in_chans=1)
    ckpt = Checkpoint(
        model=ExportableClassifier(net).eval(),
        class_names=classes,
        good_class="ok",
        spec=spec,
        config={"arch": "mobilenet_v3_small"},
        manifest_path=home,
        manifest_hash="none",
        epoch=0,
    )
    onnx_path = home / "bench.onnx"
    export_onnx(ckpt, onnx_path)
    card = ModelCard(
        name=MODEL,
        arch="mobilenet_v3_small",
        class_names=classes,
        good_class="ok",
        preprocessing=spec,
        opset=OPSET,
    )
    return ModelStore(home / "store").publish(onnx_path, card)


def write_load(home: Path, image_size: int) -> tuple[Path, Path]:
    """The posted image (a synthetic scratch tile, gray PNG) and wrk's script, under `home`."""
    tile, _ = generate_electrode("scratch", np.random.default_rng(0), size=image_size)
    image = home / "image.png"
    image.write_bytes(encode_png(tile))
    script = home / "post.lua"
    script.write_text(LUA)
    return image, script


def in_process_limit(
    card: ModelCard, path: Path, image: bytes, threads: int, seconds: float
) -> float:
    session = create_session(path, intra_op_threads=threads)
    start, done = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        batch = preprocess_batch([decode_image(image) for _ in range(8)], card.preprocessing)
        session.run(["probabilities"], {"image": batch})
        done += 8
    return done / (time.perf_counter() - start)


def wait_ready(url: str, proc: subprocess.Popen, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1) as reply:
                if reply.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{url} not ready after {timeout_s:g} s")


def start_server(
    kind: str,
    home: Path,
    port: int,
    threads: int,
    *,
    model: str = MODEL,
    env: dict[str, str] | None = None,
    log: Path | None = None,
    new_session: bool = False,
    ready_timeout_s: float = 120.0,
    workers: int = 1,
) -> subprocess.Popen:
    """`naive` or `cellinspect` serving `model` on `port`, returned once /readyz answers.

    `env` adds settings (e.g. CELLINSPECT_SHADOW_MODELS) to the server's environment;
    `log` appends its output to that file (default: discarded); `new_session` puts it in
    its own process group, so killing the group takes uvicorn's `workers` with it.
    """
    env = {
        **os.environ,
        "CELLINSPECT_HOME": str(home),
        "BENCH_MODEL": MODEL,
        "BENCH_THREADS": str(threads),
        "CELLINSPECT_INTRA_OP_THREADS": str(threads),
        **(env or {}),
    }
    if kind == "naive":
        cmd = [
            sys.executable,
            "-m",
            "uvicorn",
            "--factory",
            "benchmarks.naive_server:create_app",
            "--port",
            str(port),
            "--log-level",
            "warning",
            "--no-access-log",
        ]
    else:
        cmd = [
            sys.executable,
            "-m",
            "cellinspect.cli",
            "serve",
            "--model",
            model,
            "--port",
            str(port),
            *(["--workers", str(workers)] if workers > 1 else []),
        ]
    log_file = open(log, "ab") if log is not None else None  # noqa: SIM115
    try:
        proc = subprocess.Popen(
            cmd,
            env=env,
            stdout=log_file or subprocess.DEVNULL,
            stderr=subprocess.STDOUT if log_file else subprocess.DEVNULL,
            cwd=Path(__file__).resolve().parents[1],
            start_new_session=new_session,
        )
    finally:
        if log_file is not None:
            log_file.close()  # the child holds its own descriptor
    try:
        wait_ready(f"http://127.0.0.1:{port}/readyz", proc, ready_timeout_s)
    except BaseException:
        # A server that never got ready must not outlive the caller (it holds the port).
        if new_session:
            with contextlib.suppress(ProcessLookupError):  # the group may be gone already
                os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.kill()
        proc.wait()
        raise
    return proc


def wrk(url: str, concurrency: int, seconds: float, script: Path, image: Path) -> dict[str, float]:
    out = subprocess.run(
        [
            "wrk",
            "-t1",
            f"-c{concurrency}",
            f"-d{round(seconds)}s",
            "--timeout",
            "10s",
            "-s",
            str(script),
            url,
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "BENCH_IMAGE": str(image)},
        check=True,
    ).stdout
    match = re.search(r"RESULT (\d+) (\d+) (\d+) (\d+) (\d+) (\d+)", out)
    if not match:
        raise RuntimeError(f"wrk output not understood:\n{out}")
    requests, micros, p50, p95, p99, errors = map(int, match.groups())
    return {
        "rps": requests / (micros / 1e6),
        "p50": p50 / 1000,
        "p95": p95 / 1000,
        "p99": p99 / 1000,
        "errors": errors,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=224, help="model input side")
    parser.add_argument("--image-size", type=int, default=300, help="posted image side (gray PNG)")
    parser.add_argument("--threads", type=int, default=2, help="ORT intra-op threads")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per wrk run")
    parser.add_argument("--concurrency", default="1,4,16,64")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk not found: apt-get install wrk")
    levels = [int(c) for c in args.concurrency.split(",")]
    with tempfile.TemporaryDirectory(prefix="cellinspect-bench-") as tmp:
        home = Path(tmp)
        card = publish_model(home, args.size)
        _, onnx_path = ModelStore(home / "store").load_verified(MODEL)
        image_path, script = write_load(home, args.image_size)
        limits = [
            in_process_limit(card, onnx_path, image_path.read_bytes(), args.threads, args.duration)
            for _ in range(args.rounds)
        ]
        results: dict[tuple[str, int], list[dict[str, float]]] = {}
        for round_ in range(args.rounds):
            for kind, route in (("naive", "/infer"), ("cellinspect", "/v1/inspect")):
                proc = start_server(kind, home, 8700 + round_, args.threads)
                try:
                    url = f"http://127.0.0.1:{8700 + round_}{route}"
                    wrk(url, 4, 2, script, image_path)  # warm-up
                    for c in levels:
                        results.setdefault((kind, c), []).append(
                            wrk(url, c, args.duration, script, image_path)
                        )
                finally:
                    proc.send_signal(signal.SIGTERM)
                    proc.wait(timeout=60)
    limit = statistics.median(limits)
    print(
        f"\nmobilenet_v3_small {args.size}², {args.image_size}² gray PNG, ORT {args.threads} threads, "
        f"{os.cpu_count()} CPUs, median of {args.rounds} rounds x {args.duration:g} s\n"
    )
    print(f"in-process limit (decode + preprocess + ORT, batch 8): {limit:.0f} img/s\n")
    print("| server | clients | img/s | share of limit | p50 ms | p95 ms | p99 ms | errors |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for (kind, c), runs in results.items():
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        print(
            f"| {kind} | {c} | {med['rps']:.0f} | {med['rps'] / limit:.2f} | {med['p50']:.1f} | "
            f"{med['p95']:.1f} | {med['p99']:.1f} | {med['errors']:.0f} |"
        )


if __name__ == "__main__":
    main()
