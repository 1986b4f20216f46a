"""Choosing the next token: greedy, temperature, top-k, top-p, min-p, repetition/presence/frequency
penalties, with a seeded RNG per request. Pure functions over a logits vector, plus `Sampler`, one request's
state."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from shoal.models.grammar import Constraint

if TYPE_CHECKING:
    from shoal.models.grammar import GrammarMatcher

MAX_STOP_SEQUENCES = 8
MAX_TOP_LOGPROBS = 20
GGUF_SAMPLING_KEYS = {
    "general.sampling.temp": "temperature",
    "general.sampling.top_k": "top_k",
    "general.sampling.top_p": "top_p",
    "general.sampling.min_p": "min_p",
    "general.sampling.penalty_repeat": "repetition_penalty",
}
"""GGUF metadata keys (llama.cpp's `general.sampling.*`) that set a model's sampling defaults."""


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens for one request. Invalid values raise ValueError with a message fit for an HTTP
    400 answer."""

    max_tokens: int | None = None
    """Most tokens to generate; None: up to the context length."""
    temperature: float = 1.0
    """0 means greedy; otherwise logits are divided by it. Between 0 and 2."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p. In (0, 1]."""
    top_k: int = 0
    """Keep only the k most likely tokens; 0 turns it off."""
    min_p: float = 0.0
    """Drop tokens less likely than min_p times the most likely one; 0 turns it off. Between 0 and 1."""
    repetition_penalty: float = 1.0
    """>1 discourages tokens seen in the prompt or output (positive logits divided, negative multiplied)."""
    presence_penalty: float = 0.0
    """Subtracted once from the logit of every token already generated. Between -2 and 2."""
    frequency_penalty: float = 0.0
    """Subtracted per occurrence from the logit of tokens already generated. Between -2 and 2."""
    seed: int | None = None
    """Seed of this request's RNG: the same seed, prompt and params give the same tokens."""
    stop: tuple[str, ...] = field(default=())
    """Text that ends generation; it is not part of the output. A str or up to 8 strings."""
    logprobs: int | None = None
    """Report each chosen token's log-probability and the `logprobs` most likely tokens (0 to
    `MAX_TOP_LOGPROBS`); None: off. Taken from the model's own distribution (raw logits)."""
    constraint: Constraint | None = None
    """A grammar the output must match (models/grammar.py); tokens it forbids are never sampled."""

    def __post_init__(self) -> None:
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            raise ValueError("max_tokens must be a positive integer")
        _check_number("temperature", self.temperature, 0.0, 2.0)
        _check_number("top_p", self.top_p, 0.0, 1.0)
        if self.top_p <= 0:
            raise ValueError("top_p must be greater than 0 and at most 1")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise ValueError("top_k must be a non-negative integer (0 turns it off)")
        _check_number("min_p", self.min_p, 0.0, 1.0)
        _check_number("repetition_penalty", self.repetition_penalty, 0.0, 10.0)
        if self.repetition_penalty <= 0:
            raise ValueError("repetition_penalty must be greater than 0")
        _check_number("presence_penalty", self.presence_penalty, -2.0, 2.0)
        _check_number("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        if self.seed is not None and (not _is_int(self.seed) or self.seed < 0):
            raise ValueError("seed must be a non-negative integer")
        stop = self.stop
        if isinstance(stop, str):
            stop = (stop,)
        elif stop is None:
            stop = ()
        if not isinstance(stop, Sequence) or not all(isinstance(s, str) for s in stop):
            raise ValueError("stop must be a string or a list of strings")
        if len(stop) > MAX_STOP_SEQUENCES:
            raise ValueError(f"stop may hold at most {MAX_STOP_SEQUENCES} strings")
        if any(s == "" for s in stop):
            raise ValueError("stop strings must not be empty")
        object.__setattr__(self, "stop", tuple(stop))
        if self.logprobs is not None and (not _is_int(self.logprobs)
                                          or not 0 <= self.logprobs <= MAX_TOP_LOGPROBS):
            raise ValueError(f"logprobs must be an integer between 0 and {MAX_TOP_LOGPROBS}")
        if isinstance(self.constraint, dict):  # from the wire (dataclasses.asdict)
            try:
                object.__setattr__(self, "constraint", Constraint(**self.constraint))
            except TypeError:
                raise ValueError("constraint must be {kind, spec}") from None
        if self.constraint is not None and not isinstance(self.constraint, Constraint):
            raise ValueError("constraint must be a models.grammar.Constraint")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def plain_greedy(self) -> bool:
        """Greedy without penalties: the token is the argmax of the raw logits (the lowest id among ties)."""
        return (self.temperature == 0 and self.repetition_penalty == 1.0 and self.presence_penalty == 0
                and self.frequency_penalty == 0 and self.logprobs is None and self.constraint is None)


def _is_int(value: object) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _check_number(name: str, value: object, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float | np.floating | np.integer) \
            or not np.isfinite(value) or not low <= value <= high:
        raise ValueError(f"{name} must be between {low:g} and {high:g}")


# --- pure functions over logits ---------------------------------------------------------------------------

def greedy(logits: np.ndarray) -> int:
    return int(np.argmax(logits))


def apply_repetition_penalty(logits: np.ndarray, token_ids: Iterable[int], penalty: float) -> np.ndarray:
    """CTRL-style: for tokens seen, positive logits are divided by `penalty`, negative ones multiplied."""
    if penalty == 1.0:
        return logits
    ids = np.unique(np.fromiter(token_ids, dtype=np.int64))
    if ids.size == 0:
        return logits
    out = logits.copy()
    seen = out[ids]
    out[ids] = np.where(seen > 0, seen / penalty, seen * penalty)
    return out


def apply_presence_frequency(logits: np.ndarray, counts: dict[int, int], presence: float,
                             frequency: float) -> np.ndarray:
    """OpenAI-style: logit -= presence * [count > 0] + frequency * count, over generated tokens."""
    if (presence == 0 and frequency == 0) or not counts:
        return logits
    ids = np.fromiter(counts.keys(), dtype=np.int64, count=len(counts))
    n = np.fromiter(counts.values(), dtype=np.float32, count=len(counts))
    out = logits.copy()
    out[ids] -= np.float32(presence) + np.float32(frequency) * n
    return out


def top_k_mask(logits: np.ndarray, k: int) -> np.ndarray:
    """Logits with everything outside the k largest set to -inf (ties at the boundary are kept)."""
    if k <= 0 or k >= logits.size:
        return logits
    kth = np.partition(logits, -k)[-k]
    return np.where(logits >= kth, logits, -np.inf).astype(logits.dtype)


def top_p_mask(logits: np.ndarray, p: float) -> np.ndarray:
    """Logits outside the nucleus (smallest most-likely set with total probability >= p) set to -inf.
    The most likely token always stays."""
    if p >= 1.0:
        return logits
    probs = softmax(logits)
    # ordered by logit, not probability: logits a hair apart can round to equal probabilities
    order = np.argsort(-logits, kind="stable")
    cumulative = np.cumsum(probs[order])
    keep = int(np.searchsorted(cumulative, p, side="left")) + 1
    out = np.full_like(logits, -np.inf)
    kept = order[:keep]
    out[kept] = logits[kept]
    return out


def min_p_mask(logits: np.ndarray, min_p: float) -> np.ndarray:
    """Logits of tokens with probability below min_p x the top probability set to -inf."""
    if min_p <= 0.0:
        return logits
    # p_i / p_max = exp(l_i - l_max)
    threshold = np.max(logits) + np.log(min_p)
    return np.where(logits >= threshold, logits, -np.inf).astype(logits.dtype)


def softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x = x - np.max(x)
    e = np.exp(x)
    return e / e.sum()


def sample(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator, *,
           context_ids: Iterable[int] = (), output_counts: dict[int, int] | None = None) -> int:
    """Pick one token. `context_ids` (prompt + output) feed the repetition penalty; `output_counts` (token ->
    times generated) feed the presence and frequency penalties."""
    logits = np.asarray(logits, dtype=np.float32)
    if logits.ndim != 1:
        raise ValueError(f"sample takes one logits vector, got shape {list(logits.shape)}")
    logits = apply_repetition_penalty(logits, context_ids, params.repetition_penalty)
    logits = apply_presence_frequency(logits, output_counts or {}, params.presence_penalty,
                                      params.frequency_penalty)
    if params.greedy:
        return greedy(logits)
    logits = logits / np.float32(params.temperature)
    logits = top_k_mask(logits, params.top_k)
    logits = top_p_mask(logits, params.top_p)
    logits = min_p_mask(logits, params.min_p)
    probs = softmax(logits)
    return int(rng.choice(probs.size, p=probs))


def token_logprobs(logits: np.ndarray, token: int, k: int) -> tuple[float, list[tuple[int, float]]]:
    """The log-probability of `token` under softmax(`logits`), and the `k` most likely (id, log-probability)
    pairs, most likely first (ties by lower id)."""
    x = np.asarray(logits, dtype=np.float64)
    top = float(np.max(x))
    lse = top + float(np.log(np.sum(np.exp(x - top))))
    chosen = float(x[token]) - lse
    if k <= 0:
        return chosen, []
    k = min(k, x.size)
    part = np.argpartition(-x, k - 1)[:k]
    order = part[np.lexsort((part, -x[part]))]
    return chosen, [(int(i), float(x[i]) - lse) for i in order]


def defaults_from_gguf(metadata: Mapping[str, Any]) -> dict[str, float | int]:
    """A model's sampling defaults from its GGUF `general.sampling.*` keys, as `SamplingParams` keyword
    arguments; a value out of range (or of the wrong type) is left out, so the documented default holds."""
    out: dict[str, float | int] = {}
    for key, name in GGUF_SAMPLING_KEYS.items():
        value = metadata.get(key)
        if value is None or isinstance(value, bool) or not isinstance(value, int | float | np.number):
            continue
        value = int(value) if name == "top_k" else float(value)
        try:
            SamplingParams(**{name: value})
        except ValueError:
            continue
        out[name] = value
    return out


def split_at_stop(pending: str, stops: Sequence[str]) -> tuple[str, str, bool]:
    """Stop strings over streamed text. `pending` is text not yet emitted. Returns (emit, keep, stopped):
    with a stop string in `pending`, emit what precedes the first one and stop; otherwise emit all but the
    longest tail that could begin a stop string, and keep that tail for the next token."""
    if not stops:
        return pending, "", False
    hits = [i for i in (pending.find(s) for s in stops) if i >= 0]
    if hits:
        return pending[:min(hits)], "", True
    hold = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(pending)), hold, -1):
            if pending.endswith(s[:n]):
                hold = n
                break
    cut = len(pending) - hold
    return pending[:cut], pending[cut:], False


