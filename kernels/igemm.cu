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
// Work split: grid z = (group, phase), y = a BN-wide slice of output channels, x = a BM-long run
// of phase voxels, renumbered so that the phases of one run go out together (cct::gemm_tile).
// Only phases with taps are launched (the host lists them first in the table;
// igemm_fill_tapless writes the outputs of the others). The K loop walks (tap, BK input
// channels) chunks through a STAGES-deep shared-memory ring filled by cp.async (sm_80+): x is
// gathered 4 or 8 bytes at a time (zero-filled outside the input), the packed weights 16 bytes
// at a time; one barrier per chunk. Each thread owns a TM x TN register tile (TM voxels in
// fragments of 4, TN channels in fragments of FN), KU k-steps unrolled. The epilogue stages the
// C tile through shared memory so that consecutive threads write consecutive voxels of one
// channel. Every output element is written once (no atomics): results are deterministic.
#include "common.cuh"

// Packs w (C_in, C_out_g, kD, kH, kW) into wp[g][phase][tap][ci_pad][co_pad] in the accumulator
// type, zero where the tap, ci or co does not exist, so the GEMM reads it with no bounds checks.
// `phases` counts the phases with taps, which the host puts first in the table. 32-bit index
// arithmetic when the packed array has fewer than 2^31 elements.
template <typename T, typename I>
__device__ __forceinline__ void igemm_pack_loop(const T* __restrict__ w,
                                                typename cct::Acc<T>::type* __restrict__ wp,
                                                const int* __restrict__ table,
                                                const cct::ConvGeom& g, const I total,
                                                const int phases, const int max_taps,
                                                const int ci_pad, const int co_pad) {
    typedef typename cct::Acc<T>::type Acc;
    const i64 taps_all = g.kD * g.kH * g.kW;
    const int C_in_g = static_cast<int>(g.C_in_g), C_out_g = static_cast<int>(g.C_out_g);
    const int stride_tab = cct::PHASE_HDR + 4 * max_taps;
    for (I e = static_cast<I>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
         e += static_cast<I>(gridDim.x) * blockDim.x) {
        I r = e;
        const int co = static_cast<int>(r % static_cast<I>(co_pad)); r /= static_cast<I>(co_pad);
        const int ci = static_cast<int>(r % static_cast<I>(ci_pad)); r /= static_cast<I>(ci_pad);
        const int t = static_cast<int>(r % static_cast<I>(max_taps)); r /= static_cast<I>(max_taps);
        const int ph = static_cast<int>(r % static_cast<I>(phases));
        const i64 grp = static_cast<i64>(r / static_cast<I>(phases));
        const int* tab = table + ph * stride_tab;
        Acc v = Acc(0);
        if (t < __ldg(tab + 6) && ci < C_in_g && co < C_out_g) {
            const int w_tap = __ldg(tab + cct::PHASE_HDR + 4 * t + 3);
            v = cct::to_acc(w[((grp * C_in_g + ci) * C_out_g + co) * taps_all + w_tap]);
        }
        wp[e] = v;
    }
}

template <typename T>
__global__ void igemm_pack_weights(const T* __restrict__ w, typename cct::Acc<T>::type* __restrict__ wp,
                                   const int* __restrict__ table,
                                   const cct::ConvGeom* __restrict__ geom, const int phases,
                                   const int max_taps, const int ci_pad, const int co_pad) {
    const cct::ConvGeom g = *geom;
    const i64 total = g.groups * static_cast<i64>(phases) * max_taps * ci_pad * co_pad;
    if (total < 2147483647LL)
        igemm_pack_loop<T, u32>(w, wp, table, g, static_cast<u32>(total), phases, max_taps, ci_pad,
                                co_pad);
    else
        igemm_pack_loop<T, i64>(w, wp, table, g, total, phases, max_taps, ci_pad, co_pad);
}

