"""Randomized problems (tests/fuzz.py) against a float64 reference, with the output poisoned.

Each problem is rebuilt from ``(CUPYCONVT_FUZZ_SEED, index)`` alone and run on fresh random data
(never zeros, nonzero mean), placed in memory as the problem says (misaligned, strided, permuted,
with NaN around it). The result must match the float64 reference of the rounded inputs within
the dtype's tolerance, hold no NaN (an element left unwritten in a poisoned ``out`` shows), come
back as ``out`` when one is given, with the right type, shape, dtype and layout, leave the
inputs and the guard elements around ``out`` untouched, and on the GPU repeat bitwise.

- ``test_fuzz_gpu``: CuPy arrays (and torch CUDA tensors for the problems that say so), a forced
  kernel family where the problem names one. ``CUPYCONVT_FUZZ_COUNT`` problems (300 by default;
  2000 or more for a release). Marked ``gpu``.
- ``test_fuzz_cpu``: the same problems on the CPU backend (NumPy, torch CPU tensors),
  ``CUPYCONVT_FUZZ_COUNT_CPU`` of them (150 by default), each through both of the backend's
  algorithms (the ``cpu_path`` fixture). The float32 precision is ignored there, so float32 is
  held to the float32 bar at every precision.
- ``CUPYCONVT_FUZZ_INDICES=17,1234`` runs those problems only (what a failure's repro line says);
  ``0:1000`` and ``1000:2000`` split a long run in parts.
- ``CUPYCONVT_FUZZ_SEED`` picks another set of problems (default ``fuzz.DEFAULT_SEED``).

The rest checks the harness: the fast references against the naive loops, the generator's
determinism and its coverage of every dtype, layout, precision, view kind, family and so on.
"""

from __future__ import annotations

import collections
import itertools
import time
from dataclasses import dataclass
from typing import Any

import fuzz
import numpy as np
import pytest
from cases import CASES
from conftest import need
from oracle import (
    TOL,
    conv_transpose3d_backward_reference,
    conv_transpose3d_oracle,
    conv_transpose3d_reference,
    rel_err,
)
from test_backward_cpu import backward_oracle
from test_gpu import TOL_PRECISION

import cupyconvt
from cupyconvt._select import FAMILIES, eligible

SEED = fuzz.env_seed()
GPU_INDICES = fuzz.env_indices("CUPYCONVT_FUZZ_COUNT", 300)
CPU_INDICES = fuzz.env_indices("CUPYCONVT_FUZZ_COUNT_CPU", 150)
GRADIENTS = ("grad_input", "grad_weight", "grad_bias")


@dataclass(frozen=True)
class Backend:
    """Where a problem runs: the array module, how results come back, the torch device."""

    name: str  # "cpu" or "gpu"
    xp: Any
    torch_device: str

    def to_host(self, a: Any) -> np.ndarray:
        return a if self.xp is np else self.xp.asnumpy(a)


def _gpu_backend() -> Backend:
    import cupy

    return Backend("gpu", cupy, "cuda")


CPU = Backend("cpu", np, "cpu")


def _tol(prob: fuzz.FuzzProblem, be: Backend) -> float:
    """The dtype's tolerance; float32 on the GPU by its precision ("high" keeps the float32
    bar, "medium" is TF32). The CPU computes float32 in IEEE float32 whatever is asked."""
    if prob.dtype == "float32" and be.name == "gpu":
        return TOL_PRECISION[prob.precision]
    return TOL[prob.dtype]


def _as_float64(be: Backend, a: Any) -> np.ndarray:
    """A result (NumPy, CuPy or torch) as a float64 NumPy array."""
    if type(a).__module__.startswith("torch"):
        import torch

        return a.detach().to(torch.float64).cpu().numpy()
    return be.to_host(a).astype(np.float64)


def _nan_report(got: np.ndarray) -> str:
    bad = np.argwhere(np.isnan(got))
    first = ", ".join(str(tuple(int(v) for v in i)) for i in bad[:5])
    return f"{len(bad)} of {got.size} elements are NaN (unwritten or poisoned), first at {first}"


def _tensor(torch: Any, placed: fuzz.Placed, dtype: str) -> Any:
    """A torch tensor over ``placed``'s memory, through its raw bits (bfloat16 included)."""
    return torch.from_dlpack(placed.bits_view).view(getattr(torch, dtype))


