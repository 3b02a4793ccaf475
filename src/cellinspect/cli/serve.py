"""`cellinspect serve` (the inspection service) and `cellinspect camera` (a simulated line camera)."""

from __future__ import annotations

import http.client
import json
import shutil
import tempfile
import time
import urllib.parse
import uuid
from collections import Counter

import numpy as np
import typer

from cellinspect.cli.common import console

RECONNECT_S = 0.25  # the camera's first wait before it reconnects; doubled on each retry


class _Link:
    """One kept-alive HTTP connection to the service, reopened after a failure."""

    def __init__(self, url: str) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{url}: not an http:// or https:// URL")
        self._https = parts.scheme == "https"
        self._host, self._port = parts.hostname, parts.port
        self._prefix = parts.path.rstrip("/")
        self._conn: http.client.HTTPConnection | None = None

    def post(
        self, path: str, body: bytes, headers: dict[str, str]
    ) -> tuple[int, http.client.HTTPMessage, bytes]:
        if self._conn is None:
            kind = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
            self._conn = kind(self._host, self._port, timeout=10)
        try:
            self._conn.request("POST", self._prefix + path, body=body, headers=headers)
            reply = self._conn.getresponse()
            return reply.status, reply.headers, reply.read()
        except (OSError, http.client.HTTPException):
            self._conn.close()
            self._conn = None  # the next post opens a new connection
            raise


HOST_HELP = "Address to listen on (default loopback; 0.0.0.0 inside a container)."


