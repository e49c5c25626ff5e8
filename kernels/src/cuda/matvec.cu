// Matrix-vector products for every weight encoding of the .cap format, the GPU
// counterparts of the `*_rows` kernels of kernels/src/cpu/scalar.rs:
//
//   y[i] += sum_c W[r0 + i, c] * x[c]     for i in 0..n
//
// Mapping: one warp per output row (row r0 + warp), blockDim.x a multiple of 32, so
// a block computes blockDim.x/32 rows; lanes split the row's columns (or stored
// values), each keeps one f32 partial sum, a warp shuffle adds them and lane 0 adds
// the total to y. Low-rank is two of these (t = A*x over `rank` rows, then y += B*t).
//
// Byte layouts are exactly formats/SPEC.md §5 as scalar.rs reads them:
// * dense: rows of `cols` values; quantized rows are runs of ceil(cols/G) blocks.
// * bitmask: bit i = r*cols + c is bit i%8 of mask byte i/8 (LSB first); the row's
//   kept values in column order, starting at row_start[r] (float types) or, quantized,
//   at block row_block[r] (a run of its own: groups restart at each row).
// * block-CSR: u32 ptr over (row, 256-column block) pairs; col_idx = c - 256*b (u8).
// * 2:4: group g of 4 columns (ga = r*cols/4 + g) keeps values 2ga, 2ga+1 (quantized:
//   2g, 2g+1 of row r's run of cols/2 values); nibble ga of meta (low nibble first):
//   bits 0-1 the first kept column, bits 2-3 the second.
//
// The host checks every size first (kernels/src/cuda/gpu.rs): the kernels trust
// lengths, except that mask bytes past mask_len read as 0 and a block-CSR column past
// cols is skipped (as the CPU kernels never read past their slices).

// Value k of a float array, or value j of a quantized run.
template <int DT> __device__ __forceinline__ float cap_value(const u8* vals, const u8* run, u32 group, u64 k, u32 j) {
    if (DT == CAP_Q8 || DT == CAP_Q4) return cap_q_value<DT>(run, group, j);
    return cap_float_value<DT>(vals, k);
}

// Quantized runs read one unit per load (Q4: a u32 of 8 codes; Q8: a u16 of 2), when
// the group is a power of two (cap writes 16, 32, 64, 128, 256): unit t of a run holds
// values t*per .. t*per+per-1 and lies in block t >> shift, so no lane divides per
// value (cap_q_value's j / group, a slow runtime division), a warp's 32 loads of one
// step are consecutive bytes but for the blocks' scales, and a block's scale is read
// once per unit. Measured on an H200 at 11008x4096 (scripts/gpu-check.sh): dense q8
// 423 GB/s and q4 212 GB/s with the value-at-a-time loop, 660 and 548 with units.
// Unrolling the lanes' loops four times (#pragma unroll 4, more loads in flight) made
// every dense kernel slower there (f32 3441 -> 1714 GB/s, q4 548 -> 503): not done.
template <int DT> __device__ __forceinline__ u32 cap_q_unit_values() { return DT == CAP_Q4 ? 8u : 2u; }

// Whether runs of this group can be read by units (the group a power of two).
template <int DT> __device__ __forceinline__ bool cap_q_by_units(u32 group) {
    u32 upb = group / cap_q_unit_values<DT>();
    return upb != 0u && (upb & (upb - 1u)) == 0u;
}

// Unit t of a run: its block's scale s (and Q4 minimum m) and codes; value v of the
// unit (v < per) dequantized exactly as cap_q_value.
template <int DT> struct CapQUnit {
    float s, m;
    u32 codes;
    __device__ __forceinline__ CapQUnit(const u8* run, u32 group, u32 t) {
        const u32 per = cap_q_unit_values<DT>();
        const u32 upb = group / per;
        const u8* blk = run + (u64)(t >> (__ffs(upb) - 1u)) * cap_q_block_bytes<DT>(group);
        const u32 i = t & (upb - 1u);
        s = cap_f16_to_f32(cap_u16_at(blk));
        if (DT == CAP_Q4) {
            m = cap_f16_to_f32(cap_u16_at(blk + 2));
            // Q4 blocks are 4 + group/2 bytes, a multiple of 4, and runs start at a
            // multiple of the block size: the word is aligned.
            codes = *(const u32*)(blk + 4u + 4u * i);
        } else {
            m = 0.0f;
            // Q8 blocks are 2 + group bytes, even: the half-word is aligned.
            codes = *(const u16*)(blk + 2u + 2u * i);
        }
    }
    __device__ __forceinline__ float value(u32 v) const {
        if (DT == CAP_Q4) return __fadd_rn(__fmul_rn(s, (float)((codes >> (4u * v)) & 0xfu)), m);
        return __fmul_rn(s, (float)(i8)((codes >> (8u * v)) & 0xffu));
    }
};

