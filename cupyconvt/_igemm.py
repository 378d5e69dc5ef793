"""The implicit-GEMM family (kernels/igemm.cu): one dense GEMM per output stride phase, for
problems with many channels per group."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ._compile import KernelModule, get_launcher
from ._launch import ptr
from ._params import ConvParams
from ._plans import (
    CPP_TYPE,
    PHASE_HDR,
    DeviceArray,
    acc_dtype,
    geometry,
    phase_axes,
    phase_table,
)


@dataclass(frozen=True)
class GemmTile:
    """Block tile BM x BN (voxels x channels), K chunk BK, per-thread register tile TM x TN, a
    STAGES-deep cp.async ring, MINB resident blocks per SM asked of ptxas (a register cap), and KU
    k-steps unrolled in the inner loop."""

    BM: int
    BN: int
    BK: int
    TM: int
    TN: int
    STAGES: int = 4
    MINB: int = 2
    KU: int = 1

    def threads(self) -> int:
        return (self.BM // self.TM) * (self.BN // self.TN)

    def template(self, dtype: str) -> str:
        return (
            f"igemm_conv_transpose3d<{CPP_TYPE[dtype]}, {self.BM}, {self.BN}, {self.BK}, "
            f"{self.TM}, {self.TN}, {self.STAGES}, {self.MINB}, {self.KU}>"
        )


# One tile per output-channel width, so few channels are wasted on padding. 128-256 threads under
# a register cap (MINB blocks per SM) with no spill (ptxas -v, sm_90); 8x8 / 8x6 register tiles keep
# 5 FMAs or more per shared-memory read. Full k unrolling (KU=8) beat KU=1 by 10-25% wherever it
# fits without spilling. Chosen from benchmarks/igemm_variants.py on an H100 (2026-11-24): e.g.
# kb68 128x64/mb3/ku8 40.4 ms vs 256x64/mb2/ku1 44.0; vnet 128x128/mb1/ku8 0.519 ms vs mb2/ku1
# 0.561. Second sweep (same day): 256x16 k16/st2 3.17 ms vs k8/st4 3.42 on kb58; 128x32 2.27 ms
# vs 256x32 2.41 on unet_k3s2; 128x64 k16/st2 beat k8/st4 on kb77 in two runs (1.44 vs 1.49 ms,
# 1.26 vs 1.32) but unet_k2s2 was a wash (0.366 vs 0.399, then 0.376 vs 0.366). It is taken only
# where K = taps x C_in_g <= SHORT_K (kb68's K=2400 was measured on k8/st4). float64 halves TM.
FLOAT_TILES = (
    GemmTile(128, 128, 8, 8, 8, 4, 1, 8),
    GemmTile(128, 64, 8, 8, 8, 4, 3, 8),
    GemmTile(128, 64, 16, 8, 8, 2, 3, 8),
    GemmTile(256, 48, 16, 8, 6, 2, 2, 8),
    GemmTile(256, 48, 8, 8, 6, 4, 2, 8),
    GemmTile(128, 32, 8, 8, 4, 4, 4, 8),
    GemmTile(256, 24, 16, 8, 6, 2, 4, 8),
    GemmTile(256, 24, 8, 8, 6, 4, 4, 8),
    GemmTile(256, 16, 16, 8, 4, 2, 4, 8),
)
#: Tiles taken only when the GEMM's K (max taps x C_in_g) is at most SHORT_K.
SHORT_K_TILES = (GemmTile(128, 64, 16, 8, 8, 2, 3, 8),)
SHORT_K = 1024
DOUBLE_TILES = (
    GemmTile(64, 64, 8, 4, 8, 3, 3, 8),
    GemmTile(128, 48, 8, 4, 6, 3, 2, 8),
    GemmTile(128, 32, 8, 4, 8, 3, 3, 1),
    GemmTile(128, 16, 8, 4, 4, 3, 4, 8),
)
PACK_THREADS = 256


def igemm_tiles(dtype: str) -> tuple[GemmTile, ...]:
    return DOUBLE_TILES if dtype == "float64" else FLOAT_TILES


FILL_THREADS = 256


def igemm_module(dtype: str, extra: tuple[GemmTile, ...] = ()) -> KernelModule:
    """The module of every tile the plan can pick (plus ``extra`` ones, for benchmarks)."""
    tiles = igemm_tiles(dtype) + tuple(t for t in extra if t not in igemm_tiles(dtype))
    names = (
        f"igemm_pack_weights<{CPP_TYPE[dtype]}>",
        f"igemm_fill_tapless<{CPP_TYPE[dtype]}>",
    ) + tuple(t.template(dtype) for t in tiles)
    return KernelModule("igemm.cu", names)


#: CUDA's limit on gridDim.x; and the smallest BM of any tile, which bounds the GEMM's gridDim.x
#: by the phase voxels.
MAX_GRID_X = 2**31 - 1
MIN_BM = min(t.BM for t in FLOAT_TILES + SHORT_K_TILES + DOUBLE_TILES)
#: Per-axis sizes and channel counts must stay below this: the kernels (and the int32 phase
#: table) keep coordinates, tap offsets and channel indices in 32 bits, offsets added to them
#: included. Tensor offsets are 64-bit; only a single axis (or channel run) this long is refused.
MAX_EXTENT = 2**30


def phase_voxels(p: ConvParams) -> int:
    """The most phase voxels (the GEMM's M) any stride phase can have: N * prod ceil(out / s)."""
    m = p.N
    for o, s in zip(p.out_size, p.stride, strict=True):
        m *= -(-o // s)
    return m


def fits_int32(p: ConvParams) -> bool:
    """Whether every per-axis size, every tap index and the channels of a group fit the 32-bit
    values of the phase-GEMM kernels (igemm.cu, tc.cu) with room for the offsets added to them.
    Tensors of any element count pass: only a single extent of 2^30 or more is refused."""
    taps = p.kernel[0] * p.kernel[1] * p.kernel[2]
    return (
        max(*p.in_size, *p.out_size) < MAX_EXTENT
        and 4 * taps < MAX_EXTENT  # a phase's row of the table: 4 ints a tap
        and p.C_in_g * taps < MAX_EXTENT  # K
        and p.C_out_g < MAX_EXTENT
    )


def active_phase_table(p: ConvParams) -> tuple[np.ndarray, int, int, np.ndarray, bool]:
    """The phase table with the phases that have taps first (the GEMM launches over those alone),
    their count, max_taps, the per-axis tapless-residue flags (sD + sH + sW ints) that
    igemm_fill_tapless reads, and whether any output lies in a tapless phase."""
    table, max_taps = phase_table(p)
    taps = table[:, 6]
    order = np.concatenate([np.flatnonzero(taps > 0), np.flatnonzero(taps == 0)])
    table = np.ascontiguousarray(table[order])
    active = int((taps > 0).sum())
    flags = []
    any_tapless = False
    for per_res in phase_axes(p):
        for _o0, q, tps in per_res:
            flags.append(0 if tps else 1)
            any_tapless |= q > 0 and not tps
    # A phase is tapless exactly when one of its axes' residues is (taps are a product per axis).
    return table, active, max_taps, np.array(flags, np.int32), any_tapless


def pick_tile(p: ConvParams, dtype: str, k_len: int | None = None) -> GemmTile:
    """The tile wasting the fewest channel slots on C_out_g (then on C_in_g, in K chunks), the
    wider one on a tie, then the deeper K chunk (BK=16 measured 7% faster on kb61 and kb70).
    ``k_len`` (max taps x C_in_g) admits SHORT_K_TILES when it is at most SHORT_K."""
    short = k_len is not None and k_len <= SHORT_K
    tiles = [t for t in igemm_tiles(dtype) if short or t not in SHORT_K_TILES]

    def key(t: GemmTile) -> tuple[int, int, int, int]:
        return (-(-p.C_out_g // t.BN) * t.BN, -(-p.C_in_g // t.BK) * t.BK, -t.BN, -t.BK)

    return min(tiles, key=key)


@dataclass(frozen=True)
class IgemmPlan:
    p: ConvParams
    dtype: str
    tile: GemmTile
    phases: int  # phases with taps (the GEMM's); the table lists them first
    max_taps: int
    ci_pad: int
    co_pad: int
    grid: tuple[int, int, int]
    pack_grid: tuple[int, int, int]
    fill_grid: tuple[int, int, int] | None  # None: every output lies in a phase with taps
    table: DeviceArray = field(compare=False, repr=False)
    geom: DeviceArray = field(compare=False, repr=False)
    tapless: DeviceArray = field(compare=False, repr=False)
    family: str = "igemm"

    @staticmethod
    def eligible(p: ConvParams, dtype: str) -> bool:
        """Whether the grid stays in CUDA's limits (y, z <= 65535; x, a tile of BM >= 64 phase
        voxels, <= 2^31 - 1) and the kernels' 32-bit values in range (see fits_int32)."""
        phases = p.stride[0] * p.stride[1] * p.stride[2]
        return (
            p.groups * phases <= 65535
            and -(-p.C_out_g // 16) <= 65535
            and phase_voxels(p) <= MIN_BM * MAX_GRID_X
            and fits_int32(p)
        )

    @classmethod
    def build(
        cls,
        p: ConvParams,
        dtype: str,
        sm_count: int,
        tile: GemmTile | None = None,
    ) -> IgemmPlan:
        table, phases, max_taps, flags, any_tapless = active_phase_table(p)
        tile = tile or pick_tile(p, dtype, max_taps * p.C_in_g)
        ci_pad = -(-p.C_in_g // tile.BK) * tile.BK
        co_pad = -(-p.C_out_g // tile.BN) * tile.BN
        hdr = table[:phases, :PHASE_HDR]
        m_max = max((p.N * int(h[3]) * int(h[4]) * int(h[5]) for h in hdr), default=0)
        m_tiles = -(-m_max // tile.BM)
        grid = (m_tiles, co_pad // tile.BN, p.groups * phases)
        packed = p.groups * phases * max_taps * ci_pad * co_pad
        pack_grid = (max(1, min(-(-packed // PACK_THREADS), sm_count * 8)), 1, 1)
        fill_grid = None
        if any_tapless and p.N * p.C_out * p.out_size[0] > 0:
            fill_grid = (p.out_size[0], min(p.C_out, 65535), min(p.N, 65535))
        return cls(p, dtype, tile, phases, max_taps, ci_pad, co_pad, grid, pack_grid, fill_grid,
                   DeviceArray(table), geometry(p), DeviceArray(flags))  # fmt: skip

    def kernels(self) -> list[tuple[KernelModule, str]]:
        m = igemm_module(self.dtype)
        return [(m, m.name_expressions[0]), (m, self.tile.template(self.dtype)),
                (m, m.name_expressions[1])]  # fmt: skip

    def launch(
        self, x: Any, w: Any, bias: Any, out: Any, module: KernelModule | None = None
    ) -> None:
        """Run the plan; ``module`` overrides the module the kernels come from (benchmarks)."""
        import cupy

        (module_, pack_name), (_, gemm_name), (_, fill_name) = self.kernels()
        module = module or module_
        geom = ptr(self.geom.get())
        gemm = not (self.phases == 0 or self.grid[0] == 0 or self.grid[2] == 0)
        # The workspace first: if it cannot be allocated, nothing has been launched and `out`
        # is untouched.
        if gemm:
            shape = self.p.groups * self.phases * self.max_taps * self.ci_pad * self.co_pad
            wp = cupy.empty(shape, dtype=acc_dtype(self.dtype))
        if self.fill_grid is not None:
            get_launcher(module, fill_name)(
                self.fill_grid, (FILL_THREADS, 1, 1),
                (ptr(bias), out.data.ptr, ptr(self.tapless.get()), geom),
            )  # fmt: skip
        if not gemm:
            return
        table = ptr(self.table.get())
        extents = (self.phases, self.max_taps, self.ci_pad, self.co_pad)
        get_launcher(module, pack_name)(
            self.pack_grid, (PACK_THREADS, 1, 1), (w.data.ptr, wp.data.ptr, table, geom, *extents)
        )
        get_launcher(module, gemm_name)(
            self.grid,
            (self.tile.threads(), 1, 1),
            (x.data.ptr, wp.data.ptr, ptr(bias), out.data.ptr, table, geom, *extents),
        )
