"""A deliberately naive float64 conv_transpose3d, written straight from the definition.

Every input voxel of every input channel is scattered through every kernel tap:

    out[n, g*C_out_g + j, i*s - p + k*dil] += x[n, ci, i] * w[ci, j, k]   (per axis, ci in group g)

then bias is added. It shares no code with cupyconvt; only for tiny shapes.
"""

from __future__ import annotations

import itertools

import numpy as np


def _triple(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v, v)


def conv_transpose3d_oracle(
    x, w, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1
):
    x = np.asarray(x, dtype=np.float64)
    w = np.asarray(w, dtype=np.float64)
    unbatched = x.ndim == 4
    if unbatched:
        x = x[None]
    s, p, op, dil = map(_triple, (stride, padding, output_padding, dilation))
    N, C_in = x.shape[:2]
    size = x.shape[2:]
    k = w.shape[2:]
    cog = w.shape[1]
    cig = C_in // groups
    out_size = [(size[a] - 1) * s[a] - 2 * p[a] + dil[a] * (k[a] - 1) + op[a] + 1 for a in range(3)]
    out = np.zeros((N, cog * groups, *out_size))
    for n, ci in itertools.product(range(N), range(C_in)):
        g = ci // cig
        for i in itertools.product(*(range(v) for v in size)):
            xv = x[(n, ci, *i)]
            for kk in itertools.product(*(range(v) for v in k)):
                o = [i[a] * s[a] - p[a] + kk[a] * dil[a] for a in range(3)]
                if all(0 <= o[a] < out_size[a] for a in range(3)):
                    out[(n, slice(g * cog, (g + 1) * cog), *o)] += xv * w[(ci, slice(None), *kk)]
    if bias is not None:
        out += np.asarray(bias, dtype=np.float64).reshape(1, -1, 1, 1, 1)
    return out[0] if unbatched else out


