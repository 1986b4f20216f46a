"""Parallel, vectorised CPU drop-in for TVM's `batch_prefill_paged_kv_cpu`: a prefill chunk's queries over a
sequence's cached pages (every chunk after a prompt's first, and every follow-up turn of a cached
conversation). TVM's kernel is a serial scalar loop over (head, sequence, query, key): ~1100 s to fill
Llama-3.2-1B's 4k context, the paged part growing with the prefix.

Same signature and outputs as TVM's kernel (attention output and log2-sum-exp `lse`; `kv_cache.py` merges
them with the ragged kernel's by lse), the same masks (`_causal_or_sliding_cross_mask`):
- `causal == 0`: a query sees all `kv_len` cached keys (what TVM's runtime passes for `mha` layers: the cached
  prefix precedes every new token);
- `causal > 0`: the query at row r of its sequence's chunk sees keys `< kv_len - qo_len + r + 1`; with a
  sliding window W (the `_sliding_window` kernels, `mha_sliding` layers) instead the last `W - r - 1` keys;
- the sliding kernels read keys through TVM's window view (`length_info` [3, batch]: last page length, window
  offset, sink length) and `window_always` masks the window whatever `causal` says (the `_masked` symbol of
  models/sliding_prefill.py, used by a shard's separate sliding cache).

Work: one task per (sequence, tile of 16 query tokens, KV head), split over the threads. The tile's rows are
its 16 tokens × the KV head's `group` query heads; each task reads the sequence's keys once, 16 at a time,
and every row of the tile uses them (GQA and token blocking both reuse the K/V block from L1). Layout: lanes
are the tile's 16 tokens. Q is transposed once per task ([d, group, 16], pre-scaled by sm_scale·log2 e), so
a 16-key block's scores are broadcast(k[key, d]) × qt[d] fused multiply-adds (four interleaved chains over
d), the online softmax (running max, sum, rescale) is per lane with no horizontal sums, probabilities come
from the polynomial exp2 (`tir_common.vexp2`), and the output rows accumulate p · v by 16-lane FMAs over d
(two chains of 8 keys). Arithmetic fp32; fp16 Q/K/V widened on load, the output rounded once.
Masked keys get probability 0; a query that sees no key outputs 0 with lse -5e4 (the merge then gives it
weight 0; TVM's kernel outputs a mean of masked values there, which the merge weights 0 too).

Limits: float32/float16, head_dim % 16 == 0, 16-token pages, `rotary_mode` 0 (K rotated when appended);
otherwise the factory returns TVM's kernel, or for sliding windows models/sliding_prefill.py's fixed copy.
"""

from __future__ import annotations

from typing import Any

from shoal.models.kernels.attention_cpu import KV_DTYPES, LANES, LOG2E, _narrow, _wide
from shoal.models.kernels.tir_common import f32x16, vexp2
from tvm import tirx
from tvm.relax.frontend.nn.llm import kv_cache
from tvm.script import tirx as T

STOCK_PREFILL_PAGED_CPU = kv_cache._attention_prefill_cpu
TILE = LANES
"""Query tokens per task: the vector lanes."""
QK_CHAINS = 4
"""Independent fma chains over head_dim per 16-lane score vector."""
NEG = -5e4
"""The masked score and the initial running max (as TVM's kernels)."""


def _chain_sum(terms: list[tirx.PrimExpr], chains: int) -> tirx.PrimExpr:
    """Σ terms as `chains` interleaved left-to-right sums (term i in chain i % chains), then added in order:
    LLVM contracts each `a + b·c` into an fma, so the chains are independent fma sequences."""
    parts: list[tirx.PrimExpr | None] = [None] * min(chains, len(terms))
    for i, term in enumerate(terms):
        k = i % len(parts)
        parts[k] = term if parts[k] is None else parts[k] + term
    total = parts[0]
    for part in parts[1:]:
        total = total + part
    return total


