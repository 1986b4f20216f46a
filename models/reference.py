"""NumPy fp32 forward pass of a layer span: the correctness oracle and the runtime where TVM is missing.

The Llama decoder with each family's options (models/config.py): RMSNorm, RoPE NORM (llama.cpp's layout for
GGUF llama weights: rotate adjacent pairs (2i, 2i+1)) or NEOX (pairs (i, i + D/2): qwen2, qwen3, phi3,
gemma3), grouped-query attention (optionally sliding-window), QKV biases, per-head Q/K norms, post-norms,
SiLU- or GELU-gated MLP, scaled embeddings, logit soft-capping, optional tied head. Weights are dequantized
to fp32 for the span's tensors only. Implements the `models.stage.Stage` protocol (see its data contract).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from shoal.models.config import ModelConfig
from shoal.models.errors import ContextOverflowError
from shoal.models.gguf import GGUFModel
from shoal.models.reference_ops import gelu_tanh, linear, rms_norm, rope_neox, rope_norm, silu
from shoal.models.span import LayerSpan
from shoal.models.stage import StageDefaults
from shoal.models.weights import layer_tensor_names

__all__ = [
    "KV_CHUNK", "ReferenceStage", "gelu_tanh", "head_tensor_name", "rms_norm", "rope_neox", "rope_norm",
    "silu",
]
logger = logging.getLogger(__name__)

KV_CHUNK = 256
"""The KV cache of a sequence grows by this many positions at a time."""
_QUERY_BLOCK = 512
"""Prefill attention handles this many queries at once (bounds the score matrix's memory)."""


@dataclass
class _Layer:
    """One decoder layer's weights. The matrices are fp32 [out, in] here; a subclass overriding
    `_load_matrix` and `_project` holds them in its own form (models/reference_quant.py: packed blocks)."""

    attn_norm: np.ndarray  # [hidden]
    wqkv: Any  # [(H + 2 KV) * D, hidden]
    wo: Any  # [hidden, H * D]
    ffn_norm: np.ndarray  # [hidden]
    wgate_up: Any  # [2 F, hidden]
    wdown: Any  # [hidden, F]
    bqkv: np.ndarray | None = None  # [(H + 2 KV) * D] (qwen2)
    q_norm: np.ndarray | None = None  # [D] (qwen3, gemma3)
    k_norm: np.ndarray | None = None
    attn_post_norm: np.ndarray | None = None  # [hidden] (gemma3)
    ffn_post_norm: np.ndarray | None = None


class _SequenceCache:
    """Keys and values of one sequence for every layer of the span: [layers, kv_heads, capacity, head_dim]."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int) -> None:
        self.shape = (layers, kv_heads, 0, head_dim)
        self.k = np.zeros(self.shape, np.float32)
        self.v = np.zeros(self.shape, np.float32)
        self.length = 0

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def reserve(self, needed: int) -> None:
        if needed <= self.capacity:
            return
        cap = -(-needed // KV_CHUNK) * KV_CHUNK
        layers, kv_heads, _, head_dim = self.shape
        for name in ("k", "v"):
            grown = np.zeros((layers, kv_heads, cap, head_dim), np.float32)
            grown[:, :, :self.length] = getattr(self, name)[:, :, :self.length]
            setattr(self, name, grown)


def head_tensor_name(config: ModelConfig) -> str:
    """The GGUF tensor holding the output head (the token embedding when the head is tied)."""
    return "token_embd.weight" if config.tie_embeddings else "output.weight"


class ReferenceStage(StageDefaults):
    """A `Stage` computing layers `span` of `model` in NumPy fp32. Not thread-safe: callers serialise calls
    (the Engine does)."""

    def __init__(self, model: GGUFModel, span: LayerSpan, *, max_context: int | None = None,
                 load: Callable[[str], np.ndarray] | None = None) -> None:
        """`load(name)` gives a tensor as fp32 [out, in]: default `model.dequantize` (tests pass a cache)."""
        config = model.config
        span.check(config.num_layers)
        self.config: ModelConfig = config
        self.span = span
        self.max_context = min(max_context or config.context_length, config.context_length)
        load = load or model.dequantize
        self._is_first = span.is_first()
        self._is_last = span.is_last(config.num_layers)
        self._tensors = set(model.tensor_names())
        self.embedding = load("token_embd.weight") if self._is_first else None
        self.rope_factors = load("rope_freqs.weight") if config.rope_freq_factors else None
        self.layers = [self._load_layer(load, i) for i in range(span.start, span.stop)]
        self.output_norm: np.ndarray | None = None
        self.head: Any = None
        if self._is_last:
            self.output_norm = load("output_norm.weight")
            self.head = self._load_head(load)
        self._caches: dict[int, _SequenceCache] = {}
        self._closed = False

    def _load_head(self, load: Callable[[str], np.ndarray]) -> Any:
        """The output head in the form `_project` takes; a tied fp32 head shares the embedding's array."""
        if self.config.tie_embeddings and self.embedding is not None:
            return self.embedding
        return self._load_matrix(load, [head_tensor_name(self.config)])

    def _load_matrix(self, load: Callable[[str], np.ndarray], names: list[str]) -> Any:
        """The weight made of tensors `names` stacked along the output axis, in the form `_project` takes
        (here fp32 [out, in])."""
        parts = [load(name) for name in names]
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)

    def _project(self, x: np.ndarray, weight: Any) -> np.ndarray:
        """x [n, in] · weightᵀ -> [n, out]. Every matmul of the forward (layers and head) goes through here
        and every weight matrix comes from `_load_matrix`, so a subclass can swap the arithmetic
        (models/reference_quant.py)."""
        return linear(x, weight)

    def _load_layer(self, load: Callable[[str], np.ndarray], i: int) -> _Layer:
        names = layer_tensor_names(self.config, self._tensors, i)

        def vector(role: str) -> np.ndarray | None:
            if role not in names:
                return None
            parts = [load(n).reshape(-1) for n in names[role]]
            return parts[0] if len(parts) == 1 else np.concatenate(parts)

        return _Layer(
            attn_norm=load(names["attn_norm"][0]),
            wqkv=self._load_matrix(load, names["qkv"]),
            wo=self._load_matrix(load, names["o"]),
            ffn_norm=load(names["ffn_norm"][0]),
            wgate_up=self._load_matrix(load, names["gate_up"]),
            wdown=self._load_matrix(load, names["down"]),
            bqkv=vector("qkv_bias"), q_norm=vector("q_norm"), k_norm=vector("k_norm"),
            attn_post_norm=vector("attn_post_norm"), ffn_post_norm=vector("ffn_post_norm"),
        )

    # --- sequences ----------------------------------------------------------------------------------------

    def add_sequence(self, seq_id: int) -> None:
        self._check_open()
        if not isinstance(seq_id, int | np.integer) or seq_id < 0:
            raise ValueError(f"sequence id must be a non-negative int, not {seq_id!r}")
        if seq_id in self._caches:
            raise ValueError(f"sequence {seq_id} exists already")
        cfg = self.config
        self._caches[int(seq_id)] = _SequenceCache(len(self.layers), cfg.num_kv_heads, cfg.head_dim)

    def remove_sequence(self, seq_id: int) -> None:
        self._caches.pop(seq_id, None)

    def sequence_length(self, seq_id: int) -> int:
        return self._cache(seq_id).length

    def sequence_ids(self) -> list[int]:
        return list(self._caches)

    def _cache(self, seq_id: int) -> _SequenceCache:
        try:
            return self._caches[seq_id]
        except KeyError:
            raise ValueError(f"unknown sequence {seq_id}; call add_sequence first") from None

    # --- forward ------------------------------------------------------------------------------------------

    def prefill(self, seq_id: int, inputs: np.ndarray, *, all_logits: bool = False) -> np.ndarray:
        """Append `inputs` to `seq_id`. The last stage returns the last position's logits [vocab] (or every
        position's, [n, vocab], with `all_logits`, which teacher-forcing tests use)."""
        self._check_open()
        cache = self._cache(seq_id)
        hidden = self._input_hidden(inputs, what="prefill")
        n = hidden.shape[0]
        if n == 0:
            raise ValueError("prefill needs at least one token")
        self._check_room(seq_id, cache, n)
        cache.reserve(cache.length + n)
        positions = np.arange(cache.length, cache.length + n)
        for li, layer in enumerate(self.layers):
            hidden = self._layer(li, layer, hidden, [(cache, positions, slice(0, n))])
        cache.length += n
        if not self._is_last:
            return np.ascontiguousarray(hidden, dtype=np.float32)
        logits = self._logits(hidden if all_logits else hidden[-1:])
        return logits if all_logits else logits[0]

    def hidden_states(self, token_ids: np.ndarray) -> np.ndarray:
        """The final-normed hidden state at every position of `token_ids` [n, hidden], for embeddings; needs
        a whole-model stage and keeps no sequence."""
        self._check_open()
        if not (self._is_first and self._is_last) or self.output_norm is None:
            raise ValueError("hidden_states needs a stage holding every layer")
        cfg = self.config
        cache = _SequenceCache(len(self.layers), cfg.num_kv_heads, cfg.head_dim)  # private to this call
        hidden = self._input_hidden(token_ids, what="prefill")
        n = hidden.shape[0]
        if n == 0:
            raise ValueError("hidden_states needs at least one token")
        if n > self.max_context:
            raise ContextOverflowError(f"{n} tokens do not fit the context of {self.max_context}")
        cache.reserve(n)
        positions = np.arange(n)
        for li, layer in enumerate(self.layers):
            hidden = self._layer(li, layer, hidden, [(cache, positions, slice(0, n))])
        return np.ascontiguousarray(self._norm(hidden, self.output_norm), dtype=np.float32)

    def decode(self, seq_ids: list[int], inputs: np.ndarray) -> np.ndarray:
        self._check_open()
        if len(set(seq_ids)) != len(seq_ids):
            raise ValueError("decode got the same sequence twice in one batch")
        caches = [self._cache(s) for s in seq_ids]
        hidden = self._input_hidden(inputs, what="decode")
        if hidden.shape[0] != len(seq_ids):
            raise ValueError(f"decode got {hidden.shape[0]} inputs for {len(seq_ids)} sequences")
        for s, cache in zip(seq_ids, caches, strict=True):
            self._check_room(s, cache, 1)
            cache.reserve(cache.length + 1)
        rows = [(cache, np.array([cache.length]), slice(i, i + 1)) for i, cache in enumerate(caches)]
        for li, layer in enumerate(self.layers):
            hidden = self._layer(li, layer, hidden, rows)
        for cache in caches:
            cache.length += 1
        if not self._is_last:
            return np.ascontiguousarray(hidden, dtype=np.float32)
        return self._logits(hidden)

    def _check_room(self, seq_id: int, cache: _SequenceCache, n: int) -> None:
        if cache.length + n > self.max_context:
            raise ContextOverflowError(
                f"sequence {seq_id} would hold {cache.length + n} tokens, "
                f"past the context of {self.max_context}"
            )

    def _input_hidden(self, inputs: np.ndarray, what: str) -> np.ndarray:
        arr = np.asarray(inputs)
        if self._is_first:
            if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
                raise ValueError(f"{what} of the first stage takes a 1-D array of token ids, got {arr.dtype}"
                                 f"{list(arr.shape)}")
            if arr.size and (arr.min() < 0 or arr.max() >= self.config.vocab_size):
                raise ValueError(f"token ids must be in 0..{self.config.vocab_size - 1}")
            assert self.embedding is not None
            hidden = self.embedding[arr.astype(np.int64)]
            scale = self.config.embedding_scale
            return hidden if scale == 1.0 else hidden * np.float32(scale)
        if arr.ndim != 2 or arr.shape[1] != self.config.hidden_size:
            raise ValueError(f"{what} of stage {self.span} takes hidden states "
                             f"[n, {self.config.hidden_size}], got {list(arr.shape)}")
        return np.asarray(arr, dtype=np.float32)

    def _layer(self, li: int, layer: _Layer, x: np.ndarray,
               rows: list[tuple[_SequenceCache, np.ndarray, slice]]) -> np.ndarray:
        """One decoder layer over rows of x; `rows` maps each sequence to its positions and rows of x."""
        cfg = self.config
        heads, kv_heads, dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        n = x.shape[0]
        h = self._norm(x, layer.attn_norm)
        qkv = self._project(h, layer.wqkv)
        if layer.bqkv is not None:
            qkv = qkv + layer.bqkv
        q = qkv[:, :heads * dim].reshape(n, heads, dim)
        k = qkv[:, heads * dim:(heads + kv_heads) * dim].reshape(n, kv_heads, dim)
        v = qkv[:, (heads + kv_heads) * dim:].reshape(n, kv_heads, dim)
        if layer.q_norm is not None and layer.k_norm is not None:
            q = self._norm(q, layer.q_norm)
            k = self._norm(k, layer.k_norm)
        positions = np.concatenate([pos for _, pos, _ in rows])
        q = self._layer_rope(li, q, positions)
        k = self._layer_rope(li, k, positions)
        for cache, _, sl in rows:
            start = cache.length
            cache.k[li, :, start:start + sl.stop - sl.start] = k[sl].transpose(1, 0, 2)
            cache.v[li, :, start:start + sl.stop - sl.start] = v[sl].transpose(1, 0, 2)
        attn = self._project(self._attend_rows(li, q, rows), layer.wo)
        if layer.attn_post_norm is not None:
            attn = self._norm(attn, layer.attn_post_norm)
        x = x + attn
        h = self._norm(x, layer.ffn_norm)
        mlp = self._project(self._gated(self._project(h, layer.wgate_up)), layer.wdown)
        if layer.ffn_post_norm is not None:
            mlp = self._norm(mlp, layer.ffn_post_norm)
        return x + mlp

    # Hooks for the elementwise/reduction steps, so a subclass can reproduce another implementation's float
    # rounding (models/reference_quant.py) without copying the layer.

    def _norm(self, x: np.ndarray, weight: np.ndarray) -> np.ndarray:
        return rms_norm(x, weight, self.config.rms_eps)

    def _rope(self, x: np.ndarray, positions: np.ndarray) -> np.ndarray:
        return rope_norm(x, positions, self.config.rope_theta)

    def _layer_rope(self, li: int, x: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """RoPE of local layer `li`: the `_rope` hook for llama's single NORM rotation, else the family's."""
        cfg = self.config
        theta, scale = cfg.layer_rope(self.span.start + li)
        factors = self.rope_factors
        if not cfg.rope_neox and (theta, scale) == (cfg.rope_theta, 1.0) and factors is None:
            return self._rope(x, positions)
        if cfg.rope_neox:
            return rope_neox(x, positions, theta, scale, factors)
        return rope_norm(x, positions.astype(np.float64) * scale, theta, factors)

    def _gated(self, gate_up: np.ndarray) -> np.ndarray:
        """act(gate) · up for gate_up [n, 2F] = concat(gate, up); act is SiLU or GELU (tanh)."""
        ffn = self.config.intermediate_size
        act = gelu_tanh if self.config.activation == "gelu_tanh" else silu
        return act(gate_up[:, :ffn]) * gate_up[:, ffn:]

    def _attend_rows(self, li: int, q: np.ndarray,
                     rows: list[tuple[_SequenceCache, np.ndarray, slice]]) -> np.ndarray:
        """Attention output [n, H·D] of queries q [n, H, D] over layer `li`'s caches (which already hold the
        new keys), one `_attend` per sequence; a subclass may batch the sequences."""
        attn = np.empty((q.shape[0], q.shape[1] * q.shape[2]), np.float32)
        window = self.config.sliding_window if self.config.is_sliding(self.span.start + li) else 0
        extra = {"window": window} if window else {}
        for cache, _, sl in rows:
            stop = cache.length + sl.stop - sl.start
            attn[sl] = self._attend(q[sl], cache.k[li, :, :stop], cache.v[li, :, :stop], cache.length,
                                    **extra)
        return attn

    def _attend(self, q: np.ndarray, keys: np.ndarray, values: np.ndarray, past: int,
                window: int = 0) -> np.ndarray:
        """Causal GQA: q [n, H, D] at positions past..past+n-1; keys/values [KV, T, D], T = past + n. With
        a `window`, a query at position p sees keys at positions p - window < k <= p only."""
        n, heads, dim = q.shape
        kv_heads, total, _ = keys.shape
        group = heads // kv_heads
        scale = np.float32(self.config.softmax_scale)
        out = np.empty((n, heads, dim), np.float32)
        for b0 in range(0, n, _QUERY_BLOCK):
            b1 = min(n, b0 + _QUERY_BLOCK)
            m = b1 - b0
            # [KV, group * m, D]: head h uses kv head h // group.
            qg = q[b0:b1].reshape(m, kv_heads, group, dim).transpose(1, 2, 0, 3)
            qg = qg.reshape(kv_heads, group * m, dim)
            scores = np.matmul(qg, keys.transpose(0, 2, 1)) * scale  # [KV, group*m, T]
            if m > 1 or past + b0 + 1 < total or window:
                query_pos = past + b0 + np.tile(np.arange(m), group)  # row r is query r % m
                mask = np.arange(total)[None, :] > query_pos[:, None]
                if window:
                    mask |= np.arange(total)[None, :] <= query_pos[:, None] - window
                scores = np.where(mask[None], np.float32(-np.inf), scores)
            scores -= scores.max(axis=-1, keepdims=True)
            np.exp(scores, out=scores)
            scores /= scores.sum(axis=-1, keepdims=True)
            ctx = np.matmul(scores, values)  # [KV, group*m, D]
            out[b0:b1] = ctx.reshape(kv_heads, group, m, dim).transpose(2, 0, 1, 3).reshape(m, heads, dim)
        return out.reshape(n, heads * dim)

    def _logits(self, hidden: np.ndarray) -> np.ndarray:
        assert self.output_norm is not None and self.head is not None
        h = self._norm(hidden, self.output_norm)
        logits = self._project(h, self.head)
        cap = self.config.logit_softcap
        if cap:
            logits = np.float32(cap) * np.tanh(logits / np.float32(cap))
        return np.ascontiguousarray(logits, dtype=np.float32)

    def close(self) -> None:
        self._caches.clear()
        self.layers = []
        self.embedding = self.head = self.output_norm = None
        self._closed = True

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"stage {self.span} is closed")

    def __repr__(self) -> str:
        return f"ReferenceStage(span={self.span}, sequences={len(self._caches)})"
