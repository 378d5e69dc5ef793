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

// IEEE float32 fused multiply-add and add, denormals kept. CuPy compiles every RawModule with
// -ftz=true, which would flush float32 denormal inputs and results to zero; PTX without .ftz is
// exact IEEE whatever the compiler flags say. double never flushes.
__device__ __forceinline__ float fma_ieee(float a, float b, float c) {
    float d;
    asm("fma.rn.f32 %0, %1, %2, %3;" : "=f"(d) : "f"(a), "f"(b), "f"(c));
    return d;
}
__device__ __forceinline__ double fma_ieee(double a, double b, double c) { return fma(a, b, c); }
__device__ __forceinline__ float add_ieee(float a, float b) {
    float d;
    asm("add.rn.f32 %0, %1, %2;" : "=f"(d) : "f"(a), "f"(b));
    return d;
}
__device__ __forceinline__ double add_ieee(double a, double b) { return a + b; }

// N = 2 or 4 neighbouring outputs as one vector store (p aligned to N * sizeof(T)): a warp then
// writes whole sectors where one phase a store would write every other element.
template <int N, typename T> __device__ __forceinline__ void store_run(T* p, const T (&v)[N]) {
    if constexpr (sizeof(T) == 2) {
        u32 u[N / 2];
#pragma unroll
        for (int i = 0; i < N / 2; ++i)
            u[i] = static_cast<u32>(v[2 * i].bits) | (static_cast<u32>(v[2 * i + 1].bits) << 16);
        if constexpr (N == 2) *reinterpret_cast<u32*>(p) = u[0];
        else *reinterpret_cast<uint2*>(p) = make_uint2(u[0], u[1]);
    } else if constexpr (sizeof(T) == 4) {
        if constexpr (N == 2) *reinterpret_cast<float2*>(p) = make_float2(v[0], v[1]);
        else *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
    } else {
        *reinterpret_cast<double2*>(p) = make_double2(v[0], v[1]);
        if constexpr (N == 4) *reinterpret_cast<double2*>(p + 2) = make_double2(v[2], v[3]);
    }
}

// Two neighbouring outputs as one vector store (p aligned to 2 * sizeof(T)).
template <typename T> __device__ __forceinline__ void store_pair(T* p, T lo, T hi) {
    const T v[2] = {lo, hi};
    store_run<2>(p, v);
}

// Asynchronous 4- or 8-byte global-to-shared copy (sm_80+), zero-filling the destination when
// `valid` is false (then nothing is read from `src`). Falls back to a plain load and store on
// older GPUs. Complete with cp_async_wait_all() and a barrier before reading the destination.
template <typename T>
__device__ __forceinline__ void cp_async_or_zero(T* dst, const T* src, bool valid) {
    static_assert(sizeof(T) == 4 || sizeof(T) == 8, "cp.async copies 4, 8 or 16 bytes");
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    u32 saddr;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(saddr) : "l"(dst));
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;" ::"r"(saddr), "l"(src),
                 "n"(static_cast<int>(sizeof(T))), "r"(valid ? static_cast<int>(sizeof(T)) : 0));
#else
    *dst = valid ? *src : T(0);
#endif
}

// The same for 16 bytes (both addresses 16-byte aligned).
template <typename T>
__device__ __forceinline__ void cp_async16_or_zero(T* dst, const T* src, bool valid) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    u32 saddr;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(saddr) : "l"(dst));
    asm volatile("cp.async.ca.shared.global [%0], [%1], 16, %2;" ::"r"(saddr), "l"(src),
                 "r"(valid ? 16 : 0));
#else
#pragma unroll
    for (int i = 0; i < static_cast<int>(16 / sizeof(T)); ++i) dst[i] = valid ? src[i] : T(0);
#endif
}

__device__ __forceinline__ void cp_async_wait_all() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_all;" ::: "memory");
#endif
}

// Per-phase table built on the host (cupyconvt/_plans.py: phase_table): PHASE_HDR ints per phase
// (o0_d, o0_h, o0_w, Q_D, Q_H, Q_W, taps, 0), then max_taps entries of 4 ints
// (off_d, off_h, off_w, w_tap) where w_tap = (kd*kH + kh)*kW + kw.
enum { PHASE_HDR = 8 };  // an enum: no unused-variable warning where a file does not read it

