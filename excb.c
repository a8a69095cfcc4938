/*
 * excb.c: ExCB in one C file, read top to bottom beside the paper.
 *
 * What this is. A reference implementation, in FP32 on the CPU, of
 *   "Efficient Unsupervised Visual Representation Learning with Explicit Cluster Balancing"
 *   (I. Maniadis Metaxas, G. Tzimiropoulos, I. Patras; ECCV 2024; arXiv 2407.11168),
 * exactly as the official PyTorch code (ManiadisG/ExCB @ 7750bd5) runs it. Equation labels E0..E14
 * are those of shared/METHOD.md; paper_notes.md maps each to this file and says where the code
 * departs from the paper (audit items A1..A25). The paper's own equation numbers are UNCONFIRMED.
 *
 * What is here, in the method's order: the ResNet backbone (E-), projector (E0), weight-normalised
 * cosine prototypes (E1), cluster-size estimation (E2, E3, E3'), balancing (E4) with the code's
 * boost and clamp (E5), teacher targets, student predictions and the 18-term loss (E6..E8) and
 * its backward (E11..E13), then the teacher EMA (E9), SGD with its weight-decay groups (E14) and
 * schedules (Appendix A), one training step, a benchmark, and the command line.
 * Every forward sits right above its backward.
 *
 * What is not here yet: data sets and augmentations (issue 3), `excb train`, evaluation and
 * checkpoints (issue 4), the k-means centroid initialisation (METHOD.md 1.10), the GPU path
 * (issue 5), ViT, LARS and AdamW.
 *
 * Build and test:  make && make test.  Benchmark:  ./excb bench --config resnet20s
 *
 * Determinism: every result is a pure function of the seed and the inputs, whatever the number
 * of threads. Work is cut into tiles whose size depends on tensor shapes only; a thread computes
 * whole tiles; sums across tiles run in a fixed order. No atomics, no -ffast-math.
 */
#define _DEFAULT_SOURCE  /* M_PI, clock_gettime and getrusage under -std=c11                   */
#include "excb.h"        /* ExcbConfig, ExcbModel, the operator declarations, exit codes        */
#include <tgmath.h>      /* sqrt, exp, log, cos, fabs, fmax: type-generic, real for real args  */
#include <stdarg.h>      /* va_list, for the parameter table's names                            */
#include <stdio.h>       /* fprintf, printf                                                     */
#include <stdlib.h>      /* aligned_alloc, free, strtol                                         */
#include <string.h>      /* memset, memcpy, strcmp                                              */
#include <time.h>        /* clock_gettime, for the benchmark                                    */
#include <sys/resource.h>    /* getrusage: peak resident memory                                 */
#ifdef _OPENMP
#include <omp.h>         /* omp_get_thread_num, omp_set_num_threads                            */
#endif
#if defined(EXCB_USE_DNNL) && defined(EXCB_REAL_DOUBLE)
#undef EXCB_USE_DNNL           /* oneDNN has no double GEMM: the float64 build uses the naive one */
#endif
#ifdef EXCB_USE_DNNL
#include <dnnl.h>        /* dnnl_sgemm: oneDNN's GEMM, the fastest on this class of CPU         */
#endif

/* Fixed tiling constants. They shape the arithmetic (which partial sums exist), so they are not
   tuning knobs that may depend on the machine: changing one changes results in the last bits. */
#define EXCB_SLOTS 8                  /* partial weight gradients of a convolution, summed in order */
#define EXCB_COL_PANEL (1 << 18)      /* im2col panel target, floats (1 MiB: one core's L2)          */
#define EXCB_TILE_M 64                /* rows per GEMM tile in the heads                             */

