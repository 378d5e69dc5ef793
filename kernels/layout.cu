// Layout changes between NCDHW and NDHWC (channels-last), for the tensor-core family (which reads
// x channels-last) and for NDHWC callers of the families that read NCDHW.
#include "common.cuh"

// x (batch, rows, cols) -> y (batch, cols, rows), 64 x 64 tiles through shared memory: NCDHW to
// NDHWC with (rows, cols) = (C, D*H*W), and back with them swapped. Moves bits: instantiated for
// u16, u32 and u64 (2-, 4- and 8-byte dtypes). Each thread has 16 loads in flight before the
// barrier (32 x 32 tiles, 4 a thread, ran at about half the copy bandwidth on an H100). Grid
// (ceil(cols/64), min(ceil(rows/64), 65535), min(batch, 65535)) of 32 x 8 threads; rows and
// batches beyond the grid are looped over.
template <typename T>
__global__ void __launch_bounds__(256)
batched_transpose(const T* __restrict__ x, T* __restrict__ y, const i64 batch, const i64 rows,
                  const i64 cols) {
    constexpr int TILE = 64;
    __shared__ T tile[TILE][TILE + 1];
    const int tx = threadIdx.x & 31, ty = threadIdx.x >> 5;
    const i64 c0 = static_cast<i64>(blockIdx.x) * TILE;
    for (i64 b = blockIdx.z; b < batch; b += gridDim.z) {
        const T* src = x + b * rows * cols;
        T* dst = y + b * rows * cols;
        for (i64 r0 = static_cast<i64>(blockIdx.y) * TILE; r0 < rows;
             r0 += static_cast<i64>(TILE) * gridDim.y) {
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
