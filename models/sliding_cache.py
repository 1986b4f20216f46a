"""Where a shard keeps its sliding-window layers' K/V (gemma3): which builds give them a second KV cache
bounded to the window, and how many positions a sequence keeps there. Free of TVM's compiler: the runtime-only
process (models/runtime.py) reads it too.

With a separate sliding cache (`separate_sliding_cache`), the compiled shard exports
`create_sliding_kv_cache` and its prefill/decode functions take that cache after the full one. The sliding
cache holds plain `mha` layers; the runtime enables TVM's per-sequence sliding window on each sequence
(`vm.builtin.attention_kv_cache_enable_sliding_window_for_seq`, no attention sink), so after every step a
sequence keeps its last `sliding_cache_keeps` positions and TVM frees the pages that slid out (reused by the
next append). Its sliding kernels mask the layer window counted back from the newest cached key, which does
not depend on the absolute position, so they read the kept positions as they read the whole history in a
one-cache build. The window resets the cache's own positions (it numbers kept keys from 0), so Q/K are
rotated from the full cache's query positions, absolute as before: this needs a model that rotates Q/K itself
(`models_own_rope`, true for every gemma3).
"""

from __future__ import annotations

from shoal.models.config import ModelConfig
from shoal.models.span import LayerSpan


def models_own_rope(config: ModelConfig) -> bool:
    """Whether the shard rotates Q/K itself: when layers differ in RoPE base or scale (gemma3) or the
    frequencies have per-pair factors (Llama 3.1+)."""
    return bool(config.rope_freq_factors) or len({config.layer_rope(i) for i in range(config.num_layers)}) > 1


def separate_sliding_cache(config: ModelConfig, span: LayerSpan, target_kind: str) -> bool:
    """Whether the shard `span` keeps its sliding-window layers in a second cache bounded to the window plus
    a prefill chunk: llvm builds of shards with sliding layers of a model that rotates Q/K itself. CUDA builds
    keep one cache, all positions of every layer (the sliding cache's kernels are untested there)."""
    return (target_kind == "llvm" and config.sliding_window >= 2 and models_own_rope(config)
            and any(config.is_sliding(i) for i in range(span.start, span.stop)))


def sliding_cache_keeps(config: ModelConfig) -> int:
    """Positions a sequence keeps in the sliding cache after each step: the window less one, since a query's
    own key comes from the new tokens (a query at p sees keys p - window < k <= p)."""
    return max(1, config.sliding_window - 1)


def sliding_cache_tokens(keeps: int, prefill_chunk: int, max_batch_size: int, max_total_tokens: int,
                         page_size: int) -> int:
    """KV positions the sliding cache is created with: each sequence keeps `keeps` positions after a step and
    holds up to a prefill chunk more during one, in whole pages (its window starts mid-page, plus one), for
    each of `max_batch_size` sequences; never more than the full cache's tokens plus a page a sequence."""
    per_sequence = (-(-(keeps + prefill_chunk) // page_size) + 1) * page_size
    return min(max_batch_size * per_sequence, max_total_tokens + max_batch_size * page_size)
