"""Write small GGUFs of each architecture shoal runs: the family's real tensor names, shape pattern and
metadata (what llama.cpp's converter writes), tiny dimensions, random F32 weights at realistic scales, and a
byte-level BPE vocabulary of 256 bytes plus a few merges and ChatML control tokens. Deterministic for a
seed, so a test re-creates the file and checks its sha256 against the llama.cpp fixture made from it
(scripts/make_family_fixtures.py).

    path = write_family_gguf("qwen3", tmp_path / "qwen3.gguf")
    path = write_family_gguf("phi3", tmp_path / "phi3-mixed.gguf", blocks=MIXED)
    path = write_family_gguf("llama", tmp_path / "llama-q5_k.gguf", blocks="q5_k")

`blocks` writes the family at a shape where the K-quants fit (rows of 256 inputs: BLOCK_SHAPES) with its
weight matrices in block types a native build keeps, one type per tensor (`block_layout`): MIXED takes every
type in turn, so each file holds all ten at least once; a type name puts every matrix in that type. The
matrices are quantized by tests/models/native_gguf.py's encoders; fixtures by scripts/make_block_fixtures.py.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter, quants

from tests.models.native_gguf import encode

FAMILIES = ("llama", "llama3", "qwen2", "qwen3", "phi3", "gemma3")
ARCHITECTURE = {"llama3": "llama"}
"""Variant -> GGUF architecture (others are their own): llama3 is a llama file with Llama 3.1's
`rope_freqs.weight` (llama3 RoPE scaling, as llama.cpp's converter writes it)."""
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
MERGES = ("Ġ t", "h e", "Ġ a", "i n", "Ġt he", "e r", "o n", "Ġ s", "r e", "a t")


@dataclass(frozen=True)
class FamilyShape:
    layers: int = 3
    hidden: int = 64
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 16
    ffn: int = 128
    context: int = 256


SHAPES = {
    "llama": FamilyShape(),
    "llama3": FamilyShape(),
    "qwen2": FamilyShape(),
    "qwen3": FamilyShape(head_dim=32),  # heads x head_dim != hidden, as in Qwen3-0.6B
    "phi3": FamilyShape(kv_heads=4),  # Phi-3-mini: no GQA
    "gemma3": FamilyShape(layers=7, head_dim=32, context=512),  # one global layer after 5 local + 1 local
}
GEMMA3_WINDOW = 8
"""Small, so the fixtures' prompts and 32 generated steps cross the sliding window."""

BLOCK_TYPES = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q4_k", "q5_k", "q6_k", "f16", "bf16")
"""Every block type a native build keeps (models/kernels/blocks.py ALL_KINDS)."""
MIXED = "mixed"
"""`blocks=MIXED`: every block type in one file (`block_layout`)."""
FILE_TYPES = {"q4_0": 2, "q4_1": 3, "q8_0": 7, "q5_0": 8, "q5_1": 9, "q4_k": 15, "q5_k": 17, "q6_k": 18,
              "f16": 1, "bf16": 32, MIXED: 15}
"""`general.file_type` (llama.cpp's LLAMA_FTYPE) of a `blocks` file; a mix is written as Q4_K_M's."""
_BLOCK = FamilyShape(layers=2, hidden=256, heads=4, kv_heads=2, head_dim=64, ffn=512)
BLOCK_SHAPES = {
    "llama": _BLOCK,
    "llama3": _BLOCK,
    "qwen2": _BLOCK,
    "qwen3": FamilyShape(layers=2, hidden=256, heads=4, kv_heads=2, head_dim=128, ffn=512),  # q rows 512
    "phi3": FamilyShape(layers=3, hidden=256, heads=4, kv_heads=4, head_dim=64, ffn=512),  # 4 matrices/layer
    "gemma3": FamilyShape(layers=7, hidden=256, heads=4, kv_heads=2, head_dim=64, ffn=512, context=512),
}
"""Shapes of the `blocks` files: every matrix's input width a multiple of 256 (hidden 256, ffn 512,
heads x head_dim 256 or 512) and at least 10 weight matrices per file, so every block type fits once."""
TIED_EMBEDDING_SCALE = {"qwen3": 0.1, "gemma3": 0.03}
"""Embedding std in the tied `blocks` files: small beside what the layers add to the residual stream (as
in trained models), else the tied head's logit of the last input token (|e|² at hidden 256) wins each step."""


def byte_level_vocab() -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges): GPT-2's 256 byte symbols, one token per merge, the ChatML specials."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    chars, n = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    byte_symbols = [chr(c) for _, c in sorted(zip(printable, chars, strict=True))]
    tokens = byte_symbols + [m.replace(" ", "") for m in MERGES] + list(SPECIALS)
    types = [1] * (len(tokens) - len(SPECIALS)) + [3] * len(SPECIALS)
    return tokens, types, list(MERGES)


