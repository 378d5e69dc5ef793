"""conv_transpose3d on Dask arrays: chunk by chunk, on the CPU, on one GPU or on several.

Each output block is computed by one convolution (the kernels of
:func:`cupyconvt.conv_transpose3d`) of the input slab it depends on: its input block plus the
halo that the kernel, stride, dilation and padding require, gathered from as many neighbouring
input blocks as needed. Output blocks map 1:1 to input blocks and never overlap, so nothing is
computed twice and nothing is summed across blocks.

The mapping, per spatial axis (``s`` stride, ``p`` padding, ``dil`` dilation, ``K`` kernel size,
``n`` the input size, ``O`` the output size). An input index ``i`` reaches the outputs
``o = i*s - p + k*dil`` for the taps ``k = 0 .. K-1``.

- Input blocks have the boundaries ``0 = b_0 < b_1 < ... < b_m = n`` (dask's chunks).
- Output block ``j`` covers ``[o_j, o_{j+1})`` with ``o_0 = 0``, ``o_m = O`` and, between them,
  ``o_j = clip(b_j*s - shift, j, O - m + j)``, where ``shift = floor((2p - dil*(K-1) + s - 1) / 2)``
  centres an output block on the footprint of its input block. ``shift`` is 0 for the usual
  upsampling layers (k4 s2 p1 as in trilinear upsampling, k2 s2 p0, k3 s2 p1 with
  output_padding 1, k3 s1 p1), so there ``o_j = b_j*s`` exactly, clipped to ``[0, O]``.
  Since ``b_j*s - shift`` grows by at least 1 across a block, the clip keeps every output block
  non-empty whenever ``O >= m``. Only when the output is shorter than the number of blocks (a
  large padding) are some output blocks empty, which dask allows. (Empty input blocks, also
  legal in dask, give empty output blocks; ``j`` and ``m`` then count the non-empty ones.)
- Output block ``[o0, o1)`` reads the inputs ``i_lo = max(0, ceil((o0 + p - dil*(K-1)) / s))``
  to ``i_hi = min(n-1, floor((o1 - 1 + p) / s))``: those whose footprint
  ``[i*s - p, i*s - p + dil*(K-1)]`` overlaps the block, gathered from every input block they
  lie in. Every input outside that range reaches only other output blocks, and every tap of an
  output in the block that falls outside it falls outside ``x`` too, so each output element sums
  the same terms as in the unchunked call.
- The slab ``x[i_lo : i_hi+1]`` (on CuPy chunks, along W, started at a multiple of 16 bytes
  and widened, where ``x`` allows, to a multiple of 8 voxels: its rows then move 16 bytes at a
  time) has an uncropped result
  ``F = (L-1)*s + dil*(K-1) + 1`` long for a slab of ``L``, in which the block lies at
  ``[a, b)`` with ``a = o0 + p - i_lo*s`` and ``b = a + o1 - o0``. The slab is convolved for
  exactly the window ``[max(a, 0), min(b, F))`` of that result (``ConvParams.window``: an
  asymmetric crop, which the kernels and the CPU backend compute directly). Usually the window
  is the block itself, returned as it is. Where it does not cover the block (edges,
  ``output_padding``, outputs that no tap reaches), it is copied into the block and every
  output no input reaches gets the bias (or zero), as in the unchunked call.

Batch blocks map to batch blocks. The channel axis must be one block: a channel-chunked ``x`` is
rechunked to one channel block first (each task then holds every input channel of its slab).
"""

from __future__ import annotations

import itertools
import math
import threading
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np

from ._api import array_kind
from ._dtypes import GPU_DTYPES, check_dtype
from ._params import ConvParams, IntOrTriple
from ._precision import resolve as resolve_precision

if TYPE_CHECKING:
    import dask.array as da

__all__ = ["conv_transpose3d", "output_chunks"]

Chunks = tuple[tuple[int, ...], ...]


def _import_dask() -> Any:
    try:
        import dask.array as da
    except ImportError as e:
        raise ImportError(
            "cupyconvt.dask needs dask: pip install 'cupyconvt[dask]' (or 'dask[array]')"
        ) from e
    return da


