"""Argument handling: normalization, output-size math, and one test per bad-input rule."""

from __future__ import annotations

import numpy as np
import pytest
from cases import CASES, ERROR_INPUTS

import cupyconvt
from cupyconvt._params import ConvParams, as_triple


@pytest.mark.parametrize(
    "x_shape, w_shape, b_shape, kwargs, exc, msg",
    ERROR_INPUTS,
    ids=[str(e[5]) for e in ERROR_INPUTS],
)
def test_error_inputs(x_shape, w_shape, b_shape, kwargs, exc, msg):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(x_shape).astype(np.float32)
    w = rng.standard_normal(w_shape).astype(np.float32)
    b = None if b_shape is None else rng.standard_normal(b_shape).astype(np.float32)
    if exc is None:
        out = cupyconvt.conv_transpose3d(x, w, b, **kwargs)
        assert out.shape == cupyconvt.output_shape(x_shape, w_shape, **kwargs)
        return
    with pytest.raises(exc, match=msg):
        cupyconvt.conv_transpose3d(x, w, b, **kwargs)
    with pytest.raises(exc, match=msg):
        ConvParams.from_args(x_shape, w_shape, b_shape, **kwargs)


def test_as_triple():
    assert as_triple("s", 2) == (2, 2, 2)
    assert as_triple("s", (1, 2, 3)) == (1, 2, 3)
    assert as_triple("s", [np.int64(1), 2, np.int32(3)]) == (1, 2, 3)
    assert as_triple("s", np.array([3, 2, 1])) == (3, 2, 1)
    assert as_triple("s", np.int16(4)) == (4, 4, 4)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_output_shape_matches_formula(case):
    kw = case.kwargs
    defaults = (("stride", 1), ("padding", 0), ("output_padding", 0), ("dilation", 1))
    s, p, op, d = (as_triple(n, kw.get(n, dflt)) for n, dflt in defaults)
    expect = tuple((case.size[a] - 1) * s[a] - 2 * p[a] + d[a] * (case.k[a] - 1) + op[a] + 1
                   for a in range(3))  # fmt: skip
    shape = cupyconvt.output_shape(case.x_shape, case.w_shape, **kw)
    assert shape[-3:] == expect
    assert shape[-4] == case.C_out
    assert len(shape) == len(case.x_shape)


def test_useful_macs_counts_taps_inside_output():
    # stride 1, no padding: every tap lands inside, so useful MACs are the dense count.
    p = ConvParams.from_args((2, 3, 4, 5, 6), (3, 4, 3, 3, 3))
    assert p.useful_macs == 2 * 4 * 3 * (4 * 5 * 6) * 27
    # Brute-force count on a cropped, strided, dilated problem.
    p = ConvParams.from_args((1, 2, 5, 4, 3), (2, 1, 3, 2, 3), None,
                             (2, 3, 1), (3, 1, 2), (1, 0, 0),
                             1, (1, 2, 2))  # fmt: skip
    count = 1
    for a in range(3):
        c = 0
        for i in range(p.in_size[a]):
            for k in range(p.kernel[a]):
                o = i * p.stride[a] - p.padding[a] + k * p.dilation[a]
                c += 0 <= o < p.out_size[a]
        count *= c
    assert p.useful_macs == count * p.N * p.C_out * p.C_in_g


def test_zero_batch_returns_empty():
    x = np.ones((0, 3, 4, 4, 4), np.float32)
    w = np.ones((3, 2, 3, 3, 3), np.float32)
    out = cupyconvt.conv_transpose3d(x, w, stride=2)
    assert out.shape == (0, 2, 9, 9, 9) and out.dtype == np.float32


@pytest.mark.parametrize("dtype", [np.int32, np.bool_, np.complex64, np.uint8])
def test_unsupported_dtype(dtype):
    x = np.ones((1, 2, 3, 3, 3), dtype)
    w = np.ones((2, 2, 2, 2, 2), dtype)
    with pytest.raises(TypeError, match=r"x has unsupported dtype .*; supported: float16"):
        cupyconvt.conv_transpose3d(x, w)


def test_dtype_mismatch():
    x = np.ones((1, 2, 3, 3, 3), np.float32)
    w = np.ones((2, 2, 2, 2, 2), np.float64)
    with pytest.raises(TypeError, match=r"w has dtype float64 but x has dtype float32"):
        cupyconvt.conv_transpose3d(x, w)
    b = np.ones(2, np.float16)
    with pytest.raises(TypeError, match=r"bias has dtype float16 but x has dtype float32"):
        cupyconvt.conv_transpose3d(x, w.astype(np.float32), b)


def test_not_an_array():
    w = np.ones((2, 2, 2, 2, 2), np.float32)
    with pytest.raises(TypeError, match=r"x must be a NumPy array, a CuPy array or a torch.Tensor"):
        cupyconvt.conv_transpose3d([[1.0]], w)
    with pytest.raises(TypeError, match=r"x is a numpy array but w is list"):
        cupyconvt.conv_transpose3d(np.ones((1, 2, 3, 3, 3), np.float32), [1.0])


