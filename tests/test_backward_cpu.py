"""The backward pass: the three gradients against torch autograd (float64) and a naive loop.

CPU backend through NumPy arrays (and torch CPU tensors through the public entry). The CuPy
tests at the end are marked ``gpu`` and skip without one.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from cases import CASES, ERROR_INPUTS, Case, random_cases
from conftest import need
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from oracle import TOL, rel_err

import cupyconvt
from cupyconvt import _backward_cpu
from cupyconvt._backward import NEEDS
from cupyconvt._params import ConvParams


def _triple(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v, v)


def backward_oracle(gy, x, w, stride=1, padding=0, output_padding=0, groups=1, dilation=1):
    """Naive float64 gradients, from the forward's definition (shares no code with cupyconvt).

    The forward adds ``x[n, ci, i] * w[ci, j, k]`` to ``out[n, g*C_out_g + j, i*s - p + k*dil]``
    for every position inside the output, so each such term passes the gradient back to both
    factors.
    """
    gy = np.asarray(gy, dtype=np.float64)
    x = np.asarray(x, dtype=np.float64)
    w = np.asarray(w, dtype=np.float64)
    unbatched = x.ndim == 4
    if unbatched:
        x, gy = x[None], gy[None]
    s, p, dil = map(_triple, (stride, padding, dilation))
    N, C_in = x.shape[:2]
    size, k, out_size = x.shape[2:], w.shape[2:], gy.shape[2:]
    cog = w.shape[1]
    cig = C_in // groups
    gx, gw = np.zeros(x.shape), np.zeros(w.shape)
    for n, ci in itertools.product(range(N), range(C_in)):
        cols = slice(ci // cig * cog, (ci // cig + 1) * cog)
        for i in itertools.product(*(range(v) for v in size)):
            for kk in itertools.product(*(range(v) for v in k)):
                o = [i[a] * s[a] - p[a] + kk[a] * dil[a] for a in range(3)]
                if all(0 <= o[a] < out_size[a] for a in range(3)):
                    g = gy[(n, cols, *o)]
                    gx[(n, ci, *i)] += np.dot(w[(ci, slice(None), *kk)], g)
                    gw[(ci, slice(None), *kk)] += x[(n, ci, *i)] * g
    gb = gy.sum(axis=(0, 2, 3, 4))
    return (gx[0] if unbatched else gx), gw, gb


def torch_reference(gy, x, w, **kwargs):
    """The three gradients from torch autograd on the CPU, in float64."""
    torch = need("torch", "torch")
    xt = torch.tensor(np.asarray(x, np.float64), requires_grad=True)
    wt = torch.tensor(np.asarray(w, np.float64), requires_grad=True)
    bt = torch.zeros(w.shape[1] * kwargs.get("groups", 1), dtype=torch.float64)
    bt.requires_grad_()
    y = torch.nn.functional.conv_transpose3d(xt, wt, bt, **kwargs)
    y.backward(torch.tensor(np.asarray(gy, np.float64)))
    return xt.grad.numpy(), wt.grad.numpy(), bt.grad.numpy()


def _np_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        return np.dtype(need("ml_dtypes", "ml_dtypes").bfloat16)
    return np.dtype(name)


def _problem(case: Case, rng, dtype=np.float64):
    """Fresh x, w and grad_out of the forward's output shape, in ``dtype``."""
    x, w, _ = case.arrays(rng, dtype)
    out_shape = cupyconvt.output_shape(x.shape, w.shape, **case.kwargs)
    gy = rng.standard_normal(out_shape).astype(dtype)
    return gy, x, w


def _check(got, ref, x, w, dtype):
    names = ("grad_input", "grad_weight", "grad_bias")
    shapes = (x.shape, w.shape, ref[2].shape)  # grad_bias: (C_out,), as the reference's
    for name, g, r, shape in zip(names, got, ref, shapes, strict=True):
        assert isinstance(g, np.ndarray) and g.dtype == np.dtype(dtype), name
        assert g.shape == shape == r.shape, name
        assert g.flags.c_contiguous, name
        err = rel_err(g, r)
        assert err <= TOL[np.dtype(dtype).name], f"{name}: rel err {err}"


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_gradients_match_torch_autograd(case, dtype, rng):
    gy, x, w = _problem(case, rng, np.dtype(dtype))
    got = cupyconvt.conv_transpose3d_backward(gy, x, w, **case.kwargs)
    _check(got, torch_reference(gy, x, w, **case.kwargs), x, w, dtype)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_gradients_match_naive_loop(case, rng):
    gy, x, w = _problem(case, rng)
    got = cupyconvt.conv_transpose3d_backward(gy, x, w, **case.kwargs)
    _check(got, backward_oracle(gy, x, w, **case.kwargs), x, w, "float64")


