"""A model ready to serve requests: `ServedModel` (loaded on this node) and `Servable`, what the API and the
router read of any model they serve, whether it is loaded here or stands in for a peer's."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from shoal.models.config import ModelConfig
from shoal.models.embeddings import Embedder
from shoal.models.generate import Engine
from shoal.models.stage import Stage
from shoal.models.tokenizer import Tokenizer


class PromptTokenizer(Protocol):
    """Turns a prompt into token ids (blocking: call it off the event loop)."""

    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def encode_chat(self, messages: Sequence[Mapping[str, Any]]) -> list[int]: ...


class Embeds(Protocol):
    """Turns token-id sequences into unit vectors (blocking: call it off the event loop): `Embedder` here,
    or a peer's through the mesh."""

    @property
    def dimensions(self) -> int: ...

    def embed(self, inputs: Sequence[Sequence[int]]) -> list[Any]: ...


class Servable(Protocol):
    """What serving a request needs of a model: its name, tokenizer and context length, and its engine
    (None when a peer runs the model and this node only routes to it)."""

    @property
    def name(self) -> str: ...

    @property
    def tokenizer(self) -> PromptTokenizer: ...

    @property
    def context_length(self) -> int: ...

    @property
    def engine(self) -> Engine | None: ...

    @property
    def backend(self) -> str: ...

    @property
    def config(self) -> ModelConfig:
        """The model's shape (layers, sizes), for planning where it runs."""
        ...

    @property
    def weight_bytes(self) -> int:
        """Bytes of the model's weights (0: unknown here; the node's catalog has the file size)."""
        ...

    @property
    def sampling_defaults(self) -> Mapping[str, float | int]:
        """`SamplingParams` defaults of this model (its GGUF `general.sampling.*`); a request's own values
        win. Empty: the documented defaults."""
        ...

    @property
    def embedder(self) -> Embeds | None:
        """Embeds texts with this model (None: it cannot embed where it is)."""
        ...


@dataclass
class ServedModel:
    """A model loaded on this node: a running engine over its stages."""

    name: str
    tokenizer: Tokenizer
    engine: Engine
    context_length: int
    """Longest prompt + completion one request may use (the engine's `max_context`)."""
    stages: list[Stage]
    backend: str
    sampling_defaults: Mapping[str, float | int] = field(default_factory=dict)
    """From the GGUF's `general.sampling.*` keys (`models.sampling.defaults_from_gguf`)."""
    embedder: Embedder | None = None
    """For `/v1/embeddings` (its weights load on first use)."""

    @property
    def config(self) -> ModelConfig:
        return self.stages[0].config

    @property
    def weight_bytes(self) -> int:
        return 0  # the catalog entry (`resolve(name).size`) has the file size