def rel_err(a, ref) -> float:
    """‖a − ref‖ / ‖ref‖ in float64; NaN anywhere gives NaN (fails every comparison)."""
    a = np.asarray(a, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if not np.all(np.isfinite(a)):
        return float("nan")
    return float(np.linalg.norm(a - ref) / max(np.linalg.norm(ref), 1e-300))


#: Relative-norm tolerance of a result against the float64 reference, per dtype.
TOL = {"float64": 1e-12, "float32": 1e-5, "float16": 2e-3, "bfloat16": 1e-2}


# --- Fast float64 references, for the fuzz suite (tests/test_fuzz.py) -----------------------
#
# The same definition as the loop above, vectorized over everything but the kernel taps. For a
# tap k, the input voxels i whose target o = i*s - p + k*dil lies inside the output form one
# run per axis, found by index arithmetic; their products with the tap's weights are a matrix
# product over the group's input channels, added into the strided output window they hit. The
# three gradients come from the same runs. Checked against the loops (conv_transpose3d_oracle,
# test_backward_cpu.backward_oracle) in tests/test_fuzz.py; shares no code with cupyconvt.


def _tap_runs(n_in, s, off, n_out):
    """Along one axis, with ``off = k*dil - p``: the input indices ``i`` whose target
    ``i*s + off`` lies in ``[0, n_out)`` as a slice, and the slice of those targets, or None."""
    lo = max(0, -(off // s))  # ceil(-off / s): the first i with i*s + off >= 0
    hi = min(n_in, (n_out - 1 - off) // s + 1)  # one past the last i with i*s + off < n_out
    if hi <= lo:
        return None
    return slice(lo, hi), slice(lo * s + off, (hi - 1) * s + off + 1, s)


def _taps(size, k, s, p, dil, out_size):
    """For each tap whose targets are not all cropped: (tap, input slices, output slices)."""
    for kk in itertools.product(*(range(v) for v in k)):
        runs = [_tap_runs(size[a], s[a], kk[a] * dil[a] - p[a], out_size[a]) for a in range(3)]
        if all(r is not None for r in runs):
            yield kk, tuple(r[0] for r in runs), tuple(r[1] for r in runs)


def _geometry(x_shape, w_shape, groups, stride, padding, output_padding, dilation):
    s, p, op, dil = map(_triple, (stride, padding, output_padding, dilation))
    size, k = x_shape[2:], w_shape[2:]
    out_size = tuple((size[a] - 1) * s[a] - 2 * p[a] + dil[a] * (k[a] - 1) + op[a] + 1
                     for a in range(3))  # fmt: skip
    return s, p, dil, size, k, out_size


def conv_transpose3d_reference(
    x, w, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1
):
    """float64 conv_transpose3d, vectorized per kernel tap (same signature as the oracle)."""
    x = np.asarray(x, dtype=np.float64)
    w = np.asarray(w, dtype=np.float64)
    unbatched = x.ndim == 4
    if unbatched:
        x = x[None]
    s, p, dil, size, k, out_size = _geometry(
        x.shape, w.shape, groups, stride, padding, output_padding, dilation
    )
    N, C_in = x.shape[:2]
    cig, cog = C_in // groups, w.shape[1]
    xg = x.reshape(N, groups, cig, *size)
    # (G, C_out_g, C_in_g, *k): per tap, a (C_out_g x C_in_g) matrix for each group.
    wg = w.reshape(groups, cig, cog, *k).swapaxes(1, 2)
    out = np.zeros((N, groups, cog, *out_size))
    for kk, ins, outs in _taps(size, k, s, p, dil, out_size):
        xs = xg[(..., *ins)]
        run = xs.shape[3:]
        prod = wg[(..., *kk)] @ xs.reshape(N, groups, cig, int(np.prod(run)))
        out[(..., *outs)] += prod.reshape(N, groups, cog, *run)
    out = out.reshape(N, groups * cog, *out_size)
    if bias is not None:
        out += np.asarray(bias, dtype=np.float64).reshape(1, -1, 1, 1, 1)
    return out[0] if unbatched else out


def conv_transpose3d_backward_reference(
    gy, x, w, stride=1, padding=0, output_padding=0, groups=1, dilation=1
):
    """float64 (grad_input, grad_weight, grad_bias), vectorized per kernel tap: each forward
    term ``x[n, ci, i] * w[ci, j, k]`` added to ``y[n, g*C_out_g + j, o]`` sends ``gy[..., o]``
    back to both factors."""
    gy = np.asarray(gy, dtype=np.float64)
    x = np.asarray(x, dtype=np.float64)
    w = np.asarray(w, dtype=np.float64)
    unbatched = x.ndim == 4
    if unbatched:
        x, gy = x[None], gy[None]
    s, p, dil, size, k, out_size = _geometry(
        x.shape, w.shape, groups, stride, padding, output_padding, dilation
    )
    N, C_in = x.shape[:2]
    cig, cog = C_in // groups, w.shape[1]
    xg = x.reshape(N, groups, cig, *size)
    gyg = gy.reshape(N, groups, cog, *out_size)
    wg = w.reshape(groups, cig, cog, *k)
    gx = np.zeros_like(xg)
    gw = np.zeros_like(wg)
    for kk, ins, outs in _taps(size, k, s, p, dil, out_size):
        gys = gyg[(..., *outs)]
        run = gys.shape[3:]
        m = int(np.prod(run))
        gys = gys.reshape(N, groups, cog, m)
        # grad_input: sum over the group's output channels; grad_weight: over batch and voxels.
        gx[(..., *ins)] += (wg[(..., *kk)] @ gys).reshape(N, groups, cig, *run)
        xs = xg[(..., *ins)].reshape(N, groups, cig, m)
        gw[(..., *kk)] = (xs @ gys.swapaxes(2, 3)).sum(axis=0)
    gx = gx.reshape(x.shape)
    gb = gy.sum(axis=(0, 2, 3, 4))
    return (gx[0] if unbatched else gx), gw.reshape(w.shape), gb
