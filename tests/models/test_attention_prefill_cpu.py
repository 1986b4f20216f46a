"""The paged-prefill attention kernel (models/kernels/attention_prefill_cpu.py): a prefill chunk's queries
over cached pages, against NumPy and TVM's own kernel (stock, or models/sliding_prefill.py's fixed copy for
sliding windows), on random inputs: several sequences, cached lengths and chunk lengths not multiples of 16,
scattered pages, GQA, fp32 and fp16, causal / non-causal / sliding-window masks.

Tolerances: the kernel computes in fp32 with a polynomial exp2 (~2e-7 relative) in its own summation order,
the reference in float64; on these inputs (|q| ~ 2, |k|, |v| ~ 1, |out| < 3) outputs agree to ≤ 2e-6 and lse
to ≤ 1e-6 (measured), so 2e-5 holds with room. fp16: the reference gets the same rounded inputs and the
output is rounded to fp16 once: half an ulp (2^-10 for |out| < 4; 9.6e-4 measured) plus the fp32 2e-5."""

from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from tests.models.kernel_helpers import DEV, NATIVE, build  # noqa: E402

NEG = -5e4


def paged_prefill_case(stored: list[int], q_lens: list[int], h_kv: int, h_q: int, d: int, seed: int,
                       offsets: list[int] | None = None, sinks: list[int] | None = None) -> dict:
    """Sequences with `stored` cached positions each in scattered 16-row pages, `q_lens` new queries each.
    With `offsets`/`sinks`: TVM's sliding-window view (visible = the first `sink` stored positions, then
    those from `offset` on)."""
    rng = np.random.default_rng(seed)
    npages = [(n + 15) // 16 for n in stored]
    total = sum(npages)
    order = rng.permutation(total + 3).astype(np.int32)[:total]  # scattered pages, three unused
    page_indptr = np.concatenate([[0], np.cumsum(npages)]).astype(np.int32)
    last = np.array([n - 16 * (p - 1) if p else 0 for n, p in zip(stored, npages, strict=True)], np.int32)
    pages = rng.standard_normal((total + 3, 2, h_kv, 16, d)).astype(np.float32)
    q_indptr = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    q = rng.standard_normal((sum(q_lens), h_q, d)).astype(np.float32) * 2
    sliding = offsets is not None
    if sliding:
        info = np.stack([last, np.array(offsets, np.int32), np.array(sinks, np.int32)])
        visible = [list(range(k)) + list(range(o, n)) for n, o, k in zip(stored, offsets, sinks, strict=True)]
    else:
        info = last
        visible = [list(range(n)) for n in stored]
    return {"q": q, "q_indptr": q_indptr, "pages": pages, "page_indptr": page_indptr, "values": order,
            "info": info, "visible": visible, "stored": stored, "q_lens": q_lens}


def key_range(row: int, kv_len: int, q_len: int, causal: int, window: int) -> tuple[int, int]:
    """TVM's `_causal_or_sliding_cross_mask` as a range of the visible keys [lo, hi)."""
    if causal > 0 and window > 0:
        return max(kv_len - max(window - row - 1, 0), 0), kv_len
    if causal > 0:
        return 0, max(min(kv_len - q_len + row + 1, kv_len), 0)
    return 0, kv_len


def reference(case: dict, h_kv: int, h_q: int, scale: float, causal: int, window: int = 0
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(output, lse in log2 units, rows that see at least one key) in float64, cast to float32."""
    q = case["q"].astype(np.float64)
    out = np.zeros(q.shape, np.float64)
    lse = np.full(q.shape[:2], NEG, np.float64)
    seen = np.zeros(q.shape[0], bool)
    d = q.shape[-1]
    for b, positions in enumerate(case["visible"]):
        ids = case["values"][case["page_indptr"][b]:case["page_indptr"][b + 1]]
        kv = case["pages"][ids].astype(np.float64).transpose(1, 2, 0, 3, 4).reshape(2, h_kv, -1, d)
        kv = kv[:, :, positions]
        q_len = case["q_lens"][b]
        for r in range(q_len):
            lo, hi = key_range(r, len(positions), q_len, causal, window)
            row = case["q_indptr"][b] + r
            if hi <= lo:
                continue
            seen[row] = True
            for h in range(h_q):
                kh = h // (h_q // h_kv)
                s = kv[0, kh, lo:hi] @ q[row, h] * scale
                p = np.exp(s - s.max())
                out[row, h] = p @ kv[1, kh, lo:hi] / p.sum()
                lse[row, h] = (s.max() + np.log(p.sum())) / np.log(2)
    return out.astype(np.float32), lse.astype(np.float32), seen


def run_kernel(lib, name: str, case: dict, dtype: str, causal: int, scale: float) -> tuple[np.ndarray, ...]:
    n, h_q, d = case["q"].shape
    out = tvm.runtime.tensor(np.zeros((n, h_q, d), dtype), DEV)
    lse = tvm.runtime.tensor(np.zeros((n, h_q), np.float32), DEV)
    b = len(case["q_lens"])
    args = [case["q"].astype(dtype), case["q_indptr"], case["pages"].astype(dtype), case["page_indptr"],
            case["values"], case["info"], np.zeros(b, np.int32), np.zeros(n, np.int32)]
    lib[name](*[tvm.runtime.tensor(a, DEV) for a in args], out, lse, causal, 0, 1.0, 1e4, scale)
    return out.numpy().astype(np.float32), lse.numpy()


def as_dtype(case: dict, dtype: str) -> dict:
    """The case with Q and the pages rounded to `dtype` (what the kernel sees)."""
    return {**case, "q": case["q"].astype(dtype).astype(np.float32),
            "pages": case["pages"].astype(dtype).astype(np.float32)}


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_paged_prefill_matches_numpy_and_tvms_kernel(dtype: str):
    """Three sequences (cached 37 / 0 / 300, chunks 21 / 5 / 40), GQA 3:9, head_dim 64, causal 0 (what the
    cache passes for full-attention layers) and 1."""
    from shoal.models.kernels.attention_prefill_cpu import (
        STOCK_PREFILL_PAGED_CPU,
        attention_prefill_paged_cpu,
    )

    h_kv, h_q, d, scale = 3, 9, 64, 0.125
    case = as_dtype(paged_prefill_case([37, 0, 300], [21, 5, 40], h_kv, h_q, d, 11), dtype)
    ours = attention_prefill_paged_cpu(h_kv, h_q, d, dtype, False, {})
    stock = STOCK_PREFILL_PAGED_CPU(h_kv, h_q, d, dtype, False, {})
    lib = build({"ours": ours, "stock": stock.with_attr("global_symbol", "stock")}, NATIVE)
    atol = 2e-5 if dtype == "float32" else 2 ** -10 + 2e-5
    for causal in (0, 1):
        ref_out, ref_lse, seen = reference(case, h_kv, h_q, scale, causal)
        assert np.abs(ref_out).max() < 4 and seen.sum() > 20 and not seen.all()
        out, lse = run_kernel(lib, "ours", case, dtype, causal, scale)
        np.testing.assert_allclose(out, ref_out, atol=atol, err_msg=f"causal={causal}")
        np.testing.assert_allclose(lse, ref_lse, rtol=1e-5, atol=1e-4, err_msg=f"causal={causal}")
        stock_out, stock_lse = run_kernel(lib, "stock", case, dtype, causal, scale)  # rows seeing no key
        np.testing.assert_allclose(out[seen], stock_out[seen], atol=atol, err_msg=f"stock, causal={causal}")
        np.testing.assert_allclose(lse[seen], stock_lse[seen], rtol=1e-5, atol=1e-4)
        assert (stock_lse[~seen] < -4e4).all()  # ...have weight 0 in the merge in both kernels


@pytest.mark.parametrize("window_always", [False, True])
def test_sliding_paged_prefill_matches_numpy_and_the_fixed_kernel(window_always: bool):
    """gemma3's shape (1 KV head, 4 query heads, head_dim 256) through TVM's sliding-window view (window
    offsets, a sink) with window 48: causal=1 masks the window (the `mha_sliding` layers), causal=0 sees every
    key unless `window_always` (a shard's separate sliding cache, models/sliding_prefill.py)."""
    from shoal.models.kernels.attention_prefill_cpu import attention_prefill_paged_cpu
    from shoal.models.sliding_prefill import fixed_prefill_cpu

    h_kv, h_q, d, scale, window = 1, 4, 256, 0.0625, 48
    case = paged_prefill_case([37, 16, 200, 90], [19, 3, 33, 60], h_kv, h_q, d, 12,
                              offsets=[5, 0, 72, 17], sinks=[0, 0, 4, 0])
    ours = attention_prefill_paged_cpu(h_kv, h_q, d, "float32", True, {}, sliding_window_size=window,
                                       window_always=window_always)
    fixed = fixed_prefill_cpu(h_kv, h_q, d, "float32", True, {}, sliding_window_size=window,
                              window_always=window_always)
    lib = build({"ours": ours, "fixed": fixed.with_attr("global_symbol", "fixed")}, NATIVE)
    for causal in (0, 1):
        masked = 1 if window_always else causal
        ref_out, ref_lse, seen = reference(case, h_kv, h_q, scale, masked, window)
        out, lse = run_kernel(lib, "ours", case, "float32", causal, scale)
        np.testing.assert_allclose(out, ref_out, atol=2e-5, err_msg=f"causal={causal}")
        np.testing.assert_allclose(lse, ref_lse, rtol=1e-5, atol=1e-4, err_msg=f"causal={causal}")
        fixed_out, fixed_lse = run_kernel(lib, "fixed", case, "float32", causal, scale)
        np.testing.assert_allclose(out[seen], fixed_out[seen], atol=2e-5, err_msg=f"fixed, causal={causal}")
        np.testing.assert_allclose(lse[seen], fixed_lse[seen], rtol=1e-5, atol=1e-4)
    assert seen.sum() > 20 and not seen.all()  # the masked window hides everything from a few rows


def test_unsupported_configurations_keep_tvms_kernels():
    from shoal.models.kernels.attention_prefill_cpu import attention_prefill_paged_cpu, supported

    assert supported(8, 32, 64, "float16") and not supported(2, 6, 72, "float32")
    assert not supported(2, 6, 64, "bfloat16") and not supported(2, 6, 64, "float32", page_size=32)
    stock = attention_prefill_paged_cpu(2, 6, 72, "float32", False, {})
    assert stock.attrs["global_symbol"] == "batch_prefill_paged_kv_cpu"
    assert "tirx.is_scheduled" not in stock.attrs  # TVM's own (ours is marked scheduled)
    with pytest.raises(ValueError):
        attention_prefill_paged_cpu(2, 6, 72, "float32", True, {}, window_always=True)


def test_the_cache_factories_take_this_kernel_on_llvm_only():
    """`fast_cpu_attention` swaps it in (and restores TVM's), only for llvm targets; models/sliding_prefill.py
    (entered after it in models/llama.py) routes every supported layer kind to it, its fixed copy kept for
    sliding windows in configurations this kernel does not take."""
    from shoal.models.kernels.attention_cpu import fast_cpu_attention
    from shoal.models.kernels.attention_prefill_cpu import (
        STOCK_PREFILL_PAGED_CPU,
        attention_prefill_paged_cpu,
    )
    from shoal.models.sliding_prefill import fixed_sliding_prefill
    from tvm.relax.frontend.nn.llm import kv_cache

    with fast_cpu_attention({"kind": "cuda", "arch": "sm_90"}):
        assert kv_cache._attention_prefill_cpu is STOCK_PREFILL_PAGED_CPU
    with fast_cpu_attention({"kind": "llvm"}):
        assert kv_cache._attention_prefill_cpu is attention_prefill_paged_cpu
    assert kv_cache._attention_prefill_cpu is STOCK_PREFILL_PAGED_CPU
    with fast_cpu_attention({"kind": "llvm"}), fixed_sliding_prefill(window_always=True):
        ours = kv_cache._attention_prefill_cpu(1, 4, 256, "float16", True, {}, sliding_window_size=512)
        plain = kv_cache._attention_prefill_cpu(1, 4, 256, "float16", False, {})
        fallback = kv_cache._attention_prefill_cpu(1, 4, 72, "float16", True, {}, sliding_window_size=512)
    assert ours.attrs["global_symbol"] == "batch_prefill_paged_kv_cpu_sliding_window_masked"
    assert plain.attrs["global_symbol"] == "batch_prefill_paged_kv_cpu"
    assert "tirx.is_scheduled" in ours.attrs and "tirx.is_scheduled" in plain.attrs
    assert fallback.attrs["global_symbol"] == "batch_prefill_paged_kv_cpu_sliding_window_masked"
    assert "tirx.is_scheduled" not in fallback.attrs  # the fixed copy of TVM's kernel
    assert kv_cache._attention_prefill_cpu is STOCK_PREFILL_PAGED_CPU
