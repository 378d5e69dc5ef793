"""The patch GEMM (kernels/patch.cu: kernel == stride, no padding), every compiled tile forced,
against the float64 oracle.

float16 and bfloat16, NCDHW and NDHWC, with and without bias, on fresh random data with the
output poisoned with NaN: an element left unwritten fails. The problems make every edge partial:
rows that do not fill the last row tile, columns (taps x C_out_g) that do not fill the last
column tile, C_in_g that pads the last K chunk, two groups, anisotropic patches (1 x 2 x 3, one
axis of kernel 1 with a dilation that must not matter) and the pointwise case (kernel 1). An
NCDHW x is read as it is where D*H*W is a multiple of 8 (problems 2-4, batches meeting inside a
row tile in 2), else transposed first (0 and 1). Needs compute capability 9.0 (sm_90a).
"""

from __future__ import annotations

import numpy as np
import pytest
from plan_check import check_16bit_plan

from cupyconvt._params import ConvParams
from cupyconvt._patch import PATCH_TILES, PatchPlan

pytestmark = pytest.mark.gpu

#: (x shape, weight shape, keyword arguments): C_in_g 24 / 40 / 16 / 64 / 40 pads BK 16 / 32 /
#: 64 chunks, or fills them.
PROBLEMS = [
    ((2, 24, 5, 7, 9), (24, 37, 2, 2, 2), dict(stride=2)),
    ((1, 80, 6, 5, 7), (80, 13, 1, 2, 3), dict(stride=(1, 2, 3), groups=2, dilation=(3, 1, 1))),
    ((3, 16, 4, 6, 11), (16, 70, 1, 1, 1), dict()),
    ((1, 64, 8, 8, 8), (64, 32, 2, 2, 2), dict(stride=2)),
    ((2, 80, 4, 5, 6), (80, 13, 1, 2, 3), dict(stride=(1, 2, 3), groups=2, dilation=(3, 1, 1))),
]


@pytest.mark.parametrize("sms", [132, 1], ids=["full", "one-sm"])
@pytest.mark.parametrize("layout", ["NCDHW", "NDHWC"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("k", range(len(PROBLEMS)))
@pytest.mark.parametrize("t", PATCH_TILES, ids=lambda t: t.name())
def test_patch_tile_matches_oracle(hopper, t, k, dtype, layout, sms):
    """``sms=1``: the grid of a one-SM device (two blocks), so that each persistent block walks
    several row tiles of its column tile (the ring runs across tile boundaries)."""
    xs, ws, kw = PROBLEMS[k]
    bias = k % 2 == 0
    p = ConvParams.from_args(xs, ws, (ws[1] * kw.get("groups", 1),) if bias else None, **kw)
    assert PatchPlan.eligible(p, dtype, 90)
    plan = PatchPlan.build(p, dtype, sms, tile=t)
    assert plan.reads_ncdhw == (k >= 2)
    if sms == 1:  # the blocks one SM holds at once: each walks several row tiles
        n_tiles = plan.n_pad // t.BN
        assert plan.grid[0] % n_tiles == 0 and plan.grid[0] < plan.row_tiles * n_tiles
    rng = np.random.default_rng(1000 * k + PATCH_TILES.index(t))
    x = rng.standard_normal(xs) + 0.25
    w = rng.standard_normal(ws) / np.sqrt(ws[0])
    b = rng.standard_normal(p.C_out) if bias else None
    check_16bit_plan(hopper, plan, x, w, b, kw, dtype, layout, t.name())


def test_patch_layouts_agree_bitwise(hopper):
    """The two column orders reduce each output's channels in the same order."""
    cupy = hopper
    from cupyconvt import conv_transpose3d
    from cupyconvt._gpu import device_info, select

    rng = cupy.random.default_rng(7)
    x = rng.standard_normal((2, 64, 9, 10, 12), dtype=cupy.float32).astype(cupy.float16)
    w = rng.standard_normal((64, 48, 2, 2, 2), dtype=cupy.float32).astype(cupy.float16) / 8
    b = rng.standard_normal(48, dtype=cupy.float32).astype(cupy.float16)
    a = conv_transpose3d(x, w, b, stride=2)
    xl = cupy.ascontiguousarray(cupy.moveaxis(x, 1, -1))
    c = conv_transpose3d(xl, w, b, stride=2, layout="NDHWC")
    plan = select(ConvParams.from_args(x.shape, w.shape, b.shape, stride=2), "float16",
                  device_info(x.device.id))  # fmt: skip
    assert isinstance(plan, PatchPlan)
    assert cupy.array_equal(a.view(cupy.uint16), cupy.moveaxis(c, -1, 1).view(cupy.uint16))


def test_patch_misaligned_ncdhw_input_is_transposed_first(hopper):
    """An NCDHW x off a 16-byte boundary cannot be read 8 voxels a copy: the plan transposes it
    first, and the result is bitwise the aligned one's (same GEMM, same channel order)."""
    cupy = hopper
    from cupyconvt import conv_transpose3d

    rng = cupy.random.default_rng(11)
    shape = (2, 32, 4, 6, 8)  # D*H*W = 192: an aligned x is read as it is
    n = int(np.prod(shape))
    buf = rng.standard_normal(n + 1, dtype=cupy.float32).astype(cupy.float16)
    x_off = buf[1:].reshape(shape)  # C-contiguous, 2 bytes past an allocation's start
    x = x_off.copy()  # a fresh, aligned allocation
    assert x_off.flags.c_contiguous and x_off.data.ptr % 16 != 0 and x.data.ptr % 16 == 0
    w = rng.standard_normal((32, 16, 2, 2, 2), dtype=cupy.float32).astype(cupy.float16) / 6
    a = conv_transpose3d(x, w, stride=2)
    b = conv_transpose3d(x_off, w, stride=2)
    assert cupy.array_equal(a.view(cupy.uint16), b.view(cupy.uint16))
