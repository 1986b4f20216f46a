"""Which GGUF tensors fill each parameter of a compiled shard, and the quantizations shoal builds.

Kept free of TVM imports: the runtime loads weights without importing the Relax compiler.
"""

from __future__ import annotations

from shoal.models.config import ModelConfig
from shoal.models.span import LayerSpan

QUANTIZATIONS = ("f32", "q4_1")
"""`f32`: weights dequantized to float32 at load. `q4_1`: linear weights kept as Q4_1 blocks and the
embedding/tied head as Q8_0 blocks, repacked once at load (models/kernels)."""

WEIGHT_KINDS = {"q4_1": {"linear": "q4_1", "embedding": "q8_0"}}
"""The GGUF block type each role must have for a quantized build."""


def gguf_sources(config: ModelConfig, span: LayerSpan, module_path: str) -> list[str]:
    """GGUF tensors (in row order) that make up the weight of shard module `module_path`, e.g.
    `layers.0.self_attn.qkv_proj` -> the span's first block's attn_q, attn_k, attn_v."""
    if module_path == "embed_tokens":
        return ["token_embd.weight"]
    if module_path == "norm":
        return ["output_norm.weight"]
    if module_path == "lm_head":
        return ["token_embd.weight" if config.tie_embeddings else "output.weight"]
    parts = module_path.split(".")
    if len(parts) < 3 or parts[0] != "layers" or not parts[1].isdigit():
        raise KeyError(f"no GGUF tensor maps to parameter module {module_path!r}")
    block = f"blk.{span.start + int(parts[1])}."
    local = ".".join(parts[2:])
    names = {
        "input_layernorm": ["attn_norm"],
        "post_attention_layernorm": ["ffn_norm"],
        "self_attn.qkv_proj": ["attn_q", "attn_k", "attn_v"],
        "self_attn.o_proj": ["attn_output"],
        "mlp.gate_up_proj": ["ffn_gate", "ffn_up"],
        "mlp.down_proj": ["ffn_down"],
    }.get(local)
    if names is None:
        raise KeyError(f"no GGUF tensor maps to parameter module {module_path!r}")
    return [f"{block}{n}.weight" for n in names]