// Dense rows (scalar::dense_rows_e, q_dense_rows).
template <int DT>
__device__ void cap_dense_rows(const u8* w, u32 cols, u32 group, u32 r0, u32 n, const float* x, float* y) {
    u32 row = (blockIdx.x * blockDim.x + threadIdx.x) / 32u;
    u32 lane = threadIdx.x % 32u;
    if (row >= n) return;  // whole warps leave together
    u64 r = (u64)r0 + row;
    float acc = 0.0f;
    if (DT == CAP_Q8 || DT == CAP_Q4) {
        const u8* run = w + r * cap_q_run_bytes<DT>(cols, group);
        if (cap_q_by_units<DT>(group)) {
            const u32 per = cap_q_unit_values<DT>();
            const u32 units = (cols + per - 1u) / per;
            for (u32 t = lane; t < units; t += 32u) {
                CapQUnit<DT> q(run, group, t);
                const u32 c = t * per;
#pragma unroll
                for (u32 v = 0; v < per; ++v)
                    if (c + v < cols) acc += q.value(v) * x[c + v];
            }
        } else {
            for (u32 c = lane; c < cols; c += 32u) acc += cap_q_value<DT>(run, group, c) * x[c];
        }
    } else {
        u64 base = r * cols;
        for (u32 c = lane; c < cols; c += 32u) acc += cap_float_value<DT>(w, base + c) * x[c];
    }
    acc = cap_warp_sum(acc);
    if (lane == 0u) y[row] += acc;
}

// 32 mask bits starting at bit `bit` (bit j of the result = mask bit bit + j, LSB
// first; cpu::bits_at on 32 bits); bytes at or past mask_len read as 0.
__device__ __forceinline__ u32 cap_bits32(const u8* mask, u64 mask_len, u64 bit) {
    u64 byte = bit / 8u;
    u64 w = 0;
    for (u32 i = 0; i < 5u; ++i) {
        if (byte + i < mask_len) w |= (u64)mask[byte + i] << (8u * i);
    }
    return (u32)(w >> (bit % 8u));
}

// Bitmask rows (scalar::bitmask_rows_e, q_bitmask_rows). Each lane takes 32 columns
// of a 1024-column stretch; an exclusive prefix sum of the lanes' popcounts gives the
// index (within the row) of each lane's first kept value.
template <int DT>
__device__ void cap_bitmask_rows(const u8* mask, u64 mask_len, u32 cols, const u32* row_start,
                                 const u32* row_block, const u8* vals, u32 group, u32 r0, u32 n,
                                 const float* x, float* y) {
    u32 row = (blockIdx.x * blockDim.x + threadIdx.x) / 32u;
    u32 lane = threadIdx.x % 32u;
    if (row >= n) return;
    u32 r = r0 + row;
    const bool quantized = DT == CAP_Q8 || DT == CAP_Q4;
    const u8* run = quantized ? vals + (u64)row_block[r] * cap_q_block_bytes<DT>(group) : vals;
    u64 first = row_start[r];
    u64 bit0 = (u64)r * cols;
    u32 base = 0;  // kept values of this row before the current stretch
    float acc = 0.0f;
    for (u32 c0 = 0; c0 < cols; c0 += 1024u) {
        u32 c = c0 + 32u * lane;
        u32 bits = 0;
        if (c < cols) {
            bits = cap_bits32(mask, mask_len, bit0 + c);
            u32 left = cols - c;
            if (left < 32u) bits &= (1u << left) - 1u;
        }
        u32 cnt = __popc(bits);
        u32 incl = cnt;
        for (u32 off = 1; off < 32u; off <<= 1) {
            u32 t = __shfl_up_sync(CAP_FULL_MASK, incl, off);
            if (lane >= off) incl += t;
        }
        u32 j = base + incl - cnt;
        while (bits) {
            u32 b = __ffs(bits) - 1u;
            acc += cap_value<DT>(vals, run, group, first + j, j) * x[c + b];
            ++j;
            bits &= bits - 1u;
        }
        base += __shfl_sync(CAP_FULL_MASK, incl, 31);
    }
    acc = cap_warp_sum(acc);
    if (lane == 0u) y[row] += acc;
}

// Block-CSR rows (scalar::csr_rows_e, q_csr_rows): the row's 256-column blocks in
// order, the lanes splitting each block's entries.
template <int DT>
__device__ void cap_csr_rows(u32 cols, const u32* block_ptr, const u8* col_idx, const u32* row_block,
                             const u8* vals, u32 group, u32 r0, u32 n, const float* x, float* y) {
    u32 row = (blockIdx.x * blockDim.x + threadIdx.x) / 32u;
    u32 lane = threadIdx.x % 32u;
    if (row >= n) return;
    u32 r = r0 + row;
    u32 nb = (cols + 255u) / 256u;
    const bool quantized = DT == CAP_Q8 || DT == CAP_Q4;
    const u8* run = quantized ? vals + (u64)row_block[r] * cap_q_block_bytes<DT>(group) : vals;
    u64 p0 = (u64)r * nb;
    u32 first = block_ptr[p0];
    float acc = 0.0f;
    for (u32 b = 0; b < nb; ++b) {
        u32 lo = block_ptr[p0 + b], hi = block_ptr[p0 + b + 1u];
        for (u32 e = lo + lane; e < hi; e += 32u) {
            u32 c = 256u * b + col_idx[e];
            if (c < cols) acc += cap_value<DT>(vals, run, group, e, e - first) * x[c];
        }
    }
    acc = cap_warp_sum(acc);
    if (lane == 0u) y[row] += acc;
}

