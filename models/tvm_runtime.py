"""The few pieces of TVM's runtime a CPU serving process uses, without `import tvm`.

`import tvm` runs `tvm/__init__`, which imports the ir, script, tirx, te and target packages even when only
libtvm_runtime is loaded (`TVM_USE_RUNTIME_LIB=1`): ~37 MiB resident of Python modules a stage that runs a
compiled library never calls (docs/models.md "Where shoal's memory goes"). A compiled shard needs only
libtvm_runtime's global functions (the Relax VM, the KV-cache builtins, tensor allocation) and the FFI
(`tvm_ffi`: functions, modules, shapes, devices, tensors), so on the CPU `CompiledStage` and the weight loader
go through this module: it loads libtvm_runtime itself (as `tvm.base` does: RTLD_GLOBAL, so the compiled
library links against it) and calls the runtime by global-function name, as `tvm.runtime.vm.VirtualMachine`
does. CUDA keeps `import tvm` (its device API lives in libtvm_runtime_cuda, loaded by the tvm package).

Works the same whether or not the full TVM is imported too (tests compile in-process): the objects are
tvm_ffi's either way, and loading libtvm_runtime a second time returns the same library.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

KDL_CPU = 1
POOLED_ALLOCATOR = 2
"""`tvm.runtime.vm.VirtualMachine.POOLED_ALLOCATOR`: the VM's default allocator."""


@functools.cache
def ffi() -> Any:
    """`tvm_ffi` with libtvm_runtime loaded into the process (once)."""
    tvm_ffi = _import_tvm_ffi()

    if tvm_ffi.get_global_func("vm.builtin.alloc_storage", allow_missing=True) is None:
        spec = importlib.util.find_spec("tvm")
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError("TVM is not installed: shoal's compiled runtime needs the apache-tvm package")
        library = Path(next(iter(spec.submodule_search_locations))) / "lib" / "libtvm_runtime.so"
        ctypes.CDLL(os.fspath(library), mode=ctypes.RTLD_GLOBAL)
    return tvm_ffi


def _import_tvm_ffi() -> Any:
    """`import tvm_ffi`, in a process that has not imported it yet without its optional `ml_dtypes` (NumPy
    dtypes for bfloat16/float8, which a CPU stage's tensors never use): that extension's import took
    1.0–1.4 s and 7 MiB (ml_dtypes 0.7, this 2-core VM under load) of every serving process's start. Later
    imports of ml_dtypes (the full TVM's, when a process also compiles) load it as usual."""
    if "tvm_ffi" in sys.modules or "ml_dtypes" in sys.modules:
        import tvm_ffi

        return tvm_ffi
    sys.modules["ml_dtypes"] = None  # type: ignore[assignment]  # an ImportError for tvm_ffi's optional import
    try:
        import tvm_ffi
    finally:
        del sys.modules["ml_dtypes"]
    return tvm_ffi


def device(kind: str) -> Any:
    """Device 0 of a target kind: `llvm` the CPU (tvm_ffi only), `cuda` the GPU (through the tvm package)."""
    if kind == "cuda":
        import tvm

        return tvm.cuda(0)
    return ffi().device("cpu", 0)


def is_host(dev: Any) -> bool:
    return int(dev.dlpack_device_type()) == KDL_CPU


def get_global_func(name: str) -> Any:
    return ffi().get_global_func(name)


def shape(dims: list[int]) -> Any:
    """A `ShapeTuple` (`tvm_ffi.Shape`)."""
    return ffi().Shape([int(d) for d in dims])


@functools.cache
def _tensor_alloc() -> Any:
    return get_global_func("runtime.TVMTensorAllocWithScope")


def empty(dims: tuple[int, ...], dtype: str, dev: Any) -> Any:
    """An uninitialised tensor on `dev` (`tvm.runtime.empty`)."""
    return _tensor_alloc()(shape(list(dims)), ffi().dtype(dtype), dev, None)


def tensor(array: np.ndarray, dev: Any) -> Any:
    """A copy of `array` on `dev` (`tvm.runtime.tensor`): on the CPU written through a NumPy view of the new
    tensor's memory; elsewhere by the tvm package's copy."""
    if not is_host(dev):
        import tvm

        return tvm.runtime.tensor(array, dev)
    out = empty(array.shape, str(array.dtype), dev)
    np.from_dlpack(out)[...] = array
    return out


def load_vm(library: str | Path, dev: Any) -> Any:
    """The Relax VM of a compiled library, initialised for `dev` (and the CPU, which runs shape functions)
    with the pooled allocator, as `tvm.runtime.vm.VirtualMachine(load_module(library), dev)` makes it.
    Index it by function name (`vm["prefill"]`); `vm["set_instrument"](f)` instruments its calls."""
    vm = ffi().load_module(os.fspath(library))["vm_load_executable"]()
    args = [int(dev.dlpack_device_type()), int(dev.index), POOLED_ALLOCATOR]
    if not is_host(dev):
        args += [KDL_CPU, 0, POOLED_ALLOCATOR]
    vm["vm_initialization"](*args)
    return vm
