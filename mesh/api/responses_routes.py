"""OpenAI's Responses API: `POST /v1/responses`, `GET /v1/responses/{id}`.

The body is read as a chat request (`responses_input`) and run through `mesh.api.generation`, so it is
served locally, offloaded or split like any completion. The answer is one output item: a `message` with an
`output_text` part, or, when the request has `tools` and the model calls one, a `function_call` item
(`call_id`, `name`, `arguments`: JSON text valid for the tool's parameters, enforced by the grammar path as
for chat). `status` is `completed`, or `incomplete` with `incomplete_details.reason: "max_output_tokens"`.

Streaming sends the typed events `response.created`, `response.in_progress`, then for a message
`response.output_item.added`, `response.content_part.added`, `response.output_text.delta`...,
`response.output_text.done`, `response.content_part.done`, `response.output_item.done`; for a call
`response.output_item.added` (the item with its name, `arguments: ""`),
`response.function_call_arguments.delta`..., `response.function_call_arguments.done`,
`response.output_item.done`; and `response.completed` (also when the answer was cut short; its `status` says
so), or `error` once streaming.

Answers are kept (`responses_store`, unless `store: false`) so a follow-up can name one in
`previous_response_id`, and `GET /v1/responses/{id}` returns it.
"""

from __future__ import annotations

import secrets
from typing import Any

import orjson
from aiohttp import web
from shoal.mesh.api.errors import ApiError, json_response
from shoal.mesh.api.generation import Collected, collect, prepare, stream_frames, tracked
from shoal.mesh.api.keys import ROUTE_HEADER
from shoal.mesh.api.openai_routes import read_json
from shoal.mesh.api.openai_schema import ROUTE_HEADER_IN
from shoal.mesh.api.records import RequestRecord
from shoal.mesh.api.responses_input import ResponsesRequest, parse_responses, renamed
from shoal.mesh.api.responses_store import RESPONSES, ResponseStore
from shoal.mesh.api.sse import open_sse
from shoal.mesh.api.structured import ToolCallStream, parse_call
from shoal.models.generate import TokenEvent