@pytest.mark.parametrize("case", CASES, ids=str)
def test_gradients_in_blocks_of_one_row(case, rng, monkeypatch):
    """The gradients' im2col blocks (``_backward_cpu._blocks``) one input row of depth at a
    time: grad_weight summed over many blocks, grad_input written block by block."""
    from cupyconvt import _cpu

    monkeypatch.setattr(_cpu, "BLOCK_ELEMENTS", 1)
    gy, x, w = _problem(case, rng)
    got = cupyconvt.conv_transpose3d_backward(gy, x, w, **case.kwargs)
    _check(got, backward_oracle(gy, x, w, **case.kwargs), x, w, "float64")


HALF_CASES = [c for c in CASES if c.name in ("plain_k3", "stride2", "groups_strided", "depthwise",
                                             "unbatched", "everything")]  # fmt: skip


@pytest.mark.parametrize("case", HALF_CASES, ids=str)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_gradients(case, dtype, rng):
    """Computed in float32 and rounded once: against float64 gradients of the rounded inputs."""
    gy, x, w = _problem(case, rng, _np_dtype(dtype))
    got = cupyconvt.conv_transpose3d_backward(gy, x, w, **case.kwargs)
    _check(got, backward_oracle(gy, x, w, **case.kwargs), x, w, dtype)


NEEDS_SUBSETS = [s for r in range(4) for s in itertools.combinations(NEEDS, r)]


@pytest.mark.parametrize("needs", NEEDS_SUBSETS, ids=lambda s: "+".join(s) or "none")
def test_needs_subsets(needs, rng):
    """Each subset gives exactly the asked-for gradients, bitwise equal to the full call's."""
    case = next(c for c in CASES if c.name == "everything")
    gy, x, w = _problem(case, rng, np.float32)
    full = cupyconvt.conv_transpose3d_backward(gy, x, w, **case.kwargs)
    part = cupyconvt.conv_transpose3d_backward(gy, x, w, **case.kwargs, needs=needs)
    assert part._fields == ("grad_input", "grad_weight", "grad_bias")
    for name, g, f in zip(NEEDS, part, full, strict=True):
        if name in needs:
            assert g.tobytes() == f.tobytes(), name
        else:
            assert g is None, name
    if len(needs) == 1:  # a single name may be given as a str
        one = cupyconvt.conv_transpose3d_backward(gy, x, w, **case.kwargs, needs=needs[0])
        assert [g is None for g in one] == [g is None for g in part]


def test_unbatched_gives_unbatched_grad_input(rng):
    case = next(c for c in CASES if c.name == "unbatched")
    gy, x, w = _problem(case, rng)
    assert x.ndim == 4 and gy.ndim == 4
    gi, gw, gb = cupyconvt.conv_transpose3d_backward(gy, x, w, **case.kwargs)
    rx, rw, rb = torch_reference(gy[None], x[None], w, **case.kwargs)
    assert gi.shape == x.shape and rel_err(gi, rx[0]) <= TOL["float64"]
    assert rel_err(gw, rw) <= TOL["float64"] and rel_err(gb, rb) <= TOL["float64"]


