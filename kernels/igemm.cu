// Implicit-GEMM transposed 3D convolution, one dense GEMM per output stride phase.
//
// Output voxels whose (o + padding) share a residue r modulo the stride form a phase: for them the
// taps that contribute are exactly those with k*dilation = r (mod stride), and the input index is
// i = q + off(k) for the phase-grid index q, so each phase is a dense stride-1 correlation:
//
//   out[n, g*C_out_g + co, o0 + q*s]  =  bias[co] + sum_{tap t of the phase, ci < C_in_g}
//                                        x[n, g*C_in_g + ci, q + off_t] * w[g*C_in_g + ci, co, t]
//
// i.e. a GEMM with M = N * Q_D * Q_H * Q_W phase voxels, N = C_out_g, K = taps * C_in_g. No work
// is spent on the zeros a naive transposed convolution inserts.
//
// Work split: blockIdx.z = (group, phase), blockIdx.y = a BN-wide slice of output channels,
// blockIdx.x = a BM-long run of phase voxels. The K loop walks (tap, BK input channels) chunks:
// x is gathered into shared memory (coalesced along the phase voxels), the packed weight slice is
// read as 16-byte vectors; both are double buffered through registers. Each thread owns a TM x TN
// register tile (TM voxels in 4-wide fragments, TN channels in 4-wide fragments).
// Every output element is written once (no atomics): results are deterministic.
#include "common.cuh"

namespace cct {

// Per-phase table built on the host (cupyconvt/_igemm.py): PHASE_HDR ints per phase
// (o0_d, o0_h, o0_w, Q_D, Q_H, Q_W, taps, 0), then max_taps entries of 4 ints
// (off_d, off_h, off_w, w_tap) where w_tap = (kd*kH + kh)*kW + kw.
constexpr int PHASE_HDR = 8;

template <typename A> struct Vec4;  // four accumulators, loaded from shared memory at once
template <> struct Vec4<float> {
    static __device__ __forceinline__ void load(const float* p, float* v) {
        const float4 t = *reinterpret_cast<const float4*>(p);
        v[0] = t.x; v[1] = t.y; v[2] = t.z; v[3] = t.w;
    }
};
template <> struct Vec4<double> {
    static __device__ __forceinline__ void load(const double* p, double* v) {
        const double2 a = *reinterpret_cast<const double2*>(p);
        const double2 b = *reinterpret_cast<const double2*>(p + 2);
        v[0] = a.x; v[1] = a.y; v[2] = b.x; v[3] = b.y;
    }
};
// 16 bytes of packed weights: 4 floats or 2 doubles.
template <typename A> struct Vec16 { typedef float4 type; static constexpr int n = 4; };
template <> struct Vec16<double> { typedef double2 type; static constexpr int n = 2; };

}  // namespace cct

// Packs w (C_in, C_out_g, kD, kH, kW) into wp[g][phase][tap][ci_pad][co_pad] in the accumulator
// type, zero where the tap, ci or co does not exist, so the GEMM reads it with no bounds checks.
template <typename T>
__global__ void igemm_pack_weights(const T* __restrict__ w, typename cct::Acc<T>::type* __restrict__ wp,
                                   const int* __restrict__ table, const cct::ConvGeom g,
                                   const int phases, const int max_taps, const int ci_pad,
                                   const int co_pad) {
    typedef typename cct::Acc<T>::type Acc;
    const i64 total = g.groups * static_cast<i64>(phases) * max_taps * ci_pad * co_pad;
    const i64 taps_all = g.kD * g.kH * g.kW;
    const int stride_tab = cct::PHASE_HDR + 4 * max_taps;
    for (i64 e = static_cast<i64>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
         e += static_cast<i64>(gridDim.x) * blockDim.x) {
        i64 r = e;
        const int co = static_cast<int>(r % co_pad); r /= co_pad;
        const int ci = static_cast<int>(r % ci_pad); r /= ci_pad;
        const int t = static_cast<int>(r % max_taps); r /= max_taps;
        const int ph = static_cast<int>(r % phases);
        const i64 grp = r / phases;
        const int* tab = table + ph * stride_tab;
        Acc v = Acc(0);
        if (t < tab[6] && ci < g.C_in_g && co < g.C_out_g) {
            const int w_tap = tab[cct::PHASE_HDR + 4 * t + 3];
            v = cct::to_acc(w[((grp * g.C_in_g + ci) * g.C_out_g + co) * taps_all + w_tap]);
        }
        wp[e] = v;
    }
}

