"""The patch GEMM (kernels/patch.cu): float16/bfloat16 layers whose kernel equals their stride
(no padding), where each input voxel expands into its own patch of outputs, run as one Hopper
wgmma GEMM per group with the taps as extra columns, by persistent blocks that keep their
columns' weights in shared memory. Part of the tensor-core family ("tc"): the selector builds a
:class:`PatchPlan` for the problems it covers and a ``TcPlan`` otherwise."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache
from typing import Any

import numpy as np

from ._compile import KernelModule, get_launcher
from ._igemm import MAX_EXTENT
from ._launch import ptr
from ._params import ConvParams
from ._plans import CPP_TYPE, DeviceArray, geometry, on_device
from ._tc import WG_CC, WG_OPTIONS, channels_last_input, layout_module


@dataclass(frozen=True)
class PatchTile:
    """BM = 128 * MW rows (input voxels) x BN columns ((channel, tap) pairs) a block tile, the
    rows' K in chunks of BK channels through a STAGES-deep ring, MINB blocks an SM asked of
    ptxas."""

    BN: int
    BK: int
    MW: int
    STAGES: int = 4
    MINB: int = 2

    @property
    def BM(self) -> int:
        return 128 * self.MW

    def template(self, dtype: str, channels_last_out: bool, channels_first_in: bool) -> str:
        """``channels_first_in``: x read as NCDHW (the result NCDHW too); else channels-last."""
        flags = ", ".join("true" if f else "false" for f in (channels_last_out, channels_first_in))
        return (
            f"wg_patch_gemm<{CPP_TYPE[dtype]}, {self.BN}, {self.BK}, {self.MW}, {self.STAGES}, "
            f"{self.MINB}, {flags}>"
        )

    def smem_bytes(self, ci_pad: int) -> int:
        """Dynamic shared memory: the block's weights (BN x ci_pad) and the ring of A chunks
        (BM x BK), 16-bit."""
        return (self.BN * ci_pad + self.STAGES * self.BM * self.BK) * 2

    def name(self) -> str:
        return f"{self.BM}x{self.BN}k{self.BK}s{self.STAGES}p"


#: The compiled tiles: wgmma widths 64 and 128, K chunks of 64, 32 and 16 channels, one m64
#: tile a warpgroup (64 accumulators a thread at most: two blocks an SM at 128 registers; two m64
#: tiles of 64 columns spilled 4-8 bytes there, and measured no faster on unet_k2s2).
#: STAGES = 4 keeps two chunks in flight: all of a 128-channel row tile while the one before
#: it is stored.
PATCH_TILES = tuple(PatchTile(bn, bk, mw) for bn in (128, 64) for bk in (64, 32, 16) for mw in (1,))


#: Shared memory a block may take (one block an SM at least; an H100 has 227 KiB): the
#: weights of a 64-wide tile fit up to C_in_g = 1088 beside a ring of 64-channel chunks.
PATCH_SMEM = 200 * 1024
#: Shared memory an SM offers blocks, less each block's static arrays and the driver's 1 KiB.
SM_SMEM, BLOCK_OVERHEAD = 227 * 1024, 3 * 1024


def covers(p: ConvParams) -> bool:
    """Whether every output voxel of ``p`` comes from exactly one input voxel and tap: kernel ==
    stride along each axis, no padding or output padding, dilation 1 where the kernel is not 1."""
    return all(
        k == s and pad == 0 and op == 0 and (d == 1 or k == 1)
        for k, s, pad, op, d in zip(
            p.kernel, p.stride, p.padding, p.output_padding, p.dilation, strict=True
        )
    )


def pick_patch_tile(p: ConvParams) -> PatchTile | None:
    """The deepest K chunk dividing C_in_g (16, padded, where none does); the wider width where
    the columns fill it and its weights fit; None where no tile's weights fit."""
    bk = next((k for k in (64, 32, 16) if p.C_in_g % k == 0), 16)
    ci_pad = -(-p.C_in_g // bk) * bk
    taps = p.kernel[0] * p.kernel[1] * p.kernel[2]
    for bn in (128, 64) if taps * p.C_out_g >= 128 else (64,):
        t = next(t for t in PATCH_TILES if (t.BN, t.BK, t.MW) == (bn, bk, 1))
        if t.smem_bytes(ci_pad) <= PATCH_SMEM:
            return t
    return None


#: (channels-last result, channels-first x) of the kernels each tile's module holds: NCDHW from
#: a channels-last x (transposed by the host), NDHWC, NCDHW read as it is.
PATCH_VARIANTS = ((False, False), (True, False), (False, True))


@cache
def patch_module(dtype: str, tile: PatchTile) -> KernelModule:
    """One tile's kernels, PATCH_VARIANTS in order (all read w as given: no weight pack)."""
    names = tuple(tile.template(dtype, *v) for v in PATCH_VARIANTS)
    return KernelModule("patch.cu", names, WG_OPTIONS)


def all_patch_modules() -> list[KernelModule]:
    return [patch_module(d, t) for d in ("float16", "bfloat16") for t in PATCH_TILES]


@dataclass(frozen=True)
class PatchPlan:
    p: ConvParams
    dtype: str
    tile: PatchTile
    ci_pad: int
    n_pad: int  # P * C_out_g columns, padded to whole BN tiles
    row_tiles: int  # BM-row tiles of the N * D * H * W input voxels
    grid: tuple[int, int, int]
    smem: int
    geom: DeviceArray = field(compare=False, repr=False)
    family: str = "tc"
    _per_device: dict = field(default_factory=dict, compare=False, repr=False)

    @staticmethod
    def eligible(p: ConvParams, dtype: str, cc: int) -> bool:
        """16-bit types on compute capability 9.0, for problems :func:`covers` describes, with
        C_in_g a whole number of 16-byte vectors whose weights fit a block's shared memory
        (pick_patch_tile); the kernel's 32-bit column and row-tile counts in range."""
        if cc != WG_CC or dtype not in ("float16", "bfloat16") or not covers(p):
            return False
        cols = p.kernel[0] * p.kernel[1] * p.kernel[2] * p.C_out_g
        rows = p.N * p.in_size[0] * p.in_size[1] * p.in_size[2]
        return (
            (p.C_in_g * 2) % 16 == 0
            and p.groups <= 65535
            and cols + max(t.BN for t in PATCH_TILES) < MAX_EXTENT
            and -(-rows // min(t.BM for t in PATCH_TILES)) < MAX_EXTENT
            and pick_patch_tile(p) is not None
        )

    @classmethod
    def build(
        cls, p: ConvParams, dtype: str, sm_count: int, tile: PatchTile | None = None
    ) -> PatchPlan:
        """Persistent blocks: as many as fit on the device at once (by MINB and shared memory),
        a whole number of them per column tile."""
        tile = tile or pick_patch_tile(p)
        if tile is None:
            raise ValueError("no patch tile's weights fit in shared memory")
        cols = p.kernel[0] * p.kernel[1] * p.kernel[2] * p.C_out_g
        rows = p.N * p.in_size[0] * p.in_size[1] * p.in_size[2]
        ci_pad = -(-p.C_in_g // tile.BK) * tile.BK
        n_pad = -(-cols // tile.BN) * tile.BN
        n_tiles, row_tiles = n_pad // tile.BN, -(-rows // tile.BM)
        smem = tile.smem_bytes(ci_pad)
        if smem > PATCH_SMEM:
            raise ValueError(f"the weights of {tile.name()} ({smem} bytes) do not fit")
        per_sm = max(1, min(tile.MINB, SM_SMEM // (smem + BLOCK_OVERHEAD)))
        resident = max(1, sm_count * per_sm // p.groups)
        steps = max(1, min(row_tiles, resident // n_tiles))  # row-tile steps of a block
        grid = (n_tiles * steps, 1, p.groups)
        return cls(p, dtype, tile, ci_pad, n_pad, row_tiles, grid, smem, geometry(p))

    @property
    def reads_ncdhw(self) -> bool:
        """An NCDHW x is read as it is (no transpose) where each channel's voxels are whole
        16-byte groups: D*H*W a multiple of 8 (and x 16-byte aligned, checked at launch)."""
        return (self.p.in_size[0] * self.p.in_size[1] * self.p.in_size[2]) % 8 == 0

    @property
    def storage(self) -> np.dtype:
        return np.dtype(np.uint16)  # 16-bit types move as bits

    def kernels(self) -> list[tuple[KernelModule, str]]:
        m = patch_module(self.dtype, self.tile)
        return [(m, n) for n in m.name_expressions] + [(layout_module(), "batched_transpose<u16>")]

    def launch(self, x: Any, w: Any, bias: Any, out: Any, channels_last: bool = False) -> None:
        """``channels_last``: x is NDHWC and out is written NDHWC; else both are NCDHW (x is read
        as it is where :attr:`reads_ncdhw`, else transposed into a channels-last workspace first;
        the result is written in place)."""
        p = self.p
        if self.grid[0] == 0:
            return

        def make() -> tuple:
            m = patch_module(self.dtype, self.tile)
            fns = tuple(get_launcher(m, name, self.smem) for name in m.name_expressions)
            return fns, ptr(self.geom.get())

        (gemm_cf, gemm_cl, gemm_cf_in), geom = on_device(self._per_device, make)
        if not channels_last and self.reads_ncdhw and x.data.ptr % 16 == 0:
            xt, gemm = x, gemm_cf_in
        else:
            xt = channels_last_input(x, p, channels_last, self.storage)
            gemm = gemm_cl if channels_last else gemm_cf
        # Element pairs (two adjacent columns) are adjacent in memory and 4-byte aligned when
        # kW (NCDHW: taps fastest) or C_out_g (NDHWC: channels fastest) is even.
        even = p.C_out_g % 2 == 0 if channels_last else p.kernel[2] % 2 == 0
        pairs = int(even and out.data.ptr % 4 == 0)
        args = (xt.data.ptr, w.data.ptr, ptr(bias), out.data.ptr, geom, self.ci_pad,
                self.n_pad // self.tile.BN, self.row_tiles, pairs)  # fmt: skip
        gemm(self.grid, (256, 1, 1), args, self.smem)
