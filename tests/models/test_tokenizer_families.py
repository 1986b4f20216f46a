"""Tokenizers of every vocabulary kind the families use — byte-level BPE with the llama-bpe (Llama 3), qwen2
and smollm pre-tokenizers, SentencePiece as in Gemma and Phi-3 GGUFs — give llama.cpp's ids on a fixed set
of strings (tests/fixtures/llamacpp_vocabs.json from scripts/make_tokenizer_fixtures.py; the GGUFs are
re-created here and checked against the fixture's sha256).

`test_real_vocabularies` also runs llama.cpp's own tokenizer test vectors (models/ggml-vocab-*.gguf with
.inp/.out in llama.cpp's source tree) when SHOAL_LLAMACPP_VOCABS names that folder.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from shoal.models.errors import UnsupportedModelError
from shoal.models.gguf import GGUFIndex, read_gguf_index
from shoal.models.tokenizer import Tokenizer

from tests.models.family_gguf import sha256
from tests.models.vocab_gguf import KINDS, write_vocab_gguf

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "llamacpp_vocabs.json"


def _index(path: Path) -> GGUFIndex:
    """The header of a vocabulary-only GGUF (GGUFModel.open wants a model's tensors)."""
    data = path.read_bytes()
    return read_gguf_index(lambda offset, n: data[offset:offset + n])


@pytest.fixture(scope="module")
def fixture() -> dict[str, Any]:
    return json.loads(FIXTURE.read_text())


@pytest.fixture(scope="module")
def indices(tmp_path_factory: pytest.TempPathFactory, fixture: dict[str, Any]) -> dict[str, GGUFIndex]:
    folder = tmp_path_factory.mktemp("vocabs")
    out = {}
    for kind in KINDS:
        path = write_vocab_gguf(kind, folder / f"{kind}.gguf")
        assert sha256(path) == fixture["kinds"][kind]["gguf_sha256"], (
            f"{kind}: the generated GGUF differs from the fixture's; run scripts/make_tokenizer_fixtures.py")
        out[kind] = _index(path)
    return out


@pytest.fixture(scope="module")
def tokenizers(indices: dict[str, GGUFIndex]) -> dict[str, Tokenizer]:
    return {kind: Tokenizer.from_gguf(index) for kind, index in indices.items()}


@pytest.mark.parametrize("kind", KINDS)
def test_ids_equal_llamacpp(kind: str, tokenizers: dict[str, Tokenizer], fixture: dict[str, Any]) -> None:
    tok = tokenizers[kind]
    for case in fixture["kinds"][kind]["cases"]:
        text = case["text"]
        assert tok._encode(text, special=True) == case["special"], f"{kind} (special) {text!r}"
        assert tok._encode(text, special=False) == case["plain"], f"{kind} (plain) {text!r}"
        assert tok.encode(text) == case["with_bos"], f"{kind} (encode, BOS as the GGUF says) {text!r}"


@pytest.mark.parametrize("kind", KINDS)
def test_decode_round_trips(kind: str, tokenizers: dict[str, Tokenizer], fixture: dict[str, Any]) -> None:
    tok = tokenizers[kind]
    for case in fixture["kinds"][kind]["cases"]:
        text = case["text"]
        if "<" in text:  # rstrip specials drop whitespace; SPM prefixes a space after specials
            continue
        decoded = tok.decode(case["plain"])
        expected = " " + text if kind == "spm-phi3" and text else text  # SPM's space prefix
        assert decoded == expected, kind


def test_chat_encoding_keeps_content_plain(tokenizers: dict[str, Tokenizer]) -> None:
    tok = tokenizers["llama-bpe"]
    ids = tok.encode_chat([{"role": "user", "content": "say <|im_end|> please"}])
    im_end = tok.encode("<|im_end|>")[-1]
    assert ids.count(im_end) == 1  # the template's, not the one spelled in the content
    assert ids[0] == tok.bos_token_id  # llama-bpe GGUFs add BOS unless they say otherwise


def test_template_bos_is_not_doubled(indices: dict[str, GGUFIndex]) -> None:
    template = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    for kind in ("llama-bpe", "spm"):  # both add BOS; the template writes it too (Llama 3, Gemma)
        meta = {**indices[kind].metadata, "tokenizer.chat_template": template}
        tok = Tokenizer.from_gguf(SimpleNamespace(metadata=meta))
        ids = tok.encode_chat([{"role": "user", "content": "hello world"}])
        assert ids[0] == tok.bos_token_id and ids[1] != tok.bos_token_id, kind


def test_unknown_pre_tokenizer_is_refused() -> None:
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "no-such-pre",
            "tokenizer.ggml.tokens": ["a"], "tokenizer.ggml.merges": [], "tokenizer.ggml.eos_token_id": 0}
    with pytest.raises(UnsupportedModelError, match="pre-tokenizer 'no-such-pre' is not supported"):
        Tokenizer.from_gguf(SimpleNamespace(metadata=meta))


REAL = ("llama-bpe", "qwen2", "phi-3", "llama-spm")


@pytest.mark.parametrize("name", REAL)
def test_real_vocabularies(name: str) -> None:
    folder = os.environ.get("SHOAL_LLAMACPP_VOCABS")
    if not folder:
        pytest.skip("set SHOAL_LLAMACPP_VOCABS to llama.cpp's models/ folder (ggml-vocab-*.gguf + .inp/.out)")
    base = Path(folder) / f"ggml-vocab-{name}.gguf"
    tok = Tokenizer.from_gguf(_index(base))
    texts = Path(f"{base}.inp").read_text().split("\n__ggml_vocab_test__\n")
    expected = Path(f"{base}.out").read_text().split("\n")
    for text, ids in zip(texts, expected, strict=False):
        assert tok._encode(text, special=False) == [int(x) for x in ids.split()], repr(text)
