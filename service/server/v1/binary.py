"""multipart/form-data score bodies (PNG or JPEG files and an optional `alpha` field) and the v1 media types; the
payloads themselves are decoded by `oodserve.scoring.payloads`."""

from __future__ import annotations

from collections.abc import AsyncGenerator

import numpy as np
from starlette.datastructures import Headers, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from oodserve.bundle.manifest import InputSpec
from oodserve.scoring.payloads import PNG_OR_JPEG, pngs_to_images
from oodserve.server.errors import ApiError

NPY_MEDIA_TYPE = "application/x-npy"
PNG_MEDIA_TYPE = "image/png"
JPEG_MEDIA_TYPE = "image/jpeg"
MULTIPART_MEDIA_TYPE = "multipart/form-data"
MULTIPART_TEXT_FIELDS = ("alpha",)
"""Text fields a multipart body may carry besides its PNG files."""


async def _single_chunk(body: bytes) -> AsyncGenerator[bytes, None]:
    yield body


async def multipart_to_images(headers: Headers, body: bytes, spec: InputSpec, max_instances: int) -> tuple[np.ndarray, str | None]:
    """multipart/form-data with PNG files (any field names, in order) and optionally an `alpha` text field
    -> (validated images, alpha text or None). Malformed multipart: 400; unknown text fields: 422."""
    # The body size is already bounded; counting files here (not in the parser) lets too many be a 413.
    parser = MultiPartParser(
        headers, _single_chunk(body), max_files=len(body) // 64 + 1, max_fields=len(MULTIPART_TEXT_FIELDS) + 8, max_part_size=len(body) + 1
    )
    try:
        form = await parser.parse()
    except MultiPartException as error:
        raise ApiError(400, "malformed_multipart", f"multipart body cannot be parsed: {error.message}") from error
    files: list[tuple[str, bytes]] = []
    alpha: str | None = None
    try:
        for field_name, value in form.multi_items():
            if isinstance(value, UploadFile):
                files.append((f"file {len(files)} ({value.filename or field_name!r})", await value.read()))
            elif field_name in MULTIPART_TEXT_FIELDS:
                alpha = value
            else:
                raise ApiError(422, "invalid_request", f"unknown form field {field_name!r}; send PNG files and optionally `alpha`")
    finally:
        await form.close()
    return pngs_to_images(files, spec, max_instances, PNG_OR_JPEG), alpha
