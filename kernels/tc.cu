// Tensor-core implicit-GEMM transposed 3D convolution (mma.sync, sm_80+), one GEMM per output
// stride phase, on a channels-last (NDHWC) input.
//
// As in igemm.cu, the outputs of one stride phase form a dense stride-1 correlation:
//
//   out[n, g*C_out_g + co, o0 + q*s]  =  bias[co] + sum_{tap t of the phase, ci < C_in_g}
//                                        x[n, q + off_t, g*C_in_g + ci] * w[g*C_in_g + ci, co, t]
//
// a GEMM with M = N * Q_D * Q_H * Q_W phase voxels, N = C_out_g, K = taps * C_in_g. With x in
// NDHWC the K run of one (voxel, tap) is contiguous, so A rows and the packed weights
// wp[g][phase][tap][co][ci] (B, K-major) both move 16 bytes per cp.async, and both sit in shared
// memory K-contiguous, rows padded by 16 bytes (conflict-free ldmatrix and 32-bit fragment reads).
//
// MODE picks the arithmetic (float32 accumulation in every mode):
//   0  float16 / bfloat16 operands, mma m16n8k16 fed by ldmatrix;
//   1  TF32 ("medium"): float32 operands rounded to TF32 (cvt.rna), mma m16n8k8;
//   2  3xTF32 ("high"): each operand split as big = tf32(v), small = tf32(v - big), and
//      a*b ~ small_a*big_b + big_a*small_b + big_a*big_b (three MMAs): float32 accuracy.
//
// Work split: grid z = (group, phase), y = a BN-wide slice of output channels, x = a BM-long run
// of phase voxels (or a box of them); with channels-first output the blocks are renumbered so that
// the phases of one run go out together (cct::gemm_tile). WM x WN warps; a warp owns a (BM/WM) x
// (BN/WN) tile of 16 x 8 MMA tiles. The K loop walks (tap, BK input channels) chunks through a
// STAGES-deep cp.async ring, one barrier per chunk. Every phase is launched: a phase with no taps
// runs no K chunk and its epilogue writes the bias (or zero). The epilogue stages the C tile
// through shared memory so that stores are coalesced: runs of voxels of one channel (NCDHW out) or
// runs of channels of one voxel (NDHWC out). Each output element is written once: deterministic.
#include "common.cuh"
#include "tc_shared.cuh"

namespace cct {

// D = A * B + D on one 16 x 8 tile (A row-major 16 x k, B column-major k x 8).
template <typename T> __device__ __forceinline__ void mma_16816(float* d, const u32* a, const u32* b);
template <> __device__ __forceinline__ void mma_16816<half_t>(float* d, const u32* a, const u32* b) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
template <> __device__ __forceinline__ void mma_16816<bf16_t>(float* d, const u32* a, const u32* b) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
__device__ __forceinline__ void mma_1688_tf32(float* d, const u32* a, const u32* b) {
    asm("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

__device__ __forceinline__ void ldsm_x4(u32* r, u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}
__device__ __forceinline__ void ldsm_x2(u32* r, u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];"
                 : "=r"(r[0]), "=r"(r[1])
                 : "r"(addr));
}

__device__ __forceinline__ u32 to_tf32(float v) {
    u32 r;
    asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(v));
    return r;
}
// big = tf32(v), small = tf32(v - big): big + small carries v to about 2^-22 relative.
__device__ __forceinline__ void split_tf32(float v, u32& big, u32& small) {
    big = to_tf32(v);
    float rest;
    asm("sub.rn.f32 %0, %1, %2;" : "=f"(rest) : "f"(v), "f"(__uint_as_float(big)));
    small = to_tf32(rest);
}
// The three products a_small*b_big + a_big*b_small + a_big*b_big keep IEEE's special values only
// if an infinity meets its partner once, not as big beside a residual of NaN (Inf - Inf) or of
// the other sign. The residual is not finite exactly when v is Inf or NaN, or v lies within half
// a TF32 ulp of FLT_MAX and big rounded up to Inf; such a split is repaired to big = 0 and small
// = v (FLT_MAX with v's sign in the last case), so that a_small*b_big carries v alone. (Both
// operands infinite: Inf*0, NaN.)
__device__ __forceinline__ bool split_needs_repair(u32 small) {
    return !isfinite(__uint_as_float(small));
}
__device__ __forceinline__ void repair_split(u32& big, u32& small) {
    const float fb = __uint_as_float(big), fs = __uint_as_float(small);
    if (!isfinite(fs)) {
        small = (isinf(fb) && isinf(fs)) ? __float_as_uint(copysignf(3.40282347e38f, fb)) : big;
        big = 0u;
    }
}

}  // namespace cct

