"""GPU gradients of conv_transpose3d (cupyconvt._backward_gpu) against a float64 reference.

Every test draws fresh random inputs (never zeros), poisons the memory the results are allocated
from with NaN, checks that every element is finite and within the dtype's tolerance of a naive
float64 reference, and that a second run is bitwise identical. Skipped (by conftest) where no
CUDA GPU with CuPy is present.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from cases import CASES, Case
from oracle import TOL, rel_err

from cupyconvt import _backward_gpu as bwd
from cupyconvt._dtypes import dtype_name
from cupyconvt._params import ConvParams

pytestmark = pytest.mark.gpu

DTYPES = ["float64", "float32", "float16", "bfloat16"]


def grads_oracle(x, w, gy, p: ConvParams):
    """(gx, gw, gb) in float64, straight from the definition: for each tap k and each group, the
    input voxels i whose target o = i*s - p + k*dil lies inside the output pair with gy[o]."""
    x, w, gy = (np.asarray(a, dtype=np.float64) for a in (x, w, gy))
    cig, cog = p.C_in_g, p.C_out_g
    gx, gw = np.zeros(x.shape), np.zeros(w.shape)
    batch = range(p.N)
    for kk in itertools.product(*(range(k) for k in p.kernel)):
        ii, oo = [], []
        for a in range(3):
            i = np.arange(p.in_size[a])
            o = i * p.stride[a] - p.padding[a] + kk[a] * p.dilation[a]
            inside = (o >= 0) & (o < p.out_size[a])
            ii.append(i[inside])
            oo.append(o[inside])
        if any(len(i) == 0 for i in ii):
            continue
        for g in range(p.groups):
            ci = np.arange(g * cig, (g + 1) * cig)
            co = np.arange(g * cog, (g + 1) * cog)
            w_k = w[(slice(g * cig, (g + 1) * cig), slice(None), *kk)]  # (cig, cog)
            gy_k = gy[np.ix_(batch, co, *oo)]
            gx[np.ix_(batch, ci, *ii)] += np.einsum("njdhw,cj->ncdhw", gy_k, w_k)
            gw[(slice(g * cig, (g + 1) * cig), slice(None), *kk)] += np.einsum(
                "ncdhw,njdhw->cj", x[np.ix_(batch, ci, *ii)], gy_k
            )
    return gx, gw, gy.sum(axis=(0, 2, 3, 4))


def _np_dtype(name):
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _problem(case: Case, dtype: str, rng):
    """Fresh random x, w, gy (5-D, in ``dtype``) and the problem."""
    dt = _np_dtype(dtype)
    x, w, _ = case.arrays(rng, dt)
    p = ConvParams.from_args(x.shape, w.shape, None, **case.kwargs)
    gy = rng.standard_normal(p.out_shape5).astype(dt)
    return x.reshape(p.x_shape5), w, gy, p


#: Quiet-NaN bit patterns of the 16-bit types.
NAN_BITS = {"float16": 0x7E00, "bfloat16": 0x7FC0}


def _poison_pool(shape, dtype: str) -> None:
    """Leave a NaN-filled block of this size in CuPy's pool, so that the result allocated next
    (the functions allocate their own) holds NaN wherever a kernel fails to write."""
    import cupy

    if dtype in NAN_BITS:
        block = cupy.full(shape, NAN_BITS[dtype], dtype=cupy.uint16)
    else:
        block = cupy.full(shape, np.nan, dtype=dtype)
    cupy.cuda.get_current_stream().synchronize()
    del block


def _check(got, ref, dtype: str, what: str):
    import cupy

    host = cupy.asnumpy(got).astype(np.float64)
    assert np.isfinite(host).all(), f"{what}: unwritten or non-finite elements"
    err = rel_err(host, ref)
    assert err <= TOL[dtype], f"{what}: rel err {err:.2e} > {TOL[dtype]:.0e}"


def _bitwise_equal(a, b) -> bool:
    import cupy

    return cupy.asnumpy(a).tobytes() == cupy.asnumpy(b).tobytes()


def _run_twice(fn, out_shape, dtype):
    """``fn()`` twice, each into a pool poisoned with NaN; the two results must be bitwise equal."""
    _poison_pool(out_shape, dtype)
    first = fn()
    _poison_pool(out_shape, dtype)
    again = fn()
    assert _bitwise_equal(first, again), "results differ between runs"
    return first


def _grad_input(gy, w, p, path=None, tile=None, tap_inner=bwd.TAP_INNER, variant=None):
    """grad_input through the public function, or a forced path/tile/order/variant through its
    plan."""
    import cupy

    if path is None and tile is None and tap_inner == bwd.TAP_INNER:
        return bwd.grad_input(gy, w, p)
    gx = cupy.empty(p.x_shape5, dtype=gy.dtype)
    dtype = dtype_name(gy.dtype)
    plan = bwd.input_plan(p, dtype, path, tile, bwd.NARROW_MAX_SMEM, tap_inner,
                          bwd.SM_COUNT, variant)  # fmt: skip
    plan.launch(gy, w, gx)
    return gx


def _grad_weight(x, gy, p, tile=None, splits=None):
    import cupy

    if tile is None and splits is None:
        return bwd.grad_weight(x, gy, p)
    gw = cupy.empty((p.C_in, p.C_out_g, *p.kernel), dtype=x.dtype)
    bwd.weight_plan(p, dtype_name(x.dtype), tile, splits).launch(x, gy, gw)
    return gw


# grad_input variants: the default choice, the narrow path, the GEMM's other K-loop order, and
# every GEMM tile (by index into the dtype's tiles; float64 has fewer).
INPUT_VARIANTS = ["default", "narrow", "staged", "staged_1x1", "igemm_other_order",
                  *(f"tile{i}" for i in range(len(bwd.DATA_TILES_FLOAT)))]  # fmt: skip
WEIGHT_VARIANTS = ["default", *(f"tile{i}" for i in range(len(bwd.WEIGHT_TILES_FLOAT)))]


def _check_grad_input(case: Case, dtype: str, variant: str, rng) -> None:
    import cupy

    x, w, gy, p = _problem(case, dtype, rng)
    path, tile, tap_inner, staged = None, None, bwd.TAP_INNER, None
    if variant == "igemm_other_order":
        path, tap_inner = "igemm", not bwd.TAP_INNER
    elif variant == "narrow":
        if not bwd.GradInputPlan.narrow_eligible(p, dtype):
            pytest.skip("the narrow path does not fit this problem")
        path = "narrow"
    elif variant.startswith("staged"):
        # the default variant, or the smallest tile (8 x 32 voxels: more tiles, more edges)
        sv = bwd.staged_variant(p)
        if variant == "staged_1x1":
            sv = next(v for v in bwd.STAGED_VARIANTS if v[0] == sv[0] and v[1] * v[2] <= 2)
        if not bwd.GradInputPlan.staged_eligible(p, dtype, bwd.NARROW_MAX_SMEM, sv):
            pytest.skip("the staged path does not fit this problem")
        path, staged = "staged", sv
    elif variant.startswith("tile"):
        tiles = bwd.data_tiles(dtype)
        if int(variant[4:]) >= len(tiles):
            pytest.skip(f"{dtype} has {len(tiles)} grad_input tiles")
        path, tile = "igemm", tiles[int(variant[4:])]
    gyd, wd = cupy.asarray(gy), cupy.asarray(w)
    got = _run_twice(lambda: _grad_input(gyd, wd, p, path, tile, tap_inner, staged), p.x_shape5,
                     dtype)  # fmt: skip
    assert got.shape == p.x_shape5 and got.dtype == gyd.dtype and got.flags.c_contiguous
    _check(got, grads_oracle(x, w, gy, p)[0], dtype, f"{case} {dtype} grad_input {variant}")


def _check_grad_weight(case: Case, dtype: str, variant: str, rng, splits=None) -> None:
    import cupy

    x, w, gy, p = _problem(case, dtype, rng)
    tile = None
    if variant.startswith("tile"):
        tiles = bwd.weight_tiles(dtype)
        if int(variant[4:]) >= len(tiles):
            pytest.skip(f"{dtype} has {len(tiles)} grad_weight tiles")
        tile = tiles[int(variant[4:])]
    xd, gyd = cupy.asarray(x), cupy.asarray(gy)
    got = _run_twice(lambda: _grad_weight(xd, gyd, p, tile, splits), w.shape, dtype)
    assert got.shape == w.shape and got.dtype == xd.dtype and got.flags.c_contiguous
    _check(got, grads_oracle(x, w, gy, p)[1], dtype, f"{case} {dtype} grad_weight {variant}")


@pytest.mark.parametrize("variant", INPUT_VARIANTS)
@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_grad_input_matches_oracle(case, dtype, variant, rng):
    _check_grad_input(case, dtype, variant, rng)


@pytest.mark.parametrize("variant", WEIGHT_VARIANTS)
@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_grad_weight_matches_oracle(case, dtype, variant, rng):
    _check_grad_weight(case, dtype, variant, rng)


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_grad_bias_matches_oracle(case, dtype, rng):
    import cupy

    _, _, gy, p = _problem(case, dtype, rng)
    gyd = cupy.asarray(gy)
    got = _run_twice(lambda: bwd.grad_bias(gyd, p), (p.C_out,), dtype)
    assert got.shape == (p.C_out,) and got.dtype == gyd.dtype
    _check(got, gy.astype(np.float64).sum(axis=(0, 2, 3, 4)), dtype, f"{case} {dtype} grad_bias")


# Shapes that fill the GEMM tiles: channels past one tile (130), K chunks with padding, rows of
# many voxel chunks, splits of the voxels, grouped and depthwise layers wider than a block.
MEDIUM = [
    Case("b_dense", 2, 24, 20, (9, 10, 11), (3, 3, 3), dict(padding=1)),
    Case("b_strided", 2, 32, 16, (7, 8, 9), (3, 3, 3), dict(stride=2, padding=1, output_padding=1)),
    Case("b_k4s2", 1, 64, 32, (6, 6, 6), (4, 4, 4), dict(stride=2, padding=1)),
    Case("b_grouped", 2, 32, 32, (6, 7, 8), (3, 5, 3), dict(stride=2, padding=(1, 2, 1), groups=4)),
    Case("b_depthwise", 1, 8, 8, (12, 12, 20), (4, 4, 4), dict(stride=2, padding=1, groups=8)),
    Case("b_dilated", 2, 16, 24, (6, 7, 18), (3, 3, 3), dict(stride=2, padding=1, dilation=2)),
    Case("b_c48", 1, 48, 48, (5, 5, 17), (3, 3, 3), dict(dilation=(1, 2, 1), padding=1)),
    Case("b_c130", 1, 130, 36, (4, 5, 6), (2, 2, 2), dict(stride=2)),
    Case("b_asym", 2, 20, 12, (5, 9, 13), (3, 5, 7), dict(stride=(1, 2, 3), padding=(1, 2, 3),
                                                          output_padding=(0, 1, 2))),
    Case("b_long_rows", 1, 4, 4, (2, 3, 70), (1, 1, 3), dict(stride=(1, 1, 2))),
    Case("b_many_voxels", 3, 16, 16, (16, 16, 16), (3, 3, 3), dict(padding=1)),
    Case("b_narrow_big_weights", 1, 2, 40, (5, 6, 7), (3, 5, 7), dict(padding=(1, 2, 3))),
    # several staged tiles along h and w; stride 3 along w
    Case("b_tiles_hw", 2, 6, 4, (3, 37, 75), (3, 4, 3),
         dict(stride=(1, 2, 3), padding=(1, 1, 2), groups=2)),
    Case("b_depthwise_dilated", 1, 3, 3, (4, 20, 40), (2, 3, 4),
         dict(stride=2, padding=(0, 1, 2), dilation=(1, 2, 3), groups=3)),
]  # fmt: skip


@pytest.mark.parametrize("variant", INPUT_VARIANTS)
@pytest.mark.parametrize("case", MEDIUM, ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_grad_input_medium(case, dtype, variant, rng):
    _check_grad_input(case, dtype, variant, rng)


@pytest.mark.parametrize("variant", WEIGHT_VARIANTS)
@pytest.mark.parametrize("case", MEDIUM, ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_grad_weight_medium(case, dtype, variant, rng):
    _check_grad_weight(case, dtype, variant, rng)


@pytest.mark.parametrize("case", CASES + MEDIUM, ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_grad_input_staged_equals_narrow(case, dtype, rng):
    """bwd_data_staged runs bwd_data_narrow's fma chain (channels, then kd, kh, kw, with zeros
    where a tap leaves gy) on staged copies of gy: the two give bitwise the same gx, for every
    staged variant of the problem's CI."""
    import cupy

    x, w, gy, p = _problem(case, dtype, rng)
    if p.C_in_g > bwd.NARROW_MAX_CI or not bwd.GradInputPlan.narrow_eligible(p, dtype):
        pytest.skip("the narrow path does not run this problem")
    gyd, wd = cupy.asarray(gy), cupy.asarray(w)
    ref = _grad_input(gyd, wd, p, "narrow")
    ci = bwd.narrow_variant(p)[0]
    ran = 0
    for v in (v for v in bwd.STAGED_VARIANTS if v[0] == ci):
        if not bwd.GradInputPlan.staged_eligible(p, dtype, bwd.NARROW_MAX_SMEM, v):
            continue
        _poison_pool(p.x_shape5, dtype)
        got = _grad_input(gyd, wd, p, "staged", variant=v)
        assert _bitwise_equal(got, ref), f"{case} {dtype} staged {v} differs from narrow"
        ran += 1
    if not ran:
        pytest.skip("no staged variant fits this problem in NARROW_MAX_SMEM")


