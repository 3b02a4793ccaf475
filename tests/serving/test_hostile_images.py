"""Hostile images through every route that takes images: an answer or a precise 4xx, never a
5xx, never a hang (tests/hostilekit.py builds the corpus)."""

from __future__ import annotations

import base64
import json
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from hostilekit import DECODE_REFUSALS, HostileImage, hostile_images, png_zeros
from servicekit import auth, make_settings, png

from cellinspect.serving import engine as engine_module
from cellinspect.serving.app import create_app
from cellinspect.serving.batcher import Overloaded
from cellinspect.serving.engine import DecodePool
from cellinspect.serving.settings import Settings

pytestmark = [
    pytest.mark.timeout(120),
    # Pillow warns about the corrupt EXIF and TIFF tags the mutants carry, as it should.
    pytest.mark.filterwarnings("ignore::UserWarning:PIL.TiffImagePlugin"),
]

MAX_PIXELS = 1_000_000
MAX_BODY = 1_000_000  # above the fixtures' 200 kB: the chunk flood needs 840 kB
SLOWEST_ANSWER_S = 5.0  # bombs are refused from their skeleton: far below this


@pytest.fixture(scope="module")
def corpus() -> list[HostileImage]:
    return hostile_images(max_pixels=MAX_PIXELS, max_body_bytes=MAX_BODY)


def hostile_settings(home: Path) -> Settings:
    # Frames get the single-image pixel limit: the tiny model tiles them at 8x8, so a
    # large frame that is accepted costs thousands of inferences.
    return make_settings(
        home, max_body_bytes=MAX_BODY, max_pixels=MAX_PIXELS, max_frame_pixels=MAX_PIXELS
    )


@pytest.fixture
def hostile(home: Path) -> Iterator[TestClient]:
    with TestClient(create_app(hostile_settings(home))) as c:
        yield c


def _answer(response) -> dict[str, object]:  # noqa: ANN001 - httpx.Response
    try:
        body = response.json()
    except ValueError:
        return {"raw": response.text[:200]}
    return body if isinstance(body, dict) else {"raw": body}


def run_corpus(corpus: list[HostileImage], send) -> list[str]:  # noqa: ANN001 - a callable
    """Send every case; the list of cases whose answer is wrong, slow or a 5xx."""
    problems = []
    for case in corpus:
        started = time.perf_counter()
        response = send(case)
        elapsed = time.perf_counter() - started
        if response.status_code >= 500:
            problems.append(f"{case.name}: {response.status_code} {response.text[:300]}")
            continue
        problem = case.check(response.status_code, _answer(response))
        if problem:
            problems.append(problem)
        if elapsed > SLOWEST_ANSWER_S:
            problems.append(f"{case.name}: answered in {elapsed:.1f} s")
    return problems


def test_corpus_covers_the_promised_families(corpus: list[HostileImage]) -> None:
    families = {c.family for c in corpus}
    for family in ("valid", "empty", "truncation", "magic", "dimensions", "bomb", "polyglot"):
        assert family in families
    names = {c.name for c in corpus}
    for name in ("png-gray16", "jpeg-cmyk", "png-palette", "png-la", "png-rgba8"):
        assert name in names
    for name in ("jpeg-exif-rotated", "png-apng-2-frames", "tiff-multipage", "bmp-rgb"):
        assert name in names
    assert sum(c.family == "mutation" for c in corpus) >= 50
    assert all(0 < len(c.data) <= MAX_BODY for c in corpus if c.name != "zero-length")


def test_raw_bodies_on_inspect(hostile: TestClient, corpus: list[HostileImage]) -> None:
    def send(case: HostileImage):  # noqa: ANN202
        headers = {"Content-Type": "application/octet-stream", **auth("station")}
        return hostile.post("/v1/inspect", content=case.data, headers=headers)

    assert run_corpus(corpus, send) == []
    assert (
        hostile.post(
            "/v1/inspect", content=png(0), headers={"Content-Type": "image/png", **auth("station")}
        ).status_code
        == 200
    )


