"""Which GGUF tensors fill each parameter of a compiled shard, and the quantizations shoal builds.

Kept free of TVM imports: the runtime loads weights without importing the Relax compiler.
"""

from __future__ import annotations

from collections.abc import Container, Mapping

from shoal.models.config import ModelConfig
from shoal.models.span import LayerSpan

QUANTIZATIONS = ("f32", "q4_1", "native")
"""`f32`: weights dequantized to float32 at load. `q4_1`: linear weights kept as Q4_1 blocks and the
embedding/tied head as Q8_0 blocks, repacked once at load (models/kernels). `native`: every linear weight and
the embedding keep the block type they have in the GGUF (models/block_types.py; Q4_0, Q4_1, Q5_0, Q5_1, Q8_0,
Q4_K, Q5_K, Q6_K, F16, BF16), mixed types in one file included."""

WEIGHT_KINDS = {"q4_1": {"linear": "q4_1", "embedding": "q8_0"}}
"""The GGUF block type each role must have for a quantized build."""

AUTO = "auto"
"""Pick the build from the file (`choose_quantization`): what loaders and `shoal compile` use by default."""


def choose_quantization(tensor_kinds: Mapping[str, str]) -> str:
    """`q4_1` for a file laid out as that build keeps it (every block matrix Q4_1, the embedding Q8_0 —
    the embedded SmolLM2), else `native`: any other file (Q4_K_M, Q8_0, F16, ...) runs as it is, each tensor
    in its own block type. `tensor_kinds`: GGUF tensor name -> lower-case block type."""
    wanted = WEIGHT_KINDS["q4_1"]
    for name, kind in tensor_kinds.items():
        if name == "token_embd.weight":
            if kind != wanted["embedding"]:
                return "native"
        elif name.startswith("blk.") and name.endswith(".weight") and kind not in ("f32",):
            if kind != wanted["linear"]:
                return "native"
        elif name == "output.weight" and kind != wanted["embedding"]:
            return "native"
    return "q4_1"


_LAYER_ROLES = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.qkv_proj": "qkv",
    "self_attn.qkv_bias": "qkv_bias",
    "self_attn.q_norm": "q_norm",
    "self_attn.k_norm": "k_norm",
    "self_attn.o_proj": "o",
    "attn_post_norm": "attn_post_norm",
    "mlp.gate_up_proj": "gate_up",
    "mlp.down_proj": "down",
    "ffn_post_norm": "ffn_post_norm",
}
"""Shard module (under `layers.N.`) -> role in `layer_tensor_names`."""


def layer_tensor_names(config: ModelConfig, tensors: Container[str], block: int) -> dict[str, list[str]]:
    """GGUF tensors (in row order) of block `block` per role: qkv (attn_q/k/v, or the fused attn_qkv of
    phi3-style files), gate_up (ffn_gate + ffn_up, or phi3's ffn_up holding gate rows then up rows), and the
    family's biases and norms. `tensors` holds the file's tensor names."""
    p = f"blk.{block}."
    fused = p + "attn_qkv.weight"
    names = {
        "attn_norm": [p + "attn_norm.weight"],
        "qkv": [fused] if fused in tensors else [p + f"attn_{n}.weight" for n in "qkv"],
        "o": [p + "attn_output.weight"],
        "ffn_norm": [p + "ffn_norm.weight"],
        "gate_up": ([p + "ffn_gate.weight", p + "ffn_up.weight"] if p + "ffn_gate.weight" in tensors
                    else [p + "ffn_up.weight"]),
        "down": [p + "ffn_down.weight"],
    }
    if config.qkv_bias:
        fused_bias = p + "attn_qkv.bias"
        names["qkv_bias"] = [fused_bias] if fused_bias in tensors else [p + f"attn_{n}.bias" for n in "qkv"]
    if config.qk_norm:
        names["q_norm"] = [p + "attn_q_norm.weight"]
        names["k_norm"] = [p + "attn_k_norm.weight"]
    if config.post_norms:
        names["attn_post_norm"] = [p + "post_attention_norm.weight"]
        names["ffn_post_norm"] = [p + "post_ffw_norm.weight"]
    return names


def gguf_sources(config: ModelConfig, span: LayerSpan, module_path: str,
                 tensors: Container[str] = ()) -> list[str]:
    """GGUF tensors (in row order) that make up the weight of shard module `module_path`, e.g.
    `layers.0.self_attn.qkv_proj` -> the span's first block's attn_q, attn_k, attn_v (or attn_qkv when
    `tensors`, the file's tensor names, has it)."""
    if module_path == "embed_tokens":
        return ["token_embd.weight"]
    if module_path == "norm":
        return ["output_norm.weight"]
    if module_path == "rope_freqs":
        return ["rope_freqs.weight"]
    if module_path == "lm_head":
        return ["token_embd.weight" if config.tie_embeddings else "output.weight"]
    parts = module_path.split(".")
    if len(parts) < 3 or parts[0] != "layers" or not parts[1].isdigit():
        raise KeyError(f"no GGUF tensor maps to parameter module {module_path!r}")
    role = _LAYER_ROLES.get(".".join(parts[2:]))
    names = layer_tensor_names(config, tensors, span.start + int(parts[1])).get(role or "")
    if names is None:
        raise KeyError(f"no GGUF tensor maps to parameter module {module_path!r}")
    return names
