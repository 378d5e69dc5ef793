"""cupyconvt for PyTorch training: a drop-in ``ConvTranspose3d`` layer with autograd.

    import cupyconvt.torch

    up = cupyconvt.torch.ConvTranspose3d(64, 32, 3, stride=2, padding=1, output_padding=1)
    y = cupyconvt.torch.conv_transpose3d(x, up.weight, up.bias, stride=2, padding=1)

The convolution is two registered torch custom operators, so ``torch.compile`` (also with
``fullgraph=True``), ``torch.library.opcheck`` and CUDA-graph capture see them as ordinary ops:

- ``cupyconvt::conv_transpose3d(x, weight, bias, stride, padding, output_padding, groups,
  dilation) -> y``, the forward, on the backends through ``_interop.conv_transpose3d_torch``;
- ``cupyconvt::conv_transpose3d_backward(grad_out, x, weight, stride, padding, output_padding,
  groups, dilation, output_mask) -> (grad_input, grad_weight, grad_bias)``, the backward. A
  gradient left out by ``output_mask`` is not computed and comes back as an empty tensor.

Both have a fake (meta) implementation for tracing, and autograd is registered on the forward
(``register_autograd``): its backward calls the backward op with the mask of the inputs that need
a gradient. The backward op has autograd of its own, so double backward works too. CPU tensors
run on the NumPy backend, CUDA tensors on the CuPy backend on torch's current stream, with every
allocation made by torch's caching allocator. float32 on the GPU follows cupyconvt's process
default precision (:func:`cupyconvt.set_float32_matmul_precision`), read at each call.

This module imports torch; ``import cupyconvt`` alone does not.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from . import _interop
from ._backward import NEEDS, conv_transpose3d_backward
from ._params import ConvParams, IntOrTriple, as_triple
from ._precision import resolve as resolve_precision

__all__ = ["ConvTranspose3d", "conv_transpose3d"]


def _checked(x: Tensor, weight: Tensor, bias: Tensor | None, conv_args: tuple) -> None:
    """Raise the eager errors at trace time too, where the shapes are plain ints."""
    shapes = (*x.shape, *weight.shape, *(() if bias is None else bias.shape))
    if all(isinstance(s, int) for s in shapes):
        ConvParams.from_args(x.shape, weight.shape, None if bias is None else bias.shape,
                             *conv_args)  # fmt: skip


def _output_shape(
    x: Tensor,
    weight: Tensor,
    stride: Sequence[int],
    padding: Sequence[int],
    output_padding: Sequence[int],
    groups: int,
    dilation: Sequence[int],
) -> list:
    """The forward's output shape in plain arithmetic, so that symbolic sizes stay symbolic."""
    size = [
        (x.shape[-3 + a] - 1) * stride[a] - 2 * padding[a]
        + dilation[a] * (weight.shape[2 + a] - 1) + output_padding[a] + 1
        for a in range(3)
    ]  # fmt: skip
    batch = [x.shape[0]] if x.dim() == 5 else []
    return [*batch, weight.shape[1] * groups, *size]


@torch.library.custom_op("cupyconvt::conv_transpose3d", mutates_args=())
def _conv_transpose3d_op(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: list[int],
    padding: list[int],
    output_padding: list[int],
    groups: int,
    dilation: list[int],
) -> Tensor:
    # CUDA tensors run on torch's stream and allocate through torch there (graph-safe).
    args = (stride, padding, output_padding, groups, dilation)
    return _interop.conv_transpose3d_torch(x, weight, bias, *args, resolve_precision(None))


@_conv_transpose3d_op.register_fake
def _(x, weight, bias, stride, padding, output_padding, groups, dilation):
    _checked(x, weight, bias, (stride, padding, output_padding, groups, dilation))
    shape = _output_shape(x, weight, stride, padding, output_padding, groups, dilation)
    # As the real op: a channels-last input gives a channels-last result.
    channels_last = _interop._is_channels_last(x)
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=fmt)


