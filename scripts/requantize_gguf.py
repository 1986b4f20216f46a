#!/usr/bin/env python3
"""Re-quantize a GGUF's weight matrices to another block type (for the native-build checks, issue "every
common GGUF block type"): every 2-D weight is dequantized to float32 and quantized again; norms stay F32 and
all metadata (tokenizer included) is copied.

    python scripts/requantize_gguf.py SRC.gguf DST.gguf TYPE

TYPE q8_0, q4_0, q4_1, q5_0, q5_1, f16, bf16 use the `gguf` package's quantizer (deterministic NumPy: the
same SRC gives the same bytes). The K-quant file types q4_k_m, q5_k_m, q6_k (llama.cpp's mixes: Q4_K_M is
Q4_K with Q6_K for some tensors, and Q5_0 / Q8_0 ... for rows not a multiple of 256) need llama-cpp-python:
an F32 GGUF is written first, then `llama_model_quantize` makes DST.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

GGUF_TYPES = ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "f16", "bf16", "f32")
LLAMA_FTYPES = {"q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
                "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K", "q4_k_s": "LLAMA_FTYPE_MOSTLY_Q4_K_S"}


def requantize_with_gguf(src: Path, dst: Path, kind: str) -> None:
    import gguf

    reader = gguf.GGUFReader(src)
    arch = str(reader.fields["general.architecture"].contents())
    writer = gguf.GGUFWriter(dst, arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), field.types[0], sub_type)
    qtype = gguf.GGMLQuantizationType[kind.upper()]
    for tensor in reader.tensors:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        shape = [int(s) for s in reversed(tensor.shape)]  # numpy order [rows, cols]
        values = values.reshape(shape)
        if values.ndim < 2 or qtype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(tensor.name, values)
            continue
        data = gguf.quants.quantize(values, qtype)
        writer.add_tensor(tensor.name, data, raw_shape=data.shape, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def requantize_with_llama_cpp(src: Path, dst: Path, kind: str) -> None:
    import llama_cpp

    with tempfile.TemporaryDirectory() as tmp:
        f32 = Path(tmp) / "f32.gguf"
        requantize_with_gguf(src, f32, "f32")
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, LLAMA_FTYPES[kind])
        params.nthread = 2
        if llama_cpp.llama_model_quantize(str(f32).encode(), str(dst).encode(), params) != 0:
            raise SystemExit(f"llama_model_quantize failed for {kind}")


def requantize(src: Path, dst: Path, kind: str) -> None:
    if kind in GGUF_TYPES:
        requantize_with_gguf(src, dst, kind)
    elif kind in LLAMA_FTYPES:
        requantize_with_llama_cpp(src, dst, kind)
    else:
        raise SystemExit(f"unknown type {kind!r}: one of {', '.join(GGUF_TYPES + tuple(LLAMA_FTYPES))}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", type=Path)
    parser.add_argument("dst", type=Path)
    parser.add_argument("type")
    args = parser.parse_args(argv)
    requantize(args.src, args.dst, args.type.lower())
    return 0


if __name__ == "__main__":
    sys.exit(main())
