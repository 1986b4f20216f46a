"""What `POST /v1/models/publish` may import: a file inside `[ipfs] publish_dirs` (never any other server
path), or an upload — the request body, streamed to a temporary file under the data dir with a size bound."""

from __future__ import annotations

import asyncio
import re
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import BinaryIO

from aiohttp import web
from shoal.mesh.ipfs.errors import IpfsError

FILENAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
DEFAULT_FILENAME = "upload.gguf"
WRITE_BATCH = 4 << 20
"""Bytes gathered from the socket before one write in a worker thread."""


class PublishRefused(IpfsError):
    """A publish request the node will not carry out; `status`/`code`/`param` make its HTTP error."""

    def __init__(self, status: int, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.param = param


def allowed_path(text: str, publish_dirs: Iterable[str]) -> Path:
    """The real path of `text` when it names a file inside one of `publish_dirs` (symlinks resolved first,
    so a link cannot lead out); else PublishRefused. Blocks the event loop briefly (stat calls)."""
    roots = [Path(folder).expanduser().resolve() for folder in publish_dirs]
    if not roots:
        raise PublishRefused(
            403, "path_not_allowed", "this node publishes no server paths: upload the file (Content-Type: "
            "application/octet-stream), or list its folder in [ipfs] publish_dirs", "path")
    path = Path(text).expanduser()
    if not path.is_absolute():
        raise PublishRefused(400, "invalid_value", "'path' must be absolute", "path")
    try:
        real = path.resolve()
    except (OSError, RuntimeError):
        real = None
    if real is None or not any(real == root or real.is_relative_to(root) for root in roots):
        raise PublishRefused(403, "path_not_allowed", f"{text} is not inside [ipfs] publish_dirs", "path")
    if not real.is_file():
        raise PublishRefused(404, "file_not_found", f"{text} is not a file", "path")
    return real


def upload_filename(text: str | None) -> str:
    """The file name an upload is pinned under (`?filename=`): a plain name, no folders."""
    if text is None or text == "":
        return DEFAULT_FILENAME
    if not FILENAME.match(text):
        raise PublishRefused(400, "invalid_value", "'filename' must be 1-128 letters, digits, '.', '_' or "
                             "'-', starting with a letter or digit", "filename")
    return text


@asynccontextmanager
async def received_upload(
    request: web.Request, folder: Path, filename: str, limit: int
) -> AsyncIterator[Path]:
    """Stream the request body to `folder/<tmp>/filename` (at most `limit` bytes, else 413) and yield the
    path; the temporary folder is removed on exit, also when the client leaves mid-upload."""
    if request.content_length is not None and request.content_length > limit:
        message = f"the upload is {request.content_length} bytes; [ipfs] max_upload_bytes is {limit}"
        raise PublishRefused(413, "request_too_large", message)
    await asyncio.to_thread(folder.mkdir, parents=True, exist_ok=True)
    workdir = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix="upload-", dir=folder))
    target = workdir / filename
    try:
        handle: BinaryIO = await asyncio.to_thread(open, target, "wb")
        try:
            size = await _copy_body(request, handle, limit)
        finally:
            await asyncio.to_thread(handle.close)
        if size == 0:
            raise PublishRefused(400, "empty_upload", "the upload is empty")
        yield target
    finally:
        await asyncio.to_thread(shutil.rmtree, workdir, True)


async def _copy_body(request: web.Request, handle: BinaryIO, limit: int) -> int:
    size = 0
    batch = bytearray()
    write = handle.write
    async for chunk in request.content.iter_any():
        size += len(chunk)
        if size > limit:
            raise PublishRefused(413, "request_too_large",
                                 f"the upload exceeds [ipfs] max_upload_bytes ({limit})")
        batch += chunk
        if len(batch) >= WRITE_BATCH:
            await asyncio.to_thread(write, bytes(batch))
            batch.clear()
    if batch:
        await asyncio.to_thread(write, bytes(batch))
    await asyncio.to_thread(handle.flush)
    return size
