"""The embedded model, loaded once per test process and shared by the model tests (loading and dequantizing
takes seconds; the suite's budget is minutes)."""

from __future__ import annotations

from functools import cache

import numpy as np
from shoal.models.embedded import embedded_model_path
from shoal.models.gguf import GGUFModel
from shoal.models.reference import ReferenceStage
from shoal.models.span import LayerSpan
from shoal.models.stage import Stage
from shoal.models.tokenizer import Tokenizer

PROMPTS = (
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
    "def fib(n):",
    "Translate 'good morning' into Spanish.",
)
"""The chat prompts the compiled builds are checked on (tests/models/test_compiled.py and
test_quantized_reference.py)."""


@cache
def gguf_model() -> GGUFModel:
    return GGUFModel.open(embedded_model_path())


@cache
def tokenizer() -> Tokenizer:
    return Tokenizer.from_gguf(gguf_model())


@cache
def dequantized(name: str) -> np.ndarray:
    """Dequantized tensors, memoised: stages built from them share the arrays they do not fuse."""
    array = gguf_model().dequantize(name)
    array.setflags(write=False)
    return array


@cache
def reference_stage(start: int, stop: int) -> ReferenceStage:
    """A shared stage: tests using it add and remove their own sequence ids (use ids unique to the test)."""
    return ReferenceStage(gguf_model(), LayerSpan(start, stop), load=dequantized)


def chat_ids(question: str) -> list[int]:
    return tokenizer().encode_chat([{"role": "user", "content": question}])


_next_seq_id = iter(range(1_000_000, 2_000_000))


def fresh_seq_id() -> int:
    """A sequence id no other test in this process uses."""
    return next(_next_seq_id)


def greedy(stages: list[Stage], prompt: list[int], steps: int) -> tuple[list[int], list[np.ndarray]]:
    """Greedy tokens and per-step logits through a chain of stages (one fresh sequence id in each)."""
    seq = fresh_seq_id()
    for stage in stages:
        stage.add_sequence(seq)
    try:
        x: np.ndarray = np.asarray(prompt, dtype=np.int32)
        for stage in stages:
            x = stage.prefill(seq, x)
        logits, tokens = [x], [int(np.argmax(x))]
        for _ in range(steps - 1):
            x = np.asarray([tokens[-1]], dtype=np.int32)
            for stage in stages:
                x = stage.decode([seq], x)
            logits.append(x[0])
            tokens.append(int(np.argmax(x[0])))
        return tokens, logits
    finally:
        for stage in stages:
            stage.remove_sequence(seq)


def teacher_forced(stage: Stage, prompt: list[int], tokens: list[int]) -> list[np.ndarray]:
    """Logits after `prompt`, then after each of `tokens` but the last (another engine's greedy run fed in),
    in one fresh sequence."""
    seq = fresh_seq_id()
    stage.add_sequence(seq)
    try:
        rows = [np.asarray(stage.prefill(seq, np.asarray(prompt, dtype=np.int32)))]
        for token in tokens[:-1]:
            rows.append(np.asarray(stage.decode([seq], np.asarray([token], dtype=np.int32)))[0])
        return rows
    finally:
        stage.remove_sequence(seq)

