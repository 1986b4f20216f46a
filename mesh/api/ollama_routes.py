"""Ollama's own API (`/api/*`), which many desktop apps and editor plugins speak, over shoal's models.

`POST /api/chat` and `POST /api/generate` stream NDJSON (one JSON object a line, `done: true` on the last,
with token counts and durations in nanoseconds) unless `"stream": false`; they run through the same code as
the OpenAI routes (`mesh.api.generation`). `GET /api/tags`, `POST /api/show`, `GET /api/ps` and
`GET /api/version` describe the models (`/api/ps`: the loaded ones, with `expires_at` from their
`keep_alive`); `POST /api/embed` embeds (`mesh.api.embeddings_routes`); `POST
/api/pull` fetches a model over shoal's IPFS path (progress from the node's `pull.*` events). Errors keep
the API's one body shape
`{"error": {"message", "type", "param", "code"}}` (the `ollama` client raises `ResponseError` with it); an
error after the first line is a last line `{"error": {...}}`.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from typing import Any

import orjson
from aiohttp import web
from shoal.mesh.api.embeddings_routes import embed_inputs, parse_inputs
from shoal.mesh.api.errors import ApiError, invalid, json_response
from shoal.mesh.api.generation import Collected, collect, prepare, stream_frames, tracked
from shoal.mesh.api.keys import NODE, ROUTE_HEADER
from shoal.mesh.api.ollama_schema import (
    MODEL_TAG,
    OllamaRequest,
    WarmRequest,
    check_options,
    keep_alive,
    model_name,
    parse_chat,
    parse_generate,
    renamed,
)
from shoal.mesh.api.openai_routes import read_json
from shoal.mesh.api.records import RequestRecord
from shoal.mesh.api.structured import ToolCallStream, parse_call
from shoal.mesh.events import Event
from shoal.models.generate import EventLogprobs, TokenEvent

OLLAMA_VERSION = "0.12.0"
"""The Ollama release whose API this dialect follows (clients gate features on it)."""
NDJSON = "application/x-ndjson"
FOREVER_AT = "2262-04-11T23:47:16Z"
"""`expires_at` of a model kept loaded (negative keep_alive): Go's largest time, as Ollama shows it."""


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def _logprobs(events: list[EventLogprobs]) -> list[dict[str, Any]]:
    return [
        {"token": e.chosen.token, "logprob": e.chosen.logprob,
         "top_logprobs": [{"token": t.token, "logprob": t.logprob} for t in e.top]}
        for e in events
    ]


class _Answer:
    """The Ollama answer objects of one request: `chat` puts text in `message.content`, `generate` in
    `response` (and the token ids in `context` at the end)."""

    def __init__(self, kind: str, model: str, record: RequestRecord, prompt_ids: list[int]) -> None:
        self.kind = kind
        self.model = model
        self.record = record
        self.prompt_ids = prompt_ids
        self.t0 = time.perf_counter()

    def part(self, text: str, logprobs: list[EventLogprobs] | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, "created_at": _now()}
        if self.kind == "chat":
            body["message"] = {"role": "assistant", "content": text}
        else:
            body["response"] = text
        body["done"] = False
        if logprobs:
            body["logprobs"] = _logprobs(logprobs)
        return body

    def last(self, done: Collected, text: str = "", logprobs: list[EventLogprobs] | None = None,
             token_ids: list[int] | None = None, tools: bool = False) -> dict[str, Any]:
        call = parse_call(text) if tools and done.finish == "stop" else None
        body = self.part("" if call is not None else text, logprobs)
        if call is not None:
            fn = call["function"]
            body["message"]["tool_calls"] = [{"function": {"name": fn["name"],
                                                           "arguments": json.loads(fn["arguments"])}}]
        total = int((time.perf_counter() - self.t0) * 1e9)
        prompt_ns = int((self.record.ttft_s or 0.0) * 1e9)
        body.update(done=True, done_reason=done.finish, total_duration=total, load_duration=0,
                    prompt_eval_count=done.prompt_tokens, prompt_eval_duration=prompt_ns,
                    eval_count=done.completion_tokens, eval_duration=max(0, total - prompt_ns))
        if self.kind == "generate":
            body["context"] = self.prompt_ids + (token_ids or [])
        return body