@torch.library.custom_op("cupyconvt::conv_transpose3d_backward", mutates_args=())
def _conv_transpose3d_backward_op(
    grad_out: Tensor,
    x: Tensor,
    weight: Tensor,
    stride: list[int],
    padding: list[int],
    output_padding: list[int],
    groups: int,
    dilation: list[int],
    output_mask: list[bool],
) -> tuple[Tensor, Tensor, Tensor]:
    needs = tuple(name for name, m in zip(NEEDS, output_mask, strict=True) if m)
    grads = conv_transpose3d_backward(
        grad_out, x, weight, stride, padding, output_padding, groups, dilation, needs=needs
    )
    # A custom op returns tensors: a gradient not asked for is an empty one.
    return tuple(x.new_empty(0) if g is None else g for g in grads)  # type: ignore[return-value]


@_conv_transpose3d_backward_op.register_fake
def _(grad_out, x, weight, stride, padding, output_padding, groups, dilation, output_mask):
    _checked(x, weight, None, (stride, padding, output_padding, groups, dilation))
    shapes = (x.shape, weight.shape, (weight.shape[1] * groups,))
    return tuple(
        x.new_empty(shape if m else (0,)) for shape, m in zip(shapes, output_mask, strict=True)
    )


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, stride, padding, output_padding, groups, dilation = inputs
    ctx.save_for_backward(x, weight)
    ctx.conv_args = (stride, padding, output_padding, groups, dilation)
    ctx.has_bias = bias is not None


def _backward(ctx, grad_out):
    x, weight = ctx.saved_tensors
    needs = ctx.needs_input_grad
    mask = [needs[0], needs[1], ctx.has_bias and needs[2]]
    grads = torch.ops.cupyconvt.conv_transpose3d_backward(grad_out, x, weight, *ctx.conv_args, mask)
    return (*(g if m else None for g, m in zip(grads, mask, strict=True)), None, None, None,
            None, None)  # fmt: skip


_conv_transpose3d_op.register_autograd(_backward, setup_context=_setup_context)


def _setup_context_backward(ctx, inputs, output) -> None:
    grad_out, x, weight, stride, padding, output_padding, groups, dilation, mask = inputs
    ctx.save_for_backward(grad_out, x, weight)
    ctx.conv_args = (stride, padding, output_padding, groups, dilation)
    ctx.output_mask = mask


def _double_backward(ctx, ggi, ggw, ggb):
    """Gradients of (grad_input, grad_weight, grad_bias) with respect to (grad_out, x, weight).

    The backward is bilinear: ``grad_input = A_w^T grad_out`` (``A_w`` the forward's linear map
    for weight ``w``), ``<grad_weight, v> = <grad_out, A_v x>`` and ``grad_bias`` sums
    ``grad_out``. So the gradient with respect to ``grad_out`` is the forward applied to the
    incoming gradients, and those with respect to ``x`` and ``weight`` are the backward's own.
    """
    grad_out, x, weight = ctx.saved_tensors
    m_gi, m_gw, m_gb = ctx.output_mask
    need_gy, need_x, need_w = ctx.needs_input_grad[:3]
    d_gy = d_x = d_w = None
    if need_gy:
        d_gy = torch.zeros_like(grad_out)
        if m_gi:
            d_gy = d_gy + conv_transpose3d(ggi, weight, None, *ctx.conv_args)
        if m_gw:
            d_gy = d_gy + conv_transpose3d(x, ggw, None, *ctx.conv_args)
        if m_gb:  # broadcast over the voxels (and the batch)
            d_gy = d_gy + ggb.reshape(-1, 1, 1, 1)
    if need_x and m_gw:  # <ggw, grad_weight(x, gy)> = <x, grad_input(gy, ggw)>
        d_x = torch.ops.cupyconvt.conv_transpose3d_backward(
            grad_out, x, ggw, *ctx.conv_args, [True, False, False]
        )[0]
    if need_w and m_gi:  # <ggi, grad_input(gy, w)> = <w, grad_weight(ggi, gy)>
        d_w = torch.ops.cupyconvt.conv_transpose3d_backward(
            grad_out, ggi, weight, *ctx.conv_args, [False, True, False]
        )[1]
    return d_gy, d_x, d_w, None, None, None, None, None, None


