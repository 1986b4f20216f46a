"""Grammar-constrained decoding with `llguidance`: the tokens a request may sample next, as a mask on its
logits, so the output always matches a JSON Schema (or any JSON object, or a Lark grammar).

`Constraint` says what the output must match (part of `SamplingParams`, so it travels with a request);
`GrammarMatcher` is one request's parser state: `apply(logits)` sets every token the grammar forbids to
-inf, `accept(token)` advances it. When the grammar is complete only the end-of-sequence tokens stay allowed,
so generation stops with `finish_reason: "stop"`. Requests without a constraint never touch this module.

Why llguidance: it has no Python dependencies (xgrammar needs torch, triton and transformers, and pins its own
apache-tvm-ffi beside the TVM shoal runs), and it computes a mask for SmolLM2's 49,152-token vocabulary in
well under a millisecond (bench/grammar_mask.py; docs/api.md has the numbers).
"""

from __future__ import annotations

import json
import threading
import weakref
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from shoal.models.tokenizer import Tokenizer

ConstraintKind = Literal["json_schema", "json_object", "lark"]
MAX_GRAMMAR_CHARS = 64_000
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
"""JSON as `json.dumps` writes it: a small model left free to add whitespace may never close the document."""


class GrammarError(ValueError):
    """The constraint is not a grammar llguidance accepts (a bad schema), or the output left it."""


@dataclass(frozen=True)
class Constraint:
    """What a request's output must match."""

    kind: ConstraintKind
    spec: str = ""
    """`json_schema`: the schema as JSON text; `lark`: the grammar; `json_object`: unused."""

    def __post_init__(self) -> None:
        if self.kind not in ("json_schema", "json_object", "lark"):
            raise ValueError(f"constraint kind must be json_schema, json_object or lark, not {self.kind!r}")
        if len(self.spec) > MAX_GRAMMAR_CHARS:
            raise ValueError(f"the grammar is over {MAX_GRAMMAR_CHARS} characters")

    @classmethod
    def json_schema(cls, schema: dict[str, Any]) -> Constraint:
        return cls("json_schema", json.dumps(schema))  # key order kept: it is the order properties come out

    def grammar(self) -> str:
        """The llguidance grammar text."""
        import llguidance

        if self.kind == "json_object":
            return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"},
                                                                 overrides=JSON_OPTIONS)  # type: ignore[arg-type]
        if self.kind == "json_schema":
            try:
                return llguidance.LLMatcher.grammar_from_json_schema(
                    self.spec, overrides=JSON_OPTIONS)  # type: ignore[arg-type]
            except ValueError as exc:
                raise GrammarError(f"the JSON schema is not valid: {exc}") from None
        return llguidance.LLMatcher.grammar_from_lark(self.spec)


_tokenizers: weakref.WeakKeyDictionary[Tokenizer, Any] = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def grammar_tokenizer(tokenizer: Tokenizer, vocab_size: int) -> Any:
    """llguidance's view of `tokenizer` (built once per tokenizer: ~1 s), with `vocab_size` mask bits and the
    tokenizer's stop tokens as end-of-sequence."""
    import llguidance

    with _lock:
        found = _tokenizers.get(tokenizer)
        if found is None or found.vocab_size != vocab_size:
            eos = sorted(tokenizer.stop_token_ids)
            found = llguidance.LLTokenizer(tokenizer.hf_json(), n_vocab=vocab_size, eos_token=eos)
            _tokenizers[tokenizer] = found
        return found


def check_constraint(constraint: Constraint, tokenizer: Tokenizer, vocab_size: int) -> None:
    """Raise GrammarError (with llguidance's message) if `constraint` does not compile."""
    import llguidance

    lltok = grammar_tokenizer(tokenizer, vocab_size)
    message = llguidance.LLMatcher.validate_grammar(constraint.grammar(), lltok)
    if message and not message.startswith("WARNING"):
        raise GrammarError(f"the {constraint.kind.replace('_', ' ')} cannot be enforced: {message}")


class GrammarMatcher:
    """One request's position in its grammar. Not thread-safe (the engine's executor thread owns it)."""

    def __init__(self, constraint: Constraint, tokenizer: Tokenizer, vocab_size: int) -> None:
        import llguidance

        self.constraint = constraint
        self._matcher = llguidance.LLMatcher(grammar_tokenizer(tokenizer, vocab_size), constraint.grammar(),
                                             log_level=0)
        if self._matcher.is_error():
            raise GrammarError(f"the {constraint.kind.replace('_', ' ')} cannot be enforced: "
                               f"{self._matcher.get_error()}")
        self.vocab_size = vocab_size
        self._bits = np.zeros((vocab_size + 31) // 32, dtype=np.int32)

    def allowed(self) -> np.ndarray:
        """Boolean mask [vocab_size] of the tokens the grammar allows next."""
        self._matcher.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
        return np.unpackbits(self._bits.view(np.uint8), bitorder="little")[: self.vocab_size].astype(bool)

    def apply(self, logits: np.ndarray) -> np.ndarray:
        """`logits` with every token the grammar forbids at -inf."""
        allowed = self.allowed()
        if not allowed.any():  # cannot happen for a valid grammar; fail loudly rather than sample noise
            raise GrammarError(f"the grammar allows no token here: {self._matcher.get_error()}")
        return np.where(allowed[: logits.shape[-1]], logits, np.float32(-np.inf)).astype(np.float32)

    def accept(self, token: int) -> None:
        if not self._matcher.consume_token(int(token)):
            raise GrammarError(f"token {token} left the grammar: {self._matcher.get_error()}")

    @property
    def done(self) -> bool:
        """The grammar is complete: only end-of-sequence may follow."""
        return self._matcher.is_stopped()
