"""The outermost layer: request counts on /metrics, and image requests refused at once
(before routing, key check or body) while the decode pool is full."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
import uvicorn
from fastapi.testclient import TestClient
from servicekit import auth, free_port, metric, png

from cellinspect.serving.engine import DecodePool
from cellinspect.serving.gate import RequestGate, is_image_route
from cellinspect.serving.metrics import ServiceMetrics


def test_every_answer_is_counted_by_route_template_and_status(client: TestClient) -> None:
    client.post(
        "/v1/inspect", content=png(0), headers={**auth("station"), "Content-Type": "image/png"}
    )
    client.post("/v1/inspect", content=png(0), headers={"Content-Type": "image/png"})  # no key
    client.get("/v1/inspections/" + "0" * 32, headers=auth("operator"))  # unknown id
    client.get("/no/such/route")
    text = client.get("/metrics").text
    assert metric(text, "cellinspect_requests_total", route="/v1/inspect", status="200") == 1
    assert metric(text, "cellinspect_requests_total", route="/v1/inspect", status="401") == 1
    # The template, not the id: one series per route, whatever ids are asked for.
    assert (
        metric(
            text,
            "cellinspect_requests_total",
            route="/v1/inspections/{inspection_id}",
            status="404",
        )
        == 1
    )
    assert metric(text, "cellinspect_requests_total", route="unmatched", status="404") == 1


@pytest.fixture
def full_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(DecodePool, "full", property(lambda self: True))


@pytest.mark.usefixtures("full_pool")
def test_a_full_pool_refuses_image_requests_before_routing(client: TestClient) -> None:
    for path in ("/v1/inspect", "/v1/inspect/batch", "/v2/models/tiny/infer"):
        # Not even the key is looked at: refusing must cost less than checking.
        reply = client.post(path, content=png(255), headers={"Content-Type": "image/png"})
        assert reply.status_code == 503, path
        assert reply.json()["code"] == "overloaded"
        assert int(reply.headers["Retry-After"]) >= 1
    # Everything else is served as usual while the line is busy.
    assert client.get("/v1/inspections", headers=auth("operator")).status_code == 200
    assert client.get("/readyz").status_code == 200
    text = client.get("/metrics").text
    assert metric(text, "cellinspect_rejected_total", reason="overloaded") == 3
    assert metric(text, "cellinspect_requests_total", route="gate", status="503") == 3


def test_image_routes() -> None:
    assert is_image_route("POST", "/v1/inspect")
    assert is_image_route("POST", "/v2/models/tiny/infer")
    assert not is_image_route("GET", "/v1/inspect")
    assert not is_image_route("POST", "/v1/inspect/frame")  # frames have their own bound
    assert not is_image_route("POST", "/v1/models/tiny/reload")


@pytest.fixture
def gated_server() -> Iterator[tuple[int, SimpleNamespace]]:
    """A real uvicorn (httptools, as `cellinspect serve` runs) with the gate in front of an app
    that answers 200 after reading the whole body; the pool's `full` is switchable."""
    decoder = SimpleNamespace(full=True, rejected=0, admitted=0, retry_after_s=lambda: 0.3)
    service = SimpleNamespace(decoder=decoder, metrics=ServiceMetrics())

    async def app(scope, receive, send):  # type: ignore[no-untyped-def]
        if scope["type"] != "http":
            return
        more = True
        while more:
            more = (await receive()).get("more_body", False)
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]}
        )
        await send({"type": "http.response.body", "body": b"ok"})

    port = free_port()
    config = uvicorn.Config(
        RequestGate(app, service), port=port, http="httptools", log_level="warning", lifespan="off"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield port, decoder
    finally:
        server.should_exit = True
        thread.join(10)


def _post(sock: socket.socket, body: bytes) -> bytes:
    sock.sendall(
        b"POST /v1/inspect HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(65536)
    top, rest = head.split(b"\r\n\r\n", 1)
    length = next(
        int(line.split(b":")[1])
        for line in top.split(b"\r\n")
        if line.lower().startswith(b"content-length")
    )
    while len(rest) < length:
        rest += sock.recv(65536)
    return top.split(b"\r\n")[0]


def test_an_unread_body_keeps_the_connection_usable(
    gated_server: tuple[int, SimpleNamespace],
) -> None:
    """The refusal leaves a 300 kB body unread; the next request on the same keep-alive
    connection must still be parsed from the right byte (no desync, no reset)."""
    port, decoder = gated_server
    body = bytes(range(256)) * 1200
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        assert _post(sock, body) == b"HTTP/1.1 503 Service Unavailable"
        decoder.full = False
        assert _post(sock, body) == b"HTTP/1.1 200 OK"
        decoder.full = True
        assert _post(sock, body[:10]) == b"HTTP/1.1 503 Service Unavailable"
    assert decoder.rejected == 2


def test_batch_counters_survive_a_reload_and_a_reused_batcher_id() -> None:
    """Counters only grow: a new batcher (a reload) adds to them, even at a reused id."""
    from cellinspect.serving.metrics import BatcherStats

    metrics = ServiceMetrics()
    stats = {"m": BatcherStats(queue_depth=3, items_run=10, batches_run=2, batcher=7)}
    metrics.watch_batchers(lambda: stats)
    metrics.sync()
    stats["m"] = BatcherStats(queue_depth=0, items_run=4, batches_run=1, batcher=7)  # new one
    text = metrics.exposition().decode()
    assert metric(text, "cellinspect_inferences_total", model="m") == 14
    assert metric(text, "cellinspect_executions_total", model="m") == 3
    assert metric(text, "cellinspect_queue_depth", model="m") == 0


def test_an_inline_pool_is_bounded_by_the_image_requests_in_progress() -> None:
    """A pool that decodes on the loop has nobody waiting inside it: the gate counts the
    image requests in progress, refuses the one past `max_waiting` at once, and frees the
    place when an answer has gone (also when the app fails)."""
    import asyncio

    async def scenario() -> None:
        pool = DecodePool(0, max_waiting=2)
        service = SimpleNamespace(decoder=pool, metrics=ServiceMetrics())
        release = asyncio.Event()

        async def app(scope, receive, send):  # type: ignore[no-untyped-def]
            if scope["path"] == "/boom":
                raise RuntimeError("app failed")
            if scope["path"] == "/v1/inspect":
                await release.wait()
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b""})

        gate = RequestGate(app, service)

        async def call(method: str, path: str) -> int:
            sent: list[dict] = []

            async def send(message: dict) -> None:
                sent.append(message)

            async def receive() -> dict:
                return {"type": "http.request", "body": b"", "more_body": False}

            scope = {"type": "http", "method": method, "path": path}
            await gate(scope, receive, send)  # type: ignore[arg-type]
            return sent[0]["status"]

        held = [asyncio.create_task(call("POST", "/v1/inspect")) for _ in range(2)]
        await asyncio.sleep(0.01)
        assert pool.admitted == 2 and pool.full
        assert await call("POST", "/v2/models/tiny/infer") == 503  # refused, not queued
        assert pool.rejected == 1 and pool.retry_after_s() >= 0.05
        assert await call("GET", "/v1/inspections") == 200  # only image routes are bounded
        release.set()
        assert await asyncio.gather(*held) == [200, 200]
        assert pool.admitted == 0 and not pool.full
        with pytest.raises(RuntimeError):
            await call("POST", "/boom")
        assert pool.admitted == 0
        pool.close()

    asyncio.run(scenario())
