// Hopper (sm_90a) tensor-core implicit-GEMM transposed 3D convolution for float16 / bfloat16:
// the halo form of tc.cu's GEMM per output stride phase, with warpgroup MMAs (wgmma) reading both
// operands straight from shared memory instead of mma.sync fed by ldmatrix.
//
// Per stride phase (see tc.cu): out[n, co, o0 + q*s] = bias[co] + sum over taps t and ci of
// x[n, q + off_t, ci] * w[ci, co, t]: M = phase voxels, N = C_out_g, K = taps * C_in_g.
//
// A block owns a box of 8 x 8 x TD phase voxels (w, h, d; TD = 2*MW) of one sample and a BN-wide
// slice of output channels (the grid's x and y; z is (group, phase); with channels-first output
// the blocks are renumbered so that the phases of one box go out together: cct::gemm_tile). It
// stages the input tile of that box (HD x HH x HW voxels: the box plus the span of the phase's
// tap offsets) for CT input channels of the group; each tap's A is then a shifted view of that
// tile and only the packed weights stream through a STAGES-deep cp.async ring, BK channels of
// one tap a chunk. K runs channel tile by channel tile, every tap of one tile before the next.
// Where the tile of every channel fits (CT = ci_pad) it is staged once; else (vnet's 256
// channels) the block drains its wgmmas and restages the tile between channel tiles.
//
// Shared memory holds both operands in wgmma's K-major "no swizzle" canonical layout: core
// matrices of 8 rows x 16 bytes (8 channels), each row 16 bytes after the previous one.
//  - The input tile is stored as planes of 8 channels: plane c8 holds voxel v's channels
//    8*c8 .. 8*c8+7 at byte (c8*PP + v)*16, v = (hd*HH + hh)*HW + hw, PP (the plane pitch, in
//    voxels) odd so that the staging copies of one voxel's planes fall in different banks.
//    8 box voxels along w are then one core matrix wherever the tap shifts them; the next 8
//    rows of the tile (next h) sit HW*16 bytes on (SBO), the next 8 channels PP*16 bytes (LBO).
//    A warpgroup's 64 rows are one d slice of the box (8 h x 8 w).
//  - A weight chunk (BN rows co x BK channels) is stored as [co/8][k/8][8 rows][16 bytes]:
//    LBO 128 bytes, SBO BK*16 bytes.
//
// Two warpgroups (256 threads); warpgroup wg computes d slices wg*MW .. wg*MW + MW - 1 of the
// box, MW m64nBNk16 wgmmas per 16 channels. A chunk of the ring is KT units of (tap, BK
// channels): one barrier per KT units. The ring keeps one chunk's wgmmas in flight while the
// next chunk is computed (wait_group 1): a chunk's slot is refilled two chunks later.
// Accumulation in float32 by the tensor cores, as tc.cu's MODE 0. The epilogue is tc.cu's:
// the C tile through shared memory, coalesced stores with the bias, each element written once.
#include "common.cuh"
#include "tc_shared.cuh"
#include "wgmma_sync.cuh"

namespace cct {

// K's order in wg_conv_transpose3d: channel tile by channel tile, every tap of a tile, BK channels
// a unit. A unit's first channel c, its tile's first channel c0, its tap t.
struct KCursor {
    int c = 0, c0 = 0, t = 0;
    enum Step { SAME_TAP, NEXT_TAP, NEXT_TILE };
    // Moves to the next unit.
    __device__ __forceinline__ Step next(int bk, int ct, int taps) {
        c += bk;
        if (c != c0 + ct) return SAME_TAP;
        c = c0;
        if (++t != taps) return NEXT_TAP;
        t = 0;
        c0 += ct;
        c = c0;
        return NEXT_TILE;
    }
};

}  // namespace cct

enum { WG_BOX_HDR = 11 };

