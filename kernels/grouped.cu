// Phase-major gather transposed 3D convolution for few channels per group (grouped, depthwise,
// narrow layers): the memory-bound path.
//
// It uses the stride-phase decomposition of igemm.cu (same host table): for the output voxels of
// phase (rd, rh, rw), with phase-grid index q, only that phase's taps contribute and they read
// x at q + off_t, so
//
//   out[n, g*C_out_g + co, o0 + q*s] = bias[co]
//       + sum_{tap t of the phase, ci < C_in_g} x[n, g*C_in_g + ci, q + off_t] * w[g*C_in_g + ci, co, t]
//
// with no division, modulo or table walk per voxel.
//
// Work split: blockIdx.z = the (rd, rh) phase pair, blockIdx.y walks (n, group, chunk of COT
// output channels), and a block covers VQ * blockDim.x voxels (qd, qh, qw) of the phase grid, VQ
// per thread, blockDim.x apart (so a warp's loads and stores stay contiguous). A thread computes
// its voxels for every w-phase rw, so a warp writes sW interleaved runs that fill whole output
// rows; each x value it loads serves COT output channels, and its VQ voxels give VQ independent
// loads in flight. The block's taps and weights sit in shared memory, loaded once for VQ voxels.
// Every output element is written once (no atomics).
#include "common.cuh"

namespace cct {
constexpr int GROUPED_PHASE_HDR = 8;  // same layout as igemm.cu's PHASE_HDR
constexpr int GROUPED_VQ = 4;         // voxels per thread (cupyconvt/_plans.py: GROUPED_VQ)
}

