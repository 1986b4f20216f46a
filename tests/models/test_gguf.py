"""GGUF reading: index, span byte ranges, dequantization, and every error path with its message."""

from __future__ import annotations

import re
from pathlib import Path

import gguf
import numpy as np
import pytest
from shoal.models.embedded import embedded_model_path
from shoal.models.errors import ModelFileError, UnsupportedModelError
from shoal.models.gguf import GGUFModel, read_gguf_index
from shoal.models.span import LayerSpan


@pytest.fixture(scope="module")
def model() -> GGUFModel:
    return GGUFModel.open(embedded_model_path())


Tensors = dict[str, tuple[np.ndarray, gguf.GGMLQuantizationType | None]]


def _write_gguf(path: Path, arch: str, tensors: Tensors, extra_meta: dict[str, int] | None = None) -> Path:
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(64)
    writer.add_feed_forward_length(128)
    writer.add_head_count(2)
    writer.add_head_count_kv(1)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(32)
    for key, value in (extra_meta or {}).items():
        writer.add_uint32(key, value)
    for name, (arr, raw_dtype) in tensors.items():
        writer.add_tensor(name, arr, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_embedded_model_config_and_index(model: GGUFModel) -> None:
    cfg = model.config
    assert (cfg.num_layers, cfg.hidden_size, cfg.intermediate_size) == (30, 576, 1536)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size) == (9, 3, 64, 49152)
    assert cfg.rope_theta == 100000.0 and cfg.tie_embeddings
    assert len(model.tensor_names()) == 272
    info = model.tensor_info("blk.0.ffn_down.weight")
    assert info.type == gguf.GGMLQuantizationType.Q4_1
    assert info.shape == (576, 1536)
    assert info.size == 576 * 1536 // 32 * 20
    assert model.metadata["tokenizer.ggml.pre"] == "smollm"
    assert len(model.metadata["tokenizer.ggml.merges"]) == 48900


def test_index_agrees_with_gguf_reader(model: GGUFModel) -> None:
    reader = gguf.GGUFReader(model.path)
    assert len(reader.tensors) == len(model.tensor_names())
    for t in reader.tensors:
        info = model.tensor_info(t.name)
        assert (info.offset, info.size, info.type) == (int(t.data_offset), int(t.n_bytes), t.tensor_type)
    for key, field in reader.fields.items():
        if not key.startswith("GGUF."):
            value = field.contents()
            assert value == pytest.approx(model.metadata[key]) if isinstance(value, float) \
                else value == model.metadata[key], key


def test_dequantize_and_raw(model: GGUFModel) -> None:
    norm = model.dequantize("blk.0.attn_norm.weight")
    assert norm.dtype == np.float32 and norm.shape == (576,)
    q = model.dequantize("blk.3.attn_k.weight")
    assert q.shape == (192, 576) and q.dtype == np.float32 and np.isfinite(q).all()
    raw = model.raw("blk.3.attn_k.weight")
    assert raw.dtype == np.uint8 and raw.shape == (192, 576 // 32 * 20)
    expected = gguf.quants.dequantize(np.asarray(raw), gguf.GGMLQuantizationType.Q4_1)
    np.testing.assert_array_equal(q, expected)
    with pytest.raises(KeyError, match="no tensor 'nope'"):
        model.dequantize("nope")


def test_span_tensors_and_ranges(model: GGUFModel) -> None:
    first = model.tensor_names_for_span(LayerSpan(0, 2))
    assert "token_embd.weight" in first and "output_norm.weight" not in first
    assert {n.split(".")[1] for n in first if n.startswith("blk.")} == {"0", "1"}
    assert len(first) == 2 * 9 + 1
    last = model.tensor_names_for_span(LayerSpan(29, 30))
    assert "output_norm.weight" in last and "token_embd.weight" in last  # tied head
    middle = model.tensor_names_for_span(LayerSpan(10, 12))
    assert len(middle) == 18 and "token_embd.weight" not in middle
    ranges = model.byte_ranges_for_span(LayerSpan(10, 12))
    total = sum(end - start for start, end in ranges)
    assert total >= sum(model.tensor_info(n).size for n in middle)
    assert total < sum(model.tensor_info(n).size for n in middle) + 32 * 18
    assert all(start >= model.index.data_start for start, _ in ranges)
    with pytest.raises(ValueError, match="exceeds the model's 30 layers"):
        model.tensor_names_for_span(LayerSpan(0, 31))


def test_partial_read_sparse_file(model: GGUFModel, tmp_path: Path) -> None:
    """Read only the header + one span's tensors through a reader; a sparse file of just those opens and
    dequantizes them identically."""
    src = model.path.read_bytes()
    requests: list[tuple[int, int]] = []

    def read(offset: int, size: int) -> bytes:
        requests.append((offset, size))
        return src[offset:offset + size]

    index = read_gguf_index(read)
    assert index.data_start == model.index.data_start
    assert max(off + size for off, size in requests) <= index.data_start + 64 * 1024
    span = LayerSpan(5, 7)
    sparse = tmp_path / "sparse.gguf"
    with sparse.open("wb") as fh:
        fh.truncate(index.file_size)
        fh.write(src[:index.data_start])
        for start, end in index.byte_ranges_for_span(span):
            fh.seek(start)
            fh.write(src[start:end])
    partial = GGUFModel.open(sparse)
    for name in index.tensor_names_for_span(span):
        np.testing.assert_array_equal(partial.dequantize(name), model.dequantize(name))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match=r"does not exist"):
        GGUFModel.open(tmp_path / "absent.gguf")


