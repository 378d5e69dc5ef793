"""The channels-last layout and the float32 precision policy, through the public API on the CPU."""

from __future__ import annotations

import numpy as np
import pytest
from cases import CASES, Case
from conftest import need
from oracle import TOL, conv_transpose3d_oracle, rel_err

import cupyconvt
from cupyconvt._layout import LAYOUTS, from_logical_shape, to_logical_shape
from cupyconvt._precision import PRECISIONS, resolve

#: Strides, groups, padding, output_padding, dilation, bias and unbatched, each at least once.
LAYOUT_CASES = [
    c
    for c in CASES
    if c.name
    in (
        "plain_k3",
        "k1",
        "stride_asym",
        "padding_asym",
        "output_padding_gt_padding",
        "dilation_stride",
        "groups_strided",
        "depthwise",
        "bias",
        "unbatched",
        "odd_sizes",
        "everything",
    )
]


def _to_ndhwc(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.moveaxis(a, -4, -1))


def _to_ncdhw(a: np.ndarray) -> np.ndarray:
    return np.moveaxis(a, -1, -4)


@pytest.fixture
def default_precision():
    """Restore the process-wide precision whatever the test does."""
    saved = cupyconvt.get_float32_matmul_precision()
    try:
        yield saved
    finally:
        cupyconvt.set_float32_matmul_precision(saved)


def test_layout_cases_cover_every_argument():
    assert len(LAYOUT_CASES) == 12
    assert any(c.N is None for c in LAYOUT_CASES) and any(c.bias for c in LAYOUT_CASES)
    for arg in ("stride", "padding", "output_padding", "groups", "dilation"):
        assert any(arg in c.kwargs for c in LAYOUT_CASES), arg


@pytest.mark.parametrize("case", LAYOUT_CASES, ids=str)
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("with_out", [False, True], ids=["alloc", "out"])
def test_ndhwc_matches_ncdhw_and_oracle(case: Case, dtype, with_out, rng, cpu_path):
    x, w, b = case.arrays(rng, np.dtype(dtype))
    x_last = _to_ndhwc(x)
    ref = conv_transpose3d_oracle(x, w, b, **case.kwargs)
    out = None
    if with_out:
        out = np.full(from_logical_shape(ref.shape, "NDHWC"), np.nan, dtype)
    got = cupyconvt.conv_transpose3d(x_last, w, b, **case.kwargs, out=out, layout="NDHWC")
    if with_out:
        assert got is out
    assert got.dtype == np.dtype(dtype)
    assert got.flags.c_contiguous
    assert got.shape == from_logical_shape(ref.shape, "NDHWC")
    assert rel_err(_to_ncdhw(got), ref) <= TOL[dtype]
    # Same arithmetic as the NCDHW path, only the axis order differs.
    ncdhw = cupyconvt.conv_transpose3d(x, w, b, **case.kwargs)
    np.testing.assert_array_equal(_to_ncdhw(got), ncdhw)


def test_ndhwc_non_contiguous_input(rng, cpu_path):
    x = rng.standard_normal((2, 5, 8, 4, 6))[:, :, ::2, :, ::2]  # (N, D, H, W, C) with strides
    w = rng.standard_normal((3, 2, 3, 2, 3))
    assert not x.flags.c_contiguous
    got = cupyconvt.conv_transpose3d(x, w, stride=2, padding=1, layout="NDHWC")
    ref = conv_transpose3d_oracle(_to_ncdhw(x), w, stride=2, padding=1)
    assert rel_err(_to_ncdhw(got), ref) <= TOL["float64"]


def test_ndhwc_empty_batch():
    x = np.zeros((0, 4, 4, 4, 3), np.float32)
    w = np.ones((3, 2, 3, 3, 3), np.float32)
    got = cupyconvt.conv_transpose3d(x, w, stride=2, layout="NDHWC")
    assert got.shape == (0, 9, 9, 9, 2)


@pytest.mark.parametrize(
    "shape, logical",
    [((2, 4, 5, 6, 3), (2, 3, 4, 5, 6)), ((4, 5, 6, 3), (3, 4, 5, 6)), ((4, 5, 6), (4, 5, 6))],
)
def test_logical_shape_round_trip(shape, logical):
    assert to_logical_shape(shape, "NDHWC") == logical
    assert from_logical_shape(logical, "NDHWC") == shape
    assert to_logical_shape(shape, "NCDHW") == shape == from_logical_shape(shape, "NCDHW")


