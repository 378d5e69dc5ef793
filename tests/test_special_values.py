"""NaN and Inf: every backend, family and precision propagates them as IEEE arithmetic on the
definition does.

The definition sums ``x[n, ci, i] * w[ci, co, k]`` over the taps that land on an output element,
then adds the bias. So a NaN in ``x`` makes NaN of every output element one of its taps reaches
(in every output channel of its group), whatever the weight (``NaN * 0`` is NaN); ``±Inf`` gives
``±Inf`` there, or NaN where infinities of both signs meet (``Inf - Inf``); a NaN bias makes its
whole channel NaN. Exactly there and nowhere else: a kernel that multiplied a real input by a
padding zero (a tap that does not exist, a channel of another group) would spread NaN further,
and 3xTF32's operand split (``Inf - tf32(Inf)``) would turn an Inf into NaN; these tests catch
both.

Weights are held to a looser, documented contract (README, "Reliability"): the GPU kernels
multiply each weight tap by the zero padding around the input, as a zero-padded convolution
does, so a non-finite weight ``w[ci, j, k]`` may also make NaN of outputs of its channel
``g*C_out_g + j`` where its tap falls outside the input (``0 * Inf`` is NaN). Everything the
definition makes non-finite still is; no finite output is changed.

The expected result is the naive float64 oracle, whose arithmetic is IEEE's; the output is
poisoned with a finite sentinel (NaN would hide an unwritten element among the expected NaNs).
"""

from __future__ import annotations

import numpy as np
import pytest
from cases import CASES, Case
from oracle import TOL, conv_transpose3d_oracle

import cupyconvt
from cupyconvt._params import ConvParams
from cupyconvt._select import FAMILIES, eligible

#: Written into the output before the run: finite, exact in every dtype, far from any result.
SENTINEL = 4096.0

#: Small problems where every family, the tensor-core one included (16+ channels a group), runs.
SPECIAL_CASES = [
    *(c for c in CASES if c.name in (
        "plain_k3", "stride2", "padding_asym", "groups_strided", "depthwise", "dilation_stride",
        "everything", "unbatched",
    )),
    Case("tc_k3s2", 1, 16, 16, (3, 4, 3), (3, 3, 3), dict(stride=2, padding=1,
                                                          output_padding=1), bias=True),
    Case("tc_grouped", 2, 32, 32, (3, 3, 4), (2, 3, 2), dict(groups=2, dilation=(1, 2, 1))),
    Case("tc_ci_pad", 1, 20, 16, (3, 3, 3), (3, 3, 3), dict(stride=(1, 2, 3))),
]  # fmt: skip

#: Where the special values go: x (NaN, +Inf and -Inf at random voxels), w (NaN and Inf at
#: random taps) or bias (NaN in one channel).
TARGETS = ["x", "w", "bias"]


def _np_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _arrays(case: Case, target: str, dtype: np.dtype, rng):
    """Random inputs (rounded to ``dtype``) with special values planted in ``target``."""
    x, w, b = case.arrays(rng, np.float64)
    if target == "bias" and b is None:
        b = rng.standard_normal(case.C_out)
    x, w = x.astype(dtype), w.astype(dtype)
    b = None if b is None else b.astype(dtype)
    a = {"x": x, "w": w, "bias": b}[target]
    flat = a.reshape(-1)
    spots = rng.choice(flat.size, size=min(3, flat.size), replace=False)
    values = [np.nan, np.inf, -np.inf] if target != "bias" else [np.nan]
    for spot, value in zip(spots, values, strict=False):
        flat[spot] = value
    return x, w, b


