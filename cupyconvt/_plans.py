"""What every kernel family's plan shares: storage types, device-resident tables, the problem
geometry, the stride-phase table, and the direct (fallback) family.

A plan is built once per (problem, dtype, device) by :mod:`cupyconvt._select` and cached; its
tables go to the device on first launch and stay there, so a launch passes only pointers and a
few ints (CuPy converts a NumPy struct argument slowly: about 50 us a call).
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import numpy as np

from ._compile import KernelModule, get_launcher
from ._launch import ptr
from ._params import ConvParams

#: C++ storage type of each supported dtype (kernels/common.cuh).
CPP_TYPE = {
    "float16": "cct::half_t",
    "bfloat16": "cct::bf16_t",
    "float32": "float",
    "float64": "double",
}

#: Host image of kernels/common.cuh's ``cct::ConvGeom`` (all int64, in field order).
GEOM_FIELDS = (
    "N C_in C_out groups C_in_g C_out_g D H W kD kH kW sD sH sW pD pH pW dD dH dW oD oH oW has_bias"
).split()

#: ints of per-phase header in the phase table (kernels/igemm.cu: cct::PHASE_HDR)
PHASE_HDR = 8


def acc_dtype(dtype: str) -> np.dtype:
    """The accumulator (and packed-weight) dtype of the GPU kernels for ``dtype``."""
    return np.dtype(np.float64 if dtype == "float64" else np.float32)


class DeviceArray:
    """A host array uploaded to each device on first use there (thread-safe), then reused.

    The copies live as long as the process, so they come from CuPy's default memory pool even
    when a call has another allocator active: during a call on torch tensors that is torch's
    (``_interop.torch_malloc``), whose blocks may belong to a CUDA graph's private pool, which
    must own no allocation that outlives the graph's outputs.
    """

    def __init__(self, host: np.ndarray) -> None:
        self.host = np.ascontiguousarray(host)
        self.host.flags.writeable = False
        self._dev: dict[int, Any] = {}
        self._lock = threading.Lock()

    def get(self) -> Any:
        import cupy

        dev = cupy.cuda.runtime.getDevice()
        arr = self._dev.get(dev)
        if arr is None:
            with self._lock:
                arr = self._dev.get(dev)
                if arr is None:
                    with cupy.cuda.using_allocator(cupy.get_default_memory_pool().malloc):
                        arr = cupy.asarray(self.host)
                    # The copy is queued on this thread's current stream, but the table is
                    # shared: another thread may launch with it at once on another stream,
                    # which nothing orders after the copy. Finish it first (once per table and
                    # device). Inside a CUDA graph capture a wait is not allowed; the copy is
                    # then captured, and ordered before the capture's own launches.
                    stream = cupy.cuda.get_current_stream()
                    if not stream.is_capturing():
                        stream.synchronize()
                    self._dev[dev] = arr
        return arr


def on_device(cache: dict[int, Any], make: Callable[[], Any]) -> Any:
    """``make()`` for the current device, computed once per device and kept in ``cache``: what a
    launch needs (function, device tables) costs one dict lookup after the first call."""
    import cupy

    dev = cupy.cuda.runtime.getDevice()
    value = cache.get(dev)
    if value is None:
        value = cache.setdefault(dev, make())
    return value


def geometry(p: ConvParams) -> DeviceArray:
    """The kernels' ``const cct::ConvGeom*`` argument: the problem as 25 int64 on the device."""
    values = (
        p.N, p.C_in, p.C_out, p.groups, p.C_in_g, p.C_out_g,
        *p.in_size, *p.kernel, *p.stride, *p.padding, *p.dilation, *p.out_size,
        int(p.has_bias),
    )  # fmt: skip
    assert len(values) == len(GEOM_FIELDS)
    return DeviceArray(np.array(values, dtype=np.int64))


