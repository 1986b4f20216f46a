#!/usr/bin/env python3
"""Write llama.cpp's outputs for a small GGUF of each architecture shoal runs (not run in CI: needs
llama-cpp-python 0.3.36).

    python scripts/make_family_fixtures.py

For each family in `tests/models/family_gguf.py` (llama, qwen2, qwen3, phi3, gemma3) it writes that GGUF
(seed 0), runs a fixed prompt of token ids through llama.cpp (F32 weights and KV cache, one thread) and
greedy-decodes 32 tokens, recording llama.cpp's logits of every prompt position and its top-8 ids/logits at
each step. Output: tests/fixtures/llamacpp_families.json, stamped with the llama-cpp-python version and each
GGUF's sha256 (the test re-creates the GGUF and refuses to compare against a fixture of another file).
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.models.family_gguf import FAMILIES, sha256, write_family_gguf  # noqa: E402

OUT = REPO / "tests" / "fixtures" / "llamacpp_families.json"
STEPS = 32
TOP = 8
PROMPT = [262, 104, 101, 32, 99, 97, 116, 266, 263, 115, 97, 116, 32, 111, 110, 268]
"""Token ids (byte tokens and merges of the test vocabulary): 16 positions, past gemma3's window of 8."""


def open_llama(llama_cpp: object, path: Path) -> object:
    """llama.cpp on `path` as the fixtures run it: F32 KV cache, one thread, every position's logits."""
    return llama_cpp.Llama(  # type: ignore[attr-defined]
        model_path=str(path), n_ctx=256, n_batch=256, n_threads=1, n_threads_batch=1, logits_all=True,
        seed=0, verbose=False, type_k=0, type_v=0, flash_attn=False, swa_full=True,
    )


def greedy_top(llm: object, prompt: list[int], steps: int = STEPS, top: int = TOP
               ) -> tuple[list[int], list[list[int]], list[list[float]]]:
    """llama.cpp's greedy run after `prompt`: the tokens, and at each step its `top` ids and logits."""
    llm.reset()  # type: ignore[attr-defined]
    llm.eval(prompt)  # type: ignore[attr-defined]
    tokens: list[int] = []
    top_ids: list[list[int]] = []
    top_logits: list[list[float]] = []
    for _ in range(steps):
        logits = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)  # type: ignore[attr-defined]
        order = np.argsort(-logits, kind="stable")[:top]
        top_ids.append([int(i) for i in order])
        top_logits.append([round(float(logits[i]), 5) for i in order])
        tokens.append(int(order[0]))
        llm.eval([int(order[0])])  # type: ignore[attr-defined]
    return tokens, top_ids, top_logits


def run_family(llama_cpp: object, arch: str, path: Path) -> dict[str, object]:
    llm = open_llama(llama_cpp, path)
    tokens, top_ids, top_logits = greedy_top(llm, PROMPT)
    prompt_logits = np.array(llm.scores[: len(PROMPT)], dtype=np.float32)  # type: ignore[attr-defined]
    margin = min(t[0] - t[1] for t in top_logits)
    print(f"{arch}: tokens {tokens[:12]}..., min top-1 margin {margin:.4f}")
    return {
        "gguf_sha256": sha256(path),
        "prompt_logits": [[round(float(x), 5) for x in row] for row in prompt_logits],
        "tokens": tokens, "top_ids": top_ids, "top_logits": top_logits,
    }


def main() -> int:
    try:
        import llama_cpp
    except ImportError:
        print("llama-cpp-python is not installed: pip install llama-cpp-python==0.3.36", file=sys.stderr)
        return 2
    families = {}
    with tempfile.TemporaryDirectory() as tmp:
        for arch in FAMILIES:
            path = write_family_gguf(arch, Path(tmp) / f"{arch}.gguf", seed=0)
            families[arch] = run_family(llama_cpp, arch, path)
    data = {"llama_cpp_python": llama_cpp.__version__, "generated_by": "scripts/make_family_fixtures.py",
            "seed": 0, "prompt": PROMPT, "steps": STEPS, "top": TOP, "families": families}
    OUT.write_text(json.dumps(data) + "\n")
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
