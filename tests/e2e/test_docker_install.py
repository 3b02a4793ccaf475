"""What the Dockerfile runs, outside Docker (there is no engine here): its COPY list, its
`pip install`, its environment, its CMD and its HEALTHCHECK, read from the Dockerfile itself
so the test cannot drift from it. Slow: a fresh virtual environment from the package index.

    pytest -m slow tests/e2e/test_docker_install.py
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from servicekit import KEYS, png, publish_tiny

from cellinspect.models.store import ModelStore

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = (ROOT / "Dockerfile").read_text()

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def _instructions(name: str) -> list[str]:
    """Arguments of every `NAME ...` instruction, continuation lines joined."""
    joined = re.sub(r"\\\n\s*", " ", DOCKERFILE)
    return [m.group(1).strip() for m in re.finditer(rf"^{name}\s+(.+)$", joined, re.MULTILINE)]


def _env() -> dict[str, str]:
    env: dict[str, str] = {}
    for line in _instructions("ENV"):
        for key, value in re.findall(r"(\w+)=(\S+)", line):
            env[key] = value
    return env


def _json_list(instruction: str) -> list[str]:
    (arguments,) = _instructions(instruction)
    if instruction == "HEALTHCHECK":
        arguments = arguments.split("CMD", 1)[1]
    return json.loads(arguments)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def image_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """/app as the Dockerfile builds it, installed into a fresh venv; returns the venv."""
    app = tmp_path_factory.mktemp("app")
    ignore = shutil.ignore_patterns("__pycache__")
    for copy in _instructions("COPY"):  # WORKDIR is /app: targets are relative to it
        *sources, target = copy.split()
        for source in sources:
            src = ROOT / source
            dest = app / src.name if target in ("./", ".") else app / target
            if src.is_dir():
                shutil.copytree(src, dest, ignore=ignore)
            else:
                shutil.copy2(src, dest)
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    (install,) = [r for r in _instructions("RUN") if "pip install" in r]
    pip_args = shlex.split(install.split("&&")[0])[2:]  # after "pip install"
    subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", *pip_args],
        cwd=app,
        check=True,
        env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
    )
    return venv


def test_image_install_has_no_torch(image_venv: Path) -> None:
    probe = "import importlib.util as u; print(u.find_spec('torch') is None)"
    out = subprocess.run(
        [str(image_venv / "bin" / "python"), "-c", probe], capture_output=True, text=True
    )
    assert out.stdout.strip() == "True", "the serve extra pulled in torch"


def _start(venv: Path, home: Path, keys: str, port: int) -> subprocess.Popen[str]:
    env = {
        "PATH": f"{venv / 'bin'}:/usr/bin:/bin",
        **_env(),
        "CELLINSPECT_HOME": str(home),  # the /data volume
        "CELLINSPECT_API_KEYS": keys,
        "CELLINSPECT_MODELS": "tiny",
    }
    cmd = _json_list("CMD")
    cmd[cmd.index("--port") + 1] = str(port)
    cmd[cmd.index("--host") + 1] = "127.0.0.1"  # loopback only in tests
    return subprocess.Popen(
        cmd, env=env, cwd=home, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def test_image_command_serves_and_passes_its_healthcheck(image_venv: Path, tmp_path: Path) -> None:
    publish_tiny(ModelStore(tmp_path / "store"), tmp_path)
    port = _free_port()
    keys = ",".join(f"{role}:{key}" for role, key in KEYS.items())
    proc = _start(image_venv, tmp_path, keys, port)
    try:
        health = [
            c.replace(":8000", f":{port}") if isinstance(c, str) else c
            for c in _json_list("HEALTHCHECK")
        ]
        health[0] = str(image_venv / "bin" / "python")
        deadline = time.monotonic() + 90  # the HEALTHCHECK's start period
        while subprocess.run(health).returncode != 0:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            assert time.monotonic() < deadline, "healthcheck never passed"
            time.sleep(0.5)
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/inspect",
            data=png(255),
            headers={"Content-Type": "image/png", "X-API-Key": KEYS["station"]},
        )
        with urllib.request.urlopen(request, timeout=10) as reply:
            answer = json.load(reply)
        assert answer["verdict"] == "scrap" and answer["model"] == {"name": "tiny", "version": "1"}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_image_refuses_to_start_with_placeholder_keys(image_venv: Path, tmp_path: Path) -> None:
    proc = _start(image_venv, tmp_path, "station:changeme", _free_port())
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert "placeholder" in output and "changeme" not in output
