"""The tokenizer of a GGUF model and its chat template (jinja2, sandboxed).

GGUF `gpt2`-model vocabularies (byte-level BPE: SmolLM, Llama 3, Qwen) run on HF `tokenizers` BPE over the
vocab + merges, with the pre-tokenizer llama.cpp picks for `tokenizer.ggml.pre` (`PRE_TOKENIZERS`: the same
regexes, applied in turn, then ByteLevel); control and user-defined tokens are special and matched verbatim
in the text. GGUF `llama`-model vocabularies (SentencePiece: Gemma, Phi-3, Llama 2) run on
`models.spm.SentencePieceEncoder`, llama.cpp's algorithm. BOS is added when the GGUF says so (or, without
the key, when llama.cpp's default for that vocabulary does). Ids equal llama.cpp's
(tests/models/test_tokenizer*.py).
"""

from __future__ import annotations

import codecs
import logging
import re
import secrets
import threading
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from shoal.models.errors import UnsupportedModelError
from shoal.models.spm import SPACE, SentencePieceEncoder
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

logger = logging.getLogger(__name__)

CHAT_ROLES = ("system", "user", "assistant")
_CONTROL = 3  # llama.cpp token type: control
_USER_DEFINED = 4
_BYTE = 6
_GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_LLAMA3_REGEX = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_REGEX = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS: dict[str, tuple[str, ...]] = {
    "smollm": (r"\p{N}", _GPT2_REGEX),
    "gpt-2": (_GPT2_REGEX,),
    "llama-bpe": (_LLAMA3_REGEX,),
    "llama3": (_LLAMA3_REGEX,),
    "llama-v3": (_LLAMA3_REGEX,),
    "qwen2": (_QWEN2_REGEX,),
    "deepseek-r1-qwen": (_QWEN2_REGEX,),
    "default": (r"[\p{P}\$\+<=>\^~\|]+", _GPT2_REGEX, r"\p{N}+", "[0-9][0-9][0-9]"),
}
"""`tokenizer.ggml.pre` -> the regexes llama.cpp (llama-vocab.cpp) splits text with, in turn, before BPE."""
_IGNORE_MERGES = frozenset({"llama-bpe", "llama3", "llama-v3"})
"""Pre-tokenizers whose pieces that are whole vocabulary tokens skip the merges (llama.cpp ignore_merges)."""
# Used when a GGUF carries no chat template (ChatML, as SmolLM and many others use).
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
    "+ '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by ByteLevel."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, map(chr, chars), strict=True))


_UNICODE_TO_BYTE = {c: b for b, c in _bytes_to_unicode().items()}


