"""Every route once against a real `cellinspect serve` process (uvicorn on loopback)."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from servicekit import KEYS, free_port, metric, png, running_server


@pytest.fixture
def server(home: Path) -> Iterator[str]:
    with running_server(home, {"CELLINSPECT_MODE": "production"}) as server:
        yield server.url
    for key in KEYS.values():
        assert key not in server.output, "an API key appeared in the server log"


def test_every_route_answers_through_uvicorn(server: str) -> None:
    st, op, ad = ({"X-API-Key": KEYS[r]} for r in ("station", "operator", "admin"))
    with httpx.Client(base_url=server, timeout=10) as c:
        assert c.get("/healthz").status_code == 200
        assert c.get("/readyz").json()["ready"] is True
        r = c.post("/v1/inspect", content=png(255), headers={"Content-Type": "image/png", **st})
        assert r.status_code == 200 and r.json()["verdict"] == "scrap"
        iid = r.json()["inspection_id"]
        files = [
            ("images", ("a.png", png(0), "image/png")),
            ("images", ("b.png", png(255), "image/png")),
        ]
        assert len(c.post("/v1/inspect/batch", files=files, headers=st).json()["results"]) == 2
        assert c.get("/v1/inspections", headers=op).json()["total"] == 3
        assert c.get(f"/v1/inspections/{iid}", headers=op).json()["id"] == iid
        assert c.get(f"/v1/inspections/{iid}/image", headers=op).content == png(255)
        assert c.get("/v1/models", headers=st).json()[0]["name"] == "tiny"
        assert (
            c.post("/v1/models/tiny/reload", json={"version": "2"}, headers=ad).json()["version"]
            == "2"
        )
        assert (
            c.post("/v1/models/tiny/promote", json={"version": "2"}, headers=ad).status_code == 200
        )
        assert c.get("/v2/health/live").json() == {"live": True}
        assert c.get("/v2/health/ready").json() == {"ready": True}
        assert c.get("/v2/models/tiny", headers=st).json()["name"] == "tiny"
        assert c.get("/v2/models/tiny/ready", headers=st).json()["ready"] is True
        req = {
            "inputs": [
                {
                    "name": "raw",
                    "datatype": "BYTES",
                    "shape": [1],
                    "data": [base64.b64encode(png(0)).decode()],
                }
            ]
        }
        assert c.post("/v2/models/tiny/infer", json=req, headers=st).status_code == 200
        assert "cellinspect_inferences_total" in c.get("/metrics").text
        assert c.get("/openapi.json").status_code == 404  # production: no map of routes
        assert (
            c.post("/v1/inspect", content=png(0), headers={"Content-Type": "image/png"}).status_code
            == 401
        )


def test_production_mode_refuses_placeholder_keys(home: Path) -> None:
    env = {
        **os.environ,
        "CELLINSPECT_HOME": str(home),
        "CELLINSPECT_MODE": "production",
        "CELLINSPECT_API_KEYS": "station:changeme",
    }
    r = subprocess.run(
        [sys.executable, "-m", "cellinspect.cli", "serve", "--model", "tiny"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2
    assert "placeholder" in r.stderr and "changeme" not in r.stderr


def test_camera_posts_images_with_an_idempotency_key_each(server: str, home: Path) -> None:
    """The simulated line camera (the README demo's last step) against a real server."""
    env = {**os.environ, "CELLINSPECT_CAMERA_KEY": KEYS["station"], "COLUMNS": "200"}
    out = subprocess.run(
        [sys.executable, "-m", "cellinspect.cli", "camera", "--url", server]
        + ["--count", "3", "--rate", "50", "--station-id", "st-7"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("verdict=") == 3 and "sent 3" in out.stdout
    with httpx.Client(base_url=server, timeout=10) as c:
        items = c.get("/v1/inspections", headers={"X-API-Key": KEYS["operator"]}).json()["items"]
    keys = sorted(item["idempotency_key"] for item in items)
    assert len(set(keys)) == 3
    assert all(k.startswith(f"st-7:cell-123-0000{i}:") for i, k in enumerate(keys))


def test_two_workers_share_one_metrics_view_and_follow_a_promotion(
    home: Path, tmp_path: Path
) -> None:
    """`--workers 2`: every scrape counts both workers' requests, and a promotion through
    one worker's API reaches the other through the store."""
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    env = {"CELLINSPECT_FOLLOW_STORE_S": "0.2", "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
    st, op, ad = ({"X-API-Key": KEYS[r]} for r in ("station", "operator", "admin"))
    with running_server(home, env, args=("--workers", "2")) as server:

        def post(_: int) -> int:  # a new connection each time: the kernel spreads them
            headers = {"Content-Type": "image/png", **st}
            return httpx.post(
                f"{server.url}/v1/inspect", content=png(255), headers=headers
            ).status_code

        # The health check passes once one worker is up; the other may still be loading
        # its model and take no connection yet, so send rounds until both have answered
        # (one counter file each).
        sent, deadline = 0, time.monotonic() + 60
        with ThreadPoolExecutor(8) as pool:
            while len(list(metrics_dir.glob("counter_*.db"))) < 2:
                assert time.monotonic() < deadline, "the second worker never answered"
                assert list(pool.map(post, range(40))) == [200] * 40
                sent += 40
        # Any scrape, whichever worker serves it, sums both workers' counts.
        time.sleep(1.5)  # a worker copies its batchers' counters every second
        for _ in range(6):
            text = httpx.get(f"{server.url}/metrics").text
            assert (
                metric(text, "cellinspect_requests_total", route="/v1/inspect", status="200")
                == sent
            )
            assert metric(text, "cellinspect_inferences_total", model="tiny") == sent
        promoted = httpx.post(
            f"{server.url}/v1/models/tiny/promote", json={"version": "2"}, headers=ad
        )
        assert promoted.status_code == 200, promoted.text
        time.sleep(1.5)  # the other worker looks at the store every 0.2 s
        for _ in range(8):
            served = httpx.get(f"{server.url}/v1/models", headers=op).json()
            assert [m["version"] for m in served] == ["2"], served
        text = httpx.get(f"{server.url}/metrics").text
        assert metric(text, "cellinspect_model_info", model="tiny", version="2") == 1
        assert metric(text, "cellinspect_model_info", model="tiny", version="1") == 0


def test_demo_serves_and_runs_the_camera(
    home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The README demo's last step (`cellinspect demo` without --no-serve), on tiny@1."""
    from cellinspect.cli.pipeline import serve_with_camera

    monkeypatch.setenv("CELLINSPECT_HOME", str(home))
    monkeypatch.setenv("CELLINSPECT_INTRA_OP_THREADS", "1")
    serve_with_camera("tiny@1", free_port(), keep_serving=False)
    out = capsys.readouterr().out
    assert "service up at" in out
    assert out.count("verdict=") == 20 and "sent 20" in out


@pytest.mark.parametrize(
    ("cores", "workers", "preset", "threads", "decoders"),
    [
        (2, 2, None, "1", "0"),  # one core each: decode on the loop
        (8, 2, None, "2", "4"),
        (4, 1, None, None, None),  # one process keeps its own defaults
        (2, 2, "3", "1", "3"),  # an explicit setting wins
    ],
)
def test_several_workers_split_the_threads_between_them(
    monkeypatch: pytest.MonkeyPatch,
    cores: int,
    workers: int,
    preset: str | None,
    threads: str | None,
    decoders: str | None,
) -> None:
    """`serve --workers N` hands each process its share of the cores before uvicorn starts
    them: ORT threads, and decode threads (0, decoding on the loop, for one core's share)."""
    import uvicorn

    from cellinspect.cli.serve import serve

    names = ("CELLINSPECT_INTRA_OP_THREADS", "CELLINSPECT_DECODE_WORKERS")
    for name in (*names, "PROMETHEUS_MULTIPROC_DIR"):
        monkeypatch.setenv(name, "")  # recorded, so whatever serve() sets is undone
        monkeypatch.delenv(name)
    if preset is not None:
        monkeypatch.setenv("CELLINSPECT_DECODE_WORKERS", preset)
    monkeypatch.setattr("os.sched_getaffinity", lambda _pid: set(range(cores)))
    seen: dict[str, object] = {}

    def run(*_args: object, **kwargs: object) -> None:
        seen.update({name: os.environ.get(name) for name in names}, workers=kwargs["workers"])

    monkeypatch.setattr(uvicorn, "run", run)
    serve(model=None, host="127.0.0.1", port=free_port(), workers=workers)
    assert seen == {names[0]: threads, names[1]: decoders, "workers": workers}