def test_multipart_files_on_inspect_whatever_their_name_and_type(
    hostile: TestClient, corpus: list[HostileImage]
) -> None:
    # A PNG named .jpg and typed image/jpeg is still a PNG: the bytes decide, never the label.
    def send(case: HostileImage):  # noqa: ANN202
        files = {"image": ("cell.jpg", case.data, "image/jpeg")}
        return hostile.post("/v1/inspect", files=files, headers=auth("station"))

    assert run_corpus(corpus, send) == []


@pytest.mark.parametrize("claimed", ["image/png", "image/jpeg", "image/tiff", "image/bmp"])
def test_claimed_content_type_does_not_decide_the_decoder(
    hostile: TestClient, corpus: list[HostileImage], claimed: str
) -> None:
    cases = [c for c in corpus if c.family in ("valid", "magic", "polyglot")]

    def send(case: HostileImage):  # noqa: ANN202
        headers = {"Content-Type": claimed, **auth("station")}
        return hostile.post("/v1/inspect", content=case.data, headers=headers)

    assert run_corpus(cases, send) == []


def test_every_case_in_batches_gets_its_own_answer(
    hostile: TestClient, corpus: list[HostileImage]
) -> None:
    problems, i = [], 0
    while i < len(corpus):
        # As many cases as fit one request's body and image limits.
        group, size = [], 0
        while (
            i < len(corpus) and len(group) < 32 and size + len(corpus[i].data) < MAX_BODY - 64_000
        ):
            group.append(corpus[i])
            size += len(corpus[i].data)
            i += 1
        if not group:  # one case alone is near the limit: send it by itself
            group, i = [corpus[i]], i + 1
        files = [("images", (c.name, c.data, "application/octet-stream")) for c in group]
        r = hostile.post("/v1/inspect/batch", files=files, headers=auth("station"))
        if r.status_code != 200:
            problems.append(f"batch of {[c.name for c in group]}: {r.status_code} {r.text[:300]}")
            continue
        results = r.json()["results"]
        assert [x["filename"] for x in results] == [c.name for c in group]
        for case, item in zip(group, results, strict=True):
            if item["error"] is None:
                problem = case.check(200, {})
            else:
                status = DECODE_REFUSALS.get(item["error"]["code"], 0)
                problem = case.check(status, item["error"])
            if problem:
                problems.append(problem)
    assert problems == []


def test_frames_route(hostile: TestClient, corpus: list[HostileImage]) -> None:
    def send(case: HostileImage):  # noqa: ANN202
        headers = {"Content-Type": "application/octet-stream", **auth("station")}
        return hostile.post("/v1/inspect/frame", content=case.data, headers=headers)

    assert run_corpus(corpus, send) == []