def test_empty_batch(rng):
    """Batch 0: an empty grad_input and zero weight and bias gradients, as torch gives."""
    torch = need("torch", "torch")
    x = rng.standard_normal((0, 4, 3, 4, 5)).astype(np.float32)
    w = rng.standard_normal((4, 3, 3, 3, 3)).astype(np.float32)
    gy = np.zeros((0, 6, 7, 9, 11), np.float32)
    gi, gw, gb = cupyconvt.conv_transpose3d_backward(gy, x, w, stride=2, groups=2)
    assert gi.shape == x.shape and gi.dtype == np.float32
    assert gw.shape == w.shape and not gw.any()
    assert gb.shape == (6,) and not gb.any()
    xt, wt = torch.from_numpy(x).requires_grad_(), torch.from_numpy(w).requires_grad_()
    y = torch.nn.functional.conv_transpose3d(xt, wt, stride=2, groups=2)
    assert tuple(y.shape) == gy.shape


def test_non_contiguous_inputs(rng):
    x = rng.standard_normal((2, 6, 5, 8, 4))[:, ::2, :, ::2].transpose(0, 1, 2, 4, 3)
    w = rng.standard_normal((3, 4, 3, 2, 3)).transpose(0, 1, 4, 3, 2)
    kw = dict(stride=2, padding=1)
    out_shape = cupyconvt.output_shape(x.shape, w.shape, **kw)
    gy = rng.standard_normal(out_shape[::-1]).T  # a transposed (Fortran-order) view
    assert not (x.flags.c_contiguous or w.flags.c_contiguous or gy.flags.c_contiguous)
    got = cupyconvt.conv_transpose3d_backward(gy, x, w, **kw)
    _check(got, torch_reference(gy, x, w, **kw), x, w, "float64")


def test_bitwise_deterministic(rng):
    """Run to run bitwise, and the joint input+weight pass equals the separate ones bitwise."""
    x = rng.standard_normal((2, 8, 6, 7, 5)).astype(np.float32)
    w = rng.standard_normal((8, 3, 3, 3, 3)).astype(np.float32)
    kw = dict(stride=2, padding=1, output_padding=1, groups=2)
    gy = rng.standard_normal(cupyconvt.output_shape(x.shape, w.shape, **kw)).astype(np.float32)
    first = cupyconvt.conv_transpose3d_backward(gy, x, w, **kw)
    for _ in range(2):
        again = cupyconvt.conv_transpose3d_backward(gy.copy(), x.copy(), w.copy(), **kw)
        for a, b in zip(first, again, strict=True):
            assert a.tobytes() == b.tobytes()
    p = ConvParams.from_args(x.shape, w.shape, None, **kw)
    assert _backward_cpu.grad_input(gy, w, p).tobytes() == first.grad_input.tobytes()
    assert _backward_cpu.grad_weight(x, gy, p).tobytes() == first.grad_weight.tobytes()


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "bfloat16"])
def test_backend_contract(dtype, rng):
    """The interface the GPU backend shares: 5D C-contiguous results in grad_out's dtype."""
    dt = _np_dtype(dtype)
    case = next(c for c in CASES if c.name == "groups_strided")
    gy, x, w = _problem(case, rng, dt)
    p = ConvParams.from_args(x.shape, w.shape, None, **case.kwargs)
    results = (
        (_backward_cpu.grad_input(gy, w, p, "highest"), p.x_shape5),
        (_backward_cpu.grad_weight(x, gy, p, "highest"), (p.C_in, p.C_out_g, *p.kernel)),
        (_backward_cpu.grad_bias(gy, p), (p.C_out,)),
    )
    ref = backward_oracle(gy, x, w, **case.kwargs)
    for (got, shape), r in zip(results, ref, strict=True):
        assert got.shape == shape and got.dtype == dt and got.flags.c_contiguous
        assert rel_err(got, r) <= TOL[dtype]


