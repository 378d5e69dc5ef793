"""The tensor-core family (kernels/tc.cu): one mma.sync implicit GEMM per output stride phase on a
channels-last input, for float16/bfloat16 and for float32 under the "high" (3xTF32) and
"medium" (TF32) precisions; plus the NCDHW <-> NDHWC transposes (kernels/layout.cu)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace
from functools import cache
from typing import Any

import numpy as np

from ._compile import BASE_OPTIONS, KernelModule, get_launcher
from ._igemm import MAX_GRID_X, fits_int32, phase_voxels
from ._launch import ptr
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
    ring, MINB resident blocks per SM asked of ptxas. ``halo``: the block owns a box of phase
    voxels and stages its whole input tile once (every tap reads a shifted view of it); else it
    owns BM consecutive phase voxels and gathers their rows per (tap, channel chunk)."""

    BM: int
    BN: int
    BK: int
    WM: int
    WN: int
    STAGES: int
    MINB: int = 2
    halo: bool = False
    #: Hopper warpgroup MMAs (kernels/wgmma.cu, sm_90a, 16-bit types): a halo tile of boxes of
    #: 8 x 8 x (BM / 64) voxels computed by two warpgroups; WM and WN are not used.
    wg: bool = False
    KT: int = 1  # wgmma tiles: (tap, BK channels) units of weights a ring slot holds
    #: wgmma tiles: the most input channels one staged tile holds (0: as many as fit). Fewer
    #: channels a tile than C_in_g make the block restage its tile per channel tile.
    CT: int = 0

    def threads(self) -> int:
        return 256 if self.wg else self.WM * self.WN * 32

    def template(self, dtype: str, mode: int, channels_last_out: bool) -> str:
        flag = {True: "true", False: "false"}
        if self.wg:
            return (
                f"wg_conv_transpose3d<{CPP_TYPE[dtype]}, {self.BN}, {self.BK}, {self.BM // 128}, "
                f"{self.KT}, {self.STAGES}, {self.MINB}, {flag[channels_last_out]}>"
            )
        return (
            f"tc_conv_transpose3d<{CPP_TYPE[dtype]}, {mode}, {self.BM}, {self.BN}, {self.BK}, "
            f"{self.WM}, {self.WN}, {self.STAGES}, {self.MINB}, {flag[channels_last_out]}, "
            f"{flag[self.halo]}>"
        )

    def smem_bytes(self, itemsize: int, halo_elems: int = 0, taps: int = 0) -> int:
        """Dynamic shared memory: the input tile (``halo_elems`` elements) or the A ring, then
        the B ring; the float C tile of the epilogue reuses it."""
        vec = 16 // itemsize
        a = halo_elems if self.halo else self.STAGES * self.BM * (self.BK + vec)
        pad = 0 if self.wg else vec  # wgmma's canonical layout has no padded rows
        ring = (a + self.STAGES * self.KT * self.BN * (self.BK + pad)) * itemsize
        if self.wg:
            ring += 4 * taps  # each tap's shift of the input tile
        c_tile = 4 * max(self.BN * (self.BM + 4), self.BM * (self.BN + 4))
        return max(ring, c_tile)

    def name(self) -> str:
        if self.wg:
            return f"{self.BM}x{self.BN}k{self.BK}t{self.KT}w" + (f"c{self.CT}" if self.CT else "")
        return f"{self.BM}x{self.BN}k{self.BK}{'h' if self.halo else ''}"


def _shapes(bk: int) -> tuple[TcTile, ...]:
    """Tile shapes for one K chunk, each gathering per tap and staging a halo tile. Warp tiles of
    64 x 32 (128 x 64 in 2 x 2 warps, three blocks an SM: 212 TFLOP/s fp16 on kb68 against 166
    for 256 x 64 in 4 x 2 warps, one block an SM) or 32 x 16-48 (256 x BN in 8 x 1 warps).
    benchmarks/tc_variants.py, H100, 2026-11-24."""
    shapes = (
        TcTile(128, 128, bk, 2, 4, 4),
        TcTile(128, 64, bk, 2, 2, 4, 3),
        TcTile(256, 48, bk, 8, 1, 3),
        TcTile(256, 32, bk, 8, 1, 3),
        TcTile(256, 24, bk, 8, 1, 3),
        TcTile(256, 16, bk, 8, 1, 3),
    )
    # A gathering block keeps 64-element chunks' row state in registers: it spills (ptxas -v).
    gather = shapes if bk <= 32 else ()
    return gather + tuple(replace(t, halo=True) for t in shapes)