class _NdjsonFramer:
    """Writes each token's text as one line, then the summary line."""

    def __init__(self, answer: _Answer, tools: bool = False) -> None:
        self.answer = answer
        self.response: web.StreamResponse | None = None
        self._held: list[EventLogprobs] = []
        self._ids: list[int] = []
        self._calls = ToolCallStream() if tools else None

    async def _line(self, payload: Any) -> None:
        assert self.response is not None
        await self.response.write(orjson.dumps(payload) + b"\n")

    async def open(self, request: web.Request) -> None:
        self.response = web.StreamResponse(headers={
            "Content-Type": NDJSON, "Cache-Control": "no-cache", "X-Accel-Buffering": "no",
            ROUTE_HEADER: self.answer.record.route.kind,
        })
        await self.response.prepare(request)

    async def token(self, event: TokenEvent) -> None:
        self._ids.append(event.token_id)
        if event.logprobs is not None:
            self._held.append(event.logprobs)
        if event.text and self._calls is not None:  # a call goes out whole, with the last line
            for delta in self._calls.push(event.text):
                if "content" in delta:
                    await self._line(self.answer.part(delta["content"], self._held))
                    self._held = []
        elif event.text:
            await self._line(self.answer.part(event.text, self._held))
            self._held = []

    async def finish(self, done: Collected) -> None:
        text = ""
        if self._calls is not None:
            pending = [d["content"] for d in self._calls.finish() if "content" in d]
            text = self._calls.text if self._calls.mode == "call" else "".join(pending)
        await self._line(self.answer.last(done, text, self._held, self._ids, self._calls is not None))
        assert self.response is not None
        await self.response.write_eof()

    async def error(self, error: dict[str, Any]) -> None:
        if self.response is not None:
            await self._line({"error": error})
            await self.response.write_eof()


async def _run(request: web.Request, kind: str, parsed: OllamaRequest, stream: bool) -> web.StreamResponse:
    req = parsed.completion
    try:
        served, prompt_ids, params = await prepare(request, req, parsed.body)
    except ApiError as exc:
        raise renamed(exc) from None
    if parsed.keep_alive is not None:  # how long it stays loaded after this request (0: unload at its end)
        request.app[NODE].models.set_keep_alive(served.name, parsed.keep_alive)
    async with tracked(request, served, prompt_ids, "ollama") as run:
        answer = _Answer(kind, served.name, run.record, prompt_ids)
        if stream:
            framer = _NdjsonFramer(answer, req.tools is not None)
            response, run.status = await stream_frames(request, req, served, prompt_ids, params, run.record,
                                                       framer)
            return response
        done = await collect(request, req, served, prompt_ids, params, run.record)
        if isinstance(done, web.Response):
            run.status = "refused"
            return done
        run.status = done.finish
        body = answer.last(done, done.text, done.logprobs, done.token_ids, req.tools is not None)
        return json_response(body, headers={ROUTE_HEADER: run.record.route.kind})


async def _warm(request: web.Request, kind: str, warm: WarmRequest) -> web.Response:
    """No messages / no prompt: load the model (Ollama's way to warm one up), or with `keep_alive: 0` unload
    it (at once when idle, else when its requests end)."""
    models = request.app[NODE].models
    if warm.keep_alive == 0:
        models.resolve(warm.model)  # 404 for an unknown model
        await models.release(warm.model)
        name, reason = warm.model, "unload"
    else:
        name, reason = (await models.acquire(warm.model, warm.keep_alive)).name, "load"
    body: dict[str, Any] = {"model": name, "created_at": _now()}
    if kind == "chat":
        body["message"] = {"role": "assistant", "content": ""}
    else:
        body["response"] = ""
    return json_response({**body, "done": True, "done_reason": reason})


async def chat(request: web.Request) -> web.StreamResponse:
    parsed, stream = parse_chat(await read_json(request))
    if isinstance(parsed, WarmRequest):
        return await _warm(request, "chat", parsed)
    return await _run(request, "chat", parsed, stream)


