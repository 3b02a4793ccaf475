"""Service throughput and latency vs the in-process limit and a naive FastAPI baseline.

Side by side in one run, on the same model and image:
  * in-process limit: decode + preprocess + ONNX Runtime (batch 8) in a tight loop;
  * naive: benchmarks/naive_server.py (session.run per request, no batching, no records);
    with --naive-records also the same route committing a record per request before it
    answers (what durability costs a design without batching or a writer thread);
  * cellinspect: `cellinspect serve` (micro-batching, durable records, archive);
  * with --compare: other serving stacks doing the same work per image (decode_image,
    preprocess, ORT with the same threads), each from its own virtual environment made by
    benchmarks/compare/setup.sh:
      pytriton: Triton Inference Server 2.51 through PyTriton, dynamic batcher (max batch 8,
                2 ms max queue delay), posted as a KServe v2 binary BYTES tensor;
      bentoml:  a BentoML 1.4 service, one worker, raw PNG body, not batched.
Load comes from wrk (C, one thread) on loopback; each cell is the median of the rounds.

    python benchmarks/bench_serving.py [--size 224] [--rounds 3] [--duration 8]
        [--compare pytriton,bentoml] [--naive-records]

Needs the train extra (torch, to export an untrained mobilenet_v3_small: speed does not
depend on the weights) and `wrk` (Debian package).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
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
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cellinspect.datasets.decode import decode_image, encode_png
from cellinspect.datasets.preprocess import PreprocessSpec, preprocess_batch
from cellinspect.datasets.synth import generate_electrode
from cellinspect.models.card import ModelCard
from cellinspect.models.runtime import create_session
from cellinspect.models.store import ModelStore

MODEL = "bench"
LUA_DONE = """
done = function(summary, latency, requests)
  io.write(string.format("RESULT %d %d %d %d %d %d\\n", summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(95), latency:percentile(99),
    summary.errors.status + summary.errors.connect + summary.errors.read + summary.errors.timeout))
end
"""
LUA = (
    """
wrk.method = "POST"
wrk.headers["Content-Type"] = "image/png"
local f = io.open(os.getenv("BENCH_IMAGE"), "rb"); wrk.body = f:read("*all"); f:close()
"""
    + LUA_DONE
)
ROOT = Path(__file__).resolve().parents[1]
COMPARE_DIR = ROOT / "benchmarks" / "compare"
COMPARE_KINDS = ("pytriton", "bentoml")
COMPARE_NOTES = {
    "pytriton": "dynamic batcher (max batch 8, "
    f"{os.environ.get('BENCH_TRITON_DELAY_US', '2000')} us max queue delay), "
    "KServe v2 binary BYTES tensor over HTTP",
    "bentoml": f"1 worker, {os.environ.get('BENCH_BENTO_THREADS', '1')} API thread(s), "
    "raw PNG body, not batched",
}


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


def benchmark_model(home: Path, size: int) -> tuple[ModelCard, Path]:
    """The benchmark model under `home`: the one an earlier run published there, else a new one."""
    store = ModelStore(home / "store")
    if not store.versions(MODEL):
        publish_model(home, size)
    card, onnx_path = store.load_verified(MODEL)
    if card.preprocessing.height != size:
        sys.exit(
            f"{home}: its benchmark model takes {card.preprocessing.height}², not --size {size}"
        )
    return card, onnx_path


def write_load(home: Path, image_size: int) -> tuple[Path, Path]:
    """The posted image (a synthetic scratch tile, gray PNG) and wrk's script, under `home`."""
    tile, _ = generate_electrode("scratch", np.random.default_rng(0), size=image_size)
    image = home / "image.png"
    image.write_bytes(encode_png(tile))
    script = home / "post.lua"
    script.write_text(LUA)
    return image, script


