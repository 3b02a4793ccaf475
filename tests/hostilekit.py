"""Hostile images, generated in code: odd but valid files, refusals, bombs, polyglots, mutants.

Every case says what the service must answer: accepted (200), a precise refusal (status,
code and a fragment of the message), or, for random mutants, either of those. Shared by
the API tests, the resident-memory test and the decode fuzzer's seed corpus.
"""

from __future__ import annotations

import io
import random
import struct
import zlib
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from PIL import Image

ACCEPTED = 200
# What a refusal of an image may be, by the error's code (serving/errors.py DECODE_STATUS).
DECODE_REFUSALS = {
    "empty": 400,
    "unsupported": 415,
    "truncated": 422,
    "too_large": 422,
    "decode_error": 422,
}


@dataclass(frozen=True)
class HostileImage:
    """One upload and the answer it must get."""

    name: str
    data: bytes
    media_type: str = "application/octet-stream"  # what the client claims it is
    filename: str = "image.bin"
    status: int | None = ACCEPTED  # None: a random mutant; 200 or any precise decode refusal
    code: str | None = None  # the refusal's code
    detail: str = ""  # a fragment the refusal's message must contain
    family: str = ""  # truncation, bomb, polyglot, ... (for coverage of the corpus)

    def check(self, status: int, body: dict[str, object]) -> str | None:
        """None when (status, body) is the answer this case must get, else what is wrong."""
        if self.status is None:
            if status == ACCEPTED:
                return None
            if DECODE_REFUSALS.get(str(body.get("code"))) != status or not body.get("detail"):
                return f"{self.name}: imprecise refusal {status} {body}"
            return None
        if status != self.status:
            return f"{self.name}: expected {self.status} {self.code or ''}, got {status} {body}"
        if self.code is not None and body.get("code") != self.code:
            return f"{self.name}: expected code {self.code!r}, got {body}"
        if self.detail and self.detail not in str(body.get("detail", "")):
            return f"{self.name}: message lacks {self.detail!r}: {body}"
        return None


# ---- writers ----------------------------------------------------------------------------


