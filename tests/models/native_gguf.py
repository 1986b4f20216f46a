"""A tiny llama-shaped GGUF whose weight matrices use every block type a native build keeps, several mixed
inside one fused module (qkv: Q4_K + Q6_K; gate_up: Q5_0 + Q4_0; …), for the native-build tests.

Classic types are quantized by the `gguf` package; the K-quants (which it cannot quantize) by the small
encoders below (a plain min/max or abs-max fit per sub-block, 6-/8-bit scales per super-block: valid blocks
in llama.cpp's layout, not its optimised search). Deterministic for a seed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter, quants

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN, VOCAB, LAYERS = 256, 4, 2, 64, 512, 512, 2
LAYOUT = {
    "token_embd": "q6_k",
    "blk.0.attn_q": "q4_k", "blk.0.attn_k": "q4_k", "blk.0.attn_v": "q6_k", "blk.0.attn_output": "q5_k",
    "blk.0.ffn_gate": "q5_0", "blk.0.ffn_up": "q4_0", "blk.0.ffn_down": "q8_0",
    "blk.1.attn_q": "q5_1", "blk.1.attn_k": "q4_1", "blk.1.attn_v": "q4_1", "blk.1.attn_output": "f16",
    "blk.1.ffn_gate": "bf16", "blk.1.ffn_up": "bf16", "blk.1.ffn_down": "q6_k",
}
"""Tensor (without `.weight`) -> block type. The embedding is tied (no output.weight): the Q6_K head."""


def _f16(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a.astype(np.float16)).view(np.uint8).reshape(*a.shape, 2)


def encode_q4_k(w: np.ndarray, five_bit: bool = False) -> np.ndarray:
    """W [n, k] (k % 256 == 0) -> Q4_K (or Q5_K) blocks uint8 [n, k/256, 144 | 176]."""
    n, k = w.shape
    top = 31 if five_bit else 15
    x = w.reshape(n, k // 256, 8, 32).astype(np.float32)
    lo = np.minimum(x.min(axis=3), 0.0)
    scale = (x.max(axis=3) - lo) / top
    d = np.maximum(scale.max(axis=2), 1e-8) / 63
    dmin = np.maximum((-lo).max(axis=2), 1e-8) / 63
    d, dmin = d.astype(np.float16).astype(np.float32), dmin.astype(np.float16).astype(np.float32)
    sc = np.clip(np.rint(scale / d[..., None]), 1, 63).astype(np.uint8)
    mn = np.clip(np.rint(-lo / dmin[..., None]), 0, 63).astype(np.uint8)
    step = (d[..., None] * sc)[..., None]
    q = np.clip(np.rint((x + (dmin[..., None] * mn)[..., None]) / step), 0, top).astype(np.uint8)
    scales = np.concatenate([
        (sc[..., :4] & 63) | ((sc[..., 4:] >> 4) << 6),
        (mn[..., :4] & 63) | ((mn[..., 4:] >> 4) << 6),
        (sc[..., 4:] & 0x0F) | ((mn[..., 4:] & 0x0F) << 4)], axis=-1)
    low = q & 0x0F  # [n, S, 8, 32]
    qs = (low[:, :, 0::2] | (low[:, :, 1::2] << 4)).reshape(n, k // 256, 128)
    parts = [_f16(d), _f16(dmin), scales]
    if five_bit:
        high = (q >> 4) & 1  # bit sb of byte l: element 32·sb + l
        parts.append((high << np.arange(8, dtype=np.uint8)[:, None]).sum(axis=2, dtype=np.uint8))
    return np.concatenate([*parts, qs], axis=-1)


def encode_q6_k(w: np.ndarray) -> np.ndarray:
    """W [n, k] -> Q6_K blocks uint8 [n, k/256, 210]."""
    n, k = w.shape
    x = w.reshape(n, k // 256, 16, 16).astype(np.float32)
    scale = np.abs(x).max(axis=3) / 31
    d = np.maximum(np.abs(scale).max(axis=2), 1e-8) / 127
    d = d.astype(np.float16).astype(np.float32)
    sc = np.clip(np.rint(scale / d[..., None]), 1, 127).astype(np.int8)
    step = (d[..., None] * sc.astype(np.float32))[..., None]
    q = (np.clip(np.rint(x / step), -32, 31) + 32).astype(np.uint8).reshape(n, k // 256, 2, 128)
    ql = (q[..., :64] & 0x0F) | ((q[..., 64:] & 0x0F) << 4)  # [n, S, 2, 64]
    high = (q >> 4).reshape(n, k // 256, 2, 4, 32)  # bits 2t..2t+1 of qh[l]: element 32t + l
    qh = (high << (2 * np.arange(4, dtype=np.uint8))[:, None]).sum(axis=3, dtype=np.uint8)
    return np.concatenate([ql.reshape(n, k // 256, 128), qh.reshape(n, k // 256, 64),
                           sc.view(np.uint8), _f16(d)], axis=-1)


def encode(kind: str, w: np.ndarray) -> tuple[np.ndarray, GGMLQuantizationType]:
    qtype = GGMLQuantizationType[kind.upper()]
    if kind in ("q4_k", "q5_k"):
        return encode_q4_k(w, kind == "q5_k"), qtype
    if kind == "q6_k":
        return encode_q6_k(w), qtype
    return quants.quantize(w.astype(np.float32), qtype), qtype


def shapes() -> dict[str, tuple[int, int]]:
    qkv = {"attn_q": HEADS * HEAD_DIM, "attn_k": KV_HEADS * HEAD_DIM, "attn_v": KV_HEADS * HEAD_DIM}
    out = {"token_embd": (VOCAB, HIDDEN)}
    for layer in range(LAYERS):
        p = f"blk.{layer}."
        out.update({p + name: (rows, HIDDEN) for name, rows in qkv.items()})
        out.update({p + "attn_output": (HIDDEN, HEADS * HEAD_DIM), p + "ffn_gate": (FFN, HIDDEN),
                    p + "ffn_up": (FFN, HIDDEN), p + "ffn_down": (HIDDEN, FFN)})
    return out


def write_native_gguf(path: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    writer = GGUFWriter(path, "llama")
    writer.add_block_count(LAYERS)
    writer.add_context_length(256)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(VOCAB)
    for name, (rows, cols) in shapes().items():
        w = rng.standard_normal((rows, cols)) * (0.05 if name == "token_embd" else cols ** -0.5)
        data, qtype = encode(LAYOUT[name], w.astype(np.float32))
        data = data.reshape(rows, -1)
        writer.add_tensor(f"{name}.weight", data, raw_shape=data.shape, raw_dtype=qtype)
    for layer in range(LAYERS):
        for norm in ("attn_norm", "ffn_norm"):
            weight = (1 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32)
            writer.add_tensor(f"blk.{layer}.{norm}.weight", weight)
    writer.add_tensor("output_norm.weight", np.ones(HIDDEN, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
