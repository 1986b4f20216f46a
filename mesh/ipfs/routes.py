"""HTTP routes of the IPFS layer, added to the node's aiohttp app:

- `GET /ipfs/{cid}?format=raw|car` — a trustless gateway over the node's block store (also chosen by
  `Accept: application/vnd.ipld.raw|car`). CAR responses take `dag-scope=block|entity|all` (default all)
  and `entity-bytes=FROM:TO` (TO may be `*`; with it, only the blocks covering those file bytes).
- `POST /v1/models/pull` `{"model": NAME_OR_CID}` → 202 `{"pull_id", "cid"}`; progress on the event stream.
- `POST /v1/models/publish`: an upload (`Content-Type: application/octet-stream`, the file as the body,
  `?name=NAME&filename=FILE&cid_version=0|1`), or `{"path": FILE, "name"?: NAME}` for a file inside
  `[ipfs] publish_dirs` → `{"cid", "name", "size"}`. See `upload.py`.
- `GET /v1/ipfs/models` → what `shoal models` lists.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
from aiohttp import web
from multiformats import CID
from shoal.mesh.ipfs import car
from shoal.mesh.ipfs.car_producer import Buffer, CarProducer
from shoal.mesh.ipfs.catalog import check_name
from shoal.mesh.ipfs.cid import parse_cid
from shoal.mesh.ipfs.errors import CodecError, InvalidCidError, IpfsError, UnknownModelError
from shoal.mesh.ipfs.reader import decode_file_node
from shoal.mesh.ipfs.service import IpfsService
from shoal.mesh.ipfs.sources import RAW_CONTENT_TYPE
from shoal.mesh.ipfs.upload import PublishRefused, allowed_path, received_upload, upload_filename

logger = logging.getLogger(__name__)
ENTITY_BYTES = re.compile(r"^(\d+):(\d+|\*)$")


def _json_error(
    status: type[web.HTTPException], message: str, code: str, param: str | None = None
) -> web.HTTPException:
    """An HTTP error whose body has the API's shape `{"error": {"message", "type", "param", "code"}}`."""
    kind = "server_error" if status.status_code >= 500 else "invalid_request_error"
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return status(text=orjson.dumps(body).decode(), content_type="application/json")


def _missing_block(cid: CID) -> web.HTTPException:
    return _json_error(web.HTTPNotFound, f"block {cid} is not held by this node", "block_not_found", "cid")


def _refused(exc: PublishRefused) -> web.HTTPException:
    return _json_error(_STATUS[exc.status], str(exc), exc.code, exc.param)


class _UploadTooLarge(web.HTTPClientError):
    """413 without aiohttp's `max_size`/`actual_size` arguments (a stream has no size up front)."""

    status_code = 413


_STATUS: dict[int, type[web.HTTPException]] = {
    400: web.HTTPBadRequest,
    403: web.HTTPForbidden,
    404: web.HTTPNotFound,
    413: _UploadTooLarge,
}


def _wanted_format(request: web.Request) -> str | None:
    fmt = request.query.get("format")
    if fmt:
        return fmt
    accept = request.headers.get("Accept", "")
    if RAW_CONTENT_TYPE in accept:
        return "raw"
    if car.CONTENT_TYPE in accept:
        return "car"
    return None


def _entity_range(text: str | None) -> tuple[int, int | None] | None:
    if text is None:
        return None
    match = ENTITY_BYTES.match(text)
    if not match:
        raise _json_error(web.HTTPBadRequest, f"entity-bytes must be FROM:TO (TO a number or *), not {text}",
                          "invalid_value", "entity-bytes")
    start = int(match.group(1))
    end = None if match.group(2) == "*" else int(match.group(2)) + 1  # TO is inclusive
    if end is not None and end <= start:
        raise _json_error(web.HTTPBadRequest, "entity-bytes TO must not be below FROM", "invalid_value",
                          "entity-bytes")
    return start, end


