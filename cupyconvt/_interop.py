"""torch.Tensor in, torch.Tensor out, zero-copy through DLPack.

CUDA tensors run on the GPU backend on torch's current stream of the tensor's device: CuPy is
pointed at that stream for the call, so DLPack's stream hand-over inserts no synchronization, and
the output is allocated by torch's caching allocator and written in place. Workspaces too come
from torch's allocator during the call (:func:`torch_malloc`), so a CUDA graph can capture it.
CPU tensors run on the CPU backend through NumPy views. torch is never imported here: a tensor
was handed to us, so ``sys.modules['torch']`` exists.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from ._params import ConvParams, IntOrTriple

_TORCH_DTYPES = ("float16", "bfloat16", "float32", "float64")


def _torch_dtype_name(t: Any) -> str:
    return str(t.dtype).removeprefix("torch.")


def _check(x: Any, w: Any, bias: Any) -> None:
    torch = sys.modules["torch"]
    for name, t in (("w", w), ("bias", bias)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(
                f"x is a torch.Tensor but {name} is {type(t).__name__}: pass torch tensors"
            )
        if t.device != x.device:
            raise ValueError(
                f"{name} is on {t.device} but x is on {x.device}: all must be on one device"
            )
    for name, t in (("x", x), ("w", w), ("bias", bias)):
        if t is None:
            continue
        d = _torch_dtype_name(t)
        if d not in _TORCH_DTYPES:
            raise TypeError(
                f"{name} has unsupported dtype {d}; supported: {', '.join(_TORCH_DTYPES)}"
            )
        if d != _torch_dtype_name(x):
            raise TypeError(
                f"{name} has dtype {d} but x has dtype {_torch_dtype_name(x)}: "
                "x, w and bias must share one dtype"
            )
    if x.device.type not in ("cuda", "cpu"):
        raise TypeError(f"tensors on {x.device.type} are not supported (cuda or cpu only)")


def _to_numpy(t: Any) -> np.ndarray:
    """A NumPy view of a CPU tensor (bfloat16 through ml_dtypes)."""
    torch = sys.modules["torch"]
    t = t.detach()
    if t.dtype == torch.bfloat16:
        import ml_dtypes

        return np.from_dlpack(t.view(torch.int16)).view(ml_dtypes.bfloat16)
    return np.from_dlpack(t)


class _StreamHandle:
    """A CUDA stream handle in the CUDA stream protocol (what Stream.from_external takes)."""

    def __init__(self, ptr: int) -> None:
        self.ptr = ptr

    def __cuda_stream__(self) -> tuple[int, int]:
        return (0, self.ptr)


def _cupy_stream(cupy: Any, ptr: int, device: int) -> Any:
    """A CuPy view of torch's stream: Stream.from_external on CuPy >= 14, else ExternalStream."""
    from_external = getattr(cupy.cuda.Stream, "from_external", None)
    if from_external is not None:
        return from_external(_StreamHandle(ptr))
    return cupy.cuda.ExternalStream(ptr, device)


def torch_malloc(size: int) -> Any:
    """A CuPy allocator drawing on torch's caching allocator, on torch's current stream.

    Used with ``cupy.cuda.using_allocator`` around every call on torch CUDA tensors. Each block
    is a torch uint8 tensor that the CuPy memory keeps alive. Under CUDA-graph capture torch
    serves these blocks from the graph's private pool, as for its own operators.
    """
    import cupy

    torch = sys.modules["torch"]
    device = cupy.cuda.runtime.getDevice()
    block = torch.empty(size, dtype=torch.uint8, device=torch.device("cuda", device))
    memory = cupy.cuda.UnownedMemory(block.data_ptr(), size, block, device)
    return cupy.cuda.MemoryPointer(memory, 0)


@contextmanager
def on_torch_stream(device: Any) -> Iterator[Any]:
    """Within: CuPy on ``device``, on torch's current stream there, allocating through torch.

    Yields the ``cupy`` module.
    """
    import cupy

    torch = sys.modules["torch"]
    index = device.index if device.index is not None else torch.cuda.current_device()
    stream = _cupy_stream(cupy, torch.cuda.current_stream(index).cuda_stream, index)
    with cupy.cuda.Device(index), stream, cupy.cuda.using_allocator(torch_malloc):
        yield cupy


def _is_channels_last(x: Any) -> bool:
    """Whether ``x`` is a batched tensor laid out channels last (and not also plain contiguous).

    Shapes where both formats coincide (one channel, or one voxel) take the plain path.
    """
    torch = sys.modules["torch"]
    return (
        x.dim() == 5
        and not x.is_contiguous()
        and x.is_contiguous(memory_format=torch.channels_last_3d)
    )


def conv_transpose3d_torch(
    x: Any,
    w: Any,
    bias: Any,
    stride: IntOrTriple,
    padding: IntOrTriple,
    output_padding: IntOrTriple,
    groups: int,
    dilation: IntOrTriple,
    precision: str = "highest",
) -> Any:
    """``conv_transpose3d`` on torch tensors; ``precision`` is already resolved.

    A ``channels_last_3d`` input gives a ``channels_last_3d`` result, as torch's own convolution
    does; on the GPU both go to the backend as NDHWC views, without a copy.
    """
    torch = sys.modules["torch"]
    _check(x, w, bias)
    p = ConvParams.from_args(
        x.shape, w.shape, None if bias is None else bias.shape,
        stride, padding, output_padding, groups, dilation,
    )  # fmt: skip
    channels_last = _is_channels_last(x)
    if channels_last:
        result = torch.empty(
            p.out_shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last_3d
        )
    else:
        result = torch.empty(p.out_shape, dtype=x.dtype, device=x.device)
    if result.numel() == 0:
        return result
    if x.device.type == "cpu":
        from . import _cpu

        # NumPy views keep the tensors' strides, so channels-last needs nothing more here.
        _cpu.conv_transpose3d(
            _to_numpy(x), _to_numpy(w), None if bias is None else _to_numpy(bias), p,
            out=_to_numpy(result),
        )  # fmt: skip
        return result

    import cupy

    from . import _gpu

    x_in, out_view, layout = x.detach(), result, "NCDHW"
    if channels_last:  # (N, C, D, H, W) with channels-last strides is a C-contiguous NDHWC view
        x_in, out_view, layout = x_in.permute(0, 2, 3, 4, 1), result.permute(0, 2, 3, 4, 1), "NDHWC"
    with on_torch_stream(x.device):
        xc = cupy.from_dlpack(x_in)
        wc = cupy.from_dlpack(w.detach())
        bc = None if bias is None else cupy.from_dlpack(bias.detach())
        _gpu.conv_transpose3d(
            xc, wc, bc, p, out=cupy.from_dlpack(out_view), precision=precision, layout=layout
        )
    return result
