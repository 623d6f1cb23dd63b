"""Relax passes for modules whose ops are all generated, scheduled kernels (``call_tir``).

``deploy_pipeline`` is TVM 0.27's default build pipeline without ``RewriteDataflowReshape``: that
pass inspects every called PrimFunc for a reshape pattern and requires a root block, which our
hand-scheduled kernels (plain loops, ``tirx.is_scheduled``) do not have; none of them is a reshape.
For GPU targets, ops that Relax legalises itself (a flatten's reshape) get dlight's fallback GPU
schedule; our kernels, marked scheduled, are left as they are.
"""
from __future__ import annotations

import tvm
from tvm.relax import backend, transform


def deploy_pipeline(gpu: bool = False) -> tvm.transform.Pass:
    """Lower a Relax module of ``call_tir`` kernels to VM code, planning memory statically.

    ``gpu``: schedule legalised ops with thread bindings (needs the target in scope).
    """
    from tvm.s_tir import dlight

    return tvm.transform.Sequential([
        backend.DispatchSampling(),
        backend.DispatchSortScan(),
        transform.LegalizeOps(),
        *([dlight.ApplyDefaultSchedule(dlight.gpu.Fallback())] if gpu else []),
        transform.ToNonDataflow(),
        transform.RemovePurityChecking(),
        transform.CallTIRRewrite(),
        transform.StaticPlanBlockMemory(),
        transform.LowerAllocTensor(),
        transform.KillAfterLastUse(),
        transform.LowerRuntimeBuiltin(),
        transform.ComputePrimValue(),
        transform.VMShapeLower(),
        transform.AttachGlobalSymbol(),
    ], name="clicktrain_deploy_pipeline")
