// Shared helpers for every cupyconvt kernel: storage types, conversions, the problem geometry.
//
// The kernels include no CUDA header: half and bfloat16 are carried as 16-bit storage structs and
// converted with single PTX instructions, so NVRTC compiles every source with no include path.
#pragma once

// Own short names for fixed-width integers: NVRTC offers no <cstdint> without an include path.
typedef long long i64;
typedef unsigned long long u64;
typedef unsigned int u32;
typedef unsigned short u16;

namespace cct {

// 16-bit storage types: distinct C++ types so that templates tell them apart.
struct half_t { u16 bits; };
struct bf16_t { u16 bits; };

// Accumulator type: float for every type narrower than double.
template <typename T> struct Acc { typedef float type; };
template <> struct Acc<double> { typedef double type; };

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(half_t v) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v.bits));
    return f;
}
__device__ __forceinline__ float to_acc(bf16_t v) {
    return __uint_as_float(static_cast<u32>(v.bits) << 16);
}

// Round an accumulator to the storage type (round to nearest even).
template <typename T> __device__ __forceinline__ T from_acc(typename Acc<T>::type v);
template <> __device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <> __device__ __forceinline__ double from_acc<double>(double v) { return v; }
template <> __device__ __forceinline__ half_t from_acc<half_t>(float v) {
    half_t h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h.bits) : "f"(v));
    return h;
}
template <> __device__ __forceinline__ bf16_t from_acc<bf16_t>(float v) {
    bf16_t h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h.bits) : "f"(v));
    return h;
}

// The problem, as cupyconvt._params.ConvParams describes it; every field is int64 so the host
// side is a flat NumPy record (cupyconvt/_gpu.py: GEOM_FIELDS) with no padding to agree on.
struct ConvGeom {
    i64 N, C_in, C_out, groups, C_in_g, C_out_g;
    i64 D, H, W;        // input spatial size
    i64 kD, kH, kW;     // kernel size
    i64 sD, sH, sW;     // stride
    i64 pD, pH, pW;     // padding
    i64 dD, dH, dW;     // dilation
    i64 oD, oH, oW;     // output spatial size
    i64 has_bias;
};

}  // namespace cct
