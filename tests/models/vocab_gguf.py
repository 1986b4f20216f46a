"""Vocabulary-only GGUFs for tokenizer tests: small vocabularies of each kind shoal reads, with merges and
pieces chosen so that the pre-tokenizers' differences show (digit groups, spaces, newlines, contractions,
punctuation runs, whole-token pieces), written with the `gguf` package; deterministic, so a test can
re-create one and check it against the llama.cpp fixture made from it (scripts/make_tokenizer_fixtures.py).

Kinds: `llama-bpe` (Llama 3), `qwen2`, `smollm` — byte-level BPE with that `tokenizer.ggml.pre`; `spm`
(Gemma-style SentencePiece, no space prefix) and `spm-phi3` (Phi-3: space prefix, special tokens that
swallow the whitespace after them).
"""

from __future__ import annotations

from pathlib import Path

from gguf import GGUFWriter

from tests.models.family_gguf import byte_level_vocab

KINDS = ("llama-bpe", "qwen2", "smollm", "spm", "spm-phi3")
BPE_MERGES = (
    "Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r", "o n", "a n", "o r", "l d", "Ġ w", "Ġw or", "Ġwor ld",
    "H e", "l l", "He ll", "Hell o", "1 2", "12 3", "1 1", "2 3", "Ġ 1", "Ġ 2", "Ċ Ċ", "ĠĠ ĠĠ", "Ġ Ġ",
    "' s", "' t", "' re", "' ll", "r e", "! !", "? !", "Ġ (", ") .", "Ã ©", "c af", "a f", "caf Ã©",
    "ä ½", "ä½ ł", "å ¥", "å¥ ½", "ĉ ĉ", "Ġ ĉ", "Ċ Ġ", "ĠĠ Ġ", "s n", "a ke", "k e", "_ c",
)
BPE_WHOLE = ("Ġhello", "world", "ĠĠĠĠĠĠĠĠ")
"""Tokens no merge builds: llama-bpe (ignore_merges) still emits them for a whole piece."""
BPE_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|im_start|>", "<|im_end|>")

SPM_PIECES = (
    ("▁t", -1.0), ("he", -1.5), ("▁the", -0.5), ("▁a", -2.0), ("in", -2.5), ("er", -2.5), ("▁w", -3.0),
    ("or", -3.0), ("ld", -3.5), ("▁wor", -2.0), ("▁world", -1.0), ("▁H", -3.0), ("ell", -4.0),
    ("▁Hello", -0.8), ("▁▁", -5.0), ("▁▁▁▁", -4.0), ("12", -3.0), ("123", -2.0), ("▁1", -4.0),
    ("ca", -6.0), ("fé", -6.0), ("café", -3.0), ("你好", -2.0), ("\n\n", -3.0), ("▁(", -4.0), (").", -4.0),
    ("ll", -4.5), ("lo", -4.5), ("an", -4.5), ("on", -4.5), ("re", -4.5), ("'s", -4.0), ("▁'", -5.0),
)
SPM_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,!?'()_-\n\t▁é你好"
SPM_SPECIALS = ("<start_of_turn>", "<end_of_turn>", "<|user|>", "<|assistant|>", "<|end|>", "<|endoftext|>")
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                 "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def write_vocab_gguf(kind: str, path: Path) -> Path:
    if kind not in KINDS:
        raise ValueError(f"unknown vocabulary kind {kind!r}")
    w = GGUFWriter(str(path), "llama")
    w.add_name("Phi3 vocab test" if kind == "spm-phi3" else "shoal vocab test")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(16)
    w.add_feed_forward_length(32)
    w.add_head_count(1)
    w.add_layer_norm_rms_eps(1e-5)
    if kind.startswith("spm"):
        tokens, scores, types = ["<unk>", "<s>", "</s>"], [0.0, 0.0, 0.0], [2, 3, 3]
        tokens += [f"<0x{b:02X}>" for b in range(256)]
        scores += [0.0] * 256
        types += [6] * 256
        for i, ch in enumerate(dict.fromkeys(SPM_CHARS.replace(" ", ""))):
            tokens.append(ch)
            scores.append(-10.0 - i * 0.01)
            types.append(1)
        for piece, score in SPM_PIECES:
            tokens.append(piece)
            scores.append(score)
            types.append(1)
        for special in SPM_SPECIALS:
            tokens.append(special)
            scores.append(0.0)
            types.append(3)
        tokens.append("<tab>")  # a user-defined token
        scores.append(0.0)
        types.append(4)
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_unk_token_id(0)
        if kind == "spm":
            w.add_add_space_prefix(False)  # Gemma's GGUFs
    else:
        tokens, types, _ = byte_level_vocab()
        tokens, types = tokens[:256], types[:256]
        for merge in BPE_MERGES:
            tokens.append(merge.replace(" ", ""))
            types.append(1)
        tokens += list(BPE_WHOLE) + list(BPE_SPECIALS)
        types += [1] * len(BPE_WHOLE) + [3] * len(BPE_SPECIALS)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(kind)
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(list(BPE_MERGES))
        w.add_bos_token_id(tokens.index("<|begin_of_text|>"))
        w.add_eos_token_id(tokens.index("<|end_of_text|>"))
    w.add_chat_template(CHAT_TEMPLATE)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


STRINGS = (
    "Hello world",
    " Hello world",
    "Hello World!!",
    "the cat, the hat?! (ok).",
    "1 12 123 1234 12345 123456 11 2323",
    "I'm he's they're we'll it's don't THEY'RE",
    "   leading and    runs   of     spaces  ",
    "\t\ttabs\nnew\n\n\nlines  \r\n windows\n \n",
    "café, naïve, Ünïcödé",
    "你好，世界！ 你好",
    "snake_case camelCase kebab-case",
    "😀 🎉 emoji",
    "hello world helloworld",
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n",
    "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n",
    "<|user|>\n  the question<|end|>\n<|assistant|>\n",
    "a<tab>b <tab> c",
    "",
    " ",
    "\n",
)