def serve(
    model: list[str] | None = typer.Option(
        None,
        "--model",
        help="NAME, NAME@VERSION or NAME@ALIAS; repeat for several (first = default).",
    ),
    host: str = typer.Option("127.0.0.1", help=HOST_HELP),
    port: int = typer.Option(8000, min=1, max=65535),
    workers: int = typer.Option(
        1,
        min=1,
        envvar="CELLINSPECT_WORKERS",
        help="Server processes, each listening on its own socket (SO_REUSEPORT); ORT and "
        "decode threads are split between them (on 2 cores, 2 served 1.09-1.40x the "
        "images/s of 1 at 16-64 clients: benchmarks/RESULTS.md).",
    ),
) -> None:
    """Run the inspection service (settings from CELLINSPECT_* environment and .env)."""
    import os

    import uvicorn
    from pydantic import ValidationError
    from uvicorn.config import STARTUP_FAILURE

    from cellinspect.serving.metrics import MULTIPROCESS_ENV
    from cellinspect.serving.settings import Settings

    overrides = {"models": model} if model else {}
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        # Only the messages: the input values may hold API keys.
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in exc.errors()
        )
        raise ValueError(f"invalid service settings: {problems}") from None
    if model:
        os.environ["CELLINSPECT_MODELS"] = ",".join(
            model
        )  # the factory re-reads settings per worker
    metrics_dir = None
    if workers > 1:
        if settings.intra_op_threads is None:
            # Several processes on the same cores: give each its share, never oversubscribe.
            os.environ["CELLINSPECT_INTRA_OP_THREADS"] = str(
                max(1, settings.ort_threads // workers)
            )
        if settings.decode_workers is None:
            # A worker with one core's share decodes on its event loop: the hand-offs to a
            # decode thread and back cost more than they save (benchmarks/RESULTS.md).
            share = settings.cores // workers
            os.environ["CELLINSPECT_DECODE_WORKERS"] = str(share if share > 1 else 0)
        # Each worker keeps its own archive index: a share of the quota each keeps the sum in.
        os.environ["CELLINSPECT_ARCHIVE_QUOTA_BYTES"] = str(settings.archive_quota_bytes // workers)
        if not os.environ.get(MULTIPROCESS_ENV):  # one /metrics over all workers
            metrics_dir = tempfile.mkdtemp(prefix="cellinspect-metrics-")
            os.environ[MULTIPROCESS_ENV] = metrics_dir
    config = uvicorn.Config(
        "cellinspect.serving.app:create_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level="info",
        timeout_keep_alive=settings.keep_alive_s,
        access_log=False,  # one log line per image at line rate is noise; metrics count them
    )
    try:
        if workers > 1:
            from cellinspect.serving.supervisor import run_workers

            run_workers(config)  # a socket per worker: connections spread over them
        else:
            server = uvicorn.Server(config)
            server.run()
            if not server.started:  # what uvicorn.run does: the app or the bind failed
                raise SystemExit(STARTUP_FAILURE)
    finally:
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)


def camera(
    url: str = typer.Option("http://127.0.0.1:8000", help="Service base URL."),
    rate: float = typer.Option(5.0, min=0.1, help="Images per second."),
    count: int = typer.Option(20, min=1, help="Images to send."),
    line_id: str = typer.Option("line-1", help="Line id sent with each image."),
    station_id: str = typer.Option("station-1", help="Station id sent with each image."),
    api_key: str | None = typer.Option(
        None, envvar="CELLINSPECT_CAMERA_KEY", help="Station API key."
    ),
    seed: int = typer.Option(123, help="Seed of the synthetic images."),
    size: int = typer.Option(128, min=32, help="Electrode tile side."),
    retries: int = typer.Option(
        3,
        min=0,
        help="Retries of an image answered 503 (after its Retry-After) or whose connection "
        "was lost (after 0.25 s, doubling), with the same Idempotency-Key.",
    ),
) -> None:
    """Simulate a line camera: post synthetic electrode tiles and print each verdict.

    Like a line camera, it keeps one connection open. Each image carries an
    Idempotency-Key, repeated on its retries after a 503 or a lost connection.
    """
    from cellinspect.datasets.decode import encode_png
    from cellinspect.datasets.synth import ELECTRODE_CLASSES, generate_electrode

    link = _Link(url)
    rng = np.random.default_rng(seed)
    verdicts: Counter[str] = Counter()
    correct = 0
    for i in range(count):
        started = time.perf_counter()
        truth = str(rng.choice(ELECTRODE_CLASSES))
        image, _ = generate_electrode(truth, rng, size=size)
        cell = f"cell-{seed}-{i:05d}"
        query = {"line_id": line_id, "station_id": station_id, "cell_id": cell}
        path = f"/v1/inspect?{urllib.parse.urlencode(query)}"
        headers = {
            "Content-Type": "image/png",
            # One key per image, the same on every retry: a retry whose inspection was
            # recorded after all (a 503, or a connection lost before the answer) gets that
            # record, not a second one.
            "Idempotency-Key": f"{station_id}:{cell}:{uuid.uuid4().hex}",
            **({"X-API-Key": api_key} if api_key else {}),
        }
        data = encode_png(image)
        body = None
        for attempt in range(retries + 1):
            try:
                status, reply_headers, content = link.post(path, data, headers)
            except (OSError, http.client.HTTPException) as exc:
                if attempt < retries:
                    time.sleep(RECONNECT_S * 2**attempt)
                    continue
                raise ValueError(f"{url}: service not reachable ({exc})") from None
            if status == 503 and attempt < retries:
                time.sleep(float(reply_headers.get("Retry-After", "1")))
                continue
            if status == 200:
                body = json.loads(content)
            else:
                console.print(f"{i:4d} truth={truth:<17} HTTP {status}: {content[:200]!r}")
            break
        if body is None:
            continue
        verdicts[body["verdict"]] += 1
        correct += body["label"] == truth
        console.print(
            f"{i:4d} truth={truth:<17} label={body['label']:<17} verdict={body['verdict']:<6} "
            f"p_defect={body['defect_probability']:.3f} {body['timings']['total_ms']:.1f} ms"
        )
        time.sleep(max(0.0, 1.0 / rate - (time.perf_counter() - started)))
    console.print(f"sent {count}: {dict(verdicts)}; label correct {correct}/{count}")
