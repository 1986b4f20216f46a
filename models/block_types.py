"""The per-tensor block types of a "native" build: every linear weight and the token embedding keep the GGUF
block type they are stored in (models/kernels/blocks.py `ALL_KINDS`), so a Q4_K_M file (Q4_K beside Q6_K,
sometimes Q5_0 / Q8_0) runs as it is. Kept free of TVM imports (the runtime loads weights with it).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from shoal.models.errors import UnsupportedModelError
from shoal.models.kernels.blocks import ALL_KINDS, TUNED_KINDS, concat_tensors, pack_blocks

NATIVE = "native"
ROLE_MODULES = {"qkv": "self_attn.qkv_proj", "o": "self_attn.o_proj", "gate_up": "mlp.gate_up_proj",
                "down": "mlp.down_proj"}
"""Linear-layer role (models/llama.py `make_linear`) -> shard module under `layers.N.` ("head": lm_head)."""


@dataclass(frozen=True)
class TensorTypes:
    """Block type and row count of each GGUF tensor."""

    kinds: Mapping[str, str]
    """Tensor name -> block type name, lower case as in `ALL_KINDS` ("q4_k", "f16", ...; others too)."""
    rows: Mapping[str, int]
    """Tensor name -> rows (output features) of the [out, in] matrix."""

    @classmethod
    def from_gguf(cls, gguf_model: Any) -> TensorTypes:
        """From a models.gguf.GGUFModel (or anything with `tensor_names()` and `tensor_info(name)`)."""
        kinds, rows = {}, {}
        for name in gguf_model.tensor_names():
            info = gguf_model.tensor_info(name)
            kinds[name] = info.type.name.lower()
            rows[name] = int(info.shape[0])
        return cls(kinds, rows)

    def kind(self, name: str) -> str:
        """The block type of tensor `name`; UnsupportedModelError when no kernel keeps it."""
        kind = self.kinds[name]
        if kind not in ALL_KINDS:
            raise UnsupportedModelError(
                f"tensor {name} is {kind.upper()}, which a native build cannot keep (kernels for "
                f"{', '.join(k.upper() for k in ALL_KINDS)}); load this model with quantization='f32'")
        return kind

    def groups(self, sources: list[str]) -> list[tuple[str, list[str]]]:
        """`sources` (a module's tensors in row order) cut into runs of one block type."""
        out: list[tuple[str, list[str]]] = []
        for name in sources:
            kind = self.kind(name)
            if out and out[-1][0] == kind:
                out[-1][1].append(name)
            else:
                out.append((kind, [name]))
        return out

    def parts(self, sources: list[str]) -> list[tuple[str, int]]:
        """(block type, rows) of each row part of a module made of `sources`."""
        return [(kind, sum(self.rows[n] for n in names)) for kind, names in self.groups(sources)]


def native_arrays(types: TensorTypes, sources: list[str], shapes: Mapping[str, tuple[int, int]],
                  read: Any, embedding: bool) -> dict[str, Any]:
    """Parameter arrays (name within the module -> array) of a native module made of `sources`: a single
    part's own names (qweight, scale[, min] for the tuned Q4_1/Q8_0 linears and the Q8_0 embedding,
    blocks.py's names otherwise), or `parts.<i>.<name>` for a MixedLinear. `read(name)`: raw bytes."""
    from shoal.models.kernels.quant import concat_packed, pack_q4_1, pack_q8_0

    out: dict[str, Any] = {}
    groups = types.groups(sources)
    for index, (kind, names) in enumerate(groups):
        if kind == "q8_0" if embedding else kind in TUNED_KINDS:
            pack = pack_q4_1 if kind == "q4_1" else pack_q8_0
            weights = [pack(read(name), *shapes[name]) for name in names]
            w = weights[0] if len(weights) == 1 else concat_packed(weights)
            arrays = dict(zip(["qweight", "scale", "min"], w.arrays(), strict=False))
        else:
            tensors = [pack_blocks(kind, read(name), *shapes[name]) for name in names]
            arrays = (tensors[0] if len(tensors) == 1 else concat_tensors(tensors)).param_dict()
        prefix = f"parts.{index}." if len(groups) > 1 else ""
        out.update({prefix + name: array for name, array in arrays.items()})
    return out