template <typename T, int BM, int BN, int BK, int TM, int TN>
__global__ void __launch_bounds__((BM / TM) * (BN / TN))
igemm_conv_transpose3d(const T* __restrict__ x, const typename cct::Acc<T>::type* __restrict__ wp,
                       const T* __restrict__ bias, T* __restrict__ out,
                       const int* __restrict__ table, const cct::ConvGeom g, const int phases,
                       const int max_taps, const int ci_pad, const int co_pad) {
    typedef typename cct::Acc<T>::type Acc;
    typedef typename cct::Vec16<Acc>::type V16;
    constexpr int THREADS_M = BM / TM;
    constexpr int THREADS_N = BN / TN;
    constexpr int NT = THREADS_M * THREADS_N;
    // x loads: each thread gathers M_PER_THREAD voxels for K_PER_THREAD channels of a chunk.
    constexpr int M_PER_THREAD = BM >= NT ? BM / NT : 1;
    constexpr int K_STRIDE = BM >= NT ? 1 : NT / BM;
    constexpr int K_PER_THREAD = BK / K_STRIDE;
    constexpr int VN = cct::Vec16<Acc>::n;
    constexpr int B_VECS = BK * BN / VN;
    constexpr int B_PER_THREAD = (B_VECS + NT - 1) / NT;
    static_assert(TM % 4 == 0 && TN % 4 == 0, "register tiles are read in fragments of 4");
    static_assert(BM % NT == 0 || NT % BM == 0, "x loader needs BM and the thread count to nest");
    static_assert(BK % K_STRIDE == 0, "x loader covers the chunk evenly");

    __shared__ __align__(16) Acc As[2][BK][BM];
    __shared__ __align__(16) Acc Bs[2][BK][BN];

    const int tid = threadIdx.x;
    const int grp = blockIdx.z / phases;
    const int ph = blockIdx.z - grp * phases;
    const int* tab = table + ph * (cct::PHASE_HDR + 4 * max_taps);
    const i64 QD = tab[3], QH = tab[4], QW = tab[5];
    const int taps = tab[6];
    const i64 M = g.N * QD * QH * QW;
    const i64 m0 = static_cast<i64>(blockIdx.x) * BM;
    if (m0 >= M) return;
    const int n0 = blockIdx.y * BN;
    const i64 HW = g.H * g.W;
    const i64 DHW = g.D * HW;

    // Phase-voxel coordinates of the voxels this thread gathers (fixed over the K loop).
    int ld_qd[M_PER_THREAD], ld_qh[M_PER_THREAD], ld_qw[M_PER_THREAD];
    i64 ld_base[M_PER_THREAD];
    bool ld_ok[M_PER_THREAD];
    const int k_first = BM >= NT ? 0 : tid / BM;
#pragma unroll
    for (int j = 0; j < M_PER_THREAD; ++j) {
        const i64 m = m0 + (BM >= NT ? tid + j * NT : tid % BM);
        ld_ok[j] = m < M;
        i64 r = ld_ok[j] ? m : 0;
        ld_qw[j] = static_cast<int>(r % QW); r /= QW;
        ld_qh[j] = static_cast<int>(r % QH); r /= QH;
        ld_qd[j] = static_cast<int>(r % QD);
        const i64 n = r / QD;
        ld_base[j] = (n * g.C_in + static_cast<i64>(grp) * g.C_in_g) * DHW;
    }

    const int ci_chunks = ci_pad / BK;
    const int chunks = taps * ci_chunks;
    const Acc* wp_phase = wp + (static_cast<i64>(grp) * phases + ph) * max_taps * ci_pad * co_pad;

    Acc a_reg[M_PER_THREAD][K_PER_THREAD];
    V16 b_reg[B_PER_THREAD];

    auto load_chunk = [&](int c) {
        const int t = c / ci_chunks;
        const int ci0 = (c - t * ci_chunks) * BK;
        const int* tap = tab + cct::PHASE_HDR + 4 * t;
        const int off_d = tap[0], off_h = tap[1], off_w = tap[2];
#pragma unroll
        for (int j = 0; j < M_PER_THREAD; ++j) {
            const int id = ld_qd[j] + off_d, ih = ld_qh[j] + off_h, iw = ld_qw[j] + off_w;
            const bool inside = ld_ok[j] && id >= 0 && id < g.D && ih >= 0 && ih < g.H &&
                                iw >= 0 && iw < g.W;
            const T* src = x + ld_base[j] + (static_cast<i64>(id) * g.H + ih) * g.W + iw;
#pragma unroll
            for (int i = 0; i < K_PER_THREAD; ++i) {
                const int ci = ci0 + k_first + i * K_STRIDE;
                a_reg[j][i] = (inside && ci < g.C_in_g) ? cct::to_acc(src[ci * DHW]) : Acc(0);
            }
        }
        const Acc* wrow = wp_phase + (static_cast<i64>(t) * ci_pad + ci0) * co_pad + n0;
#pragma unroll
        for (int i = 0; i < B_PER_THREAD; ++i) {
            const int e = tid + i * NT;
            if (B_VECS % NT == 0 || e < B_VECS) {
                const int k = e / (BN / VN), nv = e - k * (BN / VN);
                b_reg[i] = *reinterpret_cast<const V16*>(wrow + k * co_pad + nv * VN);
            }
        }
    };
    auto store_chunk = [&](int buf) {
#pragma unroll
        for (int j = 0; j < M_PER_THREAD; ++j) {
            const int ml = BM >= NT ? tid + j * NT : tid % BM;
#pragma unroll
            for (int i = 0; i < K_PER_THREAD; ++i) As[buf][k_first + i * K_STRIDE][ml] = a_reg[j][i];
        }
#pragma unroll
        for (int i = 0; i < B_PER_THREAD; ++i) {
            const int e = tid + i * NT;
            if (B_VECS % NT == 0 || e < B_VECS) {
                const int k = e / (BN / VN), nv = e - k * (BN / VN);
                *reinterpret_cast<V16*>(&Bs[buf][k][nv * VN]) = b_reg[i];
            }
        }
    };

    const int tx = tid % THREADS_M;
    const int ty = tid / THREADS_M;
    Acc acc[TM][TN];
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int j = 0; j < TN; ++j) acc[i][j] = Acc(0);

    if (chunks > 0) {
        load_chunk(0);
        store_chunk(0);
        __syncthreads();
    }
    for (int c = 0; c < chunks; ++c) {
        const int buf = c & 1;
        if (c + 1 < chunks) load_chunk(c + 1);
#pragma unroll
        for (int k = 0; k < BK; ++k) {
            Acc a[TM], b[TN];
#pragma unroll
            for (int i = 0; i < TM / 4; ++i)
                cct::Vec4<Acc>::load(&As[buf][k][(i * THREADS_M + tx) * 4], a + 4 * i);
#pragma unroll
            for (int j = 0; j < TN / 4; ++j)
                cct::Vec4<Acc>::load(&Bs[buf][k][(j * THREADS_N + ty) * 4], b + 4 * j);
#pragma unroll
            for (int i = 0; i < TM; ++i)
#pragma unroll
                for (int j = 0; j < TN; ++j) acc[i][j] = fma(a[i], b[j], acc[i][j]);
        }
        if (c + 1 < chunks) store_chunk(buf ^ 1);
        __syncthreads();
    }

    // Epilogue: bias, round to T, scatter into the phase's output voxels.
    const i64 oHW = g.oH * g.oW;
    const i64 oVol = g.oD * oHW;
    const i64 o0d = tab[0], o0h = tab[1], o0w = tab[2];
#pragma unroll
    for (int i = 0; i < TM; ++i) {
        const i64 m = m0 + ((i / 4) * THREADS_M + tx) * 4 + (i % 4);
        if (m >= M) continue;
        i64 r = m;
        const i64 qw = r % QW; r /= QW;
        const i64 qh = r % QH; r /= QH;
        const i64 qd = r % QD;
        const i64 n = r / QD;
        const i64 sp = (o0d + qd * g.sD) * oHW + (o0h + qh * g.sH) * g.oW + (o0w + qw * g.sW);
        T* o = out + (n * g.C_out + static_cast<i64>(grp) * g.C_out_g) * oVol + sp;
#pragma unroll
        for (int j = 0; j < TN; ++j) {
            const int co = n0 + ((j / 4) * THREADS_N + ty) * 4 + (j % 4);
            if (co < g.C_out_g) {
                const Acc b = g.has_bias ? cct::to_acc(bias[grp * g.C_out_g + co]) : Acc(0);
                o[co * oVol] = cct::from_acc<T>(acc[i][j] + b);
            }
        }
    }
}
