"""The layer builders of a "native" build (models/block_types.py): each linear layer and the embedding made in
the block type(s) its GGUF tensors have (models/kernels/relax_blocks.py).

`NativePlan.linear_factory(target)` is models/llama.py's `make_linear(in_features, out_features, role)`:
the model builds its layers in order, so the n-th call for a role ("qkv", "o", "gate_up", "down") is the
span's n-th layer; "head" is the untied output head. The plan checks each module's size against the GGUF.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from shoal.models.block_types import ROLE_MODULES, TensorTypes
from shoal.models.config import ModelConfig
from shoal.models.span import LayerSpan
from shoal.models.weights import gguf_sources
from tvm.relax.frontend import nn


@dataclass
class NativePlan:
    """What a native build of `span` needs from the GGUF: its tensors' block types and row counts."""

    config: ModelConfig
    span: LayerSpan
    types: TensorTypes
    _layers: dict[str, int] = field(default_factory=dict)

    def sources(self, module_path: str) -> list[str]:
        return gguf_sources(self.config, self.span, module_path, self.types.kinds)

    def linear_factory(self, target: Any) -> Callable[[int, int, str], nn.Module]:
        from shoal.models.kernels.relax_blocks import MixedLinear, make_block_linear
        from shoal.models.kernels.relax_ops import kernel_backend

        backend = kernel_backend(target)
        self._layers.clear()

        def make(in_features: int, out_features: int, role: str) -> nn.Module:
            if role == "head":
                path = "lm_head"
            elif role in ROLE_MODULES:
                layer = self._layers.get(role, 0)
                self._layers[role] = layer + 1
                path = f"layers.{layer}.{ROLE_MODULES[role]}"
            else:
                raise ValueError(f"a native build has no GGUF mapping for linear role {role!r}")
            parts = self.types.parts(self.sources(path))
            if sum(rows for _, rows in parts) != out_features:
                raise ValueError(f"{path}: the model wants {out_features} rows, the GGUF's "
                                 f"{self.sources(path)} hold {sum(rows for _, rows in parts)}")
            if len(parts) == 1:
                return make_block_linear(in_features, out_features, parts[0][0], backend)
            return MixedLinear(in_features, parts, backend)

        return make

    def embedding(self, target: Any) -> nn.Module:
        from shoal.models.kernels.relax_blocks import make_block_embedding
        from shoal.models.kernels.relax_ops import kernel_backend

        (name,) = self.sources("embed_tokens")
        return make_block_embedding(self.config.vocab_size, self.config.hidden_size, self.types.kind(name),
                                    kernel_backend(target))
