"""A parallel, vectorised CPU decode-attention kernel for TVM's `TIRPagedKVCache`, a drop-in for the stock
`batch_decode_paged_kv_cpu` (a serial scalar loop: 147 µs/layer at 200 tokens of context, FACTS.md).

Same signature and outputs (attention output and log2-sum-exp `lse`) as TVM's kernel. One task per
(sequence, query head), split over the CPU threads; each works a KV page (16 rows) at a time: 16-lane vector
dot products for the scores, one online-softmax rescale per page, vector FMAs into the output.
Limits: float32 Q/KV, head_dim a multiple of 16, no sliding window, rope not applied inline
(`rotary_mode` 0, i.e. RopeMode.NORMAL / NONE — the cache rotates K when appending); other configurations
keep TVM's kernel (`attention_decode_cpu` returns it).

Use: wrap the construction of the `TIRPagedKVCache` (inside the model's `create_paged_kv_cache`) in
`with fast_cpu_decode_attention(): ...`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

from tvm import tirx
from tvm.relax.frontend.nn.llm import kv_cache
from tvm.script import tirx as T

LANES = 16
LOG2E = math.log2(math.e)
_STOCK_DECODE_CPU = kv_cache._attention_decode_cpu


def _vsum(vec: tirx.PrimExpr) -> tirx.PrimExpr:
    return tirx.call_llvm_pure_intrin("float32", "llvm.vector.reduce.fadd", tirx.const(0.0, "float32"), vec)


def attention_decode_cpu(num_kv_heads: int, num_qo_heads: int, head_dim: int, qkv_dtype: str,
                         sliding_window: bool, rope_scaling: dict[str, Any], page_size: int = 16
                         ) -> tirx.PrimFunc:
    """The decode-attention PrimFunc for these sizes (TVM's own kernel where this one does not apply)."""
    if sliding_window or qkv_dtype != "float32" or head_dim % LANES or num_qo_heads % num_kv_heads:
        return _STOCK_DECODE_CPU(num_kv_heads, num_qo_heads, head_dim, qkv_dtype, sliding_window,
                                 rope_scaling, page_size)
    h_qo, h_kv, d_head = num_qo_heads, num_kv_heads, head_dim
    group = h_qo // h_kv
    chunks = d_head // LANES

    def score(q: tirx.Buffer, pages: tirx.Buffer, b: Any, h: Any, page: Any, row: Any) -> tirx.PrimExpr:
        total = None
        for c in range(chunks):
            part = (q[b, h, tirx.Ramp(c * LANES, 1, LANES)]
                    * pages[page, 0, h // group, row, tirx.Ramp(c * LANES, 1, LANES)])
            total = part if total is None else total + part
        return _vsum(total)

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
        q = T.match_buffer(q_handle, (batch, h_qo, d_head), "float32")
        pages = T.match_buffer(pages_handle, (max_num_pages, 2, h_kv, page_size, d_head), "float32")
        indptr = T.match_buffer(page_table_indptr_handle, (batch + 1,), "int32", elem_offset=indptr_offset)
        values = T.match_buffer(page_table_values_handle, (nnz_pages,), "int32", elem_offset=values_offset)
        T.match_buffer(k_rope_pos_offset_handle, (batch,), "int32", elem_offset=k_rope_offset)
        T.match_buffer(q_rope_position_handle, (batch,), "int32", elem_offset=q_rope_offset)
        last_page_len = T.match_buffer(var_length_info, (batch,), "int32", elem_offset=length_offset)
        output = T.match_buffer(output_handle, (batch, h_qo, d_head), "float32")
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
                for i in range(rows):
                    s[i] = T.exp2(s[i] - st[0])
                    st[1] = st[1] + s[i]
                    for c in range(chunks):
                        acc[T.Ramp(c * LANES, 1, LANES)] = acc[T.Ramp(c * LANES, 1, LANES)] + T.Broadcast(
                            s[i], LANES) * pages[page, 1, h // group, i, T.Ramp(c * LANES, 1, LANES)]
            for c in range(chunks):
                output[b, h, T.Ramp(c * LANES, 1, LANES)] = T.Select(
                    st[1] > T.float32(0), acc[T.Ramp(c * LANES, 1, LANES)] / T.Broadcast(st[1], LANES),
                    T.Broadcast(T.float32(0), LANES))
            lse[b, h] = T.Select(st[1] > T.float32(0), st[0] + T.log2(st[1]), st[0])

    return batch_decode_paged_kv.with_attr("global_symbol", "batch_decode_paged_kv_cpu")


@contextlib.contextmanager
def fast_cpu_decode_attention() -> Iterator[None]:
    """While active, `TIRPagedKVCache` built for an llvm target uses `attention_decode_cpu`."""
    kv_cache._attention_decode_cpu = attention_decode_cpu
    try:
        yield
    finally:
        kv_cache._attention_decode_cpu = _STOCK_DECODE_CPU