def pil_bytes(image: Image.Image, fmt: str, **options: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **options)
    return buf.getvalue()


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def png_scanline_bytes(
    width: int, height: int, *, samples: int, depth: int, interlaced: bool
) -> int:
    """Bytes of filtered rows (a filter byte each) a PNG's IDAT must inflate to."""
    passes = (
        [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2)]
        + [(0, 1, 1, 2)]
        if interlaced
        else [(0, 0, 1, 1)]
    )
    total = 0
    for x0, y0, dx, dy in passes:
        cols, rows = len(range(x0, width, dx)), len(range(y0, height, dy))
        if cols and rows:
            total += rows * (1 + (cols * samples * depth + 7) // 8)
    return total


def png_zeros(
    width: int,
    height: int,
    *,
    color_type: int = 0,
    depth: int = 8,
    interlaced: bool = False,
    extra_zeros: int = 0,
    chunks: Iterable[bytes] = (),
    header_only: bool = False,
) -> bytes:
    """A valid all-zero PNG (every row filter 0); `extra_zeros` more inflated bytes make a bomb.

    `header_only`: the IDAT holds a few rows only, for headers that must be refused unread.
    """
    samples = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}[color_type]
    raw = png_scanline_bytes(width, height, samples=samples, depth=depth, interlaced=interlaced)
    if header_only:
        raw = min(raw, 4 * (1 + width * samples * depth // 8))
    deflate = zlib.compressobj(9)
    parts = [deflate.compress(bytes(raw))]
    block = bytes(1 << 20)
    for _ in range(extra_zeros >> 20):
        parts.append(deflate.compress(block))
    parts.append(deflate.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, depth, color_type, 0, 0, int(interlaced))
    plte = png_chunk(b"PLTE", bytes(3)) if color_type == 3 else b""
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + plte
        + b"".join(chunks)
        + png_chunk(b"IDAT", b"".join(parts))
        + png_chunk(b"IEND", b"")
    )


def tiff(
    width: int,
    height: int,
    *,
    payload: bytes,
    tile: tuple[int, int] | None = None,
    samples: int = 1,
    bits: int = 8,
    photometric: int = 1,
    deflate: bool = True,
    big_endian: bool = False,
    extra: Iterable[tuple[int, int, int, int]] = (),
) -> bytes:
    """A one-directory TIFF whose single strip (or tile) holds `payload`."""
    order = ">" if big_endian else "<"
    blob = zlib.compress(payload, 9) if deflate else payload
    blob += b"\x00" * (len(blob) & 1)
    entries = [
        (256, 4, 1, width),
        (257, 4, 1, height),
        (258, 3, 1, bits),
        (259, 3, 1, 8 if deflate else 1),
        (262, 3, 1, photometric),
        (277, 3, 1, samples),
    ]
    if tile:
        entries += [
            (322, 4, 1, tile[0]),
            (323, 4, 1, tile[1]),
            (324, 4, 1, 8),
            (325, 4, 1, len(blob)),
        ]
    else:
        entries += [(273, 4, 1, 8), (278, 4, 1, height), (279, 4, 1, len(blob))]
    entries = sorted([*entries, *extra])

    def entry(tag: int, kind: int, count: int, value: int) -> bytes:
        packed = (
            struct.pack(order + "HH", value, 0) if kind == 3 else struct.pack(order + "I", value)
        )
        return struct.pack(order + "HHI", tag, kind, count) + packed

    ifd = struct.pack(order + "H", len(entries)) + b"".join(entry(*e) for e in entries)
    magic = b"MM\x00*" if big_endian else b"II*\x00"
    return (
        magic + struct.pack(order + "I", 8 + len(blob)) + blob + ifd + struct.pack(order + "I", 0)
    )


def jpeg_segments(data: bytes) -> tuple[bytes, list[bytes], bytes]:
    """(header up to the first SOS, each scan from its SOS, EOI) of a well-formed JPEG."""
    starts = []
    pos = data.index(b"\xff\xda")
    while pos >= 0:
        starts.append(pos)
        pos = data.find(b"\xff\xda", pos + 2)
    ends = [*starts[1:], len(data) - 2]
    return data[: starts[0]], [data[a:b] for a, b in zip(starts, ends, strict=True)], data[-2:]


def with_sof_size(data: bytes, width: int, height: int) -> bytes:
    """A JPEG whose SOF0/SOF2 header claims width x height (at most 65535 each)."""
    pos = max(data.find(b"\xff\xc0"), data.find(b"\xff\xc2"))
    out = bytearray(data)
    out[pos + 5 : pos + 9] = struct.pack(">HH", height, width)
    return bytes(out)


def bmp_with_size(data: bytes, width: int, height: int) -> bytes:
    """A BITMAPINFOHEADER BMP whose header claims width x height (negative: top-down)."""
    out = bytearray(data)
    out[18:26] = struct.pack("<ii", width, height)
    return bytes(out)


# ---- the corpus -------------------------------------------------------------------------


def _base_images() -> dict[str, Image.Image]:
    rng = np.random.default_rng(7)
    gray = (np.add.outer(np.arange(40), np.arange(48)) * 2 + rng.integers(0, 40, (40, 48))).astype(
        np.uint8
    )
    rgb = np.dstack([gray, gray[::-1], 255 - gray])
    return {
        "L": Image.fromarray(gray),
        "RGB": Image.fromarray(rgb),
        "RGBA": Image.fromarray(np.dstack([rgb, gray])),
        "I;16": Image.fromarray(gray.astype(np.uint16) * 257),
    }


def valid_images() -> list[HostileImage]:
    """Unusual but well-formed files of the four supported formats: all must be accepted."""
    base = _base_images()
    gray, rgb = base["L"], base["RGB"]
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90": the decoder ignores it, as training did
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    cases = {
        "png-gray8": pil_bytes(gray, "PNG"),
        "png-gray16": pil_bytes(base["I;16"], "PNG"),
        "png-rgb8": pil_bytes(rgb, "PNG"),
        "png-rgba8": pil_bytes(base["RGBA"], "PNG"),
        "png-la": pil_bytes(gray.convert("LA"), "PNG"),
        "png-palette": pil_bytes(palette, "PNG"),
        "png-palette-transparency": pil_bytes(palette, "PNG", transparency=0),
        "png-1bit": pil_bytes(gray.convert("1"), "PNG"),
        "png-rgb16-zeros": png_zeros(40, 30, color_type=2, depth=16),
        "png-rgba16-zeros": png_zeros(40, 30, color_type=6, depth=16),
        "png-interlaced": png_zeros(37, 29, color_type=6, depth=16, interlaced=True),
        "png-apng-2-frames": pil_bytes(
            gray, "PNG", save_all=True, append_images=[rgb.convert("L")]
        ),
        "png-html-in-text-chunk": png_zeros(
            16, 16, chunks=[png_chunk(b"tEXt", b"Comment\x00<html><script>x()</script></html>")]
        ),
        "png-newline-after-iend": pil_bytes(gray, "PNG") + b"\r\n",
        "jpeg-gray": pil_bytes(gray, "JPEG"),
        "jpeg-rgb": pil_bytes(rgb, "JPEG", quality=90),
        "jpeg-cmyk": pil_bytes(rgb.convert("CMYK"), "JPEG"),
        "jpeg-progressive": pil_bytes(rgb, "JPEG", progressive=True),
        "jpeg-exif-rotated": pil_bytes(rgb, "JPEG", exif=exif.tobytes()),
        "jpeg-restart-markers": pil_bytes(rgb, "JPEG", restart_marker_blocks=1),
        "jpeg-zero-padding": pil_bytes(gray, "JPEG") + bytes(100),
        "bmp-gray": pil_bytes(gray, "BMP"),
        "bmp-rgb": pil_bytes(rgb, "BMP"),
        "bmp-rgba": pil_bytes(base["RGBA"], "BMP"),
        "bmp-1bit": pil_bytes(gray.convert("1"), "BMP"),
        "bmp-top-down": bmp_with_size(pil_bytes(rgb, "BMP"), 48, -40),
        "tiff-gray16": pil_bytes(base["I;16"], "TIFF"),
        "tiff-rgba": pil_bytes(base["RGBA"], "TIFF"),
        "tiff-cmyk": pil_bytes(rgb.convert("CMYK"), "TIFF"),
        "tiff-lzw": pil_bytes(rgb, "TIFF", compression="tiff_lzw"),
        "tiff-jpeg": pil_bytes(rgb, "TIFF", compression="jpeg"),
        "tiff-multipage": pil_bytes(rgb, "TIFF", save_all=True, append_images=[gray]),
        "tiff-tiled-padded": tiff(40, 24, tile=(48, 32), payload=bytes(48 * 32)),
        "tiff-big-endian": tiff(16, 8, payload=bytes(128), big_endian=True),
    }
    return [
        HostileImage(name, data, family="valid", filename=f"{name}.img")
        for name, data in cases.items()
    ]


def refused_images(*, max_pixels: int, max_body_bytes: int) -> list[HostileImage]:
    """Files that must be refused, each with the status, code and message it must get."""
    base = _base_images()
    gray, rgb = base["L"], base["RGB"]
    png, jpeg = pil_bytes(gray, "PNG"), pil_bytes(rgb, "JPEG")
    bmp, tif = pil_bytes(rgb, "BMP"), pil_bytes(gray, "TIFF")
    side = int(max_pixels**0.5) + 1  # just over the limit
    head, scans, eoi = jpeg_segments(pil_bytes(gray, "JPEG", progressive=True))
    bomb_rows = png_scanline_bytes(16, 16, samples=1, depth=8, interlaced=False)

    def case(name: str, data: bytes, code: str, detail: str, family: str) -> HostileImage:
        return HostileImage(
            name, data, status=DECODE_REFUSALS[code], code=code, detail=detail, family=family
        )

    ztxt = png_chunk(b"zTXt", b"k\x00\x00" + zlib.compress(bytes(1 << 20), 9))
    return [
        case("zero-length", b"", "empty", "empty image data (0 bytes)", "empty"),
        case("one-byte", b"\x89", "unsupported", "not a recognised image format", "magic"),
        case("html", b"<!doctype html><script>x()</script>", "unsupported", "PNG, JPEG", "magic"),
        case("zip", b"PK\x03\x04" + bytes(64), "unsupported", "not a recognised", "magic"),
        case(
            "gif-animated",
            pil_bytes(gray, "GIF", save_all=True, append_images=[gray]),
            "unsupported",
            "GIF images are not supported",
            "format",
        ),
        case(
            "webp", pil_bytes(rgb, "WEBP"), "unsupported", "WEBP images are not supported", "format"
        ),
        case(
            "ico", pil_bytes(gray, "ICO"), "unsupported", "ICO images are not supported", "format"
        ),
        case("pdf", b"%PDF-1.7\n" + bytes(64), "unsupported", "PDF", "format"),
        case("psd", b"8BPS" + bytes(64), "unsupported", "PSD", "format"),
        case(
            "jpeg2000",
            b"\x00\x00\x00\x0cjP  \r\n\x87\n" + bytes(64),
            "unsupported",
            "JPEG 2000",
            "format",
        ),
        case("png-signature-only", png[:8], "truncated", "PNG data is truncated", "truncation"),
        case("png-no-iend", png[:-12], "truncated", "PNG data is truncated", "truncation"),
        case("png-half", png[: len(png) // 2], "truncated", "PNG data is truncated", "truncation"),
        case("jpeg-soi-only", jpeg[:3], "truncated", "JPEG data is truncated", "truncation"),
        case("jpeg-no-eoi", jpeg[:-2], "truncated", "no EOI marker", "truncation"),
        case(
            "jpeg-half", jpeg[: len(jpeg) // 2], "truncated", "JPEG data is truncated", "truncation"
        ),
        case(
            "jpeg-eoi-before-scan",
            jpeg[:2] + b"\xff\xd9",
            "decode_error",
            "no image data",
            "structure",
        ),
        case("bmp-magic-only", b"BM", "decode_error", "cannot read BMP header", "truncation"),
        case(
            "tiff-magic-only", b"II*\x00", "decode_error", "cannot read TIFF header", "truncation"
        ),
        case(
            "png-magic-then-jpeg", b"\x89PNG\r\n\x1a\n" + jpeg[2:], "decode_error", "IHDR", "magic"
        ),
        case(
            "jpeg-magic-then-png",
            b"\xff\xd8\xff" + png[8:],
            "truncated",
            "JPEG data is truncated",
            "magic",
        ),
        case(
            "png-100000x100000",
            png_zeros(100_000, 100_000, header_only=True),
            "too_large",
            "100000x100000",
            "dimensions",
        ),
        case(
            "png-just-over-limit",
            png_zeros(side, side, header_only=True),
            "too_large",
            f"{max_pixels:,} pixels",
            "dimensions",
        ),
        case(
            "jpeg-65535x65535",
            with_sof_size(jpeg, 65_535, 65_535),
            "too_large",
            "65535x65535",
            "dimensions",
        ),
        case(
            "bmp-100000x100000",
            bmp_with_size(bmp, 100_000, 100_000),
            "too_large",
            "100000x100000",
            "dimensions",
        ),
        case(
            "tiff-100000x100000",
            tiff(100_000, 100_000, payload=bytes(64)),
            "too_large",
            "100000x100000",
            "dimensions",
        ),
        case(
            "png-idat-bomb",
            png_zeros(16, 16, extra_zeros=100 << 20),
            "decode_error",
            f"past the {bomb_rows:,} bytes",
            "bomb",
        ),
        case(
            "png-ztxt-flood",
            png_zeros(16, 16, chunks=[ztxt] * 17),
            "decode_error",
            "compressed metadata chunks",
            "bomb",
        ),
        case(
            "png-chunk-flood",
            png_zeros(16, 16, chunks=[png_chunk(b"aaAa", b"")] * 70_000),
            "decode_error",
            "more than 65,536 chunks",
            "bomb",
        ),
        case(
            "tiff-tile-bomb",
            tiff(16, 16, tile=(8192, 8192), payload=bytes(1 << 20)),
            "too_large",
            "tiles",
            "bomb",
        ),
        case(
            "jpeg-scan-bomb",
            head + b"".join(scans) + scans[-1] * 80 + eoi,
            "decode_error",
            "scans",
            "bomb",
        ),
        case(
            "jpeg-fill-flood",
            jpeg[:2] + b"\xff" * 5000 + jpeg[2:],
            "decode_error",
            "padding",
            "bomb",
        ),
        case(
            "jpeg-segment-flood",
            jpeg[:2] + b"\xff\xfe\x00\x02" * 1100 + jpeg[2:],
            "decode_error",
            "marker segments",
            "bomb",
        ),
        case(
            "bigtiff-ifd-flood",
            b"II+\x00\x08\x00\x00\x00" + struct.pack("<QQ", 16, 1 << 40),
            "decode_error",
            "entries",
            "bomb",
        ),
        case(
            "png-plus-zip",
            png + b"PK\x03\x04" + bytes(200),
            "decode_error",
            "after its IEND chunk",
            "polyglot",
        ),
        case("png-plus-png", png + png, "decode_error", "after its IEND chunk", "polyglot"),
        case(
            "jpeg-plus-html",
            jpeg + b"<html><script>x()</script></html>",
            "decode_error",
            "after its EOI marker",
            "polyglot",
        ),
        case(
            "tiff-float32",
            pil_bytes(Image.fromarray(np.zeros((4, 4), np.float32)), "TIFF"),
            "unsupported",
            "float32",
            "pixel-type",
        ),
        case(
            "tiff-5-samples",
            tiff(8, 8, samples=5, payload=bytes(320)),
            "decode_error",
            "TIFF",
            "pixel-type",
        ),
        *[
            case(f"{name}-flipped-header", data, code, "", "mutation")
            for name, data, code in [
                (
                    "png",
                    b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", bytes(13)) + png[33:],
                    "decode_error",
                ),
                ("bmp", bmp[:14] + b"\xff" * 40 + bmp[54:], "decode_error"),
            ]
        ],
        case("tiff-truncated-strip", tif[:40], "decode_error", "TIFF", "truncation"),
    ]


def mutants(seed: int = 0, per_image: int = 6) -> list[HostileImage]:
    """Seeded truncations, bit flips and byte runs of valid files: any precise answer will do."""
    rng = random.Random(seed)
    out = []
    for source in valid_images()[::3]:
        data = source.data
        for i in range(per_image):
            mutated = bytearray(data)
            kind = ("flip", "truncate", "splice")[i % 3]
            if kind == "flip":
                for _ in range(rng.randint(1, 8)):
                    mutated[rng.randrange(len(mutated))] ^= 1 << rng.randrange(8)
            elif kind == "truncate":
                del mutated[rng.randrange(1, len(mutated)) :]
            else:
                at = rng.randrange(len(mutated))
                mutated[at:at] = bytes([rng.randrange(256)]) * rng.randint(1, 64)
            out.append(
                HostileImage(
                    f"{source.name}-{kind}-{i}", bytes(mutated), status=None, family="mutation"
                )
            )
    return out


def hostile_images(*, max_pixels: int, max_body_bytes: int) -> list[HostileImage]:
    """The whole corpus for a service with these limits; every body fits under the limit."""
    cases = [
        *valid_images(),
        *refused_images(max_pixels=max_pixels, max_body_bytes=max_body_bytes),
        *mutants(),
    ]
    too_big = [c.name for c in cases if len(c.data) > max_body_bytes]
    if too_big:
        raise ValueError(f"corpus cases over the {max_body_bytes:,}-byte body limit: {too_big}")
    return cases