def test_directory_is_not_a_model(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match=r"not a regular file"):
        GGUFModel.open(tmp_path)


def test_not_gguf(tmp_path: Path) -> None:
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04 this is a zip, not a model" * 10)
    with pytest.raises(ModelFileError, match=r"not a GGUF file: it starts with b'PK\\x03\\x04'"):
        GGUFModel.open(bad)
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(ModelFileError, match=r"not a GGUF file: it is shorter than the 4-byte magic"):
        GGUFModel.open(empty)


def test_truncated_header(model: GGUFModel, tmp_path: Path) -> None:
    cut = tmp_path / "cut.gguf"
    with model.path.open("rb") as fh:
        cut.write_bytes(fh.read(100_000))
    with pytest.raises(ModelFileError, match=r"truncated: its header ends at byte 100000"):
        GGUFModel.open(cut)


def test_truncated_data(model: GGUFModel, tmp_path: Path) -> None:
    cut = tmp_path / "cut.gguf"
    with model.path.open("rb") as fh:
        cut.write_bytes(fh.read(model.index.data_start + 4096))
    with pytest.raises(ModelFileError, match=r"truncated: .* tensors end at byte 98362432"):
        GGUFModel.open(cut)


def test_unsupported_architecture(tmp_path: Path) -> None:
    path = _write_gguf(tmp_path / "mamba.gguf", "mamba",
                       {"token_embd.weight": (np.zeros((32, 64), np.float32), None)})
    model = GGUFModel.open(path, check=False)  # the index reads fine; the config is what shoal cannot run
    expected = r"architecture 'mamba' is not supported; shoal runs: llama"
    with pytest.raises(UnsupportedModelError, match=expected):
        _ = model.config
    with pytest.raises(UnsupportedModelError, match=rf"^{re.escape(str(path))}: {expected}"):
        GGUFModel.open(path)  # checked: refused at once, naming the file


def test_unsupported_tensor_type(tmp_path: Path) -> None:
    raw = np.zeros((4, 66), np.uint8)  # IQ2_XXS: 256 weights in 66 bytes
    tensors: Tensors = {"blk.0.attn_q.weight": (raw, gguf.GGMLQuantizationType.IQ2_XXS)}
    path = _write_gguf(tmp_path / "iq.gguf", "llama", tensors)
    expected = r"'blk.0.attn_q.weight' has type IQ2_XXS, which shoal cannot read; supported: .*Q4_1"
    with pytest.raises(UnsupportedModelError, match=expected):
        GGUFModel.open(path)


def test_small_synthetic_file_roundtrip(tmp_path: Path) -> None:
    weights = np.arange(32 * 64, dtype=np.float32).reshape(32, 64) / 100
    path = _write_gguf(tmp_path / "tiny.gguf", "llama", {
        "token_embd.weight": (weights, None),
        "blk.0.attn_norm.weight": (np.ones(64, np.float32), None),
    })
    model = GGUFModel.open(path, check=False)  # not a whole model: the reader alone is under test
    assert model.config.num_layers == 1 and model.config.vocab_size == 32
    assert model.tensor_info("token_embd.weight").shape == (32, 64)
    np.testing.assert_array_equal(model.dequantize("token_embd.weight"), weights)
    with pytest.raises(ModelFileError, match=r"lacks tensor 'output_norm.weight', needed for layers 0:1"):
        model.tensor_names_for_span(LayerSpan(0, 1))
