"""Image decoding with limits: bytes or files -> uint8/uint16 numpy arrays (gray, RGB, RGBA).

The container's skeleton is checked first (`containers`: bounded chunk and marker walks),
then the header is read (Pillow, lazily, no pixels) so that oversized images are refused
before any allocation; pixels are then decoded by OpenCV, which releases the GIL and so
scales across a thread pool. Every failure is a typed `ImageDecodeError` naming the file.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import cv2
import numpy as np
from PIL import BmpImagePlugin, Image, ImageFile, JpegImagePlugin, PngImagePlugin, TiffImagePlugin

from cellinspect.datasets.containers import (
    PngLayout,
    check_jpeg,
    check_png,
    check_png_inflation,
    check_tiff,
    tiff_buffer_pixels,
)
from cellinspect.datasets.errors import (
    DataError,
    EmptyImageError,
    ImageDecodeError,
    ImageTooLargeError,
    UnsupportedImageError,
)

DEFAULT_MAX_PIXELS = 40_000_000


class ImageFormat(StrEnum):
    """Container formats we decode; the names match Pillow's `Image.format`."""

    PNG = "PNG"
    JPEG = "JPEG"
    BMP = "BMP"
    TIFF = "TIFF"


SUPPORTED_FORMATS = ", ".join(ImageFormat)

# Magic bytes -> format. Sniffing ourselves keeps Pillow's other plugins (a wider attack
# surface) out of the path of untrusted uploads.
_MAGIC: tuple[tuple[bytes, ImageFormat], ...] = (
    (b"\x89PNG\r\n\x1a\n", ImageFormat.PNG),
    (b"\xff\xd8\xff", ImageFormat.JPEG),
    (b"BM", ImageFormat.BMP),
    (b"II*\x00", ImageFormat.TIFF),
    (b"MM\x00*", ImageFormat.TIFF),
    (b"II+\x00", ImageFormat.TIFF),  # BigTIFF
    (b"MM\x00+", ImageFormat.TIFF),
)
# Recognised but refused, so the message can say what the file actually is.
_UNSUPPORTED_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"),
    (b"\xff\x4f\xff\x51", "JPEG 2000"),
    (b"8BPS", "PSD"),
    (b"\x00\x00\x01\x00", "ICO"),
    (b"%PDF", "PDF"),
)

# Plugin classes are constructed directly instead of through `Image.open`: `Image.open`
# applies Pillow's global MAX_IMAGE_PIXELS (warning, then DecompressionBombError) and we
# must not mutate that global, so our `max_pixels` would otherwise not be the one deciding.
_PIL_CLASSES: dict[ImageFormat, type[ImageFile.ImageFile]] = {
    ImageFormat.PNG: PngImagePlugin.PngImageFile,
    ImageFormat.JPEG: JpegImagePlugin.JpegImageFile,
    ImageFormat.BMP: BmpImagePlugin.BmpImageFile,
    ImageFormat.TIFF: TiffImagePlugin.TiffImageFile,
}


@dataclass(frozen=True)
class _Header:
    format: ImageFormat
    width: int
    height: int
    buffer_pixels: int  # what the decoder allocates and fills; a TIFF's tiles round it up
    png: PngLayout | None = None


def _sniff(data: bytes, source: str | None) -> ImageFormat:
    for magic, fmt in _MAGIC:
        if data.startswith(magic):
            return fmt
    name: str | None = None
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        name = "WEBP"
    else:
        name = next((n for magic, n in _UNSUPPORTED_MAGIC if data.startswith(magic)), None)
    what = f"{name} images are not supported" if name else "not a recognised image format"
    raise UnsupportedImageError(f"{what} (supported: {SUPPORTED_FORMATS})", source)


def _read_header(data: bytes, source: str | None) -> _Header:
    """Container checks first (they bound what Pillow's parser walks), then Pillow's header."""
    if not data:
        raise EmptyImageError("empty image data (0 bytes)", source)
    fmt = _sniff(data, source)
    png = None
    if fmt is ImageFormat.PNG:
        png = check_png(data, source=source)
    elif fmt is ImageFormat.JPEG:
        check_jpeg(data, source=source)
    elif fmt is ImageFormat.TIFF:
        check_tiff(data, source=source)
    tile = None
    try:
        with _PIL_CLASSES[fmt](io.BytesIO(data)) as im:
            width, height = im.size
            if isinstance(im, TiffImagePlugin.TiffImageFile):
                tags = im.tag_v2
                if TiffImagePlugin.TILEWIDTH in tags:
                    tile = (
                        int(tags[TiffImagePlugin.TILEWIDTH]),
                        int(tags.get(TiffImagePlugin.TILELENGTH, 0)),
                    )
    except Image.DecompressionBombError as exc:  # defensive: should Pillow move its check
        raise ImageTooLargeError(f"{fmt} image too large ({exc})", source) from exc
    except Exception as exc:  # Pillow raises many types for bad headers; all mean "unreadable"
        raise ImageDecodeError(f"cannot read {fmt} header ({exc})", source) from exc
    width, height = int(width), int(height)
    return _Header(fmt, width, height, tiff_buffer_pixels(width, height, tile), png)


