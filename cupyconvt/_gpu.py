"""GPU backend: conv_transpose3d on CuPy arrays, on the array's device and CuPy's current stream."""

from __future__ import annotations

from functools import cache
from typing import Any

from ._dtypes import dtype_name
from ._params import ConvParams
from ._select import DeviceInfo, select


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

    device_id = x.data.device_id
    if cupy.cuda.runtime.getDevice() != device_id:  # switch only when needed: it costs a few us
        with cupy.cuda.Device(device_id):
            return _run(cupy, x, w, bias, p, out, family, device_id)
    return _run(cupy, x, w, bias, p, out, family, device_id)


def _run(cupy: Any, x: Any, w: Any, bias: Any, p: ConvParams, out: Any, family, device_id) -> Any:
    if not x.flags.c_contiguous:
        x = cupy.ascontiguousarray(x)
    if not w.flags.c_contiguous:
        w = cupy.ascontiguousarray(w)
    if bias is not None and not bias.flags.c_contiguous:
        bias = cupy.ascontiguousarray(bias)
    if out is None:
        out = cupy.empty(p.out_shape, dtype=x.dtype)
    if out.size == 0:
        return out
    plan = select(p, dtype_name(x.dtype), device_info(device_id), family)
    plan.launch(x, w, bias, out)
    return out