@pytest.mark.parametrize("splits", [1, 2, 7, 1000])
@pytest.mark.parametrize("case", [MEDIUM[0], MEDIUM[3], MEDIUM[4], CASES[-1]], ids=str)
def test_grad_weight_any_split_count(case, splits, rng):
    """The voxels split over any number of blocks (more than there are row chunks, too) give the
    same sums up to rounding."""
    _check_grad_weight(case, "float32", "default", rng, splits=splits)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_grad_bias_medium(dtype, rng):
    import cupy

    _, _, gy, p = _problem(MEDIUM[-2], dtype, rng)
    got = _run_twice(lambda: bwd.grad_bias(cupy.asarray(gy), p), (p.C_out,), dtype)
    _check(got, gy.astype(np.float64).sum(axis=(0, 2, 3, 4)), dtype, "grad_bias")


def test_precisions_run_ieee_float32(rng):
    """Precisions "high" and "medium" give the "highest" result, bitwise; others raise."""
    import cupy

    x, w, gy, p = _problem(MEDIUM[0], "float32", rng)
    xd, wd, gyd = cupy.asarray(x), cupy.asarray(w), cupy.asarray(gy)
    gx, gw = bwd.grad_input(gyd, wd, p), bwd.grad_weight(xd, gyd, p)
    for precision in ("high", "medium"):
        assert _bitwise_equal(bwd.grad_input(gyd, wd, p, precision), gx)
        assert _bitwise_equal(bwd.grad_weight(xd, gyd, p, precision), gw)
    with pytest.raises(ValueError, match="precision='low' is not one of"):
        bwd.grad_input(gyd, wd, p, "low")