def read_image_size(data: bytes, *, source: str | None = None) -> tuple[str, int, int]:
    """(format, width, height) from the header alone; no pixels are decoded."""
    header = _read_header(data, source)
    return str(header.format), header.width, header.height


def decode_image(
    data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, source: str | None = None
) -> np.ndarray:
    """Encoded bytes -> uint8/uint16 HxW (gray), HxWx3 (RGB) or HxWx4 (RGBA)."""
    header = _read_header(data, source)
    fmt, width, height = header.format, header.width, header.height
    if width * height > max_pixels:
        raise ImageTooLargeError(
            f"{fmt} image of {width}x{height} = {width * height:,} pixels exceeds the limit "
            f"of {max_pixels:,} pixels",
            source,
        )
    if header.buffer_pixels > max_pixels:
        raise ImageTooLargeError(
            f"{fmt} image of {width}x{height} is stored in tiles that make the decoder fill "
            f"{header.buffer_pixels:,} pixels, over the limit of {max_pixels:,} pixels",
            source,
        )
    if header.png is not None:
        check_png_inflation(data, header.png, source=source)
    try:
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error as exc:  # OpenCV asserts on some headers that Pillow accepted
        reason = str(getattr(exc, "err", "") or "refused by OpenCV")
        raise ImageDecodeError(
            f"cannot decode {fmt} image data ({width}x{height}): {reason}", source
        ) from None
    if image is None:
        raise ImageDecodeError(f"cannot decode {fmt} image data ({width}x{height})", source)
    if image.shape[:2] != (height, width):
        # Two parsers read the header: were they ever to disagree, the limit checked above
        # would not be the one the pixels obeyed.
        raise ImageDecodeError(
            f"{fmt} header says {width}x{height} but the data decodes to "
            f"{image.shape[1]}x{image.shape[0]}",
            source,
        )
    if fmt == ImageFormat.TIFF and image.dtype == np.uint8 and image.shape[2:] == (4,):
        return _decode_tiff_rgba(data, source)
    return _to_rgb(image, fmt, source)


def _decode_tiff_rgba(data: bytes, source: str | None) -> np.ndarray:
    """8-bit RGBA TIFF via Pillow: OpenCV (libtiff's RGBA reader) premultiplies the colour."""
    try:
        with TiffImagePlugin.TiffImageFile(io.BytesIO(data)) as im:
            return np.array(im.convert("RGBA"))
    except Exception as exc:
        raise ImageDecodeError(f"cannot decode TIFF image data ({exc})", source) from exc


def _to_rgb(image: np.ndarray, fmt: str, source: str | None) -> np.ndarray:
    """OpenCV's BGR(A) channel order -> RGB(A); check the pixel type."""
    if image.dtype not in (np.uint8, np.uint16):
        raise UnsupportedImageError(
            f"{fmt} pixel type {image.dtype} is not supported (expected uint8 or uint16)", source
        )
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 2:
        return image
    channels = image.shape[2] if image.ndim == 3 else None
    if channels == 3:
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    if channels == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2RGBA)
    raise UnsupportedImageError(
        f"{fmt} image with shape {image.shape} is not supported (expected 1, 3 or 4 channels)",
        source,
    )


def read_bytes(path: str | Path) -> bytes:
    """A file's bytes, with DataError (naming the path) when it is missing or not a file."""
    path = Path(path)
    try:
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise DataError("file not found", path) from exc
    except IsADirectoryError as exc:
        raise DataError("is a directory, not an image file", path) from exc
    except OSError as exc:
        raise DataError(f"cannot read file ({exc.strerror or exc})", path) from exc


def read_image(path: str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read and decode an image file; errors name the path."""
    return decode_image(read_bytes(path), max_pixels=max_pixels, source=str(path))


def encode_png(image: np.ndarray) -> bytes:
    """uint8/uint16 gray, RGB or RGBA array -> PNG bytes (channel order preserved)."""
    if image.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"cannot encode pixel type {image.dtype} as PNG; expected uint8/uint16")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 3 and image.shape[2] == 3:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    elif image.ndim == 3 and image.shape[2] == 4:
        image = cv2.cvtColor(image, cv2.COLOR_RGBA2BGRA)
    elif image.ndim != 2:
        raise ValueError(f"expected a gray, RGB or RGBA image, got shape {image.shape}")
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(image))
    if not ok:
        raise ValueError(f"OpenCV could not encode an image of shape {image.shape} as PNG")
    return buf.tobytes()