def llama3_rope_factors(head_dim: int, theta: float, factor: float = 8.0, low: float = 1.0,
                        high: float = 4.0, original_context: int = 256) -> np.ndarray:
    """The `rope_freqs.weight` llama.cpp's converter computes for Llama 3.1 (`rope_type: llama3`), here with a
    small original context so the factors span 1 … factor over a 16-dim head."""
    inv_freq = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * np.pi / inv_freq
    smooth = (original_context / wavelen - low) / (high - low)
    middle = 1.0 / ((1 - smooth) / factor + smooth)
    factors = np.where(wavelen < original_context / high, 1.0,
                       np.where(wavelen > original_context / low, factor, middle))
    return factors.astype(np.float32)


def matrix_names(arch: str, shape: FamilyShape, tie: bool) -> list[str]:
    """The family's weight matrices (GGUF names without `.weight`) in file order."""
    fused = ARCHITECTURE.get(arch, arch) == "phi3"
    per_layer = (["attn_qkv"] if fused else ["attn_q", "attn_k", "attn_v"]) + ["attn_output"] + (
        ["ffn_up"] if fused else ["ffn_gate", "ffn_up"]) + ["ffn_down"]
    names = ["token_embd"] + [f"blk.{i}.{n}" for i in range(shape.layers) for n in per_layer]
    return names if tie else [*names, "output"]


def block_layout(arch: str, blocks: str = MIXED) -> dict[str, str]:
    """Tensor (without `.weight`) -> block type in the `blocks` file of `arch`. MIXED: BLOCK_TYPES in turn
    over the matrices in file order, starting at a different type per family (so the embedding, the head
    and the fused modules get different types in different families); a type name: that type throughout."""
    shape = BLOCK_SHAPES[arch]
    names = matrix_names(arch, shape, _ties(arch))
    if blocks != MIXED:
        if blocks not in BLOCK_TYPES:
            raise ValueError(f"blocks={blocks!r}: expected {MIXED!r} or one of {BLOCK_TYPES}")
        return dict.fromkeys(names, blocks)
    start = FAMILIES.index(arch) * 3
    return {name: BLOCK_TYPES[(start + i) % len(BLOCK_TYPES)] for i, name in enumerate(names)}


def _ties(arch: str) -> bool:
    return ARCHITECTURE.get(arch, arch) in ("gemma3", "qwen3")


def _matrix(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    return (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)


def _norm(rng: np.random.Generator, n: int) -> np.ndarray:
    return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)