def test_non_default_stream(rng):
    """Inputs made on a non-blocking stream, gradients computed there: the launches follow
    CuPy's current stream (the legacy default stream would not wait for the inputs)."""
    import cupy

    x, w, gy, p = _problem(MEDIUM[1], "float32", rng)
    ref_gx, ref_gw, ref_gb = grads_oracle(x, w, gy, p)
    baseline = None
    for _ in range(2):
        stream = cupy.cuda.Stream(non_blocking=True)
        with stream:
            xd, wd = cupy.asarray(x), cupy.asarray(w)
            gyd = cupy.asarray(gy) * 1.0  # the last write to gy is a kernel on this stream
            grads = (bwd.grad_input(gyd, wd, p), bwd.grad_weight(xd, gyd, p), bwd.grad_bias(gyd, p))
            host = [cupy.asnumpy(g, stream=stream) for g in grads]
        stream.synchronize()
        for got, ref in zip(host, (ref_gx, ref_gw, ref_gb), strict=True):
            assert rel_err(got, ref) <= TOL["float32"]
        if baseline is not None:
            assert all(a.tobytes() == b.tobytes() for a, b in zip(host, baseline, strict=True))
        baseline = host


def test_unbatched_and_empty_batch(rng):
    """Unbatched (4-D) arrays are taken as a batch of one; an empty batch gives an empty
    grad_input and zero grad_weight and grad_bias."""
    import cupy

    case = next(c for c in CASES if c.N is None)
    x, w, gy, p = _problem(case, "float64", rng)
    assert not p.batched
    gx = bwd.grad_input(cupy.asarray(gy[0]), cupy.asarray(w), p)
    gw = bwd.grad_weight(cupy.asarray(x[0]), cupy.asarray(gy[0]), p)
    ref_gx, ref_gw, _ = grads_oracle(x, w, gy, p)
    assert gx.shape == p.x_shape5 and rel_err(cupy.asnumpy(gx), ref_gx) <= TOL["float64"]
    assert rel_err(cupy.asnumpy(gw), ref_gw) <= TOL["float64"]

    p0 = ConvParams.from_args((0, 4, 3, 3, 3), (4, 2, 3, 3, 3), stride=2)
    x0 = cupy.empty(p0.x_shape5, cupy.float32)
    gy0 = cupy.empty(p0.out_shape5, cupy.float32)
    assert bwd.grad_input(gy0, cupy.ones((4, 2, 3, 3, 3), cupy.float32), p0).shape == p0.x_shape5
    assert not bwd.grad_weight(x0, gy0, p0).any()
    assert not bwd.grad_bias(gy0, p0).any()


