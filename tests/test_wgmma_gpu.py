"""The Hopper wgmma tiles (kernels/wgmma.cu), each forced, against the float64 oracle.

Every tile of ``wg_tiles`` (every width, K chunk and box depth), float16 and bfloat16, NCDHW and
NDHWC results, with bias, on fresh random data, the output poisoned with NaN: an element left
unwritten fails. Problems are chosen so that C_in_g and C_out_g pad (one partial wgmma width and
a partial K chunk where the tile allows) and the boxes are partial at the volume's edges; one
stride-2 problem has phases of different tap counts. Needs compute capability 9.0 (sm_90a).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from plan_check import check_16bit_plan

from cupyconvt._params import ConvParams
from cupyconvt._tc import WG_TILES, TcPlan

pytestmark = pytest.mark.gpu


def _problem(t, i: int, units: int = 0) -> tuple[ConvParams, dict]:
    """``units``: C_in_g spanning that many K chunks, the last one partial."""
    c_in = t.BK + 8 if t.BK < 64 else 40  # a partial K chunk (or a padded one)
    if units:
        c_in = units * t.BK - 8
    c_out = max(8, t.BN - 5) if i % 2 else min(t.BN + 3, 133)  # a partial width, or two
    kw = [dict(stride=1, padding=1), dict(stride=2, padding=1, output_padding=1),
          dict(stride=(1, 2, 1), dilation=(2, 1, 1))][i % 3]  # fmt: skip
    p = ConvParams.from_args((2 - i % 2, c_in, 9, 11, 10), (c_in, c_out, 3, 2, 3), (c_out,), **kw)
    return p, kw


@pytest.mark.parametrize("layout", ["NCDHW", "NDHWC"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("i,t", list(enumerate(WG_TILES)), ids=lambda v: getattr(v, "name", str)())
def test_wgmma_tile_matches_oracle(hopper, i, t, dtype, layout):
    p, kw = _problem(t, i)
    _check(hopper, p, kw, t, i, dtype, layout)


@pytest.mark.parametrize("layout", ["NCDHW", "NDHWC"])
@pytest.mark.parametrize(
    "i,t",
    [(i, replace(t, CT=t.BK)) for i, t in enumerate(WG_TILES) if t.KT == 1],
    ids=lambda v: getattr(v, "name", str)(),
)
def test_wgmma_channel_tiles_match_oracle(hopper, i, t, layout):
    """The input tile staged one K chunk of channels at a time (CT = BK: three channel tiles,
    the last partly padding), as vnet's 256 channels need: the block restages between them."""
    p, kw = _problem(t, i, units=3)
    _check(hopper, p, kw, t, i, "float16", layout, channel_tiles=3)


def _check(cupy, p, kw, t, i, dtype, layout, channel_tiles=1):
    if not TcPlan.eligible(p, dtype):
        pytest.skip("not eligible")
    try:
        plan = TcPlan.build(p, dtype, "highest", 132, tile=t, cc=90)
    except ValueError:
        pytest.skip(f"the input tile of {t.name()} does not fit")
    assert plan.ci_pad == channel_tiles * plan.box.planes * 8
    rng = np.random.default_rng(i)
    x = rng.standard_normal(p.x_shape5) + 0.25
    w = rng.standard_normal((p.C_in, p.C_out_g, *p.kernel)) / np.sqrt(p.C_in * 18)
    b = rng.standard_normal(p.C_out)
    check_16bit_plan(cupy, plan, x, w, b, kw, dtype, layout, t.name())
