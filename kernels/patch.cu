// Hopper (sm_90a) tensor-core transposed 3D convolution for float16 / bfloat16 where every output
// voxel comes from exactly one input voxel and one tap: kernel == stride along each axis, no
// padding and no output padding (dilation does not matter where the kernel is 1). The 3D U-Net
// decoder's ConvTranspose3d(kernel_size=2, stride=2) is this case; kernel 1 is a pointwise layer.
//
// Each input voxel i then expands into a patch of P = kD*kH*kW output voxels i*s + t:
//   out[n, g*C_out_g + co, i*s + t] = bias[co] + sum over ci of x[n, i, g*C_in_g + ci] * w[ci, co, t]
// which is one GEMM per group: M = N*D*H*W input voxels (rows: consecutive in a channels-last x),
// K = C_in_g, and P*C_out_g columns, each a (co, t) whose output lies a fixed offset from its
// row's. Every product lands in one output element once: the result is scattered, never summed.
// (wgmma.cu runs the same problem as P phases of one tap each, staging each input tile P times
// and storing every other element of a row; here one block covers several phases.)
//
// A channels-first x is read as it is where its rows are 16-byte aligned runs of voxels (CF_IN:
// D*H*W a multiple of 8 and x 16-byte aligned; the host checks): each copy takes 8 consecutive
// voxels of one channel, into wgmma's M-major ("transposed") no-swizzle layout, [K/8][rows/8][8
// channels][8 voxels] (LBO = K step = BM*16 bytes, SBO = M step = 128 bytes), read by mma<1>.
// Otherwise the host transposes x to channels-last first.
//
// The GEMM is short (K = C_in_g) and its output large, so it is memory-bound: a block is
// persistent and keeps its BN columns' weights (BN x ci_pad), gathered from w itself (no
// packing pass, no workspace), in shared memory for good. Block b
// owns column tile b % n_tiles and row tiles b / n_tiles, + gridDim.x / n_tiles, ... (gridDim.x
// is a multiple of n_tiles: the blocks of one row tile run together and read it once from DRAM).
// Its row tiles' A (BM = 128*MW rows x BK channels a chunk) stream through a STAGES-deep cp.async
// ring across tile boundaries, so the next tile's loads are in flight while a tile's epilogue
// stores. Both operands sit in wgmma's K-major "no swizzle" layout ([rows/8][K/8][8 rows][16
// bytes]: LBO 128 bytes, SBO K*16 bytes). Two warpgroups; warpgroup wg computes rows
// (wg*MW + i)*64 .. +63, i < MW, with one m64nBNk16 wgmma per 16 channels each.
//
// Columns are ordered so that a thread's two adjacent accumulator columns are adjacent in the
// output: tap fastest for NCDHW results (the two w taps of one patch row; with kW = 2 the 8 rows
// of a core matrix then write 32 contiguous bytes per tap row), channel fastest for NDHWC. The
// epilogue stores straight from the accumulators, with the bias, as element pairs where the host
// found every pair adjacent and aligned (`pairs`), else element by element: no C tile.
#include "common.cuh"
#include "wgmma_sync.cuh"

namespace cct {

// Two floats rounded to the 16-bit type and packed as one word, `lo` at the lower address.
template <typename T> __device__ __forceinline__ u32 pack_pair(float lo, float hi);
template <> __device__ __forceinline__ u32 pack_pair<half_t>(float lo, float hi) {
    u32 d;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo));
    return d;
}
template <> __device__ __forceinline__ u32 pack_pair<bf16_t>(float lo, float hi) {
    u32 d;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo));
    return d;
}

// Column n of the patch GEMM -> (output channel within the group, tap).
template <bool CO_FASTEST>
__device__ __forceinline__ void patch_column(int n, int C_out_g, int P, int& co, int& t) {
    co = CO_FASTEST ? n % C_out_g : n / P;
    t = CO_FASTEST ? n / C_out_g : n % P;
}

}  // namespace cct