def test_shape_and_dtype_errors():
    import cupy

    p = ConvParams.from_args((1, 4, 3, 3, 3), (4, 2, 3, 3, 3))
    gy = cupy.ones(p.out_shape5, cupy.float32)
    with pytest.raises(ValueError, match=r"w must have shape \(4, 2, 3, 3, 3\)"):
        bwd.grad_input(gy, cupy.ones((4, 2, 3, 3, 2), cupy.float32), p)
    with pytest.raises(TypeError, match="w has dtype float64 but the gradient is of dtype float32"):
        bwd.grad_input(gy, cupy.ones((4, 2, 3, 3, 3), cupy.float64), p)
    with pytest.raises(ValueError, match=r"gy must have shape \(1, 2, 5, 5, 5\)"):
        bwd.grad_bias(gy[:, :, 1:], p)


def test_index_math_past_2_31_elements():
    """x and gy of more than 2^31 elements (float16, about 4.3 GB each): grad_input (narrow),
    grad_weight and grad_bias against float64 sums taken in slabs."""
    import cupy

    shape = (1, 1, 1024, 1024, 2049)  # 2^31 + 2^20 voxels
    p = ConvParams.from_args(shape, (1, 1, 1, 1, 2))
    need = 5 * 2 * 1024 * 1024 * 2050 + 2**30
    if cupy.cuda.runtime.memGetInfo()[0] < need:
        pytest.skip("needs about 23 GB of free GPU memory")
    gen = cupy.random.default_rng(7)
    x = cupy.empty(p.x_shape5, cupy.float16)
    gy = cupy.empty(p.out_shape5, cupy.float16)
    for d in range(0, 1024, 128):  # fill in slabs: no full-size float32 temporary
        # Scaled so that the sums of 2^31 terms (about 2^15.5 / 16 here) stay within float16.
        x[:, :, d : d + 128] = 0.25 * gen.standard_normal((1, 1, 128, 1024, 2049), dtype="f")
        gy[:, :, d : d + 128] = 0.25 * gen.standard_normal((1, 1, 128, 1024, 2050), dtype="f")
    w = cupy.asarray([[[[[0.75, -1.25]]]]], dtype=cupy.float16)
    gx = bwd.grad_input(gy, w, p)
    gw = bwd.grad_weight(x, gy, p)
    gb = bwd.grad_bias(gy, p)
    ref_w, ref_b = np.zeros(2), 0.0
    for d in range(0, 1024, 64):
        xs, gs = x[0, 0, d : d + 64].astype(cupy.float64), gy[0, 0, d : d + 64].astype(cupy.float64)
        ref_w += [float((xs * gs[..., k : k + 2049]).sum()) for k in range(2)]
        ref_b += float(gs.sum())
        if d >= 960:  # the last slabs lie past 2^31 elements
            ref_x = cupy.asnumpy(0.75 * gs[..., :2049] - 1.25 * gs[..., 1:])
            assert rel_err(cupy.asnumpy(gx[0, 0, d : d + 64]), ref_x) <= TOL["float16"]
    assert rel_err(cupy.asnumpy(gw).ravel(), ref_w) <= TOL["float16"]
    assert rel_err(np.array([float(gb[0])]), np.array([ref_b])) <= TOL["float16"]


def test_oracle_matches_torch(rng):
    """The float64 reference agrees with torch autograd (where torch is installed)."""
    torch = pytest.importorskip("torch")
    for case in CASES[::4]:
        x, w, gy, p = _problem(case, "float64", rng)
        xt = torch.tensor(x, requires_grad=True)
        wt = torch.tensor(w, requires_grad=True)
        bt = torch.zeros(p.C_out, dtype=torch.float64, requires_grad=True)
        torch.nn.functional.conv_transpose3d(xt, wt, bt, **case.kwargs).backward(torch.tensor(gy))
        for ours, t in zip(grads_oracle(x, w, gy, p), (xt, wt, bt), strict=True):
            assert rel_err(ours, t.grad.numpy()) <= 1e-13
