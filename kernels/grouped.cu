// Tiled gather transposed 3D convolution for few channels per group (grouped, depthwise, narrow
// layers): the memory-bound path.
//
// It uses the stride-phase decomposition (cupyconvt/_plans.py: phase_axes). Along each axis the
// output splits into cells of `stride` voxels, cell q holding o = q*s + o0_r for each residue r;
// tap k of residue r reads input i = q + off_k. So for the phase (rd, rh, rw):
//
//   out[n, g*C_out_g + co, o0 + q*s] = bias[co]
//       + sum_{tap t of the phase, ci < C_in_g} x[n, g*C_in_g + ci, q + off_t] * w[g*C_in_g + ci, co, t]
//
// Work split: a block owns one (n, group, COT output channels) plane, numbered
// blockIdx.y + blockIdx.z * gridDim.y, and a tile of TQD x TQH x TQW cells (TQW = blockDim.x lanes
// along w, TQH = blockDim.y rows along h, TQD = VQ cells along d, VQ per thread). It stages the input the tile reads (all C_in_g channels, cells plus the taps'
// halo) and the group's weights in shared memory once, then each thread walks every phase of its
// VQ cells: neighbouring lanes read neighbouring shared words and write neighbouring outputs of one
// phase, and every thread of the block is on the same phase and tap at once, so weights are read
// as broadcasts. Global memory sees each input tile and each output element once.
// Every output element is written once (no atomics): results are deterministic.
//
// Staged tile layouts. With VQ < 4 a channel of the tile is [d][h][w], rows along w copied 16
// bytes at a time. With VQ >= 4 (deep tiles: depthwise and other one-channel-a-group layers) it is
// [h][w][d], d innermost with an odd pitch DP = TD_in | 1 (conflict-free: lanes are DP words
// apart): a thread's VQ cells are then neighbouring words, read with immediate offsets, where the
// [d][h][w] layout would cost an address addition per cell (a runtime plane pitch).
#include "common.cuh"

namespace cct {

// Plan header at the start of the table (cupyconvt/_grouped.py writes it):
enum GroupedHdr {
    GH_TD_IN, GH_TH_IN, GH_TW_IN,  // staged input tile extent (cells + halo) per channel
    GH_MIN_D, GH_MIN_H, GH_MIN_W,  // tile origin = q0 + these: the smallest tap offset per axis
                                   // (along w rounded down to 16 bytes)
    GH_TILES_W, GH_TILES_H,        // tiles along w and h (blockIdx.x = (td*TILES_H + th)*TILES_W + tw)
    GH_CO_CHUNKS,                  // COT-wide output-channel chunks per group
    GH_ROW_LEN,                    // ints per phase row
    GH_PHASES,                     // sD * sH * sW
    GH_TAPS_ALL,                   // kD * kH * kW
    GH_SIZE = 16
};
// Each phase row: o0_d, o0_h, o0_w, Q_D, Q_H, Q_W, taps, 0, then per tap (x_off, w_off): the
// tap's offset into a channel of the staged tile and into the staged weights.
constexpr int GROUPED_ROW_HDR = 8;
// Global loads a thread issues before it stores them to shared memory (memory-level parallelism).
constexpr int FILL = 4;
// Cells a thread (VQ) from which the staged tile keeps d innermost ([ci][h][w][d], see below).
// cupyconvt/_grouped.py: DEPTH_INNER_VQ (tests/test_tables.py checks that the two agree).
constexpr int DEPTH_INNER_VQ = 4;

// COT weights of one (tap, ci) from shared memory, as wide loads where the layout allows.
template <typename A, int COT> struct WeightRow {
    static __device__ __forceinline__ void load(const A* p, A* v) {
#pragma unroll
        for (int j = 0; j < COT; ++j) v[j] = p[j];
    }
};
template <> struct WeightRow<float, 4> {
    static __device__ __forceinline__ void load(const float* p, float* v) {
        const float4 a = *reinterpret_cast<const float4*>(p);
        v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
    }
};
template <> struct WeightRow<float, 8> {
    static __device__ __forceinline__ void load(const float* p, float* v) {
        WeightRow<float, 4>::load(p, v);
        WeightRow<float, 4>::load(p + 4, v + 4);
    }
};
template <> struct WeightRow<float, 2> {
    static __device__ __forceinline__ void load(const float* p, float* v) {
        const float2 a = *reinterpret_cast<const float2*>(p);
        v[0] = a.x; v[1] = a.y;
    }
};

}  // namespace cct