// Writes bias (or zero) to every output element of a phase with no taps (e.g. stride 2 with
// dilation 2: 7 of the 8 phases), so the GEMM launches only over phases with taps. tapless[] holds
// one flag per residue (o + padding) mod stride of each axis (sD, then sH, then sW entries): a
// phase has no taps exactly when one of its axes' residues has none. Grid (oD, C_out, N), each
// block one (n, c, od) plane at a time, no division in the loops: a tapless plane is one
// contiguous run; otherwise each warp takes rows, a tapless row is contiguous and a mixed row gets
// only its tapless columns. Every element the GEMM does not write is written here, once.
template <typename T>
__global__ void __launch_bounds__(256)
igemm_fill_tapless(const T* __restrict__ bias, T* __restrict__ out, const int* __restrict__ tapless,
                   const cct::ConvGeom* __restrict__ geom) {
    const cct::ConvGeom& g = *geom;
    const int sD = static_cast<int>(g.sD), sH = static_cast<int>(g.sH), sW = static_cast<int>(g.sW);
    const int* const fh = tapless + sD;
    const int* const fw = fh + sH;
    const i64 od = blockIdx.x;
    const i64 oD = g.oD, oH = g.oH, oW = g.oW, HW = oH * oW;
    const i64 C_out = g.C_out, N = g.N;
    const bool plane_tapless = __ldg(tapless + (od + g.pD) % sD) != 0;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int warps = blockDim.x >> 5;
    const int step_w = 32 % sW, step_h = warps % sH;
    const int rw0 = static_cast<int>((lane + g.pW) % sW);
    const int rh0 = static_cast<int>((warp + g.pH) % sH);
    const bool has_bias = g.has_bias != 0;
    for (i64 c = blockIdx.y; c < C_out; c += gridDim.y) {
        const T v = has_bias ? bias[c] : cct::from_acc<T>(typename cct::Acc<T>::type(0));
        for (i64 n = blockIdx.z; n < N; n += gridDim.z) {
            T* const dst = out + ((n * C_out + c) * oD + od) * HW;
            if (plane_tapless) {
                for (i64 e = threadIdx.x; e < HW; e += blockDim.x) dst[e] = v;
                continue;
            }
            int rh = rh0;
            for (i64 h = warp; h < oH; h += warps) {
                const bool row = __ldg(fh + rh) != 0;
                T* const r = dst + h * oW;
                int rw = rw0;
                for (i64 w = lane; w < oW; w += 32) {
                    if (row || __ldg(fw + rw)) r[w] = v;
                    rw += step_w;
                    if (rw >= sW) rw -= sW;
                }
                rh += step_h;
                if (rh >= sH) rh -= sH;
            }
        }
    }
}

template <typename T, int BM, int BN, int BK, int TM, int TN, int STAGES, int MINB, int KU>
__global__ void __launch_bounds__((BM / TM) * (BN / TN), MINB)
igemm_conv_transpose3d(const T* __restrict__ x, const typename cct::Acc<T>::type* __restrict__ wp,
                       const T* __restrict__ bias, T* __restrict__ out,
                       const int* __restrict__ table, const cct::ConvGeom* __restrict__ geom,
                       const int phases, const int max_taps, const int ci_pad, const int co_pad) {
    typedef typename cct::Acc<T>::type Acc;
    constexpr int THREADS_M = BM / TM;
    constexpr int THREADS_N = BN / TN;
    constexpr int NT = THREADS_M * THREADS_N;
    constexpr int FN = TN % 4 == 0 ? 4 : 2;  // channel fragment width
    constexpr int M_PER_THREAD = cct::ChunkGather<T, BM, BK, NT>::M_PER_THREAD;
    constexpr int VN = 16 / static_cast<int>(sizeof(Acc));  // accumulators per 16-byte vector
    constexpr int A_STAGE = BK * BM;
    constexpr int B_STAGE = BK * BN;
    constexpr int PIPE = STAGES * (A_STAGE + B_STAGE);
    constexpr int CP = THREADS_N * FN;  // channels per epilogue pass
    constexpr int CROW = BM + VN;       // epilogue row pitch (16 bytes of padding)
    constexpr int EPI = CP * CROW;
    static_assert(TM % 4 == 0 && TN % FN == 0, "register tiles are read in fragments");
    static_assert(BN % VN == 0 && STAGES >= 2, "weights are copied in 16-byte vectors");

    __shared__ __align__(16) Acc smem[PIPE > EPI ? PIPE : EPI];
    __shared__ i64 out_off[BM];  // output offset of each voxel of the tile (channel 0), -1 if none
    Acc* const As = smem;                   // [STAGES][BK][BM]
    Acc* const Bs = smem + STAGES * A_STAGE;  // [STAGES][BK][BN]

    // Geometry is read where it is used, not copied whole: registers go to the tile.
    const cct::ConvGeom& g = *geom;
    const int tid = threadIdx.x;
    const cct::GemmTileIdx bt = cct::gemm_tile<true>(phases);
    const int grp = bt.grp, ph = bt.ph;
    const int* tab = table + ph * (cct::PHASE_HDR + 4 * max_taps);
    const i64 QD = tab[3], QH = tab[4], QW = tab[5];
    const int taps = tab[6];
    const i64 M = g.N * QD * QH * QW;
    const i64 m0 = bt.m * BM;
    if (m0 >= M) return;
    const i64 DHW = g.D * g.H * g.W;

    for (int ml = tid; ml < BM; ml += NT) {
        const i64 m = m0 + ml;
        i64 v = -1;
        if (m < M) {
            i64 n; int qd, qh, qw;
            cct::split_voxel(m, QD, QH, QW, n, qd, qh, qw);
            const i64 oVol = g.oD * g.oH * g.oW;
            v = (n * g.C_out + static_cast<i64>(grp) * g.C_out_g) * oVol +
                ((tab[0] + qd * g.sD) * g.oH + tab[1] + qh * g.sH) * g.oW + tab[2] + qw * g.sW;
        }
        out_off[ml] = v;
    }

    // The x gather: voxel origins are phase-voxel coordinates, in x's input volume.
    cct::ChunkGather<T, BM, BK, NT> ga;
    ga.init(cct::smem_addr(As), static_cast<u32>(g.D), static_cast<u32>(g.H),
            static_cast<u32>(g.W), DHW);
    const i64 HW = g.H * g.W;
#pragma unroll
    for (int j = 0; j < M_PER_THREAD; ++j) {
        const i64 m = m0 + ga.slot(j);
        if (m < M) {
            i64 n;
            int qd, qh, qw;
            cct::split_voxel(m, QD, QH, QW, n, qd, qh, qw);
            ga.set(j, qd, qh, qw,
                   x + (n * g.C_in + static_cast<i64>(grp) * g.C_in_g + ga.k_first) * DHW +
                       qd * HW + static_cast<i64>(qh) * g.W + qw);
        } else {
            ga.set(j, ga.NONE, 0, 0, x);
        }
    }

    const int chunks = taps * (ci_pad / BK);
    const int C_in_g = static_cast<int>(g.C_in_g);
    // Chunk c of the phase's packed weights starts at c * BK * co_pad: one pointer walks them.
    const Acc* w_next = wp + (static_cast<i64>(grp) * phases + ph) * max_taps * ci_pad * co_pad +
                        bt.n * BN;
    cct::WeightPieces<Acc, BK, BN, NT> wb;  // this thread's 16-byte pieces of a weight stage
    wb.init(tid, cct::smem_addr(Bs), co_pad);
    // The phase's taps, (off_d, off_h, off_w, w_tap) rows of 16 bytes.
    const int4* tap = reinterpret_cast<const int4*>(tab + cct::PHASE_HDR);  // the next chunk's
    const int4* const tap_end = tap + taps;
    int4 tp = __ldg(tap);  // its offsets, loaded a chunk ahead
    int it_c = 0;          // its first input channel
    i64 chan = 0;          // it_c * DHW

    auto issue = [&](int stage) {
        const i64 off = chan + tp.x * HW + static_cast<i64>(tp.y) * g.W + tp.z;
        ga.issue(static_cast<u32>(stage) * (A_STAGE * sizeof(Acc)), off, tp.x, tp.y, tp.z,
                 C_in_g - it_c - ga.k_first);
        wb.issue(tid, static_cast<u32>(stage) * (B_STAGE * sizeof(Acc)), w_next);
        w_next += BK * co_pad;
        it_c += BK;
        chan += BK * DHW;
        if (it_c == ci_pad) {
            it_c = 0;
            chan = 0;
            if (++tap != tap_end) tp = __ldg(tap);  // the next tap (none after the last)
        }
    };

    const int tx = tid % THREADS_M;
    const int ty = tid / THREADS_M;
    Acc acc[TM][TN];
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int j = 0; j < TN; ++j) acc[i][j] = Acc(0);

