// Streaming depthwise transposed 3D convolution for stride 2 and kernels of 2 to 4 taps an axis:
// the learned (or trilinear) 2x upsampler, one input channel a group, dilation 1.
//
// Along an axis with stride 2, padding p = 2a + b (b = p mod 2) and a kernel of at most 4 taps,
// output o receives exactly two input voxels: i_hi = (o + p) >> 1 through tap (o + p) & 1, and
// i_hi - 1 through that tap + 2 (taps >= K do not exist and are left out at compile time). So
// the pair of outputs 2q, 2q + 1 (a "cell") reads the inputs q + a - 1 + e for e < E = 2 + b:
//
//   out(2q + r) = x(q + a - 1 + e_hi(r)) w(k_hi(r)) + x(q + a - 2 + e_hi(r)) w(k_hi(r) + 2)
//   e_hi(r) = 1 + (b & r),  k_hi(r) = (r + b) & 1
//
// and in 3D a cell's 8 outputs read an E_D x E_H x E_W window of the input. A thread owns CW
// neighbouring cells along w (one for float and double, two for the 16-bit types) and walks DQ
// cells along d, keeping the window (E_W = CW + 1 + b along w) in registers: each step loads one
// new E_H x E_W plane (the next step's, so its latency overlaps this step's arithmetic and
// stores), does 8 CW outputs x at most 8 taps of FMA and stores each row's 2 CW outputs as one
// vector where the rows are aligned. A warp's lanes are neighbouring cells along w: its loads are
// overlapping rows (L1 hits after the first), its stores 256 contiguous bytes. The channel's
// taps are staged in shared memory in the order the cell uses them and read as broadcasts.
//
// Global memory sees each output element written once (no atomics, a fixed FMA order: results
// are deterministic) and each input element read about once from DRAM (the halo rows of
// neighbouring warps and of the next column chunk come from L1/L2).
#include "common.cuh"

namespace cct {

// Cells along w a thread (CW): 16-bit types take two, so that a lane stores 8 bytes a row and a
// warp 256, as float32 does with one. cupyconvt/_depthwise.py: dw_cells_w (tests/test_tables.py).
#ifndef CCT_DW_CW16
#define CCT_DW_CW16 2
#endif
template <typename T> struct DwCellsW {
    static constexpr int value = sizeof(T) == 2 ? CCT_DW_CW16 : 1;
};

// The 8 staged taps of one output, as vector loads from shared memory. `step` (the cell) is an
// operand the loads do not use: it makes them differ from cell to cell, so the compiler cannot
// hoist all 64 taps out of the cell loop into registers (140 registers a thread for float, 236
// for double, where reloading costs 2 or 4 loads an output).
template <typename A> struct Taps8;
template <> struct Taps8<float> {
    static __device__ __forceinline__ void load(u32 a, int step, float (&v)[8]) {
        asm("ld.shared.v4.f32 {%0, %1, %2, %3}, [%4];"
            : "=f"(v[0]), "=f"(v[1]), "=f"(v[2]), "=f"(v[3]) : "r"(a), "r"(step));
        asm("ld.shared.v4.f32 {%0, %1, %2, %3}, [%4+16];"
            : "=f"(v[4]), "=f"(v[5]), "=f"(v[6]), "=f"(v[7]) : "r"(a), "r"(step));
    }
};
template <> struct Taps8<double> {
    static __device__ __forceinline__ void load(u32 a, int step, double (&v)[8]) {
        asm("ld.shared.v2.f64 {%0, %1}, [%2];" : "=d"(v[0]), "=d"(v[1]) : "r"(a), "r"(step));
        asm("ld.shared.v2.f64 {%0, %1}, [%2+16];" : "=d"(v[2]), "=d"(v[3]) : "r"(a), "r"(step));
        asm("ld.shared.v2.f64 {%0, %1}, [%2+32];" : "=d"(v[4]), "=d"(v[5]) : "r"(a), "r"(step));
        asm("ld.shared.v2.f64 {%0, %1}, [%2+48];" : "=d"(v[6]), "=d"(v[7]) : "r"(a), "r"(step));
    }
};

// Window slot of the newest input of residue r's pair (see above), and its tap.
__host__ __device__ constexpr int dw_e_hi(int b, int r) { return 1 + (b & r); }
__host__ __device__ constexpr int dw_k_hi(int b, int r) { return (r + b) & 1; }

}  // namespace cct

