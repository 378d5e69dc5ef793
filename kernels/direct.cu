// Direct (gather) transposed 3D convolution: the reference GPU kernel, for every dtype and
// every parameter combination.
//
//   out[n, co, od, oh, ow] = bias[co]
//       + sum over ci in co's group, (kd, kh, kw) with od = id*sD - pD + kd*dD (same for h, w)
//         and 0 <= id < D (same for h, w) of  x[n, ci, id, ih, iw] * w[ci, co mod C_out_g, kd, kh, kw]
//
// One thread owns one output element and writes it once (no atomics: deterministic). Threads
// walk the output in memory order (ow fastest) with a 64-bit grid-stride loop.
#include "common.cuh"

template <typename T>
__global__ void conv_transpose3d_direct(const T* __restrict__ x, const T* __restrict__ w,
                                        const T* __restrict__ bias, T* __restrict__ out,
                                        const cct::ConvGeom* __restrict__ geom) {
    typedef typename cct::Acc<T>::type Acc;
    const cct::ConvGeom g = *geom;
    const i64 in_vol = g.D * g.H * g.W;
    const i64 taps = g.kD * g.kH * g.kW;
    const i64 w_ci_stride = g.C_out_g * taps;  // w[ci + 1] - w[ci]
    const i64 total = g.N * g.C_out * g.oD * g.oH * g.oW;
    const i64 step = static_cast<i64>(gridDim.x) * blockDim.x;
    for (i64 idx = static_cast<i64>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
         idx += step) {
        i64 r = idx;
        const i64 ow = r % g.oW; r /= g.oW;
        const i64 oh = r % g.oH; r /= g.oH;
        const i64 od = r % g.oD; r /= g.oD;
        const i64 co = r % g.C_out;
        const i64 n = r / g.C_out;
        const i64 grp = co / g.C_out_g;
        const i64 co_g = co - grp * g.C_out_g;

        Acc acc = g.has_bias ? cct::to_acc(bias[co]) : Acc(0);
        const T* x_base = x + (n * g.C_in + grp * g.C_in_g) * in_vol;
        const T* w_base = w + (grp * g.C_in_g * g.C_out_g + co_g) * taps;
        for (i64 kd = 0; kd < g.kD; ++kd) {
            const i64 td = od + g.pD - kd * g.dD;
            if (td < 0 || td % g.sD) continue;
            const i64 id = td / g.sD;
            if (id >= g.D) continue;
            for (i64 kh = 0; kh < g.kH; ++kh) {
                const i64 th = oh + g.pH - kh * g.dH;
                if (th < 0 || th % g.sH) continue;
                const i64 ih = th / g.sH;
                if (ih >= g.H) continue;
                for (i64 kw = 0; kw < g.kW; ++kw) {
                    const i64 tw = ow + g.pW - kw * g.dW;
                    if (tw < 0 || tw % g.sW) continue;
                    const i64 iw = tw / g.sW;
                    if (iw >= g.W) continue;
                    const T* xp = x_base + (id * g.H + ih) * g.W + iw;
                    const T* wp = w_base + (kd * g.kH + kh) * g.kW + kw;
                    for (i64 ci = 0; ci < g.C_in_g; ++ci) {
                        acc = cct::fma_ieee(cct::to_acc(xp[ci * in_vol]),
                                            cct::to_acc(wp[ci * w_ci_stride]), acc);
                    }
                }
            }
        }
        out[idx] = cct::from_acc<T>(acc);
    }
}