def write_family_gguf(arch: str, path: Path, seed: int = 0, *, tie: bool | None = None,
                      quantized: bool = False, blocks: str | None = None) -> Path:
    """Write a GGUF of architecture `arch` to `path` (deterministic for `seed`) and return `path`.
    `quantized`: the blocks' matrices as Q8_0 and the embedding/head as F16; `blocks` (MIXED or a block
    type): BLOCK_SHAPES' shape, each matrix in its `block_layout` type. Both pad the vocabulary with control
    tokens to a multiple of 16 (what a native build's kernels take)."""
    if arch not in FAMILIES:
        raise ValueError(f"unknown family {arch!r}")
    if blocks and (quantized or tie is not None):
        raise ValueError("blocks has its own layout: no quantized or tie")
    shape = BLOCK_SHAPES[arch] if blocks else SHAPES[arch]
    layout = block_layout(arch, blocks) if blocks else {}
    variant, arch = arch, ARCHITECTURE.get(arch, arch)
    rng = np.random.default_rng(seed)
    tokens, types, merges = byte_level_vocab()
    if quantized or blocks:
        pad = -len(tokens) % 16
        tokens, types = tokens + [f"<|pad{i}|>" for i in range(pad)], types + [3] * pad
    vocab = len(tokens)
    tie = _ties(arch) if tie is None else tie
    w = GGUFWriter(str(path), arch)
    w.add_name("shoal family test")  # not the family: llama.cpp keys vocab quirks on names like "phi3"
    w.add_context_length(shape.context)
    w.add_embedding_length(shape.hidden)
    w.add_block_count(shape.layers)
    w.add_feed_forward_length(shape.ffn)
    w.add_head_count(shape.heads)
    w.add_head_count_kv(shape.kv_heads)
    w.add_layer_norm_rms_eps(1e-6 if arch in ("qwen2", "qwen3", "gemma3") else 1e-5)
    theta = {"qwen2": 1e6, "qwen3": 1e6, "gemma3": 1e6, "llama3": 500_000.0}.get(variant, 10_000.0)
    w.add_rope_freq_base(theta)
    if arch in ("qwen3", "gemma3"):
        w.add_key_length(shape.head_dim)
        w.add_value_length(shape.head_dim)
    else:
        w.add_rope_dimension_count(shape.head_dim)
    if arch == "gemma3":
        w.add_sliding_window(GEMMA3_WINDOW)
        w.add_rope_freq_base_swa(10_000.0)
    if arch == "phi3":
        w.add_rope_scaling_orig_ctx_len(shape.context)
    w.add_file_type(FILE_TYPES[blocks] if blocks else 7 if quantized else 0)  # mostly Q8_0 / all F32
    add_tensor = w.add_tensor

    def put(name: str, array: np.ndarray) -> None:
        if blocks and array.ndim == 2:
            data, qtype = encode(layout[name.removesuffix(".weight")], array)
            data = data.reshape(array.shape[0], -1)
            add_tensor(name, data, raw_shape=data.shape, raw_dtype=qtype)
        elif not quantized or array.ndim != 2:
            add_tensor(name, array)
        elif name.startswith("blk."):
            q8 = quants.quantize(array, GGMLQuantizationType.Q8_0)
            add_tensor(name, q8, raw_shape=q8.shape, raw_dtype=GGMLQuantizationType.Q8_0)
        else:
            add_tensor(name, array.astype(np.float16))


    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    w.add_bos_token_id(tokens.index("<|endoftext|>"))
    w.add_add_bos_token(False)

    hidden, q_rows, kv_rows = shape.hidden, shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    emb_scale = 1.0 / np.sqrt(hidden) if arch == "gemma3" else 1.0  # gemma3 multiplies by sqrt(hidden)
    if blocks and tie:
        emb_scale = TIED_EMBEDDING_SCALE[arch]
    put("token_embd.weight", (rng.standard_normal((vocab, hidden)) * emb_scale).astype(np.float32))
    if variant == "llama3":
        put("rope_freqs.weight", llama3_rope_factors(shape.head_dim, theta))
    for i in range(shape.layers):
        p = f"blk.{i}."
        put(p + "attn_norm.weight", _norm(rng, hidden))
        if arch == "phi3":
            put(p + "attn_qkv.weight", _matrix(rng, q_rows + 2 * kv_rows, hidden))
        else:
            put(p + "attn_q.weight", _matrix(rng, q_rows, hidden))
            put(p + "attn_k.weight", _matrix(rng, kv_rows, hidden))
            put(p + "attn_v.weight", _matrix(rng, kv_rows, hidden))
        if arch == "qwen2":
            put(p + "attn_q.bias", (0.5 * rng.standard_normal(q_rows)).astype(np.float32))
            put(p + "attn_k.bias", (0.5 * rng.standard_normal(kv_rows)).astype(np.float32))
            put(p + "attn_v.bias", (0.1 * rng.standard_normal(kv_rows)).astype(np.float32))
        if arch in ("qwen3", "gemma3"):
            put(p + "attn_q_norm.weight", _norm(rng, shape.head_dim))
            put(p + "attn_k_norm.weight", _norm(rng, shape.head_dim))
        put(p + "attn_output.weight", _matrix(rng, hidden, q_rows))
        if arch == "gemma3":
            put(p + "post_attention_norm.weight", _norm(rng, hidden))
        put(p + "ffn_norm.weight", _norm(rng, hidden))
        if arch == "phi3":
            put(p + "ffn_up.weight", _matrix(rng, 2 * shape.ffn, hidden))  # gate rows, then up rows
        else:
            put(p + "ffn_gate.weight", _matrix(rng, shape.ffn, hidden))
            put(p + "ffn_up.weight", _matrix(rng, shape.ffn, hidden))
        put(p + "ffn_down.weight", _matrix(rng, hidden, shape.ffn))
        if arch == "gemma3":
            put(p + "post_ffw_norm.weight", _norm(rng, hidden))
    put("output_norm.weight", _norm(rng, hidden))
    if not tie:
        put("output.weight", 2.0 * _matrix(rng, vocab, hidden))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