@dataclass(frozen=True)
class _AxisPlan:
    """How one output block along one spatial axis is made.

    ``pieces`` lists ``(input block, start, stop)``: the parts of the input blocks that,
    concatenated in order, form the slab (empty when no input reaches the block). The slab's
    convolution computes ``length`` outputs from index ``start`` of its uncropped result
    (``ConvParams.window``); they go to ``dst`` of the block, which is ``size`` long.
    ``exact``: they are the block, nothing to fill.
    """

    pieces: tuple[tuple[int, int, int], ...]
    start: int
    length: int
    dst: tuple[int, int]
    size: int
    exact: bool

    @property
    def width(self) -> int:
        """The slab's length along this axis: its pieces' lengths together."""
        return sum(stop - start for _, start, stop in self.pieces)


def _boundaries(chunks: tuple[int, ...]) -> list[int]:
    b = [0]
    for c in chunks:
        b.append(b[-1] + c)
    return b


def _out_boundaries(chunks: tuple[int, ...], cp: ConvParams, axis: int) -> list[int]:
    """Output block boundaries along spatial ``axis`` (0, 1, 2) (see the module docstring)."""
    n_out, k, s = cp.out_size[axis], cp.kernel[axis], cp.stride[axis]
    p, dil = cp.padding[axis], cp.dilation[axis]
    b = _boundaries(chunks)
    # r[j]: non-empty input blocks before boundary j. Clipping to [r, n_out - m + r] keeps each
    # non-empty block's output non-empty (b*s - shift grows by at least 1 across it); empty
    # input blocks (legal in dask) get empty output blocks.
    r = _boundaries(tuple(int(c > 0) for c in chunks))
    m = r[-1]
    shift = (2 * p - dil * (k - 1) + s - 1) // 2
    bounds = []
    for bj, rj in zip(b, r, strict=True):
        if rj == 0 or rj == m:
            bounds.append(0 if rj == 0 else n_out)
        elif n_out >= m:
            bounds.append(min(max(bj * s - shift, rj), n_out - m + rj))
        else:  # fewer outputs than blocks: some output blocks must be empty
            bounds.append(min(max(bj * s - shift, 0), n_out))
    return bounds


#: CuPy slabs are widened along W (with real neighbouring inputs, which reach only outputs
#: outside the block) to a multiple of this many voxels: the GPU kernels copy input rows 16 bytes
#: at a time only where W is a multiple of 16 bytes. H100, 2026-11-24, ncu: the grouped kernel
#: took 0.67 ms on a 129-wide slab, 8 of them against 3.48 ms for the whole volume.
GPU_W_MULTIPLE = 8


