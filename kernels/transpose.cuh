// The batched 64 x 64 tile transpose that layout.cu's kernel runs, as a device function, so that
// the tensor-core weight pack (tc_shared.cuh) can run it in the same launch.
#pragma once
#include "common.cuh"

namespace cct {

// x (batch, rows, cols) -> y (batch, cols, rows): the tile of columns bx*64.. and of rows by*64..,
// then every gy-th row tile after it, for batches bz, bz + gz, ... Moves T (bits: u16, u32, u64).
// Each thread of 32 x 8 has 16 loads in flight before the barrier (32 x 32 tiles, 4 a thread,
// ran at about half the copy bandwidth on an H100).
template <typename T>
__device__ __forceinline__ void transpose_tiles(const T* __restrict__ x, T* __restrict__ y,
                                                i64 batch, i64 rows, i64 cols, u32 bx, u32 by,
                                                u32 bz, u32 gy, u32 gz) {
    constexpr int TILE = 64;
    __shared__ T tile[TILE][TILE + 1];
    const int tx = threadIdx.x & 31, ty = threadIdx.x >> 5;
    const i64 c0 = static_cast<i64>(bx) * TILE;
    for (i64 b = bz; b < batch; b += gz) {
        const T* src = x + b * rows * cols;
        T* dst = y + b * rows * cols;
        for (i64 r0 = static_cast<i64>(by) * TILE; r0 < rows; r0 += static_cast<i64>(TILE) * gy) {
#pragma unroll
            for (int i = ty; i < TILE; i += 8)
#pragma unroll
                for (int j = tx; j < TILE; j += 32)
                    if (r0 + i < rows && c0 + j < cols) tile[i][j] = src[(r0 + i) * cols + c0 + j];
            __syncthreads();
#pragma unroll
            for (int i = ty; i < TILE; i += 8)
#pragma unroll
                for (int j = tx; j < TILE; j += 32)
                    if (c0 + i < cols && r0 + j < rows) dst[(c0 + i) * rows + r0 + j] = tile[j][i];
            __syncthreads();
        }
    }
}

// The unsigned type of a dtype's size: what the transposes move.
template <int BYTES> struct BitsOf;
template <> struct BitsOf<2> { typedef u16 type; };
template <> struct BitsOf<4> { typedef u32 type; };
template <> struct BitsOf<8> { typedef u64 type; };

}  // namespace cct
