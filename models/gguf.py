"""Read a GGUF file: header, metadata, tensor index, byte ranges of tensors, dequantized weights.

Two entry points:
- `read_gguf_index(read)` parses the header, metadata and tensor index through any random-access reader
  (`read(offset, size) -> bytes`), fetching 64 KiB at a time, so a node can learn where a span's tensors lie
  before it has the file (the IPFS fetcher uses this for partial pulls).
- `GGUFModel.open(path)` maps a local file (possibly sparse: only the header and one span's tensors present)
  and dequantizes tensors with the `gguf` package. It refuses a file that fails `models.validate.check_model`
  (numbers out of bounds or disagreeing with the tensor index); errors name the file.

Shapes are NumPy order, [out, in] (GGUF stores dimensions innermost first; we reverse them).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize as _gguf_dequantize
from shoal.models.config import ModelConfig
from shoal.models.errors import ModelFileError, UnsupportedModelError
from shoal.models.span import LayerSpan
from shoal.models.validate import check_model

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
READ_CHUNK = 64 * 1024
_MAX_STRING = 1 << 26  # 64 MiB: a larger string length means a corrupt file
_MAX_COUNT = 1 << 26  # items in one array, tensors or metadata keys
_MAX_ELEMENTS = 1 << 40  # elements of one tensor: more means a corrupt (or crafted) index

# Tensor types shoal dequantizes (through `gguf.quants`): floats, the classic blocks and the K-quants.
SUPPORTED_TENSOR_TYPES: frozenset[GGMLQuantizationType] = frozenset(
    GGMLQuantizationType[name]
    for name in ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
                 "Q6_K")
)

# GGUF metadata value types -> struct format (scalars).
_SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
                   11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
VOCABULARY_KEYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
                   "tokenizer.ggml.scores")
"""The metadata arrays a tokenizer is built from (`GGUFModel.release_vocabulary`)."""
_NUMPY_ARRAY_TYPES = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1",
                      10: "<u8", 11: "<i8", 12: "<f8"}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    type: GGMLQuantizationType
    shape: tuple[int, ...]
    """NumPy order: [out, in] for matrices."""
    offset: int
    """Absolute byte offset of the tensor's data in the file."""
    size: int
    """Bytes of (quantized) data."""

    @property
    def end(self) -> int:
        return self.offset + self.size

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


@dataclass(frozen=True)
class GGUFIndex:
    """Everything before the tensor data, plus where each tensor lies."""

    version: int
    metadata: dict[str, Any]
    tensors: dict[str, TensorInfo]
    """In file order."""
    alignment: int
    data_start: int
    """Absolute offset where tensor data begins (the header occupies [0, data_start))."""
    _config: list[ModelConfig] = field(default_factory=list, repr=False, compare=False)

    @property
    def config(self) -> ModelConfig:
        if not self._config:
            has_output = "output.weight" in self.tensors
            self._config.append(ModelConfig.from_gguf_metadata(self.metadata, has_output_weight=has_output,
                                                               tensor_names=self.tensors))
        return self._config[0]

    @property
    def file_size(self) -> int:
        """Bytes a complete file has: the end of the last tensor."""
        return max((t.end for t in self.tensors.values()), default=self.data_start)

    def tensor_names(self) -> list[str]:
        return list(self.tensors)

    def tensor_info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise KeyError(f"the model has no tensor {name!r}") from None

    def tensor_names_for_span(self, span: LayerSpan) -> list[str]:
        """Tensors a stage running `span` needs: its blocks, plus embedding (first) and norm/head (last)."""
        cfg = self.config
        span.check(cfg.num_layers)
        prefixes = tuple(f"blk.{i}." for i in range(span.start, span.stop))
        names = [n for n in self.tensors if n.startswith(prefixes)]
        extra: list[str] = ["rope_freqs.weight"] if "rope_freqs.weight" in self.tensors else []
        if span.is_first():
            extra.append("token_embd.weight")
        if span.is_last(cfg.num_layers):
            extra.append("output_norm.weight")
            extra.append("output.weight" if "output.weight" in self.tensors else "token_embd.weight")
        for name in extra:
            if name not in self.tensors:
                raise ModelFileError(f"the GGUF lacks tensor {name!r}, needed for layers {span}")
            if name not in names:
                names.append(name)
        return names

    def byte_ranges_for_span(self, span: LayerSpan) -> list[tuple[int, int]]:
        """Absolute half-open byte ranges [start, end) of the span's tensors, sorted; touching or
        alignment-padded neighbours are merged. The header range is `(0, data_start)`, not included."""
        infos = [self.tensors[n] for n in self.tensor_names_for_span(span)]
        ranges = sorted((t.offset, t.end) for t in infos)
        merged: list[tuple[int, int]] = []
        for start, end in ranges:
            if merged and start - merged[-1][1] < self.alignment:
                merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
            else:
                merged.append((start, end))
        return merged


