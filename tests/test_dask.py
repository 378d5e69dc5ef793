"""cupyconvt.dask: the chunked result equals the unchunked call for every chunking.

Every problem of tests/cases.py runs under several chunkings (one block, blocks of one voxel,
blocks of two with an uneven last one, random uneven blocks, chunked channels) against the
unchunked call and the float64 oracle. The block plans are checked on their own in 1D: the halo
is the footprint of the block and nothing more, and replaying a plan reproduces the unchunked
result. GPU tests (CuPy chunks, bitwise with a pinned kernel family, two GPUs) skip without one.
"""

from __future__ import annotations

import itertools
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from cases import CASES, ERROR_INPUTS, Case, random_cases
from conftest import need
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from oracle import TOL, conv_transpose3d_oracle, rel_err

import cupyconvt

dask = need("dask", "dask")
da = need("dask.array", "dask")
import cupyconvt.dask as cdask  # noqa: E402  (after the dask check, for its message)
from cupyconvt.dask import _axis_plans, _out_boundaries  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

#: The chunked result against the unchunked call (both float64 on the CPU backend): the same
#: terms in the same order, so only BLAS blocking could part them, by an ulp or two.
SAME = 1e-14


def _partition(n: int, rng: np.random.Generator) -> tuple[int, ...]:
    """Random uneven blocks summing to ``n`` (cuts at a random subset of 1..n-1)."""
    cuts = sorted(int(c) for c in rng.choice(np.arange(1, n), rng.integers(0, n), replace=False))
    return tuple(b - a for a, b in itertools.pairwise([0, *cuts, n]))


def _chunks(kind: str, shape: tuple[int, ...], rng: np.random.Generator) -> tuple:
    """Chunks of ``kind`` for an x of ``shape`` (5D or unbatched 4D)."""
    batch, (c, *spatial) = shape[:-4], shape[-4:]
    if kind == "one_block":
        return shape
    if kind == "ones":  # smaller than the halo of every kernel wider than 1
        return (*(1 for _ in batch), c, 1, 1, 1)
    if kind == "twos":  # uneven last block where a size is odd
        return (*(1 for _ in batch), c, 2, 2, 2)
    if kind == "uneven":
        return (*(_partition(n, rng) for n in batch), c, *(_partition(n, rng) for n in spatial))
    if kind == "channels":  # several channel blocks: rechunked to one
        return (*batch, _partition(c, rng), 3, 2, 3)
    raise AssertionError(kind)


CHUNKINGS = ["one_block", "ones", "twos", "uneven", "channels"]


def _check(case: Case, x, w, b, chunks, scheduler="sync"):
    """Compute the chunked result; check chunks 1:1 and equality with the unchunked call."""
    xd = da.from_array(x, chunks=chunks)
    y = cdask.conv_transpose3d(xd, w, b, **case.kwargs)
    ref = cupyconvt.conv_transpose3d(x, w, b, **case.kwargs)
    assert y.shape == ref.shape and y.dtype == ref.dtype
    assert type(y._meta) is np.ndarray
    # One output block per input block, batch blocks unchanged, all output channels in one.
    in_chunks = xd.rechunk({x.ndim - 4: -1}).chunks
    assert y.numblocks == tuple(len(c) for c in in_chunks)
    assert y.chunks[:-4] == in_chunks[:-4] and y.chunks[-4] == (ref.shape[-4],)
    assert y.chunks == cdask.output_chunks(in_chunks, w.shape, **case.kwargs)
    got = y.compute(scheduler=scheduler)
    assert rel_err(got, ref) <= SAME
    return got


@pytest.mark.parametrize("chunking", CHUNKINGS)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_chunked_matches_unchunked_and_oracle(case, chunking, rng):
    x, w, b = case.arrays(rng)
    got = _check(case, x, w, b, _chunks(chunking, case.x_shape, rng))
    assert rel_err(got, conv_transpose3d_oracle(x, w, b, **case.kwargs)) <= TOL["float64"]


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_dtypes(dtype, rng):
    dt = need("ml_dtypes", "ml_dtypes").bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
    case = next(c for c in CASES if c.name == "everything")
    x, w, b = case.arrays(rng, dt)
    xd = da.from_array(x, chunks=_chunks("uneven", x.shape, rng))
    got = cdask.conv_transpose3d(xd, w, b, **case.kwargs).compute(scheduler="threads")
    assert got.dtype == np.dtype(dt)
    assert rel_err(got, conv_transpose3d_oracle(x, w, b, **case.kwargs)) <= TOL[dtype]