async def generate(request: web.Request) -> web.StreamResponse:
    parsed, stream = parse_generate(await read_json(request))
    if isinstance(parsed, WarmRequest):
        return await _warm(request, "generate", parsed)
    return await _run(request, "generate", parsed, stream)


def _details(entry: dict[str, Any]) -> dict[str, Any]:
    return {"parent_model": "", "format": "gguf", "family": entry.get("family", ""),
            "families": [entry["family"]] if entry.get("family") else None,
            "parameter_size": "", "quantization_level": ""}


def _tag(entry: dict[str, Any]) -> dict[str, Any]:
    shoal = entry.get("shoal") or {}
    created = datetime.fromtimestamp(entry.get("created") or 0, UTC).isoformat().replace("+00:00", "Z")
    return {"name": entry["id"] + MODEL_TAG, "model": entry["id"] + MODEL_TAG, "modified_at": created,
            "size": int(shoal.get("size") or 0), "digest": str(shoal.get("cid") or ""),
            "details": _details(entry)}


async def _entries(request: web.Request) -> list[dict[str, Any]]:
    models = request.app[NODE].models
    await models.refresh_async()
    return models.list_models()


async def tags(request: web.Request) -> web.Response:
    return json_response({"models": [_tag(e) for e in await _entries(request)]})


