"""Structural checks of PNG, JPEG and TIFF containers, run before any decoder sees the bytes.

The decoders trust what a file says about itself, and a hostile file can make them do far
more work than its pixel count suggests: Pillow's header parsers step through padding and
chunks in Python (seconds for a 32 MB upload, holding the GIL), libpng inflates every byte
of an IDAT stream however far past the image it runs, libjpeg re-reads the whole image for
every scan of a progressive JPEG, and libtiff sizes its buffers from the tile tags. These
checks read the container's skeleton only (chunk and segment headers, at C speed through
`bytes.find` and `re`) and refuse such files with a message that says which limit was hit.
"""

from __future__ import annotations

import re
import struct
import zlib
from dataclasses import dataclass
from types import ModuleType

from cellinspect.datasets.errors import (
    ImageDecodeError,
    TruncatedImageError,
)

_inflate: ModuleType
try:  # ISA-L inflates 2.1x faster than zlib here, and every PNG is inflated twice (below)
    from isal import isal_zlib as _inflate
except ImportError:  # no wheel for this platform: the same check, at zlib's speed
    _inflate = zlib

# Every limit is far above what an encoder writes and far below what costs the service.
MAX_PNG_CHUNKS = 65_536  # libpng writes 8 KiB IDATs: 4,096 chunks for a 32 MiB file
MAX_PNG_COMPRESSED_TEXT = 16  # zTXt/iTXt/iCCP: libpng inflates each up to 8 MB
PNG_INFLATE_SLACK = 64 * 1024  # inflated bytes tolerated past the rows the header declares
MAX_JPEG_SEGMENTS = 1_024  # markers; encoders write 5-30 (APPn, DQT, SOF, DHT, ...)
MAX_JPEG_SCANS = 64  # progressive encoders write 6-20; each scan re-reads every block
MAX_JPEG_PADDING = 4_096  # fill (FF) and stray bytes between header segments
MAX_TIFF_IFD_ENTRIES = 65_535  # the classic-TIFF maximum; BigTIFF allows 2**64
# After the image's end marker only padding is accepted: some tools append a newline or
# zeros. Anything else is another file glued on (a polyglot) and is refused.
_PADDING = b"\x00 \t\r\n"

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_COMPRESSED_TEXT = frozenset({b"zTXt", b"iTXt", b"iCCP"})
# Samples per pixel by PNG colour type (gray, -, RGB, palette, gray+alpha, -, RGBA).
_PNG_SAMPLES = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
# Adam7 passes: (x start, y start, x step, y step).
_ADAM7 = (
    (0, 0, 8, 8),
    (4, 0, 8, 8),
    (0, 4, 4, 8),
    (2, 0, 4, 4),
    (0, 2, 2, 4),
    (1, 0, 2, 2),
    (0, 1, 1, 2),
)
# A marker inside entropy-coded data: FF followed by anything but a stuffed 00, a restart
# marker (D0-D7) or more fill. Two fixed bytes, so the search stays linear on hostile runs.
_JPEG_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
_JPEG_FILL = re.compile(rb"\xff+")
_JPEG_SOS, _JPEG_EOI = 0xDA, 0xD9
_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})  # TEM and RSTn carry no length