__device__ __forceinline__ u32 smem_addr(const void* p) {
    u32 a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}

// 16 aligned bytes of packed weights into shared memory.
__device__ __forceinline__ void copy16(void* dst, const void* src) {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_addr(dst)), "l"(src)
                 : "memory");
#else
    *reinterpret_cast<float4*>(dst) = *reinterpret_cast<const float4*>(src);
#endif
}
__device__ __forceinline__ void cp_commit() {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}
template <int N> __device__ __forceinline__ void cp_wait() {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

// (n, qd, qh, qw) of phase voxel m, in 32-bit arithmetic when m fits.
__device__ __forceinline__ void split_voxel(i64 m, i64 QD, i64 QH, i64 QW, i64& n, int& qd, int& qh,
                                            int& qw) {
    if (m < 2147483647LL) {
        u32 r = static_cast<u32>(m);
        const u32 qw_ = r % static_cast<u32>(QW); r /= static_cast<u32>(QW);
        const u32 qh_ = r % static_cast<u32>(QH); r /= static_cast<u32>(QH);
        qd = static_cast<int>(r % static_cast<u32>(QD));
        n = r / static_cast<u32>(QD);
        qw = static_cast<int>(qw_); qh = static_cast<int>(qh_);
    } else {
        i64 r = m;
        qw = static_cast<int>(r % QW); r /= QW;
        qh = static_cast<int>(r % QH); r /= QH;
        qd = static_cast<int>(r % QD);
        n = r / QD;
    }
}

// The tile a block of a phase-GEMM grid computes. The grid is (voxel tiles, channel tiles,
// groups x phases), and CUDA starts blocks in the order of their linear index, x fastest: taken
// as launched, phase p's tiles of the whole volume run before phase p + 1's. With channels-first
// output each phase writes every s-th element along w, partial 32-byte sectors that L2 evicts
// half-written (unet_k2s2 float32: 507 MB read and 257 MB written from DRAM for a 168 MB
// problem). PHASE_FASTEST renumbers the blocks so that the phases of one voxel tile run side by
// side: their interleaved stores meet in L2 and leave it as whole sectors (34 MB read, 112 MB
// written; 0.48 -> 0.40 ms). Channels-last output has no such partial sectors, and there the
// launch order measured 3-11% faster. One 64-bit division a block.
struct GemmTileIdx {
    i64 m;    // voxel tile
    int n;    // channel tile
    int grp;  // group
    int ph;   // stride phase (the grid's z is grp * phases + ph)
};
template <bool PHASE_FASTEST> __device__ __forceinline__ GemmTileIdx gemm_tile(const int phases) {
    GemmTileIdx t;
    int z;
    if constexpr (!PHASE_FASTEST) {
        t.m = blockIdx.x;
        t.n = static_cast<int>(blockIdx.y);
        z = static_cast<int>(blockIdx.z);
    } else {
        const i64 lin = blockIdx.x + static_cast<i64>(gridDim.x) *
                                         (blockIdx.y + static_cast<i64>(gridDim.y) * blockIdx.z);
        const i64 zy = static_cast<i64>(gridDim.z) * gridDim.y;  // < 2^32
        t.m = lin / zy;
        const u32 r = static_cast<u32>(lin - t.m * zy);  // z + gridDim.z * y
        t.n = static_cast<int>(r / gridDim.z);
        z = static_cast<int>(r - static_cast<u32>(t.n) * gridDim.z);
    }
    t.grp = z / phases;
    t.ph = z - t.grp * phases;
    return t;
}

// The problem, as cupyconvt._params.ConvParams describes it. Every field is int64, so the host
// side is a flat int64 array (cupyconvt/_plans.py: GEOM_FIELDS) with no padding to agree on; it
// lives on the device and kernels take it by pointer and copy it once into registers.
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

// Fragments of N accumulators read from (or written to) shared memory with vector accesses.
template <typename A, int N> struct Frag;
template <> struct Frag<float, 4> {
    static __device__ __forceinline__ void load(const float* p, float* v) {
        const float4 t = *reinterpret_cast<const float4*>(p);
        v[0] = t.x; v[1] = t.y; v[2] = t.z; v[3] = t.w;
    }
    static __device__ __forceinline__ void store(float* p, float a, float b, float c, float d) {
        *reinterpret_cast<float4*>(p) = make_float4(a, b, c, d);
    }
};
template <> struct Frag<float, 2> {
    static __device__ __forceinline__ void load(const float* p, float* v) {
        const float2 t = *reinterpret_cast<const float2*>(p);
        v[0] = t.x; v[1] = t.y;
    }
};
template <> struct Frag<double, 4> {
    static __device__ __forceinline__ void load(const double* p, double* v) {
        const double2 a = *reinterpret_cast<const double2*>(p);
        const double2 b = *reinterpret_cast<const double2*>(p + 2);
        v[0] = a.x; v[1] = a.y; v[2] = b.x; v[3] = b.y;
    }
    static __device__ __forceinline__ void store(double* p, double a, double b, double c, double d) {
        *reinterpret_cast<double2*>(p) = make_double2(a, b);
        *reinterpret_cast<double2*>(p + 2) = make_double2(c, d);
    }
};
template <> struct Frag<double, 2> {
    static __device__ __forceinline__ void load(const double* p, double* v) {
        const double2 t = *reinterpret_cast<const double2*>(p);
        v[0] = t.x; v[1] = t.y;
    }
};

// One element of a tensor into the shared-memory byte address dst (smem_addr) as an accumulator,
// zero where !ok. Where !ok nothing is read (cp.async src-size 0): src may then point anywhere.
// float and double go by cp.async (asynchronous, zero-filled); the 16-bit types are converted
// through registers. A caller that keeps the byte address adds constants to it.
template <typename T> struct GatherS {
    static __device__ __forceinline__ void copy(u32 dst, const T* src, bool ok) {
        const float v = ok ? to_acc(*src) : 0.0f;
        asm volatile("st.shared.f32 [%0], %1;\n" ::"r"(dst), "f"(v) : "memory");
    }
};
template <> struct GatherS<float> {
    static __device__ __forceinline__ void copy(u32 dst, const float* src, bool ok) {
#if __CUDA_ARCH__ >= 800
        asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src),
                     "r"(ok ? 4 : 0) : "memory");
#else
        const float v = ok ? *src : 0.0f;
        asm volatile("st.shared.f32 [%0], %1;\n" ::"r"(dst), "f"(v) : "memory");
#endif
    }
};
template <> struct GatherS<double> {
    static __device__ __forceinline__ void copy(u32 dst, const double* src, bool ok) {
#if __CUDA_ARCH__ >= 800
        asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;\n" ::"r"(dst), "l"(src),
                     "r"(ok ? 8 : 0) : "memory");
#else
        const double v = ok ? *src : 0.0;
        asm volatile("st.shared.f64 [%0], %1;\n" ::"r"(dst), "d"(v) : "memory");
#endif
    }
};

