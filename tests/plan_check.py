"""One forced 16-bit tensor-core plan (kernels/wgmma.cu, kernels/patch.cu) against the float64
oracle: what tests/test_wgmma_gpu.py and tests/test_patch_gpu.py both check."""

from __future__ import annotations

from typing import Any

import numpy as np
from oracle import TOL, conv_transpose3d_oracle, rel_err


def check_16bit_plan(cupy: Any, plan: Any, x, w, b, kw: dict, dtype: str, layout: str,
                     what: str) -> None:  # fmt: skip
    """Round the float64 ``x``, ``w``, ``b`` (``b`` may be None) to ``dtype``, run ``plan`` on
    them in ``layout`` into an output poisoned with NaN, and assert that every element was
    written and that the result is within TOL[dtype] of the oracle on the rounded inputs."""
    if dtype == "bfloat16":
        import ml_dtypes

        cast = ml_dtypes.bfloat16
    else:
        cast = np.float16
    xq, wq = x.astype(cast), w.astype(cast)
    bq = None if b is None else b.astype(cast)
    ref = conv_transpose3d_oracle(
        xq.astype(np.float64), wq.astype(np.float64),
        None if bq is None else bq.astype(np.float64), **kw,
    )  # fmt: skip
    view = cupy.float16 if dtype == "float16" else cupy.uint16

    def dev(a):
        return None if a is None else cupy.asarray(a.view(np.uint16)).view(view)

    xd, wd, bd = dev(xq), dev(wq), dev(bq)
    shape = plan.p.out_shape5
    if layout == "NDHWC":
        xd = cupy.ascontiguousarray(cupy.moveaxis(xd, 1, -1))
        shape = (shape[0], *shape[2:], shape[1])
    out = cupy.full(shape, 0x7FFF, cupy.uint16).view(view)  # NaN in float16 and in bfloat16
    plan.launch(xd, wd, bd, out, layout == "NDHWC")
    got = cupy.asnumpy(out.view(cupy.uint16)).view(cast).astype(np.float64)
    if layout == "NDHWC":
        got = np.moveaxis(got, -1, 1)
    assert not np.isnan(got).any(), f"{np.isnan(got).sum()} elements unwritten"
    assert rel_err(got, ref) <= TOL[dtype], (what, rel_err(got, ref))
