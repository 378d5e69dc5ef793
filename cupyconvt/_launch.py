"""Kernel launches straight through the driver's ``cuLaunchKernel``.

CuPy's ``RawKernel.__call__`` inspects the type of every argument and builds a parameter block
on each call. A :class:`Launcher` knows its kernel's parameter types from a signature string, so
a launch is one ``struct.pack_into`` of the values into a per-thread buffer, whose array of
parameter addresses was built once, and one ``cuLaunchKernel`` on CuPy's current stream. It is
not measurably faster: on the lent H100 the driver's own launch (5-7 us) is most of a launch's
host time, and an A/B of the same kernel both ways timed the same per call (2026-11-25). What it
gives is parameter types checked against the kernel sources, values range-checked, and raw
addresses as arguments (a pointer into a shared workspace, with no array view built for it).

Signature letters, one per kernel parameter in order: ``p`` a pointer (pass an int address,
:func:`ptr` of an array), ``i`` a 32-bit int, ``q`` a 64-bit int. ``struct`` rejects a value out
of its type's range rather than wrapping it. :data:`SIGNATURES` holds every kernel's; CI checks
it against the ``__global__`` declarations in ``kernels/`` (tests/test_launch.py).
"""

from __future__ import annotations

import ctypes
import struct
import threading
from typing import Any

#: struct code and size of each signature letter (native alignment, as the kernel's C ABI).
_CODES = {"p": "Q", "i": "i", "q": "q"}

#: Parameter types of every kernel, by its name without template arguments.
SIGNATURES = {
    "batched_transpose": "ppqqq",
    "bwd_bias_final": "ppi",
    "bwd_bias_partial": "pppq",
    "bwd_data_igemm": "pppppiiii",
    "bwd_data_narrow": "ppppi",
    "bwd_data_staged": "ppppiiiiii",
    "bwd_pack_weights": "pppiiii",
    "bwd_reduce_splits": "ppqi",
    "bwd_weight_igemm": "pppppi",
    "conv_transpose3d_direct": "ppppp",
    "dw2_conv_transpose3d": "pppppiii",
    "gather_slab": "ppqqqqqiii",
    "grouped_conv_transpose3d": "pppppp",
    "igemm_conv_transpose3d": "ppppppiiii",
    "igemm_fill_tapless": "pppp",
    "igemm_pack_weights": "ppppiiii",
    "tc_conv_transpose3d": "ppppppiiiip",
    "tc_prep": "ppppiiiiippqqqii",
    "wg_conv_transpose3d": "ppppppiiiip",
    "wg_patch_gemm": "pppppiiii",
}


def signature(name_expression: str) -> str:
    """The parameter types of the kernel ``name_expression`` names (``name<args>``)."""
    name = name_expression.split("<", 1)[0].strip()
    try:
        return SIGNATURES[name]
    except KeyError:
        msg = f"no launch signature for kernel {name!r} (cupyconvt._launch.SIGNATURES)"
        raise KeyError(msg) from None


def param_layout(signature: str) -> tuple[str, tuple[int, ...], int]:
    """The ``struct`` format, each parameter's byte offset in the packed buffer, and its size."""
    if not signature or any(c not in _CODES for c in signature):
        raise ValueError(f"kernel signature {signature!r}: use letters p, i, q")
    fmt = "@" + "".join(_CODES[c] for c in signature)
    offsets = []
    off = 0
    for c in signature:
        size = struct.calcsize(_CODES[c])
        off = -(-off // size) * size
        offsets.append(off)
        off += size
    assert off == struct.calcsize(fmt), (signature, off)
    return fmt, tuple(offsets), off


def ptr(a: Any) -> int:
    """The device address of a CuPy array (or memory pointer), 0 for None."""
    if a is None:
        return 0
    data = getattr(a, "data", a)
    return int(data.ptr)


#: CUresult of a driver call made with no current context.
_CUDA_ERROR_INVALID_CONTEXT = 201


class Launcher:
    """One kernel on the current device, launched with arguments packed by its signature."""

    __slots__ = ("fn", "ptr", "signature", "fmt", "offsets", "size", "_tls")

    def __init__(self, fn: Any, signature: str) -> None:
        self.fn = fn  # the cupy RawKernel: keeps the module (and so the CUfunction) loaded
        self.ptr = int(fn.kernel.ptr)
        self.signature = signature
        self.fmt, self.offsets, self.size = param_layout(signature)
        self._tls = threading.local()

    def _slot(self) -> tuple[Any, Any, int]:
        buf = ctypes.create_string_buffer(max(self.size, 8))
        base = ctypes.addressof(buf)
        params = (ctypes.c_void_p * len(self.offsets))(*(base + o for o in self.offsets))
        slot = (buf, params, ctypes.addressof(params))
        self._tls.slot = slot
        return slot

    def __call__(
        self,
        grid: tuple[int, int, int],
        block: tuple[int, int, int],
        args: tuple[Any, ...],
        shared_mem: int = 0,
    ) -> None:
        """Launch on CuPy's current stream. ``args`` are ints (addresses for ``p``); a wrong
        count or an out-of-range value raises ``struct.error`` before anything is launched."""
        from cupy.cuda import driver, get_current_stream

        try:
            buf, _, params = self._tls.slot
        except AttributeError:
            buf, _, params = self._slot()
        struct.pack_into(self.fmt, buf, 0, *args)
        # The driver copies the parameter values when the launch is queued, so the buffer can
        # be reused at once (per thread: another thread may be packing its own launch).
        launch = (self.ptr, grid[0], grid[1], grid[2], block[0], block[1], block[2], shared_mem,
                  get_current_stream().ptr, params, 0)  # fmt: skip
        try:
            driver.launchKernel(*launch)
        except driver.CUDADriverError as e:
            status = getattr(e, "status", None)
            if status != _CUDA_ERROR_INVALID_CONTEXT and "INVALID_CONTEXT" not in str(e):
                raise
            # A thread whose first CUDA work is this launch has no current context: CuPy's pool
            # hands out cached memory and cudaGetDevice binds none (a dask worker thread, H100,
            # 2026-12-07). cudaSetDevice makes the device's primary context current.
            from cupy.cuda import runtime

            runtime.setDevice(runtime.getDevice())
            driver.launchKernel(*launch)