static int thread_id(void) {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

void excb_set_threads(int n) {
#ifdef _OPENMP
    if (n > 0) omp_set_num_threads(n);
#else
    (void)n;
#endif
}

static int max_threads(void) {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

static void *xmalloc(size_t bytes) {
    /* 64-byte aligned (one cache line, one AVX-512 register); rounded up as aligned_alloc needs */
    size_t n = (bytes + 63) / 64 * 64;
    void *p = aligned_alloc(64, n ? n : 64);
    if (!p) {
        fprintf(stderr, "excb: out of memory allocating %zu bytes\n", bytes);
        exit(EXCB_EXIT_OSERR);
    }
    return p;
}

static int imin(int a, int b) { return a < b ? a : b; }

/* ================================================================================================
 * Counter-based randomness
 * ================================================================================================
 * Every random number is a pure function of (seed, purpose, a, b, counter): the parameter init uses
 * (seed, INIT, tensor, 0, element), views will use (seed, VIEW, epoch*N + sample, view, draw). So a
 * value never depends on thread count, call order or resume point. The mixer is SplitMix64's
 * finaliser applied in a chain, which passes BigCrush as a counter-based generator.
 */
static uint64_t mix64(uint64_t x) {
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

uint64_t excb_hash(uint64_t seed, uint64_t purpose, uint64_t a, uint64_t b, uint64_t counter) {
    return mix64(mix64(mix64(mix64(seed ^ 0x6578636200000000ull) ^ purpose) ^ a) ^ b) ^ mix64(counter);
}

/* uniform in [0, 1) with 24 random bits: exactly representable floats */
float excb_uniform(uint64_t seed, uint64_t purpose, uint64_t a, uint64_t b, uint64_t counter) {
    return (float)(excb_hash(seed, purpose, a, b, counter) >> 40) * (1.0f / 16777216.0f);
}

/* standard normal by Box-Muller on two 53-bit uniforms drawn from counters 2c and 2c+1 */
float excb_normal(uint64_t seed, uint64_t purpose, uint64_t a, uint64_t b, uint64_t counter) {
    double u1 = ((excb_hash(seed, purpose, a, b, 2 * counter) >> 11) + 1.0) * 0x1.0p-53;   /* (0,1] */
    double u2 = (excb_hash(seed, purpose, a, b, 2 * counter + 1) >> 11) * 0x1.0p-53;      /* [0,1) */
    return (float)(sqrt(-2.0 * log(u1)) * cos(2.0 * M_PI * u2));
}

/* float -> binary16 -> float, round to nearest even, with binary16's subnormals. The official code
   forms the cluster-size update term in float16 (A4); GCC's _Float16 converts exactly so. */
float excb_round_fp16(float x) { return (float)(_Float16)x; }

/* ================================================================================================
 * Matrix multiplication
 * ================================================================================================
 * C = alpha op(A) op(B) + beta C, row-major, op(A) M x K, op(B) K x N (the BLAS convention with
 * rows and columns swapped). matmul_naive is the definition; matmul calls oneDNN's sgemm when the
 * build has it (PERF.md: 85-95 % of peak here, and unaffected by OPENBLAS_CORETYPE).
 * Every call here is sequential: callers cut the work into fixed tiles and run tiles in parallel.
 * oneDNN runs a GEMM called inside an OpenMP parallel region on the calling thread alone.
 */
void matmul_naive(char ta, char tb, int M, int N, int K, real alpha, const real *A, int lda,
                  const real *B, int ldb, real beta, real *C, int ldc) {
    for (int i = 0; i < M; i++) {
        for (int j = 0; j < N; j++) {
            double acc = 0.0;
            for (int k = 0; k < K; k++) {
                real a = ta == 'N' ? A[(size_t)i * lda + k] : A[(size_t)k * lda + i];
                real b = tb == 'N' ? B[(size_t)k * ldb + j] : B[(size_t)j * ldb + k];
                acc += (double)a * b;
            }
            real *c = &C[(size_t)i * ldc + j];
            *c = (real)(alpha * acc + (beta == 0.0f ? 0.0 : (double)beta * *c));
        }
    }
}

void matmul(char ta, char tb, int M, int N, int K, real alpha, const real *A, int lda,
            const real *B, int ldb, real beta, real *C, int ldc) {
    if (M <= 0 || N <= 0) return;
    if (K <= 0) {                                   /* C = beta C, as BLAS defines it           */
        for (int i = 0; i < M; i++)
            for (int j = 0; j < N; j++) C[(size_t)i * ldc + j] *= beta;
        return;
    }
#ifdef EXCB_USE_DNNL
    if (dnnl_sgemm(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc) == dnnl_success) return;
    fprintf(stderr, "excb: dnnl_sgemm failed (%c%c %dx%dx%d); using the naive GEMM\n", ta, tb, M, N, K);
#endif
    matmul_naive(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

/* The same product cut into fixed tiles of EXCB_TILE_M rows of C, tiles in parallel. */
static void matmul_tiled(char ta, char tb, int M, int N, int K, real alpha, const real *A, int lda,
                         const real *B, int ldb, real beta, real *C, int ldc) {
    int tiles = (M + EXCB_TILE_M - 1) / EXCB_TILE_M;
#pragma omp parallel for schedule(static)
    for (int t = 0; t < tiles; t++) {
        int m0 = t * EXCB_TILE_M, mm = imin(EXCB_TILE_M, M - m0);
        const real *At = ta == 'N' ? A + (size_t)m0 * lda : A + m0;    /* row m0 of op(A)       */
        matmul(ta, tb, mm, N, K, alpha, At, lda, B, ldb, beta, C + (size_t)m0 * ldc, ldc);
    }
}

/* ================================================================================================
 * 1. Backbone (METHOD.md 1.1): convolution, BatchNorm (+ReLU, +residual), max-pool, average-pool
 * ================================================================================================
 * A ResNet is a stem, stages of residual blocks, and a global average pool to a D-vector per image.
 * BasicBlock: y = relu(BN(conv3x3(relu(BN(conv3x3(x))))) + shortcut(x)); Bottleneck has three
 * convs (1x1, 3x3 with the stride, 1x1 to 4x width). The shortcut is x, or BN(conv1x1/stride(x)).
 * BatchNorm runs in train mode (batch statistics) for student and teacher alike (A13) and keeps
 * running statistics for evaluation. The backbone runs once per crop resolution (A20).
 */

/* --- convolution as im2col + GEMM ---------------------------------------------------------------
 * x is (Cin, N, H, W), w is (Cout, Cin, k, k), y is (Cout, N, Ho, Wo):
 *   y[co, n, oy, ox] = sum_{ci,i,j} w[co, ci, i, j] x[ci, n, oy*s - p + i, ox*s - p + j]
 * For a chunk of images, im2col lays the patches out as col (Cin*k*k, chunk*Ho*Wo), so that
 *   y[:, chunk] = w (Cout, Cin*k*k) . col           (one GEMM per chunk)
 * A 1x1 stride-1 convolution needs no col: x itself is the right matrix.
 * The chunk holds as many images as fit a 1 MiB panel, a function of the layer shape only.
 */
static int conv_out(int H, int k, int stride, int pad) { return (H + 2 * pad - k) / stride + 1; }

static int conv_chunk_images(int Cin, int k, int HoWo, int N) {
    long per_image = (long)Cin * k * k * HoWo;
    long nc = EXCB_COL_PANEL / per_image;
    if (nc < 1) nc = 1;
    if (nc > N) nc = N;
    return (int)nc;
}

static void im2col(real *col, const real *x, int N, int n0, int nc, int Cin, int H, int W, int k,
                   int stride, int pad, int Ho, int Wo) {
    size_t ld = (size_t)nc * Ho * Wo;
    for (int c = 0; c < Cin; c++)
        for (int i = 0; i < k; i++)
            for (int j = 0; j < k; j++) {
                real *dst = col + (size_t)((c * k + i) * k + j) * ld;    /* row (c,i,j) of col */
                for (int n = 0; n < nc; n++) {
                    const real *src = x + ((size_t)c * N + n0 + n) * H * W;   /* plane (c, n0+n) */
                    for (int oy = 0; oy < Ho; oy++, dst += Wo) {
                        int iy = oy * stride - pad + i;
                        if (iy < 0 || iy >= H) {
                            memset(dst, 0, sizeof(real) * Wo);
                            continue;
                        }
                        const real *row = src + (size_t)iy * W;
                        for (int ox = 0; ox < Wo; ox++) {
                            int ix = ox * stride - pad + j;
                            dst[ox] = (ix >= 0 && ix < W) ? row[ix] : 0.0f;
                        }
                    }
                }
            }
}

/* col2im: the adjoint of im2col, dx[c, n, iy, ix] += dcol[(c,i,j), (n, oy, ox)] */
static void col2im(real *dx, const real *col, int N, int n0, int nc, int Cin, int H, int W, int k,
                   int stride, int pad, int Ho, int Wo) {
    size_t ld = (size_t)nc * Ho * Wo;
    for (int c = 0; c < Cin; c++)
        for (int i = 0; i < k; i++)
            for (int j = 0; j < k; j++) {
                const real *src = col + (size_t)((c * k + i) * k + j) * ld;
                for (int n = 0; n < nc; n++) {
                    real *dst = dx + ((size_t)c * N + n0 + n) * H * W;
                    for (int oy = 0; oy < Ho; oy++, src += Wo) {
                        int iy = oy * stride - pad + i;
                        if (iy < 0 || iy >= H) continue;
                        real *row = dst + (size_t)iy * W;
                        for (int ox = 0; ox < Wo; ox++) {
                            int ix = ox * stride - pad + j;
                            if (ix >= 0 && ix < W) row[ix] += src[ox];
                        }
                    }
                }
            }
}

void conv2d_forward(real *y, const real *x, const real *w, real *col, int N, int Cin, int H,
                    int W, int Cout, int k, int stride, int pad) {
    int Ho = conv_out(H, k, stride, pad), Wo = conv_out(W, k, stride, pad), HoWo = Ho * Wo;
    int CKK = Cin * k * k;
    int direct = (k == 1 && stride == 1 && pad == 0);
    int nc = conv_chunk_images(Cin, k, HoWo, N), n_chunks = (N + nc - 1) / nc;
    size_t panel = (size_t)CKK * nc * HoWo;
#pragma omp parallel for schedule(static)
    for (int ch = 0; ch < n_chunks; ch++) {
        int n0 = ch * nc, cnt = imin(nc, N - n0);
        const real *B = x + (size_t)n0 * HoWo;             /* 1x1/1: x's own columns            */
        int ldb = N * HoWo;
        if (!direct) {
            real *p = col + (size_t)thread_id() * panel;   /* this worker's panel               */
            im2col(p, x, N, n0, cnt, Cin, H, W, k, stride, pad, Ho, Wo);
            B = p;
            ldb = cnt * HoWo;
        }
        matmul('N', 'N', Cout, cnt * HoWo, CKK, 1.0f, w, CKK, B, ldb, 0.0f, y + (size_t)n0 * HoWo, N * HoWo);
    }
}

/* Backward of y = w . col:  dw += dy . col^T  and  dcol = w^T . dy, then dx = col2im(dcol).
 * dw is a sum over every image: each of EXCB_SLOTS slots sums a fixed run of chunks into its own
 * buffer, then the slots are added to dw in slot order. dx may be NULL (the input image). */
void conv2d_backward(real *dx, real *dw, const real *dy, const real *x, const real *w,
                     real *col, real *slots, int N, int Cin, int H, int W, int Cout, int k,
                     int stride, int pad) {
    int Ho = conv_out(H, k, stride, pad), Wo = conv_out(W, k, stride, pad), HoWo = Ho * Wo;
    int CKK = Cin * k * k;
    int direct = (k == 1 && stride == 1 && pad == 0);
    int nc = conv_chunk_images(Cin, k, HoWo, N), n_chunks = (N + nc - 1) / nc;
    size_t panel = (size_t)CKK * nc * HoWo, nw = (size_t)Cout * CKK;
#pragma omp parallel for schedule(static)
    for (int s = 0; s < EXCB_SLOTS; s++) {
        real *dws = slots + (size_t)s * nw;
        memset(dws, 0, sizeof(real) * nw);
        real *p = col + (size_t)thread_id() * panel;
        for (int ch = s * n_chunks / EXCB_SLOTS; ch < (s + 1) * n_chunks / EXCB_SLOTS; ch++) {
            int n0 = ch * nc, cnt = imin(nc, N - n0);
            const real *dyc = dy + (size_t)n0 * HoWo;    /* columns of this chunk, ld N*HoWo  */
            const real *B = x + (size_t)n0 * HoWo;
            int ldb = N * HoWo;
            if (!direct) {
                im2col(p, x, N, n0, cnt, Cin, H, W, k, stride, pad, Ho, Wo);
                B = p;
                ldb = cnt * HoWo;
            }
            /* dw_slot += dy_chunk (Cout, cnt*HoWo) . col^T (cnt*HoWo, CKK) */
            matmul('N', 'T', Cout, CKK, cnt * HoWo, 1.0f, dyc, N * HoWo, B, ldb, 1.0f, dws, CKK);
            if (!dx) continue;
            if (direct) {   /* dx_chunk = w^T (Cin, Cout) . dy_chunk, straight into dx's columns */
                matmul('T', 'N', Cin, cnt * HoWo, Cout, 1.0f, w, CKK, dyc, N * HoWo, 0.0f,
                       dx + (size_t)n0 * HoWo, N * HoWo);
                continue;
            }
            matmul('T', 'N', CKK, cnt * HoWo, Cout, 1.0f, w, CKK, dyc, N * HoWo, 0.0f, p, cnt * HoWo);
            for (int c = 0; c < Cin; c++)
                memset(dx + ((size_t)c * N + n0) * H * W, 0, sizeof(real) * cnt * H * W);
            col2im(dx, p, N, n0, cnt, Cin, H, W, k, stride, pad, Ho, Wo);
        }
    }
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < nw; i++) {
        real acc = 0.0f;
        for (int s = 0; s < EXCB_SLOTS; s++) acc += slots[(size_t)s * nw + i];
        dw[i] += acc;
    }
}

/* --- BatchNorm in train mode, with the ReLU and the residual add fused in --------------------------
 * y is (C, NHW): channel c is one contiguous run of NHW values (N images times H*W, or N rows).
 *   mean_c = (1/n) sum y,   var_c = (1/n) sum (y - mean)^2  (biased),   rstd_c = 1/sqrt(var_c + eps)
 *   out = act( gamma_c (y - mean_c) rstd_c + beta_c  [+ residual] ),  act = ReLU or identity
 * computed as out = y*scale + shift with scale = gamma*rstd, shift = beta - mean*scale (as
 * PyTorch's CPU kernel does). Running statistics (evaluation only) use the unbiased variance:
 *   run_mean = (1-m) run_mean + m mean,   run_var = (1-m) run_var + m var n/(n-1)
 * Sums run in double over 8 independent lanes (vectorisable, and fixed order).
 */
void batchnorm_forward(real *out, real *mean, real *rstd, real *run_mean, real *run_var,
                       const real *y, const real *gamma, const real *beta, const real *residual,
                       int relu, int C, int NHW, real eps, real momentum) {
#pragma omp parallel for schedule(static)
    for (int c = 0; c < C; c++) {
        const real *yc = y + (size_t)c * NHW;
        double s[8] = {0}, ss[8] = {0};
        int i = 0;
        for (; i + 8 <= NHW; i += 8)
            for (int l = 0; l < 8; l++) {
                double v = yc[i + l];
                s[l] += v;
                ss[l] += v * v;
            }
        for (; i < NHW; i++) {
            double v = yc[i];
            s[0] += v;
            ss[0] += v * v;
        }
        double sum = 0, sumsq = 0;
        for (int l = 0; l < 8; l++) {
            sum += s[l];
            sumsq += ss[l];
        }
        double mu = sum / NHW, var = sumsq / NHW - mu * mu;
        if (var < 0) var = 0;
        real rs = (real)(1.0 / sqrt(var + eps));
        mean[c] = (real)mu;
        rstd[c] = rs;
        if (run_mean) {
            run_mean[c] = (1.0f - momentum) * run_mean[c] + momentum * (real)mu;
            double unbiased = NHW > 1 ? var * NHW / (NHW - 1) : var;
            run_var[c] = (1.0f - momentum) * run_var[c] + momentum * (real)unbiased;
        }
        real scale = gamma[c] * rs, shift = beta[c] - (real)mu * scale;
        real *oc = out + (size_t)c * NHW;
        const real *rc = residual ? residual + (size_t)c * NHW : NULL;    /* may alias oc */
        for (i = 0; i < NHW; i++) {
            real v = yc[i] * scale + shift;
            if (rc) v += rc[i];
            if (relu) v = v < 0.0f ? 0.0f : v;          /* NaN passes through, as in PyTorch */
            oc[i] = v;
        }
    }
}

/* Backward of the above. With g = dout * [out > 0] (the ReLU's gate; all ones without ReLU) and
 * xhat = (y - mean) rstd:
 *   dbeta += sum g,   dgamma += sum g xhat
 *   dy = gamma rstd (g - mean(g) - xhat mean(g xhat))
 * The residual's gradient is g itself; callers add it (identity) or pass g through the shortcut
 * BN by calling this again with the shortcut's y and statistics and the same dout and out. */
void batchnorm_backward(real *dy, real *dgamma, real *dbeta, const real *dout, const real *out,
                        const real *y, const real *mean, const real *rstd, const real *gamma,
                        int relu, int C, int NHW) {
#pragma omp parallel for schedule(static)
    for (int c = 0; c < C; c++) {
        size_t o = (size_t)c * NHW;
        const real *gc = dout + o, *oc = out + o, *yc = y + o;
        real mu = mean[c], rs = rstd[c];
        double sg[8] = {0}, sgx[8] = {0};
        int i = 0;
        for (; i + 8 <= NHW; i += 8)
            for (int l = 0; l < 8; l++) {
                real g = (!relu || oc[i + l] > 0.0f) ? gc[i + l] : 0.0f;
                sg[l] += g;
                sgx[l] += (double)g * ((yc[i + l] - mu) * rs);
            }
        for (; i < NHW; i++) {
            real g = (!relu || oc[i] > 0.0f) ? gc[i] : 0.0f;
            sg[0] += g;
            sgx[0] += (double)g * ((yc[i] - mu) * rs);
        }
        double sum_g = 0, sum_gx = 0;
        for (int l = 0; l < 8; l++) {
            sum_g += sg[l];
            sum_gx += sgx[l];
        }
        dbeta[c] += (real)sum_g;
        dgamma[c] += (real)sum_gx;
        real k1 = gamma[c] * rs, a = (real)(sum_g / NHW), b = (real)(sum_gx / NHW);
        real *dc = dy + o;
        for (i = 0; i < NHW; i++) {
            real g = (!relu || oc[i] > 0.0f) ? gc[i] : 0.0f;
            dc[i] = k1 * (g - a - (yc[i] - mu) * rs * b);
        }
    }
}

/* --- the ImageNet stem's max-pool, 3x3, stride 2, padding 1 ----------------------------------------
 * out[c,n,oy,ox] = max over the window; arg keeps the flat index (iy*W + ix) of the first maximum
 * (PyTorch's tie rule), so the backward routes each gradient to exactly one input. */
void maxpool_forward(real *out, int32_t *arg, const real *x, int C, int N, int H, int W) {
    int Ho = conv_out(H, 3, 2, 1), Wo = conv_out(W, 3, 2, 1);
#pragma omp parallel for schedule(static)
    for (long pl = 0; pl < (long)C * N; pl++) {
        const real *xp = x + (size_t)pl * H * W;
        real *op = out + (size_t)pl * Ho * Wo;
        int32_t *ap = arg + (size_t)pl * Ho * Wo;
        for (int oy = 0; oy < Ho; oy++)
            for (int ox = 0; ox < Wo; ox++) {
                real best = -INFINITY;
                int32_t at = -1;
                for (int i = 0; i < 3; i++)
                    for (int j = 0; j < 3; j++) {
                        int iy = oy * 2 - 1 + i, ix = ox * 2 - 1 + j;
                        if (iy < 0 || iy >= H || ix < 0 || ix >= W) continue;
                        real v = xp[iy * W + ix];
                        if (v > best || isnan(v)) {
                            best = v;
                            at = iy * W + ix;
                        }
                    }
                op[oy * Wo + ox] = best;
                ap[oy * Wo + ox] = at;
            }
    }
}

/* dx[arg] += dout, per plane (planes are disjoint, so planes run in parallel) */
void maxpool_backward(real *dx, const real *dout, const int32_t *arg, int C, int N, int H, int W) {
    int Ho = conv_out(H, 3, 2, 1), Wo = conv_out(W, 3, 2, 1);
#pragma omp parallel for schedule(static)
    for (long pl = 0; pl < (long)C * N; pl++) {
        real *dp = dx + (size_t)pl * H * W;
        memset(dp, 0, sizeof(real) * H * W);
        for (int o = 0; o < Ho * Wo; o++) dp[arg[(size_t)pl * Ho * Wo + o]] += dout[(size_t)pl * Ho * Wo + o];
    }
}

/* --- global average pool: f[c, n] = mean over H*W of x[c, n]; f has leading dimension ldf -------- */
void avgpool_forward(real *f, int ldf, const real *x, int C, int N, int HW) {
#pragma omp parallel for schedule(static)
    for (int c = 0; c < C; c++)
        for (int n = 0; n < N; n++) {
            const real *xp = x + ((size_t)c * N + n) * HW;
            double acc = 0;
            for (int i = 0; i < HW; i++) acc += xp[i];
            f[(size_t)c * ldf + n] = (real)(acc / HW);
        }
}

/* dx[c, n, :] = df[c, n] / HW */
void avgpool_backward(real *dx, const real *df, int ldf, int C, int N, int HW) {
#pragma omp parallel for schedule(static)
    for (int c = 0; c < C; c++)
        for (int n = 0; n < N; n++) {
            real g = df[(size_t)c * ldf + n] / (real)HW;
            real *dp = dx + ((size_t)c * N + n) * HW;
            for (int i = 0; i < HW; i++) dp[i] = g;
        }
}

/* ================================================================================================
 * 2. Projector g (E0) and predictor P (E10a): Linear layers on feature-major (F, N) activations
 * ================================================================================================
 *   E0:   h = W3 relu(BN(W2 relu(BN(W1 y + b1)) + b2)) + b3      (D -> Hd -> Hd -> d, no output BN)
 *   E10a: p = W5 relu(BN(W4 BN(h) + b4)) + b5                     (BN(d) first, d -> Hd -> d)
 * BN1d is batchnorm_forward with NHW = N rows. The student's projector sees all (Vg+Vl)*B crops
 * in one call, so its BN statistics mix both resolutions (A20).
 */

/* y (out, N) = w (out, in) . x (in, N) + b: y is filled with b, then the GEMM adds w.x (addmm). */
void linear_forward(real *y, const real *x, const real *w, const real *b, int in, int out, int N) {
    int tiles = (out + EXCB_TILE_M - 1) / EXCB_TILE_M;
#pragma omp parallel for schedule(static)
    for (int t = 0; t < tiles; t++) {
        int o0 = t * EXCB_TILE_M, oo = imin(EXCB_TILE_M, out - o0);
        for (int o = o0; o < o0 + oo; o++)
            for (int n = 0; n < N; n++) y[(size_t)o * N + n] = b[o];
        matmul('N', 'N', oo, N, in, 1.0f, w + (size_t)o0 * in, in, x, N, 1.0f, y + (size_t)o0 * N, N);
    }
}

/* From y = w.x + b:  db += sum_n dy,   dw += dy . x^T,   dx = w^T . dy  (dx may be NULL) */
void linear_backward(real *dx, real *dw, real *db, const real *dy, const real *x,
                     const real *w, int in, int out, int N) {
#pragma omp parallel for schedule(static)
    for (int o = 0; o < out; o++) {
        double acc = 0;
        for (int n = 0; n < N; n++) acc += dy[(size_t)o * N + n];
        db[o] += (real)acc;
    }
    matmul_tiled('N', 'T', out, in, N, 1.0f, dy, N, x, N, 1.0f, dw, in);
    if (dx) matmul_tiled('T', 'N', in, N, out, 1.0f, w, in, dy, N, 0.0f, dx, N);
}

/* ================================================================================================
 * 3. Prototypes (E1): weight-normalised cosine layer with an L2-normalised input
 * ================================================================================================
 *   c_k = v_k / ||v_k||                      (weight norm, gain g fixed to 1)
 *   u   = h / max(||h||, eps)                (F.normalize, eps = 1e-12)
 *   z_k = <u, c_k>  in [-1, 1]               (a cosine similarity; E4 relies on this range)
 * The similarity itself is one GEMM, z (N, K) = u (N, d) . c^T. Its backward (E12, E13):
 *   du = dz . c,    dc = dz^T . u,    dv = (I - c c^T) dc / ||v||,    dh = (I - u u^T) du / ||h||
 * Gradient routing (METHOD.md 1.6, A8, A9): only the two direct global rows send dc; predictor
 * rows (and the unused direct local rows) see c as a constant.
 */

/* x is feature-major (d, N) with leading dimension ldx; u is row-major (N, d); den[n] = max(||x_n||, eps) */
void l2norm_rows_forward(real *u, real *den, const real *x, int ldx, int d, int N, real eps) {
    int tiles = (N + 63) / 64;
#pragma omp parallel for schedule(static)
    for (int t = 0; t < tiles; t++) {
        int n0 = t * 64, nn = imin(64, N - n0);
        double ss[64] = {0};
        for (int j = 0; j < d; j++)
            for (int n = 0; n < nn; n++) {
                double v = x[(size_t)j * ldx + n0 + n];
                ss[n] += v * v;
            }
        for (int n = 0; n < nn; n++) {
            real nrm = (real)sqrt(ss[n]);
            den[n0 + n] = nrm < eps ? eps : nrm;              /* max(||x||, eps); NaN stays NaN */
        }
        for (int j = 0; j < d; j++)
            for (int n = 0; n < nn; n++) u[(size_t)(n0 + n) * d + j] = x[(size_t)j * ldx + n0 + n] / den[n0 + n];
    }
}

/* From u = x / max(||x||, eps): dx = (du - u <u, du>) / ||x|| when ||x|| > eps, else du / eps.
 * dx is feature-major with leading dimension ldx; written, or added to when accumulate. */
void l2norm_rows_backward(real *dx, int ldx, const real *du, const real *u, const real *den,
                          int d, int N, real eps, int accumulate) {
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        const real *un = u + (size_t)n * d, *dun = du + (size_t)n * d;
        double dot = 0;
        if (den[n] > eps)
            for (int j = 0; j < d; j++) dot += (double)un[j] * dun[j];
        real dotf = (real)dot;
        for (int j = 0; j < d; j++) {
            real g = (dun[j] - un[j] * dotf) / den[n];
            real *t = &dx[(size_t)j * ldx + n];
            *t = accumulate ? *t + g : g;
        }
    }
}

/* c_k = v_k * (1/||v_k||) (torch._weight_norm with g = 1 multiplies by g/||v||); inv[k] = 1/||v_k|| */
void weightnorm_forward(real *c, real *inv, const real *v, int K, int d) {
#pragma omp parallel for schedule(static)
    for (int k = 0; k < K; k++) {
        const real *vk = v + (size_t)k * d;
        double ss = 0;
        for (int j = 0; j < d; j++) ss += (double)vk[j] * vk[j];
        real r = 1.0f / (real)sqrt(ss);
        inv[k] = r;
        for (int j = 0; j < d; j++) c[(size_t)k * d + j] = vk[j] * r;
    }
}

/* E13: dv_k += (dc_k - c_k <c_k, dc_k>) / ||v_k|| */
void weightnorm_backward(real *dv, const real *dc, const real *c, const real *inv, int K, int d) {
#pragma omp parallel for schedule(static)
    for (int k = 0; k < K; k++) {
        const real *ck = c + (size_t)k * d, *dck = dc + (size_t)k * d;
        double dot = 0;
        for (int j = 0; j < d; j++) dot += (double)ck[j] * dck[j];
        real dotf = (real)dot;
        for (int j = 0; j < d; j++) dv[(size_t)k * d + j] += (dck[j] - ck[j] * dotf) * inv[k];
    }
}

/* ================================================================================================
 * 4. Cluster-size estimation (E2, E3, E3')
 * ================================================================================================
 *   E2:  s_hat_k = (1/(Vg B)) sum_{v,i} [argmax_j q_{v,i,j} = k]    hard counts of the BALANCED
 *                                                                  teacher output, both views
 *   E3:  s <- m_s s + (1 - m_s) s_hat,   s = 1/K at the start,     m_s = 0.999
 *   E3': r_k = K s_k / sum_j s_j                                    (1 = the uniform size)
 * The update runs after the loss (official criterion.py L83): step t is balanced with the estimate
 * of steps < t. The official code forms (1 - m_s) s_hat in float16 (A4): s_hat and (1 - m_s) are
 * rounded to binary16, multiplied (exact in float32), rounded to binary16 again; fp16_term = 1
 * reproduces that bit for bit, fp16_term = 0 is the plain float32 formula.
 */
void cluster_size_update(real *s, int32_t *counts, const int32_t *labels, int N, int K, double m_s,
                         int fp16_term) {
    memset(counts, 0, sizeof(int32_t) * K);
    for (int n = 0; n < N; n++) counts[labels[n]]++;
    real m = (real)m_s;                                  /* s * m_s: the scalar cast to float32 */
    real one_minus_m = (real)(1.0 - m_s);                /* (1 - m_s) formed in double, as Python */
    real one_minus_m16 = excb_round_fp16(one_minus_m);   /* torch.tensor(1 - m_s).half()        */
    for (int k = 0; k < K; k++) {
        real frac = (real)counts[k] / (real)N;           /* s_hat_k, E2                          */
        real term = fp16_term ? excb_round_fp16(excb_round_fp16(frac) * one_minus_m16) : frac * one_minus_m;
        s[k] = s[k] * m + term;                          /* E3                                   */
    }
}

/* ================================================================================================
 * 5. Balancing (E4) and the code's boost and clamp (E5); teacher targets (E6)
 * ================================================================================================
 *   lower_k  = min(r_k, 1)     written as 1 - relu(1 - r_k), the official form
 *   higher_k = min(1/r_k, 1)   written as 1 - relu(1 - 1/r_k)
 *   E4:  z'  = 1 - (1 - z) lower      shrink the cosine DISTANCE of small clusters  (r < 1)
 *        z'' = (z' + 1) higher - 1    shrink the shifted SIMILARITY of large clusters (r > 1)
 *   E5:  zh  = clamp(z'' (1 + 0.01 [k = argmax z'']), -1, 1)       (A1 boost, A2 clamp)
 *   E6:  q   = softmax(zh / tau_t),  tau_t = 0.04, no gradient
 * B(.; r) is increasing in z (a cluster's ranking of samples is kept), the identity at r = 1 (so at
 * the start, s = 1/K), and maps [-1, 1] into [-1, 1]. A3: where a factor is exactly 0 (r_k = 0,
 * which FP32 with subnormals never reaches, METHOD.md A3) the code adds U(0,1) * 0.001. For r = 0,
 * 1/r = inf and 1 - relu(1 - inf) = 1: IEEE arithmetic gives the official value with no NaN.
 */
void balance_factors(real *r, real *lower, real *higher, const real *s, int K, double jitter,
                     uint64_t seed, long step) {
    double sum = 0;
    for (int k = 0; k < K; k++) sum += fabs(s[k]);
    real den = (real)sum > 1e-12f ? (real)sum : 1e-12f;        /* F.normalize(s, p=1)          */
    for (int k = 0; k < K; k++) {
        real rk = s[k] / den * (real)K;                           /* E3'                          */
        real lo = 1.0f - fmax(1.0f - rk, 0.0f);
        real hi = 1.0f - fmax(1.0f - 1.0f / rk, 0.0f);
        if (lo == 0.0f) lo += excb_uniform(seed, EXCB_RNG_JITTER, (uint64_t)step, 0, k) * (real)jitter;
        if (hi == 0.0f) hi += excb_uniform(seed, EXCB_RNG_JITTER, (uint64_t)step, 1, k) * (real)jitter;
        r[k] = rk;
        lower[k] = lo;
        higher[k] = hi;
    }
}

void balanced_targets(real *q, int32_t *labels, real *zhat, const real *z, const real *lower,
                      const real *higher, int N, int K, double boost, double clamp, double tau_t) {
    real factor = (real)(1.0 + boost), tau = (real)tau_t, c = (real)clamp;
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        const real *zn = z + (size_t)n * K;
        real *zh = zhat ? zhat + (size_t)n * K : q + (size_t)n * K;
        real *qn = q + (size_t)n * K;
        int a = 0;
        for (int k = 0; k < K; k++) {
            real z1 = 1.0f - (1.0f - zn[k]) * lower[k];            /* E4, lower branch          */
            real z2 = (z1 + 1.0f) * higher[k] - 1.0f;               /* E4, upper branch          */
            zh[k] = z2;
            if (z2 > zh[a]) a = k;                                  /* first maximum             */
        }
        zh[a] *= factor;                                            /* E5 boost (A1)             */
        real mx = -INFINITY;
        for (int k = 0; k < K; k++) {
            zh[k] = fmin(fmax(zh[k], -c), c);                       /* E5 clamp (A2)             */
            real l = zh[k] / tau;
            mx = l > mx ? l : mx;
        }
        double sum = 0;
        for (int k = 0; k < K; k++) {
            real e = exp(zh[k] / tau - mx);
            qn[k] = e;                                              /* zh[k] is not read again   */
            sum += e;
        }
        real inv = (real)(1.0 / sum);
        int best = 0;
        for (int k = 0; k < K; k++) {
            qn[k] *= inv;                                           /* E6                        */
            if (qn[k] > qn[best]) best = k;
        }
        labels[n] = best;                                           /* for E2                    */
    }
}

/* ================================================================================================
 * 6. Student predictions, the loss (E7, E8) and its gradient (E11)
 * ================================================================================================
 *   E7:  p_{u,i} = softmax(z^S_{u,i} / tau_s),   tau_s = 0.1
 *   E8:  L = (1/|M|) sum_{(v,u) in M} (1/B) sum_i sum_k -q_{v,i,k} log p_{u,i,k}
 * The student rows, in the official order: direct similarities of the Vg global crops (E1), the
 * direct rows of the local crops, then the predictor's similarities (E10b) of all Vg + Vl crops.
 * Teacher view v is matched (A7) with the direct row of every OTHER global view and with EVERY
 * predictor row, its own view included: |M| = Vg(Vg-1) + Vg(Vg+Vl) = 2 + 16 = 18 terms. The direct
 * local rows are never matched, so they are not computed here (the official code computes and
 * discards them; no value or gradient depends on them).
 *   E11: for one term, dL/dl_k = p_k - q_k (sum q = 1), and l = z / tau_s. Summed over the
 *        n_u teacher views that match row u:   dL/dz_k = (n_u p_k - sum_v q_{v,k}) / (tau_s |M| B)
 * z_dir is (Vg*B, K) and z_pred ((Vg+Vl)*B, K); both are overwritten with dL/dz. The loss of each
 * row goes to row_loss, then rows are summed in order (a sum that no thread count changes).
 */
static double loss_row(real *z, const real *q, int B, int K, int i, int n_views, int skip_view,
                       double tau_s, double scale) {
    real tau = (real)tau_s, mx = -INFINITY;
    for (int k = 0; k < K; k++) {
        real l = z[k] / tau;
        mx = l > mx ? l : mx;
    }
    double se = 0, qs = 0, ql = 0;
    for (int k = 0; k < K; k++) {
        real l = z[k] / tau, qk = 0.0f;
        for (int v = 0; v < n_views; v++)
            if (v != skip_view) qk += q[((size_t)v * B + i) * K + k];
        real e = exp(l - mx);
        se += e;
        qs += qk;
        ql += (double)qk * l;
        z[k] = e;
    }
    double lse = mx + log(se);
    int n_match = skip_view >= 0 ? n_views - 1 : n_views;
    real inv_se = (real)(1.0 / se), sc = (real)scale;
    for (int k = 0; k < K; k++) {
        real qk = 0.0f;
        for (int v = 0; v < n_views; v++)
            if (v != skip_view) qk += q[((size_t)v * B + i) * K + k];
        z[k] = ((real)n_match * (z[k] * inv_se) - qk) * sc;       /* E11, divided by tau_s |M| B */
    }
    return lse * qs - ql;                /* sum_v sum_k -q_{v,k} log p_k = sum_k q_k (lse - l_k) */
}

double excb_loss_forward_backward(real *z_dir, real *z_pred, double *row_loss, const real *q,
                                  int Vg, int Vl, int B, int K, double tau_s) {
    int n_terms = Vg * (Vg - 1) + Vg * (Vg + Vl);                  /* |M| = 18                  */
    double scale = 1.0 / (tau_s * n_terms * B);
    int n_dir = Vg * B, n_rows = n_dir + (Vg + Vl) * B;
#pragma omp parallel for schedule(static)
    for (int r = 0; r < n_rows; r++) {
        if (r < n_dir)        /* direct row of global view v: matched by the other teacher views */
            row_loss[r] = loss_row(z_dir + (size_t)r * K, q, B, K, r % B, Vg, r / B, tau_s, scale);
        else                  /* predictor row of any crop: matched by every teacher view       */
            row_loss[r] = loss_row(z_pred + (size_t)(r - n_dir) * K, q, B, K, (r - n_dir) % B, Vg, -1,
                                   tau_s, scale);
    }
    double total = 0;
    for (int r = 0; r < n_rows; r++) total += row_loss[r];
    return total / ((double)n_terms * B);
}

/* ================================================================================================
 * 7. Teacher and optimisation: schedules (Appendix A), EMA (E9), SGD with weight decay (E14)
 * ================================================================================================
 * cosine(max, min, t, T) = min + (max - min)(1 + cos(pi t/T))/2.
 *   lr(t), t = 1, 2, ... (the scheduler counts before use): lr_peak t/W while t < W, then
 *          cosine(lr_peak, lr_peak 1e-4, t - W, T - W). Not scaled by the batch size (A19).
 *   centroid wd(t) = wd (1 + 9 (1 + cos(pi t/T))/2): 10x -> 1x, "wdx10c1" (A10)
 *   teacher momentum(step) = 1 - (1 - 0.996)(1 + cos(pi step/T))/2, step counted from 0
 *   crop scale s_min(e) = 0.14 + 0.06 (1 + cos(pi e/E)), once per epoch (A11)
 */
double lr_at(long t, long T, long W, double lr_peak, double lr_min_factor) {
    if (t < W) return lr_peak * t / W;
    double lr_min = lr_peak * lr_min_factor;
    return lr_min + 0.5 * (lr_peak - lr_min) * (1 + cos(M_PI * (t - W) / (T - W)));
}

double centroid_wd_at(long t, long T, double wd, double boost) {
    return wd * (0.5 * (1 + cos(M_PI * t / T)) * boost + 1);
}

double ema_momentum_at(long step, long T, double start) {
    return 1.0 + 0.5 * (start - 1.0) * (1 + cos(M_PI * step / T));
}

double crop_scale_min_at(long epoch, long epochs) {
    return 0.14 + 0.06 * (1 + cos(M_PI * epoch / epochs));
}

/* E9: theta_T <- m theta_T + (1 - m) theta_S, over every parameter (not the BN running buffers,
 * A13), in PyTorch's roundings: t = t * real(m), then t = t + s * real(1 - m). */
void ema_update(real *teacher, const real *student, size_t n, double m) {
    real mf = (real)m, omf = (real)(1.0 - m);
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; i++) {
        real t = teacher[i] * mf;
        teacher[i] = t + student[i] * omf;
    }
}

/* E14, torch.optim.SGD with coupled weight decay, momentum 0.9, no dampening, no Nesterov:
 *   g' = g + wd p;   buf = 0.9 buf + g';   p = p - lr buf
 * (the first step's buf = g' equals 0.9 * 0 + g' with buf zero-initialised). The groups: weights wd,
 * biases and 1-D parameters 0, the centroid direction v wd_centroid(t). */
void sgd_update(ExcbModel *m, double lr, double wd, double wd_centroid) {
    real mom = (real)m->cfg.sgd_momentum, lrf = (real)lr;
    for (int t = 0; t < m->n_tensors; t++) {
        const ExcbTensor *T = &m->tensors[t];
        real wdt = T->group == EXCB_GROUP_WEIGHT ? (real)wd
                  : T->group == EXCB_GROUP_CENTROID ? (real)wd_centroid : 0.0f;
        real *p = m->params + T->offset, *g = m->grads + T->offset, *b = m->momentum + T->offset;
#pragma omp parallel for schedule(static)
        for (size_t i = 0; i < T->numel; i++) {
            real gi = g[i] + wdt * p[i];
            real bi = b[i] * mom;
            b[i] = bi + gi;
            p[i] = p[i] - lrf * b[i];
        }
    }
}

/* ================================================================================================
 * 8. The model: named configurations, the parameter table, initialisation, activation arenas
 * ================================================================================================ */
static void config_defaults(ExcbConfig *c) {
    memset(c, 0, sizeof *c);
    c->d = 256;
    c->K = 4096;
    c->n_global = 2;
    c->n_local = 6;
    c->tau_s = 0.1;
    c->tau_t = 0.04;
    c->m_s = 0.999;
    c->boost = 0.01;
    c->clamp = 1.0;
    c->zero_jitter = 0.001;
    c->optimizer = EXCB_OPT_SGD;
    c->fp16_count_term = 1;
    c->bn_eps = 1e-5;
    c->bn_momentum = 0.1;
    c->norm_eps = 1e-12;
    c->lr_peak = 0.6;
    c->lr_min_factor = 1e-4;
    c->weight_decay = 1e-4;
    c->centroid_wd_boost = 9.0;
    c->sgd_momentum = 0.9;
    c->ema_start = 0.996;
    c->total_steps = 500400;       /* ResNet-50, 400 epochs at B = 1024 on ImageNet-1k            */
    c->warmup_steps = 12510;       /* 10 epochs of the same                                       */
    c->seed = 0;
    c->threads = 0;                /* 0: OpenMP's default (OMP_NUM_THREADS or every core)          */
}

int excb_config_named(ExcbConfig *c, const char *name) {
    config_defaults(c);
    snprintf(c->name, sizeof c->name, "%s", name);
    if (!strcmp(name, "resnet20s")) {         /* ResNet-20 for 28x28 grayscale, the small default */
        c->block = EXCB_BLOCK_BASIC; c->stem = EXCB_STEM_CIFAR; c->in_ch = 1; c->n_stages = 3;
        c->widths[0] = 16; c->widths[1] = 32; c->widths[2] = 64;
        c->blocks[0] = c->blocks[1] = c->blocks[2] = 3;
        c->hidden = 512; c->global_size = 28; c->local_size = 12; c->batch = 256;
    } else if (!strcmp(name, "resnet18")) {   /* ResNet-18 with the CIFAR stem                    */
        c->block = EXCB_BLOCK_BASIC; c->stem = EXCB_STEM_CIFAR; c->in_ch = 3; c->n_stages = 4;
        for (int i = 0; i < 4; i++) { c->widths[i] = 64 << i; c->blocks[i] = 2; }
        c->hidden = 2048; c->global_size = 32; c->local_size = 16; c->batch = 64;
    } else if (!strcmp(name, "resnet50")) {   /* ResNet-50, the paper's backbone                  */
        static const int nb[4] = {3, 4, 6, 3};
        c->block = EXCB_BLOCK_BOTTLENECK; c->stem = EXCB_STEM_IMAGENET; c->in_ch = 3; c->n_stages = 4;
        for (int i = 0; i < 4; i++) { c->widths[i] = 64 << i; c->blocks[i] = nb[i]; }
        c->hidden = 2048; c->global_size = 224; c->local_size = 96; c->batch = 64; c->K = 65536;
    } else if (!strcmp(name, "tiny")) {       /* the parity fixture's net (tests/reference)       */
        c->block = EXCB_BLOCK_BASIC; c->stem = EXCB_STEM_CIFAR; c->in_ch = 1; c->n_stages = 3;
        c->widths[0] = 4; c->widths[1] = 8; c->widths[2] = 8;
        c->blocks[0] = c->blocks[1] = c->blocks[2] = 1;
        c->hidden = 16; c->d = 8; c->K = 16; c->global_size = 8; c->local_size = 4; c->batch = 4;
        c->total_steps = 100; c->warmup_steps = 10;
    } else if (!strcmp(name, "tiny50")) {     /* Bottleneck + ImageNet stem + max-pool, for tests */
        c->block = EXCB_BLOCK_BOTTLENECK; c->stem = EXCB_STEM_IMAGENET; c->in_ch = 3; c->n_stages = 2;
        c->widths[0] = 2; c->widths[1] = 4; c->blocks[0] = 1; c->blocks[1] = 2;
        c->hidden = 16; c->d = 8; c->K = 16; c->global_size = 16; c->local_size = 8; c->batch = 4;
        c->total_steps = 100; c->warmup_steps = 10;
    } else {
        return -1;
    }
    return 0;
}

/* --- the parameter table: names are PyTorch's state_dict names, in PyTorch's order ---------------- */
static int add_tensor(ExcbModel *m, ExcbGroup group, int ndim, int s0, int s1, int s2, int s3,
                      const char *fmt, ...) __attribute__((format(printf, 8, 9)));
static int add_tensor(ExcbModel *m, ExcbGroup group, int ndim, int s0, int s1, int s2, int s3,
                      const char *fmt, ...) {
    if (m->n_tensors >= EXCB_MAX_TENSORS) {
        fprintf(stderr, "excb: more than %d parameter tensors\n", EXCB_MAX_TENSORS);
        exit(EXCB_EXIT_SOFTWARE);
    }
    ExcbTensor *t = &m->tensors[m->n_tensors];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(t->name, sizeof t->name, fmt, ap);
    va_end(ap);
    int sh[4] = {s0, s1, s2, s3};
    t->ndim = ndim;
    t->numel = 1;
    for (int i = 0; i < 4; i++) {
        t->shape[i] = i < ndim ? sh[i] : 1;
        if (i < ndim) t->numel *= (size_t)sh[i];
    }
    t->offset = m->n_params;
    t->group = group;
    m->n_params += (t->numel + 15) / 16 * 16;       /* each tensor starts on a 64-byte boundary */
    return m->n_tensors++;
}

/* Running statistics of one BatchNorm: mean[C] then var[C] in `running`; recorded for the init. */
static size_t add_bn_stats(ExcbModel *m, int C) {
    size_t off = m->n_running;
    m->bn_stats[m->n_bn] = off;
    m->bn_channels[m->n_bn++] = C;
    m->n_running += 2 * (size_t)C;
    return off;
}

/* conv (cout, cin, k, k) named "<prefix>conv<idx>.weight" and BN "<prefix>bn<idx>.{weight,bias}";
   downsample units use "downsample.0" and "downsample.1" as torchvision does. */
static ExcbConvBN add_convbn(ExcbModel *m, const char *conv_name, const char *bn_name, int cin,
                             int cout, int k, int stride, int pad) {
    ExcbConvBN u = {.cin = cin, .cout = cout, .k = k, .stride = stride, .pad = pad};
    u.w = add_tensor(m, EXCB_GROUP_WEIGHT, 4, cout, cin, k, k, "%s.weight", conv_name);
    u.gamma = add_tensor(m, EXCB_GROUP_NO_DECAY, 1, cout, 0, 0, 0, "%s.weight", bn_name);
    u.beta = add_tensor(m, EXCB_GROUP_NO_DECAY, 1, cout, 0, 0, 0, "%s.bias", bn_name);
    u.stats = add_bn_stats(m, cout);
    return u;
}

static ExcbLinear add_linear(ExcbModel *m, const char *prefix, int lin_idx, int in, int out, int bn) {
    ExcbLinear l = {.in = in, .out = out, .has_bn = bn};
    l.w = add_tensor(m, EXCB_GROUP_WEIGHT, 2, out, in, 0, 0, "%s.mlp.%d.weight", prefix, lin_idx);
    l.b = add_tensor(m, EXCB_GROUP_NO_DECAY, 1, out, 0, 0, 0, "%s.mlp.%d.bias", prefix, lin_idx);
    if (bn) {
        l.gamma = add_tensor(m, EXCB_GROUP_NO_DECAY, 1, out, 0, 0, 0, "%s.mlp.%d.weight", prefix, lin_idx + 1);
        l.beta = add_tensor(m, EXCB_GROUP_NO_DECAY, 1, out, 0, 0, 0, "%s.mlp.%d.bias", prefix, lin_idx + 1);
        l.stats = add_bn_stats(m, out);
    }
    return l;
}

static void build_structure(ExcbModel *m) {
    const ExcbConfig *c = &m->cfg;
    char a[96], b[96];
    if (c->stem == EXCB_STEM_IMAGENET) m->stem = add_convbn(m, "backbone.conv1", "backbone.bn1", c->in_ch, c->widths[0], 7, 2, 3);
    else m->stem = add_convbn(m, "backbone.conv1", "backbone.bn1", c->in_ch, c->widths[0], 3, 1, 1);
    int expansion = c->block == EXCB_BLOCK_BOTTLENECK ? 4 : 1;
    int cin = c->widths[0];
    m->n_blocks = 0;
    for (int st = 0; st < c->n_stages; st++)
        for (int j = 0; j < c->blocks[st]; j++) {
            ExcbResBlock *blk = &m->blocks[m->n_blocks++];
            int planes = c->widths[st], stride = (st > 0 && j == 0) ? 2 : 1, cout = planes * expansion;
            char pre[64];
            snprintf(pre, sizeof pre, "backbone.layer%d.%d", st + 1, j);
            if (c->block == EXCB_BLOCK_BASIC) {     /* conv3x3(stride) - conv3x3                  */
                blk->n_main = 2;
                snprintf(a, sizeof a, "%s.conv1", pre); snprintf(b, sizeof b, "%s.bn1", pre);
                blk->main[0] = add_convbn(m, a, b, cin, planes, 3, stride, 1);
                snprintf(a, sizeof a, "%s.conv2", pre); snprintf(b, sizeof b, "%s.bn2", pre);
                blk->main[1] = add_convbn(m, a, b, planes, planes, 3, 1, 1);
            } else {                                /* 1x1 - 3x3(stride) - 1x1 (x4), "v1.5"       */
                blk->n_main = 3;
                snprintf(a, sizeof a, "%s.conv1", pre); snprintf(b, sizeof b, "%s.bn1", pre);
                blk->main[0] = add_convbn(m, a, b, cin, planes, 1, 1, 0);
                snprintf(a, sizeof a, "%s.conv2", pre); snprintf(b, sizeof b, "%s.bn2", pre);
                blk->main[1] = add_convbn(m, a, b, planes, planes, 3, stride, 1);
                snprintf(a, sizeof a, "%s.conv3", pre); snprintf(b, sizeof b, "%s.bn3", pre);
                blk->main[2] = add_convbn(m, a, b, planes, cout, 1, 1, 0);
            }
            blk->has_down = (stride != 1 || cin != cout);
            if (blk->has_down) {
                snprintf(a, sizeof a, "%s.downsample.0", pre); snprintf(b, sizeof b, "%s.downsample.1", pre);
                blk->down = add_convbn(m, a, b, cin, cout, 1, stride, 0);
            }
            cin = cout;
        }
    m->D = cin;
    /* heads, in the official registration order: projector, predictor, centroids, BN(d) */
    m->proj[0] = add_linear(m, "classifier.projector", 0, m->D, c->hidden, 1);
    m->proj[1] = add_linear(m, "classifier.projector", 3, c->hidden, c->hidden, 1);
    m->proj[2] = add_linear(m, "classifier.projector", 6, c->hidden, c->d, 0);
    m->pred[0] = add_linear(m, "classifier.predictor", 0, c->d, c->hidden, 1);
    m->pred[1] = add_linear(m, "classifier.predictor", 3, c->hidden, c->d, 0);
    m->centroids = add_tensor(m, EXCB_GROUP_CENTROID, 2, c->K, c->d, 0, 0, "classifier.centroid_layer.weight_v");
    m->pred_bn_gamma = add_tensor(m, EXCB_GROUP_NO_DECAY, 1, c->d, 0, 0, 0, "classifier.predictor_activation.weight");
    m->pred_bn_beta = add_tensor(m, EXCB_GROUP_NO_DECAY, 1, c->d, 0, 0, 0, "classifier.predictor_activation.bias");
    m->pred_bn_stats = add_bn_stats(m, c->d);
}

int excb_find_tensor(const ExcbModel *m, const char *name) {
    for (int t = 0; t < m->n_tensors; t++)
        if (!strcmp(m->tensors[t].name, name)) return t;
    return -1;
}

/* --- initialisation (official resnet.py L42-59, layers.py L31-35; nn.Linear's default for v) ------
 *   conv: Kaiming normal, fan_out, ReLU gain: std = sqrt(2 / (cout k k))
 *   BN: gamma 1, beta 0; zero_init_residual: gamma 0 in the last BN of every residual branch (A25)
 *   Linear: trunc_normal(std 0.02) with torch's default cut at +-2 ABSOLUTE (100 sigma, so in effect
 *           a plain normal), bias 0
 *   centroid v: kaiming_uniform(a = sqrt 5) = U(-1/sqrt d, 1/sqrt d) (the official code then
 *           replaces it by k-means, METHOD.md 1.10: not implemented yet)
 * Each tensor draws from (seed, INIT, tensor index, element): independent of everything else. */
static void init_params(ExcbModel *m) {
    const uint64_t seed = m->cfg.seed;
    memset(m->params, 0, sizeof(real) * m->n_params);
    for (int t = 0; t < m->n_tensors; t++) {
        ExcbTensor *T = &m->tensors[t];
        real *p = m->params + T->offset;
        const char *nm = T->name;
        size_t len = strlen(nm);
        int is_bias = len > 5 && !strcmp(nm + len - 5, ".bias");
        if (T->ndim == 4) {
            real std = sqrt(2.0f / (real)(T->shape[0] * T->shape[2] * T->shape[3]));
            for (size_t i = 0; i < T->numel; i++) p[i] = std * excb_normal(seed, EXCB_RNG_INIT, t, 0, i);
        } else if (t == m->centroids) {
            real bound = 1.0f / sqrt((real)T->shape[1]);
            for (size_t i = 0; i < T->numel; i++)
                p[i] = (2.0f * excb_uniform(seed, EXCB_RNG_INIT, t, 0, i) - 1.0f) * bound;
        } else if (T->ndim == 2) {
            for (size_t i = 0; i < T->numel; i++) {
                real v;
                uint64_t draw = i;
                do v = 0.02f * excb_normal(seed, EXCB_RNG_INIT, t, 1, draw), draw += T->numel;
                while (v < -2.0f || v > 2.0f);
                p[i] = v;
            }
        } else if (!is_bias) {
            for (size_t i = 0; i < T->numel; i++) p[i] = 1.0f;      /* BN gamma                  */
        }
    }
    for (int b = 0; b < m->n_blocks; b++) {                        /* zero_init_residual         */
        const ExcbConvBN *u = &m->blocks[b].main[m->blocks[b].n_main - 1];
        memset(m->params + m->tensors[u->gamma].offset, 0, sizeof(real) * u->cout);
    }
    for (int b = 0; b < m->n_bn; b++)                                /* running mean 0, var 1   */
        for (int c = 0; c < m->bn_channels[b]; c++) {
            m->running[m->bn_stats[b] + c] = 0.0f;
            m->running[m->bn_stats[b] + m->bn_channels[b] + c] = 1.0f;
        }
    memcpy(m->teacher, m->params, sizeof(real) * m->n_params);   /* the teacher starts as a copy */
    memcpy(m->teacher_running, m->running, sizeof(real) * m->n_running);
    memset(m->momentum, 0, sizeof(real) * m->n_params);
    memset(m->grads, 0, sizeof(real) * m->n_params);
    for (int k = 0; k < m->cfg.K; k++) m->s[k] = 1.0f / (real)m->cfg.K;    /* E3's start      */
    m->step = 0;
}

/* --- activation arenas: one bump allocator, run once to count and once to hand out pointers ------- */
typedef struct { real *base; size_t used; } Arena;
static real *take(Arena *a, size_t n) {
    real *p = a->base ? a->base + a->used : NULL;
    a->used += (n + 15) / 16 * 16;
    return p;
}

static void plan_unit(Arena *ar, ExcbUnitActs *ua, const ExcbConvBN *u, int N, int H, int W,
                      size_t *max_act, size_t *max_col, size_t *max_w) {
    ua->N = N;
    ua->H = conv_out(H, u->k, u->stride, u->pad);
    ua->W = conv_out(W, u->k, u->stride, u->pad);
    size_t n = (size_t)u->cout * N * ua->H * ua->W;
    ua->y = take(ar, n);
    ua->a = take(ar, n);
    ua->mean = take(ar, u->cout);
    ua->rstd = take(ar, u->cout);
    if (n > *max_act) *max_act = n;
    size_t inn = (size_t)u->cin * N * H * W;
    if (inn > *max_act) *max_act = inn;
    int HoWo = ua->H * ua->W, nc = conv_chunk_images(u->cin, u->k, HoWo, N);
    size_t col = (size_t)u->cin * u->k * u->k * nc * HoWo;
    if (col > *max_col) *max_col = col;
    size_t w = (size_t)u->cout * u->cin * u->k * u->k;
    if (w > *max_w) *max_w = w;
}

static void plan_backbone(const ExcbModel *m, Arena *ar, ExcbBackboneActs *A, int N, int H,
                          size_t *max_act, size_t *max_col, size_t *max_w) {
    A->N = N;
    A->H = H;
    A->x = take(ar, (size_t)m->cfg.in_ch * N * H * H);
    plan_unit(ar, &A->stem, &m->stem, N, H, H, max_act, max_col, max_w);
    int h = A->stem.H;
    if (m->cfg.stem == EXCB_STEM_IMAGENET) {
        int hp = conv_out(h, 3, 2, 1);
        size_t n = (size_t)m->stem.cout * N * hp * hp;
        A->pool = take(ar, n);
        A->pool_arg = (int32_t *)take(ar, n);
        h = hp;
    }
    for (int b = 0; b < m->n_blocks; b++) {
        const ExcbResBlock *blk = &m->blocks[b];
        int hin = h;
        for (int j = 0; j < blk->n_main; j++) {
            plan_unit(ar, &A->main[b][j], &blk->main[j], N, h, h, max_act, max_col, max_w);
            h = A->main[b][j].H;
        }
        if (blk->has_down) plan_unit(ar, &A->down[b], &blk->down, N, hin, hin, max_act, max_col, max_w);
    }
}

/* Lays out every buffer of a step; with ar->base == NULL it only counts. */
static void plan_arena(ExcbModel *m, Arena *ar) {
    const ExcbConfig *c = &m->cfg;
    int B = c->batch, NG = c->n_global * B, NS = (c->n_global + c->n_local) * B, K = c->K, d = c->d;
    int Hd = c->hidden, D = m->D;
    size_t max_act = 0, max_col = 0, max_w = 0;
    plan_backbone(m, ar, &m->act_global, NG, c->global_size, &max_act, &max_col, &max_w);
    if (c->n_local > 0) plan_backbone(m, ar, &m->act_local, c->n_local * B, c->local_size, &max_act, &max_col, &max_w);
    m->f = take(ar, (size_t)D * NS);
    for (int l = 0; l < 3; l++) {
        int out = m->proj[l].out;
        m->proj_act.y[l] = l < 2 ? take(ar, (size_t)out * NS) : NULL;
        m->proj_act.a[l] = take(ar, (size_t)out * NS);
        m->proj_act.mean[l] = l < 2 ? take(ar, out) : NULL;
        m->proj_act.rstd[l] = l < 2 ? take(ar, out) : NULL;
    }
    m->h = m->proj_act.a[2];
    m->pre_y = take(ar, (size_t)d * NS);
    m->pre_mean = take(ar, d);
    m->pre_rstd = take(ar, d);
    m->pred_y = take(ar, (size_t)Hd * NS);
    m->pred_a = take(ar, (size_t)Hd * NS);
    m->pred_mean = take(ar, Hd);
    m->pred_rstd = take(ar, Hd);
    m->p = take(ar, (size_t)d * NS);
    m->c = take(ar, (size_t)K * d);
    m->c_inv_norm = take(ar, K);
    m->u_dir = take(ar, (size_t)NG * d);
    m->u_dir_den = take(ar, NG);
    m->u_pred = take(ar, (size_t)NS * d);
    m->u_pred_den = take(ar, NS);
    m->ut = take(ar, (size_t)NG * d);
    m->ut_den = take(ar, NG);
    m->z_dir = take(ar, (size_t)NG * K);
    m->z_pred = take(ar, (size_t)NS * K);
    m->q = take(ar, (size_t)NG * K);
    m->zt = take(ar, (size_t)NG * K);
    m->labels = (int32_t *)take(ar, NG);
    m->counts = (int32_t *)take(ar, K);
    m->row_loss = (double *)take(ar, 2 * (size_t)(NG + NS));
    m->r = take(ar, K);
    m->lower = take(ar, K);
    m->higher = take(ar, K);
    for (int i = 0; i < 3; i++) m->dbuf[i] = take(ar, max_act);
    int widest = D > Hd ? D : Hd;
    widest = widest > d ? widest : d;
    size_t head = (size_t)widest * NS, kd = (size_t)K * d;
    for (int i = 0; i < 3; i++) m->dhead[i] = take(ar, head);
    m->dhead[3] = take(ar, kd > head ? kd : head);       /* also holds the centroid gradient dc */
    m->col = take(ar, max_col * m->max_threads);
    m->slots = take(ar, max_w * EXCB_SLOTS);
}

int excb_build(ExcbModel *m, const ExcbConfig *cfg) {
    memset(m, 0, sizeof *m);
    m->cfg = *cfg;
    if (cfg->n_global < 2 || cfg->batch < 2 || cfg->K < 2 || cfg->n_stages < 1 || cfg->n_stages > EXCB_MAX_STAGES) {
        fprintf(stderr, "excb: config %s: need n_global >= 2, batch >= 2, K >= 2, 1..4 stages\n", cfg->name);
        return -1;
    }
    excb_set_threads(cfg->threads);
    m->max_threads = max_threads();
    build_structure(m);
    m->params = xmalloc(sizeof(real) * m->n_params);
    m->grads = xmalloc(sizeof(real) * m->n_params);
    m->momentum = xmalloc(sizeof(real) * m->n_params);
    m->teacher = xmalloc(sizeof(real) * m->n_params);
    m->running = xmalloc(sizeof(real) * m->n_running);
    m->teacher_running = xmalloc(sizeof(real) * m->n_running);
    m->s = xmalloc(sizeof(real) * cfg->K);
    Arena count = {0};
    plan_arena(m, &count);
    m->arena_floats = count.used;
    m->arena = xmalloc(sizeof(real) * m->arena_floats);
    Arena real = {m->arena, 0};
    plan_arena(m, &real);
    init_params(m);
    return 0;
}

void excb_free(ExcbModel *m) {
    free(m->params); free(m->grads); free(m->momentum); free(m->teacher);
    free(m->running); free(m->teacher_running); free(m->s); free(m->arena);
    memset(m, 0, sizeof *m);
}

/* ================================================================================================
 * 9. The network's forward and backward passes, assembled from the operators above
 * ================================================================================================ */
#define PT(base, idx) ((base) + m->tensors[(idx)].offset)     /* tensor idx inside a buffer   */

/* conv + BN (+ReLU), one unit; `residual` (may alias ua->a) is added before the ReLU */
static void unit_forward(ExcbModel *m, const real *P, real *run, ExcbUnitActs *ua, const ExcbConvBN *u,
                         const real *x, int H, int W, const real *residual, int relu) {
    conv2d_forward(ua->y, x, PT(P, u->w), m->col, ua->N, u->cin, H, W, u->cout, u->k, u->stride, u->pad);
    batchnorm_forward(ua->a, ua->mean, ua->rstd, run + u->stats, run + u->stats + u->cout, ua->y,
                      PT(P, u->gamma), PT(P, u->beta), residual, relu, u->cout, ua->N * ua->H * ua->W,
                      (real)m->cfg.bn_eps, (real)m->cfg.bn_momentum);
}

/* x_nchw (N, C, H, H) -> features f[:, col0 .. col0+N) of a (D, ldf) matrix. P: the parameters to
 * use (student or teacher), run: their BN running statistics. */
static void backbone_forward(ExcbModel *m, const real *P, real *run, ExcbBackboneActs *A,
                             const real *x_nchw, real *f, int ldf) {
    int N = A->N, H = A->H, C = m->cfg.in_ch;
    for (int n = 0; n < N; n++)                     /* (N, C, H, W) -> (C, N, H, W)             */
        for (int c = 0; c < C; c++)
            memcpy(A->x + ((size_t)c * N + n) * H * H, x_nchw + ((size_t)n * C + c) * H * H, sizeof(real) * H * H);
    unit_forward(m, P, run, &A->stem, &m->stem, A->x, H, H, NULL, 1);
    const real *cur = A->stem.a;
    int h = A->stem.H;
    if (m->cfg.stem == EXCB_STEM_IMAGENET) {
        maxpool_forward(A->pool, A->pool_arg, A->stem.a, m->stem.cout, N, h, h);
        cur = A->pool;
        h = conv_out(h, 3, 2, 1);
    }
    for (int b = 0; b < m->n_blocks; b++) {
        const ExcbResBlock *blk = &m->blocks[b];
        const real *in = cur;
        int hin = h;
        if (blk->has_down)              /* shortcut BN(conv1x1/s(x)), added by the last main unit */
            unit_forward(m, P, run, &A->down[b], &blk->down, in, hin, hin, NULL, 0);
        for (int j = 0; j < blk->n_main; j++) {
            int is_last = j == blk->n_main - 1;
            const real *res = !is_last ? NULL : blk->has_down ? A->down[b].a : in;
            unit_forward(m, P, run, &A->main[b][j], &blk->main[j], cur, h, h, res, 1);
            cur = A->main[b][j].a;
            h = A->main[b][j].H;
        }
    }
    avgpool_forward(f, ldf, cur, m->D, N, h * h);
}

/* Backward of backbone_forward for the STUDENT parameters: df is (D, ldf), columns [0, N) of it
 * belong to this call. Parameter gradients are added to m->grads. */
static void backbone_backward(ExcbModel *m, ExcbBackboneActs *A, const real *df, int ldf) {
    const real *P = m->params;
    real *G = m->grads;
    int N = A->N;
    real *dcur = m->dbuf[0], *dy = m->dbuf[1], *dx = m->dbuf[2];
    const ExcbResBlock *lastblk = &m->blocks[m->n_blocks - 1];
    const ExcbUnitActs *out = &A->main[m->n_blocks - 1][lastblk->n_main - 1];
    avgpool_backward(dcur, df, ldf, m->D, N, out->H * out->W);
    for (int b = m->n_blocks - 1; b >= 0; b--) {
        const ExcbResBlock *blk = &m->blocks[b];
        const ExcbUnitActs *ua_last = &A->main[b][blk->n_main - 1];
        const real *block_in;
        int hin;
        if (b > 0) {
            const ExcbUnitActs *prev = &A->main[b - 1][m->blocks[b - 1].n_main - 1];
            block_in = prev->a;
            hin = prev->H;
        } else if (m->cfg.stem == EXCB_STEM_IMAGENET) {
            block_in = A->pool;
            hin = conv_out(A->stem.H, 3, 2, 1);
        } else {
            block_in = A->stem.a;
            hin = A->stem.H;
        }
        /* main path, last unit to first: BN(+ReLU gate) backward, then conv backward */
        for (int j = blk->n_main - 1; j >= 0; j--) {
            const ExcbConvBN *u = &blk->main[j];
            const ExcbUnitActs *ua = &A->main[b][j];
            const real *dout = j == blk->n_main - 1 ? dcur : dx;
            batchnorm_backward(dy, PT(G, u->gamma), PT(G, u->beta), dout, ua->a, ua->y, ua->mean, ua->rstd,
                               PT(P, u->gamma), 1, u->cout, N * ua->H * ua->W);
            const real *xin = j > 0 ? A->main[b][j - 1].a : block_in;
            int h = j > 0 ? A->main[b][j - 1].H : hin;
            conv2d_backward(dx, PT(G, u->w), dy, xin, PT(P, u->w), m->col, m->slots, N, u->cin, h, h,
                            u->cout, u->k, u->stride, u->pad);
        }
        /* dx now holds the main path's gradient w.r.t. the block input; add the shortcut's */
        size_t n_in = (size_t)blk->main[0].cin * N * hin * hin;
        if (blk->has_down) {
            const ExcbConvBN *u = &blk->down;
            const ExcbUnitActs *ua = &A->down[b];
            batchnorm_backward(dy, PT(G, u->gamma), PT(G, u->beta), dcur, ua_last->a, ua->y, ua->mean,
                               ua->rstd, PT(P, u->gamma), 1, u->cout, N * ua->H * ua->W);
            conv2d_backward(dcur, PT(G, u->w), dy, block_in, PT(P, u->w), m->col, m->slots, N, u->cin,
                            hin, hin, u->cout, u->k, u->stride, u->pad);
#pragma omp parallel for schedule(static)
            for (size_t i = 0; i < n_in; i++) dx[i] += dcur[i];
        } else {                             /* identity: the ReLU-gated output gradient itself  */
            const real *o = ua_last->a;
#pragma omp parallel for schedule(static)
            for (size_t i = 0; i < n_in; i++) dx[i] += o[i] > 0.0f ? dcur[i] : 0.0f;
        }
        real *t = dcur;                      /* the block input's gradient is the next dcur      */
        dcur = dx;
        dx = t;
    }
    const real *dstem = dcur;               /* gradient w.r.t. the stem's output (after the pool)  */
    if (m->cfg.stem == EXCB_STEM_IMAGENET) {
        maxpool_backward(dx, dcur, A->pool_arg, m->stem.cout, N, A->stem.H, A->stem.W);
        dstem = dx;
    }
    real *dys = dy;                         /* dy is free here in both cases                     */
    batchnorm_backward(dys, PT(G, m->stem.gamma), PT(G, m->stem.beta), dstem, A->stem.a, A->stem.y,
                       A->stem.mean, A->stem.rstd, PT(P, m->stem.gamma), 1, m->stem.cout,
                       N * A->stem.H * A->stem.W);
    conv2d_backward(NULL, PT(G, m->stem.w), dys, A->x, PT(P, m->stem.w), m->col, m->slots, N,
                    m->cfg.in_ch, A->H, A->H, m->stem.cout, m->stem.k, m->stem.stride, m->stem.pad);
}

/* Linear (+BN+ReLU) layer of a head: x (in, N) -> y (out, N) pre-BN and a (out, N) */
static void head_layer_forward(ExcbModel *m, const real *P, real *run, const ExcbLinear *L,
                               const real *x, real *y, real *a, real *mean, real *rstd, int N) {
    if (!L->has_bn) {
        linear_forward(a, x, PT(P, L->w), PT(P, L->b), L->in, L->out, N);
        return;
    }
    linear_forward(y, x, PT(P, L->w), PT(P, L->b), L->in, L->out, N);
    batchnorm_forward(a, mean, rstd, run + L->stats, run + L->stats + L->out, y, PT(P, L->gamma),
                      PT(P, L->beta), NULL, 1, L->out, N, (real)m->cfg.bn_eps, (real)m->cfg.bn_momentum);
}

static void head_layer_backward(ExcbModel *m, const ExcbLinear *L, real *dx, real *da, real *tmp,
                                const real *x, const real *y, const real *a, const real *mean,
                                const real *rstd, int N) {
    const real *P = m->params;
    real *G = m->grads;
    const real *dy = da;
    if (L->has_bn) {
        batchnorm_backward(tmp, PT(G, L->gamma), PT(G, L->beta), da, a, y, mean, rstd, PT(P, L->gamma), 1, L->out, N);
        dy = tmp;
    }
    linear_backward(dx, PT(G, L->w), PT(G, L->b), dy, x, PT(P, L->w), L->in, L->out, N);
}

/* E0 over N rows of f (D, N) -> h (d, N) = m->h */
static void projector_forward(ExcbModel *m, const real *P, real *run, const real *f, int N) {
    ExcbMLPActs *A = &m->proj_act;
    head_layer_forward(m, P, run, &m->proj[0], f, A->y[0], A->a[0], A->mean[0], A->rstd[0], N);
    head_layer_forward(m, P, run, &m->proj[1], A->a[0], A->y[1], A->a[1], A->mean[1], A->rstd[1], N);
    head_layer_forward(m, P, run, &m->proj[2], A->a[1], NULL, A->a[2], NULL, NULL, N);
}

/* ================================================================================================
 * 10. One training step (trainer.py L84-132; METHOD.md 1.12)
 * ================================================================================================
 *  teacher (no grad):  zt = cos(normalize(g_T(f_T(X_g))), c_T)         E0, E1     (Vg*B, K)
 *                      q  = softmax(clamp(boost(B(zt; r))) / tau_t)      E4..E6, r from steps < t
 *  student:            h  = g_S(cat(f_S(X_g), f_S(X_l)))                E0         (d, NS)
 *                      z_dir  = cos(normalize(h[:, global]), c)          E1         (Vg*B, K)
 *                      z_pred = cos(normalize(P(BN(h))), stopgrad(c))    E10        (NS, K)
 *  loss and dL/dz:     E7, E8, E11
 *  cluster sizes:      E2, E3 from argmax q
 *  backward:           E12, E13 and the network; SGD (E14); teacher EMA (E9)
 */
static void centroids_forward(ExcbModel *m, const real *P) {
    weightnorm_forward(m->c, m->c_inv_norm, PT(P, m->centroids), m->cfg.K, m->cfg.d);
}

double excb_forward_loss(ExcbModel *m, const real *xg, const real *xl, ExcbStepStats *st) {
    const ExcbConfig *c = &m->cfg;
    int B = c->batch, NG = c->n_global * B, NL = c->n_local * B, NS = NG + NL, K = c->K, d = c->d;
    real eps = (real)c->norm_eps;
    /* --- teacher: global crops only, its own parameters and BN statistics, no gradient ----------- */
    backbone_forward(m, m->teacher, m->teacher_running, &m->act_global, xg, m->f, NG);
    projector_forward(m, m->teacher, m->teacher_running, m->f, NG);
    centroids_forward(m, m->teacher);
    l2norm_rows_forward(m->ut, m->ut_den, m->h, NG, d, NG, eps);
    matmul_tiled('N', 'T', NG, K, d, 1.0f, m->ut, d, m->c, d, 0.0f, m->zt, K);      /* E1 */
    balance_factors(m->r, m->lower, m->higher, m->s, K, c->zero_jitter, c->seed, m->step);  /* E3', E4 */
    balanced_targets(m->q, m->labels, NULL, m->zt, m->lower, m->higher, NG, K, c->boost, c->clamp, c->tau_t);
    /* --- student: backbone once per resolution (A20), heads over all crops ------------------------- */
    backbone_forward(m, m->params, m->running, &m->act_global, xg, m->f, NS);
    if (NL > 0) backbone_forward(m, m->params, m->running, &m->act_local, xl, m->f + NG, NS);
    projector_forward(m, m->params, m->running, m->f, NS);
    centroids_forward(m, m->params);
    l2norm_rows_forward(m->u_dir, m->u_dir_den, m->h, NS, d, NG, eps);            /* global rows */
    matmul_tiled('N', 'T', NG, K, d, 1.0f, m->u_dir, d, m->c, d, 0.0f, m->z_dir, K);
    /* predictor E10a: BN(d) without ReLU, Linear-BN-ReLU, Linear */
    batchnorm_forward(m->pre_y, m->pre_mean, m->pre_rstd, m->running + m->pred_bn_stats,
                      m->running + m->pred_bn_stats + d, m->h, PT(m->params, m->pred_bn_gamma),
                      PT(m->params, m->pred_bn_beta), NULL, 0, d, NS, (real)c->bn_eps, (real)c->bn_momentum);
    head_layer_forward(m, m->params, m->running, &m->pred[0], m->pre_y, m->pred_y, m->pred_a, m->pred_mean,
                       m->pred_rstd, NS);
    head_layer_forward(m, m->params, m->running, &m->pred[1], m->pred_a, NULL, m->p, NULL, NULL, NS);
    l2norm_rows_forward(m->u_pred, m->u_pred_den, m->p, NS, d, NS, eps);           /* E10b       */
    matmul_tiled('N', 'T', NS, K, d, 1.0f, m->u_pred, d, m->c, d, 0.0f, m->z_pred, K);
    /* --- the loss; z_dir and z_pred become dL/dz ------------------------------------------------- */
    double loss = excb_loss_forward_backward(m->z_dir, m->z_pred, m->row_loss, m->q, c->n_global,
                                             c->n_local, B, K, c->tau_s);
    if (st) st->loss = loss;
    return loss;
}

void excb_update_cluster_sizes(ExcbModel *m, ExcbStepStats *st) {
    int NG = m->cfg.n_global * m->cfg.batch;
    cluster_size_update(m->s, m->counts, m->labels, NG, m->cfg.K, m->cfg.m_s, m->cfg.fp16_count_term);
    if (st) {                                              /* A21 collapse monitors             */
        st->unique_labels = st->empty_clusters = 0;
        for (int k = 0; k < m->cfg.K; k++) {
            st->unique_labels += m->counts[k] > 0;
            st->empty_clusters += m->counts[k] == 0;
        }
    }
}

void excb_backward(ExcbModel *m) {
    const ExcbConfig *c = &m->cfg;
    int B = c->batch, NG = c->n_global * B, NL = c->n_local * B, NS = NG + NL, K = c->K, d = c->d;
    real eps = (real)c->norm_eps;
    const real *P = m->params;
    real *G = m->grads;
    memset(G, 0, sizeof(real) * m->n_params);              /* the one place gradients are zeroed */
    /* Four scratch buffers of (max(D, Hd, d), NS) floats (the fourth also holds dc (K, d)). Each is
       reused as soon as the gradient it holds has been consumed; the comments say what is where. */
    real *s0 = m->dhead[0], *s1 = m->dhead[1], *s2 = m->dhead[2], *s3 = m->dhead[3];
    real *dh = s1;                                         /* dL/dh (d, NS): both branches add here */
    /* E13: only the direct global rows reach the centroids: dc = dz_dir^T u_dir, then weight norm */
    matmul_tiled('T', 'N', K, d, NG, 1.0f, m->z_dir, K, m->u_dir, d, 0.0f, s3, d);            /* s3 = dc */
    weightnorm_backward(PT(G, m->centroids), s3, m->c, m->c_inv_norm, K, d);
    /* E12, direct rows: du = dz_dir c, dh[:, global] = (I - u u^T) du / ||h||; local columns 0 */
    matmul_tiled('N', 'N', NG, d, K, 1.0f, m->z_dir, K, m->c, d, 0.0f, s0, d);               /* s0 = du */
    l2norm_rows_backward(dh, NS, s0, m->u_dir, m->u_dir_den, d, NG, eps, 0);
    for (int j = 0; j < d; j++) memset(dh + (size_t)j * NS + NG, 0, sizeof(real) * NL);
    /* E12, predictor rows (c is a constant here): du = dz_pred c, dp = (I - u u^T) du / ||p|| */
    matmul_tiled('N', 'N', NS, d, K, 1.0f, m->z_pred, K, m->c, d, 0.0f, s0, d);              /* s0 = du */
    l2norm_rows_backward(s2, NS, s0, m->u_pred, m->u_pred_den, d, NS, eps, 0);               /* s2 = dp */
    /* predictor E10a, last layer to first, then its input BN(d); the result adds into dh */
    head_layer_backward(m, &m->pred[1], s0, s2, NULL, m->pred_a, NULL, m->p, NULL, NULL, NS);  /* s0 = d pred_a */
    head_layer_backward(m, &m->pred[0], s2, s0, s3, m->pre_y, m->pred_y, m->pred_a, m->pred_mean,
                        m->pred_rstd, NS);                                                    /* s2 = d BN(h) */
    batchnorm_backward(s3, PT(G, m->pred_bn_gamma), PT(G, m->pred_bn_beta), s2, m->pre_y, m->h, m->pre_mean,
                       m->pre_rstd, PT(P, m->pred_bn_gamma), 0, d, NS);                        /* s3 = dh_pred */
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < (size_t)d * NS; i++) dh[i] += s3[i];
    /* projector E0, last layer to first: df (D, NS) */
    ExcbMLPActs *A = &m->proj_act;
    head_layer_backward(m, &m->proj[2], s0, dh, NULL, A->a[1], NULL, A->a[2], NULL, NULL, NS);      /* s0 = d a1 */
    head_layer_backward(m, &m->proj[1], s2, s0, s3, A->a[0], A->y[1], A->a[1], A->mean[1], A->rstd[1], NS); /* s2 = d a0 */
    real *df = s1;                                         /* dh is consumed: df (D, NS) goes here */
    head_layer_backward(m, &m->proj[0], df, s2, s3, m->f, A->y[0], A->a[0], A->mean[0], A->rstd[0], NS);
    /* backbone: local crops, then global crops; both add into the same parameter gradients */
    if (NL > 0) backbone_backward(m, &m->act_local, df + NG, NS);
    backbone_backward(m, &m->act_global, df, NS);
}

