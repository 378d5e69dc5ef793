"""The grouped family (kernels/grouped.cu): a tiled gather for few channels per group (grouped,
depthwise and narrow layers), the memory-bound path.

A block stages one input tile (every input channel of its group, plus the taps' halo) and the
group's weights in shared memory, then computes every stride phase of its tile of cells. The host
picks the tile so the staged data fits in shared memory and writes a table with the tile's
extents and, per phase, each tap's offsets into the staged tile and weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache
from typing import Any

import numpy as np

from ._compile import KernelModule, get_function
from ._params import ConvParams
from ._plans import CPP_TYPE, DeviceArray, acc_dtype, geometry, phase_axes, phase_table

#: Output channels per thread (template COT), and cells per thread along depth (template VQ).
GROUPED_COT = (1, 2, 4, 8)
GROUPED_VQ = (1, 2, 4, 8)
#: Accumulator registers a thread may hold (VQ * COT, twice that for float64): the kernel is
#: capped at 80 registers for three blocks an SM.
GROUPED_ACC_REGS = 16
#: Threads per block (kernels/grouped.cu: __launch_bounds__).
GROUPED_THREADS = 256
#: Shared memory a block aims to stay under, so that three blocks fit on an H100 SM.
GROUPED_SMEM_TARGET = 72 * 1024
#: The most shared memory a block may use: below sm_80's and sm_90's opt-in limits.
GROUPED_MAX_SMEM = 99 * 1024
#: Plan header ints at the start of the table (kernels/grouped.cu: cct::GH_SIZE).
GH_SIZE = 16
ROW_HDR = 8


@cache
def grouped_module(dtype: str) -> KernelModule:
    t = CPP_TYPE[dtype]
    names = tuple(
        f"grouped_conv_transpose3d<{t}, {c}, {v}>"
        for c in GROUPED_COT
        for v in GROUPED_VQ
        if _acc_regs(dtype, c, v) <= GROUPED_ACC_REGS
    )
    return KernelModule("grouped.cu", names)


@dataclass(frozen=True)
class GroupedTile:
    """Cells per block: ``tqw`` lanes along w, ``tqh`` rows along h, ``vq`` cells along d."""

    tqw: int
    tqh: int
    vq: int


def _acc_regs(dtype: str, cot: int, vq: int) -> int:
    return cot * vq * (2 if dtype == "float64" else 1)


def _pow2_at_least(n: int, lo: int, hi: int) -> int:
    v = lo
    while v < n and v < hi:
        v *= 2
    return v


def _offset_range(axis: list[tuple[int, int, list[tuple[int, int]]]]) -> tuple[int, int]:
    offs = [off for _, _, taps in axis for _, off in taps]
    return (min(offs), max(offs)) if offs else (0, 0)


def _smem_bytes(p: ConvParams, dtype: str, cot: int, tile: GroupedTile, spans, table_ints) -> int:
    taps_all = p.kernel[0] * p.kernel[1] * p.kernel[2]
    tile_in = (tile.vq + spans[0]) * (tile.tqh + spans[1]) * (tile.tqw + spans[2])
    elems = taps_all * p.C_in_g * cot + p.C_in_g * tile_in
    return -(-elems * acc_dtype(dtype).itemsize // 16) * 16 + 4 * table_ints  # rows 16-aligned


@dataclass(frozen=True)
class GroupedPlan:
    p: ConvParams
    dtype: str
    cot: int
    tile: GroupedTile
    grid: tuple[int, int, int]
    shared_mem: int
    table: DeviceArray = field(compare=False, repr=False)
    geom: DeviceArray = field(compare=False, repr=False)
    family: str = "grouped"

    @property
    def block(self) -> tuple[int, int, int]:
        return (self.tile.tqw, self.tile.tqh, 1)

    @staticmethod
    def pick_cot(p: ConvParams) -> int:
        return next((c for c in GROUPED_COT if c >= p.C_out_g), GROUPED_COT[-1])

    @staticmethod
    def _layout(
        p: ConvParams, dtype: str, sm_count: int = 0
    ) -> tuple[GroupedTile, int, tuple, tuple] | None:
        """The tile, its shared memory, the offset minima and spans; None if nothing fits.

        The deepest tile (most cells per thread, least halo per cell) whose shared memory stays
        under the target and that still gives every SM two blocks, else the smallest that fits.
        """
        axes = phase_axes(p)
        ranges = [_offset_range(a) for a in axes]
        spans = tuple(hi - lo for lo, hi in ranges)
        qmax = [max(q for _, q, _ in a) for a in axes]
        phases = p.stride[0] * p.stride[1] * p.stride[2]
        max_taps = max(1, int(np.prod([max(len(t) for _, _, t in a) for a in axes])))
        table_ints = GH_SIZE + phases * (ROW_HDR + 2 * max_taps)
        tqw = _pow2_at_least(qmax[2], 8, 32)
        tqh = _pow2_at_least(qmax[1], 32 // tqw, GROUPED_THREADS // tqw)
        cot = GroupedPlan.pick_cot(p)
        tiles = [
            GroupedTile(tqw, tqh, vq)
            for vq in GROUPED_VQ[::-1]
            if vq == 1 or (vq <= qmax[0] and _acc_regs(dtype, cot, vq) <= GROUPED_ACC_REGS)
        ]
        sized = [(t, _smem_bytes(p, dtype, cot, t, spans, table_ints)) for t in tiles]
        fits = [(t, smem) for t, smem in sized if smem <= GROUPED_MAX_SMEM]
        if not fits:
            return None
        planes = p.N * p.groups * -(-p.C_out_g // cot)

        def blocks(t: GroupedTile) -> int:
            return planes * -(-qmax[0] // t.vq) * -(-qmax[1] // t.tqh) * -(-qmax[2] // t.tqw)

        good = [f for f in fits if f[1] <= GROUPED_SMEM_TARGET and blocks(f[0]) >= 2 * sm_count]
        tile, smem = good[0] if good else fits[-1]
        return tile, smem, tuple(lo for lo, _ in ranges), spans

    @staticmethod
    def eligible(p: ConvParams, dtype: str) -> bool:
        layout = GroupedPlan._layout(p, dtype)
        if layout is None:
            return False
        tile = layout[0]
        qmax = [max(q for _, q, _ in a) for a in phase_axes(p)]
        tiles = (-(-qmax[0] // tile.vq)) * (-(-qmax[1] // tile.tqh)) * (-(-qmax[2] // tile.tqw))
        planes = p.N * p.groups * -(-p.C_out_g // GroupedPlan.pick_cot(p))
        return (tiles < 2**31 and planes <= 65535**2 and max(p.in_size) < 2**30
                and max(p.out_size) < 2**30)  # fmt: skip

    @classmethod
    def build(cls, p: ConvParams, dtype: str, sm_count: int = 0) -> GroupedPlan:
        layout = cls._layout(p, dtype, sm_count)
        assert layout is not None, "build() needs an eligible problem"
        tile, smem, mins, spans = layout
        cot = cls.pick_cot(p)
        axes = phase_axes(p)
        qmax = [max(q for _, q, _ in a) for a in axes]
        tiles_w = -(-qmax[2] // tile.tqw)
        tiles_h = -(-qmax[1] // tile.tqh)
        tiles_d = -(-qmax[0] // tile.vq)
        td_in, th_in, tw_in = tile.vq + spans[0], tile.tqh + spans[1], tile.tqw + spans[2]
        co_chunks = -(-p.C_out_g // cot)

        ptable, max_taps = phase_table(p)
        row_len = ROW_HDR + 2 * max_taps
        rows = np.zeros((ptable.shape[0], row_len), np.int32)
        rows[:, :ROW_HDR] = ptable[:, :ROW_HDR]
        for i, prow in enumerate(ptable):
            for t in range(int(prow[6])):
                fd, fh, fw, w_tap = (int(v) for v in prow[ROW_HDR + 4 * t : ROW_HDR + 4 * t + 4])
                x_off = ((fd - mins[0]) * th_in + (fh - mins[1])) * tw_in + (fw - mins[2])
                rows[i, ROW_HDR + 2 * t : ROW_HDR + 2 * t + 2] = (x_off, w_tap * p.C_in_g * cot)
        hdr = np.zeros(GH_SIZE, np.int32)
        hdr[:12] = (td_in, th_in, tw_in, *mins, tiles_w, tiles_h, co_chunks, row_len,
                    rows.shape[0], p.kernel[0] * p.kernel[1] * p.kernel[2])  # fmt: skip
        table = np.concatenate([hdr, rows.ravel()])
        planes = p.N * p.groups * co_chunks
        grid_y = min(planes, 65535)
        grid = (tiles_w * tiles_h * tiles_d, grid_y, -(-planes // grid_y))
        return cls(p, dtype, cot, tile, grid, smem, DeviceArray(table), geometry(p))

    def kernels(self) -> list[tuple[KernelModule, str]]:
        m = grouped_module(self.dtype)
        name = f"grouped_conv_transpose3d<{CPP_TYPE[self.dtype]}, {self.cot}, {self.tile.vq}>"
        return [(m, name)]

    def launch(self, x: Any, w: Any, bias: Any, out: Any) -> None:
        ((module, name),) = self.kernels()
        fn = get_function(module, name, self.shared_mem)
        args = (x, w, bias, out, self.table.get(), self.geom.get())
        fn(self.grid, self.block, args, shared_mem=self.shared_mem)
