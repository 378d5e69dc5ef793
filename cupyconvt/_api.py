"""The public entry point: validate once, then hand the problem to the backend for its arrays."""

from __future__ import annotations

from typing import Any

import numpy as np

from . import _cpu
from ._dtypes import CPU_DTYPES, GPU_DTYPES, check_dtype
from ._layout import check_layout, check_x_rank, from_logical_shape, to_logical_shape
from ._params import ConvParams, IntOrTriple
from ._precision import resolve as resolve_precision


def array_kind(a: object) -> str:
    """``'numpy'``, ``'cupy'`` or ``'torch'``; never imports CuPy or torch to find out."""
    if isinstance(a, np.ndarray):
        return "numpy"
    # Look the protocols up on the type: on an instance, CuPy's __cuda_array_interface__ is a
    # property that builds its whole dict, a cost paid on every call.
    cls = type(a)
    module = cls.__module__
    if module.startswith("cupy") and hasattr(cls, "__cuda_array_interface__"):
        return "cupy"
    if module.startswith("torch") and hasattr(cls, "__dlpack__"):
        return "torch"
    return "other"


def _check_out_apart(out: Any, inputs: list[tuple[str, Any]]) -> None:
    """Refuse a NumPy ``out`` whose memory reaches into an input's: the CPU backend writes the
    result block by block while it still reads the inputs (x in place where it needs no zero
    frame), so an overlap would give a wrong answer, not an in-place one. Bounds are compared
    (``np.may_share_memory``), so an ``out`` lying only in the gaps of a strided input is
    refused too."""
    for name, a in inputs:
        if np.may_share_memory(out, a):
            raise ValueError(
                f"out overlaps {name} in memory: the result would overwrite {name} while it is "
                "still read; pass an out of its own (or none)"
            )


def _check_arrays(x: Any, w: Any, bias: Any, out: Any) -> str:
    kind = array_kind(x)
    if kind not in ("numpy", "cupy"):
        raise TypeError(
            f"x must be a NumPy array, a CuPy array or a torch.Tensor, got {type(x).__name__}"
        )
    named = [("w", w)] + ([("bias", bias)] if bias is not None else [])
    named += [("out", out)] if out is not None else []
    supported = CPU_DTYPES if kind == "numpy" else GPU_DTYPES
    dtype = check_dtype("x", x.dtype, supported)
    x_type = type(x)
    for name, a in named:
        if type(a) is not x_type:  # the common case, one array type, costs one comparison
            k = array_kind(a)
            if k != kind:
                what = f"a {k} array" if k != "other" else type(a).__name__
                raise TypeError(
                    f"x is a {kind} array but {name} is {what}: pass x, w and bias as arrays of "
                    "one library (mixing NumPy and CuPy is not supported)"
                )
        if a.dtype != x.dtype:
            other = check_dtype(name, a.dtype, supported)
            raise TypeError(
                f"{name} has dtype {other} but x has dtype {dtype}: x, w, bias (and out) must "
                "share one dtype"
            )
    if kind == "cupy":
        x_dev = x.data.device_id
        for name, a in named:
            if a.data.device_id != x_dev:
                raise ValueError(
                    f"{name} is on GPU {a.data.device_id} but x is on GPU {x_dev}: "
                    "all arrays must be on one device"
                )
    return kind


def _exact(v: object) -> object:
    """``v`` as a cache-key part when it is a plain int or a triple of plain ints (a list becomes a
    tuple), else None. Exact types only: True equals 1 and 2.0 equals 2, and both hash alike, but
    they are invalid arguments, so a key holding them must not find a valid entry."""
    t = type(v)
    if t is int:
        return v
    if (t is tuple or t is list) and len(v) == 3:  # type: ignore[arg-type]
        a, b, c = v  # type: ignore[misc]
        if type(a) is int and type(b) is int and type(c) is int:
            return (a, b, c)
    return None


#: cupyconvt._gpu once the first GPU call has imported it (CPU-only use never does).
_gpu: Any = None
_PARAMS: dict[tuple, ConvParams] = {}
_PARAMS_MAX = 4096


