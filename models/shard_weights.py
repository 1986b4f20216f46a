"""A compiled shard's parameters from a GGUF file, as TVM tensors in the order its functions take them:
float32 where the build keeps float32 (norms, biases, `f32` builds), else the packed quantized arrays
(`qweight`, `scale`[, `min`]) built from the GGUF's blocks, which are read with pread (not through the file
mapping) so that the mapped pages do not stay resident once packed."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np
from shoal.models.compile import CompiledShard
from shoal.models.config import ModelConfig
from shoal.models.errors import UnsupportedModelError
from shoal.models.gguf import GGUFModel


def read_blocks(gguf_model: GGUFModel, name: str) -> np.ndarray:
    """A tensor's stored bytes, read with pread rather than through the file mapping, so the mapped pages do
    not stay resident in this process once the weights are packed (peak RSS, issue 3)."""
    info = gguf_model.tensor_info(name)
    fd = os.open(gguf_model.path, os.O_RDONLY)
    try:
        data = os.pread(fd, info.size, info.offset)
    finally:
        os.close(fd)
    if len(data) != info.size:
        raise ValueError(f"tensor {name}: read {len(data)} of {info.size} bytes (truncated file?)")
    return np.frombuffer(data, dtype=np.uint8)


def packed_arrays(gguf_model: GGUFModel, module_path: str, sources: list[str],
                   quantization: str) -> dict[str, Any]:
    """The packed parameter arrays (qweight, scale[, min]) of one quantized module, from the GGUF's blocks."""
    if quantization == "native":  # each tensor keeps its block type (models/block_types.py)
        from shoal.models.block_types import TensorTypes, native_arrays

        shapes = {name: tuple(gguf_model.tensor_info(name).shape) for name in sources}
        return native_arrays(TensorTypes.from_gguf(gguf_model), sources, shapes,
                             lambda name: read_blocks(gguf_model, name), module_path == "embed_tokens")
    from shoal.models.kernels.quant import concat_packed, pack_q4_1, pack_q8_0  # NumPy only: no Relax import
    from shoal.models.weights import WEIGHT_KINDS

    kind = WEIGHT_KINDS[quantization]["embedding" if module_path == "embed_tokens" else "linear"]
    packed = []
    for name in sources:
        info = gguf_model.tensor_info(name)
        if info.type.name.lower() != kind:
            raise UnsupportedModelError(
                f"tensor {name} is {info.type.name}, but a {quantization} build keeps it as {kind.upper()}; "
                "load this model with quantization='f32'"
            )
        out_features, in_features = info.shape
        pack = pack_q4_1 if kind == "q4_1" else pack_q8_0
        packed.append(pack(read_blocks(gguf_model, name), out_features, in_features))
    weight = packed[0] if len(packed) == 1 else concat_packed(packed)
    names = ["qweight", "scale"] + (["min"] if weight.min is not None else [])  # QuantizedLinear's order
    return dict(zip(names, weight.arrays(), strict=True))


def load_shard_weights(gguf_model: GGUFModel, shard: CompiledShard, device: Any,
                  load: Callable[[str], np.ndarray] | None = None) -> list[Any]:
    """The shard's parameters as TVM tensors on `device`, in the order the compiled functions take them.
    `load(name)` dequantizes a GGUF tensor to fp32 (default: `gguf_model.dequantize`)."""
    from shoal.models import tvm_runtime
    from shoal.models.weights import gguf_sources

    load = load or gguf_model.dequantize
    config: ModelConfig = gguf_model.config
    tensor_names = set(gguf_model.tensor_names())
    out = []
    packed: dict[str, dict[str, Any]] = {}
    for name, shape, dtype in shard.params:
        module_path, _, attr = name.rpartition(".")
        if ".parts." in module_path:  # a row part of a native build's MixedLinear
            module_path, _, part = module_path.partition(".parts.")
            attr = f"parts.{part}.{attr}"
        sources = gguf_sources(config, shard.span, module_path, tensor_names)
        if shard.quantization == "f32" or len(shape) == 1:  # norms and biases stay float32
            parts = [load(s) for s in sources]
            array = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
            if array.ndim == 2 and module_path != "embed_tokens":
                array = np.ascontiguousarray(array.T)  # F32Linear stores [in, out]
        else:
            if module_path not in packed:
                packed[module_path] = packed_arrays(gguf_model, module_path, sources, shard.quantization)
            array = packed[module_path].pop(attr)
            if not packed[module_path]:
                del packed[module_path]
        if tuple(array.shape) != shape or str(array.dtype) != dtype:
            raise ValueError(
                f"parameter {name}: the GGUF gives {array.dtype}{list(array.shape)}, "
                f"the compiled shard expects {dtype}{list(shape)}"
            )
        out.append(tvm_runtime.tensor(np.ascontiguousarray(array), device))
        del array
    return out
