"""The tokenizer of a GGUF model (HF `tokenizers` BPE from its vocabulary and merges) and its chat template
(jinja2, sandboxed).

Recipe for GGUF `gpt2`-model vocabularies (measured equal to llama.cpp's ids, see FACTS.md): BPE over the
vocab + merges; pre-tokenizer = digits split one by one, then ByteLevel (GPT-2 regex, no prefix space);
control tokens (GGUF token type 3) are special and matched verbatim in the text; no BOS is added.
"""

from __future__ import annotations

import codecs
import logging
import re
import secrets
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from shoal.models.errors import UnsupportedModelError
from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

logger = logging.getLogger(__name__)

CHAT_ROLES = ("system", "user", "assistant")
_CONTROL = 3  # llama.cpp token type: control
_USER_DEFINED = 4
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
                 add_bos: bool = False) -> None:
        vocab = {tok: i for i, tok in enumerate(tokens)}
        pairs = []
        for merge in merges:
            left, sep, right = merge.partition(" ")
            if not sep:
                raise UnsupportedModelError(f"malformed BPE merge {merge!r} in the GGUF vocabulary")
            pairs.append((left, right))
        hf = HFTokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
        hf.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
        hf.decoder = decoders.ByteLevel()
        special = [i for i, t in enumerate(token_types) if t in (_CONTROL, _USER_DEFINED)]
        hf.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in special])
        self._hf = hf
        self._hf_plain = HFTokenizer.from_str(hf.to_str())
        self._hf_plain.encode_special_tokens = True  # message content: `<|im_start|>` is just text there
        self.vocab_size = len(tokens)
        self.special_ids = frozenset(special)
        self.eos_token_id = eos_token_id
        self.bos_token_id = bos_token_id
        self.add_bos = add_bos
        self._tokens = list(tokens)
        self._token_bytes = [self._bytes_of(i) for i in range(len(tokens))]
        stops = {eos_token_id}
        for name in ("<|im_end|>", "<|eot_id|>", "<|endoftext|>", "<|end|>"):
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
        meta: Mapping[str, Any] = model.metadata
        kind = meta.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise UnsupportedModelError(
                f"tokenizer model {kind!r} is not supported; "
                "shoal reads GGUF 'gpt2' (byte-level BPE) vocabularies"
            )
        tokens = meta.get("tokenizer.ggml.tokens")
        merges = meta.get("tokenizer.ggml.merges")
        if not tokens or merges is None:
            raise UnsupportedModelError("the GGUF has no tokenizer vocabulary or merges")
        types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
        eos = meta.get("tokenizer.ggml.eos_token_id")
        if eos is None:
            raise UnsupportedModelError("the GGUF names no end-of-sequence token (eos_token_id)")
        bos = meta.get("tokenizer.ggml.bos_token_id")
        return cls(
            tokens, merges, types, eos_token_id=int(eos), bos_token_id=None if bos is None else int(bos),
            chat_template=meta.get("tokenizer.chat_template"),
            add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        )

    def _bytes_of(self, token_id: int) -> bytes:
        text = self._tokens[token_id]
        if token_id in self.special_ids:
            return text.encode("utf-8")
        try:
            return bytes(_UNICODE_TO_BYTE[c] for c in text)
        except KeyError:  # not byte-level (should not happen in a gpt2 vocabulary)
            return text.encode("utf-8")

    # --- text <-> ids -------------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`. Special tokens written in the text (e.g. `<|im_start|>`) become their ids."""
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, not {type(text).__name__}")
        ids = self._hf.encode(text, add_special_tokens=False).ids
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
            return self.encode(self.render_chat(checked, add_generation_prompt))
        ids = self.encode(pieces[0])
        for index, template_text in zip(order, pieces[2::2], strict=True):
            ids += self._hf_plain.encode(checked[index]["content"], add_special_tokens=False).ids
            ids += self._hf.encode(template_text, add_special_tokens=False).ids
        return ids

    def _token_text_or_empty(self, token_id: int | None) -> str:
        return self._tokens[token_id] if token_id is not None and 0 <= token_id < self.vocab_size else ""

    def stream_decoder(self) -> StreamDecoder:
        return StreamDecoder(self)


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
