#!/usr/bin/env python3
"""Write llama.cpp's token ids for the small vocabularies of tests/models/vocab_gguf.py (not run in CI: needs
llama-cpp-python 0.3.36).

    python scripts/make_tokenizer_fixtures.py

For each vocabulary kind (llama-bpe, qwen2, smollm, spm, spm-phi3) it writes the GGUF, loads it in llama.cpp
with `vocab_only=True` and records `tokenize(text, add_bos=False, special=...)` of every string in
`vocab_gguf.STRINGS`, with special tokens parsed and not. Output: tests/fixtures/llamacpp_vocabs.json,
stamped with the llama-cpp-python version and each GGUF's sha256.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.models.family_gguf import sha256  # noqa: E402
from tests.models.vocab_gguf import KINDS, STRINGS, write_vocab_gguf  # noqa: E402

OUT = REPO / "tests" / "fixtures" / "llamacpp_vocabs.json"


def main() -> int:
    try:
        import llama_cpp
    except ImportError:
        print("llama-cpp-python is not installed: pip install llama-cpp-python==0.3.36", file=sys.stderr)
        return 2
    kinds = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in KINDS:
            path = write_vocab_gguf(kind, Path(tmp) / f"{kind}.gguf")
            llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
            cases = []
            for text in STRINGS:
                data = text.encode("utf-8")
                cases.append({"text": text,
                              "special": llm.tokenize(data, add_bos=False, special=True),
                              "plain": llm.tokenize(data, add_bos=False, special=False),
                              "with_bos": llm.tokenize(data, add_bos=True, special=True)})
            kinds[kind] = {"gguf_sha256": sha256(path), "cases": cases}
            print(f"{kind}: {sum(len(c['special']) for c in cases)} ids over {len(cases)} strings")
            del llm
    data = {"llama_cpp_python": llama_cpp.__version__, "generated_by": "scripts/make_tokenizer_fixtures.py",
            "kinds": kinds}
    OUT.write_text(json.dumps(data, ensure_ascii=False) + "\n")
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