// 2:4 rows (scalar::two_four_rows_e, q_two_four_rows); cols % 4 == 0.
template <int DT>
__device__ void cap_two_four_rows(u32 cols, const u8* vals, const u8* meta, u32 group, u32 r0, u32 n,
                                  const float* x, float* y) {
    u32 row = (blockIdx.x * blockDim.x + threadIdx.x) / 32u;
    u32 lane = threadIdx.x % 32u;
    if (row >= n) return;
    u64 r = (u64)r0 + row;
    u32 groups = cols / 4u;
    const bool quantized = DT == CAP_Q8 || DT == CAP_Q4;
    // Every row stores cols/2 values: a fixed run length.
    const u8* run = quantized ? vals + r * cap_q_run_bytes<DT>(cols / 2u, group) : vals;
    float acc = 0.0f;
    if (quantized && cap_q_by_units<DT>(group)) {
        // Value j of the row's run is the (j % 2)-th kept value of column group j / 2.
        const u32 per = cap_q_unit_values<DT>();
        const u32 kept = cols / 2u;
        const u32 units = (kept + per - 1u) / per;
        for (u32 t = lane; t < units; t += 32u) {
            CapQUnit<DT> q(run, group, t);
#pragma unroll
            for (u32 v = 0; v < per; ++v) {
                const u32 j = t * per + v;
                if (j < kept) {
                    const u32 g = j / 2u;
                    const u64 ga = r * groups + g;
                    const u32 nib = ((u32)meta[ga / 2u] >> (4u * (u32)(ga % 2u))) & 0xfu;
                    acc += q.value(v) * x[4u * g + ((j % 2u) ? (nib >> 2) : (nib & 3u))];
                }
            }
        }
        acc = cap_warp_sum(acc);
        if (lane == 0u) y[row] += acc;
        return;
    }
    for (u32 g = lane; g < groups; g += 32u) {
        u64 ga = r * groups + g;
        u32 nib = ((u32)meta[ga / 2u] >> (4u * (u32)(ga % 2u))) & 0xfu;
        const float* xg = x + 4u * g;
        acc += cap_value<DT>(vals, run, group, 2u * ga, 2u * g) * xg[nib & 3u];
        acc += cap_value<DT>(vals, run, group, 2u * ga + 1u, 2u * g + 1u) * xg[nib >> 2];
    }
    acc = cap_warp_sum(acc);
    if (lane == 0u) y[row] += acc;
}

// The entry points: cap_<encoding>_rows_<dtype>, one per encoding and value type.
#define CAP_MATVEC_ENTRIES(SUFFIX, DT)                                                            \
    extern "C" __global__ void cap_dense_rows_##SUFFIX(const u8* w, u32 cols, u32 group, u32 r0, \
                                                       u32 n, const float* x, float* y) {        \
        cap_dense_rows<DT>(w, cols, group, r0, n, x, y);                                          \
    }                                                                                             \
    extern "C" __global__ void cap_bitmask_rows_##SUFFIX(                                         \
        const u8* mask, u64 mask_len, u32 cols, const u32* row_start, const u32* row_block,       \
        const u8* vals, u32 group, u32 r0, u32 n, const float* x, float* y) {                     \
        cap_bitmask_rows<DT>(mask, mask_len, cols, row_start, row_block, vals, group, r0, n, x, y); \
    }                                                                                             \
    extern "C" __global__ void cap_csr_rows_##SUFFIX(u32 cols, const u32* block_ptr,              \
                                                     const u8* col_idx, const u32* row_block,     \
                                                     const u8* vals, u32 group, u32 r0, u32 n,    \
                                                     const float* x, float* y) {                  \
        cap_csr_rows<DT>(cols, block_ptr, col_idx, row_block, vals, group, r0, n, x, y);          \
    }                                                                                             \
    extern "C" __global__ void cap_two_four_rows_##SUFFIX(u32 cols, const u8* vals,               \
                                                          const u8* meta, u32 group, u32 r0,      \
                                                          u32 n, const float* x, float* y) {      \
        cap_two_four_rows<DT>(cols, vals, meta, group, r0, n, x, y);                              \
    }

CAP_MATVEC_ENTRIES(f32, CAP_F32)
CAP_MATVEC_ENTRIES(f16, CAP_F16)
CAP_MATVEC_ENTRIES(bf16, CAP_BF16)
CAP_MATVEC_ENTRIES(q8, CAP_Q8)
CAP_MATVEC_ENTRIES(q4, CAP_Q4)