def _problems():
    """Random valid problems (every argument drawn per axis, up to 2 channels a group, batches up
    to 3) and a seed for random chunks on every axis."""
    return st.tuples(random_cases(max_size=6, max_n=3, max_channels=2, bias=True),
                     st.integers(0, 2**32 - 1))  # fmt: skip


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problem=_problems())
def test_fuzz_chunked_matches_unchunked(problem):
    case, seed = problem
    rng = np.random.default_rng(seed)
    x, w, b = case.arrays(rng)
    _check(case, x, w, b, _chunks("uneven", case.x_shape, rng))


# -- the block plans, one axis at a time ----------------------------------------------------


def _conv1d(x, w, s, p, dil, op):
    """Naive 1D transposed convolution, the definition (float64)."""
    n_out = (len(x) - 1) * s - 2 * p + dil * (len(w) - 1) + op + 1
    out = np.zeros(n_out)
    for i, k in itertools.product(range(len(x)), range(len(w))):
        o = i * s - p + k * dil
        if 0 <= o < n_out:
            out[o] += x[i] * w[k]
    return out


def _axis_problems(rng, count):
    """Random 1D problems (n, K, s, p, dil, op) with random chunks, valid by PyTorch's rules."""
    done = 0
    while done < count:
        n, k, s, dil = (int(v) for v in rng.integers(1, [12, 6, 5, 4]))
        op = int(rng.integers(0, max(s, dil)))
        full = (n - 1) * s + dil * (k - 1) + op + 1
        p = int(rng.integers(0, (full - 1) // 2 + 1))
        # blocks of one, random blocks, random blocks with empty ones among them
        for chunks in ((1,) * n, _partition(n, rng), (0, *_partition(n, rng)[::-1], 0, 0)):
            x_shape = (1, 1, sum(chunks), 1, 1)
            cp = cupyconvt.ConvParams.from_args(x_shape, (1, 1, k, 1, 1), None, (s, 1, 1),
                                                (p, 0, 0), (op, 0, 0), 1, (dil, 1, 1))  # fmt: skip
            yield chunks, cp
            done += 1


def _axis(cp):
    """(n, K, s, p, dil, output_padding) of a 1D problem (its depth axis)."""
    return (cp.in_size[0], cp.kernel[0], cp.stride[0], cp.padding[0], cp.dilation[0],
            cp.output_padding[0])  # fmt: skip


def test_axis_plans_partition_the_output(rng):
    """Output blocks tile [0, O) in order, 1:1 with the input blocks, non-empty whenever they
    can be (O at least the number of non-empty input blocks), empty for empty input blocks."""
    for chunks, cp in _axis_problems(rng, 600):
        bounds = _out_boundaries(chunks, cp, 0)
        n_out = cp.out_size[0]
        assert len(bounds) == len(chunks) + 1 and bounds[0] == 0 and bounds[-1] == n_out
        sizes = [b - a for a, b in itertools.pairwise(bounds)]
        assert min(sizes) >= 0
        nonempty = sum(c > 0 for c in chunks)
        for c, size in zip(chunks, sizes, strict=True):
            if c == 0:
                assert size == 0, (chunks, sizes)
            elif n_out >= nonempty:
                assert size > 0, (chunks, sizes, cp)


def test_axis_plans_read_exactly_the_footprint(rng):
    """Each block reads the inputs whose footprint [i*s - p, i*s - p + dil*(K-1)] meets it:
    every input that reaches the block, and none whose footprint lies wholly outside it."""
    for chunks, cp in _axis_problems(rng, 600):
        n, k, s, p, dil, _ = _axis(cp)
        starts = np.cumsum((0, *chunks))
        bounds = _out_boundaries(chunks, cp, 0)
        for (o0, o1), plan in zip(itertools.pairwise(bounds), _axis_plans(chunks, cp, 0),
                                  strict=True):  # fmt: skip
            read = [int(starts[blk]) + i for blk, a, b in plan.pieces for i in range(a, b)]
            assert read == sorted(set(read)), "pieces overlap or come out of order"
            for blk, a, b in plan.pieces:
                assert 0 <= a < b <= chunks[blk]
            meets = [i for i in range(n) if i * s - p <= o1 - 1 and i * s - p + dil * (k - 1) >= o0]
            if o1 > o0:
                assert read == meets, (chunks, cp, o0, o1)
            reaches = {i for i in range(n) for t in range(k) if o0 <= i * s - p + t * dil < o1}
            assert reaches <= set(read)


@pytest.mark.parametrize(("multiple", "align"), [(1, 1), (cdask.GPU_W_MULTIPLE, 1),
                                                 (cdask.GPU_W_MULTIPLE, 4), (8, 8)])  # fmt: skip
def test_axis_plans_replayed_in_1d_give_the_unchunked_result(rng, multiple, align):
    """Replay each plan as the tasks do (slab, convolve for the plan's window, fill) in
    1D with the naive definition: the blocks joined equal the unchunked result exactly, also
    with slabs aligned and widened to multiples of voxels (as for CuPy chunks along W)."""
    for chunks, cp in _axis_problems(rng, 600):
        n, k, s, p, dil, op = _axis(cp)
        x = rng.standard_normal(n)
        w = rng.standard_normal(k)
        ref = _conv1d(x, w, s, p, dil, op)
        starts = np.cumsum((0, *chunks))
        blocks = []
        for plan in _axis_plans(chunks, cp, 0, multiple, align):
            block = np.zeros(plan.size)
            if plan.pieces:
                slab = np.concatenate([x[starts[blk] + a : starts[blk] + b]
                                       for blk, a, b in plan.pieces])  # fmt: skip
                # widened wherever the input is long enough, starting aligned (unless widened
                # to the left at the input's end)
                assert len(slab) % multiple == 0 or n < -(-len(slab) // multiple) * multiple
                i_lo = starts[plan.pieces[0][0]] + plan.pieces[0][1]
                assert i_lo % align == 0 or i_lo + len(slab) == n
                full = _conv1d(slab, w, s, 0, dil, 0)  # the uncropped result
                assert 0 <= plan.start and plan.start + plan.length <= len(full)
                res = full[plan.start : plan.start + plan.length]  # what ConvParams.window gives
                assert plan.dst[1] - plan.dst[0] == plan.length
                assert plan.exact == (plan.dst == (0, plan.size))
                block[slice(*plan.dst)] = res
            blocks.append(block)
        np.testing.assert_array_equal(np.concatenate(blocks), ref)


@pytest.mark.parametrize(
    ("w_shape", "kwargs"),
    [
        ((2, 1, 4, 4, 4), dict(stride=2, padding=1, groups=2)),  # trilinear 2x
        ((2, 3, 2, 2, 2), dict(stride=2)),
        ((2, 3, 3, 3, 3), dict(stride=2, padding=1, output_padding=1)),
        ((2, 3, 3, 3, 3), dict(padding=1)),
        ((2, 3, 6, 6, 6), dict(stride=3, padding=(2, 2, 4), dilation=(1, 1, 2))),
    ],
)
def test_usual_layers_map_block_j_to_stride_times_j(w_shape, kwargs):
    """Where the layer scales the volume by the stride (kernel 2s, padding s/2 rounded down),
    output block j is [b_j*s, b_{j+1}*s), the last one ending at the output's end."""
    chunks = ((1, 1), (2,), (4, 4, 3), (5, 6), (8,))
    got = cdask.output_chunks(chunks, w_shape, **kwargs)
    p = cupyconvt.ConvParams.from_args((2, 2, 11, 11, 8), w_shape, None, **kwargs)
    for a in range(3):
        b = np.cumsum((0, *chunks[2 + a]))
        bounds = [*(int(v) * p.stride[a] for v in b[:-1]), p.out_size[a]]
        assert got[2 + a] == tuple(hi - lo for lo, hi in itertools.pairwise(bounds))
        assert abs(p.out_size[a] - b[-1] * p.stride[a]) <= 1
    assert got[:2] == ((1, 1), (p.C_out,))


@pytest.mark.parametrize(
    ("k", "kwargs", "want"),
    [
        (3, {}, (5, 4, 4)),  # output 13: shift -1, the extra voxel a side goes to the end blocks
        (5, {}, (6, 4, 5)),  # output 15: shift -2
        (3, dict(stride=2), (9, 8, 6)),  # output 23: [2*b_j + 1, ...)
        (1, dict(padding=1), (3, 4, 2)),  # output 9: shift 1
    ],
)
def test_output_blocks_are_centred_on_their_input_blocks(k, kwargs, want):
    """Block j starts at b_j*s - shift, shift = floor((2p - dil*(K-1) + s - 1) / 2)."""
    got = cdask.output_chunks(((1,), (1,), (4, 4, 3), (11,), (11,)), (1, 1, k, 1, 1), **kwargs)
    assert got[2] == want


def test_shorter_output_than_blocks_gives_empty_blocks(rng):
    """Padding that crops the output below the number of blocks: some output blocks are empty
    (which dask allows), and the result is still exact."""
    case = Case("crop", 1, 2, 2, (7, 2, 2), (3, 1, 1), dict(padding=(3, 0, 0)), bias=True)
    x, w, b = case.arrays(rng)
    got = _check(case, x, w, b, (1, 2, 1, 2, 2))
    assert got.shape[2] == 3
    y = cdask.conv_transpose3d(da.from_array(x, chunks=(1, 2, 1, 2, 2)), w, b, padding=(3, 0, 0))
    assert 0 in y.chunks[2] and len(y.chunks[2]) == 7


def test_empty_batch():
    x = da.zeros((0, 2, 5, 4, 3), chunks=(1, 2, 2, 2, 2))
    y = cdask.conv_transpose3d(x, np.ones((2, 3, 3, 3, 3)), stride=2)
    assert y.compute().shape == (0, 3, 11, 9, 7) == y.shape


def test_threaded_scheduler_and_culling(rng):
    """The default (threaded) scheduler, and a slice of the result computes only what it needs."""
    case = next(c for c in CASES if c.name == "everything")
    x, w, b = case.arrays(rng)
    _check(case, x, w, b, _chunks("ones", x.shape, rng), scheduler="threads")
    y = cdask.conv_transpose3d(da.from_array(x, chunks=1), w, b, **case.kwargs)
    ref = cupyconvt.conv_transpose3d(x, w, b, **case.kwargs)
    part = y[:, :, 1:3, -2:, :1]
    (culled,) = dask.optimize(part)
    assert len(culled.__dask_graph__()) < len(y.__dask_graph__()) / 2
    assert rel_err(part.compute(), ref[:, :, 1:3, -2:, :1]) <= SAME


def test_weight_is_stored_once_in_the_graph(rng):
    """w and bias are graph entries of their own, shared by the tasks, not copied into each."""
    x = rng.standard_normal((1, 8, 6, 6, 6))
    w = rng.standard_normal((8, 16, 5, 5, 5))  # 128 KB; 27 copies would be 3.5 MB
    b = rng.standard_normal(16)
    y = cdask.conv_transpose3d(da.from_array(x, chunks=(1, 8, 2, 2, 2)), w, b, padding=2)
    assert y.npartitions == 27
    size = len(pickle.dumps(dict(y.__dask_graph__())))
    assert w.nbytes < size < 2 * w.nbytes
    assert rel_err(y.compute(), cupyconvt.conv_transpose3d(x, w, b, padding=2)) <= SAME


def test_legacy_tuple_graph_gives_the_same_result(rng, monkeypatch):
    """Where dask has no task classes, the graph is written in legacy tuples: same blocks."""
    x = rng.standard_normal((2, 3, 5, 6, 7))
    w = rng.standard_normal((3, 2, 3, 3, 3))
    b = rng.standard_normal(2)
    xd = da.from_array(x, chunks=(1, 3, 2, 4, 3))
    y = cdask.conv_transpose3d(xd, w, b, stride=2, padding=1)
    assert not any(type(v) is tuple for v in dict(y.__dask_graph__()).values())
    monkeypatch.setattr(cdask, "_task_spec", lambda: None)
    legacy = cdask.conv_transpose3d(xd, w, b, stride=2, padding=1)
    assert any(type(v) is tuple for v in dict(legacy.__dask_graph__()).values())
    np.testing.assert_array_equal(legacy.compute(), y.compute())


def test_graph_name_is_deterministic(rng):
    x = da.from_array(rng.standard_normal((1, 2, 4, 4, 4)), chunks=2)
    w = rng.standard_normal((2, 2, 3, 3, 3))
    y1, y2 = (cdask.conv_transpose3d(x, w, stride=2) for _ in range(2))
    assert y1.name == y2.name
    assert cdask.conv_transpose3d(x, w * 2, stride=2).name != y1.name
    assert cdask.conv_transpose3d(x, w, stride=1).name != y1.name


def test_zarr_round_trip(tmp_path, rng):
    """Zarr in, chunked conv, Zarr out: what comes back equals the unchunked call."""
    zarr = need("zarr", "dask")
    x = rng.standard_normal((2, 9, 10, 11)).astype(np.float32)  # unbatched (C, D, H, W)
    w = rng.standard_normal((2, 1, 4, 4, 4)).astype(np.float32)
    b = rng.standard_normal(2).astype(np.float32)
    src, dst = str(tmp_path / "in.zarr"), str(tmp_path / "out.zarr")
    da.to_zarr(da.from_array(x, chunks=(2, 4, 5, 4)), src)
    xd = da.from_zarr(src)
    assert xd.chunks == ((2,), (4, 4, 1), (5, 5), (4, 4, 3))
    y = cdask.conv_transpose3d(xd, w, b, stride=2, padding=1, groups=2)
    assert y.chunks == ((2,), (8, 8, 2), (10, 10), (8, 8, 6))
    da.to_zarr(y, dst)
    got = np.asarray(zarr.open(dst, mode="r")[...])
    ref = cupyconvt.conv_transpose3d(x, w, b, stride=2, padding=1, groups=2)
    assert got.dtype == np.float32
    assert rel_err(got, ref) <= 1e-6


# -- errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("x_shape", "w_shape", "b_shape", "kwargs", "exc", "match"), ERROR_INPUTS)
def test_shared_rules_raise_as_the_core_does(x_shape, w_shape, b_shape, kwargs, exc, match):
    """Every argument rule of conv_transpose3d, with the same exception and message."""
    x = da.zeros(x_shape, chunks=2)
    w = np.zeros(w_shape)
    b = None if b_shape is None else np.zeros(b_shape)
    if exc is None:
        cdask.conv_transpose3d(x, w, b, **kwargs)
        return
    with pytest.raises(exc, match=match):
        cdask.conv_transpose3d(x, w, b, **kwargs)


def _unknown_chunks():
    x = da.ones((1, 2, 4, 4, 4), chunks=2)
    return x[x[:, :1, :1, :1, :1].ravel() > 0]  # boolean indexing: NaN chunk sizes


W = np.zeros((2, 3, 3, 3, 3))

ERRORS = [
    (lambda: (np.zeros((1, 2, 4, 4, 4)), W), {}, TypeError,
     r"x must be a dask.array.Array, got ndarray \(for NumPy or CuPy arrays call cupyconvt"),
    (lambda: (da.zeros((1, 2, 4, 4, 4)), da.zeros(W.shape)), {}, TypeError,
     r"w must be a NumPy or CuPy array, got a dask array \(compute it first\)"),
    (lambda: (da.zeros((1, 2, 4, 4, 4)), W.tolist()), {}, TypeError,
     r"w must be a NumPy or CuPy array, got list"),
    (lambda: (da.zeros((1, 2, 4, 4, 4)), W), {"bias": [0.0, 0.0, 0.0]}, TypeError,
     r"bias must be a NumPy or CuPy array, got list"),
    (lambda: (da.zeros((1, 2, 4, 4, 4), dtype=np.float32), W), {}, TypeError,
     r"w has dtype float64 but x has dtype float32: x, w and bias must share one dtype"),
    (lambda: (da.zeros((1, 2, 4, 4, 4)), W), {"bias": np.zeros(3, np.float32)}, TypeError,
     r"bias has dtype float32 but x has dtype float64"),
    (lambda: (da.zeros((1, 2, 4, 4, 4), dtype=np.int64), W.astype(np.int64)), {}, TypeError,
     r"x has unsupported dtype int64; supported: float16, bfloat16, float32, float64"),
    (lambda: (_unknown_chunks(), W), {}, ValueError,
     r"x has unknown chunk sizes: call x.compute_chunk_sizes\(\) first"),
    (lambda: (da.zeros((1, 2, 4, 4, 4)), W), {"family": "fast"}, ValueError,
     r"family='fast' is not one of 'tc', 'igemm', 'depthwise', 'grouped', 'direct'"),
    (lambda: (da.zeros((1, 2, 4, 4, 4)), W), {"family": "direct"}, ValueError,
     r"family='direct' pins a GPU kernel family, but x's chunks are NumPy arrays"),
    (lambda: (da.zeros((1, 2, 4, 4, 4)), W), {"precision": "low"}, ValueError,
     r"precision='low' is not one of 'highest', 'high', 'medium'"),
]  # fmt: skip


@pytest.mark.parametrize(("make", "kwargs", "exc", "match"), ERRORS)
def test_errors(make, kwargs, exc, match):
    x, w = make()
    with pytest.raises(exc, match=match):
        cdask.conv_transpose3d(x, w, **kwargs)


def test_chunks_of_another_array_type_are_refused():
    torch = need("torch", "torch")
    x = da.zeros((1, 2, 4, 4, 4), chunks=2).map_blocks(
        torch.from_numpy, meta=torch.empty((0,) * 5, dtype=torch.float64)
    )
    with pytest.raises(TypeError, match=r"x's chunks must be NumPy or CuPy arrays, got Tensor"):
        cdask.conv_transpose3d(x, W)


# -- imports and dask's expression backend --------------------------------------------------


def _python(code: str, **env: str) -> str:
    """Run ``code`` in a fresh interpreter that finds this checkout (and whatever PYTHONPATH
    already held, such as a --target directory of wheels)."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": path, **env})  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout


def test_import_cupyconvt_does_not_import_dask():
    out = _python(
        "import sys, cupyconvt, cupyconvt.dask\n"
        "print('dask' in sys.modules)\n"
        "sys.modules['dask'] = sys.modules['dask.array'] = None  # as if not installed\n"
        "try:\n"
        "    cupyconvt.dask.conv_transpose3d(None, None)\n"
        "except ImportError as e:\n"
        "    print(e)\n"
    )
    assert out.splitlines() == [
        "False",
        "cupyconvt.dask needs dask: pip install 'cupyconvt[dask]' (or 'dask[array]')",
    ]


def test_dask_array_expression_backend(rng):
    """With dask's opt-in query planning ("array.query-planning") the result is the same."""
    out = _python(
        "import numpy as np, dask.array as da, cupyconvt, cupyconvt.dask as cd\n"
        "assert da.array_expr_enabled()\n"
        "rng = np.random.default_rng(0)\n"
        "x, w = rng.standard_normal((2, 3, 5, 4, 6)), rng.standard_normal((3, 2, 3, 2, 3))\n"
        "kw = dict(stride=(2, 1, 3), padding=(1, 0, 2), output_padding=(1, 0, 0))\n"
        "y = cd.conv_transpose3d(da.from_array(x, chunks=(1, 2, 1, 3, 2)), w, **kw)\n"
        "assert y.numblocks == (2, 1, 5, 2, 3), y.numblocks\n"
        "ref = cupyconvt.conv_transpose3d(x, w, **kw)\n"
        "print(np.abs(y.compute() - ref).max() <= 1e-14 * np.abs(ref).max())\n",
        DASK_ARRAY__QUERY_PLANNING="True",
    )
    assert out.strip() == "True"


# -- GPU ------------------------------------------------------------------------------------

GPU_NAMES = ("everything", "depthwise", "groups2", "unbatched", "output_padding_gt_padding",
             "big_padding_crop")  # fmt: skip
GPU_CASES = [c for c in CASES if c.name in GPU_NAMES]


def _to_gpu(x, chunks):
    import cupy

    xd = da.from_array(x, chunks=chunks).map_blocks(cupy.asarray)
    assert type(xd._meta) is cupy.ndarray
    return xd


@pytest.mark.gpu
@pytest.mark.parametrize("w_on", ["gpu", "host"])
@pytest.mark.parametrize("chunking", ["ones", "uneven", "channels"])
@pytest.mark.parametrize("case", GPU_CASES, ids=str)
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_gpu_chunked_matches_unchunked(case, chunking, dtype, w_on, rng):
    """CuPy chunks give CuPy blocks equal to the unchunked GPU call (to rounding) and to the
    oracle. w and bias may come as NumPy arrays: each task copies them to its GPU."""
    import cupy

    x, w, b = case.arrays(rng, np.dtype(dtype))
    wg, bg = cupy.asarray(w), None if b is None else cupy.asarray(b)
    y = cdask.conv_transpose3d(_to_gpu(x, _chunks(chunking, x.shape, rng)),
                               wg if w_on == "gpu" else w, bg if w_on == "gpu" else b,
                               **case.kwargs)  # fmt: skip
    assert type(y._meta) is cupy.ndarray
    got = y.compute(scheduler="threads")
    assert type(got) is cupy.ndarray
    ref = cupyconvt.conv_transpose3d(cupy.asarray(x), wg, bg, **case.kwargs)
    assert rel_err(got.get(), ref.get()) <= TOL[dtype]
    assert rel_err(got.get(), conv_transpose3d_oracle(x, w, b, **case.kwargs)) <= TOL[dtype]


#: (family, dtype, precision) that can run BITWISE_CASE (checked by _select.eligible).
PINNED = [("direct", "float64", "highest"), ("direct", "float32", "highest"),
          ("grouped", "float32", "highest"), ("grouped", "float64", "highest"),
          ("igemm", "float32", "highest"), ("igemm", "float64", "highest"),
          ("tc", "float32", "high"), ("tc", "float16", "highest"),
          ("tc", "bfloat16", "highest")]  # fmt: skip
BITWISE_CASES = [
    Case("wide", 2, 16, 16, (6, 7, 5), (3, 3, 3), dict(stride=2, padding=1, output_padding=1),
         bias=True),
    Case("wide_asym", 1, 16, 32, (5, 6, 7), (2, 3, 4),
         dict(stride=(1, 2, 3), padding=(0, 1, 2), dilation=(2, 1, 1), output_padding=(1, 0, 2))),
]  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("chunking", ["ones", "twos", "uneven"])
@pytest.mark.parametrize("case", BITWISE_CASES, ids=str)
@pytest.mark.parametrize(("family", "dtype", "precision"), PINNED)
def test_gpu_pinned_family_is_bitwise(case, family, dtype, precision, chunking, rng):
    """With the kernel family pinned on both sides, each output sums the same terms in the same
    order, in the chunked and the unchunked call: the results are bitwise equal."""
    import cupy

    from cupyconvt import _gpu
    from cupyconvt._params import ConvParams
    from cupyconvt._select import eligible

    dt = need("ml_dtypes", "ml_dtypes").bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
    x, w, b = case.arrays(rng, dt)
    p = ConvParams.from_args(x.shape, w.shape, None if b is None else b.shape, **case.kwargs)
    assert eligible(p, dtype, family, precision), "the table above must list runnable kernels"
    wg, bg = cupy.asarray(w), None if b is None else cupy.asarray(b)
    ref = _gpu.conv_transpose3d(cupy.asarray(x), wg, bg, p, None, family=family,
                                precision=precision)  # fmt: skip
    y = cdask.conv_transpose3d(_to_gpu(x, _chunks(chunking, x.shape, rng)), wg, bg,
                               **case.kwargs, family=family, precision=precision)  # fmt: skip
    got = y.compute(scheduler="threads")
    assert got.get().tobytes() == ref.get().tobytes()


@pytest.mark.gpu
def test_two_gpus(rng):
    """Blocks spread over two GPUs in one process: each task runs on the GPU of its first
    input block, moving neighbours' halo pieces to it; every block matches the unchunked call."""
    import cupy

    if cupy.cuda.runtime.getDeviceCount() < 2:
        pytest.skip("needs two GPUs")
    case = next(c for c in CASES if c.name == "everything")
    x, w, b = case.arrays(rng, np.float32)

    def to_device(block, block_info=None):
        with cupy.cuda.Device(sum(block_info[0]["chunk-location"]) % 2):
            return cupy.asarray(block)

    chunks = (1, 6, 1, 2, 1)
    xd = da.from_array(x, chunks=chunks).map_blocks(to_device, meta=cupy.empty((0,) * 5, x.dtype))
    y = cdask.conv_transpose3d(xd, cupy.asarray(w), cupy.asarray(b), **case.kwargs)
    ref = cupyconvt.conv_transpose3d(x, w, b, **case.kwargs)
    blocks = da.compute(*y.to_delayed().ravel(), scheduler="threads")
    assert {blk.data.device_id for blk in blocks} == {0, 1}
    starts = [np.cumsum((0, *c)) for c in y.chunks]
    for idx, blk in zip(itertools.product(*(range(n) for n in y.numblocks)), blocks, strict=True):
        region = tuple(slice(s[i], s[i + 1]) for s, i in zip(starts, idx, strict=True))
        assert rel_err(blk.get(), ref[region]) <= TOL["float32"]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
@pytest.mark.parametrize("views", [False, True], ids=["blocks", "views"])
@pytest.mark.parametrize(
    ("x_shape", "chunks", "kernel", "dilation"),
    [
        ((2, 3, 9, 7, 13), (1, 3, 4, 3, 5), (4, 3, 4), 1),  # a few pieces an axis
        ((1, 2, 3, 2, 40), (1, 2, 2, 1, 1), (2, 2, 5), (1, 1, 20)),  # up to 40 pieces along W
        ((1, 2, 5, 4, 48), (1, 2, 3, 2, 16), (3, 3, 4), 1),  # 16-byte pieces (16-wide blocks)
    ],
    ids=["few", "wide", "aligned"],
)
def test_gpu_slab_gather_is_the_pieces(x_shape, chunks, kernel, dilation, views, dtype, rng):
    """kernels/slab.cu gathers every task's slab bitwise equal to CuPy's own copies of its
    pieces: from separate blocks and from views into one array (strided rows), for 2-, 4- and
    8-byte dtypes; with pieces of odd widths (column by column), with more than 32 along W (the
    kernel's piece-by-piece path), and with 16-byte aligned pieces (16 bytes at a time)."""
    import cupy

    from cupyconvt import _slab

    x = rng.standard_normal(x_shape).astype(dtype)
    if views:
        xd = da.from_array(cupy.asarray(x), chunks=chunks, asarray=False)
    else:
        xd = _to_gpu(x, chunks)
    w_shape = (x_shape[1], 2, *kernel)
    p = cupyconvt.ConvParams.from_args(x_shape, w_shape, None, 2, 1, 0, 1, dilation)
    blocks = np.empty(xd.numblocks, dtype=object)
    for idx, value in zip(itertools.product(*(range(n) for n in xd.numblocks)),
                          dask.compute(*xd.to_delayed().ravel(), scheduler="sync"),
                          strict=True):  # fmt: skip
        blocks[idx] = value
    align = 16 // np.dtype(dtype).itemsize
    plans = [_axis_plans(xd.chunks[2 + a], p, a, *((cdask.GPU_W_MULTIPLE, align) if a == 2
                                                  else (1, 1)))
             for a in range(3)]  # fmt: skip
    widest = max(len(ax.pieces) for ax in plans[2])
    assert (widest > 32) == (x_shape[-1] == 40)
    for n in range(xd.numblocks[0]):
        for axes in itertools.product(*plans):
            if not all(ax.pieces for ax in axes):
                continue
            boxes = [blocks[n, 0, i, j, k]
                     for i, j, k in itertools.product(*([b for b, _, _ in ax.pieces]
                                                         for ax in axes))]  # fmt: skip
            got = cdask._slab(boxes, axes, cupy)
            gatherable = _slab.gatherable
            try:
                _slab.gatherable = lambda *args: False  # CuPy's slice assignments instead
                want = cdask._slab(boxes, axes, cupy)
            finally:
                _slab.gatherable = gatherable
            assert got.flags.c_contiguous and got.shape == want.shape
            assert got.get().tobytes() == want.get().tobytes()
