"""GPU kernels for the gradients of conv_transpose3d (kernels/backward.cu).

For ``y = conv_transpose3d(x, w, bias, ...)`` and the gradient ``gy`` of a loss with respect to
``y``, this module computes, on CuPy arrays:

- :func:`grad_input`: ``conv3d(gy, w, stride, padding, dilation, groups)``, the gradient with
  respect to ``x``. An implicit GEMM (``bwd_data_igemm``: M = N*D*H*W input voxels, N = C_in_g,
  K = taps*C_out_g, gy gathered at ``i*stride + k*dilation - padding``) or, for few input channels
  per group, a direct gather: from boxes of gy staged in shared memory (``bwd_data_staged``) or,
  where those do not fit, through L1 (``bwd_data_narrow``).
- :func:`grad_weight`: per group a GEMM ``(C_in_g x voxels) @ (voxels x C_out_g*taps)`` whose
  reduction runs over every input voxel. The voxels are split over blocks (``bwd_weight_igemm``),
  the partial sums go to a float32/float64 workspace, and ``bwd_reduce_splits`` adds them in a
  fixed order.
- :func:`grad_bias`: the sum of ``gy`` over batch and space, in two fixed-order passes.

Every kernel writes each element once, with no atomics, and every sum runs in an order that the
problem fixes (the grad_input GEMM tiles share one order; the split of grad_weight's voxels is
computed for a nominal GPU, not the one at hand), so results are bitwise identical from run to run
and, but for grad_input's gather paths where shared memory is short (their tiles and the staged
and L1 gathers sum in one order; the GEMM in another), from GPU to GPU. float64
is computed in float64, float32 in IEEE float32 (``precision`` "high" and "medium" are accepted and
run the same IEEE kernels for now), and float16/bfloat16 accumulate in float32 and round once.
Launches go to CuPy's current stream, on the arrays' device.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache, lru_cache
from typing import Any

import numpy as np

from ._compile import KernelModule, get_launcher
from ._dtypes import dtype_name
from ._launch import ptr
from ._params import ConvParams
from ._plans import CPP_TYPE, DeviceArray, acc_dtype, geometry, on_device
from ._precision import resolve as resolve_precision

# --------------------------------------------------------------------------------------------
# Tiles and the kernel module.


@dataclass(frozen=True)
class DataTile:
    """A ``bwd_data_igemm`` tile: BM voxels x BN input channels, K chunks of BK output channels,
    a TM x TN register tile per thread, a STAGES-deep cp.async ring, MINB blocks an SM asked of
    ptxas (a register cap) and KU k-steps unrolled."""

    BM: int
    BN: int
    BK: int
    TM: int
    TN: int
    STAGES: int = 4
    MINB: int = 2
    KU: int = 8

    def threads(self) -> int:
        return (self.BM // self.TM) * (self.BN // self.TN)

    def template(self, dtype: str) -> str:
        return (
            f"bwd_data_igemm<{CPP_TYPE[dtype]}, {self.BM}, {self.BN}, {self.BK}, {self.TM}, "
            f"{self.TN}, {self.STAGES}, {self.MINB}, {self.KU}>"
        )


@dataclass(frozen=True)
class WeightTile:
    """A ``bwd_weight_igemm`` tile: BM input channels x BN columns (output channel, tap), chunks
    of BK voxels, a TM x TN register tile per thread, KS groups of threads splitting each chunk's
    voxels (for tiles with few rows), a STAGES-deep ring and MINB blocks an SM."""

    BM: int
    BN: int
    BK: int
    TM: int
    TN: int
    KS: int = 1
    STAGES: int = 3
    MINB: int = 2

    def threads(self) -> int:
        return self.KS * (self.BM // self.TM) * (self.BN // self.TN)

    def template(self, dtype: str) -> str:
        return (
            f"bwd_weight_igemm<{CPP_TYPE[dtype]}, {self.BM}, {self.BN}, {self.BK}, {self.TM}, "
            f"{self.TN}, {self.KS}, {self.STAGES}, {self.MINB}>"
        )


# grad_input tiles: kernels/igemm.cu's structure, so its measured tiles (cupyconvt/_igemm.py) with
# BN now over input channels and BK over output channels. Register tiles 8x8 to 8x4 under a cap of
# MINB blocks an SM, no spill (ptxas -v, sm_90); float64 halves TM.
DATA_TILES_FLOAT = (
    DataTile(128, 128, 8, 8, 8, 4, 1, 8),
    DataTile(128, 128, 16, 8, 8, 2, 1, 8),
    DataTile(128, 64, 8, 8, 8, 4, 3, 8),
    DataTile(128, 64, 16, 8, 8, 3, 2, 8),
    DataTile(256, 48, 8, 8, 6, 4, 2, 8),
    DataTile(256, 48, 16, 8, 6, 2, 2, 8),
    DataTile(128, 32, 8, 8, 4, 4, 4, 8),
    DataTile(128, 32, 16, 8, 4, 3, 4, 8),
    DataTile(256, 24, 8, 8, 6, 4, 4, 8),
    DataTile(256, 16, 8, 8, 4, 4, 4, 8),
)
DATA_TILES_DOUBLE = (
    DataTile(64, 64, 8, 4, 8, 3, 3, 8),
    DataTile(128, 32, 8, 4, 8, 3, 3, 1),
    DataTile(128, 16, 8, 4, 4, 3, 4, 8),
)
# grad_weight tiles, 128 threads each (the widest 256): rows are input channels, so narrow groups
# take the short tiles, whose k-groups (KS) keep 128 threads busy; depthwise (one row) takes the
# 4-row tile. MINB is the blocks an SM that the registers allow, with no spill (ptxas -v, sm_90).
WEIGHT_TILES_FLOAT = (
    WeightTile(128, 128, 16, 8, 8, 1, 2, 1),
    WeightTile(64, 128, 16, 8, 8, 1, 3, 2),
    WeightTile(32, 128, 16, 4, 8, 1, 3, 3),
    WeightTile(16, 256, 16, 4, 8, 1, 2, 4),
    WeightTile(8, 256, 16, 4, 8, 2, 2, 4),
    WeightTile(4, 64, 32, 4, 4, 8, 3, 4),
)
WEIGHT_TILES_DOUBLE = (
    WeightTile(32, 64, 8, 4, 4, 1, 3, 3),
    WeightTile(16, 128, 8, 4, 4, 1, 3, 3),
    WeightTile(8, 128, 8, 4, 4, 2, 3, 3),
    WeightTile(4, 64, 16, 4, 4, 4, 3, 4),
)
#: bwd_data_narrow variants, (input channels per thread CI, voxels per thread VX): CI * VX
#: accumulators.
NARROW_VARIANTS = ((1, 4), (2, 4), (4, 2), (8, 2))
#: The narrow grad_input path takes groups of at most this many input channels (a GEMM tile is at
#: least 16 channels wide) whose weights fit in NARROW_MAX_SMEM.
NARROW_MAX_CI = 8
NARROW_MAX_SMEM = 96 * 1024
#: bwd_data_staged variants, (input channels per thread CI, voxel rows VH and columns VW a thread;
#: a block's tile is 8*VH x 32*VW voxels of one plane): VH*VW*CI accumulators.
STAGED_VARIANTS = (
    (1, 1, 1), (1, 1, 2), (1, 2, 1), (1, 2, 2), (1, 4, 2),
    (2, 1, 1), (2, 1, 2), (2, 2, 1), (2, 2, 2),
    (4, 1, 1), (4, 1, 2), (4, 2, 1), (4, 2, 2),
    (8, 1, 1), (8, 1, 2), (8, 2, 1), (8, 2, 2),
)  # fmt: skip
#: bwd_data_staged's weights and staged boxes of gy stay under this many bytes (three blocks an
#: SM, at least, on an H100).
STAGED_MAX_SMEM = 72 * 1024
#: bwd_data_staged's ring of staged boxes: this many deep.
STAGED_RING = 2


def staged_template(dtype: str, variant: tuple[int, int, int], ring: int = STAGED_RING) -> str:
    """The bwd_data_staged instantiation of ``variant``: registers capped for three blocks an SM
    at 8 channels a thread (32 accumulators), four below."""
    ci, vh, vw = variant
    return f"bwd_data_staged<{CPP_TYPE[dtype]}, {ci}, {vh}, {vw}, {ring}, {3 if ci >= 8 else 4}>"


#: The grad_input GEMM's K loop takes every tap of a BK-channel chunk in turn (True), rather than
#: every channel chunk of a tap (False): neighbouring taps gather neighbouring gy elements.
TAP_INNER = True
THREADS = 256  # bwd_data_narrow, the pack, reduce and bias kernels
#: SMs assumed where no device is named (an H100's count).
SM_COUNT = 132
#: grad_weight splits the voxels so that a block sums at most this many (float32 partial sums of
#: a few thousand products keep the relative error near 1e-6); see pick_splits.
MAX_SPLIT_VOXELS = 16384
#: The grad_weight workspace stays under this many bytes (fewer splits beyond it).
MAX_WORKSPACE = 256 * 1024 * 1024
#: grad_bias: blocks of the first pass, at least (each sums a span of every n's plane).
BIAS_BLOCKS = 2048
BIAS_MIN_SPAN = 4 * THREADS
#: Grid-stride kernels (pack, reduce) launch at most this many blocks.
MAX_STRIDE_BLOCKS = 4096


#: CUDA's limit on gridDim.x.
MAX_GRID_X = 2**31 - 1
#: The kernels keep per-axis coordinates (strided, and offset by the taps), tap indices and a
#: group's channel indices in 32 bits; tensor offsets are 64-bit, so tensors of any element count
#: are computed. A single extent from this size on is refused by check_extents.
MAX_EXTENT = 2**30


def check_extents(p: ConvParams) -> None:
    """Raise ValueError where one extent of ``p`` is too long for the gradient kernels' 32-bit
    coordinates: an axis whose uncropped forward output ((in - 1)*stride + dilation*(kernel - 1)
    + 1) or output reaches MAX_EXTENT, or a group's channels times taps that do."""
    for a, axis in enumerate(("depth", "height", "width")):
        full = (p.in_size[a] - 1) * p.stride[a] + p.dilation[a] * (p.kernel[a] - 1) + 1
        extent = max(full, p.out_size[a])
        if extent >= MAX_EXTENT:
            raise ValueError(
                f"the {axis} axis spans {extent} positions ((in - 1)*stride + dilation*(kernel - "
                f"1) + 1, or the output size): the GPU gradients take at most {MAX_EXTENT - 1}"
            )
    taps = p.kernel[0] * p.kernel[1] * p.kernel[2]
    if 4 * taps >= MAX_EXTENT or p.C_out_g * taps >= MAX_EXTENT or p.C_in_g >= MAX_EXTENT:
        raise ValueError(
            f"C_in/groups={p.C_in_g}, C_out/groups={p.C_out_g} and {taps} kernel taps: the GPU "
            f"gradients take C_in/groups and C_out/groups x taps (and 4 x taps) below {MAX_EXTENT}"
        )