def supported(h_kv: int, h_q: int, d: int, dtype: str, page_size: int = 16) -> bool:
    """Whether `attention_prefill_paged_cpu` builds its own kernel for these sizes."""
    return dtype in KV_DTYPES and d % LANES == 0 and h_q % h_kv == 0 and page_size == LANES


def attention_prefill_paged_cpu(h_kv: int, h_q: int, d: int, dtype: str, sliding_window: bool,
                                rope_scaling: dict[str, Any], page_size: int = 16,
                                sliding_window_size: int = 1024,
                                window_always: bool = False) -> tirx.PrimFunc:
    """`kv_cache._attention_prefill_cpu` for these sizes: the kernel of the module docstring, or where it does
    not apply TVM's (`window_always` needs the kernel: models/sliding_prefill.py checks `supported` first)."""
    if not supported(h_kv, h_q, d, dtype, page_size):
        if window_always:
            raise ValueError("window_always needs a supported configuration (models/sliding_prefill.py)")
        return STOCK_PREFILL_PAGED_CPU(h_kv, h_q, d, dtype, sliding_window, rope_scaling, page_size,
                                       sliding_window_size)
    symbol = "batch_prefill_paged_kv_cpu" + ("_sliding_window" if sliding_window else "")
    symbol += "_masked" if window_always else ""
    window = max(int(sliding_window_size), 0) if sliding_window else 0
    return _paged_prefill(h_kv, h_q, d, dtype, sliding_window, window, window_always).with_attr(
        "global_symbol", symbol)