// box_tab: WG_BOX_HDR ints (TD, TH, TW, nbd, nbh, nbw, HD, HH, HW, PP, CT), then 3 per phase (the
// smallest tap offset along d, h, w), as tc.cu's with PP the plane pitch in voxels and CT the
// channels of one staged tile (a multiple of BK dividing ci_pad; CT < ci_pad needs KT = 1).
template <typename T, int BN, int BK, int MW, int KT, int STAGES, int MINB, bool CL_OUT>
__global__ void __launch_bounds__(256, MINB)
wg_conv_transpose3d(const T* __restrict__ x, const T* __restrict__ wp, const T* __restrict__ bias,
                    T* __restrict__ out, const int* __restrict__ table,
                    const cct::ConvGeom* __restrict__ geom, const int phases, const int max_taps,
                    const int ci_pad, const int co_pad, const int* __restrict__ box_tab) {
    constexpr int NT = 256, VEC = 8, TD = 2 * MW, BM = 64 * TD;
    constexpr int KV = BK / VEC;        // 16-byte columns of a chunk row
    constexpr int B_UNIT = BN * BK;     // elements of one (tap, BK channels) unit of weights
    constexpr int B_STAGE = KT * B_UNIT;  // a chunk: KT units
    constexpr int NR = BN / 2;          // accumulators per m64 tile per thread
    static_assert(sizeof(T) == 2 && BK % 16 == 0 && BN % 8 == 0 && STAGES >= 3, "wgmma tile");


    extern __shared__ __align__(128) unsigned char smem_raw[];
    __shared__ i64 out_off[BM];

    const cct::ConvGeom& g = *geom;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wg = warp >> 2, w4 = warp & 3;
    const cct::GemmTileIdx bt = cct::gemm_tile<!CL_OUT>(phases);
    const int grp = bt.grp, ph = bt.ph;
    const int* tab = table + ph * (cct::PHASE_HDR + 4 * max_taps);
    const i64 QD = tab[3], QH = tab[4], QW = tab[5];
    const int taps = tab[6];
    const i64 oVol = g.oD * g.oH * g.oW;
    const i64 C_in = g.C_in, C_out = g.C_out;
    const u32 D = static_cast<u32>(g.D), H = static_cast<u32>(g.H), W = static_cast<u32>(g.W);
    const int C_in_g = static_cast<int>(g.C_in_g);

    const int nbd = __ldg(box_tab + 3), nbh = __ldg(box_tab + 4), nbw = __ldg(box_tab + 5);
    const int HD = __ldg(box_tab + 6), HH = __ldg(box_tab + 7), HW = __ldg(box_tab + 8);
    const int PP = __ldg(box_tab + 9);
    const int CT = __ldg(box_tab + 10);
    i64 b = bt.m;
    const int bw = static_cast<int>(b % nbw); b /= nbw;
    const int bh = static_cast<int>(b % nbh); b /= nbh;
    const int bd = static_cast<int>(b % nbd);
    const i64 n_box = b / nbd;
    const int q0d = bd * TD, q0h = bh * 8, q0w = bw * 8;
    if (n_box >= g.N || q0d >= QD || q0h >= QH || q0w >= QW) return;
    const int min_d = __ldg(box_tab + WG_BOX_HDR + 3 * ph);
    const int min_h = __ldg(box_tab + WG_BOX_HDR + 3 * ph + 1);
    const int min_w = __ldg(box_tab + WG_BOX_HDR + 3 * ph + 2);

    T* const As = reinterpret_cast<T*>(smem_raw);  // planes of the input tile
    const int planes = CT / VEC;  // of one staged tile
    T* const Bring = As + static_cast<i64>(planes) * PP * VEC;  // 16-byte aligned: PP*VEC*2
    // Each tap's shift of the input tile, in 16-byte units (voxels), after the ring.
    int* const tap_shift = reinterpret_cast<int*>(Bring + STAGES * B_STAGE);
    for (int t = tid; t < taps; t += NT) {
        const int* o = tab + cct::PHASE_HDR + 4 * t;
        tap_shift[t] = ((__ldg(o) - min_d) * HH + __ldg(o + 1) - min_h) * HW + __ldg(o + 2) - min_w;
    }

    for (int ml = tid; ml < BM; ml += NT) {
        const int qw = q0w + (ml & 7), qh = q0h + ((ml >> 3) & 7), qd = q0d + (ml >> 6);
        i64 v = -1;
        if (qd < QD && qh < QH && qw < QW) {
            const i64 vox = ((tab[0] + qd * g.sD) * g.oH + tab[1] + qh * g.sH) * g.oW + tab[2] +
                            qw * g.sW;
            v = CL_OUT ? (n_box * oVol + vox) * C_out + static_cast<i64>(grp) * g.C_out_g
                       : (n_box * C_out + static_cast<i64>(grp) * g.C_out_g) * oVol + vox;
        }
        out_off[ml] = v;
    }

    const int units = taps * (ci_pad / BK);
    const int chunks = (units + KT - 1) / KT;
    const T* const w_tap0 = wp + ((static_cast<i64>(grp) * phases + ph) * max_taps * co_pad +
                                  static_cast<i64>(bt.n) * BN) * ci_pad;
    const T* w_next = w_tap0;  // the next unit's tap's weights
    cct::KCursor it;           // the next unit to issue
    int it_u = 0;              // its index

    // The input tile of channels c0 .. c0 + CT - 1, every plane (zero outside the input and past
    // C_in_g), as cp.async copies. Consecutive threads take one voxel's planes: its channels are
    // contiguous in x.
    auto stage_tile = [&](int c0) {
        const int hv_all = HD * HH * HW;
        const int i0d = q0d + min_d, i0h = q0h + min_h, i0w = q0w + min_w;
        const T* xb = x + n_box * g.D * g.H * g.W * C_in + static_cast<i64>(grp) * g.C_in_g + c0;
        for (int e = tid; e < hv_all * planes; e += NT) {
            const int hv = e / planes, c8 = e - hv * planes;
            const int hw = hv % HW, hh = (hv / HW) % HH, hd = hv / (HW * HH);
            const int id = i0d + hd, ih = i0h + hh, iw = i0w + hw;
            const bool ok = c0 + c8 * VEC < C_in_g && static_cast<u32>(id) < D &&
                            static_cast<u32>(ih) < H && static_cast<u32>(iw) < W;
            const T* src = xb + ((static_cast<i64>(id) * H + ih) * W + iw) * C_in + c8 * VEC;
            cct::cp_async16_or_zero(As + (static_cast<i64>(c8) * PP + hv) * VEC, ok ? src : x, ok);
        }
    };
    // The first tile goes out in the first cp.async group.
    if (taps > 0) stage_tile(0);

    // Weight chunk copies: element e -> row n = (e / (8*KV))*8 + e%8, column v = (e/8) % KV, so
    // 8 consecutive threads fill one 128-byte core matrix.
    auto issue = [&](int stage) {
#pragma unroll
        for (int u = 0; u < KT; ++u) {
            if (it_u < units) {
                T* bs = Bring + stage * B_STAGE + u * B_UNIT;
                const T* wsrc = w_next + it.c;
#pragma unroll
                for (int i = 0; i < (BN * KV + NT - 1) / NT; ++i) {
                    const int e = tid + i * NT;
                    if ((BN * KV) % NT == 0 || e < BN * KV) {
                        const int r8 = e & 7, v = (e >> 3) % KV, nb = e / (8 * KV);
                        const int n = nb * 8 + r8;
                        cct::copy16(bs + ((nb * KV + v) * 8 + r8) * VEC,
                                    wsrc + static_cast<i64>(n) * ci_pad + v * VEC);
                    }
                }
                ++it_u;
                switch (it.next(BK, CT, taps)) {
                    case cct::KCursor::SAME_TAP: break;
                    case cct::KCursor::NEXT_TAP: w_next += static_cast<i64>(co_pad) * ci_pad; break;
                    case cct::KCursor::NEXT_TILE: w_next = w_tap0; break;
                }
            }
        }
    };

    float acc[MW][NR];
#pragma unroll
    for (int i = 0; i < MW; ++i)
#pragma unroll
        for (int r = 0; r < NR; ++r) acc[i][r] = 0.0f;

#pragma unroll
    for (int s = 0; s < STAGES - 2; ++s) {
        if (s < chunks) issue(s);
        cct::cp_commit();
    }
    // Descriptors of the tiles' first bytes; a view further on adds its offset / 16.
    const u64 da0 = cct::wg_desc(cct::smem_addr(As) + static_cast<u32>(wg * MW * HH * HW) * 16,
                                 static_cast<u32>(PP) * 16, static_cast<u32>(HW) * 16);
    const u64 db0 = cct::wg_desc(cct::smem_addr(Bring), 128, KV * 128);
    cct::KCursor cu;         // the unit being computed
    int c_u = 0;             // its index
    bool new_tile = false;   // its channel tile is not the one in shared memory
    for (int c = 0; c < chunks; ++c) {
        if (KT == 1 && new_tile) {
            // The next channel tile: every warpgroup's wgmmas on this one finish, then it is
            // overwritten (the ring's copies in flight are waited for too).
            cct::wg_wait<0>();
#pragma unroll
            for (int i = 0; i < MW; ++i) cct::wg_hold<NR>(acc[i]);
            __syncthreads();
            stage_tile(cu.c0);
            cct::cp_commit();
            cct::cp_wait<0>();
        }
        cct::cp_wait<STAGES - 3>();
        cct::fence_async_shared();
        __syncthreads();  // chunk c landed for all; chunk c-2's slot was read by both warpgroups
        const u32 b_chunk = static_cast<u32>((c % STAGES) * B_STAGE) * 2;
#pragma unroll
        for (int i = 0; i < MW; ++i) cct::wg_hold<NR>(acc[i]);
        cct::wg_fence();
#pragma unroll
        for (int u = 0; u < KT; ++u) {
            if (KT == 1 || c_u < units) {
                // Row 0 of this warpgroup's first d slice, shifted by the tap, in plane (c - c0)/8,
                // in 16-byte units.
                const u32 a_row0 = static_cast<u32>(((cu.c - cu.c0) / VEC) * PP + tap_shift[cu.t]);
                const u32 b_unit = (b_chunk + static_cast<u32>(u * B_UNIT) * 2) >> 4;
                ++c_u;
                new_tile = cu.next(BK, CT, taps) == cct::KCursor::NEXT_TILE;
#pragma unroll
                for (int ks = 0; ks < BK / 16; ++ks) {
                    const u64 db = db0 + (b_unit + ks * 16);
#pragma unroll
                    for (int i = 0; i < MW; ++i) {
                        const u64 da = da0 + (a_row0 + 2 * ks * PP + i * HH * HW);
                        cct::Wgmma<T, BN>::mma(acc[i], da, db);
                    }
                }
            }
        }
        cct::wg_commit();
        // The next copies go out while the tensor cores work: into chunk c-2's slot, whose
        // wgmmas every warpgroup saw finish before the barrier above.
        if (c + STAGES - 2 < chunks) issue((c + STAGES - 2) % STAGES);
        cct::cp_commit();
        cct::wg_wait<1>();
#pragma unroll
        for (int i = 0; i < MW; ++i) cct::wg_hold<NR>(acc[i]);
    }
    cct::wg_wait<0>();
#pragma unroll
    for (int i = 0; i < MW; ++i) cct::wg_hold<NR>(acc[i]);
    cct::cp_wait<0>();
    __syncthreads();  // the ring is free: the C tile reuses it

    // Epilogue (tc.cu's): accumulator d[4j + r] of m64 tile i is row 16*w4 + gq + 8*(r >> 1),
    // column 8j + 2tq + (r & 1) -> shared C tile -> coalesced stores with the bias.
    const int gq = lane >> 2, tq = lane & 3;
    constexpr int CP = CL_OUT ? BN + 4 : BM + 4;
    float* const cs = reinterpret_cast<float*>(smem_raw);
#pragma unroll
    for (int i = 0; i < MW; ++i)
#pragma unroll
        for (int j = 0; j < BN / 8; ++j)
#pragma unroll
            for (int r = 0; r < 4; ++r) {
                const int ml = (wg * MW + i) * 64 + w4 * 16 + gq + (r >> 1) * 8;
                const int nl = j * 8 + 2 * tq + (r & 1);
                cs[CL_OUT ? ml * CP + nl : nl * CP + ml] = acc[i][4 * j + r];
            }
    __syncthreads();
    const T* bias_g = g.has_bias ? bias + static_cast<i64>(grp) * g.C_out_g : nullptr;
    cct::store_c_tile<T, BM, BN, NT, CL_OUT>(cs, out_off, out, bias_g, bt.n * BN,
                                             static_cast<int>(g.C_out_g), oVol, tid);
}
