"""The decoder of every family shoal runs (llama, qwen2, qwen3, phi3, gemma3: models/config.py) in
`tvm.relax.frontend.nn`, buildable for one layer range (a shard). One layer class with the families' options
(QKV bias, per-head Q/K norm, post-norms, GELU, scaled embeddings, soft-capped logits, sliding-window layers);
the GGUF tensor names behind each parameter live in models/weights.py.

A shard runs the decoder layers of a `LayerSpan`. The first shard owns the token embedding and takes int32
token ids; the others take float32 hidden states [b, s, hidden]. The last shard owns the final RMSNorm and the
output head (tied to the embedding when the GGUF has no `output.weight`) and returns logits — for prefill only
the last position's; the others return hidden states.

Exported functions (`LlamaShard.get_default_spec`):
- `prefill(inputs, paged_kv_cache[, sliding_kv_cache], params)`: one sequence, `seq_len` tokens (symbolic).
- `decode(inputs, paged_kv_cache[, sliding_kv_cache], params)`: one sequence, one token (static shapes).
- `batch_decode(inputs, paged_kv_cache[, sliding_kv_cache], params)`: `batch_size` sequences, one token each.
- `create_paged_kv_cache(max_batch_size, max_total_seq_len, prefill_chunk_size, page_size,
  support_sliding_window)`: TVM's paged KV cache holding this shard's layers only (local layer ids 0..n-1).
- `create_sliding_kv_cache(...)` (same arguments), only where `separate_sliding_cache` (llvm builds of
  gemma3 shards with sliding layers, models/sliding_cache.py): the sliding-window layers' own cache, bounded
  by the window plus a prefill chunk; the full cache keeps the global layers and numbers the positions (Q/K
  are rotated from its absolute query positions). The functions then take both caches.

Attention goes through the KV cache's `attention_with_fused_qkv`, which applies RoPE. llama.cpp's GGUF
stores llama Q/K rows for the interleaved ("NORM", GPT-J style) rotation, so the cache uses `RopeMode.NORMAL`
with the `gptj` frequency style (FACTS.md); the NEOX families use the default (half-split) style. Gemma 3's
local and global layers rotate with different bases, which the cache (one base) cannot do: its shards rotate
Q/K themselves (`RopeMode.NONE`, positions from the cache). Sliding-window layers are a second cache's
layers on llvm (`create_sliding_kv_cache`), the one cache's `mha_sliding` layers on CUDA.

Linear layers are made by `make_linear`, so a quantized building block can replace `nn.Linear` per
quantization without touching the model code. Parameter names follow `weight_names()`'s mapping.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from shoal.models.block_types import TensorTypes
from shoal.models.config import ModelConfig
from shoal.models.native import NativePlan
from shoal.models.sliding_cache import models_own_rope, separate_sliding_cache
from shoal.models.span import LayerSpan
from shoal.models.weights import QUANTIZATIONS
from tvm import relax as rx
from tvm import te, tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op
from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache, RopeMode, TIRPagedKVCache
from tvm.target import Target

LinearFactory = Callable[[int, int, str], nn.Module]
"""(in_features, out_features, role) -> module mapping [b, s, in] to [b, s, out]; role names the weight."""


class F32Linear(nn.Module):
    """y = x @ weight with the weight stored [in, out] (transposed once at load), so the compiled matmul
    streams it row by row with the output axis innermost and vectorized (models/schedule.py)."""

    def __init__(self, in_features: int, out_features: int):
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter((in_features, out_features), dtype="float32")

    def forward(self, x: Tensor) -> Tensor:
        return op.matmul(x, self.weight)


def _f32_linear(in_features: int, out_features: int, role: str) -> nn.Module:
    del role
    return F32Linear(in_features, out_features)


def linear_factory(quantization: str, target: Target, native: NativePlan | None = None) -> LinearFactory:
    """The linear-layer builder for `quantization` (one of `QUANTIZATIONS`) on `target`; a "native" build
    needs the GGUF's tensor types (`native`, models/native.py) and keeps each weight's block type."""
    if quantization == "native":
        if native is None:
            raise ValueError("a native build needs the GGUF's tensor types (tensor_types=...)")
        return native.linear_factory(target)
    if quantization == "f32":
        return _f32_linear
    if quantization == "q4_1":
        from shoal.models.kernels.relax_ops import QuantizedLinear, kernel_backend

        backend = kernel_backend(target)

        def quantized(in_features: int, out_features: int, role: str) -> nn.Module:
            del role
            return QuantizedLinear(in_features, out_features, "q4_1", backend)

        return quantized
    raise ValueError(f"unknown quantization {quantization!r}; choose one of {', '.join(QUANTIZATIONS)}")


class Bias(nn.Module):
    """A learned bias added to the last axis (qwen2's QKV biases), kept out of the linear-layer seam."""

    def __init__(self, features: int):
        self.bias = nn.Parameter((features,), dtype="float32")

    def forward(self, x: Tensor) -> Tensor:
        return x + self.bias


def vector_backend(target: Target) -> str | None:
    """The kernel backend of the CPU vector RMSNorm and gated activations (models/kernels/norm_act_cpu.py)
    on an llvm target, in every build type; None elsewhere: CUDA keeps TVM's `rms_norm`, `silu`, `gelu`."""
    if target.kind.name != "llvm":
        return None
    from shoal.models.kernels.relax_ops import kernel_backend

    return kernel_backend(target)


def _rms_norm(features: int, eps: float, backend: str | None) -> nn.Module:
    """The vector kernel where `backend` is a CPU one and features % 16 == 0, else `nn.RMSNorm`."""
    from shoal.models.kernels.relax_ops import rms_norm_module

    return rms_norm_module(features, eps, backend)


class RopeFactors(nn.Module):
    """The GGUF's `rope_freqs.weight` [head_dim / 2]: RoPE frequency i is divided by weight[i] (Llama 3.1)."""

    def __init__(self, pairs: int):
        self.weight = nn.Parameter((pairs,), dtype="float32")


def rope(x: Tensor, positions: Tensor, theta: float, scale: float, neox: bool,
         factors: Tensor | None = None) -> Tensor:
    """Rotate x [b, s, heads, D] by position · scale: pairs (i, i + D/2) (llama.cpp NEOX) or (2i, 2i + 1)
    (NORM), frequency i = theta^(-2i/D) / factors[i]; positions are the cache's query positions [b · s]."""

    def compute(t: te.Tensor, pos: te.Tensor, *rest: te.Tensor) -> te.Tensor:
        b, s, heads, _ = t.shape
        dim = int(t.shape[3])
        half = dim // 2

        def element(i: Any, j: Any, h: Any, d: Any) -> Any:
            pair = d % half if neox else d // 2
            exponent = tirx.Cast("float32", pair * 2) / tirx.const(float(dim), "float32")
            angle = (tirx.Cast("float32", pos[i * s + j]) * tirx.const(scale, "float32")
                     / tirx.power(tirx.const(theta, "float32"), exponent))
            if rest:
                angle = angle / rest[0][pair]
            if neox:
                rotated = tirx.if_then_else(d < half, -t[i, j, h, d + half], t[i, j, h, d - half])
            else:
                rotated = tirx.if_then_else(d % 2 == 0, -t[i, j, h, d + 1], t[i, j, h, d - 1])
            return t[i, j, h, d] * tirx.cos(angle) + rotated * tirx.sin(angle)

        return te.compute((b, s, heads, dim), element, name="rope")

    return op.tensor_expr_op(compute, "rope", [x, positions] + ([factors] if factors is not None else []))


def kv_cache_dtype(quantization: str, target: Target) -> str:
    """The KV cache's element type: float16 for quantized builds on the CPU (llama.cpp keeps F16 K/V too;
    half the memory and the decode attention's stream), float32 for `f32` builds (the exact counterpart of
    the NumPy reference) and on CUDA (its kernels are unchanged)."""
    return "float16" if quantization != "f32" and target.kind.name == "llvm" else "float32"


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig, make_linear: LinearFactory, layer: int,
                 kv_dtype: str = "float32", vector: str | None = None):
        """`kv_dtype`: the KV cache's element type; Q/K/V enter the cache in it, the output returns to
        float32. `vector`: `vector_backend(target)` (the Q/K norms' kernel)."""
        self.kv_dtype = kv_dtype
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.sm_scale = config.softmax_scale
        qkv_rows = (config.num_heads + 2 * config.num_kv_heads) * config.head_dim
        self.qkv_proj = make_linear(config.hidden_size, qkv_rows, "qkv")
        if config.qkv_bias:
            self.qkv_bias = Bias(qkv_rows)
        if config.qk_norm:
            self.q_norm = _rms_norm(config.head_dim, config.rms_eps, vector)
            self.k_norm = _rms_norm(config.head_dim, config.rms_eps, vector)
        # (theta, scale) when this model rotates Q/K itself (models_own_rope), else None: the cache does
        self.rope = config.layer_rope(layer) if models_own_rope(config) else None
        self.neox = config.rope_neox
        self.o_proj = make_linear(config.num_heads * config.head_dim, config.hidden_size, "o")

    def forward(self, x: Tensor, paged_kv_cache: PagedKVCache, layer_id: int,
                rope_factors: Tensor | None = None, positions: Tensor | None = None) -> Tensor:
        """`positions`: the tokens' absolute positions [b · s] when this model rotates Q/K itself (from the
        shard's full-attention cache: a sliding-window cache reports positions within its window)."""
        b, s, _ = x.shape
        qkv = self.qkv_proj(x)
        if hasattr(self, "qkv_bias"):
            qkv = self.qkv_bias(qkv)
        qkv = op.reshape(qkv, (b, s, self.num_heads + 2 * self.num_kv_heads, self.head_dim))
        if hasattr(self, "q_norm") or self.rope is not None:
            q, k, v = op.split(qkv, [self.num_heads, self.num_heads + self.num_kv_heads], axis=2)
            if hasattr(self, "q_norm"):
                q, k = self.q_norm(q), self.k_norm(k)
            if self.rope is not None:
                if positions is None:
                    positions = paged_kv_cache.get_query_positions(b * s)
                q, k = (rope(t, positions, *self.rope, self.neox, rope_factors) for t in (q, k))
            qkv = op.concat([q, k, v], dim=2)
        if self.kv_dtype != "float32":  # the cache takes Q/K/V in its own element type
            qkv = qkv.astype(self.kv_dtype)
        out = paged_kv_cache.attention_with_fused_qkv(layer_id, qkv, self.num_heads, sm_scale=self.sm_scale)
        if self.kv_dtype != "float32":
            out = out.astype("float32")
        return self.o_proj(op.reshape(out, (b, s, self.num_heads * self.head_dim)))


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig, make_linear: LinearFactory, vector: str | None = None):
        """`vector`: `vector_backend(target)`: on the CPU the gate_up projection and act(gate)·up (SiLU or
        tanh-GELU) run as one fused kernel where its weight has one integer block type — in prefill writing
        the down projection's quantized activations — else the projection and then one vector kernel for
        act(gate)·up (relax_blocks.gated_mlp); None: TVM's split + activation · up."""
        self.intermediate_size = config.intermediate_size
        self.activation = config.activation
        self.vector = vector
        self.gate_up_proj = make_linear(config.hidden_size, 2 * config.intermediate_size, "gate_up")
        self.down_proj = make_linear(config.intermediate_size, config.hidden_size, "down")

    def forward(self, x: Tensor) -> Tensor:
        from shoal.models.kernels.relax_blocks import gated_mlp

        return gated_mlp(self.gate_up_proj, self.down_proj, x, self.activation, self.vector)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, make_linear: LinearFactory, layer: int,
                 kv_dtype: str = "float32", vector: str | None = None):
        """`layer`: the global index of this layer (sliding window and RoPE base depend on it); `vector`:
        `vector_backend(target)`, the norms' and the MLP activation's CPU kernels (None: TVM's ops)."""
        eps, hidden = config.rms_eps, config.hidden_size
        self.input_layernorm = _rms_norm(hidden, eps, vector)
        self.self_attn = LlamaAttention(config, make_linear, layer, kv_dtype, vector)
        self.post_attention_layernorm = _rms_norm(hidden, eps, vector)  # HF's name: the pre-MLP norm
        self.mlp = LlamaMLP(config, make_linear, vector)
        if config.post_norms:
            self.attn_post_norm = _rms_norm(hidden, eps, vector)
            self.ffn_post_norm = _rms_norm(hidden, eps, vector)

    def forward(self, x: Tensor, paged_kv_cache: PagedKVCache, layer_id: int,
                rope_factors: Tensor | None = None, positions: Tensor | None = None) -> Tensor:
        attn = self.self_attn(self.input_layernorm(x), paged_kv_cache, layer_id, rope_factors, positions)
        if hasattr(self, "attn_post_norm"):
            attn = self.attn_post_norm(attn)
        x = x + attn
        mlp = self.mlp(self.post_attention_layernorm(x))
        if hasattr(self, "ffn_post_norm"):
            mlp = self.ffn_post_norm(mlp)
        return x + mlp