def _paged_prefill(h_kv: int, h_q: int, d: int, dtype: str, sliding: bool, window: int,
                   window_always: bool) -> tirx.PrimFunc:
    group = h_q // h_kv
    chunks = d // LANES
    lanes = tirx.Ramp(0, 1, LANES)

    def vec(c: int) -> tirx.PrimExpr:
        return tirx.Ramp(c * LANES, 1, LANES)

    def scores(kw: tirx.Buffer, qt: tirx.Buffer, i: Any, j: Any) -> tirx.PrimExpr:
        """Scores of key i (of the block) for the 16 tokens of q head j: Σ_x k[i, x] · qt[x, j, :]."""
        return _chain_sum([tirx.Broadcast(kw[i, x], LANES) * qt[x, j, lanes] for x in range(d)], QK_CHAINS)

    def weighted(p: tirx.Buffer, vw: tirx.Buffer, j: Any, t: Any, c: int) -> tirx.PrimExpr:
        """Σ_i p[i, j, t] · v[i, chunk c] over the block's 16 keys (two chains)."""
        return _chain_sum([tirx.Broadcast(p[i, j, t], LANES) * vw[i, vec(c)] for i in range(LANES)], 2)

    def stored(pos: Any, info: tirx.Buffer, b: Any) -> Any:
        """Where visible position `pos` sits in the sequence's pages (TVM's `_get_seq_offset`)."""
        if not sliding:
            return pos
        return T.if_then_else(pos < info[2, b], pos, pos - info[2, b] + info[1, b])

    def kv_length(npages: Any, info: tirx.Buffer, b: Any) -> Any:
        """Visible cached keys of sequence b (TVM's `_get_kv_chunk_len`)."""
        if not sliding:
            return (npages - 1) * LANES + info[b]
        return (npages - 1) * LANES + info[0, b] - info[1, b] + info[2, b]

    def first_key(causal: Any, row: Any, kv_len: Any) -> Any:
        """The first cached key query `row` (of its sequence's chunk) sees: the window's start."""
        if not window:
            return 0
        start = T.max(kv_len - T.max(window - row - 1, 0), 0)
        return start if window_always else T.if_then_else(causal > 0, start, 0)

    def end_key(causal: Any, row: Any, kv_len: Any, q_len: Any) -> Any:
        """One past the last cached key query `row` sees (causal without a window: its diagonal)."""
        if window:
            return kv_len
        return T.if_then_else(causal > 0, T.max(T.min(kv_len - q_len + row + 1, kv_len), 0), kv_len)

    @T.prim_func(private=True)
    def batch_prefill_paged_kv(
        var_q: T.handle, var_q_indptr: T.handle, var_pages: T.handle, var_page_indptr: T.handle,
        var_page_values: T.handle, var_length_info: T.handle, var_k_rope_pos_offset: T.handle,
        var_q_rope_position: T.handle, var_output: T.handle, var_lse: T.handle, causal: T.int32,
        rotary_mode: T.int32, rope_scale: T.float32, rope_theta: T.float32, sm_scale: T.float32,
    ):
        T.func_attr({"tirx.is_scheduled": True, "tir.noalias": True})
        batch_size = T.int32()
        total_len = T.int32()
        nnz_pages = T.int32()
        max_num_pages = T.int32()
        q_indptr_offset = T.int32()
        page_indptr_offset = T.int32()
        page_values_offset = T.int32()
        k_rope_offset = T.int32()
        q_rope_offset = T.int32()
        length_offset = T.int32()
        q = T.match_buffer(var_q, (total_len, h_q, d), dtype)
        q_indptr = T.match_buffer(var_q_indptr, (batch_size + 1,), "int32", elem_offset=q_indptr_offset)
        pages = T.match_buffer(var_pages, (max_num_pages, 2, h_kv, LANES, d), dtype)
        page_indptr = T.match_buffer(var_page_indptr, (batch_size + 1,), "int32",
                                     elem_offset=page_indptr_offset)
        values = T.match_buffer(var_page_values, (nnz_pages,), "int32", elem_offset=page_values_offset)
        info = T.match_buffer(var_length_info, (3, batch_size) if sliding else (batch_size,), "int32",
                              elem_offset=length_offset)
        T.match_buffer(var_k_rope_pos_offset, (batch_size,), "int32", elem_offset=k_rope_offset)
        T.match_buffer(var_q_rope_position, (total_len,), "int32", elem_offset=q_rope_offset)
        output = T.match_buffer(var_output, (total_len, h_q, d), dtype)
        lse = T.match_buffer(var_lse, (total_len, h_q), "float32")
        assert rotary_mode == 0, "fast CPU paged prefill attention: inline rope is not supported"
        for b in range(batch_size):
            q_len = T.meta_var(q_indptr[b + 1] - q_indptr[b])
            npages = T.meta_var(page_indptr[b + 1] - page_indptr[b])
            for task in T.parallel(((q_len + TILE - 1) // TILE) * h_kv):
                tok0 = T.meta_var(task // h_kv * TILE)
                g = T.meta_var(task % h_kv)
                qt = T.alloc_buffer((d, group, LANES), "float32", scope="global")
                acc = T.alloc_buffer((group, LANES, d), "float32", scope="global")
                kw = T.alloc_buffer((LANES, d), "float32", scope="global")
                vw = T.alloc_buffer((LANES, d), "float32", scope="global")
                p = T.alloc_buffer((LANES, group, LANES), "float32", scope="global")
                run = T.alloc_buffer((3, group, LANES), "float32", scope="global")  # max, sum, rescale
                span = T.alloc_buffer((2, LANES), "int32", scope="global")  # per token: [lo, hi) keys
                ints = T.alloc_buffer((3,), "int32", scope="global")  # kv_len, first block, end block
                ints[0] = T.if_then_else(npages > 0, kv_length(npages, info, b), 0)
                ints[1] = ints[0]
                ints[2] = 0
                for t in range(TILE):
                    row = T.meta_var(tok0 + t)
                    span[0, t] = first_key(causal, row, ints[0])
                    span[1, t] = T.if_then_else(row < q_len, end_key(causal, row, ints[0], q_len), 0)
                    if span[0, t] < span[1, t]:
                        ints[1] = T.min(ints[1], span[0, t])
                        ints[2] = T.max(ints[2], span[1, t])
                for j in range(group):
                    run[0, j, lanes] = f32x16(NEG)
                    run[1, j, lanes] = f32x16(0.0)
                    for t in range(TILE):
                        for c in range(chunks):
                            acc[j, t, vec(c)] = f32x16(0.0)
                for t in range(TILE):  # Q transposed, scaled to log2 units (rows past the chunk: 0)
                    q_row = T.meta_var(q_indptr[b] + T.min(tok0 + t, q_len - 1))
                    for j in range(group):
                        for x in range(d):
                            qt[x, j, t] = T.if_then_else(
                                tok0 + t < q_len,
                                T.Cast("float32", q[q_row, g * group + j, x]) * (sm_scale * T.float32(LOG2E)),
                                T.float32(0))
                for kb in range(ints[1] // LANES, T.max(ints[1] // LANES, (ints[2] + LANES - 1) // LANES)):
                    for i in range(LANES):  # the block's K/V rows, widened; past kv_len zeros
                        pos = T.meta_var(kb * LANES + i)
                        where = T.meta_var(stored(pos, info, b))  # (both Select arms load: stay in range)
                        page = T.meta_var(values[page_indptr[b] + T.min(where // LANES, npages - 1)])
                        for c in range(chunks):
                            k_vec = T.meta_var(_wide(pages[page, 0, g, where % LANES, vec(c)], dtype))
                            v_vec = T.meta_var(_wide(pages[page, 1, g, where % LANES, vec(c)], dtype))
                            kw[i, vec(c)] = T.Select(pos < ints[0], k_vec, f32x16(0.0))
                            vw[i, vec(c)] = T.Select(pos < ints[0], v_vec, f32x16(0.0))
                    for i in range(LANES):
                        visible = T.meta_var(tirx.And(span[0, lanes] <= tirx.Broadcast(kb * LANES + i, LANES),
                                                      tirx.Broadcast(kb * LANES + i, LANES) < span[1, lanes]))
                        for j in T.unroll(group):
                            p[i, j, lanes] = T.Select(visible, scores(kw, qt, i, j), f32x16(NEG))
                    for j in range(group):
                        run[2, j, lanes] = run[0, j, lanes]  # the old max, until rescaled below
                        for i in range(LANES):
                            run[0, j, lanes] = T.max(run[0, j, lanes], p[i, j, lanes])
                        run[2, j, lanes] = vexp2(run[2, j, lanes] - run[0, j, lanes])
                        run[1, j, lanes] = run[1, j, lanes] * run[2, j, lanes]
                        for i in range(LANES):
                            visible = T.meta_var(tirx.And(
                                span[0, lanes] <= tirx.Broadcast(kb * LANES + i, LANES),
                                tirx.Broadcast(kb * LANES + i, LANES) < span[1, lanes]))
                            p[i, j, lanes] = T.Select(visible, vexp2(p[i, j, lanes] - run[0, j, lanes]),
                                                      f32x16(0.0))
                            run[1, j, lanes] = run[1, j, lanes] + p[i, j, lanes]
                    for j in range(group):
                        for t in range(TILE):
                            for c in T.unroll(chunks):
                                acc[j, t, vec(c)] = acc[j, t, vec(c)] * tirx.Broadcast(run[2, j, t], LANES) \
                                    + weighted(p, vw, j, t, c)
                for j in range(group):
                    for t in range(TILE):
                        if tok0 + t < q_len:
                            row = T.meta_var(q_indptr[b] + tok0 + t)
                            total = T.meta_var(run[1, j, t])
                            for c in range(chunks):
                                output[row, g * group + j, vec(c)] = _narrow(T.Select(
                                    total > T.float32(0), acc[j, t, vec(c)] / tirx.Broadcast(total, LANES),
                                    f32x16(0.0)), dtype)
                            lse[row, g * group + j] = T.Select(total > T.float32(0),
                                                               run[0, j, t] + T.log2(total), run[0, j, t])

    return batch_prefill_paged_kv

