"""`POST /v1/embeddings` (OpenAI) and the shared `embed_inputs` that Ollama's `/api/embed` uses too.

An embedding is the unit-length mean of the model's last hidden state over the input's tokens
(`models.embeddings`). `input` is a string, a list of strings, a list of token ids or a list of such lists
(at most `MAX_INPUTS`); `encoding_format` is `float` (default) or `base64` (little-endian float32, what the
`openai` client asks for); `dimensions` may only be the model's own. An input longer than the context is a
400 (`context_length_exceeded`), unless the caller truncates (Ollama's `truncate`, on by default). A model
this node does not hold is embedded by a peer that does (the router's stand-in, `split.remote_embed`), with
the same vectors; a model held here always embeds here.
"""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import numpy as np
from aiohttp import web
from shoal.mesh.api.errors import ApiError, invalid, json_response
from shoal.mesh.api.generation import acquire_model, tracked
from shoal.mesh.api.keys import NODE, ROUTER
from shoal.mesh.api.openai_routes import read_json
from shoal.models.errors import ContextOverflowError
from shoal.models.served import Servable

MAX_INPUTS = 256
ENCODINGS = ("float", "base64")


def parse_inputs(value: Any, param: str = "input") -> list[str | list[int]]:
    """`input` as a list of texts or token-id lists; 400 naming `param` when malformed."""
    if isinstance(value, str) or (isinstance(value, list) and value and all(_is_id(t) for t in value)):
        items: list[Any] = [value]
    elif isinstance(value, list) and value:
        items = value
    else:
        raise invalid(f"'{param}' must be a string, a list of strings, or token ids", param, "invalid_type")
    if len(items) > MAX_INPUTS:
        raise invalid(f"'{param}' may hold at most {MAX_INPUTS} inputs, got {len(items)}", param)
    for i, item in enumerate(items):
        ok = (isinstance(item, str) and item) or (isinstance(item, list) and item and all(map(_is_id, item)))
        if not ok:
            raise invalid(f"'{param}[{i}]' must be a non-empty string or list of token ids", f"{param}[{i}]",
                          "invalid_type")
    return items


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


async def embed_inputs(
    request: web.Request, name: str | None, inputs: list[str | list[int]], *, truncate: bool = False,
    param: str = "input",
) -> tuple[Servable, list[np.ndarray], int]:
    """The model, one unit vector per input, and the number of tokens embedded."""
    node = request.app[NODE]
    if node.draining:
        raise ApiError(503, "the node is shutting down", code="shutdown", type="server_error")
    router = request.app[ROUTER]
    served = await acquire_model(node, router, name or node.config.models.default)
    embedder = served.embedder
    if embedder is None and served.engine is None and router is not None:  # a stand-in for a peer's model
        embedder = await router.remote_embedder(served.name, served.config.hidden_size)
    if embedder is None:
        raise ApiError(400, f"{served.name} is not loaded on this node, so it cannot embed here",
                       param="model", code="embeddings_unavailable")
    loop = asyncio.get_running_loop()
    tokenizer = served.tokenizer
    context, vocab = served.context_length, tokenizer.vocab_size
    ids: list[list[int]] = []
    for i, item in enumerate(inputs):
        if isinstance(item, list):
            tokens = list(item)
        else:
            tokens = await loop.run_in_executor(None, tokenizer.encode, item)
        where = f"{param}[{i}]" if len(inputs) > 1 else param
        if not tokens:
            raise invalid(f"'{where}' holds no tokens", where)
        if max(tokens) >= vocab:
            raise invalid(f"token ids in '{where}' must be below the vocabulary size {vocab}", where)
        if len(tokens) > context:
            if not truncate:
                message = f"'{where}' has {len(tokens)} tokens; the model's context holds {context}"
                raise ApiError(400, message, param=where, code="context_length_exceeded")
            tokens = tokens[:context]
        ids.append(tokens)
    total = sum(len(t) for t in ids)
    async with tracked(request, served, [t for seq in ids for t in seq], "embd") as run:
        try:
            vectors = await loop.run_in_executor(None, embedder.embed, ids)
        except ContextOverflowError as exc:
            raise ApiError(400, str(exc), param=param, code="context_length_exceeded") from None
        run.status = "stop"
    return served, vectors, total


def _encoded(vector: np.ndarray, encoding: str) -> list[float] | str:
    if encoding == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode()
    return [float(x) for x in vector]


async def embeddings(request: web.Request) -> web.Response:
    body = await read_json(request)
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object", None, "invalid_type")
    model = body.get("model")
    if model is not None and (not isinstance(model, str) or not model):
        raise invalid("'model' must be a non-empty string", "model", "invalid_type")
    if body.get("input") is None:
        raise invalid("'input' is required", "input", "missing_required_parameter")
    inputs = parse_inputs(body["input"])
    encoding = body.get("encoding_format") or "float"
    if encoding not in ENCODINGS:
        raise invalid("'encoding_format' must be 'float' or 'base64'", "encoding_format")
    dimensions = body.get("dimensions")
    if dimensions is not None and (not _is_id(dimensions) or dimensions == 0):
        raise invalid("'dimensions' must be a positive integer", "dimensions", "invalid_type")
    served, vectors, total = await embed_inputs(request, model, inputs)
    if dimensions is not None and dimensions != served.config.hidden_size:
        raise invalid(f"'dimensions' must be {served.config.hidden_size} for {served.name} (no truncation)",
                      "dimensions", "unsupported_value")
    data = [{"object": "embedding", "index": i, "embedding": _encoded(v, encoding)}
            for i, v in enumerate(vectors)]
    return json_response({"object": "list", "data": data, "model": served.name,
                          "usage": {"prompt_tokens": total, "total_tokens": total}})


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/embeddings", embeddings)
