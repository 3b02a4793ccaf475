"""Helpers for the service tests: API keys per role, flat test images, tiny published models."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from tinymodel import WEIGHTS, build_classifier, make_card

from cellinspect.datasets.decode import encode_png
from cellinspect.models.store import ModelStore
from cellinspect.serving.settings import Settings

KEYS = {
    "station": "station-key-0123456789",
    "operator": "operator-key-0123456789",
    "admin": "admin-key-0123456789abc",
}


def png(value: int, size: int = 16, channels: int = 1, dtype: type = np.uint8) -> bytes:
    """A flat image: dark (value 0) reads 'good', bright (255) reads 'scratch' to the tiny model."""
    shape = (size, size) if channels == 1 else (size, size, channels)
    scale = 257 if dtype is np.uint16 else 1
    return encode_png(np.full(shape, value * scale, dtype))


def publish_tiny(
    store: ModelStore,
    tmp: Path,
    weights: np.ndarray = WEIGHTS,
    *,
    name: str = "tiny",
    heatmap: bool = False,
    **card: object,
) -> str:
    """Publish the tiny model as a new version of `name` (with a heatmap output if asked;
    `card` overrides fields of its model card)."""
    path = build_classifier(
        tmp / f"{name}-{len(store.versions(name))}.onnx", weights=weights, heatmap=heatmap
    )
    outputs = ["logits", "probabilities", *(["heatmap"] if heatmap else [])]
    return store.publish(path, make_card(name, output_names=outputs, **card)).version


def make_settings(home: Path, **overrides: object) -> Settings:
    fields: dict[str, object] = {
        "home": home,
        "models": ["tiny"],
        "api_keys": ",".join(f"{role}:{key}" for role, key in KEYS.items()),
        "intra_op_threads": 1,
        "max_delay_ms": 1,
        "archive_pass_sample_rate": 0.0,
        "max_body_bytes": 200_000,
        "max_pixels": 1_000_000,
    }
    fields.update(overrides)
    return Settings(**fields)  # type: ignore[arg-type]


def auth(role: str) -> dict[str, str]:
    return {"X-API-Key": KEYS[role]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerProcess:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path  # the server's stdout and stderr

    @property
    def output(self) -> str:
        return self.log.read_text(errors="replace")


@contextmanager
def running_server(
    home: Path, env: dict[str, str], args: tuple[str, ...] = ()
) -> Iterator[ServerProcess]:
    """`cellinspect serve --model tiny [args]` on a free loopback port, with the station,
    operator and admin KEYS, one ORT thread and `env` on top; yielded once /readyz answers
    200, stopped on exit. Output goes to a file, not a pipe: a pipe nobody reads would block
    a server that logs every request."""
    port = free_port()
    env = {
        **os.environ,
        "CELLINSPECT_HOME": str(home),
        "CELLINSPECT_API_KEYS": ",".join(f"{r}:{k}" for r, k in KEYS.items()),
        "CELLINSPECT_INTRA_OP_THREADS": "1",
        **env,
    }
    log = home / f"server-{port}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cellinspect.cli", "serve", "--model", "tiny"]
            + ["--port", str(port), *args],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    server = ServerProcess(f"http://127.0.0.1:{port}", proc, log)
    try:
        for _ in range(300):
            try:
                if httpx.get(f"{server.url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode}: {server.output}")
            time.sleep(0.1)
        else:
            pytest.fail("server not ready within 30 s")
        yield server
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample of the /metrics text (0 when absent)."""
    wanted = name + "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"
    for line in text.splitlines():
        if line.startswith(wanted + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0