def _last_position(x: Tensor) -> Tensor:
    """[b, s, h] -> [b, 1, h]: the last position of each row (prefill needs only its logits)."""

    def compute(t: te.Tensor) -> te.Tensor:
        b, s, h = t.shape
        return te.compute((b, 1, h), lambda i, _j, k: t[i, s - 1, k], name="last_position")

    return op.tensor_expr_op(compute, "last_position", [x])


class LlamaShard(nn.Module):
    """Decoder layers `span` of `config`, with embedding (first shard) and norm + head (last shard)."""

    def __init__(
        self, config: ModelConfig, span: LayerSpan, target: Target, quantization: str = "f32",
        tensor_types: TensorTypes | None = None,
    ) -> None:
        """`tensor_types`: the GGUF's per-tensor block types, for quantization="native"."""
        span.check(config.num_layers)
        self.config = config
        self.span = span
        self.target = target
        self.quantization = quantization
        self.is_first = span.is_first()
        self.is_last = span.is_last(config.num_layers)
        native = NativePlan(config, span, tensor_types) if tensor_types is not None else None
        make_linear = linear_factory(quantization, target, native)
        # The f32 head keeps its own transposed [hidden, vocab] copy of a tied embedding; a quantized head
        # reads the embedding's blocks (models/kernels).
        shared_head = self.is_last and config.tie_embeddings and quantization != "f32"
        if self.is_first or shared_head:
            self.embed_tokens = _make_embedding(config, quantization, target, native)
        self.kv_dtype = kv_cache_dtype(quantization, target)
        self.sliding_cache = separate_sliding_cache(config, span, target.kind.name)
        sliding = [config.is_sliding(i) and self.sliding_cache for i in range(span.start, span.stop)]
        self.cache_layers = [(s, sum(t == s for t in sliding[:i])) for i, s in enumerate(sliding)]
        """Per layer: (in the sliding cache, its layer id in that cache)."""
        vector = vector_backend(target)
        self.layers = nn.ModuleList([LlamaDecoderLayer(config, make_linear, i, self.kv_dtype, vector)
                                     for i in range(span.start, span.stop)])
        if config.rope_freq_factors:
            self.rope_freqs = RopeFactors(config.head_dim // 2)
        if self.is_last:
            self.norm = _rms_norm(config.hidden_size, config.rms_eps, vector)
            if not shared_head:
                self.lm_head = make_linear(config.hidden_size, config.vocab_size, "head")

    def _body(self, inputs: Tensor, paged_kv_cache: PagedKVCache,
              sliding_kv_cache: PagedKVCache | None = None) -> Tensor:
        h = self.embed_tokens(inputs) if self.is_first else inputs
        if self.is_first and self.config.embedding_scale != 1.0:
            h = h * self.config.embedding_scale
        factors = self.rope_freqs.weight if hasattr(self, "rope_freqs") else None
        positions = None
        if self.sliding_cache:  # absolute positions come from the full cache (the sliding one's restart)
            positions = paged_kv_cache.get_query_positions(inputs.shape[0] * inputs.shape[1])
        for layer, (sliding, cache_layer) in zip(self.layers, self.cache_layers, strict=True):
            cache = sliding_kv_cache if sliding else paged_kv_cache
            h = layer(h, cache, cache_layer, factors, positions)
        return h

    def _head(self, h: Tensor) -> Tensor:
        h = self.norm(h)
        logits = self.lm_head(h) if hasattr(self, "lm_head") else self.embed_tokens.project(h)
        cap = self.config.logit_softcap
        return op.tanh(logits / cap) * cap if cap else logits

    def prefill(self, inputs: Tensor, paged_kv_cache: PagedKVCache,
                sliding_kv_cache: PagedKVCache | None = None) -> Tensor:
        h = self._body(inputs, paged_kv_cache, sliding_kv_cache)
        return self._head(_last_position(h)) if self.is_last else h

    def decode(self, inputs: Tensor, paged_kv_cache: PagedKVCache,
               sliding_kv_cache: PagedKVCache | None = None) -> Tensor:
        h = self._body(inputs, paged_kv_cache, sliding_kv_cache)
        return self._head(h) if self.is_last else h

    def batch_decode(self, inputs: Tensor, paged_kv_cache: PagedKVCache,
                     sliding_kv_cache: PagedKVCache | None = None) -> Tensor:
        """`decode` for a symbolic batch; `decode` itself is compiled for batch 1 with static shapes, which
        spares the VM its per-step shape arithmetic and lets memory planning be static."""
        return self.decode(inputs, paged_kv_cache, sliding_kv_cache)

    def create_paged_kv_cache(
        self,
        max_batch_size: tirx.Var,
        max_total_seq_len: tirx.Var,
        prefill_chunk_size: tirx.Var,
        page_size: tirx.Var,
        support_sliding_window: tirx.Var,
    ) -> PagedKVCache:
        """The shard's full-attention cache: every layer, or with `sliding_cache` its global layers only (one
        unused layer when it has none: the cache still numbers the positions)."""
        return self._make_cache(False, max_batch_size, max_total_seq_len, prefill_chunk_size, page_size,
                                support_sliding_window)

    def create_sliding_kv_cache(
        self,
        max_batch_size: tirx.Var,
        max_total_seq_len: tirx.Var,
        prefill_chunk_size: tirx.Var,
        page_size: tirx.Var,
        support_sliding_window: tirx.Var,
    ) -> PagedKVCache:
        """With `sliding_cache`: the sliding-window layers' cache (models/sliding_cache.py)."""
        return self._make_cache(True, max_batch_size, max_total_seq_len, prefill_chunk_size, page_size,
                                support_sliding_window)

    def _make_cache(self, sliding_only: bool, max_batch_size: tirx.Var, max_total_seq_len: tirx.Var,
                    prefill_chunk_size: tirx.Var, page_size: tirx.Var,
                    support_sliding_window: tirx.Var) -> PagedKVCache:
        from shoal.models.kernels.attention_cpu import fast_cpu_attention
        from shoal.models.sliding_prefill import fixed_sliding_prefill

        # On llvm, models/kernels swaps in parallel, vectorized decode/prefill attention and RoPE kernels;
        # sliding_prefill routes sliding layers' paged prefill to them too (a fixed copy of TVM's elsewhere).
        fix = fixed_sliding_prefill(sliding_only) if self.config.sliding_window else contextlib.nullcontext()
        renamed = _renamed_debug_kernel() if sliding_only else contextlib.nullcontext()
        with fast_cpu_attention(self.target), fix, renamed:
            return self._paged_kv_cache(sliding_only, max_batch_size, max_total_seq_len, prefill_chunk_size,
                                        page_size, support_sliding_window)

    def _cache_kinds(self, sliding_only: bool) -> list[str]:
        """The attention kinds of one of the shard's caches, in cache-layer order."""
        c = self.config
        sliding = [c.is_sliding(i) for i in range(self.span.start, self.span.stop)]
        if self.sliding_cache:
            kinds = ["mha"] * sum(s == sliding_only for s in sliding)
            # a shard of sliding layers only: one unused full-attention layer (it numbers the positions)
            return kinds or ["mha"]
        kinds = ["mha_sliding" if s else "mha" for s in sliding]
        if all(sliding) and c.sliding_window:
            # TVM's cache fails at the first prefill ("data_ != nullptr") when every layer slides: one
            # unused full-attention layer after the shard's own avoids that (its pages are never written).
            kinds.append("mha")
        return kinds

    def _paged_kv_cache(self, sliding_only: bool, max_batch_size: tirx.Var, max_total_seq_len: tirx.Var,
                        prefill_chunk_size: tirx.Var, page_size: tirx.Var,
                        support_sliding_window: tirx.Var) -> PagedKVCache:
        c = self.config
        own_rope = models_own_rope(c)
        if own_rope:
            rope_mode, rope_scaling = RopeMode.NONE, {}
        elif c.rope_neox:
            rope_mode, rope_scaling = RopeMode.NORMAL, {}
        else:
            rope_mode, rope_scaling = RopeMode.NORMAL, {"rope_type": "gptj"}
        kinds = self._cache_kinds(sliding_only)
        extra: dict[str, Any] = {}
        if c.sliding_window:
            # the window the sliding kernels mask; TVM builds them for every llvm cache, so both of a shard's
            # caches get the same kernels (one function each in the module: same symbol, same body)
            extra["layer_sliding_window_size"] = c.sliding_window
        return TIRPagedKVCache(
            attn_kind=kinds if "mha_sliding" in kinds else "mha",
            max_batch_size=max_batch_size,
            max_total_seq_len=max_total_seq_len,
            prefill_chunk_size=prefill_chunk_size,
            page_size=page_size,
            support_sliding_window=support_sliding_window,
            layer_partition=rx.ShapeExpr([0, len(kinds)]),
            num_hidden_layers=len(kinds),
            num_attention_heads=c.num_heads,
            num_key_value_heads=c.num_kv_heads,
            qk_head_dim=c.head_dim,
            v_head_dim=c.head_dim,
            mla_original_qk_head_dim=0,
            mla_original_v_head_dim=0,
            rope_mode=rope_mode,
            rope_scale=1 if c.rope_freq_scale == 1.0 else c.rope_freq_scale,
            rope_theta=c.rope_theta,
            rope_scaling=rope_scaling,
            rope_ext_factors=rx.prim_value(0),
            rotary_dim=c.head_dim,
            enable_disaggregation=False,
            dtype=self.kv_dtype,
            target=self.target,
            **extra,
        )

    def get_default_spec(self) -> nn.spec.ModuleSpec:
        hidden = self.config.hidden_size
        if self.is_first:
            prefill_in = nn.spec.Tensor([1, "seq_len"], "int32")
            decode_in = nn.spec.Tensor([1, 1], "int32")
            batch_in = nn.spec.Tensor(["batch_size", 1], "int32")
        else:
            prefill_in = nn.spec.Tensor([1, "seq_len", hidden], "float32")
            decode_in = nn.spec.Tensor([1, 1, hidden], "float32")
            batch_in = nn.spec.Tensor(["batch_size", 1, hidden], "float32")
        cache = nn.spec.Object(object_type=PagedKVCache)
        caches: dict[str, Any] = {"paged_kv_cache": cache}
        if self.sliding_cache:
            caches["sliding_kv_cache"] = nn.spec.Object(object_type=PagedKVCache)
        packed: dict[str, Any] = {"param_mode": "packed", "effect_mode": "none"}
        create = {
            "max_batch_size": int,
            "max_total_seq_len": int,
            "prefill_chunk_size": int,
            "page_size": int,
            "support_sliding_window": int,
            "$": {"param_mode": "none", "effect_mode": "none"},
        }
        spec = {
            "prefill": {"inputs": prefill_in, **caches, "$": packed},
            "decode": {"inputs": decode_in, **caches, "$": packed},
            "batch_decode": {"inputs": batch_in, **caches, "$": packed},
            "create_paged_kv_cache": create,
        }
        if self.sliding_cache:
            spec["create_sliding_kv_cache"] = dict(create)
        return nn.spec.ModuleSpec.from_raw(spec, self)


@contextlib.contextmanager
def _renamed_debug_kernel() -> Iterator[None]:
    """While active, TVM's `kv_cache_debug_get_kv` kernel (sized by the cache's layer count) gets its own
    symbol, so a shard's second cache adds it beside the first cache's (the other kernels are the same)."""
    from tvm.relax.frontend.nn.llm import kv_cache

    stock = kv_cache._kv_cache_debug_get_kv

    def renamed(*args: Any, **kwargs: Any) -> Any:
        return stock(*args, **kwargs).with_attr("global_symbol", "tir_kv_cache_debug_get_kv_sliding")

    kv_cache._kv_cache_debug_get_kv = renamed
    try:
        yield
    finally:
        kv_cache._kv_cache_debug_get_kv = stock


def _make_embedding(config: ModelConfig, quantization: str, target: Target,
                    native: NativePlan | None = None) -> nn.Module:
    if quantization == "native":
        if native is None:
            raise ValueError("a native build needs the GGUF's tensor types (tensor_types=...)")
        return native.embedding(target)
    if quantization == "f32":
        return nn.Embedding(config.vocab_size, config.hidden_size, dtype="float32")
    from shoal.models.kernels.relax_ops import QuantizedEmbedding, kernel_backend

    return QuantizedEmbedding(config.vocab_size, config.hidden_size, kernel_backend(target))


def export_shard(
    config: ModelConfig, span: LayerSpan, target: Target, quantization: str = "f32",
    tensor_types: TensorTypes | None = None,
) -> tuple[Any, list[tuple[str, nn.Parameter]]]:
    """The shard as a Relax IRModule plus its parameters (name, Parameter) in the order the functions take
    them. `tensor_types` (models/block_types.py) is required for quantization="native"."""
    model = LlamaShard(config, span, target, quantization, tensor_types)
    # the kernel factories (models/kernels) cache their PrimFuncs per shape: ~12 distinct for ~420 calls
    mod, named_params, *_ = model.export_tvm(spec=model.get_default_spec(), allow_extern=True)
    return mod, named_params