class _Response:
    """The response object at each stage of one request, and what the store keeps of it."""

    def __init__(self, record: RequestRecord, model: str, body: dict[str, Any], parsed: ResponsesRequest,
                 store: ResponseStore) -> None:
        self.id = "resp_" + record.id.split("-", 1)[-1]
        self.item_id = "msg_" + secrets.token_hex(12)
        self.call_item_id = "fc_" + secrets.token_hex(12)
        self.record = record
        self.model = model
        self.body = body
        self.parsed = parsed
        self.store = store

    def message(self, text: str, status: str = "completed") -> dict[str, Any]:
        return {"type": "message", "id": self.item_id, "status": status, "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": []}]}

    def call(self, call_id: str, name: str, arguments: str, status: str = "completed") -> dict[str, Any]:
        return {"type": "function_call", "id": self.call_item_id, "call_id": call_id, "name": name,
                "arguments": arguments, "status": status}

    def object(self, done: Collected | None, output: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        incomplete = done is not None and done.finish == "length"
        status = "in_progress" if done is None else ("incomplete" if incomplete else "completed")
        usage = None
        if done is not None:
            usage = {"input_tokens": done.prompt_tokens, "output_tokens": done.completion_tokens,
                     "total_tokens": done.prompt_tokens + done.completion_tokens,
                     "input_tokens_details": {"cached_tokens": 0},
                     "output_tokens_details": {"reasoning_tokens": 0}}
        body = self.body
        return {
            "id": self.id, "object": "response", "created_at": int(self.record.started), "status": status,
            "model": self.model, "output": output or [], "usage": usage, "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
            "instructions": body.get("instructions"), "max_output_tokens": body.get("max_output_tokens"),
            "temperature": body.get("temperature"), "top_p": body.get("top_p"),
            "parallel_tool_calls": body.get("parallel_tool_calls", True),
            "tool_choice": body.get("tool_choice") or ("auto" if self.parsed.tools else "none"),
            "tools": self.parsed.tools, "previous_response_id": body.get("previous_response_id"),
            "store": self.parsed.store, "text": body.get("text") or {"format": {"type": "text"}},
        }

    def answer(self, done: Collected, output: list[dict[str, Any]]) -> dict[str, Any]:
        """The final object, kept in the store when the request allows it."""
        obj = self.object(done, output)
        if self.parsed.store:
            item = output[0] if output else self.message("")
            if item["type"] == "function_call":
                said: dict[str, Any] = {"role": "assistant", "content": None, "tool_calls": [
                    {"id": item["call_id"], "type": "function",
                     "function": {"name": item["name"], "arguments": item["arguments"]}}]}
            else:
                said = {"role": "assistant", "content": item["content"][0]["text"]}
            self.store.put(self.id, obj, [*self.parsed.conversation, said])
        return obj


def _whole_output(answer: _Response, done: Collected) -> list[dict[str, Any]]:
    call = parse_call(done.text) if answer.parsed.req.tools is not None else None
    if call is None:
        return [answer.message(done.text)]
    return [answer.call(call["id"], call["function"]["name"], call["function"]["arguments"])]


class _EventFramer:
    """The Responses API's typed SSE events around one output item (text, or a tool call)."""

    def __init__(self, answer: _Response) -> None:
        self.answer = answer
        self.response: web.StreamResponse | None = None
        self._seq = 0
        self._text: list[str] = []
        self._calls = ToolCallStream() if answer.parsed.req.tools is not None else None
        self._item: str | None = None  # "message" or "function_call" once its output_item.added is out
        self._name = ""
        self._arguments: list[str] = []

    async def _event(self, kind: str, **payload: Any) -> None:
        assert self.response is not None
        data = {"type": kind, "sequence_number": self._seq, **payload}
        self._seq += 1
        await self.response.write(b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n")

    def _at(self) -> dict[str, Any]:
        return {"item_id": self.answer.item_id, "output_index": 0, "content_index": 0}

    async def open(self, request: web.Request) -> None:
        self.response = (await open_sse(request, {ROUTE_HEADER: self.answer.record.route.kind})).response
        await self._event("response.created", response=self.answer.object(None))
        await self._event("response.in_progress", response=self.answer.object(None))
        if self._calls is None:
            await self._open_message()

    async def _open_message(self) -> None:
        self._item = "message"
        await self._event("response.output_item.added", output_index=0,
                          item={**self.answer.message("", "in_progress"), "content": []})
        await self._event("response.content_part.added", **self._at(),
                          part={"type": "output_text", "text": "", "annotations": []})

    async def _text_delta(self, text: str) -> None:
        if self._item is None:
            await self._open_message()
        self._text.append(text)
        await self._event("response.output_text.delta", **self._at(), delta=text, logprobs=[])

    async def _deltas(self, deltas: list[dict[str, Any]]) -> None:
        """`ToolCallStream`'s chat deltas as Responses events."""
        for delta in deltas:
            if delta.get("content"):
                await self._text_delta(delta["content"])
            for call in delta.get("tool_calls", []):
                function = call["function"]
                if "name" in function:
                    self._item, self._name = "function_call", function["name"]
                    item = self.answer.call(call["id"], self._name, "", "in_progress")
                    await self._event("response.output_item.added", output_index=0, item=item)
                elif function.get("arguments"):
                    self._arguments.append(function["arguments"])
                    await self._event("response.function_call_arguments.delta", output_index=0,
                                      item_id=self.answer.call_item_id, delta=function["arguments"])

    async def token(self, event: TokenEvent) -> None:
        if not event.text:
            return
        if self._calls is None:
            await self._text_delta(event.text)
        else:
            await self._deltas(self._calls.push(event.text))

    async def finish(self, done: Collected) -> None:
        if self._calls is not None:
            await self._deltas(self._calls.finish())
        status = "incomplete" if done.finish == "length" else "completed"
        if self._item == "function_call":
            assert self._calls is not None
            arguments = "".join(self._arguments)
            await self._event("response.function_call_arguments.done", output_index=0,
                              item_id=self.answer.call_item_id, name=self._name, arguments=arguments)
            item = self.answer.call(self._calls.call_id, self._name, arguments, status)
        else:
            if self._item is None:
                await self._open_message()
            done.text = "".join(self._text)
            await self._event("response.output_text.done", **self._at(), text=done.text, logprobs=[])
            await self._event("response.content_part.done", **self._at(),
                              part={"type": "output_text", "text": done.text, "annotations": []})
            item = self.answer.message(done.text)
        await self._event("response.output_item.done", output_index=0, item=item)
        # `response.completed` even when cut short (its status says `incomplete`): the `openai` client's
        # stream helper waits for exactly this event
        await self._event("response.completed", response=self.answer.answer(done, [item]))
        assert self.response is not None
        await self.response.write_eof()

    async def error(self, error: dict[str, Any]) -> None:
        if self.response is not None:
            await self._event("error", code=error.get("code"), message=error.get("message"),
                              param=error.get("param"))
            await self.response.write_eof()


async def responses(request: web.Request) -> web.StreamResponse:
    body = await read_json(request)
    store = request.app[RESPONSES]
    parsed = parse_responses(body, store, request.headers.get(ROUTE_HEADER_IN))
    req = parsed.req
    try:
        served, prompt_ids, params = await prepare(request, req, parsed.chat)
    except ApiError as exc:
        raise renamed(exc) from None
    async with tracked(request, served, prompt_ids, "resp") as run:
        answer = _Response(run.record, served.name, body, parsed, store)
        if req.stream:
            response, run.status = await stream_frames(request, req, served, prompt_ids, params, run.record,
                                                       _EventFramer(answer))
            return response
        done = await collect(request, req, served, prompt_ids, params, run.record)
        if isinstance(done, web.Response):
            run.status = "refused"
            return done
        run.status = done.finish
        obj = answer.answer(done, _whole_output(answer, done))
        return json_response(obj, headers={ROUTE_HEADER: run.record.route.kind})


async def get_response(request: web.Request) -> web.Response:
    found = request.app[RESPONSES].get(request.match_info["response_id"])
    if found is None:
        raise ApiError(404, "no such response is kept on this node", param="response_id", code="not_found")
    return json_response(found.object)


def add_routes(app: web.Application) -> None:
    app[RESPONSES] = ResponseStore()
    app.router.add_post("/v1/responses", responses)
    app.router.add_get("/v1/responses/{response_id}", get_response)
