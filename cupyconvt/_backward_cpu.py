"""CPU backend of the backward pass: the gradients of conv_transpose3d on NumPy arrays.

The forward adds ``x[n, ci, i] * w[ci, j, k]`` to ``out[n, g*C_out_g + j, i*s - p + k*dil]``
(per axis, ``ci`` in group ``g``), so both gradients read ``grad_out`` at exactly those places.
``grad_out`` is put at offset ``padding`` inside a zero frame as long as the forward's uncropped
output; for a tap ``k`` the strided window ``frame[..., k*dil + i*s]`` then holds
``grad_out[n, co, i*s - p + k*dil]`` for every input voxel ``i``, and zero where that position
lies outside the output. With ``X[g]`` the input channels of a group as rows
(``C_in_g x N*D*H*W``) and ``Y[g]`` the window (``C_out_g x N*D*H*W``):

    grad_input[g]              = sum over taps of W_tap[g] (C_in_g x C_out_g) @ Y_tap[g]
    grad_weight[g, :, :, tap]  = X[g] @ Y_tap[g].T                        (C_in_g x C_out_g)

grad_input is the strided convolution ``conv3d(grad_out, w, stride, padding, dilation, groups)``.
The windows of all taps are one strided view of the frame; block by block of input rows, it is
copied once with every tap's window stacked (im2col) and serves both gradients (``_blocks``),
grad_weight summed over the blocks in order. The order of every sum is fixed, so results are
the same run to run, and one call for both gradients is bitwise equal to two calls for one
each. float16 and bfloat16 are computed in float32 and rounded once at the end, like the
forward (``_cpu.py``); ``precision`` is accepted for the GPU backend's signature and ignored
(IEEE float32, or float64).
"""

from __future__ import annotations

import numpy as np

from . import _cpu
from ._dtypes import compute_dtype, dtype_name
from ._params import ConvParams


def _frame(gy: np.ndarray, p: ConvParams, acc: np.dtype) -> np.ndarray:
    """``grad_out`` as ``(G, C_out_g, N, fD, fH, fW)`` in ``acc``, at offset ``padding`` in zeros.

    The frame is the forward's uncropped output: long enough for every tap's window, and for the
    output window itself when ``output_padding > padding``.
    """
    G, cog, N = p.groups, p.C_out_g, p.N
    oD, oH, oW = p.out_size
    pd, ph, pw = p.padding
    extent = [
        max((p.in_size[a] - 1) * p.stride[a] + p.dilation[a] * (p.kernel[a] - 1) + 1,
            p.padding[a] + p.out_size[a])
        for a in range(3)
    ]  # fmt: skip
    frame = np.zeros((G, cog, N, *extent), dtype=acc)
    gy6 = np.asarray(gy).reshape(N, G, cog, oD, oH, oW).transpose(1, 2, 0, 3, 4, 5)
    frame[:, :, :, pd : pd + oD, ph : ph + oH, pw : pw + oW] = gy6  # casts to acc
    return frame


def _x_rows(x: np.ndarray, p: ConvParams, acc: np.dtype) -> np.ndarray:
    """``x`` as ``(G, C_in_g, N*D*H*W)`` in ``acc``: a group's channels as rows."""
    G, cig, N = p.groups, p.C_in_g, p.N
    D, H, W = p.in_size
    x4 = np.asarray(x).reshape(N, G, cig, D * H * W).transpose(1, 2, 0, 3)
    return x4.astype(acc, copy=True).reshape(G, cig, N * D * H * W)


