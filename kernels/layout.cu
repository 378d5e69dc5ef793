// Layout changes between NCDHW and NDHWC (channels-last), for the tensor-core family (which reads
// x channels-last) and for NDHWC callers of the families that read NCDHW.
#include "common.cuh"
#include "transpose.cuh"

// x (batch, rows, cols) -> y (batch, cols, rows), 64 x 64 tiles through shared memory: NCDHW to
// NDHWC with (rows, cols) = (C, D*H*W), and back with them swapped. Moves bits: instantiated for
// u16, u32 and u64 (2-, 4- and 8-byte dtypes). Grid (ceil(cols/64), min(ceil(rows/64), 65535),
// min(batch, 65535)) of 32 x 8 threads; rows and batches beyond the grid are looped over.
template <typename T>
__global__ void __launch_bounds__(256)
batched_transpose(const T* __restrict__ x, T* __restrict__ y, const i64 batch, const i64 rows,
                  const i64 cols) {
    cct::transpose_tiles(x, y, batch, rows, cols, blockIdx.x, blockIdx.y, blockIdx.z, gridDim.y,
                         gridDim.z);
}