def _axis_plans(
    chunks: tuple[int, ...], cp: ConvParams, axis: int, multiple: int = 1, align: int = 1
) -> list[_AxisPlan]:
    """The plan of every output block along spatial ``axis``, from the input's ``chunks``.

    ``align``: start each slab at an input index that is a multiple of this many voxels.
    ``multiple``: then widen it, where the input allows, to a multiple of this many voxels
    (first to the right, then to the left). The extra inputs reach only outputs outside the
    block, which are not computed. (On CuPy chunks along W, slab rows then start and end on 16
    bytes, and so does every piece of a block whose width is a multiple of 16 bytes: the slab
    gather moves them 16 bytes at a time.)"""
    n, s, p = cp.in_size[axis], cp.stride[axis], cp.padding[axis]
    span = cp.dilation[axis] * (cp.kernel[axis] - 1)
    b = _boundaries(chunks)
    ob = _out_boundaries(chunks, cp, axis)
    plans = []
    for o0, o1 in itertools.pairwise(ob):
        size = o1 - o0
        i_lo = max(0, -((span - o0 - p) // s))  # ceil((o0 + p - span) / s)
        i_hi = min(n - 1, (o1 - 1 + p) // s)
        if size == 0 or i_lo > i_hi:
            plans.append(_AxisPlan((), 0, 0, (0, 0), size, False))
            continue
        i_lo -= i_lo % align
        short = -(i_hi - i_lo + 1) % multiple
        if short and n >= i_hi - i_lo + 1 + short:
            right = min(short, n - 1 - i_hi)
            i_hi += right
            i_lo -= short - right
        pieces = tuple(
            (blk, max(i_lo, b[blk]) - b[blk], min(i_hi + 1, b[blk + 1]) - b[blk])
            for blk in range(len(chunks))
            if max(i_lo, b[blk]) < min(i_hi + 1, b[blk + 1])
        )
        full = (i_hi - i_lo) * s + span + 1
        a = o0 + p - i_lo * s  # where the block starts in the slab's uncropped result
        start, end = max(a, 0), min(a + size, full)
        exact = start == a and end == a + size
        plans.append(_AxisPlan(pieces, start, end - start, (start - a, end - a), size, exact))
    return plans


def output_chunks(
    chunks: Chunks,
    w_shape: tuple[int, ...],
    stride: IntOrTriple = 1,
    padding: IntOrTriple = 0,
    output_padding: IntOrTriple = 0,
    groups: int = 1,
    dilation: IntOrTriple = 1,
) -> Chunks:
    """The chunks of :func:`conv_transpose3d`'s result for an input with ``chunks``.

    Parameters
    ----------
    chunks : tuple of tuples of int
        The input's chunks (``x.chunks``), 5D ``(N, C_in, D, H, W)`` or unbatched 4D.
    w_shape, stride, padding, output_padding, groups, dilation
        As for :func:`cupyconvt.conv_transpose3d`.

    Returns
    -------
    tuple of tuples of int
        One block per input block along every axis: batch blocks unchanged, one channel block of
        ``C_out``, and spatial blocks as described in this module's docstring.

    Examples
    --------
    >>> output_chunks(((1,), (2,), (4, 4), (8,), (3, 3, 2)), (2, 2, 4, 4, 4), stride=2,
    ...               padding=1, groups=2)
    ((1,), (4,), (8, 8), (16,), (6, 6, 4))
    """
    chunks = tuple(tuple(int(c) for c in ax) for ax in chunks)
    shape = tuple(sum(ax) for ax in chunks)
    p = ConvParams.from_args(shape, w_shape, None, stride, padding, output_padding, groups,
                             dilation)  # fmt: skip
    out_spatial = []
    for axis, ax_chunks in enumerate(chunks[-3:]):
        bounds = _out_boundaries(ax_chunks, p, axis)
        out_spatial.append(tuple(hi - lo for lo, hi in itertools.pairwise(bounds)))
    return (*chunks[:-4], (p.C_out,), *out_spatial)


@dataclass(frozen=True)
class _Task:
    """Everything one output block needs besides the input blocks, w and bias."""

    axes: tuple[_AxisPlan, _AxisPlan, _AxisPlan]
    params: ConvParams | None  # the slab's problem, windowed to the block (None: no input)
    c_out: int
    family: str | None
    precision: str


def _module(kind: str) -> Any:
    if kind == "cupy":
        import cupy

        return cupy
    return np


def _like(a: Any, kind: str, xp: Any) -> Any:
    """``a`` (w or bias) as an array of ``kind`` on the current device."""
    if a is None:
        return None
    if kind == "numpy":
        return a if isinstance(a, np.ndarray) else a.get()
    return xp.asarray(a)  # no copy if ``a`` is on the current device, else moved there


def _slab(boxes: list, axes: tuple[_AxisPlan, ...], xp: Any) -> Any:
    """The C-contiguous input slab of one output block.

    ``boxes``: the input block of every piece combination ``(jd, jh, jw)`` of ``axes``'s pieces,
    row-major. Runs on the device of the first box: CuPy blocks on that device are gathered by
    one kernel (``_slab.gather``); parts of blocks on other GPUs are moved by ``cupy.asarray``.
    """
    first = boxes[0]
    if len(boxes) == 1:
        view = first[(slice(None), slice(None), *(slice(*ax.pieces[0][1:]) for ax in axes))]
        if view.flags.c_contiguous:
            return view
    lens = [ax.width for ax in axes]
    if xp is not np:
        from . import _slab as gather

        if gather.gatherable(boxes, xp.cuda.runtime.getDevice()):
            pieces = [[(start, stop - start) for _, start, stop in ax.pieces] for ax in axes]
            return gather.gather(xp, boxes, pieces, lens)
    slab = xp.empty((*first.shape[:2], *lens), dtype=first.dtype)
    # (where in the slab, where in the block) of each piece, per axis
    spans = []
    for ax in axes:
        pos, pairs = 0, []
        for _, start, stop in ax.pieces:
            pairs.append((slice(pos, pos + stop - start), slice(start, stop)))
            pos += stop - start
        spans.append(pairs)
    combos = itertools.product(*spans)
    for block, ((dd, sd), (dh, sh), (dw, sw)) in zip(boxes, combos, strict=True):
        slab[:, :, dd, dh, dw] = xp.asarray(block[:, :, sd, sh, sw])
    return slab


def _block(boxes: list, w: Any, bias: Any, *, task: _Task) -> Any:
    """Compute one output block (runs on a worker) from the input blocks it reads: one box per
    piece combination, row-major (see :func:`_slab`), or only its own block if no input reaches
    it."""
    ref = boxes[0]
    kind = array_kind(ref)
    xp = _module(kind)
    if kind == "cupy":
        device_id = ref.data.device_id
        with _device_lock(device_id), xp.cuda.Device(device_id):
            return _block_on_device(boxes, w, bias, task, kind, xp)
    return _block_on_device(boxes, w, bias, task, kind, xp)


_locks: dict[int, threading.Lock] = {}


def _device_lock(device_id: int) -> threading.Lock:
    """One lock per GPU: the tasks of one process take turns on a GPU.

    A task only queues work on the GPU's stream, which runs it in order anyway; what threads
    running tasks side by side share is the Python interpreter (the GIL), and under dask's
    threaded scheduler they slowed each other down. With the lock a GPU's tasks take turns
    (H100, ``benchmarks/bench_dask.py``, 8 blocks, threaded scheduler: 6.99 against 7.54 ms,
    8.59 against 9.34, 18.30 against 20.00 without it; the single-threaded scheduler is faster
    still). CPU chunks take no lock: NumPy's matrix products run side by side.
    """
    lock = _locks.get(device_id)
    if lock is None:
        lock = _locks.setdefault(device_id, threading.Lock())
    return lock


def _block_on_device(boxes: list, w: Any, bias: Any, task: _Task, kind: str, xp: Any) -> Any:
    ref = boxes[0]
    w, bias = _like(w, kind, xp), _like(bias, kind, xp)
    res = None
    if task.params is not None:
        slab = _slab(boxes, task.axes, xp)
        if kind == "cupy":
            from . import _gpu

            res = _gpu.conv_transpose3d(slab, w, bias, task.params, None, family=task.family,
                                        precision=task.precision)  # fmt: skip
        else:
            from . import _cpu

            res = _cpu.conv_transpose3d(slab, w, bias, task.params)
        if all(ax.exact for ax in task.axes):
            return res
    # Outputs that no input reaches hold the bias (or zero), as in the unchunked call. Copies
    # only, no arithmetic: that works for every dtype CuPy can hold.
    shape = (ref.shape[0], task.c_out, *(ax.size for ax in task.axes))
    if bias is None:
        out = xp.zeros(shape, dtype=ref.dtype)
    else:
        out = xp.empty(shape, dtype=ref.dtype)
        out[...] = bias.reshape(1, -1, 1, 1, 1)
    if res is not None:
        dst = tuple(slice(*ax.dst) for ax in task.axes)
        out[(slice(None), slice(None), *dst)] = res
    return out


def _task_spec() -> Any:
    """dask's task classes (``Task``, ``TaskRef``, ``List``, ``DataNode``), where this dask has
    them (2024.12 and later), else None: the graph is then written in legacy tuples."""
    try:
        import dask._task_spec as spec
    except ImportError:
        return None
    if all(hasattr(spec, n) for n in ("Task", "TaskRef", "List", "DataNode")):
        return spec
    return None


def _first_key(keys: Any) -> tuple:
    while isinstance(keys, list):
        keys = keys[0]
    return keys


def _host_copy(a: Any) -> Any:
    return a if a is None or isinstance(a, np.ndarray) else a.get()


def _check_operand(name: str, a: Any) -> str:
    kind = array_kind(a)
    if kind in ("numpy", "cupy"):
        return kind
    what = "a dask array (compute it first)" if hasattr(a, "dask") else type(a).__name__
    raise TypeError(f"{name} must be a NumPy or CuPy array, got {what}")


def conv_transpose3d(
    x: da.Array,
    w: Any,
    bias: Any | None = None,
    stride: IntOrTriple = 1,
    padding: IntOrTriple = 0,
    output_padding: IntOrTriple = 0,
    groups: int = 1,
    dilation: IntOrTriple = 1,
    *,
    precision: str | None = None,
    family: str | None = None,
) -> da.Array:
    """3D transposed convolution of a chunked Dask array, block by block, with halos.

    Computes what :func:`cupyconvt.conv_transpose3d` computes on the whole of ``x``, one task
    per block of ``x``: each task convolves its block plus the halo it needs (gathered from as
    many neighbouring blocks as the kernel, stride, dilation and padding reach) and keeps only
    its own output block. NumPy chunks run on the CPU backend, CuPy chunks on the GPU that holds
    them; with a ``dask_cuda.LocalCUDACluster`` every GPU of the machine works on its share.

    Parameters
    ----------
    x : dask.array.Array, shape ``(N, C_in, D, H, W)`` or unbatched ``(C_in, D, H, W)``
        Input, with NumPy or CuPy chunks (``x._meta`` says which), chunked along batch and
        spatial axes in any way: blocks smaller than the halo and uneven last blocks included.
        If the channel axis has several blocks it is rechunked to one.
    w : numpy.ndarray or cupy.ndarray, shape ``(C_in, C_out // groups, kD, kH, kW)``
        Weight, same dtype as ``x``. Stored once in the graph; each task uses it as an array of
        its chunk's library on its chunk's device (a copy where it is not one already).
    bias : numpy.ndarray or cupy.ndarray, shape ``(C_out,)``, optional
        As ``w``.
    stride, padding, output_padding, groups, dilation
        As for :func:`cupyconvt.conv_transpose3d`.
    precision : {"highest", "high", "medium"}, optional
        float32 policy on the GPU; ``None`` takes the process default *when the graph is built*
        (workers do not consult their own default).
    family : {"tc", "igemm", "depthwise", "grouped", "direct"}, optional
        Pin the GPU kernel family (CuPy chunks only). Without it each slab's problem is
        selected on its own, and slabs of different shapes may get different kernels, so the
        result matches the unchunked call to rounding. With the same family pinned on both
        sides, each output element sums the same terms in the same order, and the result is
        expected to match bitwise.

    Returns
    -------
    dask.array.Array
        Lazy result, shape :func:`cupyconvt.output_shape` of ``x``'s, dtype of ``x``, with
        chunks of the same type as ``x``'s and one block per block of ``x`` along every axis
        (:func:`output_chunks` gives them).

    Raises
    ------
    ImportError
        dask is not installed.
    TypeError
        ``x`` is not a Dask array, its chunks are neither NumPy nor CuPy arrays; ``w`` or
        ``bias`` is not a NumPy or CuPy array; dtypes differ or are not supported.
    ValueError
        The rules of :func:`cupyconvt.conv_transpose3d` (with the same messages); ``x`` has
        unknown chunk sizes; an unknown ``family``, or ``family`` with NumPy chunks.

    Notes
    -----
    Output block ``j`` along a spatial axis starts at ``b_j*stride - shift`` (clipped so that
    no block is empty), where ``b_j`` is where input block ``j`` starts and ``shift`` centres
    the output block on its input block's footprint; ``shift`` is 0 for the usual upsampling
    layers (trilinear k4 s2 p1, k2 s2, k3 s2 p1 with output_padding 1). The module docstring
    gives the exact rule and the halo. Memory per task: the slab (block plus halo, all input
    channels) and its output block (all output channels).

    Examples
    --------
    >>> import dask.array as da, numpy as np, cupyconvt.dask
    >>> x = da.random.random((1, 4, 32, 32, 32), chunks=(1, 4, 8, 16, 16)).astype(np.float32)
    >>> w = np.random.rand(4, 1, 4, 4, 4).astype(np.float32)
    >>> y = cupyconvt.dask.conv_transpose3d(x, w, stride=2, padding=1, groups=4)
    >>> y.chunks[2:]
    ((16, 16, 16, 16), (32, 32), (32, 32))
    >>> y.compute().shape
    (1, 4, 64, 64, 64)
    """
    da = _import_dask()
    if not isinstance(x, da.Array):
        raise TypeError(
            f"x must be a dask.array.Array, got {type(x).__name__} (for NumPy or CuPy arrays call "
            "cupyconvt.conv_transpose3d)"
        )
    kind = array_kind(x._meta)
    if kind not in ("numpy", "cupy"):
        raise TypeError(
            f"x's chunks must be NumPy or CuPy arrays, got {type(x._meta).__name__} (x._meta)"
        )
    w_kind = _check_operand("w", w)
    if bias is not None:
        _check_operand("bias", bias)
    if any(math.isnan(c) for ax in x.chunks for c in ax):
        raise ValueError("x has unknown chunk sizes: call x.compute_chunk_sizes() first")
    p = ConvParams.from_args(x.shape, w.shape, None if bias is None else bias.shape, stride,
                             padding, output_padding, groups, dilation)  # fmt: skip
    dtype = check_dtype("x", x.dtype, GPU_DTYPES)
    for name, a in (("w", w), ("bias", bias)):
        if a is not None and a.dtype != x.dtype:
            other = check_dtype(name, a.dtype, GPU_DTYPES)
            raise TypeError(
                f"{name} has dtype {other} but x has dtype {dtype}: x, w and bias must share one "
                "dtype"
            )
    precision = resolve_precision(precision)
    if family is not None:
        from ._select import FAMILIES, eligible

        if family not in FAMILIES:
            raise ValueError(f"family={family!r} is not one of {', '.join(map(repr, FAMILIES))}")
        if kind != "cupy":
            raise ValueError(
                f"family={family!r} pins a GPU kernel family, but x's chunks are NumPy arrays"
            )
        if not eligible(p, dtype, family, precision):
            raise ValueError(f"kernel family {family!r} cannot run this problem")

    if not p.batched:
        return conv_transpose3d(x[None], w, bias, stride, padding, output_padding, groups,
                                dilation, precision=precision, family=family)[0]  # fmt: skip
    if len(x.chunks[1]) > 1:
        x = x.rechunk({1: -1})

    from dask.base import tokenize
    from dask.highlevelgraph import HighLevelGraph

    w_token = tokenize(_host_copy(w), w_kind)
    b_token = None if bias is None else tokenize(_host_copy(bias))
    args = (p.stride, p.padding, p.output_padding, p.groups, p.dilation, family, precision)
    # dask's opt-in expression backend ("array.query-planning") names the blocks of the graph it
    # materializes apart from x.name: take the name from the keys.
    expr = getattr(da, "array_expr_enabled", lambda: False)()
    x_name = _first_key(x.__dask_keys__())[0] if expr else x.name
    name = "cupyconvt-conv_transpose3d-" + tokenize(x_name, w_token, b_token, *args)
    w_key = ("cupyconvt-weight-" + w_token,)
    b_key = None if bias is None else ("cupyconvt-bias-" + b_token,)

    gpu_w = kind == "cupy"  # CuPy slabs: rows of whole 16-byte units (see _axis_plans)
    plans = [
        _axis_plans(x.chunks[2 + axis], p, axis, GPU_W_MULTIPLE if gpu_w and axis == 2 else 1,
                    max(1, 16 // x.dtype.itemsize) if gpu_w and axis == 2 else 1)
        for axis in range(3)
    ]  # fmt: skip
    spec = _task_spec()
    layer: dict = {}
    for key, value in ((w_key, w), (b_key, bias)):
        if value is not None:
            layer[key] = value if spec is None else spec.DataNode(key, value)
    bias_shape = None if bias is None else bias.shape
    for n, batch in enumerate(x.chunks[0]):
        for jd, jh, jw in itertools.product(*(range(len(pl)) for pl in plans)):
            axes = (plans[0][jd], plans[1][jh], plans[2][jw])
            slab_p = None
            if all(ax.pieces for ax in axes):
                bd, bh, bw = ([blk for blk, _, _ in ax.pieces] for ax in axes)
                boxes = [(x_name, n, 0, *ijk) for ijk in itertools.product(bd, bh, bw)]
                if batch:
                    lens = [ax.width for ax in axes]
                    whole = ConvParams.from_args((batch, p.C_in, *lens), w.shape, bias_shape,
                                                 p.stride, 0, 0, p.groups, p.dilation)  # fmt: skip
                    slab_p = whole.window(tuple(ax.start for ax in axes),
                                          tuple(ax.length for ax in axes))  # fmt: skip
            else:  # no input reaches this block: its own input block tells the array type
                boxes = [(x_name, n, 0, jd, jh, jw)]
            # The task's plan rides in a partial: dask looks into neither, at build or at run.
            run = partial(_block, task=_Task(axes, slab_p, p.C_out, family, precision))
            key = (name, n, 0, jd, jh, jw)
            if spec is None:
                layer[key] = (run, boxes, w_key, b_key)
            else:  # dask's task objects: no conversion of a legacy tuple on every compute
                ref = spec.TaskRef
                layer[key] = spec.Task(key, run, spec.List(*map(ref, boxes)), ref(w_key),
                                       None if b_key is None else ref(b_key))  # fmt: skip
    chunks = (x.chunks[0], (p.C_out,), *(tuple(ax.size for ax in pl) for pl in plans))
    if expr:
        from dask.array._array_expr._collection import from_graph

        keys = [k for k in layer if k[0] == name]
        return from_graph({**x.__dask_graph__(), **layer}, x._meta, chunks, keys, name)
    graph = HighLevelGraph.from_collections(name, layer, dependencies=[x])
    return da.Array(graph, name, chunks, meta=x._meta)