class _Inputs:
    """The problem's inputs placed on a backend, with copies of their buffers' bits so that a
    stray write into an input (or a guard) shows."""

    def __init__(self, prob: fuzz.FuzzProblem, be: Backend, data: dict, names: tuple[str, ...]):
        views = {"x": prob.x_view, "w": prob.w_view, "b": prob.b_view, "gy": prob.gy_view}
        self.be = be
        self.placed = {}
        for name in names:
            a = data[name]
            if name == "x":
                a = a if prob.layout == "NCDHW" else np.moveaxis(a, -4, -1)
            self.placed[name] = fuzz.place(be.xp, a, views[name])
        self.before = {k: be.to_host(v.bits).copy() for k, v in self.placed.items()}

    def arrays(self, prob: fuzz.FuzzProblem, torch: Any = None) -> dict:
        if torch is None:
            return {k: v.array for k, v in self.placed.items()}
        return {k: _tensor(torch, v, prob.dtype) for k, v in self.placed.items()}

    def check_untouched(self) -> None:
        for name, placed in self.placed.items():
            after = self.be.to_host(placed.bits)
            assert after.tobytes() == self.before[name].tobytes(), f"input {name} was written"


def _poisoned_out(prob: fuzz.FuzzProblem, be: Backend) -> fuzz.Placed | None:
    if prob.out_view is None:
        return None
    shape = prob.in_layout(prob.out_shape)
    return fuzz.place(be.xp, np.full(shape, np.nan, fuzz.np_dtype(prob.dtype)), prob.out_view)


def _check_guards(be: Backend, prob: fuzz.FuzzProblem, out: fuzz.Placed) -> None:
    bits = be.to_host(out.bits)
    nan = fuzz.nan_bits(fuzz.np_dtype(prob.dtype))
    outside = np.concatenate([bits[: out.start], bits[out.stop :]])
    assert (outside == nan).all(), "a write landed outside out (in the guard elements)"


def _family(prob: fuzz.FuzzProblem, x: Any) -> str | None:
    """The problem's forced family, if this GPU can run it (tc needs sm_80)."""
    if prob.family is None:
        return None
    from cupyconvt import _gpu

    cc = _gpu.device_info(x.data.device_id).compute_capability
    ok = eligible(prob.params, prob.dtype, prob.family, prob.precision, cc)
    return prob.family if ok else None


def _run_forward(prob: fuzz.FuzzProblem, be: Backend) -> None:
    data = prob.arrays()
    inputs = _Inputs(prob, be, data, ("x", "w", "b") if prob.bias else ("x", "w"))
    p = prob.params
    dt = fuzz.np_dtype(prob.dtype)
    kw = dict(prob.kwargs, precision=prob.precision)
    if prob.api == "torch":
        torch = need("torch", "torch")
        t = inputs.arrays(prob, torch)
        x = t["x"]
        got = cupyconvt.conv_transpose3d(x, t["w"], t.get("b"), **kw)
        assert isinstance(got, torch.Tensor), type(got)
        assert got.dtype == getattr(torch, prob.dtype) and got.device.type == be.torch_device
        assert tuple(got.shape) == p.out_shape, (tuple(got.shape), p.out_shape)
        channels_last = (
            x.dim() == 5
            and not x.is_contiguous()
            and x.is_contiguous(memory_format=torch.channels_last_3d)
        )
        if channels_last:
            assert got.is_contiguous(memory_format=torch.channels_last_3d), "not channels last"
        else:
            assert got.is_contiguous(), "result not contiguous"
        got_ncdhw = _as_float64(be, got)
        out = None
        repeat = None
    else:
        a = inputs.arrays(prob)
        family = _family(prob, a["x"]) if be.name == "gpu" else None

        def call(out_array):
            if family is None:
                return cupyconvt.conv_transpose3d(
                    a["x"], a["w"], a.get("b"), **kw, out=out_array, layout=prob.layout
                )
            from cupyconvt import _gpu

            return _gpu.conv_transpose3d(
                a["x"],
                a["w"],
                a.get("b"),
                p,
                out_array,
                family=family,
                precision=prob.precision,
                layout=prob.layout,
            )

        out = _poisoned_out(prob, be)
        got = call(None if out is None else out.array)
        if out is not None:
            assert got is out.array, "the result is not the out= array"
        assert isinstance(got, type(a["x"])), type(got)
        assert got.dtype == dt, got.dtype
        assert tuple(got.shape) == prob.in_layout(p.out_shape), (got.shape, p.out_shape)
        assert got.flags.c_contiguous, "result not C-contiguous"
        got_host = _as_float64(be, got)
        got_ncdhw = got_host if prob.layout == "NCDHW" else np.moveaxis(got_host, -1, -4)

        def repeat():
            again = _poisoned_out(prob, be)
            res = call(None if again is None else again.array)
            assert be.to_host(res).tobytes() == be.to_host(got).tobytes(), "not bitwise repeatable"

    if p.batched and p.N == 0:
        assert got_ncdhw.size == 0
    assert not np.isnan(got_ncdhw).any(), _nan_report(got_ncdhw)
    inputs.check_untouched()
    if out is not None:
        _check_guards(be, prob, out)
    f64 = {k: None if v is None else v.astype(np.float64) for k, v in data.items()}
    ref = conv_transpose3d_reference(f64["x"], f64["w"], f64["b"], **prob.kwargs)
    err = rel_err(got_ncdhw, ref)
    tol = _tol(prob, be)
    assert err <= tol, f"relative error {err:.3g} > {tol:g}"
    if be.name == "gpu" and repeat is not None:
        repeat()


