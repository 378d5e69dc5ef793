// The input slab of one cupyconvt.dask output block, gathered from the input blocks it spans in
// one launch (cupyconvt/_slab.py builds the table). A slab is N x C x Ld x Lh x Lw, C-contiguous;
// along each spatial axis it is the concatenation of pieces of consecutive input blocks, so the
// slab is cut into Pd x Ph x Pw boxes, box (jd, jh, jw) a part of one input block.
#include "common.cuh"

// table (i64), written by the host:
//   Pd + Ph + Pw pieces of 3 values, depth's first: (start in the slab, length, start in the
//   block) - each axis's pieces in order, covering [0, L) of the slab without gaps;
//   then Pd*Ph*Pw boxes (row-major in jd, jh, jw) of 5 values: (address of the block's first
//   element, its strides along N, C, D and H in elements). Rows along W are contiguous.
// Moves bits: instantiated for u16, u32 and u64 (2-, 4- and 8-byte dtypes). A block takes one
// plane (n, c, d) at a time, its 8 warps one row h each. With at most 32 pieces along W (always,
// unless blocks are narrower than the halo), each lane finds the piece of each of its columns
// once a plane, lane j holds piece j's source address for the row, and every lane reads its
// columns' addresses by shuffles: all UNROLL loads of a lane are in flight before its stores.
// (The first version, one row a warp with 64-bit divisions a row and the pieces copied one after
// another, ran at 1.3 TB/s on an H100, bound by the divisions.) Wider pieces tables take a
// piece-by-piece loop.
template <typename T>
__global__ void __launch_bounds__(256)
gather_slab(T* __restrict__ slab, const i64* __restrict__ table, const i64 N, const i64 C,
            const i64 Ld, const i64 Lh, const i64 Lw, const int Pd, const int Ph, const int Pw) {
    constexpr int WARPS = 8, UNROLL = 8;
    constexpr unsigned FULL = 0xffffffffu;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const i64* dp = table;
    const i64* hp = dp + 3 * Pd;
    const i64* wp = hp + 3 * Ph;
    const i64* boxes = wp + 3 * Pw;
    const i64 planes = N * C * Ld;
    for (i64 pl = blockIdx.x; pl < planes; pl += gridDim.x) {
        const i64 d = pl % Ld, nc = pl / Ld;
        const i64 c = nc % C, n = nc / C;
        int jd = 0;
        while (d >= __ldg(dp + 3 * jd) + __ldg(dp + 3 * jd + 1)) ++jd;
        const i64 sd = d - __ldg(dp + 3 * jd) + __ldg(dp + 3 * jd + 2);
        const i64* plane_boxes = boxes + 5 * static_cast<i64>(jd) * Ph * Pw;
        T* plane = slab + pl * Lh * Lw;
        if (Pw <= 32) {
            for (i64 i0 = 0; i0 < Lw; i0 += 32 * UNROLL) {
                int piece[UNROLL];  // of each of this lane's columns i0 + u*32 + lane
#pragma unroll
                for (int u = 0; u < UNROLL; ++u) {
                    const i64 i = i0 + u * 32 + lane;
                    int j = 0;
                    while (j + 1 < Pw && i >= __ldg(wp + 3 * j) + __ldg(wp + 3 * j + 1)) ++j;
                    piece[u] = j;
                }
                for (i64 h = warp; h < Lh; h += WARPS) {
                    int jh = 0;
                    while (h >= __ldg(hp + 3 * jh) + __ldg(hp + 3 * jh + 1)) ++jh;
                    const i64 sh = h - __ldg(hp + 3 * jh) + __ldg(hp + 3 * jh + 2);
                    // Lane j < Pw: the address slab column i of the row would come from if it
                    // lay in piece j, minus i (i64 arithmetic, dereferenced inside the piece).
                    i64 base = 0;
                    if (lane < Pw) {
                        const i64* box = plane_boxes + 5 * (static_cast<i64>(jh) * Pw + lane);
                        base = __ldg(box) + static_cast<i64>(sizeof(T)) *
                                                (n * __ldg(box + 1) + c * __ldg(box + 2) +
                                                 sd * __ldg(box + 3) + sh * __ldg(box + 4) +
                                                 __ldg(wp + 3 * lane + 2) - __ldg(wp + 3 * lane));
                    }
                    T* dst = plane + h * Lw;
                    T v[UNROLL];
#pragma unroll
                    for (int u = 0; u < UNROLL; ++u) {
                        const i64 i = i0 + u * 32 + lane;
                        const i64 src = __shfl_sync(FULL, base, piece[u]);
                        if (i < Lw) v[u] = reinterpret_cast<const T*>(src)[i];
                    }
#pragma unroll
                    for (int u = 0; u < UNROLL; ++u) {
                        const i64 i = i0 + u * 32 + lane;
                        if (i < Lw) dst[i] = v[u];
                    }
                }
            }
            continue;
        }
        for (i64 h = warp; h < Lh; h += WARPS) {
            int jh = 0;
            while (h >= __ldg(hp + 3 * jh) + __ldg(hp + 3 * jh + 1)) ++jh;
            const i64 sh = h - __ldg(hp + 3 * jh) + __ldg(hp + 3 * jh + 2);
            for (int jw = 0; jw < Pw; ++jw) {
                const i64* box = plane_boxes + 5 * (static_cast<i64>(jh) * Pw + jw);
                const T* src = reinterpret_cast<const T*>(__ldg(box)) + n * __ldg(box + 1) +
                               c * __ldg(box + 2) + sd * __ldg(box + 3) + sh * __ldg(box + 4) +
                               __ldg(wp + 3 * jw + 2);
                T* out = plane + h * Lw + __ldg(wp + 3 * jw);
                const i64 len = __ldg(wp + 3 * jw + 1);
                for (i64 i = lane; i < len; i += 32) out[i] = src[i];
            }
        }
    }
}