def test_out_argument_checked():
    x = np.ones((1, 2, 3, 3, 3), np.float32)
    w = np.ones((2, 2, 2, 2, 2), np.float32)
    with pytest.raises(
        ValueError, match=r"out has shape \(1, 2, 3, 3, 3\), expected \(1, 2, 4, 4, 4\)"
    ):
        cupyconvt.conv_transpose3d(x, w, out=np.empty((1, 2, 3, 3, 3), np.float32))
    with pytest.raises(TypeError, match=r"out has dtype float64 but x has dtype float32"):
        cupyconvt.conv_transpose3d(x, w, out=np.empty((1, 2, 4, 4, 4), np.float64))
    with pytest.raises(ValueError, match=r"out must be C-contiguous"):
        cupyconvt.conv_transpose3d(x, w, out=np.empty((1, 2, 4, 4, 8), np.float32)[..., ::2])


def test_out_overlapping_an_input_is_refused(rng):
    """Written while the inputs are read, an out sharing their memory would give a wrong answer:
    refused, whichever input, whatever the view."""
    x = rng.standard_normal((1, 4, 5, 5, 5)).astype(np.float32)
    w = rng.standard_normal((4, 4, 1, 1, 1)).astype(np.float32)  # out has x's shape
    with pytest.raises(ValueError, match=r"out overlaps x in memory"):
        cupyconvt.conv_transpose3d(x, w, out=x)
    buf = np.zeros(2 * x.size, np.float32)
    xv = buf[: x.size].reshape(x.shape)
    xv[...] = x
    with pytest.raises(ValueError, match=r"out overlaps x"):  # half of out over x's tail
        cupyconvt.conv_transpose3d(xv, w, out=buf[x.size // 2 :][: x.size].reshape(x.shape))
    with pytest.raises(ValueError, match=r"out overlaps x"):  # x reversed: negative strides
        cupyconvt.conv_transpose3d(xv[:, ::-1], w, out=xv)
    wb = np.zeros(w.size + x.size, np.float32)
    w_view = wb[: w.size].reshape(w.shape)
    with pytest.raises(ValueError, match=r"out overlaps w"):  # out's first element is w's last
        cupyconvt.conv_transpose3d(x, w_view, out=wb[w.size - 1 : -1].reshape(x.shape))
    b = np.zeros(x.size + 4, np.float32)
    with pytest.raises(ValueError, match=r"out overlaps bias"):
        cupyconvt.conv_transpose3d(x, w, b[:4], out=b[3 : 3 + x.size].reshape(x.shape))
    # Right beside the input, sharing no byte: fine, and the result is right.
    out = buf[x.size :].reshape(x.shape)
    got = cupyconvt.conv_transpose3d(xv, w, out=out)
    assert got is out
    ref = cupyconvt.conv_transpose3d(x, w)
    np.testing.assert_array_equal(out, ref)
    np.testing.assert_array_equal(xv, x)  # the input untouched


def test_params_cache_keeps_bool_and_float_apart():
    x = np.ones((1, 3, 4, 4, 4), np.float32)
    w = np.ones((3, 2, 3, 3, 3), np.float32)
    cupyconvt.conv_transpose3d(x, w, padding=1, groups=1)  # cached with ints
    with pytest.raises(TypeError, match="padding must be an int, got bool"):
        cupyconvt.conv_transpose3d(x, w, padding=True)
    with pytest.raises(TypeError, match="groups must be an int"):
        cupyconvt.conv_transpose3d(x, w, padding=1, groups=1.0)
    assert cupyconvt.conv_transpose3d(x, w, padding=[1, 1, 1]).shape == (1, 2, 4, 4, 4)
    # Inside a triple too: (True, 1, 1) == (1, 1, 1) and hashes alike, but is refused.
    with pytest.raises(TypeError, match=r"padding\[0\] must be an int, got bool"):
        cupyconvt.conv_transpose3d(x, w, padding=(True, 1, 1))
    with pytest.raises(TypeError, match=r"padding\[2\] must be an int, got float"):
        cupyconvt.conv_transpose3d(x, w, padding=[1, 1, 1.0])
    # A NumPy integer is valid: computed, not cached.
    assert cupyconvt.conv_transpose3d(x, w, padding=np.int64(1)).shape == (1, 2, 4, 4, 4)


def test_window_is_a_slice_of_the_uncropped_result():
    """ConvParams.window (what cupyconvt.dask computes each block with): the CPU backend gives
    exactly that slice of the uncropped result, asymmetric on every axis."""
    from cupyconvt import _cpu

    rng = np.random.default_rng(7)
    x = rng.standard_normal((1, 2, 4, 5, 3))
    w = rng.standard_normal((2, 3, 3, 2, 4))
    p = ConvParams.from_args(x.shape, w.shape, None, (2, 1, 3), 0, 0, 1, (1, 2, 1))
    assert [p.full_size(a) for a in range(3)] == list(p.out_size) == [9, 7, 10]
    full = _cpu.conv_transpose3d(x, w, None, p)
    win = p.window((1, 0, 2), (5, 3, 7))
    assert win.out_size == (5, 3, 7) and win.padding == (1, 0, 2)
    np.testing.assert_array_equal(_cpu.conv_transpose3d(x, w, None, win),
                                  full[:, :, 1:6, 0:3, 2:9])  # fmt: skip
    for start, length in (((0, 0, 0), (10, 1, 1)), ((0, -1, 0), (1, 1, 1)), ((0, 0, 0), (1, 0, 1))):
        with pytest.raises(ValueError, match="does not lie in the uncropped result"):
            p.window(start, length)
