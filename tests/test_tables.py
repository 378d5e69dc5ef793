"""The host-side tables of the fast kernels reproduce the definition (checked on the CPU).

The phase table that kernels/igemm.cu and kernels/grouped.cu read is replayed in NumPy exactly
as they read it (per phase, per tap: a shifted dense correlation).
"""

from __future__ import annotations

import numpy as np
import pytest
from cases import CASES
from oracle import TOL, conv_transpose3d_oracle, rel_err

from cupyconvt._params import ConvParams
from cupyconvt._plans import PHASE_HDR, phase_table


def _replay_phase_table(x, w, b, p: ConvParams) -> np.ndarray:
    x5 = x.reshape(p.x_shape5)
    G, cig, cog = p.groups, p.C_in_g, p.C_out_g
    taps_all = p.kernel[0] * p.kernel[1] * p.kernel[2]
    wr = w.reshape(G, cig, cog, taps_all)
    out = np.zeros(p.out_shape5)
    table, _ = phase_table(p)
    for row in table:
        o0d, o0h, o0w, qd, qh, qw, ntaps = (int(v) for v in row[:7])
        if qd * qh * qw == 0:
            continue
        acc = np.zeros((p.N, G, cog, qd, qh, qw))
        for t in range(ntaps):
            fd, fh, fw, wt = (int(v) for v in row[PHASE_HDR + 4 * t : PHASE_HDR + 4 * t + 4])
            idx = [np.arange(q) + f for q, f in ((qd, fd), (qh, fh), (qw, fw))]
            ok = [(i >= 0) & (i < n) for i, n in zip(idx, p.in_size, strict=False)]
            xs = np.zeros((p.N, G, cig, qd, qh, qw))
            sel = np.ix_(*[np.flatnonzero(o) for o in ok])
            src = x5.reshape(p.N, G, cig, *p.in_size)[
                (slice(None),) * 3 + np.ix_(*[i[o] for i, o in zip(idx, ok, strict=False)])
            ]
            xs[(slice(None),) * 3 + sel] = src
            acc += np.einsum("ngcdhw,gcj->ngjdhw", xs, wr[..., wt])
        sd, sh, sw = p.stride
        out.reshape(p.N, G, cog, *p.out_size)[
            :, :, :, o0d : o0d + qd * sd : sd, o0h : o0h + qh * sh : sh, o0w : o0w + qw * sw : sw
        ] = acc
    if b is not None:
        out += b.reshape(1, -1, 1, 1, 1)
    return out.reshape(p.out_shape)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_phase_table_reproduces_definition(case, rng):
    x, w, b = case.arrays(rng)
    p = ConvParams.from_args(x.shape, w.shape, None if b is None else b.shape, **case.kwargs)
    got = _replay_phase_table(x, w, b, p)
    assert rel_err(got, conv_transpose3d_oracle(x, w, b, **case.kwargs)) <= TOL["float64"]


def test_phase_table_covers_each_tap_once():
    p = ConvParams.from_args((1, 2, 6, 6, 6), (2, 2, 3, 4, 5), None, (2, 3, 1), 0, 0, 1, (1, 1, 2))
    table, _ = phase_table(p)
    taps = [int(t) for row in table for t in row[PHASE_HDR + 3 :: 4][: int(row[6])]]
    assert sorted(taps) == list(range(3 * 4 * 5))


@pytest.mark.parametrize("case", CASES, ids=str)
def test_phase_rows_of_one_dh_phase_agree(case):
    """grouped.cu reads the sW rows of a (rd, rh) pair as one block: they share d and h."""
    p = ConvParams.from_args(case.x_shape, case.w_shape, None, **case.kwargs)
    table, _ = phase_table(p)
    rows = table[:, :PHASE_HDR].reshape(-1, p.stride[2], PHASE_HDR)
    for cols in ((0, 3), (1, 4)):
        assert (rows[:, :, cols] == rows[:, :1, cols]).all()
