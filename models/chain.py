"""`StageChain`: the blocking work of the engine's steps over a chain of stages, one call at a time.

Stage i's output feeds stage i + 1; the spans must tile the model's layers in order. Every method blocks
(the engine runs them in its executor thread) and holds the chain's lock, since stages are not thread-safe.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np
from shoal.models.requests import Request, sample_row
from shoal.models.stage import Stage


class StageChain:
    """Stages whose spans tile [0, num_layers) in order (checked)."""

    def __init__(self, stages: Sequence[Stage]) -> None:
        if not stages:
            raise ValueError("an engine needs at least one stage")
        expected = 0
        for st in stages:
            if st.span.start != expected:
                raise ValueError(f"stage spans must tile the layers in order; got {st.span} after {expected}")
            expected = st.span.stop
        config = stages[0].config
        if expected != config.num_layers:
            raise ValueError(f"stage spans end at layer {expected}, the model has {config.num_layers}")
        self.stages = list(stages)
        self.config = config
        self.lock = threading.Lock()

    @property
    def waits_on_peers(self) -> bool:
        """A decode step blocks on another device (`Stage.waits_on_peers`; a pipeline's chain may change)."""
        return any(st.waits_on_peers for st in self.stages)

    def remove(self, seq_ids: list[int]) -> None:
        """Free the KV caches of `seq_ids` in every stage (idempotent)."""
        with self.lock:
            for st in self.stages:
                for seq_id in seq_ids:
                    st.remove_sequence(seq_id)

    def prefill(self, req: Request, chunk: list[int], is_last: bool) -> int | None:
        """Feed one prompt chunk of `req` (adding the sequence first); the first token after the last one."""
        with self.lock:
            if req.prefilled == 0:
                for st in self.stages:
                    st.add_sequence(req.seq_id)
            x: np.ndarray = np.asarray(chunk, dtype=np.int32)
            for st in self.stages:
                x = st.prefill(req.seq_id, x)
        return req.sampler.next_token(x) if is_last else None

    def decode(self, batch: list[Request]) -> list[int | Exception]:
        """One decode step of `batch`: each request's next token, or the error its own sampler raised. A
        last stage with `decode_argmax` takes the argmax itself when every request is plain greedy."""
        seq_ids = [r.seq_id for r in batch]
        *body, last = self.stages
        with self.lock:
            x: np.ndarray = np.asarray([r.output[-1] for r in batch], dtype=np.int32)
            for st in body:
                x = st.decode(seq_ids, x)
            tokens = None
            if all(r.params.plain_greedy for r in batch):
                tokens = last.decode_argmax(seq_ids, x)  # None unless offered: the logits stay where they are
            if tokens is None:
                x = last.decode(seq_ids, x)
        if tokens is None:
            return [sample_row(r, row) for r, row in zip(batch, x, strict=True)]
        for req, token in zip(batch, tokens, strict=True):
            req.sampler.accept(token)
        return list(tokens)

    def untouched(self, batch: list[Request]) -> list[Request]:
        """The requests whose KV caches hold, in every stage, what they held before a decode step of them
        failed (prompt + output but the last token): they can safely run that step again."""
        clean = []
        with self.lock:
            for req in batch:
                expected = len(req.prompt) + len(req.output) - 1
                try:
                    if all(st.sequence_length(req.seq_id) == expected for st in self.stages):
                        clean.append(req)
                except Exception:
                    continue
        return clean
