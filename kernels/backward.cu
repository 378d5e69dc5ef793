// Gradients of conv_transpose3d (cupyconvt/_backward_gpu.py): grad_input, grad_weight, grad_bias.
//
// The forward maps input voxel i through tap k to output o = i*s - p + k*dil (per axis; only o in
// [0, out) counts). With off_k = k*dil - p, the three gradients of y = conv_transpose3d(x, w) are
//
//   gx[n, g*C_in_g + ci, i] = sum_{j < C_out_g, k} gy[n, g*C_out_g + j, i*s + off_k] * w[g*C_in_g + ci, j, k]
//   gw[g*C_in_g + ci, j, k] = sum_{n, i} x[n, g*C_in_g + ci, i] * gy[n, g*C_out_g + j, i*s + off_k]
//   gb[c]                   = sum_{n, o} gy[n, c, o]
//
// i.e. gx is conv3d(gy, w, stride, padding, dilation, groups) and gw a GEMM per group whose
// reduction runs over every input voxel. Taps are numbered t = (kd*kH + kh)*kW + kw; the host's
// tap table holds (off_d, off_h, off_w, 0) per tap.
//
// Kernels (each says below how it splits the work):
//   bwd_pack_weights  w -> packed B operand of the grad_input GEMM
//   bwd_data_igemm    grad_input as an implicit GEMM, M = N*D*H*W voxels, N = C_in_g, K = taps*C_out_g
//   bwd_data_narrow   grad_input for few input channels per group (depthwise, narrow groups)
//   bwd_weight_igemm  grad_weight partials: a GEMM tile over (ci) x (j, t) per split of the voxels
//   bwd_reduce_splits the partials summed over the splits in a fixed order
//   bwd_bias_partial, bwd_bias_final  grad_bias in two fixed-order passes
//
// No kernel uses atomics and every sum runs in an order fixed by the launch configuration, which
// the host derives from the problem alone: results are bitwise identical from run to run.
// float32 products and sums are PTX fma.rn.f32 / add.rn.f32 (CuPy compiles with -ftz=true).
#include "common.cuh"

namespace cct {
namespace bwd {

// A CI-wide chunk of one group's input channels, from ci0, of w (C_in, C_out_g, taps) into
// shared memory as wt[j][t][CI] accumulators, zero for channels past C_in_g (the gathers
// bwd_data_narrow and bwd_data_staged read it as broadcasts). The caller syncs.
template <typename T, int CI>
__device__ __forceinline__ void stage_weight_chunk(typename Acc<T>::type* wt, const T* w, int grp,
                                                   int ci0, int C_in_g, int C_out_g, int taps) {
    for (int e = threadIdx.x; e < C_out_g * taps * CI; e += blockDim.x) {
        const int q = e % CI, jt = e / CI;  // jt = j * taps + t, w's own order within a channel
        const int ci = ci0 + q;
        wt[e] = ci < C_in_g ? to_acc(w[(static_cast<i64>(grp) * C_in_g + ci) * C_out_g * taps + jt])
                            : typename Acc<T>::type(0);
    }
}

}  // namespace bwd
}  // namespace cct

// ------------------------------------------------------------------------------------------------
// grad_input, implicit GEMM.
//
// Packs w (C_in, C_out_g, taps) into the GEMM's B operand in the accumulator type, zero where ci
// or co does not exist, so the GEMM reads it 16 bytes at a time with no bounds checks, in the
// order its K loop walks the (tap, BK output channels) chunks: wp[g][t][co_pad][ci_pad], or with
// tap_inner wp[g][co_pad / bk][t][bk][ci_pad] (all taps of a channel chunk in a row).
template <typename T>
__global__ void __launch_bounds__(256)
bwd_pack_weights(const T* __restrict__ w, typename cct::Acc<T>::type* __restrict__ wp,
                 const cct::ConvGeom* __restrict__ geom, const int co_pad, const int ci_pad,
                 const int bk, const int tap_inner) {
    typedef typename cct::Acc<T>::type Acc;
    const cct::ConvGeom& g = *geom;
    const i64 taps = g.kD * g.kH * g.kW;
    const i64 total = g.groups * taps * co_pad * ci_pad;
    for (i64 e = static_cast<i64>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
         e += static_cast<i64>(gridDim.x) * blockDim.x) {
        i64 r = e;
        const i64 ci = r % ci_pad; r /= ci_pad;
        i64 co, t, grp;
        if (tap_inner) {
            const i64 kk = r % bk; r /= bk;
            t = r % taps; r /= taps;
            co = (r % (co_pad / bk)) * bk + kk;
            grp = r / (co_pad / bk);
        } else {
            co = r % co_pad; r /= co_pad;
            t = r % taps;
            grp = r / taps;
        }
        Acc v = Acc(0);
        if (ci < g.C_in_g && co < g.C_out_g)
            v = cct::to_acc(w[((grp * g.C_in_g + ci) * g.C_out_g + co) * taps + t]);
        wp[e] = v;
    }
}