#: K chunks (elements): 2 to 4 MMA k-steps a barrier; the smaller ones where C_in_g is not a
#: multiple of the larger (C_in_g = 48: no padded channels with 16).
CHUNKS = {2: (64, 32, 16), 4: (16, 8)}


def tc_tiles(dtype: str) -> tuple[TcTile, ...]:
    itemsize = 4 if dtype == "float32" else 2
    return tuple(t for bk in CHUNKS[itemsize] for t in _shapes(bk))


#: Warpgroup-MMA tiles (kernels/wgmma.cu): wgmma widths BN, K chunks BK, d slices per
#: warpgroup BM / 128, a 4-deep weight ring. Tiles of at most 64 accumulators a thread are
#: built for two blocks an SM (128 registers, no spills; wider ones spill there), which they
#: get where their shared memory allows (float16, H100, 2026-11-25, ms NCDHW / NDHWC, one block
#: against two: unet_k3s2 0.92 / 0.74 against 0.74 / 0.64, kb77 0.87 / 0.56 against 0.71 / 0.39;
#: kb58, whose blocks fit twice either way, unchanged).
WG_BN = (16, 24, 32, 48, 64, 96, 128)
WG_TILES = tuple(
    TcTile(128 * mw, bn, bk, 8, 1, 4, 2 if bn * mw <= 128 else 1, halo=True, wg=True)
    for bn in WG_BN
    for bk in (64, 32, 16)
    for mw in (2, 4)
    if bn * mw <= 256  # accumulators: BN * MW / 2 registers a thread
)
#: wgmma needs sm_90a: the kernels are built for it (given this beside CuPy's -arch=sm_90, NVRTC
#: 13.0 builds for sm_90a, in either order) and run on compute capability 9.0 alone.
WG_OPTIONS = (*BASE_OPTIONS, "--gpu-architecture=sm_90a")
WG_CC = 90


@cache
def tc_module(dtype: str, mode: int, tile: TcTile) -> KernelModule:
    """One module per tile (the weight pack, which also transposes an NCDHW x, and both output
    layouts): a first call compiles only the tile it runs."""
    return KernelModule(
        "wgmma.cu" if tile.wg else "tc.cu",
        (
            f"tc_prep<{CPP_TYPE[dtype]}>",
            tile.template(dtype, mode, False),
            tile.template(dtype, mode, True),
        ),
        WG_OPTIONS if tile.wg else BASE_OPTIONS,
    )


def wg_tiles(dtype: str) -> tuple[TcTile, ...]:
    """The wgmma tiles (16-bit types only)."""
    return WG_TILES if dtype in ("float16", "bfloat16") else ()


