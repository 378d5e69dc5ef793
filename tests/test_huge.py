"""Huge tensors: more than 2^31 (and 2^32) elements, and running out of memory (issue 7, item 3).

GPU part (marker ``gpu``; a test also skips when the GPU has too little free memory for it):

- Every forward kernel family (forced), both NDHWC paths (the tensor-core kernel's own, and the
  transposes around a CUDA-core family) and the gradients (grad_input on both of its paths,
  grad_weight and grad_bias), each on a problem whose input and/or output has more than 2^31
  elements, in float16/bfloat16 (one float32). Inputs are random (never zero), drawn on the GPU;
  results are poisoned with NaN first. Every element of a result is checked to be finite, and a
  sample of them (2,000 at random, the first, the last, and those at and around flat offsets 2^31
  and 2^32) against a float64 reference computed from the definition for those elements alone,
  from the input elements gathered for them. grad_weight and grad_bias are whole reductions: all
  of their elements are checked against a float64 reference summed on the GPU by CuPy.
- Out of memory: a result or a workspace that cannot be allocated raises the array library's own
  out-of-memory error (CuPy: ``cupy.cuda.memory.OutOfMemoryError``, a ``MemoryError``, with a
  note naming the buffer; torch tensors: ``torch.OutOfMemoryError``, a ``RuntimeError``, as
  torch's own operators raise), quickly, and the GPU stays usable: no sticky error, and a small
  problem afterwards matches the naive oracle.

CPU part (runs everywhere): the CPU backend raises ``MemoryError`` at once for a result it cannot
allocate; sizes past 2^31 and 2^63 elements are computed exactly (Python ints, no wrap-around);
the selector never picks a family whose 32-bit coordinates or grid limits a problem exceeds, and
every plan it builds for a huge problem has a launchable grid.
"""

from __future__ import annotations

import gc
import itertools
import math
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import pytest
from conftest import need
from oracle import TOL, conv_transpose3d_oracle

import cupyconvt
from cupyconvt import _backward_gpu as bwd
from cupyconvt import _gpu
from cupyconvt._params import ConvParams
from cupyconvt._select import FAMILIES, DeviceInfo, eligible, select
from cupyconvt._tc import TcPlan

MiB, GiB = 2**20, 2**30
#: Random output elements checked per result (besides the first, the last, and those around
#: flat offsets 2^31 and 2^32).
SAMPLES = 2000
#: Elements per chunk where a whole huge array is generated or scanned.
CHUNK = 2**28
#: Free memory a GPU test leaves beyond its arrays (references, temporaries, kernel modules).
MARGIN = 2 * GiB
#: An H100 as the selector sees it (the CPU tests build plans for it).
H100 = DeviceInfo(0, "test", 90, 132, 227 * 1024)
#: CUDA's grid limits.
MAX_GRID = (2**31 - 1, 65535, 65535)
#: Per storage dtype: unsigned type of the same width, a quiet NaN's bits, and the smallest
#: non-finite magnitude (sign bit cleared: at or above it, the value is Inf or NaN).
BITS = {
    "float16": (np.uint16, 0x7E00, 0x7C00),
    "bfloat16": (np.uint16, 0x7FC0, 0x7F80),
    "float32": (np.uint32, 0x7FC00000, 0x7F800000),
}


# --------------------------------------------------------------------------------------------
# The problems of the GPU tests (also checked on the CPU: eligible, and as huge as they claim).


@dataclass(frozen=True)
class Huge:
    """A forward problem, in NCDHW terms; ``layout`` is how x and the result lie in memory."""

    name: str
    family: str
    dtype: str
    x_shape: tuple[int, ...]
    w_shape: tuple[int, ...]
    kwargs: dict = field(default_factory=dict)
    layout: str = "NCDHW"
    bias: bool = False

    def params(self) -> ConvParams:
        c_out = self.w_shape[1] * self.kwargs.get("groups", 1)
        return ConvParams.from_args(self.x_shape, self.w_shape, (c_out,) if self.bias else None,
                                    **self.kwargs)  # fmt: skip

    def __str__(self) -> str:
        return self.name


FORWARD = [
    # x 2^31 + 2^21 elements, the result 2^32 + 2^22: one thread an output element.
    Huge("direct", "direct", "float16", (2, 1, 1024, 1024, 1025), (1, 2, 1, 1, 2), bias=True),
    Huge("grouped_depthwise", "grouped", "float16", (1, 16, 512, 512, 520), (16, 1, 3, 3, 3),
         dict(padding=1, groups=16)),
    # float32: the kernel stages x by cp.async (the 16-bit types convert through registers).
    Huge("grouped_float32_upsample", "grouped", "float32", (1, 8, 256, 256, 520),
         (8, 1, 4, 4, 4), dict(stride=2, padding=1, groups=8), bias=True),
    # The streaming 2x upsampler: float32 (paired float2 stores), float16 with a multiplier.
    Huge("depthwise_upsample", "depthwise", "float32", (1, 8, 256, 256, 520), (8, 1, 4, 4, 4),
         dict(stride=2, padding=1, groups=8), bias=True),
    Huge("depthwise_k3_mult2", "depthwise", "float16", (1, 8, 256, 256, 520), (8, 2, 3, 3, 3),
         dict(stride=2, padding=1, output_padding=1, groups=8)),
    Huge("igemm_k3", "igemm", "float16", (1, 16, 512, 512, 520), (16, 16, 3, 3, 3),
         dict(padding=1), bias=True),
    Huge("igemm_k2s2", "igemm", "float16", (1, 8, 256, 256, 520), (8, 16, 2, 2, 2),
         dict(stride=2)),
    # NCDHW: x goes through a channels-last workspace of its own size.
    Huge("tc_k3", "tc", "float16", (1, 32, 256, 512, 520), (32, 32, 3, 3, 3), dict(padding=1),
         bias=True),
    Huge("tc_bf16_k2s2", "tc", "bfloat16", (1, 16, 256, 256, 520), (16, 16, 2, 2, 2),
         dict(stride=2)),
    Huge("tc_ndhwc", "tc", "float16", (1, 32, 256, 512, 520), (32, 32, 3, 3, 3), dict(padding=1),
         layout="NDHWC"),
    # The CUDA-core families run NDHWC through NCDHW copies of x and of the result.
    Huge("grouped_ndhwc", "grouped", "float16", (1, 16, 512, 512, 520), (16, 1, 3, 3, 3),
         dict(padding=1, groups=16), layout="NDHWC", bias=True),
]  # fmt: skip