// gx[n, g*C_in_g + ci, i] = sum_{t, co} gy[n, g*C_out_g + co, i*s + off_t] * wp[g][t][co][ci]:
// a GEMM with M = N*D*H*W input voxels, N = C_in_g, K = taps * C_out_g, per group.
//
// Work split: blockIdx.z = group, blockIdx.y = a BN-wide slice of input channels, blockIdx.x = a
// BM-long run of input voxels. The K loop walks (tap, BK output channels) chunks (with tap_inner,
// every tap of a channel chunk in turn, so that neighbouring taps' gathers meet in L1) through a
// STAGES-deep shared-memory ring filled by cp.async (sm_80+): gy is gathered 4 or 8 bytes at a time
// at i*s + off_t (zero-filled outside the output), the packed weights 16 bytes at a time; one
// barrier per chunk. Each thread owns a TM x TN register tile (TM voxels in fragments of 4, TN
// channels in fragments of FN), KU k-steps unrolled. The epilogue stages the C tile through shared
// memory so that consecutive threads write consecutive voxels of one channel. Every element of gx
// is written once. (The structure is kernels/igemm.cu's, without phases and with a strided gather.)
template <typename T, int BM, int BN, int BK, int TM, int TN, int STAGES, int MINB, int KU>
__global__ void __launch_bounds__((BM / TM) * (BN / TN), MINB)
bwd_data_igemm(const T* __restrict__ gy, const typename cct::Acc<T>::type* __restrict__ wp,
               T* __restrict__ gx, const int* __restrict__ tap_table,
               const cct::ConvGeom* __restrict__ geom, const int taps, const int co_pad,
               const int ci_pad, const int tap_inner) {
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
    __shared__ i64 out_off[BM];  // gx offset of each voxel of the tile (channel 0), -1 if none
    Acc* const As = smem;                     // [STAGES][BK][BM]
    Acc* const Bs = smem + STAGES * A_STAGE;  // [STAGES][BK][BN]

    const cct::ConvGeom& g = *geom;
    const int tid = threadIdx.x;
    const int grp = blockIdx.z;
    const i64 D = g.D, H = g.H, W = g.W;
    const i64 DHW = D * H * W;
    const i64 M = g.N * DHW;
    const i64 m0 = static_cast<i64>(blockIdx.x) * BM;
    if (m0 >= M) return;
    const u32 oD = static_cast<u32>(g.oD), oH = static_cast<u32>(g.oH), oW = static_cast<u32>(g.oW);
    const i64 oVol = g.oD * g.oH * g.oW;

    for (int ml = tid; ml < BM; ml += NT) {
        const i64 m = m0 + ml;
        i64 v = -1;
        if (m < M) {
            const i64 n = m / DHW;
            v = (n * g.C_in + static_cast<i64>(grp) * g.C_in_g) * DHW + (m - n * DHW);
        }
        out_off[ml] = v;
    }

    // The gy gather: voxel origins are input voxels times the stride, in gy's output volume.
    cct::ChunkGather<T, BM, BK, NT> ga;
    ga.init(cct::smem_addr(As), oD, oH, oW, oVol);
    const i64 oHW = g.oH * g.oW;
#pragma unroll
    for (int j = 0; j < M_PER_THREAD; ++j) {
        const i64 m = m0 + ga.slot(j);
        if (m < M) {
            i64 n;
            int d, h, w;
            cct::split_voxel(m, D, H, W, n, d, h, w);
            const int od = d * static_cast<int>(g.sD), oh = h * static_cast<int>(g.sH),
                      ow = w * static_cast<int>(g.sW);
            ga.set(j, od, oh, ow,
                   gy + (n * g.C_out + static_cast<i64>(grp) * g.C_out_g + ga.k_first) * oVol +
                       od * oHW + static_cast<i64>(oh) * g.oW + ow);
        } else {
            ga.set(j, ga.NONE, 0, 0, gy);
        }
    }

    const int chunks = taps * (co_pad / BK);
    const int C_out_g = static_cast<int>(g.C_out_g);
    // Chunk c of the group's packed weights starts at c * BK * ci_pad: one pointer walks them.
    const Acc* w_next = wp + static_cast<i64>(grp) * taps * co_pad * ci_pad + blockIdx.y * BN;
    cct::WeightPieces<Acc, BK, BN, NT> wb;  // this thread's 16-byte pieces of a weight stage
    wb.init(tid, cct::smem_addr(Bs), ci_pad);
    const int4* const taps4 = reinterpret_cast<const int4*>(tap_table);
    const int4* tap = taps4;  // the tap of the next chunk to issue
    const int4* const tap_end = taps4 + taps;
    int4 tp = __ldg(tap);     // its offsets, loaded a chunk ahead
    int it_c = 0;             // its first output channel
    i64 chan = 0;             // it_c * oVol

    auto issue = [&](int stage) {
        const i64 off = chan + tp.x * oHW + static_cast<i64>(tp.y) * g.oW + tp.z;
        ga.issue(static_cast<u32>(stage) * (A_STAGE * sizeof(Acc)), off, tp.x, tp.y, tp.z,
                 C_out_g - it_c - ga.k_first);
        wb.issue(tid, static_cast<u32>(stage) * (B_STAGE * sizeof(Acc)), w_next);
        w_next += BK * ci_pad;
        if (tap_inner) {
            if (++tap == tap_end) { tap = taps4; it_c += BK; chan += BK * oVol; }
        } else {
            it_c += BK;
            chan += BK * oVol;
            if (it_c == co_pad) { it_c = 0; chan = 0; ++tap; }
        }
        if (tap != tap_end) tp = __ldg(tap);  // the next chunk's tap (none after the last)
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
#pragma unroll KU
        for (int k = 0; k < BK; ++k)
            cct::tile_step<Acc, TM, TN, FN, THREADS_M, THREADS_N>(as + k * BM, bs + k * BN, tx, ty,
                                                                  acc);
    }
    cct::cp_wait<0>();
    const int C_in_g = static_cast<int>(g.C_in_g);
    const int n0 = blockIdx.y * BN;

    // Epilogue, TN/FN passes of CP channels: the tile goes to shared memory, then consecutive
    // threads write consecutive voxels of one channel.
#pragma unroll
    for (int f = 0; f < TN / FN; ++f) {
        __syncthreads();
        cct::stage_c_pass<CROW, FN, THREADS_M>(smem, acc, f, tx, ty);
        __syncthreads();
#pragma unroll 4
        for (int e = tid; e < CP * BM; e += NT) {
            const int row = e / BM, ml = e - row * BM;
            const int ci = n0 + f * CP + row;
            const i64 o = out_off[ml];
            if (o >= 0 && ci < C_in_g) gx[o + ci * DHW] = cct::from_acc<T>(smem[row * CROW + ml]);
        }
    }
}

