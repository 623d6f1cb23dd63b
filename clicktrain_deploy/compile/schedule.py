"""Schedules for the ops we do not generate, so nothing runs unscheduled.

After ``LegalizeOps`` and ``FuseOps``/``FuseTIR``, every PrimFunc that is not one of our kernels
gets the first of the target's rules that applies: TVM's dlight rules (CPU: GEMV, Reduction; GPU:
Matmul, GEMV, Reduction, GeneralReduction, Fallback), then, on CPUs, ``CpuParallel``: spatial
producers inlined into their consumer, the leading spatial loops fused and run in parallel (the
innermost loop is left to LLVM's vectoriser). ``schedule_rest`` records which rule each function
got, for the manifest; a function with real work that no rule takes stops the build.
"""
from __future__ import annotations

import tvm
from tvm import s_tir, tirx
from tvm.s_tir import dlight
from tvm.s_tir.dlight.base import ScheduleRule

from .errors import CompileError

PARALLEL_FROM = 4096  # iterations below which a thread-pool launch costs more than it saves


class CpuParallel(ScheduleRule):
    """Inline spatial producers, then run each remaining block's leading spatial loops in parallel."""

    def apply(self, func: tirx.PrimFunc, target: tvm.target.Target, _tunable: bool) -> s_tir.Schedule | None:
        if not isinstance(func, tirx.PrimFunc):
            return None
        sch = s_tir.Schedule(func)
        infos = dlight.normalize_prim_func(sch)
        if infos is None:
            return None
        for info in _inline_producers(sch, infos):
            kinds = info.dom_kind()
            leading = len(kinds) - len(kinds.lstrip("S"))
            loops = sch.get_loops(info.block_rv)[:leading]
            if not loops:
                continue
            fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
            extent = 1
            for iter_info in info.iters:
                extent *= int(iter_info.dom) if isinstance(iter_info.dom, tirx.IntImm) else 1 << 20
            if extent >= PARALLEL_FROM:
                sch.parallel(fused)
        return sch


def _inline_producers(sch: s_tir.Schedule, infos: list) -> list:
    """Inline injective producers into their consumers; the blocks that remain.

    Only ``compute_inline``: dlight's ``try_inline`` also reverse-inlines a consumer into its
    producer, and for a matmul whose reduction has extent 1 (a 1-feature Gemm) that puts the bias
    add into the reduction's init and its update, adding the bias twice (found by
    tests/test_compile_property.py)."""
    remaining = []
    for info in infos[:-1]:
        try:
            if not info.is_injective():
                raise ValueError("not injective")
            sch.compute_inline(info.block_rv)
        except (RuntimeError, ValueError):  # s_tir.ScheduleError is a RuntimeError
            remaining.append(info)
    return [*remaining, infos[-1]] if infos else remaining


def _rules(device: str) -> list[tuple[str, ScheduleRule]]:
    if device == "cuda":
        return [("dlight.gpu.Matmul", dlight.gpu.Matmul()), ("dlight.gpu.GEMV", dlight.gpu.GEMV()),
                ("dlight.gpu.Reduction", dlight.gpu.Reduction()),
                ("dlight.gpu.GeneralReduction", dlight.gpu.GeneralReduction()),
                ("dlight.gpu.Fallback", dlight.gpu.Fallback())]
    return [("dlight.cpu.GEMV", dlight.cpu.GEMV()), ("dlight.cpu.Reduction", dlight.cpu.Reduction()),
            ("CpuParallel", CpuParallel())]


def _is_scheduled(func) -> bool:
    return func.attrs is not None and "tirx.is_scheduled" in func.attrs and bool(func.attrs["tirx.is_scheduled"])


def schedule_rest(module: tvm.IRModule, target: tvm.target.Target, device: str) -> tuple[tvm.IRModule, dict[str, str]]:
    """Schedule every PrimFunc that is not scheduled yet; returns the module and {function: rule}."""
    rules, chosen, updated = _rules(device), {}, {}
    with target:
        for gvar, func in module.functions_items():
            if not isinstance(func, tirx.PrimFunc) or _is_scheduled(func):
                continue
            for name, rule in rules:
                try:
                    space = rule.apply(func, target, False)
                except (RuntimeError, ValueError, AssertionError, IndexError):  # ScheduleError, rule asserts
                    space = None  # a rule that does not fit this function
                if space is None:
                    continue
                schedule = space[0] if isinstance(space, list) else space
                updated[gvar] = schedule.mod["main"].with_attr("tirx.is_scheduled", True)
                chosen[gvar.name_hint] = name
                break
            else:
                raise CompileError(f"op {gvar.name_hint!r}: no schedule rule applies (would run unscheduled)")
    for gvar, func in updated.items():
        module[gvar] = func
    return module, chosen


def fuse_and_schedule(target: tvm.target.Target, device: str, record: dict) -> tvm.transform.Pass:
    """Legalise the ops that are not ours, fuse them, and schedule every one (``record`` gets
    {function: rule}). Our kernels are opaque (``op_pattern`` 8): nothing fuses into them."""
    from tvm.relax import backend, transform

    @tvm.transform.module_pass(opt_level=0, name="ScheduleRest")
    def schedule(module: tvm.IRModule, _ctx) -> tvm.IRModule:
        module, chosen = schedule_rest(module, target, device)
        record.update(chosen)
        return module

    return tvm.transform.Sequential([
        backend.DispatchSampling(), backend.DispatchSortScan(),
        transform.LegalizeOps(), transform.AnnotateTIROpPattern(), transform.FoldConstant(),
        transform.FuseOps(), transform.FuseTIR(), schedule,
    ], name="clicktrain_fuse_and_schedule")


def finalize_pipeline() -> tvm.transform.Pass:
    """TVM's default finalisation (memory planned statically) without ``RewriteDataflowReshape``,
    which wants every called PrimFunc to have a root block and our generated kernels have none."""
    from tvm.relax import transform

    return tvm.transform.Sequential([
        transform.ToNonDataflow(), transform.RemovePurityChecking(), transform.CallTIRRewrite(),
        transform.StaticPlanBlockMemory(), transform.LowerAllocTensor(), transform.KillAfterLastUse(),
        transform.LowerRuntimeBuiltin(), transform.ComputePrimValue(), transform.VMShapeLower(),
        transform.AttachGlobalSymbol(),
    ], name="clicktrain_finalize")
