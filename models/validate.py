"""Check a model file against its own tensor index before anything is built from it.

Models come from peers and IPFS: untrusted input. A crafted GGUF could claim 100,000 blocks or a context of
2^31 - 1 tokens and send the compiler (or the KV-cache allocation) into an endless, memory-hungry run. So
before any compile or load, `check_model` refuses (with `InvalidModelError`, naming the file and what is
wrong) a file whose config numbers are out of bounds (`LIMITS`) or disagree with the tensors present:

- blocks: tensors exist for exactly the blocks 0 … block_count-1, every block has the same tensor names,
  and each holds what every family needs (`REQUIRED_IN_EVERY_BLOCK`, alternatives allowed);
- shapes: every tensor named in `TENSOR_SHAPES` has the shape the config's numbers give (vocab, hidden,
  heads × head_dim, …), with per-architecture overrides in `SHAPE_OVERRIDES`; the vocabulary of the
  tokenizer matches the embedding rows;
- placement: every tensor is aligned, inside the file, and overlaps no other (so none is short).

Everything here is generic, driven by the index and the config's numbers: a new family adds rows to the
tables (or an override), not code.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from shoal.models.config import ModelConfig
from shoal.models.errors import InvalidModelError, ModelFileError

if TYPE_CHECKING:
    from shoal.models.gguf import GGUFIndex, TensorInfo

LIMITS: dict[str, tuple[int, int]] = {
    "num_layers": (1, 1024),
    "hidden_size": (1, 1 << 16),
    "intermediate_size": (1, 1 << 18),
    "num_heads": (1, 1024),
    "num_kv_heads": (1, 1024),
    "head_dim": (1, 1024),
    "vocab_size": (1, 1 << 22),
    "context_length": (1, 1 << 21),
    "sliding_window": (0, 1 << 21),
}
"""Sane bounds (inclusive) of `ModelConfig` fields; fields a config lacks are skipped. The largest open
models stay well inside (e.g. 126 layers, hidden 16,384, 256k vocab, 1M context)."""

MAX_TENSOR_ELEMENTS = 1 << 36
"""Elements of one tensor (64 Gi: far above any embedding or FFN matrix of a model shoal could hold)."""


@dataclass(frozen=True)
class Dims:
    """The numbers tensor shapes are made of."""

    vocab: int
    hidden: int
    ffn: int
    q: int
    """num_heads × head_dim: rows of the query projection."""
    kv: int
    """num_kv_heads × head_dim: rows of the key (and value) projection."""
    head_dim: int


Shape = Callable[[Dims], tuple[int, ...]]

TENSOR_SHAPES: dict[str, Shape] = {
    "token_embd.weight": lambda d: (d.vocab, d.hidden),
    "output.weight": lambda d: (d.vocab, d.hidden),
    "output_norm.weight": lambda d: (d.hidden,),
    "blk.*.attn_norm.weight": lambda d: (d.hidden,),
    "blk.*.ffn_norm.weight": lambda d: (d.hidden,),
    "blk.*.attn_q.weight": lambda d: (d.q, d.hidden),
    "blk.*.attn_k.weight": lambda d: (d.kv, d.hidden),
    "blk.*.attn_v.weight": lambda d: (d.kv, d.hidden),
    "blk.*.attn_qkv.weight": lambda d: (d.q + 2 * d.kv, d.hidden),
    "blk.*.attn_output.weight": lambda d: (d.hidden, d.q),
    "blk.*.attn_q_norm.weight": lambda d: (d.head_dim,),
    "blk.*.attn_k_norm.weight": lambda d: (d.head_dim,),
    "blk.*.ffn_gate.weight": lambda d: (d.ffn, d.hidden),
    "blk.*.ffn_up.weight": lambda d: (d.ffn, d.hidden),
    "blk.*.ffn_down.weight": lambda d: (d.hidden, d.ffn),
}
"""NumPy-order shapes ([out, in]) of well-known GGUF tensors (`blk.*.` = in every block). Tensors not named
here are only bounds- and placement-checked."""

SHAPE_OVERRIDES: dict[str, dict[str, Shape]] = {
    "phi3": {"blk.*.ffn_up.weight": lambda d: (2 * d.ffn, d.hidden)},  # gate and up, fused
}

REQUIRED_IN_EVERY_BLOCK: tuple[tuple[tuple[str, ...], ...], ...] = (
    (("attn_norm.weight",),),
    (("attn_q.weight", "attn_k.weight", "attn_v.weight"), ("attn_qkv.weight",)),
    (("attn_output.weight",),),
    (("ffn_norm.weight",),),
    (("ffn_up.weight",),),
    (("ffn_down.weight",),),
)
"""What each block must hold: per requirement, one of its alternatives in full."""

REQUIRED_TENSORS: tuple[str, ...] = ("token_embd.weight", "output_norm.weight")

_BLOCK = re.compile(r"blk\.(\d+)\.(.+)")


def check_model(index: GGUFIndex, *, source: str, file_size: int | None = None) -> ModelConfig:
    """The index's config once every check passed; else `InvalidModelError` (or the config's own
    `UnsupportedModelError`), its message starting with `source` (the file or CID)."""
    try:
        config = index.config
        _check_bounds(config)
        _check_tensors(index, config, file_size)
    except ModelFileError as exc:
        raise type(exc)(f"{source}: {exc}") from None
    return config


def _check_bounds(config: ModelConfig) -> None:
    for name, (low, high) in LIMITS.items():
        value = getattr(config, name, None)
        if value is not None and not low <= int(value) <= high:
            raise InvalidModelError(f"{name} = {value} is outside the supported range [{low}, {high}]")


def _check_tensors(index: GGUFIndex, config: ModelConfig, file_size: int | None) -> None:
    tensors = index.tensors
    for name in REQUIRED_TENSORS:
        if name not in tensors:
            raise InvalidModelError(f"tensor {name!r} is missing")
    _check_blocks(tensors, config.num_layers)
    _check_shapes(index, config)
    _check_placement(index, file_size)


def _check_blocks(tensors: Mapping[str, TensorInfo], num_layers: int) -> None:
    blocks: dict[int, set[str]] = {}
    for name in tensors:
        match = _BLOCK.fullmatch(name)
        if match:
            blocks.setdefault(int(match[1]), set()).add(match[2])
    beyond = sorted(i for i in blocks if i >= num_layers)
    if beyond:
        raise InvalidModelError(f"block_count is {num_layers}, but tensors exist for block {beyond[0]}")
    missing = [i for i in range(num_layers) if i not in blocks]
    if missing:
        raise InvalidModelError(
            f"block_count is {num_layers}, but blocks {_ranges(missing)} have no tensors")
    every = set().union(*blocks.values())
    for i in range(num_layers):
        lacking = sorted(every - blocks[i])
        if lacking:
            raise InvalidModelError(f"tensor 'blk.{i}.{lacking[0]}' is missing (the other blocks have it)")
    for requirement in REQUIRED_IN_EVERY_BLOCK:
        if not any(set(option) <= blocks[0] for option in requirement):
            wanted = " or ".join("+".join(option) for option in requirement)
            raise InvalidModelError(f"the blocks lack {wanted}")


def _check_shapes(index: GGUFIndex, config: ModelConfig) -> None:
    dims = Dims(vocab=config.vocab_size, hidden=config.hidden_size, ffn=config.intermediate_size,
                q=config.num_heads * config.head_dim, kv=config.num_kv_heads * config.head_dim,
                head_dim=config.head_dim)
    rules = {**TENSOR_SHAPES, **SHAPE_OVERRIDES.get(config.architecture, {})}
    tokens = index.metadata.get("tokenizer.ggml.tokens")
    embedding = index.tensors["token_embd.weight"]
    rows = embedding.shape[0] if embedding.shape else 0
    if isinstance(tokens, list) and len(tokens) != rows:
        raise InvalidModelError(
            f"vocab mismatch: the tokenizer has {len(tokens)} tokens, token_embd.weight has {rows} rows")
    for name, info in index.tensors.items():
        match = _BLOCK.fullmatch(name)
        rule = rules.get(f"blk.*.{match[2]}" if match else name)
        if rule is None:
            continue
        want = rule(dims)
        got = info.shape
        if got != want:
            what = "vocab mismatch: " if name in ("token_embd.weight", "output.weight") else ""
            raise InvalidModelError(
                f"{what}tensor {name!r} has shape {list(got)}, but the config's numbers give {list(want)} "
                f"(vocab {dims.vocab}, hidden {dims.hidden}, ffn {dims.ffn}, heads {config.num_heads} × "
                f"{config.head_dim}, kv heads {config.num_kv_heads})")


def _check_placement(index: GGUFIndex, file_size: int | None) -> None:
    spans = []
    for name, info in index.tensors.items():
        offset, size, count = info.offset, info.size, info.n_elements
        if count > MAX_TENSOR_ELEMENTS:
            raise InvalidModelError(f"tensor {name!r} has {count} elements (more than {MAX_TENSOR_ELEMENTS})")
        if offset % index.alignment:
            raise InvalidModelError(f"tensor {name!r} starts at byte {offset}, not aligned to "
                                    f"{index.alignment}")
        if file_size is not None and offset + size > file_size:
            raise InvalidModelError(f"the file is truncated: tensor {name!r} ends at byte {offset + size}, "
                                    f"the file has {file_size}")
        spans.append((offset, offset + size, name))
    spans.sort()
    for (_, end, name), (start, _, following) in itertools.pairwise(spans):
        if start < end:
            raise InvalidModelError(f"tensor {name!r} is short: {following!r} starts at byte {start}, "
                                    f"inside it (it needs up to byte {end})")


def _ranges(numbers: list[int]) -> str:
    """"3, 5-99999" for [3, 5, 6, …, 99999] (short, whatever the count)."""
    parts: list[str] = []
    start = prev = numbers[0]
    for n in [*numbers[1:], None]:
        if n is not None and n == prev + 1:
            prev = n
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if n is not None:
            start = prev = n
    return ", ".join(parts[:5]) + (", …" if len(parts) > 5 else "")