def params_for(x_shape, w_shape, bias_shape, stride, padding, output_padding, groups, dilation):
    """``ConvParams.from_args`` memoized on its arguments: a repeated call costs one dict lookup.

    Only calls whose int-or-triple arguments are plain ints (or lists/tuples of three) are
    cached, and only valid ones (an exception propagates), so every call is validated; any other
    argument (a NumPy integer, a bool, a float) goes through the full validation each time.
    """
    key = (tuple(x_shape), tuple(w_shape), None if bias_shape is None else tuple(bias_shape),
           _exact(stride), _exact(padding), _exact(output_padding), _exact(groups),
           _exact(dilation))  # fmt: skip
    p = _PARAMS.get(key)
    if p is not None:
        return p
    p = ConvParams.from_args(key[0], key[1], key[2], stride, padding, output_padding, groups,
                             dilation)  # fmt: skip
    if None not in key[3:]:
        if len(_PARAMS) >= _PARAMS_MAX:
            _PARAMS.clear()
        _PARAMS[key] = p
    return p


def conv_transpose3d(
    x: Any,
    w: Any,
    bias: Any | None = None,
    stride: IntOrTriple = 1,
    padding: IntOrTriple = 0,
    output_padding: IntOrTriple = 0,
    groups: int = 1,
    dilation: IntOrTriple = 1,
    *,
    out: Any | None = None,
    precision: str | None = None,
    layout: str = "NCDHW",
) -> Any:
    """3D transposed convolution ("deconvolution") with PyTorch's exact semantics.

    Computes ``torch.nn.functional.conv_transpose3d(x, w, bias, stride, padding, output_padding,
    groups, dilation)`` on CuPy arrays (GPU), NumPy arrays (CPU backend) or torch tensors
    (zero-copy through DLPack, on torch's current stream; the result is a torch tensor on the
    input's device).

    Parameters
    ----------
    x : array, shape ``(N, C_in, D, H, W)`` or unbatched ``(C_in, D, H, W)``
        Input. float16, bfloat16, float32 or float64. With ``layout="NDHWC"``: ``(N, D, H, W,
        C_in)`` or unbatched ``(D, H, W, C_in)``.
    w : array, shape ``(C_in, C_out // groups, kD, kH, kW)``
        Weight, in PyTorch's ``ConvTranspose3d`` layout (in either ``layout``), same dtype and
        device as ``x``.
    bias : array, shape ``(C_out,)``, optional
        Added to every output voxel of its channel.
    stride, padding, output_padding, dilation : int or triple of int
        As in PyTorch: ``stride >= 1``, ``dilation >= 1``, ``padding >= 0`` and
        ``0 <= output_padding < max(stride, dilation)`` per axis (depth, height, width).
    groups : int
        Number of channel groups; must divide ``C_in``. ``groups == C_in`` is depthwise.
    out : array, optional
        A C-contiguous array of the result's shape (in ``layout``) and dtype to write into
        (NumPy/CuPy only), sharing no memory with ``x``, ``w`` or ``bias`` (checked for NumPy
        arrays).
    precision : {"highest", "high", "medium"}, optional
        How float32 inputs are computed on the GPU. ``None`` (the default) takes the process
        default of :func:`cupyconvt.set_float32_matmul_precision`, itself ``"highest"``.
    layout : {"NCDHW", "NDHWC"}
        Axis order of ``x`` and of the result (and ``out``) in memory: channels first, as in
        PyTorch, or channels last. NumPy and CuPy arrays only: a torch tensor carries its own
        memory format, and a ``torch.channels_last_3d`` input gives a ``channels_last_3d``
        result.

    Returns
    -------
    array
        ``(N, C_out, D_out, H_out, W_out)`` (``(N, D_out, H_out, W_out, C_out)`` for NDHWC;
        unbatched if ``x`` was), dtype of ``x``, where
        ``D_out = (D - 1)*stride - 2*padding + dilation*(kD - 1) + output_padding + 1``.

    Raises
    ------
    TypeError
        Unsupported array type or dtype, mixed array libraries, mismatched dtypes; ``precision``
        or ``layout`` not a str.
    ValueError
        Shapes or arguments that break PyTorch's rules, an unknown ``precision`` or ``layout``,
        ``layout`` given with a torch tensor, a NumPy ``out`` that overlaps an input; the
        message names the argument.

    Notes
    -----
    ``precision`` applies to float32 on the GPU only:

    - ``"highest"``: IEEE float32 arithmetic (no TF32; denormals kept). The library never lowers
      float32 precision unless asked.
    - ``"high"``: 3xTF32 on tensor cores. Each operand is split into two TF32 parts and three
      TF32 products are summed in float32: about as accurate as float32 arithmetic.
    - ``"medium"``: plain TF32 on tensor cores (relative error near 1e-3), the fastest.

    float64 is always computed in float64. float16 and bfloat16 use tensor cores with float32
    accumulation and round once. The CPU backend computes every precision in IEEE float32 (or
    float64), at least as accurately as asked. Every output element is written exactly once,
    with no atomics, so GPU results are bitwise reproducible run to run.

    Examples
    --------
    >>> import numpy as np, cupyconvt
    >>> x = np.random.rand(1, 4, 8, 8, 8).astype(np.float32)
    >>> w = np.random.rand(4, 2, 3, 3, 3).astype(np.float32)
    >>> cupyconvt.conv_transpose3d(x, w, stride=2, padding=1, output_padding=1).shape
    (1, 2, 16, 16, 16)

    Channels last, and a float32 precision for this call only (the CPU ignores it):

    >>> x_last = np.ascontiguousarray(x.transpose(0, 2, 3, 4, 1))  # (N, D, H, W, C_in)
    >>> y = cupyconvt.conv_transpose3d(x_last, w, stride=2, layout="NDHWC", precision="high")
    >>> y.shape
    (1, 17, 17, 17, 2)
    """
    # Cheap checks first: the common call (NCDHW, default precision) pays a few comparisons.
    if type(layout) is not str or layout != "NCDHW":
        layout = check_layout(layout)
    precision = resolve_precision(precision)
    if array_kind(x) == "torch":
        if out is not None:
            raise TypeError("out= is not supported for torch tensors")
        if layout != "NCDHW":
            raise ValueError(
                f"layout={layout!r} is not supported for torch tensors: a torch tensor carries "
                "its memory format; for channels last pass "
                "x.to(memory_format=torch.channels_last_3d)"
            )
        from . import _interop

        return _interop.conv_transpose3d_torch(
            x, w, bias, stride, padding, output_padding, groups, dilation, precision
        )
    kind = _check_arrays(x, w, bias, out)
    x_shape = x.shape
    if layout != "NCDHW":
        check_x_rank(x_shape, layout)
        x_shape = to_logical_shape(x_shape, layout)
    p = params_for(
        x_shape,
        w.shape,
        None if bias is None else bias.shape,
        stride,
        padding,
        output_padding,
        groups,
        dilation,
    )
    if out is not None:
        expected = p.out_shape if layout == "NCDHW" else from_logical_shape(p.out_shape, layout)
        if tuple(out.shape) != expected:
            where = "" if layout == "NCDHW" else f" for layout={layout!r}"
            raise ValueError(f"out has shape {tuple(out.shape)}, expected {expected}{where}")
        if not out.flags.c_contiguous:
            raise ValueError("out must be C-contiguous")
    if kind == "numpy":
        if out is not None:
            _check_out_apart(
                out, [("x", x), ("w", w), ("bias", bias)][: 3 if bias is not None else 2]
            )
        if layout == "NCDHW":
            return _cpu.conv_transpose3d(x, w, bias, p, out)
        # The CPU backend reads and writes NCDHW views of the channels-last arrays.
        if out is None:
            out = np.empty(from_logical_shape(p.out_shape, layout), dtype=x.dtype)
        _cpu.conv_transpose3d(np.moveaxis(x, -1, -4), w, bias, p, np.moveaxis(out, -1, -4))
        return out
    global _gpu
    if _gpu is None:  # imported once: a function-level import costs ~1 us on every call
        from . import _gpu as gpu_backend

        _gpu = gpu_backend
    return _gpu.conv_transpose3d(x, w, bias, p, out, precision=precision, layout=layout)