# (kwargs of conv_transpose3d besides x and w, exception, regex of the message)
LAYOUT_PRECISION_ERRORS = [
    ({"layout": "NHWC"}, ValueError, r"layout='NHWC' is not one of 'NCDHW', 'NDHWC'"),
    ({"layout": "ndhwc"}, ValueError, r"layout='ndhwc' is not one of"),
    ({"layout": None}, TypeError, r"layout must be a str, one of 'NCDHW', 'NDHWC'; got NoneType"),
    ({"precision": "low"}, ValueError,
     r"precision='low' is not one of 'highest', 'high', 'medium'"),
    ({"precision": "HIGH"}, ValueError, r"precision='HIGH' is not one of"),
    ({"precision": 32}, TypeError,
     r"precision must be a str, one of 'highest', 'high', 'medium'; got int 32"),
]  # fmt: skip


@pytest.mark.parametrize("kwargs, exc, match", LAYOUT_PRECISION_ERRORS)
def test_bad_layout_or_precision(kwargs, exc, match):
    x = np.zeros((1, 3, 4, 4, 4), np.float32)
    w = np.zeros((3, 2, 3, 3, 3), np.float32)
    with pytest.raises(exc, match=match):
        cupyconvt.conv_transpose3d(x, w, **kwargs)


def test_ndhwc_out_of_wrong_shape():
    x = np.zeros((1, 4, 4, 4, 3), np.float32)  # (N, D, H, W, C_in)
    w = np.zeros((3, 2, 3, 3, 3), np.float32)
    ncdhw_out = np.zeros((1, 2, 6, 6, 6), np.float32)  # the NCDHW shape is wrong for NDHWC
    with pytest.raises(
        ValueError,
        match=r"out has shape \(1, 2, 6, 6, 6\), expected \(1, 6, 6, 6, 2\) for layout='NDHWC'",
    ):
        cupyconvt.conv_transpose3d(x, w, out=ncdhw_out, layout="NDHWC")
    strided = np.zeros((1, 6, 6, 6, 4), np.float32)[..., ::2]
    with pytest.raises(ValueError, match="out must be C-contiguous"):
        cupyconvt.conv_transpose3d(x, w, out=strided, layout="NDHWC")


@pytest.mark.parametrize(
    "x_shape, match",
    [
        ((4, 4, 3), r"x must be 5D \(N, D, H, W, C_in\) or unbatched 4D \(D, H, W, C_in\) "
         r"for layout='NDHWC', got 3D with shape \(4, 4, 3\)"),
        ((1, 1, 4, 4, 4, 3), r"x must be 5D \(N, D, H, W, C_in\) .* got 6D"),
    ],
)  # fmt: skip
def test_ndhwc_x_of_wrong_rank(x_shape, match):
    w = np.zeros((3, 2, 3, 3, 3), np.float32)
    with pytest.raises(ValueError, match=match):
        cupyconvt.conv_transpose3d(np.zeros(x_shape, np.float32), w, layout="NDHWC")


def test_ndhwc_channel_mismatch_names_channels():
    # An NCDHW array passed as NDHWC: its last axis is taken as C_in.
    x = np.zeros((1, 3, 4, 4, 5), np.float32)
    w = np.zeros((3, 2, 3, 3, 3), np.float32)
    with pytest.raises(ValueError, match=r"x has C_in=5 channels but w.shape\[0\]=3"):
        cupyconvt.conv_transpose3d(x, w, layout="NDHWC")


def test_precision_round_trip(default_precision):
    assert default_precision == "highest"
    assert resolve(None) == "highest"
    for precision in PRECISIONS:
        cupyconvt.set_float32_matmul_precision(precision)
        assert cupyconvt.get_float32_matmul_precision() == precision
        assert resolve(None) == precision
        assert resolve("highest") == "highest"  # a call's own value wins over the default


def test_set_precision_errors_keep_the_default(default_precision):
    cupyconvt.set_float32_matmul_precision("medium")
    with pytest.raises(ValueError, match=r"precision='low' is not one of 'highest', 'high'"):
        cupyconvt.set_float32_matmul_precision("low")
    with pytest.raises(TypeError, match=r"precision must be a str.*got NoneType"):
        cupyconvt.set_float32_matmul_precision(None)
    assert cupyconvt.get_float32_matmul_precision() == "medium"