def _expires(at: float | None) -> str:
    if at is None:
        return FOREVER_AT
    return datetime.fromtimestamp(at, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _running(entry: dict[str, Any]) -> dict[str, Any]:
    """A loaded model as `/api/ps` lists it: `size` its memory (shoal's estimate), `size_vram` the part on a
    GPU (all of it for a CUDA build, else 0), `expires_at` when it unloads if it stays idle."""
    shoal = entry.get("shoal") or {}
    size = int(shoal.get("memory") or 0)
    on_gpu = "cuda" in (shoal.get("compiled_targets") or [])
    return {**_tag(entry), "size": size, "size_vram": size if on_gpu else 0,
            "expires_at": _expires(shoal.get("expires_at")), "context_length": shoal.get("context_length")}


async def ps(request: web.Request) -> web.Response:
    seen: set[str] = set()
    models = []
    for entry in await _entries(request):
        shoal = entry.get("shoal") or {}
        key = str(shoal.get("cid") or entry["id"])
        if shoal.get("state") == "loaded" and key not in seen:  # aliases of one model: listed once
            seen.add(key)
            models.append(_running(entry))
    return json_response({"models": models})


async def show(request: web.Request) -> web.Response:
    body = await read_json(request)
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object", None, "invalid_type")
    name = model_name(body.get("model", body.get("name")))
    entry = next((e for e in await _entries(request) if e["id"] == name), None)
    if entry is None:
        raise invalid(f"model {name!r} is not on this node (see /api/tags)", "model", "model_not_found")
    info: dict[str, Any] = {}
    if (entry.get("shoal") or {}).get("loaded"):  # keeping the keep_alive its last request set
        served = await request.app[NODE].models.acquire(name, (entry.get("shoal") or {}).get("keep_alive"))
        config = served.config
        arch = config.architecture
        info = {"general.architecture": arch, f"{arch}.context_length": served.context_length,
                f"{arch}.embedding_length": config.hidden_size, f"{arch}.block_count": config.num_layers,
                f"{arch}.attention.head_count": config.num_heads,
                f"{arch}.attention.head_count_kv": config.num_kv_heads,
                f"{arch}.vocab_size": config.vocab_size}
        entry = {**entry, "family": arch}
        parameters = "\n".join(f"{k} {v}" for k, v in served.sampling_defaults.items())
    else:
        parameters = ""
    return json_response({"modelfile": "", "parameters": parameters, "template": "",
                          "details": _details(entry), "model_info": info, "capabilities": ["completion"],
                          "modified_at": _tag(entry)["modified_at"]})


async def embed(request: web.Request) -> web.Response:
    """`{model, input, truncate?, dimensions?}` -> `{model, embeddings, prompt_eval_count, ...}`."""
    body = await read_json(request)
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object", None, "invalid_type")
    name = model_name(body.get("model"))
    inputs = parse_inputs(body.get("input"))
    truncate = body.get("truncate", True)
    if not isinstance(truncate, bool):
        raise invalid("'truncate' must be a boolean", "truncate", "invalid_type")
    check_options(body.get("options"))
    keep = keep_alive(body)
    started = time.perf_counter()
    served, vectors, total = await embed_inputs(request, name, inputs, truncate=truncate)
    models = request.app[NODE].models
    if keep == 0:
        await models.release(served.name)
    elif keep is not None:
        models.set_keep_alive(served.name, keep)
    dimensions = body.get("dimensions")
    if dimensions is not None and dimensions != served.config.hidden_size:
        raise invalid(f"'dimensions' must be {served.config.hidden_size} for {served.name} (no truncation)",
                      "dimensions", "unsupported_value")
    return json_response({"model": served.name, "embeddings": [[float(x) for x in v] for v in vectors],
                          "total_duration": int((time.perf_counter() - started) * 1e9), "load_duration": 0,
                          "prompt_eval_count": total})


def _pull_line(event: Event) -> dict[str, Any] | None:
    """A pull event as Ollama's progress object (None: the pull is over)."""
    data = event.data
    if event.kind == "pull.progress":
        cid = str(data.get("cid") or "")
        return {"status": f"pulling {cid[:16]}", "digest": cid, "total": data.get("bytes_total") or 0,
                "completed": data.get("bytes_done") or 0}
    return None


async def pull(request: web.Request) -> web.StreamResponse:
    """`{model, stream?}`: fetch a model over shoal's IPFS path (a catalog name or a CID); NDJSON progress
    `{status, digest, total, completed}` then `{"status": "success"}`, or just the last object unstreamed."""
    body = await read_json(request)
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object", None, "invalid_type")
    name = model_name(body.get("model", body.get("name")))
    stream = body.get("stream", True)
    if not isinstance(stream, bool):
        raise invalid("'stream' must be a boolean", "stream", "invalid_type")
    node = request.app[NODE]
    events = node.bus.subscribe()  # before the pull starts: no event is missed
    try:
        try:
            pull_id = node.start_pull(name)
        except LookupError as exc:
            raise ApiError(404, str(exc), param="model", code="model_not_found") from None
        except ConnectionError as exc:
            raise ApiError(503, str(exc), code="source_unavailable") from None
        response: web.StreamResponse | None = None
        if stream:
            response = web.StreamResponse(headers={"Content-Type": NDJSON, "Cache-Control": "no-cache"})
            await response.prepare(request)
            await response.write(orjson.dumps({"status": "pulling manifest"}) + b"\n")
        async for event in events:
            if event.data.get("pull_id") != pull_id or not event.kind.startswith("pull."):
                continue
            if event.kind == "pull.failed":
                error = ApiError(502, f"pulling {name} failed: {event.data.get('error')}", code="pull_failed")
                if response is None:
                    raise error
                await response.write(orjson.dumps(error.body()) + b"\n")
                break
            if event.kind == "pull.done":
                if response is None:
                    return json_response({"status": "success"})
                await response.write(orjson.dumps({"status": "success"}) + b"\n")
                break
            line = _pull_line(event)
            if line is not None and response is not None:
                await response.write(orjson.dumps(line) + b"\n")
        if response is None:  # the bus closed: the node is stopping
            raise ApiError(503, "the node stopped before the pull finished", code="shutdown")
        await response.write_eof()
        return response
    finally:
        events.close()


async def version(request: web.Request) -> web.Response:
    return json_response({"version": OLLAMA_VERSION, "shoal": request.app[NODE].version})


def add_routes(app: web.Application) -> None:
    app.router.add_post("/api/chat", chat)
    app.router.add_post("/api/generate", generate)
    app.router.add_get("/api/tags", tags)
    app.router.add_post("/api/show", show)
    app.router.add_get("/api/ps", ps)
    app.router.add_get("/api/version", version)
    app.router.add_post("/api/embed", embed)
    app.router.add_post("/api/pull", pull)