def _run_backward(prob: fuzz.FuzzProblem, be: Backend) -> None:
    data = prob.arrays()
    inputs = _Inputs(prob, be, data, ("gy", "x", "w"))
    p = prob.params
    dt = fuzz.np_dtype(prob.dtype)
    kw = dict(prob.kwargs, needs=prob.needs, precision=prob.precision)
    torch = need("torch", "torch") if prob.api == "torch" else None
    a = inputs.arrays(prob, torch)

    def call():
        return cupyconvt.conv_transpose3d_backward(a["gy"], a["x"], a["w"], **kw)

    got = call()
    f64 = {k: v.astype(np.float64) for k, v in data.items() if v is not None}
    ref = conv_transpose3d_backward_reference(f64["gy"], f64["x"], f64["w"], **prob.kwargs)
    shapes = (prob.x_shape, prob.w_shape, (p.C_out,))
    tol = _tol(prob, be)
    for need_name, name, g, r, shape in zip(fuzz.NEEDS, GRADIENTS, got, ref, shapes, strict=True):
        if need_name not in prob.needs:
            assert g is None, f"{name} was not asked for"
            continue
        if torch is not None:
            assert isinstance(g, torch.Tensor) and g.dtype == getattr(torch, prob.dtype), name
            assert g.device.type == be.torch_device and g.is_contiguous(), name
        else:
            assert isinstance(g, type(a["x"])) and g.dtype == dt, name
            assert g.flags.c_contiguous, f"{name} not C-contiguous"
        assert tuple(g.shape) == shape, (name, tuple(g.shape), shape)
        host = _as_float64(be, g)
        assert not np.isnan(host).any(), f"{name}: {_nan_report(host)}"
        err = rel_err(host, r)
        assert err <= tol, f"{name}: relative error {err:.3g} > {tol:g}"
    inputs.check_untouched()
    if be.name == "gpu":
        for name, g, h in zip(GRADIENTS, got, call(), strict=True):
            if g is not None:
                same = _as_float64(be, g).tobytes() == _as_float64(be, h).tobytes()
                assert same, f"{name} not bitwise repeatable"


def run_problem(prob: fuzz.FuzzProblem, be: Backend) -> None:
    """Run ``prob`` on ``be`` and check it; any failure names the problem and its repro."""
    try:
        if prob.op == "forward":
            _run_forward(prob, be)
        else:
            _run_backward(prob, be)
    except Exception as e:  # a library error or a failed check: say which problem
        raise AssertionError(f"{type(e).__name__}: {e}\n{prob}") from e


@pytest.mark.gpu
@pytest.mark.parametrize("index", GPU_INDICES, ids=fuzz.test_id)
def test_fuzz_gpu(index):
    run_problem(fuzz.problem(SEED, index), _gpu_backend())


@pytest.mark.parametrize("index", CPU_INDICES, ids=fuzz.test_id)
def test_fuzz_cpu(index, cpu_path):
    prob = fuzz.problem(SEED, index)
    if prob.dtype == "bfloat16":
        need("ml_dtypes", "ml_dtypes")
    run_problem(prob, CPU)


# --- the references ------------------------------------------------------------------------


def _f64(data: dict) -> dict:
    return {k: None if v is None else v.astype(np.float64) for k, v in data.items()}


def _naive_cost(prob: fuzz.FuzzProblem) -> int:
    """Iterations of the naive loops' innermost body."""
    batch = prob.N if prob.N is not None else 1
    return batch * prob.C_in * int(np.prod(prob.size)) * int(np.prod(prob.kernel))