void excb_update(ExcbModel *m, ExcbStepStats *st) {
    const ExcbConfig *c = &m->cfg;
    long t = m->step + 1;                                   /* the scheduler counts from 1        */
    double lr = lr_at(t, c->total_steps, c->warmup_steps, c->lr_peak, c->lr_min_factor);
    double wdc = centroid_wd_at(t, c->total_steps, c->weight_decay, c->centroid_wd_boost);
    double mom = ema_momentum_at(m->step, c->total_steps, c->ema_start);
    switch (c->optimizer) {                 /* LARS and AdamW (ViT) would be further cases        */
    case EXCB_OPT_SGD: sgd_update(m, lr, c->weight_decay, wdc); break;                  /* E14  */
    }
    ema_update(m->teacher, m->params, m->n_params, mom);                            /* E9         */
    m->step++;
    if (st) {
        st->lr = (float)lr;
        st->wd_centroid = (float)wdc;
        st->ema_m = (float)mom;
    }
}

int excb_step(ExcbModel *m, const real *xg, const real *xl, ExcbStepStats *st) {
    ExcbStepStats local;
    if (!st) st = &local;
    double loss = excb_forward_loss(m, xg, xl, st);
    if (!isfinite(loss)) return EXCB_EXIT_DIVERGED;        /* nothing updated: the state is intact */
    excb_update_cluster_sizes(m, st);                       /* after the loss, as the code does   */
    excb_backward(m);
    excb_update(m, st);
    return 0;
}