def _blocks(
    frame: np.ndarray,
    p: ConvParams,
    acc: np.dtype,
    w: np.ndarray | None = None,
    x: np.ndarray | None = None,
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """grad_input as ``(G, C_in_g, N*D*H*W)`` (given ``w``) and grad_weight as
    ``(G, C_in_g, taps*C_out_g)`` (given ``x``), from one pass over blocks of input voxels.

    The windows of all taps are one strided view of ``frame``, ``(G, taps, C_out_g, N, D, H, W)``.
    Per block of ``(n, d)`` rows (about ``_cpu.BLOCK_ELEMENTS`` elements of it) it is copied once
    (im2col, ``cols``: ``taps*C_out_g x voxels`` a group) and serves both gradients:
    ``grad_input = W (C_in_g x taps*C_out_g) @ cols`` and ``grad_weight += X @ cols.T``, blocks
    added in order. (Tap by tap over the whole volume, grad_input took ``taps`` passes over its
    result and each window was copied once for each gradient.)
    """
    G, cig, cog, N = p.groups, p.C_in_g, p.C_out_g, p.N
    D, H, W = p.in_size
    taps = p.kernel[0] * p.kernel[1] * p.kernel[2]
    st = frame.strides  # (G, C_out_g, N, fD, fH, fW)
    tap_strides = tuple(p.dilation[a] * st[3 + a] for a in range(3))
    step_strides = tuple(p.stride[a] * st[3 + a] for a in range(3))
    gx = wt = gw = xr = None
    if w is not None:
        # (G, C_in_g, taps*C_out_g), columns tap-major as the windows
        wt = np.asarray(w).reshape(G, cig, cog, taps).transpose(0, 1, 3, 2).astype(acc)
        wt = wt.reshape(G, cig, taps * cog)
        gx = np.empty((G, cig, N, D, H, W), dtype=acc)
    if x is not None:
        xr = _x_rows(x, p, acc).reshape(G, cig, N, D, H, W)
        gw = np.zeros((G, cig, taps * cog), dtype=acc)
    row = G * max(taps * cog, cig) * H * W  # elements of the buffers per (n, d) row
    rows = max(1, _cpu.BLOCK_ELEMENTS // row)
    scratch = _cpu._Scratch(acc)
    for n0 in range(N):
        for d0 in range(0, D, rows):
            d1 = min(d0 + rows, D)
            start = frame[:, :, n0, d0 * p.stride[0] :]
            view = np.lib.stride_tricks.as_strided(
                start,
                (G, *p.kernel, cog, d1 - d0, H, W),
                (st[0], *tap_strides, st[1], *step_strides),
            )
            cols = scratch.take("cols", view.shape)
            np.copyto(cols, view)
            cols = cols.reshape(G, taps * cog, -1)
            if gx is not None:
                res = scratch.take("res", (G, cig, cols.shape[2]))
                np.matmul(wt, cols, out=res)
                gx[:, :, n0, d0:d1] = res.reshape(G, cig, d1 - d0, H, W)
            if gw is not None:
                xb = xr[:, :, n0, d0:d1].reshape(G, cig, -1)
                gw += np.matmul(xb, cols.transpose(0, 2, 1))
    gx = None if gx is None else gx.reshape(G, cig, N * D * H * W)
    return gx, gw


def _input_from_rows(gx: np.ndarray, p: ConvParams, dtype: np.dtype) -> np.ndarray:
    """``(G, C_in_g, N*D*H*W)`` back to a C-contiguous ``(N, C_in, D, H, W)`` in ``dtype``."""
    G, cig, N = p.groups, p.C_in_g, p.N
    g6 = gx.reshape(G, cig, N, *p.in_size).transpose(2, 0, 1, 3, 4, 5)
    out = np.empty(p.x_shape5, dtype=dtype)
    out.reshape(N, G, cig, *p.in_size)[...] = g6  # the one rounding to dtype
    return out


def _weight_from_blocks(gw: np.ndarray, p: ConvParams, dtype: np.dtype) -> np.ndarray:
    """``(G, C_in_g, taps*C_out_g)`` back to a C-contiguous ``(C_in, C_out_g, kD, kH, kW)``."""
    G, cig, cog = p.groups, p.C_in_g, p.C_out_g
    out = np.empty((p.C_in, cog, *p.kernel), dtype=dtype)
    out.reshape(G, cig, cog, -1)[...] = gw.reshape(G, cig, -1, cog).transpose(0, 1, 3, 2)
    return out


def input_and_weight(
    gy: np.ndarray, x: np.ndarray, w: np.ndarray, p: ConvParams, precision: str = "highest"
) -> tuple[np.ndarray, np.ndarray]:
    """``(grad_input(gy, w, p), grad_weight(x, gy, p))`` with one frame and one pass over taps.

    Bitwise equal to the two separate calls (the same products in the same order).
    """
    dtype = gy.dtype
    acc = compute_dtype(dtype_name(dtype))
    gx, gw = _blocks(_frame(gy, p, acc), p, acc, w=w, x=x)
    return _input_from_rows(gx, p, dtype), _weight_from_blocks(gw, p, dtype)


def grad_input(
    gy: np.ndarray, w: np.ndarray, p: ConvParams, precision: str = "highest"
) -> np.ndarray:
    """Gradient of conv_transpose3d with respect to ``x``.

    Parameters
    ----------
    gy : numpy.ndarray, shape ``p.out_shape5`` (or ``p.out_shape``)
        Gradient of the loss with respect to the forward's output, any strides.
    w : numpy.ndarray, shape ``(C_in, C_out_g, kD, kH, kW)``
        The forward's weight, same dtype as ``gy``.
    p : ConvParams
        The validated forward problem.
    precision : str
        Ignored on the CPU (see the module docstring).

    Returns
    -------
    numpy.ndarray
        C-contiguous ``p.x_shape5``, dtype of ``gy``.
    """
    dtype = gy.dtype
    acc = compute_dtype(dtype_name(dtype))
    gx, _ = _blocks(_frame(gy, p, acc), p, acc, w=w)
    return _input_from_rows(gx, p, dtype)


def grad_weight(
    x: np.ndarray, gy: np.ndarray, p: ConvParams, precision: str = "highest"
) -> np.ndarray:
    """Gradient of conv_transpose3d with respect to ``w``.

    Parameters
    ----------
    x : numpy.ndarray, shape ``p.x_shape5`` (or the unbatched shape)
        The forward's input, any strides.
    gy : numpy.ndarray, shape ``p.out_shape5`` (or ``p.out_shape``)
        Gradient of the loss with respect to the forward's output, same dtype as ``x``.
    p : ConvParams
        The validated forward problem.
    precision : str
        Ignored on the CPU (see the module docstring).

    Returns
    -------
    numpy.ndarray
        C-contiguous ``(C_in, C_out_g, kD, kH, kW)``, dtype of ``gy``; zeros for a batch of 0.
    """
    dtype = gy.dtype
    acc = compute_dtype(dtype_name(dtype))
    _, gw = _blocks(_frame(gy, p, acc), p, acc, x=x)
    return _weight_from_blocks(gw, p, dtype)


def grad_bias(gy: np.ndarray, p: ConvParams) -> np.ndarray:
    """Gradient of conv_transpose3d with respect to ``bias``: ``gy`` summed over N, D, H, W.

    Parameters
    ----------
    gy : numpy.ndarray, shape ``p.out_shape5`` (or ``p.out_shape``)
        Gradient of the loss with respect to the forward's output.
    p : ConvParams
        The validated forward problem.

    Returns
    -------
    numpy.ndarray
        ``(C_out,)``, dtype of ``gy``.
    """
    dtype = gy.dtype
    acc = compute_dtype(dtype_name(dtype))
    voxels = p.out_size[0] * p.out_size[1] * p.out_size[2]
    g3 = np.asarray(gy).reshape(p.N, p.C_out, voxels).astype(acc, copy=False)
    # Pairwise summation over each (n, channel) run of voxels, then over the batch in order.
    per_sample = np.sum(g3, axis=2, dtype=acc)
    return np.sum(per_sample, axis=0, dtype=acc).astype(dtype)
