"""GPU backend: every dtype and parameter family against a float64 reference, output poisoned.

Skipped (by conftest) where no CUDA GPU with CuPy is present.
"""

from __future__ import annotations

import numpy as np
import pytest
from cases import CASES, Case
from oracle import TOL, conv_transpose3d_oracle, rel_err

import cupyconvt
from cupyconvt import _gpu
from cupyconvt._params import ConvParams
from cupyconvt._select import FAMILIES, eligible

pytestmark = pytest.mark.gpu

DTYPES = ["float64", "float32", "float16", "bfloat16"]


def _np_dtype(name):
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _poisoned(shape, dtype):
    import cupy

    return cupy.full(shape, np.nan, dtype=dtype)


#: float32 tolerance per precision policy: "high" (3xTF32) is held to the float32 bar; TF32
#: operands carry 11 significant bits (unit roundoff 2^-11 ~ 4.9e-4).
TOL_PRECISION = {"highest": TOL["float32"], "high": TOL["float32"], "medium": 2e-3}


def _run(xd, wd, bd, case: Case, out, family, precision="highest"):
    if family is None:
        return cupyconvt.conv_transpose3d(xd, wd, bd, **case.kwargs, out=out, precision=precision)
    p = ConvParams.from_args(xd.shape, wd.shape, None if bd is None else bd.shape, **case.kwargs)
    return _gpu.conv_transpose3d(xd, wd, bd, p, out, family=family, precision=precision)


def _check_gpu(
    case: Case, dtype: str, rng, reference=conv_transpose3d_oracle, family=None, precision="highest"
):
    """Run on fresh random data into a NaN-poisoned output; compare with the float64 reference."""
    import cupy

    dt = _np_dtype(dtype)
    x, w, b = case.arrays(rng, dt)
    p = ConvParams.from_args(x.shape, w.shape, None if b is None else b.shape, **case.kwargs)
    if family is not None and not eligible(p, dtype, family, precision):
        pytest.skip(f"{family} is not eligible for {case}")
    out = _poisoned(p.out_shape, dt)
    xd, wd = cupy.asarray(x), cupy.asarray(w)
    bd = None if b is None else cupy.asarray(b)
    res = _run(xd, wd, bd, case, out, family, precision)
    assert res is out
    got = cupy.asnumpy(out)
    ref = reference(x, w, b, **case.kwargs)
    err = rel_err(got, ref)
    tol = TOL_PRECISION[precision] if dtype == "float32" else TOL[dtype]
    assert err <= tol, f"{case} {dtype} {family} {precision}: rel err {err}"
    # Deterministic: a second run into a fresh poisoned buffer is bitwise identical.
    again = _run(xd, wd, bd, case, _poisoned(out.shape, dt), family, precision)
    assert cupy.asnumpy(again).tobytes() == got.tobytes()
    return got


@pytest.mark.parametrize("family", [None, *FAMILIES])
@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_matches_oracle(case, dtype, family, rng):
    """Every family (None: the selector's choice) on every parameter family and dtype."""
    _check_gpu(case, dtype, rng, family=family)


def _cpu_reference(x, w, b, **kw):
    """The CPU backend in float64 (itself checked against the oracle) for shapes too big for it."""
    f64 = np.float64
    return cupyconvt.conv_transpose3d(x.astype(f64), w.astype(f64),
                                      None if b is None else b.astype(f64), **kw)  # fmt: skip


MEDIUM = [
    Case("m_dense", 2, 16, 24, (9, 10, 11), (3, 3, 3), bias=True),
    Case("m_strided", 2, 24, 16, (7, 8, 9), (3, 3, 3), dict(stride=2, padding=1, output_padding=1)),
    Case("m_k4s2", 1, 32, 16, (6, 6, 6), (4, 4, 4), dict(stride=2, padding=1), bias=True),
    Case("m_grouped", 2, 16, 16, (6, 7, 8), (3, 5, 3), dict(stride=2, padding=(1, 2, 1), groups=4)),
    Case("m_depthwise", 1, 8, 8, (12, 12, 12), (4, 4, 4), dict(stride=2, padding=1, groups=8)),
    Case("m_dilated", 2, 12, 20, (6, 7, 6), (3, 3, 3), dict(stride=2, padding=1, dilation=2)),
    Case("m_c64_ci_pad", 1, 12, 64, (5, 6, 7), (3, 3, 3), dict(stride=2), bias=True),
    Case("m_c48", 1, 20, 48, (5, 5, 6), (3, 3, 3), dict(dilation=(1, 2, 1), padding=1)),
    Case("m_c32_groups", 1, 16, 64, (4, 5, 6), (2, 3, 2), dict(groups=2, stride=(2, 1, 2))),
    Case("m_c80", 2, 8, 80, (4, 4, 5), (3, 3, 3), dict(stride=2, padding=1, output_padding=1)),
    Case("m_asym", 2, 20, 12, (5, 9, 13), (3, 5, 7), dict(stride=(1, 2, 3), padding=(1, 2, 3),
                                                          output_padding=(0, 1, 2))),
    # The depthwise family's specializations: 2-4 taps, every padding parity, odd output widths
    # (no paired stores), two w tiles, a channel multiplier, output_padding.
    Case("m_dw_k3_mult", 2, 6, 12, (9, 7, 37), (3, 3, 3),
         dict(stride=2, padding=(1, 0, 1), output_padding=(1, 1, 0), groups=6), bias=True),
    Case("m_dw_k2", 1, 4, 4, (5, 6, 20), (2, 2, 2), dict(stride=2, groups=4)),
    Case("m_dw_k4_pad", 1, 3, 3, (10, 5, 9), (4, 4, 4), dict(stride=2, padding=(2, 3, 0), groups=3),
         bias=True),
]  # fmt: skip


