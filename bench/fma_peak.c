/* fma_peak.c: what this machine's cores can do right now, for the same-run comparisons of bench/compare.py.
 *
 *   cc -O2 -march=native -fopenmp -o bench/fma_peak bench/fma_peak.c && bench/fma_peak THREADS
 *
 * Each thread runs 12 independent chains of 512-bit (or, without AVX-512, 256-bit) FMAs: enough
 * chains to hide the FMA latency on two pipes, so the loop runs at the FMA units' throughput. Prints
 * the median [min-max] GFLOP/s over 5 repetitions, all threads together. On a 2-vCPU VM the figure
 * says which state the machine is in: two real cores give 2x the 1-thread figure, two hyperthreads
 * of one core (or a throttled host) about 1x.
 */
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#ifdef __AVX512F__
typedef __m512 vec;
#define LANES 16
#define SET1 _mm512_set1_ps
#define FMA _mm512_fmadd_ps
#define ADD _mm512_add_ps
#define SUM _mm512_reduce_add_ps
#else
typedef __m256 vec;
#define LANES 8
#define SET1 _mm256_set1_ps
#define FMA _mm256_fmadd_ps
#define ADD _mm256_add_ps
static float SUM(__m256 v) {
    float f[8];
    _mm256_storeu_ps(f, v);
    return f[0] + f[1] + f[2] + f[3] + f[4] + f[5] + f[6] + f[7];
}
#endif
#define CHAINS 12
#define ITERS 4000000000L

static double seconds(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}

static int by_value(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv) {
    int threads = argc > 1 ? atoi(argv[1]) : 1;
    if (threads < 1) threads = 1;
    omp_set_num_threads(threads);
    double gflops[5], sink = 0;
    for (int rep = 0; rep < 5; rep++) {
        double t0 = seconds();
#pragma omp parallel reduction(+ : sink)
        {
            /* twelve named accumulators, so that they live in registers (an array of them does not) */
            vec a = SET1(0.999999f), b = SET1(1e-7f);
            vec c0 = SET1(0), c1 = SET1(1), c2 = SET1(2), c3 = SET1(3), c4 = SET1(4), c5 = SET1(5);
            vec c6 = SET1(6), c7 = SET1(7), c8 = SET1(8), c9 = SET1(9), c10 = SET1(10), c11 = SET1(11);
            for (long i = 0; i < ITERS / LANES; i++) {
                c0 = FMA(c0, a, b); c1 = FMA(c1, a, b); c2 = FMA(c2, a, b); c3 = FMA(c3, a, b);
                c4 = FMA(c4, a, b); c5 = FMA(c5, a, b); c6 = FMA(c6, a, b); c7 = FMA(c7, a, b);
                c8 = FMA(c8, a, b); c9 = FMA(c9, a, b); c10 = FMA(c10, a, b); c11 = FMA(c11, a, b);
            }
            vec s = ADD(ADD(ADD(c0, c1), ADD(c2, c3)), ADD(ADD(c4, c5), ADD(c6, c7)));
            sink += SUM(ADD(s, ADD(ADD(c8, c9), ADD(c10, c11))));   /* keeps the loop from being optimised away */
        }
        gflops[rep] = 2.0 * ITERS * CHAINS * threads / (seconds() - t0) / 1e9;
    }
    qsort(gflops, 5, sizeof gflops[0], by_value);
    printf("FMA peak, %d thread(s), %d-bit: %.1f GFLOP/s [%.1f-%.1f] (checksum %g)\n", threads, 32 * LANES, gflops[2],
           gflops[0], gflops[4], sink);
    return 0;
}
