"""The CPU backend against the naive float64 oracle and against PyTorch's CPU implementation."""

from __future__ import annotations

import numpy as np
import pytest
from cases import CASES, Case, random_cases
from conftest import need
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from oracle import TOL, conv_transpose3d_oracle, rel_err

import cupyconvt
from cupyconvt import _cpu
from cupyconvt._params import ConvParams


def _run(case: Case, rng, dtype):
    x, w, b = case.arrays(rng, dtype)
    got = cupyconvt.conv_transpose3d(x, w, b, **case.kwargs)
    ref = conv_transpose3d_oracle(x, w, b, **case.kwargs)
    return got, ref


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_cpu_matches_oracle(case, dtype, rng, cpu_path):
    got, ref = _run(case, rng, np.dtype(dtype))
    assert got.dtype == np.dtype(dtype)
    assert got.shape == ref.shape
    assert rel_err(got, ref) <= TOL[dtype]


@pytest.mark.parametrize("case", CASES[:6] + [c for c in CASES if c.name == "everything"], ids=str)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_cpu_half_precision(case, dtype, rng, cpu_path):
    if dtype == "bfloat16":
        dt = need("ml_dtypes", "ml_dtypes").bfloat16
    else:
        dt = np.float16
    got, ref = _run(case, rng, dt)
    assert got.dtype == np.dtype(dt)
    assert rel_err(got, ref) <= TOL[dtype]


def test_cpu_out_is_written_in_place(rng, cpu_path):
    case = next(c for c in CASES if c.name == "everything")
    x, w, b = case.arrays(rng, np.float32)
    out = np.full(cupyconvt.output_shape(x.shape, w.shape, **case.kwargs), np.nan, np.float32)
    res = cupyconvt.conv_transpose3d(x, w, b, **case.kwargs, out=out)
    assert res is out
    assert rel_err(out, conv_transpose3d_oracle(x, w, b, **case.kwargs)) <= TOL["float32"]


def test_cpu_non_contiguous_inputs(rng, cpu_path):
    x = rng.standard_normal((2, 6, 5, 8, 4))[:, ::2, :, ::2].transpose(0, 1, 2, 4, 3)
    w = rng.standard_normal((3, 4, 3, 2, 3)).transpose(0, 1, 4, 3, 2)
    assert not x.flags.c_contiguous and not w.flags.c_contiguous
    got = cupyconvt.conv_transpose3d(x, w, stride=2, padding=1)
    ref = conv_transpose3d_oracle(x, w, stride=2, padding=1)
    assert rel_err(got, ref) <= TOL["float64"]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_cpu_matches_torch(case, rng, cpu_path):
    torch = need("torch", "torch")
    x, w, b = case.arrays(rng, np.float64)
    got = cupyconvt.conv_transpose3d(x, w, b, **case.kwargs)
    ref = torch.nn.functional.conv_transpose3d(
        torch.from_numpy(x), torch.from_numpy(w), None if b is None else torch.from_numpy(b),
        **case.kwargs,
    ).numpy()  # fmt: skip
    assert got.shape == ref.shape
    assert rel_err(got, ref) <= TOL["float64"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=random_cases(bias=True), seed=st.integers(0, 2**32 - 1))
def test_cpu_fuzz_against_oracle(case, seed):
    got, ref = _run(case, np.random.default_rng(seed), np.float64)
    assert got.shape == ref.shape
    assert rel_err(got, ref) <= TOL["float64"]


@pytest.mark.parametrize("block_elements", [1, 40])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_cpu_small_blocks(case, block_elements, rng, monkeypatch):
    """The phase products in blocks of one output row, and of a few rows: a block boundary
    along N, depth and height wherever there can be one, taps reaching some blocks and not
    others."""
    monkeypatch.setattr(_cpu, "BLOCK_ELEMENTS", block_elements)
    monkeypatch.setattr(_cpu, "_phases_pay", lambda p: True)
    got, ref = _run(case, rng, np.dtype("float64"))
    assert rel_err(got, ref) <= TOL["float64"]