// ------------------------------------------------------------------------------------------------
// grad_input for few input channels per group: a direct gather.
//
// Work split: blockIdx.y = (group, CI-wide chunk of its input channels), blockIdx.x = a run of
// VX * blockDim.x input voxels (flattened over n, d, h, w); thread tid owns the VX voxels
// tid + v * blockDim.x of the run (so each warp load reads neighbouring voxels) and CI channels.
// The chunk's weights, wt[j][t][CI] (dynamic shared memory, C_out_g * taps * CI accumulators), are
// staged once and read as broadcasts; gy is read through L1, which holds the rows that the taps
// share, KWB taps of a row at a time (their loads in flight together). Every element of gx is
// written once.
// Three blocks an SM (85 registers); two for float64, whose staged taps take twice the registers.
template <typename T, int CI, int VX>
__global__ void __launch_bounds__(256, sizeof(typename cct::Acc<T>::type) == 8 ? 2 : 3)
bwd_data_narrow(const T* __restrict__ gy, const T* __restrict__ w, T* __restrict__ gx,
                const cct::ConvGeom* __restrict__ geom, const int ci_chunks) {
    typedef typename cct::Acc<T>::type Acc;
    constexpr int KWB = 4;  // taps along w whose gy loads are in flight together
    extern __shared__ __align__(16) unsigned char smem_raw[];
    Acc* const wt = reinterpret_cast<Acc*>(smem_raw);
    const cct::ConvGeom& g = *geom;
    const int grp = blockIdx.y / ci_chunks;
    const int ci0 = (blockIdx.y - grp * ci_chunks) * CI;
    const int kD = static_cast<int>(g.kD), kH = static_cast<int>(g.kH), kW = static_cast<int>(g.kW);
    const int taps = kD * kH * kW;
    const int C_in_g = static_cast<int>(g.C_in_g), C_out_g = static_cast<int>(g.C_out_g);
    cct::bwd::stage_weight_chunk<T, CI>(wt, w, grp, ci0, C_in_g, C_out_g, taps);
    __syncthreads();

    const i64 D = g.D, H = g.H, W = g.W, DHW = D * H * W, M = g.N * DHW;
    const int oD = static_cast<int>(g.oD), oH = static_cast<int>(g.oH), oW = static_cast<int>(g.oW);
    const i64 oVol = g.oD * g.oH * g.oW;
    const int sD = static_cast<int>(g.sD), sH = static_cast<int>(g.sH), sW = static_cast<int>(g.sW);
    const int dD = static_cast<int>(g.dD), dH = static_cast<int>(g.dH), dW = static_cast<int>(g.dW);
    const int pD = static_cast<int>(g.pD), pH = static_cast<int>(g.pH), pW = static_cast<int>(g.pW);
    const i64 m_first = static_cast<i64>(blockIdx.x) * VX * blockDim.x + threadIdx.x;

    // Per voxel: gy's channel-j0 plane base and the voxel's coordinates times the stride.
    const T* base[VX];
    int vd[VX], vh[VX], vw[VX];
    i64 dst[VX];
#pragma unroll
    for (int v = 0; v < VX; ++v) {
        const i64 m = m_first + static_cast<i64>(v) * blockDim.x;
        i64 n = 0;
        int d = 0, h = 0, x = 0;
        if (m < M) cct::split_voxel(m, D, H, W, n, d, h, x);
        vd[v] = m < M ? d * sD : -(1 << 30);  // never inside the output
        vh[v] = h * sH;
        vw[v] = x * sW;
        base[v] = gy + (n * g.C_out + static_cast<i64>(grp) * C_out_g) * oVol;
        dst[v] = m < M ? (n * g.C_in + static_cast<i64>(grp) * C_in_g + ci0) * DHW + (m - n * DHW)
                       : -1;
    }

    Acc acc[VX][CI];
#pragma unroll
    for (int v = 0; v < VX; ++v)
#pragma unroll
        for (int q = 0; q < CI; ++q) acc[v][q] = Acc(0);

    const Acc* wj = wt;
    for (int j = 0; j < C_out_g; ++j) {
        for (int kd = 0; kd < kD; ++kd) {
            const int off_d = kd * dD - pD;
            for (int kh = 0; kh < kH; ++kh) {
                const int off_h = kh * dH - pH;
                const T* row[VX];
                bool row_ok[VX];
#pragma unroll
                for (int v = 0; v < VX; ++v) {
                    const int od = vd[v] + off_d, oh = vh[v] + off_h;
                    row_ok[v] = static_cast<u32>(od) < static_cast<u32>(oD) &&
                                static_cast<u32>(oh) < static_cast<u32>(oH);
                    row[v] = base[v] + (row_ok[v] ? (static_cast<i64>(od) * oH + oh) * oW : 0);
                }
                // KWB taps along w at a time: their loads are issued together, then used.
                for (int kw0 = 0; kw0 < kW; kw0 += KWB) {
                    Acc gv[KWB][VX];
#pragma unroll
                    for (int u = 0; u < KWB; ++u) {
                        const int off_w = (kw0 + u) * dW - pW;
#pragma unroll
                        for (int v = 0; v < VX; ++v) {
                            const int ow = vw[v] + off_w;
                            gv[u][v] = kw0 + u < kW && row_ok[v] &&
                                               static_cast<u32>(ow) < static_cast<u32>(oW)
                                           ? cct::to_acc(row[v][ow])
                                           : Acc(0);
                        }
                    }
                    const Acc* wk = wj + ((kd * kH + kh) * kW + kw0) * CI;
#pragma unroll
                    for (int u = 0; u < KWB; ++u) {
                        if (kw0 + u >= kW) break;
#pragma unroll
                        for (int q = 0; q < CI; ++q) {
                            const Acc wq = wk[u * CI + q];
#pragma unroll
                            for (int v = 0; v < VX; ++v)
                                acc[v][q] = cct::fma_ieee(gv[u][v], wq, acc[v][q]);
                        }
                    }
                }
            }
        }
        wj += taps * CI;
#pragma unroll
        for (int v = 0; v < VX; ++v) base[v] += oVol;
    }

#pragma unroll
    for (int v = 0; v < VX; ++v) {
        if (dst[v] < 0) continue;
#pragma unroll
        for (int q = 0; q < CI; ++q)
            if (ci0 + q < C_in_g) gx[dst[v] + q * DHW] = cct::from_acc<T>(acc[v][q]);
    }
}