def data_tiles(dtype: str) -> tuple[DataTile, ...]:
    return DATA_TILES_DOUBLE if dtype == "float64" else DATA_TILES_FLOAT


def weight_tiles(dtype: str) -> tuple[WeightTile, ...]:
    return WEIGHT_TILES_DOUBLE if dtype == "float64" else WEIGHT_TILES_FLOAT


@cache
def backward_module(dtype: str) -> KernelModule:
    """Every backward kernel for ``dtype``, in one module (one NVRTC compile per device)."""
    t = CPP_TYPE[dtype]
    names = (
        f"bwd_pack_weights<{t}>",
        f"bwd_reduce_splits<{t}>",
        f"bwd_bias_partial<{t}>",
        f"bwd_bias_final<{t}>",
        *(f"bwd_data_narrow<{t}, {ci}, {vx}>" for ci, vx in NARROW_VARIANTS),
        *(staged_template(dtype, v) for v in STAGED_VARIANTS),
        *(tile.template(dtype) for tile in data_tiles(dtype)),
        *(tile.template(dtype) for tile in weight_tiles(dtype)),
    )
    return KernelModule("backward.cu", names)


def all_backward_modules() -> list[KernelModule]:
    """Every module this file can launch (what the CI compile test builds)."""
    return [backward_module(d) for d in CPP_TYPE]


