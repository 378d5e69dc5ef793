"""The depthwise family (kernels/depthwise.cu): a streaming kernel for the 2x upsampler, stride 2
on every axis, 2 to 4 taps an axis (the same on all three), dilation 1 and one input channel a
group (depthwise, with any channel multiplier).

Each output there reads at most two inputs an axis, so a thread keeps a small window of the input
in registers and walks a column of output cells along depth, storing each cell's eight outputs
as it goes: no shared-memory tile, no table, and every output written once. The host chooses the
block shape and how many cells a thread walks (``dq``); the kernel is specialized on the taps an
axis and the parity of each axis's padding.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from ._compile import BASE_OPTIONS, KernelModule, get_launcher
from ._launch import ptr
from ._params import ConvParams
from ._plans import CPP_TYPE, DeviceArray, geometry, on_device

#: Taps an axis the kernel is specialized for (template K).
DW_TAPS = (2, 3, 4)
#: Threads a block (32 lanes along w, or fewer on narrow outputs, times rows along h).
DW_THREADS = 128
#: Output cells (2 x 2 x 2 outputs) a thread walks along depth, most first: fewer cells a thread
#: reload less of the window (E_D - 1 planes a column), more columns fill the GPU.
DW_CELLS = (8, 4, 2, 1)
#: Blocks per SM a plan aims for before it shortens the columns (several waves of resident
#: blocks, so the last wave's tail is short).
DW_MIN_BLOCKS_PER_SM = 16


#: Output cells along w a thread of a 16-bit type computes (kernels/depthwise.cu: CCT_DW_CW16;
#: tests/test_tables.py checks that the two agree): two, so that a lane stores 8 bytes a row and
#: a warp 256, as float32 does with one cell. float32 and float64 take one.
DW_CELLS_W16 = 2


def dw_cells_w(dtype: str, cw16: int = DW_CELLS_W16) -> int:
    """Cells along w a thread computes in ``dtype``."""
    return cw16 if dtype in ("float16", "bfloat16") else 1


@cache
def dw_module(dtype: str, cw16: int = DW_CELLS_W16) -> KernelModule:
    """The dtype's 24 specializations; a ``cw16`` other than the default builds the 16-bit kernels
    with that many cells along w (for an A/B in a probe; the runtime never asks for one)."""
    t = CPP_TYPE[dtype]
    names = tuple(
        f"dw2_conv_transpose3d<{t}, {k}, {bd}, {bh}, {bw}>"
        for k in DW_TAPS
        for bd, bh, bw in itertools.product((0, 1), repeat=3)
    )
    if cw16 == DW_CELLS_W16:
        return KernelModule("depthwise.cu", names)
    return KernelModule("depthwise.cu", names, (*BASE_OPTIONS, f"-DCCT_DW_CW16={cw16}"))


def _cells(p: ConvParams) -> tuple[int, int, int]:
    """Output cells (pairs of outputs) along d, h, w."""
    return tuple(-(-o // 2) for o in p.out_size)  # type: ignore[return-value]


@dataclass(frozen=True)
class DwPlan:
    p: ConvParams
    dtype: str
    block: tuple[int, int, int]
    dq: int
    cw16: int
    tiles_w: int
    tiles_h: int
    grid: tuple[int, int, int]
    geom: DeviceArray = field(compare=False, repr=False)
    family: str = "depthwise"
    _per_device: dict = field(default_factory=dict, compare=False, repr=False)

    @staticmethod
    def eligible(p: ConvParams, dtype: str) -> bool:
        """Stride 2 and dilation 1 on every axis, the same 2-4 taps on every axis, one input
        channel a group; the kernel's 32-bit coordinates (per-axis sizes) and the grid in range."""
        k = p.kernel[0]
        if not (
            p.stride == (2, 2, 2)
            and p.dilation == (1, 1, 1)
            and p.kernel == (k, k, k)
            and k in DW_TAPS
            and p.C_in_g == 1
            and dtype in CPP_TYPE
        ):
            return False
        if max(*p.in_size, *p.out_size) >= 2**30 or p.N * p.C_out > 65535**2:
            return False
        qd, qh, qw = _cells(p)
        return qd * -(-qh // 2) * -(-qw // 8) < 2**31  # the most tiles of the smallest blocks

    @classmethod
    def build(
        cls,
        p: ConvParams,
        dtype: str,
        sm_count: int = 0,
        dq: int | None = None,
        cw16: int = DW_CELLS_W16,
    ) -> DwPlan:
        """The plan; ``dq`` (cells a thread walks along depth) is chosen unless given (tests),
        ``cw16`` (cells along w a 16-bit thread computes) is the kernels' unless given (probes)."""
        qd, qh, qw = _cells(p)
        lanes = -(-qw // dw_cells_w(dtype, cw16))  # threads along w
        bx = 32 if lanes > 16 else (16 if lanes > 8 else 8)
        by = DW_THREADS // bx
        tiles_w, tiles_h = -(-lanes // bx), -(-qh // by)
        planes = p.N * p.C_out
        if dq is None:
            dq = next(
                (c for c in DW_CELLS
                 if planes * tiles_w * tiles_h * -(-qd // c) >= DW_MIN_BLOCKS_PER_SM * sm_count),
                DW_CELLS[-1],
            )  # fmt: skip
        if dq < 1:
            raise ValueError(f"dq={dq} must be >= 1")
        grid_y = min(planes, 65535)
        grid = (tiles_w * tiles_h * -(-qd // dq), grid_y, -(-planes // grid_y))
        return cls(p, dtype, (bx, by, 1), dq, cw16, tiles_w, tiles_h, grid, geometry(p))

    def kernels(self) -> list[tuple[KernelModule, str]]:
        bd, bh, bw = (pad % 2 for pad in self.p.padding)
        t, k = CPP_TYPE[self.dtype], self.p.kernel[0]
        name = f"dw2_conv_transpose3d<{t}, {k}, {bd}, {bh}, {bw}>"
        return [(dw_module(self.dtype, self.cw16), name)]

    def launch(self, x: Any, w: Any, bias: Any, out: Any) -> None:
        def make() -> tuple:
            ((module, name),) = self.kernels()
            return get_launcher(module, name), ptr(self.geom.get())

        fn, geom = on_device(self._per_device, make)
        args = (x.data.ptr, w.data.ptr, ptr(bias), out.data.ptr, geom,
                self.tiles_w, self.tiles_h, self.dq)  # fmt: skip
        fn(self.grid, self.block, args)