// The same into a shared-memory pointer (backward.cu: grad_weight's gathers, the staged
// grad_input's box).
template <typename T> struct GatherX {
    static __device__ __forceinline__ void copy(typename Acc<T>::type* dst, const T* src, bool ok) {
        if constexpr (sizeof(T) == 2)
            *dst = ok ? to_acc(*src) : typename Acc<T>::type(0);
        else
            GatherS<T>::copy(smem_addr(dst), src, ok);
    }
};

// 16 aligned bytes into a shared-memory byte address.
__device__ __forceinline__ void copy16_to(u32 dst, const void* src) {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(src) : "memory");
#else
    const float4 t = *reinterpret_cast<const float4*>(src);
    asm volatile("st.shared.v4.f32 [%0], {%1, %2, %3, %4};\n" ::"r"(dst), "f"(t.x), "f"(t.y),
                 "f"(t.z), "f"(t.w) : "memory");
#endif
}

// The A operand of the SIMT implicit GEMMs (igemm.cu's forward, backward.cu's grad_input): a
// chunk of BK channels x BM voxels of a tensor, each voxel read at its origin plus the chunk's
// tap offset, into one [BK][BM] stage of a shared-memory ring; zero outside the tensor's
// D x H x W volume and past the chunk's last existing channel. Thread tid loads the voxels
// j < M_PER_THREAD in slots ml = tid + j*NT (BM >= NT) or tid % BM, channels
// k_first + i*K_STRIDE of the chunk.
//
// What no chunk changes is set up once: each voxel's origin (for the bounds test) and address
// in channel k_first, and the shared byte address of the thread's first slot. A chunk adds one
// 64-bit offset (its channels and tap) to each address and constants to the shared one: about
// 8 + 4*K_PER_THREAD instructions a voxel. (Rebuilding the addresses every chunk, as the
// kernels did, took ~130 instructions a chunk of the 128x128 tile's 700: sm_90 SASS.)
template <typename T, int BM, int BK, int NT>
struct ChunkGather {
    static constexpr int M_PER_THREAD = BM >= NT ? BM / NT : 1;
    static constexpr int K_STRIDE = BM >= NT ? 1 : NT / BM;
    static constexpr int K_PER_THREAD = BK / K_STRIDE;
    static constexpr u32 ELEM = sizeof(typename Acc<T>::type);
    static_assert(BM % NT == 0 || NT % BM == 0, "the loader needs BM and the thread count to nest");
    static_assert(BK % K_STRIDE == 0, "the loader covers the chunk evenly");

