// Shared helpers of cap's CUDA kernels (compiled by NVRTC in one program with the
// other .cu files of this folder; see kernels/src/cuda/mod.rs).
//
// Everything here mirrors kernels/src/cpu/scalar.rs bit for bit where the CPU defines
// exact values (f16/bf16 decoding, dequantization); sums differ from the CPU's only in
// their order (a warp adds 32 partial sums, the CPU one running sum).

typedef unsigned char u8;
typedef signed char i8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

// Value types, as cap_format::DType (the kernels are instantiated once per type).
#define CAP_F32 0
#define CAP_F16 1
#define CAP_BF16 2
#define CAP_Q8 3
#define CAP_Q4 4

#define CAP_FULL_MASK 0xffffffffu
// -inf without math.h (NVRTC compiles without the system headers).
#define CAP_NEG_INF __int_as_float(0xff800000)

// Little-endian u16 at any byte address (quantized blocks' f16 scale and minimum).
__device__ __forceinline__ u16 cap_u16_at(const u8* p) {
    return (u16)((u32)p[0] | ((u32)p[1] << 8));
}

// f16 bits -> f32, exactly as scalar::f16_to_f32 (subnormals exact, NaN quiet with
// its payload).
#ifdef __CUDA_ARCH__
// On the GPU: the hardware conversion, exact for every finite f16 (subnormals too,
// which are normal in f32); Inf and NaN are rebuilt from the bits, so a NaN keeps its
// payload as on the CPU. Selects, not branches: the bit-twiddling version below kept
// loops over f16 values from unrolling, and dense f16 rows ran at 620 GB/s on an H200
// where bf16 ran at 2400 (scripts/gpu-check.sh).
__device__ __forceinline__ float cap_f16_to_f32(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    u32 sign = ((u32)(h & 0x8000u)) << 16;
    u32 man = (u32)h & 0x3ffu;
    u32 special = sign | 0x7f800000u | (man != 0u ? (0x00400000u | (man << 13)) : 0u);
    return (h & 0x7c00u) == 0x7c00u ? __uint_as_float(special) : f;
}
#else
// Elsewhere (scripts/cuda-emu.sh runs this C++ on the CPU): from the bits.
__device__ __forceinline__ float cap_f16_to_f32(u16 h) {
    u32 sign = ((u32)(h & 0x8000u)) << 16;
    u32 exp = ((u32)h >> 10) & 0x1fu;
    u32 man = (u32)h & 0x3ffu;
    if (exp == 0u) {
        if (man == 0u) return __uint_as_float(sign);
        // Subnormal: man * 2^-24, a product of exact factors.
        float v = __fmul_rn((float)man, 1.0f / 16777216.0f);
        return sign ? -v : v;
    }
    if (exp == 0x1fu) {
        if (man == 0u) return __uint_as_float(sign | 0x7f800000u);
        return __uint_as_float(sign | 0x7fc00000u | (man << 13));
    }
    return __uint_as_float(sign | ((exp + 127u - 15u) << 23) | (man << 13));
}
#endif

// bf16 bits -> f32: the upper half of the f32 bits (scalar::bf16_to_f32).
__device__ __forceinline__ float cap_bf16_to_f32(u16 b) {
    return __uint_as_float(((u32)b) << 16);
}

// Bytes of one stored value of a float type.
template <int DT> __device__ __forceinline__ u32 cap_float_size() {
    return DT == CAP_F32 ? 4u : 2u;
}

// Value i of a float value array (Elem::get of scalar.rs). The array must be aligned
// for its element type: the format puts every part at a multiple of 64 bytes, and
// device allocations are 256-byte aligned.
template <int DT> __device__ __forceinline__ float cap_float_value(const u8* v, u64 i) {
    if (DT == CAP_F32) return ((const float*)v)[i];
    u16 h = ((const u16*)v)[i];
    return DT == CAP_F16 ? cap_f16_to_f32(h) : cap_bf16_to_f32(h);
}

// Bytes of one quantized block of `group` values (cap_format::DType::size):
// Q8: f16 scale + group i8 codes; Q4: f16 scale, f16 minimum + group/2 bytes.
template <int DT> __device__ __forceinline__ u32 cap_q_block_bytes(u32 group) {
    return DT == CAP_Q8 ? 2u + group : 4u + group / 2u;
}

// Bytes of a run of k quantized values: ceil(k/group) blocks (DType::run_bytes).
template <int DT> __device__ __forceinline__ u64 cap_q_run_bytes(u64 k, u32 group) {
    return ((k + group - 1u) / group) * (u64)cap_q_block_bytes<DT>(group);
}

// Value j of the run whose first block starts at `run` (scalar::q_value): Q8 s*q,
// Q4 s*q + m, computed in f32 with one rounding each, never fused, as the format
// defines dequantization (SPEC.md §5).
template <int DT> __device__ __forceinline__ float cap_q_value(const u8* run, u32 group, u32 j) {
    u32 k = j % group;
    const u8* blk = run + (u64)(j / group) * cap_q_block_bytes<DT>(group);
    float s = cap_f16_to_f32(cap_u16_at(blk));
    if (DT == CAP_Q4) {
        float m = cap_f16_to_f32(cap_u16_at(blk + 2));
        u32 q = ((u32)blk[4u + k / 2u] >> (4u * (k % 2u))) & 0xfu;
        return __fadd_rn(__fmul_rn(s, (float)q), m);
    }
    return __fmul_rn(s, (float)(i8)blk[2u + k]);
}

// Sum of v over the 32 lanes of a (converged, full) warp; every lane gets it.
__device__ __forceinline__ float cap_warp_sum(float v) {
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(CAP_FULL_MASK, v, off);
    return v;
}

// Maximum of v over the 32 lanes of a warp; every lane gets it.
__device__ __forceinline__ float cap_warp_max(float v) {
    for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(CAP_FULL_MASK, v, off));
    return v;
}

// Sum of v over the block (blockDim.x a multiple of 32, at most 1024); every thread
// gets it. `sh` is 32 floats of shared memory; every thread of the block must call.
__device__ __forceinline__ float cap_block_sum(float v, float* sh) {
    u32 lane = threadIdx.x % 32u, warp = threadIdx.x / 32u, warps = blockDim.x / 32u;
    v = cap_warp_sum(v);
    if (lane == 0u) sh[warp] = v;
    __syncthreads();
    v = threadIdx.x < warps ? sh[threadIdx.x] : 0.0f;
    if (warp == 0u) v = cap_warp_sum(v);
    if (threadIdx.x == 0u) sh[0] = v;
    __syncthreads();
    float r = sh[0];
    __syncthreads();
    return r;
}

// Maximum of v over the block, as cap_block_sum.
__device__ __forceinline__ float cap_block_max(float v, float* sh) {
    u32 lane = threadIdx.x % 32u, warp = threadIdx.x / 32u, warps = blockDim.x / 32u;
    v = cap_warp_max(v);
    if (lane == 0u) sh[warp] = v;
    __syncthreads();
    v = threadIdx.x < warps ? sh[threadIdx.x] : CAP_NEG_INF;
    if (warp == 0u) v = cap_warp_max(v);
    if (threadIdx.x == 0u) sh[0] = v;
    __syncthreads();
    float r = sh[0];
    __syncthreads();
    return r;
}