@dataclass(frozen=True)
class PngLayout:
    """What libpng will be asked to produce, and where the compressed rows are."""

    width: int
    height: int
    bit_depth: int
    color_type: int
    interlaced: bool
    idat: tuple[tuple[int, int], ...]  # (start, stop) of each IDAT payload

    @property
    def raw_bytes(self) -> int:
        """Bytes of filtered scanlines the IDAT stream must inflate to (one filter byte a row)."""
        samples = _PNG_SAMPLES.get(self.color_type, 4)
        passes = _ADAM7 if self.interlaced else ((0, 0, 1, 1),)
        total = 0
        for x0, y0, dx, dy in passes:
            cols = max(0, -(-(self.width - x0) // dx))
            rows = max(0, -(-(self.height - y0) // dy))
            if cols and rows:
                total += rows * (1 + -(-(cols * samples * self.bit_depth) // 8))
        return total


def _trailing(data: bytes, end: int, fmt: str, marker: str, source: str | None) -> None:
    rest = data[end:].strip(_PADDING)
    if rest:
        raise ImageDecodeError(
            f"{fmt} has {len(data) - end:,} bytes after its {marker} (another file appended"
            " to the image?); send the image alone",
            source,
        )


def check_png(data: bytes, *, source: str | None = None) -> PngLayout:
    """Walk the chunks: IHDR first, IEND present, nothing appended, chunk counts bounded."""
    pos, count, text, ihdr = len(_PNG_SIGNATURE), 0, 0, None
    idat: list[tuple[int, int]] = []
    while True:
        if pos + 8 > len(data):
            raise TruncatedImageError(
                f"PNG data is truncated: it ends at byte {len(data):,}, inside a chunk header"
                " and before the IEND chunk",
                source,
            )
        length, kind = struct.unpack_from(">I4s", data, pos)
        if count == 0 and (kind != b"IHDR" or length != 13):
            raise ImageDecodeError("PNG does not start with a 13-byte IHDR chunk", source)
        end = pos + 12 + length
        if end > len(data):
            name = kind.decode("latin-1")
            raise TruncatedImageError(
                f"PNG data is truncated: the {name!r} chunk at byte {pos:,} needs {length:,}"
                f" bytes, the file ends {end - len(data):,} bytes short",
                source,
            )
        count += 1
        if count > MAX_PNG_CHUNKS:
            raise ImageDecodeError(f"PNG has more than {MAX_PNG_CHUNKS:,} chunks", source)
        if kind == b"IHDR" and ihdr is None:
            ihdr = struct.unpack_from(">IIBBBBB", data, pos + 8)
        elif kind == b"IDAT":
            idat.append((pos + 8, end - 4))
        elif kind in _PNG_COMPRESSED_TEXT:
            text += 1
            if text > MAX_PNG_COMPRESSED_TEXT:
                raise ImageDecodeError(
                    f"PNG has more than {MAX_PNG_COMPRESSED_TEXT} compressed metadata chunks"
                    " (zTXt, iTXt, iCCP)",
                    source,
                )
        elif kind == b"IEND":
            break
        pos = end
    _trailing(data, end, "PNG", "IEND chunk", source)
    assert ihdr is not None  # the first chunk is IHDR
    width, height, depth, color_type, _, _, interlace = ihdr
    return PngLayout(width, height, depth, color_type, interlace == 1, tuple(idat))


def check_png_inflation(data: bytes, layout: PngLayout, *, source: str | None = None) -> None:
    """Refuse an IDAT stream that inflates past the rows its header declares.

    libpng inflates the whole stream even after the last row ("Too much image data" is
    only a warning), so 1 MB of compressed zeros behind a 16x16 image costs it 2 s. The
    stream is inflated here in 64 KiB pieces that are counted and dropped.
    """
    limit = layout.raw_bytes + PNG_INFLATE_SLACK
    inflater = _inflate.decompressobj()
    total = 0
    view = memoryview(data)
    try:
        for start, stop in layout.idat:
            pending: bytes | memoryview = view[start:stop]
            while not inflater.eof:
                # At most 64 KiB per call, so a bomb is stopped after `limit` bytes, not
                # after inflating it all. ISA-L takes all the input at once and hands out
                # what it buffered on the next calls; zlib keeps it in unconsumed_tail.
                out = inflater.decompress(pending, 1 << 16)
                pending = inflater.unconsumed_tail
                total += len(out)
                if total > limit:
                    raise ImageDecodeError(
                        f"PNG image data inflates past the {layout.raw_bytes:,} bytes that"
                        f" {layout.width}x{layout.height} pixels need (a decompression bomb?)",
                        source,
                    )
                if not out and not pending:  # this chunk is used up: on to the next
                    break
    except (zlib.error, _inflate.error) as exc:  # isal_zlib.error is its own class
        raise ImageDecodeError(
            f"cannot decode PNG image data: the compressed rows are corrupt ({exc})", source
        ) from None


def check_jpeg(data: bytes, *, source: str | None = None) -> None:
    """Walk the markers: bounded header, at most MAX_JPEG_SCANS scans, EOI, nothing appended.

    A missing EOI is refused: libjpeg fills the rest of a truncated scan with gray and
    only warns, so a cut-off upload would otherwise be inspected as a gray image.
    """
    pos, segments, padding, scans = 2, 0, 0, 0
    # Header: length-prefixed segments up to the first SOS, with bounded padding between.
    while scans == 0:
        if pos < len(data) and data[pos] != 0xFF:  # stray bytes: skipped at C speed, counted
            next_ff = data.find(b"\xff", pos)
            next_ff = len(data) if next_ff < 0 else next_ff
            padding += next_ff - pos
            pos = next_ff
        fill = _JPEG_FILL.match(data, pos)
        if fill:
            padding += fill.end() - pos - 1
            pos = fill.end()
        if padding > MAX_JPEG_PADDING:
            raise ImageDecodeError(
                f"JPEG header has more than {MAX_JPEG_PADDING:,} bytes of padding or junk"
                " between its segments",
                source,
            )
        if pos >= len(data):
            raise TruncatedImageError(
                "JPEG data is truncated: it ends before the image data (no SOS marker)", source
            )
        marker, pos = data[pos], pos + 1
        segments = _count_segment(segments, source)
        if marker == _JPEG_EOI:
            raise ImageDecodeError("JPEG has no image data (EOI before any SOS marker)", source)
        if marker in _JPEG_STANDALONE or marker in (0x00, 0xD8):
            continue
        pos = _skip_segment(data, pos, marker, source)
        scans += marker == _JPEG_SOS
    # Entropy-coded scans: find markers with a fixed two-byte search, never byte by byte.
    while True:
        hit = _JPEG_MARKER.search(data, pos)
        if hit is None:
            raise TruncatedImageError(
                "JPEG data is truncated: no EOI marker (FF D9) after the image data", source
            )
        marker, pos = data[hit.start() + 1], hit.end()
        if marker == _JPEG_EOI:
            break
        segments = _count_segment(segments, source)
        if marker == 0x01:
            continue
        pos = _skip_segment(data, pos, marker, source)
        scans += marker == _JPEG_SOS
        if scans > MAX_JPEG_SCANS:
            raise ImageDecodeError(
                f"JPEG has more than {MAX_JPEG_SCANS} scans (encoders write 6 to 20;"
                " each one makes the decoder pass over the whole image again)",
                source,
            )
    _trailing(data, pos, "JPEG", "EOI marker (FF D9)", source)


def _count_segment(segments: int, source: str | None) -> int:
    if segments >= MAX_JPEG_SEGMENTS:
        raise ImageDecodeError(f"JPEG has more than {MAX_JPEG_SEGMENTS:,} marker segments", source)
    return segments + 1


def _skip_segment(data: bytes, pos: int, marker: int, source: str | None) -> int:
    """Position after the segment whose length field starts at `pos`."""
    if pos + 2 > len(data):
        raise TruncatedImageError(
            f"JPEG data is truncated: it ends inside the FF {marker:02X} segment", source
        )
    (length,) = struct.unpack_from(">H", data, pos)
    if length < 2:
        raise ImageDecodeError(
            f"JPEG segment FF {marker:02X} at byte {pos - 2:,} has an impossible length {length}",
            source,
        )
    if pos + length > len(data):
        raise TruncatedImageError(
            f"JPEG data is truncated: the FF {marker:02X} segment at byte {pos - 2:,} runs"
            f" {pos + length - len(data):,} bytes past the end",
            source,
        )
    return pos + length


def check_tiff(data: bytes, *, source: str | None = None) -> None:
    """Bound the first IFD's entry count, which Pillow's parser walks in Python."""
    big = data[2:4] in (b"+\x00", b"\x00+")
    if not big:
        return  # a classic IFD counts its entries in 16 bits: at most 65,535
    order = "<" if data[:2] == b"II" else ">"
    if len(data) < 16:
        raise TruncatedImageError("TIFF data is truncated: the BigTIFF header is 16 bytes", source)
    (offset,) = struct.unpack_from(order + "Q", data, 8)
    if offset + 8 > len(data):
        raise TruncatedImageError(
            f"TIFF data is truncated: the first directory at byte {offset:,} is past the end",
            source,
        )
    (entries,) = struct.unpack_from(order + "Q", data, offset)
    if entries > MAX_TIFF_IFD_ENTRIES:
        raise ImageDecodeError(
            f"TIFF directory has {entries:,} entries, more than {MAX_TIFF_IFD_ENTRIES:,}", source
        )


def tiff_buffer_pixels(width: int, height: int, tile: tuple[int, int] | None) -> int:
    """Pixels libtiff decodes for an image: the image rounded up to whole tiles."""
    if tile is None:
        return width * height
    tw, th = max(1, tile[0]), max(1, tile[1])
    return max(width * height, -(-width // tw) * tw * (-(-height // th) * th), tw * th)
