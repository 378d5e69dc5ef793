"""The implicit-GEMM family (kernels/igemm.cu): one dense GEMM per output stride phase, for
problems with many channels per group."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ._compile import KernelModule, get_function
from ._params import ConvParams
from ._plans import CPP_TYPE, PHASE_HDR, DeviceArray, acc_dtype, geometry, phase_table


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
# 0.561. float64 halves TM.
FLOAT_TILES = (
    GemmTile(128, 128, 8, 8, 8, 4, 1, 8),
    GemmTile(128, 64, 8, 8, 8, 4, 3, 8),
    GemmTile(256, 48, 16, 8, 6, 2, 2, 8),
    GemmTile(256, 48, 8, 8, 6, 4, 2, 8),
    GemmTile(256, 32, 8, 8, 4, 4, 2, 8),
    GemmTile(256, 24, 16, 8, 6, 2, 4, 8),
    GemmTile(256, 24, 8, 8, 6, 4, 4, 8),
    GemmTile(256, 16, 8, 8, 4, 4, 4, 8),
)
DOUBLE_TILES = (
    GemmTile(64, 64, 8, 4, 8, 3, 3, 8),
    GemmTile(128, 48, 8, 4, 6, 3, 2, 8),
    GemmTile(128, 32, 8, 4, 8, 3, 3, 1),
    GemmTile(128, 16, 8, 4, 4, 3, 4, 8),
)
PACK_THREADS = 256


def igemm_tiles(dtype: str) -> tuple[GemmTile, ...]:
    return DOUBLE_TILES if dtype == "float64" else FLOAT_TILES


def igemm_module(dtype: str, extra: tuple[GemmTile, ...] = ()) -> KernelModule:
    """The module of every tile the plan can pick (plus ``extra`` ones, for benchmarks)."""
    tiles = igemm_tiles(dtype) + tuple(t for t in extra if t not in igemm_tiles(dtype))
    names = (f"igemm_pack_weights<{CPP_TYPE[dtype]}>",) + tuple(t.template(dtype) for t in tiles)
    return KernelModule("igemm.cu", names)


def pick_tile(p: ConvParams, dtype: str) -> GemmTile:
    """The tile wasting the fewest channel slots on C_out_g (then on C_in_g, in K chunks), the
    wider one on a tie, then the deeper K chunk (BK=16 measured 7% faster on kb61 and kb70)."""

    def key(t: GemmTile) -> tuple[int, int, int, int]:
        return (-(-p.C_out_g // t.BN) * t.BN, -(-p.C_in_g // t.BK) * t.BK, -t.BN, -t.BK)

    return min(igemm_tiles(dtype), key=key)


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
    table: DeviceArray = field(compare=False, repr=False)
    geom: DeviceArray = field(compare=False, repr=False)
    family: str = "igemm"

    @staticmethod
    def eligible(p: ConvParams, dtype: str) -> bool:
        phases = p.stride[0] * p.stride[1] * p.stride[2]
        return p.groups * phases <= 65535 and -(-p.C_out_g // 16) <= 65535

    @classmethod
    def build(
        cls, p: ConvParams, dtype: str, sm_count: int, tile: GemmTile | None = None
    ) -> IgemmPlan:
        tile = tile or pick_tile(p, dtype)
        table, max_taps = phase_table(p)
        phases = table.shape[0]
        ci_pad = -(-p.C_in_g // tile.BK) * tile.BK
        co_pad = -(-p.C_out_g // tile.BN) * tile.BN
        m_max = max(p.N * int(h[3]) * int(h[4]) * int(h[5]) for h in table[:, :PHASE_HDR])
        grid = (max(1, -(-m_max // tile.BM)), co_pad // tile.BN, p.groups * phases)
        packed = p.groups * phases * max_taps * ci_pad * co_pad
        pack_grid = (max(1, min(-(-packed // PACK_THREADS), sm_count * 8)), 1, 1)
        return cls(p, dtype, tile, phases, max_taps, ci_pad, co_pad, grid, pack_grid,
                   DeviceArray(table), geometry(p))  # fmt: skip

    def kernels(self) -> list[tuple[KernelModule, str]]:
        m = igemm_module(self.dtype)
        return [(m, m.name_expressions[0]), (m, self.tile.template(self.dtype))]

    def launch(
        self, x: Any, w: Any, bias: Any, out: Any, module: KernelModule | None = None
    ) -> None:
        """Run the plan; ``module`` overrides the module the kernels come from (benchmarks)."""
        import cupy

        (module_, pack_name), (_, gemm_name) = self.kernels()
        module = module or module_
        table = self.table.get()
        geom = self.geom.get()
        shape = self.p.groups * self.phases * self.max_taps * self.ci_pad * self.co_pad
        wp = cupy.empty(shape, dtype=acc_dtype(self.dtype))
        extents = (np.int32(self.phases), np.int32(self.max_taps), np.int32(self.ci_pad),
                   np.int32(self.co_pad))  # fmt: skip
        get_function(module, pack_name)(
            self.pack_grid, (PACK_THREADS, 1, 1), (w, wp, table, geom, *extents)
        )
        get_function(module, gemm_name)(
            self.grid, (self.tile.threads(), 1, 1), (x, wp, bias, out, table, geom, *extents)
        )
