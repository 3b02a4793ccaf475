"""Image decoding with limits: bytes or files -> uint8/uint16 numpy arrays (gray, RGB, RGBA).

The header is read first (Pillow, lazily, no pixels) so that oversized images are refused
before any allocation; pixels are then decoded by OpenCV, which releases the GIL and so
scales across a thread pool. Every failure is a typed `ImageDecodeError` naming the file.
"""

from __future__ import annotations

import io
from enum import StrEnum
from pathlib import Path

import cv2
import numpy as np
from PIL import BmpImagePlugin, Image, ImageFile, JpegImagePlugin, PngImagePlugin, TiffImagePlugin

from cellinspect.datasets.errors import (
    DataError,
    EmptyImageError,
    ImageDecodeError,
    ImageTooLargeError,
    TruncatedImageError,
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

_PNG_IEND = b"IEND\xaeB`\x82"
_JPEG_EOI = b"\xff\xd9"


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


def _is_truncated(data: bytes, fmt: ImageFormat) -> bool:
    """True when a JPEG lacks its EOI marker or a PNG its IEND chunk."""
    if fmt is ImageFormat.JPEG:
        # Some encoders pad files with zeros after EOI; libjpeg would silently fill a
        # truncated scan with gray, so a missing EOI must be caught here.
        return not data.rstrip(b"\x00").endswith(_JPEG_EOI)
    if fmt is ImageFormat.PNG:
        # Allow a little trailing junk (some tools append a newline or padding).
        return _PNG_IEND not in data[-64:]
    return False


def read_image_size(data: bytes, *, source: str | None = None) -> tuple[str, int, int]:
    """(format, width, height) from the header alone; no pixels are decoded."""
    if not data:
        raise EmptyImageError("empty image data (0 bytes)", source)
    fmt = _sniff(data, source)
    try:
        with _PIL_CLASSES[fmt](io.BytesIO(data)) as im:
            width, height = im.size
    except Image.DecompressionBombError as exc:  # defensive: should Pillow move its check
        raise ImageTooLargeError(f"{fmt} image too large ({exc})", source) from exc
    except Exception as exc:  # Pillow raises many types for bad headers; all mean "unreadable"
        if _is_truncated(data, fmt):
            raise TruncatedImageError(f"{fmt} data is truncated ({exc})", source) from exc
        raise ImageDecodeError(f"cannot read {fmt} header ({exc})", source) from exc
    return str(fmt), int(width), int(height)


def decode_image(
    data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, source: str | None = None
) -> np.ndarray:
    """Encoded bytes -> uint8/uint16 HxW (gray), HxWx3 (RGB) or HxWx4 (RGBA)."""
    fmt, width, height = read_image_size(data, source=source)
    if width * height > max_pixels:
        raise ImageTooLargeError(
            f"{fmt} image of {width}x{height} = {width * height:,} pixels exceeds the limit "
            f"of {max_pixels:,} pixels",
            source,
        )
    if _is_truncated(data, ImageFormat(fmt)):
        marker = "EOI marker (FF D9)" if fmt == ImageFormat.JPEG else "IEND chunk"
        raise TruncatedImageError(f"{fmt} data is truncated: no {marker} at the end", source)
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise ImageDecodeError(f"cannot decode {fmt} image data ({width}x{height})", source)
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