#: grad_input problems: (name, forward problem, the path grad_input takes).
GRAD_INPUT = [
    ("igemm_k3", Huge("gi_igemm_k3", "", "float16", (1, 16, 512, 512, 520), (16, 16, 3, 3, 3),
                      dict(padding=1)), "igemm"),
    ("igemm_k2s2", Huge("gi_igemm_k2s2", "", "float16", (1, 16, 256, 256, 520),
                        (16, 16, 2, 2, 2), dict(stride=2)), "igemm"),
    ("staged_depthwise", Huge("gi_staged", "", "float16", (1, 8, 512, 512, 1040), (8, 1, 3, 3, 3),
                              dict(padding=1, groups=8)), "staged"),
]  # fmt: skip

#: grad_weight and grad_bias: stride == kernel (each output voxel has one tap of one input voxel,
#: which the GPU reference relies on); x and grad_out both past 2^31 elements.
GRAD_WEIGHT = Huge("gw_k2s2", "", "float16", (1, 16, 512, 512, 520), (16, 2, 2, 2, 2),
                   dict(stride=2))  # fmt: skip


def _nbytes(dtype: str, *shapes) -> int:
    return sum(math.prod(s) for s in shapes) * np.dtype(BITS[dtype][0]).itemsize


def _forward_bytes(case: Huge, p: ConvParams) -> int:
    """x, the result and the workspaces the path allocates (each of x's or the result's size)."""
    xs, os_ = p.x_shape5, p.out_shape5
    extra = []
    if case.family == "tc" and case.layout == "NCDHW":
        extra = [xs] + ([] if TcPlan.build(p, case.dtype, "highest", 132).ncdhw_in_place else [os_])
    elif case.layout == "NDHWC" and case.family != "tc":
        extra = [xs, os_]
    return _nbytes(case.dtype, xs, os_, *extra)


# --------------------------------------------------------------------------------------------
# GPU helpers: random and poisoned arrays, gathers to the host, the per-element references.


def _np_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        return np.dtype(need("ml_dtypes", "ml_dtypes").bfloat16)
    return np.dtype(name)


@pytest.fixture
def gpu():
    """CuPy, with the memory pool emptied before and after the test (the arrays are huge)."""
    import cupy

    pool = cupy.get_default_memory_pool()
    gc.collect()
    pool.free_all_blocks()
    yield cupy
    gc.collect()
    cupy.cuda.runtime.deviceSynchronize()
    pool.free_all_blocks()


def _require_free(cupy, nbytes: int) -> None:
    free, total = cupy.cuda.runtime.memGetInfo()
    if free < nbytes + MARGIN:
        pytest.skip(f"needs {(nbytes + MARGIN) / GiB:.1f} GiB of free GPU memory, "
                    f"{free / GiB:.1f} of {total / GiB:.1f} GiB are free")  # fmt: skip


def _random(cupy, shape, dtype: str, seed: int, scale: float = 1.0):
    """Standard normal values (times ``scale``) in ``dtype``, drawn on the GPU in chunks."""
    uint = BITS[dtype][0]
    a = cupy.empty(shape, dtype=uint)
    flat = a.reshape(-1)
    rng = cupy.random.default_rng(seed)
    for start in range(0, a.size, CHUNK):
        r = rng.standard_normal(min(CHUNK, a.size - start), dtype=cupy.float32)
        if scale != 1.0:
            r *= np.float32(scale)
        if dtype == "float16":
            bits = r.astype(cupy.float16).view(cupy.uint16)
        elif dtype == "bfloat16":  # the top half of a float32 is a bfloat16
            bits = (r.view(cupy.uint32) >> 16).astype(cupy.uint16)
        else:
            bits = r.view(cupy.uint32)
        flat[start : start + bits.size] = bits
        del r, bits
    return a.view(_np_dtype(dtype))


def _poisoned(cupy, shape, dtype: str):
    uint, nan, _ = BITS[dtype]
    a = cupy.empty(shape, dtype=uint)
    a.fill(nan)
    return a.view(_np_dtype(dtype))


def _poison_pool(cupy, shapes, dtype: str) -> list[int]:
    """Leave NaN-filled blocks of these sizes in CuPy's (emptied) pool, for the results the
    library allocates next; returns their addresses, to check that the results got them."""
    cupy.get_default_memory_pool().free_all_blocks()
    blocks = [_poisoned(cupy, shape, dtype) for shape in shapes]
    cupy.cuda.get_current_stream().synchronize()
    return [b.data.ptr for b in blocks]  # the blocks go back to the pool on return


