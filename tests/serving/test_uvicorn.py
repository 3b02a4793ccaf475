"""Every route once against a real `cellinspect serve` process (uvicorn on loopback)."""

from __future__ import annotations

import base64
import http.client
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


def _idle_then_closed(url: str, idle_s: float) -> bool:
    """Whether the server has closed a kept-alive connection after `idle_s` idle seconds."""
    conn = http.client.HTTPConnection(url.removeprefix("http://"), timeout=5)
    try:
        conn.request("GET", "/healthz")
        reply = conn.getresponse()
        assert reply.status == 200 and reply.read()  # the whole answer: nothing left unread
        time.sleep(idle_s)
        assert conn.sock is not None  # kept alive by http.client for the next request
        conn.sock.settimeout(0.5)
        try:
            return conn.sock.recv(1) == b""  # EOF: the server closed it
        except TimeoutError:
            return False  # still open, nothing to read
    finally:
        conn.close()


def test_idle_connections_are_kept_for_keep_alive_s(home: Path) -> None:
    with running_server(home, {"CELLINSPECT_KEEP_ALIVE_S": "1"}) as server:
        assert not _idle_then_closed(server.url, 0.2)
        assert _idle_then_closed(server.url, 2.0)


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
    """`serve --workers N` hands each process its share of the cores before the workers
    start: ORT threads, and decode threads (0, decoding on the loop, for one core's share);
    several workers go to the socket-per-worker supervisor, one to a plain uvicorn server."""
    import uvicorn

    from cellinspect.cli.serve import serve
    from cellinspect.serving import supervisor

    names = ("CELLINSPECT_INTRA_OP_THREADS", "CELLINSPECT_DECODE_WORKERS")
    for name in (*names, "PROMETHEUS_MULTIPROC_DIR"):
        monkeypatch.setenv(name, "")  # recorded, so whatever serve() sets is undone
        monkeypatch.delenv(name)
    if preset is not None:
        monkeypatch.setenv("CELLINSPECT_DECODE_WORKERS", preset)
    monkeypatch.setattr("os.sched_getaffinity", lambda _pid: set(range(cores)))
    seen: dict[str, object] = {}

    def record(how: str, config: uvicorn.Config) -> None:
        seen.update({name: os.environ.get(name) for name in names}, how=how, n=config.workers)

    class Server:
        started = True

        def __init__(self, config: uvicorn.Config) -> None:
            self.config = config

        def run(self) -> None:
            record("server", self.config)

    monkeypatch.setattr(uvicorn, "Server", Server)
    monkeypatch.setattr(supervisor, "run_workers", lambda config: record("supervisor", config))
    serve(model=None, host="127.0.0.1", port=free_port(), workers=workers)
    how = "supervisor" if workers > 1 else "server"
    assert seen == {names[0]: threads, names[1]: decoders, "how": how, "n": workers}


def listening_sockets(port: int) -> int:
    """TCP sockets listening on loopback `port`, from /proc/net/tcp."""
    rows = [line.split() for line in Path("/proc/net/tcp").read_text().splitlines()[1:]]
    return sum(1 for r in rows if r[3] == "0A" and int(r[1].rsplit(":", 1)[1], 16) == port)


def worker_pids(parent: int) -> set[int]:
    pids: set[int] = set()
    for children in Path(f"/proc/{parent}/task").glob("*/children"):
        pids |= {int(pid) for pid in children.read_text().split()}
    return {p for p in pids if b"spawn" in Path(f"/proc/{p}/cmdline").read_bytes()}


def wait_for(condition: object, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads Linux's /proc/net/tcp")
def test_each_worker_listens_on_its_own_socket_and_a_dead_one_is_replaced(home: Path) -> None:
    """`--workers 2`: two listening sockets on the port (SO_REUSEPORT), so the kernel spreads
    connections over the workers; a killed worker is replaced and listens again; a second
    service on the same port refuses to start instead of sharing it."""
    with running_server(home, {}, args=("--workers", "2")) as server:
        port = int(server.url.rsplit(":", 1)[1])
        wait_for(lambda: listening_sockets(port) == 2, 60, "both workers listening")
        workers = worker_pids(server.proc.pid)
        assert len(workers) == 2
        headers = {"Content-Type": "image/png", "X-API-Key": KEYS["station"]}

        def post(_: int) -> int:  # a new connection each time
            url = f"{server.url}/v1/inspect"
            return httpx.post(url, content=png(0), headers=headers).status_code

        victim = min(workers)
        os.kill(victim, 9)
        wait_for(lambda: victim not in worker_pids(server.proc.pid), 10, "the worker gone")
        with ThreadPoolExecutor(4) as pool:  # the survivor answers meanwhile
            assert list(pool.map(post, range(8))) == [200] * 8
        wait_for(lambda: len(worker_pids(server.proc.pid)) == 2, 30, "a replacement started")
        wait_for(lambda: listening_sockets(port) == 2, 60, "the replacement listening")
        with ThreadPoolExecutor(4) as pool:
            assert list(pool.map(post, range(8))) == [200] * 8

        second = subprocess.run(
            [sys.executable, "-m", "cellinspect.cli", "serve", "--model", "tiny"]
            + ["--port", str(port), "--workers", "2"],
            env={**os.environ, "CELLINSPECT_HOME": str(home)},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert second.returncode != 0
        assert f"cannot listen on 127.0.0.1:{port}" in second.stderr + second.stdout
        assert listening_sockets(port) == 2  # the first service is untouched
