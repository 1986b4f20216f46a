#!/usr/bin/env python3
"""Write tests/fixtures/llamacpp_browser.json: llama.cpp's greedy tokens for the chat prompts the browser
compute test offloads to a tab (which runs llama.cpp in wasm, wllama), so the test compares the tab's tokens
with native llama.cpp's for the same GGUF and the same prompt ids. Not run in CI (llama-cpp-python is not
installed there); the JSON it writes is committed.

    scripts/py scripts/make_browser_fixture.py [--model PATH] [--steps 24]

For each prompt: the prompt ids as a node makes them (shoal's tokenizer and chat template: what
`POST /v1/chat/completions` sends in `offload.open`), llama.cpp's greedy continuation from those ids (1
thread) until an end-of-generation token or `--steps`, each token's bytes, and the top-1 margin at each step
(logit of the best minus the second): a wasm build may sum floats in another order, so the test relies on
prompts whose every step has a clear margin (printed; the test checks the recorded minimum).
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from shoal.models.embedded import embedded_model_path  # noqa: E402
from shoal.models.loader import open_model  # noqa: E402

from tests.models.family_gguf import sha256  # noqa: E402

FIXTURE = REPO / "tests" / "fixtures" / "llamacpp_browser.json"
PROMPTS = [
    ("capital", "Name the capital of France in one sentence."),
    ("count", "Count from one to ten in words."),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="GGUF file (default: the embedded model)")
    parser.add_argument("--steps", type=int, default=24, help="most tokens per prompt")
    args = parser.parse_args()
    try:
        import llama_cpp
        from llama_cpp import Llama
    except ImportError:
        print("llama-cpp-python is not installed: pip install llama-cpp-python==0.3.36", file=sys.stderr)
        return 2
    path = args.model or embedded_model_path()
    model = open_model(path)
    llm = Llama(model_path=str(path), n_ctx=1024, n_batch=512, n_threads=1, logits_all=True, seed=0,
                verbose=False)
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    cases = []
    for name, question in PROMPTS:
        messages = [{"role": "user", "content": question}]
        prompt_ids = model.tokenizer.encode_chat(messages)
        text = model.tokenizer.decode(prompt_ids)
        same = llm.tokenize(text.encode(), add_bos=False, special=True) == prompt_ids
        llm.reset()
        llm.eval(prompt_ids)
        tokens: list[int] = []
        pieces: list[str] = []
        margins: list[float] = []
        finish = "length"
        for _ in range(args.steps):
            logits = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
            first, second = np.argsort(-logits, kind="stable")[:2]
            margins.append(round(float(logits[first] - logits[second]), 4))
            token = int(first)
            tokens.append(token)
            pieces.append(base64.b64encode(llm.detokenize([token], special=True)).decode())
            if llama_cpp.llama_vocab_is_eog(vocab, token):
                finish = "stop"
                break
            llm.eval([token])
        answer = model.tokenizer.decode(tokens, skip_special=True)
        cases.append({"name": name, "messages": messages, "prompt_ids": prompt_ids,
                      "llama_cpp_tokenizes_the_same": same, "tokens": tokens, "pieces": pieces,
                      "text": answer, "finish_reason": finish, "margins": margins,
                      "min_margin": min(margins)})
        print(f"{name}: {len(prompt_ids)} prompt ids (llama.cpp tokenizes the same: {same}), {len(tokens)} "
              f"tokens ({finish}), min top-1 margin {min(margins):.3f}: {answer!r}")
    fixture = {
        "llama_cpp_python": llama_cpp.__version__, "model_file": path.name,
        "model_file_size": path.stat().st_size, "gguf_sha256": sha256(path), "n_threads": 1,
        "steps": args.steps, "generated_by": "scripts/make_browser_fixture.py", "cases": cases,
    }
    FIXTURE.write_text(json.dumps(fixture, ensure_ascii=False, indent=1) + "\n")
    print(f"wrote {FIXTURE.relative_to(REPO)} ({FIXTURE.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