// Three blocks an SM (80 registers) while the accumulators take at most 16 registers, else two.
// PW: phases along w a thread computes, 1, or 2 where sW == 2 (the two w-phases of a cell are
// neighbouring outputs, stored together).
template <typename T, int COT, int VQ, int PW>
__global__ void __launch_bounds__(256, PW * VQ * COT * sizeof(typename cct::Acc<T>::type) > 64 ? 2 : 3)
grouped_conv_transpose3d(const T* __restrict__ x, const T* __restrict__ w,
                         const T* __restrict__ bias, T* __restrict__ out,
                         const int* __restrict__ table, const cct::ConvGeom* __restrict__ geom) {
    typedef typename cct::Acc<T>::type Acc;
    // The geometry as 32-bit values (the planner checks every extent is below 2^30), with the
    // products that can pass 2^31 in 64 bits: fewer live registers than the int64 ConvGeom.
    const int D = static_cast<int>(geom->D), H = static_cast<int>(geom->H);
    const int W = static_cast<int>(geom->W);
    const int oH = static_cast<int>(geom->oH), oW = static_cast<int>(geom->oW);
    const int sD = static_cast<int>(geom->sD), sH = static_cast<int>(geom->sH);
    const int sW = static_cast<int>(geom->sW);
    const int cig = static_cast<int>(geom->C_in_g), cog = static_cast<int>(geom->C_out_g);
    const int groups = static_cast<int>(geom->groups);
    const i64 N = geom->N;
    const bool has_bias = geom->has_bias != 0;
    const i64 DHW = static_cast<i64>(D) * H * W;
    const i64 oVol = geom->oD * oH * static_cast<i64>(oW);
    const int* hdr = table;
    const int TD_in = hdr[cct::GH_TD_IN], TH_in = hdr[cct::GH_TH_IN], TW_in = hdr[cct::GH_TW_IN];
    const int phases = hdr[cct::GH_PHASES], row_len = hdr[cct::GH_ROW_LEN];
    const int taps_all = hdr[cct::GH_TAPS_ALL], co_chunks = hdr[cct::GH_CO_CHUNKS];
    // d pitch of the staged tile and the step between a thread's cells (see the layouts above).
    constexpr bool DIN = VQ >= cct::DEPTH_INNER_VQ;
    const int DP = DIN ? (TD_in | 1) : 1;
    const int cell_step = DIN ? 1 : TH_in * TW_in;
    const int chan_in = TD_in * TH_in * TW_in + (DIN ? (DP - TD_in) * TH_in * TW_in : 0);

    // Shared memory: weights [taps_all][ci][COT], input tile [ci][TD_in][TH_in][TW_in], phase rows.
    extern __shared__ __align__(16) unsigned char smem_raw[];
    Acc* w_s = reinterpret_cast<Acc*>(smem_raw);
    constexpr int VEC = 16 / sizeof(Acc);  // accumulators per 16 bytes
    Acc* x_s = w_s + (taps_all * cig * COT + VEC - 1) / VEC * VEC;  // 16-byte aligned
    // Phase rows start 16-byte aligned, so a tap's (x_off, w_off) pair is one 8-byte load.
    const int tab_at = static_cast<int>((x_s + cig * chan_in - w_s) * sizeof(Acc) + 15) & ~15;
    int* tab_s = reinterpret_cast<int*>(smem_raw + tab_at);

    const int tid = threadIdx.y * blockDim.x + threadIdx.x;
    const int nthreads = blockDim.x * blockDim.y;
    for (int e = tid; e < phases * row_len; e += nthreads) tab_s[e] = table[cct::GH_SIZE + e];

    // This block's cells: q0 + (0..VQ-1, threadIdx.y, threadIdx.x).
    const int tiles_w = hdr[cct::GH_TILES_W], tiles_h = hdr[cct::GH_TILES_H];
    const int tw = blockIdx.x % tiles_w;
    const int th = (blockIdx.x / tiles_w) % tiles_h;
    const int td = blockIdx.x / (tiles_w * tiles_h);
    const int qw0 = tw * blockDim.x, qh0 = th * blockDim.y, qd0 = td * VQ;
    const int qw = qw0 + threadIdx.x, qh = qh0 + threadIdx.y;
    // Tile origin in the input.
    const int id0 = qd0 + hdr[cct::GH_MIN_D], ih0 = qh0 + hdr[cct::GH_MIN_H];
    const int iw0 = qw0 + hdr[cct::GH_MIN_W];

    const i64 planes = N * groups * co_chunks;
    const int rows = cig * TD_in * TH_in;

    const i64 pl = static_cast<i64>(blockIdx.z) * gridDim.y + blockIdx.y;
    if (pl >= planes) return;  // uniform over the block
    {
        const int chunk = static_cast<int>(pl % co_chunks);
        const i64 ng = pl / co_chunks;
        const int grp = static_cast<int>(ng % groups);
        const i64 n = ng / groups;
        const int co0 = chunk * COT;

        // Weights of this group and channel chunk, zero past C_out_g, and the input tile (rows
        // (ci, d, h), zero outside the input). float and double copy asynchronously, every copy
        // of a thread in flight at once; 16-bit types convert, FILL loads in flight at a time.
        const int w_elems = taps_all * cig * COT;
        const T* wg = w + static_cast<i64>(grp) * cig * cog * taps_all;
        const T* xg = x + ((n * groups + grp) * cig) * DHW;
        const int x_elems = rows * TW_in;
        if constexpr (sizeof(T) == sizeof(Acc)) {
            // Weights: a thread keeps one channel j of the chunk and steps over (tap, ci) pairs.
            {
                const int j = tid % COT, step = nthreads / COT;
                const bool ok = co0 + j < cog;
                const int step_t = step / cig, step_ci = step - step_t * cig;
                int tc = tid / COT;
                int t = tc / cig, ci = tc - t * cig;
                for (; tc < taps_all * cig; tc += step) {
                    cct::cp_async_or_zero(w_s + tc * COT + j,
                                          wg + (ok ? (ci * cog + co0 + j) * taps_all + t : 0), ok);
                    t += step_t;
                    ci += step_ci;
                    if (ci >= cig) {
                        ci -= cig;
                        ++t;
                    }
                }
            }
            // Input tile: a thread keeps one column (of VEC elements where W and x's alignment
            // allow: the tile's w origin and width are multiples of VEC, so a vector is wholly
            // inside or outside the input) and steps over rows (ci, d, h), carrying the row
            // coordinates instead of dividing.
            const bool vec = !DIN && W % VEC == 0 && reinterpret_cast<u64>(x) % 16 == 0;
            const int cw = vec ? VEC : 1;
            const int cols = TW_in / cw;
            const int col = tid % cols, rstep = nthreads / cols;
            int r = tid / cols;
            if (r < rstep) {
                const int ww = col * cw, iw = iw0 + ww;
                const bool col_ok = iw >= 0 && iw < W;
                int hh = r % TH_in, dd = (r / TH_in) % TD_in, ci = r / (TH_in * TD_in);
                for (; r < rows; r += rstep) {
                    const int id = id0 + dd, ih = ih0 + hh;
                    const bool ok = col_ok && id >= 0 && id < D && ih >= 0 && ih < H;
                    const i64 src = ok ? ci * DHW + (static_cast<i64>(id) * H + ih) * W + iw : 0;
                    if (vec)
                        cct::cp_async16_or_zero(x_s + r * TW_in + ww, xg + src, ok);
                    else if (DIN)
                        cct::cp_async_or_zero(x_s + ((ci * TH_in + hh) * TW_in + ww) * DP + dd,
                                              xg + src, ok);
                    else
                        cct::cp_async_or_zero(x_s + r * TW_in + ww, xg + src, ok);
                    for (hh += rstep; hh >= TH_in; hh -= TH_in) {
                        if (++dd == TD_in) {
                            dd = 0;
                            ++ci;
                        }
                    }
                }
            }
            cct::cp_async_wait_all();
        } else {
            for (int e0 = tid; e0 < w_elems; e0 += nthreads * cct::FILL) {
                Acc v[cct::FILL];
#pragma unroll
                for (int k = 0; k < cct::FILL; ++k) {
                    const int e = e0 + k * nthreads;
                    const int j = e % COT;
                    const int ci = (e / COT) % cig;
                    const int t = e / (COT * cig);
                    const int co = co0 + j;
                    v[k] = (e < w_elems && co < cog)
                               ? cct::to_acc(wg[(ci * cog + co) * taps_all + t]) : Acc(0);
                }
#pragma unroll
                for (int k = 0; k < cct::FILL; ++k)
                    if (e0 + k * nthreads < w_elems) w_s[e0 + k * nthreads] = v[k];
            }
            for (int e0 = tid; e0 < x_elems; e0 += nthreads * cct::FILL) {
                Acc v[cct::FILL];
                int slot[cct::FILL];  // where element e goes in x_s ([h][w][d] when DIN)
#pragma unroll
                for (int k = 0; k < cct::FILL; ++k) {
                    const int e = e0 + k * nthreads;
                    const int ww = e % TW_in;
                    const int r = e / TW_in;
                    const int hh = r % TH_in;
                    const int dd = (r / TH_in) % TD_in;
                    const int ci = r / (TH_in * TD_in);
                    const int id = id0 + dd, ih = ih0 + hh, iw = iw0 + ww;
                    const bool ok = e < x_elems && id >= 0 && id < D && ih >= 0 && ih < H &&
                                    iw >= 0 && iw < W;
                    v[k] = ok ? cct::to_acc(xg[ci * DHW + (static_cast<i64>(id) * H + ih) * W + iw])
                              : Acc(0);
                    slot[k] = DIN ? ((ci * TH_in + hh) * TW_in + ww) * DP + dd : e;
                }
#pragma unroll
                for (int k = 0; k < cct::FILL; ++k)
                    if (e0 + k * nthreads < x_elems) x_s[slot[k]] = v[k];
            }
        }
        __syncthreads();

        Acc b[COT];
#pragma unroll
        for (int j = 0; j < COT; ++j)
            b[j] = (has_bias && co0 + j < cog) ? cct::to_acc(bias[grp * cog + co0 + j])
                                                 : Acc(0);
        // An accumulator of channel j as it is stored: plus the bias (when there is one: adding
        // a zero would turn -0 into +0), rounded to T.
        auto finish = [&](Acc a, int j) {
            return cct::from_acc<T>(has_bias ? cct::add_ieee(a, b[j]) : a);
        };
        T* og = out + ((n * groups + grp) * cog + co0) * oVol;
        const i64 step_d = static_cast<i64>(sD) * oH * oW;  // one cell along d
        const Acc* x_thread = x_s + (threadIdx.y * TW_in + threadIdx.x) * DP;

        // Pairs of w-phases store both outputs of a cell at once where the rows allow it.
        const bool pair_vec = PW == 2 && oW % 2 == 0 &&
                              reinterpret_cast<u64>(out) % (2 * sizeof(T)) == 0;
        for (int ph = 0; ph < phases; ph += PW) {
            Acc acc[PW][VQ][COT];
#pragma unroll
            for (int p = 0; p < PW; ++p)
#pragma unroll
                for (int v = 0; v < VQ; ++v)
#pragma unroll
                    for (int j = 0; j < COT; ++j) acc[p][v][j] = Acc(0);
            // Phases of a pair share o0_d, o0_h, Q_D and Q_H (they differ in the w residue only).
            const int* row0 = tab_s + ph * row_len;
            const int QD = row0[3], QH = row0[4];
            if (qh0 >= QH || qd0 >= QD) continue;  // uniform over the block
#pragma unroll
            for (int p = 0; p < PW; ++p) {
                const int* row = row0 + p * row_len;
                const int QW = row[5], taps = row[6];
                if (qw0 >= QW) continue;  // uniform over the block
                const int2* tap_offs = reinterpret_cast<const int2*>(row + cct::GROUPED_ROW_HDR);
                for (int t = 0; t < taps; ++t) {
                    const int2 offs = tap_offs[t];
                    const Acc* xp = x_thread + offs.x;
                    const Acc* wp = w_s + offs.y;
                    // One (tap, input channel) step: COT weights times VQ cells.
                    auto step = [&](const Acc* xq, const Acc* wq) {
                        Acc wv[COT], xv[VQ];
                        cct::WeightRow<Acc, COT>::load(wq, wv);
#pragma unroll
                        for (int v = 0; v < VQ; ++v) xv[v] = xq[v * cell_step];
#pragma unroll
                        for (int v = 0; v < VQ; ++v)
#pragma unroll
                            for (int j = 0; j < COT; ++j)
                                acc[p][v][j] = cct::fma_ieee(xv[v], wv[j], acc[p][v][j]);
                    };
                    if (DIN && cig == 1) {  // depthwise: no channel loop (uniform)
                        step(xp, wp);
                        continue;
                    }
#pragma unroll 2
                    for (int ci = 0; ci < cig; ++ci, xp += chan_in, wp += COT) step(xp, wp);
                }
            }
            if (qh >= QH) continue;
            const int oh = row0[1] + qh * sH;
            const i64 o_row = (static_cast<i64>(row0[0] + qd0 * sD) * oH + oh) * oW;
            if constexpr (PW == 1) {
                if (qw >= row0[5]) continue;
                T* o = og + o_row + row0[2] + qw * sW;
#pragma unroll
                for (int v = 0; v < VQ; ++v, o += step_d) {
                    if (qd0 + v >= QD) break;
                    T* oc = o;
#pragma unroll
                    for (int j = 0; j < COT; ++j, oc += oVol)
                        if (co0 + j < cog) *oc = finish(acc[0][v][j], j);
                }
            } else {
                // sW == 2: one phase starts at output 0 and the other at 1, so cell qw holds
                // outputs 2 qw (phase `lo`) and 2 qw + 1.
                const int* row1 = row0 + row_len;
                const bool swap = row0[2] != 0;  // row 1 is the even phase
                const bool ok_lo = qw < (swap ? row1[5] : row0[5]);
                const bool ok_hi = qw < (swap ? row0[5] : row1[5]);
                if (!ok_lo && !ok_hi) continue;
                T* o = og + o_row + 2 * qw;
#pragma unroll
                for (int v = 0; v < VQ; ++v, o += step_d) {
                    if (qd0 + v >= QD) break;
                    T* oc = o;
#pragma unroll
                    for (int j = 0; j < COT; ++j, oc += oVol) {
                        if (co0 + j >= cog) continue;
                        const T lo = finish(swap ? acc[1][v][j] : acc[0][v][j], j);
                        const T hi = finish(swap ? acc[0][v][j] : acc[1][v][j], j);
                        if (pair_vec && ok_lo && ok_hi) {
                            cct::store_pair(oc, lo, hi);
                        } else {
                            if (ok_lo) oc[0] = lo;
                            if (ok_hi) oc[1] = hi;
                        }
                    }
                }
            }
        }
    }
}
