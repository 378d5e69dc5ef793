"""The backward pass: validate once, then send each asked-for gradient to the arrays' backend.

    conv_transpose3d_backward(grad_out, x, w, ...)     public entry (this module)
      -> params_for(x.shape, w.shape, ...)             the forward's own validation (ConvParams)
      -> grad_out.shape == the forward's output shape
      -> NumPy: _backward_cpu; CuPy: _backward_gpu; torch: DLPack to one of those and back

torch tensors on the GPU run on torch's current stream (CuPy is pointed at it for the call, as in
``_interop.py``), and every CuPy allocation made during the call, results and workspaces alike,
comes from torch's caching allocator (``_interop.torch_malloc``). That is what lets a CUDA graph
capture the backward: memory from CuPy's own pool would be handed back to it, and reused, while
the graph still refers to it. Neither torch nor CuPy is imported at module level.
"""

from __future__ import annotations

import sys
from typing import Any, NamedTuple

from . import _backward_cpu
from ._api import array_kind, params_for
from ._dtypes import GPU_DTYPES, dtype_name
from ._interop import on_torch_stream
from ._params import ConvParams, IntOrTriple
from ._precision import resolve as resolve_precision

#: The gradients ``needs`` can name, in the order of :class:`Gradients`.
NEEDS = ("input", "weight", "bias")

_LIBRARY = {"numpy": "a NumPy array", "cupy": "a CuPy array", "torch": "a torch.Tensor"}


class Gradients(NamedTuple):
    """The gradients of conv_transpose3d; ``None`` for each one not asked for."""

    grad_input: Any
    grad_weight: Any
    grad_bias: Any


def conv_transpose3d_backward(
    grad_out: Any,
    x: Any,
    w: Any,
    stride: IntOrTriple = 1,
    padding: IntOrTriple = 0,
    output_padding: IntOrTriple = 0,
    groups: int = 1,
    dilation: IntOrTriple = 1,
    *,
    needs: str | tuple[str, ...] = NEEDS,
    precision: str | None = None,
) -> Gradients:
    """Gradients of :func:`cupyconvt.conv_transpose3d` with respect to ``x``, ``w`` and ``bias``.

    For ``y = conv_transpose3d(x, w, bias, stride, padding, output_padding, groups, dilation)``
    and the gradient ``grad_out`` of a loss with respect to ``y``, computes what
    ``torch.autograd`` gives for ``torch.nn.functional.conv_transpose3d``, on NumPy arrays (CPU
    backend), CuPy arrays (GPU, on CuPy's current stream) or torch tensors (zero-copy through
    DLPack, on torch's current stream).

    Parameters
    ----------
    grad_out : array, shape of the forward's output
        ``(N, C_out, D_out, H_out, W_out)``, or unbatched ``(C_out, D_out, H_out, W_out)``.
    x : array, shape ``(N, C_in, D, H, W)`` or unbatched ``(C_in, D, H, W)``
        The forward's input (only its shape is used unless ``"weight"`` is needed).
    w : array, shape ``(C_in, C_out // groups, kD, kH, kW)``
        The forward's weight (only its shape is used unless ``"input"`` is needed).
    stride, padding, output_padding, groups, dilation
        The forward's arguments, with the same rules as :func:`cupyconvt.conv_transpose3d`.
    needs : str or sequence of {"input", "weight", "bias"}
        Which gradients to compute; the others come back as ``None`` and cost nothing.
    precision : {"highest", "high", "medium"}, optional
        The float32 policy on the GPU, as in :func:`cupyconvt.conv_transpose3d`; ``None`` takes
        the process default. The CPU backend computes in IEEE float32 (or float64) always.

    Returns
    -------
    Gradients
        A named tuple ``(grad_input, grad_weight, grad_bias)``: ``grad_input`` has ``x``'s shape
        (unbatched if ``x`` was), ``grad_weight`` has ``w``'s shape and ``grad_bias`` is
        ``(C_out,)``, all with ``grad_out``'s dtype, array type and device, C-contiguous.

    Raises
    ------
    TypeError
        Unsupported array type or dtype, mixed array libraries, mismatched dtypes, ``needs`` not
        a str or sequence of str.
    ValueError
        Arguments that break the forward's rules, ``grad_out`` of the wrong shape, arrays on
        different devices, an unknown name in ``needs`` or an unknown ``precision``.

    Notes
    -----
    - ``grad_input = conv3d(grad_out, w, stride, padding, dilation, groups)``: the strided
      convolution that the transposed convolution is the adjoint of. ``output_padding`` enters
      only through the shapes.
    - ``grad_weight[ci, j, k] = sum over n and input voxels i of
      x[n, ci, i] * grad_out[n, g*C_out_g + j, i*stride - padding + k*dilation]``, over the
      positions that lie inside the output (``ci`` in group ``g``).
    - ``grad_bias = grad_out`` summed over N, D, H and W.

    Every gradient is deterministic: fixed reduction orders, no floating-point atomics, so
    results are bitwise identical run to run. float16 and bfloat16 accumulate in float32 and
    round once. A batch of size 0 gives an empty ``grad_input`` and zero ``grad_weight`` and
    ``grad_bias``.

    Examples
    --------
    >>> import numpy as np, cupyconvt
    >>> x = np.random.rand(2, 4, 8, 8, 8).astype(np.float32)
    >>> w = np.random.rand(4, 3, 3, 3, 3).astype(np.float32)
    >>> y = cupyconvt.conv_transpose3d(x, w, stride=2, padding=1, output_padding=1)
    >>> g = cupyconvt.conv_transpose3d_backward(np.ones_like(y), x, w, stride=2, padding=1,
    ...                                         output_padding=1)
    >>> g.grad_input.shape, g.grad_weight.shape, g.grad_bias.shape
    ((2, 4, 8, 8, 8), (4, 3, 3, 3, 3), (3,))
    >>> cupyconvt.conv_transpose3d_backward(np.ones_like(y), x, w, 2, 1, 1,
    ...                                     needs="bias").grad_input is None
    True
    """
    mask = needs_mask(needs)
    precision = resolve_precision(precision)
    kind = _check_arrays(grad_out, x, w)
    p = params_for(x.shape, w.shape, None, stride, padding, output_padding, groups, dilation)
    if tuple(grad_out.shape) != p.out_shape:
        raise ValueError(
            f"grad_out has shape {tuple(grad_out.shape)}, expected {p.out_shape}: the shape of "
            "the forward's output for these x, w and arguments"
        )
    if kind == "numpy":
        return numpy_gradients(grad_out, x, w, p, mask)
    if kind == "cupy":
        return cupy_gradients(grad_out, x, w, p, mask, precision)
    return torch_gradients(grad_out, x, w, p, mask, precision)


