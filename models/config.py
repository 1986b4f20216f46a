"""`ModelConfig`: the architecture hyper-parameters of a decoder-only model, read from GGUF metadata.

One dataclass covers every family shoal runs (`ARCHITECTURES`); a family is the Llama decoder plus options:
QKV biases (qwen2), per-head Q/K RMSNorm (qwen3, gemma3), NEOX-order RoPE (all but llama), fused QKV and
gate/up tensors (phi3, a weight-layout matter: models/weights.py), and Gemma 3's scaled embeddings, extra
post-norms, GELU, sliding-window layers with their own RoPE base and optional final logit soft-capping.
"""

from __future__ import annotations

from collections.abc import Container, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from shoal.models.errors import UnsupportedModelError

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3", "phi3", "gemma3")
ACTIVATIONS = ("silu", "gelu_tanh")
_NEOX_ROPE = frozenset({"qwen2", "qwen3", "phi3", "gemma3"})
"""Families whose GGUF keeps Q/K rows in HF order and rotates the two halves of a head (llama.cpp NEOX)."""
_GEMMA3_SWA_PATTERN = 6


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    """GGUF `general.architecture`, one of `SUPPORTED_ARCHITECTURES`."""
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
    rope_neox: bool = False
    """RoPE rotates pairs (i, i + D/2) (NEOX, HF order), not adjacent pairs (2i, 2i + 1) (llama NORM)."""
    rope_freq_scale: float = 1.0
    """Linear RoPE scaling: positions are multiplied by this (llama.cpp `1 / rope.scaling.factor`)."""
    qkv_bias: bool = False
    """Q, K and V projections have biases (qwen2)."""
    qk_norm: bool = False
    """Per-head RMSNorm of Q and K before RoPE (qwen3, gemma3)."""
    post_norms: bool = False
    """RMSNorm on the attention and MLP outputs before each residual add (gemma3)."""
    activation: str = "silu"
    """Gate activation of the gated MLP: `silu` (SwiGLU) or `gelu_tanh` (GeGLU, gemma3)."""
    embedding_scale: float = 1.0
    """Token embeddings are multiplied by this (gemma3: sqrt(hidden))."""
    attention_scale: float = 0.0
    """Softmax scale of attention scores; 0 means head_dim ** -0.5."""
    logit_softcap: float = 0.0
    """If positive, logits become softcap · tanh(logits / softcap)."""
    sliding_window: int = 0
    """Window of the sliding-window layers (0: every layer attends to the whole context)."""
    sliding_window_pattern: int = 0
    """With a window: layer i slides unless i % pattern == pattern - 1 (llama.cpp's pattern; 0 or 1: all)."""
    rope_theta_local: float = 0.0
    """RoPE base of the sliding-window layers (0: `rope_theta`); their RoPE is never scaled."""
    rope_freq_factors: bool = False
    """RoPE frequency i is divided by the GGUF's `rope_freqs.weight`[i] (Llama 3.1+ scaling)."""

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
        if self.head_dim % 2:
            raise UnsupportedModelError(f"head_dim {self.head_dim} must be even for RoPE")
        if self.activation not in ACTIVATIONS:
            raise UnsupportedModelError(
                f"activation {self.activation!r} is not supported; use one of {', '.join(ACTIVATIONS)}"
            )
        if self.sliding_window < 0 or self.sliding_window_pattern < 0 or self.rope_freq_scale <= 0:
            raise UnsupportedModelError("sliding_window and its pattern must be >= 0, rope_freq_scale > 0")

    @property
    def softmax_scale(self) -> float:
        return self.attention_scale or self.head_dim ** -0.5

    def is_sliding(self, layer: int) -> bool:
        """Whether global layer `layer` attends only to the last `sliding_window` positions."""
        if not self.sliding_window:
            return False
        pattern = self.sliding_window_pattern
        return pattern <= 1 or layer % pattern < pattern - 1

    def layer_rope(self, layer: int) -> tuple[float, float]:
        """(RoPE base, linear position scale) of global layer `layer`."""
        if self.is_sliding(layer) and self.rope_theta_local:
            return self.rope_theta_local, 1.0
        return self.rope_theta, self.rope_freq_scale

    @classmethod
    def from_gguf_metadata(cls, meta: Mapping[str, Any], has_output_weight: bool,
                           tensor_names: Container[str] = ()) -> ModelConfig:
        """Build from GGUF key/values (already decoded to Python values) and the file's tensor names."""
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
        if isinstance(meta.get(f"{arch}.attention.head_count"), list) or isinstance(
                meta.get(f"{arch}.attention.head_count_kv"), list):
            raise UnsupportedModelError("per-layer head counts are not supported")
        vocab = meta.get(f"{arch}.vocab_size")
        if vocab is None:
            tokens = meta.get("tokenizer.ggml.tokens")
            if tokens is None:
                raise UnsupportedModelError("GGUF metadata gives no vocabulary size")
            vocab = len(tokens)
        head_dim = int(meta.get(f"{arch}.attention.key_length", hidden // heads))
        if int(meta.get(f"{arch}.attention.value_length", head_dim)) != head_dim:
            raise UnsupportedModelError("key and value head sizes differ; shoal needs them equal")
        rotary = int(meta.get(f"{arch}.rope.dimension_count", head_dim))
        if rotary != head_dim:
            raise UnsupportedModelError(f"partial RoPE ({rotary} of {head_dim} dimensions) is not supported")
        scaling = str(meta.get(f"{arch}.rope.scaling.type", "none"))
        factor = float(meta.get(f"{arch}.rope.scaling.factor", 0.0)
                       or meta.get(f"{arch}.rope.scale_linear", 0.0))
        if scaling not in ("none", "linear") and factor not in (0.0, 1.0):
            raise UnsupportedModelError(f"RoPE scaling {scaling!r} is not supported (shoal does linear)")
        if "rope_factors_short.weight" in tensor_names or "rope_factors_long.weight" in tensor_names:
            raise UnsupportedModelError("long-context RoPE factors (rope_factors_short/long, e.g. Phi-3 "
                                        "128k) are not supported")
        options: dict[str, Any] = {"rope_freq_factors": "rope_freqs.weight" in tensor_names}
        if arch == "qwen2":
            options["qkv_bias"] = True
        if arch == "qwen3":
            options["qk_norm"] = True
        if arch == "gemma3":
            window = int(meta.get(f"{arch}.attention.sliding_window", 0))
            pattern = meta.get(f"{arch}.attention.sliding_window_pattern", _GEMMA3_SWA_PATTERN)
            if isinstance(pattern, list):
                raise UnsupportedModelError("per-layer sliding-window flags are not supported")
            options.update(
                qk_norm=True, post_norms=True, activation="gelu_tanh", embedding_scale=hidden ** 0.5,
                attention_scale=head_dim ** -0.5, sliding_window=window, sliding_window_pattern=int(pattern),
                logit_softcap=float(meta.get(f"{arch}.final_logit_softcapping", 0.0)),
                rope_theta_local=float(meta.get(f"{arch}.rope.freq_base_swa", 10000.0)) if window else 0.0,
            )
            if int(need("block_count")) == 62:  # Gemma 3 27B: query_pre_attn_scalar = hidden / heads
                options["attention_scale"] = (hidden / heads) ** -0.5
        return cls(
            architecture=arch,
            num_layers=int(need("block_count")),
            hidden_size=hidden,
            intermediate_size=int(need("feed_forward_length")),
            num_heads=heads,
            num_kv_heads=int(meta.get(f"{arch}.attention.head_count_kv", heads)),
            head_dim=head_dim,
            vocab_size=int(vocab),
            context_length=int(need("context_length")),
            rope_theta=float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
            rms_eps=float(need("attention.layer_norm_rms_epsilon")),
            tie_embeddings=not has_output_weight,
            rope_neox=arch in _NEOX_ROPE,
            rope_freq_scale=1.0 / factor if factor else 1.0,
            **options,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