    const T* src[M_PER_THREAD];  // voxel j's element in channel k_first at tap offset 0
    int od[M_PER_THREAD], oh[M_PER_THREAD], ow[M_PER_THREAD];  // its origin; od = NONE: no voxel
    u32 dst;                     // shared byte address of the thread's slot (k_first, ml) in stage 0
    int k_first;                 // the thread's first channel of a chunk
    u32 D, H, W;                 // the tensor's volume
    i64 kstep;                   // elements between the channels k_first + i*K_STRIDE, i + 1

    static constexpr int NONE = -(1 << 30);  // an origin never inside any volume

    // The thread's slots in the [BK][BM] stage that starts at shared byte address `stage0`, the
    // tensor's volume and its channel stride `vol` (elements).
    __device__ __forceinline__ void init(u32 stage0, u32 D_, u32 H_, u32 W_, i64 vol) {
        const int tid = threadIdx.x;
        k_first = BM >= NT ? 0 : tid / BM;
        dst = stage0 + (static_cast<u32>(k_first) * BM + (BM >= NT ? tid : tid % BM)) * ELEM;
        D = D_; H = H_; W = W_;
        kstep = K_STRIDE * vol;
    }
    // The voxel slot ml of this thread's voxel j (what init placed).
    static __device__ __forceinline__ int slot(int j) {
        return BM >= NT ? static_cast<int>(threadIdx.x) + j * NT : static_cast<int>(threadIdx.x) % BM;
    }
    // Voxel j: origin (d, h, w) (d = NONE where the slot has no voxel) and its element in
    // channel k_first at tap offset 0 (any valid address where it has none).
    __device__ __forceinline__ void set(int j, int d, int h, int w, const T* p) {
        od[j] = d; oh[j] = h; ow[j] = w; src[j] = p;
    }
    // One chunk into the stage `stage_bytes` past stage 0: the tap offset (td, th, tw), `off` its
    // linear offset plus the chunk's first channel times the channel stride; k_left channels of
    // the chunk exist from k_first.
    __device__ __forceinline__ void issue(u32 stage_bytes, i64 off, int td, int th, int tw,
                                          int k_left) const {
#pragma unroll
        for (int j = 0; j < M_PER_THREAD; ++j) {
            const bool inside = static_cast<u32>(od[j] + td) < D &&
                                static_cast<u32>(oh[j] + th) < H && static_cast<u32>(ow[j] + tw) < W;
            const T* s = src[j] + off;
            const u32 d = dst + stage_bytes + static_cast<u32>(j * NT) * ELEM;
#pragma unroll
            for (int i = 0; i < K_PER_THREAD; ++i) {
                GatherS<T>::copy(d + static_cast<u32>(i * K_STRIDE * BM) * ELEM, s,
                                 inside && i * K_STRIDE < k_left);
                s += kstep;
            }
        }
    }
};