@pytest.mark.parametrize("family", [None, *FAMILIES])
@pytest.mark.parametrize("case", MEDIUM, ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_medium_shapes(case, dtype, family, rng):
    _check_gpu(case, dtype, rng, reference=_cpu_reference, family=family)


@pytest.mark.parametrize("dq", [1, 2, 3, 5, 64])
@pytest.mark.parametrize("case", [c for c in MEDIUM if c.name.startswith("m_dw")], ids=str)
def test_gpu_depthwise_cells_per_thread(case, dq, rng):
    """The depthwise kernel with every column length (cells a thread walks along depth): the
    column ends and the window's reload at each column start."""
    import cupy

    from cupyconvt._depthwise import DwPlan

    x, w, b = case.arrays(rng, np.float32)
    p = ConvParams.from_args(x.shape, w.shape, None if b is None else b.shape, **case.kwargs)
    plan = DwPlan.build(p, "float32", sm_count=132, dq=dq)
    out = _poisoned(p.out_shape5, np.float32)
    bd = None if b is None else cupy.asarray(b)
    plan.launch(cupy.asarray(x).reshape(p.x_shape5), cupy.asarray(w), bd, out)
    ref = conv_transpose3d_oracle(x, w, b, **case.kwargs).reshape(p.out_shape5)
    assert rel_err(cupy.asnumpy(out), ref) <= TOL["float32"]


@pytest.mark.parametrize("family", [None, "tc"])
@pytest.mark.parametrize("case", MEDIUM + CASES, ids=str)
@pytest.mark.parametrize("precision", ["high", "medium"])
def test_gpu_float32_precisions(case, precision, family, rng):
    """float32 under "high" (3xTF32: the float32 tolerance) and "medium" (TF32)."""
    _check_gpu(case, "float32", rng, reference=_cpu_reference, family=family, precision=precision)


LAYOUT_CASES = [
    c for c in MEDIUM if c.name in ("m_dense", "m_k4s2", "m_grouped", "m_dilated", "m_dw_k3_mult")
]
LAYOUT_CASES.append(Case("unbatched_c16", None, 16, 16, (5, 6, 7), (3, 3, 3), dict(stride=2)))


@pytest.mark.parametrize("family", [None, *FAMILIES])
@pytest.mark.parametrize("case", LAYOUT_CASES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_channels_last(case, dtype, family, rng):
    """layout="NDHWC" gives the NCDHW result, transposed, bitwise (same kernel, same order)."""
    import cupy

    dt = _np_dtype(dtype)
    x, w, b = case.arrays(rng, dt)
    p = ConvParams.from_args(x.shape, w.shape, None if b is None else b.shape, **case.kwargs)
    if family is not None and not eligible(p, dtype, family):
        pytest.skip(f"{family} is not eligible for {case}")
    xd, wd = cupy.asarray(x), cupy.asarray(w)
    bd = None if b is None else cupy.asarray(b)
    ncdhw = _run(xd, wd, bd, case, _poisoned(p.out_shape, dt), family)
    x_cl = cupy.ascontiguousarray(cupy.moveaxis(xd, -4, -1))
    out_cl = _poisoned(ncdhw.shape[:-4] + ncdhw.shape[-3:] + ncdhw.shape[-4:-3], dt)
    if family is None:
        cupyconvt.conv_transpose3d(x_cl, wd, bd, **case.kwargs, out=out_cl, layout="NDHWC")
    else:
        _gpu.conv_transpose3d(x_cl, wd, bd, p, out_cl, family=family, layout="NDHWC")
    got = cupy.asnumpy(cupy.moveaxis(out_cl, -1, -4))
    assert got.tobytes() == cupy.asnumpy(ncdhw).tobytes()
    assert rel_err(got, conv_transpose3d_oracle(x, w, b, **case.kwargs)) <= TOL[dtype]


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_gpu_tc_misaligned_channels_last_input(dtype, rng):
    """An NDHWC view off a 16-byte boundary (the 16-byte copies need one: it is copied first)."""
    import cupy

    case = Case("c16", 2, 16, 24, (4, 5, 6), (3, 3, 3), dict(stride=2, padding=1), bias=True)
    dt = _np_dtype(dtype)
    x, w, b = case.arrays(rng, dt)
    p = ConvParams.from_args(x.shape, w.shape, b.shape, **case.kwargs)
    x_cl = np.ascontiguousarray(np.moveaxis(x, 1, -1))
    buf = cupy.empty(x_cl.size + 1, dtype=dt)
    xd = buf[1:].reshape(x_cl.shape)
    xd[...] = cupy.asarray(x_cl)
    assert xd.data.ptr % 16 != 0
    out = _poisoned((2, *p.out_size, 24), dt)
    _gpu.conv_transpose3d(xd, cupy.asarray(w), cupy.asarray(b), p, out, family="tc",
                          precision="high", layout="NDHWC")  # fmt: skip
    ref = np.moveaxis(conv_transpose3d_oracle(x, w, b, **case.kwargs), 1, -1)
    assert rel_err(cupy.asnumpy(out), ref) <= TOL[dtype]


def test_gpu_non_contiguous_inputs(rng):
    import cupy

    x = cupy.asarray(rng.standard_normal((2, 8, 6, 7, 9)))[:, ::2, :, ::-1].transpose(0, 1, 2, 4, 3)
    w = cupy.asarray(rng.standard_normal((4, 3, 3, 2, 3))).transpose(0, 1, 4, 3, 2)
    assert not x.flags.c_contiguous and not w.flags.c_contiguous
    got = cupyconvt.conv_transpose3d(x, w, stride=2, padding=1)
    ref = conv_transpose3d_oracle(cupy.asnumpy(x), cupy.asnumpy(w), stride=2, padding=1)
    assert rel_err(cupy.asnumpy(got), ref) <= TOL["float64"]


def test_gpu_errors():
    import cupy

    x = cupy.ones((1, 2, 3, 3, 3), cupy.float32)
    w = np.ones((2, 2, 2, 2, 2), np.float32)
    with pytest.raises(TypeError, match="x is a cupy array but w is a numpy array"):
        cupyconvt.conv_transpose3d(x, w)
    with pytest.raises(TypeError, match="x is a numpy array but w is a cupy array"):
        cupyconvt.conv_transpose3d(cupy.asnumpy(x), cupy.asarray(w))
    with pytest.raises(TypeError, match="x has unsupported dtype int32"):
        cupyconvt.conv_transpose3d(x.astype(cupy.int32), cupy.asarray(w).astype(cupy.int32))
    empty = cupyconvt.conv_transpose3d(x[:0], cupy.asarray(w))
    assert isinstance(empty, cupy.ndarray) and empty.shape == (0, 2, 4, 4, 4)


def test_gpu_second_device(rng):
    import cupy

    if cupy.cuda.runtime.getDeviceCount() < 2:
        pytest.skip("one GPU only")
    case = MEDIUM[1]
    x, w, b = case.arrays(rng, np.float32)
    with cupy.cuda.Device(1):
        xd, wd = cupy.asarray(x), cupy.asarray(w)
    got = cupyconvt.conv_transpose3d(xd, wd, **case.kwargs)
    assert got.device.id == 1
    assert rel_err(cupy.asnumpy(got), _cpu_reference(x, w, None, **case.kwargs)) <= TOL["float32"]
    with pytest.raises(ValueError, match="w is on GPU 0 but x is on GPU 1"):
        cupyconvt.conv_transpose3d(xd, cupy.asarray(w), **case.kwargs)


@pytest.mark.parametrize("dtype", DTYPES)
def test_torch_cuda_on_side_stream(dtype, rng):
    torch = pytest.importorskip("torch")
    import cupy

    case = MEDIUM[2]
    tdt = getattr(torch, dtype)
    x, w, b = (torch.from_numpy(a).to(device="cuda", dtype=tdt) for a in case.arrays(rng))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        # Input is read without a copy: CuPy sees torch's memory.
        assert cupy.from_dlpack(x).data.ptr == x.data_ptr()
        got = cupyconvt.conv_transpose3d(x, w, b, **case.kwargs)
    assert isinstance(got, torch.Tensor) and got.is_cuda and got.dtype == tdt
    side.synchronize()
    ref = torch.nn.functional.conv_transpose3d(x.double(), w.double(), b.double(), **case.kwargs)
    assert rel_err(got.double().cpu().numpy(), ref.cpu().numpy()) <= TOL[dtype]


def test_torch_cuda_stream_order():
    """Work queued on torch's stream before the call is seen by it: no missing sync."""
    torch = pytest.importorskip("torch")
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        x = torch.empty(1, 64, 32, 32, 32, device="cuda")
        w = torch.empty(64, 32, 3, 3, 3, device="cuda")
        torch.cuda._sleep(50_000_000)  # keep the stream busy so a race would show
        x.normal_()
        w.normal_()
        got = cupyconvt.conv_transpose3d(x, w, stride=2)
        ref = torch.nn.functional.conv_transpose3d(x.double(), w.double(), stride=2)
    s.synchronize()
    assert rel_err(got.double().cpu().numpy(), ref.cpu().numpy()) <= TOL["float32"]


def test_gpu_autotune_caches_winner(tmp_path, monkeypatch, rng):
    """With autotuning on, the first call times the eligible families and stores the winner on
    disk; the result is still correct, and a fresh process would find the entry."""
    import json

    import cupy

    from cupyconvt import _autotune, set_autotune

    monkeypatch.setenv("CUPYCONVT_CACHE_DIR", str(tmp_path))
    _autotune.clear(memory_only=True)
    case = MEDIUM[3]  # grouped: grouped, igemm and direct are all eligible
    x, w, b = case.arrays(rng, np.float32)
    set_autotune(True)
    try:
        out = _poisoned(cupyconvt.output_shape(x.shape, w.shape, **case.kwargs), np.float32)
        cupyconvt.conv_transpose3d(cupy.asarray(x), cupy.asarray(w), **case.kwargs, out=out)
    finally:
        set_autotune(None)
    ref = _cpu_reference(x, w, None, **case.kwargs)
    assert rel_err(cupy.asnumpy(out), ref) <= TOL["float32"]
    entries = json.loads((tmp_path / "autotune.json").read_text())
    (entry,) = entries.values()
    assert entry["winner"] in FAMILIES and len(entry["ms"]) >= 2


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "tc"])  # tc: TF32 modes only
def test_gpu_float32_keeps_denormals(family, rng):
    """float32 is IEEE: denormal products and sums are kept, not flushed to zero (CuPy compiles
    with -ftz=true; the kernels use PTX fma.rn.f32, which never flushes)."""
    import cupy

    case = MEDIUM[1]
    x, w, _ = case.arrays(rng, np.float32)
    x = (x * np.float32(1e-38)).astype(np.float32)  # around the smallest normal float32
    w = (w * np.float32(1e-2)).astype(np.float32)  # products are denormal
    p = ConvParams.from_args(x.shape, w.shape, None, **case.kwargs)
    if not eligible(p, "float32", family):
        pytest.skip(f"{family} is not eligible")
    out = _poisoned(p.out_shape, np.float32)
    _gpu.conv_transpose3d(cupy.asarray(x), cupy.asarray(w), None, p, out, family=family)
    got = cupy.asnumpy(out)
    ref = conv_transpose3d_oracle(x.astype(np.float64), w.astype(np.float64), **case.kwargs)
    assert np.abs(ref).max() < 1.2e-38  # the reference itself is denormal
    assert rel_err(got, ref) <= 1e-3, "denormals flushed"


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_gpu_grouped_misaligned_input(dtype, rng):
    """An input view that starts off a 16-byte boundary (W a multiple of 4, so only the pointer
    rules out the grouped kernel's 16-byte tile copies) is still computed exactly."""
    import cupy

    case = Case("misaligned", 3, 8, 8, (5, 6, 8), (3, 3, 3), dict(stride=2, padding=1, groups=4))
    x, w, b = case.arrays(rng, np.dtype(dtype))
    flat = cupy.asarray(np.concatenate([np.ones(1, dtype), x.ravel()]))
    xd = flat[1:].reshape(x.shape)  # contiguous, one element past an aligned allocation
    assert xd.flags.c_contiguous and xd.data.ptr % 16 != 0
    p = ConvParams.from_args(x.shape, w.shape, None, **case.kwargs)
    assert eligible(p, dtype, "grouped")
    out = _poisoned(p.out_shape, dtype)
    _gpu.conv_transpose3d(xd, cupy.asarray(w), None, p, out, family="grouped")
    ref = conv_transpose3d_oracle(x.astype(np.float64), w.astype(np.float64), **case.kwargs)
    assert rel_err(cupy.asnumpy(out), ref) <= TOL[dtype]
