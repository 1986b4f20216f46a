"""Make a GGUF with a real model's exact layout (header, metadata, tokenizer, tensor index) but synthetic
weights, from that model's header alone.

Used where the 98 MB weights cannot travel but a timing run needs the real shapes (e.g. a GPU machine that
can receive only a few tens of MB): speed does not depend on weight values, correctness does — never use the
result for correctness checks.

    python bench/synthetic_gguf.py header REAL.gguf OUT.hdr       # header + tensor index only (~1.8 MB)
    python bench/synthetic_gguf.py expand OUT.hdr SYNTH.gguf      # same layout, synthetic weights
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from shoal.models.gguf import read_gguf_index

HEADER_TAIL = b"SHOALHDR"


def _reader(path: Path):
    data = path.read_bytes()

    def read(offset: int, n: int) -> bytes:
        return data[offset : offset + n]

    return data, read


def write_header(real: Path, out: Path) -> None:
    data, read = _reader(real)
    index = read_gguf_index(read)
    size = index.file_size
    out.write_bytes(data[: index.data_start] + int(size).to_bytes(8, "little") + HEADER_TAIL)
    print(f"{out}: {index.data_start} header bytes of a {size}-byte model")


def _synthetic(kind: GGMLQuantizationType, n_bytes: int, rng: np.random.Generator) -> bytes:
    if kind == GGMLQuantizationType.F32:
        return np.ones(n_bytes // 4, dtype=np.float32).tobytes()
    if kind == GGMLQuantizationType.Q4_1:
        blocks = rng.integers(0, 256, size=(n_bytes // 20, 20), dtype=np.uint8)
        blocks[:, 0:2] = np.frombuffer(np.float16(0.01).tobytes(), dtype=np.uint8)
        blocks[:, 2:4] = np.frombuffer(np.float16(-0.075).tobytes(), dtype=np.uint8)
        return blocks.tobytes()
    if kind == GGMLQuantizationType.Q8_0:
        blocks = rng.integers(0, 256, size=(n_bytes // 34, 34), dtype=np.uint8)
        blocks[:, 0:2] = np.frombuffer(np.float16(0.002).tobytes(), dtype=np.uint8)
        return blocks.tobytes()
    raise SystemExit(f"synthetic weights for {kind.name} are not implemented")


def expand(header: Path, out: Path) -> None:
    raw = header.read_bytes()
    if not raw.endswith(HEADER_TAIL):
        raise SystemExit(f"{header} was not written by `synthetic_gguf.py header`")
    size = int.from_bytes(raw[-16:-8], "little")
    head = raw[:-16]
    index = read_gguf_index(lambda offset, n: head[offset : offset + n])
    rng = np.random.default_rng(0)
    with out.open("wb") as f:
        f.write(head)
        f.truncate(size)
        for info in sorted(index.tensors.values(), key=lambda t: t.offset):
            f.seek(info.offset)
            f.write(_synthetic(info.type, info.size, rng))
    print(f"{out}: {size} bytes, {len(index.tensors)} tensors with synthetic weights")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("mode", choices=("header", "expand"))
    parser.add_argument("source", type=Path)
    parser.add_argument("dest", type=Path)
    args = parser.parse_args()
    (write_header if args.mode == "header" else expand)(args.source, args.dest)


if __name__ == "__main__":
    main()
