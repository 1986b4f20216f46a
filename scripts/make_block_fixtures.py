#!/usr/bin/env python3
"""Write llama.cpp's outputs for each family's every-block-type GGUF (not run in CI: needs
llama-cpp-python 0.3.36).

    python scripts/make_block_fixtures.py

For each family in `tests/models/family_gguf.py` it writes the `blocks=MIXED` file (seed 0: hidden 256, every
weight matrix in one of the ten block types a native build keeps, all ten in each file), and for each block
type the llama file with every matrix in that type; it runs a fixed prompt of token ids through llama.cpp
(F32 KV cache, one thread) and greedy-decodes 32 tokens, recording llama.cpp's top-8 ids and logits after the
prompt and after each generated token (teacher-forcing data for tests/models/test_family_blocks.py).
Output: tests/fixtures/llamacpp_family_blocks.json, stamped with the llama-cpp-python version and each GGUF's
sha256 (the test re-creates the GGUF and refuses to compare against a fixture of another file).
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from scripts.make_family_fixtures import PROMPT, greedy_top, open_llama  # noqa: E402
from tests.models.family_gguf import (  # noqa: E402
    BLOCK_TYPES,
    FAMILIES,
    MIXED,
    block_layout,
    sha256,
    write_family_gguf,
)

OUT = REPO / "tests" / "fixtures" / "llamacpp_family_blocks.json"
STEPS = 32
TOP = 8


def run_file(llama_cpp: object, arch: str, blocks: str, path: Path) -> dict[str, object]:
    tokens, top_ids, top_logits = greedy_top(open_llama(llama_cpp, path), PROMPT, STEPS, TOP)
    margins = [t[0] - t[1] for t in top_logits]
    print(f"{arch} {blocks}: tokens {tokens[:12]}..., top-1 margin min {min(margins):.4f} "
          f"median {float(np.median(margins)):.3f}, logit spread {top_logits[0][0]:.2f}")
    return {"gguf_sha256": sha256(path), "layout": block_layout(arch, blocks), "tokens": tokens,
            "top_ids": top_ids, "top_logits": top_logits}


def main() -> int:
    try:
        import llama_cpp
    except ImportError:
        print("llama-cpp-python is not installed: pip install llama-cpp-python==0.3.36", file=sys.stderr)
        return 2
    files: dict[str, dict[str, object]] = {}
    runs = [(arch, MIXED) for arch in FAMILIES] + [("llama", kind) for kind in BLOCK_TYPES]
    with tempfile.TemporaryDirectory() as tmp:
        for arch, blocks in runs:
            path = write_family_gguf(arch, Path(tmp) / f"{arch}-{blocks}.gguf", seed=0, blocks=blocks)
            files[f"{arch}-{blocks}"] = run_file(llama_cpp, arch, blocks, path)
    data = {"llama_cpp_python": llama_cpp.__version__, "generated_by": "scripts/make_block_fixtures.py",
            "seed": 0, "prompt": PROMPT, "steps": STEPS, "top": TOP, "files": files}
    OUT.write_text(json.dumps(data) + "\n")
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