_conv_transpose3d_backward_op.register_autograd(
    _double_backward, setup_context=_setup_context_backward
)


def _list3(name: str, value: IntOrTriple) -> list[int]:
    return list(as_triple(name, value))


def conv_transpose3d(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: IntOrTriple = 1,
    padding: IntOrTriple = 0,
    output_padding: IntOrTriple = 0,
    groups: int = 1,
    dilation: IntOrTriple = 1,
) -> Tensor:
    """``torch.nn.functional.conv_transpose3d`` computed by cupyconvt, with autograd.

    Parameters
    ----------
    input : torch.Tensor, shape ``(N, C_in, D, H, W)`` or unbatched ``(C_in, D, H, W)``
        float16, bfloat16, float32 or float64, on the CPU or a CUDA device.
    weight : torch.Tensor, shape ``(C_in, C_out // groups, kD, kH, kW)``
    bias : torch.Tensor, shape ``(C_out,)``, optional
    stride, padding, output_padding, dilation : int or triple of int
    groups : int
        As in :func:`cupyconvt.conv_transpose3d` (PyTorch's rules).

    Returns
    -------
    torch.Tensor
        ``(N, C_out, D_out, H_out, W_out)`` (unbatched if ``input`` was), channels-last when
        ``input`` is ``torch.channels_last_3d``. Differentiable with respect to ``input``,
        ``weight`` and ``bias``, twice.

    Examples
    --------
    >>> import torch, cupyconvt.torch
    >>> x = torch.randn(1, 4, 8, 8, 8, requires_grad=True)
    >>> w = torch.randn(4, 2, 3, 3, 3, requires_grad=True)
    >>> y = cupyconvt.torch.conv_transpose3d(x, w, stride=2, padding=1, output_padding=1)
    >>> y.shape
    torch.Size([1, 2, 16, 16, 16])
    >>> y.square().sum().backward()
    >>> x.grad.shape, w.grad.shape
    (torch.Size([1, 4, 8, 8, 8]), torch.Size([4, 2, 3, 3, 3]))
    """
    return _conv_transpose3d_op(
        input, weight, bias,
        _list3("stride", stride), _list3("padding", padding),
        _list3("output_padding", output_padding), groups, _list3("dilation", dilation),
    )  # fmt: skip


class ConvTranspose3d(torch.nn.ConvTranspose3d):
    """``torch.nn.ConvTranspose3d`` whose convolution runs on cupyconvt (forward and backward).

    A subclass of torch's layer: the same constructor arguments, parameters (``weight``,
    ``bias``), shapes, initialisation, ``state_dict`` and ``repr``, so it loads a
    ``torch.nn.ConvTranspose3d`` state dict unchanged and vice versa. ``forward(input,
    output_size=None)`` takes ``output_size`` as torch does. Only ``padding_mode="zeros"``
    exists, as in torch.

    Examples
    --------
    >>> import torch, cupyconvt.torch
    >>> up = cupyconvt.torch.ConvTranspose3d(8, 4, 3, stride=2, padding=1)
    >>> ref = torch.nn.ConvTranspose3d(8, 4, 3, stride=2, padding=1)
    >>> up.load_state_dict(ref.state_dict())
    <All keys matched successfully>
    >>> x = torch.randn(2, 8, 5, 5, 5)
    >>> up(x, output_size=(10, 10, 10)).shape
    torch.Size([2, 4, 10, 10, 10])
    >>> bool(torch.allclose(up(x), ref(x), atol=1e-5))
    True
    """

    def forward(self, input: Tensor, output_size: list[int] | None = None) -> Tensor:
        if self.padding_mode != "zeros":
            raise ValueError("Only `zeros` padding mode is supported for ConvTranspose3d")
        output_padding = self._output_padding(
            input, output_size, self.stride, self.padding, self.kernel_size, 3, self.dilation
        )
        return conv_transpose3d(
            input, self.weight, self.bias, self.stride, self.padding, output_padding,
            self.groups, self.dilation,
        )  # fmt: skip