#: The first fuzz problems small enough for the naive loops (and not empty).
SMALL = [q for q in (fuzz.problem(SEED, i) for i in range(400)) if 0 < _naive_cost(q) <= 4000][:60]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_reference_matches_naive_oracle(case, rng):
    x, w, b = case.arrays(rng)
    ref = conv_transpose3d_reference(x, w, b, **case.kwargs)
    assert rel_err(ref, conv_transpose3d_oracle(x, w, b, **case.kwargs)) <= TOL["float64"]
    gy = rng.standard_normal(ref.shape)
    fast = conv_transpose3d_backward_reference(gy, x, w, **case.kwargs)
    slow = backward_oracle(gy, x, w, **case.kwargs)
    for name, f, s in zip(GRADIENTS, fast, slow, strict=True):
        assert f.shape == s.shape and rel_err(f, s) <= TOL["float64"], name


def test_reference_matches_naive_oracle_on_fuzz_problems():
    """Random problems (unbatched, batch 0, crops, depthwise...) through both references."""
    assert len(SMALL) >= 40
    for prob in SMALL:
        d = _f64(prob.arrays())
        fast = conv_transpose3d_reference(d["x"], d["w"], d["b"], **prob.kwargs)
        slow = conv_transpose3d_oracle(d["x"], d["w"], d["b"], **prob.kwargs)
        assert fast.shape == slow.shape == prob.out_shape, prob
        assert rel_err(fast, slow) <= TOL["float64"], prob
        gy = d.get("gy")
        if gy is None:
            gy = np.random.default_rng([prob.seed, prob.index, 2]).normal(0.3, 1, fast.shape)
        fast = conv_transpose3d_backward_reference(gy, d["x"], d["w"], **prob.kwargs)
        slow = backward_oracle(gy, d["x"], d["w"], **prob.kwargs)
        for name, f, s in zip(GRADIENTS, fast, slow, strict=True):
            assert f.shape == s.shape and rel_err(f, s) <= TOL["float64"], f"{name}\n{prob}"


# --- the generator -------------------------------------------------------------------------


def test_generator_is_deterministic():
    """A problem and its data depend on (seed, index) alone: any failure reruns by itself."""
    for i in (0, 1, 17, 999, 123_456):
        a, b = fuzz.problem(SEED, i), fuzz.problem(SEED, i)
        assert a == b and str(a) == str(b)
        da, db = a.arrays(), b.arrays()
        assert da.keys() == db.keys()
        for k in da:
            assert (da[k] is None) == (db[k] is None)
            if da[k] is not None:
                assert da[k].tobytes() == db[k].tobytes() and da[k].dtype == db[k].dtype
                assert da[k].size == 0 or (da[k] != 0).any()
    assert fuzz.problem(SEED, 5) != fuzz.problem(SEED + 1, 5)
    # Order does not matter: problem 7 is the same drawn before or after others.
    late = [fuzz.problem(SEED, i) for i in (3, 9, 7)][-1]
    assert late == fuzz.problem(SEED, 7)


@pytest.mark.parametrize("kind", fuzz.VIEW_KINDS)
def test_place_views(kind):
    """Each view holds the values asked for, and every other element of the buffer is NaN."""
    rng = np.random.default_rng(0)
    for dtype in ("float64", "float16"):
        a = rng.standard_normal((2, 3, 4, 1, 5)).astype(dtype)
        for _ in range(10):
            view = fuzz._draw_view(rng, a.ndim, kind, channel_axis=1, allow_reversed=True)
            placed = fuzz.place(np, a, view)
            assert placed.array.shape == a.shape and placed.array.dtype == a.dtype
            assert np.array_equal(placed.array, a), view
            filler = placed.bits.size - a.size
            assert np.isnan(placed.bits.view(a.dtype)).sum() == filler, view
            if kind == "offset":
                assert placed.array.flags.c_contiguous
                shift = placed.array.ctypes.data - placed.bits.ctypes.data
                assert shift == view.offset * a.itemsize and (shift % 16) != 0