// ------------------------------------------------------------------------------------------------
// grad_input for few input channels per group, through shared memory: the gather of
// bwd_data_narrow, with gy read from global memory in 16-byte pieces into a staged box.
//
// Work split: blockIdx.x = (n, d, h tile, w tile), one input plane d of a TH x TW tile of voxels
// (TH = 8*VH rows, TW = 32*VW columns); blockIdx.y = (group, CI-wide chunk of its input
// channels). Lane l of warp r owns the voxels (h0 + r + 8u, w0 + l + 32v), u < VH, v < VW, and CI
// channels: VH*VW*CI accumulators. The chunk's weights, wt[j][t][CI], are staged once.
//
// For every output channel j of the group and every kd, the block stages the box of gy plane
// od = d*sD + kd*dD - pD that the tile's taps read: rows oh0 = h0*sH - pH + [0, rh), and the
// columns from cs, ow0 = w0*sW - pW rounded down to a multiple of 4, in nvec pieces of 4 (a
// staged row is 4*nvec accumulators; column ow0 + c of gy sits at e0 + c, e0 = ow0 - cs). The
// box goes into an NS-deep ring, zero wherever it leaves gy (the plane included). Where `vec`
// is set (oW a multiple of 4; gy 16-byte aligned, 8 for the 16-bit types), a piece lies wholly
// inside or wholly outside a row and moves as one or two cp.async (float, double) or one 8-byte
// load (the 16-bit types, widened to float); else element by element.
//
// Each sum runs over j, kd, kh, kw in turn with zeros where a tap leaves gy, as bwd_data_narrow's
// does: the same fma chain, so both kernels give bitwise the same gx. Every element of gx is
// written once. Shared memory: C_out_g*taps*CI (rounded up to 4) + NS*rh*4*nvec accumulators.
// MINB is the blocks an SM asked of ptxas (a register cap).
template <typename T>
__device__ __forceinline__ void stage_piece(typename cct::Acc<T>::type* dst, const T* src,
                                            const int col, const int oW, const bool row_ok,
                                            const bool vec) {
    if (vec) {  // col and oW multiples of 4: the piece is wholly inside or outside the row
        const bool ok = row_ok && static_cast<u32>(col) < static_cast<u32>(oW);
        if constexpr (sizeof(T) >= 4) {
            constexpr int PER = 16 / static_cast<int>(sizeof(T));  // elements a copy
#pragma unroll
            for (int i = 0; i < 4; i += PER)
                cct::cp_async16_or_zero(dst + i, src + (ok ? col + i : 0), ok);
        } else {  // 8 bytes through registers, widened to float
            const uint2 raw = ok ? *reinterpret_cast<const uint2*>(src + col) : make_uint2(0u, 0u);
            const T* const t = reinterpret_cast<const T*>(&raw);
            *reinterpret_cast<float4*>(dst) =
                make_float4(cct::to_acc(t[0]), cct::to_acc(t[1]), cct::to_acc(t[2]), cct::to_acc(t[3]));
        }
        return;
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const bool ok = row_ok && static_cast<u32>(col + i) < static_cast<u32>(oW);
        cct::GatherX<T>::copy(dst + i, src + (ok ? col + i : 0), ok);
    }
}