// x: channels-last (N, D, H, W, C_in), or NCDHW where CF_IN; w as given (C_in, C_out_g, kD, kH,
// kW); out NDHWC where CL_OUT, else NCDHW. n_tiles: column tiles per group (ceil(P*C_out_g /
// BN)); row_tiles: ceil(M / BM).
template <typename T, int BN, int BK, int MW, int STAGES, int MINB, bool CL_OUT, bool CF_IN>
__global__ void __launch_bounds__(256, MINB)
wg_patch_gemm(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ bias,
              T* __restrict__ out, const cct::ConvGeom* __restrict__ geom, const int ci_pad,
              const int n_tiles, const int row_tiles, const int pairs) {
    constexpr int NT = 256, VEC = 8, BM = 128 * MW;
    constexpr int KV = BK / VEC;  // 16-byte columns of a chunk row
    constexpr int A_STAGE = BM * BK;
    constexpr int NR = BN / 2;  // accumulators per m64 tile per thread
    static_assert(sizeof(T) == 2 && BK % 16 == 0 && BN % 16 == 0 && STAGES >= 3, "patch tile");
    static_assert(NT % (8 * KV) == 0 && BM % (NT / KV) == 0, "whole A copies a thread");
    static_assert(!(CF_IN && CL_OUT), "a channels-first x gives a channels-first result");
    constexpr int MG = BM / 8;            // CF_IN: 8-voxel groups of a row tile
    constexpr int KB_STEP = NT / (8 * MG);  // CF_IN: 8-channel groups the block covers per copy
    static_assert(!CF_IN || (NT % (8 * MG) == 0 && (BK / 8) % KB_STEP == 0), "CF_IN copies");

    extern __shared__ __align__(128) unsigned char smem_raw[];
    __shared__ i64 col_off[BN];  // output offset of column nl from its row's, -1: no column
    __shared__ float col_bias[BN];

    const cct::ConvGeom& g = *geom;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wg = warp >> 2, w4 = warp & 3;
    const i64 D = g.D, H = g.H, W = g.W, M = g.N * D * H * W;
    const int n0 = static_cast<int>(blockIdx.x % static_cast<u32>(n_tiles)) * BN;
    const int rt0 = static_cast<int>(blockIdx.x / static_cast<u32>(n_tiles));
    const int rstep = static_cast<int>(gridDim.x / static_cast<u32>(n_tiles));
    const int my_tiles = rt0 < row_tiles ? (row_tiles - rt0 + rstep - 1) / rstep : 0;
    const int grp = static_cast<int>(blockIdx.z);
    const i64 C_in = g.C_in, C_out = g.C_out, oH = g.oH, oW = g.oW, oVol = g.oD * oH * oW;
    const i64 sD = g.sD, sH = g.sH, sW = g.sW;
    const int C_in_g = static_cast<int>(g.C_in_g), C_out_g = static_cast<int>(g.C_out_g);
    const int kH = static_cast<int>(g.kH), kW = static_cast<int>(g.kW);
    const int P = static_cast<int>(g.kD) * kH * kW;

    for (int nl = tid; nl < BN; nl += NT) {
        const int n = n0 + nl;
        i64 off = -1;
        float b = 0.0f;
        if (n < P * C_out_g) {
            int co, t;
            cct::patch_column<CL_OUT>(n, C_out_g, P, co, t);
            const int kw = t % kW, kh = (t / kW) % kH, kd = t / (kW * kH);
            const i64 spatial = (kd * oH + kh) * oW + kw;
            off = CL_OUT ? spatial * C_out + co : co * oVol + spatial;
            if (g.has_bias) b = cct::to_acc(bias[static_cast<i64>(grp) * C_out_g + co]);
        }
        col_off[nl] = off;
        col_bias[nl] = b;
    }

    T* const Bs = reinterpret_cast<T*>(smem_raw);  // the block's weights: BN x ci_pad
    T* const As = Bs + BN * ci_pad;                // the ring of A chunks
    const int KB = ci_pad / VEC;                   // 16-byte columns of a weight row
    const int chunks = ci_pad / BK;
    const int units = my_tiles * chunks;           // (row tile, chunk) pairs, in order

    // Copies: thread tid takes the 16-byte column v = (tid/8) % KV of rows
    // (tid / (8*KV) + i*RB_STEP)*8 + tid%8 of a chunk: 8 consecutive threads fill one core matrix.
    constexpr int RB_STEP = NT / (8 * KV);  // 8-row groups the block covers per copy
    const int r8 = tid & 7, v = (tid >> 3) % KV, rb0 = tid / (8 * KV);
    const T* const xg = x + static_cast<i64>(grp) * C_in_g + v * VEC;
    const i64 a_step = static_cast<i64>(RB_STEP) * 8 * C_in;
    const int dst0 = ((rb0 * KV + v) * 8 + r8) * VEC, dst_step = RB_STEP * KV * 64;
    // CF_IN copies: thread tid takes channel rows ch8 + 8*(kb0 + i*KB_STEP) of voxel group mg;
    // 8 consecutive threads fill one core matrix (8 channels x 16 bytes).
    const int ch8 = tid & 7, mg = (tid >> 3) % MG, kb0 = tid / (8 * MG);
    const i64 DHW = D * H * W;
    const T* const xc = x + (static_cast<i64>(grp) * C_in_g + kb0 * 8 + ch8) * DHW;
    const int cf_dst0 = (kb0 * MG + mg) * 64 + ch8 * 8;
    // A chunk of unit u (channels c*BK.. of row tile rt0 + (u / chunks)*rstep) into its slot.
    auto issue = [&](int u) {
        const int it = u / chunks, c = u - it * chunks;
        if constexpr (CF_IN) {
            const i64 m = (rt0 + static_cast<i64>(it) * rstep) * BM + mg * 8;
            const bool m_ok = m < M;
            const i64 n = m_ok ? m / DHW : 0;
            const T* const src = xc + (n * C_in + c * BK) * DHW + (m - n * DHW);
            T* const as = As + (u % STAGES) * A_STAGE + cf_dst0;
#pragma unroll
            for (int i = 0; i < BK / (8 * KB_STEP); ++i) {
                const int k = c * BK + (kb0 + i * KB_STEP) * 8 + ch8;
                const bool ok = m_ok && k < C_in_g;
                cct::cp_async16_or_zero(as + i * KB_STEP * BM * 8,
                                        ok ? src + static_cast<i64>(i) * KB_STEP * 8 * DHW : x, ok);
            }
            return;
        }
        const i64 m_first = (rt0 + static_cast<i64>(it) * rstep) * BM + rb0 * 8 + r8;
        const int k = c * BK + v * VEC;
        const T* const src = xg + m_first * C_in + c * BK;
        T* const as = As + (u % STAGES) * A_STAGE + dst0;
#pragma unroll
        for (int i = 0; i < BM / (8 * RB_STEP); ++i) {
            const bool ok = k < C_in_g && m_first + i * RB_STEP * 8 < M;
            cct::cp_async16_or_zero(as + i * dst_step, ok ? src + i * a_step : x, ok);
        }
    };

    // The block's weights, gathered from w once (no packing pass): row n of B is column
    // (co, t), 8 channels ci a 16-byte vector, P*C_out_g apart in w; zero past C_in_g and past
    // the last column. Plain stores: the fence before the first wgmma orders them.
    {
        const i64 ci_step = static_cast<i64>(C_out_g) * P;
        const T* const w_grp = w + static_cast<i64>(grp) * C_in_g * ci_step;
        for (int e = tid; e < BN * KB; e += NT) {
            const int e8 = e & 7, kv = (e >> 3) % KB, nb = e / (8 * KB);
            const int n = n0 + nb * 8 + e8;
            u32 v[VEC / 2] = {};
            if (n < P * C_out_g) {
                int co, t;
                cct::patch_column<CL_OUT>(n, C_out_g, P, co, t);
                const T* const src = w_grp + static_cast<i64>(co) * P + t;
#pragma unroll
                for (int j = 0; j < VEC; ++j) {
                    const int ci = kv * VEC + j;
                    const u32 bits = ci < C_in_g ? src[ci * ci_step].bits : 0u;
                    v[j / 2] |= bits << (16 * (j % 2));
                }
            }
            *reinterpret_cast<uint4*>(Bs + ((nb * KB + kv) * 8 + e8) * VEC) =
                make_uint4(v[0], v[1], v[2], v[3]);
        }
    }
#pragma unroll
    for (int s = 0; s < STAGES - 2; ++s) {
        if (s < units) issue(s);
        cct::cp_commit();
    }

    float acc[MW][NR];
#pragma unroll
    for (int i = 0; i < MW; ++i)
#pragma unroll
        for (int r = 0; r < NR; ++r) acc[i][r] = 0.0f;

    const u32 a_base = cct::smem_addr(As), b_base = cct::smem_addr(Bs);
    const int gq = lane >> 2, tq = lane & 3;
    const bool full_cols = n0 + BN <= P * C_out_g;  // every column of the tile exists
    int c = 0, it = 0;  // unit u's chunk and row-tile step
    for (int u = 0; u < units; ++u) {
        cct::cp_wait<STAGES - 3>();
        cct::fence_async_shared();
        __syncthreads();  // unit u landed for all; unit u-2's slot was read by both warpgroups
        const int slot = u % STAGES;
#pragma unroll
        for (int i = 0; i < MW; ++i) cct::wg_hold<NR>(acc[i]);
        cct::wg_fence();
#pragma unroll
        for (int ks = 0; ks < BK / 16; ++ks) {
            const u64 db = cct::wg_desc(b_base + static_cast<u32>((c * BK / 8 + 2 * ks) * 128), 128,
                                        static_cast<u32>(KB) * 128);
#pragma unroll
            for (int i = 0; i < MW; ++i) {
                if constexpr (CF_IN) {  // M-major: 64 rows are 8 core matrices 128 bytes apart
                    const u32 a = a_base + static_cast<u32>(slot * A_STAGE * 2 +
                                                            (wg * MW + i) * 1024 + ks * 32 * BM);
                    cct::Wgmma<T, BN>::template mma<1>(acc[i], cct::wg_desc(a, BM * 16, 128), db);
                } else {
                    const u32 a = a_base + static_cast<u32>(
                                               slot * A_STAGE * 2 + (wg * MW + i) * 8 * KV * 128 + ks * 256);
                    cct::Wgmma<T, BN>::mma(acc[i], cct::wg_desc(a, 128, KV * 128), db);
                }
            }
        }
        cct::wg_commit();
        // The next copies go out while the tensor cores work: into unit u-2's slot.
        if (u + STAGES - 2 < units) issue(u + STAGES - 2);
        cct::cp_commit();
        if (++c != chunks) {
            cct::wg_wait<1>();
#pragma unroll
            for (int i = 0; i < MW; ++i) cct::wg_hold<NR>(acc[i]);
            continue;
        }
        // The row tile is complete: store it while the next one's chunks load.
        cct::wg_wait<0>();
#pragma unroll
        for (int i = 0; i < MW; ++i) cct::wg_hold<NR>(acc[i]);
        const i64 m0 = (rt0 + static_cast<i64>(it) * rstep) * BM;
        c = 0;
        ++it;
        // Accumulator d[4j + r] of m64 tile i is row 16*w4 + gq + 8*(r >> 1), column
        // 8j + 2tq + (r & 1).
#pragma unroll
        for (int i = 0; i < MW; ++i)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const i64 m = m0 + (wg * MW + i) * 64 + w4 * 16 + gq + 8 * h;
                if (m >= M) continue;
                i64 n;
                int id, ih, iw;
                cct::split_voxel(m, D, H, W, n, id, ih, iw);
                const i64 spatial = (id * sD * oH + ih * sH) * oW + iw * sW;
                T* const row = out + (CL_OUT ? (n * oVol + spatial) * C_out + grp * C_out_g
                                             : (n * C_out + grp * C_out_g) * oVol + spatial);
#pragma unroll
                for (int j = 0; j < BN / 8; ++j) {
                    const int nl = 8 * j + 2 * tq;
                    const i64 o0 = col_off[nl];
                    const float v0 = cct::add_ieee(acc[i][4 * j + 2 * h], col_bias[nl]);
                    const float v1 = cct::add_ieee(acc[i][4 * j + 2 * h + 1], col_bias[nl + 1]);
                    if (pairs) {  // columns nl, nl + 1 exist together, adjacent and aligned
                        if (full_cols || o0 >= 0)
                            *reinterpret_cast<u32*>(row + o0) = cct::pack_pair<T>(v0, v1);
                    } else {
                        const i64 o1 = col_off[nl + 1];
                        if (o0 >= 0) row[o0] = cct::from_acc<T>(v0);
                        if (o1 >= 0) row[o1] = cct::from_acc<T>(v1);
                    }
                }
            }
#pragma unroll
        for (int i = 0; i < MW; ++i)
#pragma unroll
            for (int r = 0; r < NR; ++r) acc[i][r] = 0.0f;
    }
    cct::cp_wait<0>();
}
