/* bench/rule_cost.c: the time of each balancing rule alone (its targets and its state update), on
   random teacher scores, against the whole step's time from `excb bench`. The median of 21 runs.
     cc -O3 -march=native -fopenmp -I. -o bench/rule_cost bench/rule_cost.c excb_test.o ... (make bench-rules)
     ./bench/rule_cost [B] [K] [queue_length]           (256 4096 3840) */
#define _DEFAULT_SOURCE
#include "excb.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv) {
    int B = argc > 1 ? atoi(argv[1]) : 256, K = argc > 2 ? atoi(argv[2]) : 4096, Lq = argc > 3 ? atoi(argv[3]) : 3840;
    printf("the balancing rule alone (targets + state update), resnet20s heads, B = %d, K = %d, median of 21:\n", B, K);
    for (int mi = 0; excb_methods[mi]; mi++)
        for (int queue = 0; queue < 2; queue++) {
            if (queue && strcmp(excb_methods[mi]->name, "swav")) continue;
            ExcbConfig c;
            excb_config_named(&c, "resnet20s");
            c.batch = B;
            c.K = K;
            c.method = mi;
            c.swav.queue_length = queue ? Lq : 0;
            c.swav.queue_start_epoch = 0;
            ExcbModel m;
            if (excb_build(&m, &c)) return 1;
            int NG = c.n_global * B, d = c.d;
            for (size_t i = 0; i < (size_t)NG * K; i++) m.zt[i] = 2 * excb_uniform(1, EXCB_RNG_BENCH, 0, 0, i) - 1;
            for (size_t i = 0; i < (size_t)NG * d; i++) m.ut[i] = excb_normal(1, EXCB_RNG_BENCH, 1, 0, i) / 16;
            for (size_t i = 0; i < (size_t)K * d; i++) m.c[i] = excb_normal(1, EXCB_RNG_BENCH, 2, 0, i) / 16;
            real *qv = excb_method_buffer(&m, "queue");
            for (size_t i = 0; queue && i < (size_t)2 * Lq * d; i++) qv[i] = excb_normal(1, EXCB_RNG_BENCH, 3, 0, i) / 16;
            double t[21];
            for (int r = 0; r < 21; r++) {
                double t0 = now();
                m.method->targets(&m);
                m.method->update(&m);
                t[r] = now() - t0;
            }
            qsort(t, 21, sizeof t[0], cmp);
            printf("  %-5s%-18s %8.2f ms  [%.2f-%.2f]\n", m.method->name, queue ? " (queue, in use)" : "", 1e3 * t[10],
                   1e3 * t[0], 1e3 * t[20]);
            excb_free(&m);
        }
    return 0;
}
