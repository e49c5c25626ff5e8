// Element-wise and row-wise operations of a transformer block, the GPU counterparts of
// kernels/src/ops.rs (same formulas, same order of rounding steps per element; sums
// over a row are added by a block reduction instead of one running sum).

// RMSNorm (ops::rms_norm): out[r, i] = w[i] * (x[r, i] * inv), inv = 1/sqrt(mean(x^2) +
// eps). One block per row (grid = rows), threads stride over the d columns. out may
// be x (ops::rms_norm_in_place): each thread reads its elements before writing them.
extern "C" __global__ void cap_rms_norm(float* out, const float* x, const float* w, u32 d, float eps) {
    __shared__ float sh[32];
    const float* xr = x + (u64)blockIdx.x * d;
    float* outr = out + (u64)blockIdx.x * d;
    float ss = 0.0f;
    for (u32 i = threadIdx.x; i < d; i += blockDim.x) ss += xr[i] * xr[i];
    ss = cap_block_sum(ss, sh) / (float)d;
    float inv = 1.0f / sqrtf(ss + eps);
    for (u32 i = threadIdx.x; i < d; i += blockDim.x) outr[i] = w[i] * (xr[i] * inv);
}

// RoPE, rotate-half convention (ops::rope_rotate_half): each of the grid's head vectors
// x[h*2*half ..] is rotated in pairs (i, i + half) by cos[i], sin[i] (one position's
// tables). One block per head, threads stride over i.
extern "C" __global__ void cap_rope_rotate_half(float* x, const float* cos_t, const float* sin_t, u32 half) {
    float* a = x + (u64)blockIdx.x * 2u * half;
    float* b = a + half;
    for (u32 i = threadIdx.x; i < half; i += blockDim.x) {
        float x0 = a[i], x1 = b[i];
        a[i] = x0 * cos_t[i] - x1 * sin_t[i];
        b[i] = x1 * cos_t[i] + x0 * sin_t[i];
    }
}

// In-place softmax of each n-wide row (ops::softmax): subtract the row maximum; a row
// that is all -inf becomes zeros. One block per row.
extern "C" __global__ void cap_softmax(float* x, u32 n) {
    __shared__ float sh[32];
    float* row = x + (u64)blockIdx.x * n;
    float m = CAP_NEG_INF;
    for (u32 i = threadIdx.x; i < n; i += blockDim.x) m = fmaxf(m, row[i]);
    m = cap_block_max(m, sh);
    if (m == CAP_NEG_INF) {
        for (u32 i = threadIdx.x; i < n; i += blockDim.x) row[i] = 0.0f;
        return;
    }
    float s = 0.0f;
    for (u32 i = threadIdx.x; i < n; i += blockDim.x) {
        float e = expf(row[i] - m);
        row[i] = e;
        s += e;
    }
    float inv = 1.0f / cap_block_sum(s, sh);
    for (u32 i = threadIdx.x; i < n; i += blockDim.x) row[i] *= inv;
}

// SiLU(g) * u into g (ops::silu_mul), one thread per element.
extern "C" __global__ void cap_silu_mul(float* g, const float* u, u32 n) {
    u32 i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float v = g[i];
    g[i] = (v / (1.0f + expf(-v))) * u[i];
}

// GELU(g) * u into g with the tanh approximation (ops::gelu_tanh_mul, ops::GELU_BETA
// and ops::GELU_KAPPA), one thread per element.
extern "C" __global__ void cap_gelu_tanh_mul(float* g, const float* u, u32 n) {
    u32 i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float x = g[i];
    float inner = 0.7978846f * (x + 0.044715f * x * x * x);
    g[i] = 0.5f * x * (1.0f + tanhf(inner)) * u[i];
}
