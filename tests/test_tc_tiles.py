"""The tensor-core family's tile choice (cupyconvt/_tc.py), checked on the CPU: every picked tile
is one that CI compiles, its shared memory fits, a halo tile's box covers its block, and the
deep-K rule for 16-bit types pads C_in_g by at most a third."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cupyconvt._params import ConvParams
from cupyconvt._plans import phase_table
from cupyconvt._tc import DEEP_K_MAX_PAD, HALO_SMEM, TcPlan, choose_box, pick_tile, tc_tiles

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