def test_v2_bytes_input_binary_and_base64(hostile: TestClient, corpus: list[HostileImage]) -> None:
    def binary(case: HostileImage):  # noqa: ANN202
        tensor = struct.pack("<I", len(case.data)) + case.data
        header = json.dumps(
            {
                "inputs": [
                    {
                        "name": "raw",
                        "datatype": "BYTES",
                        "shape": [1],
                        "parameters": {"binary_data_size": len(tensor)},
                    }
                ]
            }
        ).encode()
        return hostile.post(
            "/v2/models/tiny/infer",
            content=header + tensor,
            headers={"Inference-Header-Content-Length": str(len(header)), **auth("station")},
        )

    def base64_json(case: HostileImage):  # noqa: ANN202
        data = [base64.b64encode(case.data).decode()]
        request = {"inputs": [{"name": "raw", "datatype": "BYTES", "shape": [1], "data": data}]}
        return hostile.post("/v2/models/tiny/infer", json=request, headers=auth("station"))

    assert run_corpus(corpus, binary) == []
    small = [c for c in corpus if len(c.data) * 4 // 3 < MAX_BODY - 1000]
    assert run_corpus(small, base64_json) == []


def test_service_still_answers_after_the_corpus(
    hostile: TestClient, corpus: list[HostileImage]
) -> None:
    headers = {"Content-Type": "application/octet-stream", **auth("station")}
    for case in corpus:
        hostile.post("/v1/inspect", content=case.data, headers=headers)
    r = hostile.post("/v1/inspect", content=png(255), headers=headers)
    assert r.status_code == 200 and r.json()["verdict"] == "scrap"
    assert hostile.get("/readyz").json()["ready"] is True


def test_png_decompression_bomb_is_refused_fast_and_named(
    hostile: TestClient, corpus: list[HostileImage]
) -> None:
    bomb = next(c for c in corpus if c.name == "png-idat-bomb")
    assert len(bomb.data) < 150_000  # 100 MiB of zeros behind a 16x16 image
    started = time.perf_counter()
    r = hostile.post(
        "/v1/inspect",
        content=bomb.data,
        headers={"Content-Type": "image/png", **auth("station")},
    )
    assert time.perf_counter() - started < 2.0
    assert r.status_code == 422 and r.json()["code"] == "decode_error"
    assert "decompression bomb" in r.json()["detail"]


def test_polyglot_png_with_zip_is_refused_and_not_archived(
    home: Path, corpus: list[HostileImage]
) -> None:
    polyglot = next(c for c in corpus if c.name == "png-plus-zip")
    settings = make_settings(home, archive_pass_sample_rate=1.0)  # would archive every image
    with TestClient(create_app(settings)) as c:
        r = c.post(
            "/v1/inspect",
            content=polyglot.data,
            headers={"Content-Type": "image/png", **auth("station")},
        )
        assert r.status_code == 422
        assert "bytes after its IEND chunk" in r.json()["detail"]
        assert c.get("/v1/inspections", headers=auth("operator")).json()["total"] == 0
    assert not list(settings.archive_path.rglob("*.png"))


def test_single_images_keep_only_their_model_input_while_waiting(
    hostile: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Without a shadow candidate that preprocesses differently, nothing needs the decoded
    # pixels after preprocessing: a bomb at the pixel limit must not be held to the answer.
    kept: list[bool] = []
    decode = engine_module._decode_and_preprocess

    def spy(data: bytes, spec: object, max_pixels: int, keep_image: bool) -> object:
        kept.append(keep_image)
        decoded = decode(data, spec, max_pixels, keep_image)
        assert decoded.image is None
        return decoded

    # Both the decode pool and a lone request's one-hop path decode through this.
    monkeypatch.setattr(engine_module, "_decode_and_preprocess", spy)
    bomb = png_zeros(1000, 1000, color_type=6, depth=16)  # 8 MB of pixels in 9 kB
    headers = {"Content-Type": "image/png", **auth("station")}
    assert hostile.post("/v1/inspect", content=bomb, headers=headers).status_code == 200
    assert kept == [False]


def test_frames_are_decoded_in_the_pool_and_their_tile_count_is_bounded(
    hostile: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    decoder = hostile.app.state.service.decoder
    runs: list[str] = []
    run = decoder.run

    async def spy(fn, *args):  # noqa: ANN001, ANN202
        runs.append(fn.__name__)
        return await run(fn, *args)

    monkeypatch.setattr(decoder, "run", spy)
    # 1000x1000 in the tiny model's 8x8 tiles at overlap 0.5: 249^2 = 62,001 inferences.
    frame = png_zeros(1000, 1000)
    started = time.perf_counter()
    r = hostile.post(
        "/v1/inspect/frame",
        content=frame,
        headers={"Content-Type": "image/png", **auth("station")},
    )
    assert time.perf_counter() - started < 5.0
    assert r.status_code == 422 and r.json()["code"] == "bad_tiling"
    assert "62,001 tiles, over the limit of 20,000" in r.json()["detail"]
    assert runs == ["_decode_frame"]


def test_frames_in_progress_are_bounded() -> None:
    # A decoded frame (up to max_frame_pixels x 8 bytes) lives until its tiles are answered.
    pool = DecodePool(1, max_frames=2)
    with (
        pool.frame_slot(),
        pool.frame_slot(),
        pytest.raises(Overloaded, match="2 frames in progress"),
        pool.frame_slot(),
    ):
        pass
    with pool.frame_slot():  # released again
        assert pool.rejected == 1
    pool.close()