def needs_mask(needs: object) -> tuple[bool, bool, bool]:
    """``needs`` as a mask over :data:`NEEDS`; a single str names one gradient."""
    names = (needs,) if isinstance(needs, str) else needs
    try:
        names = tuple(names)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(
            f"needs must be a str or a sequence of str from {NEEDS}, got {type(needs).__name__}"
        ) from None
    for name in names:
        if not isinstance(name, str) or name not in NEEDS:
            raise ValueError(
                f"needs={needs!r} contains {name!r}; each must be one of "
                f"{', '.join(map(repr, NEEDS))}"
            )
    return ("input" in names, "weight" in names, "bias" in names)


def _dtype_of(kind: str, a: Any) -> str:
    if kind == "torch":
        return str(a.dtype).removeprefix("torch.")
    return dtype_name(a.dtype)


def _device_of(kind: str, a: Any) -> object:
    if kind == "cupy":
        return f"GPU {a.data.device_id}"
    if kind == "torch":
        return a.device
    return "cpu"


def _check_arrays(grad_out: Any, x: Any, w: Any) -> str:
    """One array library, one supported dtype, one device; returns the library's kind."""
    kind = array_kind(grad_out)
    if kind == "other":
        raise TypeError(
            "grad_out must be a NumPy array, a CuPy array or a torch.Tensor, got "
            f"{type(grad_out).__name__}"
        )
    named = (("grad_out", grad_out), ("x", x), ("w", w))
    for name, a in named[1:]:
        k = array_kind(a)
        if k != kind:
            what = _LIBRARY.get(k, type(a).__name__)
            raise TypeError(
                f"grad_out is {_LIBRARY[kind]} but {name} is {what}: pass grad_out, x and w as "
                "arrays of one library"
            )
    ref = _dtype_of(kind, grad_out)
    for name, a in named:
        d = _dtype_of(kind, a)
        if d not in GPU_DTYPES:
            raise TypeError(f"{name} has unsupported dtype {d}; supported: {', '.join(GPU_DTYPES)}")
        if d != ref:
            raise TypeError(
                f"{name} has dtype {d} but grad_out has dtype {ref}: grad_out, x and w must "
                "share one dtype"
            )
    ref_device = _device_of(kind, grad_out)
    for name, a in named[1:]:
        if _device_of(kind, a) != ref_device:
            raise ValueError(
                f"{name} is on {_device_of(kind, a)} but grad_out is on {ref_device}: all "
                "arrays must be on one device"
            )
    if kind == "torch" and grad_out.device.type not in ("cpu", "cuda"):
        raise TypeError(f"tensors on {grad_out.device.type} are not supported (cuda or cpu only)")
    return kind