template <typename T, int CI, int VH, int VW, int NS = 2, int MINB = 1>
__global__ void __launch_bounds__(256, MINB)
bwd_data_staged(const T* __restrict__ gy, const T* __restrict__ w, T* __restrict__ gx,
                const cct::ConvGeom* __restrict__ geom, const int ci_chunks, const int h_tiles,
                const int w_tiles, const int rh, const int nvec, const int vec) {
    typedef typename cct::Acc<T>::type Acc;
    constexpr int TH = 8 * VH, TW = 32 * VW;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    const cct::ConvGeom& g = *geom;
    const int kD = static_cast<int>(g.kD), kH = static_cast<int>(g.kH), kW = static_cast<int>(g.kW);
    const int taps = kD * kH * kW;
    const int C_in_g = static_cast<int>(g.C_in_g), C_out_g = static_cast<int>(g.C_out_g);
    const int n_wt = C_out_g * taps * CI;
    Acc* const wt = reinterpret_cast<Acc*>(smem_raw);
    Acc* const box = wt + ((n_wt + 3) & ~3);  // 16-byte aligned
    const int sD = static_cast<int>(g.sD), sH = static_cast<int>(g.sH), sW = static_cast<int>(g.sW);
    const int dD = static_cast<int>(g.dD), dH = static_cast<int>(g.dH), dW = static_cast<int>(g.dW);
    const int pD = static_cast<int>(g.pD), pH = static_cast<int>(g.pH), pW = static_cast<int>(g.pW);
    const int D = static_cast<int>(g.D), H = static_cast<int>(g.H), W = static_cast<int>(g.W);
    const int oD = static_cast<int>(g.oD), oH = static_cast<int>(g.oH), oW = static_cast<int>(g.oW);
    const int pitch = 4 * nvec, plane = rh * pitch;  // a staged row; one buffer of the ring
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;

    const int grp = blockIdx.y / ci_chunks;
    const int ci0 = (blockIdx.y - grp * ci_chunks) * CI;
    u32 bx = blockIdx.x;
    const int wt_i = static_cast<int>(bx % static_cast<u32>(w_tiles));
    bx /= static_cast<u32>(w_tiles);
    const int ht_i = static_cast<int>(bx % static_cast<u32>(h_tiles));
    bx /= static_cast<u32>(h_tiles);
    const int d = static_cast<int>(bx % static_cast<u32>(D));
    const i64 n = bx / static_cast<u32>(D);
    const int h0 = ht_i * TH, w0 = wt_i * TW;

    cct::bwd::stage_weight_chunk<T, CI>(wt, w, grp, ci0, C_in_g, C_out_g, taps);  // synced below

    // Staging: piece e of the box is row e / nvec, columns 4*(e % nvec) + [0, 4). The quotient
    // comes from a float product: e < 2^22 and nvec < 2^12 keep it exact (the host checks).
    const i64 oHW = static_cast<i64>(oH) * oW;
    const T* const gy_grp = gy + (n * g.C_out + static_cast<i64>(grp) * C_out_g) * oD * oHW;
    const int oh0 = h0 * sH - pH, ow0 = w0 * sW - pW;
    const int cs = ow0 - (((ow0 % 4) + 4) % 4), e0 = ow0 - cs;
    const int pieces = rh * nvec;
    const float inv_nvec = 1.0f / static_cast<float>(nvec);
    auto stage = [&](int j, int kd, int buf) {
        const int od = d * sD + kd * dD - pD;
        const bool plane_ok = static_cast<u32>(od) < static_cast<u32>(oD);
        const T* const src = gy_grp + (static_cast<i64>(j) * oD + (plane_ok ? od : 0)) * oHW;
        Acc* const dst = box + buf * plane;
        for (int e = threadIdx.x; e < pieces; e += blockDim.x) {
            const int r = static_cast<int>((static_cast<float>(e) + 0.5f) * inv_nvec);
            const int k = e - r * nvec;
            const int oh = oh0 + r;
            const bool row_ok = plane_ok && static_cast<u32>(oh) < static_cast<u32>(oH);
            stage_piece<T>(dst + r * pitch + 4 * k, src + (row_ok ? static_cast<i64>(oh) * oW : 0),
                           cs + 4 * k, oW, row_ok, vec != 0);
        }
    };

    Acc acc[VH][VW][CI];
#pragma unroll
    for (int u = 0; u < VH; ++u)
#pragma unroll
        for (int v = 0; v < VW; ++v)
#pragma unroll
            for (int qq = 0; qq < CI; ++qq) acc[u][v][qq] = Acc(0);

    const int row_step = 8 * sH * pitch;  // between a thread's voxel rows u
    const int col_step = 32 * sW;          // between its voxel columns v
    const int lane_base = warp * sH * pitch + e0 + lane * sW;
    const int stages = C_out_g * kD;
#pragma unroll
    for (int i = 0; i < NS - 1; ++i) {
        if (i < stages) stage(i / kD, i % kD, i);
        cct::cp_commit();
    }
    for (int st = 0; st < stages; ++st) {
        const int ahead = st + NS - 1;
        if (ahead < stages) {
            const int ja = ahead / kD;
            stage(ja, ahead - ja * kD, ahead % NS);
        }
        cct::cp_commit();
        cct::cp_wait<NS - 1>();
        __syncthreads();
        const int j = st / kD, kd = st - j * kD;
        const Acc* brow = box + (st % NS) * plane + lane_base;
        const Acc* wk = wt + (j * taps + kd * kH * kW) * CI;
        for (int kh = 0; kh < kH; ++kh, brow += dH * pitch) {
            const Acc* p = brow;
            for (int kw = 0; kw < kW; ++kw, wk += CI, p += dW) {
                Acc wv[CI];
                if constexpr (CI % 4 == 0) {
#pragma unroll
                    for (int i = 0; i < CI / 4; ++i) cct::Frag<Acc, 4>::load(wk + 4 * i, wv + 4 * i);
                } else {
#pragma unroll
                    for (int i = 0; i < CI; ++i) wv[i] = wk[i];
                }
#pragma unroll
                for (int u = 0; u < VH; ++u)
#pragma unroll
                    for (int v = 0; v < VW; ++v) {
                        const Acc gv = p[u * row_step + v * col_step];
#pragma unroll
                        for (int qq = 0; qq < CI; ++qq)
                            acc[u][v][qq] = cct::fma_ieee(gv, wv[qq], acc[u][v][qq]);
                    }
            }
        }
        __syncthreads();
    }

    const i64 DHW = static_cast<i64>(D) * H * W;
    T* const gx0 = gx + (n * g.C_in + static_cast<i64>(grp) * C_in_g + ci0) * DHW +
                   static_cast<i64>(d) * H * W;
#pragma unroll
    for (int u = 0; u < VH; ++u) {
        const int h = h0 + warp + 8 * u;
#pragma unroll
        for (int v = 0; v < VW; ++v) {
            const int x = w0 + lane + 32 * v;
            if (h >= H || x >= W) continue;
#pragma unroll
            for (int qq = 0; qq < CI; ++qq)
                if (ci0 + qq < C_in_g)
                    gx0[qq * DHW + static_cast<i64>(h) * W + x] = cct::from_acc<T>(acc[u][v][qq]);
        }
    }
}

