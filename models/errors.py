"""Domain errors of the models package. Messages are meant for users: say what is wrong and what to do."""


class ModelError(Exception):
    """Base class for every error raised by `models`."""


class ModelFileError(ModelError):
    """A model file is missing, truncated, not GGUF, or otherwise unreadable."""


class UnsupportedModelError(ModelFileError):
    """The GGUF describes an architecture or tensor type shoal cannot run (the message lists what it runs)."""


class InvalidModelError(ModelFileError):
    """A GGUF whose numbers are out of bounds or disagree with its own tensor index (models/validate.py)."""


class CompileError(ModelError):
    """Building a shard with TVM failed."""


class ContextOverflowError(ModelError):
    """A sequence would grow past the model's (or the runtime's) context length."""


class ModelNotFoundError(LookupError):
    """No model by that name (or CID) is known to this node (not a `ModelError`: nothing failed to run)."""


class InsufficientMemoryError(ModelError):
    """A stage would need more memory than the machine has free (the message says the largest context that
    fits)."""


class ModelMemoryBudgetError(ModelError):
    """Loading a model would take the node's loaded models past its memory budget (`[models]
    memory_budget_mb`) even after unloading the idle ones; the message says what is loaded and what the model
    needs. `retryable`: some loaded model is busy or loading, so waiting may make room."""

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable
