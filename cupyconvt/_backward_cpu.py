"""CPU backend of the backward pass: the gradients of conv_transpose3d on NumPy arrays.

The forward adds ``x[n, ci, i] * w[ci, j, k]`` to ``out[n, g*C_out_g + j, i*s - p + k*dil]``
(per axis, ``ci`` in group ``g``), so both gradients read ``grad_out`` at exactly those places.
``grad_out`` is put at offset ``padding`` inside a zero frame as long as the forward's uncropped
output; for a tap ``k`` the strided window ``frame[..., k*dil + i*s]`` then holds
``grad_out[n, co, i*s - p + k*dil]`` for every input voxel ``i``, and zero where that position
lies outside the output. With ``X[g]`` the input channels of a group as rows
(``C_in_g x N*D*H*W``) and ``Y[g]`` the window (``C_out_g x N*D*H*W``), per tap:

    grad_input[g]             += W_tap[g] (C_in_g x C_out_g) @ Y[g]
    grad_weight[g, :, :, tap]  = X[g] @ Y[g].T                        (C_in_g x C_out_g)

grad_input is the strided convolution ``conv3d(grad_out, w, stride, padding, dilation, groups)``
written as a sum over taps. The Python loop runs over taps only; taps are visited in one fixed
order, so results are the same run to run. float16 and bfloat16 are computed in float32 and
rounded once at the end, like the forward (``_cpu.py``); ``precision`` is accepted for the GPU
backend's signature and ignored (IEEE float32, or float64).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

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


def _windows(frame: np.ndarray, p: ConvParams) -> Iterator[tuple[int, np.ndarray]]:
    """Per tap, in ``w``'s (kD, kH, kW) order: the tap index and ``Y`` (G, C_out_g, N*D*H*W)."""
    G, cog, N = p.groups, p.C_out_g, p.N
    D, H, W = p.in_size
    sd, sh, sw = p.stride
    dd, dh, dw = p.dilation
    for tap, (kd, kh, kw) in enumerate(np.ndindex(*p.kernel)):
        d0, h0, w0 = kd * dd, kh * dh, kw * dw
        window = frame[
            :,
            :,
            :,
            d0 : d0 + (D - 1) * sd + 1 : sd,
            h0 : h0 + (H - 1) * sh + 1 : sh,
            w0 : w0 + (W - 1) * sw + 1 : sw,
        ]
        yield tap, window.reshape(G, cog, N * D * H * W)  # a copy: the window is strided


def _x_rows(x: np.ndarray, p: ConvParams, acc: np.dtype) -> np.ndarray:
    """``x`` as ``(G, C_in_g, N*D*H*W)`` in ``acc``: a group's channels as rows."""
    G, cig, N = p.groups, p.C_in_g, p.N
    D, H, W = p.in_size
    x4 = np.asarray(x).reshape(N, G, cig, D * H * W).transpose(1, 2, 0, 3)
    return x4.astype(acc, copy=True).reshape(G, cig, N * D * H * W)


def _w_taps(w: np.ndarray, p: ConvParams, acc: np.dtype) -> np.ndarray:
    """``w`` as ``(taps, G, C_in_g, C_out_g)`` in ``acc``: per tap, each group's block."""
    G, cig, cog = p.groups, p.C_in_g, p.C_out_g
    taps = p.kernel[0] * p.kernel[1] * p.kernel[2]
    return np.asarray(w).reshape(G, cig, cog, taps).transpose(3, 0, 1, 2).astype(acc, copy=True)


def _input_from_rows(gx: np.ndarray, p: ConvParams, dtype: np.dtype) -> np.ndarray:
    """``(G, C_in_g, N*D*H*W)`` back to a C-contiguous ``(N, C_in, D, H, W)`` in ``dtype``."""
    G, cig, N = p.groups, p.C_in_g, p.N
    g6 = gx.reshape(G, cig, N, *p.in_size).transpose(2, 0, 1, 3, 4, 5)
    out = np.empty(p.x_shape5, dtype=dtype)
    out.reshape(N, G, cig, *p.in_size)[...] = g6  # the one rounding to dtype
    return out


def _weight_from_taps(gw: np.ndarray, p: ConvParams, dtype: np.dtype) -> np.ndarray:
    """``(taps, G, C_in_g, C_out_g)`` back to a C-contiguous ``(C_in, C_out_g, kD, kH, kW)``."""
    out = np.empty((p.C_in, p.C_out_g, *p.kernel), dtype=dtype)
    out.reshape(p.groups, p.C_in_g, p.C_out_g, -1)[...] = gw.transpose(1, 2, 3, 0)
    return out


def input_and_weight(
    gy: np.ndarray, x: np.ndarray, w: np.ndarray, p: ConvParams, precision: str = "highest"
) -> tuple[np.ndarray, np.ndarray]:
    """``(grad_input(gy, w, p), grad_weight(x, gy, p))`` with one frame and one pass over taps.

    Bitwise equal to the two separate calls (the same products in the same order).
    """
    dtype = gy.dtype
    acc = compute_dtype(dtype_name(dtype))
    frame = _frame(gy, p, acc)
    wt = _w_taps(w, p, acc)
    xr = _x_rows(x, p, acc)
    gx = np.zeros(xr.shape, dtype=acc)
    gw = np.empty(wt.shape, dtype=acc)
    for tap, y in _windows(frame, p):
        gx += np.matmul(wt[tap], y)
        gw[tap] = np.matmul(xr, y.transpose(0, 2, 1))
    return _input_from_rows(gx, p, dtype), _weight_from_taps(gw, p, dtype)


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
    frame = _frame(gy, p, acc)
    wt = _w_taps(w, p, acc)
    gx = np.zeros((p.groups, p.C_in_g, p.N * p.in_size[0] * p.in_size[1] * p.in_size[2]), acc)
    for tap, y in _windows(frame, p):
        gx += np.matmul(wt[tap], y)
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
    frame = _frame(gy, p, acc)
    xr = _x_rows(x, p, acc)
    taps = p.kernel[0] * p.kernel[1] * p.kernel[2]
    gw = np.empty((taps, p.groups, p.C_in_g, p.C_out_g), dtype=acc)
    for tap, y in _windows(frame, p):
        gw[tap] = np.matmul(xr, y.transpose(0, 2, 1))
    return _weight_from_taps(gw, p, dtype)


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