// box_tab (HALO only): BOX_HDR ints (TD, TH, TW, nbd, nbh, nbw, HD, HH, HW, PA), then 3 per phase
// (the smallest tap offset along d, h, w). A HALO block owns a box of TD x TH x TW phase voxels
// of one sample (BM = TD*TH*TW; nbd x nbh x nbw boxes per sample) and stages, once, its input
// tile: HD x HH x HW voxels (the box plus the span of the phase's tap offsets) of every input
// channel of the group, at a pitch of PA elements; each tap is then a shifted view of that tile
// and only the weights stream through the ring. Without HALO a block owns BM consecutive phase
// voxels and gathers their rows of x for every (tap, channel chunk).
enum { BOX_HDR = 10 };

template <typename T, int MODE, int BM, int BN, int BK, int WM, int WN, int STAGES, int MINB,
          bool CL_OUT, bool HALO>
__global__ void __launch_bounds__(WM * WN * 32, MINB)
tc_conv_transpose3d(const T* __restrict__ x, const T* __restrict__ wp, const T* __restrict__ bias,
                    T* __restrict__ out, const int* __restrict__ table,
                    const cct::ConvGeom* __restrict__ geom, const int phases, const int max_taps,
                    const int ci_pad, const int co_pad, const int* __restrict__ box_tab) {
    constexpr int NT = WM * WN * 32;
    constexpr int VEC = 16 / static_cast<int>(sizeof(T));  // elements per 16-byte copy
    constexpr int P = BK + VEC;                            // shared row pitch of a B stage
    constexpr int WTM = BM / WM, WTN = BN / WN;            // warp tile
    constexpr int MT = WTM / 16, NTL = WTN / 8;            // MMA tiles per warp
    constexpr int KSTEP = MODE == 0 ? 16 : 8;
    constexpr int ROW_VECS = BK / VEC;
    constexpr int ROW_STEP = NT / ROW_VECS;  // rows between one thread's copies
    constexpr int A_PER = BM / ROW_STEP;
    constexpr int B_PER = (BN * ROW_VECS + NT - 1) / NT;
    constexpr int A_STAGE = HALO ? 0 : BM * P, B_STAGE = BN * P;
    static_assert(WTM % 16 == 0 && WTN % 8 == 0 && BK % KSTEP == 0, "whole MMA tiles");
    static_assert(NT % ROW_VECS == 0 && BM % ROW_STEP == 0, "A rows split evenly");
    static_assert(MODE == 0 ? sizeof(T) == 2 : sizeof(T) == 4, "MODE matches the type");

    extern __shared__ __align__(16) unsigned char smem_raw[];
    __shared__ i64 out_off[BM];  // output offset of each voxel of the tile (channel 0), -1 if none

    const cct::ConvGeom& g = *geom;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const cct::GemmTileIdx bt = cct::gemm_tile<!CL_OUT>(phases);
    const int grp = bt.grp, ph = bt.ph;
    const int* tab = table + ph * (cct::PHASE_HDR + 4 * max_taps);
    const i64 QD = tab[3], QH = tab[4], QW = tab[5];
    const int taps = tab[6];
    const i64 oVol = g.oD * g.oH * g.oW;
    const i64 C_in = g.C_in, C_out = g.C_out;
    const u32 D = static_cast<u32>(g.D), H = static_cast<u32>(g.H), W = static_cast<u32>(g.W);
    const int C_in_g = static_cast<int>(g.C_in_g);

    // HALO: the block's box; otherwise its run of BM phase voxels [m0, m0 + BM).
    int TH = 1, TW = 1, HH = 1, HW = 1, PA = 0;
    int q0d = 0, q0h = 0, q0w = 0, min_d = 0, min_h = 0, min_w = 0;
    i64 n_box = 0, m0 = 0;
    if constexpr (HALO) {
        const int TD = __ldg(box_tab);
        TH = __ldg(box_tab + 1); TW = __ldg(box_tab + 2);
        const int nbh = __ldg(box_tab + 4), nbw = __ldg(box_tab + 5);
        HH = __ldg(box_tab + 7); HW = __ldg(box_tab + 8); PA = __ldg(box_tab + 9);
        i64 b = bt.m;
        const int bw = static_cast<int>(b % nbw); b /= nbw;
        const int bh = static_cast<int>(b % nbh); b /= nbh;
        const int nbd = __ldg(box_tab + 3);
        const int bd = static_cast<int>(b % nbd);
        n_box = b / nbd;
        q0d = bd * TD; q0h = bh * TH; q0w = bw * TW;
        if (n_box >= g.N || q0d >= QD || q0h >= QH || q0w >= QW) return;
        min_d = __ldg(box_tab + BOX_HDR + 3 * ph);
        min_h = __ldg(box_tab + BOX_HDR + 3 * ph + 1);
        min_w = __ldg(box_tab + BOX_HDR + 3 * ph + 2);
    } else {
        m0 = bt.m * BM;
        if (m0 >= g.N * QD * QH * QW) return;
    }
    T* const As = reinterpret_cast<T*>(smem_raw);  // HALO: [HD*HH*HW][PA]; else [STAGES][BM][P]
    T* const Bs = As + (HALO ? 0 : STAGES * A_STAGE);
    // (B follows the halo tile at a 16-byte boundary: PA is a multiple of VEC.)
    T* const Bring = HALO ? As + __ldg(box_tab + 6) * HH * HW * PA : Bs;

    for (int ml = tid; ml < BM; ml += NT) {
        i64 n = 0;
        int qd, qh, qw;
        bool valid;
        if constexpr (HALO) {
            qw = q0w + ml % TW;
            qh = q0h + (ml / TW) % TH;
            qd = q0d + ml / (TW * TH);
            n = n_box;
            valid = qd < QD && qh < QH && qw < QW;
        } else {
            const i64 m = m0 + ml;
            valid = m < g.N * QD * QH * QW;
            qd = qh = qw = 0;
            if (valid) cct::split_voxel(m, QD, QH, QW, n, qd, qh, qw);
        }
        i64 v = -1;
        if (valid) {
            const i64 vox = ((tab[0] + qd * g.sD) * g.oH + tab[1] + qh * g.sH) * g.oW + tab[2] +
                            qw * g.sW;
            v = CL_OUT ? (n * oVol + vox) * C_out + static_cast<i64>(grp) * g.C_out_g
                       : (n * C_out + static_cast<i64>(grp) * g.C_out_g) * oVol + vox;
        }
        out_off[ml] = v;
    }

    // Without HALO: the A rows this thread copies (one 16-byte column of each), fixed over K.
    const int a_col = tid % ROW_VECS;
    int ld_qd[A_PER], ld_qh[A_PER], ld_qw[A_PER];
    const T* ld_base[A_PER];
    if constexpr (!HALO) {
#pragma unroll
        for (int j = 0; j < A_PER; ++j) {
            const i64 m = m0 + tid / ROW_VECS + j * ROW_STEP;
            i64 n = 0;
            ld_qd[j] = 0; ld_qh[j] = 0; ld_qw[j] = 0;
            if (m < g.N * QD * QH * QW) cct::split_voxel(m, QD, QH, QW, n, ld_qd[j], ld_qh[j], ld_qw[j]);
            else ld_qd[j] = -(1 << 30);  // never inside the input
            ld_base[j] = x + n * g.D * g.H * g.W * C_in + static_cast<i64>(grp) * g.C_in_g +
                         a_col * VEC;
        }
    }

    const int chunks = taps * (ci_pad / BK);
    const T* w_next = wp + ((static_cast<i64>(grp) * phases + ph) * max_taps * co_pad +
                            static_cast<i64>(bt.n) * BN) * ci_pad;
    const int* tap = tab + cct::PHASE_HDR;  // the tap of the next chunk to issue
    int it_c = 0;                            // its first input channel

    if (HALO && taps > 0) {
        // The whole input tile, every channel (zero outside the input and past C_in_g), in the
        // first cp.async group: the first chunk's wait covers it.
        const int HD = __ldg(box_tab + 6);
        const int cv = ci_pad / VEC;
        const int hv_all = HD * HH * HW;
        const int i0d = q0d + min_d, i0h = q0h + min_h, i0w = q0w + min_w;
        const T* xb = x + n_box * g.D * g.H * g.W * C_in + static_cast<i64>(grp) * g.C_in_g;
        for (int e = tid; e < hv_all * cv; e += NT) {
            const int hv = e / cv, v = e - hv * cv;
            const int hw = hv % HW, hh = (hv / HW) % HH, hd = hv / (HW * HH);
            const int id = i0d + hd, ih = i0h + hh, iw = i0w + hw;
            const bool ok = v * VEC < C_in_g && static_cast<u32>(id) < D &&
                            static_cast<u32>(ih) < H && static_cast<u32>(iw) < W;
            const T* src = xb + ((static_cast<i64>(id) * H + ih) * W + iw) * C_in + v * VEC;
            cct::cp_async16_or_zero(As + hv * PA + v * VEC, ok ? src : x, ok);
        }
    }

    auto issue = [&](int stage) {
        if constexpr (!HALO) {
            const int off_d = __ldg(tap), off_h = __ldg(tap + 1), off_w = __ldg(tap + 2);
            T* as = As + stage * A_STAGE;
            const bool ch_ok = it_c + a_col * VEC < C_in_g;
#pragma unroll
            for (int j = 0; j < A_PER; ++j) {
                const int id = ld_qd[j] + off_d, ih = ld_qh[j] + off_h, iw = ld_qw[j] + off_w;
                const bool ok = ch_ok && static_cast<u32>(id) < D && static_cast<u32>(ih) < H &&
                                static_cast<u32>(iw) < W;
                const T* src =
                    ld_base[j] + ((static_cast<i64>(id) * H + ih) * W + iw) * C_in + it_c;
                const int row = tid / ROW_VECS + j * ROW_STEP;
                cct::cp_async16_or_zero(as + row * P + a_col * VEC, ok ? src : x, ok);
            }
        }
        T* bs = Bring + stage * B_STAGE;
        const T* wsrc = w_next + it_c;
#pragma unroll
        for (int i = 0; i < B_PER; ++i) {
            const int e = tid + i * NT;
            if ((BN * ROW_VECS) % NT == 0 || e < BN * ROW_VECS) {
                const int n = e / ROW_VECS, v = e - n * ROW_VECS;
                cct::copy16(bs + n * P + v * VEC, wsrc + static_cast<i64>(n) * ci_pad + v * VEC);
            }
        }
        it_c += BK;
        if (it_c == ci_pad) {
            it_c = 0;
            tap += 4;
            w_next += static_cast<i64>(co_pad) * ci_pad;
        }
    };

    const int wm = warp % WM, wn = warp / WM;
    const int gq = lane >> 2, tq = lane & 3;  // MMA fragment row group and thread in group
    // HALO: tile row (before the tap's shift) of the A row this lane hands to ldmatrix.
    int hrow[MT];
    if constexpr (HALO) {
#pragma unroll
        for (int i = 0; i < MT; ++i) {
            const int ml = wm * WTM + i * 16 + (lane & 15);
            hrow[i] = ((ml / (TW * TH)) * HH + (ml / TW) % TH) * HW + ml % TW;
        }
    }
    // Byte offsets of the rows this lane hands to ldmatrix, from the A view of a chunk (HALO:
    // the unshifted tile; else a ring slot) and from a B ring slot. A (16 x 16 bytes of k per
    // m-tile): lanes 0-15 rows 0-15 at k byte 0, lanes 16-31 the same rows at byte 16. B (8 x 16
    // bytes per n-tile, two n-tiles an x4): n row lane & 7 of tile (lane >> 4), k byte 16 for
    // lanes 8-15 and 24-31.
    const u32 a_base = cct::smem_addr(As), b_base = cct::smem_addr(Bring);
    u32 a_off[MT], b_off[(NTL + 1) / 2];
#pragma unroll
    for (int i = 0; i < MT; ++i) {
        const int row = HALO ? hrow[i] : wm * WTM + i * 16 + (lane & 15);
        a_off[i] = sizeof(T) * static_cast<u32>(row * (HALO ? PA : P) + (lane >> 4) * VEC);
    }
#pragma unroll
    for (int j = 0; j < (NTL + 1) / 2; ++j) {
        const int nrow = wn * WTN + 2 * j * 8 + (lane >> 4) * 8 + (lane & 7);
        b_off[j] = sizeof(T) * static_cast<u32>(nrow * P + ((lane >> 3) & 1) * VEC);
    }
    float acc[MT][NTL][4];
#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
        for (int j = 0; j < NTL; ++j)
#pragma unroll
            for (int r = 0; r < 4; ++r) acc[i][j][r] = 0.0f;

#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < chunks) issue(s);
        cct::cp_commit();
    }
    const int* c_tap = tab + cct::PHASE_HDR;  // the tap of the chunk being computed
    int c_it = 0;                              // its first input channel
    for (int c = 0; c < chunks; ++c) {
        cct::cp_wait<STAGES - 2>();
        __syncthreads();  // chunk c landed for every thread; its ring slot minus one was read by all
        if (c + STAGES - 1 < chunks) issue((c + STAGES - 1) % STAGES);
        cct::cp_commit();
        // A of this chunk: the tap-shifted tile at channel c_it (HALO), else the ring slot.
        const T* as;
        int a_col0;
        if constexpr (HALO) {
            const int shift = ((__ldg(c_tap) - min_d) * HH + __ldg(c_tap + 1) - min_h) * HW +
                              __ldg(c_tap + 2) - min_w;
            as = As + shift * PA;
            a_col0 = c_it;
            c_it += BK;
            if (c_it == ci_pad) { c_it = 0; c_tap += 4; }
        } else {
            as = As + (c % STAGES) * A_STAGE;
            a_col0 = 0;
        }
        const T* bs = Bring + (c % STAGES) * B_STAGE;
        // 32-bit shared addresses of this chunk's A view and B slot; each lane adds its fixed
        // row offsets. ldmatrix serves every mode: a 16-byte row of an 8 x 8 b16 matrix is 4
        // floats, and the fragments of m16n8k8 TF32 MMAs are exactly those of four such
        // matrices (A) or two (B), as those of m16n8k16 16-bit MMAs are for 16-bit data.
        const u32 a_chunk = a_base + static_cast<u32>(sizeof(T)) * static_cast<u32>(
            (as - As) + a_col0);
        const u32 b_chunk = b_base + static_cast<u32>(sizeof(T)) * static_cast<u32>(bs - Bring);
#pragma unroll
        for (int ks = 0; ks < BK; ks += KSTEP) {
            constexpr u32 ITEM = sizeof(T);
            u32 a[MT][4], b[NTL][2];
#pragma unroll
            for (int i = 0; i < MT; ++i) cct::ldsm_x4(a[i], a_chunk + ITEM * ks + a_off[i]);
#pragma unroll
            for (int j = 0; j + 1 < NTL; j += 2) {
                u32 r[4];
                cct::ldsm_x4(r, b_chunk + ITEM * ks + b_off[j / 2]);
                b[j][0] = r[0]; b[j][1] = r[1]; b[j + 1][0] = r[2]; b[j + 1][1] = r[3];
            }
            if (NTL % 2 == 1) cct::ldsm_x2(b[NTL - 1], b_chunk + ITEM * ks + b_off[NTL / 2]);
            if constexpr (MODE == 0) {
#pragma unroll
                for (int i = 0; i < MT; ++i)
#pragma unroll
                    for (int j = 0; j < NTL; ++j) cct::mma_16816<T>(acc[i][j], a[i], b[j]);
            } else if constexpr (MODE == 1) {
#pragma unroll
                for (int i = 0; i < MT; ++i)
#pragma unroll
                    for (int r = 0; r < 4; ++r) a[i][r] = cct::to_tf32(__uint_as_float(a[i][r]));
#pragma unroll
                for (int j = 0; j < NTL; ++j)
#pragma unroll
                    for (int r = 0; r < 2; ++r) b[j][r] = cct::to_tf32(__uint_as_float(b[j][r]));
#pragma unroll
                for (int i = 0; i < MT; ++i)
#pragma unroll
                    for (int j = 0; j < NTL; ++j) cct::mma_1688_tf32(acc[i][j], a[i], b[j]);
            } else {
                u32 a_small[MT][4], b_small[NTL][2];
                bool a_special = false;
#pragma unroll
                for (int i = 0; i < MT; ++i)
#pragma unroll
                    for (int r = 0; r < 4; ++r) {
                        cct::split_tf32(__uint_as_float(a[i][r]), a[i][r], a_small[i][r]);
                        a_special |= cct::split_needs_repair(a_small[i][r]);
                    }
#pragma unroll
                for (int j = 0; j < NTL; ++j)
#pragma unroll
                    for (int r = 0; r < 2; ++r)
                        cct::split_tf32(__uint_as_float(b[j][r]), b[j][r], b_small[j][r]);
                // x's special values stay IEEE's (README, "Reliability"): a warp whose fragments
                // hold one repairs its splits. The vote costs about 12% on kb68 (H100), a select
                // in every split 24%; the weights' splits are not repaired, which the loose
                // contract for non-finite weights allows (NaN in their own output channels).
                if (__any_sync(0xffffffffu, a_special)) {
#pragma unroll
                    for (int i = 0; i < MT; ++i)
#pragma unroll
                        for (int r = 0; r < 4; ++r) cct::repair_split(a[i][r], a_small[i][r]);
                }
                // The three products of a k-step are summed by the tensor core into a fresh
                // partial, which joins the accumulator by an IEEE add: tensor-core accumulation
                // is not round-to-nearest, and over K in the thousands its error grew past
                // float32's (1.6e-5 relative on kb68, against 8.5e-7 for cuDNN).
#pragma unroll
                for (int i = 0; i < MT; ++i)
#pragma unroll
                    for (int j = 0; j < NTL; ++j) {
                        float t[4] = {0.0f, 0.0f, 0.0f, 0.0f};
                        cct::mma_1688_tf32(t, a_small[i], b[j]);
                        cct::mma_1688_tf32(t, a[i], b_small[j]);
                        cct::mma_1688_tf32(t, a[i], b[j]);
#pragma unroll
                        for (int r = 0; r < 4; ++r)
                            acc[i][j][r] = cct::add_ieee(acc[i][j][r], t[r]);
                    }
            }
        }
    }
    cct::cp_wait<0>();
    __syncthreads();  // the ring is free: the C tile reuses it

    // Epilogue: accumulator (row m = gq or gq+8, cols n = 2tq, 2tq+1 of each tile) -> shared C tile
    // -> coalesced stores with the bias. NCDHW: C tile [BN][BM+4], threads walk voxels of one
    // channel; NDHWC: [BM][BN+4], threads walk channels of one voxel.
    constexpr int CP = CL_OUT ? BN + 4 : BM + 4;
    float* const cs = reinterpret_cast<float*>(smem_raw);
#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
        for (int j = 0; j < NTL; ++j)
#pragma unroll
            for (int r = 0; r < 4; ++r) {
                const int ml = wm * WTM + i * 16 + gq + (r >> 1) * 8;
                const int nl = wn * WTN + j * 8 + 2 * tq + (r & 1);
                cs[CL_OUT ? ml * CP + nl : nl * CP + ml] = acc[i][j][r];
            }
    __syncthreads();
    const T* bias_g = g.has_bias ? bias + static_cast<i64>(grp) * g.C_out_g : nullptr;
    cct::store_c_tile<T, BM, BN, NT, CL_OUT>(cs, out_off, out, bias_g, bt.n * BN,
                                             static_cast<int>(g.C_out_g), oVol, tid);
}