#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < chunks) issue(s);
        cct::cp_commit();
    }
    for (int c = 0; c < chunks; ++c) {
        cct::cp_wait<STAGES - 2>();
        __syncthreads();  // chunk c landed for every thread; its ring slot minus one was read by all
        if (c + STAGES - 1 < chunks) issue((c + STAGES - 1) % STAGES);
        cct::cp_commit();
        const Acc* as = As + (c % STAGES) * A_STAGE;
        const Acc* bs = Bs + (c % STAGES) * B_STAGE;
        // KU k-steps unrolled: full unrolling lets ptxas hoist every fragment load and spill
        // under the register cap.
#pragma unroll KU
        for (int k = 0; k < BK; ++k) {
            Acc a[TM], b[TN];
#pragma unroll
            for (int i = 0; i < TM / 4; ++i)
                cct::Frag<Acc, 4>::load(as + k * BM + (i * THREADS_M + tx) * 4, a + 4 * i);
#pragma unroll
            for (int j = 0; j < TN / FN; ++j)
                cct::Frag<Acc, FN>::load(bs + k * BN + (j * THREADS_N + ty) * FN, b + FN * j);
#pragma unroll
            for (int i = 0; i < TM; ++i)
#pragma unroll
                for (int j = 0; j < TN; ++j) acc[i][j] = cct::fma_ieee(a[i], b[j], acc[i][j]);
        }
    }
    cct::cp_wait<0>();
    const i64 oVol = g.oD * g.oH * g.oW;
    const int C_out_g = static_cast<int>(g.C_out_g);
    const int n0 = bt.n * BN;
    const T* bias_g = g.has_bias ? bias + grp * g.C_out_g : nullptr;

    // Epilogue, TN/FN passes of CP channels: the tile goes to shared memory, then consecutive
    // threads add the bias and write consecutive voxels of one channel.
#pragma unroll
    for (int f = 0; f < TN / FN; ++f) {
        __syncthreads();
        cct::stage_c_pass<CROW, FN, THREADS_M>(smem, acc, f, tx, ty);
        __syncthreads();
#pragma unroll 4
        for (int e = tid; e < CP * BM; e += NT) {
            const int row = e / BM, ml = e - row * BM;
            const int co = n0 + f * CP + row;
            const i64 o = out_off[ml];
            if (o >= 0 && co < C_out_g) {
                const Acc b = bias_g != nullptr ? cct::to_acc(bias_g[co]) : Acc(0);
                out[o + co * oVol] = cct::from_acc<T>(cct::add_ieee(smem[row * CROW + ml], b));
            }
        }
    }
}