def test_torch_cpu_tensors_through_public_entry(rng):
    """torch CPU tensors in, torch tensors out, equal to the NumPy path (bfloat16 included)."""
    torch = need("torch", "torch")
    need("ml_dtypes", "ml_dtypes")
    case = next(c for c in CASES if c.name == "everything")
    for tdt in (torch.float32, torch.bfloat16):
        gy, x, w = (torch.from_numpy(a).to(tdt) for a in _problem(case, rng, np.float32))
        got = cupyconvt.conv_transpose3d_backward(gy, x, w, **case.kwargs)
        assert all(isinstance(g, torch.Tensor) and g.dtype == tdt for g in got)
        ref = cupyconvt.conv_transpose3d_backward(
            *(t.float().numpy() for t in (gy, x, w)), **case.kwargs
        )
        for g, r in zip(got, ref, strict=True):
            assert g.shape == r.shape
            assert rel_err(g.double().numpy(), r) <= TOL[str(tdt).removeprefix("torch.")]
    # An expanded (stride-0) grad_out, as autograd hands out for y.sum().
    gy, x, w = (torch.from_numpy(a) for a in _problem(case, rng))
    ones = torch.ones(()).double().expand(gy.shape)
    got = cupyconvt.conv_transpose3d_backward(ones, x, w, **case.kwargs)
    ref = torch_reference(np.ones(gy.shape), x.numpy(), w.numpy(), **case.kwargs)
    for g, r in zip(got, ref, strict=True):
        assert rel_err(g.numpy(), r) <= TOL["float64"]


GOOD = dict(x=(1, 3, 4, 4, 4), w=(3, 2, 3, 3, 3), gy=(1, 2, 6, 6, 6))

# (what to change from GOOD, exception, regex of the message)
BACKWARD_ERRORS = [
    (dict(gy=(1, 2, 6, 6, 5)), ValueError,
     r"grad_out has shape \(1, 2, 6, 6, 5\), expected \(1, 2, 6, 6, 6\)"),
    (dict(gy=(2, 6, 6, 6)), ValueError, r"grad_out has shape \(2, 6, 6, 6\), expected"),
    (dict(gy_dtype=np.float32), TypeError,
     r"x has dtype float64 but grad_out has dtype float32: grad_out, x and w must share"),
    (dict(w_dtype=np.float32), TypeError, r"w has dtype float32 but grad_out has dtype float64"),
    (dict(all_dtype=np.int32), TypeError,
     r"grad_out has unsupported dtype int32; supported: float16, bfloat16, float32, float64"),
    (dict(gy_kind="list"), TypeError,
     r"grad_out must be a NumPy array, a CuPy array or a torch.Tensor, got list"),
    (dict(w_kind="list"), TypeError, r"grad_out is a NumPy array but w is list"),
    (dict(x_kind="torch"), TypeError, r"grad_out is a NumPy array but x is a torch.Tensor"),
    (dict(needs=("inputs",)), ValueError,
     r"needs=\('inputs',\) contains 'inputs'; each must be one of 'input', 'weight', 'bias'"),
    (dict(needs=("input", 3)), ValueError, r"contains 3; each must be one of"),
    (dict(needs=3), TypeError, r"needs must be a str or a sequence of str .* got int"),
    (dict(precision="low"), ValueError, r"precision='low' is not one of"),
    (dict(precision=1), TypeError, r"precision must be a str"),
    (dict(output_padding=1), ValueError,
     r"output_padding\[0\]=1 must be smaller than max\(stride\[0\], dilation\[0\]\)=1"),
]  # fmt: skip


@pytest.mark.parametrize(("change", "exc", "match"), BACKWARD_ERRORS,
                         ids=[m[:40] for _, _, m in BACKWARD_ERRORS])  # fmt: skip
def test_errors(change, exc, match):
    change = dict(change)
    all_dtype = change.pop("all_dtype", np.float64)
    arrays = {}
    for name in ("gy", "x", "w"):
        shape = change.pop(name, GOOD[name])
        arrays[name] = np.ones(shape, dtype=change.pop(f"{name}_dtype", all_dtype))
        kind = change.pop(f"{name}_kind", None)
        if kind == "list":
            arrays[name] = arrays[name].tolist()
        elif kind == "torch":
            arrays[name] = need("torch", "torch").from_numpy(arrays[name])
    with pytest.raises(exc, match=match):
        cupyconvt.conv_transpose3d_backward(arrays["gy"], arrays["x"], arrays["w"], **change)


@pytest.mark.parametrize(("x_shape", "w_shape", "kwargs", "exc", "match"),
                         [r[:2] + r[3:] for r in ERROR_INPUTS if r[2] is None],
                         ids=lambda v: str(v) if isinstance(v, tuple) else None)  # fmt: skip
