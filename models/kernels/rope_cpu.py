"""A CPU drop-in for the KV cache's `fused_rope` (TVM's `llama_rope_with_position_map`): split a fused qkv
[S, Hq + 2·Hkv, D] into q, k, v and rotate q and k (GPT-J / llama.cpp NORM style: adjacent pairs).

TVM's kernel evaluates `powf` and `sin`/`cos` for every element of every head; this one computes each
token's cos/sin table once (D/2 pairs, inverse frequencies by `exp2`) and applies it to all heads with
vector code, parallel over tokens when there are enough. Applies to float32 and float16 (rotated in float32,
rounded once when stored), the "gptj" rope type, the whole head rotated; everything else keeps TVM's kernel.
"""

from __future__ import annotations

import math
from typing import Any

from tvm import tirx
from tvm.relax.frontend.nn.llm import kv_cache
from tvm.script import tirx as T

STOCK_ROPE = kv_cache.llama_rope_with_position_map
SERIAL_TOKENS = 8
"""Below this many tokens (decode) the kernel runs single-threaded."""


def rope_cpu(theta: float, scale: float, head_dim: int, num_q_heads: int, num_kv_heads: int, dtype: str,
             rope_scaling: dict[str, Any], rotary_dim: int | None = None) -> tirx.PrimFunc:
    """Same arguments and PrimFunc contract as `kv_cache.llama_rope_with_position_map`."""
    if (dtype not in ("float32", "float16") or rope_scaling.get("rope_type") != "gptj"
            or (rotary_dim is not None and rotary_dim != head_dim) or head_dim % 2):
        return STOCK_ROPE(theta, scale, head_dim, num_q_heads, num_kv_heads, dtype, rope_scaling, rotary_dim)
    fused = num_q_heads + 2 * num_kv_heads
    rotated = num_q_heads + num_kv_heads
    pairs = head_dim // 2
    log2_step = -2.0 * math.log2(theta) / head_dim  # inverse frequency of pair i: 2^(i * log2_step)

    @T.macro
    def token(qkv, position_map, q, k, v, apply_rope, s):
        cs = T.alloc_buffer((2, pairs), "float32", scope="global")
        for i in range(pairs):
            angle = T.meta_var(T.Cast("float32", position_map[s]) * T.float32(scale)
                               * T.exp2(T.float32(log2_step) * T.Cast("float32", i)))
            cs[0, i] = T.Select(apply_rope > 0, T.cos(angle), T.float32(1))
            cs[1, i] = T.Select(apply_rope > 0, T.sin(angle), T.float32(0))
        for h in range(rotated):
            for i in range(pairs):
                x0 = T.meta_var(T.Cast("float32", qkv[s, h, 2 * i]))
                x1 = T.meta_var(T.Cast("float32", qkv[s, h, 2 * i + 1]))
                if h < num_q_heads:
                    q[s, h, 2 * i] = T.Cast(dtype, cs[0, i] * x0 - cs[1, i] * x1)
                    q[s, h, 2 * i + 1] = T.Cast(dtype, cs[0, i] * x1 + cs[1, i] * x0)
                else:
                    k[s, h - num_q_heads, 2 * i] = T.Cast(dtype, cs[0, i] * x0 - cs[1, i] * x1)
                    k[s, h - num_q_heads, 2 * i + 1] = T.Cast(dtype, cs[0, i] * x1 + cs[1, i] * x0)
        for h, d in T.grid(num_kv_heads, head_dim):
            v[s, h, d] = qkv[s, rotated + h, d]

    @T.prim_func(private=True)
    def fused_rope(var_qkv: T.handle, var_position_map: T.handle, var_q: T.handle, var_k: T.handle,
                   var_v: T.handle, apply_rope: T.int64):
        T.func_attr({"op_pattern": 8, "tirx.noalias": True, "tirx.is_scheduled": True})
        seq_len = T.int32()
        position_map_elem_offset = T.int32()
        qkv = T.match_buffer(var_qkv, (seq_len, fused, head_dim), dtype)
        q = T.match_buffer(var_q, (seq_len, num_q_heads, head_dim), dtype)
        k = T.match_buffer(var_k, (seq_len, num_kv_heads, head_dim), dtype)
        v = T.match_buffer(var_v, (seq_len, num_kv_heads, head_dim), dtype)
        position_map = T.match_buffer(var_position_map, (seq_len,), "int32",
                                      elem_offset=position_map_elem_offset)
        if seq_len < SERIAL_TOKENS:
            for s in range(seq_len):
                token(qkv, position_map, q, k, v, apply_rope, s)
        else:
            for s in T.parallel(seq_len):
                token(qkv, position_map, q, k, v, apply_rope, s)

    return fused_rope
