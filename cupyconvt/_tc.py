"""The tensor-core family (kernels/tc.cu): one mma.sync implicit GEMM per output stride phase on a
channels-last input, for float16/bfloat16 and for float32 under the "high" (3xTF32) and
"medium" (TF32) precisions; plus the NCDHW <-> NDHWC transposes (kernels/layout.cu)."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache
from typing import Any

import numpy as np

from ._compile import KernelModule, get_function
from ._params import ConvParams
from ._plans import CPP_TYPE, PHASE_HDR, DeviceArray, geometry, on_device, phase_table

#: Arithmetic of each (dtype, precision) the family runs (kernels/tc.cu: MODE). float32 at
#: "highest" is not here: IEEE float32 stays on the CUDA cores.
MODES = {
    ("float16", "highest"): 0,
    ("bfloat16", "highest"): 0,
    ("float32", "medium"): 1,
    ("float32", "high"): 2,
}
#: Smallest compute capability with mma.sync for every mode (bf16 and TF32 need sm_80).
MIN_CC = 80


def tc_mode(dtype: str, precision: str) -> int | None:
    """The kernel MODE for ``dtype`` at ``precision`` (precision matters for float32 only), or
    None when the family does not run that combination."""
    return MODES.get((dtype, precision if dtype == "float32" else "highest"))


@dataclass(frozen=True)
class TcTile:
    """Block tile BM x BN (voxels x channels), K chunk BK, WM x WN warps, a STAGES-deep cp.async
    ring, MINB resident blocks per SM asked of ptxas."""

    BM: int
    BN: int
    BK: int
    WM: int
    WN: int
    STAGES: int
    MINB: int = 2

    def threads(self) -> int:
        return self.WM * self.WN * 32

    def template(self, dtype: str, mode: int, channels_last_out: bool) -> str:
        return (
            f"tc_conv_transpose3d<{CPP_TYPE[dtype]}, {mode}, {self.BM}, {self.BN}, {self.BK}, "
            f"{self.WM}, {self.WN}, {self.STAGES}, {self.MINB}, "
            f"{'true' if channels_last_out else 'false'}>"
        )

    def smem_bytes(self, itemsize: int) -> int:
        """Dynamic shared memory: the cp.async ring, or the float C tile that reuses it."""
        vec = 16 // itemsize
        ring = self.STAGES * (self.BM + self.BN) * (self.BK + vec) * itemsize
        c_tile = 4 * max(self.BN * (self.BM + 4), self.BM * (self.BN + 4))
        return max(ring, c_tile)


def _shapes(bk: int) -> tuple[TcTile, ...]:
    """Tile shapes for one K chunk: 8 warps, warp tiles of 32-64 voxels x 16-64 channels."""
    return (
        TcTile(128, 128, bk, 2, 4, 4),
        TcTile(256, 64, bk, 4, 2, 3, 1),  # 64 x 32 warp tiles spill under a 128-register cap
        TcTile(256, 48, bk, 8, 1, 3),
        TcTile(256, 32, bk, 8, 1, 3),
        TcTile(256, 24, bk, 8, 1, 3),
        TcTile(256, 16, bk, 8, 1, 3),
    )


#: K chunks: two 16-element MMA steps (16-bit) or two 8-element ones (TF32) per barrier, or half
#: that when C_in_g is not a multiple of the larger chunk (C_in_g = 48: no padded channels).
CHUNKS = {2: (32, 16), 4: (16, 8)}


def tc_tiles(dtype: str) -> tuple[TcTile, ...]:
    itemsize = 4 if dtype == "float32" else 2
    return tuple(t for bk in CHUNKS[itemsize] for t in _shapes(bk))


@cache
def tc_module(dtype: str, mode: int, tile: TcTile) -> KernelModule:
    """One module per tile (both output layouts and the weight pack): a first call compiles only
    the tile it runs."""
    return KernelModule(
        "tc.cu",
        (
            f"tc_pack_weights<{CPP_TYPE[dtype]}>",
            tile.template(dtype, mode, False),
            tile.template(dtype, mode, True),
        ),
    )


def all_tc_modules() -> list[KernelModule]:
    return [
        tc_module(dtype, mode, tile)
        for (dtype, _), mode in MODES.items()
        for tile in tc_tiles(dtype)
    ]


#: Unsigned type of each itemsize: the transposes move bits.
_BITS = {2: "u16", 4: "u32", 8: "u64"}
TRANSPOSE_THREADS = 256


@cache
def layout_module() -> KernelModule:
    return KernelModule("layout.cu", tuple(f"batched_transpose<{t}>" for t in _BITS.values()))


def transpose(src: Any, dst: Any, batch: int, rows: int, cols: int) -> None:
    """dst (batch, cols, rows) = src (batch, rows, cols) transposed, both C-contiguous, on the
    current device and stream."""
    if batch * rows * cols == 0:
        return
    m = layout_module()
    fn = get_function(m, f"batched_transpose<{_BITS[src.dtype.itemsize]}>")
    grid = (-(-cols // 32), min(-(-rows // 32), 65535), min(batch, 65535))
    fn(grid, (TRANSPOSE_THREADS, 1, 1), (src, dst, np.int64(batch), np.int64(rows), np.int64(cols)))


def pick_tile(p: ConvParams, dtype: str) -> TcTile:
    """The tile wasting the fewest padded channels of C_out_g, then of C_in_g, the wider and then
    the deeper one on a tie."""

    def key(t: TcTile) -> tuple[int, int, int, int]:
        return (-(-p.C_out_g // t.BN) * t.BN, -(-p.C_in_g // t.BK) * t.BK, -t.BN, -t.BK)

    return min(tc_tiles(dtype), key=key)


PACK_THREADS = 256


@dataclass(frozen=True)
class TcPlan:
    p: ConvParams
    dtype: str
    mode: int
    tile: TcTile
    phases: int  # every stride phase: the tapless ones get their bias from the epilogue
    max_taps: int
    ci_pad: int
    co_pad: int
    grid: tuple[int, int, int]
    pack_grid: tuple[int, int, int]
    smem: int
    table: DeviceArray = field(compare=False, repr=False)
    geom: DeviceArray = field(compare=False, repr=False)
    family: str = "tc"
    _per_device: dict = field(default_factory=dict, compare=False, repr=False)

    @staticmethod
    def eligible(p: ConvParams, dtype: str, precision: str = "highest", cc: int = 90) -> bool:
        if cc < MIN_CC or tc_mode(dtype, precision) is None:
            return False
        itemsize = 4 if dtype == "float32" else 2
        phases = p.stride[0] * p.stride[1] * p.stride[2]
        # 16-byte copies of channel runs: C_in_g a whole number of vectors.
        return (
            (p.C_in_g * itemsize) % 16 == 0
            and p.groups * phases <= 65535
            and -(-p.C_out_g // 16) <= 65535
        )

    @classmethod
    def build(
        cls, p: ConvParams, dtype: str, precision: str, sm_count: int, tile: TcTile | None = None
    ) -> TcPlan:
        mode = tc_mode(dtype, precision)
        assert mode is not None
        table, max_taps = phase_table(p)
        tile = tile or pick_tile(p, dtype)
        ci_pad = -(-p.C_in_g // tile.BK) * tile.BK
        co_pad = -(-p.C_out_g // tile.BN) * tile.BN
        phases = table.shape[0]
        hdr = table[:, :PHASE_HDR]
        m_max = max(p.N * int(h[3]) * int(h[4]) * int(h[5]) for h in hdr)
        grid = (-(-m_max // tile.BM), co_pad // tile.BN, p.groups * phases)
        packed = p.groups * phases * max_taps * ci_pad * co_pad
        pack_grid = (max(1, min(-(-packed // PACK_THREADS), sm_count * 8)), 1, 1)
        itemsize = 4 if dtype == "float32" else 2
        return cls(p, dtype, mode, tile, phases, max_taps, ci_pad, co_pad, grid, pack_grid,
                   tile.smem_bytes(itemsize), DeviceArray(table), geometry(p))  # fmt: skip

    @property
    def storage(self) -> np.dtype:
        """Workspace dtype: the kernels take raw pointers, and a 16-bit type is moved as bits
        (CuPy allocates uint16 whatever the bfloat16 support of the installed version)."""
        return np.dtype(np.float32 if self.dtype == "float32" else np.uint16)

    def kernels(self) -> list[tuple[KernelModule, str]]:
        m = tc_module(self.dtype, self.mode, self.tile)
        lm = layout_module()
        bits = _BITS[4 if self.dtype == "float32" else 2]
        return [(m, n) for n in m.name_expressions] + [(lm, f"batched_transpose<{bits}>")]

    def launch(self, x: Any, w: Any, bias: Any, out: Any, channels_last: bool = False) -> None:
        """``channels_last``: x is NDHWC and out is written NDHWC; else both are NCDHW (x is then
        transposed into a channels-last workspace first)."""
        import cupy

        p = self.p
        if self.grid[0] == 0:
            return

        def make() -> tuple:
            m = tc_module(self.dtype, self.mode, self.tile)
            pack, ncdhw, ndhwc = m.name_expressions
            fns = (get_function(m, pack), get_function(m, ncdhw, self.smem),
                   get_function(m, ndhwc, self.smem))  # fmt: skip
            return fns, self.table.get(), self.geom.get()

        (pack, gemm_ncdhw, gemm_ndhwc), table, geom = on_device(self._per_device, make)
        spatial = p.in_size[0] * p.in_size[1] * p.in_size[2]
        if channels_last and x.data.ptr % 16 == 0:
            xt = x
        elif channels_last:  # a view off a 16-byte boundary: the 16-byte copies need one
            xt = cupy.empty_like(x)
            xt[...] = x
        else:
            xt = cupy.empty(p.N * spatial * p.C_in, dtype=self.storage)
            transpose(x, xt, p.N, p.C_in, spatial)
        wp = cupy.empty(
            p.groups * self.phases * self.max_taps * self.ci_pad * self.co_pad, dtype=self.storage
        )
        extents = (np.int32(self.phases), np.int32(self.max_taps), np.int32(self.ci_pad),
                   np.int32(self.co_pad))  # fmt: skip
        pack(self.pack_grid, (PACK_THREADS, 1, 1), (w, wp, table, geom, *extents))
        gemm = gemm_ndhwc if channels_last else gemm_ncdhw
        gemm(
            self.grid,
            (self.tile.threads(), 1, 1),
            (xt, wp, bias, out, table, geom, *extents),
            shared_mem=self.smem,
        )