def features(prob: fuzz.FuzzProblem) -> set[str]:
    """What a problem exercises, for the coverage test."""
    p = prob.params
    f = {
        f"op:{prob.op}",
        f"dtype:{prob.dtype}",
        f"api:{prob.api}",
        f"size:{prob.size_class}",
        f"groups:{prob.group_kind}",
        f"padding:{prob.padding_kind}",
    }
    f.add("batch:unbatched" if prob.N is None else f"batch:{min(prob.N, 2)}")
    if prob.dtype == "float32":
        f.add(f"float32:{prob.precision}")
    for name in ("x", "w", "b", "gy"):
        view = getattr(prob, f"{name}_view")
        if view is not None:
            f.add(f"{name}_view:{view.kind}")
            if any(s < 0 for s in view.steps):
                f.add(f"{name}_view:reversed")
    if prob.bias:
        f.add("bias")
    if any(v > 0 for v in prob.output_padding):
        f.add("output_padding")
    if any(v > 1 for v in prob.dilation):
        f.add("dilation")
    if any(
        s > d * (k - 1) + 1 for s, d, k in zip(prob.stride, prob.dilation, prob.kernel, strict=True)
    ):
        f.add("gaps")  # outputs no tap reaches: bias or zero only
    if min(p.out_size) == 1 and prob.padding_kind == "crop":
        f.add("cropped to one voxel")
    if prob.op == "forward":
        f.add(f"layout:{prob.layout}")
        if prob.api == "array":
            if prob.out_view is None:
                f.add("out:None")
            else:
                f.add(f"out:{prob.out_view.kind}")
        f.add(f"family:{prob.family}")
        if prob.family is not None:
            f.add(f"family:{prob.family}:{prob.layout}")
        if prob.family == "tc":
            f.add(f"family:tc:{prob.dtype}:{prob.precision if prob.dtype == 'float32' else ''}")
        if p.C_in_g >= 16 and p.C_out_g >= 16 and eligible(p, prob.dtype, "tc", prob.precision):
            f.add("tc-sized")
        if prob.api == "torch" and prob.x_view.kind == "permuted" and prob.N:
            f.add(
                "torch:channels_last_3d"
                if prob.x_view.perm == (0, 2, 3, 4, 1)
                else "torch:permuted"
            )
    else:
        f.add("needs:" + "+".join(prob.needs))
        f.add("backward:batch:" + ("unbatched" if prob.N is None else str(min(prob.N, 2))))
        f.add(f"backward:dtype:{prob.dtype}")
        f.add(f"backward:api:{prob.api}")
    return f


def expected_features() -> set[str]:
    f = {f"op:{o}" for o in ("forward", "backward")}
    f |= {f"dtype:{d}" for d in fuzz.DTYPES} | {f"backward:dtype:{d}" for d in fuzz.DTYPES}
    f |= {f"layout:{v}" for v in fuzz.LAYOUTS} | {f"float32:{v}" for v in fuzz.PRECISIONS}
    f |= {f"api:{v}" for v in ("array", "torch")} | {"backward:api:torch", "backward:api:array"}
    f |= {f"size:{v}" for v in ("tiny", "small", "medium")}
    f |= {f"groups:{v}" for v in ("dense", "grouped", "depthwise", "depthwise_mult")}
    f |= {f"padding:{v}" for v in ("none", "some", "crop")} | {"cropped to one voxel"}
    f |= {f"batch:{v}" for v in ("unbatched", 0, 1, 2)}
    f |= {f"backward:batch:{v}" for v in ("unbatched", 0, 1, 2)}
    for name in ("x", "w", "gy"):
        f |= {f"{name}_view:{k}" for k in fuzz.VIEW_KINDS} | {f"{name}_view:reversed"}
    f |= {
        "b_view:contiguous",
        "b_view:offset",
        "b_view:strided",
        "bias",
        "output_padding",
        "dilation",
        "gaps",
        "out:None",
        "out:contiguous",
        "out:offset",
        "tc-sized",
        "torch:channels_last_3d",
        "torch:permuted",
        "family:None",
    }
    f |= {f"family:{fam}:{layout}" for fam in FAMILIES for layout in fuzz.LAYOUTS}
    f |= {
        "family:tc:float16:",
        "family:tc:bfloat16:",
        "family:tc:float32:high",
        "family:tc:float32:medium",
    }
    f |= {"needs:" + "+".join(s) for r in range(4) for s in itertools.combinations(fuzz.NEEDS, r)}
    return f


def test_generator_coverage():
    """Over 2000 problems, every dtype, layout, precision, view kind, batch kind, group kind,
    padding kind, needs subset and kernel family (forced, in both layouts) appears, so the fuzzer
    cannot silently lose coverage; and every draw is valid and within the reference's budget."""
    start = time.perf_counter()
    counts: collections.Counter = collections.Counter()
    for i in range(2000):
        prob = fuzz.problem(SEED, i)
        p = prob.params  # validates
        batch = max(p.N if p.batched else 1, 1)
        assert batch * p.C_out * int(np.prod(p.out_size)) <= fuzz.MAX_OUT
        assert p.useful_macs <= fuzz.MAX_MACS
        if prob.family is not None:
            assert eligible(p, prob.dtype, prob.family, prob.precision)
        counts.update(features(prob))
    missing = expected_features() - set(counts)
    assert not missing, f"never generated in 2000 problems: {sorted(missing)}"
    assert time.perf_counter() - start < 30