class Sampler:
    """One request's sampling state: its RNG, the tokens seen so far and, with a constraint, its grammar
    matcher (`matcher()` builds it on the first token, in the engine's thread: compiling can take ms)."""

    def __init__(self, params: SamplingParams, prompt_ids: Sequence[int] = (),
                 matcher: Callable[[], GrammarMatcher] | None = None) -> None:
        self.params = params
        self._make_matcher = matcher
        self.matcher: GrammarMatcher | None = None
        self.rng = np.random.default_rng(params.seed)
        self._context: list[int] = list(prompt_ids) if params.repetition_penalty != 1.0 else []
        self._counts: dict[int, int] = {}
        self.last_logprobs: tuple[float, list[tuple[int, float]]] | None = None
        """With `params.logprobs` set: the last token's log-probability and the top alternatives."""

    def next_token(self, logits: np.ndarray) -> int:
        allowed = logits
        if self._make_matcher is not None:
            if self.matcher is None:
                self.matcher = self._make_matcher()
            allowed = self.matcher.apply(np.asarray(logits, dtype=np.float32))
        token = sample(allowed, self.params, self.rng, context_ids=self._context, output_counts=self._counts)
        if self.params.logprobs is not None:
            self.last_logprobs = token_logprobs(logits, token, self.params.logprobs)
        self.accept(token)
        return token

    def accept(self, token: int) -> None:
        if self.matcher is not None:
            self.matcher.accept(token)
        self._counts[token] = self._counts.get(token, 0) + 1
        if self.params.repetition_penalty != 1.0:
            self._context.append(token)