/* ================================================================================================
 * 11. Benchmark: the whole step on fixed random inputs
 * ================================================================================================ */
static double conv_macs(const ExcbConvBN *u, int H) {
    int Ho = conv_out(H, u->k, u->stride, u->pad);
    return (double)Ho * Ho * u->cout * u->cin * u->k * u->k;
}

static double backbone_macs(const ExcbModel *m, int H) {
    double s = conv_macs(&m->stem, H);
    int h = conv_out(H, m->stem.k, m->stem.stride, m->stem.pad);
    if (m->cfg.stem == EXCB_STEM_IMAGENET) h = conv_out(h, 3, 2, 1);
    for (int b = 0; b < m->n_blocks; b++) {
        const ExcbResBlock *blk = &m->blocks[b];
        if (blk->has_down) s += conv_macs(&blk->down, h);
        for (int j = 0; j < blk->n_main; j++) {
            s += conv_macs(&blk->main[j], h);
            h = conv_out(h, blk->main[j].k, blk->main[j].stride, blk->main[j].pad);
        }
    }
    return s;
}

/* MACs of what this code computes per sample (the unused direct local rows are not computed) */
void excb_count_macs(const ExcbModel *m, double *teacher_fwd, double *student_fwd) {
    const ExcbConfig *c = &m->cfg;
    double Hd = c->hidden, d = c->d, D = m->D, K = c->K;
    double proj = D * Hd + Hd * Hd + Hd * d, pred = d * Hd + Hd * d, cos = K * d;
    double bg = backbone_macs(m, c->global_size), bl = backbone_macs(m, c->local_size);
    *teacher_fwd = c->n_global * (bg + proj + cos);
    *student_fwd = c->n_global * bg + c->n_local * bl + (c->n_global + c->n_local) * (proj + pred + cos)
                 + c->n_global * cos;
}

