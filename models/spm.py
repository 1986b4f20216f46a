"""SentencePiece-style tokenization of GGUF `llama`-model vocabularies (Gemma, Phi-3, Llama 2, Mistral), as
llama.cpp does it (`llm_tokenizer_spm`): spaces become U+2581, a space is prefixed to each text run that
starts the input or follows a special token (when `add_space_prefix`), then adjacent symbols merge
greedily — the pair whose merged text is the vocabulary token of highest score first, the leftmost among
equals — and a symbol that is no token falls back to its `<0xXX>` byte tokens.

Special tokens (control, user-defined and unknown types) written in the text are split out first, longest
first, like llama.cpp's `tokenizer_st_partition`; a token with `rstrip` swallows the whitespace after it.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

SPACE = "\u2581"
_CONTROL, _USER_DEFINED, _UNKNOWN = 3, 4, 2


class SentencePieceEncoder:
    """Text -> ids for one vocabulary. `rstrip_ids`: special tokens that consume the whitespace after them
    (llama.cpp sets this for Phi-3 by model name)."""

    def __init__(self, tokens: Sequence[str], scores: Sequence[float], token_types: Sequence[int], *,
                 add_space_prefix: bool = True, rstrip_ids: frozenset[int] = frozenset()) -> None:
        self._ids: dict[str, int] = {}
        for i, tok in enumerate(tokens):
            self._ids.setdefault(tok, i)
        self._scores = list(scores)
        self._add_space_prefix = add_space_prefix
        self._rstrip = rstrip_ids
        self._bytes = [self._ids.get(f"<0x{b:02X}>") for b in range(256)]
        kinds = (_CONTROL, _USER_DEFINED, _UNKNOWN)
        specials = [i for i, t in enumerate(token_types) if t in kinds and tokens[i]]
        # llama.cpp matches longer special tokens first
        self._specials = sorted(specials, key=lambda i: -len(tokens[i].encode("utf-8")))
        self._user_defined = {i for i in specials if token_types[i] == _USER_DEFINED}
        self._tokens = list(tokens)

    def encode(self, text: str, *, special: bool = True) -> list[int]:
        """Ids of `text`; with `special=False` control and unknown tokens written in it are plain text (user-
        defined tokens are still split out, as in llama.cpp)."""
        out: list[int] = []
        prev_special = True
        for piece in self._partition(text, special):
            if isinstance(piece, int):
                out.append(piece)
                prev_special = True
                continue
            run = (" " + piece) if self._add_space_prefix and prev_special else piece
            out.extend(self._tokenize(run.replace(" ", SPACE)))
            prev_special = False
        return out

    def _partition(self, text: str, special: bool) -> list[str | int]:
        pieces: list[str | int] = [text] if text else []
        for sid in self._specials:
            if not special and sid not in self._user_defined:
                continue
            needle = self._tokens[sid]
            split: list[str | int] = []
            for piece in pieces:
                if not isinstance(piece, str) or needle not in piece:
                    split.append(piece)
                    continue
                parts = piece.split(needle)
                for j, part in enumerate(parts):
                    if j > 0:
                        split.append(sid)
                        if sid in self._rstrip:
                            part = part.lstrip(" \t\n\r\v\f")
                    if part:
                        split.append(part)
            pieces = split
        return pieces

    def _tokenize(self, text: str) -> list[int]:
        symbols = list(text)
        if not symbols:
            return []
        nxt = [*range(1, len(symbols)), -1]
        prv = list(range(-1, len(symbols) - 1))
        heap: list[tuple[float, int, int, int]] = []  # (-score, left, right, merged length)

        def push(left: int, right: int) -> None:
            if left < 0 or right < 0:
                return
            tid = self._ids.get(symbols[left] + symbols[right])
            if tid is not None:
                size = len(symbols[left]) + len(symbols[right])
                heapq.heappush(heap, (-self._scores[tid], left, right, size))

        for i in range(len(symbols) - 1):
            push(i, i + 1)
        while heap:
            _, left, right, size = heapq.heappop(heap)
            if not symbols[left] or not symbols[right] or len(symbols[left]) + len(symbols[right]) != size \
                    or nxt[left] != right:
                continue
            symbols[left] += symbols[right]
            symbols[right] = ""
            nxt[left] = nxt[right]
            if nxt[right] >= 0:
                prv[nxt[right]] = left
            push(prv[left], left)
            push(left, nxt[left])
        out: list[int] = []
        i = 0
        while i >= 0:
            tid = self._ids.get(symbols[i])
            if tid is not None:
                out.append(tid)
            else:
                for b in symbols[i].encode("utf-8"):
                    byte_id = self._bytes[b]
                    if byte_id is None:
                        raise ValueError(f"the vocabulary has no byte token <0x{b:02X}>")
                    out.append(byte_id)
            i = nxt[i]
        return out
