"""Container checks: the work a hostile file can cause is bounded, real files pass."""

from __future__ import annotations

import io
import time
import zlib

import numpy as np
import pytest
from hostilekit import (
    jpeg_segments,
    pil_bytes,
    png_chunk,
    png_scanline_bytes,
    png_zeros,
    tiff,
)
from PIL import Image

from cellinspect.datasets import containers
from cellinspect.datasets.containers import (
    MAX_JPEG_SCANS,
    MAX_PNG_CHUNKS,
    check_jpeg,
    check_png,
    check_png_inflation,
    tiff_buffer_pixels,
)
from cellinspect.datasets.decode import decode_image, encode_png
from cellinspect.datasets.errors import ImageDecodeError, ImageTooLargeError, TruncatedImageError


def noise(shape: tuple[int, ...]) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)


@pytest.fixture(params=["isal", "zlib"])
def inflater(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """The PNG inflate check with ISA-L (the default) and with zlib (where ISA-L has no
    wheel): they hand out buffered output differently, and both must count all of it."""
    if request.param == "zlib":
        monkeypatch.setattr(containers, "_inflate", zlib)
    else:
        pytest.importorskip("isal")


@pytest.mark.parametrize("interlaced", [False, True])
@pytest.mark.parametrize(
    ("color_type", "depth", "samples"), [(0, 1, 1), (0, 16, 1), (2, 8, 3), (3, 4, 1), (6, 16, 4)]
)
def test_png_row_bytes_match_what_the_stream_inflates_to(
    interlaced: bool, color_type: int, depth: int, samples: int
) -> None:
    # Odd sizes exercise every Adam7 pass, including empty ones.
    for width, height in [(1, 1), (3, 2), (37, 29), (1001, 7)]:
        data = png_zeros(width, height, color_type=color_type, depth=depth, interlaced=interlaced)
        layout = check_png(data)
        idat = b"".join(data[a:b] for a, b in layout.idat)
        expected = png_scanline_bytes(
            width, height, samples=samples, depth=depth, interlaced=interlaced
        )
        assert layout.raw_bytes == expected == len(zlib.decompress(idat))


@pytest.mark.usefixtures("inflater")
def test_large_interlaced_png_is_not_mistaken_for_a_bomb() -> None:
    # 8 MB of rows: an error of even 1 % in the Adam7 sum would exceed the 64 KiB slack.
    data = png_zeros(1000, 1000, color_type=6, depth=16, interlaced=True)
    assert decode_image(data, max_pixels=1_000_000).shape == (1000, 1000, 4)


@pytest.mark.usefixtures("inflater")
def test_png_split_into_many_idat_chunks_decodes() -> None:
    pixels = noise((64, 64))
    data = encode_png(pixels)
    layout = check_png(data)
    stream = b"".join(data[a:b] for a, b in layout.idat)
    chunks = b"".join(png_chunk(b"IDAT", stream[i : i + 7]) for i in range(0, len(stream), 7))
    first_idat = layout.idat[0][0] - 8
    rebuilt = data[:first_idat] + chunks + png_chunk(b"IEND", b"")
    np.testing.assert_array_equal(decode_image(rebuilt), pixels)


@pytest.mark.usefixtures("inflater")
def test_png_bomb_is_refused_before_libpng_inflates_it() -> None:
    data = png_zeros(16, 16, extra_zeros=200 << 20)
    assert len(data) < 250_000
    started = time.perf_counter()
    with pytest.raises(ImageDecodeError, match=r"inflates past the 272 bytes that 16x16"):
        decode_image(data, source="bomb.png")
    assert time.perf_counter() - started < 1.0  # libpng alone took 0.5 s per 200 MB


@pytest.mark.usefixtures("inflater")
def test_png_with_corrupt_stream_is_a_decode_error() -> None:
    data = png_zeros(16, 16)
    layout = check_png(data)
    start = layout.idat[0][0]
    broken = data[:start] + b"\xff" * 8 + data[start + 8 :]
    with pytest.raises(ImageDecodeError, match="compressed rows are corrupt"):
        check_png_inflation(broken, check_png(broken))


def test_png_chunk_count_is_bounded() -> None:
    flood = png_zeros(4, 4, chunks=[png_chunk(b"aaAa", b"")] * MAX_PNG_CHUNKS)
    started = time.perf_counter()
    with pytest.raises(ImageDecodeError, match="more than 65,536 chunks"):
        decode_image(flood)
    assert time.perf_counter() - started < 1.0


@pytest.mark.parametrize(
    ("tail", "accepted"),
    [(b"", True), (b"\n", True), (b"\x00" * 4096, True), (b"PK\x03\x04", False), (b"x", False)],
)
def test_only_padding_may_follow_the_image(tail: bytes, accepted: bool) -> None:
    for data in (
        pil_bytes(Image.new("L", (8, 8)), "PNG"),
        pil_bytes(Image.new("L", (8, 8)), "JPEG"),
    ):
        if accepted:
            assert decode_image(data + tail).shape == (8, 8)
        else:
            with pytest.raises(ImageDecodeError, match=f"has {len(tail)} bytes after its"):
                decode_image(data + tail)


def test_jpeg_with_exif_thumbnail_is_accepted() -> None:
    # The thumbnail is a whole JPEG (SOS, EOI) inside APP1: the walk must skip it.
    thumb = pil_bytes(Image.new("RGB", (8, 8), (9, 9, 9)), "JPEG")
    exif = Image.Exif()
    exif[0x0112] = 1
    app1 = b"Exif\x00\x00" + exif.tobytes()[6:] + thumb
    image = pil_bytes(Image.new("RGB", (32, 16), (200, 10, 10)), "JPEG")
    data = image[:2] + b"\xff\xe1" + (len(app1) + 2).to_bytes(2, "big") + app1 + image[2:]
    check_jpeg(data)
    assert decode_image(data).shape == (16, 32, 3)


def test_jpeg_scan_count_is_bounded() -> None:
    head, scans, eoi = jpeg_segments(pil_bytes(Image.new("L", (64, 64)), "JPEG", progressive=True))
    at_limit = head + b"".join(scans) + scans[-1] * (MAX_JPEG_SCANS - len(scans)) + eoi
    check_jpeg(at_limit)
    with pytest.raises(ImageDecodeError, match=f"more than {MAX_JPEG_SCANS} scans"):
        check_jpeg(at_limit[:-2] + scans[-1] + eoi)


def test_jpeg_truncated_inside_a_header_segment_names_it() -> None:
    data = pil_bytes(Image.new("L", (8, 8)), "JPEG")
    with pytest.raises(TruncatedImageError, match="the FF DB segment at byte 20 runs"):
        check_jpeg(data[:30])


def test_jpeg_stuffed_ff_runs_are_walked_in_linear_time() -> None:
    # Entropy-coded data of stuffed FF 00 pairs: a byte-by-byte walk would take seconds.
    data = pil_bytes(Image.new("L", (8, 8)), "JPEG")
    head, scans, eoi = jpeg_segments(data)
    hostile = head + scans[0] + b"\xff\x00" * 4_000_000 + eoi
    started = time.perf_counter()
    check_jpeg(hostile)
    assert time.perf_counter() - started < 0.5


def test_tiff_tiles_count_against_the_pixel_limit() -> None:
    assert tiff_buffer_pixels(40, 24, None) == 960
    assert tiff_buffer_pixels(40, 24, (16, 16)) == 48 * 32
    assert tiff_buffer_pixels(16, 16, (8192, 8192)) == 8192 * 8192
    bomb = tiff(16, 16, tile=(4096, 4096), payload=bytes(1 << 16))
    with pytest.raises(ImageTooLargeError, match="16,777,216 pixels, over the limit of 1,000,000"):
        decode_image(bomb, max_pixels=1_000_000)
    assert decode_image(bomb, max_pixels=20_000_000).shape == (16, 16)


def test_exif_orientation_is_ignored_as_in_training() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    data = pil_bytes(Image.new("RGB", (30, 10)), "JPEG", exif=exif.tobytes())
    assert decode_image(data).shape == (10, 30, 3)


def test_pillow_reads_the_same_size_as_opencv_for_every_format() -> None:
    rgb = Image.fromarray(noise((13, 21, 3)))
    for fmt in ("PNG", "JPEG", "BMP", "TIFF"):
        buf = io.BytesIO()
        rgb.save(buf, fmt)
        assert decode_image(buf.getvalue()).shape == (13, 21, 3)
