"""Crafted model files (written with the `gguf` package) are refused before any compile, with a message that
names the file and what is wrong: `GGUFModel.open`, the node's load, and `shoal compile` (a real subprocess,
no traceback, nothing written to the compile cache)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFWriter
from shoal.mesh.node.model_manager import LoadOptions, LocalModel, load_engine
from shoal.models.errors import InvalidModelError, ModelFileError, UnsupportedModelError
from shoal.models.gguf import GGUFModel
from shoal.models.validate import LIMITS

HIDDEN, HEADS, KV_HEADS, FFN, LAYERS, VOCAB = 64, 4, 2, 128, 2, 32
HEAD_DIM = HIDDEN // HEADS


def write_llama(path: Path, *, arch: str = "llama", layers: int = LAYERS, block_count: int | None = None,
                context: int = 256, tokens: int = VOCAB, drop: tuple[str, ...] = (),
                shapes: dict[str, tuple[int, ...]] | None = None) -> Path:
    """A tiny, valid Llama GGUF (F32) unless told otherwise: `block_count` (metadata) may differ from the
    `layers` written, `drop` leaves tensors out, `shapes` changes some."""
    rng = np.random.default_rng(0)
    w = GGUFWriter(str(path), arch)
    w.add_context_length(context)
    w.add_embedding_length(HIDDEN)
    w.add_block_count(layers if block_count is None else block_count)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(HEAD_DIM)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(["a", "b", "ab", *(f"t{i}" for i in range(tokens - 3))])  # enough to build a tokenizer
    w.add_token_types([1] * tokens)
    w.add_token_merges(["a b"])
    w.add_eos_token_id(2)
    q, kv = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    wanted: dict[str, tuple[int, ...]] = {"token_embd.weight": (VOCAB, HIDDEN)}
    for i in range(layers):
        wanted |= {f"blk.{i}.attn_norm.weight": (HIDDEN,), f"blk.{i}.attn_q.weight": (q, HIDDEN),
                   f"blk.{i}.attn_k.weight": (kv, HIDDEN), f"blk.{i}.attn_v.weight": (kv, HIDDEN),
                   f"blk.{i}.attn_output.weight": (HIDDEN, q), f"blk.{i}.ffn_norm.weight": (HIDDEN,),
                   f"blk.{i}.ffn_gate.weight": (FFN, HIDDEN), f"blk.{i}.ffn_up.weight": (FFN, HIDDEN),
                   f"blk.{i}.ffn_down.weight": (HIDDEN, FFN)}
    wanted["output_norm.weight"] = (HIDDEN,)
    wanted |= shapes or {}
    for name, shape in wanted.items():
        if name not in drop:
            w.add_tensor(name, rng.standard_normal(shape).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def truncated(path: Path) -> Path:
    write_llama(path)
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size - 1000)
    return path


CRAFTED: dict[str, tuple[Callable[[Path], Path], type[ModelFileError], str]] = {
    "block_count": (lambda p: write_llama(p, block_count=100_000), InvalidModelError,
                    r"num_layers = 100000 is outside the supported range \[1, 1024\]"),
    "context": (lambda p: write_llama(p, context=2**31 - 1), InvalidModelError,
                r"context_length = 2147483647 is outside the supported range"),
    "missing_tensor": (lambda p: write_llama(p, drop=("blk.1.attn_k.weight",)), InvalidModelError,
                       r"tensor 'blk\.1\.attn_k\.weight' is missing"),
    "truncated": (truncated, ModelFileError, r"truncated"),
    "unknown_architecture": (lambda p: write_llama(p, arch="mamba"), UnsupportedModelError,
                             r"architecture 'mamba' is not supported; shoal runs: llama"),
    "vocab_mismatch": (lambda p: write_llama(p, tokens=VOCAB + 8), InvalidModelError,
                       r"vocab mismatch: the tokenizer has 40 tokens, token_embd.weight has 32 rows"),
    "extra_blocks": (lambda p: write_llama(p, layers=3, block_count=2), InvalidModelError,
                     r"block_count is 2, but tensors exist for block 2"),
    "fewer_blocks": (lambda p: write_llama(p, layers=2, block_count=4), InvalidModelError,
                     r"block_count is 4, but blocks 2-3 have no tensors"),
    "wrong_shape": (lambda p: write_llama(p, shapes={"blk.0.ffn_down.weight": (HIDDEN, FFN * 2)}),
                    InvalidModelError, r"'blk\.0\.ffn_down\.weight' has shape \[64, 256\], but the config's "
                    r"numbers give \[64, 128\]"),
}


def test_a_valid_file_opens(tmp_path: Path) -> None:
    model = GGUFModel.open(write_llama(tmp_path / "ok.gguf"))
    assert model.config.num_layers == LAYERS and model.config.vocab_size == VOCAB
    model.close()


@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_crafted_file_is_refused_naming_the_file(tmp_path: Path, case: str) -> None:
    make, error, message = CRAFTED[case]
    path = make(tmp_path / f"{case}.gguf")
    with pytest.raises(error, match=message) as caught:
        GGUFModel.open(path)
    assert str(caught.value).startswith(str(path)) or str(path) in str(caught.value)


def test_bounds_table_covers_the_numbers_a_compile_grows_with() -> None:
    assert {"num_layers", "context_length", "hidden_size", "vocab_size"} <= set(LIMITS)
    assert all(low <= high for low, high in LIMITS.values())


@pytest.mark.parametrize("case", ["block_count", "context"])
def test_node_load_refuses_before_any_compile(tmp_path: Path, case: str) -> None:
    make, error, message = CRAFTED[case]
    path = make(tmp_path / f"{case}.gguf")
    progress: list[float] = []
    with pytest.raises(error, match=message):
        load_engine(LocalModel(name=case, path=path),
                    LoadOptions(backend="tvm", cache_dir=tmp_path / "cache"),
                    lambda fraction, *_: progress.append(fraction))
    assert progress == []  # no compile step reported
    assert not (tmp_path / "cache").exists()


def test_compile_command_refuses_each_crafted_file_without_traceback(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """`shoal compile --model FILE` on each crafted file: exit code 2, one error line naming the file, no
    traceback, nothing compiled. The first case runs as its own process (`python -m shoal.mesh`, what a user
    runs); the others call the same command's `main` here (a process each, importing TVM, was ~1.5 s apiece
    of the default suite)."""
    from shoal.mesh.commands.cli import main

    cache = tmp_path / "cache"
    monkeypatch.setenv("SHOAL_COMPILE_CACHE", str(cache))
    first, *others = sorted(CRAFTED)
    results = []
    path = CRAFTED[first][0](tmp_path / f"{first}.gguf")
    proc = subprocess.run([sys.executable, "-m", "shoal.mesh", "compile", "--model", str(path), "--quiet"],
                          env={**os.environ, "SHOAL_COMPILE_CACHE": str(cache)}, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True, timeout=120)
    results.append((CRAFTED[first][2], path, proc.returncode, proc.stderr))
    for case in others:
        path = CRAFTED[case][0](tmp_path / f"{case}.gguf")
        code = main(["compile", "--model", str(path), "--quiet"])
        results.append((CRAFTED[case][2], path, code, capsys.readouterr().err))
    assert len(results) == len(CRAFTED)
    for message, path, code, err in results:
        assert code == 2, err
        assert err.startswith("shoal compile: error: ") and str(path) in err
        assert re.search(message, err), err
        assert "Traceback" not in err
    assert not cache.exists() or not any(cache.iterdir())
