"""CPU backend: conv_transpose3d on NumPy arrays, as one matrix product per output phase and block.

For stride ``s`` along an axis, output ``o`` receives tap ``k`` from input ``i`` where
``o + padding = i*s + k*dilation``: the outputs ``o0, o0 + s, o0 + 2s, ...`` of one residue
``o0 < s`` (a *phase*) are a dense stride-1 correlation of the input with the taps of that phase,
input ``q + c_k`` for the phase's ``q``-th output, ``c_k = (o0 + padding - k*dilation) / s``.
(This is the GPU's phase decomposition; no work is done on the zeros that a naive transposed
convolution inserts.)

A phase's taps along an axis are every ``s/gcd(s, dil)``-th tap, and their input offsets ``c``
step evenly; so, with the input copied once into a zero frame (in the accumulation dtype), the
input windows of all the taps of a phase are one strided view of it. Each phase is computed in
blocks of its outputs small enough to stay in cache: the view's block is copied in one call
(``im2col``) and multiplied by the phase's weights, one matrix product per group,
``W (C_out_g x taps*C_in_g) @ cols (taps*C_in_g x voxels)``. The products of the phases along W
are interleaved in a block-sized buffer, with the bias added, so that each output row is written
whole, once, and rounded once to the output dtype.

The frame's zeros meet every weight. A zero times a finite weight adds nothing, but times an
infinite or NaN weight it would add NaN where the definition adds no term: weights that are not
all finite take :func:`_scatter`, a loop over taps that adds each tap's product into an uncropped
output; so do a stride-1 layer whose im2col columns are much taller than its output channels,
and the smallest strided layers (:func:`_phases_pay`).

float16 and bfloat16 are computed in float32 and rounded once at the end. The float32 precision
policy (``_precision.py``) is for the GPU: here float32 is IEEE float32 at every precision, at
least as accurate as asked.
"""

from __future__ import annotations

import math
from itertools import product
from typing import NamedTuple

import numpy as np
from numpy.lib.stride_tricks import as_strided

from ._dtypes import compute_dtype, dtype_name
from ._params import ConvParams

#: Elements of one block's im2col buffer (or of its product, if larger): 1 Mi, 4 MiB in float32,
#: about what stays in a core's L2 cache. On a 2-core x86 VM (AMD EPYC), 256 Ki, 4 Mi and 16 Mi
#: were no faster on any layer of ``benchmarks/bench_cpu.py`` timed (kb61, kb72, kb73, the U-Net
#: layers, trilinear_x2_depthwise, big_volume_16to8), 16 Mi up to 2x slower.
BLOCK_ELEMENTS = 1 << 20


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
    if out is None:
        out = np.empty(p.out_shape, dtype=x.dtype)
    if out.size == 0:
        return out
    acc = compute_dtype(dtype_name(x.dtype))
    G, cog = p.groups, p.C_out_g
    x5 = np.asarray(x)
    x5, out5 = (x5[None], out[None]) if x5.ndim == 4 else (x5, out)  # unbatched: views, N = 1
    w = np.asarray(w)
    # (G, C_out_g, 1) in the accumulation dtype, or None
    b = None if bias is None else np.asarray(bias).astype(acc).reshape(G, cog, 1)
    if _phases_pay(p) and np.isfinite(w).all():
        _phases(x5, w, b, p, out5, acc)
    else:
        _scatter(x5, w, b, p, out5, acc)
    return out


def _phases_pay(p: ConvParams) -> bool:
    """Whether the phase products beat the tap-by-tap scatter (2-core x86 VM, float32).

    - Not on the smallest strided layers, where their Python work per phase and block (some 40
      us) outweighs the arithmetic: 4 -> 4 channels, k3 s2, 8^3 took 323 us against 213
      (170 thousand multiply-adds), 12^3 317 against 349 (630 thousand).
    - With stride 1 (one phase, no inserted zeros to skip), not where an output voxel's im2col
      column is over 100 times its channels: kb58 at batch 1 (105 taps x 32 input channels for
      16 output channels) took 119 ms against 84, where kb70 (27 x 48 for 24) took 1145 against
      1573 and kb68 (75 x 32 for 64) 1686 against 2492.
    """
    if p.stride == (1, 1, 1):
        taps = p.kernel[0] * p.kernel[1] * p.kernel[2]
        return taps * p.C_in_g <= 100 * p.C_out_g
    return p.useful_macs >= 1 << 19