#ifndef TESTING
static double now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + 1e-9 * ts.tv_nsec;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* ================================================================================================
 * 12. Command line
 * ================================================================================================ */
static void usage(FILE *f) {
    fprintf(f,
        "usage: excb <command> [options]\n"
        "\n"
        "commands:\n"
        "  bench     time the whole training step on fixed random inputs\n"
        "            --config NAME   resnet20s (default), resnet18, resnet50, tiny, tiny50\n"
        "            --global-size G --local-size L --batch B --K K --threads T\n"
        "            --reps R (3)  --min-seconds S (4): each repetition runs >= S seconds\n"
        "  train, eval   not yet: data sets and the training loop arrive with issues 3 and 4\n"
        "\n"
        "  --help     this text        --version   version and build\n"
        "exit codes: 0 ok, 64 usage, 65 bad data, 66 missing input, 70 internal, 71 out of memory,\n"
        "            74 I/O, 3 diverged (NaN/Inf loss)\n");
}

static int parse_int(const char *opt, const char *v, int lo, int hi) {
    char *end;
    long x = strtol(v ? v : "", &end, 10);
    if (!v || *end || x < lo || x > hi) {
        fprintf(stderr, "excb: %s needs an integer in [%d, %d], got '%s'\n", opt, lo, hi, v ? v : "");
        exit(EXCB_EXIT_USAGE);
    }
    return (int)x;
}

