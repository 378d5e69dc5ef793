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
