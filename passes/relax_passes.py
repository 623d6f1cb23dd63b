"""Relax passes for modules whose ops are all generated, scheduled kernels (``call_tir``).

``deploy_pipeline`` is TVM 0.27's default build pipeline without ``RewriteDataflowReshape``: that
pass inspects every called PrimFunc for a reshape pattern and requires a root block, which our
hand-scheduled kernels (plain loops, ``tirx.is_scheduled``) do not have; none of them is a reshape.
"""
from __future__ import annotations

import tvm
from tvm.relax import backend, transform


def deploy_pipeline() -> tvm.transform.Pass:
    """Lower a Relax module of ``call_tir`` kernels to VM code, planning memory statically."""
    return tvm.transform.Sequential([
        backend.DispatchSampling(),
        backend.DispatchSortScan(),
        transform.LegalizeOps(),
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