// ------------------------------------------------------------------------------------------------
// grad_weight partials: gw[g*C_in_g + ci, j, t] summed over one split of the input voxels,
//
//   ws[split][g*C_in_g + ci][j*taps + t] = sum_{voxels i of the split} x[n, ci, i] * gy[n, j, i*s + off_t]
//
// a GEMM tile with rows ci, columns c = j*taps + t (w's own order, so the reduction over splits
// is elementwise) and the reduction over voxels. The voxels are walked in chunks of BK along one
// w-row (n, d, h), so a chunk needs no division; a row's last chunk is zero-padded.
//
// Work split: blockIdx.x = a BN-wide slice of columns, blockIdx.y = a BM-high slice of rows,
// blockIdx.z = (group, split). Each chunk goes into a STAGES-deep ring by cp.async (4 or 8 bytes,
// zero-filled): lanes come in groups of 8 along the voxels, so a warp reads 8 neighbouring voxels
// of 4 rows of x (or 4 columns of gy) at once, and the rows of the staged tiles are padded by
// APAD/BPAD so that those 32 stores hit 32 banks. The columns' gy channel and tap offsets are
// staged once per block. KS groups of threads each own a TM x TN register tile of the whole
// BM x BN tile and take BK/KS k-steps of each chunk (KS > 1 for tiles with few rows, e.g.
// depthwise); their tiles are summed in shared memory in a fixed order at the end. Every element
// of ws is written once.
template <typename T, int BM, int BN, int BK, int TM, int TN, int KS, int STAGES, int MINB>
__global__ void __launch_bounds__(KS * (BM / TM) * (BN / TN), MINB)
bwd_weight_igemm(const T* __restrict__ x, const T* __restrict__ gy,
                 typename cct::Acc<T>::type* __restrict__ ws, const int* __restrict__ tap_table,
                 const cct::ConvGeom* __restrict__ geom, const int splits) {
    typedef typename cct::Acc<T>::type Acc;
    constexpr int THREADS_M = BM / TM;
    constexpr int THREADS_N = BN / TN;
    constexpr int NTILE = THREADS_M * THREADS_N;  // threads of one k-group
    constexpr int NT = KS * NTILE;
    constexpr int FN = TN % 4 == 0 ? 4 : 2;
    constexpr int KPG = BK / KS;  // k-steps of a chunk per k-group
    constexpr int KH = BK / 8;    // 8-voxel runs per chunk
    constexpr int LG = NT / 8;    // lane groups of 8 threads along the voxels
    constexpr int A_TASKS = BM * KH;  // (row, run) pairs of a chunk of x
    constexpr int A_PER = (A_TASKS + LG - 1) / LG;
    constexpr int B_COLS = BN / LG;   // gy columns per lane group
    constexpr int APAD = BM % 8 == 4 ? 8 : 4;  // row pitch = 4 (mod 8): 8 k x 4 rows, 32 banks
    constexpr int BPAD = BN % 8 == 4 ? 8 : 4;
    constexpr int AP = BM + APAD, BP = BN + BPAD;
    constexpr int A_STAGE = BK * AP;
    constexpr int B_STAGE = BK * BP;
    constexpr int PIPE = STAGES * (A_STAGE + B_STAGE);
    constexpr int EPI = KS > 1 ? KS * BM * BN : 0;
    static_assert(TM % 4 == 0 && TN % FN == 0 && BM % 4 == 0, "register tiles are read in fragments");
    static_assert(BK % KS == 0 && BK % 8 == 0, "k-groups and 8-voxel runs split a chunk evenly");
    static_assert(NT % 8 == 0 && BN % LG == 0, "lane groups cover the gy columns evenly");
    static_assert(STAGES >= 2, "a ring of two stages at least");

    __shared__ __align__(16) Acc smem[PIPE > EPI ? PIPE : EPI];
    __shared__ i64 col_chan[BN];  // gy channel plane offset of each column of the tile
    __shared__ int4 col_off[BN];  // its tap offsets (d, h, w), and whether the column exists
    Acc* const As = smem;                     // [STAGES][BK][AP]
    Acc* const Bs = smem + STAGES * A_STAGE;  // [STAGES][BK][BP]

    const cct::ConvGeom& g = *geom;
    const int tid = threadIdx.x;
    const int grp = blockIdx.z / splits;
    const int split = blockIdx.z - grp * splits;
    const int taps = static_cast<int>(g.kD * g.kH * g.kW);
    const int C_in_g = static_cast<int>(g.C_in_g), C_out_g = static_cast<int>(g.C_out_g);
    const int cols = C_out_g * taps;
    const int r0 = blockIdx.y * BM, c0 = blockIdx.x * BN;
    const i64 D = g.D, H = g.H, W = g.W, HW = H * W, DHW = D * HW;
    const u32 oD = static_cast<u32>(g.oD), oH = static_cast<u32>(g.oH), oW = static_cast<u32>(g.oW);
    const i64 oVol = g.oD * g.oH * g.oW;
    const int sD = static_cast<int>(g.sD), sH = static_cast<int>(g.sH), sW = static_cast<int>(g.sW);

    for (int cl = tid; cl < BN; cl += NT) {
        const int col = c0 + cl;
        const bool ok = col < cols;
        const int j = ok ? col / taps : 0, t = ok ? col - j * taps : 0;
        col_chan[cl] = (static_cast<i64>(grp) * C_out_g + j) * oVol;
        col_off[cl] = make_int4(__ldg(tap_table + 4 * t), __ldg(tap_table + 4 * t + 1),
                                __ldg(tap_table + 4 * t + 2), ok ? 1 : 0);
    }

    // This split's chunks: [rc_begin, rc_end) of the N*D*H*ceil(W/BK) row chunks.
    const i64 w_chunks = (W + BK - 1) / BK;
    const i64 row_chunks = g.N * D * H * w_chunks;
    const i64 rc_begin = row_chunks * split / splits;
    const i64 chunks = row_chunks * (split + 1) / splits - rc_begin;

    // The next chunk to issue, as (n, d, h, first w): advanced by one chunk per issue.
    i64 cn;
    int cd, ch, cw;
    {
        i64 r = rc_begin;
        cw = static_cast<int>(r % w_chunks) * BK; r /= w_chunks;
        ch = static_cast<int>(r % H); r /= H;
        cd = static_cast<int>(r % D);
        cn = r / D;
    }
    const int k_lo = tid % 8, lg = tid / 8;  // voxel within a run, lane group
    const i64 x_chan0 = static_cast<i64>(grp) * C_in_g + r0;  // x channel of the tile's row 0

    auto issue = [&](int stage) {
        Acc* as = As + stage * A_STAGE;
        const i64 x_sp = cd * HW + static_cast<i64>(ch) * W + cw;
#pragma unroll
        for (int i = 0; i < A_PER; ++i) {
            const int u = lg + i * LG;
            if (A_TASKS % LG == 0 || u < A_TASKS) {
                const int row = u % BM, k = (u / BM) * 8 + k_lo;
                const bool ok = r0 + row < C_in_g && cw + k < W;
                const T* src = x + ((cn * g.C_in + x_chan0 + row) * DHW + x_sp + k);
                cct::GatherX<T>::copy(as + k * AP + row, ok ? src : x, ok);
            }
        }
        Acc* bs = Bs + stage * B_STAGE;
        const i64 gy_n = cn * g.C_out * oVol;
#pragma unroll
        for (int m = 0; m < B_COLS; ++m) {
            const int cl = lg + m * LG;
            const int4 off = col_off[cl];
            const int od = cd * sD + off.x, oh = ch * sH + off.y;
            const bool row_ok = off.w != 0 && static_cast<u32>(od) < oD && static_cast<u32>(oh) < oH;
            const T* grow =
                gy + (row_ok ? gy_n + col_chan[cl] + (static_cast<i64>(od) * oH + oh) * oW : 0);
#pragma unroll
            for (int kh = 0; kh < KH; ++kh) {
                const int k = kh * 8 + k_lo;
                const int ow = (cw + k) * sW + off.z;
                const bool ok = row_ok && cw + k < W && static_cast<u32>(ow) < oW;
                cct::GatherX<T>::copy(bs + k * BP + cl, ok ? grow + ow : gy, ok);
            }
        }
        cw += BK;
        if (cw >= W) {
            cw = 0;
            if (++ch == H) {
                ch = 0;
                if (++cd == D) { cd = 0; ++cn; }
            }
        }
    };
    __syncthreads();  // the column table is in place

    const int kg = tid / NTILE;  // this thread's k-group
    const int lt = tid - kg * NTILE;
    const int tx = lt % THREADS_M;
    const int ty = lt / THREADS_M;
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
    for (i64 c = 0; c < chunks; ++c) {
        cct::cp_wait<STAGES - 2>();
        __syncthreads();  // chunk c landed for every thread; its ring slot minus one was read by all
        if (c + STAGES - 1 < chunks) issue(static_cast<int>((c + STAGES - 1) % STAGES));
        cct::cp_commit();
        const int slot = static_cast<int>(c % STAGES);
        const Acc* as = As + slot * A_STAGE + kg * KPG * AP;
        const Acc* bs = Bs + slot * B_STAGE + kg * KPG * BP;
#pragma unroll
        for (int k = 0; k < KPG; ++k)
            cct::tile_step<Acc, TM, TN, FN, THREADS_M, THREADS_N>(as + k * AP, bs + k * BP, tx, ty,
                                                                  acc);
    }
    cct::cp_wait<0>();

    Acc* const out = ws + (static_cast<i64>(split) * g.C_in + static_cast<i64>(grp) * C_in_g) * cols;
    if (KS == 1) {
#pragma unroll
        for (int i = 0; i < TM; ++i) {
            const int row = r0 + ((i / 4) * THREADS_M + tx) * 4 + i % 4;
            if (row >= C_in_g) continue;
#pragma unroll
            for (int j = 0; j < TN; ++j) {
                const int col = c0 + ((j / FN) * THREADS_N + ty) * FN + j % FN;
                if (col < cols) out[static_cast<i64>(row) * cols + col] = acc[i][j];
            }
        }
        return;
    }
    // KS > 1: the k-groups' tiles, summed in k-group order.
    __syncthreads();  // every thread is done reading the ring
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int j = 0; j < TN; ++j) {
            const int row = ((i / 4) * THREADS_M + tx) * 4 + i % 4;
            const int col = ((j / FN) * THREADS_N + ty) * FN + j % FN;
            smem[(kg * BM + row) * BN + col] = acc[i][j];
        }
    __syncthreads();
    for (int e = tid; e < BM * BN; e += NT) {
        const int row = e / BN, col = e - row * BN;
        Acc s = smem[e];
#pragma unroll
        for (int q = 1; q < KS; ++q) s = cct::add_ieee(s, smem[q * BM * BN + e]);
        if (r0 + row < C_in_g && c0 + col < cols)
            out[static_cast<i64>(r0 + row) * cols + c0 + col] = s;
    }
}

