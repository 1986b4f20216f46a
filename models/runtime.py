"""`CompiledStage`: a shard compiled by TVM Relax (models/compile.py) running one layer range.

A drop-in for `models.reference.ReferenceStage` (see the data contract in models/stage.py). Each prefill chunk
and each decode step is one Relax VM call for the whole shard; the KV cache is TVM's paged cache, created once
and driven with the `vm.builtin.kv_state_*` builtins. A gemma3 shard on the CPU has two: its sliding-window
layers' own, bounded to the window (models/sliding_cache.py), beside the full one; both see every sequence
and every step.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from shoal.models import tvm_runtime
from shoal.models.compile import CompiledShard, Progress, compile_shard, model_fingerprint
from shoal.models.config import ModelConfig
from shoal.models.errors import ContextOverflowError
from shoal.models.gguf import GGUFModel
from shoal.models.memory import CPU_PREFILL_CHUNK, release_freed_heap
from shoal.models.shard_weights import load_shard_weights
from shoal.models.sliding_cache import separate_sliding_cache, sliding_cache_keeps, sliding_cache_tokens
from shoal.models.span import LayerSpan
from shoal.models.stage import StageDefaults, ids_in_range
from shoal.models.targets import TargetSpec, detect_target, host_cores

logger = logging.getLogger(__name__)

PAGE_SIZE = 16
"""TVM's CPU attention kernels hard-code 16-token pages (FACTS.md)."""
DEFAULT_MAX_BATCH = 8
DEFAULT_MAX_TOTAL_TOKENS = 2048
"""KV-cache tokens over all sequences. The pages become resident as they fill (quantized CPU builds keep
fp16: 2·layers·kv_heads·head_dim·2 bytes a token, ~23 KB for SmolLM2 over 30 layers, ~47 MB at 2048; `f32`
builds and CUDA fp32, twice that), so this bounds memory; pass `max_total_tokens` for longer conversations or
more concurrent sequences (a node passes `[models] cache_tokens`)."""
DEFAULT_PREFILL_CHUNK = 512
"""Tokens per prefill VM call on CUDA (longer prompts are split); the CPU's is `CPU_PREFILL_CHUNK`
(models/memory.py)."""
DEFAULT_QUANTIZATION = "auto"
"""Chosen per file (models.weights.choose_quantization): q4_1 for the embedded SmolLM2, native otherwise."""
"""What `CompiledStage.load` builds unless told otherwise."""


THREAD_POOL_SPIN_COUNT = 1000
"""`sched_yield()`s a TVM pool worker spins through before it sleeps. TVM's default (300000) kept a worker
busy ~160 ms after every decode step here: an idle node (a split stage waiting for its peers) took a core
from the one computing. 1000 is ~0.5 ms: enough to bridge the gaps between kernels and decode steps."""


def default_prefill_chunk(target: str | TargetSpec | None) -> int:
    """The prefill chunk `CompiledStage` uses on `target` unless told: CUDA's for `cuda`, the CPU's otherwise
    (`auto` too: the host-memory estimate is what a chunk's size matters for)."""
    kind = target.kind if isinstance(target, TargetSpec) else target
    return DEFAULT_PREFILL_CHUNK if kind == "cuda" else CPU_PREFILL_CHUNK


def configure_threads() -> None:
    """TVM's pool: one thread per usable core, spinning only briefly when idle; keep OpenBLAS (NumPy) from
    spinning beside it. Must run before the first TVM kernel launch (env vars set later are ignored)."""
    os.environ.setdefault("TVM_NUM_THREADS", str(host_cores()))
    os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", str(THREAD_POOL_SPIN_COUNT))
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def _broken_message(seq_id: int) -> str:
    return f"sequence {seq_id}'s KV cache is unusable after a failed step; remove the sequence"


