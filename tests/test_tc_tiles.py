"""The tensor-core family's tile choice (cupyconvt/_tc.py), checked on the CPU: every picked tile
is one that CI compiles, its shared memory fits, a halo tile's box covers its block, and the
deep-K rule for 16-bit types pads C_in_g by at most a third. On compute capability 9.0 the
wgmma tiles (kernels/wgmma.cu) are picked for 16-bit types where their input tile fits."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from cupyconvt._params import ConvParams
from cupyconvt._patch import PATCH_TILES, PatchPlan, covers, patch_module
from cupyconvt._plans import phase_table
from cupyconvt._tc import (
    DEEP_K_MAX_PAD,
    HALO_SMEM,
    WG_SMEM,
    WG_TILES,
    TcPlan,
    choose_box,
    pick_tile,
    pick_wg_tile,
    tc_module,
    tc_tiles,
    wg_tiles,
)

ROOT = Path(__file__).resolve().parents[1]
BENCH = json.loads((ROOT / "benchmarks" / "cases.json").read_text())["cases"]


def _params(c: dict) -> ConvParams:
    return ConvParams.from_args(
        (c["N"], c["C_in"], *c["in"]),
        (c["C_in"], c["C_out"] // c["groups"], *c["k"]),
        None,
        c["stride"],
        c["padding"],
        c["output_padding"],
        c["groups"],
        c["dilation"],
    )


PROBLEMS = [pytest.param(_params(c), id=c["name"]) for c in BENCH] + [
    pytest.param(ConvParams.from_args((2, ci, 9, 10, 11), (ci, co, 3, 3, 3)), id=f"c{ci}x{co}")
    for ci, co in ((16, 16), (48, 24), (64, 32), (96, 80), (160, 16))
]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("p", PROBLEMS)
def test_picked_tile_is_compiled_and_fits(p, dtype):
    itemsize = 4 if dtype == "float32" else 2
    if not TcPlan.eligible(p, dtype, "medium"):
        pytest.skip("tc is not eligible")
    t = pick_tile(p, dtype)
    assert t in tc_tiles(dtype)  # CI compiles every tile of tc_tiles
    ci_pad = -(-p.C_in_g // t.BK) * t.BK
    co_pad = -(-p.C_out_g // t.BN) * t.BN
    table, _ = phase_table(p)
    if t.halo:
        box = choose_box(p, table, t, itemsize, ci_pad, co_pad)
        assert box is not None
        assert box.box[0] * box.box[1] * box.box[2] == t.BM
        assert t.smem_bytes(itemsize, box.elems()) <= HALO_SMEM[-1]
        assert box.pitch >= ci_pad
    else:
        assert t.smem_bytes(itemsize) <= HALO_SMEM[-1]
    # No deeper chunk than the padding rule allows (the minimal-padding chunk is always allowed).
    fewest = min(-(-p.C_in_g // u.BK) * u.BK for u in tc_tiles(dtype) if u.BN == t.BN)
    assert ci_pad == fewest or ci_pad <= DEEP_K_MAX_PAD * p.C_in_g


def test_deep_k_rule_on_the_measured_cases():
    """The 16-bit picks the H100 measurements asked for (see DEEP_K_MAX_PAD)."""
    by_name = {c["name"]: _params(c) for c in BENCH}
    assert pick_tile(by_name["kb70_cube96"], "float16").BK == 64  # C_in_g 48 -> 64
    assert pick_tile(by_name["kb61_cube_k3"], "float16").BK == 64
    assert pick_tile(by_name["kb77_dilated_strided"], "float16").BK == 32  # 32 -> 64 would double K
    assert pick_tile(by_name["kb70_cube96"], "float32").BK == 16  # float32 keeps the old rule


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("p", PROBLEMS)
def test_hopper_pick_is_compiled_and_fits(p, dtype):
    """cc 9.0: a wgmma tile for 16-bit types where one fits (built for sm_90a, listed for CI);
    else the mma.sync pick, as on older GPUs."""
    if not TcPlan.eligible(p, dtype, "medium"):
        pytest.skip("tc is not eligible")
    t = pick_tile(p, dtype, 90)
    wg = pick_wg_tile(p, dtype)
    if dtype == "float32":
        assert wg is None
    assert t == (wg or pick_tile(p, dtype, 80))
    assert pick_tile(p, dtype, 89) == pick_tile(p, dtype, 80)  # sm_90a code runs on 9.0 alone
    if not t.wg:
        return
    assert t in wg_tiles(dtype)
    assert "--gpu-architecture=sm_90a" in tc_module(dtype, 0, t).options
    plan = TcPlan.build(p, dtype, "highest", 132, cc=90)
    assert plan.tile == t and plan.box is not None
    d, h, w = plan.box.box
    assert (h, w) == (8, 8) and 64 * d == t.BM  # 8 x 8 voxels a warpgroup's m64 slice
    ct = plan.box.planes * 8  # the channels of one staged tile: all of them where they fit
    assert plan.box.pitch % 2 == 1 and plan.ci_pad % ct == 0 and (ct // t.BK) * t.BK == ct
    if ct < plan.ci_pad:
        assert t.KT == 1
        wider = replace(plan.box, planes=2 * plan.box.planes)
        assert (plan.ci_pad // ct) % 2 or t.smem_bytes(2, wider.elems(), plan.max_taps) > WG_SMEM
    hd, hh, hw = plan.box.tile
    assert plan.box.pitch >= hd * hh * hw
    assert plan.smem <= WG_SMEM
    assert t.BN >= min(p.C_out_g, 128) and p.C_in_g % t.BK == 0 or t.BK == 16


def test_hopper_picks_on_the_measured_cases():
    """The wgmma picks the H100 measurements asked for (WG_DEEP_MAX_PAD; float16 NDHWC ms)."""
    by_name = {c["name"]: _params(c) for c in BENCH}
    name = {k: pick_tile(p, "float16", 90).name() for k, p in by_name.items()
            if TcPlan.eligible(p, "float16")}  # fmt: skip
    assert name["kb68_k355"] == "512x64k32t1w"  # 3.80 against 4.29 for 256x64k32t1w
    assert name["kb70_cube96"] == "512x24k16t1w"  # 3.00; the other chunks 3.43-3.73
    assert name["kb58_asym_kernel"] == "256x16k32t1w"  # 0.59 against 0.70 8 deep
    assert name["unet_k3s2_64to32"] == "512x32k64t1w"  # 0.62
    # vnet: the tile of all 256 channels does not fit; two of 128 channels, restaged, do (0.095
    # against 0.122 ms for the mma.sync halo tile)
    vnet = TcPlan.build(by_name["vnet_k4s2_256to128"], "float16", "highest", 132, cc=90)
    assert vnet.tile.name() == "256x128k64t1w" and vnet.box.planes * 8 == 128
    # two blocks an SM where 64 accumulators a thread or fewer (no spills at 128 registers)
    assert {t.MINB for t in WG_TILES if t.BN * t.BM <= 128 * 128} == {2}
    assert {t.MINB for t in WG_TILES if t.BN * t.BM > 128 * 128} == {1}


def test_wgmma_header_is_generated():
    """kernels/wgmma_ops.cuh is what scripts/gen_wgmma_ops.py writes."""
    import subprocess
    import sys

    script = ROOT / "scripts" / "gen_wgmma_ops.py"
    assert subprocess.run([sys.executable, str(script), "--check"]).returncode == 0


def _device(cc: int):
    from cupyconvt._select import DeviceInfo

    return DeviceInfo(0, f"cc{cc}", cc, 132, 227 * 1024)


def test_patch_covers_only_kernel_equal_stride():
    """kernels/patch.cu runs exactly the layers whose outputs each come from one voxel and tap:
    unet_k2s2 among the benchmark cases; padding, output padding, dilation (where the kernel is
    not 1) and kernel != stride each rule it out."""
    assert {c["name"] for c in BENCH if covers(_params(c))} == {"unet_k2s2_128to64"}
    base = dict(stride=2)
    x, w = (1, 16, 4, 4, 4), (16, 16, 2, 2, 2)
    assert covers(ConvParams.from_args(x, w, **base))
    assert covers(ConvParams.from_args(x, (16, 16, 1, 1, 1)))  # pointwise
    assert covers(ConvParams.from_args(x, (16, 16, 1, 2, 2), stride=(1, 2, 2), dilation=(5, 1, 1)))
    for kw in (dict(padding=1), dict(output_padding=1), dict(dilation=2), dict(stride=1)):
        assert not covers(ConvParams.from_args(x, w, **{**base, **kw})), kw


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_patch_plan_selected_on_hopper(dtype):
    """cc 9.0 and a 16-bit type: the tc family builds the patch GEMM for unet_k2s2 (a compiled
    tile, two blocks' shared memory an SM); elsewhere, and for float32, the phase GEMMs."""
    from cupyconvt._select import select

    p = _params(next(c for c in BENCH if c["name"] == "unet_k2s2_128to64"))
    plan = select(p, dtype, _device(90), "tc")
    assert isinstance(plan, PatchPlan) and plan.tile in PATCH_TILES
    assert plan.tile.BK == 64 and plan.ci_pad == 128 and plan.n_pad % plan.tile.BN == 0
    rows, cols = 2 * 32**3, 8 * 64  # input voxels; taps x C_out
    n_tiles = cols // plan.tile.BN
    assert plan.n_pad == cols and plan.row_tiles == rows // plan.tile.BM
    # persistent blocks, a whole number per column tile, two an SM (128 registers, smem)
    assert plan.grid[0] % n_tiles == 0 and plan.grid[1:] == (1, 1)
    assert plan.grid[0] == 264 // n_tiles * n_tiles
    assert 2 * (plan.smem + 3 * 1024) <= 227 * 1024 and plan.tile.MW == 1
    assert "--gpu-architecture=sm_90a" in patch_module(dtype, plan.tile).options
    assert isinstance(select(p, dtype, _device(80), "tc"), TcPlan)
    assert isinstance(select(p, "float32", _device(90), "tc", "medium"), TcPlan)
    assert not PatchPlan.eligible(p, "float32", 90)
    odd = ConvParams.from_args((1, 12, 4, 4, 4), (12, 16, 2, 2, 2), stride=2)
    assert not PatchPlan.eligible(odd, dtype, 90)  # C_in_g not whole 16-byte vectors
    # weights that fit no block's shared memory: the phase GEMMs instead
    wide = ConvParams.from_args((1, 2048, 4, 4, 4), (2048, 16, 2, 2, 2), stride=2)
    assert not PatchPlan.eligible(wide, dtype, 90)
    assert isinstance(select(wide, dtype, _device(90), "tc"), TcPlan)


def test_prep_transpose_grid_shares_one_grid_with_the_pack():
    from cupyconvt._igemm import MAX_GRID_X
    from cupyconvt._tc import prep_transpose_grid

    assert prep_transpose_grid(2, 64, 4096, 100) == (64, 1, 2)
    assert prep_transpose_grid(0, 64, 4096, 100) == (0, 0, 0)
    tx, ty, tz = prep_transpose_grid(70000, 2**20, 64, 10)  # rows and batches looped over
    assert (tx, ty, tz) == (1, 16384, 65535) and 10 + tx * ty * tz <= MAX_GRID_X
    tx, ty, tz = prep_transpose_grid(3, 2**14, 2**30, 1000)  # 2^24 column tiles: rows cut down
    assert (tx, ty, tz) == (2**24, 127, 1) and 1000 + tx * ty * tz <= MAX_GRID_X
    assert prep_transpose_grid(1, 1, 2**38, 1) == (0, 0, 0)  # a launch of its own
