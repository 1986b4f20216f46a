"""Grammar mask cost on the embedded model's vocabulary (SmolLM2, 49,152 tokens): llguidance's mask per
token while a random walk produces a document valid under a nested JSON Schema, plus the grammar's compile
time and the cost of the unconstrained sampler step it is added to.

    python3 bench/grammar_mask.py [--tokens 400] [--seed 0]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from shoal.models.embedded import embedded_model_path
from shoal.models.gguf import GGUFModel
from shoal.models.grammar import Constraint, GrammarMatcher, grammar_tokenizer
from shoal.models.sampling import Sampler, SamplingParams
from shoal.models.tokenizer import Tokenizer

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 4},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 16},
                                                     "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["city", "zip"], "additionalProperties": False},
    },
    "required": ["name", "age", "role", "tags", "address"],
    "additionalProperties": False,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    model = GGUFModel.open(embedded_model_path())
    tok = Tokenizer.from_gguf(model)
    vocab = model.config.vocab_size
    t = time.perf_counter()
    grammar_tokenizer(tok, vocab)
    print(f"llguidance tokenizer: {(time.perf_counter() - t) * 1e3:.0f} ms (once per model)")
    rng = np.random.default_rng(args.seed)
    masks: list[float] = []
    compiles: list[float] = []
    docs = 0
    while len(masks) < args.tokens:
        t = time.perf_counter()
        matcher = GrammarMatcher(Constraint.json_schema(SCHEMA), tok, vocab)
        compiles.append(time.perf_counter() - t)
        out: list[int] = []
        while not matcher.done and len(masks) < args.tokens:
            logits = rng.standard_normal(vocab).astype(np.float32)
            t = time.perf_counter()
            masked = matcher.apply(logits)
            masks.append(time.perf_counter() - t)
            token = int(np.argmax(masked))
            matcher.accept(token)
            out.append(token)
        docs += 1
    sampler = Sampler(SamplingParams(temperature=0.7, top_p=0.9))
    plain = []
    for _ in range(200):
        logits = rng.standard_normal(vocab).astype(np.float32)
        t = time.perf_counter()
        sampler.next_token(logits)
        plain.append(time.perf_counter() - t)
    ms = [m * 1e3 for m in masks]
    print(f"grammar compile: median {statistics.median(compiles) * 1e3:.2f} ms over {len(compiles)} matchers")
    print(f"mask + apply per token: median {statistics.median(ms):.3f} ms, p90 "
          f"{np.percentile(ms, 90):.3f} ms, max {max(ms):.3f} ms over {len(ms)} tokens ({docs} documents)")
    print(f"unconstrained sampler step (temperature 0.7, top_p 0.9): median "
          f"{statistics.median(plain) * 1e3:.3f} ms")
    print("last document:", tok.decode(out)[:200])


if __name__ == "__main__":
    main()
