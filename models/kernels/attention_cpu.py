"""Parallel, vectorised CPU attention kernels for TVM's `TIRPagedKVCache`, drop-ins for the stock
`batch_decode_paged_kv_cpu` and `batch_prefill_ragged_kv_cpu` (serial scalar loops: 147 µs/layer of decode
at 200 tokens of context, FACTS.md).

Same signatures and outputs (attention output and log2-sum-exp `lse`) as TVM's kernels. One task per
(sequence or token, query head), split over the CPU threads; each works 16 keys at a time: 16-lane vector
dot products for the scores, one online-softmax rescale per block, the block's probabilities by one
polynomial exp2 vector, vector FMAs into the output.
Limits: float32 or float16 Q/KV/output (float16 — the quantized CPU builds' KV cache, models/llama.py — is
widened on load and the output rounded once; the arithmetic is float32 either way), head_dim a multiple of
16, 16-token pages (decode: also sliding-window layers; the ragged prefill is over the new tokens only), rope
not applied inline (`rotary_mode` 0, i.e. RopeMode.NORMAL / NONE — the cache rotates K when appending);
other configurations keep TVM's kernels (the factories return them).

Use: wrap the construction of the `TIRPagedKVCache` (inside the model's `create_paged_kv_cache`) in
`with fast_cpu_attention(target): ...` (it also swaps in `rope_cpu.rope_cpu` and, for the paged prefill —
a chunk's queries over cached pages — `attention_prefill_cpu.attention_prefill_paged_cpu`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

from shoal.models.kernels.tir_common import f32x16, vexp2, vsum
from tvm import tirx
from tvm.relax.frontend.nn.llm import kv_cache
from tvm.script import tirx as T

LANES = 16
LOG2E = math.log2(math.e)
_STOCK_DECODE_CPU = kv_cache._attention_decode_cpu
_STOCK_PREFILL_RAGGED_CPU = kv_cache._attention_prefill_ragged_cpu


KV_DTYPES = ("float32", "float16")
"""Q/K/V/output element types the kernels below take (float16: loaded and widened to float32 lanes, the
arithmetic float32 throughout, the output rounded once when stored)."""


def _wide(vec: tirx.PrimExpr, dtype: str) -> tirx.PrimExpr:
    """A 16-lane load of `dtype` as float32 lanes (float16 K/V pages and Q: one `vcvtph2ps`)."""
    return vec if dtype == "float32" else tirx.Cast(f"float32x{LANES}", vec)


def _narrow(vec: tirx.PrimExpr, dtype: str) -> tirx.PrimExpr:
    """float32 lanes as `dtype` lanes, for a store."""
    return vec if dtype == "float32" else tirx.Cast(f"{dtype}x{LANES}", vec)


def _block_probs(scores: tirx.PrimExpr, row_max: tirx.PrimExpr, rows: tirx.PrimExpr) -> tirx.PrimExpr:
    """2^(s - max) for the `rows` valid lanes of a 16-key block (polynomial exp2), 0 in the others."""
    valid = tirx.Ramp(0, 1, LANES) < tirx.Broadcast(rows, LANES)
    return tirx.Select(valid, vexp2(scores - tirx.Broadcast(row_max, LANES)), f32x16(0.0))


def attention_decode_cpu(num_kv_heads: int, num_qo_heads: int, head_dim: int, qkv_dtype: str,
                         sliding_window: bool, rope_scaling: dict[str, Any], page_size: int = 16
                         ) -> tirx.PrimFunc:
    """The decode-attention PrimFunc for these sizes (TVM's own kernel where this one does not apply)."""
    if (qkv_dtype not in KV_DTYPES or head_dim % LANES or num_qo_heads % num_kv_heads
            or page_size != LANES):
        return _STOCK_DECODE_CPU(num_kv_heads, num_qo_heads, head_dim, qkv_dtype, sliding_window,
                                 rope_scaling, page_size)
    if sliding_window:
        return _sliding_decode(num_kv_heads, num_qo_heads, head_dim, page_size, qkv_dtype)
    dtype = qkv_dtype
    h_qo, h_kv, d_head = num_qo_heads, num_kv_heads, head_dim
    group = h_qo // h_kv
    chunks = d_head // LANES

    def score(q: tirx.Buffer, pages: tirx.Buffer, b: Any, h: Any, page: Any, row: Any) -> tirx.PrimExpr:
        total = None
        for c in range(chunks):
            lanes = tirx.Ramp(c * LANES, 1, LANES)
            part = _wide(q[b, h, lanes], dtype) * _wide(pages[page, 0, h // group, row, lanes], dtype)
            total = part if total is None else total + part
        return vsum(total)

    @T.prim_func(private=True)
    def batch_decode_paged_kv(
        q_handle: T.handle, pages_handle: T.handle, page_table_indptr_handle: T.handle,
        page_table_values_handle: T.handle, var_length_info: T.handle, k_rope_pos_offset_handle: T.handle,
        q_rope_position_handle: T.handle, output_handle: T.handle, lse_handle: T.handle,
        rotary_mode: T.int32, rope_scale: T.float32, rope_theta: T.float32, sm_scale: T.float32,
    ):
        T.func_attr({"tirx.is_scheduled": True, "tir.noalias": True})
        batch = T.int32()
        nnz_pages = T.int32()
        max_num_pages = T.int32()
        indptr_offset = T.int32()
        values_offset = T.int32()
        k_rope_offset = T.int32()
        q_rope_offset = T.int32()
        length_offset = T.int32()
        q = T.match_buffer(q_handle, (batch, h_qo, d_head), dtype)
        pages = T.match_buffer(pages_handle, (max_num_pages, 2, h_kv, page_size, d_head), dtype)
        indptr = T.match_buffer(page_table_indptr_handle, (batch + 1,), "int32", elem_offset=indptr_offset)
        values = T.match_buffer(page_table_values_handle, (nnz_pages,), "int32", elem_offset=values_offset)
        T.match_buffer(k_rope_pos_offset_handle, (batch,), "int32", elem_offset=k_rope_offset)
        T.match_buffer(q_rope_position_handle, (batch,), "int32", elem_offset=q_rope_offset)
        last_page_len = T.match_buffer(var_length_info, (batch,), "int32", elem_offset=length_offset)
        output = T.match_buffer(output_handle, (batch, h_qo, d_head), dtype)
        lse = T.match_buffer(lse_handle, (batch, h_qo), "float32")
        assert rotary_mode == 0, "fast CPU decode attention: inline rope is not supported"
        for task in T.parallel(batch * h_qo):
            b = T.meta_var(task // h_qo)
            h = T.meta_var(task % h_qo)
            acc = T.alloc_buffer((d_head,), "float32", scope="global")
            s = T.alloc_buffer((page_size,), "float32", scope="global")
            st = T.alloc_buffer((3,), "float32", scope="global")  # running max, running sum, page max
            st[0] = T.float32(-5e4)
            st[1] = T.float32(0)
            for c in range(chunks):
                acc[T.Ramp(c * LANES, 1, LANES)] = T.Broadcast(T.float32(0), LANES)
            npages = T.meta_var(indptr[b + 1] - indptr[b])
            for p in range(npages):
                page = T.meta_var(values[indptr[b] + p])
                rows = T.meta_var(T.if_then_else(p == npages - 1, last_page_len[b], page_size))
                st[2] = T.float32(-5e4)
                for i in range(rows):
                    s[i] = score(q, pages, b, h, page, i) * (sm_scale * T.float32(LOG2E))
                    st[2] = T.max(st[2], s[i])
                if st[2] > st[0]:  # rescale what came before to the new max
                    st[1] = st[1] * T.exp2(st[0] - st[2])
                    for c in range(chunks):
                        acc[T.Ramp(c * LANES, 1, LANES)] = acc[T.Ramp(c * LANES, 1, LANES)] * T.Broadcast(
                            T.exp2(st[0] - st[2]), LANES)
                    st[0] = st[2]
                s[T.Ramp(0, 1, LANES)] = _block_probs(s[T.Ramp(0, 1, LANES)], st[0], rows)
                st[1] = st[1] + vsum(s[T.Ramp(0, 1, LANES)])
                for c in range(chunks):  # rows innermost: the accumulator chunk stays in a register
                    for i in range(rows):
                        acc[T.Ramp(c * LANES, 1, LANES)] = acc[T.Ramp(c * LANES, 1, LANES)] + T.Broadcast(
                            s[i], LANES) * _wide(pages[page, 1, h // group, i, T.Ramp(c * LANES, 1, LANES)],
                                                 dtype)
            for c in range(chunks):
                output[b, h, T.Ramp(c * LANES, 1, LANES)] = _narrow(T.Select(
                    st[1] > T.float32(0), acc[T.Ramp(c * LANES, 1, LANES)] / T.Broadcast(st[1], LANES),
                    T.Broadcast(T.float32(0), LANES)), dtype)
            lse[b, h] = T.Select(st[1] > T.float32(0), st[0] + T.log2(st[1]), st[0])

    return batch_decode_paged_kv.with_attr("global_symbol", "batch_decode_paged_kv_cpu")


def _sliding_decode(h_kv: int, h_qo: int, d_head: int, page_size: int, dtype: str) -> tirx.PrimFunc:
    """`batch_decode_paged_kv_cpu_sliding_window`: as the decode kernel above over TVM's sliding-window
    view of a sequence — `length_info` [3, batch] = (last page length, window offset, sink length); visible
    position i is stored at i (i < sink) or i − sink + offset, as TVM's `_get_seq_offset` maps it. Keys go
    16 positions at a time, each looked up through the page table."""
    group = h_qo // h_kv
    chunks = d_head // LANES

    def score(q: tirx.Buffer, pages: tirx.Buffer, b: Any, h: Any, page: Any, row: Any) -> tirx.PrimExpr:
        total = None
        for c in range(chunks):
            lanes = tirx.Ramp(c * LANES, 1, LANES)
            part = _wide(q[b, h, lanes], dtype) * _wide(pages[page, 0, h // group, row, lanes], dtype)
            total = part if total is None else total + part
        return vsum(total)

    @T.prim_func(private=True)
    def batch_decode_paged_kv_sliding(
        q_handle: T.handle, pages_handle: T.handle, page_table_indptr_handle: T.handle,
        page_table_values_handle: T.handle, var_length_info: T.handle, k_rope_pos_offset_handle: T.handle,
        q_rope_position_handle: T.handle, output_handle: T.handle, lse_handle: T.handle,
        rotary_mode: T.int32, rope_scale: T.float32, rope_theta: T.float32, sm_scale: T.float32,
    ):
        T.func_attr({"tirx.is_scheduled": True, "tir.noalias": True})
        batch = T.int32()
        nnz_pages = T.int32()
        max_num_pages = T.int32()
        indptr_offset = T.int32()
        values_offset = T.int32()
        k_rope_offset = T.int32()
        q_rope_offset = T.int32()
        length_offset = T.int32()
        q = T.match_buffer(q_handle, (batch, h_qo, d_head), dtype)
        pages = T.match_buffer(pages_handle, (max_num_pages, 2, h_kv, page_size, d_head), dtype)
        indptr = T.match_buffer(page_table_indptr_handle, (batch + 1,), "int32", elem_offset=indptr_offset)
        values = T.match_buffer(page_table_values_handle, (nnz_pages,), "int32", elem_offset=values_offset)
        T.match_buffer(k_rope_pos_offset_handle, (batch,), "int32", elem_offset=k_rope_offset)
        T.match_buffer(q_rope_position_handle, (batch,), "int32", elem_offset=q_rope_offset)
        info = T.match_buffer(var_length_info, (3, batch), "int32", elem_offset=length_offset)
        output = T.match_buffer(output_handle, (batch, h_qo, d_head), dtype)
        lse = T.match_buffer(lse_handle, (batch, h_qo), "float32")
        assert rotary_mode == 0, "fast CPU decode attention: inline rope is not supported"
        for task in T.parallel(batch * h_qo):
            b = T.meta_var(task // h_qo)
            h = T.meta_var(task % h_qo)
            acc = T.alloc_buffer((d_head,), "float32", scope="global")
            s = T.alloc_buffer((page_size,), "float32", scope="global")
            where = T.alloc_buffer((page_size, 2), "int32", scope="global")  # (page, row) of each key
            st = T.alloc_buffer((3,), "float32", scope="global")  # running max, running sum, block max
            st[0] = T.float32(-5e4)
            st[1] = T.float32(0)
            for c in range(chunks):
                acc[T.Ramp(c * LANES, 1, LANES)] = T.Broadcast(T.float32(0), LANES)
            npages = T.meta_var(indptr[b + 1] - indptr[b])
            visible = T.meta_var(T.if_then_else(
                npages > 0, (npages - 1) * page_size + info[0, b] - info[1, b] + info[2, b], 0))
            for kb in range((visible + page_size - 1) // page_size):
                rows = T.meta_var(T.min(page_size, visible - kb * page_size))
                st[2] = T.float32(-5e4)
                for i in range(rows):
                    pos = T.meta_var(kb * page_size + i)
                    stored = T.meta_var(T.if_then_else(pos < info[2, b], pos, pos - info[2, b] + info[1, b]))
                    where[i, 0] = values[indptr[b] + stored // page_size]
                    where[i, 1] = stored % page_size
                    s[i] = score(q, pages, b, h, where[i, 0], where[i, 1]) * (sm_scale * T.float32(LOG2E))
                    st[2] = T.max(st[2], s[i])
                if st[2] > st[0]:  # rescale what came before to the new max
                    st[1] = st[1] * T.exp2(st[0] - st[2])
                    for c in range(chunks):
                        acc[T.Ramp(c * LANES, 1, LANES)] = acc[T.Ramp(c * LANES, 1, LANES)] * T.Broadcast(
                            T.exp2(st[0] - st[2]), LANES)
                    st[0] = st[2]
                s[T.Ramp(0, 1, LANES)] = _block_probs(s[T.Ramp(0, 1, LANES)], st[0], rows)
                st[1] = st[1] + vsum(s[T.Ramp(0, 1, LANES)])
                for c in range(chunks):
                    for i in range(rows):
                        acc[T.Ramp(c * LANES, 1, LANES)] = acc[T.Ramp(c * LANES, 1, LANES)] + T.Broadcast(
                            s[i], LANES) * _wide(pages[where[i, 0], 1, h // group, where[i, 1],
                                                       T.Ramp(c * LANES, 1, LANES)], dtype)
            for c in range(chunks):
                output[b, h, T.Ramp(c * LANES, 1, LANES)] = _narrow(T.Select(
                    st[1] > T.float32(0), acc[T.Ramp(c * LANES, 1, LANES)] / T.Broadcast(st[1], LANES),
                    T.Broadcast(T.float32(0), LANES)), dtype)
            lse[b, h] = T.Select(st[1] > T.float32(0), st[0] + T.log2(st[1]), st[0])

    return batch_decode_paged_kv_sliding.with_attr("global_symbol",
                                                   "batch_decode_paged_kv_cpu_sliding_window")


def attention_prefill_ragged_cpu(h_kv: int, h_q: int, d_qk: int, d_v: int, dtype: str,
                                 rope_scaling: dict[str, Any]) -> tirx.PrimFunc:
    """Prefill attention of new tokens over themselves (TVM's `batch_prefill_ragged_kv` contract): one task
    per (token, query head), keys in blocks of 16 with one online-softmax rescale per block, causal blocks
    beyond the diagonal skipped."""
    if dtype not in KV_DTYPES or d_qk != d_v or d_qk % LANES or h_q % h_kv:
        return _STOCK_PREFILL_RAGGED_CPU(h_kv, h_q, d_qk, d_v, dtype, rope_scaling)
    group = h_q // h_kv
    chunks = d_qk // LANES
    block = LANES

    def score(q: tirx.Buffer, k: tirx.Buffer, row: Any, h: Any, key: Any) -> tirx.PrimExpr:
        total = None
        for c in range(chunks):
            lanes = tirx.Ramp(c * LANES, 1, LANES)
            part = _wide(q[row, h, lanes], dtype) * _wide(k[key, h // group, lanes], dtype)
            total = part if total is None else total + part
        return vsum(total)

    @T.prim_func(private=True)
    def batch_prefill_ragged_kv(
        var_q: T.handle, var_q_indptr: T.handle, var_k: T.handle, var_v: T.handle, var_kv_indptr: T.handle,
        var_q_rope_position: T.handle, var_k_rope_pos_offset: T.handle, var_output: T.handle,
        var_lse: T.handle, causal: T.int32, rotary_mode: T.int32, rope_scale: T.float32,
        rope_theta: T.float32, sm_scale: T.float32,
    ):
        T.func_attr({"tirx.is_scheduled": True, "tir.noalias": True})
        batch_size = T.int32()
        qo_len = T.int32()
        kv_len = T.int32()
        q_indptr_offset = T.int32()
        kv_indptr_offset = T.int32()
        q_rope_offset = T.int32()
        k_rope_offset = T.int32()
        q = T.match_buffer(var_q, (qo_len, h_q, d_qk), dtype)
        q_indptr = T.match_buffer(var_q_indptr, (batch_size + 1,), "int32", elem_offset=q_indptr_offset)
        k = T.match_buffer(var_k, (kv_len, h_kv, d_qk), dtype)
        v = T.match_buffer(var_v, (kv_len, h_kv, d_v), dtype)
        kv_indptr = T.match_buffer(var_kv_indptr, (batch_size + 1,), "int32", elem_offset=kv_indptr_offset)
        T.match_buffer(var_q_rope_position, (qo_len,), "int32", elem_offset=q_rope_offset)
        T.match_buffer(var_k_rope_pos_offset, (batch_size,), "int32", elem_offset=k_rope_offset)
        output = T.match_buffer(var_output, (qo_len, h_q, d_v), dtype)
        lse = T.match_buffer(var_lse, (qo_len, h_q), "float32")
        assert rotary_mode == 0, "fast CPU prefill attention: inline rope is not supported"
        for b in range(batch_size):
            q_len = T.meta_var(q_indptr[b + 1] - q_indptr[b])
            n_kv = T.meta_var(kv_indptr[b + 1] - kv_indptr[b])
            for task in T.parallel(q_len * h_q):
                row = T.meta_var(q_indptr[b] + task // h_q)
                h = T.meta_var(task % h_q)
                acc = T.alloc_buffer((d_v,), "float32", scope="global")
                s = T.alloc_buffer((block,), "float32", scope="global")
                st = T.alloc_buffer((3,), "float32", scope="global")  # running max, running sum, block max
                visible = T.meta_var(T.if_then_else(
                    causal > 0, T.max(T.min(n_kv - q_len + task // h_q + 1, n_kv), 0), n_kv))
                st[0] = T.float32(-5e4)
                st[1] = T.float32(0)
                for c in range(chunks):
                    acc[T.Ramp(c * LANES, 1, LANES)] = T.Broadcast(T.float32(0), LANES)
                for kb in range((visible + block - 1) // block):
                    rows = T.meta_var(T.min(block, visible - kb * block))
                    st[2] = T.float32(-5e4)
                    for i in range(rows):
                        key = T.meta_var(kv_indptr[b] + kb * block + i)
                        s[i] = score(q, k, row, h, key) * (sm_scale * T.float32(LOG2E))
                        st[2] = T.max(st[2], s[i])
                    if st[2] > st[0]:
                        st[1] = st[1] * T.exp2(st[0] - st[2])
                        for c in range(chunks):
                            acc[T.Ramp(c * LANES, 1, LANES)] = acc[T.Ramp(c * LANES, 1, LANES)] * T.Broadcast(
                                T.exp2(st[0] - st[2]), LANES)
                        st[0] = st[2]
                    s[T.Ramp(0, 1, LANES)] = _block_probs(s[T.Ramp(0, 1, LANES)], st[0], rows)
                    st[1] = st[1] + vsum(s[T.Ramp(0, 1, LANES)])
                    for c in range(chunks):  # rows innermost: the accumulator chunk stays in a register
                        for i in range(rows):
                            acc[T.Ramp(c * LANES, 1, LANES)] = acc[T.Ramp(c * LANES, 1, LANES)] + T.Broadcast(
                                s[i], LANES) * _wide(v[kv_indptr[b] + kb * block + i, h // group,
                                                       T.Ramp(c * LANES, 1, LANES)], dtype)
                for c in range(chunks):
                    output[row, h, T.Ramp(c * LANES, 1, LANES)] = _narrow(T.Select(
                        st[1] > T.float32(0), acc[T.Ramp(c * LANES, 1, LANES)] / T.Broadcast(st[1], LANES),
                        T.Broadcast(T.float32(0), LANES)), dtype)
                lse[row, h] = T.Select(st[1] > T.float32(0), st[0] + T.log2(st[1]), st[0])

    return batch_prefill_ragged_kv.with_attr("global_symbol", "batch_prefill_ragged_kv_cpu")


@contextlib.contextmanager
def fast_cpu_attention(target: Any = None) -> Iterator[None]:
    """While active, a `TIRPagedKVCache` uses `attention_decode_cpu`, `attention_prefill_ragged_cpu`,
    `attention_prefill_cpu.attention_prefill_paged_cpu` and `rope_cpu.rope_cpu` (each falls back to TVM's
    kernel where it does not apply). CPU kernels: pass the model's `target`, and for anything but an llvm
    target this does nothing."""
    from shoal.models.kernels.attention_prefill_cpu import (
        STOCK_PREFILL_PAGED_CPU,
        attention_prefill_paged_cpu,
    )
    from shoal.models.kernels.rope_cpu import STOCK_ROPE, rope_cpu
    from shoal.models.kernels.tir_common import as_target

    if target is not None and as_target(target).kind.name != "llvm":
        yield
        return
    kv_cache._attention_decode_cpu = attention_decode_cpu
    kv_cache._attention_prefill_ragged_cpu = attention_prefill_ragged_cpu
    kv_cache._attention_prefill_cpu = attention_prefill_paged_cpu
    kv_cache.llama_rope_with_position_map = rope_cpu
    try:
        yield
    finally:
        kv_cache._attention_decode_cpu = _STOCK_DECODE_CPU
        kv_cache._attention_prefill_ragged_cpu = _STOCK_PREFILL_RAGGED_CPU
        kv_cache._attention_prefill_cpu = STOCK_PREFILL_PAGED_CPU
        kv_cache.llama_rope_with_position_map = STOCK_ROPE
