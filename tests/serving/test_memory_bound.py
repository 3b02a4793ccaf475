"""Resident memory stays bounded while a real `cellinspect serve` process takes the hostile
corpus, bombs at the pixel limit included, from several clients at once.

The bound is derived from the settings (see `memory_budget`): each decode worker holds at
most one image's worst-case working set, frames are held while their request lasts, and
single images are dropped once their model input exists (engine.DecodedImage.image).

    pytest -m slow tests/serving/test_memory_bound.py -s    # prints peak RSS against the bound
"""

from __future__ import annotations

import base64
import itertools
import json
import math
import statistics
import struct
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from hostilekit import HostileImage, hostile_images, pil_bytes, png_zeros
from PIL import Image
from servicekit import KEYS, running_server

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(400),
    pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc (Linux)"),
]

MiB = 1 << 20
DEADLINE_S = 240.0  # the load loop stops here whatever round it is in


@dataclass(frozen=True)
class Limits:
    """The service settings the bound is derived from, and the load's concurrency."""

    max_pixels: int = 2_000_000
    max_frame_pixels: int = 2_000_000
    max_body_bytes: int = 1_000_000
    decode_workers: int = 2
    max_frames_in_flight: int = 2
    clients: int = 4
    rounds: int = 5

    def env(self) -> dict[str, str]:
        return {
            "CELLINSPECT_MAX_PIXELS": str(self.max_pixels),
            "CELLINSPECT_MAX_FRAME_PIXELS": str(self.max_frame_pixels),
            "CELLINSPECT_MAX_BODY_BYTES": str(self.max_body_bytes),
            "CELLINSPECT_DECODE_WORKERS": str(self.decode_workers),
            "CELLINSPECT_MAX_FRAMES_IN_FLIGHT": str(self.max_frames_in_flight),
        }


# Working set of one decode, per pixel: a 16-bit RGBA image (8 B) while preprocessing makes
# float32 RGB from it (12 B); measured 20.3 B/px with tracemalloc, 24 leaves a margin.
DECODE_BYTES_PER_PIXEL = 24
HELD_FRAME_BYTES_PER_PIXEL = 8  # a decoded 16-bit RGBA frame, held while it is tiled
BODY_COPIES = 4  # request body, multipart parts or base64-decoded items, the archive's bytes
SLACK_BYTES = 64 * MiB  # malloc arenas, ORT buffers for larger batches, SQLite page cache
# A leak grows RSS every round; what was seen here is a one-time step, then flat (over 9
# rounds: +33 to +43 MiB once, in round 2 or 3, in about half the runs; then +0.5 MiB per
# round). So the typical per-round growth (the median) after the first round is what must
# stay under this, over all the rounds.
LEAK_TOLERANCE = 24 * MiB


def memory_budget(limits: Limits) -> int:
    """Bytes the service may grow above its warmed-up RSS under this load."""
    # Decodes at once: one per worker; an inline pool (0) decodes on the event loop and
    # frames on one thread of their own, so two.
    decoding = (
        (limits.decode_workers or 2)
        * DECODE_BYTES_PER_PIXEL
        * max(limits.max_pixels, limits.max_frame_pixels)
    )
    frames = limits.max_frames_in_flight * HELD_FRAME_BYTES_PER_PIXEL * limits.max_frame_pixels
    bodies = limits.clients * BODY_COPIES * limits.max_body_bytes
    return decoding + frames + bodies + SLACK_BYTES


def limit_bombs(max_pixels: int) -> list[HostileImage]:
    """Valid images right at the pixel limit in their heaviest layouts: small files, big pixels."""
    side = math.isqrt(max_pixels)
    zeros = Image.new("RGB", (side, side))
    return [
        HostileImage("png-rgba16-at-limit", png_zeros(side, side, color_type=6, depth=16)),
        HostileImage(
            "png-gray16-interlaced-at-limit",
            png_zeros(side, side, color_type=0, depth=16, interlaced=True),
        ),
        HostileImage("jpeg-progressive-at-limit", pil_bytes(zeros, "JPEG", progressive=True)),
    ]


def shed(name: str, response: httpx.Response) -> bool:
    """A frame refused because max_frames_in_flight were in progress: the bound at work."""
    return (
        name.startswith("/v1/inspect/frame ")
        and response.status_code == 503
        and response.json().get("code") == "overloaded"
    )


def status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