def test_forward_rules_apply(x_shape, w_shape, kwargs, exc, match):
    """The forward's argument rules and messages, from the shared table of error inputs."""
    x, w = np.ones(x_shape), np.ones(w_shape)
    if exc is None:  # the table's control row: valid arguments
        gy = np.ones(cupyconvt.output_shape(x_shape, w_shape, **kwargs))
        assert cupyconvt.conv_transpose3d_backward(gy, x, w, **kwargs).grad_input.shape == x_shape
        return
    with pytest.raises(exc, match=match):
        cupyconvt.conv_transpose3d_backward(np.ones(1), x, w, **kwargs)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=random_cases(), seed=st.integers(0, 2**32 - 1))
def test_fuzz_adjoint_identities(case, seed):
    """For random problems: <y, gy> = <x, grad_input> = <w, grad_weight>, <1, gy> = grad_bias.

    y = conv_transpose3d(x, w) is linear in x and in w, so the gradients are its adjoints; this
    ties the backward to the forward (itself checked against an oracle) without a reference.
    """
    rng = np.random.default_rng(seed)
    gy, x, w = _problem(case, rng)
    gi, gw, gb = cupyconvt.conv_transpose3d_backward(gy, x, w, **case.kwargs)
    y = cupyconvt.conv_transpose3d(x, w, **case.kwargs)
    yy = float(np.vdot(y, gy))
    scale = np.linalg.norm(y) * np.linalg.norm(gy) + 1e-300
    assert abs(np.vdot(x, gi) - yy) <= 1e-12 * scale
    assert abs(np.vdot(w, gw) - yy) <= 1e-12 * scale
    gy5 = gy if gy.ndim == 5 else gy[None]
    assert np.allclose(gb, gy5.sum(axis=(0, 2, 3, 4)), rtol=1e-12, atol=1e-12)


# --- CuPy arrays on the GPU (the other backend behind the same entry) -----------------------


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("dtype", ["float64", "float32", "float16", "bfloat16"])
def test_gpu_gradients_match_reference(case, dtype, rng):
    """CuPy arrays: every parameter family and dtype against float64, bitwise repeatable."""
    import cupy

    gy, x, w = _problem(case, rng, _np_dtype(dtype))
    dev = [cupy.asarray(a) for a in (gy, x, w)]
    got = cupyconvt.conv_transpose3d_backward(*dev, **case.kwargs)
    assert all(isinstance(g, cupy.ndarray) for g in got)
    host = [cupy.asnumpy(g) for g in got]
    _check(host, backward_oracle(gy, x, w, **case.kwargs), x, w, dtype)
    again = cupyconvt.conv_transpose3d_backward(*dev, **case.kwargs)
    for a, b in zip(host, again, strict=True):
        assert a.tobytes() == cupy.asnumpy(b).tobytes()


@pytest.mark.gpu
def test_gpu_needs_empty_batch_and_non_contiguous(rng):
    import cupy

    case = next(c for c in CASES if c.name == "everything")
    gy, x, w = (cupy.asarray(a) for a in _problem(case, rng, np.float32))
    full = cupyconvt.conv_transpose3d_backward(gy, x, w, **case.kwargs)
    for needs in NEEDS_SUBSETS:
        part = cupyconvt.conv_transpose3d_backward(gy, x, w, **case.kwargs, needs=needs)
        for name, g, f in zip(NEEDS, part, full, strict=True):
            assert (g is None) == (name not in needs)
            if g is not None:
                assert cupy.asnumpy(g).tobytes() == cupy.asnumpy(f).tobytes()
    # Non-contiguous views give the same results as their contiguous copies.
    strided = cupyconvt.conv_transpose3d_backward(
        cupy.asfortranarray(gy), cupy.asfortranarray(x), w, **case.kwargs
    )
    for g, f in zip(strided, full, strict=True):
        assert cupy.asnumpy(g).tobytes() == cupy.asnumpy(f).tobytes()
    gi, gw, gb = cupyconvt.conv_transpose3d_backward(gy[:0], x[:0], w, **case.kwargs)
    assert gi.shape == x[:0].shape and not gw.any() and not gb.any()
    with pytest.raises(TypeError, match="grad_out is a CuPy array but x is a NumPy array"):
        cupyconvt.conv_transpose3d_backward(gy, cupy.asnumpy(x), w, **case.kwargs)
