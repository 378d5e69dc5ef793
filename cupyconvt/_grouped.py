"""The grouped family (kernels/grouped.cu): a tiled gather for few channels per group (grouped,
depthwise and narrow layers), the memory-bound path.

A block stages one input tile (every input channel of its group, plus the taps' halo) and the
group's weights in shared memory, then computes every stride phase of its tile of cells. The host
picks the tile so the staged data fits in shared memory and writes a table with the tile's
extents and, per phase, each tap's offsets into the staged tile and weights.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import numpy as np

from ._compile import KernelModule, get_launcher
from ._launch import ptr
from ._params import ConvParams
from ._plans import (
    CPP_TYPE,
    DeviceArray,
    acc_dtype,
    geometry,
    on_device,
    phase_axes,
    phase_table,
)

#: Output channels per thread (template COT), and cells per thread along depth (template VQ).
GROUPED_COT = (1, 2, 4, 8)
GROUPED_VQ = (1, 2, 4, 8)
#: Accumulator registers a thread may hold (VQ * COT, twice that for float64): the kernel is
#: capped at 80 registers for three blocks an SM.
GROUPED_ACC_REGS = 16
#: Where the w stride is 2 a thread may compute both w-phases of its cells (template PW = 2) and
#: store each pair of neighbouring outputs as one vector, at twice the accumulators: a warp then
#: writes whole sectors instead of every other element. Problems with at most this many
#: multiply-adds an output (C_in_g * taps / phases) are bound by those stores and take paired
#: tiles even at half the cells (VQ) or half the output channels (COT) a thread; heavier ones
#: are bound by issue and take paired tiles only at the same VQ and COT. Measured on the H100
#: (NOTES.md), float32: kb73 (27 an output) 1.47 -> 0.91 ms paired at VQ 1, big_volume (54)
#: 0.61 -> 0.78 and kb72 (105) 0.28 -> 0.40 ms; float64 kb73, where a pair fits only at COT 4,
#: 2.43 -> 1.87 ms. float16 results are half the bytes, and kb73 lost there (0.96 -> 1.27 ms):
#: 16-bit types pair only at the same VQ and COT.
GROUPED_PAIR_FIRST_MACS = 32
#: Threads per block (kernels/grouped.cu: __launch_bounds__).
GROUPED_THREADS = 256
#: Shared memory a block aims to stay under, so that three blocks fit on an H100 SM (228 KiB,
#: 1 KiB of it reserved per block).
GROUPED_SMEM_TARGET = 75 * 1024
#: The most shared memory a block may use: below sm_80's and sm_90's opt-in limits.
GROUPED_MAX_SMEM = 99 * 1024
#: Plan header ints at the start of the table (kernels/grouped.cu: cct::GH_SIZE).
GH_SIZE = 16
ROW_HDR = 8


@cache
def grouped_module(dtype: str) -> KernelModule:
    t = CPP_TYPE[dtype]
    names = tuple(
        f"grouped_conv_transpose3d<{t}, {c}, {v}, {pw}>"
        for c in GROUPED_COT
        for v in GROUPED_VQ
        for pw in (1, 2)
        if _acc_regs(dtype, c, v) * pw <= GROUPED_ACC_REGS
    )
    return KernelModule("grouped.cu", names)


@dataclass(frozen=True)
class GroupedTile:
    """Cells per block: ``tqw`` lanes along w, ``tqh`` rows along h, ``vq`` cells along d; ``pw``
    w-phases a thread (2 only where the w stride is 2)."""

    tqw: int
    tqh: int
    vq: int
    pw: int = 1


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


def _vec(dtype: str) -> int:
    """Accumulators per 16 bytes: the width of the staged rows' alignment and of the weights'
    padding (kernels/grouped.cu: 16 / sizeof(Acc))."""
    return 16 // acc_dtype(dtype).itemsize


def _tile_in(tile: GroupedTile, spans: tuple[int, int, int], dtype: str) -> tuple[int, int, int]:
    """Extent of the staged input tile per channel: cells plus halo, rows padded to 16 bytes."""
    v = _vec(dtype)
    return tile.vq + spans[0], tile.tqh + spans[1], -(-(tile.tqw + spans[2]) // v) * v


#: Cells a thread from which the staged tile keeps d innermost (kernels/grouped.cu:
#: cct::DEPTH_INNER_VQ, the kernel's DIN; tests/test_tables.py checks that the two agree).
DEPTH_INNER_VQ = 4


def _d_pitch(tile: GroupedTile, td_in: int) -> int | None:
    """The d pitch of a deep tile's [h][w][d] staging, rounded up to odd (kernels/grouped.cu:
    DP = TD_in | 1); None where the tile is staged [d][h][w]."""
    return td_in | 1 if tile.vq >= DEPTH_INNER_VQ else None


def _tile_elems(tile: GroupedTile, tile_in: tuple[int, int, int]) -> int:
    """Staged elements per channel, padding of the d pitch included."""
    td_in, th_in, tw_in = tile_in
    return (_d_pitch(tile, td_in) or td_in) * th_in * tw_in


def _smem_bytes(p: ConvParams, dtype: str, cot: int, tile: GroupedTile, spans, table_ints) -> int:
    v = _vec(dtype)
    taps_all = p.kernel[0] * p.kernel[1] * p.kernel[2]
    w_elems = -(-taps_all * p.C_in_g * cot // v) * v
    elems = w_elems + p.C_in_g * _tile_elems(tile, _tile_in(tile, spans, dtype))
    return -(-elems // v) * 16 + 4 * table_ints  # phase rows 16-byte aligned after the tile


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
    _per_device: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def block(self) -> tuple[int, int, int]:
        return (self.tile.tqw, self.tile.tqh, 1)

    @staticmethod
    def pick_cot(p: ConvParams) -> int:
        return next((c for c in GROUPED_COT if c >= p.C_out_g), GROUPED_COT[-1])

    @staticmethod
    def _layout(
        p: ConvParams, dtype: str, sm_count: int = 0
    ) -> tuple[int, GroupedTile, int, tuple, tuple] | None:
        """Channels per thread, the tile, its shared memory, the offset minima and spans; None
        if nothing fits.

        The first candidate (see below) whose shared memory stays under the target and that
        still gives every SM two blocks; for small problems, the one with the most blocks.
        """
        axes = phase_axes(p)
        ranges = [_offset_range(a) for a in axes]
        # The tile's w origin is rounded down to a 16-byte boundary (tqw is a multiple of the
        # vector width), so rows can be copied 16 bytes at a time where W allows.
        v = _vec(dtype)
        ranges[2] = (ranges[2][0] - ranges[2][0] % v, ranges[2][1])
        spans = tuple(hi - lo for lo, hi in ranges)
        qmax = [max(q for _, q, _ in a) for a in axes]
        phases = p.stride[0] * p.stride[1] * p.stride[2]
        max_taps = max(1, int(np.prod([max(len(t) for _, _, t in a) for a in axes])))
        table_ints = GH_SIZE + phases * (ROW_HDR + 2 * max_taps)
        tqw = _pow2_at_least(qmax[2], 8, 32)
        tqh_full = _pow2_at_least(qmax[1], 32 // tqw, GROUPED_THREADS // tqw)
        # Candidates in order of preference: the widest output-channel chunk (fewest reloads
        # of the input tile), then the deepest tile (least halo), then the taller one.
        candidates = []
        cot = GroupedPlan.pick_cot(p)
        pws = (2, 1) if p.stride[2] == 2 else (1,)
        macs_per_output = p.C_in_g * p.kernel[0] * p.kernel[1] * p.kernel[2] / phases
        pair_first = macs_per_output <= GROUPED_PAIR_FIRST_MACS and dtype in ("float32", "float64")
        while cot >= 1:
            for vq, pw in itertools.product(GROUPED_VQ[::-1], pws):
                if (vq > 1 and vq > qmax[0]) or _acc_regs(dtype, cot, vq) * pw > GROUPED_ACC_REGS:
                    continue
                for tqh in (tqh_full, tqh_full // 2):
                    if tqh * tqw < 32:
                        continue
                    tile = GroupedTile(tqw, tqh, vq, pw)
                    # Each thread of the fill keeps one column of the tile: a row may not
                    # outnumber them.
                    if _tile_in(tile, spans, dtype)[2] > tqw * tqh:
                        continue
                    smem = _smem_bytes(p, dtype, cot, tile, spans, table_ints)
                    if smem <= GROUPED_MAX_SMEM:
                        candidates.append((cot, tile, smem))
            cot //= 2
        if not candidates:
            return None
        if pair_first:  # stable: within each pw, the order above (wider, deeper, taller first)
            candidates.sort(key=lambda c: -c[1].pw)

        def blocks(cot: int, t: GroupedTile) -> int:
            planes = p.N * p.groups * -(-p.C_out_g // cot)
            return planes * -(-qmax[0] // t.vq) * -(-qmax[1] // t.tqh) * -(-qmax[2] // t.tqw)

        good = [
            c
            for c in candidates
            if c[2] <= GROUPED_SMEM_TARGET and blocks(c[0], c[1]) >= 2 * sm_count
        ]
        if good:
            cot, tile, smem = good[0]
        else:  # a small problem: the candidate that spreads it over the most blocks
            under = [c for c in candidates if c[2] <= GROUPED_SMEM_TARGET] or candidates
            cot, tile, smem = max(under, key=lambda c: blocks(c[0], c[1]))
        return cot, tile, smem, tuple(lo for lo, _ in ranges), spans

    @staticmethod
    def eligible(p: ConvParams, dtype: str) -> bool:
        """Whether some tile fits, and the grid (at most one block a cell, and a plane per
        output channel at worst) and the kernel's 32-bit coordinates stay in range: per-axis
        sizes, channel and group counts, and a group's weights (indexed in 32 bits)."""
        taps = p.kernel[0] * p.kernel[1] * p.kernel[2]
        if (max(*p.in_size, *p.out_size) >= 2**30 or max(p.C_in, p.C_out) >= 2**31
                or p.C_in_g * p.C_out_g * taps >= 2**31):  # fmt: skip
            return False
        if GroupedPlan._layout(p, dtype) is None:
            return False
        qmax = [max(q for _, q, _ in a) for a in phase_axes(p)]
        cells = qmax[0] * qmax[1] * qmax[2]
        return cells < 2**31 and p.N * p.C_out <= 65535**2

    @classmethod
    def build(cls, p: ConvParams, dtype: str, sm_count: int = 0) -> GroupedPlan:
        layout = cls._layout(p, dtype, sm_count)
        assert layout is not None, "build() needs an eligible problem"
        cot, tile, smem, mins, spans = layout
        axes = phase_axes(p)
        qmax = [max(q for _, q, _ in a) for a in axes]
        tiles_w = -(-qmax[2] // tile.tqw)
        tiles_h = -(-qmax[1] // tile.tqh)
        tiles_d = -(-qmax[0] // tile.vq)
        td_in, th_in, tw_in = _tile_in(tile, spans, dtype)
        co_chunks = -(-p.C_out_g // cot)

        ptable, max_taps = phase_table(p)
        dp = _d_pitch(tile, td_in)
        row_len = ROW_HDR + 2 * max_taps
        rows = np.zeros((ptable.shape[0], row_len), np.int32)
        rows[:, :ROW_HDR] = ptable[:, :ROW_HDR]
        for i, prow in enumerate(ptable):
            for t in range(int(prow[6])):
                fd, fh, fw, w_tap = (int(v) for v in prow[ROW_HDR + 4 * t : ROW_HDR + 4 * t + 4])
                if dp is not None:  # [h][w][d]
                    x_off = ((fh - mins[1]) * tw_in + (fw - mins[2])) * dp + fd - mins[0]
                else:  # [d][h][w]
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
        t = self.tile
        name = f"grouped_conv_transpose3d<{CPP_TYPE[self.dtype]}, {self.cot}, {t.vq}, {t.pw}>"
        return [(m, name)]

    def launch(self, x: Any, w: Any, bias: Any, out: Any) -> None:
        def make() -> tuple:
            ((module, name),) = self.kernels()
            fn = get_launcher(module, name, self.shared_mem)
            return fn, ptr(self.table.get()), ptr(self.geom.get())

        fn, table, geom = on_device(self._per_device, make)
        args = (x.data.ptr, w.data.ptr, ptr(bias), out.data.ptr, table, geom)
        fn(self.grid, self.block, args, self.shared_mem)
