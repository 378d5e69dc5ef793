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


def _run(case: Case, rng, dtype):
    x, w, b = case.arrays(rng, dtype)
    got = cupyconvt.conv_transpose3d(x, w, b, **case.kwargs)
    ref = conv_transpose3d_oracle(x, w, b, **case.kwargs)
    return got, ref


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_cpu_matches_oracle(case, dtype, rng):
    got, ref = _run(case, rng, np.dtype(dtype))
    assert got.dtype == np.dtype(dtype)
    assert got.shape == ref.shape
    assert rel_err(got, ref) <= TOL[dtype]


@pytest.mark.parametrize("case", CASES[:6] + [c for c in CASES if c.name == "everything"], ids=str)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_cpu_half_precision(case, dtype, rng):
    if dtype == "bfloat16":
        dt = need("ml_dtypes", "ml_dtypes").bfloat16
    else:
        dt = np.float16
    got, ref = _run(case, rng, dt)
    assert got.dtype == np.dtype(dt)
    assert rel_err(got, ref) <= TOL[dtype]


def test_cpu_out_is_written_in_place(rng):
    case = next(c for c in CASES if c.name == "everything")
    x, w, b = case.arrays(rng, np.float32)
    out = np.full(cupyconvt.output_shape(x.shape, w.shape, **case.kwargs), np.nan, np.float32)
    res = cupyconvt.conv_transpose3d(x, w, b, **case.kwargs, out=out)
    assert res is out
    assert rel_err(out, conv_transpose3d_oracle(x, w, b, **case.kwargs)) <= TOL["float32"]


def test_cpu_non_contiguous_inputs(rng):
    x = rng.standard_normal((2, 6, 5, 8, 4))[:, ::2, :, ::2].transpose(0, 1, 2, 4, 3)
    w = rng.standard_normal((3, 4, 3, 2, 3)).transpose(0, 1, 4, 3, 2)
    assert not x.flags.c_contiguous and not w.flags.c_contiguous
    got = cupyconvt.conv_transpose3d(x, w, stride=2, padding=1)
    ref = conv_transpose3d_oracle(x, w, stride=2, padding=1)
    assert rel_err(got, ref) <= TOL["float64"]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_cpu_matches_torch(case, rng):
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
