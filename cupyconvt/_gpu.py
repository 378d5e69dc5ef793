"""GPU backend: conv_transpose3d on CuPy arrays, on the array's device and CuPy's current stream."""

from __future__ import annotations

from functools import cache, lru_cache
from typing import Any

import numpy as np

from ._dtypes import dtype_name
from ._params import ConvParams
from ._select import DeviceInfo, select

#: Host image of kernels/common.cuh's ``cct::ConvGeom`` (all int64, in field order).
GEOM_FIELDS = (
    "N C_in C_out groups C_in_g C_out_g D H W kD kH kW sD sH sW pD pH pW dD dH dW oD oH oW has_bias"
).split()
GEOM_DTYPE = np.dtype([(f, np.int64) for f in GEOM_FIELDS])


@lru_cache(maxsize=1024)
def geometry(p: ConvParams) -> np.ndarray:
    """The kernel's ``ConvGeom`` argument: a one-element structured array passed by value."""
    values = (
        p.N, p.C_in, p.C_out, p.groups, p.C_in_g, p.C_out_g,
        *p.in_size, *p.kernel, *p.stride, *p.padding, *p.dilation, *p.out_size,
        int(p.has_bias),
    )  # fmt: skip
    geom = np.array([values], dtype=GEOM_DTYPE)
    geom.flags.writeable = False
    return geom


@cache
def device_info(device_id: int) -> DeviceInfo:
    import cupy

    props = cupy.cuda.runtime.getDeviceProperties(device_id)
    name = props["name"]
    return DeviceInfo(
        id=device_id,
        name=name.decode() if isinstance(name, bytes) else str(name),
        compute_capability=props["major"] * 10 + props["minor"],
        sm_count=props["multiProcessorCount"],
        max_shared_per_block_optin=props.get("sharedMemPerBlockOptin", props["sharedMemPerBlock"]),
    )


def conv_transpose3d(
    x: Any, w: Any, bias: Any, p: ConvParams, out: Any = None, family: str | None = None
) -> Any:
    """Compute ``conv_transpose3d`` for validated CuPy inputs on ``x``'s device.

    ``family`` forces a kernel family (see ``cupyconvt._select``); by default the selector picks.
    """
    import cupy

    with x.device:
        x = cupy.ascontiguousarray(x)
        w = cupy.ascontiguousarray(w)
        if bias is not None:
            bias = cupy.ascontiguousarray(bias)
        if out is None:
            out = cupy.empty(p.out_shape, dtype=x.dtype)
        if out.size == 0:
            return out
        plan = select(p, dtype_name(x.dtype), device_info(x.device.id), family)
        plan.launch(x, w, bias, out)
    return out
