"""Reading images out of requests: a raw body of an image type, or multipart form files."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request
from starlette.datastructures import UploadFile

from cellinspect.serving.errors import RequestError
from cellinspect.serving.limits import BodyTooLarge

RAW_TYPES = frozenset(
    {
        "image/jpeg",
        "image/png",
        "image/bmp",
        "image/x-ms-bmp",
        "image/tiff",
        "application/octet-stream",
    }
)
ACCEPTED = (
    "image/jpeg, image/png, image/bmp, image/tiff, application/octet-stream or multipart/form-data"
)


@dataclass(frozen=True)
class Upload:
    data: bytes
    filename: str | None = None


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def read_uploads(request: Request, *, max_files: int) -> list[Upload]:
    """All images of the request, in order. Raw bodies give one; multipart gives its file parts."""
    media = _media_type(request)
    if media in RAW_TYPES:
        return [Upload(await request.body())]
    if media != "multipart/form-data":
        raise RequestError(
            415,
            "unsupported_media_type",
            f"content type {media or '(none)'!r} not accepted; send {ACCEPTED}",
        )
    try:
        form = await request.form(max_files=max_files, max_fields=64)
    except BodyTooLarge:
        raise
    except Exception as exc:  # python-multipart and starlette raise several types for broken bodies
        raise RequestError(
            400, "malformed_multipart", f"malformed multipart body ({exc})"
        ) from None
    files = [v for _, v in form.multi_items() if isinstance(v, UploadFile)]
    if not files:
        raise RequestError(
            400, "no_image", "multipart body has no file part; send the image as a file field"
        )
    if len(files) > max_files:
        raise RequestError(413, "too_many_images", f"at most {max_files} images per request")
    return [Upload(await f.read(), f.filename) for f in files]


async def read_single(request: Request) -> Upload:
    uploads = await read_uploads(request, max_files=1)
    if len(uploads) != 1:
        raise RequestError(
            400, "one_image", "send exactly one image (use /v1/inspect/batch for several)"
        )
    return uploads[0]
