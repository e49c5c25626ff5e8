/* Memory read and copy bandwidth of this machine, the physical limit of decoding (README, "Board runtime").
 * Run: gcc -O3 -march=native -fopenmp scripts/membw.c -o /tmp/membw && /tmp/membw */
/* Tiny memory-bandwidth probe: read (sum over a 1 GiB float array) and copy
 * (1 GiB -> 1 GiB), best of 5, with 1 and 2 OpenMP threads.
 * Build: gcc -O3 -march=native -fopenmp membw.c -o membw */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <omp.h>

#define N ((size_t)1 << 28) /* 2^28 floats = 1 GiB */
#define REPS 5

static double now(void) {
    struct timespec ts; clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

int main(void) {
    float *a = aligned_alloc(4096, N * sizeof(float));
    float *b = aligned_alloc(4096, N * sizeof(float));
    if (!a || !b) { perror("alloc"); return 1; }
    #pragma omp parallel for schedule(static)
    for (size_t i = 0; i < N; i++) { a[i] = (float)(i & 1023) * 1e-3f; b[i] = 0.0f; }

    const double bytes = (double)N * sizeof(float);
    for (int nt = 1; nt <= 2; nt++) {
        omp_set_num_threads(nt);
        double best_read = 1e30, best_copy = 1e30, best_loop = 1e30; volatile float sink = 0;
        for (int r = 0; r < REPS; r++) {
            /* read: vectorised sum, several accumulators via omp simd */
            double t0 = now(); float s = 0.0f;
            #pragma omp parallel for simd schedule(static) reduction(+:s)
            for (size_t i = 0; i < N; i++) s += a[i];
            double t1 = now(); sink += s;
            if (t1 - t0 < best_read) best_read = t1 - t0;
            /* copy: memcpy of each thread's static chunk (glibc uses non-temporal stores for large sizes) */
            t0 = now();
            #pragma omp parallel
            {
                int id = omp_get_thread_num(), n = omp_get_num_threads();
                size_t lo = N * id / n, hi = N * (id + 1) / n;
                memcpy(b + lo, a + lo, (hi - lo) * sizeof(float));
            }
            t1 = now();
            if (t1 - t0 < best_copy) best_copy = t1 - t0;
            /* copy: plain store loop (regular stores, write-allocate) */
            t0 = now();
            #pragma omp parallel for schedule(static)
            for (size_t i = 0; i < N; i++) b[i] = a[i] + 1.0f;
            t1 = now();
            if (t1 - t0 < best_loop) best_loop = t1 - t0;
        }
        printf("threads=%d read: %.2f GB/s | copy(memcpy): %.2f GB/s counted as read+write (%.2f GB/s of data copied)"
               " | copy(loop b=a+1): %.2f GB/s read+write\n",
               nt, bytes / best_read / 1e9, 2 * bytes / best_copy / 1e9, bytes / best_copy / 1e9,
               2 * bytes / best_loop / 1e9);
        (void)sink;
    }
    free(a); free(b);
    return 0;
}
