"""CPU schedules for a shard's fused PrimFuncs (llvm targets), applied between fusion and lowering.

The cpu_generic pipeline leaves every fused op as a naive serial loop nest. This pass gives each one a
simple, generic schedule with `tvm.s_tir.Schedule`:
- injective producers (casts, splits, reshapes) are inlined into their consumers;
- matmuls whose weight is stored [in, out] (models/llama.py `F32Linear`) get the output axis split into
  vector-width tiles that sit innermost under the reduction (vectorized FMAs, accumulators in registers),
  with the outer tiles parallel over the cores;
- every other block runs its leading spatial loops in parallel.
Functions that existed before legalization (TVM's hand-written KV-cache and attention kernels, and any
kernels from models/kernels) are left as they are.
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)

VECTOR_TILE = 64
"""Output columns per matmul tile (4 AVX-512 registers of fp32)."""
ROW_TILE = 4
"""Matmul rows sharing one pass over a weight tile (prefill)."""


def _static(extent: Any) -> int | None:
    value = getattr(extent, "value", None)
    return int(value) if value is not None else None


def _iter_kinds(sch: Any, block: Any) -> list[int]:
    return [int(iv.iter_type) for iv in sch.get(block).iter_vars]


def _is_reduction(sch: Any, block: Any) -> bool:
    return any(k != 0 for k in _iter_kinds(sch, block))


def _inline_injective(sch: Any, root: Any) -> None:
    changed = True
    while changed:
        changed = False
        blocks = sch.get_child_blocks(root)
        for block in blocks[:-1] if len(blocks) > 1 else []:
            if _is_reduction(sch, block):
                continue
            try:
                sch.compute_inline(block)
                changed = True
                break
            except Exception:  # not inlinable (e.g. feeds a reduction's init); keep it
                continue


def _schedule_matmul(sch: Any, block: Any) -> bool:
    """[..., n] += x[..., k] * w[k, n]: tile n by VECTOR_TILE innermost under k; rows tiled by ROW_TILE."""
    kinds = _iter_kinds(sch, block)
    loops = sch.get_loops(block)
    if len(loops) != len(kinds) or kinds[-1] != 2 or kinds.count(2) != 1 or kinds[-2] != 0:
        return False
    n_extent = _static(sch.get(loops[-2]).extent)
    if n_extent is None or n_extent % VECTOR_TILE:
        return False
    *rows, n, k = loops
    no, ni = sch.split(n, [None, VECTOR_TILE])
    row = sch.fuse(*rows) if len(rows) > 1 else rows[0]
    rows_static = _static(sch.get(row).extent)
    if rows_static == 1:
        sch.reorder(row, no, k, ni)
        outer = sch.fuse(row, no)
        sch.parallel(outer)
        sch.vectorize(ni)
        sch.decompose_reduction(block, k)
        return True
    ro, ri = sch.split(row, [None, ROW_TILE])
    sch.reorder(ro, no, k, ri, ni)
    outer = sch.fuse(ro, no)
    sch.parallel(outer)
    sch.vectorize(ni)
    sch.decompose_reduction(block, k)
    return True


PARALLEL_MIN_ELEMENTS = 16384
"""Below this many iterations a parallel launch (waking the thread pool) costs more than it saves."""


def _worth_parallel(extent: Any) -> bool:
    """Static extents: big enough. Symbolic ones: only when they scale with the prompt (`seq_len`), not with
    the decode batch (a handful of rows)."""
    static = _static(extent)
    if static is not None:
        return static >= PARALLEL_MIN_ELEMENTS
    from tvm import tirx

    names = {v.name for v in tirx.analysis.undefined_vars(extent)} if hasattr(tirx, "analysis") else set()
    return "seq_len" in names


def _parallel_outer(sch: Any, block: Any) -> None:
    kinds = _iter_kinds(sch, block)
    loops = sch.get_loops(block)
    spatial = []
    for loop, kind in zip(loops, kinds, strict=False):
        if kind != 0:
            break
        spatial.append(loop)
    if not spatial:
        return
    fused = sch.fuse(*spatial) if len(spatial) > 1 else spatial[0]
    total = sch.get(fused).extent
    for loop, kind in zip(loops, kinds, strict=False):  # a reduction's work counts too
        if kind != 0:
            total = total * sch.get(loop).extent
    if _worth_parallel(total):
        sch.parallel(fused)


def schedule_function(func: Any) -> Any:
    """A scheduled copy of one fused PrimFunc (the input is returned unchanged if scheduling fails)."""
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    root = sch.get_sblock("root")
    _inline_injective(sch, root)
    for block in sch.get_child_blocks(root):
        if not (_is_reduction(sch, block) and _schedule_matmul(sch, block)):
            _parallel_outer(sch, block)
    return sch.mod["main"]


def cpu_schedule_pass(skip: frozenset[str]) -> Any:
    """A module pass scheduling every PrimFunc whose name is not in `skip`."""
    import tvm

    @tvm.transform.module_pass(opt_level=0, name="ShoalCPUSchedule")
    def apply(mod: Any, _ctx: Any) -> Any:
        updates = {}
        for gv, func in mod.functions.items():
            if not isinstance(func, tvm.tirx.PrimFunc) or gv.name_hint in skip:
                continue
            try:
                updates[gv] = schedule_function(func)
            except Exception as exc:
                logger.debug("left %s unscheduled: %s", gv.name_hint, exc)
                updates.pop(gv, None)
        for gv, func in updates.items():
            mod[gv] = func
        return mod

    return apply


def primfunc_names(mod: Any) -> frozenset[str]:
    import tvm

    return frozenset(gv.name_hint for gv, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc))


OPAQUE_PATTERN = 8
"""relax's OpPatternKind.kOpaque: FuseOps never fuses such a call with its neighbours."""


def mark_hand_written_pass(gpu: bool) -> Any:
    """Mark hand-written PrimFuncs (not in sblock form: models/kernels, TVM's KV-cache kernels) opaque, so
    FuseOps leaves them alone (fusing a reshape into one breaks FuseTIR on static shapes), and on GPUs
    `tirx.is_scheduled`, so dlight's rules skip them (they reject such functions). Functions from te and
    legalization stay for the schedules: on a GPU an unscheduled one would run on the host against device
    memory."""
    import tvm
    from tvm import s_tir

    @tvm.transform.module_pass(opt_level=0, name="ShoalMarkHandWritten")
    def apply(mod: Any, _ctx: Any) -> Any:
        for gv, func in list(mod.functions.items()):
            if isinstance(func, tvm.tirx.PrimFunc) and not isinstance(func.body, s_tir.SBlockRealize):
                func = func.with_attr("op_pattern", OPAQUE_PATTERN)
                mod[gv] = func.with_attr("tirx.is_scheduled", True) if gpu else func
        return mod

    return apply
