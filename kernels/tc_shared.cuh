// What the tensor-core kernels (tc.cu: mma.sync; wgmma.cu: Hopper wgmma) share: the weight pack
// and the store of the C tile.
#pragma once
#include "common.cuh"
#include "transpose.cuh"

// Packs w (C_in, C_out_g, kD, kH, kW) into wp[g][phase][tap][co_pad][ci_pad] (K-major B of each
// phase's GEMM), zero where the tap, ci or co does not exist: the GEMM reads it unchecked. Blocks
// from pack_blocks on transpose an NCDHW x (batch, rows = C_in, cols = D*H*W) into the
// channels-last xt in the same launch, as layout.cu's batched_transpose would with a grid of
// (ceil(cols/64), ty, tz) (none where the call's x is channels-last already).
template <typename T>
__global__ void __launch_bounds__(256)
tc_prep(const T* __restrict__ w, T* __restrict__ wp, const int* __restrict__ table,
        const cct::ConvGeom* __restrict__ geom, const int phases, const int max_taps,
        const int ci_pad, const int co_pad, const int pack_blocks, const T* __restrict__ x,
        T* __restrict__ xt, const i64 batch, const i64 rows, const i64 cols, const int ty,
        const int tz) {
    if (static_cast<int>(blockIdx.x) >= pack_blocks) {
        typedef typename cct::BitsOf<sizeof(T)>::type B;
        const u32 t = blockIdx.x - static_cast<u32>(pack_blocks);
        const u32 tx_blocks = static_cast<u32>((cols + 63) / 64);
        const u32 bx = t % tx_blocks, byz = t / tx_blocks;
        cct::transpose_tiles(reinterpret_cast<const B*>(x), reinterpret_cast<B*>(xt), batch, rows,
                             cols, bx, byz % static_cast<u32>(ty), byz / static_cast<u32>(ty),
                             static_cast<u32>(ty), static_cast<u32>(tz));
        return;
    }
    const cct::ConvGeom g = *geom;
    const i64 taps_all = g.kD * g.kH * g.kW;
    const i64 total = g.groups * static_cast<i64>(phases) * max_taps * ci_pad * co_pad;
    const int stride_tab = cct::PHASE_HDR + 4 * max_taps;
    for (i64 e = static_cast<i64>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
         e += static_cast<i64>(pack_blocks) * blockDim.x) {
        i64 r = e;
        const int ci = static_cast<int>(r % ci_pad); r /= ci_pad;
        const int co = static_cast<int>(r % co_pad); r /= co_pad;
        const int t = static_cast<int>(r % max_taps); r /= max_taps;
        const int ph = static_cast<int>(r % phases);
        const i64 grp = r / phases;
        const int* tab = table + ph * stride_tab;
        T v = cct::from_acc<T>(0.0f);
        if (t < __ldg(tab + 6) && ci < g.C_in_g && co < g.C_out_g) {
            const int w_tap = __ldg(tab + cct::PHASE_HDR + 4 * t + 3);
            v = w[((grp * g.C_in_g + ci) * g.C_out_g + co) * taps_all + w_tap];
        }
        wp[e] = v;
    }
}

namespace cct {

// The last step of an epilogue: the float C tile cs (NDHWC: [BM][BN+4]; NCDHW: [BN][BM+4]) plus
// the bias to out, coalesced (NDHWC: threads walk channels of one voxel; NCDHW: voxels of one
// channel). out_off[ml]: the output offset of tile voxel ml at channel 0 of the block's group, -1
// where the voxel does not exist; n0: the tile's first channel within the group.
template <typename T, int BM, int BN, int NT, bool CL_OUT>
__device__ __forceinline__ void store_c_tile(const float* cs, const i64* out_off, T* out,
                                             const T* bias_g, int n0, int C_out_g, i64 oVol,
                                             int tid) {
    if constexpr (CL_OUT) {
#pragma unroll 4
        for (int e = tid; e < BM * BN; e += NT) {
            const int ml = e / BN, nl = e - ml * BN;
            const int co = n0 + nl;
            const i64 o = out_off[ml];
            if (o >= 0 && co < C_out_g) {
                const float b = bias_g != nullptr ? to_acc(bias_g[co]) : 0.0f;
                out[o + co] = from_acc<T>(add_ieee(cs[ml * (BN + 4) + nl], b));
            }
        }
    } else {
#pragma unroll 4
        for (int e = tid; e < BM * BN; e += NT) {
            const int nl = e / BM, ml = e - nl * BM;
            const int co = n0 + nl;
            const i64 o = out_off[ml];
            if (o >= 0 && co < C_out_g) {
                const float b = bias_g != nullptr ? to_acc(bias_g[co]) : 0.0f;
                out[o + co * oVol] = from_acc<T>(add_ieee(cs[nl * (BM + 4) + ml], b));
            }
        }
    }
}

}  // namespace cct
