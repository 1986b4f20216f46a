"""The Relax compile pipeline for modules that call the hand-written kernels (see docs/kernels.md).

`RewriteDataflowReshape` turns legalized reshapes back into free views, but it asserts on every called
PrimFunc that is not in sblock form — which the hand-written kernels are not. `safe_rewrite_dataflow_reshape`
runs it with each such PrimFunc swapped for an empty sblock-form stub of the same signature (a stub is never
a reshape), then puts the real functions back. Dropping the pass instead also works, but then every reshape
in the model (two around each QuantizedLinear, the attention head splits, ...) becomes a copying kernel.
"""

from __future__ import annotations

import tvm
from tvm import relax, s_tir, tirx
from tvm.relax.backend.cpu_generic import pipeline as cpu_generic


def _is_sblock_form(func: tirx.PrimFunc) -> bool:
    return isinstance(func.body, s_tir.SBlockRealize)


def _stub(func: tirx.PrimFunc) -> tirx.PrimFunc:
    block = s_tir.SBlock([], [], [], "root", tirx.Evaluate(0))
    return func.with_body(s_tir.SBlockRealize([], True, block))


def safe_rewrite_dataflow_reshape() -> tvm.transform.Pass:
    """`relax.transform.RewriteDataflowReshape` that tolerates hand-written (non-sblock) PrimFuncs."""

    @tvm.transform.module_pass(opt_level=0, name="SafeRewriteDataflowReshape")
    def apply(mod: tvm.ir.IRModule, _ctx: tvm.transform.PassContext) -> tvm.ir.IRModule:
        saved = {gv: f for gv, f in mod.functions.items()
                 if isinstance(f, tirx.PrimFunc) and not _is_sblock_form(f)}
        for gv, func in saved.items():
            mod[gv] = _stub(func)
        mod = relax.transform.RewriteDataflowReshape()(mod)
        for gv, func in saved.items():
            if gv in mod.functions:  # still called somewhere
                mod[gv] = func
        return mod

    return apply


def with_safe_reshape_rewrite(passes: list[tvm.transform.Pass]) -> list[tvm.transform.Pass]:
    """`passes` with `RewriteDataflowReshape` replaced by `safe_rewrite_dataflow_reshape()`."""
    return [safe_rewrite_dataflow_reshape() if p.info.name == "RewriteDataflowReshape" else p for p in passes]


def kernel_pipeline(target: tvm.target.Target) -> tvm.transform.Pass:
    """cpu_generic's pipeline with the reshape rewrite made safe for the hand-written kernels."""

    @tvm.transform.module_pass(opt_level=0)
    def _pipeline(mod: tvm.ir.IRModule, _ctx: tvm.transform.PassContext) -> tvm.ir.IRModule:
        with target:
            return tvm.transform.Sequential(
                cpu_generic.library_dispatch_passes(target) + cpu_generic.legalize_passes(target)
                + with_safe_reshape_rewrite(cpu_generic.dataflow_lower_passes(target))
                + cpu_generic.finalize_passes(target))(mod)

    return _pipeline