def _split_channels(a: np.ndarray, groups: int) -> np.ndarray:
    """The 6D view ``(N, G, C/G, D, H, W)`` of a 5D array with any strides (never a copy)."""
    n, c = a.shape[:2]
    sn, sc = a.strides[:2]
    return as_strided(
        a, (n, groups, c // groups, *a.shape[2:]), (sn, (c // groups) * sc, sc, *a.strides[2:])
    )


class _AxisPhase(NamedTuple):
    """One phase of one axis: outputs ``o0 + q*s`` for ``q < count`` read inputs ``q + c`` for the
    taps ``ks`` (in order of rising ``c``), ``c = c0 + j*step`` for the ``j``-th."""

    o0: int
    count: int
    ks: tuple[int, ...]
    c0: int
    step: int


def _axis_phases(size_in: int, size_out: int, k: int, s: int, pad: int, dil: int) -> list:
    """The phases of one axis (:class:`_AxisPhase`), without the taps that reach none of a phase's
    outputs from a real input. A phase's taps are every ``s/gcd(s, dil)``-th tap, so their
    offsets ``c`` step by ``dil/gcd(s, dil)``: the input windows of all of them are one strided
    view of the input."""
    phases = []
    for o0 in range(min(s, size_out)):
        count = (size_out - o0 + s - 1) // s
        taps = []  # (c, k)
        for t in range(k):
            num = o0 + pad - t * dil
            if num % s == 0 and num // s < size_in and count - 1 + num // s >= 0:
                taps.append((num // s, t))
        taps.sort()
        step = taps[1][0] - taps[0][0] if len(taps) > 1 else 0
        c0 = taps[0][0] if taps else 0
        phases.append(_AxisPhase(o0, count, tuple(t for _, t in taps), c0, step))
    return phases


def _block_sizes(n: int, qd: int, qh: int, qw: int, per_voxel: int) -> tuple[int, int, int]:
    """Block extents along N, Qd and Qh (Qw is never cut) holding at most ``BLOCK_ELEMENTS``
    elements at ``per_voxel`` elements a voxel (at least one row of Qw)."""
    row = qw * per_voxel
    bh = max(1, min(qh, BLOCK_ELEMENTS // row))
    bd = max(1, min(qd, BLOCK_ELEMENTS // (row * qh))) if bh == qh else 1
    bn = max(1, min(n, BLOCK_ELEMENTS // (row * qh * qd))) if bd == qd else 1
    return bn, bd, bh


class _Scratch:
    """Block buffers reused from block to block of a call, rather than allocated for each block
    (a fresh allocation of megabytes comes from mmap, and each of its pages faults in again)."""

    def __init__(self, dtype: np.dtype) -> None:
        self.dtype = dtype
        self.buffers: dict[str, np.ndarray] = {}

    def take(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """A C-contiguous array of ``shape`` on the buffer ``name`` (grown when too small)."""
        size = math.prod(shape)
        buf = self.buffers.get(name)
        if buf is None or buf.size < size:
            buf = self.buffers[name] = np.empty(size, dtype=self.dtype)
        return buf[:size].reshape(shape)


def _padded_input(xg: np.ndarray, axes: list[list[_AxisPhase]], acc: np.dtype) -> tuple:
    """``x`` as ``(G, C_in_g, N, D, H, W)`` in ``acc``, in a zero frame wide enough that every
    tap's window of every phase lies inside it; and the frame's leading widths. A kept tap reads
    some real input, so ``-(Q-1) <= c <= D-1`` and the frame is at most ``D + 2(Q-1)`` long, for
    ``Q`` outputs a phase."""
    lo, hi = [], []
    for a, phases in enumerate(axes):
        live = [ph for ph in phases if ph.ks]
        c_hi = [ph.c0 + (len(ph.ks) - 1) * ph.step + ph.count - 1 for ph in live]
        lo.append(max([0, *(-ph.c0 for ph in live)]))
        hi.append(max([0, *(c - (xg.shape[3 + a] - 1) for c in c_hi)]))
    shape = (*xg.shape[:3], *(xg.shape[3 + a] + lo[a] + hi[a] for a in range(3)))
    if not any(lo) and not any(hi) and xg.dtype == acc:
        return xg, lo  # read in place: as_strided takes any strides
    xp = np.zeros(shape, dtype=acc)
    inside = (slice(lo[a], lo[a] + xg.shape[3 + a]) for a in range(3))
    xp[(slice(None),) * 3 + tuple(inside)] = xg  # converts to acc
    return xp, lo


def _phases(
    x5: np.ndarray,
    w: np.ndarray,
    b: np.ndarray | None,
    p: ConvParams,
    out5: np.ndarray,
    acc: np.dtype,
) -> None:
    """The phase products (module docstring), written into ``out5``."""
    G, cig, cog = p.groups, p.C_in_g, p.C_out_g
    N = p.N
    sd, sh = p.stride[:2]
    oW = p.out_size[2]
    axes = [
        _axis_phases(p.in_size[a], p.out_size[a], p.kernel[a], p.stride[a], p.padding[a],
                     p.dilation[a])
        for a in range(3)
    ]  # fmt: skip
    xg = _split_channels(x5, G).transpose(1, 2, 0, 3, 4, 5)  # (G, C_in_g, N, D, H, W), a view
    xp, lo = _padded_input(xg, axes, acc)
    og = _split_channels(out5, G)  # (N, G, C_out_g, oD, oH, oW), a view
    # (G, C_out_g, kD, kH, kW, C_in_g): each tap's weights as the row block a product reads
    wt = w.reshape(G, cig, cog, *p.kernel).transpose(0, 2, 3, 4, 5, 1).astype(acc)
    fill = 0 if b is None else b.reshape(G, cog, 1, 1, 1)  # for outputs that no tap reaches
    d_phases, h_phases, w_phases = axes
    scratch = _Scratch(acc)
    qw0, nw = w_phases[0].count, len(w_phases)  # nw < stride only where oW < stride (qw0 = 1)
    # The W phases of a (d, h) phase are computed together, so that each output row is written
    # whole, once: written phase by phase (stride apart), its cache lines went to memory and came
    # back once a phase (a trilinear layer, 16 x 64^3 -> 128^3: 178 -> 122 ms on 2 cores).
    for pd_, ph_ in product(d_phases, h_phases):
        dst_phase = og[:, :, :, pd_.o0 :: sd, ph_.o0 :: sh]  # (N, G, C_out_g, qd, qh, oW)
        qd, qh = pd_.count, ph_.count
        # (G, C_out_g, taps*C_in_g) per W phase, rows in (kd, kh, kw, ci) order as the windows
        weights = [
            wt[(slice(None), slice(None), *np.ix_(pd_.ks, ph_.ks, pw_.ks))].reshape(G, cog, -1)
            for pw_ in w_phases
        ]  # one gather each: every tap's weights are read once a call
        taps = max(wb.shape[2] for wb in weights)
        if taps == 0:
            dst_phase[...] = fill
            continue
        bn, bd, bh = _block_sizes(N, qd, qh, qw0, G * max(taps, cog * nw))
        for n0, d0, h0 in product(range(0, N, bn), range(0, qd, bd), range(0, qh, bh)):
            n1, d1, h1 = min(n0 + bn, N), min(d0 + bd, qd), min(h0 + bh, qh)
            rows = scratch.take("rows", (n1 - n0, G, cog, d1 - d0, h1 - h0, qw0, nw))
            for r, pw_ in enumerate(w_phases):
                if weights[r].shape[2] == 0:
                    rows[..., : pw_.count, r] = fill
                    continue
                # the block's input windows, every tap of the phase: one strided view of xp
                start = xp[:, :, n0:, d0 + pd_.c0 + lo[0] :, h0 + ph_.c0 + lo[1] :,
                           pw_.c0 + lo[2] :]  # fmt: skip
                st = xp.strides
                view = as_strided(
                    start,
                    (G, len(pd_.ks), len(ph_.ks), len(pw_.ks), cig, n1 - n0, d1 - d0, h1 - h0,
                     pw_.count),
                    (st[0], pd_.step * st[3], ph_.step * st[4], pw_.step * st[5], st[1], st[2],
                     st[3], st[4], st[5]),
                )  # fmt: skip
                cols = scratch.take("cols", view.shape)
                np.copyto(cols, view)  # im2col: one copy
                cols = cols.reshape(G, weights[r].shape[2], -1)
                res = scratch.take("res", (G, cog, cols.shape[2]))
                np.matmul(weights[r], cols, out=res)
                if b is not None:
                    res += b
                rows[..., : pw_.count, r] = res.reshape(
                    G, cog, n1 - n0, d1 - d0, h1 - h0, pw_.count
                ).transpose(2, 0, 1, 3, 4, 5)
            whole = rows.reshape(*rows.shape[:5], qw0 * nw)[..., :oW]  # output w = q*nw + r
            dst_phase[n0:n1, :, :, d0:d1, h0:h1] = whole


def _scatter(
    x5: np.ndarray,
    w: np.ndarray,
    b: np.ndarray | None,
    p: ConvParams,
    out5: np.ndarray,
    acc: np.dtype,
) -> None:
    """Tap by tap: each tap's product of every input voxel, added (strided by ``s``) into the
    uncropped output ``(D-1)*s + dil*(k-1) + 1`` long per axis, then cropped. Slower than
    :func:`_phases` and more memory, but it multiplies only real inputs by the weights."""
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

    # (G, C_in_g, N*D*H*W): channels of a group as rows, every voxel of every batch as columns.
    xg = (
        x5.reshape(N, G, cig, D * H * W)
        .transpose(1, 2, 0, 3)
        .astype(acc, copy=True)
        .reshape(G, cig, N * D * H * W)
    )
    # (kD*kH*kW, G, C_out_g, C_in_g): per tap, the transposed weight block of each group.
    wt = w.reshape(G, cig, cog, kD * kH * kW).transpose(3, 0, 2, 1).astype(acc, copy=True)
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
    if b is not None:
        window += b.reshape(G, cog, 1, 1, 1, 1)
    # The assignment rounds once to out's dtype; out may be a strided view (channels-last).
    _split_channels(out5, G)[...] = window.transpose(2, 0, 1, 3, 4, 5)
