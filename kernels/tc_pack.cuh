// The weight pack shared by the tensor-core kernels (tc.cu: mma.sync; wgmma.cu: Hopper wgmma).
#pragma once
#include "common.cuh"

// Packs w (C_in, C_out_g, kD, kH, kW) into wp[g][phase][tap][co_pad][ci_pad] (K-major B of each
// phase's GEMM), zero where the tap, ci or co does not exist: the GEMM reads it unchecked.
template <typename T>
__global__ void tc_pack_weights(const T* __restrict__ w, T* __restrict__ wp,
                                const int* __restrict__ table,
                                const cct::ConvGeom* __restrict__ geom, const int phases,
                                const int max_taps, const int ci_pad, const int co_pad) {
    const cct::ConvGeom g = *geom;
    const i64 taps_all = g.kD * g.kH * g.kW;
    const i64 total = g.groups * static_cast<i64>(phases) * max_taps * ci_pad * co_pad;
    const int stride_tab = cct::PHASE_HDR + 4 * max_taps;
    for (i64 e = static_cast<i64>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
         e += static_cast<i64>(gridDim.x) * blockDim.x) {
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