class Tokenizer:
    """Text <-> token ids for one model, plus its chat template."""

    def __init__(self, tokens: Sequence[str], merges: Sequence[str], token_types: Sequence[int], *,
                 eos_token_id: int, bos_token_id: int | None = None, chat_template: str | None = None,
                 add_bos: bool = False, pre: str = "smollm", spm: SentencePieceEncoder | None = None) -> None:
        """A byte-level BPE tokenizer (`merges`, pre-tokenizer `pre`), or a SentencePiece one when `spm` is
        given (then `merges` and `pre` are unused)."""
        vocab = {tok: i for i, tok in enumerate(tokens)}
        special = [i for i, t in enumerate(token_types) if t in (_CONTROL, _USER_DEFINED)]
        self._spm = spm
        if spm is None:
            self._hf = _byte_level_bpe(tokens, merges, pre, special)
        # one tokenizer, its `encode_special_tokens` switched per call under a lock (message content spells
        # `<|im_start|>` as plain text, the template as a control token): a second copy kept for the plain
        # case took ~13 MiB for a 49k vocabulary, ~35 for a 128k one, in every serving process
        self._hf_lock = threading.Lock()
        self._byte_tokens = frozenset(i for i, t in enumerate(token_types) if t == _BYTE)
        self.vocab_size = len(tokens)
        self.special_ids = frozenset(special)
        self.eos_token_id = eos_token_id
        self.bos_token_id = bos_token_id
        self.add_bos = add_bos
        self._tokens = list(tokens)
        self._token_bytes = [self._bytes_of(i) for i in range(len(tokens))]
        stops = {eos_token_id}
        for name in ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|endoftext|>", "<|end|>",
                     "<end_of_turn>"):
            if name in vocab and vocab[name] in self.special_ids:
                stops.add(vocab[name])
        self.stop_token_ids: frozenset[int] = frozenset(stops)
        self.chat_template = chat_template or DEFAULT_CHAT_TEMPLATE
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise_template_error
        try:
            self._template = env.from_string(self.chat_template)
        except TemplateError as exc:
            raise UnsupportedModelError(f"the model's chat template does not parse: {exc}") from None

    @classmethod
    def from_gguf(cls, model: Any) -> Tokenizer:
        """Build from a `GGUFModel` (or anything with a GGUF `.metadata` mapping)."""
        if getattr(model, "vocabulary_released", False):
            raise ValueError(f"{model}: its vocabulary was released (GGUFModel.release_vocabulary, close); "
                             "build the tokenizer before that, or open the file again")
        meta: Mapping[str, Any] = model.metadata
        kind = meta.get("tokenizer.ggml.model")
        if kind not in ("gpt2", "llama"):
            raise UnsupportedModelError(
                f"tokenizer model {kind!r} is not supported; shoal reads GGUF 'gpt2' (byte-level BPE) and "
                "'llama' (SentencePiece) vocabularies"
            )
        tokens = meta.get("tokenizer.ggml.tokens")
        merges = meta.get("tokenizer.ggml.merges")
        if not tokens or (kind == "gpt2" and merges is None):
            raise UnsupportedModelError("the GGUF has no tokenizer vocabulary or merges")
        types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
        eos = meta.get("tokenizer.ggml.eos_token_id")
        if eos is None:
            raise UnsupportedModelError("the GGUF names no end-of-sequence token (eos_token_id)")
        bos = meta.get("tokenizer.ggml.bos_token_id")
        pre = str(meta.get("tokenizer.ggml.pre") or "default")
        spm = None
        if kind == "llama":
            scores = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
            name = str(meta.get("general.name", "")).lower()
            rstrip: frozenset[int] = frozenset()
            if "phi-3" in name or "phi3" in name:  # llama.cpp's Phi-3 special-token attributes
                keep = {"<unk>", "<s>", "<|endoftext|>"}
                rstrip = frozenset(i for i, t in enumerate(types)
                                   if (t in (_CONTROL, _USER_DEFINED, 2) and tokens[i] not in keep)
                                   or tokens[i] == "</s>")
            spm = SentencePieceEncoder(
                tokens, scores, types, rstrip_ids=rstrip,
                add_space_prefix=bool(meta.get("tokenizer.ggml.add_space_prefix", True)))
        elif pre not in PRE_TOKENIZERS:
            raise UnsupportedModelError(
                f"pre-tokenizer {pre!r} is not supported; shoal knows: {', '.join(PRE_TOKENIZERS)}")
        default_bos = kind == "llama" or pre in _IGNORE_MERGES  # llama.cpp's defaults without the key
        return cls(
            tokens, merges or [], types, eos_token_id=int(eos),
            bos_token_id=None if bos is None else int(bos),
            chat_template=meta.get("tokenizer.chat_template"),
            add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", default_bos)), pre=pre, spm=spm,
        )

    def _bytes_of(self, token_id: int) -> bytes:
        text = self._tokens[token_id]
        if token_id in self.special_ids:
            return text.encode("utf-8")
        if self._spm is not None:
            if token_id in self._byte_tokens and len(text) == 6 and text.startswith("<0x"):
                return bytes([int(text[3:5], 16)])
            return text.replace(SPACE, " ").encode("utf-8")
        try:
            return bytes(_UNICODE_TO_BYTE[c] for c in text)
        except KeyError:  # not byte-level (should not happen in a gpt2 vocabulary)
            return text.encode("utf-8")

    # --- text <-> ids -------------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`. Special tokens written in the text (e.g. `<|im_start|>`) become their ids."""
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, not {type(text).__name__}")
        ids = self._encode(text, special=True)
        if self.add_bos and self.bos_token_id is not None:
            ids = [self.bos_token_id, *ids]
        return ids

    def token_bytes(self, token_id: int) -> bytes:
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"token id {token_id} is outside the vocabulary (0..{self.vocab_size - 1})")
        return self._token_bytes[token_id]

    def decode(self, ids: Iterable[int], *, skip_special: bool = False) -> str:
        """Text of `ids`; invalid UTF-8 (a cut multi-byte character) becomes U+FFFD."""
        data = b"".join(
            self.token_bytes(i) for i in ids if not (skip_special and i in self.special_ids)
        )
        return data.decode("utf-8", errors="replace")

    def token_text(self, token_id: int) -> str:
        return self._tokens[token_id]

    def hf_json(self) -> str:
        """The tokenizer as a HF `tokenizers` JSON document (for llguidance: models/grammar.py)."""
        with self._hf_lock:
            return self._hf.to_str()

    # --- chat ---------------------------------------------------------------------------------------------

    def render_chat(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> str:
        """The chat prompt as text, rendered with the model's template."""
        checked = validate_messages(messages)
        try:
            return self._template.render(
                messages=checked, add_generation_prompt=add_generation_prompt,
                bos_token=self._token_text_or_empty(self.bos_token_id),
                eos_token=self._token_text_or_empty(self.eos_token_id),
            )
        except TemplateError as exc:
            raise ValueError(f"the chat template rejected the messages: {exc}") from None

    def encode_chat(self, messages: Sequence[Mapping[str, Any]],
                    add_generation_prompt: bool = True) -> list[int]:
        """Token ids of the chat prompt. Only the template makes control tokens: text in a message's content
        that spells one (`<|im_end|>`, say) is encoded as plain text, so a message cannot forge another turn.

        Each content is rendered as a one-off random marker, the template's text between markers is encoded
        with special tokens and each content without. A template that alters content (strips it, say) leaves
        a marker out of place: then the whole render is encoded as it is, with a log line."""
        checked = validate_messages(messages)
        nonce = secrets.token_hex(8)
        marked = [{**m, "content": f"\ue000{nonce}:{i}\ue001"} for i, m in enumerate(checked)]
        pieces = re.split(f"\ue000{nonce}:(\\d+)\ue001", self.render_chat(marked, add_generation_prompt))
        order = [int(i) for i in pieces[1::2]]
        if order != sorted(set(order)) or any(nonce in piece for piece in pieces[::2]):
            logger.info("the chat template transforms message content; encoding its render as a whole")
            return self._one_bos(self.encode(self.render_chat(checked, add_generation_prompt)))
        ids = self.encode(pieces[0])
        for index, template_text in zip(order, pieces[2::2], strict=True):
            ids += self._encode(checked[index]["content"], special=False)
            ids += self._encode(template_text, special=True)
        return self._one_bos(ids)

    def _one_bos(self, ids: list[int]) -> list[int]:
        """Templates that write `{{ bos_token }}` (Llama 3, Gemma) and a vocabulary that adds BOS would give
        two; keep one, as llama.cpp's chat code does."""
        if self.add_bos and len(ids) >= 2 and ids[0] == ids[1] == self.bos_token_id:
            return ids[1:]
        return ids

    def _encode(self, text: str, *, special: bool) -> list[int]:
        """Ids of `text` without BOS; `special=False`: control tokens spelled in it are plain text."""
        if self._spm is not None:
            return self._spm.encode(text, special=special)
        with self._hf_lock:  # the flag is on only in here, for plain text
            if special:
                return self._hf.encode(text, add_special_tokens=False).ids
            self._hf.encode_special_tokens = True
            try:
                return self._hf.encode(text, add_special_tokens=False).ids
            finally:
                self._hf.encode_special_tokens = False

    def _token_text_or_empty(self, token_id: int | None) -> str:
        return self._tokens[token_id] if token_id is not None and 0 <= token_id < self.vocab_size else ""

    def stream_decoder(self) -> StreamDecoder:
        return StreamDecoder(self)


def _byte_level_bpe(tokens: Sequence[str], merges: Sequence[str], pre: str,
                    special: list[int]) -> HFTokenizer:
    vocab = {tok: i for i, tok in enumerate(tokens)}
    pairs = []
    for merge in merges:
        left, sep, right = merge.partition(" ")
        if not sep:
            raise UnsupportedModelError(f"malformed BPE merge {merge!r} in the GGUF vocabulary")
        pairs.append((left, right))
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False,
                                ignore_merges=pre in _IGNORE_MERGES))
    if pre == "smollm":  # measured equal to llama.cpp's ids (FACTS.md); kept as it was
        hf.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
    else:
        hf.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in PRE_TOKENIZERS[pre]]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in special])
    return hf


def _raise_template_error(message: str) -> None:
    raise TemplateError(message)


def validate_messages(messages: Any) -> list[dict[str, str]]:
    """Check chat messages; ValueError messages are meant for API clients."""
    if not isinstance(messages, Sequence) or isinstance(messages, str | bytes):
        raise ValueError("messages must be a list of {role, content} objects")
    if not messages:
        raise ValueError("messages must not be empty")
    out = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, Mapping):
            raise ValueError(f"messages[{i}] must be an object with role and content")
        role = msg.get("role")
        if role not in CHAT_ROLES:
            raise ValueError(f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)}, not {role!r}")
        content = msg.get("content")
        if not isinstance(content, str):
            raise ValueError(f"messages[{i}].content must be a string")
        out.append({"role": role, "content": content})
    return out


class StreamDecoder:
    """Incremental detokenizer: feed token ids, get text deltas that never split a UTF-8 character."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """Text completed by this token ("" while a multi-byte character is still incomplete)."""
        return self._decoder.decode(self._tokenizer.token_bytes(token_id))

    def flush(self) -> str:
        """Whatever is pending at the end of the stream (an incomplete character becomes U+FFFD)."""
        return self._decoder.decode(b"", final=True)
