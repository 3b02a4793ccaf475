"""Image decoding: formats, colour order, bit depth, and typed refusals of bad input."""

from __future__ import annotations

import io
import struct
import time
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cellinspect.datasets.decode import (
    DEFAULT_MAX_PIXELS,
    decode_image,
    encode_png,
    read_image,
    read_image_size,
)
from cellinspect.datasets.errors import (
    DataError,
    EmptyImageError,
    ImageDecodeError,
    ImageTooLargeError,
    TruncatedImageError,
    UnsupportedImageError,
)


def pil_bytes(image: Image.Image, fmt: str, **options: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **options)
    return buf.getvalue()


def noise(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def png_bomb(width: int, height: int) -> bytes:
    """A valid, tiny PNG whose header declares width x height 8-bit gray pixels."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    zeros = zlib.compress(b"\x00" * (width + 1) * 4, 9)  # a few rows; never reached
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zeros)
        + png_chunk(b"IEND", b"")
    )


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "TIFF"])
def test_gray_8bit_round_trips_exactly(fmt: str) -> None:
    pixels = noise((12, 17))
    out = decode_image(pil_bytes(Image.fromarray(pixels), fmt))
    assert out.dtype == np.uint8 and out.shape == (12, 17)
    np.testing.assert_array_equal(out, pixels)


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_gray_16bit_keeps_its_depth(fmt: str) -> None:
    pixels = np.random.default_rng(1).integers(0, 65536, (9, 11), dtype=np.uint16)
    out = decode_image(pil_bytes(Image.fromarray(pixels), fmt))
    assert out.dtype == np.uint16 and out.shape == (9, 11)
    np.testing.assert_array_equal(out, pixels)


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "TIFF", "JPEG"])
def test_pure_red_decodes_with_red_in_channel_0(fmt: str) -> None:
    data = pil_bytes(Image.new("RGB", (16, 8), (255, 0, 0)), fmt)
    out = decode_image(data)
    assert out.dtype == np.uint8 and out.shape == (8, 16, 3)
    assert out[..., 0].min() >= 250 and out[..., 1:].max() <= 5


def test_rgb_png_round_trips_exactly() -> None:
    pixels = noise((10, 7, 3))
    np.testing.assert_array_equal(decode_image(pil_bytes(Image.fromarray(pixels), "PNG")), pixels)


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_rgba_keeps_straight_alpha_in_channel_3(fmt: str) -> None:
    data = pil_bytes(Image.new("RGBA", (5, 4), (255, 0, 0, 7)), fmt)
    out = decode_image(data)
    assert out.shape == (4, 5, 4)
    # OpenCV's TIFF reader premultiplies alpha ([7, 0, 0, 7]); we must not.
    assert tuple(out[0, 0]) == (255, 0, 0, 7)


def test_palette_png_comes_out_rgb() -> None:
    image = Image.new("P", (6, 3))
    image.putpalette([0, 0, 255, 10, 200, 30] + [0] * 762)
    image.putpixel((1, 0), 1)
    out = decode_image(pil_bytes(image, "PNG"))
    assert out.shape == (3, 6, 3) and out.dtype == np.uint8
    assert tuple(out[0, 0]) == (0, 0, 255) and tuple(out[0, 1]) == (10, 200, 30)


def test_jpeg_gray_decodes_close_to_source() -> None:
    pixels = np.full((32, 32), 128, np.uint8)
    out = decode_image(pil_bytes(Image.fromarray(pixels), "JPEG", quality=95))
    assert out.shape == (32, 32) and abs(int(out.mean()) - 128) <= 2


def test_jpeg_with_zero_padding_after_eoi_is_accepted() -> None:
    data = pil_bytes(Image.fromarray(noise((32, 32, 3))), "JPEG") + b"\x00" * 16
    assert decode_image(data).shape == (32, 32, 3)


def test_read_image_size_reports_format_and_dimensions() -> None:
    assert read_image_size(pil_bytes(Image.new("L", (21, 13)), "BMP")) == ("BMP", 21, 13)
    assert read_image_size(pil_bytes(Image.new("RGB", (30, 10)), "JPEG")) == ("JPEG", 30, 10)


def test_encode_png_round_trips_rgb_rgba_and_16bit() -> None:
    for pixels in (
        noise((5, 6, 3)),
        noise((5, 6, 4)),
        np.arange(30, dtype=np.uint16).reshape(5, 6) * 2000,
    ):
        np.testing.assert_array_equal(decode_image(encode_png(pixels)), pixels)
    red = np.zeros((2, 2, 3), np.uint8)
    red[..., 0] = 255
    with Image.open(io.BytesIO(encode_png(red))) as im:
        assert im.getpixel((0, 0)) == (255, 0, 0)  # another decoder agrees on the order


def test_hxwx1_becomes_hxw() -> None:
    assert decode_image(encode_png(noise((4, 3, 1)))).shape == (4, 3)


def test_empty_bytes_are_refused() -> None:
    with pytest.raises(EmptyImageError, match=r"cam1\.png: empty image data"):
        decode_image(b"", source="cam1.png")


def test_random_bytes_are_not_an_image() -> None:
    data = np.random.default_rng(3).bytes(2000)
    with pytest.raises(UnsupportedImageError, match=r"blob\.bin: not a recognised image format"):
        decode_image(data, source="blob.bin")


def test_gif_is_unsupported_and_lists_the_supported_formats() -> None:
    data = pil_bytes(Image.new("L", (4, 4)), "GIF")
    with pytest.raises(UnsupportedImageError) as info:
        decode_image(data, source="anim.gif")
    message = str(info.value)
    assert "anim.gif" in message and "GIF" in message
    assert "PNG, JPEG, BMP, TIFF" in message
    assert info.value.reason == "unsupported"


def test_truncated_jpeg_is_refused_not_filled_with_gray() -> None:
    data = pil_bytes(Image.fromarray(noise((256, 256, 3))), "JPEG", quality=90)
    with pytest.raises(TruncatedImageError, match=r"cell\.jpg: JPEG data is truncated") as info:
        decode_image(data[: len(data) // 2], source="cell.jpg")
    assert info.value.reason == "truncated" and info.value.path == "cell.jpg"


@pytest.mark.parametrize("keep", [0.5, 0.1])
def test_truncated_png_is_refused(keep: float) -> None:
    data = pil_bytes(Image.fromarray(noise((128, 128))), "PNG")
    with pytest.raises(TruncatedImageError, match=r"tile\.png: PNG data is truncated"):
        decode_image(data[: int(len(data) * keep)], source="tile.png")


def test_corrupt_png_body_cannot_be_decoded() -> None:
    data = bytearray(pil_bytes(Image.fromarray(noise((64, 64))), "PNG"))
    start = data.index(b"IDAT") + 4
    data[start : start + 200] = b"\xff" * 200  # keep the IEND, wreck the compressed stream
    with pytest.raises(ImageDecodeError, match=r"bad\.png: cannot decode PNG"):
        decode_image(bytes(data), source="bad.png")


def test_png_bomb_is_refused_from_the_header_without_allocating() -> None:
    data = png_bomb(100_000, 100_000)
    assert len(data) < 2_000
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(ImageTooLargeError) as info:
            decode_image(data, source="bomb.png")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - started < 1.0
    assert peak < 10_000_000  # the pixels would be 10 GB
    message = str(info.value)
    assert "bomb.png" in message and "100000x100000" in message
    assert f"{DEFAULT_MAX_PIXELS:,}" in message


def test_our_limit_decides_in_both_directions() -> None:
    # Above Pillow's own bomb threshold (2 x 89.5 MP) yet allowed by a caller's limit: the
    # header read must not trip Pillow's DecompressionBombError.
    assert read_image_size(png_bomb(20_000, 10_000)) == ("PNG", 20_000, 10_000)
    small = pil_bytes(Image.new("L", (100, 100)), "PNG")
    with pytest.raises(ImageTooLargeError, match="100x100"):
        decode_image(small, max_pixels=9_999)
    assert decode_image(small, max_pixels=10_000).shape == (100, 100)


def test_float_tiff_is_unsupported_naming_the_dtype() -> None:
    data = pil_bytes(Image.fromarray(np.full((3, 4), 0.5, np.float32)), "TIFF")
    with pytest.raises(UnsupportedImageError, match=r"depth\.tif: .*float32"):
        decode_image(data, source="depth.tif")


def test_read_image_reads_a_file(tmp_path: Path) -> None:
    pixels = noise((8, 9, 3))
    path = tmp_path / "a.png"
    path.write_bytes(encode_png(pixels))
    np.testing.assert_array_equal(read_image(path), pixels)


def test_read_image_on_a_missing_file_names_it(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.png"
    with pytest.raises(DataError, match="file not found") as info:
        read_image(missing)
    assert info.value.path == str(missing) and str(missing) in str(info.value)


def test_read_image_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.png"
    path.write_bytes(b"not really a png")
    with pytest.raises(UnsupportedImageError, match=r"broken\.png"):
        read_image(path)
