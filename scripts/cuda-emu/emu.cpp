// Runs cap's CUDA C kernels (kernels/src/cuda/*.cu) on the CPU and compares them with
// the scalar CPU kernels' outputs written by `cargo run -p cap-kernels --example
// cuda_emu_cases`. Driven by scripts/cuda-emu.sh; see there for what it does and does
// not prove.
//
// The emulation covers what the kernels use: each block's threads are std::threads
// (blocks run one after another, so __shared__ is a plain static); a warp shuffle
// exchanges through a per-warp buffer between two barriers of the warp's 32 threads,
// so lanes that diverged at a shuffle deadlock instead of passing; __syncthreads is a
// barrier of the block. Float rounding is IEEE single as on the GPU (compiled with
// -ffp-contract=off; the GPU may fuse multiply-adds, which the tolerances allow).
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

struct uint3_ { unsigned x, y, z; };
thread_local uint3_ threadIdx;
thread_local uint3_ blockIdx;
uint3_ blockDim, gridDim;

static std::unique_ptr<std::barrier<>> g_block_bar;
static std::vector<std::unique_ptr<std::barrier<>>> g_warp_bar;
static uint32_t g_warp_buf[64][32];

#define __device__
#define __global__
#define __forceinline__ inline
#define __shared__ static

inline void __syncthreads() { g_block_bar->arrive_and_wait(); }
template <class T> inline T shfl_impl(T v, unsigned src_lane_fn_lane, bool keep) {
    unsigned warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    uint32_t bits; std::memcpy(&bits, &v, 4);
    g_warp_buf[warp][lane] = bits;
    g_warp_bar[warp]->arrive_and_wait();
    uint32_t got = g_warp_buf[warp][src_lane_fn_lane % 32];
    g_warp_bar[warp]->arrive_and_wait();
    if (keep) return v;
    T r; std::memcpy(&r, &got, 4); return r;
}
template <class T> inline T __shfl_xor_sync(unsigned, T v, int off) { return shfl_impl(v, (threadIdx.x % 32) ^ off, false); }
template <class T> inline T __shfl_up_sync(unsigned, T v, unsigned off) { unsigned l = threadIdx.x % 32; return shfl_impl(v, l >= off ? l - off : l, l < off); }
template <class T> inline T __shfl_sync(unsigned, T v, int src) { return shfl_impl(v, (unsigned)src, false); }
inline unsigned __popc(unsigned v) { return __builtin_popcount(v); }
inline unsigned __ffs(unsigned v) { return __builtin_ffs(v); }
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline float __int_as_float(int u) { float f; std::memcpy(&f, &u, 4); return f; }
inline float __fmul_rn(float a, float b) { volatile float r = a * b; return r; }
inline float __fadd_rn(float a, float b) { volatile float r = a + b; return r; }
#include <math.h>

#include "kernels.inc"

static void launch(unsigned grid, unsigned block, const std::function<void()>& body) {
    blockDim = {block, 1, 1}; gridDim = {grid, 1, 1};
    for (unsigned b = 0; b < grid; ++b) {
        g_block_bar = std::make_unique<std::barrier<>>(block);
        g_warp_bar.clear();
        for (unsigned w = 0; w < block / 32; ++w) g_warp_bar.push_back(std::make_unique<std::barrier<>>(32));
        std::vector<std::thread> ts;
        for (unsigned t = 0; t < block; ++t)
            ts.emplace_back([&, b, t] { blockIdx = {b, 0, 0}; threadIdx = {t, 0, 0}; body(); });
        for (auto& t : ts) t.join();
    }
}

// ---- Reading cases ----
static const uint8_t* P; static const uint8_t* END;
static std::string line() { const uint8_t* s = P; while (*P != '\n') ++P; std::string r((const char*)s, P - s); ++P; return r; }
// A length-prefixed array; an empty one comes back as one zero element (as gpu.rs
// uploads it), so kernels get a valid pointer.
template <class T> static std::vector<T> arr() {
    uint64_t n; std::memcpy(&n, P, 8); P += 8;
    std::vector<T> v(n == 0 ? 1 : n / sizeof(T), T{});
    if (n) std::memcpy(v.data(), P, n);
    P += n;
    return v;
}

static int failures = 0, checked = 0;
static void close_rows(const std::vector<float>& got, const std::vector<float>& want, const std::vector<float>& dense, const std::vector<float>& x, size_t rows, size_t cols, const std::string& what) {
    for (size_t r = 0; r < rows; ++r) {
        double a = 0; for (size_t c = 0; c < cols; ++c) a += std::fabs((double)dense[r * cols + c] * x[c]);
        double bound = 2.0 * (cols + 1.0) * 1.1920929e-7 * a + 1e-30;
        ++checked;
        if (!(std::fabs((double)got[r] - want[r]) <= bound)) { if (failures++ < 20) std::printf("FAIL %s row %zu: emu %g cpu %g bound %g\n", what.c_str(), r, got[r], want[r], bound); }
    }
}
static void near(const std::vector<float>& got, const std::vector<float>& want, float tol, const std::string& what) {
    for (size_t i = 0; i < want.size(); ++i) { ++checked; float c = want[i]; if (!(std::fabs(got[i] - c) <= tol * std::fmax(std::fabs(c), 1.0f))) { if (failures++ < 20) std::printf("FAIL %s [%zu]: emu %g cpu %g\n", what.c_str(), i, got[i], c); } }
}