def _count_nonfinite(cupy, a, dtype: str) -> int:
    """Elements of ``a`` that are NaN or Inf, scanned in chunks (no temporary of a's size)."""
    uint, _, inf = BITS[dtype]
    magnitude = uint(np.iinfo(uint).max >> 1)  # every bit but the sign
    flat = a.view(uint).reshape(-1)
    return sum(
        int(cupy.count_nonzero((flat[s : s + CHUNK] & magnitude) >= uint(inf)))
        for s in range(0, flat.size, CHUNK)
    )


def _take64(cupy, a, dtype: str, flat_idx: np.ndarray) -> np.ndarray:
    """The elements of C-contiguous ``a`` at flat indices, as float64 on the host."""
    bits = cupy.asnumpy(a.view(BITS[dtype][0]).reshape(-1)[cupy.asarray(flat_idx)])
    if dtype == "float16":
        return bits.view(np.float16).astype(np.float64)
    if dtype == "bfloat16":
        return (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return bits.view(np.float32).astype(np.float64)


def _host64(cupy, a, dtype: str) -> np.ndarray:
    return _take64(cupy, a, dtype, np.arange(a.size)).reshape(a.shape)


def _sample(size: int, seed: int) -> np.ndarray:
    """Flat indices: SAMPLES at random, the first and last, and those around 2^31 and 2^32."""
    edges = [0, size - 1] + [b + d for b in (2**31, 2**32) for d in (-1, 0, 1) if b + d < size]
    rand = np.random.default_rng(seed).integers(0, size, SAMPLES, dtype=np.int64)
    return np.unique(np.concatenate([np.array(edges, np.int64), rand]))


def _gather_dot(cupy, src, dtype: str, idx, ok, weight) -> np.ndarray:
    """sum over all but the first axis of src[idx] * weight where ok (idx, ok, weight broadcast
    to one shape): each sampled element's terms, gathered from the GPU for it alone."""
    idx, ok, weight = np.broadcast_arrays(idx, ok, weight)
    vals = np.zeros(idx.shape)
    vals[ok] = _take64(cupy, src, dtype, idx[ok])
    return (vals * weight).sum(axis=tuple(range(1, idx.ndim)))


def _axis_taps_forward(o: np.ndarray, a: int, p: ConvParams):
    """Along axis ``a``, for outputs ``o``: per tap k the input i with i*s - pad + k*dil = o, and
    whether it exists, (len(o), k) each."""
    k = np.arange(p.kernel[a])
    t = o[:, None] + p.padding[a] - k[None, :] * p.dilation[a]
    i = t // p.stride[a]
    ok = (t >= 0) & (t % p.stride[a] == 0) & (i < p.in_size[a])
    return np.where(ok, i, 0), ok


def _axis_taps_backward(i: np.ndarray, a: int, p: ConvParams):
    """Along axis ``a``, for inputs ``i``: per tap k the output o = i*s - pad + k*dil, and whether
    it lies inside the output."""
    k = np.arange(p.kernel[a])
    o = i[:, None] * p.stride[a] - p.padding[a] + k[None, :] * p.dilation[a]
    ok = (o >= 0) & (o < p.out_size[a])
    return np.where(ok, o, 0), ok


def _spread(d, h, w):
    """Per-axis (S, k) arrays to (S, kD, 1, 1, 1), (S, 1, kH, 1, 1) and (S, 1, 1, kW, 1)."""
    return d[:, :, None, None, None], h[:, None, :, None, None], w[:, None, None, :, None]


def _forward_reference(cupy, x, w64, b64, p: ConvParams, dtype: str, layout: str, coords):
    """float64 ``out[n, co, od, oh, ow]`` for each sampled coordinate, from the definition:
    bias[co] + sum over ci of co's group and taps k with o = i*s - pad + k*dil, i inside the
    input, of x[n, ci, i] * w[ci, co mod C_out_g, k]."""
    n, co, od, oh, ow = coords
    cig, cog = p.C_in_g, p.C_out_g
    D, H, W = p.in_size
    taps = [_axis_taps_forward(o, a, p) for a, o in enumerate((od, oh, ow))]
    d, h, w_ = _spread(*(t[0] for t in taps))
    ok_d, ok_h, ok_w = _spread(*(t[1] for t in taps))
    n5 = n[:, None, None, None, None]
    ci5 = ((co // cog)[:, None] * cig + np.arange(cig))[:, None, None, None, :]
    if layout == "NCDHW":
        idx = (((n5 * p.C_in + ci5) * D + d) * H + h) * W + w_
    else:
        idx = (((n5 * D + d) * H + h) * W + w_) * p.C_in + ci5
    kd, kh, kw = (np.arange(k) for k in p.kernel)
    weight = w64[ci5, (co % cog)[:, None, None, None, None], kd[:, None, None, None],
                 kh[:, None, None], kw[:, None]]  # fmt: skip
    ref = _gather_dot(cupy, x, dtype, idx, ok_d & ok_h & ok_w, weight)
    return ref if b64 is None else ref + b64[co]


def _grad_input_reference(cupy, gy, w64, p: ConvParams, dtype: str, coords):
    """float64 ``gx[n, ci, d, h, w]`` for each sampled coordinate: the sum over j < C_out_g and
    taps k with o = i*s - pad + k*dil inside the output of gy[n, g*C_out_g + j, o] * w[ci, j, k]."""
    n, ci, d, h, w_ = coords
    cog = p.C_out_g
    oD, oH, oW = p.out_size
    taps = [_axis_taps_backward(i, a, p) for a, i in enumerate((d, h, w_))]
    od, oh, ow = _spread(*(t[0] for t in taps))
    ok_d, ok_h, ok_w = _spread(*(t[1] for t in taps))
    n5 = n[:, None, None, None, None]
    j5 = np.arange(cog)[None, None, None, None, :]
    co5 = (ci // p.C_in_g)[:, None, None, None, None] * cog + j5
    idx = (((n5 * p.C_out + co5) * oD + od) * oH + oh) * oW + ow
    kd, kh, kw = (np.arange(k) for k in p.kernel)
    weight = w64[ci[:, None, None, None, None], j5, kd[:, None, None, None], kh[:, None, None],
                 kw[:, None]]  # fmt: skip
    return _gather_dot(cupy, gy, dtype, idx, ok_d & ok_h & ok_w, weight)


def _check_sample(got, ref, dtype: str, what: str) -> None:
    assert np.isfinite(got).all(), f"{what}: non-finite sampled elements"
    err = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
    assert err <= TOL[dtype], f"{what}: relative error {err:.2e} of the sample > {TOL[dtype]:.0e}"


# --------------------------------------------------------------------------------------------
# GPU: the forward families and layouts past 2^31 elements.


@pytest.mark.gpu
@pytest.mark.parametrize("case", FORWARD, ids=str)
def test_gpu_forward_huge(case: Huge, gpu):
    cupy = gpu
    p = case.params()
    _require_free(cupy, _forward_bytes(case, p))
    seed = sum(map(ord, case.name))
    last = case.layout == "NDHWC"
    perm = (lambda s: (s[0], *s[2:], s[1])) if last else (lambda s: tuple(s))
    x = _random(cupy, perm(p.x_shape5), case.dtype, seed)
    w = _random(cupy, case.w_shape, case.dtype, seed + 1)
    b = _random(cupy, (p.C_out,), case.dtype, seed + 2) if case.bias else None
    out = _poisoned(cupy, perm(p.out_shape5), case.dtype)
    start = time.perf_counter()
    res = _gpu.conv_transpose3d(x, w, b, p, out, family=case.family, layout=case.layout)
    cupy.cuda.runtime.deviceSynchronize()
    elapsed = time.perf_counter() - start
    assert res is out
    assert _count_nonfinite(cupy, out, case.dtype) == 0, "unwritten (NaN) or non-finite elements"

    flat = _sample(out.size, seed)
    coords = np.unravel_index(flat, perm(p.out_shape5))
    if last:  # (n, od, oh, ow, co) -> (n, co, od, oh, ow)
        coords = (coords[0], coords[4], *coords[1:4])
    w64 = _host64(cupy, w, case.dtype)
    b64 = None if b is None else _host64(cupy, b, case.dtype)
    ref = _forward_reference(cupy, x, w64, b64, p, case.dtype, case.layout, coords)
    got = _take64(cupy, out, case.dtype, flat)
    _check_sample(got, ref, case.dtype, f"{case} ({elapsed:.2f} s)")


# --------------------------------------------------------------------------------------------
# GPU: the gradients past 2^31 elements.


@pytest.mark.gpu
@pytest.mark.parametrize("name, case, path", GRAD_INPUT, ids=[g[0] for g in GRAD_INPUT])
def test_gpu_grad_input_huge(name, case: Huge, path, gpu):
    cupy = gpu
    p = case.params()
    _require_free(cupy, _nbytes(case.dtype, p.x_shape5, p.out_shape5))
    assert bwd.GradInputPlan.build(p, case.dtype).path == path
    seed = sum(map(ord, case.name))
    gy = _random(cupy, p.out_shape5, case.dtype, seed)
    w = _random(cupy, case.w_shape, case.dtype, seed + 1)
    # grad_input reads only x's shape: a view of one element stands for it.
    x = cupy.broadcast_to(cupy.ones((), dtype=gy.dtype), p.x_shape5)
    (ptr,) = _poison_pool(cupy, [p.x_shape5], case.dtype)
    gx = cupyconvt.conv_transpose3d_backward(gy, x, w, **case.kwargs, needs="input").grad_input
    assert gx.data.ptr == ptr, "grad_input did not reuse the NaN-poisoned block"
    assert _count_nonfinite(cupy, gx, case.dtype) == 0, "unwritten (NaN) or non-finite elements"

    flat = _sample(gx.size, seed)
    coords = np.unravel_index(flat, p.x_shape5)
    ref = _grad_input_reference(cupy, gy, _host64(cupy, w, case.dtype), p, case.dtype, coords)
    _check_sample(_take64(cupy, gx, case.dtype, flat), ref, case.dtype, f"grad_input {name}")


def _grad_weight_bias_reference(cupy, x, gy, p: ConvParams):
    """float64 grad_weight and grad_bias, summed by CuPy over slabs of input planes. Needs
    stride == kernel, no padding, dilation 1, one group: then gy cut into kernel-sized cells
    holds, in cell i, exactly the taps of input voxel i, and grad_weight is x @ cells^T."""
    assert p.stride == p.kernel and p.padding == (0, 0, 0) and p.dilation == (1, 1, 1)
    cell_grid = tuple(i * k for i, k in zip(p.in_size, p.kernel, strict=True))
    assert p.groups == 1 and p.out_size == cell_grid
    D, H, W = p.in_size
    kD, kH, kW = p.kernel
    gw = cupy.zeros((p.C_in, p.C_out * kD * kH * kW), cupy.float64)
    gb = cupy.zeros(p.C_out, cupy.float64)
    planes = max(1, CHUNK // (p.C_in * H * W))
    for n in range(p.N):
        for d0 in range(0, D, planes):
            d1 = min(D, d0 + planes)
            xs = x[n, :, d0:d1].astype(cupy.float64).reshape(p.C_in, -1)
            cells = gy[n, :, d0 * kD : d1 * kD].astype(cupy.float64)
            gb += cells.sum(axis=(1, 2, 3))
            cells = cells.reshape(p.C_out, d1 - d0, kD, H, kH, W, kW).transpose(0, 2, 4, 6, 1, 3, 5)
            gw += xs @ cells.reshape(p.C_out * kD * kH * kW, -1).T
            del xs, cells
    return cupy.asnumpy(gw).reshape(p.C_in, p.C_out, kD, kH, kW), cupy.asnumpy(gb)


@pytest.mark.gpu
def test_gpu_grad_weight_and_bias_huge(gpu):
    cupy = gpu
    case = GRAD_WEIGHT
    p = case.params()
    # x, gy, and the reference's float64 slabs (x's, and gy's twice: cut and transposed).
    _require_free(cupy, _nbytes(case.dtype, p.x_shape5, p.out_shape5) + 3 * 8 * CHUNK)
    # Sums over 1.4e8 voxels: scaled so that they stay well inside float16's range.
    x = _random(cupy, p.x_shape5, case.dtype, 11)
    gy = _random(cupy, p.out_shape5, case.dtype, 12, scale=1 / 16)
    w = cupy.broadcast_to(cupy.ones((), dtype=x.dtype), case.w_shape)  # only its shape is read
    # NaN blocks of the two results' sizes (each result is checked whole, wherever it lands).
    _poison_pool(cupy, [case.w_shape, (p.C_out,)], case.dtype)
    g = cupyconvt.conv_transpose3d_backward(gy, x, w, **case.kwargs, needs=("weight", "bias"))
    gw_ref, gb_ref = _grad_weight_bias_reference(cupy, x, gy, p)
    _check_sample(_host64(cupy, g.grad_weight, case.dtype).ravel(), gw_ref.ravel(),
                  case.dtype, "grad_weight")  # fmt: skip
    _check_sample(_host64(cupy, g.grad_bias, case.dtype), gb_ref, case.dtype, "grad_bias")


# --------------------------------------------------------------------------------------------
# GPU: out of memory.


def _check_gpu_usable(cupy) -> None:
    """No sticky error, and a small problem afterwards matches the naive oracle."""
    cupy.cuda.runtime.deviceSynchronize()
    rng = np.random.default_rng(7)
    shapes = ((2, 4, 5, 6, 7), (4, 3, 3, 3, 3), (3,))
    x, w, b = (rng.standard_normal(s).astype(np.float16) for s in shapes)
    kw = dict(stride=2, padding=1)
    out = _poisoned(cupy, cupyconvt.output_shape(x.shape, w.shape, **kw), "float16")
    cupyconvt.conv_transpose3d(cupy.asarray(x), cupy.asarray(w), cupy.asarray(b), **kw, out=out)
    ref = conv_transpose3d_oracle(x, w, b, **kw)
    got = cupy.asnumpy(out).astype(np.float64)
    assert np.isfinite(got).all()
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) <= TOL["float16"]
    cupy.cuda.runtime.deviceSynchronize()


def _has_note(err: BaseException, text: str) -> bool:
    """Whether cupyconvt added its note (Python 3.11+; older versions have no notes)."""
    return sys.version_info < (3, 11) or any(text in n for n in getattr(err, "__notes__", ()))


#: A result that no GPU holds: 4096 channels of 1009^3 voxels in float16, 8.4 TB.
TOO_BIG = dict(x=(1, 1, 64, 64, 64), w=(1, 4096, 1, 1, 1), stride=16)


@pytest.mark.gpu
def test_gpu_result_too_big_raises_memory_error(gpu):
    cupy = gpu
    x = _random(cupy, TOO_BIG["x"], "float16", 1)
    w = _random(cupy, TOO_BIG["w"], "float16", 2)
    start = time.perf_counter()
    with pytest.raises(MemoryError) as info:
        cupyconvt.conv_transpose3d(x, w, stride=TOO_BIG["stride"])
    assert time.perf_counter() - start < 30
    assert isinstance(info.value, cupy.cuda.memory.OutOfMemoryError)
    assert _has_note(info.value, "the result")
    _check_gpu_usable(cupy)


def _occupy(cupy, leave: int) -> list:
    """Filler arrays that leave about ``leave`` bytes of the GPU free (CuPy's pool emptied)."""
    cupy.get_default_memory_pool().free_all_blocks()
    filler = []
    for _ in range(16):
        size = cupy.cuda.runtime.memGetInfo()[0] - leave
        while size >= 8 * MiB:
            try:
                filler.append(cupy.empty(size, dtype=cupy.uint8))
                break
            except cupy.cuda.memory.OutOfMemoryError:
                size //= 2
        else:
            break
    return filler


def _oom_problem(kind: str) -> Huge:
    """A problem with a workspace of ``kind``: x and the result of the forward problems are
    2 GiB each in float16, and so is the workspace."""
    if kind == "tc_ncdhw":  # the channels-last copy of x
        return Huge("oom_tc", "tc", "float16", (1, 32, 256, 256, 512), (32, 32, 3, 3, 3),
                    dict(padding=1))  # fmt: skip
    if kind == "grouped_ndhwc":  # the NCDHW copies of x and of the result
        return Huge("oom_grouped", "grouped", "float16", (1, 16, 256, 256, 1024),
                    (16, 1, 3, 3, 3), dict(padding=1, groups=16), layout="NDHWC")  # fmt: skip
    # grad_weight's partial sums over splits of the voxels (float32, about 90 MiB)
    return Huge("oom_grad_weight", "", "float16", (1, 128, 96, 96, 96), (128, 128, 3, 3, 3),
                dict(padding=1))  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["tc_ncdhw", "grouped_ndhwc", "grad_weight"])
def test_gpu_workspace_oom_raises_memory_error(kind, gpu):
    """The result fits, a workspace does not: MemoryError, and the GPU stays usable."""
    cupy = gpu
    case = _oom_problem(kind)
    p = case.params()
    _require_free(cupy, 4 * _nbytes(case.dtype, p.x_shape5))  # x, the result, two workspaces
    last = case.layout == "NDHWC"
    perm = (lambda s: (s[0], *s[2:], s[1])) if last else (lambda s: tuple(s))
    x = _random(cupy, perm(p.x_shape5), case.dtype, 3)
    w = _random(cupy, case.w_shape, case.dtype, 4)
    if kind == "grad_weight":
        gy = _random(cupy, p.out_shape5, case.dtype, 5)
        plan = bwd.weight_plan(p, case.dtype)
        workspace = plan.splits * p.C_in * p.C_out_g * math.prod(p.kernel) * 4
        fits = _nbytes(case.dtype, w.shape) + 2 * MiB  # grad_weight itself, allocated first

        def run():
            return cupyconvt.conv_transpose3d_backward(gy, x, w, **case.kwargs, needs="weight")
    else:
        workspace = _nbytes(case.dtype, p.x_shape5)
        fits = _nbytes(case.dtype, p.out_shape5)  # the result, allocated first

        def run():
            return _gpu.conv_transpose3d(x, w, None, p, None, family=case.family,
                                         layout=case.layout)  # fmt: skip

    run()  # compiles the kernels and uploads the plan's tables, which then need no memory
    cupy.cuda.runtime.deviceSynchronize()
    filler = _occupy(cupy, fits + workspace // 2)
    try:
        free = cupy.cuda.runtime.memGetInfo()[0]
        if not fits <= free < fits + workspace:
            pytest.skip(f"could not leave between {fits} and {fits + workspace} bytes free: {free}")
        start = time.perf_counter()
        with pytest.raises(MemoryError) as info:
            run()
        assert time.perf_counter() - start < 30
        assert isinstance(info.value, cupy.cuda.memory.OutOfMemoryError)
        if kind != "grad_weight":
            assert _has_note(info.value, "a workspace of the")
    finally:
        del filler
        cupy.get_default_memory_pool().free_all_blocks()
    _check_gpu_usable(cupy)


def _torch_cuda():
    torch = need("torch", "torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA device here")
    return torch


@pytest.mark.gpu
def test_torch_result_too_big_raises_torch_oom(gpu):
    """torch tensors: the result comes from torch's allocator, which raises its own error
    (torch.cuda.OutOfMemoryError, alias torch.OutOfMemoryError: a RuntimeError)."""
    cupy = gpu
    torch = _torch_cuda()
    x = torch.randn(TOO_BIG["x"], dtype=torch.float16, device="cuda")
    w = torch.randn(TOO_BIG["w"], dtype=torch.float16, device="cuda")
    start = time.perf_counter()
    with pytest.raises(torch.cuda.OutOfMemoryError):
        cupyconvt.conv_transpose3d(x, w, stride=TOO_BIG["stride"])
    assert time.perf_counter() - start < 30
    torch.cuda.synchronize()
    _check_gpu_usable(cupy)


@pytest.mark.gpu
def test_torch_workspace_oom_raises_torch_oom(gpu):
    """torch tensors: workspaces too come from torch's allocator (_interop.torch_malloc), so a
    workspace that does not fit raises torch.cuda.OutOfMemoryError, through CuPy unchanged."""
    cupy = gpu
    torch = _torch_cuda()
    torch.cuda.empty_cache()
    case = _oom_problem("tc_ncdhw")
    p = case.params()
    _require_free(cupy, 3 * _nbytes(case.dtype, p.x_shape5))
    x = torch.randn(p.x_shape5, dtype=torch.float16, device="cuda")
    w = torch.randn(case.w_shape, dtype=torch.float16, device="cuda")
    cupyconvt.conv_transpose3d(x, w, **case.kwargs)  # compiles, uploads the tables
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    fits = workspace = _nbytes(case.dtype, p.x_shape5)  # the result; x's channels-last copy
    filler = _occupy(cupy, fits + workspace // 2)
    try:
        free = cupy.cuda.runtime.memGetInfo()[0]
        if not fits <= free < fits + workspace:
            pytest.skip(f"could not leave between {fits} and {fits + workspace} bytes free: {free}")
        start = time.perf_counter()
        with pytest.raises(torch.cuda.OutOfMemoryError):
            cupyconvt.conv_transpose3d(x, w, **case.kwargs)
        assert time.perf_counter() - start < 30
    finally:
        del filler
        cupy.get_default_memory_pool().free_all_blocks()
        torch.cuda.empty_cache()
    torch.cuda.synchronize()
    xs, ws = x[:, :, :4, :5, :6].contiguous(), w[:, :, :2, :2, :2].contiguous()
    got = cupyconvt.conv_transpose3d(xs, ws, stride=2).double().cpu().numpy()
    ref = conv_transpose3d_oracle(xs.cpu().numpy(), ws.cpu().numpy(), stride=2)
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) <= TOL["float16"]
    _check_gpu_usable(cupy)


# --------------------------------------------------------------------------------------------
# CPU: allocation failures, exact sizes, and the plans the selector builds for huge problems.


#: A result of (2^20 + 1)^3 ~ 2^60 voxels (4 EiB in float32): no machine allocates it, whatever
#: its overcommit policy (it is past any process's address space).
HUGE_STRIDE = 2**20


@pytest.mark.parametrize("layout", ["NCDHW", "NDHWC"])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_cpu_result_too_big_raises_memory_error(dtype, layout):
    x = np.ones((1, 1, 2, 2, 2), dtype)
    w = np.ones((1, 1, 1, 1, 1), dtype)
    if layout == "NDHWC":
        x = np.ascontiguousarray(np.moveaxis(x, 1, -1))
    start = time.perf_counter()
    with pytest.raises(MemoryError):
        cupyconvt.conv_transpose3d(x, w, stride=HUGE_STRIDE, layout=layout)
    assert time.perf_counter() - start < 10


@pytest.mark.parametrize("needs", ["input", "weight"])
def test_cpu_backward_too_big_raises_memory_error(needs):
    """grad_out faked by a view of one element: the backward's frame cannot be allocated."""
    x = np.ones((1, 1, 2, 2, 2), np.float32)
    w = np.ones((1, 1, 1, 1, 1), np.float32)
    shape = cupyconvt.output_shape(x.shape, w.shape, stride=HUGE_STRIDE)
    gy = np.broadcast_to(np.float32(1), shape)
    start = time.perf_counter()
    with pytest.raises(MemoryError):
        cupyconvt.conv_transpose3d_backward(gy, x, w, stride=HUGE_STRIDE, needs=needs)
    assert time.perf_counter() - start < 10


def test_torch_cpu_result_too_big_raises_torch_error():
    """torch CPU tensors: the result is torch's allocation, and torch raises a RuntimeError."""
    torch = need("torch", "torch")
    x, w = torch.ones((1, 1, 2, 2, 2)), torch.ones((1, 1, 1, 1, 1))
    with pytest.raises(RuntimeError):
        cupyconvt.conv_transpose3d(x, w, stride=HUGE_STRIDE)


def test_sizes_past_int32_and_int64_are_exact():
    """Shapes, MAC and byte counts are Python ints: past 2^31 and 2^63 they stay exact."""
    assert cupyconvt.output_shape((1, 1, 2**31, 1, 1), (1, 3, 2, 1, 1), stride=2) == (
        1, 3, 2**32, 1, 1)  # fmt: skip
    p = ConvParams.from_args((2**21, 8, 2**10, 2**10, 2**10), (8, 8, 1, 1, 1))
    assert p.out_shape == (2**21, 8, 2**10, 2**10, 2**10)
    assert p.min_bytes(2) == 2 * (2 * 2**54 + 64)  # x and the result are 2^54 elements each
    assert p.useful_macs == 2**21 * 8 * 8 * 2**30  # 2^57
    # A result past 2^63 elements is refused by the argument check, naming the count, before
    # any backend could wrap it around.
    s = 2**22
    with pytest.raises(ValueError, match=r"more than 2\*\*63 - 1: no array can hold it"):
        cupyconvt.output_shape((1, 1, 2, 2, 2), (1, 1, 1, 1, 1), stride=s)
    with pytest.raises(ValueError, match="elements"):
        cupyconvt.conv_transpose3d(np.ones((1, 1, 2, 2, 2), np.float32),
                                   np.ones((1, 1, 1, 1, 1), np.float32), stride=s)  # fmt: skip
    just_fits = cupyconvt.output_shape((1, 1, 2, 2, 2), (1, 1, 1, 1, 1), stride=2**20)
    assert math.prod(just_fits) == (2**20 + 1) ** 3 < 2**63


def _check_grid(plan) -> None:
    for g, limit in zip(plan.grid, MAX_GRID, strict=True):
        assert 1 <= g <= limit, f"{plan.family} grid {plan.grid} exceeds CUDA's limits"


@pytest.mark.parametrize("case", FORWARD, ids=str)
def test_gpu_cases_are_huge_and_eligible(case: Huge):
    """The GPU tests' problems: past 2^31 elements as claimed, and their family is eligible."""
    p = case.params()
    assert max(math.prod(p.x_shape5), math.prod(p.out_shape5)) > 2**31
    assert eligible(p, case.dtype, case.family)
    _check_grid(select(p, case.dtype, H100, case.family))


@pytest.mark.parametrize("kind", ["tc_ncdhw", "grouped_ndhwc"])
def test_oom_cases_are_eligible(kind):
    case = _oom_problem(kind)
    assert eligible(case.params(), case.dtype, case.family)
    # The torch test runs tc_ncdhw through the selector: it must pick the family whose
    # workspace the test counts on.
    assert select(case.params(), case.dtype, H100).family == case.family


def test_gpu_gradient_cases_are_huge():
    for _, case, path in GRAD_INPUT:
        p = case.params()
        assert max(math.prod(p.x_shape5), math.prod(p.out_shape5)) > 2**31
        plan = bwd.GradInputPlan.build(p, case.dtype)
        assert plan.path == path
        _check_grid(plan)
    p = GRAD_WEIGHT.params()
    assert min(math.prod(p.x_shape5), math.prod(p.out_shape5)) > 2**31
    _check_grid(bwd.GradWeightPlan.build(p, GRAD_WEIGHT.dtype))


#: (problem, the families that must not run it): per-axis sizes past the phase-GEMM and grouped
#: kernels' 32-bit coordinates, and batches past their grids. The direct kernel (64-bit
#: throughout) takes them.
HUGE_PLANS = [
    (((1, 16, 1, 1, 2**31 + 8), (16, 16, 1, 1, 3), dict(padding=(0, 0, 1))),
     {"grouped", "igemm", "tc"}),
    (((1, 1, 1, 1, 2**30), (1, 1, 1, 1, 2), {}), {"grouped", "igemm", "tc"}),
    (((2**38, 16, 1, 1, 1), (16, 16, 1, 1, 1), {}), {"grouped", "igemm", "tc"}),
    (((2**31, 16, 2, 2, 2), (16, 16, 3, 3, 3), dict(padding=1)), {"grouped"}),
    (((1, 2**31, 1, 1, 1), (2**31, 1, 1, 1, 1), dict(groups=2**31)), {"grouped"}),
    # An output width of 2^30 + 2: past the depthwise kernel's 32-bit coordinates.
    (((1, 1, 1, 1, 2**29 + 1), (1, 1, 2, 2, 2), dict(stride=2)), {"depthwise", "grouped"}),
]  # fmt: skip


@pytest.mark.parametrize("problem, refused", HUGE_PLANS, ids=range(len(HUGE_PLANS)))
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_selector_refuses_what_a_family_cannot_index(problem, refused, dtype, monkeypatch):
    monkeypatch.delenv("CUPYCONVT_AUTOTUNE", raising=False)
    x_shape, w_shape, kwargs = problem
    p = ConvParams.from_args(x_shape, w_shape, None, **kwargs)
    for family in refused:
        assert not eligible(p, dtype, family, "medium"), f"{family} accepted {p}"
    chosen = select(p, dtype, H100, None, "medium")
    assert chosen.family not in refused
    _check_grid(chosen)
    for family in FAMILIES:
        if eligible(p, dtype, family, "medium"):
            _check_grid(select(p, dtype, H100, family, "medium"))


def test_tc_halo_box_grid_stays_in_range():
    """A batch of 2^35 phase-voxel rows of 4: one halo box a sample would need 2^35 blocks; the
    tensor-core plan gathers instead (BM voxels a block), within gridDim.x."""
    p = ConvParams.from_args((2**35, 16, 1, 1, 4), (16, 16, 1, 1, 1))
    assert eligible(p, "float16", "tc")
    plan = TcPlan.build(p, "float16", "highest", 132)
    assert not plan.tile.halo
    _check_grid(plan)


@pytest.mark.parametrize(
    "x_shape, w_shape, kwargs",
    [
        ((1, 4, 1, 1, 2**30), (4, 4, 1, 1, 1), {}),
        ((1, 4, 1, 1, 2**29), (4, 4, 1, 1, 3), dict(stride=2)),
        ((1, 4, 2**16, 1, 1), (4, 4, 2**14 + 1, 1, 1), dict(dilation=2**16)),
    ],
)
def test_gradients_refuse_extents_past_32_bits(x_shape, w_shape, kwargs):
    """The gradient kernels keep per-axis coordinates in 32 bits: a longer axis is refused with
    a ValueError before anything is allocated (there is no other gradient kernel)."""
    p = ConvParams.from_args(x_shape, w_shape, None, **kwargs)
    with pytest.raises(ValueError, match="GPU gradients take at most"):
        bwd.GradInputPlan.build(p, "float16")
    with pytest.raises(ValueError, match="GPU gradients take at most"):
        bwd.GradWeightPlan.build(p, "float16")


def test_gradient_plans_for_huge_problems_launch():
    """Many voxels (2^33 and more): every gradient plan's grid is in range; past 2^31 - 1 blocks
    along x (2^39 voxels) grad_input is refused with a ValueError naming the grid."""
    problems = [
        ((2**12, 16, 128, 128, 128), (16, 16, 3, 3, 3), dict(padding=1)),
        ((2**12, 4, 128, 128, 128), (4, 4, 4, 4, 4), dict(stride=2, padding=1, groups=4)),
        ((2**18, 64, 64, 64, 64), (64, 64, 1, 1, 1), {}),
    ]
    for (x_shape, w_shape, kwargs), dtype in itertools.product(problems, ["float16", "float32"]):
        p = ConvParams.from_args(x_shape, w_shape, None, **kwargs)
        _check_grid(bwd.GradInputPlan.build(p, dtype))
        _check_grid(bwd.GradWeightPlan.build(p, dtype))
        bwd.GradBiasPlan.build(p, dtype)
    p = ConvParams.from_args((2**21, 64, 64, 64, 64), (64, 64, 1, 1, 1))
    with pytest.raises(ValueError, match="too large"):
        bwd.GradInputPlan.build(p, "float16")