def tap_table(p: ConvParams) -> np.ndarray:
    """(taps, 4) int32: per tap t = (kd*kH + kh)*kW + kw, the offsets k*dilation - padding along
    d, h, w, then 0."""
    offs = [[k * p.dilation[a] - p.padding[a] for k in range(p.kernel[a])] for a in range(3)]
    rows = [(od, oh, ow, 0) for od in offs[0] for oh in offs[1] for ow in offs[2]]
    return np.array(rows, dtype=np.int32).reshape(-1, 4)


def _blocks(n: int, threads: int = THREADS) -> int:
    return max(1, min(-(-n // threads), MAX_STRIDE_BLOCKS))


# --------------------------------------------------------------------------------------------
# grad_input


def narrow_variant(p: ConvParams) -> tuple[int, int]:
    """The (CI, VX) of bwd_data_narrow for ``p``: the fewest channels per thread covering C_in_g
    (more chunks past NARROW_MAX_CI)."""
    return next((v for v in NARROW_VARIANTS if v[0] >= p.C_in_g), NARROW_VARIANTS[-1])


def narrow_smem(p: ConvParams, dtype: str) -> int:
    taps = p.kernel[0] * p.kernel[1] * p.kernel[2]
    return p.C_out_g * taps * narrow_variant(p)[0] * acc_dtype(dtype).itemsize


def staged_variant(
    p: ConvParams, dtype: str = "float32", max_smem: int = STAGED_MAX_SMEM
) -> tuple[int, int, int]:
    """The (CI, VH, VW) of bwd_data_staged for ``p``: CI as bwd_data_narrow's; of its tiles whose
    shared memory fits (all of them where none does), the largest among those that cover the
    plane with the fewest padded voxels (within 5%).

    Measured on an H100 (2026-11-25, float32): trilinear_x2_depthwise (64 x 64 planes) 16 x 64
    0.252 ms, 32 x 64 0.222; kb72 (24 x 48) 8 x 64 0.343, 16 x 64 0.392; tiny_latency (8 x 8)
    8 x 32 0.022, 16 x 64 0.027.
    """
    ci = narrow_variant(p)[0]
    _, h, w = p.in_size

    def padded(v: tuple[int, int, int]) -> int:
        return -(-h // (8 * v[1])) * 8 * v[1] * -(-w // (32 * v[2])) * 32 * v[2]

    mine = [v for v in STAGED_VARIANTS if v[0] == ci]
    limit = min(max_smem, STAGED_MAX_SMEM)
    mine = [v for v in mine if staged_smem(p, dtype, v) <= limit] or mine
    least = min(padded(v) for v in mine)
    return max((v for v in mine if padded(v) <= 1.05 * least), key=lambda v: (v[1] * v[2], v[1]))


def staged_box(p: ConvParams, vh: int, vw: int) -> tuple[int, int]:
    """(rh, nvec) of bwd_data_staged's staged gy box: the rows that a tile of 8*vh x 32*vw voxels
    reads, and the pieces of 4 columns that hold its columns from the multiple of 4 at or before
    the first (so up to 3 more)."""
    (_, sh, sw), (_, dh, dw), (_, kh, kw) = p.stride, p.dilation, p.kernel
    rh = sh * (8 * vh - 1) + dh * (kh - 1) + 1
    rw = sw * (32 * vw - 1) + dw * (kw - 1) + 1
    return rh, -(-(rw + 3) // 4)


def staged_smem(
    p: ConvParams, dtype: str, variant: tuple[int, int, int], ring: int = STAGED_RING
) -> int:
    """Dynamic shared memory of bwd_data_staged: the chunk's weights (rounded up to 4) and a ring
    of ``ring`` boxes of gy, in the accumulator type. (STAGED_MAX_SMEM keeps a box's pieces,
    which the kernel numbers through a float division, far under 2^22.)"""
    ci, vh, vw = variant
    taps = p.kernel[0] * p.kernel[1] * p.kernel[2]
    rh, nvec = staged_box(p, vh, vw)
    n_wt = -(-(p.C_out_g * taps * ci) // 4) * 4
    return (n_wt + ring * rh * 4 * nvec) * acc_dtype(dtype).itemsize


def staged_tiles(p: ConvParams, variant: tuple[int, int, int]) -> tuple[int, int]:
    """bwd_data_staged's tiles of an input plane: (along h, along w)."""
    _, vh, vw = variant
    return -(-p.in_size[1] // (8 * vh)), -(-p.in_size[2] // (32 * vw))


def staged_grid(p: ConvParams, variant: tuple[int, int, int]) -> tuple[int, int, int]:
    h_tiles, w_tiles = staged_tiles(p, variant)
    return (p.N * p.in_size[0] * h_tiles * w_tiles, p.groups * -(-p.C_in_g // variant[0]), 1)


def _tile_efficiency(tm: int, tn: int) -> float:
    """FMAs per shared-memory word read of a TM x TN register tile, relative to 8x8's."""
    return tm * tn / (tm + tn) / 4


def pick_data_tile(p: ConvParams, dtype: str, sm_count: int = SM_COUNT) -> DataTile:
    """The tile with the least modelled time: padded input channels (BN slots) over the register
    tile's efficiency, stretched where the grid has fewer blocks than the GPU has SMs; then the
    fewest padded output channels (K chunks of BK), then the wider tile, then the deeper chunk
    (BK 16 wherever it pads K no more than BK 8 does: half the barriers and loader set-up per
    FMA). H100, 2026-12-07, BK 8 -> 16 of the same tile: kb58 1.79 -> 1.63 ms, kb61 7.55 -> 6.91,
    kb68 39.0 -> 35.2, kb77 0.97 -> 0.89, unet_k3s2 1.52 -> 1.47, vnet 0.64 -> 0.59; kb70
    (C_out_g 24, which BK 16 pads to 32) keeps BK 8.

    Measured on an H100 (2026-11-24, benchmarks/bench_backward.py --variants): vnet (C_in 256,
    4096 voxels) 128x64 0.62 ms vs 128x128 0.95 (64 blocks); kb58 (C_in 32) 128x32 2.01 ms vs
    256x48 2.55; kb61 (C_in 48) 256x48 7.75 ms vs 128x64 9.26.
    """
    voxels = p.N * p.in_size[0] * p.in_size[1] * p.in_size[2]

    def key(t: DataTile) -> tuple[float, int, int, int]:
        ci_pad = -(-p.C_in_g // t.BN) * t.BN
        blocks = -(-voxels // t.BM) * (ci_pad // t.BN) * p.groups
        cost = ci_pad / _tile_efficiency(t.TM, t.TN) / min(1.0, blocks / sm_count)
        return (cost, -(-p.C_out_g // t.BK) * t.BK, -t.BN, -t.BK)

    return min(data_tiles(dtype), key=key)


@dataclass(frozen=True)
class GradInputPlan:
    """grad_input for one problem: ``path`` "igemm" (``tile``), "staged" or "narrow"
    (``variant``: (CI, VH, VW) or (CI, VX))."""

    p: ConvParams
    dtype: str
    path: str
    grid: tuple[int, int, int]
    tile: DataTile | None = None
    variant: tuple[int, ...] | None = None
    shared_mem: int = 0
    pack_grid: tuple[int, int, int] = (1, 1, 1)
    pads: tuple[int, int] = (0, 0)  # (co_pad, ci_pad) of the packed weights
    tap_inner: bool = TAP_INNER  # the K loop's order: every tap of a channel chunk in turn
    #: staged: the kernel's integer arguments that the problem fixes (ci_chunks, h_tiles,
    #: w_tiles, rh, nvec), and whether gy's rows are whole 4-column pieces (oW % 4 == 0)
    staged_args: tuple[int, ...] = ()
    rows4: bool = False
    geom: DeviceArray = field(default=None, compare=False, repr=False)  # type: ignore[assignment]
    taps: DeviceArray = field(default=None, compare=False, repr=False)  # type: ignore[assignment]
    _per_device: dict = field(default_factory=dict, compare=False, repr=False)

    @staticmethod
    def narrow_eligible(p: ConvParams, dtype: str, max_smem: int = NARROW_MAX_SMEM) -> bool:
        groups_y = p.groups * -(-p.C_in_g // narrow_variant(p)[0])
        return narrow_smem(p, dtype) <= min(max_smem, NARROW_MAX_SMEM) and groups_y <= 65535

    @staticmethod
    def staged_eligible(
        p: ConvParams,
        dtype: str,
        max_smem: int = NARROW_MAX_SMEM,
        variant: tuple[int, int, int] | None = None,
    ) -> bool:
        """Whether bwd_data_staged (``variant``, else the default one) runs ``p``: the weights
        and ring of gy boxes within STAGED_MAX_SMEM and the grid within CUDA's limits. (Any number
        of input channels a group runs, CI at a time; the default choice takes the path for at
        most NARROW_MAX_CI.)"""
        variant = variant or staged_variant(p, dtype, max_smem)
        grid = staged_grid(p, variant)
        return (
            staged_smem(p, dtype, variant) <= min(max_smem, STAGED_MAX_SMEM)
            and grid[0] <= MAX_GRID_X
            and grid[1] <= 65535
        )

    @classmethod
    def build(
        cls,
        p: ConvParams,
        dtype: str,
        path: str | None = None,
        tile: DataTile | None = None,
        max_smem: int = NARROW_MAX_SMEM,
        tap_inner: bool = TAP_INNER,
        sm_count: int = SM_COUNT,
        variant: tuple[int, ...] | None = None,
    ) -> GradInputPlan:
        check_extents(p)
        if path is None:
            if p.C_in_g <= NARROW_MAX_CI and cls.staged_eligible(p, dtype, max_smem):
                path = "staged"
            elif p.C_in_g <= NARROW_MAX_CI and cls.narrow_eligible(p, dtype, max_smem):
                path = "narrow"
            else:
                path = "igemm"
        voxels = p.N * p.in_size[0] * p.in_size[1] * p.in_size[2]
        geom, taps = geometry(p), DeviceArray(tap_table(p))
        if path == "staged":
            tv = tuple(variant) if variant else staged_variant(p, dtype, max_smem)
            if tv not in STAGED_VARIANTS:
                raise ValueError(f"unknown bwd_data_staged variant {variant!r}")
            sv: tuple[int, int, int] = tv  # type: ignore[assignment]  # one of STAGED_VARIANTS
            if not cls.staged_eligible(p, dtype, max_smem, sv):
                raise ValueError(f"the staged grad_input path does not fit {p}")
            grid = staged_grid(p, sv)
            args = (grid[1] // p.groups, *staged_tiles(p, sv), *staged_box(p, sv[1], sv[2]))
            return cls(
                p,
                dtype,
                path,
                grid,
                variant=sv,
                shared_mem=staged_smem(p, dtype, sv),
                staged_args=args,
                rows4=p.out_size[2] % 4 == 0,
                geom=geom,
                taps=taps,
            )
        if path == "narrow":
            if not cls.narrow_eligible(p, dtype, max_smem):
                raise ValueError(f"the narrow grad_input path does not fit {p}")
            ci, vx = narrow_variant(p)
            grid = (max(1, -(-voxels // (vx * THREADS))), p.groups * -(-p.C_in_g // ci), 1)
            if grid[0] > MAX_GRID_X:
                raise ValueError(f"grad_input grid {grid} is too large for {p}")
            return cls(p, dtype, path, grid, variant=(ci, vx), shared_mem=narrow_smem(p, dtype),
                       geom=geom, taps=taps)  # fmt: skip
        if path != "igemm":
            raise ValueError(f"unknown grad_input path {path!r}")
        tile = tile or pick_data_tile(p, dtype, sm_count)
        ci_pad = -(-p.C_in_g // tile.BN) * tile.BN
        co_pad = -(-p.C_out_g // tile.BK) * tile.BK
        grid = (max(1, -(-voxels // tile.BM)), ci_pad // tile.BN, p.groups)
        if grid[0] > MAX_GRID_X or grid[1] > 65535 or grid[2] > 65535:
            raise ValueError(f"grad_input grid {grid} is too large for {p}")
        n_taps = p.kernel[0] * p.kernel[1] * p.kernel[2]
        pack_grid = (_blocks(p.groups * n_taps * co_pad * ci_pad), 1, 1)
        return cls(p, dtype, path, grid, tile=tile, pack_grid=pack_grid, pads=(co_pad, ci_pad),
                   tap_inner=tap_inner, geom=geom, taps=taps)  # fmt: skip

    def kernels(self) -> list[tuple[KernelModule, str]]:
        m = backward_module(self.dtype)
        t = CPP_TYPE[self.dtype]
        if self.path == "narrow":
            ci, vx = self.variant  # type: ignore[misc]
            return [(m, f"bwd_data_narrow<{t}, {ci}, {vx}>")]
        if self.path == "staged":
            return [(m, staged_template(self.dtype, self.variant))]  # type: ignore[arg-type]
        return [(m, f"bwd_pack_weights<{t}>"), (m, self.tile.template(self.dtype))]  # type: ignore[union-attr]

    def launch(self, gy: Any, w: Any, gx: Any) -> None:
        import cupy

        def make() -> tuple:
            fns = [get_launcher(m, name, self.shared_mem) for m, name in self.kernels()]
            return fns, ptr(self.geom.get()), ptr(self.taps.get())

        fns, geom, taps = on_device(self._per_device, make)
        if self.path == "narrow":
            ci_chunks = self.grid[1] // self.p.groups
            args = (gy.data.ptr, w.data.ptr, gx.data.ptr, geom, ci_chunks)
            fns[0](self.grid, (THREADS, 1, 1), args, self.shared_mem)
            return
        if self.path == "staged":
            # 4-column pieces of gy at once (16 bytes; 8 for the 16-bit types) where its rows
            # allow them
            align = 16 if self.dtype in ("float32", "float64") else 8
            vec = self.rows4 and gy.data.ptr % align == 0
            args = (gy.data.ptr, w.data.ptr, gx.data.ptr, geom, *self.staged_args, int(vec))
            fns[0](self.grid, (THREADS, 1, 1), args, self.shared_mem)
            return
        co_pad, ci_pad = self.pads
        n_taps = self.p.kernel[0] * self.p.kernel[1] * self.p.kernel[2]
        wp = cupy.empty(self.p.groups * n_taps * co_pad * ci_pad, dtype=acc_dtype(self.dtype))
        order = int(self.tap_inner)
        bk = self.tile.BK  # type: ignore[union-attr]
        fns[0](self.pack_grid, (THREADS, 1, 1),
               (w.data.ptr, wp.data.ptr, geom, co_pad, ci_pad, bk, order))  # fmt: skip
        threads = self.tile.threads()  # type: ignore[union-attr]
        args = (gy.data.ptr, wp.data.ptr, gx.data.ptr, taps, geom, n_taps, co_pad, ci_pad, order)
        fns[1](self.grid, (threads, 1, 1), args)


# --------------------------------------------------------------------------------------------
# grad_weight

#: A gathered gy or x element costs about this many FMAs in the tile picker's model.
LOAD_COST = 8


def pick_weight_tile(p: ConvParams, dtype: str) -> WeightTile:
    """The tile with the least modelled work per voxel: FMA slots (padded rows x padded columns)
    over the register tile's efficiency, plus LOAD_COST per element gathered into shared memory
    (each x row once per column tile, each gy column once per row tile); the wider tile on a tie.

    Measured on an H100 (2026-11-24, benchmarks/bench_backward.py --variants): kb70 (C_in 48,
    648 columns) 64x128 28.8 ms vs 16x256 34.3 and 32x128 35.3; kb58 (C_in 32) 32x128 3.2 ms vs
    16x256 4.1 and 64x128 5.1; kb73 (8 channels a group) 8x256 2.0 ms vs 16x256 2.4.
    """
    cols = p.C_out_g * p.kernel[0] * p.kernel[1] * p.kernel[2]

    def key(t: WeightTile) -> tuple[float, int]:
        rows_pad = -(-p.C_in_g // t.BM) * t.BM
        cols_pad = -(-cols // t.BN) * t.BN
        loads = rows_pad * (cols_pad // t.BN) + cols_pad * (rows_pad // t.BM)
        fmas = rows_pad * cols_pad / _tile_efficiency(t.TM, t.TN)
        return (fmas + LOAD_COST * loads, -t.BN)

    return min(weight_tiles(dtype), key=key)


#: Splits enough for this many waves of resident blocks (SM_COUNT x MINB blocks a wave; a fixed
#: SM count, so that results do not depend on the GPU)...
WEIGHT_WAVES = 8
#: ...unless the workspace (written, then read) grows past one element per this many MACs:
#: splits <= MACs / (WS_MACS_PER_ELEMENT * workspace elements per split).
WS_MACS_PER_ELEMENT = 2048
#: Problems under this many MACs are latency-bound: there the splits fill the GPU regardless.
SMALL_MACS = 10**9


def pick_splits(p: ConvParams, dtype: str, tile: WeightTile) -> int:
    """How many blocks split each tile's voxels.

    At least enough that none sums more than MAX_SPLIT_VOXELS (accuracy); beyond that, enough for
    WEIGHT_WAVES waves of blocks, as far as the workspace traffic allows; never more than there
    are row chunks, than the workspace cap allows, or than the grid's z limit (groups x splits
    <= 65535). Measured on an H100 (2026-11-24, --variants): kb61 (11 tiles) 512 splits 15.6 ms,
    128 splits 16.2, 32 splits 22.4; unet_k2s2 (65536 workspace elements a split, 4.3 GMAC)
    32 splits 0.40 ms, 128 0.43, 512 0.52; vnet (2.1M elements a split, 8.6 GMAC) 1 split
    0.75 ms, 4 0.80, 16 0.88. Where the tiles alone fill a wave, only the split that evens out
    the last wave is taken (vnet: one).
    """
    cols = p.C_out_g * p.kernel[0] * p.kernel[1] * p.kernel[2]
    w_chunks = -(-p.in_size[2] // tile.BK)
    row_chunks = p.N * p.in_size[0] * p.in_size[1] * w_chunks
    tiles = -(-cols // tile.BN) * -(-p.C_in_g // tile.BM) * p.groups
    accuracy = -(-row_chunks * tile.BK // MAX_SPLIT_VOXELS)
    fill = -(-WEIGHT_WAVES * SM_COUNT * tile.MINB // tiles)
    elements = p.C_in * cols  # of the workspace, per split
    macs = p.N * p.in_size[0] * p.in_size[1] * p.in_size[2] * elements
    if macs >= SMALL_MACS:
        fill = min(fill, max(1, macs // (WS_MACS_PER_ELEMENT * elements)))
    slots = SM_COUNT * tile.MINB
    if 10 * tiles >= 9 * slots:
        # The tiles alone (nearly) fill a wave: splits then only cut the same work into more,
        # shorter waves and add the workspace's traffic and the reduction. Split only where
        # that evens out the last wave (blocks of 1/s of a tile's voxels, in ceil(s*tiles/slots)
        # waves). vnet (128 tiles, 132 slots): 1 split 0.661 ms, 2 0.693, 4 0.728 (H100).
        fill = min(range(1, fill + 1), key=lambda s: (-(-s * tiles // slots) / s, s))
    splits = max(accuracy, fill)
    per_split = elements * acc_dtype(dtype).itemsize
    splits = min(splits, max(1, MAX_WORKSPACE // per_split), row_chunks, 65535 // p.groups)
    return max(1, splits)


@dataclass(frozen=True)
class GradWeightPlan:
    p: ConvParams
    dtype: str
    tile: WeightTile
    splits: int
    grid: tuple[int, int, int]
    reduce_grid: tuple[int, int, int]
    geom: DeviceArray = field(compare=False, repr=False)
    taps: DeviceArray = field(compare=False, repr=False)
    _per_device: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def build(
        cls, p: ConvParams, dtype: str, tile: WeightTile | None = None, splits: int | None = None
    ) -> GradWeightPlan:
        check_extents(p)
        tile = tile or pick_weight_tile(p, dtype)
        splits = splits or pick_splits(p, dtype, tile)
        if p.groups * splits > 65535 or -(-p.C_in_g // tile.BM) > 65535:
            raise ValueError(f"grad_weight grid is too large for {p} with {splits} splits")
        cols = p.C_out_g * p.kernel[0] * p.kernel[1] * p.kernel[2]
        grid = (-(-cols // tile.BN), -(-p.C_in_g // tile.BM), p.groups * splits)
        reduce_grid = (_blocks(p.C_in * cols), 1, 1)
        return cls(
            p, dtype, tile, splits, grid, reduce_grid, geometry(p), DeviceArray(tap_table(p))
        )

    def direct(self) -> bool:
        """One split in the accumulator dtype: the GEMM writes the result, no workspace."""
        return self.splits == 1 and acc_dtype(self.dtype) == np.dtype(self.dtype)

    def kernels(self) -> list[tuple[KernelModule, str]]:
        m = backward_module(self.dtype)
        return [
            (m, self.tile.template(self.dtype)),
            (m, f"bwd_reduce_splits<{CPP_TYPE[self.dtype]}>"),
        ]

    def launch(self, x: Any, gy: Any, gw: Any) -> None:
        import cupy

        def make() -> tuple:
            fns = [get_launcher(m, name) for m, name in self.kernels()]
            return fns, ptr(self.geom.get()), ptr(self.taps.get())

        (gemm, reduce), geom, taps = on_device(self._per_device, make)
        count = gw.size
        ws = gw if self.direct() else cupy.empty(self.splits * count, dtype=acc_dtype(self.dtype))
        gemm(self.grid, (self.tile.threads(), 1, 1),
             (x.data.ptr, gy.data.ptr, ws.data.ptr, taps, geom, self.splits))  # fmt: skip
        if not self.direct():
            args = (ws.data.ptr, gw.data.ptr, count, self.splits)
            reduce(self.reduce_grid, (THREADS, 1, 1), args)


# --------------------------------------------------------------------------------------------
# grad_bias


@dataclass(frozen=True)
class GradBiasPlan:
    p: ConvParams
    dtype: str
    span: int  # output voxels per block of the first pass
    parts: int  # blocks per channel of the first pass
    geom: DeviceArray = field(compare=False, repr=False)
    _per_device: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def build(cls, p: ConvParams, dtype: str) -> GradBiasPlan:
        if p.C_out > MAX_GRID_X:  # the first pass's grid has a block a channel along x
            raise ValueError(f"grad_bias takes at most {MAX_GRID_X} output channels, got {p.C_out}")
        vol = p.out_size[0] * p.out_size[1] * p.out_size[2]
        parts = max(1, min(-(-BIAS_BLOCKS // p.C_out), -(-vol // BIAS_MIN_SPAN), 65535))
        span = -(-vol // parts)
        return cls(p, dtype, span, -(-vol // span), geometry(p))

    def kernels(self) -> list[tuple[KernelModule, str]]:
        m = backward_module(self.dtype)
        t = CPP_TYPE[self.dtype]
        return [(m, f"bwd_bias_partial<{t}>"), (m, f"bwd_bias_final<{t}>")]

    def launch(self, gy: Any, gb: Any) -> None:
        import cupy

        def make() -> tuple:
            fns = [get_launcher(m, name) for m, name in self.kernels()]
            return fns, ptr(self.geom.get())

        (partial, final), geom = on_device(self._per_device, make)
        part = cupy.empty(self.p.C_out * self.parts, dtype=acc_dtype(self.dtype))
        partial((self.p.C_out, self.parts, 1), (THREADS, 1, 1),
                (gy.data.ptr, part.data.ptr, geom, self.span))  # fmt: skip
        final((self.p.C_out, 1, 1), (THREADS, 1, 1), (part.data.ptr, gb.data.ptr, self.parts))


# --------------------------------------------------------------------------------------------
# Entry points


@lru_cache(maxsize=256)
def input_plan(
    p: ConvParams,
    dtype: str,
    path: str | None = None,
    tile: DataTile | None = None,
    max_smem: int = NARROW_MAX_SMEM,
    tap_inner: bool = TAP_INNER,
    sm_count: int = SM_COUNT,
    variant: tuple[int, ...] | None = None,
) -> GradInputPlan:
    """The cached grad_input plan for a device with ``max_smem`` bytes of shared memory a block
    and ``sm_count`` SMs; ``path``, ``tile``, ``tap_inner`` and ``variant`` (bwd_data_staged's)
    force a choice (tests, benchmarks)."""
    return GradInputPlan.build(p, dtype, path, tile, max_smem, tap_inner, sm_count, variant)


@lru_cache(maxsize=256)
def weight_plan(
    p: ConvParams, dtype: str, tile: WeightTile | None = None, splits: int | None = None
) -> GradWeightPlan:
    """The cached grad_weight plan: ``tile`` and ``splits`` force a choice (tests, benchmarks)."""
    return GradWeightPlan.build(p, dtype, tile, splits)


@lru_cache(maxsize=256)
def bias_plan(p: ConvParams, dtype: str) -> GradBiasPlan:
    """The cached grad_bias plan."""
    return GradBiasPlan.build(p, dtype)


_device_limits: dict[int, tuple[int, int]] = {}


def device_limits(device_id: int) -> tuple[int, int]:
    """(opt-in shared memory a block, SM count) of a device, looked up once."""
    limits = _device_limits.get(device_id)
    if limits is None:
        from ._gpu import device_info

        info = device_info(device_id)
        limits = _device_limits.setdefault(
            device_id, (info.max_shared_per_block_optin, info.sm_count)
        )
    return limits


def _on_device(a: Any, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` with ``a``'s device current (switched to only when needed: a few us)."""
    import cupy

    dev = a.data.device_id
    if cupy.cuda.runtime.getDevice() == dev:
        return fn(*args)
    with cupy.cuda.Device(dev):
        return fn(*args)


def _as5(name: str, a: Any, shape5: tuple[int, ...], dtype: Any = None) -> Any:
    """``a`` as a C-contiguous 5-D array of ``shape5`` (it may come unbatched, without N)."""
    import cupy

    if tuple(a.shape) != shape5:
        if tuple(a.shape) != shape5[1:] or shape5[0] != 1:
            raise ValueError(f"{name} must have shape {shape5}, got {tuple(a.shape)}")
        a = a.reshape(shape5)
    if dtype is not None and a.dtype != dtype:
        raise TypeError(f"{name} has dtype {a.dtype} but the gradient is of dtype {dtype}")
    return a if a.flags.c_contiguous else cupy.ascontiguousarray(a)


def _w_shape(p: ConvParams) -> tuple[int, ...]:
    return (p.C_in, p.C_out_g, *p.kernel)


def grad_input(gy: Any, w: Any, p: ConvParams, precision: str = "highest") -> Any:
    """Gradient of ``conv_transpose3d`` with respect to its input ``x``.

    Parameters
    ----------
    gy : cupy.ndarray
        Gradient of the result, ``p.out_shape5`` = (N, C_out, oD, oH, oW).
    w : cupy.ndarray
        The weights, (C_in, C_out/groups, kD, kH, kW), of ``gy``'s dtype and device.
    p : ConvParams
        The validated forward problem.
    precision : {"highest", "high", "medium"}
        float32 policy; every value runs IEEE float32 for now.

    Returns
    -------
    cupy.ndarray
        ``p.x_shape5`` = (N, C_in, D, H, W), C-contiguous, of ``gy``'s dtype: the same as
        ``torch.nn.functional.conv3d(gy, w, None, stride, padding, dilation, groups)``.

    Examples
    --------
    >>> import cupy as cp
    >>> from cupyconvt._params import ConvParams
    >>> p = ConvParams.from_args((2, 4, 5, 5, 5), (4, 3, 3, 3, 3), stride=2)
    >>> gy = cp.ones(p.out_shape5, cp.float32)
    >>> grad_input(gy, cp.ones((4, 3, 3, 3, 3), cp.float32), p).shape
    (2, 4, 5, 5, 5)
    """
    resolve_precision(precision)
    return _on_device(gy, _grad_input, gy, w, p)


def _grad_input(gy: Any, w: Any, p: ConvParams) -> Any:
    import cupy

    gy = _as5("gy", gy, p.out_shape5)
    w = _as5("w", w, _w_shape(p), gy.dtype)
    gx = cupy.empty(p.x_shape5, dtype=gy.dtype)
    if gx.size:
        max_smem, sm_count = device_limits(gy.data.device_id)
        plan = input_plan(p, dtype_name(gy.dtype), None, None, max_smem, TAP_INNER, sm_count)
        plan.launch(gy, w, gx)
    return gx


def grad_weight(x: Any, gy: Any, p: ConvParams, precision: str = "highest") -> Any:
    """Gradient of ``conv_transpose3d`` with respect to its weights ``w``.

    Parameters
    ----------
    x : cupy.ndarray
        The forward input, ``p.x_shape5`` = (N, C_in, D, H, W).
    gy : cupy.ndarray
        Gradient of the result, ``p.out_shape5``, of ``x``'s dtype and device.
    p : ConvParams
        The validated forward problem.
    precision : {"highest", "high", "medium"}
        float32 policy; every value runs IEEE float32 for now.

    Returns
    -------
    cupy.ndarray
        (C_in, C_out/groups, kD, kH, kW), C-contiguous, of ``x``'s dtype:
        ``gw[g*C_in_g + ci, j, k] = sum_{n, i} x[n, g*C_in_g + ci, i] * gy[n, g*C_out_g + j,
        i*stride - padding + k*dilation]``, summed in a fixed order (bitwise repeatable).

    Examples
    --------
    >>> import cupy as cp
    >>> from cupyconvt._params import ConvParams
    >>> p = ConvParams.from_args((2, 4, 5, 5, 5), (4, 3, 3, 3, 3), stride=2)
    >>> x, gy = cp.ones(p.x_shape5, cp.float32), cp.ones(p.out_shape5, cp.float32)
    >>> grad_weight(x, gy, p).shape
    (4, 3, 3, 3, 3)
    """
    resolve_precision(precision)
    return _on_device(x, _grad_weight, x, gy, p)


def _grad_weight(x: Any, gy: Any, p: ConvParams) -> Any:
    import cupy

    x = _as5("x", x, p.x_shape5)
    gy = _as5("gy", gy, p.out_shape5, x.dtype)
    if x.size == 0:  # an empty batch: nothing to sum
        return cupy.zeros(_w_shape(p), dtype=x.dtype)
    gw = cupy.empty(_w_shape(p), dtype=x.dtype)
    weight_plan(p, dtype_name(x.dtype)).launch(x, gy, gw)
    return gw


def grad_bias(gy: Any, p: ConvParams) -> Any:
    """Gradient of ``conv_transpose3d`` with respect to its bias: ``gy`` summed over batch and
    space.

    Parameters
    ----------
    gy : cupy.ndarray
        Gradient of the result, ``p.out_shape5``.
    p : ConvParams
        The validated forward problem.

    Returns
    -------
    cupy.ndarray
        (C_out,), of ``gy``'s dtype; float16/bfloat16 are summed in float32, float64 in float64,
        in a fixed order (bitwise repeatable).

    Examples
    --------
    >>> import cupy as cp
    >>> from cupyconvt._params import ConvParams
    >>> p = ConvParams.from_args((2, 4, 5, 5, 5), (4, 3, 3, 3, 3), stride=2)
    >>> grad_bias(cp.ones(p.out_shape5, cp.float32), p)
    array([2662., 2662., 2662.], dtype=float32)
    """
    return _on_device(gy, _grad_bias, gy, p)


def _grad_bias(gy: Any, p: ConvParams) -> Any:
    import cupy

    gy = _as5("gy", gy, p.out_shape5)
    if gy.size == 0:
        return cupy.zeros(p.C_out, dtype=gy.dtype)
    gb = cupy.empty(p.C_out, dtype=gy.dtype)
    bias_plan(p, dtype_name(gy.dtype)).launch(gy, gb)
    return gb