static int cmd_bench(int argc, char **argv) {
    const char *name = "resnet20s";
    int G = 0, L = -1, B = 0, K = 0, T = 0, reps = 3, min_s = 4;
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--config") && v) { name = v; i++; }
        else if (!strcmp(a, "--global-size")) { G = parse_int(a, v, 4, 4096); i++; }
        else if (!strcmp(a, "--local-size")) { L = parse_int(a, v, 0, 4096); i++; }
        else if (!strcmp(a, "--batch")) { B = parse_int(a, v, 2, 1 << 20); i++; }
        else if (!strcmp(a, "--K")) { K = parse_int(a, v, 2, 1 << 24); i++; }
        else if (!strcmp(a, "--threads")) { T = parse_int(a, v, 1, 4096); i++; }
        else if (!strcmp(a, "--reps")) { reps = parse_int(a, v, 1, 1000); i++; }
        else if (!strcmp(a, "--min-seconds")) { min_s = parse_int(a, v, 0, 100000); i++; }
        else { fprintf(stderr, "excb bench: unknown option '%s'\n", a); return EXCB_EXIT_USAGE; }
    }
    ExcbConfig cfg;
    if (excb_config_named(&cfg, name)) {
        fprintf(stderr, "excb bench: unknown config '%s' (resnet20s, resnet18, resnet50, tiny, tiny50)\n", name);
        return EXCB_EXIT_USAGE;
    }
    if (G) cfg.global_size = G;
    if (L == 0) cfg.n_local = 0;
    else if (L > 0) cfg.local_size = L;
    if (B) cfg.batch = B;
    if (K) cfg.K = K;
    if (T) cfg.threads = T;
    ExcbModel m;
    if (excb_build(&m, &cfg)) return EXCB_EXIT_USAGE;
    size_t ng = (size_t)cfg.n_global * cfg.batch * cfg.in_ch * cfg.global_size * cfg.global_size;
    size_t nl = (size_t)cfg.n_local * cfg.batch * cfg.in_ch * cfg.local_size * cfg.local_size;
    real *xg = xmalloc(sizeof(real) * ng), *xl = xmalloc(sizeof(real) * (nl + 1));
    for (size_t i = 0; i < ng; i++) xg[i] = excb_normal(cfg.seed, EXCB_RNG_BENCH, 0, 0, i);
    for (size_t i = 0; i < nl; i++) xl[i] = excb_normal(cfg.seed, EXCB_RNG_BENCH, 1, 0, i);
    double tm, sm;
    excb_count_macs(&m, &tm, &sm);
    double flop_per_img = 2 * tm + 6 * sm;      /* teacher forward + student forward and backward */
    ExcbStepStats st;
    double t0 = now_seconds();
    if (excb_step(&m, xg, xl, &st)) { fprintf(stderr, "excb bench: loss diverged\n"); return EXCB_EXIT_DIVERGED; }
    double warm = now_seconds() - t0;
    int steps = warm > 0 ? (int)ceil(min_s / warm) : 1;
    if (steps < 1) steps = 1;
    double ips[1000];
    for (int r = 0; r < reps; r++) {
        t0 = now_seconds();
        for (int s = 0; s < steps; s++)
            if (excb_step(&m, xg, xl, &st)) { fprintf(stderr, "excb bench: loss diverged\n"); return EXCB_EXIT_DIVERGED; }
        ips[r] = cfg.batch * steps / (now_seconds() - t0);
    }
    double sorted[1000];
    memcpy(sorted, ips, sizeof(double) * reps);
    qsort(sorted, reps, sizeof(double), cmp_double);
    double med = reps % 2 ? sorted[reps / 2] : 0.5 * (sorted[reps / 2 - 1] + sorted[reps / 2]);
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    printf("excb bench %s G=%d L=%d B=%d K=%d threads=%d: %.2f img/s [%.2f–%.2f] | %.1f GFLOP/s "
           "(%.4f GFLOP/img) | peak %.1f MiB | %d reps x %d steps | loss %.5f\n",
           cfg.name, cfg.global_size, cfg.n_local ? cfg.local_size : 0, cfg.batch, cfg.K, m.max_threads,
           med, sorted[0], sorted[reps - 1], flop_per_img * med / 1e9, flop_per_img / 1e9,
           ru.ru_maxrss / 1024.0, reps, steps, st.loss);
    free(xg);
    free(xl);
    excb_free(&m);
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 2) { usage(stderr); return EXCB_EXIT_USAGE; }
    if (!strcmp(argv[1], "--help") || !strcmp(argv[1], "-h")) { usage(stdout); return 0; }
    if (!strcmp(argv[1], "--version")) {
        printf("excb %s (GEMM: %s, threads: %s)\n", EXCB_VERSION,
#ifdef EXCB_USE_DNNL
               "oneDNN sgemm",
#else
               "naive",
#endif
#ifdef _OPENMP
               "OpenMP"
#else
               "none"
#endif
        );
        return 0;
    }
    if (!strcmp(argv[1], "bench")) return cmd_bench(argc - 2, argv + 2);
    if (!strcmp(argv[1], "train") || !strcmp(argv[1], "eval")) {
        fprintf(stderr, "excb %s: not yet implemented (data sets: issue 3; training loop and evaluation: issue 4)\n", argv[1]);
        return EXCB_EXIT_USAGE;
    }
    fprintf(stderr, "excb: unknown command '%s'\n", argv[1]);
    usage(stderr);
    return EXCB_EXIT_USAGE;
}
#endif /* TESTING */
