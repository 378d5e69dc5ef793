// Layout changes between NCDHW and NDHWC (channels-last), for the tensor-core family (which reads
// x channels-last) and for NDHWC callers of the families that read NCDHW.
#include "common.cuh"

// x (batch, rows, cols) -> y (batch, cols, rows), 32 x 32 tiles through shared memory: NCDHW to
// NDHWC with (rows, cols) = (C, D*H*W), and back with them swapped. Moves bits: instantiated for
// u16, u32 and u64 (2-, 4- and 8-byte dtypes). Grid (ceil(cols/32), min(ceil(rows/32), 65535),
// min(batch, 65535)) of 32 x 8 threads; rows and batches beyond the grid are looped over.
template <typename T>
__global__ void __launch_bounds__(256)
batched_transpose(const T* __restrict__ x, T* __restrict__ y, const i64 batch, const i64 rows,
                  const i64 cols) {
    __shared__ T tile[32][33];
    const int tx = threadIdx.x & 31, ty = threadIdx.x >> 5;
    const i64 c0 = static_cast<i64>(blockIdx.x) * 32;
    for (i64 b = blockIdx.z; b < batch; b += gridDim.z) {
        const T* src = x + b * rows * cols;
        T* dst = y + b * rows * cols;
        for (i64 r0 = static_cast<i64>(blockIdx.y) * 32; r0 < rows; r0 += 32LL * gridDim.y) {
#pragma unroll
            for (int i = ty; i < 32; i += 8)
                if (r0 + i < rows && c0 + tx < cols) tile[i][tx] = src[(r0 + i) * cols + c0 + tx];
            __syncthreads();
#pragma unroll
            for (int i = ty; i < 32; i += 8)
                if (c0 + i < cols && r0 + tx < rows) dst[(c0 + i) * rows + r0 + tx] = tile[tx][i];
            __syncthreads();
        }
    }
}