def phase_axes(p: ConvParams) -> list[list[tuple[int, int, list[tuple[int, int]]]]]:
    """Per axis and residue r < stride: (o0, Q, taps), taps = [(k, off)].

    The outputs of residue r are o = o0 + q*s for q < Q, and tap k reads input i = q + off.
    Taps that can only read outside the input are dropped.
    """
    axes = []
    for a in range(3):
        s, pad, dil = p.stride[a], p.padding[a], p.dilation[a]
        n_in, n_out, k = p.in_size[a], p.out_size[a], p.kernel[a]
        per_res = []
        for r in range(s):
            o0 = (r - pad) % s
            q = max(0, -(-(n_out - o0) // s))
            taps = [(kk, (o0 + pad - kk * dil) // s) for kk in range(k) if (kk * dil) % s == r]
            taps = [(kk, off) for kk, off in taps if q > 0 and off < n_in and off + q - 1 >= 0]
            per_res.append((o0, q, taps))
        axes.append(per_res)
    return axes


def phase_table(p: ConvParams) -> tuple[np.ndarray, int]:
    """Per stride phase: header (o0_d, o0_h, o0_w, Q_D, Q_H, Q_W, taps, 0) and its taps
    (off_d, off_h, off_w, w_tap); taps that can only read outside the input are dropped."""
    axes = phase_axes(p)
    phases = []
    for rd, rh, rw in itertools.product(*(range(s) for s in p.stride)):
        (od, qd, td), (oh, qh, th), (ow, qw, tw) = axes[0][rd], axes[1][rh], axes[2][rw]
        taps = [
            (fd, fh, fw, (kd * p.kernel[1] + kh) * p.kernel[2] + kw)
            for (kd, fd), (kh, fh), (kw, fw) in itertools.product(td, th, tw)
        ]
        phases.append(((od, oh, ow, qd, qh, qw, len(taps), 0), taps))
    max_taps = max(1, max(len(t) for _, t in phases))
    table = np.zeros((len(phases), PHASE_HDR + 4 * max_taps), np.int32)
    for i, (hdr, taps) in enumerate(phases):
        table[i, :PHASE_HDR] = hdr
        if taps:
            table[i, PHASE_HDR : PHASE_HDR + 4 * len(taps)] = np.array(taps).ravel()
    return table, max_taps


# --------------------------------------------------------------------------------------------
# direct: one thread per output element, any problem (the fallback and the reference kernel).

#: Threads per block, and resident blocks per SM the grid-stride loop is sized for.
DIRECT_THREADS = 256
DIRECT_BLOCKS_PER_SM = 8


@cache
def direct_module(dtype: str) -> KernelModule:
    return KernelModule("direct.cu", (f"conv_transpose3d_direct<{CPP_TYPE[dtype]}>",))


@dataclass(frozen=True)
class DirectPlan:
    p: ConvParams
    dtype: str
    grid: tuple[int, int, int]
    geom: DeviceArray = field(compare=False, repr=False)
    block: tuple[int, int, int] = (DIRECT_THREADS, 1, 1)
    family: str = "direct"
    _per_device: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def build(cls, p: ConvParams, dtype: str, sm_count: int) -> DirectPlan:
        total = p.N * p.C_out * p.out_size[0] * p.out_size[1] * p.out_size[2]
        blocks = max(1, min(-(-total // DIRECT_THREADS), sm_count * DIRECT_BLOCKS_PER_SM))
        return cls(p, dtype, (blocks, 1, 1), geometry(p))

    def kernels(self) -> list[tuple[KernelModule, str]]:
        m = direct_module(self.dtype)
        return [(m, m.name_expressions[0])]

    def launch(self, x: Any, w: Any, bias: Any, out: Any) -> None:
        def make() -> tuple:
            ((module, name),) = self.kernels()
            return get_launcher(module, name), ptr(self.geom.get())

        fn, geom = on_device(self._per_device, make)
        fn(self.grid, self.block, (x.data.ptr, w.data.ptr, ptr(bias), out.data.ptr, geom))
