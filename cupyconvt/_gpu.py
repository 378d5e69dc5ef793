"""GPU backend: conv_transpose3d on CuPy arrays, on the array's device and CuPy's current stream."""

from __future__ import annotations

import math
from functools import cache
from typing import Any

from ._dtypes import dtype_name
from ._layout import from_logical_shape
from ._params import ConvParams
from ._select import DeviceInfo, select
from ._tc import transpose


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
    x: Any,
    w: Any,
    bias: Any,
    p: ConvParams,
    out: Any = None,
    family: str | None = None,
    precision: str = "highest",
    layout: str = "NCDHW",
) -> Any:
    """Compute ``conv_transpose3d`` for validated CuPy inputs on ``x``'s device.

    ``x`` and ``out`` are in ``layout`` ("NCDHW", or channels-last "NDHWC"); ``p`` describes the
    problem in NCDHW terms. ``precision`` is the float32 policy (already validated).
    ``family`` forces a kernel family (see ``cupyconvt._select``); by default the selector picks.
    """
    import cupy

    device_id = x.data.device_id
    if cupy.cuda.runtime.getDevice() != device_id:  # switch only when needed: it costs a few us
        with cupy.cuda.Device(device_id):
            return _run(cupy, x, w, bias, p, out, family, device_id, precision, layout)
    return _run(cupy, x, w, bias, p, out, family, device_id, precision, layout)


def _run(
    cupy: Any,
    x: Any,
    w: Any,
    bias: Any,
    p: ConvParams,
    out: Any,
    family: str | None,
    device_id: int,
    precision: str,
    layout: str,
) -> Any:
    if not x.flags.c_contiguous:
        x = cupy.ascontiguousarray(x)
    if not w.flags.c_contiguous:
        w = cupy.ascontiguousarray(w)
    if bias is not None and not bias.flags.c_contiguous:
        bias = cupy.ascontiguousarray(bias)
    channels_last = layout == "NDHWC"
    if out is None:
        shape = from_logical_shape(p.out_shape, layout)
        try:
            out = cupy.empty(shape, dtype=x.dtype)
        except MemoryError as e:  # CuPy's OutOfMemoryError is one
            nbytes = x.dtype.itemsize * math.prod(shape)
            what = f"the result, {shape} {dtype_name(x.dtype)} ({nbytes:,} bytes),"
            _add_note(e, f"cupyconvt.conv_transpose3d: {what} does not fit in GPU {device_id}")
            raise
    if out.size == 0:
        return out
    plan = select(p, dtype_name(x.dtype), device_info(device_id), family, precision)
    try:
        if plan.family == "tc":
            plan.launch(x, w, bias, out, channels_last)
        elif not channels_last:
            plan.launch(x, w, bias, out)
        else:  # the CUDA-core families read and write NCDHW: transpose around them
            spatial = p.in_size[0] * p.in_size[1] * p.in_size[2]
            out_spatial = p.out_size[0] * p.out_size[1] * p.out_size[2]
            # Both workspaces before any launch: an allocation that fails leaves nothing queued.
            x_ncdhw = cupy.empty(p.x_shape5, dtype=x.dtype)
            out_ncdhw = cupy.empty(p.out_shape5, dtype=x.dtype)
            transpose(x, x_ncdhw, p.N, spatial, p.C_in)
            plan.launch(x_ncdhw, w, bias, out_ncdhw)
            transpose(out_ncdhw, out, p.N, p.C_out, out_spatial)
    except MemoryError as e:
        what = f"a workspace of the {plan.family!r} kernels"
        if channels_last and plan.family != "tc":
            what += " (or the NCDHW copies of x and of the result)"
        _add_note(e, f"cupyconvt.conv_transpose3d: {what} does not fit in GPU {device_id} "
                     "beside the arguments and the result")  # fmt: skip
        raise
    return out


def _add_note(e: BaseException, note: str) -> None:
    """Say which buffer did not fit (Python 3.11+; on 3.10 the allocator's message stands alone).

    The exception keeps its type (CuPy's OutOfMemoryError, a MemoryError), so callers that catch
    the allocator's error still do.
    """
    if hasattr(e, "add_note"):
        e.add_note(note)