class CompiledStage(StageDefaults):
    """Layers `span` of a model, run by a compiled TVM library. Blocking methods; not thread-safe for
    concurrent calls (an internal lock serialises them)."""

    kv_page_size = PAGE_SIZE
    """Each sequence holds whole KV pages: the engine's admission reserves in these units."""

    def __init__(
        self,
        config: ModelConfig,
        shard: CompiledShard,
        params: list[Any],
        *,
        max_batch_size: int = DEFAULT_MAX_BATCH,
        max_total_tokens: int = DEFAULT_MAX_TOTAL_TOKENS,
        prefill_chunk: int | None = None,
    ) -> None:
        if prefill_chunk is None:
            prefill_chunk = default_prefill_chunk(shard.target)
        if max_batch_size < 1 or max_total_tokens < PAGE_SIZE or prefill_chunk < 1:
            raise ValueError("max_batch_size, max_total_tokens and prefill_chunk must be positive "
                             f"(max_total_tokens at least {PAGE_SIZE})")
        self.config = config
        self.span = shard.span
        self.shard = shard
        self.target = shard.target
        self.max_batch_size = max_batch_size
        self.max_total_tokens = min(max_total_tokens, config.context_length * max_batch_size)
        if config.sliding_window and any(config.is_sliding(i) for i in range(shard.span.start,
                                                                          shard.span.stop)):
            # TVM's prefill attends within a chunk without the window, and a query that sees no cached key
            # inside its window makes NaNs: chunks shorter than the window avoid both (measured, gemma3).
            prefill_chunk = min(prefill_chunk, max(1, config.sliding_window - 1))
        self.prefill_chunk = prefill_chunk
        self._is_first = self.span.is_first()
        self._is_last = self.span.is_last(config.num_layers)
        self._device = tvm_runtime.device(shard.target.kind)
        self._lock = threading.Lock()
        ShapeTuple = self._shape_tuple = tvm_runtime.shape
        self._vm = tvm_runtime.load_vm(shard.library, self._device)
        self._params = params
        self._prefill = self._vm["prefill"]
        self._decode = self._vm["decode"]  # batch 1, static shapes
        self._batch_decode = self._vm["batch_decode"]
        self._kv = self._vm["create_paged_kv_cache"](
            ShapeTuple([max_batch_size]), ShapeTuple([self.max_total_tokens]),
            ShapeTuple([prefill_chunk]), ShapeTuple([PAGE_SIZE]), ShapeTuple([0]),
        )
        get = tvm_runtime.get_global_func
        self._sliding_kv: Any = None
        """The sliding-window layers' own cache (models/sliding_cache.py), or None."""
        self._sliding_keeps = sliding_cache_keeps(config)
        if separate_sliding_cache(config, shard.span, shard.target.kind):
            self._sliding_kv = self._vm["create_sliding_kv_cache"](
                ShapeTuple([max_batch_size]), ShapeTuple([self._sliding_cache_tokens()]),
                ShapeTuple([prefill_chunk]), ShapeTuple([PAGE_SIZE]), ShapeTuple([1]),
            )
            self._enable_window = get("vm.builtin.attention_kv_cache_enable_sliding_window_for_seq")
        self._add_seq = get("vm.builtin.kv_state_add_sequence")
        self._remove_seq = get("vm.builtin.kv_state_remove_sequence")
        self._begin = get("vm.builtin.kv_state_begin_forward")
        self._end = get("vm.builtin.kv_state_end_forward")
        self._clear_pool = get("vm.builtin.memory_manager.clear")
        self._pool_chunk = 0
        """The prefill length whose workspace the VM's pooled allocator holds (see `_prefill_workspace`)."""
        self._lengths: dict[int, int] = {}
        self._broken: set[int] = set()
        """Sequences a failed forward left unusable (see `_forward`); only `remove_sequence` clears them."""
        self._closed = False
        # Per-call costs outside the kernels, measured with the caches cold after a step's weights went
        # through them: tvm.runtime.tensor ~120 µs, Tensor.numpy() ~90 µs, a ShapeTuple ~28 µs. On the CPU,
        # arrays cross as DLPack views instead (~10 µs each) and decode's shape tuples are made once.
        self._host = tvm_runtime.is_host(self._device)
        self._one = ShapeTuple([1])
        self._seq_shapes: dict[int, Any] = {}
        self._decode_inputs: dict[tuple[int, ...], tuple[Any, np.ndarray]] = {}

    def sliding_cache_tokens(self) -> int:
        """KV positions the sliding-window layers' cache can hold over all sequences (0 without one)."""
        return self._sliding_cache_tokens() if self._sliding_kv is not None else 0

    def _sliding_cache_tokens(self) -> int:
        return sliding_cache_tokens(self._sliding_keeps, self.prefill_chunk, self.max_batch_size,
                                    self.max_total_tokens, PAGE_SIZE)

    @classmethod
    def load(
        cls,
        gguf_model: GGUFModel,
        span: LayerSpan,
        *,
        target: str | TargetSpec | None = None,
        cache_dir: str | Path | None = None,
        progress: Progress | None = None,
        quantization: str = DEFAULT_QUANTIZATION,
        load: Callable[[str], np.ndarray] | None = None,
        **options: Any,
    ) -> CompiledStage:
        """Compile (or find cached) the shard for `span` of `gguf_model` (a `models.gguf.GGUFModel`) and load
        its weights. `load(name)` overrides how GGUF tensors are dequantized (tests share a cache); `options`
        go to the constructor (max_batch_size, max_total_tokens, prefill_chunk)."""
        from shoal.models.block_types import TensorTypes
        from shoal.models.compile_worker import (
            resolve_in_subprocess,
            runtime_only_loaded,
            runtime_only_wanted,
            use_runtime_only,
        )
        from shoal.models.weights import AUTO, QUANTIZATIONS, choose_quantization

        if quantization == AUTO:
            quantization = choose_quantization(TensorTypes.from_gguf(gguf_model).kinds)
        if quantization not in QUANTIZATIONS:
            raise ValueError(f"unknown quantization {quantization!r}; "
                             f"choose one of {', '.join(QUANTIZATIONS)}")
        configure_threads()
        config = gguf_model.config
        span.check(config.num_layers)
        cache = Path(cache_dir) if cache_dir is not None else None
        in_child = runtime_only_wanted() or runtime_only_loaded()
        if not isinstance(target, TargetSpec) and in_child:
            # Compile (or find the library) in a child process; this one loads only TVM's runtime (also on
            # a second load, e.g. after an unload: a runtime-only process can never compile).
            use_runtime_only()
            shard = resolve_in_subprocess(gguf_model.path, span, quantization, target, cache, progress)
            spec = shard.target
        else:
            spec = detect_target(target)
            from shoal.models.block_types import NATIVE, TensorTypes

            types = TensorTypes.from_gguf(gguf_model) if quantization == NATIVE else None
            shard = compile_shard(config, span, spec, quantization=quantization,
                                  fingerprint=model_fingerprint(gguf_model), cache=cache, progress=progress,
                                  tensor_types=types)
        params = load_shard_weights(gguf_model, shard, tvm_runtime.device(spec.kind), load)
        release_freed_heap()  # the packing's NumPy temporaries (~20 MB for a 0.5B model)
        return cls(config, shard, params, **options)

    # -- sequences -----------------------------------------------------------------------------------------

    @property
    def target_kind(self) -> str | None:  # type: ignore[override]
        """The TVM target kind (`llvm`, `cuda`) this stage runs on."""
        return self.target.kind

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this CompiledStage is closed")

    def add_sequence(self, seq_id: int) -> None:
        with self._lock:
            self._check_open()
            if not isinstance(seq_id, int | np.integer) or seq_id < 0:
                raise ValueError(f"sequence ids are non-negative ints, got {seq_id!r}")
            seq_id = int(seq_id)
            if seq_id in self._lengths:
                raise ValueError(f"sequence {seq_id} exists already")
            self._add_seq(self._kv, seq_id)
            if self._sliding_kv is not None:
                self._add_seq(self._sliding_kv, seq_id)
                self._enable_window(self._sliding_kv, seq_id, self._sliding_keeps, 0)
            self._lengths[seq_id] = 0
            self._seq_shapes[seq_id] = self._shape_tuple([seq_id])

    def remove_sequence(self, seq_id: int) -> None:
        with self._lock:
            self._broken.discard(seq_id)
            if self._closed or seq_id not in self._lengths:
                return
            self._remove_seq(self._kv, seq_id)
            if self._sliding_kv is not None:
                self._remove_seq(self._sliding_kv, seq_id)
            del self._lengths[seq_id]
            del self._seq_shapes[seq_id]

    def sequence_length(self, seq_id: int) -> int:
        if seq_id in self._broken:
            raise ValueError(_broken_message(seq_id))
        try:
            return self._lengths[seq_id]
        except KeyError:
            raise ValueError(f"unknown sequence {seq_id}; call add_sequence first") from None

    def _reserve(self, seq_ids: list[int], counts: list[int]) -> None:
        for seq_id, n in zip(seq_ids, counts, strict=True):
            if seq_id not in self._lengths:
                raise ValueError(f"unknown sequence {seq_id}; call add_sequence first")
            if seq_id in self._broken:
                raise ValueError(_broken_message(seq_id))
            if self._lengths[seq_id] + n > self.config.context_length:
                raise ContextOverflowError(
                    f"sequence {seq_id} would hold {self._lengths[seq_id] + n} tokens; the model's context "
                    f"is {self.config.context_length}"
                )
        grown = dict(self._lengths)
        for seq_id, n in zip(seq_ids, counts, strict=True):
            grown[seq_id] += n
        pages = sum(-(-length // PAGE_SIZE) for length in grown.values())
        if pages * PAGE_SIZE > self.max_total_tokens:  # checked in pages: TVM's own check would crash later
            raise ContextOverflowError(
                f"the KV cache holds at most {self.max_total_tokens} tokens over all sequences, in pages of "
                f"{PAGE_SIZE}; remove finished sequences or load the stage with a larger max_total_tokens"
            )

    # -- inputs --------------------------------------------------------------------------------------------

    def _check_inputs(self, inputs: np.ndarray, rows: int | None, what: str) -> np.ndarray:
        inputs = np.asarray(inputs)
        if self._is_first:
            if inputs.ndim != 1 or inputs.dtype.kind not in "iu":
                raise ValueError(f"{what}: the first stage takes a 1-D array of token ids, got "
                                 f"{inputs.dtype}{list(inputs.shape)}")
            if not ids_in_range(inputs, self.config.vocab_size):
                raise ValueError(f"{what}: token ids must lie in [0, {self.config.vocab_size})")
            inputs = inputs.astype(np.int32, copy=False)
        else:
            if inputs.ndim != 2 or inputs.shape[1] != self.config.hidden_size:
                raise ValueError(f"{what}: stage {self.span} takes hidden states "
                                 f"[n, {self.config.hidden_size}], got {list(inputs.shape)}")
            inputs = inputs.astype(np.float32, copy=False)
        if rows is not None and inputs.shape[0] != rows:
            raise ValueError(f"{what}: {inputs.shape[0]} input rows for {rows} sequences")
        return np.ascontiguousarray(inputs)

    # -- forward -------------------------------------------------------------------------------------------

    def prefill(self, seq_id: int, inputs: np.ndarray) -> np.ndarray:
        inputs = self._check_inputs(inputs, None, "prefill")
        n = inputs.shape[0]
        if n == 0:
            raise ValueError("prefill needs at least one token")
        with self._lock:
            self._check_open()
            self._reserve([seq_id], [n])
            outputs = []
            for start in range(0, n, self.prefill_chunk):
                chunk = inputs[start:start + self.prefill_chunk]
                m = chunk.shape[0]
                x = chunk.reshape(1, m) if self._is_first else chunk.reshape(1, m, -1)
                self._prefill_workspace(m)
                out = self._forward([seq_id], self._shape_tuple([seq_id]), self._shape_tuple([m]),
                                    self._prefill, tvm_runtime.tensor(x, self._device))
                self._lengths[seq_id] += m
                if not self._is_last or start + m >= n:
                    outputs.append(self._numpy(out))
        if self._is_last:
            return outputs[-1].reshape(self.config.vocab_size)
        return np.concatenate(outputs, axis=1).reshape(n, self.config.hidden_size)

    def decode(self, seq_ids: list[int], inputs: np.ndarray) -> np.ndarray:
        seq_ids = list(seq_ids)
        if not seq_ids:
            raise ValueError("decode needs at least one sequence")
        if len(set(seq_ids)) != len(seq_ids):
            raise ValueError(f"decode got a sequence id twice: {seq_ids}")
        if len(seq_ids) > self.max_batch_size:
            raise ValueError(f"decode batch of {len(seq_ids)} exceeds max_batch_size {self.max_batch_size}")
        inputs = self._check_inputs(inputs, len(seq_ids), "decode")
        b = len(seq_ids)
        with self._lock:
            self._check_open()
            self._reserve(seq_ids, [1] * b)
            x = inputs.reshape(b, 1) if self._is_first else inputs.reshape(b, 1, -1)
            if b == 1:
                out = self._forward(seq_ids, self._seq_shapes[seq_ids[0]], self._one, self._decode,
                                    self._decode_input(x))
            else:
                out = self._forward(seq_ids, self._shape_tuple(seq_ids), self._shape_tuple([1] * b),
                                    self._batch_decode, self._decode_input(x))
            for seq_id in seq_ids:
                self._lengths[seq_id] += 1
            result = self._numpy(out)
        width = self.config.vocab_size if self._is_last else self.config.hidden_size
        return result.reshape(b, width)

    def _forward(self, seq_ids: list[int], ids: Any, lengths: Any, run: Any, x: Any) -> Any:
        """One VM call between `begin_forward` and `end_forward` (lock held). A failure past `begin_forward`
        marks the call's sequences broken: TVM has grown them already (a "KV cache is full" left each one
        token longer), and `kv_state_popn` does not restore them (probed: logits off by up to 22 after it)."""
        try:
            self._begin(self._kv, ids, lengths)
            try:
                if self._sliding_kv is None:
                    return run(x, self._kv, self._params)
                self._begin(self._sliding_kv, ids, lengths)
                try:
                    return run(x, self._kv, self._sliding_kv, self._params)
                finally:
                    self._end(self._sliding_kv)
            finally:
                self._end(self._kv)
        except BaseException:
            self._broken.update(seq_ids)
            raise

    def set_instrument(self, instrument: Callable[..., int] | None) -> None:
        """Call `instrument(func, name, before_run, ret, *args)` around each VM call (None: stop), as
        `tvm.runtime.vm.VirtualMachine.set_instrument` does (bench/decode.py `--profile`)."""
        self._vm["set_instrument"](instrument)

    def _prefill_workspace(self, length: int) -> None:
        """Before a prefill chunk of `length` tokens (lock held): if the last chunk had another length, hand
        the VM's pooled buffers back to the system. TVM's pooled allocator keeps every freed buffer for reuse
        at exactly its size, and a prefill's activations are sized by its length, so each distinct chunk
        length kept its own full workspace (~50 MB for a 512-token chunk of Qwen2.5-0.5B): a 4k fill after
        a few chat prompts held four of them (measured, docs/models.md "Peak RSS"). Cleared, at most one
        prefill workspace is resident; decode's small static buffers are re-made on the next step. The pool is
        TVM's global one (shared by every stage in the process); only buffers not in use are freed."""
        if length != self._pool_chunk:
            self._pool_chunk = length
            self._clear_pool()
            release_freed_heap()

    def _decode_input(self, x: np.ndarray) -> Any:
        """A tensor holding `x` for one decode call (lock held). On the CPU: a tensor kept per shape (one per
        batch size), filled through a NumPy view of its memory."""
        if not self._host:
            return tvm_runtime.tensor(x, self._device)
        kept = self._decode_inputs.get(x.shape)
        if kept is None:
            tensor = tvm_runtime.empty(x.shape, str(x.dtype), self._device)
            kept = self._decode_inputs[x.shape] = (tensor, np.from_dlpack(tensor))
        kept[1][...] = x
        return kept[0]

    def _numpy(self, tensor: Any) -> np.ndarray:
        """A call's output as a NumPy array: on the CPU a view that keeps the tensor (its memory) alive."""
        return np.from_dlpack(tensor) if self._host else tensor.numpy()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._lengths.clear()
            self._broken.clear()
            self._seq_shapes.clear()
            self._decode_inputs.clear()
            self._params = []
            self._kv = self._sliding_kv = None
            self._prefill = self._decode = self._batch_decode = None
            self._vm = None
            self._clear_pool()  # the pooled workspaces outlive the VM otherwise
            release_freed_heap()

    def __repr__(self) -> str:
        return (f"CompiledStage(layers {self.span}, {self.shard.quantization}, {self.target.kind}, "
                f"{len(self._lengths)} sequences)")
