// What the Hopper warpgroup-MMA kernels (wgmma.cu, patch.cu) share: shared-memory matrix
// descriptors and the fences and waits around asynchronous wgmmas, beside the generated MMAs.
#pragma once
#include "common.cuh"
#include "wgmma_ops.cuh"

namespace cct {

// Shared-memory matrix descriptor, no swizzle: start address, leading (K) and stride (M or N)
// byte offsets, each in 16-byte units.
__device__ __forceinline__ u64 wg_desc(u32 addr, u32 lbo, u32 sbo) {
    return static_cast<u64>((addr & 0x3FFFFu) >> 4) | (static_cast<u64>(lbo >> 4) << 16) |
           (static_cast<u64>(sbo >> 4) << 32);
}
__device__ __forceinline__ void wg_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wg_commit() {
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
template <int N> __device__ __forceinline__ void wg_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Keeps the compiler from moving accesses of accumulators across wgmma issue and wait.
template <int R> __device__ __forceinline__ void wg_hold(float* d) {
#pragma unroll
    for (int r = 0; r < R; ++r) asm volatile("" : "+f"(d[r])::"memory");
}
// Orders this thread's completed cp.async writes before reads by the tensor cores (async proxy).
__device__ __forceinline__ void fence_async_shared() {
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

}  // namespace cct