template <typename T, int COT>
__global__ void grouped_conv_transpose3d(const T* __restrict__ x, const T* __restrict__ w,
                                         const T* __restrict__ bias, T* __restrict__ out,
                                         const int* __restrict__ table, const cct::ConvGeom g,
                                         const int max_taps) {
    typedef typename cct::Acc<T>::type Acc;
    const int sW = static_cast<int>(g.sW);
    const int row_len = cct::GROUPED_PHASE_HDR + 4 * max_taps;
    const int cig = static_cast<int>(g.C_in_g);
    const int taps_all = static_cast<int>(g.kD * g.kH * g.kW);

    // Shared memory: the sW phase rows of the table, then weights [rw][tap][ci][COT].
    extern __shared__ __align__(16) unsigned char smem_raw[];
    Acc* w_s = reinterpret_cast<Acc*>(smem_raw);
    int* tab_s = reinterpret_cast<int*>(w_s + static_cast<i64>(sW) * max_taps * cig * COT);
    const int* rows = table + static_cast<i64>(blockIdx.z) * sW * row_len;
    for (int e = threadIdx.x; e < sW * row_len; e += blockDim.x) tab_s[e] = rows[e];
    __syncthreads();

    // The d and h phase of this block are shared by its sW rows.
    const int o0d = tab_s[0], o0h = tab_s[1];
    const int QD = tab_s[3], QH = tab_s[4];
    int QW = 0;
    for (int rw = 0; rw < sW; ++rw) QW = max(QW, tab_s[rw * row_len + 5]);
    const i64 M = static_cast<i64>(QD) * QH * QW;
    constexpr int VQ = cct::GROUPED_VQ;
    int qd[VQ], qh[VQ], qw[VQ];
    bool active[VQ];
    bool any_active = false;
#pragma unroll
    for (int v = 0; v < VQ; ++v) {
        const i64 s = (static_cast<i64>(blockIdx.x) * VQ + v) * blockDim.x + threadIdx.x;
        active[v] = s < M;
        any_active |= active[v];
        qw[v] = active[v] ? static_cast<int>(s % QW) : 0;
        qh[v] = active[v] ? static_cast<int>((s / QW) % QH) : 0;
        qd[v] = active[v] ? static_cast<int>(s / (static_cast<i64>(QW) * QH)) : 0;
    }
    const i64 HW = g.H * g.W;
    const i64 DHW = g.D * HW;
    const i64 oHW = g.oH * g.oW;
    const i64 oVol = g.oD * oHW;
    const int chunks = static_cast<int>((g.C_out_g + COT - 1) / COT);
    const i64 planes = g.N * g.groups * chunks;

    for (i64 pl = blockIdx.y; pl < planes; pl += gridDim.y) {
        const int chunk = static_cast<int>(pl % chunks);
        const i64 ng = pl / chunks;
        const i64 grp = ng % g.groups;
        const i64 n = ng / g.groups;
        const int co0 = chunk * COT;

        __syncthreads();  // the previous plane's weights are no longer read
        const int per_rw = max_taps * cig * COT;
        for (int e = threadIdx.x; e < sW * per_rw; e += blockDim.x) {
            const int j = e % COT;
            const int ci = (e / COT) % cig;
            const int t = (e / (COT * cig)) % max_taps;
            const int rw = e / per_rw;
            const int* row = tab_s + rw * row_len;
            const int co = co0 + j;
            w_s[e] = (t < row[6] && co < g.C_out_g)
                         ? cct::to_acc(w[((grp * g.C_in_g + ci) * g.C_out_g + co) * taps_all +
                                         row[cct::GROUPED_PHASE_HDR + 4 * t + 3]])
                         : Acc(0);
        }
        __syncthreads();
        if (!any_active) continue;

        const T* xg = x + (n * g.C_in + grp * g.C_in_g) * DHW;
        T* og = out + (n * g.C_out + grp * g.C_out_g + co0) * oVol + o0d * oHW + o0h * g.oW;
        for (int rw = 0; rw < sW; ++rw) {
            const int* row = tab_s + rw * row_len;
            const int QW_rw = row[5];
            Acc acc[VQ][COT];
#pragma unroll
            for (int v = 0; v < VQ; ++v)
#pragma unroll
                for (int j = 0; j < COT; ++j) acc[v][j] = Acc(0);
            const int taps = row[6];
            const Acc* wr = w_s + rw * per_rw;
            for (int t = 0; t < taps; ++t) {
                const int* tap = row + cct::GROUPED_PHASE_HDR + 4 * t;
                const int fd = tap[0], fh = tap[1], fw = tap[2];
                const T* xp[VQ];
                bool ok[VQ];
#pragma unroll
                for (int v = 0; v < VQ; ++v) {
                    const int id = qd[v] + fd, ih = qh[v] + fh, iw = qw[v] + fw;
                    ok[v] = active[v] && qw[v] < QW_rw && id >= 0 && id < g.D && ih >= 0 &&
                            ih < g.H && iw >= 0 && iw < g.W;
                    xp[v] = xg + (ok[v] ? (static_cast<i64>(id) * g.H + ih) * g.W + iw : 0);
                }
                const Acc* wt = wr + t * cig * COT;
                for (int ci = 0; ci < cig; ++ci) {
                    Acc xv[VQ];
#pragma unroll
                    for (int v = 0; v < VQ; ++v) xv[v] = ok[v] ? cct::to_acc(xp[v][ci * DHW]) : Acc(0);
#pragma unroll
                    for (int j = 0; j < COT; ++j) {
                        const Acc wv = wt[ci * COT + j];
#pragma unroll
                        for (int v = 0; v < VQ; ++v) acc[v][j] = fma(xv[v], wv, acc[v][j]);
                    }
                }
            }
#pragma unroll
            for (int v = 0; v < VQ; ++v) {
                if (!active[v] || qw[v] >= QW_rw) continue;
                T* o = og + static_cast<i64>(qd[v]) * g.sD * oHW + static_cast<i64>(qh[v]) * g.sH * g.oW +
                       row[2] + static_cast<i64>(qw[v]) * sW;
#pragma unroll
                for (int j = 0; j < COT; ++j) {
                    if (co0 + j < g.C_out_g) {
                        const Acc b = g.has_bias ? cct::to_acc(bias[grp * g.C_out_g + co0 + j]) : Acc(0);
                        o[j * oVol] = cct::from_acc<T>(acc[v][j] + b);
                    }
                }
            }
        }
    }
}
