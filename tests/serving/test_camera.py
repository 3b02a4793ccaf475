"""The simulated line camera as a client: one kept-alive connection, retries with the same key."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from cellinspect.cli.serve import camera

ANSWER = {
    "verdict": "pass",
    "label": "ok",
    "defect_probability": 0.01,
    "timings": {"total_ms": 1.0},
}


class _Stub(BaseHTTPRequestHandler):
    """Answers POST /v1/inspect like the service; drops the connection of the request
    numbered `drop` (counting from 0) without an answer, as a restarting server would."""

    protocol_version = "HTTP/1.1"  # keep-alive
    seen: list[tuple[int, str]]
    drop: int

    def do_POST(self) -> None:  # noqa: N802 (the stdlib's name)
        self.rfile.read(int(self.headers["Content-Length"]))
        assert self.path.startswith("/v1/inspect?line_id=l+1&station_id=st")  # encoded
        self.seen.append((self.client_address[1], self.headers["Idempotency-Key"]))
        if len(self.seen) - 1 == self.drop:
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return
        body = json.dumps(ANSWER).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def run_camera(url: str, **overrides: object) -> None:
    """`cellinspect camera` in-process: a few small tiles sent quickly, `overrides` on top."""
    args: dict[str, object] = {
        "url": url,
        "rate": 100.0,
        "count": 1,
        "line_id": "l",
        "station_id": "st",
        "api_key": None,
        "seed": 1,
        "size": 32,
        "retries": 1,
    }
    camera(**{**args, **overrides})


@pytest.fixture
def stub() -> Iterator[tuple[str, list[tuple[int, str]]]]:
    seen: list[tuple[int, str]] = []
    handler = type("Handler", (_Stub,), {"seen": seen, "drop": 1})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()


def test_camera_keeps_its_connection_and_retries_a_lost_one_with_the_same_key(
    stub: tuple[str, list[tuple[int, str]]], capsys: pytest.CaptureFixture[str]
) -> None:
    url, seen = stub
    run_camera(url, count=3, line_id="l 1", retries=2)
    ports = [port for port, _ in seen]
    keys = [key for _, key in seen]
    # Image 0 and image 1's first try on one connection; it is lost, so image 1 goes
    # again on a new one with the same key, and image 2 follows on that one.
    assert len(seen) == 4
    assert ports[0] == ports[1] != ports[2] == ports[3]
    assert keys[1] == keys[2] and len({keys[0], keys[1], keys[3]}) == 3
    assert "sent 3" in capsys.readouterr().out


def test_camera_names_an_unreachable_service() -> None:
    with socket.socket() as s:  # a port with nothing listening on it
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ValueError, match=f"127.0.0.1:{port}: service not reachable"):
        run_camera(f"http://127.0.0.1:{port}")


def test_camera_refuses_a_url_that_is_not_http() -> None:
    with pytest.raises(ValueError, match="not an http:// or https:// URL"):
        run_camera("ftp://example", retries=0)