// K: taps an axis (2, 3 or 4, the same on every axis); BD, BH, BW: padding parity per axis.
// Block: 32 lanes along w x blockDim.y rows along h; blockIdx.x = (chunk_d * tiles_h + tile_h) *
// tiles_w + tile_w; the plane (n, output channel) is blockIdx.y + blockIdx.z * gridDim.y.
template <typename T, int K, int BD, int BH, int BW>
__global__ void __launch_bounds__(128)
dw2_conv_transpose3d(const T* __restrict__ x, const T* __restrict__ w,
                     const T* __restrict__ bias, T* __restrict__ out,
                     const cct::ConvGeom* __restrict__ geom, int tiles_w, int tiles_h, int dq) {
    typedef typename cct::Acc<T>::type Acc;
    constexpr int CW = cct::DwCellsW<T>::value;
    constexpr int ED = 2 + BD, EH = 2 + BH, EW = CW + 1 + BW;
    constexpr int TAPS = K * K * K;
    // Staged taps: [rd][rh][rw][td][th][tw], td = 0 the newest input's tap, 1 the older one's.
    __shared__ __align__(16) Acc w_s[64];

    const i64 C_in = geom->C_in, C_out = geom->C_out, cog = geom->C_out_g;
    const i64 planes = geom->N * C_out;
    const i64 plane = static_cast<i64>(blockIdx.z) * gridDim.y + blockIdx.y;
    if (plane >= planes) return;  // uniform over the block
    const i64 n = plane / C_out;
    const i64 co = plane - n * C_out;
    const int tid = threadIdx.y * blockDim.x + threadIdx.x;
    if (tid < 64) {
        const int rd = tid >> 5 & 1, rh = tid >> 4 & 1, rw = tid >> 3 & 1;
        const int td = tid >> 2 & 1, th = tid >> 1 & 1, tw = tid & 1;
        const int kd = cct::dw_k_hi(BD, rd) + 2 * td, kh = cct::dw_k_hi(BH, rh) + 2 * th;
        const int kw = cct::dw_k_hi(BW, rw) + 2 * tw;
        // One input channel a group: channel co's taps are w[co / cog, co % cog] = w[co].
        w_s[tid] = (kd < K && kh < K && kw < K)
                       ? cct::to_acc(w[co * TAPS + (kd * K + kh) * K + kw]) : Acc(0);
    }
    __syncthreads();

    const int D = static_cast<int>(geom->D), H = static_cast<int>(geom->H);
    const int W = static_cast<int>(geom->W);
    const int oD = static_cast<int>(geom->oD), oH = static_cast<int>(geom->oH);
    const int oW = static_cast<int>(geom->oW);
    const int QD = (oD + 1) >> 1, QH = (oH + 1) >> 1, QW = (oW + 1) >> 1;
    const int tw_i = blockIdx.x % tiles_w;
    const int th_i = (blockIdx.x / tiles_w) % tiles_h;
    const int cd = blockIdx.x / (tiles_w * tiles_h);
    const int qw = (tw_i * blockDim.x + threadIdx.x) * CW;  // the thread's first cell along w
    const int qh = th_i * blockDim.y + threadIdx.y;
    const int qd0 = cd * dq;
    if (qw >= QW || qh >= QH || qd0 >= QD) return;  // no barrier follows
    const int cells = min(dq, QD - qd0);

    const i64 HW = static_cast<i64>(H) * W;
    const T* xc = x + (n * C_in + co / cog) * (static_cast<i64>(D) * HW);
    // The window's rows and columns: input q + a - 1 + e along each axis.
    const int h0 = qh + static_cast<int>(geom->pH >> 1) - 1;
    const int w0 = qw + static_cast<int>(geom->pW >> 1) - 1;
    const int d0 = qd0 + static_cast<int>(geom->pD >> 1) - 1;
    i64 row_off[EH];  // of input (ih, w0) in a plane; the columns are immediate offsets
    bool h_ok[EH], w_ok[EW];
#pragma unroll
    for (int eh = 0; eh < EH; ++eh) {
        h_ok[eh] = h0 + eh >= 0 && h0 + eh < H;
        row_off[eh] = static_cast<i64>(h0 + eh) * W + w0;
    }
#pragma unroll
    for (int ew = 0; ew < EW; ++ew) w_ok[ew] = w0 + ew >= 0 && w0 + ew < W;
    auto load_plane = [&](Acc (&p)[EH][EW], int id) {
        const bool d_ok = id >= 0 && id < D;
        const T* xd = xc + static_cast<i64>(id) * HW;
#pragma unroll
        for (int eh = 0; eh < EH; ++eh) {
            const T* row = xd + row_off[eh];
#pragma unroll
            for (int ew = 0; ew < EW; ++ew)
                p[eh][ew] = (d_ok && h_ok[eh] && w_ok[ew]) ? cct::to_acc(row[ew]) : Acc(0);
        }
    };

    Acc win[ED][EH][EW];
#pragma unroll
    for (int e = 0; e < ED; ++e) load_plane(win[e], d0 + e);

    const bool has_bias = geom->has_bias != 0;
    const Acc bv = has_bias ? cct::to_acc(bias[co]) : Acc(0);
    const i64 oHW = static_cast<i64>(oH) * oW;
    T* oc = out + plane * (static_cast<i64>(oD) * oHW);
    constexpr int RUN = 2 * CW;  // outputs a thread writes along a row
    const int ow = 2 * qw;
    const bool run_vec = oW % RUN == 0 && reinterpret_cast<u64>(out) % (RUN * sizeof(T)) == 0 &&
                         ow + RUN <= oW;

    const u32 ws_addr = cct::smem_addr(w_s);
    for (int c = 0; c < cells; ++c) {
        const int qd = qd0 + c;
        Acc next[EH][EW];
        if (c + 1 < cells) load_plane(next, d0 + c + ED);  // the next cell's newest plane
#pragma unroll
        for (int rd = 0; rd < 2; ++rd) {
            const int od = 2 * qd + rd;
#pragma unroll
            for (int rh = 0; rh < 2; ++rh) {
                const int oh = 2 * qh + rh;
                Acc acc[CW][2];
#pragma unroll
                for (int rw = 0; rw < 2; ++rw) {
                    Acc ws[8];
                    const u32 taps_at = ws_addr + ((rd * 2 + rh) * 2 + rw) * 8 * sizeof(Acc);
                    cct::Taps8<Acc>::load(taps_at, c, ws);
#pragma unroll
                    for (int cw = 0; cw < CW; ++cw) {
                        acc[cw][rw] = Acc(0);
#pragma unroll
                        for (int td = 0; td < 2; ++td)
#pragma unroll
                            for (int th = 0; th < 2; ++th)
#pragma unroll
                                for (int tw = 0; tw < 2; ++tw) {
                                    if (cct::dw_k_hi(BD, rd) + 2 * td >= K ||
                                        cct::dw_k_hi(BH, rh) + 2 * th >= K ||
                                        cct::dw_k_hi(BW, rw) + 2 * tw >= K)
                                        continue;  // no such tap (compile time)
                                    const Acc xv = win[cct::dw_e_hi(BD, rd) - td]
                                                      [cct::dw_e_hi(BH, rh) - th]
                                                      [cct::dw_e_hi(BW, rw) + cw - tw];
                                    acc[cw][rw] = cct::fma_ieee(xv, ws[(td * 2 + th) * 2 + tw],
                                                                acc[cw][rw]);
                                }
                        // The bias only where there is one: adding a zero would turn -0 into +0.
                        if (has_bias) acc[cw][rw] = cct::add_ieee(acc[cw][rw], bv);
                    }
                }
                if (od >= oD || oh >= oH) continue;
                T* o = oc + static_cast<i64>(od) * oHW + static_cast<i64>(oh) * oW + ow;
                T v[RUN];
#pragma unroll
                for (int j = 0; j < RUN; ++j) v[j] = cct::from_acc<T>(acc[j >> 1][j & 1]);
                if (run_vec) {
                    cct::store_run<RUN>(o, v);
                } else {
#pragma unroll
                    for (int j = 0; j < RUN; ++j)
                        if (ow + j < oW) o[j] = v[j];
                }
            }
        }
#pragma unroll
        for (int e = 0; e + 1 < ED; ++e)
#pragma unroll
            for (int eh = 0; eh < EH; ++eh)
#pragma unroll
                for (int ew = 0; ew < EW; ++ew) win[e][eh][ew] = win[e + 1][eh][ew];
#pragma unroll
        for (int eh = 0; eh < EH; ++eh)
#pragma unroll
            for (int ew = 0; ew < EW; ++ew) win[ED - 1][eh][ew] = next[eh][ew];
    }
}
