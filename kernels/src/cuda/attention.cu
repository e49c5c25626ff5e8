// Single-token (decode) attention over an f32 KV cache, the GPU counterpart of
// device/src/forward.rs's decode_cached/decode_head for one layer:
//
//   for each query head h (kv head g = h / group):
//     s[p] = (q_h . k[g, p]) * scale       for p in first..keys
//     s = softmax(s)                       (ops::softmax)
//     out_h[d] = sum_p s[p] * v[g, p, d]
//
// Cache layout of one layer as forward.rs's KvCache (head_start): k and v are
// [n_kv_heads][capacity][hd] f32, position p of kv head g at (g*capacity + p)*hd.
// `first` is 0, or the start of a local layer's window. `scores` is scratch of
// n_heads * capacity floats. One block per query head (grid = n_heads): a warp per
// position for the dot products, a block reduction for the softmax, a thread per
// output element for the weighted sum.
extern "C" __global__ void cap_attention_decode(const float* q, const float* k, const float* v, float* out,
                                                float* scores, u32 group, u32 hd, u32 capacity, u32 first,
                                                u32 keys, float scale) {
    __shared__ float sh[32];
    u32 h = blockIdx.x;
    u32 g = h / group;
    const float* qh = q + (u64)h * hd;
    const float* kg = k + (u64)g * capacity * hd;
    const float* vg = v + (u64)g * capacity * hd;
    float* s = scores + (u64)h * capacity;
    u32 lane = threadIdx.x % 32u, warp = threadIdx.x / 32u, warps = blockDim.x / 32u;
    u32 seen = keys - first;
    // Scores: the dot product summed, then scaled (dense_rows, then *= scale).
    for (u32 p = warp; p < seen; p += warps) {
        const float* kp = kg + (u64)(first + p) * hd;
        float acc = 0.0f;
        for (u32 d = lane; d < hd; d += 32u) acc += qh[d] * kp[d];
        acc = cap_warp_sum(acc);
        if (lane == 0u) s[p] = acc * scale;
    }
    __syncthreads();
    float m = CAP_NEG_INF;
    for (u32 p = threadIdx.x; p < seen; p += blockDim.x) m = fmaxf(m, s[p]);
    m = cap_block_max(m, sh);
    float sum = 0.0f;
    for (u32 p = threadIdx.x; p < seen; p += blockDim.x) {
        float e = m == CAP_NEG_INF ? 0.0f : expf(s[p] - m);
        s[p] = e;
        sum += e;
    }
    sum = cap_block_sum(sum, sh);
    float inv = m == CAP_NEG_INF ? 0.0f : 1.0f / sum;
    for (u32 p = threadIdx.x; p < seen; p += blockDim.x) s[p] *= inv;
    __syncthreads();
    // out = p . V (dense_t_rows), one thread per element of the head.
    for (u32 d = threadIdx.x; d < hd; d += blockDim.x) {
        float acc = 0.0f;
        for (u32 p = 0; p < seen; ++p) acc += s[p] * vg[(u64)(first + p) * hd + d];
        out[(u64)h * hd + d] = acc;
    }
}