// out[e] = sum over s < splits of ws[s * count + e], in order of s, rounded once to T.
template <typename T>
__global__ void __launch_bounds__(256)
bwd_reduce_splits(const typename cct::Acc<T>::type* __restrict__ ws, T* __restrict__ out,
                  const i64 count, const int splits) {
    typedef typename cct::Acc<T>::type Acc;
    for (i64 e = static_cast<i64>(blockIdx.x) * blockDim.x + threadIdx.x; e < count;
         e += static_cast<i64>(gridDim.x) * blockDim.x) {
        Acc s = ws[e];
        for (int q = 1; q < splits; ++q) s = cct::add_ieee(s, ws[q * count + e]);
        out[e] = cct::from_acc<T>(s);
    }
}

// ------------------------------------------------------------------------------------------------
// grad_bias, pass 1: part[c * gridDim.y + b] = sum over n of gy[n, c, b*span : (b+1)*span].
// Block (c, b); each thread sums its elements (stride blockDim.x, four independent sums), then the
// block adds its threads' sums in a fixed tree.
template <typename T>
__global__ void __launch_bounds__(256)
bwd_bias_partial(const T* __restrict__ gy, typename cct::Acc<T>::type* __restrict__ part,
                 const cct::ConvGeom* __restrict__ geom, const i64 span) {
    typedef typename cct::Acc<T>::type Acc;
    __shared__ Acc red[256];
    const cct::ConvGeom& g = *geom;
    const i64 c = blockIdx.x;
    const i64 oVol = g.oD * g.oH * g.oW;
    const i64 begin = static_cast<i64>(blockIdx.y) * span;
    const i64 end = begin + span < oVol ? begin + span : oVol;
    const int nt = blockDim.x;
    Acc s0 = Acc(0), s1 = Acc(0), s2 = Acc(0), s3 = Acc(0);
    for (i64 n = 0; n < g.N; ++n) {
        const T* p = gy + (n * g.C_out + c) * oVol;
        i64 e = begin + threadIdx.x;
        for (; e + 3 * nt < end; e += 4 * nt) {
            s0 = cct::add_ieee(s0, cct::to_acc(p[e]));
            s1 = cct::add_ieee(s1, cct::to_acc(p[e + nt]));
            s2 = cct::add_ieee(s2, cct::to_acc(p[e + 2 * nt]));
            s3 = cct::add_ieee(s3, cct::to_acc(p[e + 3 * nt]));
        }
        for (; e < end; e += nt) s0 = cct::add_ieee(s0, cct::to_acc(p[e]));
    }
    red[threadIdx.x] = cct::add_ieee(cct::add_ieee(s0, s1), cct::add_ieee(s2, s3));
    __syncthreads();
    for (int h = 128; h > 0; h >>= 1) {  // blockDim.x is 256 (the host launches no other size)
        if (static_cast<int>(threadIdx.x) < h)
            red[threadIdx.x] = cct::add_ieee(red[threadIdx.x], red[threadIdx.x + h]);
        __syncthreads();
    }
    if (threadIdx.x == 0) part[c * gridDim.y + blockIdx.y] = red[0];
}

// grad_bias, pass 2: out[c] = the sum of part[c * parts : (c+1) * parts] (one block per channel,
// fixed tree), rounded once to T.
template <typename T>
__global__ void __launch_bounds__(256)
bwd_bias_final(const typename cct::Acc<T>::type* __restrict__ part, T* __restrict__ out,
               const int parts) {
    typedef typename cct::Acc<T>::type Acc;
    __shared__ Acc red[256];
    const i64 c = blockIdx.x;
    Acc s = Acc(0);
    for (int e = threadIdx.x; e < parts; e += blockDim.x) s = cct::add_ieee(s, part[c * parts + e]);
    red[threadIdx.x] = s;
    __syncthreads();
    for (int h = 128; h > 0; h >>= 1) {
        if (static_cast<int>(threadIdx.x) < h)
            red[threadIdx.x] = cct::add_ieee(red[threadIdx.x], red[threadIdx.x + h]);
        __syncthreads();
    }
    if (threadIdx.x == 0) out[c] = cct::from_acc<T>(red[0]);
}
