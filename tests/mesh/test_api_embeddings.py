"""Embeddings through the official clients against a real node: `/v1/embeddings` (`openai`: float and
base64, batches, token ids) and Ollama's `/api/embed`, checked against the NumPy forward computed here."""

from __future__ import annotations

from typing import Any

import aiohttp
import numpy as np
import pytest
from shoal.models.embedded import embedded_model_path
from shoal.models.embeddings import Embedder, mean_pool

from tests.mesh.api_harness import MODEL, NodeThread
from tests.models.shared_model import tokenizer

openai = pytest.importorskip("openai")
ollama = pytest.importorskip("ollama")

pytestmark = pytest.mark.timeout(300)
TEXTS = ["The cat sat on the mat.", "A cat was sitting on a mat.", "Quarterly revenue grew five percent."]


@pytest.fixture
def client(node: NodeThread) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=node.url + "/v1", api_key="unused", max_retries=0)


def test_mean_pool_is_a_unit_mean() -> None:
    hidden = np.array([[3.0, 0.0], [1.0, 0.0], [2.0, 3.0]], dtype=np.float32)
    assert mean_pool(hidden) == pytest.approx(np.array([2.0, 1.0]) / np.sqrt(5.0))
    assert not mean_pool(np.zeros((2, 3))).any()


async def test_openai_embeddings_float_and_base64(client: openai.AsyncOpenAI) -> None:
    floats = await client.embeddings.create(model=MODEL, input=TEXTS, encoding_format="float")
    packed = await client.embeddings.create(model=MODEL, input=TEXTS)  # the client asks for base64
    assert [d.index for d in floats.data] == [0, 1, 2]
    a, b, c = (np.array(d.embedding) for d in floats.data)
    assert a.shape == (576,) and np.linalg.norm(a) == pytest.approx(1.0, abs=1e-5)
    for got, want in zip(packed.data, floats.data, strict=True):
        assert np.array(got.embedding) == pytest.approx(np.array(want.embedding), abs=1e-6)
    assert a @ b > a @ c  # the paraphrase is closer than the unrelated sentence
    tok = tokenizer()
    assert floats.usage.prompt_tokens == sum(len(tok.encode(t)) for t in TEXTS)
    expected = Embedder(embedded_model_path()).embed([tok.encode(TEXTS[0])])[0]
    assert a == pytest.approx(expected, abs=1e-5)  # the node embeds as the NumPy forward does
    alone = await client.embeddings.create(model=MODEL, input=tok.encode(TEXTS[2]), encoding_format="float")
    assert np.array(alone.data[0].embedding) == pytest.approx(c, abs=1e-5)  # token ids, batch of one


async def test_ollama_embed(node: NodeThread) -> None:
    answer = await ollama.AsyncClient(host=node.url).embed(model=MODEL, input=TEXTS[:2])
    assert len(answer.embeddings) == 2 and len(answer.embeddings[0]) == 576
    assert answer.prompt_eval_count > 0
    again = await ollama.AsyncClient(host=node.url).embed(model=MODEL + ":latest", input=TEXTS[0])
    assert again.embeddings[0] == pytest.approx(answer.embeddings[0], abs=1e-6)


BAD = [
    ("/v1/embeddings", {"model": MODEL}, "input"),
    ("/v1/embeddings", {"model": MODEL, "input": []}, "input"),
    ("/v1/embeddings", {"model": MODEL, "input": ["ok", ""]}, "input[1]"),
    ("/v1/embeddings", {"model": MODEL, "input": [[1, 2], [10**7]]}, "input[1]"),
    ("/v1/embeddings", {"model": MODEL, "input": "x", "encoding_format": "int8"}, "encoding_format"),
    ("/v1/embeddings", {"model": MODEL, "input": "x", "dimensions": 64}, "dimensions"),
    ("/v1/embeddings", {"model": MODEL, "input": ["x"] * 300}, "input"),
    ("/api/embed", {"model": MODEL, "input": 5}, "input"),
    ("/api/embed", {"model": MODEL, "input": "x", "truncate": "yes"}, "truncate"),
]


@pytest.mark.parametrize(("path", "body", "param"), BAD)
async def test_bad_requests_are_400_naming_the_field(node: NodeThread, path: str, body: dict[str, Any],
                                                     param: str) -> None:
    async with aiohttp.ClientSession() as session, session.post(node.url + path, json=body) as r:
        data = await r.json()
    assert r.status == 400, data
    assert data["error"]["param"] == param and data["error"]["code"]


async def test_too_long_input_is_refused_or_truncated(node: NodeThread) -> None:
    ids = [1] * 9000  # past the 8192-token context
    async with aiohttp.ClientSession() as session:
        async with session.post(node.url + "/v1/embeddings", json={"model": MODEL, "input": ids}) as r:
            data = await r.json()
        assert r.status == 400 and data["error"]["code"] == "context_length_exceeded", data
        body = {"model": MODEL, "input": [ids], "truncate": False}
        async with session.post(node.url + "/api/embed", json=body) as r:
            assert r.status == 400