class RssSampler:
    """The highest VmRSS seen, sampled every 10 ms in a thread."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak_kib = pid, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            try:
                self.peak_kib = max(self.peak_kib, status_kib(self.pid, "VmRSS"))
            except (OSError, KeyError):
                return

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


@pytest.fixture
def server(home: Path) -> Iterator[tuple[str, int]]:
    env = {
        **Limits().env(),
        "CELLINSPECT_ARCHIVE_PASS_SAMPLE_RATE": "0",
        "CELLINSPECT_MAX_DELAY_MS": "1",
        # Room and time for every request to be decoded, so each bomb costs its full
        # memory: no 503 from admission control (frames queue 32 tiles each; a batch of 32
        # images at the pixel limit takes seconds on 2 workers). Waiting requests hold
        # only their bytes, which the bound counts.
        "CELLINSPECT_QUEUE_SIZE": "256",
        "CELLINSPECT_DECODE_QUEUE_SIZE": "256",
        "CELLINSPECT_DEADLINE_MS": "60000",
    }
    with running_server(home, env) as server:
        yield server.url, server.proc.pid


def v2_binary(data: bytes) -> tuple[bytes, dict[str, str]]:
    tensor = struct.pack("<I", len(data)) + data
    head = {"inputs": [{"name": "raw", "datatype": "BYTES", "shape": [1]}]}
    head["inputs"][0]["parameters"] = {"binary_data_size": len(tensor)}
    header = json.dumps(head).encode()
    return header + tensor, {"Inference-Header-Content-Length": str(len(header))}


def requests_for(corpus: list[HostileImage], bombs: list[HostileImage], body_limit: int):
    """(description, send(client) -> response) for one round over every image route."""
    raw = {"Content-Type": "application/octet-stream", "X-API-Key": KEYS["station"]}
    station = {"X-API-Key": KEYS["station"]}
    sends: list[tuple[str, Callable[[httpx.Client], httpx.Response]]] = []
    for case in [*corpus, *bombs]:
        for route in ("/v1/inspect", "/v1/inspect/frame"):
            sends.append(
                (
                    f"{route} {case.name}",
                    lambda c, d=case.data, r=route: c.post(r, content=d, headers=raw),
                )
            )
        body, extra = v2_binary(case.data)
        sends.append(
            (
                f"v2 {case.name}",
                lambda c, b=body, h=extra: c.post(
                    "/v2/models/tiny/infer", content=b, headers={**station, **h}
                ),
            )
        )
    for bomb in bombs:
        # As many copies as fit one batch: each was a full decoded image held to the end.
        count = min(32, (body_limit - 4096) // (len(bomb.data) + 200))
        files = [("images", (f"{i}.png", bomb.data, "image/png")) for i in range(count)]
        sends.append(
            (
                f"batch {count}x {bomb.name}",
                lambda c, f=files: c.post("/v1/inspect/batch", files=f, headers=station),
            )
        )
        items = [base64.b64encode(bomb.data).decode()] * max(1, count // 2)
        request = {
            "inputs": [{"name": "raw", "datatype": "BYTES", "shape": [len(items)], "data": items}]
        }
        sends.append(
            (
                f"v2 {len(items)}x {bomb.name}",
                lambda c, r=request: c.post("/v2/models/tiny/infer", json=r, headers=station),
            )
        )
    return sends


def test_resident_memory_stays_under_the_bound_derived_from_the_settings(
    server: tuple[str, int],
) -> None:
    url, pid = server
    limits = Limits()
    corpus = hostile_images(max_pixels=limits.max_pixels, max_body_bytes=limits.max_body_bytes)
    bombs = limit_bombs(limits.max_pixels)
    sends = requests_for(corpus, bombs, limits.max_body_bytes)
    local = threading.local()

    def client() -> httpx.Client:
        if not hasattr(local, "client"):
            local.client = httpx.Client(base_url=url, timeout=60)
        return local.client

    with httpx.Client(base_url=url, timeout=60) as warm:  # ORT, SQLite and the pools warmed
        for _, send in sends[:30]:
            send(warm)
    time.sleep(0.5)
    baseline = status_kib(pid, "VmRSS") * 1024
    try:  # "5" resets VmHWM to the current RSS (Linux >= 4.0), so the peak is the load's
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        hwm_reset = True
    except OSError:
        hwm_reset = False
    errors: dict[str, str] = {}
    shed_frames = 0
    started = time.monotonic()
    rounds = 0
    after: list[int] = []  # RSS at the end of each round
    with RssSampler(pid) as sampler, ThreadPoolExecutor(limits.clients) as pool:
        while rounds < limits.rounds and time.monotonic() - started < DEADLINE_S:
            for (name, _), r in zip(
                sends, pool.map(lambda item: item[1](client()), sends), strict=True
            ):
                if shed(name, r):
                    shed_frames += 1
                elif r.status_code >= 500:
                    errors[name] = f"{r.status_code} {r.text[:200]}"
            rounds += 1
            after.append(status_kib(pid, "VmRSS") * 1024)
    peak = max(sampler.peak_kib, status_kib(pid, "VmHWM") if hwm_reset else 0) * 1024
    budget = memory_budget(limits)
    print(
        f"\n{rounds} rounds x {len(sends)} requests in {time.monotonic() - started:.0f} s;"
        f" RSS warmed {baseline / MiB:.0f} MiB, peak {peak / MiB:.0f} MiB"
        f" (+{(peak - baseline) / MiB:.0f} MiB), after each round"
        f" {', '.join(f'{a / MiB:.0f}' for a in after)} MiB; {shed_frames} frames shed (503);"
        f" bound {(baseline + budget) / MiB:.0f} MiB (+{budget / MiB:.0f} MiB)"
    )
    assert rounds >= 2, f"only {rounds} round(s) within {DEADLINE_S:.0f} s"
    assert errors == {}
    assert peak <= baseline + budget, (
        f"peak RSS {peak / MiB:.0f} MiB over the bound {(baseline + budget) / MiB:.0f} MiB"
    )
    # Later rounds repeat the first: what they keep adding would be a leak.
    typical = statistics.median(b - a for a, b in itertools.pairwise(after))
    assert typical * (rounds - 1) <= LEAK_TOLERANCE, (
        f"RSS grows {typical / MiB:.1f} MiB per round (median), after each round: "
        + ", ".join(f"{a / MiB:.0f}" for a in after)
        + " MiB"
    )
    assert httpx.get(f"{url}/readyz", timeout=5).status_code == 200
