"""Kernel families: for each, the modules it compiles, its host-side tables and its launch.

A plan is built once per (problem, dtype, device) by :mod:`cupyconvt._select` and cached; its
tables go to the device on first launch and stay there. Launching allocates nothing but the
packed weights of the implicit GEMM.
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ._compile import KernelModule, get_function
from ._params import ConvParams

#: C++ storage type of each supported dtype (kernels/common.cuh).
CPP_TYPE = {
    "float16": "cct::half_t",
    "bfloat16": "cct::bf16_t",
    "float32": "float",
    "float64": "double",
}


def _acc_dtype(dtype: str) -> np.dtype:
    return np.dtype(np.float64 if dtype == "float64" else np.float32)


def _geom_args(p: ConvParams) -> np.ndarray:
    from ._gpu import geometry

    return geometry(p)


class _DeviceTable:
    """A host int32 table uploaded to the current device on first use (thread-safe)."""

    def __init__(self, host: np.ndarray) -> None:
        self.host = np.ascontiguousarray(host, dtype=np.int32)
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
                    arr = cupy.asarray(self.host)
                    self._dev[dev] = arr
        return arr


# --------------------------------------------------------------------------------------------
# direct: one thread per output element, any problem (the fallback and the reference kernel).

#: Threads per block, and resident blocks per SM the grid-stride loop is sized for.
DIRECT_THREADS = 256
DIRECT_BLOCKS_PER_SM = 8


def direct_module(dtype: str) -> KernelModule:
    return KernelModule("direct.cu", (f"conv_transpose3d_direct<{CPP_TYPE[dtype]}>",))


@dataclass(frozen=True)
class DirectPlan:
    p: ConvParams
    dtype: str
    grid: tuple[int, int, int]
    block: tuple[int, int, int] = (DIRECT_THREADS, 1, 1)
    family: str = "direct"

    @classmethod
    def build(cls, p: ConvParams, dtype: str, sm_count: int) -> DirectPlan:
        total = p.N * p.C_out * p.out_size[0] * p.out_size[1] * p.out_size[2]
        blocks = max(1, min(-(-total // DIRECT_THREADS), sm_count * DIRECT_BLOCKS_PER_SM))
        return cls(p, dtype, (blocks, 1, 1))

    def kernels(self) -> list[tuple[KernelModule, str]]:
        m = direct_module(self.dtype)
        return [(m, m.name_expressions[0])]

    def launch(self, x: Any, w: Any, bias: Any, out: Any) -> None:
        ((module, name),) = self.kernels()
        get_function(module, name)(self.grid, self.block, (x, w, bias, out, _geom_args(self.p)))


# --------------------------------------------------------------------------------------------
# grouped: phase-major gather for few channels per group (kernels/grouped.cu).

#: Output channels per thread that grouped.cu is instantiated for.
GROUPED_COT = (1, 2, 4, 8)
GROUPED_THREADS = 256
#: Phase-grid voxels per thread (kernels/grouped.cu: cct::GROUPED_VQ): independent loads in flight.
GROUPED_VQ = 4
#: Shared memory a block may use without opting in to more.
GROUPED_MAX_SMEM = 48 * 1024


def grouped_module(dtype: str) -> KernelModule:
    t = CPP_TYPE[dtype]
    return KernelModule(
        "grouped.cu", tuple(f"grouped_conv_transpose3d<{t}, {c}>" for c in GROUPED_COT)
    )


@dataclass(frozen=True)
class GroupedPlan:
    p: ConvParams
    dtype: str
    cot: int
    max_taps: int
    grid: tuple[int, int, int]
    shared_mem: int
    table: _DeviceTable = field(compare=False, repr=False)
    block: tuple[int, int, int] = (GROUPED_THREADS, 1, 1)
    family: str = "grouped"

    @staticmethod
    def pick_cot(p: ConvParams) -> int:
        return next((c for c in GROUPED_COT if c >= p.C_out_g), GROUPED_COT[-1])

    @staticmethod
    def _shape(p: ConvParams, dtype: str) -> tuple[np.ndarray, int, int, int]:
        """Phase table, its max taps, the block's shared memory, the largest (rd, rh) grid."""
        table, max_taps = phase_table(p)
        sw = p.stride[2]
        row_len = PHASE_HDR + 4 * max_taps
        smem = (sw * max_taps * p.C_in_g * GroupedPlan.pick_cot(p) * _acc_dtype(dtype).itemsize
                + sw * row_len * 4)  # fmt: skip
        hdr = table[:, :PHASE_HDR].reshape(-1, sw, PHASE_HDR)
        m_max = int((hdr[:, :, 3] * hdr[:, :, 4] * hdr[:, :, 5].max(axis=1, keepdims=True)).max())
        return table, max_taps, smem, m_max

    @staticmethod
    def eligible(p: ConvParams, dtype: str) -> bool:
        _, _, smem, m_max = GroupedPlan._shape(p, dtype)
        return smem <= GROUPED_MAX_SMEM and p.stride[0] * p.stride[1] <= 65535 and m_max < 2**31

    @classmethod
    def build(cls, p: ConvParams, dtype: str) -> GroupedPlan:
        cot = cls.pick_cot(p)
        table, max_taps, smem, m_max = cls._shape(p, dtype)
        planes = p.N * p.groups * -(-p.C_out_g // cot)
        per_block = GROUPED_THREADS * GROUPED_VQ
        grid = (max(1, -(-m_max // per_block)), min(planes, 65535), p.stride[0] * p.stride[1])
        return cls(p, dtype, cot, max_taps, grid, smem, _DeviceTable(table))

    def kernels(self) -> list[tuple[KernelModule, str]]:
        m = grouped_module(self.dtype)
        return [(m, m.name_expressions[GROUPED_COT.index(self.cot)])]

    def launch(self, x: Any, w: Any, bias: Any, out: Any) -> None:
        ((module, name),) = self.kernels()
        args = (x, w, bias, out, self.table.get(), _geom_args(self.p), np.int32(self.max_taps))
        get_function(module, name)(self.grid, self.block, args, shared_mem=self.shared_mem)


# --------------------------------------------------------------------------------------------
# igemm: implicit GEMM per stride phase for wide channel counts (kernels/igemm.cu).


@dataclass(frozen=True)
class GemmTile:
    """Block tile BM x BN (voxels x channels), K chunk BK, per-thread register tile TM x TN."""

    BM: int
    BN: int
    BK: int
    TM: int
    TN: int

    def threads(self) -> int:
        return (self.BM // self.TM) * (self.BN // self.TN)

    def template(self, dtype: str) -> str:
        return (
            f"igemm_conv_transpose3d<{CPP_TYPE[dtype]}, {self.BM}, {self.BN}, {self.BK}, "
            f"{self.TM}, {self.TN}>"
        )


# One tile per output-channel width, so few channels are wasted on padding; 8x8 or 8x12 register
# tiles keep four to six FMAs per shared-memory read. float64 halves TM to stay within registers.
FLOAT_TILES = (
    GemmTile(128, 64, 8, 8, 8),
    GemmTile(128, 48, 8, 8, 12),
    GemmTile(256, 32, 8, 8, 8),
    GemmTile(256, 24, 8, 8, 12),
    GemmTile(256, 16, 8, 8, 8),
)
DOUBLE_TILES = (
    GemmTile(64, 64, 8, 4, 8),
    GemmTile(128, 32, 8, 4, 8),
    GemmTile(128, 16, 8, 4, 8),
)
PHASE_HDR = 8  # ints of per-phase header in the table (kernels/igemm.cu: cct::PHASE_HDR)
PACK_THREADS = 256


def igemm_tiles(dtype: str) -> tuple[GemmTile, ...]:
    return DOUBLE_TILES if dtype == "float64" else FLOAT_TILES


def igemm_module(dtype: str) -> KernelModule:
    names = (f"igemm_pack_weights<{CPP_TYPE[dtype]}>",) + tuple(
        t.template(dtype) for t in igemm_tiles(dtype)
    )
    return KernelModule("igemm.cu", names)


def pick_tile(p: ConvParams, dtype: str) -> GemmTile:
    """The tile wasting the fewest channel slots on C_out_g, the wider one on a tie."""
    return min(igemm_tiles(dtype), key=lambda t: (-(-p.C_out_g // t.BN) * t.BN, -t.BN))


def phase_table(p: ConvParams) -> tuple[np.ndarray, int]:
    """Per stride phase: header (o0_d, o0_h, o0_w, Q_D, Q_H, Q_W, taps, 0) and its taps
    (off_d, off_h, off_w, w_tap); taps that can only read outside the input are dropped."""
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


@dataclass(frozen=True)
class IgemmPlan:
    p: ConvParams
    dtype: str
    tile: GemmTile
    phases: int
    max_taps: int
    ci_pad: int
    co_pad: int
    grid: tuple[int, int, int]
    pack_grid: tuple[int, int, int]
    table: _DeviceTable = field(compare=False, repr=False)
    family: str = "igemm"

    @staticmethod
    def eligible(p: ConvParams, dtype: str) -> bool:
        phases = p.stride[0] * p.stride[1] * p.stride[2]
        return p.groups * phases <= 65535 and -(-p.C_out_g // 16) <= 65535

    @classmethod
    def build(cls, p: ConvParams, dtype: str, sm_count: int) -> IgemmPlan:
        tile = pick_tile(p, dtype)
        table, max_taps = phase_table(p)
        phases = table.shape[0]
        ci_pad = -(-p.C_in_g // tile.BK) * tile.BK
        co_pad = -(-p.C_out_g // tile.BN) * tile.BN
        m_max = max(p.N * int(h[3]) * int(h[4]) * int(h[5]) for h in table[:, :PHASE_HDR])
        grid = (max(1, -(-m_max // tile.BM)), co_pad // tile.BN, p.groups * phases)
        packed = p.groups * phases * max_taps * ci_pad * co_pad
        pack_grid = (max(1, min(-(-packed // PACK_THREADS), sm_count * 8)), 1, 1)
        return cls(p, dtype, tile, phases, max_taps, ci_pad, co_pad, grid, pack_grid,
                   _DeviceTable(table))  # fmt: skip

    def kernels(self) -> list[tuple[KernelModule, str]]:
        m = igemm_module(self.dtype)
        return [(m, m.name_expressions[0]), (m, self.tile.template(self.dtype))]

    def launch(self, x: Any, w: Any, bias: Any, out: Any) -> None:
        import cupy

        (module, pack_name), (_, gemm_name) = self.kernels()
        table = self.table.get()
        geom = _geom_args(self.p)
        shape = self.p.groups * self.phases * self.max_taps * self.ci_pad * self.co_pad
        wp = cupy.empty(shape, dtype=_acc_dtype(self.dtype))
        extents = (np.int32(self.phases), np.int32(self.max_taps), np.int32(self.ci_pad),
                   np.int32(self.co_pad))  # fmt: skip
        get_function(module, pack_name)(
            self.pack_grid, (PACK_THREADS, 1, 1), (w, wp, table, geom, *extents)
        )
        get_function(module, gemm_name)(
            self.grid, (self.tile.threads(), 1, 1), (x, wp, bias, out, table, geom, *extents)
        )