class _Cursor:
    """Sequential parser over a random-access reader, fetching READ_CHUNK bytes at a time."""

    def __init__(self, read: Callable[[int, int], bytes], chunk: int = READ_CHUNK) -> None:
        self._read = read
        self._chunk = chunk
        self._buf = b""
        self._buf_start = 0
        self.pos = 0

    def take(self, n: int) -> bytes:
        end = self.pos + n
        while end > self._buf_start + len(self._buf):
            want = max(self._chunk, end - (self._buf_start + len(self._buf)))
            got = self._read(self._buf_start + len(self._buf), want)
            if not got:
                have = self._buf_start + len(self._buf)
                raise ModelFileError(
                    f"the GGUF file is truncated: its header ends at byte {have}, needed {end}"
                )
            # Drop what was consumed so the buffer stays small.
            keep_from = self.pos - self._buf_start
            self._buf = self._buf[keep_from:] + bytes(got)
            self._buf_start = self.pos
        out = self._buf[self.pos - self._buf_start:end - self._buf_start]
        self.pos = end
        return out

    def unpack(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = self.unpack("<Q")
        if n > _MAX_STRING:
            raise ModelFileError(f"corrupt GGUF: a string of {n} bytes at offset {self.pos - 8}")
        return self.take(n).decode("utf-8", errors="replace")


def _read_value(cur: _Cursor, vtype: int) -> Any:
    if vtype in _SCALAR_FORMATS:
        value = cur.unpack(_SCALAR_FORMATS[vtype])
        return bool(value) if vtype == 7 else value
    if vtype == _STRING:
        return cur.string()
    if vtype == _ARRAY:
        item_type = cur.unpack("<I")
        count = cur.unpack("<Q")
        if count > _MAX_COUNT:
            raise ModelFileError(f"corrupt GGUF: an array of {count} items")
        if item_type in _NUMPY_ARRAY_TYPES:
            dtype = np.dtype(_NUMPY_ARRAY_TYPES[item_type])
            arr = np.frombuffer(cur.take(count * dtype.itemsize), dtype=dtype)
            return [bool(x) for x in arr] if item_type == 7 else arr.tolist()
        return [_read_value(cur, item_type) for _ in range(count)]
    raise ModelFileError(f"corrupt GGUF: unknown metadata value type {vtype}")


def _tensor_type(name: str, raw: int) -> GGMLQuantizationType:
    try:
        ttype = GGMLQuantizationType(raw)
    except ValueError:
        raise UnsupportedModelError(f"tensor {name!r} has unknown GGML type id {raw}") from None
    if ttype not in SUPPORTED_TENSOR_TYPES:
        supported = ", ".join(sorted(t.name for t in SUPPORTED_TENSOR_TYPES))
        raise UnsupportedModelError(
            f"tensor {name!r} has type {ttype.name}, which shoal cannot read; supported: {supported}"
        )
    return ttype


def read_gguf_index(read: Callable[[int, int], bytes], *, chunk: int = READ_CHUNK) -> GGUFIndex:
    """Parse header, metadata and tensor index through `read(offset, size)` (which may return fewer bytes at
    the end of the file, and b"" past it)."""
    cur = _Cursor(read, chunk)
    try:
        magic = cur.take(4)
    except ModelFileError:
        raise ModelFileError("not a GGUF file: it is shorter than the 4-byte magic") from None
    if magic != GGUF_MAGIC:
        raise ModelFileError(f"not a GGUF file: it starts with {magic!r}, expected {GGUF_MAGIC!r}")
    version = cur.unpack("<I")
    if version not in (2, 3):
        hint = " (big-endian files are not supported)" if version > 0xFFFF else ""
        raise ModelFileError(f"unsupported GGUF version {version}{hint}; shoal reads versions 2 and 3")
    n_tensors = cur.unpack("<Q")
    n_kv = cur.unpack("<Q")
    if n_tensors > _MAX_COUNT or n_kv > _MAX_COUNT:
        raise ModelFileError("corrupt GGUF: implausible tensor or metadata count")
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string()
        metadata[key] = _read_value(cur, cur.unpack("<I"))
    alignment = int(metadata.get("general.alignment", DEFAULT_ALIGNMENT))
    if alignment <= 0 or alignment & (alignment - 1):
        raise ModelFileError(f"corrupt GGUF: alignment {alignment} is not a power of two")
    raw_tensors = []
    for _ in range(n_tensors):
        name = cur.string()
        n_dims = cur.unpack("<I")
        if n_dims > 4:
            raise ModelFileError(f"corrupt GGUF: tensor {name!r} has {n_dims} dimensions")
        dims = [cur.unpack("<Q") for _ in range(n_dims)]
        raw_type = cur.unpack("<I")
        rel_offset = cur.unpack("<Q")
        raw_tensors.append((name, dims, raw_type, rel_offset))
    data_start = -(-cur.pos // alignment) * alignment
    tensors: dict[str, TensorInfo] = {}
    for name, dims, raw_type, rel_offset in raw_tensors:
        ttype = _tensor_type(name, raw_type)
        block, type_size = GGML_QUANT_SIZES[ttype]
        n = math.prod(dims)  # Python ints: a crafted shape cannot overflow into a small or negative size
        if not 0 < n <= _MAX_ELEMENTS:
            raise ModelFileError(f"corrupt GGUF: tensor {name!r} has shape {dims} ({n} elements)")
        if dims and dims[0] % block:
            raise ModelFileError(f"corrupt GGUF: tensor {name!r} rows are not a multiple of {block}")
        tensors[name] = TensorInfo(
            name=name, type=ttype, shape=tuple(int(d) for d in reversed(dims)),
            offset=data_start + rel_offset, size=n // block * type_size,
        )
    return GGUFIndex(version=version, metadata=metadata, tensors=tensors, alignment=alignment,
                     data_start=data_start)


class GGUFModel:
    """A GGUF file on disk, memory-mapped. Tensors a sparse file lacks read as zeros: open only what you
    fetched (see `read_gguf_index` / `GGUFIndex.byte_ranges_for_span`)."""

    def __init__(self, path: Path, index: GGUFIndex, data: np.memmap) -> None:
        self.path = path
        self.index = index
        self._data = data
        self.vocabulary_released = False
        """Whether `release_vocabulary` dropped the tokenizer's arrays from the metadata."""

    @classmethod
    def open(cls, path: str | Path, *, check: bool = True) -> GGUFModel:
        """Map `path`. With `check` (always, but in tests of the reader itself) the file must pass
        `models.validate.check_model` first."""
        path = Path(path)
        if not path.exists():
            raise ModelFileError(f"model file {path} does not exist")
        if not path.is_file():
            raise ModelFileError(f"model path {path} is not a regular file")
        size = path.stat().st_size
        with path.open("rb") as fh:

            def read(offset: int, n: int) -> bytes:
                fh.seek(offset)
                return fh.read(n)

            try:
                index = read_gguf_index(read)
            except ModelFileError as exc:
                raise type(exc)(f"{path}: {exc}") from None
        if index.file_size > size:
            raise ModelFileError(
                f"model file {path} is truncated: {size} bytes, but its tensors end at byte {index.file_size}"
            )
        if check:
            check_model(index, source=str(path), file_size=size)  # before anything is built from its numbers
        data = np.memmap(path, dtype=np.uint8, mode="r")
        return cls(path, index, data)

    @property
    def metadata(self) -> dict[str, Any]:
        return self.index.metadata

    @property
    def config(self) -> ModelConfig:
        """The model's `ModelConfig`; `UnsupportedModelError` naming this file when shoal cannot run it."""
        try:
            return self.index.config
        except UnsupportedModelError as exc:
            raise UnsupportedModelError(f"{self.path.name}: {exc}") from None

    @cached_property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    def tensor_names(self) -> list[str]:
        return self.index.tensor_names()

    def tensor_info(self, name: str) -> TensorInfo:
        return self.index.tensor_info(name)

    def tensor_names_for_span(self, span: LayerSpan) -> list[str]:
        return self.index.tensor_names_for_span(span)

    def byte_ranges_for_span(self, span: LayerSpan) -> list[tuple[int, int]]:
        return self.index.byte_ranges_for_span(span)

    def raw(self, name: str) -> np.ndarray:
        """The tensor's stored bytes as a read-only uint8 view [rows, bytes per row] (no copy)."""
        info = self.tensor_info(name)
        flat = self._data[info.offset:info.end]
        rows = int(np.prod(info.shape[:-1], dtype=np.int64)) if len(info.shape) > 1 else 1
        return flat.reshape(rows, info.size // rows)

    def dequantize(self, name: str) -> np.ndarray:
        """The tensor as a new float32 array of shape `tensor_info(name).shape`."""
        info = self.tensor_info(name)
        raw = np.asarray(self.raw(name))
        if info.type == GGMLQuantizationType.F32:
            return raw.view("<f4").reshape(info.shape).astype(np.float32, copy=True)
        if info.type == GGMLQuantizationType.F16:
            return raw.view("<f2").reshape(info.shape).astype(np.float32)
        out = _gguf_dequantize(raw, info.type)
        return np.ascontiguousarray(out.reshape(info.shape), dtype=np.float32)

    def dequantize_many(self, names: Iterable[str]) -> dict[str, np.ndarray]:
        return {name: self.dequantize(name) for name in names}

    def release_vocabulary(self) -> None:
        """Drop the tokenizer's arrays (`VOCABULARY_KEYS`) from the metadata once a `Tokenizer` is built from
        them: the serving process keeps the tokenizer, not these Python lists (merges, token types and the
        token list: ~6.5 MiB at a 49k vocabulary with the tokenizer dropped, ~3.5 with it kept; Llama 3's
        128k tokens and 280k merges several times that). The config (which may count the tokens) is read
        first; `Tokenizer.from_gguf` refuses the model afterwards. Safe to call twice."""
        _ = self.config
        for key in VOCABULARY_KEYS:
            self.index.metadata.pop(key, None)
        self.vocabulary_released = True

    def close(self) -> None:
        """Drop the file mapping (arrays from `raw` become invalid) and the vocabulary arrays
        (`release_vocabulary`). Safe to call twice."""
        if not self.vocabulary_released:
            try:
                self.release_vocabulary()
            except UnsupportedModelError:  # no config to keep: the lists go all the same
                for key in VOCABULARY_KEYS:
                    self.index.metadata.pop(key, None)
                self.vocabulary_released = True
        mm = getattr(self._data, "_mmap", None)
        self._data = np.zeros(0, dtype=np.uint8)
        if mm is not None:
            try:
                mm.close()
            except BufferError:  # views still alive; the mapping goes with them
                pass

    def __repr__(self) -> str:
        return f"GGUFModel({str(self.path)!r}, {len(self.index.tensors)} tensors)"
