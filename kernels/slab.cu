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
// unless blocks are narrower than the halo), a lane copies slots of 16 bytes (VEC columns):
// it finds the pieces of its slots' first and last columns once a plane, lane j holds piece j's
// source address for the row, and each lane reads its slots' addresses by shuffles, so all of a
// lane's loads are in flight before its stores. A slot inside one piece whose source is 16-byte
// aligned moves as one 16-byte load (cupyconvt.dask starts every slab at a multiple of 16 bytes
// of W, so that with block widths that are multiples of 16 bytes every piece is aligned); the
// others column by column. (The first version, one row a warp with six 64-bit divisions a row
// and the pieces one after another, ran at 1.3 TB/s on an H100; a block a plane with 4-byte
// columns, at 1.8 TB/s.) Wider pieces tables take a piece-by-piece loop.
__device__ __forceinline__ int piece_of(const i64* wp, int j, const i64 col) {
    // The piece that holds slab column col, searching from piece j (pieces end in order).
    while (col >= __ldg(wp + 3 * j) + __ldg(wp + 3 * j + 1)) ++j;
    return j;
}

__device__ __forceinline__ i64 row_source(const i64* pieces, const i64 x, int& j) {
    // Along depth or height: the piece j that holds slab index x, and x's index in its block.
    j = 0;
    while (x >= __ldg(pieces + 3 * j) + __ldg(pieces + 3 * j + 1)) ++j;
    return x - __ldg(pieces + 3 * j) + __ldg(pieces + 3 * j + 2);
}

template <typename T>
__device__ __forceinline__ i64 box_base(const i64* box, const i64* wp, int j, i64 n, i64 c, i64 sd,
                                        i64 sh) {
    // The address slab column i of the row would come from if it lay in piece j, minus i (i64
    // arithmetic: dereferenced inside the piece alone).
    return __ldg(box) + static_cast<i64>(sizeof(T)) *
                            (n * __ldg(box + 1) + c * __ldg(box + 2) + sd * __ldg(box + 3) +
                             sh * __ldg(box + 4) + __ldg(wp + 3 * j + 2) - __ldg(wp + 3 * j));
}

template <typename T>
__global__ void __launch_bounds__(256)
gather_slab(T* __restrict__ slab, const i64* __restrict__ table, const i64 N, const i64 C,
            const i64 Ld, const i64 Lh, const i64 Lw, const int Pd, const int Ph, const int Pw) {
    constexpr int WARPS = 8, UNROLL = 4, VEC = 16 / sizeof(T);
    constexpr unsigned FULL = 0xffffffffu;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const i64* dp = table;
    const i64* hp = dp + 3 * Pd;
    const i64* wp = hp + 3 * Ph;
    const i64* boxes = wp + 3 * Pw;
    const i64 planes = N * C * Ld;
    const bool aligned_rows = Lw % VEC == 0;  // the slab's rows start at 16 bytes (its base does)
    for (i64 pl = blockIdx.x; pl < planes; pl += gridDim.x) {
        const i64 d = pl % Ld, nc = pl / Ld;
        const i64 c = nc % C, n = nc / C;
        int jd, jh;
        const i64 sd = row_source(dp, d, jd);
        const i64* plane_boxes = boxes + 5 * static_cast<i64>(jd) * Ph * Pw;
        T* plane = slab + pl * Lh * Lw;
        if (Pw <= 32) {
            for (i64 i0 = 0; i0 < Lw; i0 += 32 * UNROLL * VEC) {
                int first[UNROLL], last[UNROLL];  // pieces of each slot's first and last column
#pragma unroll
                for (int u = 0; u < UNROLL; ++u) {
                    const i64 col = i0 + (u * 32 + lane) * VEC;
                    first[u] = col < Lw ? piece_of(wp, 0, col) : Pw - 1;
                    last[u] = col < Lw ? piece_of(wp, first[u], min(col + VEC, Lw) - 1)
                                       : Pw - 1;
                }
                for (i64 h = warp; h < Lh; h += WARPS) {
                    const i64 sh = row_source(hp, h, jh);
                    const i64* row_boxes = plane_boxes + 5 * static_cast<i64>(jh) * Pw;
                    const i64 base =
                        lane < Pw ? box_base<T>(row_boxes + 5 * lane, wp, lane, n, c, sd, sh) : 0;
                    T* dst = plane + h * Lw;
                    uint4 v[UNROLL];
#pragma unroll
                    for (int u = 0; u < UNROLL; ++u) {
                        const i64 col = i0 + (u * 32 + lane) * VEC;
                        const i64 b0 = __shfl_sync(FULL, base, first[u]);
                        const i64 b1 = __shfl_sync(FULL, base, last[u]);
                        if (col >= Lw) continue;
                        const i64 src = b0 + col * static_cast<i64>(sizeof(T));
                        if (first[u] == last[u] && col + VEC <= Lw && (src & 15) == 0) {
                            v[u] = *reinterpret_cast<const uint4*>(src);
                            continue;
                        }
                        T* e = reinterpret_cast<T*>(&v[u]);
#pragma unroll
                        for (int k = 0; k < VEC; ++k) {
                            const i64 ck = col + k;
                            if (ck >= Lw) break;
                            const int j = piece_of(wp, first[u], ck);
                            const i64 b = j == first[u] ? b0
                                        : j == last[u]  ? b1
                                                        : box_base<T>(row_boxes + 5 * j, wp, j, n,
                                                                      c, sd, sh);
                            e[k] = reinterpret_cast<const T*>(b)[ck];
                        }
                    }
#pragma unroll
                    for (int u = 0; u < UNROLL; ++u) {
                        const i64 col = i0 + (u * 32 + lane) * VEC;
                        if (col >= Lw) continue;
                        if (aligned_rows && col + VEC <= Lw) {
                            *reinterpret_cast<uint4*>(dst + col) = v[u];
                            continue;
                        }
                        const T* e = reinterpret_cast<const T*>(&v[u]);
#pragma unroll
                        for (int k = 0; k < VEC; ++k)
                            if (col + k < Lw) dst[col + k] = e[k];
                    }
                }
            }
            continue;
        }
        for (i64 h = warp; h < Lh; h += WARPS) {
            const i64 sh = row_source(hp, h, jh);
            const i64* row_boxes = plane_boxes + 5 * static_cast<i64>(jh) * Pw;
            T* dst = plane + h * Lw;
            for (int jw = 0; jw < Pw; ++jw) {
                const i64 base = box_base<T>(row_boxes + 5 * jw, wp, jw, n, c, sd, sh);
                const T* src = reinterpret_cast<const T*>(base);
                const i64 start = __ldg(wp + 3 * jw), stop = start + __ldg(wp + 3 * jw + 1);
                for (i64 i = start + lane; i < stop; i += 32) dst[i] = src[i];
            }
        }
    }
}
