#!/usr/bin/env python3
"""llama.cpp's outputs on the embedded model re-quantized to other block types, for the native build's
agreement test (tests/models/test_native_llamacpp.py; not run in CI: needs llama-cpp-python 0.3.36).

    python scripts/make_native_fixtures.py [--types q8_0,q4_0,q5_0,q4_k_m] [--workdir DIR]

For each type, scripts/requantize_gguf.py makes the file from the embedded SmolLM2 GGUF (its weights
dequantized and quantized again), llama.cpp (F32 KV cache, 2 threads) greedy-decodes 32 tokens after each of
the shared chat prompts (tests/models/shared_model.PROMPTS) and records its top-8 ids and logits per step.
Output: tests/fixtures/llamacpp_native.json, with each file's sha256 (the test re-creates the gguf-package
files and refuses a fixture of other bytes; the Q4_K_M file needs llama.cpp's quantizer, so its test runs
only where llama-cpp-python is installed).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from shoal.models.embedded import embedded_model_path  # noqa: E402

from scripts.requantize_gguf import requantize  # noqa: E402
from tests.models.shared_model import PROMPTS, chat_ids  # noqa: E402

OUT = REPO / "tests" / "fixtures" / "llamacpp_native.json"
STEPS = 32
TOP = 8


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def teacher(llama_cpp: object, path: Path) -> list[dict[str, object]]:
    llm = llama_cpp.Llama(  # type: ignore[attr-defined]
        model_path=str(path), n_ctx=512, n_batch=512, n_threads=2, n_threads_batch=2, logits_all=True,
        seed=0, verbose=False, type_k=0, type_v=0, flash_attn=False)
    cases = []
    for question in PROMPTS:
        prompt = chat_ids(question)
        llm.reset()
        llm.eval(prompt)
        tokens, top_ids, top_logits = [], [], []
        for _ in range(STEPS):
            logits = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
            order = np.argsort(-logits, kind="stable")[:TOP]
            top_ids.append([int(i) for i in order])
            top_logits.append([round(float(logits[i]), 5) for i in order])
            tokens.append(int(order[0]))
            llm.eval([int(order[0])])  # past EOS too: every step is teacher-forcing data
        cases.append({"question": question, "prompt_ids": prompt, "tokens": tokens, "top_ids": top_ids,
                      "top_logits": top_logits})
    return cases


def main(argv: list[str] | None = None) -> int:
    import llama_cpp

    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--types", default="q8_0,q4_0,q5_0,q4_k_m")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/shoal-native-fixtures"))
    args = parser.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    data = json.loads(OUT.read_text()) if OUT.exists() else {}
    data.update({"llama_cpp_python": llama_cpp.__version__, "steps": STEPS, "top": TOP,
                 "generated_by": "scripts/make_native_fixtures.py"})
    files = data.setdefault("files", {})
    for kind in args.types.split(","):
        path = args.workdir / f"{kind}.gguf"
        if not path.exists():
            requantize(embedded_model_path(), path, kind)
        cases = teacher(llama_cpp, path)
        files[kind] = {"gguf_sha256": sha256(path), "file_size": path.stat().st_size, "cases": cases}
        margin = min(t[0] - t[1] for c in cases for t in c["top_logits"])
        print(f"{kind}: {path.stat().st_size} bytes, min top-1 margin {margin:.4f}")
    OUT.write_text(json.dumps(data) + "\n")
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