def _weight_channels(case: Case, w: np.ndarray) -> list[int]:
    """The output channels of the non-finite weights of ``w``."""
    cig, cog = case.C_in // case.groups, case.C_out // case.groups
    bad = ~np.isfinite(w.astype(np.float64)).reshape(*w.shape[:2], -1)
    ci, j = np.nonzero(bad.any(axis=-1))
    return sorted({int(c // cig * cog + jj) for c, jj in zip(ci, j, strict=True)})


def _check(
    got, ref, dtype_name: str, tol: float, what: str, nan_channels: list[int] | None = None
) -> None:
    """Non-finite elements where ``ref`` has them, and only there; the finite ones within ``tol``.

    ``nan_channels`` (NCDHW output channels, batched or not) loosens it for non-finite weights:
    there an element ``ref`` makes finite or infinite may be NaN instead.
    """
    got = np.asarray(got, dtype=np.float64)
    if nan_channels:
        allowed = np.zeros(ref.shape[-4], bool)
        allowed[nan_channels] = True
        allowed = allowed.reshape((-1, 1, 1, 1)) & np.isnan(got)
        ref = np.where(allowed & ~np.isnan(ref), np.nan, ref)
    for name, kind in (("NaN", np.isnan), ("+Inf", np.isposinf), ("-Inf", np.isneginf)):
        want, have = kind(ref), kind(got)
        extra, missing = np.argwhere(have & ~want), np.argwhere(want & ~have)
        assert not len(extra) and not len(missing), (
            f"{what}: {name} at {len(extra)} elements where IEEE puts none (first "
            f"{extra[:3].tolist()}), missing at {len(missing)} (first {missing[:3].tolist()})"
        )
    assert np.isnan(ref).any() or np.isinf(ref).any(), f"{what}: nothing special reached"
    finite = np.isfinite(ref)
    assert finite.any(), f"{what}: no finite element left to compare"
    err = np.linalg.norm(got[finite] - ref[finite]) / max(np.linalg.norm(ref[finite]), 1e-300)
    assert err <= tol, f"{what}: finite elements off by {err:.3g} (tolerance {tol})"


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("case", SPECIAL_CASES, ids=str)
@pytest.mark.parametrize("dtype", ["float64", "float32", "float16", "bfloat16"])
def test_cpu_special_values(case, dtype, target, rng, cpu_path):
    dt = _np_dtype(dtype)
    x, w, b = _arrays(case, target, dt, rng)
    ref = conv_transpose3d_oracle(x, w, b, **case.kwargs)
    out = np.full(ref.shape, SENTINEL, dtype=dt)
    cupyconvt.conv_transpose3d(x, w, b, **case.kwargs, out=out)
    _check(out, ref, dtype, TOL[dtype], f"cpu {case} {dtype} {target}")


#: float32 tolerance per precision policy (as in test_gpu.py).
TOL_PRECISION = {"highest": TOL["float32"], "high": TOL["float32"], "medium": 2e-3}

GPU_RUNS = [
    *((d, "highest") for d in ["float64", "float16", "bfloat16"]),
    *(("float32", prec) for prec in ["highest", "high", "medium"]),
]


@pytest.mark.gpu
@pytest.mark.parametrize("family", [None, *FAMILIES])
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("case", SPECIAL_CASES, ids=str)
@pytest.mark.parametrize(("dtype", "precision"), GPU_RUNS, ids=[f"{d}-{p}" for d, p in GPU_RUNS])
def test_gpu_special_values(case, dtype, precision, target, family, rng):
    import cupy

    from cupyconvt import _gpu

    dt = _np_dtype(dtype)
    x, w, b = _arrays(case, target, dt, rng)
    p = ConvParams.from_args(x.shape, w.shape, None if b is None else b.shape, **case.kwargs)
    if family is not None and not eligible(p, dtype, family, precision):
        pytest.skip(f"{family} is not eligible for {case} in {dtype}/{precision}")
    ref = conv_transpose3d_oracle(x, w, b, **case.kwargs)
    xd, wd = cupy.asarray(x), cupy.asarray(w)
    bd = None if b is None else cupy.asarray(b)
    out = cupy.full(ref.shape, SENTINEL, dtype=dt)
    if family is None:
        cupyconvt.conv_transpose3d(xd, wd, bd, **case.kwargs, out=out, precision=precision)
    else:
        _gpu.conv_transpose3d(xd, wd, bd, p, out, family=family, precision=precision)
    tol = TOL_PRECISION[precision] if dtype == "float32" else TOL[dtype]
    loose = _weight_channels(case, w) if target == "w" else None
    what = f"gpu {case} {dtype}/{precision} {family} {target}"
    _check(cupy.asnumpy(out), ref, dtype, tol, what, nan_channels=loose)


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["highest", "high", "medium"])
def test_gpu_special_values_channels_last(precision, rng):
    """The NDHWC path (tensor cores in place, or the CUDA-core families between transposes)."""
    import cupy

    case = SPECIAL_CASES[-3]
    x, w, b = _arrays(case, "x", np.dtype(np.float32), rng)
    ref = conv_transpose3d_oracle(x, w, b, **case.kwargs)
    x_last = cupy.asarray(np.ascontiguousarray(np.moveaxis(x, 1, -1)))
    out = cupy.full(np.moveaxis(ref, 1, -1).shape, SENTINEL, dtype=np.float32)
    cupyconvt.conv_transpose3d(
        x_last, cupy.asarray(w), cupy.asarray(b), **case.kwargs, out=out, layout="NDHWC",
        precision=precision,
    )  # fmt: skip
    got = np.moveaxis(cupy.asnumpy(out), -1, 1)
    _check(got, ref, "float32", TOL_PRECISION[precision], f"gpu NDHWC {precision}")


def test_special_values_check_can_fail():
    """The comparison rejects a NaN placed where IEEE puts none, and a missing Inf."""
    ref = np.array([1.0, np.inf, np.nan, 2.0])
    _check(ref.copy(), ref, "float64", 1e-12, "control")
    for bad in ([np.nan, np.inf, np.nan, 2.0], [1.0, 5.0, np.nan, 2.0], [1.0, np.inf, 3.0, 2.0]):
        with pytest.raises(AssertionError):
            _check(np.array(bad), ref, "float64", 1e-12, "bad")


def test_weight_contract_is_loose_only_in_the_weights_channels():
    """For a non-finite weight, NaN may replace results of its own channel, nowhere else."""
    ref = np.ones((1, 2, 1, 1, 2))
    ref[0, 0, 0, 0, 0] = np.inf
    got = ref.copy()
    got[0, 0, 0, 0, :] = np.nan  # channel 0: allowed
    _check(got, ref, "float64", 1e-12, "loose", nan_channels=[0])
    got[0, 1, 0, 0, 1] = np.nan  # channel 1: not allowed
    with pytest.raises(AssertionError):
        _check(got, ref, "float64", 1e-12, "loose", nan_channels=[0])
    w = np.ones((4, 3, 1, 1, 1))
    w[3, 1, 0, 0, 0] = np.nan  # ci 3 is in group 1 of 2: output channel 1*3 + 1
    assert _weight_channels(Case("c", 1, 4, 6, (1, 1, 1), (1, 1, 1), dict(groups=2)), w) == [4]


@pytest.mark.gpu
def test_gpu_3xtf32_near_float32_max_stays_finite(rng):
    """Inputs within a TF32 rounding step of FLT_MAX, with small weights: 3xTF32 rounds its
    operands, and rounding must not carry them to Inf (NaN from the split). The tensor-core
    family is forced; the result is finite and within TF32's error. (Plain TF32, "medium",
    rounds such inputs to Inf, as a TF32 conversion does: README, "Reliability".)"""
    precision = "high"
    import cupy

    from cupyconvt import _gpu

    case = SPECIAL_CASES[-3]
    x, w, b = case.arrays(rng, np.float64)
    x = np.where(rng.random(x.shape) < 0.05, np.float32(np.finfo(np.float32).max), x)
    x, w, b = x.astype(np.float32), (w * 1e-4).astype(np.float32), b.astype(np.float32)
    p = ConvParams.from_args(x.shape, w.shape, b.shape, **case.kwargs)
    assert eligible(p, "float32", "tc", precision)
    ref = conv_transpose3d_oracle(x, w, b, **case.kwargs)
    assert np.isfinite(ref).all() and np.abs(ref).max() < 1e37  # finite in float32
    out = cupy.full(ref.shape, SENTINEL, dtype=np.float32)
    _gpu.conv_transpose3d(cupy.asarray(x), cupy.asarray(w), cupy.asarray(b), p, out,
                          family="tc", precision=precision)  # fmt: skip
    got = cupy.asnumpy(out).astype(np.float64)
    assert np.isfinite(got).all(), (
        f"{precision}: {np.isinf(got).sum()} Inf, {np.isnan(got).sum()} NaN"
    )
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) <= TOL_PRECISION["medium"]