def test_public_names():
    for name in ("set_float32_matmul_precision", "get_float32_matmul_precision"):
        assert name in cupyconvt.__all__ and callable(getattr(cupyconvt, name))
    assert PRECISIONS == ("highest", "high", "medium")
    assert LAYOUTS == ("NCDHW", "NDHWC")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_precision_does_not_change_cpu_results(layout, default_precision, rng):
    case = next(c for c in CASES if c.name == "everything")
    x, w, b = case.arrays(rng, np.float32)
    if layout == "NDHWC":
        x = _to_ndhwc(x)
    base = cupyconvt.conv_transpose3d(x, w, b, **case.kwargs, layout=layout)
    for precision in PRECISIONS:
        got = cupyconvt.conv_transpose3d(x, w, b, **case.kwargs, precision=precision, layout=layout)
        np.testing.assert_array_equal(got, base)
    cupyconvt.set_float32_matmul_precision("medium")
    np.testing.assert_array_equal(
        cupyconvt.conv_transpose3d(x, w, b, **case.kwargs, layout=layout), base
    )
    ref = conv_transpose3d_oracle(x if layout == "NCDHW" else _to_ncdhw(x), w, b, **case.kwargs)
    assert rel_err(base if layout == "NCDHW" else _to_ncdhw(base), ref) <= TOL["float32"]


@pytest.mark.parametrize("case", [c for c in LAYOUT_CASES if c.N is not None], ids=str)
@pytest.mark.parametrize("dtype", ["float64", "float32", "bfloat16"])
def test_torch_channels_last_3d(case: Case, dtype, rng, cpu_path):
    torch = need("torch", "torch")
    tdt = getattr(torch, dtype)
    x, w, b = (None if a is None else torch.from_numpy(a).to(tdt) for a in case.arrays(rng))
    x = x.to(memory_format=torch.channels_last_3d)
    assert not x.is_contiguous()  # the cases all have C_in > 1 and more than one voxel
    got = cupyconvt.conv_transpose3d(x, w, b, **case.kwargs, precision="medium")
    assert got.dtype == tdt
    assert got.is_contiguous(memory_format=torch.channels_last_3d)
    if got[0, 0].numel() > 1 and got.shape[1] > 1:
        assert not got.is_contiguous()
    expect = torch.nn.functional.conv_transpose3d(
        x.double(), w.double(), None if b is None else b.double(), **case.kwargs
    )
    assert got.shape == expect.shape
    assert rel_err(got.double().numpy(), expect.numpy()) <= TOL[dtype]


def test_torch_contiguous_stays_contiguous(rng):
    torch = need("torch", "torch")
    x = torch.randn(2, 3, 4, 5, 6, dtype=torch.float64)
    w = torch.randn(3, 2, 3, 3, 3, dtype=torch.float64)
    got = cupyconvt.conv_transpose3d(x, w, stride=2)
    assert got.is_contiguous()
    unbatched = x[0].permute(1, 2, 3, 0).contiguous().permute(3, 0, 1, 2)  # 4D, channels inner
    got4 = cupyconvt.conv_transpose3d(unbatched, w, stride=2)
    assert got4.is_contiguous()
    expect = torch.nn.functional.conv_transpose3d(unbatched, w, stride=2)
    assert rel_err(got4.numpy(), expect.numpy()) <= TOL["float64"]


def test_torch_rejects_layout():
    torch = need("torch", "torch")
    x = torch.zeros(1, 3, 4, 4, 4).to(memory_format=torch.channels_last_3d)
    w = torch.zeros(3, 2, 3, 3, 3)
    with pytest.raises(
        ValueError,
        match=r"layout='NDHWC' is not supported for torch tensors: a torch tensor carries its "
        r"memory format; for channels last pass x.to\(memory_format=torch.channels_last_3d\)",
    ):
        cupyconvt.conv_transpose3d(x, w, layout="NDHWC")
    with pytest.raises(ValueError, match=r"precision='fast' is not one of"):
        cupyconvt.conv_transpose3d(x, w, precision="fast")
    assert cupyconvt.conv_transpose3d(x, w, layout="NCDHW").shape == (1, 2, 6, 6, 6)