def _paths(case: Case, rng, block_elements: int) -> tuple[np.ndarray, np.ndarray]:
    """The phase products and the tap-by-tap scatter on one problem, each into a NaN-poisoned
    output (an unwritten element stays NaN)."""
    x, w, b = case.arrays(rng, np.float64)
    p = ConvParams.from_args(x.shape, w.shape, None if b is None else b.shape, **case.kwargs)
    x5 = x[None] if x.ndim == 4 else x
    bias = None if b is None else b.reshape(p.groups, p.C_out_g, 1)
    results = []
    for path in (_cpu._phases, _cpu._scatter):
        out = np.full(p.out_shape, np.nan)
        _cpu.BLOCK_ELEMENTS, saved = block_elements, _cpu.BLOCK_ELEMENTS
        try:
            path(x5, w, bias, p, out[None] if out.ndim == 4 else out, np.dtype(np.float64))
        finally:
            _cpu.BLOCK_ELEMENTS = saved
        results.append(out)
    return results[0], results[1]


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=random_cases(bias=True), seed=st.integers(0, 2**32 - 1),
       block_elements=st.sampled_from([1, 64, 1 << 20]))  # fmt: skip
def test_cpu_phases_match_scatter(case, seed, block_elements):
    """The two CPU algorithms (``_cpu.py``) agree, with every output written, on random
    problems (strides past the kernel leave phases with no tap; dilations, taps wholly outside)."""
    phases, scatter = _paths(case, np.random.default_rng(seed), block_elements)
    assert np.isfinite(phases).all() and np.isfinite(scatter).all()
    assert rel_err(phases, scatter) <= TOL["float64"]


def test_cpu_non_finite_weights_take_the_scatter(rng, monkeypatch):
    """The zero frame's zeros times an infinite weight would make NaN where the definition adds
    no term, so weights that are not all finite never reach the phase products."""
    calls = []
    monkeypatch.setattr(_cpu, "_phases", lambda *a: calls.append("phases"))
    monkeypatch.setattr(_cpu, "_scatter", lambda *a: calls.append("scatter"))
    x = rng.standard_normal((1, 8, 8, 8, 8))  # big enough for the phase products
    w = rng.standard_normal((8, 8, 3, 3, 3))
    cupyconvt.conv_transpose3d(x, w, stride=2)
    w[5, 0, 2, 2, 2] = np.inf
    cupyconvt.conv_transpose3d(x, w, stride=2)
    w[5, 0, 2, 2, 2] = np.nan
    cupyconvt.conv_transpose3d(x, w, stride=2)
    assert calls == ["phases", "scatter", "scatter"]


def test_cpu_dilation_far_past_the_input(rng, cpu_path):
    """Taps whose windows lie wholly outside a small input, a zero frame several times the input
    (the phase products), against the definition."""
    x = rng.standard_normal((1, 2, 2, 3, 2))
    w = rng.standard_normal((2, 3, 3, 2, 3))
    kw = dict(stride=2, dilation=(40, 1, 30), padding=(5, 0, 31))
    got = cupyconvt.conv_transpose3d(x, w, **kw)
    assert rel_err(got, conv_transpose3d_oracle(x, w, **kw)) <= TOL["float64"]


@pytest.mark.parametrize(
    ("stride", "size", "k", "c_in", "c_out", "phases"),
    [
        (1, 4, 7, 32, 16, False),  # stride 1, 3360-row im2col columns for 16 channels
        (1, 4, 3, 48, 24, True),
        (1, 2, 3, 1, 1, True),  # stride 1: no per-phase overhead to weigh
        (2, 16, 7, 32, 16, True),
        (2, 4, 3, 4, 4, False),  # strided and tiny: 46080 multiply-adds
    ],
)
def test_cpu_phases_pay(stride, size, k, c_in, c_out, phases):
    """Stride 1 with im2col columns over 100x the output channels, and tiny strided layers, go
    tap by tap."""
    x_shape = (1, c_in, size, size, size)
    p = ConvParams.from_args(x_shape, (c_in, c_out, 3, 5, k), None, stride=stride)
    assert _cpu._phases_pay(p) is phases
