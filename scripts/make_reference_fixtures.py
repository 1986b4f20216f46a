#!/usr/bin/env python3
"""Write the llama.cpp reference fixtures the model tests compare against (not run in CI: llama-cpp-python
takes ~10 minutes to build from source; see FACTS.md).

    pip install llama-cpp-python==0.3.36      # or: pip install -e ".[reference]"
    python scripts/make_reference_fixtures.py [--model PATH]

Writes, from the embedded GGUF (or --model):
- tests/fixtures/llamacpp_tokens.json: llama.cpp's token ids for varied strings and a rendered chat prompt.
- tests/fixtures/llamacpp_teacher.json: for several prompts, llama.cpp's greedy continuation (32 tokens) and,
  at each step, its top-5 token ids and logits, so tests can teacher-force the reference on its tokens.
Both record the llama-cpp-python version and the GGUF's sha256.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from shoal.models.embedded import embedded_model_path  # noqa: E402
from shoal.models.gguf import GGUFModel  # noqa: E402
from shoal.models.tokenizer import Tokenizer  # noqa: E402

FIXTURES = REPO / "tests" / "fixtures"
STEPS = 32
TOP = 5

STRINGS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "In 2024, 1234567 people paid $3.50 each (≈ 4.3M total).",
    "😀 🎉👍🏽 emoji: 🇫🇷",
    "café, naïve, Ünïcödé, São Paulo, Zürich, Ελληνικά, Русский",
    "你好，世界！今天天气很好。日本語のテキスト。한국어",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "   leading spaces and    runs   of     spaces",
    "\t\ttabs\nnew\n\n\nlines  \r\n windows",
    " leading single space",
    "<html><body class=\"x\">&amp; 'quotes' \"double\"</body></html>",
    "I'm can't won't they'll we've it's",
    "Mixed1234numbers56and78letters9",
    "snake_case camelCase kebab-case SCREAMING_CASE",
    "URL: https://example.com/path?q=1&r=2#frag",
    "<|im_start|>user\nhi<|im_end|>",
]

CHAT = [
    {"role": "system", "content": "You are a terse assistant. Answer in one sentence."},
    {"role": "user", "content": "Name the largest planet in the Solar System, please. 🙂"},
    {"role": "assistant", "content": "Jupiter."},
    {"role": "user", "content": "And the smallest?"},
]

TEACHER_PROMPTS: list[tuple[str, list[dict[str, str]] | str]] = [
    ("capital", [{"role": "user", "content": "What is the capital of France?"}]),
    ("story", [{"role": "user", "content": "Write a short story about a lighthouse keeper."}]),
    ("science", [{"role": "user", "content": "Explain photosynthesis to a ten-year-old."}]),
    ("code", [{"role": "user", "content": "Write a Python function that reverses a string."}]),
    ("list", [{"role": "system", "content": "You list things."},
              {"role": "user", "content": "Give me five tips for better sleep."}]),
    ("plain", "The history of the Roman Empire began when"),
]


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def llama_chat_text(llama_cpp: object, template: str, messages: list[dict[str, str]]) -> str | None:
    """llama.cpp's own (C++) rendering of a chat, independent of jinja2; None if it cannot."""
    arr = (llama_cpp.llama_chat_message * len(messages))(  # type: ignore[attr-defined]
        *[llama_cpp.llama_chat_message(m["role"].encode(), m["content"].encode())  # type: ignore[attr-defined]
          for m in messages]
    )
    buf = ctypes.create_string_buffer(1 << 16)
    n = llama_cpp.llama_chat_apply_template(template.encode(), arr, len(messages), True, buf, len(buf))  # type: ignore[attr-defined]
    if n < 0 or n > len(buf):
        return None
    return buf.raw[:n].decode("utf-8")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=None, help="GGUF file (default: the embedded model)")
    args = parser.parse_args()
    try:
        import llama_cpp
        from llama_cpp import Llama
    except ImportError:
        print("llama-cpp-python is not installed: pip install llama-cpp-python==0.3.36", file=sys.stderr)
        return 2
    path = args.model or embedded_model_path()
    gguf = GGUFModel.open(path)
    ours = Tokenizer.from_gguf(gguf)
    provenance = {
        "llama_cpp_python": llama_cpp.__version__,
        "model_file": path.name,
        "model_file_size": path.stat().st_size,
        "gguf_sha256": sha256(path),
        "generated_by": "scripts/make_reference_fixtures.py",
    }
    llm = Llama(model_path=str(path), n_ctx=1024, n_batch=512, n_threads=2, logits_all=True, seed=0,
                verbose=False)

    def tokenize(text: str) -> list[int]:
        return llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    # --- tokens -------------------------------------------------------------------------------------------
    strings = [{"text": s, "ids": tokenize(s)} for s in STRINGS]
    template = gguf.metadata.get("tokenizer.chat_template", "")
    chat_text = llama_chat_text(llama_cpp, template, CHAT)
    source = "llama.cpp llama_chat_apply_template"
    if chat_text is None:
        chat_text, source = ours.render_chat(CHAT), "shoal jinja2 (llama.cpp could not render)"
    chat = {"messages": CHAT, "text": chat_text, "ids": tokenize(chat_text), "text_source": source}
    tokens = {**provenance, "strings": strings, "chat": chat}
    FIXTURES.mkdir(parents=True, exist_ok=True)
    (FIXTURES / "llamacpp_tokens.json").write_text(json.dumps(tokens, ensure_ascii=False, indent=1) + "\n")
    mismatches = [s["text"] for s in strings if ours.encode(s["text"]) != s["ids"]]
    if ours.encode_chat(CHAT) != chat["ids"]:
        mismatches.append("<chat>")
    print(f"tokens: {len(strings)} strings + chat ({source}); "
          f"shoal differs on {len(mismatches)}: {mismatches}")

    # --- teacher ------------------------------------------------------------------------------------------
    cases = []
    for name, prompt in TEACHER_PROMPTS:
        text = prompt if isinstance(prompt, str) else ours.render_chat(prompt)
        prompt_ids = tokenize(text)
        llm.reset()
        llm.eval(prompt_ids)
        generated: list[int] = []
        top_ids: list[list[int]] = []
        top_logits: list[list[float]] = []
        for _ in range(STEPS):
            logits = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
            order = np.argsort(-logits, kind="stable")[:TOP]
            top_ids.append([int(i) for i in order])
            top_logits.append([round(float(logits[i]), 4) for i in order])
            generated.append(int(order[0]))
            llm.eval([int(order[0])])  # keep going past EOS: every step is valid teacher-forcing data
        cases.append({"name": name, "prompt_text": text, "prompt_ids": prompt_ids, "tokens": generated,
                      "top_ids": top_ids, "top_logits": top_logits})
        margin = min(t[0] - t[1] for t in top_logits)
        print(f"teacher {name}: {len(prompt_ids)} prompt tokens, min top-1 margin {margin:.3f}: "
              f"{ours.decode(generated)!r}")
    teacher = {**provenance, "steps": STEPS, "top": TOP, "n_threads": 2, "cases": cases}
    (FIXTURES / "llamacpp_teacher.json").write_text(json.dumps(teacher, ensure_ascii=False) + "\n")
    sizes = {p.name: p.stat().st_size for p in FIXTURES.glob("llamacpp_*.json")}
    print(f"wrote {sizes}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
