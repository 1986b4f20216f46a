"""Server-sent events over aiohttp: `open_sse` prepares the response, `SseWriter.send` writes one frame."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

DONE = b"data: [DONE]\n\n"


class SseWriter:
    """Writes `data: <json>\\n\\n` frames. `send` raises ConnectionResetError once the client has gone."""

    def __init__(self, response: web.StreamResponse) -> None:
        self.response = response

    async def send(self, payload: Any) -> None:
        await self.response.write(b"data: " + orjson.dumps(payload, option=orjson.OPT_NON_STR_KEYS) + b"\n\n")

    async def send_raw(self, frame: bytes) -> None:
        await self.response.write(frame)

    async def comment(self, text: str = "") -> None:
        """A keep-alive line that clients ignore."""
        await self.response.write(b": " + text.encode() + b"\n\n")

    async def done(self) -> None:
        await self.response.write(DONE)
        await self.response.write_eof()


async def open_sse(request: web.Request, headers: dict[str, str] | None = None) -> SseWriter:
    response = web.StreamResponse(
        status=200,
        headers={
            "Content-Type": "text/event-stream; charset=utf-8",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
            **(headers or {}),
        },
    )
    await response.prepare(request)
    return SseWriter(response)
