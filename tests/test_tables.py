"""The host-side tables of the fast kernels reproduce the definition (checked on the CPU).

The phase table that kernels/igemm.cu reads is replayed in NumPy exactly as it reads it (per
phase, per tap: a shifted dense correlation), and so are kernels/grouped.cu's staged tiles.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from cases import CASES
from oracle import TOL, conv_transpose3d_oracle, rel_err

from cupyconvt._compile import kernel_dir
from cupyconvt._depthwise import DW_CELLS_W16
from cupyconvt._grouped import DEPTH_INNER_VQ, GH_SIZE, ROW_HDR, GroupedPlan
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


def _replay_grouped(x, w, b, p: ConvParams, dtype: str, sm_count: int) -> np.ndarray:
    """kernels/grouped.cu in NumPy: per block, stage the tile and weights as the kernel does,
    then read them only through the plan's table (tile extents, per-tap x_off and w_off)."""
    plan = GroupedPlan.build(p, dtype, sm_count)
    table = plan.table.host
    hdr, rows = table[:GH_SIZE], table[GH_SIZE:].reshape(int(table[10]), int(table[9]))
    td_in, th_in, tw_in, min_d, min_h, min_w, tiles_w, tiles_h, co_chunks = (
        int(v) for v in hdr[:9]
    )
    tqw, tqh, vq, cot = plan.tile.tqw, plan.tile.tqh, plan.tile.vq, plan.cot
    G, cig, cog = p.groups, p.C_in_g, p.C_out_g
    taps_all = p.kernel[0] * p.kernel[1] * p.kernel[2]
    x6 = x.reshape(p.N, G, cig, *p.in_size)
    w4 = w.reshape(G, cig, cog, taps_all)
    out = np.full(p.out_shape5, np.nan)
    out6 = out.reshape(p.N, G, cog, *p.out_size)
    # The staged tile's layout: [d][h][w], or [h][w][d] with an odd d pitch for deep tiles.
    deep = vq >= DEPTH_INNER_VQ
    dp = td_in | 1 if deep else 1
    cell_step = 1 if deep else th_in * tw_in
    chan_in = (dp if deep else td_in) * th_in * tw_in
    ty, tx = np.meshgrid(np.arange(tqh), np.arange(tqw), indexing="ij")
    lane = (ty * tw_in + tx) * dp
    for n, g, chunk in np.ndindex(p.N, G, co_chunks):
        co = chunk * cot + np.arange(cot)
        w_s = np.zeros((taps_all, cig, cot))
        w_s[:, :, co < cog] = w4[g][:, co[co < cog]].transpose(2, 0, 1)
        w_s = w_s.ravel()
        for bid in range(plan.grid[0]):
            tw, th, td = bid % tiles_w, (bid // tiles_w) % tiles_h, bid // (tiles_w * tiles_h)
            qw0, qh0, qd0 = tw * tqw, th * tqh, td * vq
            x_s = np.zeros((cig, td_in, th_in, tw_in))
            starts = (qd0 + min_d, qh0 + min_h, qw0 + min_w)
            idx = [np.arange(s, s + e) for s, e in zip(starts, (td_in, th_in, tw_in), strict=True)]
            ok = [(i >= 0) & (i < e) for i, e in zip(idx, p.in_size, strict=True)]
            x_s[(slice(None),) + np.ix_(*ok)] = x6[n, g][
                (slice(None),) + np.ix_(*[i[o] for i, o in zip(idx, ok, strict=True)])
            ]
            if deep:  # pad d to the pitch with NaN: a read of the padding fails the test
                x_s = np.concatenate(
                    [x_s, np.full((cig, dp - td_in, th_in, tw_in), np.nan)], axis=1
                ).transpose(0, 2, 3, 1)
            x_s = x_s.ravel()
            for row in rows:
                o0d, o0h, o0w, QD, QH, QW, taps = (int(v) for v in row[:7])
                for v in range(vq):
                    valid = (qw0 + tx < QW) & (qh0 + ty < QH) & (qd0 + v < QD)
                    if not valid.any():
                        continue
                    acc = np.zeros((cot, tqh, tqw))
                    for t in range(taps):
                        x_off, w_off = (int(u) for u in row[ROW_HDR + 2 * t : ROW_HDR + 2 * t + 2])
                        for ci in range(cig):
                            xv = x_s[x_off + ci * chan_in + v * cell_step + lane]
                            acc += (
                                xv[None]
                                * w_s[w_off + ci * cot : w_off + (ci + 1) * cot, None, None]
                            )
                    od = o0d + (qd0 + v) * p.stride[0]
                    oh = o0h + (qh0 + ty[valid]) * p.stride[1]
                    ow = o0w + (qw0 + tx[valid]) * p.stride[2]
                    for j in np.flatnonzero(co < cog):
                        out6[n, g, co[j], od, oh, ow] = acc[j][valid]
    if b is not None:
        out += b.reshape(1, -1, 1, 1, 1)
    return out.reshape(p.out_shape)


@pytest.mark.parametrize("sm_count", [0, 10**6], ids=["deep_tile", "thin_tile"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_grouped_tiles_reproduce_definition(case, sm_count, rng):
    """Every output written (NaN-poisoned), from the staged tiles and the table alone; a large
    SM count makes the planner pick its thinnest tile, so both tile depths are replayed."""
    x, w, b = case.arrays(rng)
    p = ConvParams.from_args(x.shape, w.shape, None if b is None else b.shape, **case.kwargs)
    assert GroupedPlan.eligible(p, "float32")
    got = _replay_grouped(x, w, b, p, "float32", sm_count)
    assert rel_err(got, conv_transpose3d_oracle(x, w, b, **case.kwargs)) <= TOL["float64"]


def test_host_constants_match_the_kernels():
    """The layout constants the host tables are built with are the ones the kernels read them
    with: each is written once in Python and once in CUDA, and this is what keeps them in step."""
    grouped = (kernel_dir() / "grouped.cu").read_text(encoding="utf-8")
    common = (kernel_dir() / "common.cuh").read_text(encoding="utf-8")

    def const(src: str, pattern: str) -> int:
        found = re.findall(pattern, src)
        assert len(found) == 1, pattern
        return int(found[0])

    assert const(grouped, r"constexpr int DEPTH_INNER_VQ = (\d+);") == DEPTH_INNER_VQ
    assert const(grouped, r"constexpr int GROUPED_ROW_HDR = (\d+);") == ROW_HDR
    assert const(grouped, r"GH_SIZE = (\d+)") == GH_SIZE
    assert const(common, r"enum \{ PHASE_HDR = (\d+) \}") == PHASE_HDR
    assert "constexpr bool DIN = VQ >= cct::DEPTH_INNER_VQ;" in grouped
    depthwise = (kernel_dir() / "depthwise.cu").read_text(encoding="utf-8")
    assert const(depthwise, r"#define CCT_DW_CW16 (\d+)") == DW_CELLS_W16