def numpy_gradients(
    gy: Any, x: Any, w: Any, p: ConvParams, mask: tuple[bool, bool, bool]
) -> Gradients:
    """The asked-for gradients of validated NumPy arrays, on the CPU backend."""
    need_input, need_weight, need_bias = mask
    gi = gw = gb = None
    if need_input and need_weight:  # one pass over the taps serves both
        gi, gw = _backward_cpu.input_and_weight(gy, x, w, p)
    elif need_input:
        gi = _backward_cpu.grad_input(gy, w, p)
    elif need_weight:
        gw = _backward_cpu.grad_weight(x, gy, p)
    if need_bias:
        gb = _backward_cpu.grad_bias(gy, p)
    if gi is not None and not p.batched:
        gi = gi.reshape(p.x_shape5[1:])
    return Gradients(gi, gw, gb)


def cupy_gradients(
    gy: Any, x: Any, w: Any, p: ConvParams, mask: tuple[bool, bool, bool], precision: str
) -> Gradients:
    """The asked-for gradients of validated CuPy arrays, on their device and CuPy's stream."""
    import cupy

    need_input, need_weight, need_bias = mask
    gi = gw = gb = None
    w_shape = (p.C_in, p.C_out_g, *p.kernel)
    with cupy.cuda.Device(gy.data.device_id):
        if p.N == 0:  # an empty batch launches nothing: the sums over it are zero
            gi = cupy.empty(p.x_shape5, dtype=gy.dtype) if need_input else None
            gw = cupy.zeros(w_shape, dtype=gy.dtype) if need_weight else None
            gb = cupy.zeros(p.C_out, dtype=gy.dtype) if need_bias else None
        else:
            from . import _backward_gpu

            gy5 = cupy.ascontiguousarray(gy).reshape(p.out_shape5)
            if need_input:
                gi = _backward_gpu.grad_input(gy5, cupy.ascontiguousarray(w), p, precision)
            if need_weight:
                x5 = cupy.ascontiguousarray(x).reshape(p.x_shape5)
                gw = _backward_gpu.grad_weight(x5, gy5, p, precision)
            if need_bias:
                gb = _backward_gpu.grad_bias(gy5, p)
    if gi is not None and not p.batched:
        gi = gi.reshape(p.x_shape5[1:])
    return Gradients(gi, gw, gb)


def _tensor_from_numpy(torch: Any, a: Any) -> Any:
    if dtype_name(a.dtype) == "bfloat16":  # torch knows no ml_dtypes: go through the bits
        return torch.from_numpy(a.view("int16")).view(torch.bfloat16)
    return torch.from_numpy(a)


def _tensor_from_cupy(torch: Any, a: Any) -> Any:
    if dtype_name(a.dtype) == "bfloat16":
        return torch.from_dlpack(a.view("int16")).view(torch.bfloat16)
    return torch.from_dlpack(a)


def torch_gradients(
    gy: Any, x: Any, w: Any, p: ConvParams, mask: tuple[bool, bool, bool], precision: str
) -> Gradients:
    """The asked-for gradients of validated torch tensors, as new torch tensors on their device.

    CPU tensors run on the CPU backend through NumPy views; CUDA tensors on the GPU backend on
    torch's current stream, with every allocation made by torch.
    """
    from ._interop import _to_numpy

    torch = sys.modules["torch"]
    if gy.device.type == "cpu":
        grads = numpy_gradients(_to_numpy(gy), _to_numpy(x), _to_numpy(w), p, mask)
        return Gradients(*(None if g is None else _tensor_from_numpy(torch, g) for g in grads))
    with on_torch_stream(gy.device) as cupy:
        gy_c, x_c, w_c = (cupy.from_dlpack(t.detach()) for t in (gy, x, w))
        grads = cupy_gradients(gy_c, x_c, w_c, p, mask, precision)
        # Inside the block: DLPack's hand-over sees one stream on both sides and adds no wait.
        return Gradients(*(None if g is None else _tensor_from_cupy(torch, g) for g in grads))
