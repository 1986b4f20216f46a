"""Write a GGUF with a real model's shapes and architecture metadata and random quantized blocks, for speed
runs of the native build where no such model file is at hand (weights are noise: never use it for
correctness).

    python bench/shaped_gguf.py llama-3.2-1b q4_k_m OUT.gguf     # or qwen2.5-0.5b, gemma-3-1b; q4_k_m | q8_0

Each shape is written as its own GGUF architecture with what llama.cpp's converter writes for it:
- `llama-3.2-1b` (`llama`): tied embedding, RoPE base 500k with Llama 3's `rope_freqs.weight` (factor 32);
- `qwen2.5-0.5b` (`qwen2`): Q/K/V biases, tied embedding, NEOX RoPE base 1M, eps 1e-6;
- `gemma-3-1b` (`gemma3`): head dim 256 (4 query heads, 1 KV head: heads × head dim ≠ hidden), per-head Q/K
  RMSNorm, post-attention and post-FFN norms, GeGLU, sliding window 512 on five of every six layers (every
  6th global), RoPE base 10k on the local layers and 1M on the global ones, tied embedding scaled by
  √hidden (norm weights are 1 as the converter stores Gemma's 1 + w).
The tokenizer, and so the vocabulary (49152), is the embedded SmolLM2's for every shape, so both engines can
encode a chat prompt — Qwen2.5's 151936 and Gemma 3's 262144 rows would add 136 MB / 300 MB (Q8_0) of
embedding that decode only reads through the tied head. Everything else has the named model's sizes and a
context of at least 4096 positions. "q4_k_m" mimics llama.cpp's mix: Q4_K, with Q6_K for the tied embedding
and for attn_v / ffn_down of every other layer, and Q5_0 / Q8_0 where a row is not a multiple of 256
(Qwen2.5-0.5B's 896, Gemma-3-1B's 1152).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.models.family_gguf import llama3_rope_factors

SHAPES = {  # hidden, ffn, layers, heads, kv heads, head dim
    "llama-3.2-1b": (2048, 8192, 16, 32, 8, 64),
    "llama-3.2-3b": (3072, 8192, 28, 24, 8, 128),
    "llama-3.2-3b-slice": (768, 2048, 12, 6, 2, 128),  # a quarter of the 3B's width, 12 of its 28 layers
    "qwen2.5-0.5b": (896, 4864, 24, 14, 2, 64),
    "gemma-3-1b": (1152, 6912, 26, 4, 1, 256),
}
ARCHITECTURES = {"qwen2.5-0.5b": "qwen2", "gemma-3-1b": "gemma3"}
"""GGUF architecture of a shape; `llama` (Llama 3.2's metadata) for any shape not named here."""
CONTEXT = {"qwen2.5-0.5b": 32768, "gemma-3-1b": 32768}
"""Trained context (`<arch>.context_length`); Llama 3.2's 131072 for the others."""
GEMMA3_WINDOW = 512
BLOCKS = {"q4_k": (256, 144, [(0, 1e-4, 2e-3), (2, 1e-4, 2e-3)]), "q6_k": (256, 210, [(208, 1e-4, 1e-3)]),
          "q5_0": (32, 22, [(0, 1e-3, 2e-2)]), "q8_0": (32, 34, [(0, 1e-3, 1e-2)])}


def random_blocks(kind: str, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    block, size, scales = BLOCKS[kind]
    raw = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    for at, lo, hi in scales:
        raw[:, :, at:at + 2] = rng.uniform(lo, hi, (rows, cols // block, 1)).astype(np.float16).view(np.uint8)
    return raw.reshape(rows, -1)


def _metadata(w: Any, arch: str, shape: str) -> None:
    """The architecture's hyperparameters, as llama.cpp's converter writes them."""
    hidden, ffn, layers, heads, kv_heads, head_dim = SHAPES[shape]
    w.add_block_count(layers)
    w.add_context_length(CONTEXT.get(shape, 131072))
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    if arch == "gemma3":
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
        w.add_sliding_window(GEMMA3_WINDOW)
        w.add_rope_freq_base(1e6)
        w.add_rope_freq_base_swa(10000.0)
        w.add_layer_norm_rms_eps(1e-6)
    else:
        w.add_rope_dimension_count(head_dim)
        w.add_rope_freq_base(1e6 if arch == "qwen2" else 500000.0)
        w.add_layer_norm_rms_eps(1e-6 if arch == "qwen2" else 1e-5)


def write(shape: str, mix: str, out: Path) -> None:
    import gguf
    from shoal.models.embedded import embedded_model_path

    hidden, ffn, layers, heads, kv_heads, head_dim = SHAPES[shape]
    arch = ARCHITECTURES.get(shape, "llama")
    src = gguf.GGUFReader(embedded_model_path())
    writer = gguf.GGUFWriter(out, arch)
    writer.add_name(f"shoal shaped {shape} {mix}")
    for key, field in src.fields.items():
        if key.startswith("tokenizer."):
            sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(key, field.contents(), field.types[0], sub)
    vocab = len(src.fields["tokenizer.ggml.tokens"].contents())
    _metadata(writer, arch, shape)
    writer.add_vocab_size(vocab)
    rng = np.random.default_rng(0)
    main, big = ("q4_k", "q6_k") if mix == "q4_k_m" else ("q8_0", "q8_0")
    q_rows, kv_rows = heads * head_dim, kv_heads * head_dim

    def tensor(name: str, rows: int, cols: int, kind: str) -> None:
        if kind in ("q4_k", "q6_k") and cols % 256:
            kind = "q5_0" if kind == "q4_k" else "q8_0"
        raw = random_blocks(kind, rows, cols, rng)
        writer.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=gguf.GGMLQuantizationType[kind.upper()])

    def vector(name: str, n: int, scale: float = 0.0) -> None:
        values = np.ones(n, np.float32) if not scale else (scale * rng.standard_normal(n)).astype(np.float32)
        writer.add_tensor(name, values)

    tensor("token_embd.weight", vocab, hidden, big)
    if arch == "llama":
        writer.add_tensor("rope_freqs.weight",  # Llama 3.2: theta 500k, factor 32, 8k original context
                          llama3_rope_factors(head_dim, 500000.0, factor=32.0, original_context=8192))
    for i in range(layers):
        p = f"blk.{i}."
        tensor(p + "attn_q.weight", q_rows, hidden, main)
        tensor(p + "attn_k.weight", kv_rows, hidden, main)
        tensor(p + "attn_v.weight", kv_rows, hidden, big if i % 2 == 0 else main)
        tensor(p + "attn_output.weight", hidden, q_rows, main)
        tensor(p + "ffn_gate.weight", ffn, hidden, main)
        tensor(p + "ffn_up.weight", ffn, hidden, main)
        tensor(p + "ffn_down.weight", hidden, ffn, big if i % 2 == 0 else main)
        vector(p + "attn_norm.weight", hidden)
        vector(p + "ffn_norm.weight", hidden)
        if arch == "qwen2":
            vector(p + "attn_q.bias", q_rows, 0.5)
            vector(p + "attn_k.bias", kv_rows, 0.5)
            vector(p + "attn_v.bias", kv_rows, 0.1)
        if arch == "gemma3":
            vector(p + "attn_q_norm.weight", head_dim)
            vector(p + "attn_k_norm.weight", head_dim)
            vector(p + "post_attention_norm.weight", hidden)
            vector(p + "post_ffw_norm.weight", hidden)
    vector("output_norm.weight", hidden)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shape", choices=tuple(SHAPES))
    parser.add_argument("mix", choices=("q4_k_m", "q8_0"))
    parser.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    write(args.shape, args.mix, args.out)
    print(f"{args.out}: {args.out.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