def in_process_limit(
    card: ModelCard,
    path: Path,
    image: bytes,
    threads: int,
    seconds: float,
    providers: Sequence[str] = ("cpu",),
) -> float:
    session = create_session(path, providers=providers, intra_op_threads=threads)
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
    threads: int | None,
    *,
    model: str = MODEL,
    env: dict[str, str] | None = None,
    log: Path | None = None,
    new_session: bool = False,
    ready_timeout_s: float = 120.0,
    workers: int = 1,
) -> subprocess.Popen:
    """`naive` or `cellinspect` serving `model` on `port`, returned once /readyz answers.

    `threads`: ORT intra-op threads (None: the service's own default; naive needs a number).
    `env` adds settings (e.g. CELLINSPECT_SHADOW_MODELS) to the server's environment;
    `log` appends its output to that file (default: discarded); `new_session` puts it in
    its own process group, so killing the group takes uvicorn's `workers` with it.
    """
    env = {
        **os.environ,
        "CELLINSPECT_HOME": str(home),
        "BENCH_MODEL": MODEL,
        **(
            {}
            if threads is None
            else {"BENCH_THREADS": str(threads), "CELLINSPECT_INTRA_OP_THREADS": str(threads)}
        ),
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
        if workers > 1:
            wait_listening(port, workers)
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


def listening_sockets(port: int) -> int:
    """TCP sockets listening on `port` (IPv4), from /proc/net/tcp."""
    lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
    fields = (line.split() for line in lines)
    return sum(1 for f in fields if f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == port)


def wait_listening(port: int, workers: int, timeout_s: float = 10.0) -> None:
    """Until every worker listens (one socket each) or `timeout_s`: /readyz answers as soon
    as one worker is up, and clients that connect before the others listen all stay on it.
    (Workers that share one socket never show more than one: they wait out the timeout.)"""
    deadline = time.monotonic() + timeout_s
    while listening_sockets(port) < workers and time.monotonic() < deadline:
        time.sleep(0.1)


def require_comparison_venvs(kinds: list[str]) -> None:
    """Stop with a clear message when a comparison server's virtual environment is missing."""
    missing = [kind for kind in kinds if not (ROOT / f".venv-{kind}" / "bin" / "python").is_file()]
    if missing:
        venvs = ", ".join(f".venv-{kind}" for kind in missing)
        sys.exit(
            f"--compare {','.join(missing)}: {venvs} not found at {ROOT}. These servers run in "
            f"their own virtual environments; create them with:\n"
            f"    benchmarks/compare/setup.sh {' '.join(missing)}"
        )


def comparison_version(kind: str) -> str:
    """The comparison server's package and version, as installed in its environment."""
    package = {"pytriton": "nvidia-pytriton", "bentoml": "bentoml"}[kind]
    out = subprocess.run(
        [
            str(ROOT / f".venv-{kind}" / "bin" / "python"),
            "-c",
            f"import importlib.metadata as m; print(m.version({package!r}))",
        ],
        capture_output=True,
        text=True,
    )
    return f"{package} {out.stdout.strip() or '?'}"


def write_comparison_load(kind: str, home: Path, image: Path) -> tuple[str, Path, Path]:
    """(route, wrk script, request body file) posting `image` to comparison server `kind`.

    pytriton: a KServe v2 request with the PNG as a binary BYTES tensor, built by
    pytriton_server.request_body (standard library only, so it loads here); bentoml: the raw
    PNG, as to the naive server.
    """
    if kind == "pytriton":
        spec = importlib.util.spec_from_file_location(
            "bench_pytriton_server", COMPARE_DIR / "pytriton_server.py"
        )
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        body, headers, route = module.request_body(image.read_bytes())
    else:
        body, headers, route = image.read_bytes(), {"Content-Type": "image/png"}, "/infer"
    body_path = home / f"{kind}.body"
    body_path.write_bytes(body)
    script = home / f"post-{kind}.lua"
    script.write_text(
        'wrk.method = "POST"\n'
        + "".join(f"wrk.headers[{json.dumps(k)}] = {json.dumps(v)}\n" for k, v in headers.items())
        + 'local f = io.open(os.getenv("BENCH_IMAGE"), "rb"); wrk.body = f:read("*all"); f:close()\n'
        + LUA_DONE
    )
    return route, script, body_path


def _proc_stat(pid: int) -> tuple[int, int, int] | None:
    """(ppid, process group, start time) of `pid` from /proc, None once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
    return int(fields[1]), int(fields[2]), int(fields[19])


def _family(pid: int) -> dict[int, tuple[int, int]]:
    """`pid` and all its descendants: pid -> (process group, start time)."""
    stats = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _proc_stat(int(entry.name))) is not None:
            stats[int(entry.name)] = stat
    family, frontier = {}, [pid]
    while frontier:
        parent = frontier.pop()
        if parent in stats:
            family[parent] = stats[parent][1:]
        frontier += [child for child, (ppid, _, _) in stats.items() if ppid == parent]
    return family


def stop_server(proc: subprocess.Popen, grace_s: float = 30.0) -> None:
    """Stop a server started in its own session, and everything it started.

    SIGTERM to the server, up to `grace_s` for it to exit cleanly (PyTriton then stops
    tritonserver and frees its shared memory; BentoML its workers), then SIGKILL to its
    process group and to every descendant seen before: BentoML's workers run in sessions of
    their own, which a kill of the group would miss. A descendant is killed only if it is
    still the same process (same start time), never a later one that reused its pid.
    """
    family = _family(proc.pid)
    if proc.poll() is None and grace_s > 0:
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace_s)
    with contextlib.suppress(ProcessLookupError):  # group gone: all its members exited
        os.killpg(proc.pid, signal.SIGKILL)
    own_group = os.getpgrp()
    for pid, (group, started) in family.items():
        stat = _proc_stat(pid)
        if pid != proc.pid and stat is not None and stat[2] == started and group != own_group:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 10  # until the killed ones are gone (and their ports free)
    while time.monotonic() < deadline and any(
        (stat := _proc_stat(pid)) is not None and stat[2] == started
        for pid, (_, started) in family.items()
        if pid != proc.pid
    ):
        time.sleep(0.1)


def start_comparison(
    kind: str, home: Path, port: int, threads: int, *, ready_timeout_s: float = 180.0
) -> subprocess.Popen:
    """Comparison server `kind` (pytriton, bentoml) on `port`, from its own virtual environment,
    in its own session, returned once it answers ready; its output goes to home/KIND-PORT.log.
    """
    venv = ROOT / f".venv-{kind}" / "bin"
    if kind == "pytriton":
        cmd = [
            str(venv / "python"),
            str(COMPARE_DIR / "pytriton_server.py"),
            "--port",
            str(port),
            "--workspace",
            str(home / f"pytriton-{port}"),
        ]
        # Not /v2/health/ready: Triton answers it before PyTriton has loaded the model.
        ready = f"http://127.0.0.1:{port}/v2/models/cellinspect/ready"
        failed = None  # PyTriton exits when the model cannot be loaded
    elif kind == "bentoml":
        cmd = [
            str(venv / "bentoml"),
            "serve",
            "benchmarks.compare.bento_service:Inspect",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ]
        ready = f"http://127.0.0.1:{port}/readyz"
        # A worker that fails to start is restarted by BentoML's arbiter, which never exits.
        failed = "Application startup failed"
    else:
        raise ValueError(f"unknown comparison server {kind!r}; known: {', '.join(COMPARE_KINDS)}")
    env = {
        **os.environ,
        "CELLINSPECT_HOME": str(home),
        "BENCH_MODEL": MODEL,
        "BENCH_THREADS": str(threads),
        "BENTOML_HOME": str(home / "bentoml"),  # not ~/bentoml
        "BENTOML_DO_NOT_TRACK": "true",
    }
    for name in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"):  # the project's, not the server's
        env.pop(name, None)
    log = home / f"{kind}-{port}.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + ready_timeout_s
        while True:
            try:
                wait_ready(ready, proc, 1.0)
                break
            except RuntimeError:
                if proc.poll() is not None:
                    raise
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{ready} not ready after {ready_timeout_s:g} s") from None
                if failed and failed in log.read_text(errors="replace"):
                    raise RuntimeError(f"{failed!r} in its log") from None
    except BaseException as exc:
        stop_server(proc, grace_s=5)  # it must not outlive us holding the port
        if isinstance(exc, Exception):
            tail = log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{kind} server did not get ready: {exc}\n{log}:\n{tail}") from exc
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
    parser.add_argument(
        "--threads",
        type=int,
        default=2,
        help="ORT intra-op threads of the in-process limit, the naive and comparison servers",
    )
    parser.add_argument(
        "--service-threads",
        type=int,
        default=None,
        help="ORT intra-op threads of cellinspect (default: its own, half the cores)",
    )
    parser.add_argument(
        "--providers",
        default="cpu",
        help="ONNX Runtime execution providers of the limit, naive and cellinspect, e.g. "
        "cuda,cpu on a GPU box (CPU is always the last fallback)",
    )
    parser.add_argument(
        "--home",
        type=Path,
        default=None,
        help="reuse the benchmark model published under this home by an earlier run "
        "(default: export a fresh one into a temporary home, which needs torch)",
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per wrk run")
    parser.add_argument("--concurrency", default="1,4,16,64")
    parser.add_argument(
        "--service-workers",
        default="1",
        help="cellinspect server processes, comma-separated to measure several (e.g. 1,2)",
    )
    parser.add_argument(
        "--naive-records",
        action="store_true",
        help="also run the naive route storing each answer before it returns (one SQLite "
        "INSERT + COMMIT per request on its event loop, the service's table and pragmas)",
    )
    parser.add_argument(
        "--compare",
        default="",
        help="also run these servers, comma-separated: pytriton, bentoml (each in its own "
        "virtual environment: benchmarks/compare/setup.sh)",
    )
    args = parser.parse_args()
    service_workers = [int(n) for n in args.service_workers.split(",")]
    compare = [kind for kind in args.compare.split(",") if kind]
    if unknown := sorted(set(compare) - set(COMPARE_KINDS)):
        parser.error(f"--compare: unknown {', '.join(unknown)}; known: {', '.join(COMPARE_KINDS)}")
    if shutil.which("wrk") is None:
        sys.exit("wrk not found: apt-get install wrk")
    require_comparison_venvs(compare)
    if compare:  # a SIGTERM to this run still stops the servers (finally blocks run)
        signal.signal(signal.SIGTERM, signal.default_int_handler)
    levels = [int(c) for c in args.concurrency.split(",")]
    providers = args.providers.split(",")
    provider_env = {"CELLINSPECT_PROVIDERS": args.providers, "BENCH_PROVIDERS": args.providers}
    with contextlib.ExitStack() as stack:
        home = args.home or Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="cellinspect-bench-"))
        )
        card, onnx_path = benchmark_model(home, args.size)
        image_path, script = write_load(home, args.image_size)
        loads = {kind: write_comparison_load(kind, home, image_path) for kind in compare}
        served: dict[str, str] = {}
        limits: list[float] = []
        results: dict[tuple[str, int], list[dict[str, float]]] = {}

        def measure(kind: str, url: str, script: Path, body: Path) -> None:
            wrk(url, 4, 2, script, body)  # warm-up
            for c in levels:
                results.setdefault((kind, c), []).append(wrk(url, c, args.duration, script, body))

        for round_ in range(args.rounds):
            # Measured in every round, beside the servers: a shared host's speed drifts
            # (the limit alone has read 651, 568 and 404 img/s on three runs of one day).
            limits.append(
                in_process_limit(
                    card, onnx_path, image_path.read_bytes(), args.threads, args.duration, providers
                )
            )
            # (label, kind, route, server processes, extra settings)
            servers = [("naive", "naive", "/infer", 1, {})]
            if args.naive_records:
                servers.append(("naive + records", "naive", "/infer", 1, {"BENCH_RECORDS": "1"}))
            servers += [
                (
                    "cellinspect" if n == 1 else f"cellinspect --workers {n}",
                    "cellinspect",
                    "/v1/inspect",
                    n,
                    {},
                )
                for n in service_workers
            ]
            for label, kind, route, n, extra in servers:
                threads = args.threads if kind == "naive" else args.service_threads
                proc = start_server(
                    kind, home, 8700 + round_, threads, workers=n, env={**provider_env, **extra}
                )
                try:
                    measure(label, f"http://127.0.0.1:{8700 + round_}{route}", script, image_path)
                finally:
                    proc.send_signal(signal.SIGTERM)
                    proc.wait(timeout=60)
            for i, kind in enumerate(compare):
                port = 8710 + 10 * i + round_
                route, kind_script, body = loads[kind]
                proc = start_comparison(kind, home, port, args.threads)
                try:
                    if kind == "pytriton":  # KServe v2 server metadata: tritonserver's version
                        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2", timeout=5) as r:
                            served["pytriton"] = f"Triton {json.loads(r.read())['version']}"
                    measure(kind, f"http://127.0.0.1:{port}{route}", kind_script, body)
                finally:
                    stop_server(proc)
    limit = statistics.median(limits)
    print(
        f"\nmobilenet_v3_small {args.size}², {args.image_size}² gray PNG, ORT {args.threads} threads "
        f"(limit, naive, comparisons), cellinspect ORT threads: "
        f"{args.service_threads or 'its default'}, providers {args.providers}, "
        f"{os.cpu_count()} CPUs, "
        f"median of {args.rounds} rounds x {args.duration:g} s\n"
    )
    print(
        f"in-process limit (decode + preprocess + ORT, batch 8): {limit:.0f} img/s "
        f"(rounds: {', '.join(f'{x:.0f}' for x in limits)})\n"
    )
    for kind in compare:
        version = ", ".join(filter(None, [comparison_version(kind), served.get(kind)]))
        print(f"{kind}: {version}; {COMPARE_NOTES[kind]}")
    if compare:
        print()
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
