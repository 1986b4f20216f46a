"""Detect the local compile target: CUDA when a device is present, else LLVM for the host CPU.

TVM 0.27 takes targets as dicts (`{"kind": "llvm", "mcpu": ..., "num-cores": N}`); the old `"llvm -mcpu=..."`
strings are rejected. `TargetSpec.key` is a stable string for compile-cache keys.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

TARGET_CHOICES = ("auto", "llvm", "cuda")


def host_cores() -> int:
    """CPU cores this process may use (its affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class TargetSpec:
    """One compile target: its kind (`llvm` or `cuda`) and the TVM target dict."""

    kind: str
    attrs: dict[str, Any] = field(default_factory=dict)
    """The TVM target dict, e.g. {"kind": "llvm", "mcpu": "znver4", "num-cores": 2}."""

    def __post_init__(self) -> None:
        if self.kind not in ("llvm", "cuda"):
            raise ValueError(f"unknown target kind {self.kind!r}; shoal builds for llvm or cuda")

    @property
    def key(self) -> str:
        """Stable text naming the target (sorted JSON of the dict): part of the compile-cache key."""
        return json.dumps(self.attrs, sort_keys=True, separators=(",", ":"))

    def tvm_target(self) -> Any:
        import tvm

        if self.kind == "cuda":
            # Host code is a little glue: build it for the baseline CPU so a library built on one machine
            # runs on any x86-64 host with the same GPU.
            return tvm.target.Target(self.attrs, host={"kind": "llvm"})
        return tvm.target.Target(self.attrs)

    def device(self) -> Any:
        import tvm

        return tvm.cuda(0) if self.kind == "cuda" else tvm.cpu(0)

    def __str__(self) -> str:
        return f"{self.kind}:{self.key}"


def llvm_target(cores: int | None = None) -> TargetSpec:
    """LLVM for this host's CPU (LLVM's name for it, e.g. `znver4`) using `cores` threads."""
    from tvm.target import codegen

    try:
        mcpu = codegen.llvm_get_system_cpu()
    except AttributeError:  # TVM_USE_RUNTIME_LIB=1: no LLVM in this process (see models/compile_worker.py)
        raise RuntimeError("this process loaded TVM's runtime only; detect or compile llvm targets in a "
                           "process with the full TVM (models.compile_worker does)") from None
    return TargetSpec("llvm", {"kind": "llvm", "mcpu": mcpu, "num-cores": cores or host_cores()})


def cuda_available() -> bool:
    import tvm

    try:
        return bool(tvm.cuda(0).exist)
    except Exception:  # a wheel without the CUDA runtime, or a broken driver
        return False


def cuda_target() -> TargetSpec:
    """CUDA for device 0, with its compute capability (`arch`) when the device is present."""
    import tvm

    attrs: dict[str, Any] = {"kind": "cuda"}
    if cuda_available():
        major, minor = tvm.cuda(0).compute_version.split(".")
        attrs["arch"] = f"sm_{major}{minor}"
        attrs["max_threads_per_block"] = int(tvm.cuda(0).max_threads_per_block)
        attrs["max_shared_memory_per_block"] = int(tvm.cuda(0).max_shared_memory_per_block)
    return TargetSpec("cuda", attrs)


def detect_target(choice: str | TargetSpec | None = "auto") -> TargetSpec:
    """`auto` (CUDA when present, else the host CPU), `llvm`, `cuda`, or a `TargetSpec` passed through."""
    if isinstance(choice, TargetSpec):
        return choice
    choice = choice or "auto"
    if choice not in TARGET_CHOICES:
        raise ValueError(f"unknown target {choice!r}; choose one of {', '.join(TARGET_CHOICES)}")
    if choice == "cuda" or (choice == "auto" and cuda_available()):
        return cuda_target()
    return llvm_target()