class IpfsRoutes:
    def __init__(self, service: IpfsService) -> None:
        self.service = service

    async def get_ipfs(self, request: web.Request) -> web.StreamResponse:
        try:
            cid = parse_cid(request.match_info["cid"])
        except InvalidCidError as exc:
            raise _json_error(web.HTTPBadRequest, str(exc), "invalid_cid", "cid") from None
        fmt = _wanted_format(request)
        if fmt == "raw":
            block = await asyncio.to_thread(self.service.store.get, cid)
            if block is None:
                raise _missing_block(cid)
            return web.Response(body=block, content_type=RAW_CONTENT_TYPE,
                                headers={"Cache-Control": "public, max-age=29030400, immutable"})
        if fmt != "car":
            raise _json_error(web.HTTPNotAcceptable, "trustless gateway: ask for format=raw or format=car",
                              "not_acceptable", "format")
        scope = request.query.get("dag-scope", "all")
        if scope not in ("block", "entity", "all"):
            raise _json_error(web.HTTPBadRequest, f"dag-scope must be block, entity or all, not {scope}",
                              "invalid_value", "dag-scope")
        entity = _entity_range(request.query.get("entity-bytes"))
        if not await asyncio.to_thread(self.service.store.has, cid):
            raise _missing_block(cid)
        response = web.StreamResponse(headers={"Content-Type": f"{car.CONTENT_TYPE}; version=1",
                                               "X-Content-Type-Options": "nosniff"})
        body = aiter(self._car_body(cid, scope, entity))
        first = asyncio.ensure_future(anext(body, None))  # read the first batch while the length is summed
        try:
            if entity is None:  # a known length spares chunked framing (a copy of every byte)
                response.content_length = await self._car_length(cid, scope)
            await response.prepare(request)
            part = await first
            while part is not None:
                await response.write(part)
                part = await anext(body, None)
        except (IpfsError, CodecError) as exc:
            logger.warning("CAR for %s ended early: %s", cid, exc)  # the client sees a truncated CAR
            return response
        finally:
            first.cancel()
            with contextlib.suppress(asyncio.CancelledError, IpfsError, CodecError):
                await first
            await body.aclose()  # type: ignore[attr-defined]
        await response.write_eof()
        return response

    async def _car_length(self, root: CID, scope: str) -> int | None:
        """The CAR's length, or None when the store lacks part of the DAG (the stream then ends early)."""
        producer = CarProducer(self.service.store, root, scope="block" if scope == "block" else "all")
        try:
            return await asyncio.to_thread(producer.total_size)
        except (IpfsError, CodecError):
            return None

    async def _car_body(
        self, root: CID, scope: str, entity: tuple[int, int | None] | None
    ) -> AsyncIterator[Buffer]:
        if entity is None:
            async for part in self.service.car_stream(root, scope="block" if scope == "block" else "all"):
                yield part
            return
        yield car.encode_header([root])
        start, end = entity
        stack: list[tuple[CID, int, int | None]] = [(root, start, end)]
        pending: list[bytes] = []
        while stack:
            cid, lo, hi = stack.pop()
            block = await asyncio.to_thread(self.service.store.get, cid)
            if block is None:
                raise IpfsError(f"block {cid} is not in the local store")
            pending.append(car.encode_section(cid, block))
            if len(pending) >= 16:
                yield b"".join(pending)
                pending.clear()
            node = decode_file_node(cid, block)
            pos = len(node.data)
            children = []
            for child, size in node.children:
                c_lo, c_hi = max(lo, pos), size + pos if hi is None else min(hi, pos + size)
                if c_lo < c_hi:
                    children.append((child, c_lo - pos, c_hi - pos))
                pos += size
            stack.extend(reversed(children))
        if pending:
            yield b"".join(pending)

    async def post_pull(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        model = body.get("model")
        if not isinstance(model, str) or not model:
            message = 'body must be {"model": NAME_OR_CID}'
            raise _json_error(web.HTTPBadRequest, message, "invalid_type", "model")
        try:
            cid = self.service.resolve(model)
            pull_id = self.service.start_pull(model)
        except (UnknownModelError, InvalidCidError) as exc:
            raise _json_error(web.HTTPNotFound, str(exc), "model_not_found", "model") from None
        except IpfsError as exc:
            raise _json_error(web.HTTPServiceUnavailable, str(exc), "source_unavailable") from None
        return web.json_response({"pull_id": pull_id, "cid": str(cid), "model": model}, status=202)

    async def post_publish(self, request: web.Request) -> web.Response:
        """An upload (octet-stream body) or `{"path", "name"?}` inside `[ipfs] publish_dirs`."""
        try:
            if request.content_type == "application/octet-stream":
                name = _model_name(request.query.get("name"))
                filename = upload_filename(request.query.get("filename"))
                version = request.query.get("cid_version", "1")
                if version not in ("0", "1"):
                    raise PublishRefused(400, "invalid_value", "'cid_version' must be 0 or 1", "cid_version")
                folder = self.service.data_dir / "uploads"
                limit = self.service.config.max_upload_bytes
                async with received_upload(request, folder, filename, limit) as path:
                    return await self._publish(path, name, int(version))
            body = await _json_body(request)
            path_text, name = body.get("path"), body.get("name")
            if not isinstance(path_text, str) or not path_text:
                raise PublishRefused(400, "invalid_type", 'body must be {"path": FILE, "name": optional '
                                     'NAME}, or the file itself as application/octet-stream', "path")
            if name is not None and not isinstance(name, str):
                raise PublishRefused(400, "invalid_type", "'name' must be a string", "name")
            name = _model_name(name)
            path = await asyncio.to_thread(allowed_path, path_text, self.service.config.publish_dirs)
            return await self._publish(path, name)
        except PublishRefused as exc:
            raise _refused(exc) from None

    async def _publish(self, path: Path, name: str | None, cid_version: int = 1) -> web.Response:
        try:
            cid = await self.service.publish(path, name, cid_version=cid_version)
        except (IpfsError, ValueError, OSError) as exc:
            raise _json_error(web.HTTPBadRequest, f"cannot publish: {exc}", "publish_failed") from None
        size = await asyncio.to_thread(lambda: path.stat().st_size)
        return web.json_response({"cid": str(cid), "name": name, "size": size})

    async def get_models(self, request: web.Request) -> web.Response:
        return web.json_response({"models": await asyncio.to_thread(self.service.list_models)})


def _model_name(name: str | None) -> str | None:
    if not name:
        return None
    try:
        return check_name(name)
    except ValueError as exc:
        raise PublishRefused(400, "invalid_value", str(exc), "name") from None


async def _json_body(request: web.Request) -> dict:
    try:
        body = await request.json()
    except ValueError:
        raise _json_error(web.HTTPBadRequest, "body must be JSON", "invalid_json") from None
    if not isinstance(body, dict):
        raise _json_error(web.HTTPBadRequest, "body must be a JSON object", "invalid_type")
    return body


def add_routes(app: web.Application, service: IpfsService) -> None:
    routes = IpfsRoutes(service)
    app.router.add_get("/ipfs/{cid}", routes.get_ipfs)
    app.router.add_post("/v1/models/pull", routes.post_pull)
    app.router.add_post("/v1/models/publish", routes.post_publish)
    app.router.add_get("/v1/ipfs/models", routes.get_models)