def all_tc_modules() -> list[KernelModule]:
    return [
        tc_module(dtype, mode, tile)
        for (dtype, _), mode in MODES.items()
        for tile in tc_tiles(dtype) + wg_tiles(dtype)
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
    fn = get_launcher(layout_module(), f"batched_transpose<{_BITS[src.dtype.itemsize]}>")
    grid = (-(-cols // 64), min(-(-rows // 64), 65535), min(batch, 65535))
    fn(grid, (TRANSPOSE_THREADS, 1, 1), (src.data.ptr, dst.data.ptr, batch, rows, cols))


def prep_transpose_grid(batch: int, rows: int, cols: int, pack_blocks: int) -> tuple[int, int, int]:
    """Blocks (along x, rows, batches) of the transpose that ``tc_prep`` runs after its
    ``pack_blocks`` (kernels/tc_shared.cuh), all in one 1D grid of at most 2^31 - 1 blocks; rows
    and batches past the grid are looped over. (0, 0, 0) where the column tiles alone do not
    fit: the caller transposes in a launch of its own."""
    limit = MAX_GRID_X - pack_blocks
    tx = -(-cols // 64)
    if batch * rows * cols == 0 or tx > limit:
        return (0, 0, 0)
    ty = min(-(-rows // 64), 65535, limit // tx)
    tz = min(batch, 65535, limit // (tx * ty))
    return (tx, ty, tz)


def channels_last_input(x: Any, p: ConvParams, channels_last: bool, storage: np.dtype) -> Any:
    """x as the tensor-core kernels read it: channels-last and 16-byte aligned. An NDHWC x is
    used as it is, or copied where it starts off a 16-byte boundary; an NCDHW x is transposed
    into a workspace of ``storage`` elements."""
    import cupy

    if channels_last and x.data.ptr % 16 == 0:
        return x
    if channels_last:
        xt = cupy.empty_like(x)
        xt[...] = x
        return xt
    spatial = p.in_size[0] * p.in_size[1] * p.in_size[2]
    xt = cupy.empty(p.N * spatial * p.C_in, dtype=storage)
    transpose(x, xt, p.N, p.C_in, spatial)
    return xt


PACK_THREADS = 256
#: The smallest BM of any tile: phase voxels per gathering block.
MIN_BM = min(t.BM for itemsize in CHUNKS for bk in CHUNKS[itemsize] for t in _shapes(bk))
#: Shared memory a halo block may take: two blocks an SM on an H100. (One block an SM with a
#: bigger tile measured slower than gathering on kb61, kb70 and unet_k3s2 in float32.)
HALO_SMEM = (112 * 1024,)
#: Cost of staging one input element relative to one MMA multiply-add (rates per SM, H100:
#: ~1024 fp16 MACs a cycle from mma.sync against ~32 16-bit elements a cycle from L2).
HALO_LOAD_COST = 32


@dataclass(frozen=True)
class HaloBox:
    """The box of phase voxels a halo block owns and the input tile it stages."""

    box: tuple[int, int, int]  # TD, TH, TW
    counts: tuple[int, int, int]  # boxes per sample along d, h, w
    tile: tuple[int, int, int]  # HD, HH, HW: the box plus the largest tap-offset span
    pitch: (
        int  # elements per staged voxel (C_in_g padded, bank-conflict free); wgmma: voxels a plane
    )
    planes: int = 0  # wgmma tiles: planes of 8 channels a staged tile, `pitch` voxels of 16 bytes

    def elems(self) -> int:
        if self.planes:
            return self.planes * self.pitch * 8
        return self.tile[0] * self.tile[1] * self.tile[2] * self.pitch


def _spans(table: np.ndarray) -> tuple[list[tuple[int, int, int]], tuple[int, int, int]]:
    """Per phase, the smallest tap offset along each axis; and the largest span over phases."""
    mins, span = [], [0, 0, 0]
    for row in table:
        taps = int(row[6])
        offs = row[PHASE_HDR : PHASE_HDR + 4 * taps].reshape(taps, 4)[:, :3]
        lo = offs.min(axis=0) if taps else np.zeros(3, np.int64)
        hi = offs.max(axis=0) if taps else np.zeros(3, np.int64)
        mins.append(tuple(int(v) for v in lo))
        span = [max(s_, int(h_ - l_)) for s_, h_, l_ in zip(span, hi, lo, strict=True)]
    return mins, (span[0], span[1], span[2])


def choose_box(
    p: ConvParams, table: np.ndarray, tile: TcTile, itemsize: int, ci_pad: int, co_pad: int
) -> HaloBox | None:
    """The box shape (TD*TH*TW = BM) of least estimated cost whose tile fits in HALO_SMEM, or
    None. Cost per channel: MMAs over every box voxel (partial boxes included) of every tap,
    plus HALO_LOAD_COST per staged input voxel."""
    if tile.wg:
        return _wg_box(p, table, tile, itemsize, ci_pad)
    for limit in HALO_SMEM:
        box = _best_box(p, table, tile, itemsize, ci_pad, co_pad, limit)
        if box is not None:
            return box
    return None


def _best_box(
    p: ConvParams, table: np.ndarray, tile: TcTile, itemsize: int, ci_pad: int, co_pad: int,
    limit: int,
) -> HaloBox | None:  # fmt: skip
    _, span = _spans(table)
    vec = 16 // itemsize
    pitch = ci_pad + vec  # 16-byte rows an odd number of 16-byte units apart: conflict-free
    qmax = [max(int(r[3 + a]) for r in table) for a in range(3)]
    best, best_cost = None, None
    for e in itertools.product(range(8), repeat=3):
        box = tuple(2**v for v in e)
        if box[0] * box[1] * box[2] != tile.BM or box[2] < 4:
            continue
        hd, hh, hw = (b + s for b, s in zip(box, span, strict=True))
        hb = HaloBox(box, (0, 0, 0), (hd, hh, hw), pitch)
        if tile.smem_bytes(itemsize, hb.elems()) > limit:
            continue
        counts = tuple(-(-qmax[a] // box[a]) for a in range(3))
        if p.N * counts[0] * counts[1] * counts[2] > MAX_GRID_X:  # the grid's x: one box a block
            continue
        cost = 0
        for row in table:
            q, taps = row[3:6], int(row[6])
            n = p.N
            for a in range(3):
                n *= -(-int(q[a]) // box[a])
            cost += n * (taps * tile.BM * min(co_pad, tile.BN) + HALO_LOAD_COST * hd * hh * hw)
        if best_cost is None or cost < best_cost:
            best, best_cost = replace(hb, counts=counts), cost
    return best


#: Shared memory a wgmma block may take (one block an SM; an H100 has 227 KiB).
WG_SMEM = 200 * 1024


def _wg_box(
    p: ConvParams, table: np.ndarray, tile: TcTile, itemsize: int, ci_pad: int
) -> HaloBox | None:
    """The wgmma tile's box, 8 x 8 x (BM / 64) phase voxels (w, h, d), and its input tile stored
    as planes of 8 channels at an odd pitch (kernels/wgmma.cu), or None if it does not fit. The
    tile holds the most channels that fit (at most ``tile.CT`` where set): all of ci_pad, else
    ci_pad / k for the smallest k that divides ci_pad / BK (kernels/wgmma.cu stages it k times;
    only with one unit of weights a ring slot, KT = 1)."""
    _, span = _spans(table)
    box = (tile.BM // 64, 8, 8)
    hd, hh, hw = (b + s_ for b, s_ in zip(box, span, strict=True))
    pitch = hd * hh * hw | 1
    units, max_taps = ci_pad // tile.BK, int(table[:, 6].max())
    for k in range(1, units + 1 if tile.KT == 1 else 2):
        ct = ci_pad // k
        if units % k or (tile.CT and ct > tile.CT):
            continue
        hb = HaloBox(box, (0, 0, 0), (hd, hh, hw), pitch, ct // 8)
        if tile.smem_bytes(itemsize, hb.elems(), max_taps) <= WG_SMEM:
            break
    else:
        return None
    qmax = [max(int(r[3 + a]) for r in table) for a in range(3)]
    counts = (-(-qmax[0] // box[0]), -(-qmax[1] // box[1]), -(-qmax[2] // box[2]))
    if p.N * counts[0] * counts[1] * counts[2] > MAX_GRID_X:
        return None
    return replace(hb, counts=counts)


#: 16-bit halo tiles take the deepest K chunk that pads C_in_g by at most a third (and fits):
#: fewer barriers per staged tile paid for more than the padded MMAs (float16, H100, 2026-11-24,
#: NCDHW / NDHWC ms: kb70 C_in_g 48, 64 against 16: 4.31 / 3.48 against 5.05 / 3.84; kb61
#: 1.98 / 1.70 against 2.02 / 1.76); doubling K (kb77, C_in_g 32: 0.94 against 0.76) lost.
DEEP_K_MAX_PAD = 4 / 3


#: A wgmma box 8 deep (4 d slices a warpgroup) rather than 4 unless its depth pads the phase
#: volume's by this much more: deeper boxes halve the blocks and their staging and epilogues
#: (float16 NDHWC, H100, 2026-11-24, ms, 8 deep against 4: kb68 3.80 against 4.29, kb70 3.00
#: against 3.57, unet_k3s2 0.62 against 0.69; kb58, whose 18 output planes pad to 24 against 20:
#: 0.70 against 0.59).
WG_DEEP_MAX_PAD = 1.15


def pick_wg_tile(p: ConvParams, dtype: str) -> TcTile | None:
    """The wgmma tile for a 16-bit problem, or None where its input tile does not fit: the
    narrowest width covering C_out_g (128 at most), the deepest K chunk dividing C_in_g (the
    least padding of the staged tile; 16 where none does), and an 8- or 4-deep box
    (WG_DEEP_MAX_PAD). benchmarks/tc_variants.py --wgmma times the others."""
    if dtype not in ("float16", "bfloat16"):
        return None
    table, _ = phase_table(p)
    bn = min(b for b in WG_BN if b >= min(p.C_out_g, WG_BN[-1]))
    bk = next((k for k in (64, 32, 16) if p.C_in_g % k == 0), 16)
    qd = max(int(r[3]) for r in table)
    deep_ok = -(-qd // 8) * 8 <= WG_DEEP_MAX_PAD * (-(-qd // 4) * 4)
    itemsize = 2
    for mw in (4, 2) if deep_ok else (2,):
        t = next((t for t in WG_TILES if (t.BN, t.BK, t.BM) == (bn, bk, 128 * mw)), None)
        if t is not None and _wg_box(p, table, t, itemsize, -(-p.C_in_g // bk) * bk):
            return t
    return None


def pick_tile(p: ConvParams, dtype: str, cc: int = MIN_CC) -> TcTile:
    """On compute capability 9.0, a wgmma tile for 16-bit types where one fits (pick_wg_tile).
    Else a halo tile where its input tile fits in shared memory, else a gathering one; among
    those the tile wasting the fewest padded channels of C_out_g, then of C_in_g, the wider and
    then the deeper one on a tie; for 16-bit types a deeper halo tile of that width if it pads
    C_in_g by at most DEEP_K_MAX_PAD. Tiles are kept to HALO_SMEM (two blocks an SM)."""
    if cc == WG_CC:
        wg = pick_wg_tile(p, dtype)
        if wg is not None:
            return wg
    itemsize = 4 if dtype == "float32" else 2
    table, _ = phase_table(p)

    def fits_box(t: TcTile) -> bool:
        ci_pad = -(-p.C_in_g // t.BK) * t.BK
        co_pad = -(-p.C_out_g // t.BN) * t.BN
        return choose_box(p, table, t, itemsize, ci_pad, co_pad) is not None

    def key(t: TcTile) -> tuple[int, int, int, int]:
        return (-(-p.C_out_g // t.BN) * t.BN, -(-p.C_in_g // t.BK) * t.BK, -t.BN, -t.BK)

    fits = [t for t in tc_tiles(dtype) if not t.halo and t.smem_bytes(itemsize) <= HALO_SMEM[-1]]
    gather = min(fits, key=key)
    if itemsize == 2:
        deep = [t for t in tc_tiles(dtype) if t.halo and t.BN == gather.BN and t.BK > gather.BK
                and -(-p.C_in_g // t.BK) * t.BK <= DEEP_K_MAX_PAD * p.C_in_g]  # fmt: skip
        for t in sorted(deep, key=lambda t: -t.BK):
            if fits_box(t):
                return t
    halo = replace(gather, halo=True)
    return halo if fits_box(halo) else gather


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
    box: HaloBox | None
    ncdhw_in_place: bool  # NCDHW results written in place (else channels-last, then transposed)
    table: DeviceArray = field(compare=False, repr=False)
    geom: DeviceArray = field(compare=False, repr=False)
    box_table: DeviceArray | None = field(compare=False, repr=False)
    family: str = "tc"
    _per_device: dict = field(default_factory=dict, compare=False, repr=False)

    @staticmethod
    def eligible(p: ConvParams, dtype: str, precision: str = "highest", cc: int = 90) -> bool:
        if cc < MIN_CC or tc_mode(dtype, precision) is None:
            return False
        itemsize = 4 if dtype == "float32" else 2
        phases = p.stride[0] * p.stride[1] * p.stride[2]
        # 16-byte copies of channel runs: C_in_g a whole number of vectors. The grid: y and z
        # <= 65535, and x (a gathering tile has BM >= 128 phase voxels; a halo box grid that
        # would not fit is never chosen) <= 2^31 - 1. The kernel's 32-bit values as igemm's.
        return (
            (p.C_in_g * itemsize) % 16 == 0
            and p.groups * phases <= 65535
            and -(-p.C_out_g // 16) <= 65535
            and phase_voxels(p) <= MIN_BM * MAX_GRID_X
            and fits_int32(p)
        )

    @classmethod
    def build(
        cls, p: ConvParams, dtype: str, precision: str, sm_count: int, tile: TcTile | None = None,
        cc: int = MIN_CC,
    ) -> TcPlan:  # fmt: skip
        """``cc``: the device's compute capability (9.0 lets the wgmma tiles be picked)."""
        mode = tc_mode(dtype, precision)
        assert mode is not None
        table, max_taps = phase_table(p)
        tile = tile or pick_tile(p, dtype, cc)
        ci_pad = -(-p.C_in_g // tile.BK) * tile.BK
        co_pad = -(-p.C_out_g // tile.BN) * tile.BN
        phases = table.shape[0]
        itemsize = 4 if dtype == "float32" else 2
        box = choose_box(p, table, tile, itemsize, ci_pad, co_pad) if tile.halo else None
        if tile.halo and box is None:
            raise ValueError(f"the input tile of {tile.name()} does not fit in shared memory")
        box_table = None
        if box is not None:
            mins, _ = _spans(table)
            hdr = [*box.box, *box.counts, *box.tile, box.pitch]
            if tile.wg:
                hdr.append(box.planes * 8)  # CT: the channels of one staged tile
            box_table = DeviceArray(np.array(hdr + [v for m in mins for v in m], np.int32))
            blocks = p.N * box.counts[0] * box.counts[1] * box.counts[2]
            smem = tile.smem_bytes(itemsize, box.elems(), max_taps)
        else:
            hdr_rows = table[:, :PHASE_HDR]
            m_max = max(p.N * int(h[3]) * int(h[4]) * int(h[5]) for h in hdr_rows)
            blocks = -(-m_max // tile.BM)
            smem = tile.smem_bytes(itemsize)
        grid = (blocks, co_pad // tile.BN, p.groups * phases)
        packed = p.groups * phases * max_taps * ci_pad * co_pad
        pack_grid = (max(1, min(-(-packed // PACK_THREADS), sm_count * 8)), 1, 1)
        in_place = 2 * int((table[:, 6] > 0).sum()) > phases
        return cls(p, dtype, mode, tile, phases, max_taps, ci_pad, co_pad, grid, pack_grid,
                   smem, box, in_place, DeviceArray(table), geometry(p), box_table)  # fmt: skip

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
        transposed into a channels-last workspace first, by the weight pack's launch)."""
        import cupy

        p = self.p
        if self.grid[0] == 0:
            return

        def make() -> tuple:
            m = tc_module(self.dtype, self.mode, self.tile)
            prep, ncdhw, ndhwc = m.name_expressions
            fns = (get_launcher(m, prep), get_launcher(m, ncdhw, self.smem),
                   get_launcher(m, ndhwc, self.smem))  # fmt: skip
            box = 0 if self.box_table is None else ptr(self.box_table.get())
            return fns, ptr(self.table.get()), ptr(self.geom.get()), box

        (prep, gemm_ncdhw, gemm_ndhwc), table, geom, box = on_device(self._per_device, make)
        # One workspace, one launch: the packed weights, and (NCDHW) x transposed to
        # channels-last, 256-byte aligned after them; tc_prep packs and transposes together.
        spatial = p.in_size[0] * p.in_size[1] * p.in_size[2]
        pack_blocks = self.pack_grid[0]
        tgrid = (0, 0, 0)
        if not channels_last:
            tgrid = prep_transpose_grid(p.N, p.C_in, spatial, pack_blocks)
        packed = p.groups * self.phases * self.max_taps * self.ci_pad * self.co_pad
        wp_elems = -(-packed // 128) * 128
        ws = cupy.empty(wp_elems + (p.N * spatial * p.C_in if tgrid[0] else 0), self.storage)
        # NCDHW results go straight to `out`, except where most phases have no tap: their blocks
        # only write bias, every s-th voxel, filling 32-byte sectors partly (kb77 float16: 1.74
        # ms against 0.92 ms through a channels-last workspace and a transpose, H100). Where
        # every phase has taps, writing in place measured faster than the transpose (kb61 2.23
        # against 2.54 ms, unet_k2s2 0.225 against 0.307 ms).
        direct = channels_last or self.ncdhw_in_place
        target = out if direct else cupy.empty(out.size, dtype=self.storage)
        wp = ws.data.ptr
        if tgrid[0]:
            xt, x_copy = wp + wp_elems * self.storage.itemsize, None
        else:  # channels-last already, or too many column tiles to share the pack's grid
            x_copy = channels_last_input(x, p, channels_last, self.storage)
            xt = x_copy.data.ptr  # x_copy stays referenced until the GEMM is queued
        extents = (self.phases, self.max_taps, self.ci_pad, self.co_pad)
        blocks = pack_blocks + tgrid[0] * tgrid[1] * tgrid[2]
        prep((blocks, 1, 1), (PACK_THREADS, 1, 1),
             (w.data.ptr, wp, table, geom, *extents, pack_blocks, x.data.ptr, xt, p.N, p.C_in,
              spatial, tgrid[1], tgrid[2]))  # fmt: skip
        gemm = gemm_ndhwc if channels_last or not direct else gemm_ncdhw
        gemm(
            self.grid,
            (self.tile.threads(), 1, 1),
            (xt, wp, ptr(bias), target.data.ptr, table, geom, *extents, box),
            self.smem,
        )
        if not direct:
            out_spatial = p.out_size[0] * p.out_size[1] * p.out_size[2]
            transpose(target, out, p.N, out_spatial, p.C_out)
