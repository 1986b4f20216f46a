"""Write a GGUF with a real model's shapes (llama architecture) and random quantized blocks, for speed runs
of the native build where no such model file is at hand (weights are noise: never use it for correctness).

    python bench/shaped_gguf.py llama-3.2-1b q4_k_m OUT.gguf     # or llama-3.2-3b, qwen2.5-0.5b; q4_k_m | q8_0

The tokenizer (and so the vocabulary, 49152) is the embedded SmolLM2's, so engines can encode a chat prompt;
everything else has the named model's sizes. "q4_k_m" mimics llama.cpp's mix: Q4_K, with Q6_K for the tied
embedding and for attn_v / ffn_down of every other layer, and Q5_0 / Q8_0 where a row is not a multiple of
256 (Qwen2.5-0.5B's 896).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SHAPES = {  # hidden, ffn, layers, heads, kv heads, head dim
    "llama-3.2-1b": (2048, 8192, 16, 32, 8, 64),
    "llama-3.2-3b": (3072, 8192, 28, 24, 8, 128),
    "qwen2.5-0.5b": (896, 4864, 24, 14, 2, 64),
}
BLOCKS = {"q4_k": (256, 144, [(0, 1e-4, 2e-3), (2, 1e-4, 2e-3)]), "q6_k": (256, 210, [(208, 1e-4, 1e-3)]),
          "q5_0": (32, 22, [(0, 1e-3, 2e-2)]), "q8_0": (32, 34, [(0, 1e-3, 1e-2)])}


def random_blocks(kind: str, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    block, size, scales = BLOCKS[kind]
    raw = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    for at, lo, hi in scales:
        raw[:, :, at:at + 2] = rng.uniform(lo, hi, (rows, cols // block, 1)).astype(np.float16).view(np.uint8)
    return raw.reshape(rows, -1)


def write(shape: str, mix: str, out: Path) -> None:
    import gguf
    from shoal.models.embedded import embedded_model_path

    hidden, ffn, layers, heads, kv_heads, head_dim = SHAPES[shape]
    src = gguf.GGUFReader(embedded_model_path())
    writer = gguf.GGUFWriter(out, "llama")
    for key, field in src.fields.items():
        if key.startswith("tokenizer."):
            sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(key, field.contents(), field.types[0], sub)
    vocab = len(src.fields["tokenizer.ggml.tokens"].contents())
    writer.add_block_count(layers)
    writer.add_context_length(2048)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(500000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(vocab)
    rng = np.random.default_rng(0)
    main, big = ("q4_k", "q6_k") if mix == "q4_k_m" else ("q8_0", "q8_0")

    def tensor(name: str, rows: int, cols: int, kind: str) -> None:
        if kind in ("q4_k", "q6_k") and cols % 256:
            kind = "q5_0" if kind == "q4_k" else "q8_0"
        raw = random_blocks(kind, rows, cols, rng)
        writer.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=gguf.GGMLQuantizationType[kind.upper()])

    tensor("token_embd.weight", vocab, hidden, big)
    for i in range(layers):
        p = f"blk.{i}."
        tensor(p + "attn_q.weight", heads * head_dim, hidden, main)
        tensor(p + "attn_k.weight", kv_heads * head_dim, hidden, main)
        tensor(p + "attn_v.weight", kv_heads * head_dim, hidden, big if i % 2 == 0 else main)
        tensor(p + "attn_output.weight", hidden, heads * head_dim, main)
        tensor(p + "ffn_gate.weight", ffn, hidden, main)
        tensor(p + "ffn_up.weight", ffn, hidden, main)
        tensor(p + "ffn_down.weight", hidden, ffn, big if i % 2 == 0 else main)
        writer.add_tensor(p + "attn_norm.weight", np.ones(hidden, np.float32))
        writer.add_tensor(p + "ffn_norm.weight", np.ones(hidden, np.float32))
    writer.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
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
