"""`ModelConfig`: the architecture hyper-parameters of a Llama-family model, read from GGUF metadata."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from shoal.models.errors import UnsupportedModelError

SUPPORTED_ARCHITECTURES = ("llama",)


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    """GGUF `general.architecture`; only the Llama family is supported."""
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    context_length: int
    rope_theta: float
    rms_eps: float
    tie_embeddings: bool
    """True when the GGUF has no `output.weight` and the head reuses `token_embd.weight`."""

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"architecture {self.architecture!r} is not supported; shoal runs: "
                + ", ".join(SUPPORTED_ARCHITECTURES)
            )
        for name in ("num_layers", "hidden_size", "intermediate_size", "num_heads", "num_kv_heads",
                     "head_dim", "vocab_size", "context_length"):
            if getattr(self, name) <= 0:
                raise UnsupportedModelError(f"model config field {name} must be positive")
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedModelError(
                f"{self.num_heads} attention heads are not a multiple of {self.num_kv_heads} KV heads"
            )
        if self.num_heads * self.head_dim != self.hidden_size:
            raise UnsupportedModelError("heads × head_dim must equal the hidden size")

    @classmethod
    def from_gguf_metadata(cls, meta: Mapping[str, Any], has_output_weight: bool) -> ModelConfig:
        """Build from GGUF key/values (already decoded to Python values)."""
        arch = meta.get("general.architecture")
        if not isinstance(arch, str):
            raise UnsupportedModelError("GGUF metadata has no general.architecture")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"architecture {arch!r} is not supported; shoal runs: " + ", ".join(SUPPORTED_ARCHITECTURES)
            )

        def need(key: str) -> Any:
            full = f"{arch}.{key}"
            if full not in meta:
                raise UnsupportedModelError(f"GGUF metadata lacks {full}")
            return meta[full]

        hidden = int(need("embedding_length"))
        heads = int(need("attention.head_count"))
        vocab = meta.get(f"{arch}.vocab_size")
        if vocab is None:
            tokens = meta.get("tokenizer.ggml.tokens")
            if tokens is None:
                raise UnsupportedModelError("GGUF metadata gives no vocabulary size")
            vocab = len(tokens)
        return cls(
            architecture=arch,
            num_layers=int(need("block_count")),
            hidden_size=hidden,
            intermediate_size=int(need("feed_forward_length")),
            num_heads=heads,
            num_kv_heads=int(meta.get(f"{arch}.attention.head_count_kv", heads)),
            head_dim=int(meta.get(f"{arch}.rope.dimension_count", hidden // heads)),
            vocab_size=int(vocab),
            context_length=int(need("context_length")),
            rope_theta=float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
            rms_eps=float(need("attention.layer_norm_rms_epsilon")),
            tie_embeddings=not has_output_weight,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
