"""CPU backend: conv_transpose3d on NumPy arrays, vectorized per kernel tap.

For each tap (kd, kh, kw) the contribution of every input voxel is one matrix product over the
input channels of a group, ``W_tap[g] (C_out_g x C_in_g) @ X[g] (C_in_g x N*D*H*W)``, scattered
with a strided add into the uncropped output ``(D-1)*s + dil*(k-1) + 1`` long per axis; the result
is the window ``[padding, padding + out_size)`` of it. The Python loop runs over taps only.
float16 and bfloat16 are computed in float32 and rounded once at the end. The float32 precision
policy (``_precision.py``) is for the GPU: here float32 is IEEE float32 at every precision, at
least as accurate as asked.
"""

from __future__ import annotations

import numpy as np

from ._dtypes import compute_dtype, dtype_name
from ._params import ConvParams


def conv_transpose3d(
    x: np.ndarray,
    w: np.ndarray,
    bias: np.ndarray | None,
    p: ConvParams,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Compute ``conv_transpose3d`` for already validated NumPy inputs (see ``ConvParams``).

    ``x`` and ``out`` are in NCDHW order, with any strides (channels-last arrays come as views).
    """
    dtype = x.dtype
    acc = compute_dtype(dtype_name(dtype))
    G, cig, cog = p.groups, p.C_in_g, p.C_out_g
    N = p.N
    D, H, W = p.in_size
    kD, kH, kW = p.kernel
    sd, sh, sw = p.stride
    pd, ph, pw = p.padding
    dd, dh, dw = p.dilation
    oD, oH, oW = p.out_size

    # Uncropped extent, long enough to hold the padded window even when output_padding > padding.
    fD = max((D - 1) * sd + dd * (kD - 1) + 1, pd + oD)
    fH = max((H - 1) * sh + dh * (kH - 1) + 1, ph + oH)
    fW = max((W - 1) * sw + dw * (kW - 1) + 1, pw + oW)

    x5 = np.asarray(x).reshape(p.x_shape5)
    # (G, C_in_g, N*D*H*W): channels of a group as rows, every voxel of every batch as columns.
    xg = (
        x5.reshape(N, G, cig, D * H * W)
        .transpose(1, 2, 0, 3)
        .astype(acc, copy=True)
        .reshape(G, cig, N * D * H * W)
    )
    # (kD*kH*kW, G, C_out_g, C_in_g): per tap, the transposed weight block of each group.
    wt = (
        np.asarray(w)
        .reshape(G, cig, cog, kD * kH * kW)
        .transpose(3, 0, 2, 1)
        .astype(acc, copy=True)
    )
    full = np.zeros((G, cog, N, fD, fH, fW), dtype=acc)
    tap = 0
    for kd in range(kD):
        d0 = kd * dd
        for kh in range(kH):
            h0 = kh * dh
            for kw in range(kW):
                w0 = kw * dw
                contrib = np.matmul(wt[tap], xg).reshape(G, cog, N, D, H, W)
                full[
                    :,
                    :,
                    :,
                    d0 : d0 + (D - 1) * sd + 1 : sd,
                    h0 : h0 + (H - 1) * sh + 1 : sh,
                    w0 : w0 + (W - 1) * sw + 1 : sw,
                ] += contrib
                tap += 1
    window = full[:, :, :, pd : pd + oD, ph : ph + oH, pw : pw + oW]
    result = window.transpose(2, 0, 1, 3, 4, 5).reshape(N, p.C_out, oD, oH, oW)
    if bias is not None:
        result = result + np.asarray(bias).astype(acc).reshape(1, p.C_out, 1, 1, 1)
    if out is None:
        out = np.empty(p.out_shape, dtype=dtype)
    # Reshape the result, not out: out may be a strided view (a channels-last result seen in
    # NCDHW order), which a reshape could silently copy. The assignment rounds once to out's dtype.
    out[...] = result.reshape(p.out_shape)
    return out