// The B operand of the same GEMMs: a [BK][BN] stage of packed weights, whose rows lie `pitch`
// elements apart in global memory, copied in 16-byte pieces of VN accumulators; thread tid copies
// the pieces tid + i*NT. Each piece's shared byte address and offset in a chunk are set up once.
template <typename Acc, int BK, int BN, int NT>
struct WeightPieces {
    static constexpr int VN = 16 / static_cast<int>(sizeof(Acc));  // accumulators a piece
    static constexpr int VECS = BK * BN / VN;
    static constexpr int PER_THREAD = (VECS + NT - 1) / NT;
    static_assert(BN % VN == 0, "weights are copied in 16-byte vectors");

    u32 dst[PER_THREAD];  // shared byte address in stage 0
    int off[PER_THREAD];  // element offset from a chunk's start

    // Thread tid's pieces of the [BK][BN] stage that starts at shared byte address `stage0`.
    __device__ __forceinline__ void init(int tid, u32 stage0, int pitch) {
#pragma unroll
        for (int i = 0; i < PER_THREAD; ++i) {
            const int e = tid + i * NT;
            const int k = e / (BN / VN), nv = e - k * (BN / VN);
            dst[i] = stage0 + static_cast<u32>(k * BN + nv * VN) * sizeof(Acc);
            off[i] = k * pitch + nv * VN;
        }
    }
    // Thread tid's pieces of the chunk that starts at `chunk`, into the stage `stage_bytes` past
    // stage 0.
    __device__ __forceinline__ void issue(int tid, u32 stage_bytes, const Acc* chunk) const {
#pragma unroll
        for (int i = 0; i < PER_THREAD; ++i)
            if (VECS % NT == 0 || tid + i * NT < VECS)
                copy16_to(dst[i] + stage_bytes, chunk + off[i]);
    }
};

// The register tile's inner product over one k-step: TM rows of `as` times TN columns of `bs`.
// Thread (tx, ty) takes rows (i * THREADS_M + tx) * 4 + 0..3 and columns (j * THREADS_N + ty) *
// FN + 0..FN-1, so a warp's fragment reads are neighbouring vectors.
template <typename A, int TM, int TN, int FN, int THREADS_M, int THREADS_N>
__device__ __forceinline__ void tile_step(const A* as, const A* bs, int tx, int ty, A (&acc)[TM][TN]) {
    A a[TM], b[TN];
#pragma unroll
    for (int i = 0; i < TM / 4; ++i) Frag<A, 4>::load(as + (i * THREADS_M + tx) * 4, a + 4 * i);
#pragma unroll
    for (int j = 0; j < TN / FN; ++j) Frag<A, FN>::load(bs + (j * THREADS_N + ty) * FN, b + FN * j);
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int j = 0; j < TN; ++j) acc[i][j] = fma_ieee(a[i], b[j], acc[i][j]);
}

// Pass f of the GEMMs' epilogue: channel f * FN + jj of each of the thread's fragments goes to
// row ty * FN + jj of `smem`, THREADS_N * FN rows of CROW accumulators, a row a channel and the
// tile's voxels along it. The caller syncs before (the ring or the last pass is being read) and
// after (before reading the rows back).
template <int CROW, int FN, int THREADS_M, typename A, int TM, int TN>
__device__ __forceinline__ void stage_c_pass(A* smem, const A (&acc)[TM][TN], int f, int tx,
                                             int ty) {
#pragma unroll
    for (int i = 0; i < TM / 4; ++i)
#pragma unroll
        for (int jj = 0; jj < FN; ++jj)
            Frag<A, 4>::store(smem + (ty * FN + jj) * CROW + (i * THREADS_M + tx) * 4,
                              acc[4 * i][f * FN + jj], acc[4 * i + 1][f * FN + jj],
                              acc[4 * i + 2][f * FN + jj], acc[4 * i + 3][f * FN + jj]);
}

}  // namespace cct