int main(int argc, char** argv) {
    if (argc != 2) { std::fprintf(stderr, "usage: emu CASES.bin\n"); return 2; }
    FILE* f = std::fopen(argv[1], "rb");
    if (!f) { std::perror(argv[1]); return 2; } std::fseek(f, 0, SEEK_END); long n = std::ftell(f); std::fseek(f, 0, SEEK_SET);
    std::vector<uint8_t> buf(n); if (std::fread(buf.data(), 1, n, f) != (size_t)n) return 2; P = buf.data(); END = P + n;
    int cases = 0;
    while (P < END) {
        std::string h = line(); ++cases;
        char kind[32], name[8]; unsigned dt, g; size_t rows, cols;
        if (std::sscanf(h.c_str(), "%31s", kind) != 1) return 3;
        std::string k = kind;
        auto ranges = [&](size_t rows_, auto&& f) { std::vector<float> y(rows_, 0.0f); size_t a = rows_ / 3, b = rows_ / 3 + rows_ / 2; size_t lo[3] = {0, a, b}, hi[3] = {a, b, rows_}; for (int i = 0; i < 3; ++i) { if (hi[i] == lo[i]) continue; std::vector<float> yy(y.begin() + lo[i], y.begin() + hi[i]); unsigned nn = hi[i] - lo[i]; f((unsigned)lo[i], nn, yy); std::copy(yy.begin(), yy.end(), y.begin() + lo[i]); } return y; };
        auto grid = [](unsigned nn) { return (nn + 3) / 4; };
        if (k == "dense" || k == "bitmask" || k == "csr" || k == "two_four") {
            std::sscanf(h.c_str(), "%31s %7s %u %u %zu %zu", kind, name, &dt, &g, &rows, &cols);
            std::vector<float> got;
            if (k == "dense") {
                auto w = arr<uint8_t>(); auto x = arr<float>(); auto want = arr<float>(); auto dense = arr<float>();
                got = ranges(rows, [&](unsigned r0, unsigned nn, std::vector<float>& y) { launch(grid(nn), 128, [&] {
                    switch (dt) { case 0: cap_dense_rows_f32(w.data(), cols, g, r0, nn, x.data(), y.data()); break; case 1: cap_dense_rows_f16(w.data(), cols, g, r0, nn, x.data(), y.data()); break; case 2: cap_dense_rows_bf16(w.data(), cols, g, r0, nn, x.data(), y.data()); break; case 3: cap_dense_rows_q8(w.data(), cols, g, r0, nn, x.data(), y.data()); break; case 4: cap_dense_rows_q4(w.data(), cols, g, r0, nn, x.data(), y.data()); break; } }); });
                close_rows(got, want, dense, x, rows, cols, h);
            } else if (k == "bitmask") {
                auto mask = arr<uint8_t>(); auto rs = arr<uint32_t>(); auto rb = arr<uint32_t>(); auto vals = arr<uint8_t>(); auto x = arr<float>(); auto want = arr<float>(); auto dense = arr<float>();
                uint64_t ml = mask.size();
                got = ranges(rows, [&](unsigned r0, unsigned nn, std::vector<float>& y) { launch(grid(nn), 128, [&] {
                    switch (dt) { case 0: cap_bitmask_rows_f32(mask.data(), ml, cols, rs.data(), rb.data(), vals.data(), g, r0, nn, x.data(), y.data()); break; case 1: cap_bitmask_rows_f16(mask.data(), ml, cols, rs.data(), rb.data(), vals.data(), g, r0, nn, x.data(), y.data()); break; case 2: cap_bitmask_rows_bf16(mask.data(), ml, cols, rs.data(), rb.data(), vals.data(), g, r0, nn, x.data(), y.data()); break; case 3: cap_bitmask_rows_q8(mask.data(), ml, cols, rs.data(), rb.data(), vals.data(), g, r0, nn, x.data(), y.data()); break; case 4: cap_bitmask_rows_q4(mask.data(), ml, cols, rs.data(), rb.data(), vals.data(), g, r0, nn, x.data(), y.data()); break; } }); });
                close_rows(got, want, dense, x, rows, cols, h);
            } else if (k == "csr") {
                auto ptr = arr<uint32_t>(); auto idx = arr<uint8_t>(); auto rb = arr<uint32_t>(); auto vals = arr<uint8_t>(); auto x = arr<float>(); auto want = arr<float>(); auto dense = arr<float>();
                got = ranges(rows, [&](unsigned r0, unsigned nn, std::vector<float>& y) { launch(grid(nn), 128, [&] {
                    switch (dt) { case 0: cap_csr_rows_f32(cols, ptr.data(), idx.data(), rb.data(), vals.data(), g, r0, nn, x.data(), y.data()); break; case 1: cap_csr_rows_f16(cols, ptr.data(), idx.data(), rb.data(), vals.data(), g, r0, nn, x.data(), y.data()); break; case 2: cap_csr_rows_bf16(cols, ptr.data(), idx.data(), rb.data(), vals.data(), g, r0, nn, x.data(), y.data()); break; case 3: cap_csr_rows_q8(cols, ptr.data(), idx.data(), rb.data(), vals.data(), g, r0, nn, x.data(), y.data()); break; case 4: cap_csr_rows_q4(cols, ptr.data(), idx.data(), rb.data(), vals.data(), g, r0, nn, x.data(), y.data()); break; } }); });
                close_rows(got, want, dense, x, rows, cols, h);
            } else {
                auto vals = arr<uint8_t>(); auto meta = arr<uint8_t>(); auto x = arr<float>(); auto want = arr<float>(); auto dense = arr<float>();
                got = ranges(rows, [&](unsigned r0, unsigned nn, std::vector<float>& y) { launch(grid(nn), 128, [&] {
                    switch (dt) { case 0: cap_two_four_rows_f32(cols, vals.data(), meta.data(), g, r0, nn, x.data(), y.data()); break; case 1: cap_two_four_rows_f16(cols, vals.data(), meta.data(), g, r0, nn, x.data(), y.data()); break; case 2: cap_two_four_rows_bf16(cols, vals.data(), meta.data(), g, r0, nn, x.data(), y.data()); break; case 3: cap_two_four_rows_q8(cols, vals.data(), meta.data(), g, r0, nn, x.data(), y.data()); break; case 4: cap_two_four_rows_q4(cols, vals.data(), meta.data(), g, r0, nn, x.data(), y.data()); break; } }); });
                close_rows(got, want, dense, x, rows, cols, h);
            }
        } else if (k == "ops") {
            size_t d; std::sscanf(h.c_str(), "%31s %zu %zu", kind, &rows, &d);
            auto x = arr<float>(); auto w = arr<float>(); auto u = arr<float>(); auto rn = arr<float>(); auto sm = arr<float>(); auto si = arr<float>(); auto ge = arr<float>();
            std::vector<float> out(rows * d);
            launch(rows, 256, [&] { cap_rms_norm(out.data(), x.data(), w.data(), d, 1e-5f); }); near(out, rn, 1e-5f, h + " rms_norm");
            auto xi = x; launch(rows, 256, [&] { cap_rms_norm(xi.data(), xi.data(), w.data(), d, 1e-5f); }); near(xi, rn, 1e-5f, h + " rms_norm in place");
            auto s = x; launch(rows, 256, [&] { cap_softmax(s.data(), d); }); near(s, sm, 1e-5f, h + " softmax");
            unsigned nn = rows * d;
            auto a = x; launch((nn + 1023) / 1024, 1024, [&] { cap_silu_mul(a.data(), u.data(), nn); }); near(a, si, 1e-5f, h + " silu");
            auto b = x; launch((nn + 1023) / 1024, 1024, [&] { cap_gelu_tanh_mul(b.data(), u.data(), nn); }); near(b, ge, 1e-5f, h + " gelu");
        } else if (k == "softmax") {
            size_t d; std::sscanf(h.c_str(), "%31s %zu %zu", kind, &rows, &d);
            auto x = arr<float>(); auto want = arr<float>();
            launch(rows, 256, [&] { cap_softmax(x.data(), d); }); near(x, want, 1e-6f, h);
        } else if (k == "rope") {
            size_t heads, hd; std::sscanf(h.c_str(), "%31s %zu %zu", kind, &heads, &hd);
            auto x = arr<float>(); auto c = arr<float>(); auto s = arr<float>(); auto want = arr<float>();
            launch(heads, 128, [&] { cap_rope_rotate_half(x.data(), c.data(), s.data(), hd / 2); }); near(x, want, 1e-6f, h);
        } else if (k == "attention") {
            unsigned nh, nkv, hd, cap, first, keys; float scale;
            std::sscanf(h.c_str(), "%31s %u %u %u %u %u %u %f", kind, &nh, &nkv, &hd, &cap, &first, &keys, &scale);
            auto q = arr<float>(); auto kk = arr<float>(); auto v = arr<float>(); auto want = arr<float>();
            std::vector<float> out(nh * hd), scores(nh * cap);
            launch(nh, 256, [&] { cap_attention_decode(q.data(), kk.data(), v.data(), out.data(), scores.data(), nh / nkv, hd, cap, first, keys, scale); });
            near(out, want, 1e-4f, h);
        } else { std::printf("unknown case %s\n", h.c_str()); return 4; }
    }
    std::printf("%d cases, %d values checked, %d failures\n", cases, checked, failures);
    return failures != 0;
}
