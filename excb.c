/*
 * excb.c: ExCB in one C file, read top to bottom beside the paper.
 *
 * What this is. A reference implementation, in FP32 on the CPU, of
 *   "Efficient Unsupervised Visual Representation Learning with Explicit Cluster Balancing"
 *   (I. Maniadis Metaxas, G. Tzimiropoulos, I. Patras; ECCV 2024; arXiv 2407.11168),
 * exactly as the official PyTorch code (ManiadisG/ExCB @ 7750bd5) runs it. Equation labels E0..E14
 * are this project's own; paper_notes.md defines each, maps it to this file and says where the code
 * departs from the paper (audit items A1..A25). The paper's own equation numbers are UNCONFIRMED.
 *
 * What is here, in the method's order: the ResNet backbone (E-), projector (E0), weight-normalised
 * cosine prototypes (E1), cluster-size estimation (E2, E3, E3'), balancing (E4) with the code's
 * boost and clamp (E5), and behind the same seam the baselines' rules (none, DINO's centering, SwAV's
 * Sinkhorn-Knopp with its queue), teacher targets, student predictions and the loss (E6..E8) and
 * its backward (E11..E13), then the teacher EMA (E9), SGD with its weight-decay groups (E14) and
 * schedules (Appendix A), one training step; then the data sets (IDX, CIFAR, STL-10, PNG/JPEG
 * folders), the multi-crop views (paper_notes.md §8b) in PIL's arithmetic, a threaded deterministic
 * loader; then whole runs: the config and presets, k-means centroid initialisation (paper_notes.md §9),
 * checkpoints, weights in and out as safetensors under PyTorch's names (section 16b), the training loop,
 * evaluation (k-NN, linear probe, clustering metrics), benchmarks and
 * the command line, whose `excb audit` runs the grids that put the paper's small-batch claim and the
 * audit items A1..A25 to the test. Every forward sits right above its backward.
 *
 * The GPU. The network and the step (sections 9-10) call every operator through a table, m->ops:
 * excb_cpu_ops here, or excb_cuda_ops in excb_kernels.cu, whose entries take the same arguments and
 * work on device memory. The method is written once, here; the .cu file holds only the operators.
 *
 * Several processes (section 10b): mpirun -np R ./excb train runs R data-parallel ranks over Open MPI,
 * each with its share of every batch, and excb train --chunks R computes the same shares in one process,
 * the reference mpirun must equal bit for bit.
 *
 * What is not here yet: BF16 on the GPU, ViT, LARS and AdamW, GPU twins of DINO, SwAV, CoKe, CARP and
 * mvbt (and of A4's audit counts). Several GPUs (NCCL, or ranks sharing one through MPI) are built
 * but have not run on a GPU yet.
 *
 * Build and test:  make && make test.  Benchmarks:  ./excb bench --config resnet20s [--device cuda],
 * ./excb bench-data --data fashion-mnist
 *
 * Determinism: every result is a pure function of the seed and the inputs, whatever the number
 * of threads. Work is cut into tiles whose size depends on tensor shapes only; a thread computes
 * whole tiles; sums across tiles run in a fixed order. No atomics, no -ffast-math.
 */
#define _DEFAULT_SOURCE  /* M_PI, clock_gettime and getrusage under -std=c11                   */
#include "excb.h"        /* ExcbConfig, ExcbModel, the operator declarations, exit codes        */
#include <tgmath.h>      /* sqrt, exp, log, cos, fabs, fmax: type-generic, real for real args  */
#include <float.h>       /* FLT_EPSILON: CARP clamps at float32's machine epsilon               */
#include <stdarg.h>      /* va_list, for the parameter table's names                            */
#include <stdio.h>       /* fprintf, printf                                                     */
#include <stdlib.h>      /* aligned_alloc, free, strtol                                         */
#include <string.h>      /* memset, memcpy, strcmp                                              */
#include <time.h>        /* clock_gettime, for the benchmark                                    */
#include <sys/resource.h>    /* getrusage: peak resident memory                                 */
#include <sys/stat.h>    /* stat: files and folders of a data set                               */
#include <sys/mman.h>    /* mmap: CIFAR and STL-10 files are mapped, not copied                 */
#include <fcntl.h>       /* open, O_NONBLOCK: inputs are type-checked before they are read      */
#include <sys/file.h>    /* flock: one process at a time in a run directory                      */
#include <signal.h>      /* SIGINT, SIGTERM, SIGHUP: a run stops with a checkpoint              */
#include <stdatomic.h>   /* atomic_int: which signal came first, whichever thread took it       */
#include <unistd.h>      /* close, readlink                                                     */
#include <dirent.h>      /* opendir, readdir: image folders                                     */
#include <errno.h>       /* errno, for messages naming why a file could not be opened           */
#include <ctype.h>       /* isxdigit: the escapes of quoted config values                       */
#include <strings.h>     /* strcasecmp: image extensions                                        */
#include <setjmp.h>      /* libjpeg reports fatal errors by a callback that must not return    */
#include <pthread.h>     /* the loader's worker threads                                         */
#include <sys/wait.h>    /* waitpid: excb plot runs gnuplot                                     */
#include <ucontext.h>    /* section 10b: the chunked reference's shares run as coroutines       */
#include <zlib.h>        /* gzip: IDX files ship gzipped                                        */
#include <png.h>         /* libpng's simplified API                                             */
#include <jpeglib.h>     /* libjpeg(-turbo)                                                     */
#include <jansson.h>     /* JSON: the safetensors header (section 16b)                          */
#ifdef _OPENMP
#include <omp.h>         /* omp_get_thread_num, omp_set_num_threads                            */
#endif
#if defined(EXCB_USE_DNNL) && defined(EXCB_REAL_DOUBLE)
#undef EXCB_USE_DNNL           /* oneDNN has no double GEMM: the float64 build uses the naive one */
#endif
#ifdef EXCB_MPI
#include <mpi.h>         /* section 10b: Open MPI, one rank per process (mpirun -np R)          */
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

/* n compute threads (0: OpenMP's default). More threads than cores only slow the step down (each
   waits for a core at every barrier; 1000 threads on 2 cores: 60x slower), and results do not depend
   on the count, so a larger n runs on every core instead, said once on stderr. */
void excb_set_threads(int n) {
#ifdef _OPENMP
    long cores = sysconf(_SC_NPROCESSORS_ONLN);
    static int said;
    if (cores > 0 && n > cores) {
        if (!said++) fprintf(stderr, "excb: threads = %d is more than this machine's %ld cores: using %ld\n", n, cores, cores);
        n = (int)cores;
    }
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

/* zeroed, with the same out-of-memory policy */
static void *xcalloc(size_t n, size_t size) {
    void *p = xmalloc(n * size);
    memset(p, 0, n * size);
    return p;
}

static int imin(int a, int b) { return a < b ? a : b; }
static double now_seconds(void);     /* section 13: the monotonic clock */

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

/* Every key word goes through the chain: an earlier version XORed mix64(counter) onto the chained key,
   so two counters of one stream always differed by the same XOR mask (u1 < 1/2 could force u2 >= 1/2);
   the counting tests of the view probabilities caught it. */
uint64_t excb_hash(uint64_t seed, uint64_t purpose, uint64_t a, uint64_t b, uint64_t counter) {
    return mix64(mix64(mix64(mix64(mix64(seed ^ 0x6578636200000000ull) ^ purpose) ^ a) ^ b) ^ counter);
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
   forms the cluster-size update term in float16 (A4); GCC's _Float16 converts exactly so. Compilers
   without _Float16 on this target (clang 14, used for the fuzz build) get the same rounding in
   software: scale so that one binary16 quantum is 1, round to nearest even, scale back (all exact). */
float excb_round_fp16_soft(float x) {
    float a = fabsf(x);
    if (isnan(x) || isinf(x)) return x;
    if (a >= 65520.0f) return copysignf(INFINITY, x);      /* halfway above 65504 rounds to infinity */
    int e;
    frexpf(a, &e);                                          /* a = m 2^e, m in [0.5, 1)              */
    float quantum = a < 0x1p-14f ? 0x1p-24f : ldexpf(1.0f, e - 11);   /* 11 significant bits       */
    return copysignf(nearbyintf(a / quantum) * quantum, x);
}

float excb_round_fp16(float x) {
#ifdef __FLT16_MAX__
    return (float)(_Float16)x;
#else
    return excb_round_fp16_soft(x);
#endif
}

/* ================================================================================================
 * Matrix multiplication
 * ================================================================================================
 * C = alpha op(A) op(B) + beta C, row-major, op(A) M x K, op(B) K x N (the BLAS convention with
 * rows and columns swapped). matmul_naive is the definition; matmul calls oneDNN's sgemm when the
 * build has it (85-95 % of the FMA peak on the project's 2-core machine even on skinny convolution shapes, and
 * unaffected by OPENBLAS_CORETYPE, which these machines set to Haswell and which halves OpenBLAS).
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
 * 1. Backbone (paper_notes.md §1): convolution, BatchNorm (+ReLU, +residual), max-pool, average-pool
 * ================================================================================================
 * A ResNet is a stem, stages of residual blocks, and a global average pool to a D-vector per image.
 * BasicBlock: y = relu(BN(conv3x3(relu(BN(conv3x3(x))))) + shortcut(x)); Bottleneck has three
 * convs (1x1, 3x3 with the stride, 1x1 to 4x width). The shortcut is x, or BN(conv1x1/stride(x)).
 * BatchNorm runs in train mode (batch statistics) for student and teacher alike (A13) and keeps
 * running statistics for evaluation. The backbone runs once per crop resolution (A20).
 */

/* --- convolution --------------------------------------------------------------------------------
 * On the CPU the backbone's activations are channels-last, the layout oneDNN's direct convolutions
 * run fastest in: x is (N, H, W, Cin), y is (N, Ho, Wo, Cout). The weights stay (Cout, Cin, k, k), as
 * PyTorch stores them (the parameter table, checkpoints):
 *   y[n, oy, ox, co] = sum_{ci,i,j} w[co, ci, i, j] x[n, oy*s - p + i, ox*s - p + j, ci]
 * and its backward
 *   dx[n, iy, ix, ci] = sum w[co, ci, i, j] dy[n, oy, ox, co]  over the (oy, ox, i, j) reaching (iy, ix)
 *   dw[co, ci, i, j] += sum_{n,oy,ox} dy[n, oy, ox, co] x[n, oy*s - p + i, ox*s - p + j, ci]
 * The work is cut by the layer's shape alone, never by the thread count: y and dx in chunks of whole
 * images, each chunk computed by one thread; dw in EXCB_SLOTS slots, each the sum over a fixed run of
 * images, the slots then added in slot order. So the result is bitwise the same for any number of
 * threads. Two engines compute a chunk or a slot:
 *   - oneDNN's convolution primitives (forward, backward data, backward weights), when the build has
 *     oneDNN and reals are float32: direct convolutions in blocked registers, no im2col. A layer's
 *     primitives are made once, the first time its shape is used, for one thread each; the weights
 *     are reordered into the primitives' blocked format once per call, dw back out of it.
 *   - im2col + GEMM (the float64 build, a build without oneDNN, a shape oneDNN has no fast kernel for):
 *     col (chunk*Ho*Wo, Cin*k*k) holds one patch per row, and y_chunk = col . w^T.
 */
static int conv_out(int H, int k, int stride, int pad) { return (H + 2 * pad - k) / stride + 1; }

/* im2col's chunk: as many images as fit a 1 MiB panel, a function of the layer shape only */
static int conv_chunk_images(int Cin, int k, int HoWo, int N) {
    long per_image = (long)Cin * k * k * HoWo;
    long nc = EXCB_COL_PANEL / per_image;
    if (nc < 1) nc = 1;
    if (nc > N) nc = N;
    return (int)nc;
}

/* col[(n*Ho + oy)*Wo + ox, (c*k + i)*k + j] = x[n0 + n, oy*s - p + i, ox*s - p + j, c] (0 outside) */
static void im2col(real *col, const real *x, int n0, int nc, int Cin, int H, int W, int k, int stride,
                   int pad, int Ho, int Wo) {
    int CKK = Cin * k * k;
    for (int n = 0; n < nc; n++)
        for (int oy = 0; oy < Ho; oy++)
            for (int ox = 0; ox < Wo; ox++) {
                real *row = col + ((size_t)(n * Ho + oy) * Wo + ox) * CKK;
                for (int i = 0; i < k; i++)
                    for (int j = 0; j < k; j++) {
                        int iy = oy * stride - pad + i, ix = ox * stride - pad + j;
                        int inside = iy >= 0 && iy < H && ix >= 0 && ix < W;
                        const real *px = x + (((size_t)(n0 + n) * H + iy) * W + ix) * Cin;
                        for (int c = 0; c < Cin; c++) row[(c * k + i) * k + j] = inside ? px[c] : 0.0f;
                    }
            }
}

/* col2im: the adjoint of im2col, dx[n0 + n, iy, ix, c] += dcol[(n, oy, ox), (c, i, j)] */
static void col2im(real *dx, const real *col, int n0, int nc, int Cin, int H, int W, int k, int stride,
                   int pad, int Ho, int Wo) {
    int CKK = Cin * k * k;
    for (int n = 0; n < nc; n++)
        for (int oy = 0; oy < Ho; oy++)
            for (int ox = 0; ox < Wo; ox++) {
                const real *row = col + ((size_t)(n * Ho + oy) * Wo + ox) * CKK;
                for (int i = 0; i < k; i++)
                    for (int j = 0; j < k; j++) {
                        int iy = oy * stride - pad + i, ix = ox * stride - pad + j;
                        if (iy < 0 || iy >= H || ix < 0 || ix >= W) continue;
                        real *px = dx + (((size_t)(n0 + n) * H + iy) * W + ix) * Cin;
                        for (int c = 0; c < Cin; c++) px[c] += row[(c * k + i) * k + j];
                    }
            }
}

static void conv2d_forward_im2col(real *y, const real *x, const real *w, real *col, int N, int Cin, int H,
                                  int W, int Cout, int k, int stride, int pad) {
    int Ho = conv_out(H, k, stride, pad), Wo = conv_out(W, k, stride, pad), HoWo = Ho * Wo, CKK = Cin * k * k;
    int direct = (k == 1 && stride == 1 && pad == 0);       /* 1x1/1: x itself is col          */
    int nc = conv_chunk_images(Cin, k, HoWo, N), n_chunks = (N + nc - 1) / nc;
    size_t panel = (size_t)CKK * nc * HoWo;
#pragma omp parallel for schedule(static)
    for (int ch = 0; ch < n_chunks; ch++) {
        int n0 = ch * nc, cnt = imin(nc, N - n0);
        const real *A = x + (size_t)n0 * HoWo * Cin;
        if (!direct) {
            real *p = col + (size_t)thread_id() * panel;     /* this worker's panel               */
            im2col(p, x, n0, cnt, Cin, H, W, k, stride, pad, Ho, Wo);
            A = p;
        }
        /* y_chunk (cnt*HoWo, Cout) = col (cnt*HoWo, CKK) . w^T (CKK, Cout) */
        matmul('N', 'T', cnt * HoWo, Cout, CKK, 1.0f, A, CKK, w, CKK, 0.0f, y + (size_t)n0 * HoWo * Cout, Cout);
    }
}

static void conv2d_backward_im2col(real *dx, real *dw, const real *dy, const real *x, const real *w, real *col,
                                   real *slots, int N, int Cin, int H, int W, int Cout, int k, int stride, int pad) {
    int Ho = conv_out(H, k, stride, pad), Wo = conv_out(W, k, stride, pad), HoWo = Ho * Wo, CKK = Cin * k * k;
    int direct = (k == 1 && stride == 1 && pad == 0);
    int nc = conv_chunk_images(Cin, k, HoWo, N), n_chunks = (N + nc - 1) / nc;
    size_t panel = (size_t)CKK * nc * HoWo, nw = (size_t)Cout * CKK;
#pragma omp parallel for schedule(static)
    for (int s = 0; s < EXCB_SLOTS; s++) {
        real *dws = slots + (size_t)s * nw;
        memset(dws, 0, sizeof(real) * nw);
        real *p = col + (size_t)thread_id() * panel;
        for (int ch = s * n_chunks / EXCB_SLOTS; ch < (s + 1) * n_chunks / EXCB_SLOTS; ch++) {
            int n0 = ch * nc, cnt = imin(nc, N - n0), P = cnt * HoWo;
            const real *dyc = dy + (size_t)n0 * HoWo * Cout, *A = x + (size_t)n0 * HoWo * Cin;
            if (!direct) {
                im2col(p, x, n0, cnt, Cin, H, W, k, stride, pad, Ho, Wo);
                A = p;
            }
            /* dw_slot (Cout, CKK) += dy_chunk^T (Cout, P) . col (P, CKK) */
            matmul('T', 'N', Cout, CKK, P, 1.0f, dyc, Cout, A, CKK, 1.0f, dws, CKK);
            if (!dx) continue;
            real *dxc = dx + (size_t)n0 * H * W * Cin;
            if (direct) {   /* dx_chunk (P, Cin) = dy_chunk (P, Cout) . w (Cout, Cin)             */
                matmul('N', 'N', P, Cin, Cout, 1.0f, dyc, Cout, w, CKK, 0.0f, dxc, Cin);
                continue;
            }
            matmul('N', 'N', P, CKK, Cout, 1.0f, dyc, Cout, w, CKK, 0.0f, p, CKK);   /* dcol      */
            memset(dxc, 0, sizeof(real) * cnt * H * W * Cin);
            col2im(dx, p, n0, cnt, Cin, H, W, k, stride, pad, Ho, Wo);
        }
    }
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < nw; i++) {
        real acc = 0.0f;
        for (int s = 0; s < EXCB_SLOTS; s++) acc += slots[(size_t)s * nw + i];
        dw[i] += acc;
    }
}

#ifdef EXCB_USE_DNNL
/* --- the oneDNN engine ---------------------------------------------------------------------------
 * A layer (its shape and N) gets, once: forward and backward-data primitives for a full chunk and for
 * the last, shorter one; backward-weights primitives for the two slot sizes (floor and ceiling of
 * N / EXCB_SLOTS); and three reorders, w (oihw) -> the forward's and the backward-data's weight
 * formats, and the summed slots -> oihw, added into dw (a sum post-op). Both primitives of a kind are
 * made with the same weight format (the first one's choice), so one reordered copy serves both and the
 * slots add element by element. A layer whose forward or backward weights have no fast kernel runs on
 * im2col; one whose backward data has none (the stem, with 1 or 3 input channels) runs on oneDNN
 * where no dx is asked for (the stem's input is the image).
 * Primitives are made with one OpenMP thread and run inside our own parallel loops, where oneDNN runs
 * them on the calling thread: the thread count cannot reach their arithmetic. Each thread keeps its
 * own memory objects and scratchpad per primitive (made on its first use), so nothing is allocated
 * in a step after the first. */
#define EXCB_DNNL_THREADS 64           /* threads with memory objects of their own; more make them per use */
#define EXCB_CONV_CHUNK (1 << 18)      /* a chunk's input + output, floats (1 MiB: one core's L2)      */
enum { DNNL_FWD, DNNL_BWD_DATA, DNNL_BWD_WEIGHTS };

typedef struct {
    int kind, n;                       /* n images; n == 0: not needed                                 */
    dnnl_primitive_t prim;
    dnnl_memory_desc_t md[3], scratch_md;   /* its three arguments in conv_run's order                */
    dnnl_memory_t mem[EXCB_DNNL_THREADS][4];
} DnnlConv;

typedef struct DnnlLayer {
    int N, Cin, H, W, Cout, k, stride, pad;  /* the key                                              */
    int fast, fast_dx;                 /* 0: oneDNN has no fast kernel for y, dw / dx: im2col runs it   */
    int nc;                            /* images per chunk of y and dx                                  */
    DnnlConv fwd[2], bwd_data[2], bwd_weights[2];     /* [0] full chunk / smaller slot, [1] the other */
    dnnl_memory_desc_t w_md[3];        /* the weight format of each kind's primitives                   */
    dnnl_primitive_t to_w[2], from_dw; /* w -> w_md[DNNL_FWD], w_md[DNNL_BWD_DATA]; w_md[DNNL_BWD_WEIGHTS] -> dw */
    dnnl_memory_t to_w_mem[2][2], from_dw_mem[2];
    struct DnnlLayer *next;
} DnnlLayer;

static struct {
    pthread_mutex_t mu;
    dnnl_engine_t engine;
    dnnl_stream_t stream;
    DnnlLayer *layers;
    real *w_blocked, *dw_slots;        /* shared by every layer: convolutions run one at a time        */
    size_t w_blocked_floats, dw_slots_floats;
    void *scratch[EXCB_DNNL_THREADS];  /* each thread's scratchpad, shared by its primitives          */
    size_t scratch_bytes[EXCB_DNNL_THREADS];
} dnnl_conv = {.mu = PTHREAD_MUTEX_INITIALIZER};

static void dnnl_check(dnnl_status_t s, const char *what) {
    if (s == dnnl_success) return;
    fprintf(stderr, "excb: oneDNN failed in %s (status %d)\n", what, (int)s);
    exit(EXCB_EXIT_SOFTWARE);
}

/* one primitive of a layer for n images; w_fixed: the weight format to use (NULL: oneDNN's choice,
   recorded in L->w_md[kind]). Returns 0, or -1 when oneDNN offers only its reference code for it. */
static int dnnl_conv_make(DnnlLayer *L, DnnlConv *c, int kind, int n, const dnnl_memory_desc_t *w_fixed) {
    c->kind = kind;
    c->n = n;
    if (n == 0) return 0;
    int Ho = conv_out(L->H, L->k, L->stride, L->pad), Wo = conv_out(L->W, L->k, L->stride, L->pad);
    dnnl_dims_t xd = {n, L->Cin, L->H, L->W}, wd = {L->Cout, L->Cin, L->k, L->k}, yd = {n, L->Cout, Ho, Wo};
    dnnl_dims_t st = {L->stride, L->stride}, pd = {L->pad, L->pad};
    dnnl_memory_desc_t xmd, wmd, ymd;
    dnnl_check(dnnl_memory_desc_init_by_tag(&xmd, 4, xd, dnnl_f32, dnnl_nhwc), "memory_desc");
    dnnl_check(dnnl_memory_desc_init_by_tag(&ymd, 4, yd, dnnl_f32, dnnl_nhwc), "memory_desc");
    if (w_fixed) wmd = *w_fixed;
    else dnnl_check(dnnl_memory_desc_init_by_tag(&wmd, 4, wd, dnnl_f32, dnnl_format_tag_any), "memory_desc");
    dnnl_primitive_attr_t attr;
    dnnl_check(dnnl_primitive_attr_create(&attr), "attr");
    dnnl_check(dnnl_primitive_attr_set_scratchpad_mode(attr, dnnl_scratchpad_mode_user), "attr");
    dnnl_convolution_desc_t fd, bd;
    dnnl_primitive_desc_t hint = NULL, p = NULL;
    dnnl_check(dnnl_convolution_forward_desc_init(&fd, dnnl_forward_training, dnnl_convolution_direct, &xmd, &wmd,
                                                  NULL, &ymd, st, pd, pd), "convolution_forward_desc");
    dnnl_status_t s = dnnl_primitive_desc_create(&hint, &fd, attr, dnnl_conv.engine, NULL);
    if (s == dnnl_success && kind == DNNL_BWD_DATA) {
        dnnl_check(dnnl_convolution_backward_data_desc_init(&bd, dnnl_convolution_direct, &xmd, &wmd, &ymd, st, pd, pd),
                   "convolution_backward_data_desc");
        s = dnnl_primitive_desc_create(&p, &bd, attr, dnnl_conv.engine, hint);
    } else if (s == dnnl_success && kind == DNNL_BWD_WEIGHTS) {
        dnnl_check(dnnl_convolution_backward_weights_desc_init(&bd, dnnl_convolution_direct, &xmd, &wmd, NULL, &ymd,
                                                               st, pd, pd), "convolution_backward_weights_desc");
        s = dnnl_primitive_desc_create(&p, &bd, attr, dnnl_conv.engine, hint);
    } else {
        p = hint;
        hint = NULL;
    }
    dnnl_primitive_attr_destroy(attr);
    if (hint) dnnl_primitive_desc_destroy(hint);
    const char *impl = "none";
    if (s == dnnl_success) dnnl_primitive_desc_query(p, dnnl_query_impl_info_str, 0, &impl);
    if (s != dnnl_success || !strncmp(impl, "ref", 3)) {
        if (p) dnnl_primitive_desc_destroy(p);
        return -1;
    }
    static const dnnl_query_t q[3][3] = {
        {dnnl_query_src_md, dnnl_query_weights_md, dnnl_query_dst_md},            /* x, w, y       */
        {dnnl_query_diff_dst_md, dnnl_query_weights_md, dnnl_query_diff_src_md},  /* dy, w, dx     */
        {dnnl_query_src_md, dnnl_query_diff_dst_md, dnnl_query_diff_weights_md},  /* x, dy, dw     */
    };
    for (int i = 0; i < 3; i++) c->md[i] = *dnnl_primitive_desc_query_md(p, q[kind][i], 0);
    c->scratch_md = *dnnl_primitive_desc_query_md(p, dnnl_query_scratchpad_md, 0);
    if (!w_fixed) L->w_md[kind] = c->md[kind == DNNL_BWD_WEIGHTS ? 2 : 1];
    const dnnl_memory_desc_t *w_now = &c->md[kind == DNNL_BWD_WEIGHTS ? 2 : 1];
    int same = dnnl_memory_desc_equal(w_now, &L->w_md[kind]);
    if (same) dnnl_check(dnnl_primitive_create(&c->prim, p), "primitive_create");
    dnnl_primitive_desc_destroy(p);
    return same ? 0 : -1;
}

/* the reorder from a to b (add: b += reorder(a)) and its two memory objects */
static void dnnl_reorder_make(dnnl_primitive_t *r, dnnl_memory_t mem[2], const dnnl_memory_desc_t *a,
                              const dnnl_memory_desc_t *b, int add) {
    dnnl_primitive_attr_t attr;
    dnnl_post_ops_t po;
    dnnl_check(dnnl_primitive_attr_create(&attr), "attr");
    if (add) {
        dnnl_check(dnnl_post_ops_create(&po), "post_ops");
        dnnl_check(dnnl_post_ops_append_sum(po, 1.0f), "post_ops sum");
        dnnl_check(dnnl_primitive_attr_set_post_ops(attr, po), "attr post_ops");
        dnnl_post_ops_destroy(po);
    }
    dnnl_primitive_desc_t p;
    dnnl_check(dnnl_reorder_primitive_desc_create(&p, a, dnnl_conv.engine, b, dnnl_conv.engine, attr), "reorder");
    dnnl_check(dnnl_primitive_create(r, p), "reorder primitive");
    dnnl_primitive_desc_destroy(p);
    dnnl_primitive_attr_destroy(attr);
    dnnl_check(dnnl_memory_create(&mem[0], a, dnnl_conv.engine, DNNL_MEMORY_NONE), "memory");
    dnnl_check(dnnl_memory_create(&mem[1], b, dnnl_conv.engine, DNNL_MEMORY_NONE), "memory");
}

static real *grow_floats(real *buf, size_t *have, size_t want) {
    if (want <= *have) return buf;
    free(buf);
    *have = want;
    return xmalloc(sizeof(real) * want);
}

static void dnnl_layer_make(DnnlLayer *L) {
    int Ho = conv_out(L->H, L->k, L->stride, L->pad), Wo = conv_out(L->W, L->k, L->stride, L->pad);
    long per_image = (long)L->Cin * L->H * L->W + (long)L->Cout * Ho * Wo;
    L->nc = (int)(EXCB_CONV_CHUNK / per_image < 1 ? 1 : EXCB_CONV_CHUNK / per_image);
    if (L->nc > L->N) L->nc = L->N;
    int lo = L->N / EXCB_SLOTS, hi = (L->N + EXCB_SLOTS - 1) / EXCB_SLOTS;
    /* the first of each kind with the smaller slot first: lo may be 0 (N < EXCB_SLOTS) */
    int w0 = lo ? lo : hi, w1 = lo && hi != lo ? hi : 0;
    int bad = dnnl_conv_make(L, &L->fwd[0], DNNL_FWD, L->nc, NULL)
              || dnnl_conv_make(L, &L->fwd[1], DNNL_FWD, L->N % L->nc, &L->w_md[DNNL_FWD])
              || dnnl_conv_make(L, &L->bwd_weights[0], DNNL_BWD_WEIGHTS, w0, NULL)
              || dnnl_conv_make(L, &L->bwd_weights[1], DNNL_BWD_WEIGHTS, w1, &L->w_md[DNNL_BWD_WEIGHTS]);
    L->fast = !bad;
    L->fast_dx = L->fast && !dnnl_conv_make(L, &L->bwd_data[0], DNNL_BWD_DATA, L->nc, NULL)
                 && !dnnl_conv_make(L, &L->bwd_data[1], DNNL_BWD_DATA, L->N % L->nc, &L->w_md[DNNL_BWD_DATA]);
    if (!L->fast) return;              /* (the primitives made so far stay unused: a few per odd shape) */
    dnnl_memory_desc_t plain;
    dnnl_dims_t wd = {L->Cout, L->Cin, L->k, L->k};
    dnnl_check(dnnl_memory_desc_init_by_tag(&plain, 4, wd, dnnl_f32, dnnl_oihw), "memory_desc");
    for (int kind = DNNL_FWD; kind <= (L->fast_dx ? DNNL_BWD_DATA : DNNL_FWD); kind++) {
        dnnl_reorder_make(&L->to_w[kind], L->to_w_mem[kind], &plain, &L->w_md[kind], 0);
        size_t wf = dnnl_memory_desc_get_size(&L->w_md[kind]) / sizeof(real);
        dnnl_conv.w_blocked = grow_floats(dnnl_conv.w_blocked, &dnnl_conv.w_blocked_floats, wf);
    }
    dnnl_reorder_make(&L->from_dw, L->from_dw_mem, &L->w_md[DNNL_BWD_WEIGHTS], &plain, 1);
    size_t wf = dnnl_memory_desc_get_size(&L->w_md[DNNL_BWD_WEIGHTS]) / sizeof(real);
    dnnl_conv.dw_slots = grow_floats(dnnl_conv.dw_slots, &dnnl_conv.dw_slots_floats, wf * EXCB_SLOTS);
}

/* the layer of this shape, made on first use (outside any parallel region); NULL: use im2col (for
   the backward with dx: when its backward data has no fast kernel) */
static DnnlLayer *dnnl_layer(int N, int Cin, int H, int W, int Cout, int k, int stride, int pad, int with_dx) {
    pthread_mutex_lock(&dnnl_conv.mu);
    DnnlLayer *L = dnnl_conv.layers;
    while (L && !(L->N == N && L->Cin == Cin && L->H == H && L->W == W && L->Cout == Cout && L->k == k
                  && L->stride == stride && L->pad == pad))
        L = L->next;
    if (!L) {
        if (!dnnl_conv.engine) {
            dnnl_check(dnnl_engine_create(&dnnl_conv.engine, dnnl_cpu, 0), "engine_create");
            dnnl_check(dnnl_stream_create(&dnnl_conv.stream, dnnl_conv.engine, dnnl_stream_default_flags), "stream");
        }
        L = xcalloc(1, sizeof *L);
        *L = (DnnlLayer){.N = N, .Cin = Cin, .H = H, .W = W, .Cout = Cout, .k = k, .stride = stride, .pad = pad};
        int threads = max_threads();
        omp_set_num_threads(1);        /* oneDNN sizes a primitive's work split by the threads it sees */
        dnnl_layer_make(L);
        omp_set_num_threads(threads);
        L->next = dnnl_conv.layers;
        dnnl_conv.layers = L;
    }
    pthread_mutex_unlock(&dnnl_conv.mu);
    return L->fast && (!with_dx || L->fast_dx) ? L : NULL;
}

/* run c on the calling thread: a0, a1 -> a2 in the order of dnnl_conv_make's table */
static void dnnl_conv_run(DnnlConv *c, const real *a0, const real *a1, real *a2) {
    static const int arg[3][3] = {{DNNL_ARG_SRC, DNNL_ARG_WEIGHTS, DNNL_ARG_DST},
                                  {DNNL_ARG_DIFF_DST, DNNL_ARG_WEIGHTS, DNNL_ARG_DIFF_SRC},
                                  {DNNL_ARG_SRC, DNNL_ARG_DIFF_DST, DNNL_ARG_DIFF_WEIGHTS}};
    int t = thread_id(), own = t < EXCB_DNNL_THREADS;
    dnnl_memory_t tmp[4] = {0}, *mem = own ? c->mem[t] : tmp;
    void *ptr[3] = {(void *)a0, (void *)a1, a2};
    size_t sb = (dnnl_memory_desc_get_size(&c->scratch_md) + 63) / 64 * 64;
    void *scratch = NULL;
    if (own && sb > dnnl_conv.scratch_bytes[t]) {     /* this thread's, grown in the first steps only */
        free(dnnl_conv.scratch[t]);
        dnnl_conv.scratch[t] = aligned_alloc(64, sb);
        dnnl_conv.scratch_bytes[t] = sb;
    }
    if (own) scratch = dnnl_conv.scratch[t];
    else if (sb) scratch = aligned_alloc(64, sb);
    for (int i = 0; i < 3; i++) {
        if (!mem[i]) dnnl_check(dnnl_memory_create(&mem[i], &c->md[i], dnnl_conv.engine, DNNL_MEMORY_NONE), "memory");
        dnnl_check(dnnl_memory_set_data_handle(mem[i], ptr[i]), "set_data_handle");
    }
    if (!mem[3]) dnnl_check(dnnl_memory_create(&mem[3], &c->scratch_md, dnnl_conv.engine, DNNL_MEMORY_NONE), "memory");
    dnnl_check(dnnl_memory_set_data_handle(mem[3], scratch), "set_data_handle");
    dnnl_exec_arg_t args[4] = {{arg[c->kind][0], mem[0]}, {arg[c->kind][1], mem[1]}, {arg[c->kind][2], mem[2]},
                               {DNNL_ARG_SCRATCHPAD, mem[3]}};
    dnnl_check(dnnl_primitive_execute(c->prim, dnnl_conv.stream, 4, args), "execute");
    if (!own) {
        for (int i = 0; i < 4; i++) dnnl_memory_destroy(tmp[i]);
        free(scratch);
    }
}

/* b = reorder(a) (or b += for from_dw), on every thread: a permutation, so any thread count agrees */
static void dnnl_reorder_run(dnnl_primitive_t r, dnnl_memory_t mem[2], const real *a, real *b) {
    dnnl_check(dnnl_memory_set_data_handle(mem[0], (void *)a), "set_data_handle");
    dnnl_check(dnnl_memory_set_data_handle(mem[1], b), "set_data_handle");
    dnnl_exec_arg_t args[2] = {{DNNL_ARG_FROM, mem[0]}, {DNNL_ARG_TO, mem[1]}};
    dnnl_check(dnnl_primitive_execute(r, dnnl_conv.stream, 2, args), "reorder");
    dnnl_check(dnnl_stream_wait(dnnl_conv.stream), "stream_wait");
}
#endif

void conv2d_forward(real *y, const real *x, const real *w, real *col, int N, int Cin, int H,
                    int W, int Cout, int k, int stride, int pad) {
#ifdef EXCB_USE_DNNL
    DnnlLayer *L = dnnl_layer(N, Cin, H, W, Cout, k, stride, pad, 0);
    if (L) {
        size_t in = (size_t)H * W * Cin, out = (size_t)conv_out(H, k, stride, pad) * conv_out(W, k, stride, pad) * Cout;
        dnnl_reorder_run(L->to_w[DNNL_FWD], L->to_w_mem[DNNL_FWD], w, dnnl_conv.w_blocked);
        int n_chunks = (N + L->nc - 1) / L->nc;
#pragma omp parallel for schedule(static)
        for (int ch = 0; ch < n_chunks; ch++) {
            int n0 = ch * L->nc;
            dnnl_conv_run(&L->fwd[N - n0 < L->nc], x + n0 * in, dnnl_conv.w_blocked, y + n0 * out);
        }
        return;
    }
#endif
    conv2d_forward_im2col(y, x, w, col, N, Cin, H, W, Cout, k, stride, pad);
}

/* dw += the weight gradient; dx = the input gradient (dx may be NULL: the input image) */
void conv2d_backward(real *dx, real *dw, const real *dy, const real *x, const real *w,
                     real *col, real *slots, int N, int Cin, int H, int W, int Cout, int k,
                     int stride, int pad) {
#ifdef EXCB_USE_DNNL
    DnnlLayer *L = dnnl_layer(N, Cin, H, W, Cout, k, stride, pad, dx != NULL);
    if (L) {
        size_t in = (size_t)H * W * Cin, out = (size_t)conv_out(H, k, stride, pad) * conv_out(W, k, stride, pad) * Cout;
        size_t nw = dnnl_memory_desc_get_size(&L->w_md[DNNL_BWD_WEIGHTS]) / sizeof(real);
        real *sl = dnnl_conv.dw_slots;
        if (dx) dnnl_reorder_run(L->to_w[DNNL_BWD_DATA], L->to_w_mem[DNNL_BWD_DATA], w, dnnl_conv.w_blocked);
        int n_chunks = dx ? (N + L->nc - 1) / L->nc : 0;
        /* one loop over the dw slots and the dx chunks, each item one thread's: which thread takes an item
           (dynamic: the slots, N / EXCB_SLOTS images each, go first, then the chunks fill in) cannot
           change what it computes or where it goes */
#pragma omp parallel for schedule(dynamic, 1)
        for (int it = 0; it < EXCB_SLOTS + n_chunks; it++) {
            if (it >= EXCB_SLOTS) {
                int n0 = (it - EXCB_SLOTS) * L->nc;
                dnnl_conv_run(&L->bwd_data[N - n0 < L->nc], dy + n0 * out, dnnl_conv.w_blocked, dx + n0 * in);
                continue;
            }
            int s = it, n0 = s * N / EXCB_SLOTS, n1 = (s + 1) * N / EXCB_SLOTS;
            if (n1 == n0) memset(sl + s * nw, 0, sizeof(real) * nw);
            else dnnl_conv_run(&L->bwd_weights[n1 - n0 != L->bwd_weights[0].n], x + n0 * in, dy + n0 * out, sl + s * nw);
        }
#pragma omp parallel for schedule(static)
        for (size_t i = 0; i < nw; i++) {     /* slot 0 <- slot 0 + slot 1 + ... in slot order */
            real acc = sl[i];
            for (int s = 1; s < EXCB_SLOTS; s++) acc += sl[s * nw + i];
            sl[i] = acc;
        }
        dnnl_reorder_run(L->from_dw, L->from_dw_mem, sl, dw);        /* dw += the sum, as oihw */
        return;
    }
#endif
    conv2d_backward_im2col(dx, dw, dy, x, w, col, slots, N, Cin, H, W, Cout, k, stride, pad);
}

/* --- BatchNorm in train mode, with the ReLU and the residual add fused in --------------------------
 *   mean_c = (1/n) sum y,   var_c = (1/n) sum (y - mean)^2  (biased),   rstd_c = 1/sqrt(var_c + eps)
 *   out = act( gamma_c (y - mean_c) rstd_c + beta_c  [+ residual] ),  act = ReLU or identity
 * computed as out = y*scale + shift with scale = gamma*rstd, shift = beta - mean*scale (as
 * PyTorch's CPU kernel does). Running statistics (evaluation only) use the unbiased variance:
 *   run_mean = (1-m) run_mean + m mean,   run_var = (1-m) run_var + m var n/(n-1)
 * Two layouts of the same NHW x C values, named by channels_last:
 *   0: (C, NHW), channel c one contiguous run (the heads' feature-major (out, N); the GPU's backbone).
 *      Sums run in double over 8 independent lanes per channel (vectorisable, fixed order).
 *   1: (NHW, C), a pixel's channels contiguous (the CPU's backbone). The NHW pixels are cut into
 *      EXCB_BN_RUNS fixed runs; each run sums every channel in double, pixel after pixel (vectorised
 *      across channels), and the runs are added in run order. Fixed by the shape, not the threads.
 */
#define EXCB_BN_RUNS 16

/* the runs' partial sums: 2 doubles per (run, channel), plus scale and shift per channel. Grown on
   first use by a shape, then reused: BatchNorm runs one layer at a time. */
static double *bn_scratch(int C) {
    static double *buf;
    static size_t have;
    size_t want = (size_t)(2 * EXCB_BN_RUNS + 2) * C;
    if (want > have) {
        free(buf);
        buf = xmalloc(sizeof(double) * want);
        have = want;
    }
    return buf;
}

/* The two sums of pixels [p0, p1) of (NHW, C) into s[c], s2[c]: of y and y^2 (dout == NULL), or of
   g = dout*[out > 0] (the ReLU's gate when relu) and g * (y - mu) * rs (the backward's two sums). Eight
   channels at a time, over four accumulators each (pixel p into accumulator (p - p0) % 4: vectorised
   across the channels, and no single long dependency chain), added as (a0 + a1) + (a2 + a3). Whole
   groups of four pixels of eight channels run in GCC's portable vector types (written plainly, GCC
   leaves the backward's select scalar); the rest, with the same operations, lane by lane. */
typedef float v8f __attribute__((vector_size(32)));
typedef int v8i __attribute__((vector_size(32)));
typedef double v8d __attribute__((vector_size(64)));

static void bn_run_sums(double *s, double *s2, const real *y, const real *dout, const real *out, const real *mu,
                        const real *rs, int relu, int C, long p0, long p1) {
    for (int c0 = 0; c0 < C; c0 += 8) {
        int cw = imin(8, C - c0);
        double a[4][8] = {{0}}, b[4][8] = {{0}};
        real m8[8] = {0}, r8[8] = {0};
        for (int l = 0; l < cw && dout; l++) {
            m8[l] = mu[c0 + l];
            r8[l] = rs[c0 + l];
        }
        long p = p0;
        if (cw == 8 && sizeof(real) == 4) {
            v8f m, r;
            memcpy(&m, m8, sizeof m);
            memcpy(&r, r8, sizeof r);
            v8i keep_all = relu ? (v8i){0} : ~(v8i){0};
            v8d A[4] = {{0}}, Bv[4] = {{0}};
            for (; p + 4 <= p1; p += 4)
                for (int u = 0; u < 4; u++) {
                    size_t i = (size_t)(p + u) * C + c0;
                    v8f yv;
                    memcpy(&yv, y + i, sizeof yv);
                    v8d t1, t2;
                    if (!dout) {
                        t1 = __builtin_convertvector(yv, v8d);
                        t2 = t1 * t1;
                    } else {
                        v8f d, o;
                        memcpy(&d, dout + i, sizeof d);
                        memcpy(&o, out + i, sizeof o);
                        v8i keep = (o > (v8f){0}) | keep_all;             /* -1 where the gate is open */
                        t1 = __builtin_convertvector((v8f)((v8i)d & keep), v8d);
                        t2 = t1 * __builtin_convertvector((yv - m) * r, v8d);
                    }
                    A[u] += t1;
                    Bv[u] += t2;
                }
            for (int u = 0; u < 4; u++)
                for (int l = 0; l < 8; l++) {
                    a[u][l] = A[u][l];
                    b[u][l] = Bv[u][l];
                }
        }
        for (; p < p1; p++)
            for (int l = 0; l < cw; l++) {
                size_t i = (size_t)p * C + c0 + l;
                double t1 = y[i], t2 = t1 * t1;
                if (dout) {
                    real g = (!relu || out[i] > 0.0f) ? dout[i] : 0.0f;
                    t1 = g;
                    t2 = (double)g * ((y[i] - m8[l]) * r8[l]);
                }
                a[(p - p0) % 4][l] += t1;
                b[(p - p0) % 4][l] += t2;
            }
        for (int l = 0; l < cw; l++) {
            s[c0 + l] = (a[0][l] + a[1][l]) + (a[2][l] + a[3][l]);
            s2[c0 + l] = (b[0][l] + b[1][l]) + (b[2][l] + b[3][l]);
        }
    }
}

/* sum[c] and sum2[c] over all NHW pixels: the fixed runs in parallel, then added in run order */
static void bn_sums_channels_last(double *sum, double *sum2, const real *y, const real *dout, const real *out,
                                  const real *mu, const real *rs, int relu, int C, int NHW) {
    double *part = bn_scratch(C);
#pragma omp parallel for schedule(static)
    for (int r = 0; r < EXCB_BN_RUNS; r++)
        bn_run_sums(part + (size_t)2 * r * C, part + (size_t)(2 * r + 1) * C, y, dout, out, mu, rs, relu, C,
                    (long)r * NHW / EXCB_BN_RUNS, (long)(r + 1) * NHW / EXCB_BN_RUNS);
    for (int c = 0; c < C; c++) {
        double a = 0, b = 0;
        for (int r = 0; r < EXCB_BN_RUNS; r++) {
            a += part[(size_t)2 * r * C + c];
            b += part[(size_t)(2 * r + 1) * C + c];
        }
        sum[c] = a;
        sum2[c] = b;
    }
}

/* The same two sums in the feature-major layout (C, NHW): channel by channel in parallel, over 8 lanes
   (pixel i into lane i % 8, the tail into lane 0), the lanes added in order. */
static void bn_sums_feature_major(double *sum, double *sum2, const real *y, const real *dout, const real *out,
                                  const real *mu, const real *rs, int relu, int C, int NHW) {
#pragma omp parallel for schedule(static)
    for (int c = 0; c < C; c++) {
        size_t o = (size_t)c * NHW;
        double s[8] = {0}, s2[8] = {0};
        int whole = NHW / 8 * 8;
        if (!dout)
            for (int i = 0; i < NHW; i++) {
                double v = y[o + i];
                s[i < whole ? i % 8 : 0] += v;
                s2[i < whole ? i % 8 : 0] += v * v;
            }
        else
            for (int i = 0; i < NHW; i++) {
                real g = (!relu || out[o + i] > 0.0f) ? dout[o + i] : 0.0f;
                s[i < whole ? i % 8 : 0] += g;
                s2[i < whole ? i % 8 : 0] += (double)g * ((y[o + i] - mu[c]) * rs[c]);
            }
        double a = 0, b = 0;
        for (int l = 0; l < 8; l++) {
            a += s[l];
            b += s2[l];
        }
        sum[c] = a;
        sum2[c] = b;
    }
}

/* either layout's sums: of y and y^2 (dout NULL; the forward), or the backward's two */
static void bn_sums(double *sum, double *sum2, const real *y, const real *dout, const real *out, const real *mu,
                    const real *rs, int relu, int C, int NHW, int channels_last) {
    if (channels_last) bn_sums_channels_last(sum, sum2, y, dout, out, mu, rs, relu, C, NHW);
    else bn_sums_feature_major(sum, sum2, y, dout, out, mu, rs, relu, C, NHW);
}

/* out = act(y*scale + shift [+ residual]) in either layout; residual may alias out */
static void bn_apply(real *out, const real *y, const real *scale, const real *shift, const real *residual,
                     int relu, int C, int NHW, int channels_last) {
    if (channels_last) {
#pragma omp parallel for schedule(static)
        for (long p = 0; p < NHW; p++) {
            const real *yp = y + (size_t)p * C, *rp = residual ? residual + (size_t)p * C : NULL;
            real *op = out + (size_t)p * C;
            for (int c = 0; c < C; c++) {
                real v = yp[c] * scale[c] + shift[c];
                if (rp) v += rp[c];
                if (relu) v = v < 0.0f ? 0.0f : v;     /* NaN passes through, as in PyTorch */
                op[c] = v;
            }
        }
        return;
    }
#pragma omp parallel for schedule(static)
    for (int c = 0; c < C; c++) {
        const real *yc = y + (size_t)c * NHW, *rc = residual ? residual + (size_t)c * NHW : NULL;
        real *oc = out + (size_t)c * NHW;
        for (int i = 0; i < NHW; i++) {
            real v = yc[i] * scale[c] + shift[c];
            if (rc) v += rc[i];
            if (relu) v = v < 0.0f ? 0.0f : v;
            oc[i] = v;
        }
    }
}

/* SyncBN (section 10b): with comm, this rank's two sums per channel become the global batch's, added in
   rank order, and n counts the values of every rank. The copy lives on this call's stack: the scratch
   above is shared, and a chunk that waits in the reduction lets the next chunk run its own BatchNorm. */
static double *bn_sums_over_ranks(ExcbComm *comm, double *red, const double *sum, const double *sum2, int C, int *n) {
    memcpy(red, sum, sizeof(double) * C);
    memcpy(red + C, sum2, sizeof(double) * C);
    excb_comm_sum_f64(comm, red, (size_t)2 * C);
    *n *= comm->size;
    return red;
}

void batchnorm_forward(real *out, real *mean, real *rstd, real *run_mean, real *run_var,
                       const real *y, const real *gamma, const real *beta, const real *residual,
                       int relu, int C, int NHW, real eps, real momentum, int channels_last, ExcbComm *comm) {
    double *sum = bn_scratch(C) + (size_t)2 * EXCB_BN_RUNS * C, *sumsq = sum + C;
    real scale[C], shift[C];
    bn_sums(sum, sumsq, y, NULL, NULL, NULL, NULL, 0, C, NHW, channels_last);
    int n = NHW;
    double red[comm ? 2 * C : 1];
    if (comm) {
        sum = bn_sums_over_ranks(comm, red, sum, sumsq, C, &n);
        sumsq = sum + C;
    }
    for (int c = 0; c < C; c++)
        excb_bn_statistics(sum[c], sumsq[c], n, eps, momentum, gamma[c], beta[c], &mean[c], &rstd[c],
                           run_mean ? &run_mean[c] : NULL, run_mean ? &run_var[c] : NULL, &scale[c], &shift[c]);
    bn_apply(out, y, scale, shift, residual, relu, C, NHW, channels_last);
}

/* BatchNorm in evaluation mode (feature extraction, excb.c section 18): out = act(gamma (y - run_mean) / sqrt(run_var + eps) + beta [+ res]) */
static void batchnorm_inference(real *out, const real *y, const real *gamma, const real *beta,
                                const real *run_mean, const real *run_var, const real *residual, int relu,
                                int C, int NHW, real eps, int channels_last) {
    real scale[C], shift[C];
    for (int c = 0; c < C; c++) {
        scale[c] = gamma[c] / sqrt(run_var[c] + eps);
        shift[c] = beta[c] - run_mean[c] * scale[c];
    }
    bn_apply(out, y, scale, shift, residual, relu, C, NHW, channels_last);
}

/* Backward of the above. With g = dout * [out > 0] (the ReLU's gate; all ones without ReLU) and
 * xhat = (y - mean) rstd:
 *   dbeta += sum g,   dgamma += sum g xhat
 *   dy = gamma rstd (g - mean(g) - xhat mean(g xhat))
 * The residual's gradient is g itself; callers add it (identity) or pass g through the shortcut
 * BN by calling this again with the shortcut's y and statistics and the same dout and out. */
void batchnorm_backward(real *dy, real *dgamma, real *dbeta, const real *dout, const real *out,
                        const real *y, const real *mean, const real *rstd, const real *gamma,
                        int relu, int C, int NHW, int channels_last, ExcbComm *comm) {
    double *sum_g = bn_scratch(C) + (size_t)2 * EXCB_BN_RUNS * C, *sum_gx = sum_g + C;
    bn_sums(sum_g, sum_gx, y, dout, out, mean, rstd, relu, C, NHW, channels_last);
    /* the affine parameters' gradients are this rank's share (the gradient all-reduce adds the shares);
       the input's gradient needs the means over the whole global batch (SyncBN) */
    for (int c = 0; c < C; c++) {
        dbeta[c] += (real)sum_g[c];
        dgamma[c] += (real)sum_gx[c];
    }
    int n = NHW;
    double red[comm ? 2 * C : 1];
    if (comm) {
        sum_g = bn_sums_over_ranks(comm, red, sum_g, sum_gx, C, &n);
        sum_gx = sum_g + C;
    }
    real k1[C], a[C], b[C];
    for (int c = 0; c < C; c++) {
        k1[c] = gamma[c] * rstd[c];
        a[c] = (real)(sum_g[c] / n);
        b[c] = (real)(sum_gx[c] / n);
    }
    if (channels_last) {
#pragma omp parallel for schedule(static)
        for (long p = 0; p < NHW; p++) {
            size_t o = (size_t)p * C;
            for (int c = 0; c < C; c++) {
                real g = (!relu || out[o + c] > 0.0f) ? dout[o + c] : 0.0f;
                dy[o + c] = k1[c] * (g - a[c] - (y[o + c] - mean[c]) * rstd[c] * b[c]);
            }
        }
        return;
    }
#pragma omp parallel for schedule(static)
    for (int c = 0; c < C; c++) {
        size_t o = (size_t)c * NHW;
        const real *gc = dout + o, *oc = out + o, *yc = y + o;
        real mu = mean[c], rs = rstd[c];
        real *dc = dy + o;
        for (int i = 0; i < NHW; i++) {
            real g = (!relu || oc[i] > 0.0f) ? gc[i] : 0.0f;
            dc[i] = k1[c] * (g - a[c] - (yc[i] - mu) * rs * b[c]);
        }
    }
}

/* --- the ImageNet stem's max-pool, 3x3, stride 2, padding 1, channels-last (N, H, W, C) ------------
 * out[n,oy,ox,c] = max over the window; arg keeps the flat index (iy*W + ix) of the first maximum
 * (PyTorch's tie rule), so the backward routes each gradient to exactly one input. */
void maxpool_forward(real *out, int32_t *arg, const real *x, int C, int N, int H, int W) {
    int Ho = conv_out(H, 3, 2, 1), Wo = conv_out(W, 3, 2, 1);
#pragma omp parallel for schedule(static)
    for (long q = 0; q < (long)N * Ho * Wo; q++) {            /* output pixel q = (n, oy, ox)      */
        int n = (int)(q / ((long)Ho * Wo)), oy = (int)(q / Wo % Ho), ox = (int)(q % Wo);
        real *op = out + (size_t)q * C;
        int32_t *ap = arg + (size_t)q * C;
        for (int c = 0; c < C; c++) {
            op[c] = -INFINITY;
            ap[c] = -1;
        }
        for (int i = 0; i < 3; i++)
            for (int j = 0; j < 3; j++) {
                int iy = oy * 2 - 1 + i, ix = ox * 2 - 1 + j;
                if (iy < 0 || iy >= H || ix < 0 || ix >= W) continue;
                const real *xp = x + (((size_t)n * H + iy) * W + ix) * C;
                for (int c = 0; c < C; c++)
                    if (xp[c] > op[c] || isnan(xp[c])) {
                        op[c] = xp[c];
                        ap[c] = iy * W + ix;
                    }
            }
    }
}

/* dx[n, arg, c] += dout, image by image (images are disjoint, so they run in parallel) */
void maxpool_backward(real *dx, const real *dout, const int32_t *arg, int C, int N, int H, int W) {
    int Ho = conv_out(H, 3, 2, 1), Wo = conv_out(W, 3, 2, 1);
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        real *dp = dx + (size_t)n * H * W * C;
        memset(dp, 0, sizeof(real) * H * W * C);
        for (size_t o = (size_t)n * Ho * Wo * C; o < (size_t)(n + 1) * Ho * Wo * C; o++)
            dp[(size_t)arg[o] * C + o % C] += dout[o];
    }
}

/* --- global average pool: f[c, n] = mean over H*W of x[n, :, :, c]; f has leading dimension ldf ---
 * (the sum over the H*W pixels runs in double, pixel after pixel) */
void avgpool_forward(real *f, int ldf, const real *x, int C, int N, int HW) {
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        double acc[C];
        for (int c = 0; c < C; c++) acc[c] = 0;
        for (int p = 0; p < HW; p++)
            for (int c = 0; c < C; c++) acc[c] += x[((size_t)n * HW + p) * C + c];
        for (int c = 0; c < C; c++) f[(size_t)c * ldf + n] = (real)(acc[c] / HW);
    }
}

/* dx[n, :, :, c] = df[c, n] / HW */
void avgpool_backward(real *dx, const real *df, int ldf, int C, int N, int HW) {
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++)
        for (int p = 0; p < HW; p++)
            for (int c = 0; c < C; c++) dx[((size_t)n * HW + p) * C + c] = df[(size_t)c * ldf + n] / (real)HW;
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
 * Gradient routing (paper_notes.md §3, A8, A9): only the two direct global rows send dc; predictor
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

/* A method whose rows are the projection as it is (CARP's head, mvbt): u (N, d) = x^T, no norm; its
   backward is the transpose back, dx = du^T. */
void rows_forward(real *u, const real *x, int ldx, int d, int N) {
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++)
        for (int j = 0; j < d; j++) u[(size_t)n * d + j] = x[(size_t)j * ldx + n];
}

void rows_backward(real *dx, int ldx, const real *du, int d, int N) {
#pragma omp parallel for schedule(static)
    for (int j = 0; j < d; j++)
        for (int n = 0; n < N; n++) dx[(size_t)j * ldx + n] = du[(size_t)n * d + j];
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
static void row_argmax(int32_t *labels, const real *q, int N, int K);   /* section 5 */

/* E3 from the batch's fractions s_hat (K) */
void cluster_size_ema(real *s, const real *frac, int K, double m_s, int fp16_term) {
    real m = (real)m_s;                                  /* s * m_s: the scalar cast to float32 */
    real one_minus_m = (real)(1.0 - m_s);                /* (1 - m_s) formed in double, as Python */
    real one_minus_m16 = excb_round_fp16(one_minus_m);   /* torch.tensor(1 - m_s).half()        */
    for (int k = 0; k < K; k++) {
        real term = fp16_term ? excb_round_fp16(excb_round_fp16(frac[k]) * one_minus_m16) : frac[k] * one_minus_m;
        s[k] = s[k] * m + term;                          /* E3                                   */
    }
}

void cluster_size_update(real *s, int32_t *counts, const int32_t *labels, int N, int K, double m_s,
                         int fp16_term) {
    memset(counts, 0, sizeof(int32_t) * K);
    for (int n = 0; n < N; n++) counts[labels[n]]++;
    real frac[256];                                      /* s_hat, E2, a block of K at a time    */
    for (int k0 = 0; k0 < K; k0 += 256) {
        int kn = imin(256, K - k0);
        for (int k = 0; k < kn; k++) frac[k] = (real)counts[k0 + k] / (real)N;
        cluster_size_ema(s + k0, frac, kn, m_s, fp16_term);
    }
}

/* The audit's variants of E2 (A4; paper_notes.md §10): which teacher output is counted and how.
 *   source balanced (the code): the balanced targets q (E6);  raw: softmax(z / tau_t), before E4-E5
 *   kind hard (the code): s_hat_k = the share of rows whose argmax is k;  soft: s_hat_k = mean_n p_nk
 * acc (K doubles) gets the sums over the N rows, in row order: hard, the number of rows whose argmax
 * is k (exact); soft, sum_n p_nk. Several ranks add their acc in rank order before the division
 * (section 10b), which is cluster_size_fractions. raw_labels (N) is scratch for the hard argmaxes. */
void cluster_size_sums(double *acc, int32_t *raw_labels, const real *q, const real *z, int N, int K, double tau_t,
                       int raw, int soft) {
    for (int k = 0; k < K; k++) acc[k] = 0;
    if (!soft) {
        if (raw) row_argmax(raw_labels, z, N, K);        /* argmax softmax(z / tau) = argmax z   */
        else row_argmax(raw_labels, q, N, K);
        for (int n = 0; n < N; n++) acc[raw_labels[n]] += 1;
        return;
    }
    real tau = (real)tau_t;
    for (int n = 0; n < N; n++) {
        const real *row = raw ? z + (size_t)n * K : q + (size_t)n * K;
        if (!raw) { for (int k = 0; k < K; k++) acc[k] += row[k]; continue; }
        real mx = -INFINITY;
        for (int k = 0; k < K; k++) mx = fmax(mx, row[k] / tau);
        double se = 0;
        for (int k = 0; k < K; k++) se += exp(row[k] / tau - mx);
        for (int k = 0; k < K; k++) acc[k] += exp(row[k] / tau - mx) / se;
    }
}

/* s_hat (K) from the sums over all N rows: a count is exact in float (below 2^24) and divided in
   float; a soft sum is divided in double and rounded once */
void cluster_size_fractions(real *frac, const double *acc, int N, int K, int soft) {
    for (int k = 0; k < K; k++) frac[k] = soft ? (real)(acc[k] / N) : (real)acc[k] / (real)N;
}

/* ================================================================================================
 * 5. Methods: balancing rules (ExCB, none, DINO, SwAV) and methods with their own loss (CoKe, CARP, mvbt)
 * ================================================================================================
 * A method (excb.h, ExcbMethod) is everything that differs between ExCB and the baselines it is
 * compared with: the targets q the teacher gives for a whole batch, and the state that carries over
 * from one step to the next. The networks, the cross-entropy of section 6 and the optimiser are shared,
 * so a comparison changes the balancing rule and nothing else; a method with its own loss (5.4-5.6)
 * replaces section 6 through its `loss` and says its head's shape. Each subsection below holds one:
 * its equations and operators, its state and scratch buffers (by name), its settings (rows of the key
 * table, section 14) and the ExcbMethod that binds them. The step (section 10) calls only
 *   begin_step -> [teacher forward] -> targets -> [student, loss] -> update -> [backward, SGD, EMA].
 * paper_notes.md §4-5 (ExCB) and §5b (the seam, none, DINO, SwAV) write the equations out; §5b also
 * says where each baseline departs from its own official code inside this harness.
 */
static int fail(char *err, int code, const char *fmt, ...);     /* section 11: err, and the code  */
#define RC(f) offsetof(ExcbRunConfig, f)                          /* a setting of the run           */
#define MC(f) (offsetof(ExcbRunConfig, model) + offsetof(ExcbConfig, f))   /* a setting of the model */

static void gather_step_labels(ExcbModel *m);   /* section 10b: the global batch's teacher labels */
static void model_sum_real(ExcbModel *m, real *x, size_t n, int mean);              /* section 10b */
static double *model_sum_f64_to_host(ExcbModel *m, double *x, size_t n);            /* section 10b */

/* the teacher rows of the whole global batch, Vg x ranks x batch (section 10b; one process: Vg x batch) */
static int global_rows(const ExcbModel *m) {
    return m->cfg.n_global * m->cfg.batch * (m->comm ? m->comm->size : 1);
}

/* The distinct teacher labels of a step (A21's monitor), for the rules without E2's counts. */
static int distinct_labels(int32_t *counts, const int32_t *labels, int N, int K) {
    memset(counts, 0, sizeof(int32_t) * K);
    int used = 0;
    for (int n = 0; n < N; n++) used += counts[labels[n]]++ == 0;
    return used;
}

/* the first maximum of each of N rows of K (argmax as torch: the first index wins a tie) */
static void row_argmax(int32_t *labels, const real *q, int N, int K) {
    for (int n = 0; n < N; n++) {
        const real *qn = q + (size_t)n * K;
        int best = 0;
        for (int k = 1; k < K; k++)
            if (qn[k] > qn[best]) best = k;
        labels[n] = best;
    }
}

/* ------------------------------------------------------------------------------------------------
 * 5.1 ExCB (E3', E4, E5, E6; E2 and E3 are section 4) and `none`, its collapse control
 * ------------------------------------------------------------------------------------------------
 *   lower_k  = min(r_k, 1)     written as 1 - relu(1 - r_k), the official form
 *   higher_k = min(1/r_k, 1)   written as 1 - relu(1 - 1/r_k)
 *   E4:  z'  = 1 - (1 - z) lower      shrink the cosine DISTANCE of small clusters  (r < 1)
 *        z'' = (z' + 1) higher - 1    shrink the shifted SIMILARITY of large clusters (r > 1)
 *   E5:  zh  = clamp(z'' (1 + 0.01 [k = argmax z'']), -1, 1)       (A1 boost, A2 clamp)
 *   E6:  q   = softmax(zh / tau_t),  tau_t = 0.04, no gradient
 * B(.; r) is increasing in z (a cluster's ranking of samples is kept), the identity at r = 1 (so at
 * the start, s = 1/K), and maps [-1, 1] into [-1, 1]. A3: where a factor is exactly 0 the code adds
 * U(0,1) * 0.001. In float32, 1 - r rounds to 1 for every r <= 2^-25 (about 3e-8), so lower is exactly
 * 0 not only at r = 0 but for every cluster whose r fell that low: with m_s = 0.999 a cluster that
 * gets no label has r ~ 0.999^n, below 2^-25 after about 17,300 steps, and from then on it draws
 * the jitter (paper_notes.md §5, A3). higher is 0 only for r <= 0, which s >= 0 never gives. For
 * r = 0, 1/r = inf and 1 - relu(1 - inf) = 1: IEEE arithmetic gives the official value, no NaN.
 * `none` keeps everything but the factors, which it fixes at 1: E4 at r = 1 is the identity in exact
 * arithmetic (in float32, 1 - (1 - z) may round z by half an ulp of 1), so with a uniform s and K a
 * power of two, where ExCB's r and factors are exactly 1 too, the two methods compute the same bits
 * (tests/test_methods.c; for other K, s K / sum(s) can round to 1 +- 1 ulp).
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
            real lo = lower ? lower[k] : 1.0f, hi = higher ? higher[k] : 1.0f;   /* NULL: `none` */
            real z1 = 1.0f - (1.0f - zn[k]) * lo;                   /* E4, lower branch          */
            real z2 = (z1 + 1.0f) * hi - 1.0f;                      /* E4, upper branch          */
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


/* ExCB's buffers: s is its whole state (K floats, O(K) memory whatever the data set's size) */
enum { EXCB_S, EXCB_R, EXCB_LOWER, EXCB_HIGHER, EXCB_COUNTS, EXCB_SUMS, EXCB_FRAC, EXCB_RAW_LABELS, EXCB_N_BUFFERS };
static int excb_rule_buffers(const ExcbConfig *c, ExcbBuffer *b) {
    b[EXCB_S] = (ExcbBuffer){"cluster_sizes", (size_t)c->K, 1, 0};          /* s, E3                     */
    b[EXCB_R] = (ExcbBuffer){"r", (size_t)c->K, 0, 0};                      /* r, E3'                    */
    b[EXCB_LOWER] = (ExcbBuffer){"lower", (size_t)c->K, 0, 0};              /* E4's factors              */
    b[EXCB_HIGHER] = (ExcbBuffer){"higher", (size_t)c->K, 0, 0};
    b[EXCB_COUNTS] = (ExcbBuffer){"counts", (size_t)c->K, 0, 1};            /* E2's counts (int32)       */
    int variant = c->excb.count_source || c->excb.count_kind;              /* A4's audit switches        */
    b[EXCB_SUMS] = (ExcbBuffer){"count_sums", variant ? (size_t)2 * c->K : 0, 0, 0};   /* K doubles  */
    b[EXCB_FRAC] = (ExcbBuffer){"count_fractions", variant ? (size_t)c->K : 0, 0, 0};
    b[EXCB_RAW_LABELS] = (ExcbBuffer){"count_labels", variant ? (size_t)c->n_global * c->batch : 0, 0, 1};
    return EXCB_N_BUFFERS;
}

static void excb_rule_init(ExcbModel *m) {
    real *s = m->mbuf[EXCB_S];
    for (int k = 0; k < m->cfg.K; k++) s[k] = 1.0f / (real)m->cfg.K;    /* E3's start: uniform       */
}

static void excb_rule_targets(ExcbModel *m) {
    const ExcbConfig *c = &m->cfg;
    const ExcbBalancingConfig *e = &c->excb;
    int NG = c->n_global * c->batch;
    m->ops->balance_factors(m->mbuf[EXCB_R], m->mbuf[EXCB_LOWER], m->mbuf[EXCB_HIGHER], m->mbuf[EXCB_S], c->K,
                            e->zero_jitter, c->seed, m->step);                                  /* E3', E4 */
    m->ops->balanced_targets(m->q, m->labels, NULL, m->zt, m->mbuf[EXCB_LOWER], m->mbuf[EXCB_HIGHER], NG, c->K,
                             e->boost, e->clamp, teacher_tau_at(c, m->step));                   /* E4-E6  */
}

static void none_targets(ExcbModel *m) {
    const ExcbConfig *c = &m->cfg;
    m->ops->balanced_targets(m->q, m->labels, NULL, m->zt, NULL, NULL, c->n_global * c->batch, c->K, c->excb.boost,
                             c->excb.clamp, teacher_tau_at(c, m->step));                        /* E5, E6 */
}

/* E2, E3 after the loss, as the official code (criterion.py L83); `none` keeps s too, as a monitor.
   The audit's other counts (A4: count_source, count_kind; CPU only) feed the same E3, their sums
   added over the ranks as DINO's centre (10b); the step's distinct labels (A21) stay those of the
   targets. */
static int excb_rule_update(ExcbModel *m) {
    const ExcbConfig *c = &m->cfg;
    const ExcbBalancingConfig *e = &c->excb;
    int NG = c->n_global * c->batch;
    if (!e->count_source && !e->count_kind)          /* E2 over the global batch's labels (10b) */
        return m->ops->cluster_size_update(m->mbuf[EXCB_S], m->mbuf[EXCB_COUNTS], m->labels_all, global_rows(m), c->K,
                                           e->m_s, e->fp16_count_term);
    int soft = e->count_kind == EXCB_COUNT_SOFT;
    double *acc = m->mbuf[EXCB_SUMS];
    cluster_size_sums(acc, m->mbuf[EXCB_RAW_LABELS], m->q, m->zt, NG, c->K, teacher_tau_at(c, m->step),
                      e->count_source == EXCB_COUNT_RAW, soft);
    if (m->comm) excb_comm_sum_f64(m->comm, acc, c->K);      /* data parallel (10b): every rank's rows */
    cluster_size_fractions(m->mbuf[EXCB_FRAC], acc, global_rows(m), c->K, soft);
    cluster_size_ema(m->mbuf[EXCB_S], m->mbuf[EXCB_FRAC], c->K, e->m_s, e->fp16_count_term);
    return distinct_labels(m->mbuf[EXCB_COUNTS], m->labels_all, global_rows(m), c->K);
}

static int excb_rule_diagnostics(const ExcbModel *m, const char **names, double *values) {
    const real *s = m->mbuf[EXCB_S];
    double smin = s[0], smax = s[0];
    for (int k = 1; k < m->cfg.K; k++) { smin = fmin(smin, s[k]); smax = fmax(smax, s[k]); }
    names[0] = "s_min_times_K"; values[0] = smin * m->cfg.K;
    names[1] = "s_max_times_K"; values[1] = smax * m->cfg.K;
    return 2;
}

static const char *const count_source_names[] = {"balanced", "raw", NULL}, *const count_kind_names[] = {"hard", "soft", NULL};
static const ExcbSetting excb_rule_settings[] = {
    {"m_s", EXCB_KEY_DOUBLE, MC(excb.m_s), 0, 0, 1, 0, 1, "0.999", NULL, "cluster-size EMA momentum (E3, A5)"},
    {"boost", EXCB_KEY_DOUBLE, MC(excb.boost), 0, 0, 1, 0, 1e3, "0.01", NULL, "argmax boost of E5 (A1)"},
    {"clamp", EXCB_KEY_DOUBLE, MC(excb.clamp), 0, 0, 1, 1e-6, 1e6, "1", NULL, "clamp of the balanced similarity (E5, A2)"},
    {"zero_jitter", EXCB_KEY_DOUBLE, MC(excb.zero_jitter), 0, 0, 1, 0, 1, "0.001", NULL, "jitter where a balancing factor is 0 (A3)"},
    {"fp16_count_term", EXCB_KEY_INT, MC(excb.fp16_count_term), 0, 0, 1, 0, 1, "1", NULL, "1: round the E3 term through float16 (A4)"},
    {"count_source", EXCB_KEY_ENUM, MC(excb.count_source), 0, 0, 1, 0, 0, "balanced", count_source_names, "E2 counts the balanced targets (A4, the code) or the raw teacher softmax (CPU only)"},
    {"count_kind", EXCB_KEY_ENUM, MC(excb.count_kind), 0, 0, 1, 0, 0, "hard", count_kind_names, "E2 counts argmaxes (A4, the code) or sums probabilities, soft (CPU only)"},
};

static const char *excb_rule_cpu_only(const ExcbConfig *c) {
    return c->excb.count_source || c->excb.count_kind ? "count_source and count_kind other than balanced and hard (A4's "
           "audit switches)" : NULL;
}

static const ExcbMethod method_excb = {
    .name = "excb", .summary = "ExCB: cluster sizes across batches (E2, E3) rescale the teacher's similarities (E4, E5)",
    .pairing = EXCB_PAIRING_EXCB, .cuda = 1, .cpu_only = excb_rule_cpu_only, .ranks = 1,
    .settings = excb_rule_settings, .n_settings = sizeof excb_rule_settings / sizeof excb_rule_settings[0],
    .buffers = excb_rule_buffers, .init = excb_rule_init, .targets = excb_rule_targets, .update = excb_rule_update,
    .diagnostics = excb_rule_diagnostics,
};

/* `none` reads ExCB's settings (boost, clamp, m_s), which excb's rows declare */
static const ExcbMethod method_none = {
    .name = "none", .summary = "ExCB without balancing: E4 at r = 1 (the identity), the collapse control",
    .pairing = EXCB_PAIRING_EXCB, .cuda = 1, .cpu_only = excb_rule_cpu_only, .ranks = 1,
    .buffers = excb_rule_buffers, .init = excb_rule_init, .targets = none_targets, .update = excb_rule_update,
    .diagnostics = excb_rule_diagnostics,
};

/* ------------------------------------------------------------------------------------------------
 * 5.2 DINO: centering and sharpening (paper_notes.md §5b; facebookresearch/dino main_dino.py DINOLoss)
 * ------------------------------------------------------------------------------------------------
 *   D1:  q = softmax((z - c) / tau_t)          z: the teacher's scores (here E1's cosines, as DINO's
 *                                             weight-normalised last layer on a normalised input)
 *   D2:  c <- 0.9 c + 0.1 mean_i z_i           after the loss, over both global views' rows; c starts at 0
 *   D3:  tau_t(e) = linspace(tau_warm, tau_t, W)[e] for epochs e < W, then tau_t (W = 0: no warm-up);
 *        the schedule is section 7's teacher_tau_at, which ExCB and none read too (A18's switch)
 * Centering keeps one cluster from taking every sample; the low temperature keeps the targets from
 * going uniform. Balance is a soft running mean of logits, not counts: the monitors show how well it
 * holds at small batches. Its own pairing is SWAPPED (every crop's direct row except the teacher's view,
 * no predictor); pairing = excb gives it ExCB's 18 terms, so that the rule alone differs.
 */
void dino_targets(real *q, int32_t *labels, const real *z, const real *center, int N, int K, double tau) {
    real t = (real)tau;
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        const real *zn = z + (size_t)n * K;
        real *qn = q + (size_t)n * K, mx = -INFINITY;
        for (int k = 0; k < K; k++) {
            qn[k] = (zn[k] - center[k]) / t;                                         /* D1      */
            mx = qn[k] > mx ? qn[k] : mx;
        }
        double sum = 0;
        for (int k = 0; k < K; k++) {
            qn[k] = exp(qn[k] - mx);
            sum += qn[k];
        }
        real inv = (real)(1.0 / sum);
        for (int k = 0; k < K; k++) qn[k] *= inv;
    }
    row_argmax(labels, q, N, K);
}

/* D2 in two halves, so that data-parallel ranks (10b) can add their sums in between: acc_k = sum_n z_nk
   over N rows, then the EMA with the mean acc_k / N (N: the rows of every rank) */
static void dino_center_sums(double *acc, const real *z, int N, int K) {
#pragma omp parallel for schedule(static)
    for (int k = 0; k < K; k++) {
        double a = 0;
        for (int n = 0; n < N; n++) a += z[(size_t)n * K + k];
        acc[k] = a;
    }
}

static void dino_center_ema(real *center, const double *acc, long N, int K, double momentum) {
    real mf = (real)momentum, omf = (real)(1.0 - momentum);
    for (int k = 0; k < K; k++) {
        real mean = (real)(acc[k] / N);
        center[k] = center[k] * mf + mean * omf;                                     /* D2      */
    }
}

void dino_center_update(real *center, const real *z, int N, int K, double momentum) {   /* (the step: dino_update) */
    double *acc = xmalloc(sizeof(double) * K);
    dino_center_sums(acc, z, N, K);
    dino_center_ema(center, acc, N, K, momentum);
    free(acc);
}

enum { DINO_CENTER, DINO_COUNTS, DINO_SUMS, DINO_N_BUFFERS };
static int dino_buffers(const ExcbConfig *c, ExcbBuffer *b) {
    b[DINO_CENTER] = (ExcbBuffer){"center", (size_t)c->K, 1, 0};
    b[DINO_COUNTS] = (ExcbBuffer){"counts", (size_t)c->K, 0, 1};
    b[DINO_SUMS] = (ExcbBuffer){"center_sums", (size_t)2 * c->K, 0, 0};   /* K doubles: D2's sums */
    return DINO_N_BUFFERS;
}

static void dino_init(ExcbModel *m) { memset(m->mbuf[DINO_CENTER], 0, sizeof(real) * m->cfg.K); }

static void dino_method_targets(ExcbModel *m) {
    const ExcbConfig *c = &m->cfg;
    dino_targets(m->q, m->labels, m->zt, m->mbuf[DINO_CENTER], c->n_global * c->batch, c->K, teacher_tau_at(c, m->step));
}

static int dino_update(ExcbModel *m) {
    const ExcbConfig *c = &m->cfg;
    int NG = c->n_global * c->batch;
    double *acc = m->mbuf[DINO_SUMS];
    dino_center_sums(acc, m->zt, NG, c->K);
    if (m->comm) excb_comm_sum_f64(m->comm, acc, c->K);      /* data parallel (10b): every rank's rows */
    dino_center_ema(m->mbuf[DINO_CENTER], acc, global_rows(m), c->K, c->dino.center_momentum);
    return distinct_labels(m->mbuf[DINO_COUNTS], m->labels_all, global_rows(m), c->K);
}

static int dino_diagnostics(const ExcbModel *m, const char **names, double *values) {
    const real *ctr = m->mbuf[DINO_CENTER];
    double lo = ctr[0], hi = ctr[0];
    for (int k = 1; k < m->cfg.K; k++) { lo = fmin(lo, ctr[k]); hi = fmax(hi, ctr[k]); }
    names[0] = "center_min"; values[0] = lo;
    names[1] = "center_max"; values[1] = hi;
    names[2] = "dino_tau_t"; values[2] = teacher_tau_at(&m->cfg, m->step > 0 ? m->step - 1 : 0);
    return 3;
}

static const ExcbSetting dino_settings[] = {
    {"dino_center_momentum", EXCB_KEY_DOUBLE, MC(dino.center_momentum), 0, 0, 1, 0, 1, "0.9", NULL, "DINO: centre EMA momentum (D2)"},
};

static const ExcbMethod method_dino = {
    .name = "dino", .summary = "DINO: centering by a running mean of the teacher's scores, sharpening by tau_t (D1-D3)",
    .pairing = EXCB_PAIRING_SWAPPED, .cuda = 0, .ranks = 1,
    .settings = dino_settings, .n_settings = sizeof dino_settings / sizeof dino_settings[0],
    .buffers = dino_buffers, .init = dino_init, .targets = dino_method_targets, .update = dino_update,
    .diagnostics = dino_diagnostics,
};

/* ------------------------------------------------------------------------------------------------
 * 5.3 SwAV: Sinkhorn-Knopp equipartition with a queue (paper_notes.md §5b; facebookresearch/swav
 *     main_swav.py train() and distributed_sinkhorn)
 * ------------------------------------------------------------------------------------------------
 *   S1:  per global view v, on the N = Lq + B score rows [queue_v c^T ; z_v]:
 *          Q = exp(S / eps)^T  (K x N), Q /= sum(Q);  repeat 3 times:
 *              Q /= row sums, Q /= K   (every prototype gets mass 1/K)
 *              Q /= column sums, Q /= N  (every sample gets mass 1/N)
 *          Q *= N; the targets of view v are the batch's B columns (each sums to 1)
 *   S2:  the queue of view v holds the teacher's normalised projections u of the last Lq/B batches,
 *        newest first; it fills from epoch queue_start_epoch and takes part in S1 once full
 *   S3:  the student's prototypes v are re-normalised before every step, and get no update at all
 *        (no gradient, no weight decay, no momentum) before step freeze_prototypes_steps
 * Balance is an equipartition inside the batch plus the queue: with B << K and no queue, each sample's
 * code is spread thin (SwAV's small-batch recipe: queue 3840 from epoch 15). exp is taken after
 * subtracting the midpoint of the scores' range, which the normalisation by sum(Q) cancels exactly in
 * real arithmetic: the exponents stay within +-(max - min)/(2 eps), so cosine scores keep every entry a
 * normal float32 for eps >= 0.0125 (the key's lower bound; the official code, with no shift, overflows
 * below about 1/88 as well). Its own pairing is SWAPPED (swapped prediction, tau_s 0.1).
 */
void sinkhorn_knopp(real *S, double *sums, int N, int K, double epsilon, int iterations, ExcbComm *comm) {
    real eps = (real)epsilon, mx = -INFINITY, mn = INFINITY;
    size_t n_all = (size_t)N * K;
    for (size_t i = 0; i < n_all; i++) { mx = fmax(mx, S[i] / eps); mn = fmin(mn, S[i] / eps); }
    if (comm) {       /* data parallel (section 10b): the rows of every rank are one matrix */
        real range[2] = {mx, mn}, all[2 * comm->size];
        excb_comm_gather(comm, range, all, sizeof range);
        for (int r = 0; r < comm->size; r++) { mx = fmax(mx, all[2 * r]); mn = fmin(mn, all[2 * r + 1]); }
    }
    real shift = 0.5f * mx + 0.5f * mn;          /* exponents in +-(max - min)/2: cosines need eps > 1/88 */
    double *col = sums, *row = sums + K;                    /* per prototype (K), per sample (N)   */
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        double acc = 0;
        for (int k = 0; k < K; k++) {
            real e = exp(S[(size_t)n * K + k] / eps - shift);
            S[(size_t)n * K + k] = e;
            acc += e;
        }
        row[n] = acc;
    }
    double total = 0;
    for (int n = 0; n < N; n++) total += row[n];              /* a fixed order: any thread count     */
    if (comm) excb_comm_sum_f64(comm, &total, 1);
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n_all; i++) S[i] = (real)(S[i] / total);      /* Q /= sum(Q), in double: */
                                                                         /* the sum may pass FLT_MAX */
    real Kf = (real)K, Nf = (real)N * (comm ? comm->size : 1);
    for (int it = 0; it < iterations; it++) {
        int tiles = (K + 63) / 64;                            /* each prototype's mass, 64 at a time */
#pragma omp parallel for schedule(static)
        for (int t = 0; t < tiles; t++) {
            int k0 = t * 64, kk = imin(64, K - k0);
            double acc[64] = {0};
            for (int n = 0; n < N; n++)
                for (int j = 0; j < kk; j++) acc[j] += S[(size_t)n * K + k0 + j];
            for (int j = 0; j < kk; j++) col[k0 + j] = acc[j];
        }
        if (comm) excb_comm_sum_f64(comm, col, K);
#pragma omp parallel for schedule(static)
        for (int n = 0; n < N; n++) {
            real *Sn = S + (size_t)n * K;
            double acc = 0;
            for (int k = 0; k < K; k++) {
                Sn[k] = Sn[k] / (real)col[k] / Kf;             /* Q /= sum_of_rows; Q /= K            */
                acc += Sn[k];
            }
            real sample_mass = (real)acc;
            for (int k = 0; k < K; k++) Sn[k] = Sn[k] / sample_mass / Nf;   /* Q /= its column sum; Q /= N */
        }
    }
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n_all; i++) S[i] *= Nf;             /* Q *= N: each sample's code sums to 1 */
}

enum { SWAV_QUEUE, SWAV_SCORES, SWAV_SUMS, SWAV_COUNTS, SWAV_ROWS_ALL, SWAV_N_BUFFERS };
static int swav_buffers(const ExcbConfig *c, ExcbBuffer *b) {
    size_t Lq = (size_t)c->swav.queue_length, rows = Lq + (size_t)c->batch;
    b[SWAV_QUEUE] = (ExcbBuffer){"queue", (size_t)c->n_global * Lq * c->d, 1, 0};   /* (Vg, Lq, d), S2 */
    b[SWAV_SCORES] = (ExcbBuffer){"scores", rows * c->K, 0, 0};                     /* (Lq + B, K), S1 */
    b[SWAV_SUMS] = (ExcbBuffer){"sums", 2 * (rows + c->K), 0, 0};                   /* doubles         */
    b[SWAV_COUNTS] = (ExcbBuffer){"counts", (size_t)c->K, 0, 1};
    size_t all = c->ranks > 1 ? (size_t)c->ranks * c->batch : 0;    /* data parallel (10b): the global batch */
    b[SWAV_ROWS_ALL] = (ExcbBuffer){"rows_all", all * c->d, 0, 0};   /* its teacher rows, for the queue  */
    return SWAV_N_BUFFERS;
}

static int swav_validate(const ExcbConfig *c, char *err) {
    if (c->swav.queue_length % c->batch) {            /* the queue takes whole batches (main_swav.py) */
        snprintf(err, EXCB_ERR_LEN, "key 'swav_queue_length' = %d is not a multiple of batch = %d (the queue "
                 "takes whole batches; the official code rounds it down, here you choose)", c->swav.queue_length, c->batch);
        return EXCB_EXIT_CONFIG;
    }
    return 0;
}

static void swav_init(ExcbModel *m) { memset(m->mbuf[SWAV_QUEUE], 0, sizeof(real) * m->mbuf_spec[SWAV_QUEUE].floats); }

/* S3: v_k <- v_k / max(||v_k||, 1e-12), the student's only (the teacher follows by its EMA) */
static void swav_begin_step(ExcbModel *m) {
    real *v = m->params + m->tensors[m->centroids].offset;
    int d = m->cfg.d;
#pragma omp parallel for schedule(static)
    for (int k = 0; k < m->cfg.K; k++) {
        double ss = 0;
        for (int j = 0; j < d; j++) ss += (double)v[(size_t)k * d + j] * v[(size_t)k * d + j];
        real nrm = (real)sqrt(ss), den = nrm > 1e-12f ? nrm : 1e-12f;
        for (int j = 0; j < d; j++) v[(size_t)k * d + j] /= den;
    }
}

/* S2: in use once full (its oldest row is no longer the zeros it started as, as main_swav.py checks) */
static int swav_queue_in_use(const ExcbModel *m, int v) {
    int Lq = m->cfg.swav.queue_length, d = m->cfg.d;
    if (Lq == 0) return 0;
    const real *last = (const real *)m->mbuf[SWAV_QUEUE] + ((size_t)v * Lq + Lq - 1) * d;
    for (int j = 0; j < d; j++)
        if (last[j] != 0.0f) return 1;
    return 0;
}

static void swav_targets(ExcbModel *m) {
    const ExcbConfig *c = &m->cfg;
    int B = c->batch, K = c->K, d = c->d, Lq = c->swav.queue_length;
    real *S = m->mbuf[SWAV_SCORES];
    /* data parallel (section 10b): every rank keeps the whole queue and scores its share of the rows */
    int R = m->comm ? m->comm->size : 1, rank = m->comm ? m->comm->rank : 0;
    for (int v = 0; v < c->n_global; v++) {
        int rows = swav_queue_in_use(m, v) ? Lq / R : 0, N = rows + B;
        const real *queue = (const real *)m->mbuf[SWAV_QUEUE] + ((size_t)v * Lq + (size_t)rank * rows) * d;
        if (rows)                                   /* the queue's scores against today's prototypes */
            matmul_tiled('N', 'T', rows, K, d, 1.0f, queue, d, m->c, d, 0.0f, S, K);
        memcpy(S + (size_t)rows * K, m->zt + (size_t)v * B * K, sizeof(real) * B * K);
        sinkhorn_knopp(S, m->mbuf[SWAV_SUMS], N, K, c->swav.epsilon, c->swav.iterations, m->comm);   /* S1 */
        memcpy(m->q + (size_t)v * B * K, S + (size_t)rows * K, sizeof(real) * B * K);
    }
    row_argmax(m->labels, m->q, c->n_global * B, K);
}

static int swav_update(ExcbModel *m) {
    const ExcbConfig *c = &m->cfg;
    int B = c->batch, d = c->d, Lq = c->swav.queue_length, R = m->comm ? m->comm->size : 1;
    if (Lq > 0 && m->step / c->steps_per_epoch >= c->swav.queue_start_epoch)
        for (int v = 0; v < c->n_global; v++) {                                            /* S2 */
            real *qv = (real *)m->mbuf[SWAV_QUEUE] + (size_t)v * Lq * d;
            const real *rows = m->ut + (size_t)v * B * d;
            if (m->comm) {          /* the global batch's rows, in the single process's order (10b) */
                excb_comm_gather(m->comm, rows, m->mbuf[SWAV_ROWS_ALL], sizeof(real) * B * d);
                rows = m->mbuf[SWAV_ROWS_ALL];
            }
            memmove(qv + (size_t)B * R * d, qv, sizeof(real) * (size_t)(Lq - B * R) * d);
            memcpy(qv, rows, sizeof(real) * (size_t)B * R * d);
        }
    return distinct_labels(m->mbuf[SWAV_COUNTS], m->labels_all, global_rows(m), c->K);
}

static int swav_centroids_frozen(const ExcbModel *m) { return m->step < m->cfg.swav.freeze_prototypes_steps; }

static int swav_diagnostics(const ExcbModel *m, const char **names, double *values) {
    names[0] = "queue_in_use";
    values[0] = swav_queue_in_use(m, 0);
    return 1;
}

static const ExcbSetting swav_settings[] = {
    {"swav_epsilon", EXCB_KEY_DOUBLE, MC(swav.epsilon), 0, 0, 1, 0.0125, 1e6, "0.05", NULL, "SwAV: Sinkhorn-Knopp's epsilon (S1)"},
    {"swav_iterations", EXCB_KEY_INT, MC(swav.iterations), 0, 0, 1, 0, 1000, "3", NULL, "SwAV: Sinkhorn-Knopp iterations (S1)"},
    {"swav_queue_length", EXCB_KEY_INT, MC(swav.queue_length), 0, 0, 1, 0, 1 << 24, "0", NULL, "SwAV: queue rows per global view, a multiple of batch (S2; 0: none; 3840 at B = 256)"},
    {"swav_queue_start_epoch", EXCB_KEY_INT, MC(swav.queue_start_epoch), 0, 0, 1, 0, 1e9, "15", NULL, "SwAV: the epoch the queue starts filling (S2)"},
    {"swav_freeze_prototypes_steps", EXCB_KEY_LONG, MC(swav.freeze_prototypes_steps), 0, 0, 1, 0, 1e18, "313", NULL, "SwAV: steps before the prototypes are first updated (S3)"},
};

static const ExcbMethod method_swav = {
    .name = "swav", .summary = "SwAV: Sinkhorn-Knopp equipartition over the batch and a queue (S1-S3)",
    .pairing = EXCB_PAIRING_SWAPPED, .cuda = 0, .ranks = 1,
    .settings = swav_settings, .n_settings = sizeof swav_settings / sizeof swav_settings[0],
    .buffers = swav_buffers, .validate = swav_validate, .init = swav_init, .begin_step = swav_begin_step,
    .targets = swav_targets, .update = swav_update, .centroids_frozen = swav_centroids_frozen,
    .diagnostics = swav_diagnostics,
};

/* ------------------------------------------------------------------------------------------------
 * 5.4 CoKe: online constrained k-means (paper_notes.md §5c; arXiv 2105.11527, idstcv/CoKe
 *     builder_single_view.py and builder_multi_view.py, the first stage, without label smoothing)
 * ------------------------------------------------------------------------------------------------
 *   K0: u = BN(h) / ||BN(h)||             CoKe's projector ends with a BatchNorm (builder_*_view.py):
 *                                       here the predictor's input BN(d), which its predictor shares
 *   K1: x_i = (1/Vg) sum_v u_{v,i}      image i's mean global row of the STUDENT (CoKe has no teacher
 *                                       network), detached, not re-normalised
 *   per head (K clusters, its own state):
 *   K2: y_i = argmax_k (<x_i, c_k> + rho_k)             c: the running centres of this epoch
 *   K3: rho_k <- max(0, rho_k - eta n_k / B + eta gamma / K),    n_k = #{i : y_i = k}
 *       (rho rises for a cluster that got fewer than gamma B / K of the batch: the lower bound; with
 *       gamma = 1, equal sizes, the official code does not clamp, and neither does this)
 *   K4: for every k with n_k > 0:  c_k <- normalize((N_k c_k + sum_{y_i = k} x_i) / (N_k + n_k)),
 *       N_k <- N_k + n_k     (the mean of the epoch's assigned features, re-normalised)
 *   K5: at the first step of an epoch: C_prev <- c, N <- 0    (the classifier is last epoch's centres)
 *   K6: t_i = the label image i got when last seen (one int per image and head), in epoch 0 y_i itself;
 *       then the label of image i becomes y_i
 *   K7: L = (1/H) sum_heads [ beta CE(up) + (1 - beta) CE(u) ],  CE(r) = mean over crops and images of
 *       -log softmax(<r_{crop,i}, C_prev> / T)[t_i];  up: the predictor's rows (E10), u: the projection's
 * C_prev is state, not a parameter: the gradient reaches u and up only (du = dCE/dlogits C_prev / T),
 * so the model has no learned prototype layer. The state is O(K d) per head plus O(H N) labels: the
 * part that grows with the data set (4 bytes per image and head here; the official code keeps int64
 * labels with room for 5 smoothed labels per image: paper_notes.md §5c has both at N = 60,000 and
 * 1,281,167).
 */
enum { COKE_PREV, COKE_CUR, COKE_DUALS, COKE_COUNTERS, COKE_LABELS, COKE_X, COKE_ASSIGN, COKE_TARGETS,
       COKE_LOGITS, COKE_COUNTS, COKE_ASSIGN_ALL, COKE_X_ALL, COKE_INDEX_ALL, COKE_N_BUFFERS };

static long coke_n_images(const ExcbConfig *c) { return c->n_images > 0 ? c->n_images : (long)c->batch * c->steps_per_epoch; }

/* the clusters of every head together (KS), the widest head, and head j's first row in the state */
static int coke_total_k(const ExcbConfig *c, int *widest) {
    int ks = 0, w = 0;
    for (int j = 0; j < c->coke.n_heads; j++) { ks += c->coke.k[j]; w = c->coke.k[j] > w ? c->coke.k[j] : w; }
    if (widest) *widest = w;
    return ks;
}

static int coke_head_offset(const ExcbConfig *c, int head) {
    int off = 0;
    for (int j = 0; j < head; j++) off += c->coke.k[j];
    return off;
}

static int coke_buffers(const ExcbConfig *c, ExcbBuffer *b) {
    int widest, KS = coke_total_k(c, &widest), H = c->coke.n_heads, B = c->batch, d = c->d;
    size_t rows = (size_t)(c->n_global + c->n_local) * B;
    b[COKE_PREV] = (ExcbBuffer){"centers_prev", (size_t)KS * d, 1, 0};              /* C_prev (KS, d), K5 */
    b[COKE_CUR] = (ExcbBuffer){"centers_cur", (size_t)KS * d, 1, 0};                /* c (KS, d), K4     */
    b[COKE_DUALS] = (ExcbBuffer){"duals", (size_t)KS, 1, 0};                        /* rho, K3           */
    b[COKE_COUNTERS] = (ExcbBuffer){"counters", (size_t)KS, 1, 0};                  /* N_k, K4           */
    b[COKE_LABELS] = (ExcbBuffer){"labels", (size_t)H * coke_n_images(c), 1, 1};   /* (H, N) int32, K6  */
    b[COKE_X] = (ExcbBuffer){"mean_rows", (size_t)B * d, 0, 0};                     /* x (B, d), K1      */
    b[COKE_ASSIGN] = (ExcbBuffer){"assign", (size_t)H * B, 0, 1};                   /* y (H, B), K2      */
    b[COKE_TARGETS] = (ExcbBuffer){"targets", (size_t)H * B, 0, 1};                 /* t (H, B), K6      */
    b[COKE_LOGITS] = (ExcbBuffer){"logits", rows * widest, 0, 0};      /* K2 (B, K_j), K7 (rows, K_j) */
    b[COKE_COUNTS] = (ExcbBuffer){"counts", (size_t)KS, 0, 1};                      /* n_k, K3           */
    size_t all = c->ranks > 1 ? (size_t)c->ranks * B : 0;      /* data parallel (10b): the global batch's */
    b[COKE_ASSIGN_ALL] = (ExcbBuffer){"assign_all", (size_t)H * all, 0, 1};         /* y of every rank   */
    b[COKE_X_ALL] = (ExcbBuffer){"mean_rows_all", all * d, 0, 0};                    /* x of every rank   */
    b[COKE_INDEX_ALL] = (ExcbBuffer){"images_all", 2 * all, 0, 1};                  /* their images, int64 */
    return COKE_N_BUFFERS;
}

static int coke_label_range(const ExcbConfig *c) { return c->coke.k[0]; }    /* A21: head 0's labels */

static int coke_validate(const ExcbConfig *c, char *err) {
    if (c->coke.n_heads < 1)
        return fail(err, EXCB_EXIT_CONFIG, "key 'coke_k' needs at least one head's K");
    for (int j = 0; j < c->coke.n_heads; j++)
        if (c->coke.k[j] < 2) return fail(err, EXCB_EXIT_CONFIG, "key 'coke_k': head %d has K = %d, below 2", j, c->coke.k[j]);
    if (coke_n_images(c) < c->batch)
        return fail(err, EXCB_EXIT_CONFIG, "CoKe keeps a label per training image: the data set's %ld images are fewer "
                    "than batch = %d", coke_n_images(c), c->batch);
    return 0;
}

/* C_prev = c = unit rows of normal draws (torch.randn(dim, K) normalised, as builder_single_view.py) */
static void coke_init(ExcbModel *m) {
    const ExcbConfig *c = &m->cfg;
    int KS = coke_total_k(c, NULL), d = c->d;
    real *prev = m->mbuf[COKE_PREV], *cur = m->mbuf[COKE_CUR];
    for (int k = 0; k < KS; k++) {
        double ss = 0;
        for (int j = 0; j < d; j++) {
            real v = excb_normal(c->seed, EXCB_RNG_COKE, (uint64_t)k, 0, (uint64_t)j);
            cur[(size_t)k * d + j] = v;
            ss += (double)v * v;
        }
        real inv = (real)(1.0 / sqrt(ss));
        for (int j = 0; j < d; j++) prev[(size_t)k * d + j] = cur[(size_t)k * d + j] *= inv;
    }
    memset(m->mbuf[COKE_DUALS], 0, sizeof(real) * KS);
    memset(m->mbuf[COKE_COUNTERS], 0, sizeof(real) * KS);
    int32_t *labels = m->mbuf[COKE_LABELS];          /* torch.ones, as the official buffer: an image   */
    for (size_t i = 0; i < m->mbuf_spec[COKE_LABELS].floats; i++) labels[i] = 1;   /* first seen after */
}                                                    /* epoch 0 (drop_last) trains towards cluster 1    */

/* K5 at the first step of an epoch (update_center, run after each epoch by main_*.py) */
static void coke_begin_step(ExcbModel *m) {
    const ExcbConfig *c = &m->cfg;
    if (m->step == 0 || m->step % c->steps_per_epoch) return;
    int KS = coke_total_k(c, NULL);
    memcpy(m->mbuf[COKE_PREV], m->mbuf[COKE_CUR], sizeof(real) * KS * c->d);
    memset(m->mbuf[COKE_COUNTERS], 0, sizeof(real) * KS);
}

static long coke_image(const ExcbModel *m, int i) {
    long N = coke_n_images(&m->cfg);
    long B = m->cfg.batch, R = m->comm ? m->comm->size : 1, first = m->comm ? m->comm->rank * B : 0;
    return m->batch_index ? (long)m->batch_index[i] : (m->step * B * R + first + i) % N;   /* its place (10b) */
}

/* one row's hard-label cross-entropy at 1/T: returns -log softmax(z / T)[t]; z becomes
   d(scale * CE)/dz = scale (softmax - onehot) / T */
static double ce_hard_row(real *z, int K, int t, double inv_tau, double scale) {
    real it = (real)inv_tau, mx = -INFINITY;
    for (int k = 0; k < K; k++) mx = fmax(mx, z[k] * it);
    double se = 0, lt = (double)z[t] * it;
    for (int k = 0; k < K; k++) {
        real e = exp(z[k] * it - mx);
        z[k] = e;
        se += e;
    }
    real g = (real)(scale * inv_tau / se), g1 = (real)(scale * inv_tau);
    for (int k = 0; k < K; k++) z[k] = z[k] * g - (k == t ? g1 : 0.0f);
    return mx + log(se) - lt;
}

/* K7 for one head and one branch: rows (n, d) against C (K, d); adds weight * mean CE to the loss and
   weight * dCE/du into du (accumulate: 0 for the first head) */
static double coke_branch(ExcbModel *m, const real *rows, int n_crops, const real *C, int K, const int32_t *t,
                          double weight, real *du, int accumulate) {
    const ExcbConfig *c = &m->cfg;
    int B = c->batch, n = n_crops * B, d = c->d;
    real *z = m->mbuf[COKE_LOGITS];
    double scale = weight / n, *row_loss = m->row_loss;
    m->ops->gemm('N', 'T', n, K, d, 1.0f, rows, d, C, d, 0.0f, z, K);
#pragma omp parallel for schedule(static)
    for (int r = 0; r < n; r++) row_loss[r] = ce_hard_row(z + (size_t)r * K, K, t[r % B], 1.0 / c->coke.tau, scale);
    double total = 0;
    for (int r = 0; r < n; r++) total += row_loss[r];        /* a fixed order: any thread count */
    m->ops->gemm('N', 'N', n, d, K, 1.0f, z, K, C, d, accumulate ? 1.0f : 0.0f, du, d);
    return total * scale;
}

static double coke_loss(ExcbModel *m) {
    const ExcbConfig *c = &m->cfg;
    const ExcbCokeConfig *k = &c->coke;
    int B = c->batch, d = c->d, Vg = c->n_global, H = k->n_heads;
    int n_pred_crops = c->n_global + c->n_local;
    long N = coke_n_images(c);
    real *x = m->mbuf[COKE_X];
    int32_t *y = m->mbuf[COKE_ASSIGN], *t = m->mbuf[COKE_TARGETS], *labels = m->mbuf[COKE_LABELS];
    for (int i = 0; i < B; i++)                                                             /* K1 */
        for (int j = 0; j < d; j++) {
            real acc = 0.0f;
            for (int v = 0; v < Vg; v++) acc += m->u_dir[((size_t)v * B + i) * d + j];
            x[(size_t)i * d + j] = acc / (real)Vg;
        }
    long epoch = m->step / c->steps_per_epoch;
    double loss = 0;
    for (int h = 0; h < H; h++) {
        int K = k->k[h], off = coke_head_offset(c, h);
        const real *cur = (const real *)m->mbuf[COKE_CUR] + (size_t)off * d;
        const real *rho = (const real *)m->mbuf[COKE_DUALS] + off;
        real *score = m->mbuf[COKE_LOGITS];
        m->ops->gemm('N', 'T', B, K, d, 1.0f, x, d, cur, d, 0.0f, score, K);
        for (int i = 0; i < B; i++) {                                                       /* K2 */
            const real *si = score + (size_t)i * K;
            int best = 0;
            for (int j = 1; j < K; j++)
                if (si[j] + rho[j] > si[best] + rho[best]) best = j;
            y[h * B + i] = best;
            t[h * B + i] = epoch == 0 ? best : labels[(size_t)h * N + coke_image(m, i)];    /* K6 */
        }
    }
    for (int h = 0; h < H; h++) {                                                           /* K7 */
        const real *C = (const real *)m->mbuf[COKE_PREV] + (size_t)coke_head_offset(c, h) * d;
        loss += coke_branch(m, m->u_dir, m->n_dir_crops, C, k->k[h], t + h * B, (1 - k->beta) / H, m->du_dir, h > 0);
        loss += coke_branch(m, m->u_pred, n_pred_crops, C, k->k[h], t + h * B, k->beta / H, m->du_pred, h > 0);
    }
    for (int v = 0; v < Vg; v++)                        /* A21's monitors: head 0's new labels */
        for (int i = 0; i < B; i++) m->labels[v * B + i] = y[i];
    return loss;
}

/* K3 for one head: n (K) the batch's counts */
void coke_dual_update(real *rho, const int32_t *n, int K, int B, double eta, double gamma) {
    real e = (real)eta, lb = (real)(gamma / K);
    for (int j = 0; j < K; j++) {
        if (n[j]) rho[j] -= e / (real)B * (real)n[j];
        rho[j] += e * lb;
        if (gamma < 1 && rho[j] < 0) rho[j] = 0;      /* the bound is a lower one only: rho >= 0 */
    }
}

/* K4 for one head: cur (K, d) and its counters Nk, from the batch's labels y and rows x (B, d) */
void coke_centre_update(real *cur, real *Nk, const int32_t *n, const int32_t *y, const real *x, int B, int K, int d) {
    for (int j = 0; j < K; j++) {
        if (!n[j]) continue;
        real alpha = Nk[j] / (Nk[j] + (real)n[j]);       /* the old mean's share of the new one */
        Nk[j] += (real)n[j];
        for (int e = 0; e < d; e++) cur[(size_t)j * d + e] *= alpha;
    }
    for (int i = 0; i < B; i++) {                        /* index_add_ of x_i / N_k, in the batch's order */
        real inv = 1.0f / Nk[y[i]];
        for (int e = 0; e < d; e++) cur[(size_t)y[i] * d + e] += x[(size_t)i * d + e] * inv;
    }
    for (int j = 0; j < K; j++) {                        /* re-normalised, the assigned ones only */
        if (!n[j]) continue;
        real *cj = cur + (size_t)j * d;
        double ss = 0;
        for (int e = 0; e < d; e++) ss += (double)cj[e] * cj[e];
        real nrm = (real)sqrt(ss), den = nrm > 1e-12f ? nrm : 1e-12f;
        for (int e = 0; e < d; e++) cj[e] /= den;
    }
}

/* K3, K4 and the labels' write (K6), after the loss */
static int coke_update(ExcbModel *m) {
    const ExcbConfig *c = &m->cfg;
    const ExcbCokeConfig *k = &c->coke;
    int B = c->batch, d = c->d, used = 0;
    long N = coke_n_images(c);
    const int32_t *y = m->mbuf[COKE_ASSIGN];
    const real *x = m->mbuf[COKE_X];
    int32_t *labels = m->mbuf[COKE_LABELS], *counts = m->mbuf[COKE_COUNTS];
    int64_t image[B];
    for (int i = 0; i < B; i++) image[i] = coke_image(m, i);
    const int64_t *images = image;
    if (m->comm) {
        /* data parallel (section 10b): the global batch's assignments, rows and images, in the single
           process's order, so that every rank makes the one process's update of the shared state */
        int R = m->comm->size;
        int32_t *ya = m->mbuf[COKE_ASSIGN_ALL];
        for (int h = 0; h < k->n_heads; h++)
            excb_comm_gather(m->comm, y + (size_t)h * B, ya + (size_t)h * B * R, sizeof(int32_t) * B);
        excb_comm_gather(m->comm, x, m->mbuf[COKE_X_ALL], sizeof(real) * B * d);
        excb_comm_gather(m->comm, image, m->mbuf[COKE_INDEX_ALL], sizeof(int64_t) * B);
        gather_step_labels(m);                                   /* the run's monitors */
        y = ya;
        x = m->mbuf[COKE_X_ALL];
        images = m->mbuf[COKE_INDEX_ALL];
        B *= R;
    }
    for (int h = 0; h < k->n_heads; h++) {
        int K = k->k[h], off = coke_head_offset(c, h);
        int32_t *n = counts + off;
        int distinct = distinct_labels(n, y + h * B, B, K);
        if (h == 0) used = distinct;
        coke_dual_update((real *)m->mbuf[COKE_DUALS] + off, n, K, B, k->eta, k->gamma);
        coke_centre_update((real *)m->mbuf[COKE_CUR] + (size_t)off * d, (real *)m->mbuf[COKE_COUNTERS] + off, n,
                           y + h * B, x, B, K, d);
        for (int i = 0; i < B; i++) labels[(size_t)h * N + images[i]] = y[h * B + i];         /* K6 */
    }
    return used;
}

static int coke_diagnostics(const ExcbModel *m, const char **names, double *values) {
    const ExcbConfig *c = &m->cfg;
    const real *rho = m->mbuf[COKE_DUALS];
    int K = c->coke.k[0], raised = 0;
    double mx = 0;
    for (int j = 0; j < K; j++) { raised += rho[j] > 0; mx = fmax(mx, rho[j]); }
    names[0] = "coke_dual_max"; values[0] = mx;                  /* head 0 */
    names[1] = "coke_dual_positive_frac"; values[1] = (double)raised / K;
    names[2] = "coke_label_mib"; values[2] = 4.0 * c->coke.n_heads * coke_n_images(c) / (1 << 20);
    return 3;
}

static const ExcbSetting coke_settings[] = {
    {"coke_k", EXCB_KEY_INTLIST, MC(coke.k), EXCB_MAX_HEADS, MC(coke.n_heads), 1, 0, 0, "3000,4000,5000", NULL, "CoKe: K of each clustering head (K7; the key K is not used)"},
    {"coke_tau", EXCB_KEY_DOUBLE, MC(coke.tau), 0, 0, 1, 1e-6, 1e6, "0.05", NULL, "CoKe: temperature T of the cross-entropy (K7; 0.1 with a single view)"},
    {"coke_beta", EXCB_KEY_DOUBLE, MC(coke.beta), 0, 0, 1, 0, 1, "0.5", NULL, "CoKe: weight of the predictor branch, 1 - beta the projection's (K7)"},
    {"coke_gamma", EXCB_KEY_DOUBLE, MC(coke.gamma), 0, 0, 1, 0, 1, "0.4", NULL, "CoKe: a cluster's lower bound, gamma / K of the data (K3)"},
    {"coke_num_images", EXCB_KEY_LONG, MC(n_images), 0, 0, 1, 0, 1e12, "0", NULL, "CoKe: images that keep a label, N (0: the training set's size, which the run writes here)"},
    {"coke_eta", EXCB_KEY_DOUBLE, MC(coke.eta), 0, 0, 1, 0, 1e6, "20", NULL, "CoKe: step of the dual variables (K3)"},
};

static const ExcbMethod method_coke = {
    .name = "coke", .summary = "CoKe: online constrained k-means, dual variables and a label per image (K1-K7)",
    .pairing = EXCB_PAIRING_SWAPPED, .cuda = 0, .no_prototypes = 1, .student_only = 1, .predictor = 1, .bn_rows = 1,
    .per_image = 1, .ranks = 1,
    .settings = coke_settings, .n_settings = sizeof coke_settings / sizeof coke_settings[0],
    .buffers = coke_buffers, .validate = coke_validate, .init = coke_init, .begin_step = coke_begin_step,
    .loss = coke_loss, .update = coke_update, .label_range = coke_label_range, .diagnostics = coke_diagnostics,
};

/* ------------------------------------------------------------------------------------------------
 * 5.5 CARP: consistent assignment over random partitions (paper_notes.md §5c; arXiv 2310.12692,
 *     sthalles/carp modules/random_partition.py and carp_loss.py)
 * ------------------------------------------------------------------------------------------------
 *   R1: z = h c^T            the projection as it is (CARP's head: no L2-normalised input), c = v/||v||;
 *                            the teacher's zt the same from its own h and c
 *   R2: a permutation pi of the K prototypes per step, a pure function of (seed, step); block b holds
 *       pi[b N_B .. (b+1) N_B)  (the official code draws it on rank 0 and broadcasts it)
 *   R3: p_{u,i}^b = softmax over block b of z_{u,i} (student crop u), q_{v,i}^b the same for teacher
 *       view v, detached; no temperature
 *   R4: L_c = -(1/|M|) sum_{(u,v) in M} mean_{b,i} log clamp(<p_{u,i}^b, q_{v,i}^b>, eps, 1 - eps),
 *       M: every student crop u with every teacher view v != u; eps = FLT_EPSILON
 *   R5: L_h = mean_b [ log N_B + sum_c pbar_c^b log clamp(pbar_c^b, eps, 1 - eps) ] = KL(pbar^b || uniform),
 *       pbar^b the mean of the block distributions over every student row and every teacher row
 *   L = L_c + L_h.  Backward, per row and block: g = dL/dp (R4's -q/<p,q> where unclamped, plus R5's
 *   (log pbar + 1) / (N_P rows)), then dz = p (g - <p, g>) (the softmax's Jacobian).
 * Balance comes from R5 alone, per block of N_B: a batch needs to cover a block (N_B = 512), not all K.
 */
enum { CARP_PERM, CARP_GRAD, CARP_PBAR, CARP_COUNTS, CARP_N_BUFFERS };

static int carp_buffers(const ExcbConfig *c, ExcbBuffer *b) {
    size_t rows = (size_t)(c->n_global + c->n_local) * c->batch;
    b[CARP_PERM] = (ExcbBuffer){"partition", (size_t)c->K, 0, 1};                    /* pi, R2        */
    b[CARP_GRAD] = (ExcbBuffer){"grad_p", rows * c->K, 0, 0};                        /* dL/dp, R4, R5 */
    b[CARP_PBAR] = (ExcbBuffer){"pbar", 2 * (size_t)c->K, 0, 0};                     /* K doubles     */
    b[CARP_COUNTS] = (ExcbBuffer){"counts", (size_t)c->K, 0, 1};
    return CARP_N_BUFFERS;
}

static int carp_validate(const ExcbConfig *c, char *err) {
    if (c->K % c->carp.block)
        return fail(err, EXCB_EXIT_CONFIG, "CARP splits the K = %d prototypes into blocks of carp_block = %d: K must be a "
                    "multiple of it", c->K, c->carp.block);
    return 0;
}

/* R2: Fisher-Yates, the swap of position i drawn from (seed, PARTITION, step, i) */
void carp_partition(int32_t *perm, int K, uint64_t seed, long step) {
    for (int k = 0; k < K; k++) perm[k] = k;
    for (int i = K - 1; i > 0; i--) {
        int j = (int)(excb_hash(seed, EXCB_RNG_PARTITION, (uint64_t)step, (uint64_t)i, 0) % (uint64_t)(i + 1));
        int32_t t = perm[i];
        perm[i] = perm[j];
        perm[j] = t;
    }
}

/* R3 on N rows of K in place: each block's scores become its softmax */
static void block_softmax(real *z, int N, int K, const int32_t *perm, int nb) {
#pragma omp parallel for schedule(static)
    for (int r = 0; r < N; r++) {
        real *zr = z + (size_t)r * K;
        for (int b0 = 0; b0 < K; b0 += nb) {
            const int32_t *blk = perm + b0;
            real mx = -INFINITY;
            for (int c = 0; c < nb; c++) mx = fmax(mx, zr[blk[c]]);
            double se = 0;
            for (int c = 0; c < nb; c++) {
                real e = exp(zr[blk[c]] - mx);
                zr[blk[c]] = e;
                se += e;
            }
            real inv = (real)(1.0 / se);
            for (int c = 0; c < nb; c++) zr[blk[c]] *= inv;
        }
    }
}

/* R3-R5 and the backward. z: the U*B student rows (U crops, view-major), overwritten with dL/dz; q: the
   Vg*B teacher rows' block distributions, made here from zt; g (U*B, K) and pbar (K doubles), row_loss
   (U*B doubles): scratch. The partition perm holds K / nb blocks of nb. Returns L_c + L_h. */
double carp_loss_forward_backward(real *z, real *q, const real *zt, real *g, double *pbar, double *row_loss,
                                  const int32_t *perm, int U, int Vg, int B, int K, int nb, ExcbComm *comm) {
    int NP = K / nb, n_dir = U * B, NG = Vg * B, n_all = n_dir + NG;
    const real eps = FLT_EPSILON, one = 1.0f - FLT_EPSILON;
    real *p = z;
    memcpy(q, zt, sizeof(real) * (size_t)NG * K);
    block_softmax(p, n_dir, K, perm, nb);                                                    /* R3 */
    block_softmax(q, NG, K, perm, nb);
    int pairs = 0;
    for (int u = 0; u < U; u++)
        for (int v = 0; v < Vg; v++) pairs += u != v;
    double scale_c = 1.0 / ((double)pairs * NP * B);
#pragma omp parallel for schedule(static)
    for (int r = 0; r < n_dir; r++) {                                                        /* R4 */
        int u = r / B, i = r % B;
        real *gr = g + (size_t)r * K;
        const real *pr = p + (size_t)r * K;
        memset(gr, 0, sizeof(real) * K);
        double lr = 0;
        for (int v = 0; v < Vg; v++) {
            if (v == u) continue;
            const real *qv = q + ((size_t)v * B + i) * K;
            for (int b0 = 0; b0 < K; b0 += nb) {
                const int32_t *blk = perm + b0;
                double s = 0;
                for (int cc = 0; cc < nb; cc++) s += (double)pr[blk[cc]] * qv[blk[cc]];
                real sf = (real)s, cl = fmin(fmax(sf, eps), one);
                lr -= log(cl);
                if (sf >= eps && sf <= one) {                   /* the clamp passes its gradient */
                    real w = (real)(-scale_c / s);
                    for (int cc = 0; cc < nb; cc++) gr[blk[cc]] += w * qv[blk[cc]];
                }
            }
        }
        row_loss[r] = lr;
    }
    double lc = 0;
    for (int r = 0; r < n_dir; r++) lc += row_loss[r];        /* a fixed order: any thread count */
    lc *= scale_c;
#pragma omp parallel for schedule(static)
    for (int k = 0; k < K; k++) {                                                            /* R5 */
        double acc = 0;
        for (int r = 0; r < n_dir; r++) acc += p[(size_t)r * K + k];
        for (int r = 0; r < NG; r++) acc += q[(size_t)r * K + k];
        pbar[k] = acc;
    }
    /* data parallel (section 10b): p-bar is the global batch's mean; each rank's gradient below keeps its
       own rows' 1 / n_all, which the ranks' gradient mean turns into the global 1 / (R n_all) */
    if (comm) excb_comm_sum_f64(comm, pbar, K);
    double n_pbar = (double)n_all * (comm ? comm->size : 1);
    for (int k = 0; k < K; k++) pbar[k] = pbar[k] / n_pbar;
    double lh = 0;
    for (int k = 0; k < K; k++) {
        real pk = (real)pbar[k], cl = fmin(fmax(pk, eps), one);
        lh += (double)pk * log(cl);
        /* from here pbar holds R5's gradient per student value: d/dpbar (pbar log clamp(pbar)) / (N_P rows) */
        pbar[k] = (log(cl) + (pk >= eps && pk <= one ? 1.0 : 0.0)) / ((double)NP * n_all);
    }
    lh = lh / NP + log((double)nb);
#pragma omp parallel for schedule(static)
    for (int r = 0; r < n_dir; r++) {                  /* the softmax's backward, block by block */
        real *pr = p + (size_t)r * K, *gr = g + (size_t)r * K;
        for (int b0 = 0; b0 < K; b0 += nb) {
            const int32_t *blk = perm + b0;
            double dot = 0;
            for (int cc = 0; cc < nb; cc++) {
                gr[blk[cc]] += (real)pbar[blk[cc]];
                dot += (double)pr[blk[cc]] * gr[blk[cc]];
            }
            real dotf = (real)dot;
            for (int cc = 0; cc < nb; cc++) pr[blk[cc]] = pr[blk[cc]] * (gr[blk[cc]] - dotf);   /* dL/dz */
        }
    }
    return lc + lh;
}

static double carp_loss(ExcbModel *m) {
    const ExcbConfig *c = &m->cfg;
    carp_partition(m->mbuf[CARP_PERM], c->K, c->seed, m->step);                             /* R2 */
    return carp_loss_forward_backward(m->z_dir, m->q, m->zt, m->mbuf[CARP_GRAD], m->mbuf[CARP_PBAR], m->row_loss,
                                      m->mbuf[CARP_PERM], m->n_dir_crops, c->n_global, c->batch, c->K, c->carp.block,
                                      m->comm);
}

/* no state; A21's labels: the teacher's argmax over all K raw scores */
static int carp_update(ExcbModel *m) {
    int NG = m->cfg.n_global * m->cfg.batch;
    row_argmax(m->labels, m->zt, NG, m->cfg.K);
    if (m->comm) gather_step_labels(m);                 /* the global batch's (section 10b) */
    return distinct_labels(m->mbuf[CARP_COUNTS], m->labels_all, global_rows(m), m->cfg.K);
}

static const ExcbSetting carp_settings[] = {
    {"carp_block", EXCB_KEY_INT, MC(carp.block), 0, 0, 1, 1, 1 << 24, "512", NULL, "CARP: prototypes per block of the random partition N_B; K must be a multiple (R2)"},
};

static const ExcbMethod method_carp = {
    .name = "carp", .summary = "CARP: random partitions of the prototypes, per-block consistency and uniformity (R1-R5)",
    .pairing = EXCB_PAIRING_SWAPPED, .cuda = 0, .raw_rows = 1, .ranks = 1,
    .settings = carp_settings, .n_settings = sizeof carp_settings / sizeof carp_settings[0],
    .buffers = carp_buffers, .validate = carp_validate, .loss = carp_loss, .min_views = 2, .update = carp_update,
};

/* ------------------------------------------------------------------------------------------------
 * 5.6 mvbt: multi-view Barlow Twins, a method without prototypes (paper_notes.md §5c; arXiv 2312.10725,
 *     kumarkrishna/fastssl fastssl/models/barlow_twins.py BarlowTwinLoss)
 * ------------------------------------------------------------------------------------------------
 *   T1: zn = (z - mean) / std over all A B rows together, per feature (torch.std: divisor A B - 1);
 *       z: the projection of every crop as it is, A = Vg + Vl views, zn_a its view a (B, d)
 *   T2 (A = 2): C = zn_0^T zn_1 / B;  L = sum_k (C_kk - 1)^2 + lambda sum_{k != l} C_kl^2
 *   T3 (A > 2): zbar = (1/A) sum_a zn_a;  on_{a,k} = (1/B) sum_i zn_{a,i,k} zbar_{i,k};
 *       L = (1/A) sum_{a,k} (on_{a,k} - 1)^2 + lambda sum_{k != l} (zbar^T zbar / B)_{kl}^2
 *   lambda = mvbt_lambda_d / d (1/d, the repository's recommendation for d = 128).
 *   Backward: T2: dzn_0 = zn_1 G^T / B, dzn_1 = zn_0 G / B, G = dL/dC (2 (C_kk - 1) on the diagonal,
 *   2 lambda C_kl off it). T3: dzn_a = (2 / (A B)) (on_a - 1) zbar + (1/A) dzbar, with dzbar =
 *   sum_a (2 / (A B)) (on_a - 1) zn_a + (4 lambda / B) zbar Coff. T1: dz = (dzn - mean(dzn) -
 *   zn <dzn, zn> / (A B - 1)) / std, per feature.
 * No teacher, no prototypes, no state: the harness's teacher is only the EMA, used for evaluation.
 */
enum { MVBT_ZN, MVBT_DZN, MVBT_ZBAR, MVBT_DZBAR, MVBT_CC, MVBT_STATS, MVBT_N_BUFFERS };

static int mvbt_buffers(const ExcbConfig *c, ExcbBuffer *b) {
    int A = c->n_global + c->n_local, d = c->d;
    size_t rows = (size_t)A * c->batch;
    b[MVBT_ZN] = (ExcbBuffer){"standardised", rows * d, 0, 0};                       /* zn, T1        */
    b[MVBT_DZN] = (ExcbBuffer){"grad_standardised", rows * d, 0, 0};
    b[MVBT_ZBAR] = (ExcbBuffer){"mean_view", (size_t)c->batch * d, 0, 0};            /* zbar, T3      */
    b[MVBT_DZBAR] = (ExcbBuffer){"grad_mean_view", (size_t)c->batch * d, 0, 0};
    b[MVBT_CC] = (ExcbBuffer){"correlation", 2 * (size_t)d * d, 0, 0};               /* C, then G     */
    b[MVBT_STATS] = (ExcbBuffer){"statistics", 2 * ((size_t)d + (size_t)A * d), 0, 0};   /* doubles */
    return MVBT_N_BUFFERS;
}

static int mvbt_label_range(const ExcbConfig *c) { (void)c; return 0; }      /* no clusters, no labels */

/* T1: z (M, d) -> zn, per feature over all M rows; sd (d doubles) kept for the backward */
void mvbt_standardise(real *zn, double *sd, const real *z, int M, int d, ExcbComm *comm) {
    double mu[d];
    long Mt = (long)M * (comm ? comm->size : 1);       /* data parallel (10b): every rank's rows */
#pragma omp parallel for schedule(static)
    for (int k = 0; k < d; k++) {
        double s = 0;
        for (int r = 0; r < M; r++) s += z[(size_t)r * d + k];
        mu[k] = s;
    }
    if (comm) excb_comm_sum_f64(comm, mu, d);
    for (int k = 0; k < d; k++) mu[k] = mu[k] / Mt;
#pragma omp parallel for schedule(static)
    for (int k = 0; k < d; k++) {
        double ss = 0;
        for (int r = 0; r < M; r++) { double e = z[(size_t)r * d + k] - mu[k]; ss += e * e; }
        sd[k] = ss;
    }
    if (comm) excb_comm_sum_f64(comm, sd, d);
#pragma omp parallel for schedule(static)
    for (int k = 0; k < d; k++) {
        sd[k] = sqrt(sd[k] / (Mt - 1));               /* torch.std: unbiased */
        real muf = (real)mu[k], sdf = (real)sd[k];
        for (int r = 0; r < M; r++) zn[(size_t)r * d + k] = (z[(size_t)r * d + k] - muf) / sdf;
    }
}

/* T1's backward: dz = (dzn - mean(dzn) - zn <dzn, zn> / (M - 1)) / sd, per feature */
void mvbt_standardise_backward(real *dz, const real *dzn, const real *zn, const double *sd, int M, int d,
                               ExcbComm *comm) {
    double sums[2 * d];                                /* s_k, then sz_k */
    long Mt = (long)M * (comm ? comm->size : 1);
#pragma omp parallel for schedule(static)
    for (int k = 0; k < d; k++) {
        double s = 0, sz = 0;
        for (int r = 0; r < M; r++) { s += dzn[(size_t)r * d + k]; sz += (double)dzn[(size_t)r * d + k] * zn[(size_t)r * d + k]; }
        sums[k] = s;
        sums[d + k] = sz;
    }
    if (comm) excb_comm_sum_f64(comm, sums, 2 * (size_t)d);      /* as SyncBN's backward (10b) */
#pragma omp parallel for schedule(static)
    for (int k = 0; k < d; k++) {
        real mu = (real)(sums[k] / Mt), proj = (real)(sums[d + k] / (Mt - 1)), sdf = (real)sd[k];
        for (int r = 0; r < M; r++) dz[(size_t)r * d + k] = (dzn[(size_t)r * d + k] - mu - zn[(size_t)r * d + k] * proj) / sdf;
    }
}

/* T2 (A = 2) or T3 on the standardised views zn (A*B, d): the loss, and dzn. Scratch: zbar and dzbar
   (B, d), cc (d, d), on (A*d doubles). */
double mvbt_views_loss(real *dzn, const real *zn, real *zbar, real *dzbar, real *cc, double *on, int A, int B, int d,
                       double lambda, ExcbComm *comm) {
    double loss = 0;
    /* data parallel (10b): C and the on-diagonal terms are the global batch's means (1 / (R B), summed
       over ranks); the rows' gradients keep 1 / B, which the ranks' gradient mean makes 1 / (R B) */
    real inv_b = 1.0f / (real)B, inv_all = comm ? 1.0f / (real)(B * comm->size) : inv_b;
    if (A == 2) {                                                                            /* T2 */
        const real *z0 = zn, *z1 = zn + (size_t)B * d;
        matmul_tiled('T', 'N', d, d, B, inv_all, z0, d, z1, d, 0.0f, cc, d);                      /* C         */
        if (comm) excb_comm_sum_real(comm, cc, (size_t)d * d, 0);
        for (int k = 0; k < d; k++)
            for (int l = 0; l < d; l++) {                                                    /* C -> G    */
                double ckl = cc[(size_t)k * d + l];
                if (k == l) { loss += (ckl - 1) * (ckl - 1); cc[(size_t)k * d + l] = (real)(2 * (ckl - 1)); }
                else { loss += lambda * ckl * ckl; cc[(size_t)k * d + l] = (real)(2 * lambda * ckl); }
            }
        matmul_tiled('N', 'T', B, d, d, inv_b, z1, d, cc, d, 0.0f, dzn, d);                        /* zn_1 G^T / B */
        matmul_tiled('N', 'N', B, d, d, inv_b, z0, d, cc, d, 0.0f, dzn + (size_t)B * d, d);        /* zn_0 G / B   */
        return loss;
    }
    for (size_t e = 0; e < (size_t)B * d; e++) {                                             /* T3 */
        real acc = 0.0f;
        for (int a = 0; a < A; a++) acc += zn[(size_t)a * B * d + e];
        zbar[e] = acc / (real)A;
    }
    for (int a = 0; a < A; a++)
        for (int k = 0; k < d; k++) {
            double acc = 0;
            for (int i = 0; i < B; i++) acc += (double)zn[((size_t)a * B + i) * d + k] * zbar[(size_t)i * d + k];
            on[a * d + k] = acc;
        }
    if (comm) excb_comm_sum_f64(comm, on, (size_t)A * d);
    long B_all = (long)B * (comm ? comm->size : 1);
    for (int a = 0; a < A; a++)
        for (int k = 0; k < d; k++) {
            on[a * d + k] = on[a * d + k] / B_all;
            loss += (on[a * d + k] - 1) * (on[a * d + k] - 1) / A;
        }
    matmul_tiled('T', 'N', d, d, B, inv_all, zbar, d, zbar, d, 0.0f, cc, d);                      /* zbar^T zbar / B */
    if (comm) excb_comm_sum_real(comm, cc, (size_t)d * d, 0);
    for (int k = 0; k < d; k++)
        for (int l = 0; l < d; l++) {
            double ckl = cc[(size_t)k * d + l];
            if (k != l) loss += lambda * ckl * ckl;
            cc[(size_t)k * d + l] = k == l ? 0.0f : (real)(4 * lambda / B * ckl);           /* 4 lambda Coff / B */
        }
    matmul_tiled('N', 'N', B, d, d, 1.0f, zbar, d, cc, d, 0.0f, dzbar, d);                       /* the redundancy's dzbar */
    for (int i = 0; i < B; i++)
        for (int k = 0; k < d; k++) {
            real acc = dzbar[(size_t)i * d + k];
            for (int a = 0; a < A; a++)
                acc += (real)(2.0 / ((double)A * B) * (on[a * d + k] - 1)) * zn[((size_t)a * B + i) * d + k];
            dzbar[(size_t)i * d + k] = acc;
        }
    for (int a = 0; a < A; a++)
        for (int i = 0; i < B; i++)
            for (int k = 0; k < d; k++) {
                size_t e = ((size_t)a * B + i) * d + k;
                dzn[e] = (real)(2.0 / ((double)A * B) * (on[a * d + k] - 1)) * zbar[(size_t)i * d + k]
                       + dzbar[(size_t)i * d + k] / (real)A;
            }
    return loss;
}

static double mvbt_loss(ExcbModel *m) {
    const ExcbConfig *c = &m->cfg;
    int B = c->batch, d = c->d, A = m->n_dir_crops, M = A * B;
    real *zn = m->mbuf[MVBT_ZN], *dzn = m->mbuf[MVBT_DZN];
    double *sd = m->mbuf[MVBT_STATS], *on = sd + d;
    mvbt_standardise(zn, sd, m->u_dir, M, d, m->comm);             /* u_dir: the raw rows (M, d) */
    double loss = mvbt_views_loss(dzn, zn, m->mbuf[MVBT_ZBAR], m->mbuf[MVBT_DZBAR], m->mbuf[MVBT_CC], on, A, B, d,
                                  c->mvbt.lambda_d / d, m->comm);
    mvbt_standardise_backward(m->du_dir, dzn, zn, sd, M, d, m->comm);
    return loss;
}

static int mvbt_update(ExcbModel *m) { (void)m; return 0; }

static const ExcbSetting mvbt_settings[] = {
    {"mvbt_lambda_d", EXCB_KEY_DOUBLE, MC(mvbt.lambda_d), 0, 0, 1, 0, 1e6, "1", NULL, "mvbt: lambda times d, the off-diagonal weight (T2, T3; 1: lambda = 1/d)"},
};

static const ExcbMethod method_mvbt = {
    .name = "mvbt", .summary = "multi-view Barlow Twins (2312.10725): standardised views against their mean, no prototypes (T1-T3)",
    .pairing = EXCB_PAIRING_SWAPPED, .cuda = 0, .no_prototypes = 1, .raw_rows = 1, .student_only = 1, .ranks = 1,
    .settings = mvbt_settings, .n_settings = sizeof mvbt_settings / sizeof mvbt_settings[0],
    .buffers = mvbt_buffers, .loss = mvbt_loss, .min_views = 2, .update = mvbt_update,
    .label_range = mvbt_label_range,
};

/* ------------------------------------------------------------------------------------------------
 * 5.7 The list of methods: a new rule is a subsection above and one line here
 * ------------------------------------------------------------------------------------------------ */
const ExcbMethod *const excb_methods[] = {&method_excb, &method_none, &method_dino, &method_swav, &method_coke,
                                          &method_carp, &method_mvbt, NULL};

void *excb_method_buffer(const ExcbModel *m, const char *name) {
    for (int i = 0; i < m->n_mbuf; i++)
        if (!strcmp(m->mbuf_spec[i].name, name)) return m->mbuf[i];
    return NULL;
}

int excb_centroids_frozen(const ExcbModel *m) {
    return m->method->centroids_frozen && m->method->centroids_frozen(m);
}

void excb_method_bind_state(ExcbModel *m) {
    size_t off = 0;
    for (int i = 0; i < m->n_mbuf; i++)
        if (m->mbuf_spec[i].state) {
            m->mbuf[i] = m->mstate + off;
            off += (m->mbuf_spec[i].floats + 15) / 16 * 16;        /* 64-byte aligned, as the arena */
        }
}

/* ================================================================================================
 * 6. Student predictions, the loss (E7, E8) and its gradient (E11), for either pairing
 * ================================================================================================
 *   E7:  p_{u,i} = softmax(z^S_{u,i} / tau_s),   tau_s = 0.1
 *   E8:  L = (1/|M|) sum_{(v,u) in M} (1/B) sum_i sum_k -q_{v,i,k} log p_{u,i,k}
 * Every balancing rule here trains the student by this cross-entropy against its own targets q (SwAV
 * calls it swapped prediction; CoKe, CARP and mvbt bring their own loss); what differs is M, the
 * pairing (paper_notes.md §6):
 *   EXCB (A7): the student rows are the direct similarities of the Vg global crops (E1), then the
 *     predictor's similarities (E10b) of all Vg + Vl crops. Teacher view v is matched with the direct
 *     row of every OTHER global view and with EVERY predictor row, its own view included:
 *     |M| = Vg(Vg-1) + Vg(Vg+Vl) = 2 + 16 = 18. The direct local rows are never matched, so they are not
 *     computed (the official code computes and discards them; nothing depends on them).
 *   SWAPPED (DINO, SwAV): the direct rows of all Vg + Vl crops, no predictor; teacher view v is matched
 *     with every crop but its own: |M| = Vg(Vg+Vl-1) = 14.
 *   E11: for one term, dL/dl_k = p_k - q_k (sum q = 1), and l = z / tau_s. Summed over the
 *        n_u teacher views that match row u:   dL/dz_k = (n_u p_k - sum_v q_{v,k}) / (tau_s |M| B)
 * z_dir is (n_dir_crops*B, K) and z_pred ((Vg+Vl)*B, K) or absent; both are overwritten with dL/dz. The
 * loss of each row goes to row_loss, then rows are summed in order (a sum no thread count changes).
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

/* |M|: a direct row of a global crop meets the Vg - 1 other views, of a local crop all Vg; a predictor
   row all Vg */
int excb_loss_terms(int n_dir_crops, int with_pred, int Vg, int Vl) {
    int global_dir = n_dir_crops < Vg ? n_dir_crops : Vg;
    return global_dir * (Vg - 1) + (n_dir_crops - global_dir) * Vg + (with_pred ? Vg * (Vg + Vl) : 0);
}

double excb_loss_forward_backward(real *z_dir, int n_dir_crops, real *z_pred, double *row_loss, const real *q,
                                  int Vg, int Vl, int B, int K, double tau_s) {
    int n_terms = excb_loss_terms(n_dir_crops, z_pred != NULL, Vg, Vl);   /* 18 (EXCB), 14 (SWAPPED) */
    double scale = 1.0 / (tau_s * n_terms * B);
    int n_dir = n_dir_crops * B, n_rows = n_dir + (z_pred ? (Vg + Vl) * B : 0);
#pragma omp parallel for schedule(static)
    for (int r = 0; r < n_rows; r++) {
        if (r < n_dir)        /* direct row of crop u: matched by every other teacher view       */
            row_loss[r] = loss_row(z_dir + (size_t)r * K, q, B, K, r % B, Vg, r / B < Vg ? r / B : -1, tau_s, scale);
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
 *          cosine(lr_peak, lr_peak 1e-4, t - W, T - W). Not scaled by the batch size (A19; the switch
 *          lr_scaling scales lr_peak by B / lr_base_batch or its square root, lr_peak_for)
 *   teacher temperature tau_t, constant (A18); tau_t_warmup_epochs > 0: DINO's linear warm-up
 *   centroid wd(t) = wd (1 + 9 (1 + cos(pi t/T))/2): 10x -> 1x, "wdx10c1" (A10)
 *   teacher momentum(step) = 1 - (1 - 0.996)(1 + cos(pi step/T))/2, step counted from 0
 *   crop scale s_min(e) = 0.14 + 0.06 (1 + cos(pi e/E)), once per epoch (A11)
 */
double lr_at(long t, long T, long W, double lr_peak, double lr_min_factor) {
    if (t < W) return lr_peak * t / W;
    if (T <= W) return lr_peak;        /* a warm-up as long as the run: no cosine part (not 0/0 = NaN) */
    double lr_min = lr_peak * lr_min_factor;
    return lr_min + 0.5 * (lr_peak - lr_min) * (1 + cos(M_PI * (t - W) / (T - W)));
}

double centroid_wd_at(long t, long T, double wd, double boost) {
    return wd * (0.5 * (1 + cos(M_PI * t / T)) * boost + 1);
}

double ema_momentum_at(long step, long T, double start) {
    return 1.0 + 0.5 * (start - 1.0) * (1 + cos(M_PI * step / T));
}

/* A18 / DINO's D3: the teacher temperature of step `step`, linspace(tau_t_warmup, tau_t, W)[e] in epoch
   e < W (numpy's values: the last is exactly tau_t), then tau_t. W = 0 (ExCB's code): constant tau_t. */
double teacher_tau_at(const ExcbConfig *c, long step) {
    long epoch = step / c->steps_per_epoch;
    int W = c->tau_t_warmup_epochs;
    if (epoch >= W) return c->tau_t;
    if (W == 1) return c->tau_t_warmup;                            /* numpy.linspace(a, b, 1) = [a]  */
    if (epoch == W - 1) return c->tau_t;                           /* and its last value is exactly b */
    return epoch * ((c->tau_t - c->tau_t_warmup) / (W - 1)) + c->tau_t_warmup;
}

/* A19's switch: the peak lr for batch B, lr (none: the code), lr B / B0 (linear), lr sqrt(B / B0) */
double lr_peak_for(const ExcbConfig *c) {
    double ratio = (double)c->batch * (c->ranks > 1 ? c->ranks : 1) / c->lr_base_batch;   /* the global batch */
    return c->lr_scaling == EXCB_LR_LINEAR ? c->lr_peak * ratio : c->lr_scaling == EXCB_LR_SQRT ? c->lr_peak * sqrt(ratio)
         : c->lr_peak;
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
        if (t == m->centroids && excb_centroids_frozen(m)) continue;   /* SwAV's frozen prototypes, S3 */
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
/* The settings' defaults come from their rows of the key table (section 14); what is left here is
   what no setting chooses: the number of global views, the normalisation constants, the schedule's
   length (excb train derives it from the data set and the epochs). */
static void model_defaults_from_table(ExcbConfig *c);
static void config_defaults(ExcbConfig *c) {
    memset(c, 0, sizeof *c);
    model_defaults_from_table(c);
    c->n_global = 2;
    c->optimizer = EXCB_OPT_SGD;
    c->bn_eps = 1e-5;
    c->bn_momentum = 0.1;
    c->norm_eps = 1e-12;
    c->total_steps = 500400;       /* ResNet-50, 400 epochs at B = 1024 on ImageNet-1k            */
    c->warmup_steps = 12510;       /* 10 epochs of the same                                       */
    c->steps_per_epoch = 1251;
}

int excb_config_named(ExcbConfig *c, const char *name) {
    config_defaults(c);
    snprintf(c->name, sizeof c->name, "%s", name);
    if (!strcmp(name, "resnet20s")) {         /* ResNet-20 for 28x28 grayscale, the small default */
        c->block = EXCB_BLOCK_BASIC; c->stem = EXCB_STEM_CIFAR; c->in_ch = 1; c->n_stages = 3;
        c->widths[0] = 16; c->widths[1] = 32; c->widths[2] = 64;
        c->blocks[0] = c->blocks[1] = c->blocks[2] = 3;
        c->hidden = 512; c->global_size = 28; c->local_size = 12; c->batch = 256;
    } else if (!strcmp(name, "resnet8s")) {   /* ResNet-8: resnet20s with one block per stage     */
        c->block = EXCB_BLOCK_BASIC; c->stem = EXCB_STEM_CIFAR; c->in_ch = 1; c->n_stages = 3;
        c->widths[0] = 16; c->widths[1] = 32; c->widths[2] = 64;
        c->blocks[0] = c->blocks[1] = c->blocks[2] = 1;
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
        c->total_steps = 100; c->warmup_steps = 10; c->steps_per_epoch = 10;
    } else if (!strcmp(name, "tiny50")) {     /* Bottleneck + ImageNet stem + max-pool, for tests */
        c->block = EXCB_BLOCK_BOTTLENECK; c->stem = EXCB_STEM_IMAGENET; c->in_ch = 3; c->n_stages = 2;
        c->widths[0] = 2; c->widths[1] = 4; c->blocks[0] = 1; c->blocks[1] = 2;
        c->hidden = 16; c->d = 8; c->K = 16; c->global_size = 16; c->local_size = 8; c->batch = 4;
        c->total_steps = 100; c->warmup_steps = 10; c->steps_per_epoch = 10;
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

/* Running statistics of one BatchNorm, added right after its weight and bias: mean[C] then var[C] in
   `running`; recorded for the init and for PyTorch's buffer names (section 16b). */
static size_t add_bn_stats(ExcbModel *m, int C) {
    size_t off = m->n_running;
    m->bn_beta[m->n_bn] = m->n_tensors - 1;       /* its shift was the last tensor added */
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
    m->centroids = m->n_protos ? add_tensor(m, EXCB_GROUP_CENTROID, 2, c->K, c->d, 0, 0, "classifier.centroid_layer.weight_v")
                               : -1;                      /* a method without prototypes (CoKe, mvbt)   */
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
 *           replaces it by k-means, paper_notes.md §9: not implemented yet)
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
    if (m->method->init) m->method->init(m);                                         /* the method's state at step 0 */
    m->step = 0;
}

/* --- activation arenas: one bump allocator, run once to count and once to hand out pointers ------- */
typedef struct {
    real *base;                /* NULL: count only                                                    */
    size_t used;               /* floats handed out so far                                            */
    size_t end_global, end_local, end_heads, end_backward;  /* `used` after each part (ExcbMemoryPlan) */
    size_t max_act;            /* the largest backbone activation (one image batch, one unit)         */
    int share_shortcuts;       /* the device layout: shortcuts' BN outputs in a gradient buffer      */
} Arena;
static real *take(Arena *a, size_t n) {
    real *p = a->base ? a->base + a->used : NULL;
    a->used += (n + 15) / 16 * 16;
    return p;
}

/* One conv+BN unit's buffers. keep_a = 0: the BN output is not kept for the backward pass and gets
 * its memory later (a shortcut's in the device layout, see plan_arena). */
static void plan_unit(Arena *ar, ExcbUnitActs *ua, const ExcbConvBN *u, int N, int H, int W, int keep_a,
                      size_t *max_act, size_t *max_col, size_t *max_w) {
    ua->N = N;
    ua->H = conv_out(H, u->k, u->stride, u->pad);
    ua->W = conv_out(W, u->k, u->stride, u->pad);
    size_t n = (size_t)u->cout * N * ua->H * ua->W;
    ua->y = take(ar, n);
    ua->a = keep_a ? take(ar, n) : NULL;
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
    plan_unit(ar, &A->stem, &m->stem, N, H, H, 1, max_act, max_col, max_w);
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
            plan_unit(ar, &A->main[b][j], &blk->main[j], N, h, h, 1, max_act, max_col, max_w);
            h = A->main[b][j].H;
        }
        if (blk->has_down) plan_unit(ar, &A->down[b], &blk->down, N, hin, hin, !ar->share_shortcuts, max_act, max_col, max_w);
    }
}

/* Lays out every buffer of a step; with ar->base == NULL it only counts. */
static void plan_arena(ExcbModel *m, Arena *ar) {
    const ExcbConfig *c = &m->cfg;
    int B = c->batch, NG = c->n_global * B, NS = (c->n_global + c->n_local) * B, K = m->n_protos, d = c->d;
    int Hd = c->hidden, D = m->D;
    size_t max_act = 0, max_col = 0, max_w = 0;
    plan_backbone(m, ar, &m->act_global, NG, c->global_size, &max_act, &max_col, &max_w);
    ar->end_global = ar->used;
    if (c->n_local > 0) plan_backbone(m, ar, &m->act_local, c->n_local * B, c->local_size, &max_act, &max_col, &max_w);
    ar->end_local = ar->used;
    int n_dir = m->n_dir_crops * B, pred = m->with_pred;
    m->f = take(ar, (size_t)D * NS);
    for (int l = 0; l < 3; l++) {
        int out = m->proj[l].out;
        m->proj_act.y[l] = l < 2 ? take(ar, (size_t)out * NS) : NULL;
        m->proj_act.a[l] = take(ar, (size_t)out * NS);
        m->proj_act.mean[l] = l < 2 ? take(ar, out) : NULL;
        m->proj_act.rstd[l] = l < 2 ? take(ar, out) : NULL;
    }
    m->h = m->proj_act.a[2];
    if (pred) {                    /* the predictor (E10) runs in the EXCB pairing (and for CoKe) only */
        m->pre_y = take(ar, (size_t)d * NS);
        m->pre_mean = take(ar, d);
        m->pre_rstd = take(ar, d);
        m->pred_y = take(ar, (size_t)Hd * NS);
        m->pred_a = take(ar, (size_t)Hd * NS);
        m->pred_mean = take(ar, Hd);
        m->pred_rstd = take(ar, Hd);
        m->p = take(ar, (size_t)d * NS);
        m->u_pred = take(ar, (size_t)NS * d);
        m->u_pred_den = take(ar, NS);
        m->z_pred = take(ar, (size_t)NS * K);
    }
    m->c = take(ar, (size_t)K * d);
    m->c_inv_norm = take(ar, K);
    m->u_dir = take(ar, (size_t)n_dir * d);
    m->u_dir_den = take(ar, n_dir);
    m->ut = take(ar, (size_t)NG * d);
    m->ut_den = take(ar, NG);
    m->z_dir = take(ar, (size_t)n_dir * K);
    m->q = take(ar, (size_t)NG * K);
    m->zt = take(ar, (size_t)NG * K);
    if (!K) {                                   /* no prototypes: the method's loss gives dL/du    */
        m->du_dir = take(ar, (size_t)n_dir * d);
        m->du_pred = pred ? take(ar, (size_t)NS * d) : NULL;
    }
    m->labels = (int32_t *)take(ar, NG);
    int R = m->cfg.ranks > 1 ? m->cfg.ranks : 1;  /* the global batch's labels, and the ranks' parts (10b) */
    m->labels_all = R > 1 ? (int32_t *)take(ar, (size_t)2 * NG * R) : m->labels;
    m->row_loss = (double *)take(ar, 2 * (size_t)(NG + NS));
    m->qbar = (double *)take(ar, 2 * (size_t)K);      /* K doubles */
    for (int i = 0; i < m->n_mbuf; i++)          /* the method's scratch (its state is not here)   */
        if (!m->mbuf_spec[i].state) m->mbuf[i] = take(ar, m->mbuf_spec[i].floats);
    ar->end_heads = ar->used;
    for (int i = 0; i < 3; i++) m->dbuf[i] = take(ar, max_act);
    /* A shortcut's BN output BN(conv1x1/s(x)) is read once, by the residual add of its block's last
       unit a few operators later in the same forward pass; its backward needs only the shortcut's y,
       mean and rstd and the last unit's ReLU mask. So in the device layout it has no memory of its own:
       it is written into a gradient buffer, which no forward pass uses (ResNet-50 at 2 x 224 + 6 x 96,
       B = 256: 4.45 GiB less). The CPU layout keeps it apart: sharing measured about 5 % slower there
       (2-core AVX-512 machine, resnet8s, 9 of 11 alternating pairs), with the same arithmetic. */
    if (ar->share_shortcuts)
        for (int b = 0; b < m->n_blocks; b++)
            if (m->blocks[b].has_down) m->act_global.down[b].a = m->act_local.down[b].a = m->dbuf[0];
    int widest = D > Hd ? D : Hd;
    widest = widest > d ? widest : d;
    size_t head = (size_t)widest * NS, kd = (size_t)K * d;
    for (int i = 0; i < 3; i++) m->dhead[i] = take(ar, head);
    m->dhead[3] = take(ar, kd > head ? kd : head);       /* also holds the centroid gradient dc */
    ar->end_backward = ar->used;
    m->col = take(ar, max_col * m->max_threads);
    m->slots = take(ar, max_w * EXCB_SLOTS);
    ar->max_act = max_act;
}

/* the views and rows a method's loss needs: section 6's cross-entropy has no term for the excb pairing
   below two global views, or for the swapped one below two views; a method with its own loss reads
   every crop's rows (the swapped pairing's) and needs min_views views (CARP, mvbt: 2; CoKe: 1) */
static int excb_view_counts_check(const ExcbConfig *c, char *err) {
    const ExcbMethod *me = excb_methods[c->method];
    ExcbPairing pairing = c->pairing != EXCB_PAIRING_AUTO ? c->pairing : me->pairing;
    int Vg = c->n_global, Vl = c->n_local;
    if (me->loss && pairing == EXCB_PAIRING_EXCB)
        return fail(err, EXCB_EXIT_CONFIG, "method %s reads every crop's rows with its own loss: pairing = swapped or "
                    "auto, not pairing = excb", me->name);
    if (me->loss && Vg + Vl < (me->min_views > 1 ? me->min_views : 1))
        return fail(err, EXCB_EXIT_CONFIG, "method %s needs %d views at least (n_global + n_local = %d)", me->name,
                    me->min_views, Vg + Vl);
    if (!c->predictor && (me->predictor || me->bn_rows))
        return fail(err, EXCB_EXIT_CONFIG, "method %s reads its predictor's rows: predictor = 0 (A8/A9's switch) is for "
                    "the excb pairing's predictor terms", me->name);
    if (!me->loss && (pairing == EXCB_PAIRING_EXCB ? Vg < 2 : Vg + Vl < 2))
        return fail(err, EXCB_EXIT_CONFIG, "method %s with the %s pairing has no loss term for n_global = %d and n_local = "
                    "%d: it needs %s", me->name, pairing == EXCB_PAIRING_EXCB ? "excb" : "swapped", Vg, Vl,
                    pairing == EXCB_PAIRING_EXCB ? "two global views" : "two views");
    return 0;
}

static int check_config(const ExcbConfig *cfg) {
    if (cfg->n_global < 1 || cfg->batch < 2 || cfg->K < 2 || cfg->n_stages < 1 || cfg->n_stages > EXCB_MAX_STAGES
        || cfg->steps_per_epoch < 1) {
        fprintf(stderr, "excb: config %s: need n_global >= 1, batch >= 2, K >= 2, 1..4 stages, steps_per_epoch >= 1\n",
                cfg->name);
        return -1;
    }
    int n_methods = 0;
    while (excb_methods[n_methods]) n_methods++;
    if (cfg->method < 0 || cfg->method >= n_methods) {
        fprintf(stderr, "excb: config %s: method %d is not one of the %d methods\n", cfg->name, cfg->method, n_methods);
        return -1;
    }
    char err[EXCB_ERR_LEN];              /* the method's own rules (SwAV: a queue of whole batches) */
    if (excb_view_counts_check(cfg, err) || (excb_methods[cfg->method]->validate && excb_methods[cfg->method]->validate(cfg, err))) {
        fprintf(stderr, "excb: config %s: %s\n", cfg->name, err);
        return -1;
    }
    return 0;
}

/* the method, its pairing and its buffers' table: what the arena plan and the state need to know */
static void bind_method(ExcbModel *m) {
    m->method = excb_methods[m->cfg.method];
    m->pairing = m->cfg.pairing != EXCB_PAIRING_AUTO ? m->cfg.pairing : m->method->pairing;
    m->n_dir_crops = m->pairing == EXCB_PAIRING_EXCB ? m->cfg.n_global : m->cfg.n_global + m->cfg.n_local;
    m->with_pred = m->pairing == EXCB_PAIRING_EXCB || m->method->predictor || m->method->bn_rows;
    m->n_protos = m->method->no_prototypes ? 0 : m->cfg.K;
    m->n_labels = m->method->label_range ? m->method->label_range(&m->cfg) : m->cfg.K;
    m->n_mbuf = m->method->buffers(&m->cfg, m->mbuf_spec);
    m->mstate_floats = 0;
    for (int i = 0; i < m->n_mbuf; i++)
        if (m->mbuf_spec[i].state) m->mstate_floats += (m->mbuf_spec[i].floats + 15) / 16 * 16;
}

int excb_build(ExcbModel *m, const ExcbConfig *cfg) {
    memset(m, 0, sizeof *m);
    m->cfg = *cfg;
    if (check_config(cfg)) return -1;
    excb_set_threads(cfg->threads);
    m->max_threads = max_threads();
    bind_method(m);                           /* first: a method may have no prototype tensor     */
    build_structure(m);
    m->params = xmalloc(sizeof(real) * m->n_params);
    m->grads = xmalloc(sizeof(real) * m->n_params);
    m->momentum = xmalloc(sizeof(real) * m->n_params);
    m->teacher = xmalloc(sizeof(real) * m->n_params);
    m->running = xmalloc(sizeof(real) * m->n_running);
    m->teacher_running = xmalloc(sizeof(real) * m->n_running);
    m->mstate = xcalloc(m->mstate_floats ? m->mstate_floats : 1, sizeof(real));   /* padding too: compared, copied */
    excb_method_bind_state(m);
    Arena count = {0};
    plan_arena(m, &count);
    m->arena_floats = count.used;
    m->arena = xmalloc(sizeof(real) * m->arena_floats);
    Arena real = {.base = m->arena};
    plan_arena(m, &real);
    init_params(m);
    m->ops = &excb_cpu_ops;
    return 0;
}

size_t excb_plan_arena(ExcbModel *m, real *base) {
    Arena a = {.base = base, .share_shortcuts = 1};
    plan_arena(m, &a);
    m->col = m->slots = NULL;                 /* CPU scratch: not part of the device layout        */
    return a.end_backward;
}

/* What excb_build would allocate, counted without allocating it: the parameter table and the arena's
 * counting pass, nothing else. */
int excb_memory_plan(const ExcbConfig *cfg, ExcbMemoryPlan *mp) {
    memset(mp, 0, sizeof *mp);
    if (check_config(cfg)) return -1;
    ExcbModel *m = xcalloc(1, sizeof *m);
    m->cfg = *cfg;
    excb_set_threads(cfg->threads);
    m->max_threads = max_threads();
    bind_method(m);
    build_structure(m);
    Arena a = {0}, dev = {.share_shortcuts = 1};
    plan_arena(m, &a);
    plan_arena(m, &dev);
    const size_t f = sizeof(real);
    mp->threads = m->max_threads;
    mp->params = 4 * f * m->n_params;
    mp->state = f * (2 * m->n_running + m->mstate_floats);
    mp->acts_global = f * a.end_global;
    mp->acts_local = f * (a.end_local - a.end_global);
    mp->heads = f * (a.end_heads - a.end_local);
    mp->backward = f * (a.end_backward - a.end_heads);
    mp->cpu_scratch = f * (a.used - a.end_backward);
    mp->gpu_packed = 2 * f * a.max_act;
    mp->gpu_shared_shortcuts = f * (a.end_backward - dev.end_backward);
    free(m);
    return 0;
}

void excb_free(ExcbModel *m) {
    free(m->params); free(m->grads); free(m->momentum); free(m->teacher);
    free(m->running); free(m->teacher_running); free(m->mstate); free(m->arena);
    memset(m, 0, sizeof *m);
}

/* ================================================================================================
 * 9. The network's forward and backward passes, assembled from the operators above
 * ================================================================================================ */
#define PT(base, idx) ((base) + m->tensors[(idx)].offset)     /* tensor idx inside a buffer   */

/* conv + BN (+ReLU), one unit; `residual` (may alias ua->a) is added before the ReLU */
static void unit_forward(ExcbModel *m, const real *P, real *run, ExcbUnitActs *ua, const ExcbConvBN *u,
                         const real *x, int H, int W, const real *residual, int relu) {
    m->ops->conv2d_forward(ua->y, x, PT(P, u->w), m->col, ua->N, u->cin, H, W, u->cout, u->k, u->stride, u->pad);
    if (m->eval_bn) {                        /* feature extraction: CPU only (section 18) */
        batchnorm_inference(ua->a, ua->y, PT(P, u->gamma), PT(P, u->beta), run + u->stats, run + u->stats + u->cout,
                            residual, relu, u->cout, ua->N * ua->H * ua->W, (real)m->cfg.bn_eps, m->ops->channels_last);
        return;
    }
    m->ops->batchnorm_forward(ua->a, ua->mean, ua->rstd, run + u->stats, run + u->stats + u->cout, ua->y,
                              PT(P, u->gamma), PT(P, u->beta), residual, relu, u->cout, ua->N * ua->H * ua->W,
                              (real)m->cfg.bn_eps, (real)m->cfg.bn_momentum, m->ops->channels_last, m->comm);
}

/* x_nchw (N, C, H, H) -> features f[:, col0 .. col0+N) of a (D, ldf) matrix. P: the parameters to
 * use (student or teacher), run: their BN running statistics. */
static void backbone_forward(ExcbModel *m, const real *P, real *run, ExcbBackboneActs *A,
                             const real *x_nchw, real *f, int ldf) {
    int N = A->N, H = A->H;
    m->ops->images_to_features(A->x, x_nchw, N, m->cfg.in_ch, H * H);     /* to the backbone's layout */
    unit_forward(m, P, run, &A->stem, &m->stem, A->x, H, H, NULL, 1);
    const real *cur = A->stem.a;
    int h = A->stem.H;
    if (m->cfg.stem == EXCB_STEM_IMAGENET) {
        m->ops->maxpool_forward(A->pool, A->pool_arg, A->stem.a, m->stem.cout, N, h, h);
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
    m->ops->avgpool_forward(f, ldf, cur, m->D, N, h * h);
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
    m->ops->avgpool_backward(dcur, df, ldf, m->D, N, out->H * out->W);
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
            m->ops->batchnorm_backward(dy, PT(G, u->gamma), PT(G, u->beta), dout, ua->a, ua->y, ua->mean, ua->rstd,
                                       PT(P, u->gamma), 1, u->cout, N * ua->H * ua->W, m->ops->channels_last, m->comm);
            const real *xin = j > 0 ? A->main[b][j - 1].a : block_in;
            int h = j > 0 ? A->main[b][j - 1].H : hin;
            m->ops->conv2d_backward(dx, PT(G, u->w), dy, xin, PT(P, u->w), m->col, m->slots, N, u->cin, h, h,
                                    u->cout, u->k, u->stride, u->pad);
        }
        /* dx now holds the main path's gradient w.r.t. the block input; add the shortcut's */
        size_t n_in = (size_t)blk->main[0].cin * N * hin * hin;
        if (blk->has_down) {
            const ExcbConvBN *u = &blk->down;
            const ExcbUnitActs *ua = &A->down[b];
            m->ops->batchnorm_backward(dy, PT(G, u->gamma), PT(G, u->beta), dcur, ua_last->a, ua->y, ua->mean,
                                       ua->rstd, PT(P, u->gamma), 1, u->cout, N * ua->H * ua->W, m->ops->channels_last,
                                       m->comm);
            m->ops->conv2d_backward(dcur, PT(G, u->w), dy, block_in, PT(P, u->w), m->col, m->slots, N, u->cin,
                                    hin, hin, u->cout, u->k, u->stride, u->pad);
            m->ops->add(dx, dcur, n_in);
        } else {                             /* identity: the ReLU-gated output gradient itself  */
            m->ops->add_gated(dx, dcur, ua_last->a, n_in);
        }
        real *t = dcur;                      /* the block input's gradient is the next dcur      */
        dcur = dx;
        dx = t;
    }
    const real *dstem = dcur;               /* gradient w.r.t. the stem's output (after the pool)  */
    if (m->cfg.stem == EXCB_STEM_IMAGENET) {
        m->ops->maxpool_backward(dx, dcur, A->pool_arg, m->stem.cout, N, A->stem.H, A->stem.W);
        dstem = dx;
    }
    real *dys = dy;                         /* dy is free here in both cases                     */
    m->ops->batchnorm_backward(dys, PT(G, m->stem.gamma), PT(G, m->stem.beta), dstem, A->stem.a, A->stem.y,
                               A->stem.mean, A->stem.rstd, PT(P, m->stem.gamma), 1, m->stem.cout,
                               N * A->stem.H * A->stem.W, m->ops->channels_last, m->comm);
    m->ops->conv2d_backward(NULL, PT(G, m->stem.w), dys, A->x, PT(P, m->stem.w), m->col, m->slots, N,
                            m->cfg.in_ch, A->H, A->H, m->stem.cout, m->stem.k, m->stem.stride, m->stem.pad);
}

/* Linear (+BN+ReLU) layer of a head: x (in, N) -> y (out, N) pre-BN and a (out, N) */
static void head_layer_forward(ExcbModel *m, const real *P, real *run, const ExcbLinear *L,
                               const real *x, real *y, real *a, real *mean, real *rstd, int N) {
    if (!L->has_bn) {
        m->ops->linear_forward(a, x, PT(P, L->w), PT(P, L->b), L->in, L->out, N);
        return;
    }
    m->ops->linear_forward(y, x, PT(P, L->w), PT(P, L->b), L->in, L->out, N);
    if (m->eval_bn) {
        batchnorm_inference(a, y, PT(P, L->gamma), PT(P, L->beta), run + L->stats, run + L->stats + L->out, NULL, 1,
                            L->out, N, (real)m->cfg.bn_eps, 0);
        return;
    }
    m->ops->batchnorm_forward(a, mean, rstd, run + L->stats, run + L->stats + L->out, y, PT(P, L->gamma),
                              PT(P, L->beta), NULL, 1, L->out, N, (real)m->cfg.bn_eps, (real)m->cfg.bn_momentum, 0,
                              m->comm);
}

static void head_layer_backward(ExcbModel *m, const ExcbLinear *L, real *dx, real *da, real *tmp,
                                const real *x, const real *y, const real *a, const real *mean,
                                const real *rstd, int N) {
    const real *P = m->params;
    real *G = m->grads;
    const real *dy = da;
    if (L->has_bn) {
        m->ops->batchnorm_backward(tmp, PT(G, L->gamma), PT(G, L->beta), da, a, y, mean, rstd, PT(P, L->gamma), 1,
                                   L->out, N, 0, m->comm);
        dy = tmp;
    }
    m->ops->linear_backward(dx, PT(G, L->w), PT(G, L->b), dy, x, PT(P, L->w), L->in, L->out, N);
}

/* E0 over N rows of f (D, N) -> h (d, N) = m->h */
static void projector_forward(ExcbModel *m, const real *P, real *run, const real *f, int N) {
    ExcbMLPActs *A = &m->proj_act;
    head_layer_forward(m, P, run, &m->proj[0], f, A->y[0], A->a[0], A->mean[0], A->rstd[0], N);
    head_layer_forward(m, P, run, &m->proj[1], A->a[0], A->y[1], A->a[1], A->mean[1], A->rstd[1], N);
    head_layer_forward(m, P, run, &m->proj[2], A->a[1], NULL, A->a[2], NULL, NULL, N);
}

/* ================================================================================================
 * 10. One training step (trainer.py L84-132; paper_notes.md §8)
 * ================================================================================================
 *  the method:         begin_step (SwAV re-normalises its prototypes, S3)
 *  teacher (no grad):  zt = cos(normalize(g_T(f_T(X_g))), c_T)         E0, E1     (Vg*B, K)
 *                      q  = the method's targets from zt                 ExCB: E4..E6 with r from
 *                                                                        steps < t; DINO D1; SwAV S1
 *  student:            h  = g_S(cat(f_S(X_g), f_S(X_l)))                E0         (d, NS)
 *                      z_dir  = cos(normalize(h[:, direct crops]), c)    E1   (n_dir_crops*B, K)
 *                      z_pred = cos(normalize(P(BN(h))), stopgrad(c))    E10  (NS, K), EXCB pairing
 *  loss and dL/dz:     E7, E8, E11 over the pairing's terms
 *  the method's state: ExCB E2, E3 from argmax q; DINO's centre D2; SwAV's queue S2
 *  backward:           E12, E13 and the network; SGD (E14); teacher EMA (E9)
 * A method with its own loss (section 5.4-5.6) changes three things: its loss replaces E7-E11 (CARP's
 * R3-R5 leave dL/dz; CoKe's K7 and mvbt's T1-T3, which have no prototype layer, leave dL/du of the
 * rows); its rows may be the projection as it is (raw_rows: CARP, mvbt, no E1 normalisation); and a
 * student-only one (CoKe, mvbt) skips the teacher's forward pass.
 */
static void centroids_forward(ExcbModel *m, const real *P) {
    m->ops->weightnorm_forward(m->c, m->c_inv_norm, PT(P, m->centroids), m->cfg.K, m->cfg.d);
}

/* A21's monitors, read before the loss turns z_dir into dL/dz: the teacher's confidence (mean max q),
   the student's (mean max softmax(z_dir / tau_s) over the direct global rows), and the entropy of the
   batch's mean assignment qbar = mean_i q_i (log K: every cluster used equally; 0: one cluster). */
static void cpu_step_diagnostics(const real *q, const real *z, double *per_row, double *qbar, int NG, int K,
                                 double tau_s, double out[3]) {
    double tconf = 0, sconf = 0, h = 0;
#pragma omp parallel for schedule(static)
    for (int i = 0; i < NG; i++) {
        const real *qi = q + (size_t)i * K, *zi = z + (size_t)i * K;
        real qmax = qi[0], zmax = zi[0];
        for (int k = 1; k < K; k++) { qmax = fmax(qmax, qi[k]); zmax = fmax(zmax, zi[k]); }
        double sum = 0;
        for (int k = 0; k < K; k++) sum += exp(((double)zi[k] - zmax) / tau_s);
        per_row[i] = qmax;
        per_row[NG + i] = 1.0 / sum;
    }
#pragma omp parallel for schedule(static)
    for (int k = 0; k < K; k++) {
        double acc = 0;
        for (int i = 0; i < NG; i++) acc += q[(size_t)i * K + k];
        qbar[k] = acc / NG;
    }
    for (int i = 0; i < NG; i++) { tconf += per_row[i]; sconf += per_row[NG + i]; }   /* fixed order: */
    for (int k = 0; k < K; k++)                                                       /* any thread  */
        if (qbar[k] > 0) h -= qbar[k] * log(qbar[k]);                                 /* count       */
    out[0] = tconf / NG;
    out[1] = sconf / NG;
    out[2] = h;
}

static void step_diagnostics(ExcbModel *m, ExcbStepStats *st) {
    if (!m->method->targets) {        /* a method with its own loss has no targets q: no such monitors */
        st->teacher_conf = st->student_conf = st->assign_entropy = NAN;
        return;
    }
    double out[3];        /* row_loss is free until the loss: it holds the per-row maxima meanwhile */
    int NG = m->cfg.n_global * m->cfg.batch, K = m->cfg.K;
    m->ops->step_diagnostics(m->q, m->z_dir, m->row_loss, m->qbar, NG, K, m->cfg.tau_s, out);
    if (m->comm) {             /* the global batch's means (10b): of the ranks' sums, and of their qbar */
        int R = m->comm->size;
        double sums[2] = {out[0] * NG, out[1] * NG};
        excb_comm_sum_f64(m->comm, sums, 2);
        const double *qbar = model_sum_f64_to_host(m, m->qbar, K);
        out[0] = sums[0] / ((double)NG * R);
        out[1] = sums[1] / ((double)NG * R);
        out[2] = 0;
        for (int k = 0; k < K; k++) {
            double qk = qbar[k] / R;
            if (qk > 0) out[2] -= qk * log(qk);
        }
    }
    st->teacher_conf = out[0];
    st->student_conf = out[1];
    st->assign_entropy = out[2];
}

/* The rows a prototype layer (or a method's own loss) reads: u = h / max(||h||, eps) (E1's input), or
   the projection as it is for a method with raw rows (CARP's head, mvbt). x is (d, ldx), u (N, d). */
static void head_rows_forward(ExcbModel *m, real *u, real *den, const real *x, int ldx, int N) {
    if (m->method->raw_rows) m->ops->rows_forward(u, x, ldx, m->cfg.d, N);
    else m->ops->l2norm_rows_forward(u, den, x, ldx, m->cfg.d, N, (real)m->cfg.norm_eps);
}

static void head_rows_backward(ExcbModel *m, real *dx, int ldx, const real *du, const real *u, const real *den, int N) {
    if (m->method->raw_rows) m->ops->rows_backward(dx, ldx, du, m->cfg.d, N);
    else m->ops->l2norm_rows_backward(dx, ldx, du, u, den, m->cfg.d, N, (real)m->cfg.norm_eps, 0);
}

double excb_forward_loss(ExcbModel *m, const real *xg, const real *xl, ExcbStepStats *st) {
    const ExcbConfig *c = &m->cfg;
    int B = c->batch, NG = c->n_global * B, NL = c->n_local * B, NS = NG + NL, K = m->n_protos, d = c->d;
    int n_dir = m->n_dir_crops * B, pred = m->with_pred;
    if (m->method->begin_step) m->method->begin_step(m);
    /* --- teacher: global crops only, its own parameters and BN statistics, no gradient ----------- */
    if (!m->method->student_only) {
        backbone_forward(m, m->teacher, m->teacher_running, &m->act_global, xg, m->f, NG);
        projector_forward(m, m->teacher, m->teacher_running, m->f, NG);
        head_rows_forward(m, m->ut, m->ut_den, m->h, NG, NG);
        if (K) {
            centroids_forward(m, m->teacher);
            m->ops->gemm('N', 'T', NG, K, d, 1.0f, m->ut, d, m->c, d, 0.0f, m->zt, K);      /* E1 */
        }
        if (m->method->targets) m->method->targets(m);     /* q and labels for the whole batch   */
        if (m->method->targets && m->comm) gather_step_labels(m);    /* and the global batch's (10b) */
    }
    /* --- student: backbone once per resolution (A20), heads over all crops ------------------------- */
    backbone_forward(m, m->params, m->running, &m->act_global, xg, m->f, NS);
    if (NL > 0) backbone_forward(m, m->params, m->running, &m->act_local, xl, m->f + NG, NS);
    projector_forward(m, m->params, m->running, m->f, NS);
    if (K) centroids_forward(m, m->params);
    if (pred && !c->predictor) {        /* A8/A9's switch: the identity in the predictor's place */
        head_rows_forward(m, m->u_pred, m->u_pred_den, m->h, NS, NS);
        if (K) m->ops->gemm('N', 'T', NS, K, d, 1.0f, m->u_pred, d, m->c, d, 0.0f, m->z_pred, K);
    } else if (pred) {    /* predictor E10a: BN(d) without ReLU, Linear-BN-ReLU, Linear */
        m->ops->batchnorm_forward(m->pre_y, m->pre_mean, m->pre_rstd, m->running + m->pred_bn_stats,
                                  m->running + m->pred_bn_stats + d, m->h, PT(m->params, m->pred_bn_gamma),
                                  PT(m->params, m->pred_bn_beta), NULL, 0, d, NS, (real)c->bn_eps, (real)c->bn_momentum, 0,
                                  m->comm);
        head_layer_forward(m, m->params, m->running, &m->pred[0], m->pre_y, m->pred_y, m->pred_a, m->pred_mean,
                           m->pred_rstd, NS);
        head_layer_forward(m, m->params, m->running, &m->pred[1], m->pred_a, NULL, m->p, NULL, NULL, NS);
        head_rows_forward(m, m->u_pred, m->u_pred_den, m->p, NS, NS);                  /* E10b       */
        if (K) m->ops->gemm('N', 'T', NS, K, d, 1.0f, m->u_pred, d, m->c, d, 0.0f, m->z_pred, K);
    }
    /* the direct rows: of h, or (bn_rows, CoKe) of BN(h), its projector's last BatchNorm, which is the
       predictor's input BatchNorm here */
    head_rows_forward(m, m->u_dir, m->u_dir_den, m->method->bn_rows ? m->pre_y : m->h, NS, n_dir);
    if (K) m->ops->gemm('N', 'T', n_dir, K, d, 1.0f, m->u_dir, d, m->c, d, 0.0f, m->z_dir, K);
    if (st) step_diagnostics(m, st);
    /* --- the loss; z_dir and z_pred become dL/dz (or, without prototypes, du_dir and du_pred dL/du) - */
    double loss = m->method->loss ? m->method->loss(m)
                : m->ops->loss_forward_backward(m->z_dir, m->n_dir_crops, pred ? m->z_pred : NULL, m->row_loss, m->q,
                                                c->n_global, c->n_local, B, K, c->tau_s);
    if (m->comm) {                       /* the global batch's loss: the mean of the ranks' (10b) */
        excb_comm_sum_f64(m->comm, &loss, 1);
        loss /= m->comm->size;
    }
    if (st) st->loss = loss;
    return loss;
}

void excb_update_method(ExcbModel *m, ExcbStepStats *st) {
    int used = m->method->update(m);
    if (st) {                                              /* A21 collapse monitors             */
        st->unique_labels = used;
        st->empty_clusters = m->n_labels - used;         /* K; CoKe: head 0's; mvbt: 0 */
    }
}

void excb_backward(ExcbModel *m) {
    const ExcbConfig *c = &m->cfg;
    int B = c->batch, NG = c->n_global * B, NL = c->n_local * B, NS = NG + NL, K = m->n_protos, d = c->d;
    int n_dir = m->n_dir_crops * B;
    const real *P = m->params;
    real *G = m->grads;
    m->ops->zero(G, m->n_params);                          /* the one place gradients are zeroed */
    /* Four scratch buffers of (max(D, Hd, d), NS) floats (the fourth also holds dc (K, d)). Each is
       reused as soon as the gradient it holds has been consumed; the comments say what is where. */
    real *s0 = m->dhead[0], *s1 = m->dhead[1], *s2 = m->dhead[2], *s3 = m->dhead[3];
    real *dh = s1;                                         /* dL/dh (d, NS): both branches add here */
    const real *du = m->du_dir;                            /* no prototypes: the loss gave dL/du   */
    if (K) {
        /* E13: only the direct rows reach the centroids (ExCB: the global ones, A8, A9; DINO, SwAV and
           CARP: every crop's): dc = dz_dir^T u_dir, then weight norm */
        m->ops->gemm('T', 'N', K, d, n_dir, 1.0f, m->z_dir, K, m->u_dir, d, 0.0f, s3, d);         /* s3 = dc */
        if (m->with_pred && c->predictor_centroid_grad)  /* A9's switch: the predictor rows' share too */
            m->ops->gemm('T', 'N', K, d, NS, 1.0f, m->z_pred, K, m->u_pred, d, 1.0f, s3, d);
        m->ops->weightnorm_backward(PT(G, m->centroids), s3, m->c, m->c_inv_norm, K, d);
        m->ops->gemm('N', 'N', n_dir, d, K, 1.0f, m->z_dir, K, m->c, d, 0.0f, s0, d);            /* s0 = du */
        du = s0;
    }
    /* E12, direct rows: dh[:, direct] = (I - u u^T) du / ||h|| (raw rows: du^T); the other columns 0.
       With bn_rows (CoKe) this is the gradient w.r.t. BN(h), which joins the predictor's below. */
    head_rows_backward(m, dh, NS, du, m->u_dir, m->u_dir_den, n_dir);
    if (n_dir < NS) m->ops->zero_columns(dh, d, NS, n_dir, NS - n_dir);
    if (m->with_pred) {
        /* E12, predictor rows (c is a constant here): du = dz_pred c, dp = (I - u u^T) du / ||p|| */
        du = m->du_pred;
        if (K) {
            m->ops->gemm('N', 'N', NS, d, K, 1.0f, m->z_pred, K, m->c, d, 0.0f, s0, d);      /* s0 = du */
            du = s0;
        }
        if (!c->predictor) {                   /* A8/A9's switch: p = h, so dL/dh gets dL/dp as it is */
            head_rows_backward(m, s3, NS, du, m->u_pred, m->u_pred_den, NS);                 /* s3 = dh_pred */
            m->ops->add(dh, s3, (size_t)d * NS);
        } else {
            head_rows_backward(m, s2, NS, du, m->u_pred, m->u_pred_den, NS);                     /* s2 = dp */
            /* predictor E10a, last layer to first, then its input BN(d); the result adds into dh */
            head_layer_backward(m, &m->pred[1], s0, s2, NULL, m->pred_a, NULL, m->p, NULL, NULL, NS);  /* s0 = d pred_a */
            head_layer_backward(m, &m->pred[0], s2, s0, s3, m->pre_y, m->pred_y, m->pred_a, m->pred_mean,
                                m->pred_rstd, NS);                                                /* s2 = d BN(h) */
            if (m->method->bn_rows) m->ops->add(s2, dh, (size_t)d * NS);    /* the direct rows read BN(h) too */
            m->ops->batchnorm_backward(s3, PT(G, m->pred_bn_gamma), PT(G, m->pred_bn_beta), s2, m->pre_y, m->h,
                                       m->pre_mean, m->pre_rstd, PT(P, m->pred_bn_gamma), 0, d, NS, 0,
                                       m->comm);                                                    /* s3 = dh_pred */
            if (m->method->bn_rows) dh = s3;              /* all of dL/dh came through BN(h): s3 holds it */
            else m->ops->add(dh, s3, (size_t)d * NS);
        }
    }
    /* projector E0, last layer to first: df (D, NS) */
    ExcbMLPActs *A = &m->proj_act;
    head_layer_backward(m, &m->proj[2], s0, dh, NULL, A->a[1], NULL, A->a[2], NULL, NULL, NS);      /* s0 = d a1 */
    head_layer_backward(m, &m->proj[1], s2, s0, s3, A->a[0], A->y[1], A->a[1], A->mean[1], A->rstd[1], NS); /* s2 = d a0 */
    real *df = s1;                                         /* dh is consumed: df (D, NS) goes here */
    head_layer_backward(m, &m->proj[0], df, s2, s3, m->f, A->y[0], A->a[0], A->mean[0], A->rstd[0], NS);
    /* backbone: local crops, then global crops; both add into the same parameter gradients */
    if (NL > 0) backbone_backward(m, &m->act_local, df + NG, NS);
    backbone_backward(m, &m->act_global, df, NS);
    /* a frozen centroid (SwAV, S3) has no gradient, as PyTorch's p.grad = None: it is not updated */
    if (K && excb_centroids_frozen(m)) m->ops->zero(PT(G, m->centroids), m->tensors[m->centroids].numel);
    /* data parallel (10b): the mean of the ranks' gradients, each of its own share's mean loss (DDP) */
    if (m->comm) model_sum_real(m, G, m->n_params, 1);
}

void excb_update(ExcbModel *m, ExcbStepStats *st) {
    const ExcbConfig *c = &m->cfg;
    long t = m->step + 1;                                   /* the scheduler counts from 1        */
    double lr = lr_at(t, c->total_steps, c->warmup_steps, lr_peak_for(c), c->lr_min_factor);
    double wdc = centroid_wd_at(t, c->total_steps, c->weight_decay, c->centroid_wd_boost);
    double mom = ema_momentum_at(m->step, c->total_steps, c->ema_start);
    switch (c->optimizer) {                 /* LARS and AdamW (ViT) would be further cases        */
    case EXCB_OPT_SGD: m->ops->update(m, lr, c->weight_decay, wdc, mom); break;         /* E14, E9 */
    }
    m->step++;
    if (st) {
        st->lr = (float)lr;
        st->wd_centroid = (float)wdc;
        st->ema_m = (float)mom;
    }
}

/* The step, as the training loop, the benchmark and the tests run it. EXCB_EXIT_DIVERGED when the loss
   (then nothing has changed but BN running statistics, SwAV's re-normalised prototypes, S3, and CoKe's
   epoch-start copy of its centres, K5, which a rerun of the step repeats the same way) or the
   gradient norm is not finite (then the method's state has moved but no parameter has): st says which. */
int excb_step(ExcbModel *m, const real *xg, const real *xl, ExcbStepStats *st) {
    ExcbStepStats local;
    if (!st) st = &local;
    st->grad_norm = NAN;
    double loss = excb_forward_loss(m, xg, xl, st);         /* sets st->loss */
    if (!isfinite(loss)) return EXCB_EXIT_DIVERGED;
    excb_update_method(m, st);                              /* after the loss, as the code does   */
    excb_backward(m);
    st->grad_norm = sqrt(m->ops->sum_squares(m->grads, m->n_params));
    if (!isfinite(st->grad_norm)) return EXCB_EXIT_DIVERGED;
    excb_update(m, st);
    return 0;
}

/* --- the CPU operator table ------------------------------------------------------------------------
 * The operators of sections 1-7 as they are, plus the step's few plain loops under names, so that
 * excb_kernels.cu can give each a GPU twin (excb.h, "The operator table"). */
/* (N, C, H*W) images -> the backbone's channels-last (N, H*W, C) */
static void cpu_images_to_features(real *dst, const real *src, int N, int C, int HW) {
    if (C == 1) {
        memcpy(dst, src, sizeof(real) * N * HW);
        return;
    }
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++)
        for (int p = 0; p < HW; p++)
            for (int c = 0; c < C; c++) dst[((size_t)n * HW + p) * C + c] = src[((size_t)n * C + c) * HW + p];
}

static int cpu_cluster_size_update(real *s, int32_t *counts, const int32_t *labels, int N, int K, double m_s,
                                   int fp16_term) {
    cluster_size_update(s, counts, labels, N, K, m_s, fp16_term);
    int used = 0;
    for (int k = 0; k < K; k++) used += counts[k] > 0;
    return used;
}

static void cpu_update(ExcbModel *m, double lr, double wd, double wd_centroid, double ema_m) {
    sgd_update(m, lr, wd, wd_centroid);                                             /* E14        */
    ema_update(m->teacher, m->params, m->n_params, ema_m);                          /* E9         */
}

static void cpu_zero(real *x, size_t n) { memset(x, 0, sizeof(real) * n); }

static void cpu_zero_columns(real *x, int rows, int ld, int col0, int n) {
    for (int j = 0; j < rows; j++) memset(x + (size_t)j * ld + col0, 0, sizeof(real) * n);
}

static void cpu_add(real *dst, const real *src, size_t n) {
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; i++) dst[i] += src[i];
}

static void cpu_add_gated(real *dst, const real *src, const real *gate, size_t n) {
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; i++) dst[i] += gate[i] > 0.0f ? src[i] : 0.0f;
}

static double cpu_sum_squares(const real *x, size_t n) {
    double s = 0;                                       /* one thread, one order: reproducible */
    for (size_t i = 0; i < n; i++) s += (double)x[i] * x[i];
    return s;
}

static void cpu_to_host(void *dst, const void *src, size_t bytes) { memcpy(dst, src, bytes); }
static void cpu_to_device(void *dst, const void *src, size_t bytes) { memcpy(dst, src, bytes); }

const ExcbOps excb_cpu_ops = {
    .name = "cpu",
    .channels_last = 1,
    .images_to_features = cpu_images_to_features,
    .conv2d_forward = conv2d_forward,
    .conv2d_backward = conv2d_backward,
    .batchnorm_forward = batchnorm_forward,
    .batchnorm_backward = batchnorm_backward,
    .maxpool_forward = maxpool_forward,
    .maxpool_backward = maxpool_backward,
    .avgpool_forward = avgpool_forward,
    .avgpool_backward = avgpool_backward,
    .linear_forward = linear_forward,
    .linear_backward = linear_backward,
    .gemm = matmul_tiled,
    .l2norm_rows_forward = l2norm_rows_forward,
    .l2norm_rows_backward = l2norm_rows_backward,
    .rows_forward = rows_forward,
    .rows_backward = rows_backward,
    .weightnorm_forward = weightnorm_forward,
    .weightnorm_backward = weightnorm_backward,
    .balance_factors = balance_factors,
    .balanced_targets = balanced_targets,
    .step_diagnostics = cpu_step_diagnostics,
    .loss_forward_backward = excb_loss_forward_backward,
    .cluster_size_update = cpu_cluster_size_update,
    .update = cpu_update,
    .zero = cpu_zero,
    .zero_columns = cpu_zero_columns,
    .add = cpu_add,
    .add_gated = cpu_add_gated,
    .sum_squares = cpu_sum_squares,
    .to_host = cpu_to_host,
    .to_device = cpu_to_device,
};

/* --- without the CUDA path: the GPU entry points say so -----------------------------------------
 * A binary built without nvcc/cuBLAS/cuDNN (see the Makefile's messages) still links and answers
 * --device cuda with a clear message and EXCB_EXIT_UNAVAILABLE. */
#ifndef EXCB_CUDA
int excb_cuda_built(void) { return 0; }
int excb_cuda_init(ExcbPrecision precision, char *err) { return excb_cuda_attach(NULL, NULL, precision, err); }
int excb_cuda_probe(char *desc, size_t cap) {
    snprintf(desc, cap, "this binary was built without the CUDA path (make found no nvcc, cuBLAS or cuDNN)");
    return EXCB_EXIT_UNAVAILABLE;
}
int excb_cuda_attach(ExcbModel *dm, const ExcbModel *m, ExcbPrecision precision, char *err) {
    (void)dm; (void)m; (void)precision;
    excb_cuda_probe(err, EXCB_ERR_LEN);
    return EXCB_EXIT_UNAVAILABLE;
}
int excb_cuda_download(ExcbModel *m, const ExcbModel *dm, char *err) { return excb_cuda_attach((ExcbModel *)dm, m, 0, err); }
int excb_cuda_upload(ExcbModel *dm, const ExcbModel *m, char *err) { return excb_cuda_attach(dm, m, 0, err); }
void excb_cuda_detach(ExcbModel *dm) { (void)dm; }
void excb_cuda_memory(size_t *now, size_t *peak) { *now = *peak = 0; }
void excb_cuda_synchronize(void) {}
real *excb_cuda_alloc(size_t floats) { (void)floats; return NULL; }
void excb_cuda_copy_to_device(real *dst, const real *src, size_t floats) { (void)dst; (void)src; (void)floats; }
void excb_cuda_free(real *p, size_t floats) { (void)p; (void)floats; }
double excb_cuda_peak_flops(ExcbPrecision precision) { (void)precision; return 0; }
int excb_cuda_nondeterministic_plans(void) { return 0; }
void excb_cuda_conv_report(int *plans, int *packed) { *plans = *packed = 0; }
int excb_cuda_join(ExcbComm *world, ExcbPrecision precision, char *how, size_t cap, char *err) {
    (void)world; (void)precision; (void)how; (void)cap;
    return excb_cuda_attach(NULL, NULL, 0, err);
}
void excb_cuda_leave(ExcbComm *world, int failed) { (void)world; (void)failed; }
#endif

/* ================================================================================================
 * 10b. Data parallelism: ranks, their reductions in rank order, and the chunked reference
 * ================================================================================================
 * R ranks each hold B/R images of the global batch B, with all their views: rank r holds images
 * r B/R .. (r+1) B/R - 1 of the single process's batch, so a batch is the same images and views
 * whatever R. Each rank runs the step of section 10 on its share; the step's batch-wide quantities
 * are reduced across ranks where the official code (PyTorch DDP with SyncBatchNorm) reduces them:
 *   - every BatchNorm's two sums per channel, forward and backward, student and teacher (SyncBN);
 *   - the student's gradients, averaged (DDP): each rank's loss is the mean over its own rows;
 *   - the teacher labels of the whole batch, gathered (ExCB's E2 counts them; the run's A21 monitors);
 *   - every method's batch-wide state: DINO's centre (the mean teacher score), SwAV's Sinkhorn sums and
 *     its queue's rows, CoKe's assignments, rows and images (every rank then makes the one process's
 *     update of its state), CARP's p-bar, mvbt's standardisation and cross-correlations;
 *   - the loss and the diagnostics' sums.
 * A method that keeps batch-wide state not reduced yet says so (ExcbMethod.ranks = 0: one process
 * only). On GPUs (mpirun ... --device cuda) the device buffers of these reductions go through host
 * memory (model_sum_real and the functions after it), but for the gradients, which NCCL all-reduces on
 * the GPUs when every rank has one of its own (excb_kernels.cu, excb_cuda_join; not yet run on a GPU).
 *
 * Equivalence by design. A floating-point sum depends on its order, and MPI's reductions choose theirs
 * (by message size, by topology). Here every reduction adds the R ranks' values element by element,
 * left to right in rank order, in double, with one function (reduce_in_rank_order); the transport only
 * brings the R parts together:
 *   - MPI (mpirun -np R): an all-to-all sends slice j of every rank's buffer to rank j, rank j adds its
 *     slice's R parts in rank order, an all-gather returns the sums: the bytes of a ring all-reduce,
 *     2 (R-1)/R of the buffer per rank;
 *   - CHUNKS (excb train --chunks R, one process): the R shares run one after another on one thread,
 *     each as a coroutine with its own stack (ucontext) and its own model; at a reduction a share leaves
 *     its part and passes the turn to the next one, and the last one adds the parts and wakes the first.
 * Both run the same step on the same shares with the same arithmetic, so mpirun -np R equals
 * --chunks R bit for bit (tests/test_train_e2e.c). Against one process with the whole batch (R = 1)
 * only the order of the partial sums differs, a few float32 ulps per step, stated in the test.
 */
enum { RED_F64, RED_REAL, RED_REAL_MEAN };        /* doubles; reals summed (then divided by R) */
static const size_t red_size[] = {sizeof(double), sizeof(real), sizeof(real)};

/* out[i] = part[0][i] + part[1][i] + ... + part[R-1][i], left to right, in double */
static void reduce_in_rank_order(int type, void *out, const void *const *part, int R, size_t n) {
    for (size_t i = 0; i < n; i++) {
        double acc = 0;
        for (int r = 0; r < R; r++)
            acc += type == RED_F64 ? ((const double *)part[r])[i] : (double)((const real *)part[r])[i];
        if (type == RED_F64) ((double *)out)[i] = acc;
        else ((real *)out)[i] = (real)(type == RED_REAL_MEAN ? acc / R : acc);
    }
}

/* --- CHUNKS: the R shares of one process as coroutines -------------------------------------------- */
#define EXCB_CHUNK_STACK ((size_t)64 << 20)     /* each share's stack: reserved, touched as it grows */
typedef struct ExcbChunks {
    int R;
    ucontext_t main_ctx, *ctx;
    void **stack;
    void (*work)(int r, void *arg);          /* what every share runs (one step, say) */
    void *arg;
    int finished;                            /* shares done with `work` */
    /* the collective being gathered: each share's input and output */
    const void **in;
    void **out;
    const struct ChunkOp **op;               /* and what each asked for (they must agree) */
} ExcbChunks;
static ExcbChunks *chunks_running;            /* the scheduler whose shares run now (one at a time) */

static void chunk_entry(int r) {
    ExcbChunks *k = chunks_running;
    k->work(r, k->arg);
    k->finished++;
    /* the next share is waiting in the last reduction, or (the last share) the caller is */
    setcontext(r + 1 < k->R ? &k->ctx[r + 1] : &k->main_ctx);
}

static ExcbChunks *chunks_new(int R) {
    ExcbChunks *k = xcalloc(1, sizeof *k);
    k->R = R;
    k->ctx = xcalloc(R, sizeof *k->ctx);
    k->stack = xcalloc(R, sizeof *k->stack);
    k->in = xcalloc(R, sizeof *k->in);
    k->out = xcalloc(R, sizeof *k->out);
    k->op = xcalloc(R, sizeof *k->op);
    for (int r = 0; r < R; r++) {
        k->stack[r] = mmap(NULL, EXCB_CHUNK_STACK, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                           -1, 0);
        if (k->stack[r] == MAP_FAILED || mprotect(k->stack[r], 4096, PROT_NONE)) {   /* a guard page below */
            fprintf(stderr, "excb: cannot reserve a stack for chunk %d: %s\n", r, strerror(errno));
            exit(EXCB_EXIT_OSERR);
        }
    }
    return k;
}

static void chunks_free(ExcbChunks *k) {
    if (!k) return;
    for (int r = 0; r < k->R; r++) munmap(k->stack[r], EXCB_CHUNK_STACK);
    free(k->ctx); free(k->stack); free(k->in); free(k->out); free(k->op);
    free(k);
}

/* work(r, arg) for r = 0..R-1, taking turns at each reduction; returns when every share has finished */
static void chunks_run(ExcbChunks *k, void (*work)(int r, void *arg), void *arg) {
    k->work = work;
    k->arg = arg;
    k->finished = 0;
    for (int r = 0; r < k->R; r++) {
        getcontext(&k->ctx[r]);
        k->ctx[r].uc_stack.ss_sp = k->stack[r];
        k->ctx[r].uc_stack.ss_size = EXCB_CHUNK_STACK;
        k->ctx[r].uc_link = NULL;
        makecontext(&k->ctx[r], (void (*)(void))chunk_entry, 1, r);
    }
    chunks_running = k;
    swapcontext(&k->main_ctx, &k->ctx[0]);
    chunks_running = NULL;
    if (k->finished != k->R) {        /* a share still waits in a reduction the others never made */
        fprintf(stderr, "excb: internal error: %d of %d chunks finished their work\n", k->finished, k->R);
        exit(EXCB_EXIT_SOFTWARE);
    }
}

/* what a share asks a reduction for: the same from every share, or the shares have gone apart */
typedef struct ChunkOp {
    void (*finish)(ExcbChunks *k, const struct ChunkOp *op);   /* run by the last share to arrive */
    int type;                                                  /* sums: RED_*                      */
    size_t n, bytes;                                           /* sums: elements; else bytes        */
} ChunkOp;

/* share r arrives at a reduction with its input and output: it waits for the others, and the last
   one to arrive runs the op's finish over all R of them, then the first share goes on */
static void chunks_arrive(ExcbComm *c, const void *in, void *out, const ChunkOp *op) {
    ExcbChunks *k = c->chunks;
    if (k->finished) {
        fprintf(stderr, "excb: internal error: chunk %d reduces after another chunk finished its step\n", c->rank);
        exit(EXCB_EXIT_SOFTWARE);
    }
    k->in[c->rank] = in;
    k->out[c->rank] = out;
    k->op[c->rank] = op;
    if (c->rank + 1 < k->R) {
        swapcontext(&k->ctx[c->rank], &k->ctx[c->rank + 1]);
    } else {
        for (int r = 0; r < k->R; r++) {              /* every share at the same reduction, same size */
            const ChunkOp *o = k->op[r];
            if (o->finish != op->finish || o->type != op->type || o->n != op->n || o->bytes != op->bytes) {
                fprintf(stderr, "excb: internal error: chunk %d reduces something other than chunk %d\n", r, c->rank);
                exit(EXCB_EXIT_SOFTWARE);
            }
        }
        op->finish(k, op);
        if (k->R > 1) swapcontext(&k->ctx[c->rank], &k->ctx[0]);
    }
}

static void finish_sum(ExcbChunks *k, const ChunkOp *op) {
    size_t es = red_size[op->type], block = 4096;
    double tmp[4096];                                   /* block's sums (doubles or reals) */
    for (size_t i0 = 0; i0 < op->n; i0 += block) {      /* block by block: no buffer of the full size */
        size_t nb = op->n - i0 < block ? op->n - i0 : block;
        const void *part[k->R];
        for (int r = 0; r < k->R; r++) part[r] = (const unsigned char *)k->in[r] + i0 * es;
        reduce_in_rank_order(op->type, tmp, part, k->R, nb);
        for (int r = 0; r < k->R; r++) memcpy((unsigned char *)k->out[r] + i0 * es, tmp, nb * es);
    }
}
static void finish_gather(ExcbChunks *k, const ChunkOp *op) {
    for (int r = 0; r < k->R; r++)
        for (int q = 0; q < k->R; q++) memcpy((unsigned char *)k->out[r] + (size_t)q * op->bytes, k->in[q], op->bytes);
}
static void finish_broadcast(ExcbChunks *k, const ChunkOp *op) {
    for (int r = 1; r < k->R; r++) memcpy(k->out[r], k->in[0], op->bytes);
}

/* --- MPI: one rank per process ------------------------------------------------------------------ */
#ifdef EXCB_MPI
static MPI_Datatype red_mpi_type(int type) {
    return type == RED_F64 ? MPI_DOUBLE : sizeof(real) == 4 ? MPI_FLOAT : MPI_DOUBLE;
}
static void mpi_check(int rc, const char *what) {
    if (rc == MPI_SUCCESS) return;
    char msg[MPI_MAX_ERROR_STRING];
    int len = 0;
    MPI_Error_string(rc, msg, &len);
    fprintf(stderr, "excb: MPI failed in %s: %s\n", what, msg);
    MPI_Abort(MPI_COMM_WORLD, EXCB_EXIT_SOFTWARE);
}
/* x <- the rank-order sum: all-to-all of R slices, each rank adds its slice, all-gather of the sums */
static void mpi_sum(ExcbComm *c, void *x, size_t n, int type) {
    static unsigned char *buf;
    static size_t cap;
    int R = c->size;
    size_t es = red_size[type], s = (n + R - 1) / R, need = (size_t)3 * R * s * es;
    if (need > cap) { free(buf); buf = xmalloc(need); cap = need; }
    unsigned char *send = buf, *recv = buf + (size_t)R * s * es, *all = recv + (size_t)R * s * es;
    memcpy(send, x, n * es);
    memset(send + n * es, 0, (R * s - n) * es);
    MPI_Datatype t = red_mpi_type(type);
    mpi_check(MPI_Alltoall(send, (int)s, t, recv, (int)s, t, MPI_COMM_WORLD), "MPI_Alltoall");
    const void *part[R];
    for (int r = 0; r < R; r++) part[r] = recv + (size_t)r * s * es;
    reduce_in_rank_order(type, send, part, R, s);                /* my slice's sum, into send */
    mpi_check(MPI_Allgather(send, (int)s, t, all, (int)s, t, MPI_COMM_WORLD), "MPI_Allgather");
    memcpy(x, all, n * es);
}
#endif

/* --- the reductions, whatever carries them -------------------------------------------------------- */
static void comm_sum(ExcbComm *c, void *x, size_t n, int type) {
    double t0 = now_seconds();
    if (c->kind == EXCB_COMM_CHUNKS) {
        ChunkOp op = {.finish = finish_sum, .type = type, .n = n};
        chunks_arrive(c, x, x, &op);
    }
#ifdef EXCB_MPI
    else mpi_sum(c, x, n, type);
#endif
    c->seconds += now_seconds() - t0;
    c->bytes += (double)n * red_size[type];
    c->calls++;
}
void excb_comm_sum_f64(ExcbComm *c, double *x, size_t n) { comm_sum(c, x, n, RED_F64); }
void excb_comm_sum_real(ExcbComm *c, real *x, size_t n, int mean) { comm_sum(c, x, n, mean ? RED_REAL_MEAN : RED_REAL); }

void excb_comm_gather(ExcbComm *c, const void *in, void *out, size_t bytes) {
    double t0 = now_seconds();
    if (c->kind == EXCB_COMM_CHUNKS) {
        ChunkOp op = {.finish = finish_gather, .bytes = bytes};
        chunks_arrive(c, in, out, &op);
    }
#ifdef EXCB_MPI
    else mpi_check(MPI_Allgather(in, (int)bytes, MPI_BYTE, out, (int)bytes, MPI_BYTE, MPI_COMM_WORLD), "MPI_Allgather");
#endif
    c->seconds += now_seconds() - t0;
    c->bytes += (double)bytes;
    c->calls++;
}

int excb_comm_max(ExcbComm *c, int v) {
    int all[c->size], best = v;
    excb_comm_gather(c, &v, all, sizeof v);
    for (int r = 0; r < c->size; r++) best = all[r] > best ? all[r] : best;
    return best;
}

void excb_comm_broadcast(ExcbComm *c, void *x, size_t bytes) {
    if (c->kind == EXCB_COMM_CHUNKS) {
        ChunkOp op = {.finish = finish_broadcast, .bytes = bytes};
        chunks_arrive(c, x, x, &op);
    }
#ifdef EXCB_MPI
    else mpi_check(MPI_Bcast(x, (int)bytes, MPI_BYTE, 0, MPI_COMM_WORLD), "MPI_Bcast");
#endif
}

/* --- a model's own buffers in the reductions. On the GPU (m->gpu) they are device memory: they go
 * through host memory, which MPI moves (ranks sharing a GPU: NCCL refuses two ranks on one device);
 * the gradients, nearly all the bytes, stay on the GPUs when NCCL joined the ranks (one GPU each).
 * One rank per process has a GPU model (--chunks with --device cuda is refused), so one staging
 * buffer per process serves it. On the CPU these are the excb_comm_* calls themselves. ------------- */
static void *host_stage(size_t bytes) {
    static void *buf;
    static size_t cap;
    if (bytes > cap) {
        free(buf);
        buf = xmalloc(bytes);
        cap = bytes;
    }
    return buf;
}

static void model_sum_real(ExcbModel *m, real *x, size_t n, int mean) {
    if (!m->gpu) { excb_comm_sum_real(m->comm, x, n, mean); return; }
    if (m->comm->device_sum_real) { m->comm->device_sum_real(m->comm, x, n, mean); return; }
    real *h = host_stage(sizeof(real) * n);
    m->ops->to_host(h, x, sizeof(real) * n);
    excb_comm_sum_real(m->comm, h, n, mean);
    m->ops->to_device(x, h, sizeof(real) * n);
}

/* the sum over ranks of the model's K doubles x, on the host: x itself on the CPU, a host copy (the
   staging buffer, valid until the next reduction) on the GPU */
static double *model_sum_f64_to_host(ExcbModel *m, double *x, size_t n) {
    double *h = x;
    if (m->gpu) m->ops->to_host(h = host_stage(sizeof(double) * n), x, sizeof(double) * n);
    excb_comm_sum_f64(m->comm, h, n);
    return h;
}

/* every rank's `bytes` of the model's buffer in, concatenated in rank order, into out on the host */
static void model_gather_to_host(ExcbModel *m, ExcbComm *c, const void *in, void *out, size_t bytes) {
    const void *h = in;
    if (m->gpu) {
        void *t = host_stage(bytes);
        m->ops->to_host(t, in, bytes);
        h = t;
    }
    excb_comm_gather(c, h, out, bytes);
}

/* The step's teacher labels of the whole global batch, in the single process's order: rank r's row
   (v, i) is row v B + r B/R + i of the batch. Into m->labels_all; the methods' updates and the run's
   monitors read them there. */
static void gather_step_labels(ExcbModel *m) {
    int R = m->comm->size, Bl = m->cfg.batch, Vg = m->cfg.n_global, NG = Vg * Bl;
    size_t part = sizeof(int32_t) * NG;
    /* the ranks' parts, rank after rank, and then in the batch's order: scratch behind labels_all in
       the arena on the CPU; the staging buffer on the GPU */
    const int32_t *mine = m->labels;
    int32_t *all = m->labels_all + (size_t)NG * R, *out = m->labels_all;
    if (m->gpu) {                               /* this rank's labels, the parts, the result: host */
        int32_t *h = host_stage(part * (1 + 2 * (size_t)R));
        m->ops->to_host(h, m->labels, part);
        mine = h;
        all = h + NG;
        out = all + (size_t)NG * R;
    }
    excb_comm_gather(m->comm, mine, all, part);
    for (int r = 0; r < R; r++)
        for (int v = 0; v < Vg; v++)
            memcpy(out + ((size_t)v * R + r) * Bl, all + ((size_t)r * Vg + v) * Bl, sizeof(int32_t) * Bl);
    if (m->gpu) m->ops->to_device(m->labels_all, out, part * R);
}

/* ================================================================================================
 * 11. Data sets: IDX (Fashion-MNIST), CIFAR-10/100, STL-10, image folders (PNG, JPEG)
 * ================================================================================================
 * A data set is opened once: every header, size and label is validated up front, so a run never
 * fails halfway through an epoch because of a file it could have checked at the start (image files
 * in folders are the exception: they are decoded when used, as in PyTorch). Fixed-size formats are
 * mapped (CIFAR, STL-10; 64-bit offsets, so STL-10's 2.6 GiB unlabeled file is fine) or decompressed
 * into memory (gzipped IDX). Byte layouts: in each reader's comment, and data/README.md.
 *
 * Errors: one line naming the file and the problem, and an exit code: 66 (EX_NOINPUT) when a file
 * is missing or unreadable, 65 (EX_DATAERR) when its content is wrong, 71 when memory runs out.
 */
static int fail(char *err, int code, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, EXCB_ERR_LEN, fmt, ap);
    va_end(ap);
    return code;
}

/* grow *buf to at least `need` bytes; 0 or EXCB_EXIT_OSERR */
static int grow(uint8_t **buf, size_t *cap, size_t need) {
    if (need <= *cap) return 0;
    size_t n = need + need / 4;
    uint8_t *p = realloc(*buf, n);
    if (!p) return EXCB_EXIT_OSERR;
    *buf = p;
    *cap = n;
    return 0;
}

static int is_dir(const char *path) {
    struct stat st;
    return stat(path, &st) == 0 && S_ISDIR(st.st_mode);
}

/* Every input file is opened here: without blocking (a FIFO or a device would otherwise wait for a
   writer, or never end), then checked to be a regular file of at most `max` bytes before one byte is
   read. 0 and *fd (in blocking mode) and *size, or 66 (cannot be opened) or 65 (there, but not a
   regular file, or too large). */
static int open_input(const char *path, size_t max, int *fd, size_t *size, char *err) {
    *fd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC);
    if (*fd < 0) return fail(err, EXCB_EXIT_NOINPUT, "%s: cannot open: %s", path, strerror(errno));
    struct stat st;
    int code = 0;
    if (fstat(*fd, &st) != 0)
        code = fail(err, EXCB_EXIT_IO, "%s: cannot stat: %s", path, strerror(errno));
    else if (!S_ISREG(st.st_mode))
        code = fail(err, EXCB_EXIT_DATA, "%s: not a regular file (%s)", path, S_ISDIR(st.st_mode) ? "a directory"
                    : S_ISFIFO(st.st_mode) ? "a FIFO" : S_ISCHR(st.st_mode) || S_ISBLK(st.st_mode) ? "a device" : "a special file");
    else if ((uint64_t)st.st_size > max)
        code = fail(err, EXCB_EXIT_DATA, "%s: %lld bytes, above the %zu-byte limit for this kind of file", path,
                    (long long)st.st_size, max);
    if (code) { close(*fd); *fd = -1; return code; }
    fcntl(*fd, F_SETFL, fcntl(*fd, F_GETFL) & ~O_NONBLOCK);
    *size = (size_t)st.st_size;
    return 0;
}

/* the whole of a (small) file into a growable buffer; files above `max` bytes are refused */
static int read_whole_file(const char *path, uint8_t **buf, size_t *cap, size_t *len, size_t max,
                           char *err) {
    size_t n = 0;
    int fd, code = open_input(path, max, &fd, &n, err);
    if (code) return code;
    FILE *f = fdopen(fd, "rb");
    if (!f) { close(fd); return fail(err, EXCB_EXIT_OSERR, "%s: %s", path, strerror(errno)); }
    if (grow(buf, cap, n + 1)) { fclose(f); return fail(err, EXCB_EXIT_OSERR, "%s: out of memory", path); }
    size_t got = fread(*buf, 1, n, f);
    int bad = ferror(f);
    fclose(f);
    if (bad || got != n) return fail(err, EXCB_EXIT_IO, "%s: read error after %zu of %zu bytes", path, got, n);
    *len = n;
    return 0;
}

/* map a whole file read-only; an empty file is an error (nothing to map, nothing to learn from) */
static int map_file(const char *path, void **map, size_t *len, char *err) {
    size_t n = 0;
    int fd, code = open_input(path, SIZE_MAX, &fd, &n, err);   /* mapped, not read: no size limit */
    if (code) return code;
    if (n == 0) { close(fd); return fail(err, EXCB_EXIT_DATA, "%s: empty file", path); }
    void *p = mmap(NULL, n, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    if (p == MAP_FAILED) return fail(err, EXCB_EXIT_IO, "%s: cannot map: %s", path, strerror(errno));
    *map = p;
    *len = n;
    return 0;
}

/* gzip (one or more members) from memory, refusing to produce more than max_out bytes: a corrupt or
   hostile length can never make us allocate without bound. */
int excb_gunzip(const uint8_t *buf, size_t len, uint8_t **out, size_t *out_len, size_t max_out,
                const char *name, char *err) {
    z_stream zs;
    memset(&zs, 0, sizeof zs);
    if (inflateInit2(&zs, 16 + MAX_WBITS) != Z_OK) return fail(err, EXCB_EXIT_OSERR, "%s: zlib init failed", name);
    size_t cap = 0, n = 0;
    uint8_t *o = NULL;
    /* the trailer's ISIZE (length mod 2^32) is a hint for the first allocation only */
    size_t hint = len >= 4 ? (size_t)buf[len - 4] | (size_t)buf[len - 3] << 8 | (size_t)buf[len - 2] << 16
                                 | (size_t)buf[len - 1] << 24 : 0;
    if (hint / 1032 > len) hint = len * 1032;       /* deflate expands at most 1032:1: a bigger ISIZE lies */
    hint = hint < 64 ? 64 : hint > max_out ? max_out : hint;
    int code = 0, ret = Z_OK;
    zs.next_in = (Bytef *)buf;
    zs.avail_in = (uInt)(len > UINT32_MAX ? UINT32_MAX : len);
    size_t fed = zs.avail_in;
    for (;;) {
        if (n == cap) {
            if (cap >= max_out) { code = fail(err, EXCB_EXIT_DATA, "%s: decompresses to more than %zu bytes", name, max_out); break; }
            size_t want = cap ? cap * 2 : hint + 1;
            if (want > max_out) want = max_out;
            if (grow(&o, &cap, want)) { code = fail(err, EXCB_EXIT_OSERR, "%s: out of memory decompressing", name); break; }
            if (cap > max_out) cap = max_out;
        }
        zs.next_out = o + n;
        size_t room = cap - n;
        zs.avail_out = (uInt)(room > UINT32_MAX ? UINT32_MAX : room);
        uInt before = zs.avail_out;
        ret = inflate(&zs, Z_NO_FLUSH);
        n += before - zs.avail_out;
        if (ret == Z_STREAM_END) {
            if (zs.avail_in == 0 && fed == len) break;           /* all members read                 */
            if (zs.avail_in == 0) { zs.avail_in = (uInt)(len - fed > UINT32_MAX ? UINT32_MAX : len - fed); fed += zs.avail_in; }
            if (inflateReset(&zs) != Z_OK) { code = fail(err, EXCB_EXIT_DATA, "%s: corrupt gzip member", name); break; }
            continue;
        }
        if (ret == Z_BUF_ERROR && zs.avail_out > 0) {
            if (fed < len) { zs.avail_in = (uInt)(len - fed > UINT32_MAX ? UINT32_MAX : len - fed); fed += zs.avail_in; continue; }
            code = fail(err, EXCB_EXIT_DATA, "%s: truncated gzip stream (ends after %zu decompressed bytes)", name, n);
            break;
        }
        if (ret != Z_OK && ret != Z_BUF_ERROR) {
            code = fail(err, EXCB_EXIT_DATA, "%s: corrupt gzip data (%s)", name, zs.msg ? zs.msg : "zlib error");
            break;
        }
    }
    inflateEnd(&zs);
    if (code) { free(o); return code; }
    *out = o;
    *out_len = n;
    return 0;
}

static uint32_t be32(const uint8_t *p) {
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

/* IDX header (LeCun's MNIST format): 00 00, type, ndim, ndim big-endian u32 sizes, then the data, which
   must fill the rest of the buffer exactly. excb reads type 0x08 (unsigned bytes) only. */
int excb_parse_idx(const uint8_t *buf, size_t len, const char *name, int *ndim, uint32_t dims[4],
                   size_t *data_offset, char *err) {
    if (len < 4 || buf[0] != 0 || buf[1] != 0)
        return fail(err, EXCB_EXIT_DATA, "%s: not an IDX file (bad magic: must start with 00 00)", name);
    if (buf[2] != 0x08)
        return fail(err, EXCB_EXIT_DATA, "%s: IDX element type 0x%02X is not supported (excb reads 0x08, unsigned bytes)",
                    name, buf[2]);
    int nd = buf[3];
    if (nd < 1 || nd > 4) return fail(err, EXCB_EXIT_DATA, "%s: IDX with %d dimensions (1 to 4 expected)", name, nd);
    size_t header = 4 + 4 * (size_t)nd;
    if (len < header) return fail(err, EXCB_EXIT_DATA, "%s: truncated IDX header (%zu of %zu bytes)", name, len, header);
    uint64_t count = 1;
    for (int i = 0; i < nd; i++) {
        dims[i] = be32(buf + 4 + 4 * i);
        if (dims[i] == 0) return fail(err, EXCB_EXIT_DATA, "%s: IDX dimension %d is 0", name, i);
        if (i > 0 && dims[i] > EXCB_MAX_SIDE)
            return fail(err, EXCB_EXIT_DATA, "%s: IDX dimension %d is %u, absurdly large", name, i, dims[i]);
        count *= dims[i];
        if (count > ((uint64_t)1 << 40)) return fail(err, EXCB_EXIT_DATA, "%s: IDX sizes multiply to an absurd %llu+ bytes", name, (unsigned long long)count);
    }
    if (dims[0] > INT32_MAX) return fail(err, EXCB_EXIT_DATA, "%s: %u items is too many", name, dims[0]);
    if (len - header != count)
        return fail(err, EXCB_EXIT_DATA, "%s: IDX header promises %llu data bytes, the file has %zu (%s)", name,
                    (unsigned long long)count, len - header, len - header < count ? "truncated" : "trailing bytes");
    *ndim = nd;
    *data_offset = header;
    return 0;
}

/* n labels, one byte each `stride` bytes apart, must lie in [lo, hi] */
int excb_check_labels(const uint8_t *buf, long n, size_t stride, int lo, int hi, const char *name,
                      const char *what, char *err) {
    for (long i = 0; i < n; i++) {
        int v = buf[(size_t)i * stride];
        if (v < lo || v > hi)
            return fail(err, EXCB_EXIT_DATA, "%s: %s %d of record %ld is outside %d-%d", name, what, v, i, lo, hi);
    }
    return 0;
}

/* an IDX file (gzipped or not) into memory, validated */
static int load_idx(const char *path, ExcbDataPart *part, int *ndim, uint32_t dims[4], char *err) {
    uint8_t *raw = NULL;
    size_t cap = 0, len = 0;
    int code = read_whole_file(path, &raw, &cap, &len, (size_t)1 << 36, err);
    if (code) { free(raw); return code; }
    uint8_t *data = raw;
    if (len >= 2 && raw[0] == 0x1F && raw[1] == 0x8B) {              /* gzip magic                  */
        size_t n = 0;
        code = excb_gunzip(raw, len, &data, &n, ((size_t)1 << 36), path, err);
        free(raw);
        if (code) return code;
        len = n;
    }
    size_t off;
    code = excb_parse_idx(data, len, path, ndim, dims, &off, err);
    if (code) { free(data); return code; }
    memset(part, 0, sizeof *part);
    part->owned = data;
    part->base = data + off;
    part->n = dims[0];
    return 0;
}

/* the data sets' files are found by name, whatever their type: a directory or a FIFO that bears an
   IDX, CIFAR or STL-10 file's name is then refused by open_input as what it is, not skipped over */
static int exists(const char *path) {
    struct stat st;
    return stat(path, &st) == 0;
}

/* "dir/name" or "dir/name.gz", whichever exists */
static int find_maybe_gz(char *out, size_t cap, const char *dir, const char *name) {
    snprintf(out, cap, "%s/%s.gz", dir, name);
    if (exists(out)) return 1;
    snprintf(out, cap, "%s/%s", dir, name);
    return exists(out);
}

static int open_idx(ExcbDataset *ds, const char *images, const char *labels, char *err) {
    int nd;
    uint32_t dims[4];
    ExcbDataPart *p = &ds->parts[0];
    int code = load_idx(images, p, &nd, dims, err);
    if (code) return code;
    ds->n_parts = 1;
    if (nd != 3 && !(nd == 4 && (dims[3] == 1 || dims[3] == 3)))
        return fail(err, EXCB_EXIT_DATA, "%s: an image IDX file has 3 dimensions (N, H, W) or 4 (N, H, W, 1|3); this one has %d",
                    images, nd);
    ds->kind = EXCB_DATA_IDX;
    ds->n = dims[0];
    ds->height = (int)dims[1];
    ds->width = (int)dims[2];
    ds->channels = nd == 4 ? (int)dims[3] : 1;
    ds->layout = EXCB_LAYOUT_HWC;
    p->record = (size_t)ds->height * ds->width * ds->channels;
    if (!labels) return 0;
    ExcbDataPart lp;
    code = load_idx(labels, &lp, &nd, dims, err);
    if (code) return code;
    if (nd != 1) { free(lp.owned); return fail(err, EXCB_EXIT_DATA, "%s: a label IDX file has 1 dimension; this one has %d", labels, nd); }
    if ((long)dims[0] != ds->n) {
        free(lp.owned);
        return fail(err, EXCB_EXIT_DATA, "%s: %u labels for %ld images in %s", labels, dims[0], ds->n, images);
    }
    /* MNIST-family IDX label files hold 10 classes */
    code = excb_check_labels(lp.base, ds->n, 1, 0, 9, labels, "label", err);
    if (!code) {
        ds->n_classes = 10;
        ds->labels = malloc(sizeof(int32_t) * ds->n);
        if (!ds->labels) code = fail(err, EXCB_EXIT_OSERR, "out of memory");
        else for (long i = 0; i < ds->n; i++) ds->labels[i] = lp.base[i];
    }
    free(lp.owned);
    return code;
}

/* A fixed-record binary file (CIFAR, STL-10 images): mapped, its size a whole number of records. */
static int open_records(ExcbDataPart *p, const char *path, size_t record, size_t offset, char *err) {
    memset(p, 0, sizeof *p);
    int code = map_file(path, &p->map, &p->map_bytes, err);
    if (code) return code;
    if (p->map_bytes % record)
        return fail(err, EXCB_EXIT_DATA, "%s: %zu bytes is not a whole number of %zu-byte records (truncated or not this format)",
                    path, p->map_bytes, record);
    p->base = p->map;
    p->n = (long)(p->map_bytes / record);
    p->record = record;
    p->offset = offset;
    return 0;
}

static int alloc_labels(ExcbDataset *ds, char *err) {
    ds->labels = malloc(sizeof(int32_t) * (ds->n ? ds->n : 1));
    return ds->labels ? 0 : fail(err, EXCB_EXIT_OSERR, "out of memory for %ld labels", ds->n);
}

/* the first n lines of a class-name file, if it exists (optional: names only decorate reports) */
static void read_class_names(ExcbDataset *ds, const char *path) {
    char err[EXCB_ERR_LEN];
    size_t n;
    int fd;
    FILE *f = open_input(path, 1 << 20, &fd, &n, err) ? NULL : fdopen(fd, "r");
    if (!f) { if (fd >= 0) close(fd); return; }
    ds->class_names = calloc(ds->n_classes, sizeof *ds->class_names);
    char line[256];
    for (int i = 0; ds->class_names && i < ds->n_classes && fgets(line, sizeof line, f);) {
        line[strcspn(line, "\r\n")] = 0;
        if (!line[0]) continue;
        snprintf(ds->class_names[i++], 64, "%s", line);
    }
    fclose(f);
}

/* CIFAR-10: records <label 0-9><3072 pixels>; CIFAR-100: <coarse 0-19><fine 0-99><3072 pixels>,
   coarse label FIRST. Pixels are R, G, B planes of 32x32, rows in order. excb uses the fine label. */
static int open_cifar(ExcbDataset *ds, char files[][4096], int nfiles, int hundred, const char *dir, char *err) {
    size_t record = hundred ? 3074 : 3073, offset = hundred ? 2 : 1;
    ds->kind = hundred ? EXCB_DATA_CIFAR100 : EXCB_DATA_CIFAR10;
    ds->channels = 3;
    ds->height = ds->width = 32;
    ds->layout = EXCB_LAYOUT_CHW;
    ds->n_classes = hundred ? 100 : 10;
    for (int f = 0; f < nfiles; f++) {
        int code = open_records(&ds->parts[f], files[f], record, offset, err);
        ds->n_parts = f + 1;
        if (code) return code;
        const uint8_t *b = ds->parts[f].base;
        long n = ds->parts[f].n;
        if (hundred && (code = excb_check_labels(b, n, record, 0, 19, files[f], "coarse label", err))) return code;
        if ((code = excb_check_labels(b + offset - 1, n, record, 0, ds->n_classes - 1, files[f],
                                      hundred ? "fine label" : "label", err))) return code;
        ds->n += n;
    }
    if (alloc_labels(ds, err)) return EXCB_EXIT_OSERR;
    long i = 0;
    for (int f = 0; f < nfiles; f++)
        for (long r = 0; r < ds->parts[f].n; r++) ds->labels[i++] = ds->parts[f].base[r * record + offset - 1];
    char names[4096];
    snprintf(names, sizeof names, "%s/%s", dir, hundred ? "fine_label_names.txt" : "batches.meta.txt");
    read_class_names(ds, names);
    return 0;
}

/* STL-10: <name>_X.bin = images of 96x96x3, R, G, B planes, each plane COLUMN-major; <name>_y.bin =
   one byte per image, labels 1-10 (stored minus 1). Unlabeled images get label -1. */
static int open_stl10(ExcbDataset *ds, const char *dir, const char *split, char *err) {
    ds->kind = EXCB_DATA_STL10;
    ds->channels = 3;
    ds->height = ds->width = 96;
    ds->layout = EXCB_LAYOUT_CHW_COLMAJOR;
    ds->n_classes = 10;
    const char *names[2] = {NULL, NULL};
    if (!strcmp(split, "train")) names[0] = "train";
    else if (!strcmp(split, "test")) names[0] = "test";
    else if (!strcmp(split, "unlabeled")) names[0] = "unlabeled";
    else if (!strcmp(split, "train+unlabeled")) { names[0] = "train"; names[1] = "unlabeled"; }
    else return fail(err, EXCB_EXIT_USAGE, "%s: STL-10 splits are train, test, unlabeled, train+unlabeled; not '%s'", dir, split);
    int32_t *labels[2] = {NULL, NULL};
    int code = 0;
    for (int f = 0; f < 2 && names[f]; f++) {
        char path[4096];
        snprintf(path, sizeof path, "%s/%s_X.bin", dir, names[f]);
        if ((code = open_records(&ds->parts[f], path, 27648, 0, err))) { ds->n_parts = f + 1; break; }
        ds->n_parts = f + 1;
        long n = ds->parts[f].n;
        if (strcmp(names[f], "unlabeled")) {
            snprintf(path, sizeof path, "%s/%s_y.bin", dir, names[f]);
            void *map;
            size_t len;
            if ((code = map_file(path, &map, &len, err))) break;
            if ((long)len != n) code = fail(err, EXCB_EXIT_DATA, "%s: %zu labels for %ld images in %s_X.bin", path, len, n, names[f]);
            else code = excb_check_labels(map, n, 1, 1, 10, path, "label", err);
            if (!code && !(labels[f] = malloc(sizeof(int32_t) * n))) code = fail(err, EXCB_EXIT_OSERR, "out of memory");
            if (!code) for (long i = 0; i < n; i++) labels[f][i] = ((const uint8_t *)map)[i] - 1;
            munmap(map, len);
            if (code) break;
        }
        ds->n += n;
    }
    if (!code && !(code = alloc_labels(ds, err))) {
        long i = 0;
        for (int f = 0; f < ds->n_parts; f++)
            for (long r = 0; r < ds->parts[f].n; r++) ds->labels[i++] = labels[f] ? labels[f][r] : -1;
        char path[4096];
        snprintf(path, sizeof path, "%s/class_names.txt", dir);
        read_class_names(ds, path);
    }
    free(labels[0]);
    free(labels[1]);
    return code;
}

/* Image folders, as torchvision's ImageFolder lists them: class = sub-folder (sorted by name), files
   found recursively and sorted; a folder with image files and no sub-folders is one unlabeled set.
   Files are chosen by ImageFolder's extensions, then decoded by their magic bytes, not their names. */
static int has_image_extension(const char *name) {
    static const char *ext[] = {".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp"};
    const char *dot = strrchr(name, '.');
    if (!dot) return 0;
    for (size_t i = 0; i < sizeof ext / sizeof *ext; i++)
        if (!strcasecmp(dot, ext[i])) return 1;
    return 0;
}

typedef struct { char **paths; int32_t *labels; long n, cap; size_t bytes; long ignored; char first_ignored[256]; } FileList;

static int cmp_str(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

static int list_dir(const char *dir, char ***names, int *count, char *err) {
    DIR *d = opendir(dir);
    if (!d) return fail(err, EXCB_EXIT_NOINPUT, "%s: cannot open folder: %s", dir, strerror(errno));
    int n = 0, cap = 0;
    char **v = NULL;
    struct dirent *e;
    while ((e = readdir(d))) {
        if (e->d_name[0] == '.') continue;                     /* ".", "..", hidden files          */
        if (n == cap) {
            cap = cap ? 2 * cap : 64;
            char **nv = realloc(v, sizeof(char *) * cap);
            if (!nv) { closedir(d); return fail(err, EXCB_EXIT_OSERR, "out of memory listing %s", dir); }
            v = nv;
        }
        v[n++] = strdup(e->d_name);
    }
    closedir(d);
    if (n > 1) qsort(v, n, sizeof(char *), cmp_str);
    *names = v;
    *count = n;
    return 0;
}

static void free_names(char **v, int n) {
    for (int i = 0; i < n; i++) free(v[i]);
    free(v);
}

static int collect_images(FileList *fl, const char *dir, int label, int depth, char *err) {
    if (depth > 16) return fail(err, EXCB_EXIT_DATA, "%s: folders nested more than 16 deep", dir);
    char **names;
    int count, code = list_dir(dir, &names, &count, err);
    if (code) return code;
    for (int i = 0; i < count && !code; i++) {
        char path[4096];
        if (snprintf(path, sizeof path, "%s/%s", dir, names[i]) >= (int)sizeof path) {
            code = fail(err, EXCB_EXIT_DATA, "%s/%s: path too long", dir, names[i]);
            break;
        }
        if (is_dir(path)) { code = collect_images(fl, path, label, depth + 1, err); continue; }
        if (!has_image_extension(names[i])) {
            if (!fl->ignored++) snprintf(fl->first_ignored, sizeof fl->first_ignored, "%s", path);
            continue;
        }
        /* listed by name: a FIFO or a dangling link named like an image is refused when it is read
           (open_input, without blocking), and a skip (skip_bad) then skips it like any bad image */
        if (fl->n == fl->cap) {
            fl->cap = fl->cap ? 2 * fl->cap : 1024;
            char **np = realloc(fl->paths, sizeof(char *) * fl->cap);
            int32_t *nl = realloc(fl->labels, sizeof(int32_t) * fl->cap);
            if (np) fl->paths = np;
            if (nl) fl->labels = nl;
            if (!np || !nl) { code = fail(err, EXCB_EXIT_OSERR, "out of memory listing %s", dir); break; }
        }
        fl->paths[fl->n] = strdup(path);
        fl->labels[fl->n++] = label;
        fl->bytes += strlen(path) + 1;
    }
    free_names(names, count);
    return code;
}

static int open_folder(ExcbDataset *ds, const char *root, char *err) {
    ds->kind = EXCB_DATA_FOLDER;
    ds->channels = 3;                                    /* ImageFolder converts everything to RGB */
    ds->layout = EXCB_LAYOUT_HWC;
    FileList fl = {0};
    char **names;
    int count, code = list_dir(root, &names, &count, err);
    if (code) return code;
    int n_sub = 0;
    for (int i = 0; i < count; i++) {
        char path[4096];
        snprintf(path, sizeof path, "%s/%s", root, names[i]);
        n_sub += is_dir(path);
    }
    if (n_sub == 0) {
        code = collect_images(&fl, root, -1, 0, err);                 /* flat: unlabeled          */
    } else {
        ds->class_names = calloc(n_sub, sizeof *ds->class_names);
        if (!ds->class_names) code = fail(err, EXCB_EXIT_OSERR, "out of memory");
        for (int i = 0; i < count && !code; i++) {
            char path[4096];
            snprintf(path, sizeof path, "%s/%s", root, names[i]);
            if (!is_dir(path)) {                                      /* loose files at the top */
                if (!fl.ignored++) snprintf(fl.first_ignored, sizeof fl.first_ignored, "%s", path);
                continue;
            }
            snprintf(ds->class_names[ds->n_classes], 64, "%s", names[i]);
            long before = fl.n;
            code = collect_images(&fl, path, ds->n_classes++, 1, err);
            if (!code && fl.n == before)          /* torchvision's ImageFolder refuses this as well */
                code = fail(err, EXCB_EXIT_DATA, "%s: a class folder with no images", path);
        }
    }
    free_names(names, count);
    if (!code && fl.n == 0)
        code = fail(err, EXCB_EXIT_DATA, "%s: no images found (image folders hold .jpg/.jpeg/.png files, in one sub-folder per class or flat)",
                    root);
    if (!code && fl.ignored)
        fprintf(stderr, "excb: %s: ignored %ld file(s) without an image extension or outside a class folder, e.g. %s\n",
                root, fl.ignored, fl.first_ignored);
    if (!code) {
        /* all paths in one blob, however many files */
        ds->files = malloc(sizeof(char *) * fl.n);
        ds->file_names = malloc(fl.bytes);
        ds->labels = malloc(sizeof(int32_t) * fl.n);
        if (!ds->files || !ds->file_names || !ds->labels) code = fail(err, EXCB_EXIT_OSERR, "out of memory");
        char *w = ds->file_names;
        for (long i = 0; i < fl.n && !code; i++) {
            size_t l = strlen(fl.paths[i]) + 1;
            memcpy(w, fl.paths[i], l);
            ds->files[i] = w;
            ds->labels[i] = fl.labels[i];
            w += l;
        }
        ds->n = fl.n;
        if (ds->n_classes == 0) { free(ds->labels); ds->labels = NULL; }
    }
    for (long i = 0; i < fl.n; i++) free(fl.paths[i]);
    free(fl.paths);
    free(fl.labels);
    return code;
}

static int has_file(const char *dir, const char *name) {
    char path[4200];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    return exists(path);
}

/* --data fashion-mnist: data/fashion-mnist (made by `make data`) next to the working directory or the
   binary, else the Debian package's own copy. The files are the same bytes in every case. */
static int locate_default(char *out, size_t cap) {
    char exe[4096];
    ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
    exe[n > 0 ? n : 0] = 0;
    char *slash = strrchr(exe, '/');
    if (slash) *slash = 0;
    const char *candidates[3] = {"data/fashion-mnist", exe, "/usr/share/datasets/fashion-mnist"};
    for (int i = 0; i < 3; i++) {
        if (i == 1) snprintf(out, cap, "%s/data/fashion-mnist", exe);
        else snprintf(out, cap, "%s", candidates[i]);
        char probe[4200];
        if (find_maybe_gz(probe, sizeof probe, out, "train-images-idx3-ubyte")) return 1;
    }
    return 0;
}

int excb_data_open(ExcbDataset *ds, const char *spec, const char *split, char *err) {
    memset(ds, 0, sizeof *ds);
    if (!split) split = "train";
    snprintf(ds->split, sizeof ds->split, "%s", split);
    char path[4096];
    if (!strcmp(spec, "fashion-mnist")) {
        if (!locate_default(path, sizeof path))
            return fail(err, EXCB_EXIT_NOINPUT, "fashion-mnist: not found in data/fashion-mnist or /usr/share/datasets/fashion-mnist "
                        "(run `make data`; it needs the Debian package dataset-fashion-mnist)");
    } else {
        snprintf(path, sizeof path, "%s", spec);
        size_t l = strlen(path);
        while (l > 1 && path[l - 1] == '/') path[--l] = 0;
    }
    snprintf(ds->path, sizeof ds->path, "%s", path);
    int code;
    struct stat st;
    if (stat(path, &st) != 0) return fail(err, EXCB_EXIT_NOINPUT, "%s: %s", path, strerror(errno));
    int train = !strcmp(split, "train"), test = !strcmp(split, "test");
    if (S_ISDIR(st.st_mode)) {
        char a[4200], b[4200], files[6][4096];
        if (find_maybe_gz(a, sizeof a, path, "train-images-idx3-ubyte")) {           /* IDX folder */
            if (!train && !test) return fail(err, EXCB_EXIT_USAGE, "%s: IDX splits are train and test, not '%s'", path, split);
            find_maybe_gz(a, sizeof a, path, test ? "t10k-images-idx3-ubyte" : "train-images-idx3-ubyte");
            int has_labels = find_maybe_gz(b, sizeof b, path, test ? "t10k-labels-idx1-ubyte" : "train-labels-idx1-ubyte");
            if (!exists(a)) return fail(err, EXCB_EXIT_NOINPUT, "%s: missing (test split of an IDX folder)", a);
            code = open_idx(ds, a, has_labels ? b : NULL, err);
        } else if (has_file(path, "data_batch_1.bin")) {                             /* CIFAR-10   */
            int nf = 0;
            if (test) snprintf(files[nf++], 4096, "%s/test_batch.bin", path);
            else if (train)
                for (int i = 1; i <= 5; i++) snprintf(files[nf++], 4096, "%s/data_batch_%d.bin", path, i);
            else return fail(err, EXCB_EXIT_USAGE, "%s: CIFAR-10 splits are train and test, not '%s'", path, split);
            code = open_cifar(ds, files, nf, 0, path, err);
        } else if (has_file(path, "fine_label_names.txt") || has_file(path, "train.bin")) {   /* CIFAR-100 */
            if (!train && !test) return fail(err, EXCB_EXIT_USAGE, "%s: CIFAR-100 splits are train and test, not '%s'", path, split);
            snprintf(files[0], 4096, "%s/%s.bin", path, split);
            code = open_cifar(ds, files, 1, 1, path, err);
        } else if (has_file(path, "train_X.bin") || has_file(path, "unlabeled_X.bin")) {     /* STL-10    */
            code = open_stl10(ds, path, split, err);
        } else {
            char sub[4200];
            snprintf(sub, sizeof sub, "%s/%s", path, split);          /* root/train, root/val, ...  */
            code = open_folder(ds, is_dir(sub) ? sub : path, err);
        }
    } else {
        /* a single file: an IDX file (plain or gzipped) or a CIFAR batch (STL-10 comes as a folder) */
        const char *base = strrchr(path, '/');
        base = base ? base + 1 : path;
        uint8_t head[4] = {0};
        size_t bytes;
        int fd;
        if ((code = open_input(path, SIZE_MAX, &fd, &bytes, err))) return code;
        ssize_t r = read(fd, head, 4);
        close(fd);
        size_t got = r > 0 ? (size_t)r : 0;
        char files[1][4096];
        snprintf(files[0], 4096, "%s", path);
        char dir[4096];
        snprintf(dir, sizeof dir, "%.*s", (int)(base - path ? base - path - 1 : 1), base - path ? path : ".");
        /* gzip, or an IDX header: 00 00, a known element type, 1-4 dimensions */
        int idx_head = got == 4 && !head[0] && !head[1] && memchr("\x08\x09\x0B\x0C\x0D\x0E", head[2], 6) && head[3] >= 1 && head[3] <= 4;
        if (got >= 2 && ((head[0] == 0x1F && head[1] == 0x8B) || idx_head)) {
            char labels[4200], *p = strstr(path, "images-idx3");
            int has_labels = 0;
            if (p) {
                snprintf(labels, sizeof labels, "%.*slabels-idx1%s", (int)(p - path), path, p + strlen("images-idx3"));
                has_labels = exists(labels);
            }
            code = open_idx(ds, path, has_labels ? labels : NULL, err);
        } else if (!strncmp(base, "data_batch_", 11) || !strcmp(base, "test_batch.bin")) {
            code = open_cifar(ds, files, 1, 0, dir, err);
        } else if (!strcmp(base, "train.bin") || !strcmp(base, "test.bin")) {
            code = open_cifar(ds, files, 1, 1, dir, err);
        } else {
            code = fail(err, EXCB_EXIT_DATA, "%s: unknown data format (expected an IDX file, a CIFAR .bin batch, or a folder: "
                        "IDX, CIFAR-10/100, STL-10 or images)", path);
        }
    }
    if (code) { excb_data_close(ds); return code; }
    if (ds->n <= 0) { excb_data_close(ds); return fail(err, EXCB_EXIT_DATA, "%s: no images", path); }
    return 0;
}

void excb_data_close(ExcbDataset *ds) {
    for (int i = 0; i < ds->n_parts; i++) {
        if (ds->parts[i].map) munmap(ds->parts[i].map, ds->parts[i].map_bytes);
        free(ds->parts[i].owned);
    }
    free(ds->labels);
    free(ds->files);
    free(ds->file_names);
    free(ds->class_names);
    free(ds->bad);
    free(ds->keep);
    memset(ds, 0, sizeof *ds);
}

/* evenly spaced subset i * n / max (all when max is 0 or >= n) */
static long *subset(long n, long max, long *count) {
    long c = max > 0 && max < n ? max : n;
    long *idx = xmalloc(sizeof(long) * c);
    for (long i = 0; i < c; i++) idx[i] = c == n ? i : (long)((double)i * n / c);
    *count = c;
    return idx;
}

void excb_data_keep(ExcbDataset *ds, long max) {
    if (max <= 0 || max >= ds->n) return;
    ds->keep = subset(ds->n, max, &ds->n);
    for (long i = 0; ds->labels && i < ds->n; i++)
        ds->labels[i] = ds->labels[ds->keep[i]];        /* keep[i] >= i: each is read before it is written */
}

void excb_image_free(ExcbImage *img) {
    free(img->px);
    free(img->file);
    memset(img, 0, sizeof *img);
}

/* -- decoders: PNG through libpng's simplified API, JPEG through libjpeg(-turbo) --------------- */
static int check_size(const char *name, long h, long w, char *err) {
    if (h <= 0 || w <= 0) return fail(err, EXCB_EXIT_DATA, "%s: image of %ld x %ld pixels", name, w, h);
    if (h > EXCB_MAX_SIDE || w > EXCB_MAX_SIDE || h * w > EXCB_MAX_PIXELS)
        return fail(err, EXCB_EXIT_DATA, "%s: %ld x %ld pixels is above the %ld-pixel limit (a decompression bomb?)",
                    name, w, h, EXCB_MAX_PIXELS);
    return 0;
}

/* PIL's Image.convert("RGB") drops alpha; libpng would composite onto a background if asked for RGB,
   so we ask for RGBA and drop the fourth channel ourselves (as PIL's convert("RGB") does). */
static int decode_png(const uint8_t *buf, size_t len, const char *name, ExcbImage *img, char *err) {
    png_image pi;
    memset(&pi, 0, sizeof pi);
    pi.version = PNG_IMAGE_VERSION;
    if (!png_image_begin_read_from_memory(&pi, buf, len))
        return fail(err, EXCB_EXIT_DATA, "%s: bad PNG: %s", name, pi.message);
    int code = check_size(name, pi.height, pi.width, err);
    if (!code && (pi.format & PNG_FORMAT_FLAG_LINEAR))
        code = fail(err, EXCB_EXIT_DATA, "%s: 16-bit PNG is not supported (libpng would gamma-convert it, PIL keeps "
                    "the high byte); convert it to 8 bits", name);
    if (code) { png_image_free(&pi); return code; }
    pi.format = PNG_FORMAT_RGBA;
    size_t npx = (size_t)pi.width * pi.height;
    if (grow(&img->px, &img->cap, npx * 4)) { png_image_free(&pi); return fail(err, EXCB_EXIT_OSERR, "%s: out of memory", name); }
    if (!png_image_finish_read(&pi, NULL, img->px, 0, NULL))
        return fail(err, EXCB_EXIT_DATA, "%s: bad PNG: %s", name, pi.message);
    for (size_t i = 0; i < npx; i++) {                                 /* RGBA -> RGB, in place     */
        img->px[3 * i] = img->px[4 * i];
        img->px[3 * i + 1] = img->px[4 * i + 1];
        img->px[3 * i + 2] = img->px[4 * i + 2];
    }
    img->h = (int)pi.height;
    img->w = (int)pi.width;
    img->c = 3;
    return 0;
}

/* libjpeg reports fatal errors through error_exit, which must not return: we longjmp back. Warnings
   ("premature end of data", "corrupt data") are counted and treated as errors: PIL refuses
   truncated JPEGs by default, and a silently grey lower half is exactly the substitution we refuse. */
typedef struct { struct jpeg_error_mgr pub; jmp_buf jump; char first[JMSG_LENGTH_MAX]; int warnings; } JpegError;

static void jpeg_error_exit(j_common_ptr cinfo) {
    JpegError *e = (JpegError *)cinfo->err;
    (*cinfo->err->format_message)(cinfo, e->first);
    longjmp(e->jump, 1);
}

static void jpeg_emit(j_common_ptr cinfo, int level) {
    JpegError *e = (JpegError *)cinfo->err;
    if (level < 0 && e->warnings++ == 0) (*cinfo->err->format_message)(cinfo, e->first);
}

static void jpeg_silent(j_common_ptr cinfo) { (void)cinfo; }

/* Pillow's CMYK -> RGB (Convert.c cmyk2rgb): R = nk - C nk / 255 with nk = 255 - K, via MULDIV255 */
static uint8_t cmyk_channel(int c, int k) {
    int nk = 255 - k, t = c * nk + 128;
    int v = nk - (((t >> 8) + t) >> 8);
    return (uint8_t)(v < 0 ? 0 : v > 255 ? 255 : v);
}

static int decode_jpeg(const uint8_t *buf, size_t len, const char *name, ExcbImage *img, char *err) {
    struct jpeg_decompress_struct ci;
    JpegError je;
    memset(&je, 0, sizeof je);
    ci.err = jpeg_std_error(&je.pub);
    je.pub.error_exit = jpeg_error_exit;
    je.pub.emit_message = jpeg_emit;
    je.pub.output_message = jpeg_silent;
    if (setjmp(je.jump)) {
        jpeg_destroy_decompress(&ci);
        return fail(err, EXCB_EXIT_DATA, "%s: bad JPEG: %s", name, je.first);
    }
    jpeg_create_decompress(&ci);
    jpeg_mem_src(&ci, buf, (unsigned long)len);
    jpeg_read_header(&ci, TRUE);
    int code = check_size(name, ci.image_height, ci.image_width, err);
    if (code) { jpeg_destroy_decompress(&ci); return code; }
    int cmyk = ci.jpeg_color_space == JCS_CMYK || ci.jpeg_color_space == JCS_YCCK;
    ci.out_color_space = cmyk ? JCS_CMYK : JCS_RGB;            /* gray -> RGB by replication     */
    jpeg_start_decompress(&ci);
    int oc = ci.output_components;
    size_t npx = (size_t)ci.output_width * ci.output_height;
    if (grow(&img->px, &img->cap, npx * (size_t)oc)) {
        jpeg_destroy_decompress(&ci);
        return fail(err, EXCB_EXIT_OSERR, "%s: out of memory", name);
    }
    while (ci.output_scanline < ci.output_height) {
        JSAMPROW row = img->px + (size_t)ci.output_scanline * ci.output_width * oc;
        jpeg_read_scanlines(&ci, &row, 1);
    }
    jpeg_finish_decompress(&ci);
    int adobe_inverted = ci.saw_Adobe_marker;       /* Photoshop stores CMYK inverted (PIL "CMYK;I") */
    img->h = (int)ci.output_height;
    img->w = (int)ci.output_width;
    img->c = 3;
    jpeg_destroy_decompress(&ci);
    if (je.warnings) return fail(err, EXCB_EXIT_DATA, "%s: corrupt JPEG: %s", name, je.first);
    if (cmyk)
        for (size_t i = 0; i < npx; i++) {
            uint8_t *p = img->px + 4 * i;
            int c = p[0], m = p[1], y = p[2], k = p[3];
            if (adobe_inverted) { c = 255 - c; m = 255 - m; y = 255 - y; k = 255 - k; }
            img->px[3 * i] = cmyk_channel(c, k);
            img->px[3 * i + 1] = cmyk_channel(m, k);
            img->px[3 * i + 2] = cmyk_channel(y, k);
        }
    return 0;
}

/* dispatch on magic bytes (never on the file name): 89 'P' 'N' 'G' or FF D8 FF */
int excb_decode_image(const uint8_t *buf, size_t len, const char *name, ExcbImage *img, char *err) {
    static const uint8_t png_magic[8] = {0x89, 'P', 'N', 'G', 0x0D, 0x0A, 0x1A, 0x0A};
    if (len >= 8 && !memcmp(buf, png_magic, 8)) return decode_png(buf, len, name, img, err);
    if (len >= 3 && buf[0] == 0xFF && buf[1] == 0xD8 && buf[2] == 0xFF) return decode_jpeg(buf, len, name, img, err);
    const char *what = len == 0 ? "empty file"
                     : len >= 2 && buf[0] == 'B' && buf[1] == 'M' ? "a BMP image"
                     : len >= 4 && !memcmp(buf, "GIF8", 4) ? "a GIF image"
                     : len >= 12 && !memcmp(buf, "RIFF", 4) && !memcmp(buf + 8, "WEBP", 4) ? "a WebP image"
                     : len >= 4 && (!memcmp(buf, "II*", 4) || !memcmp(buf, "MM\0*", 4)) ? "a TIFF image"
                     : "not an image";
    return fail(err, EXCB_EXIT_DATA, "%s: %s; excb decodes PNG and JPEG (recognised by their first bytes)", name, what);
}

/* image i of the data set, as interleaved 8-bit pixels */
int excb_data_get(const ExcbDataset *ds, long i, ExcbImage *img, char *err) {
    if (ds->keep) i = ds->keep[i];                   /* a subset (train_images): the source's index */
    if (ds->kind == EXCB_DATA_FOLDER) {
        size_t len;
        int code = read_whole_file(ds->files[i], &img->file, &img->file_cap, &len, (size_t)1 << 30, err);
        if (code) return code == EXCB_EXIT_NOINPUT ? EXCB_EXIT_DATA : code;  /* listed, then vanished */
        return excb_decode_image(img->file, len, ds->files[i], img, err);
    }
    int p = 0;
    long r = i;
    while (r >= ds->parts[p].n) r -= ds->parts[p++].n;
    const ExcbDataPart *part = &ds->parts[p];
    const uint8_t *src = part->base + (size_t)r * part->record + part->offset;
    int H = ds->height, W = ds->width, C = ds->channels;
    if (grow(&img->px, &img->cap, (size_t)H * W * C)) return fail(err, EXCB_EXIT_OSERR, "out of memory");
    img->h = H;
    img->w = W;
    img->c = C;
    size_t plane = (size_t)H * W;
    if (ds->layout == EXCB_LAYOUT_HWC) memcpy(img->px, src, plane * C);
    else
        for (int c = 0; c < C; c++)
            for (int y = 0; y < H; y++)
                for (int x = 0; x < W; x++)
                    img->px[((size_t)y * W + x) * C + c] =
                        src[c * plane + (ds->layout == EXCB_LAYOUT_CHW ? (size_t)y * W + x : (size_t)x * H + y)];
    return 0;
}

/* -- writers (tests, fixtures, view dumps) ------------------------------------------------------ */
int excb_write_png(const char *path, const uint8_t *px, int h, int w, int c, char *err) {
    png_image pi;
    memset(&pi, 0, sizeof pi);
    pi.version = PNG_IMAGE_VERSION;
    pi.width = (png_uint_32)w;
    pi.height = (png_uint_32)h;
    pi.format = c == 1 ? PNG_FORMAT_GRAY : PNG_FORMAT_RGB;
    if (!png_image_write_to_file(&pi, path, 0, px, 0, NULL))
        return fail(err, EXCB_EXIT_IO, "%s: cannot write PNG: %s", path, pi.message);
    return 0;
}

int excb_write_jpeg(const char *path, const uint8_t *px, int h, int w, int c, int quality, char *err) {
    FILE *f = fopen(path, "wb");
    if (!f) return fail(err, EXCB_EXIT_IO, "%s: cannot create: %s", path, strerror(errno));
    struct jpeg_compress_struct ci;
    JpegError je;
    memset(&je, 0, sizeof je);
    ci.err = jpeg_std_error(&je.pub);
    je.pub.error_exit = jpeg_error_exit;
    je.pub.output_message = jpeg_silent;
    if (setjmp(je.jump)) {
        jpeg_destroy_compress(&ci);
        fclose(f);
        return fail(err, EXCB_EXIT_IO, "%s: cannot write JPEG: %s", path, je.first);
    }
    jpeg_create_compress(&ci);
    jpeg_stdio_dest(&ci, f);
    ci.image_width = (JDIMENSION)w;
    ci.image_height = (JDIMENSION)h;
    ci.input_components = c;
    ci.in_color_space = c == 1 ? JCS_GRAYSCALE : c == 4 ? JCS_CMYK : JCS_RGB;
    jpeg_set_defaults(&ci);
    jpeg_set_quality(&ci, quality, TRUE);
    jpeg_start_compress(&ci, TRUE);
    while (ci.next_scanline < ci.image_height) {
        JSAMPROW row = (JSAMPROW)(px + (size_t)ci.next_scanline * w * c);
        jpeg_write_scanlines(&ci, &row, 1);
    }
    jpeg_finish_compress(&ci);
    jpeg_destroy_compress(&ci);
    if (fclose(f) != 0) return fail(err, EXCB_EXIT_IO, "%s: write failed", path);
    return 0;
}

/* ================================================================================================
 * 12. Views: ExCB's multi-crop augmentation (paper_notes.md §8b; transforms.py L84-103)
 * ================================================================================================
 * Per view, in this order, on 8-bit pixels as torchvision does on PIL images:
 *   RandomResizedCrop(S, scale, ratio 3/4..4/3, bicubic) -> horizontal flip (p 0.5)
 *   -> colour jitter (p 0.8; brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1, random order)
 *   -> grayscale (p 0.2) -> Gaussian blur (kernel 9, sigma U(0.1, 2); p per view, A14)
 *   -> solarize (view 2 only, p 0.2) -> to float, /255, normalise (mean, std of A16).
 * Global views take scale (s_min(e), 1) and local views (0.05, s_min(e)); s_min falls from 0.26 to
 * 0.14 over the epochs (A11).
 *
 * The arithmetic is PIL's (Pillow 9.4), where torchvision hands the work to PIL: the bicubic resample
 * (a = -0.5, support widened when shrinking, 22-bit fixed-point weights, two 8-bit passes), the
 * blends of ImageEnhance (float, truncated), the integer ITU-R 601 luma, the uint8 HSV round trip of
 * adjust_hue. The blur is torchvision's own (float convolution, reflect padding, round half to even).
 * tests/reference/make_view_golden.py checks the operators against PIL bit for bit.
 *
 * Randomness: every draw is excb_hash(seed, VIEW, epoch, sample, view << 16 | purpose << 8 | k), so a
 * view is a pure function of (seed, epoch, sample, view): thread count, batch composition and resume
 * point cannot change it.
 */
enum { VP_CROP = 1, VP_FLIP, VP_JITTER, VP_ORDER, VP_FACTORS, VP_GRAY, VP_BLUR, VP_SIGMA, VP_SOLARIZE };

static double view_uniform(const ExcbViewConfig *vc, long epoch, long sample, int view, int purpose, int k) {
    uint64_t h = excb_hash(vc->seed, EXCB_RNG_VIEW, (uint64_t)epoch, (uint64_t)sample,
                           (uint64_t)view << 16 | (uint64_t)purpose << 8 | (uint64_t)k);
    return (h >> 11) * 0x1.0p-53;                                        /* [0, 1), 53 bits        */
}

static double uniform_in(double u, double lo, double hi) { return lo + (hi - lo) * u; }

/* an integer in [0, n): floor(u n) with u in [0, 1) never reaches n */
static int uniform_int(double u, int n) { int v = (int)(u * n); return v < n ? v : n - 1; }

void excb_view_config_default(ExcbViewConfig *vc, int blur_mode) {
    memset(vc, 0, sizeof *vc);
    vc->n_global = 2; vc->n_local = 6; vc->global_size = 224; vc->local_size = 96; vc->channels = 3;
    vc->epochs = 400;
    vc->ratio_min = 3.0 / 4.0; vc->ratio_max = 4.0 / 3.0; vc->local_scale_min = 0.05;
    vc->p_flip = 0.5; vc->p_jitter = 0.8;
    vc->brightness = 0.4; vc->contrast = 0.4; vc->saturation = 0.2; vc->hue = 0.1; vc->p_gray = 0.2;
    /* A14: the code passes 1 - p to RandomApply, so the blur it runs is 0 / 0.9 / 0; as configured
       (DINO's intent) it is 1.0 / 0.1 / 0.5 */
    double run[3] = {0.0, 0.9, 0.0}, configured[3] = {1.0, 0.1, 0.5};
    memcpy(vc->p_blur, blur_mode == EXCB_BLUR_AS_RUN ? run : configured, sizeof vc->p_blur);
    if (blur_mode == EXCB_BLUR_NONE) memset(vc->p_blur, 0, sizeof vc->p_blur);   /* an option of excb's */
    vc->blur_sigma_min = 0.1; vc->blur_sigma_max = 2.0; vc->blur_kernel = 9;
    vc->scale_offset = 0.0;
    vc->p_solarize[0] = 0.0; vc->p_solarize[1] = 0.2; vc->p_solarize[2] = 0.0;
    vc->solarize_threshold = 128;                        /* ImageOps.solarize's default threshold   */
    const float mean[3] = {0.485f, 0.456f, 0.406f}, std[3] = {0.228f, 0.224f, 0.225f};   /* A16 */
    memcpy(vc->mean, mean, sizeof mean);
    memcpy(vc->std, std, sizeof std);
}

/* The views a model configuration trains on. One-channel data (Fashion-MNIST) is normalised with the
   luma-weighted mean and std of A16's three channels (0.299, 0.587, 0.114 of each): what the RGB
   statistics give for a gray image; a choice of this implementation, the official code has no
   one-channel path. */
void excb_view_config_for(ExcbViewConfig *vc, const ExcbConfig *cfg, long epochs, int blur_mode) {
    excb_view_config_default(vc, blur_mode);
    vc->n_global = cfg->n_global;
    vc->n_local = cfg->n_local;
    vc->global_size = cfg->global_size;
    vc->local_size = cfg->local_size;
    vc->channels = cfg->in_ch;
    vc->epochs = epochs;
    vc->seed = cfg->seed;
    if (cfg->in_ch == 1) {
        vc->mean[0] = 0.299f * vc->mean[0] + 0.587f * vc->mean[1] + 0.114f * vc->mean[2];
        vc->std[0] = 0.299f * vc->std[0] + 0.587f * vc->std[1] + 0.114f * vc->std[2];
    }
}

/* The random choices of one view. RandomResizedCrop.get_params, verbatim: up to 10 tries of an area
   fraction and a log-uniform aspect ratio, sides rounded half-to-even (Python's round); otherwise
   the centre crop with the ratio clamped. */
void excb_view_params(const ExcbViewConfig *vc, long epoch, long sample, int view, int H, int W,
                      ExcbViewParams *p) {
    memset(p, 0, sizeof *p);
    int local = view >= vc->n_global, which = local ? 2 : view == 0 ? 0 : 1;
    double s_min = vc->fixed_scale_split > 0 ? vc->fixed_scale_split : crop_scale_min_at(epoch, vc->epochs) + vc->scale_offset;
    double lo = local ? vc->local_scale_min : s_min, hi = local ? s_min : 1.0;
    double area = (double)H * W, lr0 = log(vc->ratio_min), lr1 = log(vc->ratio_max);
    int found = 0;
    for (int t = 0; t < 10 && !found; t++) {
        double target = area * uniform_in(view_uniform(vc, epoch, sample, view, VP_CROP, 4 * t), lo, hi);
        double ratio = exp(uniform_in(view_uniform(vc, epoch, sample, view, VP_CROP, 4 * t + 1), lr0, lr1));
        int w = (int)rint(sqrt(target * ratio)), h = (int)rint(sqrt(target / ratio));
        if (w > 0 && w <= W && h > 0 && h <= H) {
            p->top = uniform_int(view_uniform(vc, epoch, sample, view, VP_CROP, 4 * t + 2), H - h + 1);
            p->left = uniform_int(view_uniform(vc, epoch, sample, view, VP_CROP, 4 * t + 3), W - w + 1);
            p->h = h;
            p->w = w;
            found = 1;
        }
    }
    if (!found) {
        double in_ratio = (double)W / H;
        if (in_ratio < vc->ratio_min) { p->w = W; p->h = (int)rint(W / vc->ratio_min); }
        else if (in_ratio > vc->ratio_max) { p->h = H; p->w = (int)rint(H * vc->ratio_max); }
        else { p->w = W; p->h = H; }
        p->top = (H - p->h) / 2;
        p->left = (W - p->w) / 2;
    }
    p->flip = view_uniform(vc, epoch, sample, view, VP_FLIP, 0) < vc->p_flip;
    p->jitter = view_uniform(vc, epoch, sample, view, VP_JITTER, 0) < vc->p_jitter;
    /* the order of the four jitter operators: a uniform permutation (torch.randperm(4)) */
    for (int i = 0; i < 4; i++) p->order[i] = i;
    for (int i = 3; i > 0; i--) {
        int j = uniform_int(view_uniform(vc, epoch, sample, view, VP_ORDER, i), i + 1), t = p->order[i];
        p->order[i] = p->order[j];
        p->order[j] = t;
    }
    p->brightness = uniform_in(view_uniform(vc, epoch, sample, view, VP_FACTORS, 0), fmax(0, 1 - vc->brightness), 1 + vc->brightness);
    p->contrast = uniform_in(view_uniform(vc, epoch, sample, view, VP_FACTORS, 1), fmax(0, 1 - vc->contrast), 1 + vc->contrast);
    p->saturation = uniform_in(view_uniform(vc, epoch, sample, view, VP_FACTORS, 2), fmax(0, 1 - vc->saturation), 1 + vc->saturation);
    p->hue = uniform_in(view_uniform(vc, epoch, sample, view, VP_FACTORS, 3), -vc->hue, vc->hue);
    p->gray = view_uniform(vc, epoch, sample, view, VP_GRAY, 0) < vc->p_gray;
    p->blur = view_uniform(vc, epoch, sample, view, VP_BLUR, 0) < vc->p_blur[which];
    p->sigma = uniform_in(view_uniform(vc, epoch, sample, view, VP_SIGMA, 0), vc->blur_sigma_min, vc->blur_sigma_max);
    p->solarize = view_uniform(vc, epoch, sample, view, VP_SOLARIZE, 0) < vc->p_solarize[which];
}

/* -- RandomResizedCrop's resize: PIL's bicubic resample (Resample.c) ---------------------------- */
double excb_bicubic_weight(double x) {
    const double a = -0.5;                                   /* PIL's bicubic; torch's tensors use -0.75 */
    x = fabs(x);
    if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
    if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
    return 0.0;
}

#define RESAMPLE_BITS 22                                     /* PIL: PRECISION_BITS = 32 - 8 - 2     */
static uint8_t clip8_fixed(int v) {
    v >>= RESAMPLE_BITS;
    return (uint8_t)(v < 0 ? 0 : v > 255 ? 255 : v);
}

/* The taps of every output pixel along one axis: for output i, input range [first[i], first[i] + n[i])
   with fixed-point weights kk[i * ksize ...]. PIL widens the filter by the scale when shrinking
   (antialiasing) and normalises the weights to sum 1 before rounding them to 22 bits. */
static int resample_ksize(int in_size, int out_size) {
    double scale = (double)in_size / out_size, fs = scale < 1.0 ? 1.0 : scale;
    return (int)ceil(2.0 * fs) * 2 + 1;
}

static void resample_taps(int in_size, int out_size, int ksize, int *first, int *n, int *kk, double *w) {
    double scale = (double)in_size / out_size, fs = scale < 1.0 ? 1.0 : scale;
    double support = 2.0 * fs, ss = 1.0 / fs;
    for (int i = 0; i < out_size; i++) {
        double center = (i + 0.5) * scale, sum = 0;
        int xmin = (int)(center - support + 0.5), xmax = (int)(center + support + 0.5);
        if (xmin < 0) xmin = 0;
        if (xmax > in_size) xmax = in_size;
        int m = xmax - xmin, *k = kk + (size_t)i * ksize;
        for (int x = 0; x < m; x++) { w[x] = excb_bicubic_weight((x + xmin - center + 0.5) * ss); sum += w[x]; }
        for (int x = 0; x < m; x++) {
            double v = sum != 0.0 ? w[x] / sum : w[x];
            k[x] = (int)(v < 0 ? -0.5 + v * (1 << RESAMPLE_BITS) : 0.5 + v * (1 << RESAMPLE_BITS));
        }
        first[i] = xmin;
        n[i] = m;
    }
}

/* src: sh x sw pixels with row stride sstride (bytes); dst: dh x dw, interleaved c channels. The
   horizontal pass runs first, into tmp (sh x dw x c), then the vertical one, both rounding to 8 bits,
   as in PIL; a pass whose size does not change is skipped (PIL's need_horizontal / need_vertical). */
void excb_resize_bicubic(const uint8_t *src, int sh, int sw, int sstride, uint8_t *dst, int dh, int dw,
                         int c, uint8_t *tmp) {
    int ks_h = resample_ksize(sw, dw), ks_v = resample_ksize(sh, dh);
    /* tap tables on the stack; on the heap only when shrinking by more than about 16x */
    size_t need = (size_t)dw * ks_h + (size_t)dh * ks_v + 2 * ((size_t)dw + dh), dneed = ks_h > ks_v ? ks_h : ks_v;
    int stack[16384], *buf = need <= 16384 ? stack : malloc(sizeof(int) * need);
    double dstack[1024], *w = dneed <= 1024 ? dstack : malloc(sizeof(double) * dneed);
    if (!buf || !w) { fprintf(stderr, "excb: out of memory resizing\n"); exit(EXCB_EXIT_OSERR); }
    int *kh = buf, *kv = kh + (size_t)dw * ks_h, *fh = kv + (size_t)dh * ks_v, *nh = fh + dw, *fv = nh + dw, *nv = fv + dh;
    const uint8_t *mid = src;
    int mid_stride = sstride;
    /* Integer sums are exact, so the loops below may run in any order and still give PIL's bytes. */
    if (dw != sw) {
        resample_taps(sw, dw, ks_h, fh, nh, kh, w);
        for (int y = 0; y < sh; y++) {
            const uint8_t *row = src + (size_t)y * sstride;
            uint8_t *o = tmp + (size_t)y * dw * c;
            for (int x = 0; x < dw; x++) {
                const int *k = kh + (size_t)x * ks_h;
                const uint8_t *s = row + (size_t)fh[x] * c;
                if (c == 3) {                                         /* the common case, unrolled */
                    int a0 = 1 << (RESAMPLE_BITS - 1), a1 = a0, a2 = a0;
                    for (int t = 0; t < nh[x]; t++) { a0 += s[3 * t] * k[t]; a1 += s[3 * t + 1] * k[t]; a2 += s[3 * t + 2] * k[t]; }
                    o[3 * x] = clip8_fixed(a0); o[3 * x + 1] = clip8_fixed(a1); o[3 * x + 2] = clip8_fixed(a2);
                } else
                    for (int ch = 0; ch < c; ch++) {
                        int acc = 1 << (RESAMPLE_BITS - 1);
                        for (int t = 0; t < nh[x]; t++) acc += s[t * c + ch] * k[t];
                        o[x * c + ch] = clip8_fixed(acc);
                    }
            }
        }
        mid = tmp;
        mid_stride = dw * c;
    }
    if (dh != sh) {
        resample_taps(sh, dh, ks_v, fv, nv, kv, w);
        int wc = dw * c, astack[4096], *acc = wc <= 4096 ? astack : malloc(sizeof(int) * wc);
        if (!acc) { fprintf(stderr, "excb: out of memory resizing\n"); exit(EXCB_EXIT_OSERR); }
        for (int y = 0; y < dh; y++) {                      /* whole rows at a time: vectorisable */
            const int *k = kv + (size_t)y * ks_v;
            for (int x = 0; x < wc; x++) acc[x] = 1 << (RESAMPLE_BITS - 1);
            for (int t = 0; t < nv[y]; t++) {
                const uint8_t *s = mid + (size_t)(fv[y] + t) * mid_stride;
                int kt = k[t];
                for (int x = 0; x < wc; x++) acc[x] += s[x] * kt;
            }
            uint8_t *o = dst + (size_t)y * wc;
            for (int x = 0; x < wc; x++) o[x] = clip8_fixed(acc[x]);
        }
        if (acc != astack) free(acc);
    } else {
        for (int y = 0; y < dh; y++) memcpy(dst + (size_t)y * dw * c, mid + (size_t)y * mid_stride, (size_t)dw * c);
    }
    if (buf != stack) free(buf);
    if (w != dstack) free(w);
}

/* -- colour jitter: PIL's ImageEnhance, i.e. Image.blend(degenerate, image, factor) --------------- */
/* Blend.c: out = in1 + alpha (in2 - in1) in float, truncated to an integer and clipped to 0..255 */
static uint8_t blend8(int degenerate, int v, float alpha) {
    float t = (float)degenerate + alpha * (float)(v - degenerate);
    return t <= 0.0f ? 0 : t >= 255.0f ? 255 : (uint8_t)t;
}

/* ITU-R 601-2 luma in PIL's fixed point (Convert.c L24): (19595 R + 38470 G + 7471 B + 0x8000) >> 16 */
static uint8_t luma8(const uint8_t *p) { return (uint8_t)((p[0] * 19595 + p[1] * 38470 + p[2] * 7471 + 0x8000) >> 16); }

void excb_adjust_brightness(uint8_t *px, size_t npx, int c, double f) {     /* blend with black */
    for (size_t i = 0; i < npx * c; i++) px[i] = blend8(0, px[i], (float)f);
}

/* blend with a flat gray image at the mean luma, int(mean + 0.5) (ImageEnhance.Contrast) */
void excb_adjust_contrast(uint8_t *px, size_t npx, int c, double f) {
    double sum = 0;
    for (size_t i = 0; i < npx; i++) sum += c == 3 ? luma8(px + 3 * i) : px[i];
    int mean = (int)(sum / npx + 0.5);
    for (size_t i = 0; i < npx * c; i++) px[i] = blend8(mean, px[i], (float)f);
}

/* blend with the image's own luma (ImageEnhance.Color); the identity on gray images */
void excb_adjust_saturation(uint8_t *px, size_t npx, int c, double f) {
    if (c != 3) return;
    for (size_t i = 0; i < npx; i++) {
        int l = luma8(px + 3 * i);
        for (int k = 0; k < 3; k++) px[3 * i + k] = blend8(l, px[3 * i + k], (float)f);
    }
}

/* torchvision adjust_hue on PIL: RGB -> HSV (PIL, 8-bit), H += uint8(f * 255) modulo 256, back to RGB.
   The shift is cast as numpy casts a float to uint8 here: truncate toward zero, then wrap. */
static void rgb_to_hsv8(const uint8_t *in, uint8_t *out) {
    int r = in[0], g = in[1], b = in[2];
    int maxc = r > g ? (r > b ? r : b) : (g > b ? g : b), minc = r < g ? (r < b ? r : b) : (g < b ? g : b);
    out[2] = (uint8_t)maxc;
    if (minc == maxc) { out[0] = out[1] = 0; return; }
    float cr = (float)(maxc - minc), s = cr / (float)maxc;
    float rc = (float)(maxc - r) / cr, gc = (float)(maxc - g) / cr, bc = (float)(maxc - b) / cr, h;
    if (r == maxc) h = bc - gc;
    else if (g == maxc) h = (float)(2.0 + rc - bc);      /* in double, as PIL */
    else h = (float)(4.0 + gc - rc);
    double h1 = h / 6.0 + 1.0;                      /* in [5/6, 11/6]: PIL's fmod(h1, 1.0), exactly */
    h = (float)(h1 >= 1.0 ? h1 - 1.0 : h1);
    int ih = (int)(h * 255.0), is = (int)(s * 255.0);
    out[0] = (uint8_t)(ih < 0 ? 0 : ih > 255 ? 255 : ih);
    out[1] = (uint8_t)(is < 0 ? 0 : is > 255 ? 255 : is);
}

static uint8_t clip8d(double v) { return (uint8_t)(v < 0 ? 0 : v > 255 ? 255 : v); }

/* C's round() (half away from zero) for x >= 0, without the library call: x - floor(x) is exact */
static double round_nonneg(double x) {
    double f = floor(x);
    return x - f >= 0.5 ? f + 1.0 : f;
}

static void hsv8_to_rgb(const uint8_t *in, uint8_t *out) {
    int h = in[0], s = in[1], v = in[2];
    if (s == 0) { out[0] = out[1] = out[2] = (uint8_t)v; return; }
    int i = (int)floor((float)h * 6.0 / 255.0);
    float f = (float)((float)h * 6.0 / 255.0 - (float)i), fs = (float)((float)s / 255.0);
    /* PIL: round((float)v * (1.0 - fs)) etc.; every product here is >= 0 */
    uint8_t p = clip8d(round_nonneg((float)v * (1.0 - fs))), q = clip8d(round_nonneg((float)v * (1.0 - fs * f)));
    uint8_t t = clip8d(round_nonneg((float)v * (1.0 - fs * (1.0 - f)))), V = (uint8_t)v;
    switch (i % 6) {
    case 0: out[0] = V; out[1] = t; out[2] = p; break;
    case 1: out[0] = q; out[1] = V; out[2] = p; break;
    case 2: out[0] = p; out[1] = V; out[2] = t; break;
    case 3: out[0] = p; out[1] = q; out[2] = V; break;
    case 4: out[0] = t; out[1] = p; out[2] = V; break;
    default: out[0] = V; out[1] = p; out[2] = q; break;
    }
}

void excb_adjust_hue(uint8_t *px, size_t npx, int c, double f) {
    if (c != 3) return;                                      /* adjust_hue leaves L images alone */
    uint8_t shift = (uint8_t)((int)(f * 255) & 255);
    for (size_t i = 0; i < npx; i++) {
        uint8_t hsv[3];
        rgb_to_hsv8(px + 3 * i, hsv);
        hsv[0] = (uint8_t)(hsv[0] + shift);
        hsv8_to_rgb(hsv, px + 3 * i);
    }
}

/* RandomGrayscale: L = luma, copied to the three channels (num_output_channels = 3) */
void excb_grayscale(uint8_t *px, size_t npx, int c) {
    if (c != 3) return;
    for (size_t i = 0; i < npx; i++) px[3 * i] = px[3 * i + 1] = px[3 * i + 2] = luma8(px + 3 * i);
}

/* -- Gaussian blur: torchvision's gaussian_blur, kernel 9 at every crop size (A14) ---------------- */
/* k[i] proportional to exp(-x^2 / (2 sigma^2)), x = i - (ksize - 1)/2, summing to 1 */
void excb_blur_kernel(double *k, int ksize, double sigma) {
    double sum = 0, half = (ksize - 1) * 0.5;
    for (int i = 0; i < ksize; i++) { double x = (i - half) / sigma; k[i] = exp(-0.5 * x * x); sum += k[i]; }
    for (int i = 0; i < ksize; i++) k[i] /= sum;
}

/* reflect padding (no edge repeat): -1 -> 1, n -> n - 2; folded again for tiny images */
static int reflect(int i, int n) {
    if (n == 1) return 0;
    int period = 2 * (n - 1);
    i %= period;
    if (i < 0) i += period;
    return i < n ? i : period - i;
}

/* separable, in double, rounded half to even at the end (torch.round). The reflected indices are
   tabulated once per call; each output sums its taps in the order t = 0..k-1. */
void excb_gaussian_blur(uint8_t *px, int h, int w, int c, int ksize, double sigma, float *tmp) {
    double k[64];
    if (ksize > 63) ksize = 63;
    excb_blur_kernel(k, ksize, sigma);
    int half = ksize / 2, wc = w * c, side = (w > h ? w : h) + 2 * half;
    int istack[4096 + 64], *idx = side <= 4096 + 64 ? istack : malloc(sizeof(int) * side);
    if (!idx) { fprintf(stderr, "excb: out of memory blurring\n"); exit(EXCB_EXIT_OSERR); }
    for (int i = 0; i < w + 2 * half; i++) idx[i] = reflect(i - half, w);          /* columns */
    for (int y = 0; y < h; y++) {
        const uint8_t *row = px + (size_t)y * wc;
        float *o = tmp + (size_t)y * wc;
        for (int x = 0; x < w; x++)
            for (int ch = 0; ch < c; ch++) {
                double acc = 0;
                for (int t = 0; t < ksize; t++) acc += k[t] * row[idx[x + t] * c + ch];
                o[x * c + ch] = (float)acc;
            }
    }
    for (int i = 0; i < h + 2 * half; i++) idx[i] = reflect(i - half, h);          /* rows    */
    for (int y = 0; y < h; y++) {
        const float *rows[64];
        for (int t = 0; t < ksize; t++) rows[t] = tmp + (size_t)idx[y + t] * wc;
        uint8_t *o = px + (size_t)y * wc;
        for (int x = 0; x < wc; x++) {
            double acc = 0;
            for (int t = 0; t < ksize; t++) acc += k[t] * rows[t][x];
            double r = nearbyint(acc);
            o[x] = (uint8_t)(r < 0 ? 0 : r > 255 ? 255 : r);
        }
    }
    if (idx != istack) free(idx);
}

/* ImageOps.solarize: every value >= threshold becomes 255 - value */
void excb_solarize(uint8_t *px, size_t n, int threshold) {
    for (size_t i = 0; i < n; i++) if (px[i] >= threshold) px[i] = (uint8_t)(255 - px[i]);
}

static void scratch_reserve(ExcbViewScratch *s, size_t bytes, size_t floats) {
    if (bytes > s->cap) {
        free(s->a); free(s->b);
        s->a = xmalloc(bytes); s->b = xmalloc(bytes); s->cap = bytes;
    }
    if (floats > s->fcap) { free(s->f); s->f = xmalloc(sizeof(float) * floats); s->fcap = floats; }
}

void excb_make_view(const ExcbViewConfig *vc, const ExcbViewParams *p, const ExcbImage *img, int view,
                    real *out, ExcbViewScratch *scr) {
    int S = view < vc->n_global ? vc->global_size : vc->local_size, C = img->c;
    size_t npx = (size_t)S * S;
    /* a: the crop's horizontal pass (h x S), then b: the view (S x S) */
    scratch_reserve(scr, (size_t)C * (p->h > S ? p->h : S) * S, (size_t)C * npx);
    const uint8_t *src = img->px + ((size_t)p->top * img->w + p->left) * C;
    uint8_t *v = scr->b;
    excb_resize_bicubic(src, p->h, p->w, img->w * C, v, S, S, C, scr->a);
    if (p->flip)
        for (int y = 0; y < S; y++)
            for (int x = 0; x < S / 2; x++)
                for (int ch = 0; ch < C; ch++) {
                    uint8_t *l = v + ((size_t)y * S + x) * C + ch, *r = v + ((size_t)y * S + S - 1 - x) * C + ch, t = *l;
                    *l = *r;
                    *r = t;
                }
    if (p->jitter)
        for (int i = 0; i < 4; i++) switch (p->order[i]) {
            case 0: excb_adjust_brightness(v, npx, C, p->brightness); break;
            case 1: excb_adjust_contrast(v, npx, C, p->contrast); break;
            case 2: excb_adjust_saturation(v, npx, C, p->saturation); break;
            default: excb_adjust_hue(v, npx, C, p->hue); break;
            }
    if (p->gray) excb_grayscale(v, npx, C);
    if (p->blur) excb_gaussian_blur(v, S, S, C, vc->blur_kernel, p->sigma, scr->f);
    if (p->solarize) excb_solarize(v, npx * C, vc->solarize_threshold);
    /* ToTensor then Normalize, in float as torchvision: (v / 255 - mean) / std, planes (C, S, S) */
    for (int ch = 0; ch < C; ch++) {
        float mean = vc->mean[ch], std = vc->std[ch];
        for (size_t i = 0; i < npx; i++) out[ch * npx + i] = (real)(((float)v[i * C + ch] / 255.0f - mean) / std);
    }
}

/* ================================================================================================
 * 13. The loader: a permutation per epoch, batches made by background workers
 * ================================================================================================
 * Batch g (counted over the whole run) belongs to epoch e = g / batches_per_epoch and holds images
 * perm_e[(g mod batches_per_epoch) * B + b], b < B, of that epoch's permutation (drop_last, as the
 * official sampler). perm_e is a Fisher-Yates shuffle driven by (seed, PERM, e), and every view is
 * a pure function of (seed, e, image, view), so batch g's bytes depend on nothing else: not on
 * the number of workers, not on which worker made it, not on where a run was resumed.
 *
 * Workers: worker w makes batches first + w, first + w + W, ...; slot (g - first) mod S holds batch
 * g, with S = W + 1 slots: while the caller trains on batch c, the W workers fill batches c + 1 ..
 * c + W, all at once. Memory is fixed when the loader opens: S batch buffers plus, per worker, the
 * largest image decoded so far (bounded by EXCB_MAX_PIXELS). excb allocates nothing per batch once
 * the buffers have grown (libjpeg and libpng keep their own per-file decoder state).
 */
void excb_permutation(int64_t *perm, long n, uint64_t seed, long epoch) {
    for (long i = 0; i < n; i++) perm[i] = i;
    for (long i = n - 1; i > 0; i--) {
        uint64_t h = excb_hash(seed, EXCB_RNG_PERM, (uint64_t)epoch, 0, (uint64_t)i);
        long j = (long)(((unsigned __int128)h * (uint64_t)(i + 1)) >> 64);   /* uniform in [0, i]  */
        int64_t t = perm[i];
        perm[i] = perm[j];
        perm[j] = t;
    }
}

enum { SLOT_FREE = 0, SLOT_READY = 1 };

typedef struct {
    ExcbLoader *L;
    int id;
    ExcbImage img;
    ExcbViewScratch scr;
    int64_t *perm;  long perm_epoch;
} LoaderWorker;

typedef struct { pthread_mutex_t mu; pthread_cond_t ready, freed; } LoaderSync;

/* One image for place k of the epoch's order. A bad image is an error, or with skip_bad, is logged
   once, marked, and replaced by the next good image of the same epoch order (so that image appears
   twice in this epoch; the batch stays full and no made-up pixels enter training). */
static int load_for_place(LoaderWorker *w, long epoch_place, int64_t *chosen, char *err) {
    ExcbLoader *L = w->L;
    ExcbDataset *ds = L->ds;
    LoaderSync *sy = L->sync;
    for (long tries = 0; tries < ds->n; tries++) {
        int64_t idx = w->perm[(epoch_place + tries) % ds->n];
        if (ds->bad) {
            pthread_mutex_lock(&sy->mu);
            int known_bad = ds->bad[idx];
            pthread_mutex_unlock(&sy->mu);
            if (known_bad) continue;
        }
        int code = excb_data_get(ds, idx, &w->img, err);
        if (!code && w->img.c != L->vc.channels)
            code = fail(err, EXCB_EXIT_DATA, "%s: image %lld has %d channels, the views expect %d", ds->path, (long long)idx,
                        w->img.c, L->vc.channels);
        if (!code) { *chosen = idx; return 0; }
        if (!ds->skip_bad || code != EXCB_EXIT_DATA) return code;
        pthread_mutex_lock(&sy->mu);
        if (!ds->bad[idx]) {
            ds->bad[idx] = 1;
            ds->n_bad++;
            fprintf(stderr, "excb: skipping bad image (%ld so far): %s\n", ds->n_bad, err);
        }
        pthread_mutex_unlock(&sy->mu);
    }
    return fail(err, EXCB_EXIT_DATA, "%s: every image failed to decode", ds->path);
}

static void make_batch(LoaderWorker *w, ExcbBatch *bt, long id) {
    ExcbLoader *L = w->L;
    const ExcbViewConfig *vc = &L->vc;
    long epoch = id / L->batches_per_epoch, step = id % L->batches_per_epoch;
    if (w->perm_epoch != epoch) { excb_permutation(w->perm, L->ds->n, vc->seed, epoch); w->perm_epoch = epoch; }
    int B = L->batch, C = vc->channels;
    size_t gsz = (size_t)C * vc->global_size * vc->global_size, lsz = (size_t)C * vc->local_size * vc->local_size;
    bt->id = id;
    bt->epoch = epoch;
    bt->step_in_epoch = step;
    bt->err_code = 0;
    for (int b = 0; b < B && !bt->err_code; b++) {
        int64_t idx = 0;
        bt->err_code = load_for_place(w, step * L->global_batch + L->share_first + b, &idx, bt->err);
        if (bt->err_code) break;
        bt->index[b] = idx;
        bt->labels[b] = L->ds->labels ? L->ds->labels[idx] : -1;
        for (int v = 0; v < vc->n_global + vc->n_local; v++) {
            ExcbViewParams p;
            excb_view_params(vc, epoch, idx, v, w->img.h, w->img.w, &p);
            real *out = v < vc->n_global ? bt->xg + ((size_t)v * B + b) * gsz
                                         : bt->xl + ((size_t)(v - vc->n_global) * B + b) * lsz;
            excb_make_view(vc, &p, &w->img, v, out, &w->scr);
        }
    }
}

static double now_seconds(void) {                   /* monotonic wall clock, for busy time and benchmarks */
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + 1e-9 * ts.tv_nsec;
}

static void *worker_main(void *arg) {
    LoaderWorker *w = arg;
    ExcbLoader *L = w->L;
    LoaderSync *sy = L->sync;
    for (long id = L->first_batch + w->id;; id += L->n_workers) {
        long rel = id - L->first_batch;
        ExcbBatch *bt = &L->slots[rel % L->n_slots];
        pthread_mutex_lock(&sy->mu);
        /* the slot is ours once its previous batch, rel - S, has been used and released */
        while (!L->stop && L->released < rel - L->n_slots + 1) pthread_cond_wait(&sy->freed, &sy->mu);
        int stop = L->stop;
        bt->state = SLOT_FREE;
        pthread_mutex_unlock(&sy->mu);
        if (stop) break;
        double t0 = now_seconds();
        make_batch(w, bt, id);
        double dt = now_seconds() - t0;
        /* read the outcome before handing the slot over: once READY, the caller may use the batch and
           another worker may refill the slot (reading bt->err_code after that made a healthy worker
           stop on someone else's error, and the caller wait forever for its next batch) */
        int failed = bt->err_code;
        pthread_mutex_lock(&sy->mu);
        L->busy_seconds += dt;
        bt->state = SLOT_READY;
        pthread_cond_broadcast(&sy->ready);
        pthread_mutex_unlock(&sy->mu);
        if (failed) break;                       /* the consumer reports it; nothing more to make   */
    }
    return NULL;
}

int excb_loader_open(ExcbLoader *L, ExcbDataset *ds, const ExcbViewConfig *vc, int batch, int workers,
                     long first_batch, char *err) {
    return excb_loader_open_share(L, ds, vc, batch, 1, 0, workers, first_batch, err);
}

int excb_loader_open_share(ExcbLoader *L, ExcbDataset *ds, const ExcbViewConfig *vc, int global_batch, int shares,
                           int share, int workers, long first_batch, char *err) {
    memset(L, 0, sizeof *L);
    int batch = global_batch / shares;
    if (ds->n < global_batch)
        return fail(err, EXCB_EXIT_DATA, "%s: %ld images, fewer than one batch of %d", ds->path, ds->n, global_batch);
    if (ds->channels != vc->channels)
        return fail(err, EXCB_EXIT_DATA, "%s: images have %d channel(s), the model expects %d", ds->path, ds->channels, vc->channels);
    L->ds = ds;
    L->vc = *vc;
    L->batch = batch;
    L->global_batch = global_batch;
    L->share_first = share * batch;
    L->n_workers = workers;
    L->n_slots = workers > 0 ? workers + 1 : 1;
    L->batches_per_epoch = ds->n / global_batch;
    L->first_batch = first_batch;
    if (ds->skip_bad && !ds->bad) ds->bad = xcalloc(ds->n, 1);
    size_t gsz = (size_t)vc->channels * vc->global_size * vc->global_size;
    size_t lsz = (size_t)vc->channels * vc->local_size * vc->local_size;
    L->slots = xcalloc(L->n_slots, sizeof(ExcbBatch));
    for (int s = 0; s < L->n_slots; s++) {
        ExcbBatch *bt = &L->slots[s];
        bt->xg = xmalloc(sizeof(real) * gsz * vc->n_global * batch);
        bt->xl = xmalloc(sizeof(real) * (lsz * vc->n_local * batch + 1));
        bt->labels = xmalloc(sizeof(int32_t) * batch);
        bt->index = xmalloc(sizeof(int64_t) * batch);
    }
    LoaderSync *sy = xcalloc(1, sizeof *sy);
    pthread_mutex_init(&sy->mu, NULL);
    pthread_cond_init(&sy->ready, NULL);
    pthread_cond_init(&sy->freed, NULL);
    L->sync = sy;
    int nw = workers > 0 ? workers : 1;
    LoaderWorker *ws = xcalloc(nw, sizeof *ws);
    for (int i = 0; i < nw; i++) {
        ws[i].L = L;
        ws[i].id = i;
        ws[i].perm = xmalloc(sizeof(int64_t) * ds->n);
        ws[i].perm_epoch = -1;
    }
    L->workers = ws;
    if (workers > 0) {
        pthread_t *th = xcalloc(workers, sizeof *th);
        L->threads = th;
        for (int i = 0; i < workers; i++)
            if (pthread_create(&th[i], NULL, worker_main, &ws[i])) {
                L->n_workers = i;                /* the ones that did start are joined at close     */
                excb_loader_close(L);
                return fail(err, EXCB_EXIT_OSERR, "cannot start loader thread %d", i);
            }
    }
    return 0;
}

int excb_loader_next(ExcbLoader *L, ExcbBatch **out, char *err) {
    /* after a failure the worker that made the failed batch has stopped: never wait for it again */
    if (L->error_code) { snprintf(err, EXCB_ERR_LEN, "%s", L->error); return L->error_code; }
    long rel = L->consumed;
    ExcbBatch *bt = &L->slots[rel % L->n_slots];
    if (L->n_workers == 0) {                                    /* made here, in the caller's thread */
        double t0 = now_seconds();
        make_batch(&((LoaderWorker *)L->workers)[0], bt, L->first_batch + rel);
        L->busy_seconds += now_seconds() - t0;
        L->consumed++;
    } else {
        LoaderSync *sy = L->sync;
        pthread_mutex_lock(&sy->mu);
        L->released = rel;                                       /* batches before this one: done   */
        pthread_cond_broadcast(&sy->freed);
        while (bt->state != SLOT_READY || bt->id != L->first_batch + rel) pthread_cond_wait(&sy->ready, &sy->mu);
        L->consumed++;
        pthread_mutex_unlock(&sy->mu);
    }
    if (bt->err_code) {
        L->error_code = bt->err_code;
        snprintf(L->error, EXCB_ERR_LEN, "%s", bt->err);
        snprintf(err, EXCB_ERR_LEN, "%s", bt->err);
        return bt->err_code;
    }
    *out = bt;
    return 0;
}

void excb_loader_close(ExcbLoader *L) {
    if (!L->slots) return;
    LoaderSync *sy = L->sync;
    if (L->n_workers > 0) {
        pthread_mutex_lock(&sy->mu);
        L->stop = 1;
        pthread_cond_broadcast(&sy->freed);
        pthread_mutex_unlock(&sy->mu);
        pthread_t *th = L->threads;
        for (int i = 0; i < L->n_workers; i++) pthread_join(th[i], NULL);
    }
    int nw = L->n_workers > 0 ? L->n_workers : 1;
    LoaderWorker *ws = L->workers;
    for (int i = 0; i < nw; i++) {
        excb_image_free(&ws[i].img);
        free(ws[i].scr.a); free(ws[i].scr.b); free(ws[i].scr.f);
        free(ws[i].perm);
    }
    free(ws);
    free(L->threads);
    for (int s = 0; s < L->n_slots; s++) {
        free(L->slots[s].xg); free(L->slots[s].xl); free(L->slots[s].labels); free(L->slots[s].index);
    }
    free(L->slots);
    pthread_mutex_destroy(&sy->mu);
    pthread_cond_destroy(&sy->ready);
    pthread_cond_destroy(&sy->freed);
    free(sy);
    memset(L, 0, sizeof *L);
}

/* ================================================================================================
 * 14. The run's configuration: the key table, presets, config files and --set
 * ================================================================================================
 * One table names every setting of a run: its key (in config files, --set key=value, config.txt and
 * the metrics header), where it lives in ExcbRunConfig, its type and a line of help. Precedence is
 * preset < config file < command line; a key that is not in the table is an error, never ignored.
 */
/* The key table: every setting of a run but the methods' own (each method's rows are in its section,
   section 5, and come after these). A row carries its default: presets start from these values. */
static const char *const block_names[] = {"basic", "bottleneck", NULL}, *const stem_names[] = {"cifar", "imagenet", NULL},
                         *const blur_names[] = {"as-run", "as-configured", "none", NULL},
                         *const pairing_names[] = {"auto", "excb", "swapped", NULL},
                         *const precision_names[] = {"fp32", "tf32", "bf16", NULL},  /* in their enums' order */
                         *const lr_scaling_names[] = {"none", "linear", "sqrt", NULL},
                         *const crop_scales_names[] = {"schedule", "dino", NULL};
typedef ExcbSetting ConfigKey;
static const ConfigKey config_keys[] = {
    {"data", EXCB_KEY_STR, RC(data), sizeof(((ExcbRunConfig *)0)->data), 0, 1, 0, 0, NULL, NULL, "data set: fashion-mnist, an IDX/CIFAR/STL-10 folder or file, an image folder"},
    {"train_split", EXCB_KEY_STR, RC(train_split), 32, 0, 1, 0, 0, "train", NULL, "split to pre-train on (train; STL-10: train+unlabeled)"},
    {"train_images", EXCB_KEY_LONG, RC(train_images), 0, 0, 1, 0, 1e12, "0", NULL, "pre-train on this many images of the split, evenly spaced (0: all)"},
    {"bank_split", EXCB_KEY_STR, RC(bank_split), 32, 0, 0, 0, 0, "train", NULL, "k-NN memory bank and probe training split"},
    {"query_split", EXCB_KEY_STR, RC(query_split), 32, 0, 0, 0, 0, "test", NULL, "k-NN queries and probe test split"},
    {"block", EXCB_KEY_ENUM, MC(block), 0, 0, 1, 0, 0, NULL, block_names, "residual block: basic (ResNet-18/20) or bottleneck (ResNet-50)"},
    {"stem", EXCB_KEY_ENUM, MC(stem), 0, 0, 1, 0, 0, NULL, stem_names, "stem: cifar (conv3x3/1) or imagenet (conv7x7/2 + max-pool)"},
    {"widths", EXCB_KEY_INTLIST, MC(widths), EXCB_MAX_STAGES, RC(n_widths), 1, 0, 0, NULL, NULL, "stage widths, e.g. 16,32,64"},
    {"blocks", EXCB_KEY_INTLIST, MC(blocks), EXCB_MAX_STAGES, RC(n_blocks), 1, 0, 0, NULL, NULL, "blocks per stage, e.g. 3,3,3"},
    {"hidden", EXCB_KEY_INT, MC(hidden), 0, 0, 1, 1, 1 << 16, NULL, NULL, "projector and predictor hidden width (2048)"},
    {"d", EXCB_KEY_INT, MC(d), 0, 0, 1, 1, 1 << 16, "256", NULL, "projection width d (256)"},
    {"K", EXCB_KEY_INT, MC(K), 0, 0, 1, 2, 1 << 24, "4096", NULL, "clusters (65536 in the paper)"},
    {"n_global", EXCB_KEY_INT, MC(n_global), 0, 0, 1, 1, 64, "2", NULL, "global crops per image (2; the pairing or method says how few it takes)"},
    {"n_local", EXCB_KEY_INT, MC(n_local), 0, 0, 1, 0, 64, "6", NULL, "local crops per image (6)"},
    {"global_size", EXCB_KEY_INT, MC(global_size), 0, 0, 1, 4, 4096, NULL, NULL, "global crop side (224)"},
    {"local_size", EXCB_KEY_INT, MC(local_size), 0, 0, 1, 0, 4096, NULL, NULL, "local crop side (96)"},
    {"batch", EXCB_KEY_INT, MC(batch), 0, 0, 1, 2, 1 << 20, NULL, NULL, "images per step B (1024 officially, over all GPUs)"},
    {"epochs", EXCB_KEY_LONG, RC(epochs), 0, 0, 1, 1, 1e9, "400", NULL, "epochs E"},
    {"warmup_epochs", EXCB_KEY_DOUBLE, RC(warmup_epochs), 0, 0, 1, 0, 1e9, "10", NULL, "linear lr warm-up in epochs (10)"},
    {"lr", EXCB_KEY_DOUBLE, MC(lr_peak), 0, 0, 1, 0, 1e3, "0.6", NULL, "peak learning rate (0.6, absolute: A19)"},
    {"lr_scaling", EXCB_KEY_ENUM, MC(lr_scaling), 0, 0, 1, 0, 0, "none", lr_scaling_names, "A19: none (the code), linear (lr B / lr_base_batch) or sqrt"},
    {"lr_base_batch", EXCB_KEY_INT, MC(lr_base_batch), 0, 0, 1, 1, 1 << 24, "1024", NULL, "the batch lr is for when scaled (1024: the official runs' global batch)"},
    {"lr_min_factor", EXCB_KEY_DOUBLE, MC(lr_min_factor), 0, 0, 1, 0, 1, "0.0001", NULL, "the cosine ends at lr * this (1e-4)"},
    {"wd", EXCB_KEY_DOUBLE, MC(weight_decay), 0, 0, 1, 0, 1, "0.0001", NULL, "weight decay on weights (1e-4)"},
    {"centroid_wd_boost", EXCB_KEY_DOUBLE, MC(centroid_wd_boost), 0, 0, 1, 0, 1e3, "9", NULL, "centroid wd multiplier 1 + this*cos-decay (9, A10)"},
    {"sgd_momentum", EXCB_KEY_DOUBLE, MC(sgd_momentum), 0, 0, 1, 0, 1, "0.9", NULL, "SGD momentum (0.9)"},
    {"ema_start", EXCB_KEY_DOUBLE, MC(ema_start), 0, 0, 1, 0, 1, "0.996", NULL, "teacher momentum at step 0, cosine to 1 (0.996)"},
    {"tau_s", EXCB_KEY_DOUBLE, MC(tau_s), 0, 0, 1, 1e-6, 1e6, "0.1", NULL, "student temperature (0.1)"},
    {"tau_t", EXCB_KEY_DOUBLE, MC(tau_t), 0, 0, 1, 1e-6, 1e6, "0.04", NULL, "teacher temperature (0.04)"},
    {"tau_t_warmup", EXCB_KEY_DOUBLE, MC(tau_t_warmup), 0, 0, 1, 1e-6, 1e6, "0.04", NULL, "teacher temperature at epoch 0 of its warm-up (A18, DINO's D3)"},
    {"tau_t_warmup_epochs", EXCB_KEY_INT, MC(tau_t_warmup_epochs), 0, 0, 1, 0, 1e6, "0", NULL, "epochs of linear teacher-temperature warm-up (0: none, A18; excb, none, dino)"},
    {"method", EXCB_KEY_METHOD, MC(method), 0, 0, 1, 0, 0, "excb", NULL, "the method: excb, none, dino, swav, coke, carp, mvbt (section 5)"},
    {"pairing", EXCB_KEY_ENUM, MC(pairing), 0, 0, 1, 0, 0, "auto", pairing_names, "student rows per teacher view: auto (the method's own), excb (A7), swapped"},
    {"predictor", EXCB_KEY_INT, MC(predictor), 0, 0, 1, 0, 1, "1", NULL, "1: the predictor (E10); 0: the identity in its place (A8/A9)"},
    {"predictor_centroid_grad", EXCB_KEY_INT, MC(predictor_centroid_grad), 0, 0, 1, 0, 1, "0", NULL, "1: predictor rows send gradient to the centroids (A9: 0, detached)"},
    {"seed", EXCB_KEY_U64, MC(seed), 0, 0, 1, 0, 0, "0", NULL, "the root seed"},
    {"blur", EXCB_KEY_ENUM, RC(blur), 0, 0, 1, 0, 0, "as-run", blur_names, "as-run (the official code's blur, A14), as-configured, or none"},
    {"crop_scales", EXCB_KEY_ENUM, RC(crop_scales), 0, 0, 1, 0, 0, "schedule", crop_scales_names, "schedule (A11, the code) or dino: fixed (0.4, 1) global, (0.05, 0.4) local"},
    {"crop_scale_offset", EXCB_KEY_DOUBLE, RC(crop_scale_offset), 0, 0, 1, -0.04, 0.7, "0", NULL, "added to the crop-scale bound s_min(e) of A11 (0)"},
    {"kmeans_init", EXCB_KEY_INT, RC(kmeans_init), 0, 0, 1, 0, 1, "1", NULL, "1: spherical k-means centroids (1.10); 0: random"},
    {"kmeans_samples", EXCB_KEY_LONG, RC(kmeans_samples), 0, 0, 1, 2, 1e10, "500000", NULL, "teacher projections for k-means (500000)"},
    {"kmeans_iters", EXCB_KEY_INT, RC(kmeans_iters), 0, 0, 1, 1, 1e6, "50", NULL, "Lloyd iterations (50)"},
    {"kmeans_restarts", EXCB_KEY_INT, RC(kmeans_restarts), 0, 0, 1, 0, 1e6, "20", NULL, "restarts allowed while a cluster is empty"},
    {"debug_nan_step", EXCB_KEY_LONG, RC(debug_nan_step), 0, 0, 1, -1, 1e18, "-1", NULL, "tests: a NaN in step N's input (-1: never)"},
    {"threads", EXCB_KEY_INT, MC(threads), 0, 0, 0, 0, 1024, "0", NULL, "compute threads (0: all cores); results do not depend on it"},
    {"workers", EXCB_KEY_INT, RC(workers), 0, 0, 0, 0, 256, "1", NULL, "loader threads; results do not depend on it"},
    {"skip_bad", EXCB_KEY_INT, RC(skip_bad), 0, 0, 1, 0, 1, "0", NULL, "1: skip undecodable images (counted) instead of exit 65"},
    {"log_every", EXCB_KEY_INT, RC(log_every), 0, 0, 0, 1, 1e9, "10", NULL, "steps between step records and plain progress lines"},
    {"ckpt_every", EXCB_KEY_INT, RC(ckpt_every), 0, 0, 0, 0, 1e9, "0", NULL, "steps between checkpoints (0: each epoch's end)"},
    {"keep", EXCB_KEY_INT, RC(keep), 0, 0, 0, 1, 1000, "2", NULL, "checkpoints kept"},
    {"knn_every", EXCB_KEY_INT, RC(knn_every), 0, 0, 0, 0, 1e9, "10", NULL, "epochs between k-NN evaluations (0: at the end only)"},
    {"knn_k", EXCB_KEY_INTLIST, RC(knn_ks), EXCB_MAX_KS, RC(n_knn_ks), 0, 0, 0, "10,20,100,200", NULL, "k of the weighted k-NN (10,20,100,200)"},
    {"knn_t", EXCB_KEY_DOUBLE, RC(knn_t), 0, 0, 0, 1e-6, 1e6, "0.07", NULL, "k-NN temperature (0.07)"},
    {"knn_bank_max", EXCB_KEY_LONG, RC(knn_bank_max), 0, 0, 0, 0, 1e12, "0", NULL, "during training: bank images, evenly spaced (0: all)"},
    {"knn_query_max", EXCB_KEY_LONG, RC(knn_query_max), 0, 0, 0, 0, 1e12, "0", NULL, "during training: query images (0: all)"},
    {"probe_epochs", EXCB_KEY_INT, RC(probe_epochs), 0, 0, 0, 1, 1e6, "100", NULL, "linear probe epochs"},
    {"probe_batch", EXCB_KEY_INT, RC(probe_batch), 0, 0, 0, 1, 1 << 24, "256", NULL, "linear probe batch"},
    {"probe_lr", EXCB_KEY_DOUBLE, RC(probe_lr), 0, 0, 0, 0, 1e3, "0.1", NULL, "linear probe peak lr (cosine to 0)"},
    {"probe_wd", EXCB_KEY_DOUBLE, RC(probe_wd), 0, 0, 0, 0, 1, "0.000001", NULL, "linear probe weight decay"},
};
#define N_GENERAL_KEYS (sizeof config_keys / sizeof config_keys[0])

/* Every key: the table above, then each method's rows (section 5), in the order of excb_methods[]. */
static size_t n_config_keys(void) {
    size_t n = N_GENERAL_KEYS;
    for (int i = 0; excb_methods[i]; i++) n += (size_t)excb_methods[i]->n_settings;
    return n;
}

static const ConfigKey *config_key(size_t i) {
    if (i < N_GENERAL_KEYS) return &config_keys[i];
    i -= N_GENERAL_KEYS;
    for (int j = 0; excb_methods[j]; j++) {
        if (i < (size_t)excb_methods[j]->n_settings) return &excb_methods[j]->settings[i];
        i -= (size_t)excb_methods[j]->n_settings;
    }
    return NULL;
}

static const ConfigKey *find_key(const char *key) {
    for (size_t i = 0; i < n_config_keys(); i++)
        if (!strcmp(config_key(i)->key, key)) return config_key(i);
    return NULL;
}

/* the values an enumerated key takes (its row's names, or the methods' names), NULL past the last */
static const char *choice_name(const ConfigKey *k, int i) {
    if (k->type == EXCB_KEY_METHOD) return excb_methods[i] ? excb_methods[i]->name : NULL;
    return k->names[i];
}

/* value (text) into the field of row k inside rc */
static int set_value(ExcbRunConfig *rc, const ConfigKey *k, const char *value, char *err) {
    const char *key = k->key;
    char *at = (char *)rc + k->off, *end;
    errno = 0;
    switch (k->type) {
    case EXCB_KEY_INT: case EXCB_KEY_LONG: {
        long long x = strtoll(value, &end, 10);
        if (end == value || *end || errno || (k->type == EXCB_KEY_INT && (x < INT32_MIN || x > INT32_MAX)))
            return fail(err, EXCB_EXIT_CONFIG, "key '%s' needs an integer, got '%s'", key, value);
        if (k->type == EXCB_KEY_INT) *(int *)at = (int)x; else *(long *)at = (long)x;
        break;
    }
    case EXCB_KEY_U64: {
        unsigned long long x = strtoull(value, &end, 10);
        if (end == value || *end || errno || value[0] == '-')
            return fail(err, EXCB_EXIT_CONFIG, "key '%s' needs an unsigned integer, got '%s'", key, value);
        *(uint64_t *)at = x;
        break;
    }
    case EXCB_KEY_DOUBLE: {
        double x = strtod(value, &end);
        if (end == value || *end || errno || !isfinite(x))
            return fail(err, EXCB_EXIT_CONFIG, "key '%s' needs a finite number, got '%s'", key, value);
        *(double *)at = x;
        break;
    }
    case EXCB_KEY_STR:
        if (strlen(value) >= k->size) return fail(err, EXCB_EXIT_CONFIG, "key '%s': value longer than %zu bytes", key, k->size - 1);
        snprintf(at, k->size, "%s", value);
        break;
    case EXCB_KEY_INTLIST: {
        int n = 0, vals[16];
        const char *p = value;
        while (*p) {
            long x = strtol(p, &end, 10);
            if (end == p || x < 1 || x > 1 << 20 || n == (int)k->size || (*end && *end != ','))
                return fail(err, EXCB_EXIT_CONFIG, "key '%s' needs 1 to %zu positive integers separated by commas, got '%s'",
                            key, k->size, value);
            vals[n++] = (int)x;
            p = *end ? end + 1 : end;
        }
        if (!n) return fail(err, EXCB_EXIT_CONFIG, "key '%s' is empty", key);
        int *count = (int *)((char *)rc + k->count_off);
        memcpy(at, vals, sizeof(int) * n);
        *count = n;
        break;
    }
    case EXCB_KEY_ENUM: case EXCB_KEY_METHOD: {
        int x = -1, n = 0;
        for (; choice_name(k, n); n++)
            if (!strcmp(value, choice_name(k, n))) x = n;
        if (x < 0) {
            char list[256];
            size_t used = 0;
            for (int i = 0; i < n; i++)
                used += snprintf(list + used, sizeof list - used, "%s%s", i ? " or " : "", choice_name(k, i));
            return fail(err, EXCB_EXIT_CONFIG, "key '%s' is %s, not '%s'", key, list, value);
        }
        *(int *)at = x;
        break;
    }
    }
    return 0;
}

int excb_config_set(ExcbRunConfig *rc, const char *key, const char *value, char *err) {
    const ConfigKey *k = find_key(key);
    if (!k) return fail(err, EXCB_EXIT_CONFIG, "unknown key '%s' (excb train --help-config lists them)", key);
    return set_value(rc, k, value, err);
}

/* Every row's default into rc: model rows (inside rc->model) when `model`, the run's others otherwise.
   A row without a default (NULL) is left to the named model or the preset. */
static void defaults_from_table(ExcbRunConfig *rc, int model) {
    size_t lo = offsetof(ExcbRunConfig, model), hi = lo + sizeof(ExcbConfig);
    char err[EXCB_ERR_LEN];
    for (size_t i = 0; i < n_config_keys(); i++) {
        const ConfigKey *k = config_key(i);
        if (!k->def || (k->off >= lo && k->off < hi) != model) continue;
        if (set_value(rc, k, k->def, err)) {         /* a table row that does not parse: a defect */
            fprintf(stderr, "excb: the default of key '%s': %s\n", k->key, err);
            exit(EXCB_EXIT_SOFTWARE);
        }
    }
}

static void model_defaults_from_table(ExcbConfig *c) {
    static ExcbRunConfig rc;                /* 20 KB: not on the stack; only its model part is read */
    ExcbRunConfig *tmp = &rc;
    memset(tmp, 0, sizeof *tmp);
    defaults_from_table(tmp, 1);
    *c = tmp->model;
}

/* Config values are written bare (K = 1024) or, for strings, in double quotes with C escapes:
   data = "/data/set #2 \n". A bare value ends at '#' (a comment) and loses its surrounding blanks; a
   quoted one keeps every byte: \\ \" \n \t \r and \xHH (any other byte below 0x20, and 0x7f) are the
   escapes. config.txt and the checkpoint's config write every string quoted, so a path with '#', a
   trailing space or a newline reads back exactly (tests/test_train.c, config suite). */
static void config_quote(char *out, size_t cap, const char *in) {
    size_t n = 0;
    out[n++] = '"';
    for (; *in && n + 6 < cap; in++) {
        unsigned char ch = (unsigned char)*in;
        const char *esc = ch == '\\' ? "\\\\" : ch == '"' ? "\\\"" : ch == '\n' ? "\\n" : ch == '\t' ? "\\t" : ch == '\r' ? "\\r" : NULL;
        if (esc) n += (size_t)snprintf(out + n, cap - n, "%s", esc);
        else if (ch < 0x20 || ch == 0x7f) n += (size_t)snprintf(out + n, cap - n, "\\x%02x", ch);
        else out[n++] = (char)ch;
    }
    out[n++] = '"';
    out[n] = 0;
}

/* the quoted value at *q (which points at its opening quote) into out; *q moves past the closing quote.
   0, or the reason it is not one */
static const char *config_unquote(const char **q, char *out, size_t cap) {
    const char *s = *q + 1;
    size_t n = 0;
    for (; *s && *s != '"'; s++) {
        char ch = *s;
        if (ch == '\\') {
            char e = *++s;
            if (e == '\\' || e == '"') ch = e;
            else if (e == 'n') ch = '\n';
            else if (e == 't') ch = '\t';
            else if (e == 'r') ch = '\r';
            else if (e == 'x' && isxdigit((unsigned char)s[1]) && isxdigit((unsigned char)s[2])) {
                char hex[3] = {s[1], s[2], 0};
                ch = (char)strtol(hex, NULL, 16);
                s += 2;
                if (!ch) return "\\x00 (a NUL byte) cannot be part of a value";
            } else return "unknown escape (\\\\ \\\" \\n \\t \\r \\xHH)";
        }
        if (n + 1 >= cap) return "quoted value too long";
        out[n++] = ch;
    }
    if (*s != '"') return "unterminated quoted value";
    out[n] = 0;
    *q = s + 1;
    return NULL;
}

int excb_config_parse(ExcbRunConfig *rc, const char *text, const char *name, char *err) {
    int line_no = 0, settings = 0;
    const char *p = text;
    while (*p) {
        const char *eol = strchr(p, '\n');
        size_t len = eol ? (size_t)(eol - p) : strlen(p);
        static _Thread_local char line[8192], value[8192];
        line_no++;
        if (len >= sizeof line) return fail(err, EXCB_EXIT_CONFIG, "%s:%d: line longer than %zu bytes", name, line_no, sizeof line - 1);
        memcpy(line, p, len);
        line[len] = 0;
        p = eol ? eol + 1 : p + len;
        char *s = line;
        while (*s == ' ' || *s == '\t' || *s == '\r') s++;
        if (!*s || *s == '#') continue;
        char *eq = strchr(s, '='), *hash = strchr(s, '#');
        if (!eq || (hash && hash < eq)) {
            if (hash) *hash = 0;
            return fail(err, EXCB_EXIT_CONFIG, "%s:%d: expected 'key = value', got '%s'", name, line_no, s);
        }
        char *kend = eq, *v = eq + 1;
        while (kend > s && (kend[-1] == ' ' || kend[-1] == '\t')) kend--;
        *kend = 0;
        while (*v == ' ' || *v == '\t') v++;
        if (*v == '"') {                              /* quoted: every byte up to the closing quote */
            const char *rest = v, *why = config_unquote(&rest, value, sizeof value);
            if (why) return fail(err, EXCB_EXIT_CONFIG, "%s:%d: key '%s': %s", name, line_no, s, why);
            while (*rest == ' ' || *rest == '\t' || *rest == '\r') rest++;
            if (*rest && *rest != '#')
                return fail(err, EXCB_EXIT_CONFIG, "%s:%d: key '%s': text after the closing quote", name, line_no, s);
        } else {                                      /* bare: up to a comment, blanks trimmed */
            if ((hash = strchr(v, '#'))) *hash = 0;
            char *e = v + strlen(v);
            while (e > v && (e[-1] == ' ' || e[-1] == '\t' || e[-1] == '\r')) *--e = 0;
            snprintf(value, sizeof value, "%s", v);
        }
        char sub[EXCB_ERR_LEN];
        if (!strcmp(s, "preset")) {     /* a file may name its preset, as its first setting; a preset */
            if (settings) return fail(err, EXCB_EXIT_CONFIG, "%s:%d: 'preset' must come before every other key", name, line_no);
            if (!rc->preset[0] && excb_preset(rc, value, sub))    /* chosen on the command line wins */
                return fail(err, EXCB_EXIT_CONFIG, "%s:%d: %s", name, line_no, sub);
            settings++;
            continue;
        }
        if (!rc->preset[0]) excb_preset(rc, "fashion-mnist", sub);   /* no preset named: the default */
        settings++;
        if (excb_config_set(rc, s, value, sub)) return fail(err, EXCB_EXIT_CONFIG, "%s:%d: %s", name, line_no, sub);
    }
    return 0;
}

/* x in the fewest significant digits that read back (strtod) as exactly x: 0.6, not 0.59999999999999998.
   %.17g always round-trips, so the search ends by 17 digits. %g writes an exponent where the digits run
   out before the decimal point (100 at 1 digit is 1e+02); such an x is an integer, and below 1e15 it is
   written as one instead: the same significant digits, then zeros (100, 120000). */
static void format_shortest(double x, char *out, size_t cap) {
    int digits = 1;
    while (digits < 17) {
        snprintf(out, cap, "%.*g", digits, x);
        if (strtod(out, NULL) == x) break;
        digits++;
    }
    snprintf(out, cap, "%.*g", digits, x);
    if (strchr(out, 'e') && x == floor(x) && fabs(x) < 1e15) snprintf(out, cap, "%.0f", x);
}

/* the value of one key, as text */
static void config_value(const ExcbRunConfig *rc, const ConfigKey *k, char *out, size_t cap) {
    const char *at = (const char *)rc + k->off;
    switch (k->type) {
    case EXCB_KEY_INT: snprintf(out, cap, "%d", *(const int *)at); break;
    case EXCB_KEY_LONG: snprintf(out, cap, "%ld", *(const long *)at); break;
    case EXCB_KEY_U64: snprintf(out, cap, "%llu", (unsigned long long)*(const uint64_t *)at); break;
    case EXCB_KEY_DOUBLE: format_shortest(*(const double *)at, out, cap); break;      /* round-trips exactly */
    case EXCB_KEY_STR: snprintf(out, cap, "%s", at); break;
    case EXCB_KEY_INTLIST: {
        int n = *(const int *)((const char *)rc + k->count_off);
        size_t used = 0;
        out[0] = 0;
        for (int i = 0; i < n && used < cap; i++) used += snprintf(out + used, cap - used, i ? ",%d" : "%d", ((const int *)at)[i]);
        break;
    }
    case EXCB_KEY_ENUM: case EXCB_KEY_METHOD: snprintf(out, cap, "%s", choice_name(k, *(const int *)at)); break;
    }
}

/* the length of the well-formed UTF-8 sequence at s (RFC 3629: no overlong forms, no surrogates, at
   most U+10FFFF), 0 when s does not start one */
static int utf8_length(const unsigned char *s) {
    if (s[0] < 0x80) return 1;
    int n = s[0] >= 0xC2 && s[0] <= 0xDF ? 2 : s[0] >= 0xE0 && s[0] <= 0xEF ? 3 : s[0] >= 0xF0 && s[0] <= 0xF4 ? 4 : 0;
    unsigned lo = s[0] == 0xE0 ? 0xA0 : s[0] == 0xF0 ? 0x90 : 0x80, hi = s[0] == 0xED ? 0x9F : s[0] == 0xF4 ? 0x8F : 0xBF;
    for (int i = 1; i < n; i++, lo = 0x80, hi = 0xBF)
        if (s[i] < lo || s[i] > hi) return 0;          /* a NUL ends the string here too */
    return n;
}

/* a string as a JSON string body: quotes, backslashes and control characters escaped; a byte that is
   not part of well-formed UTF-8 (a Latin-1 file name, say) as \u00XX, so that the line stays JSON that
   any parser reads (it then reads that byte as the code point of the same number) */
static void json_escape(char *out, size_t cap, const char *in) {
    size_t n = 0;
    for (const unsigned char *s = (const unsigned char *)in; *s && n + 7 < cap;) {
        int len = utf8_length(s);
        if (*s == '"' || *s == '\\') { out[n++] = '\\'; out[n++] = (char)*s++; }
        else if (*s < 0x20 || !len) n += snprintf(out + n, cap - n, "\\u%04x", *s++);
        else if (n + len + 7 < cap) while (len--) out[n++] = (char)*s++;
        else break;
    }
    out[n] = 0;
}

char *excb_config_dump(const ExcbRunConfig *rc, int json) {
    size_t cap = 16384, used = 0;
    char *out = xmalloc(cap), val[1200];
    used += snprintf(out + used, cap - used, json ? "{\"preset\":\"%s\"" : "# excb %s resolved config\npreset = %s\n",
                     json ? rc->preset : EXCB_VERSION, json ? "" : rc->preset);
    for (size_t i = 0; i < n_config_keys() && used < cap; i++) {
        const ConfigKey *k = config_key(i);
        config_value(rc, k, val, sizeof val);
        int quoted = k->type >= EXCB_KEY_STR;                /* strings, lists and names: JSON strings */
        char esc[8 * sizeof val];               /* every byte escaped: \\u00XX is 6 */
        json_escape(esc, sizeof esc, val);
        if (json) used += snprintf(out + used, cap - used, quoted ? ",\"%s\":\"%s\"" : ",\"%s\":%s", k->key, esc);
        else if (k->type == EXCB_KEY_STR) {           /* quoted: the value reads back byte for byte */
            config_quote(esc, sizeof esc, val);
            used += snprintf(out + used, cap - used, "%s = %s\n", k->key, esc);
        } else used += snprintf(out + used, cap - used, "%s = %s\n", k->key, val);
    }
    if (json && used < cap) snprintf(out + used, cap - used, "}");
    return out;
}

int excb_config_compatible(const ExcbRunConfig *run, const ExcbRunConfig *ckpt, char *err) {
    char a[1200], b[1200];
    for (size_t i = 0; i < n_config_keys(); i++) {
        const ConfigKey *k = config_key(i);
        if (!k->trajectory) continue;
        config_value(run, k, a, sizeof a);
        config_value(ckpt, k, b, sizeof b);
        if (strcmp(a, b))
            return fail(err, EXCB_EXIT_CONFIG, "key '%s' is '%s' here but '%s' in the checkpoint: a resumed run "
                        "must compute the same trajectory (start a new run directory instead)", k->key, a, b);
    }
    return 0;
}

/* --- presets: complete starting points; every value can still be overridden ----------------------
 * The official recipe (paper_notes.md §9, Presets) is the base; the small presets change only what their scale needs,
 * and the comments say what and why. */
/* the run's settings at their table defaults (the model's come with set_model) */
static void run_defaults(ExcbRunConfig *rc) {
    memset(rc, 0, sizeof *rc);
    defaults_from_table(rc, 0);
}

static void set_model(ExcbRunConfig *rc, const char *named) {
    excb_config_named(&rc->model, named);
    rc->n_widths = rc->n_blocks = rc->model.n_stages;
}

int excb_preset(ExcbRunConfig *rc, const char *name, char *err) {
    run_defaults(rc);
    snprintf(rc->preset, sizeof rc->preset, "%s", name);
    if (!strcmp(name, "fashion-mnist") || !strcmp(name, "fashion-mnist-long")) {
        /* The embedded default, sized for 2 CPU cores (under 10 minutes for 2 epochs, k-means and the
           evaluation included): ResNet-8 (16/32/64), K = 1024, d = 128, B = 16, 2 x 28 + 6 x 12 crops;
           the long run the same for 10 epochs. What else differs from the official recipe, and why
           (paper_notes.md section 9, where the candidates measured against each other are listed):
             - B = 16, not 1024: at a fixed budget of images, more and smaller steps learn much more
               in so short a run (k-NN after 2 epochs: B = 256 80.0 %, 128 82.5 %, 64 83.8 %, 32
               85.5 %, 16 86.4 %). B = 32 was the default while the step ran on im2col convolutions
               (B = 16 then took the run past 10 minutes); with oneDNN's it takes 5.5 minutes. lr stays
               0.6, not scaled with B, as the official code does (A19); 0.3 was worse at B = 256;
             - teacher momentum from 0.97, not 0.996: a run of a few thousand steps needs a teacher that
               follows the student within ~30 steps (the student's features were ~2 points better
               than a 0.99 teacher's at B = 256; 0.97 gave +1.4 points at B = 32, +0.9 at B = 16);
             - no blur: the official sigma range 0.1-2 px is for 224-px crops; scaled to 28 px it is
               below 0.25 px, and unscaled (kernel 9, sigma 2 on 28 px) it erases the image;
             - warm-up half an epoch (1 for the long run) instead of 10 epochs of 400;
             - k-means on 20k projections, the k-NN during training on 10k/2k images (all at the end). */
        set_model(rc, "resnet8s");
        snprintf(rc->data, sizeof rc->data, "fashion-mnist");
        rc->model.K = 1024;
        rc->model.d = 128;
        rc->model.ema_start = 0.97;
        rc->blur = EXCB_BLUR_NONE;
        int is_long = !strcmp(name, "fashion-mnist-long");
        rc->model.batch = 16;
        rc->epochs = is_long ? 10 : 2;
        rc->warmup_epochs = is_long ? 1 : 0.5;
        rc->log_every = 5;
        rc->ckpt_every = 500;              /* 8000-16000 images: a checkpoint every 40-70 s here */
        rc->knn_every = 1;
        rc->knn_bank_max = 10000;          /* during training; the final evaluation uses all 60k/10k */
        rc->knn_query_max = 2000;
        rc->kmeans_samples = 20000;
    } else if (!strcmp(name, "cifar10-r18")) {
        /* CIFAR-10 with ResNet-18 (CIFAR stem), 2 x 32 + 6 x 16 crops, K = 4096, B = 256, 200 epochs */
        set_model(rc, "resnet18");
        snprintf(rc->data, sizeof rc->data, "cifar-10-batches-bin");
        rc->model.K = 4096;
        rc->model.batch = 256;
        rc->epochs = 200;
        rc->kmeans_samples = 50000;
        rc->knn_every = 10;
    } else if (!strcmp(name, "stl10-r18")) {
        /* STL-10 (train+unlabeled, 105k images at 96 px) with ResNet-18 and the ImageNet stem, 2 x 96 +
           6 x 48 crops, K = 4096, B = 256, 200 epochs; k-NN and probe on the labelled train/test splits */
        set_model(rc, "resnet18");
        snprintf(rc->data, sizeof rc->data, "stl10_binary");
        snprintf(rc->train_split, sizeof rc->train_split, "train+unlabeled");
        rc->model.stem = EXCB_STEM_IMAGENET;
        rc->model.global_size = 96;
        rc->model.local_size = 48;
        rc->model.K = 4096;
        rc->model.batch = 256;
        rc->epochs = 200;
        rc->kmeans_samples = 100000;
        rc->knn_every = 10;
    } else if (!strcmp(name, "imagenet-r50")) {
        /* The paper's ResNet-50 recipe as the official code runs it (paper_notes.md §9): 400 epochs, B = 1024,
           K = 65536, lr 0.6 with 10 warm-up epochs, 2 x 224 + 6 x 96 crops, 500k k-means samples.
           data = an ImageFolder root with train/ and val/ (set it: --set data=/path/to/imagenet). */
        set_model(rc, "resnet50");
        snprintf(rc->data, sizeof rc->data, "imagenet");
        snprintf(rc->query_split, sizeof rc->query_split, "val");
        rc->model.batch = 1024;
        rc->workers = 8;
        rc->ckpt_every = 1000;
        rc->log_every = 50;
        rc->knn_bank_max = 100000;         /* during training: 0.8 GB of 2048-d features; the final   */
        rc->knn_query_max = 10000;         /* evaluation uses all 1.28M (10.5 GB) and 50k             */
    } else if (!strcmp(name, "tiny")) {
        /* the tests' preset: the parity net on 8 x 8 crops of Fashion-MNIST-like data */
        set_model(rc, "tiny");
        rc->model.batch = 8;
        rc->epochs = 2;
        rc->warmup_epochs = 1;
        rc->log_every = 1;
        rc->ckpt_every = 2;
        rc->knn_every = 1;
        rc->n_knn_ks = 2;
        rc->knn_ks[0] = 1; rc->knn_ks[1] = 3;
        rc->kmeans_samples = 32;
        rc->kmeans_iters = 5;
        rc->probe_epochs = 5;
        rc->probe_batch = 8;
        rc->workers = 0;
    } else {
        return fail(err, EXCB_EXIT_CONFIG, "unknown preset '%s' (fashion-mnist, fashion-mnist-long, cifar10-r18, "
                    "stl10-r18, imagenet-r50, tiny)", name);
    }
    return 0;
}

int excb_config_validate(ExcbRunConfig *rc, char *err) {
    ExcbConfig *c = &rc->model;
    if (rc->n_widths != rc->n_blocks)
        return fail(err, EXCB_EXIT_CONFIG, "widths has %d stages but blocks has %d", rc->n_widths, rc->n_blocks);
    c->n_stages = rc->n_widths;
    int total_blocks = 0;
    for (int i = 0; i < c->n_stages; i++) total_blocks += c->blocks[i];
    if (total_blocks > EXCB_MAX_BLOCKS) return fail(err, EXCB_EXIT_CONFIG, "more than %d residual blocks", EXCB_MAX_BLOCKS);
    /* every number within its row's range (the table above) */
    for (size_t i = 0; i < n_config_keys(); i++) {
        const ConfigKey *k = config_key(i);
        if (k->type != EXCB_KEY_INT && k->type != EXCB_KEY_LONG && k->type != EXCB_KEY_DOUBLE) continue;   /* U64: any */
        const char *at = (const char *)rc + k->off;
        double v = k->type == EXCB_KEY_INT ? *(const int *)at : k->type == EXCB_KEY_LONG ? (double)*(const long *)at
                 : *(const double *)at;
        if (!(v >= k->lo && v <= k->hi))
            return fail(err, EXCB_EXIT_CONFIG, "key '%s' = %g is outside [%g, %g]", k->key, v, k->lo, k->hi);
    }
    /* the rules between keys */
    if (c->n_local && c->local_size < 4)
        return fail(err, EXCB_EXIT_CONFIG, "key 'local_size' = %d: local crops need at least 4 pixels (or n_local = 0)", c->local_size);
    if (rc->warmup_epochs > rc->epochs)
        return fail(err, EXCB_EXIT_CONFIG, "key 'warmup_epochs' = %g is more than epochs = %ld", rc->warmup_epochs, rc->epochs);
    if (rc->kmeans_init && rc->kmeans_samples < c->K)
        return fail(err, EXCB_EXIT_CONFIG, "key 'kmeans_samples' = %ld is below K = %d: k-means needs at least K samples",
                    rc->kmeans_samples, c->K);
    if (!rc->data[0]) return fail(err, EXCB_EXIT_CONFIG, "no data set: --data SPEC or --set data=SPEC");
    const ExcbMethod *method = excb_methods[c->method];
    if (excb_view_counts_check(c, err)) return EXCB_EXIT_CONFIG;
    if (method->validate && method->validate(c, err)) return EXCB_EXIT_CONFIG;
    return 0;
}

/* ================================================================================================
 * 15. Centroid initialisation: spherical k-means on the teacher's projections (paper_notes.md §9, A12)
 * ================================================================================================
 * The official code does not start from random centroids: before the first epoch it collects
 * `clustering_samples` L2-normalised teacher projections h/||h|| of the randomly initialised network
 * (each batch gives global view 1 or view 2, alternately), runs 50 Lloyd iterations of spherical
 * k-means from random data points, restarts while a cluster ends empty, and then sets
 *   teacher v_k = the unit centroids,   student v_k = one more M-step: the plain means (not normalised).
 * With weight norm (E1) both give nearly the same c_k; they differ by that one Lloyd step.
 */

/* E-step: each row's nearest centroid by cosine (argmax <x, c_k>; ties go to the lowest k). Rows in
   chunks so the (rows, K) score block stays small; the argmax is per row, so any thread count gives
   the same labels. Returns the number of rows whose label changed. */
static long kmeans_assign(const real *x, long n, int d, int K, const real *c, int32_t *assign, real *scores,
                          long chunk) {
    long changed = 0;
    for (long r0 = 0; r0 < n; r0 += chunk) {
        int rows = (int)(n - r0 < chunk ? n - r0 : chunk);
        matmul('N', 'T', rows, K, d, 1.0f, x + (size_t)r0 * d, d, c, d, 0.0f, scores, K);
#pragma omp parallel for schedule(static) reduction(+ : changed)
        for (int i = 0; i < rows; i++) {
            const real *s = scores + (size_t)i * K;
            int best = 0;
            for (int k = 1; k < K; k++)
                if (s[k] > s[best]) best = k;
            changed += assign[r0 + i] != best;
            assign[r0 + i] = best;
        }
    }
    return changed;
}

/* M-step sums in double, in row order (fixed, so the result does not depend on threads) */
static void kmeans_sums(const real *x, long n, int d, int K, const int32_t *assign, double *sum, long *count) {
    memset(sum, 0, sizeof(double) * K * d);
    memset(count, 0, sizeof(long) * K);
    for (long i = 0; i < n; i++) {
        double *s = sum + (size_t)assign[i] * d;
        const real *xi = x + (size_t)i * d;
        for (int j = 0; j < d; j++) s[j] += xi[j];
        count[assign[i]]++;
    }
}

int excb_spherical_kmeans(const real *x, long n, int d, int K, int iters, int max_restarts, uint64_t seed,
                          real *c, real *c_next, int32_t *assign, int *empty) {
    long chunk = 1024;
    real *scores = xmalloc(sizeof(real) * chunk * K);
    double *sum = xmalloc(sizeof(double) * K * d);
    long *count = xmalloc(sizeof(long) * K);
    int64_t *perm = xmalloc(sizeof(int64_t) * n);
    int restart = 0, n_empty = 0;
    for (;; restart++) {
        /* seeds: K distinct random rows, the first K of a permutation keyed by (seed, restart) */
        excb_permutation(perm, n, seed ^ 0x6b6d65616e73ull, restart);      /* "kmeans" */
        for (int k = 0; k < K; k++) memcpy(c + (size_t)k * d, x + (size_t)perm[k] * d, sizeof(real) * d);
        for (long i = 0; i < n; i++) assign[i] = -1;
        for (int it = 0; it < iters; it++) {
            kmeans_assign(x, n, d, K, c, assign, scores, chunk);
            kmeans_sums(x, n, d, K, assign, sum, count);
            for (int k = 0; k < K; k++) {                          /* normalised mean; empty: keep */
                if (!count[k]) continue;
                double nn = 0;
                for (int j = 0; j < d; j++) nn += sum[(size_t)k * d + j] * sum[(size_t)k * d + j];
                nn = sqrt(nn);
                if (nn > 0)
                    for (int j = 0; j < d; j++) c[(size_t)k * d + j] = (real)(sum[(size_t)k * d + j] / nn);
            }
        }
        kmeans_assign(x, n, d, K, c, assign, scores, chunk);        /* the final E-step            */
        kmeans_sums(x, n, d, K, assign, sum, count);
        n_empty = 0;
        for (int k = 0; k < K; k++) n_empty += count[k] == 0;
        if (!n_empty || restart >= max_restarts) break;
    }
    for (int k = 0; k < K; k++)                                     /* one more M-step: the means  */
        for (int j = 0; j < d; j++)
            c_next[(size_t)k * d + j] = count[k] ? (real)(sum[(size_t)k * d + j] / count[k]) : c[(size_t)k * d + j];
    if (empty) *empty = n_empty;
    free(scores); free(sum); free(count); free(perm);
    return n_empty ? -1 : restart;
}

/* the teacher's normalised projections u = h/||h|| (NG, d) of one batch of global views (BN in train
   mode, as the official code runs its teacher, which also updates the teacher's running statistics) */
static void teacher_projections(ExcbModel *m, const real *xg) {
    int NG = m->cfg.n_global * m->cfg.batch;
    backbone_forward(m, m->teacher, m->teacher_running, &m->act_global, xg, m->f, NG);
    projector_forward(m, m->teacher, m->teacher_running, m->f, NG);
    m->ops->l2norm_rows_forward(m->ut, m->ut_den, m->h, NG, m->cfg.d, NG, (real)m->cfg.norm_eps);
}

/* --- data-parallel ranks (section 10b) in a run ------------------------------------------------------
 * A run has R ranks: R MPI processes (mpirun -np R: this process is one of them, its model reduces
 * over mpi_world), or R shares of this process (--chunks R: R models, stepped as coroutines), or one
 * (R = 1: the single process, nothing reduced). Rank 0 writes the run directory; a failure that every
 * rank sees (a data error on any rank, a signal) is agreed at the top of each step, so every rank stops
 * at the same step with the same exit code; a failure of one rank alone (a full disk on rank 0) ends
 * the whole job through MPI_Abort with that rank's exit code (main), never a hang. */
static ExcbComm mpi_world;          /* under mpirun with R > 1 (main): size R, kind MPI; else size 0 */
static atomic_int stop_signal;      /* section 17: the first SIGINT/SIGTERM/SIGHUP of this run */
static int rank_exit_agreed;        /* the run's exit code was agreed by every rank (main: no abort) */
static int rank_exit_silent;        /* another rank's reason: that rank prints the message            */

typedef struct {
    int R, rank;               /* ranks in all; this process's rank (0 but under mpirun)               */
    ExcbComm *world;           /* MPI: the processes' comm (the model's too); NULL otherwise            */
    int n_chunks;              /* --chunks: the R shares of this process (0: none)                     */
    ExcbModel *peer;           /* their models, shares 1..R-1 (share 0 is the run's model)             */
    ExcbComm *comms;           /* each share's comm                                                     */
    ExcbChunks *k;
    real *xg, *xl;             /* each share's inputs, share after share                               */
    int64_t *index;            /* MPI: the global batch's data set indices, gathered each step          */
} Ranks;

/* A run that R ranks cannot share: 0, or the code with err. excb train asks before it changes anything
   in the run directory, and the run asks again. */
static int ranks_refusal(const ExcbRunConfig *rc, char *err) {
    int R = mpi_world.size > 1 ? mpi_world.size : rc->chunks > 1 ? rc->chunks : 1;
    if (mpi_world.size > 1 && rc->chunks > 1)
        return fail(err, EXCB_EXIT_USAGE, "--chunks %d under mpirun with %d ranks: the chunks are the one-process "
                    "reference of mpirun, use one or the other", rc->chunks, mpi_world.size);
    if (R == 1) return 0;
    const ExcbMethod *me = excb_methods[rc->model.method];
    if (rc->model.batch % R)
        return fail(err, EXCB_EXIT_CONFIG, "batch %d does not split into %d equal shares, one per rank: choose a batch "
                    "that %d divides", rc->model.batch, R, R);
    if (rc->model.batch / R < 2)
        return fail(err, EXCB_EXIT_CONFIG, "batch %d over %d ranks leaves %d image(s) to a rank; each needs at least 2",
                    rc->model.batch, R, rc->model.batch / R);
    if (!me->ranks)
        return fail(err, EXCB_EXIT_CONFIG, "method '%s' keeps batch-wide state that is not reduced across ranks yet: it "
                    "trains in one process (without mpirun or --chunks)", me->name);
    if (rc->device == EXCB_DEVICE_CUDA && mpi_world.size <= 1)    /* one device state per process */
        return fail(err, EXCB_EXIT_USAGE, "--chunks %d with --device cuda: the chunks would share one process's GPU "
                    "state; mpirun -np %d runs the ranks on the GPU(s)", R, R);
    return 0;
}

/* the ranks of this run, and the configuration of one rank's model (batch: its share) */
static int ranks_config(Ranks *rk, const ExcbRunConfig *rc, ExcbConfig *local, char *err) {
    memset(rk, 0, sizeof *rk);
    *local = rc->model;
    int code = ranks_refusal(rc, err);
    if (code) return code;
    rk->R = mpi_world.size > 1 ? mpi_world.size : rc->chunks > 1 ? rc->chunks : 1;
    if (mpi_world.size > 1) {
        rk->rank = mpi_world.rank;
        rk->world = &mpi_world;
    }
    if (rk->R == 1) return 0;
    local->batch = rc->model.batch / rk->R;
    local->ranks = rk->R;
    return 0;
}

/* after the run's model m is built: the shares' models (chunks) or the gathered indices (MPI) */
static void ranks_attach(Ranks *rk, ExcbModel *m, const ExcbConfig *local) {
    if (rk->world) {
        m->comm = rk->world;
        rk->index = xmalloc(sizeof(int64_t) * rk->R * local->batch);
    }
    if (rk->R == 1 || rk->world) return;
    rk->n_chunks = rk->R;
    rk->k = chunks_new(rk->R);
    rk->comms = xcalloc(rk->R, sizeof(ExcbComm));
    rk->peer = xcalloc(rk->R, sizeof(ExcbModel));       /* [0] unused: share 0 is m */
    for (int r = 0; r < rk->R; r++) {
        rk->comms[r] = (ExcbComm){.rank = r, .size = rk->R, .kind = EXCB_COMM_CHUNKS, .chunks = rk->k};
        if (r) excb_build(&rk->peer[r], local);          /* cannot fail: m was built from local */
    }
    m->comm = &rk->comms[0];
    for (int r = 1; r < rk->R; r++) rk->peer[r].comm = &rk->comms[r];
    size_t gsz = (size_t)local->in_ch * local->global_size * local->global_size;
    size_t lsz = (size_t)local->in_ch * local->local_size * local->local_size;
    rk->xg = xmalloc(sizeof(real) * gsz * local->n_global * local->batch * rk->R);
    rk->xl = xmalloc(sizeof(real) * (lsz * local->n_local * local->batch * rk->R + 1));
}

static ExcbModel *share_model(Ranks *rk, ExcbModel *m, int r) { return r ? &rk->peer[r] : m; }

/* every share's model the same state as m (after k-means or a resume: one source, copied) */
static void ranks_sync(Ranks *rk, const ExcbModel *m) {
    for (int r = 1; r < rk->n_chunks; r++) {
        ExcbModel *p = &rk->peer[r];
        memcpy(p->params, m->params, sizeof(real) * m->n_params);
        memcpy(p->momentum, m->momentum, sizeof(real) * m->n_params);
        memcpy(p->teacher, m->teacher, sizeof(real) * m->n_params);
        memcpy(p->running, m->running, sizeof(real) * m->n_running);
        memcpy(p->teacher_running, m->teacher_running, sizeof(real) * m->n_running);
        memcpy(p->mstate, m->mstate, sizeof(real) * m->mstate_floats);
        p->step = m->step;
    }
}

static void ranks_close(Ranks *rk) {
    for (int r = 1; r < rk->n_chunks; r++) excb_free(&rk->peer[r]);
    free(rk->peer); free(rk->comms); free(rk->xg); free(rk->xl); free(rk->index);
    chunks_free(rk->k);
}

/* share r's rows of a global batch: rows v B + r B/R .. of each view (view-major, as the loader's) */
static void share_rows(real *dst, const real *src, int views, int B, int R, int r, size_t per_image) {
    int Bl = B / R;
    for (int v = 0; v < views; v++)
        memcpy(dst + (size_t)v * Bl * per_image, src + ((size_t)v * B + (size_t)r * Bl) * per_image,
               sizeof(real) * Bl * per_image);
}

typedef struct {
    Ranks *rk; ExcbModel *m; const ExcbBatch *bt;
    ExcbStepStats *st; int code;          /* share 0's: every share computes the same ones        */
    int view; real *rows;                 /* teacher projections: the view, and the (B, d) rows      */
} ShareWork;

static const real *share_inputs(ShareWork *w, int r, const real **xl) {
    const ExcbConfig *c = &w->m->cfg;
    int B = c->batch * w->rk->R;
    size_t gsz = (size_t)c->in_ch * c->global_size * c->global_size, lsz = (size_t)c->in_ch * c->local_size * c->local_size;
    real *xg = w->rk->xg + (size_t)r * c->n_global * c->batch * gsz;
    share_rows(xg, w->bt->xg, c->n_global, B, w->rk->R, r, gsz);
    real *xlr = w->rk->xl + (size_t)r * c->n_local * c->batch * lsz;
    share_rows(xlr, w->bt->xl, c->n_local, B, w->rk->R, r, lsz);
    *xl = xlr;
    return xg;
}

static void share_step(int r, void *arg) {
    ShareWork *w = arg;
    ExcbModel *m = share_model(w->rk, w->m, r);
    const real *xl, *xg = share_inputs(w, r, &xl);
    ExcbStepStats st = {0};
    m->batch_index = w->bt->index + (size_t)r * m->cfg.batch;
    int code = excb_step(m, xg, xl, &st);
    if (!r) { *w->st = st; w->code = code; }
}

/* The one step of section 10 on this rank's share (MPI), on every share in turn (chunks), or on the
   whole batch; st as excb_step's, for the whole global batch */
static int ranks_step(Ranks *rk, ExcbModel *run, const ExcbBatch *bt, ExcbStepStats *st) {
    if (!rk->n_chunks) return excb_step(run, bt->xg, bt->xl, st);
    ShareWork w = {.rk = rk, .m = run, .bt = bt, .st = st};
    chunks_run(rk->k, share_step, &w);
    return w.code;
}

static void share_teacher_rows(int r, void *arg) {
    ShareWork *w = arg;
    ExcbModel *m = share_model(w->rk, w->m, r);
    const real *xl, *xg = share_inputs(w, r, &xl);
    teacher_projections(m, xg);
    size_t bytes = sizeof(real) * m->cfg.batch * m->cfg.d;
    excb_comm_gather(m->comm, m->ut + (size_t)w->view * m->cfg.batch * m->cfg.d, w->rows, bytes);
}

/* k-means' input (section 15): the teacher's unit projections of view `view` of the global batch's B
   images, in the single process's order, into rows (B, d) on the host */
static void ranks_teacher_rows(Ranks *rk, ExcbModel *run, const ExcbBatch *bt, int view, real *rows) {
    const ExcbConfig *c = &run->cfg;
    size_t share = (size_t)c->batch * c->d;
    ShareWork w = {.rk = rk, .m = run, .bt = bt, .view = view, .rows = rows};
    if (rk->n_chunks) { chunks_run(rk->k, share_teacher_rows, &w); return; }
    teacher_projections(run, bt->xg);
    if (rk->world) model_gather_to_host(run, rk->world, run->ut + (size_t)view * share, rows, sizeof(real) * share);
    else run->ops->to_host(rows, run->ut + (size_t)view * share, sizeof(real) * share);
}

/* A code every rank agrees on before the next step: the largest of the ranks' (0 when all are 0); a
   rank whose own code was 0 says nothing, the rank that hit it prints its message. With sig (the loop),
   also the stop signal: any rank's, stored on every rank, so that all leave the loop together (a rank
   must never act on a signal it alone has seen: it would leave the others in a reduction). One
   all-gather of two ints a step. */
static int ranks_agree(Ranks *rk, int code, int *sig, char *err) {
    if (!rk->world) {
        if (sig) *sig = stop_signal;
        return code;
    }
    int mine[2] = {code, sig ? (int)stop_signal : 0}, all[2 * rk->R], best = 0, stop = 0;
    excb_comm_gather(rk->world, mine, all, sizeof mine);
    for (int r = 0; r < rk->R; r++) {
        best = all[2 * r] > best ? all[2 * r] : best;
        stop = all[2 * r + 1] > stop ? all[2 * r + 1] : stop;
    }
    if (best && !code) {
        rank_exit_silent = 1;
        fail(err, best, "rank %d stops with exit %d, which another rank hit (its message is above)", rk->rank, best);
    }
    if (sig) {
        if (stop) atomic_store(&stop_signal, stop);
        *sig = stop;
    }
    return best;
}

/* Collects rc->kmeans_samples projections from the loader's batches (view 1 from even batches, view 2
   from odd ones, as trainer.py L193), runs k-means and sets both networks' centroids. Returns 0, or an
   exit code with err. The loader is left where it stopped; the caller reopens it for training. The
   projections are computed by `run`: m itself, or its device twin (then m and run are synchronised). */
static int kmeans_init_centroids(ExcbModel *m, ExcbModel *run, Ranks *rk, const ExcbRunConfig *rc, ExcbLoader *L,
                                 int verbose, char *err) {
    const ExcbConfig *c = &m->cfg;
    long n = rc->kmeans_samples;
    int d = c->d, K = c->K, B = rc->model.batch;                  /* the global batch: every rank's rows */
    real *x = xmalloc(sizeof(real) * n * d), *cu = xmalloc(sizeof(real) * K * d), *cm = xmalloc(sizeof(real) * K * d);
    real *rows = xmalloc(sizeof(real) * B * d);
    int32_t *assign = xmalloc(sizeof(int32_t) * n);
    double t0 = now_seconds();
    long have = 0;
    for (long b = 0; have < n; b++) {
        ExcbBatch *bt;
        int code = ranks_agree(rk, excb_loader_next(L, &bt, err), NULL, err);
        if (code) { free(x); free(cu); free(cm); free(rows); free(assign); return code; }
        int view = c->n_global > 1 ? (int)(b % 2) : 0;          /* one global view: always it */
        ranks_teacher_rows(rk, run, bt, view, rows);
        long take = n - have < B ? n - have : B;
        memcpy(x + (size_t)have * d, rows, sizeof(real) * take * d);
        have += take;
    }
    free(rows);
    double t1 = now_seconds();
    int empty = 0;
    int restarts = excb_spherical_kmeans(x, n, d, K, rc->kmeans_iters, rc->kmeans_restarts, c->seed, cu, cm, assign, &empty);
    if (restarts < 0) {
        free(x); free(cu); free(cm); free(assign);
        return fail(err, EXCB_EXIT_CONFIG, "k-means: %d of %d clusters still empty after %d restarts with %ld samples "
                    "(raise kmeans_samples or kmeans_restarts, or lower K)", empty, K, rc->kmeans_restarts, n);
    }
    int code = run != m ? excb_cuda_download(m, run, err) : 0;     /* the teacher's BN statistics moved */
    memcpy(PT(m->teacher, m->centroids), cu, sizeof(real) * K * d);
    memcpy(PT(m->params, m->centroids), cm, sizeof(real) * K * d);
    if (!code && run != m) code = excb_cuda_upload(run, m, err);
    if (code) { free(x); free(cu); free(cm); free(assign); return code; }
    ranks_sync(rk, m);                                             /* the other shares' models too */
    if (verbose)
        fprintf(stderr, "excb train: k-means init: %ld teacher projections (%.1f s), K=%d, %d iterations, %d restart(s) "
                "(%.1f s)\n", n, t1 - t0, K, rc->kmeans_iters, restarts, now_seconds() - t1);
    free(x); free(cu); free(cm); free(assign);
    return 0;
}

/* ================================================================================================
 * 16. Checkpoints: atomic, self-describing, verified (paper_notes.md §9)
 * ================================================================================================
 * File layout (little-endian; a reader on another byte order refuses the endian marker):
 *   header   "EXCBCKPT", u32 version (1), u32 endian marker 0x01020304, u32 entries, u32 entry size (184),
 *            u64 offset of the first data byte                                            (32 bytes)
 *   table    per entry: name[112] (NUL-padded), u32 dtype, u32 ndim, u64 shape[4], u64 offset, u64 bytes,
 *            u32 CRC-32 of the entry's bytes, u32 zero                                    (184 bytes)
 *   data     each entry's bytes at its offset, 64-byte aligned, zero padding between
 *   trailer  u32 CRC-32 of every byte before the trailer, u32 zero, "EXCBEND\0"           (16 bytes)
 * Entries: "config" (the resolved config file, text), "train.*" (step, metrics length, time, the epoch's
 * sums and label counts, each sample's previous label), "method.NAME" for each state buffer of the
 * method (ExCB: "method.cluster_sizes", s of E3; DINO: "method.center"; SwAV: "method.queue"), and every
 * parameter three times, "student.NAME", "teacher.NAME", "momentum.NAME" (PyTorch state_dict names),
 * plus both networks' BatchNorm running statistics. Everything a step reads is here; the randomness
 * needs no state (it is a function of (seed, epoch, sample, view) and (seed, step)), and the data
 * cursor is the step itself (batch t of the run is the loader's batch t).
 * Writing: to NAME.tmp in the same directory, fflush + fsync, rename over NAME, fsync the directory:
 * a crash at any moment leaves either the old file set or the new one, never a torn file.
 */
enum { CK_U8 = 0, CK_I32 = 1, CK_I64 = 2, CK_F32 = 3, CK_F64 = 4 };
static const size_t ck_dtype_size[] = {1, 4, 8, 4, 8};
static const char *ck_dtype_name[] = {"u8", "i32", "i64", "f32", "f64"};
#define CK_NAME 112
#define CK_ENTRY 184
#define CK_HEADER 32
#define CK_TRAILER 16
#define CK_VERSION 1
#define CK_MAX_BYTES ((size_t)1 << 36)    /* 64 GiB: a ResNet-50 run's checkpoint is about 0.5 GB */

typedef struct {
    char name[CK_NAME];
    uint32_t dtype, ndim;
    uint64_t shape[4], offset, bytes;
    uint32_t crc;
    const void *data;          /* writing: where the bytes are; reading: inside the file buffer */
} CkEntry;

typedef struct { CkEntry *e; int n, cap; } CkList;

/* An entry's byte count, dtype size x the product of its extents: 0 when the product overflows 64 bits
   or an unused extent (index >= ndim) is not 0. The writer sizes entries with it, and the reader checks
   every table entry against it (a table whose CRCs were recomputed can still lie). */
static int ck_bytes(uint32_t dtype, uint32_t ndim, const uint64_t shape[4], uint64_t *bytes) {
    uint64_t need = ck_dtype_size[dtype];
    for (uint32_t j = 0; j < 4; j++) {
        if (j >= ndim) { if (shape[j]) return 0; }
        else if (shape[j] && need > UINT64_MAX / shape[j]) return 0;
        else need *= shape[j];
    }
    *bytes = need;
    return 1;
}

static void ck_add(CkList *l, const char *name, int dtype, int ndim, const uint64_t *shape, const void *data) {
    if (l->n == l->cap) {
        l->cap = l->cap ? 2 * l->cap : 256;
        CkEntry *grown = realloc(l->e, sizeof(CkEntry) * l->cap);
        if (!grown) { fprintf(stderr, "excb: out of memory\n"); exit(EXCB_EXIT_OSERR); }
        l->e = grown;
    }
    CkEntry *e = &l->e[l->n++];
    memset(e, 0, sizeof *e);
    snprintf(e->name, CK_NAME, "%s", name);
    e->dtype = dtype;
    e->ndim = ndim;
    for (int i = 0; i < ndim; i++) e->shape[i] = shape[i];
    ck_bytes(e->dtype, e->ndim, e->shape, &e->bytes);     /* a model's shapes never overflow */
    e->data = data;
}

static void ck_add1(CkList *l, const char *name, int dtype, uint64_t n, const void *data) {
    ck_add(l, name, dtype, 1, &n, data);
}

static uint32_t crc_of(uint32_t crc, const void *p, size_t n) {
    const uint8_t *b = p;
    while (n) {                                  /* zlib's crc32 takes at most 4 GiB at a time */
        uInt part = n > (1u << 30) ? (1u << 30) : (uInt)n;
        crc = (uint32_t)crc32(crc, b, part);
        b += part;
        n -= part;
    }
    return crc;
}

/* the list of everything saved: the same function describes what is written and what is expected */
static void ck_describe(CkList *l, const ExcbModel *m, const ExcbTrainState *ts, const char *config_text,
                        const int64_t *scalars_i, const double *scalars_f) {
    ck_add1(l, "config", CK_U8, strlen(config_text), config_text);
    ck_add1(l, "train.step", CK_I64, 1, scalars_i);
    ck_add1(l, "train.metrics_bytes", CK_I64, 1, scalars_i + 1);
    ck_add1(l, "train.seconds", CK_F64, 1, scalars_f);
    ck_add1(l, "train.epoch_sums", CK_F64, EXCB_ACC_N, ts->acc);
    ck_add1(l, "train.epoch_label_counts", CK_I64, m->n_labels, ts->epoch_counts);
    ck_add1(l, "train.previous_labels", CK_I32, ts->n_samples, ts->prev_labels);
    for (int i = 0; i < m->n_mbuf; i++)              /* the method's state: ExCB's s, DINO's centre, ... */
        if (m->mbuf_spec[i].state) {
            char name[CK_NAME];
            snprintf(name, sizeof name, "method.%s", m->mbuf_spec[i].name);
            ck_add1(l, name, m->mbuf_spec[i].integer ? CK_I32 : CK_F32, m->mbuf_spec[i].floats, m->mbuf[i]);
        }
    static const char *prefix[3] = {"student.", "teacher.", "momentum."};
    const real *buf[3] = {m->params, m->teacher, m->momentum};
    for (int b = 0; b < 3; b++)
        for (int t = 0; t < m->n_tensors; t++) {
            const ExcbTensor *T = &m->tensors[t];
            char name[CK_NAME];
            uint64_t shape[4];
            for (int i = 0; i < T->ndim; i++) shape[i] = T->shape[i];
            snprintf(name, sizeof name, "%s%s", prefix[b], T->name);
            ck_add(l, name, CK_F32, T->ndim, shape, buf[b] + T->offset);
        }
    ck_add1(l, "student.bn_running_stats", CK_F32, m->n_running, m->running);
    ck_add1(l, "teacher.bn_running_stats", CK_F32, m->n_running, m->teacher_running);
}

/* fwrite that also runs the file's CRC */
static int ck_write(FILE *f, const void *p, size_t n, uint32_t *crc) {
    *crc = crc_of(*crc, p, n);
    return fwrite(p, 1, n, f) == n ? 0 : -1;
}

static void put32(uint8_t *p, uint32_t v) { memcpy(p, &v, 4); }
static void put64(uint8_t *p, uint64_t v) { memcpy(p, &v, 8); }
static uint32_t get32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static uint64_t get64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }

/* The temporary file being written (a checkpoint's NAME.tmp, config.txt.tmp, eval.json.tmp), known to
   the signal handler of section 17 so that a process ended by a second signal leaves none behind. */
static atomic_int tmp_in_flight;                 /* 1 while tmp_path is being written; any thread may  */
static char tmp_path[4200];                      /* take the signal, so the path is published by a    */
                                                 /* release store and read after an acquire load      */
static void tmp_begin(const char *path) {
    atomic_store_explicit(&tmp_in_flight, 0, memory_order_release);
    snprintf(tmp_path, sizeof tmp_path, "%s", path);
    atomic_store_explicit(&tmp_in_flight, 1, memory_order_release);
}
static void tmp_end(void) { atomic_store_explicit(&tmp_in_flight, 0, memory_order_release); }

static int fsync_dir_of(const char *path) {
    char dir[4096];
    snprintf(dir, sizeof dir, "%s", path);
    char *slash = strrchr(dir, '/');
    if (slash) *(slash == dir ? slash + 1 : slash) = 0;
    else snprintf(dir, sizeof dir, ".");
    int fd = open(dir, O_RDONLY | O_DIRECTORY);
    if (fd < 0) return -1;
    int r = fsync(fd);
    close(fd);
    return r;
}

/* A file written whole or not at all: atomic_create opens PATH.tmp (its name into tmp, 4200 bytes),
   atomic_commit checks every write, fsyncs, renames it over PATH and fsyncs the directory; on any
   failure the temporary file is removed and PATH is as it was. */
static FILE *atomic_create(const char *path, char *tmp, char *err) {
    snprintf(tmp, 4200, "%s.tmp", path);
    tmp_begin(tmp);                        /* a second signal removes it (section 17) */
    FILE *f = fopen(tmp, "wb");
    if (!f) { fail(err, EXCB_EXIT_CANTCREAT, "cannot create %s: %s", tmp, strerror(errno)); tmp_end(); }
    errno = 0;                             /* from here on, an errno is the writes' */
    return f;
}

static int atomic_commit(FILE *f, const char *tmp, const char *path, char *err) {
    int e = 0;                             /* the errno of the first call that failed */
    if (ferror(f)) e = errno ? errno : EIO;
    if (!e && (fflush(f) || fsync(fileno(f)))) e = errno ? errno : EIO;
    if (fclose(f) && !e) e = errno ? errno : EIO;
    if (!e && rename(tmp, path)) e = errno;
    else if (!e) {                         /* in place; only its directory entry may not be durable */
        tmp_end();
        return fsync_dir_of(path) ? fail(err, EXCB_EXIT_IO, "%s is written, but syncing its directory failed: %s", path,
                                         strerror(errno)) : 0;
    }
    unlink(tmp);
    tmp_end();
    return fail(err, EXCB_EXIT_IO, "writing %s failed: %s (nothing was replaced)", path, strerror(e));
}

static int write_text_atomic(const char *path, const char *text, char *err) {
    char tmp[4200];
    FILE *f = atomic_create(path, tmp, err);
    if (!f) return EXCB_EXIT_CANTCREAT;
    fputs(text, f);
    return atomic_commit(f, tmp, path, err);
}

int excb_checkpoint_save(const char *path, const ExcbModel *m, const ExcbTrainState *ts, const char *config_text,
                         char *err) {
    int64_t si[2] = {m->step, ts->metrics_bytes};
    double sf[1] = {ts->seconds};
    CkList l = {0};
    ck_describe(&l, m, ts, config_text, si, sf);
    uint64_t off = CK_HEADER + (uint64_t)l.n * CK_ENTRY;
    off = (off + 63) / 64 * 64;
    uint64_t data_start = off;
    for (int i = 0; i < l.n; i++) {
        l.e[i].offset = off;
        l.e[i].crc = crc_of(0, l.e[i].data, l.e[i].bytes);
        off = (off + l.e[i].bytes + 63) / 64 * 64;
    }
    char tmp[4200];
    FILE *f = atomic_create(path, tmp, err);    /* a crash leaves the previous checkpoint as it was */
    if (!f) { free(l.e); return EXCB_EXIT_CANTCREAT; }
    uint32_t crc = 0;
    uint8_t hdr[CK_HEADER] = {0}, ent[CK_ENTRY], pad[64] = {0};
    memcpy(hdr, "EXCBCKPT", 8);
    put32(hdr + 8, CK_VERSION);
    put32(hdr + 12, 0x01020304u);
    put32(hdr + 16, (uint32_t)l.n);
    put32(hdr + 20, CK_ENTRY);
    put64(hdr + 24, data_start);
    int bad = ck_write(f, hdr, CK_HEADER, &crc);
    for (int i = 0; i < l.n && !bad; i++) {
        const CkEntry *e = &l.e[i];
        memset(ent, 0, sizeof ent);
        memcpy(ent, e->name, strlen(e->name));
        put32(ent + 112, e->dtype);
        put32(ent + 116, e->ndim);
        for (int j = 0; j < 4; j++) put64(ent + 120 + 8 * j, e->shape[j]);
        put64(ent + 152, e->offset);
        put64(ent + 160, e->bytes);
        put32(ent + 168, e->crc);
        bad = ck_write(f, ent, CK_ENTRY, &crc);
    }
    uint64_t pos = CK_HEADER + (uint64_t)l.n * CK_ENTRY;
    for (int i = 0; i < l.n && !bad; i++) {
        bad |= ck_write(f, pad, l.e[i].offset - pos, &crc);
        bad |= ck_write(f, l.e[i].data, l.e[i].bytes, &crc);
        pos = l.e[i].offset + l.e[i].bytes;
    }
    if (!bad) bad |= ck_write(f, pad, off - pos, &crc);
    uint8_t trailer[CK_TRAILER] = {0};
    put32(trailer, crc);
    memcpy(trailer + 8, "EXCBEND", 8);
    if (!bad) fwrite(trailer, 1, CK_TRAILER, f);
    free(l.e);
    return atomic_commit(f, tmp, path, err);    /* every write checked there (ferror), then renamed */
}

/* A checkpoint read into memory and verified: trailer, file CRC, header, table, every entry's CRC. */
typedef struct { uint8_t *buf; size_t len; CkList l; } CkFile;

static void ck_close(CkFile *ck) { free(ck->buf); free(ck->l.e); memset(ck, 0, sizeof *ck); }

static int ck_open(const char *path, CkFile *ck, char *err) {
    memset(ck, 0, sizeof *ck);
    int fd, code = open_input(path, CK_MAX_BYTES, &fd, &ck->len, err);
    if (code) return code;
    FILE *f = fdopen(fd, "rb");
    if (!f) { close(fd); return fail(err, EXCB_EXIT_OSERR, "checkpoint %s: %s", path, strerror(errno)); }
    ck->buf = malloc(ck->len ? ck->len : 1);
    if (!ck->buf) { fclose(f); return fail(err, EXCB_EXIT_OSERR, "checkpoint %s: out of memory (%zu bytes)", path, ck->len); }
    size_t got = fread(ck->buf, 1, ck->len, f);
    fclose(f);
    if (got != ck->len) { ck_close(ck); return fail(err, EXCB_EXIT_IO, "checkpoint %s: read %zu of %zu bytes", path, got, ck->len); }
    const uint8_t *b = ck->buf;
    size_t n = ck->len;
    if (n < 8 || memcmp(b, "EXCBCKPT", 8)) { ck_close(ck); return fail(err, EXCB_EXIT_DATA, "checkpoint %s: not an excb checkpoint (bad magic)", path); }
    if (n < CK_HEADER + CK_TRAILER || memcmp(b + n - 8, "EXCBEND", 8)) {
        ck_close(ck);
        return fail(err, EXCB_EXIT_DATA, "checkpoint %s: truncated or damaged (%zu bytes, no end marker)", path, n);
    }
    uint32_t want = get32(b + n - CK_TRAILER), got_crc = crc_of(0, b, n - CK_TRAILER);
    if (want != got_crc) {
        ck_close(ck);
        return fail(err, EXCB_EXIT_DATA, "checkpoint %s: damaged (file CRC-32 is 0x%08x, the trailer says 0x%08x)", path, got_crc, want);
    }
    if (get32(b + 12) != 0x01020304u) { ck_close(ck); return fail(err, EXCB_EXIT_DATA, "checkpoint %s: written on a machine of the other byte order", path); }
    uint32_t version = get32(b + 8);
    if (version != CK_VERSION) { ck_close(ck); return fail(err, EXCB_EXIT_DATA, "checkpoint %s: format version %u, this excb reads %d", path, version, CK_VERSION); }
    uint32_t count = get32(b + 16);
    if (get32(b + 20) != CK_ENTRY || (uint64_t)count * CK_ENTRY + CK_HEADER > n - CK_TRAILER) {
        ck_close(ck);
        return fail(err, EXCB_EXIT_DATA, "checkpoint %s: bad tensor table (%u entries)", path, count);
    }
    for (uint32_t i = 0; i < count; i++) {
        const uint8_t *t = b + CK_HEADER + (size_t)i * CK_ENTRY;
        CkEntry e = {0};
        memcpy(e.name, t, CK_NAME - 1);
        e.dtype = get32(t + 112);
        e.ndim = get32(t + 116);
        for (int j = 0; j < 4; j++) e.shape[j] = get64(t + 120 + 8 * j);
        e.offset = get64(t + 152);
        e.bytes = get64(t + 160);
        e.crc = get32(t + 168);
        if (e.dtype > CK_F64 || e.ndim > 4 || e.offset > n - CK_TRAILER || e.bytes > n - CK_TRAILER - e.offset) {
            ck_close(ck);
            return fail(err, EXCB_EXIT_DATA, "checkpoint %s: entry %u ('%s') is out of bounds", path, i, e.name);
        }
        /* the table must agree with itself (ck_bytes), before any of its shapes sizes a copy or an
           allocation; the byte count is already within the file */
        uint64_t need = 0;
        if (!ck_bytes(e.dtype, e.ndim, e.shape, &need) || need != e.bytes) {
            ck_close(ck);
            return fail(err, EXCB_EXIT_DATA, "checkpoint %s: entry %u ('%s') is %s of shape %llu,%llu,%llu,%llu "
                        "(ndim %u) but holds %llu bytes: its table is inconsistent", path, i, e.name,
                        ck_dtype_name[e.dtype], (unsigned long long)e.shape[0], (unsigned long long)e.shape[1],
                        (unsigned long long)e.shape[2], (unsigned long long)e.shape[3], e.ndim,
                        (unsigned long long)e.bytes);
        }
        if (crc_of(0, b + e.offset, e.bytes) != e.crc) {
            ck_close(ck);
            return fail(err, EXCB_EXIT_DATA, "checkpoint %s: tensor '%s' is damaged (CRC-32 mismatch)", path, e.name);
        }
        ck_add(&ck->l, e.name, e.dtype, e.ndim, e.shape, b + e.offset);
        ck->l.e[ck->l.n - 1].crc = e.crc;
    }
    return 0;
}

/* the config text and (in_ch not NULL) the input channels, which a run takes from its data and the
   config does not hold: the stem's weight says them */
static int checkpoint_config(const char *path, char **config_text, int *in_ch, char *err) {
    CkFile ck;
    int code = ck_open(path, &ck, err);
    if (code) return code;
    *config_text = NULL;
    for (int i = 0; i < ck.l.n; i++) {
        const CkEntry *e = &ck.l.e[i];
        if (!strcmp(e->name, "config") && e->dtype == CK_U8 && !*config_text) {
            *config_text = xmalloc(e->bytes + 1);
            memcpy(*config_text, e->data, e->bytes);
            (*config_text)[e->bytes] = 0;
        }
        if (in_ch && !strcmp(e->name, "student.backbone.conv1.weight") && e->ndim == 4) *in_ch = (int)e->shape[1];
    }
    ck_close(&ck);
    return *config_text ? 0 : fail(err, EXCB_EXIT_DATA, "checkpoint %s: no config entry", path);
}

int excb_checkpoint_config(const char *path, char **config_text, char *err) {
    return checkpoint_config(path, config_text, NULL, err);
}


void excb_train_state_free(ExcbTrainState *ts) {
    free(ts->prev_labels);
    free(ts->epoch_counts);
    memset(ts, 0, sizeof *ts);
}

int excb_checkpoint_load(const char *path, ExcbModel *m, ExcbTrainState *ts, char *err) {
    CkFile ck;
    int code = ck_open(path, &ck, err);
    if (code) return code;
    /* what this model expects, described by the same function that writes; the data pointers of the
       expected list are where each entry's bytes go */
    int64_t si[2] = {0};
    double sf[1] = {0};
    long n_samples = -1;
    for (int i = 0; i < ck.l.n; i++)            /* ck_open checked shape against bytes: this is within the file */
        if (!strcmp(ck.l.e[i].name, "train.previous_labels") && ck.l.e[i].ndim == 1) n_samples = (long)ck.l.e[i].shape[0];
    if (n_samples < 0) { ck_close(&ck); return fail(err, EXCB_EXIT_DATA, "checkpoint %s: no train.previous_labels entry", path); }
    ExcbTrainState fresh = {.n_samples = n_samples};
    fresh.prev_labels = xmalloc(sizeof(int32_t) * (n_samples + 1));
    fresh.epoch_counts = xmalloc(sizeof(int64_t) * (m->n_labels + 1));
    CkList want = {0};
    ck_describe(&want, m, &fresh, "", si, sf);
    for (int w = 0; w < want.n && !code; w++) {
        CkEntry *e = &want.e[w];
        const CkEntry *g = NULL;
        for (int i = 0; i < ck.l.n; i++)
            if (!strcmp(ck.l.e[i].name, e->name)) { g = &ck.l.e[i]; break; }
        if (!g) { code = fail(err, EXCB_EXIT_CONFIG, "checkpoint %s: has no tensor '%s' (a checkpoint of another model?)", path, e->name); break; }
        if (!strcmp(e->name, "config")) continue;
        int same = g->dtype == e->dtype && g->ndim == e->ndim;
        for (uint32_t j = 0; same && j < e->ndim; j++) same = g->shape[j] == e->shape[j];
        if (!same) {
            char a[96] = "", b[96] = "";
            for (uint32_t j = 0; j < g->ndim; j++) snprintf(a + strlen(a), sizeof a - strlen(a), j ? ",%llu" : "%llu", (unsigned long long)g->shape[j]);
            for (uint32_t j = 0; j < e->ndim; j++) snprintf(b + strlen(b), sizeof b - strlen(b), j ? ",%llu" : "%llu", (unsigned long long)e->shape[j]);
            code = fail(err, EXCB_EXIT_CONFIG, "checkpoint %s: tensor '%s' is %s (%s) there, this model expects %s (%s)", path,
                        e->name, ck_dtype_name[g->dtype], a, ck_dtype_name[e->dtype], b);
            break;
        }
        memcpy((void *)e->data, g->data, e->bytes);
    }
    free(want.e);
    ck_close(&ck);
    if (code) { excb_train_state_free(&fresh); return code; }
    m->step = si[0];
    fresh.metrics_bytes = si[1];
    fresh.seconds = sf[0];
    *ts = fresh;
    return 0;
}

/* ================================================================================================
 * 16b. Weights in and out: safetensors with PyTorch's names (paper_notes.md §9c)
 * ================================================================================================
 * A checkpoint (section 16) is excb's training state. What other tools exchange is a state dict, the
 * name -> tensor table of PyTorch's Module.state_dict(). excb writes and reads it as a safetensors file
 * (Hugging Face's format: no pickle, so loading runs no code), under the names of the parameter table
 * (section 8): the official code's for the heads, torchvision's for the backbone.
 *   excb export   one network (teacher or student), each BatchNorm's buffers, the prototypes' weight_g
 *                 (the official code's frozen gain, all ones), the config text and step in __metadata__;
 *                 --backbone-only: the backbone alone, named as torchvision.models.resnet* names it
 *   excb import   and excb eval --weights, excb features --weights: excb's export, a torchvision ResNet
 *                 state dict, or a DINO/ExCB-style one (teacher./student., module., backbone. prefixes)
 * The format, checked as its reference implementation (safetensors/src/tensor.rs) checks it:
 *   bytes 0-7      N, the header's length, unsigned little-endian, at most 100,000,000
 *   bytes 8..8+N   a JSON object (UTF-8, maybe padded with spaces): name -> {"dtype", "shape",
 *                  "data_offsets": [begin, end]}, and "__metadata__" -> {string: string}
 *   the rest       the data; offsets count from its first byte. Sorted by offset, the tensors cover it
 *                  exactly: the first begins at 0, each where the one before ends, the last at its end;
 *                  each spans numel x its dtype's size bytes.
 * The header is parsed by jansson (Debian's libjansson), never by hand; a key given twice is refused.
 * Byte order: the format's is little-endian, which is this code's (x86-64 and AArch64), as for section 16.
 */
const ExcbStDtype excb_st_dtypes[EXCB_ST_N_DTYPES] = {
    [EXCB_ST_BOOL] = {"BOOL", 1}, [EXCB_ST_U8] = {"U8", 1},   [EXCB_ST_I8] = {"I8", 1},
    [EXCB_ST_F8_E5M2] = {"F8_E5M2", 1}, [EXCB_ST_F8_E4M3] = {"F8_E4M3", 1}, [EXCB_ST_I16] = {"I16", 2},
    [EXCB_ST_U16] = {"U16", 2},   [EXCB_ST_F16] = {"F16", 2}, [EXCB_ST_BF16] = {"BF16", 2},
    [EXCB_ST_I32] = {"I32", 4},   [EXCB_ST_U32] = {"U32", 4}, [EXCB_ST_F32] = {"F32", 4},
    [EXCB_ST_F64] = {"F64", 8},   [EXCB_ST_I64] = {"I64", 8}, [EXCB_ST_U64] = {"U64", 8},
};
#define ST_MAX_HEADER 100000000ull          /* the format's limit on N                                 */
#define ST_MAX_BYTES ((size_t)1 << 36)      /* 64 GiB: a ResNet-50 with K = 65536 heads is about 0.2 GB */

void excb_safetensors_close(ExcbSafetensors *st) {
    for (int i = 0; i < st->n; i++) free(st->t[i].name);
    for (int i = 0; i < st->n_meta; i++) { free(st->meta_key[i]); free(st->meta_value[i]); }
    free(st->t); free(st->meta_key); free(st->meta_value); free(st->buf);
    memset(st, 0, sizeof *st);
}

static char *xstrdup(const char *s) {
    char *d = xmalloc(strlen(s) + 1);
    return strcpy(d, s);
}

/* a non-negative JSON integer into *v; 0, or -1 when it is anything else */
static int st_count(const json_t *x, uint64_t *v) {
    if (!json_is_integer(x) || json_integer_value(x) < 0) return -1;
    *v = (uint64_t)json_integer_value(x);
    return 0;
}

/* one tensor's header entry into t (its data inside the data block of data_len bytes at base) */
static int st_entry(const char *P, const char *name, json_t *v, const uint8_t *base, size_t data_len,
                    ExcbStTensor *t, char *err) {
    if (!json_is_object(v)) return fail(err, EXCB_EXIT_DATA, "%s: tensor '%s': its entry is not a JSON object", P, name);
    json_t *dt = NULL, *sh = NULL, *off = NULL, *x;
    const char *k;
    json_object_foreach(v, k, x) {
        if (!strcmp(k, "dtype")) dt = x;
        else if (!strcmp(k, "shape")) sh = x;
        else if (!strcmp(k, "data_offsets")) off = x;
        else return fail(err, EXCB_EXIT_DATA, "%s: tensor '%s': unknown field '%s' (dtype, shape, data_offsets)", P, name, k);
    }
    if (!dt || !sh || !off)
        return fail(err, EXCB_EXIT_DATA, "%s: tensor '%s' has no %s", P, name, !dt ? "dtype" : !sh ? "shape" : "data_offsets");
    t->dtype = -1;
    for (int d = 0; d < EXCB_ST_N_DTYPES && json_is_string(dt); d++)
        if (!strcmp(json_string_value(dt), excb_st_dtypes[d].name)) t->dtype = d;
    if (t->dtype < 0)
        return fail(err, EXCB_EXIT_DATA, "%s: tensor '%s': dtype %s%s%s is not one of the format's (F32, F16, BF16, I64, ...)",
                    P, name, json_is_string(dt) ? "'" : "", json_is_string(dt) ? json_string_value(dt) : "(not a string)",
                    json_is_string(dt) ? "'" : "");
    if (!json_is_array(sh)) return fail(err, EXCB_EXIT_DATA, "%s: tensor '%s': shape is not an array", P, name);
    if (json_array_size(sh) > EXCB_ST_MAX_DIMS)
        return fail(err, EXCB_EXIT_DATA, "%s: tensor '%s': %zu dimensions, more than the %d excb reads", P, name,
                    json_array_size(sh), EXCB_ST_MAX_DIMS);
    t->ndim = (int)json_array_size(sh);
    t->numel = 1;
    for (int j = 0; j < t->ndim; j++) {
        uint64_t s;
        if (st_count(json_array_get(sh, j), &s))
            return fail(err, EXCB_EXIT_DATA, "%s: tensor '%s': shape[%d] is not a non-negative integer", P, name, j);
        if (s && t->numel > UINT64_MAX / s) return fail(err, EXCB_EXIT_DATA, "%s: tensor '%s': its shape overflows", P, name);
        t->numel *= s;
        t->shape[j] = (int64_t)s;
    }
    uint64_t b, e, size = (uint64_t)excb_st_dtypes[t->dtype].size;
    if (!json_is_array(off) || json_array_size(off) != 2 || st_count(json_array_get(off, 0), &b) ||
        st_count(json_array_get(off, 1), &e))
        return fail(err, EXCB_EXIT_DATA, "%s: tensor '%s': data_offsets is not [begin, end], two non-negative integers", P, name);
    if (e < b) return fail(err, EXCB_EXIT_DATA, "%s: tensor '%s': data_offsets [%llu, %llu] end before they begin", P, name,
                           (unsigned long long)b, (unsigned long long)e);
    if (e > data_len)
        return fail(err, EXCB_EXIT_DATA, "%s: tensor '%s': data_offsets [%llu, %llu] run past the end of the data (%zu bytes)",
                    P, name, (unsigned long long)b, (unsigned long long)e, data_len);
    if (t->numel > UINT64_MAX / size || e - b != t->numel * size)
        return fail(err, EXCB_EXIT_DATA, "%s: tensor '%s': %llu %s elements need %llu bytes, its data_offsets [%llu, %llu] give %llu",
                    P, name, (unsigned long long)t->numel, excb_st_dtypes[t->dtype].name,
                    (unsigned long long)(t->numel <= UINT64_MAX / size ? t->numel * size : UINT64_MAX),
                    (unsigned long long)b, (unsigned long long)e, (unsigned long long)(e - b));
    t->data = base + b;
    t->bytes = (size_t)(e - b);
    t->name = xstrdup(name);                              /* last: a failed entry owns nothing */
    return 0;
}

static int st_metadata(ExcbSafetensors *st, json_t *v, char *err) {
    if (json_is_null(v)) return 0;
    if (!json_is_object(v)) return fail(err, EXCB_EXIT_DATA, "%s: __metadata__ is not a JSON object", st->path);
    size_t n = json_object_size(v);
    st->meta_key = xcalloc(n + 1, sizeof(char *));
    st->meta_value = xcalloc(n + 1, sizeof(char *));
    const char *k;
    json_t *x;
    json_object_foreach(v, k, x) {
        if (!json_is_string(x)) return fail(err, EXCB_EXIT_DATA, "%s: __metadata__ '%s' is not a string", st->path, k);
        st->meta_key[st->n_meta] = xstrdup(k);
        st->meta_value[st->n_meta++] = xstrdup(json_string_value(x));
    }
    return 0;
}

static int cmp_st_data(const void *a, const void *b) {
    const ExcbStTensor *x = a, *y = b;
    if (x->data != y->data) return x->data < y->data ? -1 : 1;
    return (x->bytes > y->bytes) - (x->bytes < y->bytes);
}

static int st_parse(ExcbSafetensors *st, char *err) {
    const char *P = st->path;
    if (st->len < 8) return fail(err, EXCB_EXIT_DATA, "%s: %zu bytes: too short for a safetensors file (an 8-byte header length first)", P, st->len);
    if (!memcmp(st->buf, "EXCBCKPT", 8))
        return fail(err, EXCB_EXIT_DATA, "%s: an excb checkpoint, not a safetensors file (commands take a checkpoint "
                    "without --weights; excb export makes the safetensors file)", P);
    uint64_t hlen = 0;
    for (int i = 7; i >= 0; i--) hlen = hlen << 8 | st->buf[i];        /* little-endian */
    if (hlen > ST_MAX_HEADER)
        return fail(err, EXCB_EXIT_DATA, "%s: header length %llu is above the format's limit of %llu bytes (not a safetensors file?)",
                    P, (unsigned long long)hlen, ST_MAX_HEADER);
    if (hlen > st->len - 8)
        return fail(err, EXCB_EXIT_DATA, "%s: header length %llu runs past the end of the file (%zu bytes follow the length; "
                    "cut short, or not a safetensors file)", P, (unsigned long long)hlen, st->len - 8);
    if (hlen == 0 || st->buf[8] != '{')
        return fail(err, EXCB_EXIT_DATA, "%s: the header does not begin with '{': not a safetensors file", P);
    json_error_t je;
    json_t *root = json_loadb((const char *)st->buf + 8, (size_t)hlen, JSON_REJECT_DUPLICATES, &je);
    if (!root) return fail(err, EXCB_EXIT_DATA, "%s: header, byte %d of the JSON: %s", P, je.position, je.text);
    const uint8_t *base = st->buf + 8 + hlen;
    size_t data_len = st->len - 8 - (size_t)hlen;
    int code = 0;
    if (!json_is_object(root)) code = fail(err, EXCB_EXIT_DATA, "%s: the header is not a JSON object", P);
    st->t = xcalloc(json_object_size(root) + 1, sizeof *st->t);
    const char *key;
    json_t *v;
    json_object_foreach(root, key, v) {
        if (code) break;
        if (!strcmp(key, "__metadata__")) code = st_metadata(st, v, err);
        else if (!(code = st_entry(P, key, v, base, data_len, &st->t[st->n], err))) st->n++;
    }
    json_decref(root);
    if (code) return code;
    qsort(st->t, st->n, sizeof *st->t, cmp_st_data);
    uint64_t at = 0;                                   /* where the tensors so far end */
    for (int i = 0; i < st->n; i++) {
        uint64_t b = (uint64_t)(st->t[i].data - base);
        if (b != at)
            return fail(err, EXCB_EXIT_DATA, "%s: tensor '%s' begins at byte %llu of the data, the tensors before it end at %llu: %s",
                        P, st->t[i].name, (unsigned long long)b, (unsigned long long)at,
                        b > at ? "a hole" : "they overlap");
        at = b + st->t[i].bytes;
    }
    if (at != data_len)
        return fail(err, EXCB_EXIT_DATA, "%s: the tensors end at byte %llu of the data, which has %zu bytes", P,
                    (unsigned long long)at, data_len);
    return 0;
}

int excb_safetensors_parse(ExcbSafetensors *st, uint8_t *buf, size_t len, const char *path, char *err) {
    memset(st, 0, sizeof *st);
    snprintf(st->path, sizeof st->path, "%s", path);
    st->buf = buf;
    st->len = len;
    int code = st_parse(st, err);
    if (code) excb_safetensors_close(st);
    return code;
}

int excb_safetensors_open(ExcbSafetensors *st, const char *path, char *err) {
    uint8_t *buf = NULL;
    size_t cap = 0, len = 0;
    int code = read_whole_file(path, &buf, &cap, &len, ST_MAX_BYTES, err);
    if (code) { free(buf); memset(st, 0, sizeof *st); return code; }
    return excb_safetensors_parse(st, buf, len, path, err);
}

const ExcbStTensor *excb_safetensors_find(const ExcbSafetensors *st, const char *name) {
    for (int i = 0; i < st->n; i++)
        if (!strcmp(st->t[i].name, name)) return &st->t[i];
    return NULL;
}

const char *excb_safetensors_meta(const ExcbSafetensors *st, const char *key) {
    for (int i = 0; i < st->n_meta; i++)
        if (!strcmp(st->meta_key[i], key)) return st->meta_value[i];
    return NULL;
}

/* --- writing: the header in the caller's order, the data in the order of falling element size (so
   an I64 scalar never pushes the F32 tensors after it off their alignment), then the caller's ------- */
typedef struct {
    char name[128];
    int dtype, ndim;
    int64_t shape[4];
    const void *data;
    size_t bytes;
} StOut;

static int st_write(const char *path, const StOut *e, int n, json_t *meta, char *err) {
    int *order = xmalloc(sizeof(int) * (n + 1));
    uint64_t *begin = xmalloc(sizeof(uint64_t) * (n + 1)), at = 0;
    int k = 0;
    for (int size = 8; size >= 1; size /= 2)
        for (int i = 0; i < n; i++)
            if (excb_st_dtypes[e[i].dtype].size == size) { order[k++] = i; begin[i] = at; at += e[i].bytes; }
    json_t *root = json_object();
    int bad = 0;                                       /* a name that is not UTF-8, or given twice */
    for (int i = 0; i < n; i++) {
        json_t *shape = json_array();
        for (int j = 0; j < e[i].ndim; j++) json_array_append_new(shape, json_integer(e[i].shape[j]));
        bad |= json_object_set_new(root, e[i].name, json_pack("{s:s, s:o, s:[I, I]}", "dtype", excb_st_dtypes[e[i].dtype].name,
                                                              "shape", shape, "data_offsets", (json_int_t)begin[i],
                                                              (json_int_t)(begin[i] + e[i].bytes)));
    }
    bad |= (int)json_object_size(root) != n;
    if (meta) json_object_set(root, "__metadata__", meta);
    char *text = bad ? NULL : json_dumps(root, JSON_COMPACT);   /* keys in insertion order (jansson >= 2.8) */
    json_decref(root);
    if (!text) {
        free(order); free(begin);
        return fail(err, EXCB_EXIT_SOFTWARE, "%s: the header could not be made (a tensor name twice, or not UTF-8)", path);
    }
    size_t hl = strlen(text), padded = (hl + 7) / 8 * 8;          /* the data starts 8-byte aligned */
    uint8_t len8[8];
    for (int i = 0; i < 8; i++) len8[i] = (uint8_t)((uint64_t)padded >> (8 * i));
    char tmp[4200];
    FILE *f = atomic_create(path, tmp, err);
    int code = f ? 0 : EXCB_EXIT_CANTCREAT;
    if (f) {
        fwrite(len8, 1, 8, f);
        fwrite(text, 1, hl, f);
        for (size_t i = hl; i < padded; i++) fputc(' ', f);
        for (int i = 0; i < n; i++) fwrite(e[order[i]].data, 1, e[order[i]].bytes, f);
        code = atomic_commit(f, tmp, path, err);
    }
    free(text); free(order); free(begin);
    return code;
}

/* --- the state dict of a model: which tensor is where --------------------------------------------- */
typedef enum { W_PARAM, W_RUNNING_MEAN, W_RUNNING_VAR, W_BATCHES, W_GAIN } WeightKind;
typedef struct {
    char name[128];            /* the full name, "backbone."/"classifier." prefixed                    */
    WeightKind kind;
    int index;                 /* the tensor (W_PARAM, W_GAIN: the prototypes'), or the BatchNorm       */
    int dtype, ndim;
    int64_t shape[4];
    size_t numel;
} WeightEntry;

static int is_backbone_name(const char *name) { return !strncmp(name, "backbone.", 9); }

/* Every entry of the model's state dict, in PyTorch's order: the parameters in the table's order, a
   BatchNorm's running_mean, running_var and num_batches_tracked after its bias, weight_g after the
   prototypes' weight_v. Returns the count; *out is malloc'd. */
static int weight_entries(const ExcbModel *m, WeightEntry **out) {
    WeightEntry *w = xcalloc((size_t)m->n_tensors + 3 * (size_t)m->n_bn + 1, sizeof *w);
    int n = 0;
    for (int t = 0; t < m->n_tensors; t++) {
        const ExcbTensor *T = &m->tensors[t];
        w[n] = (WeightEntry){.kind = W_PARAM, .index = t, .dtype = EXCB_ST_F32, .ndim = T->ndim, .numel = T->numel};
        snprintf(w[n].name, sizeof w[n].name, "%s", T->name);
        for (int j = 0; j < T->ndim; j++) w[n].shape[j] = T->shape[j];
        n++;
        if (t == m->centroids) {                           /* torch.nn.utils.weight_norm(dim = 0)'s g */
            w[n] = (WeightEntry){.kind = W_GAIN, .index = t, .dtype = EXCB_ST_F32, .ndim = 2,
                                 .shape = {T->shape[0], 1}, .numel = (size_t)T->shape[0]};
            snprintf(w[n].name, sizeof w[n].name, "%.*s_g", (int)strlen(T->name) - 2, T->name);
            n++;
        }
        for (int b = 0; b < m->n_bn; b++) {
            if (m->bn_beta[b] != t) continue;
            int stem = (int)strlen(T->name) - 5;           /* the name less ".bias" */
            static const char *const buffer[3] = {"running_mean", "running_var", "num_batches_tracked"};
            for (int j = 0; j < 3; j++) {
                w[n] = (WeightEntry){.kind = W_RUNNING_MEAN + j, .index = b, .dtype = j < 2 ? EXCB_ST_F32 : EXCB_ST_I64,
                                     .ndim = j < 2, .shape = {m->bn_channels[b]}, .numel = j < 2 ? (size_t)m->bn_channels[b] : 1};
                snprintf(w[n].name, sizeof w[n].name, "%.*s.%s", stem, T->name, buffer[j]);
                n++;
            }
        }
    }
    *out = w;
    return n;
}

/* where entry e's values live in m for one network; NULL for the two that excb does not hold */
static real *weight_place(const ExcbModel *m, int teacher, const WeightEntry *e) {
    switch (e->kind) {
    case W_PARAM: return (teacher ? m->teacher : m->params) + m->tensors[e->index].offset;
    case W_RUNNING_MEAN: return (teacher ? m->teacher_running : m->running) + m->bn_stats[e->index];
    case W_RUNNING_VAR: return (teacher ? m->teacher_running : m->running) + m->bn_stats[e->index] + m->bn_channels[e->index];
    default: return NULL;                              /* W_BATCHES, W_GAIN: constants */
    }
}

int excb_weights_save(const char *path, const ExcbModel *m, int teacher, int backbone_only, const char *config_text,
                      char *err) {
    WeightEntry *w;
    int n = weight_entries(m, &w), k = 0;
    size_t floats = 0;
    for (int i = 0; i < n; i++) floats += w[i].dtype == EXCB_ST_F32 ? w[i].numel : 0;
    float *vals = xmalloc(sizeof(float) * (floats + 1)), *at = vals;   /* real may be double: F32 copies */
    int64_t batches = m->step;       /* BN's forward count in training mode: one per step, teacher too */
    StOut *o = xcalloc(n + 1, sizeof *o);
    for (int i = 0; i < n; i++) {
        if (backbone_only && !is_backbone_name(w[i].name)) continue;
        StOut *s = &o[k++];
        snprintf(s->name, sizeof s->name, "%s", backbone_only ? w[i].name + 9 : w[i].name);
        s->dtype = w[i].dtype;
        s->ndim = w[i].ndim;
        memcpy(s->shape, w[i].shape, sizeof s->shape);
        s->bytes = w[i].numel * excb_st_dtypes[w[i].dtype].size;
        if (w[i].kind == W_BATCHES) { s->data = &batches; continue; }
        const real *src = weight_place(m, teacher, &w[i]);
        for (size_t j = 0; j < w[i].numel; j++) at[j] = src ? (float)src[j] : 1.0f;     /* W_GAIN: ones */
        s->data = at;
        at += w[i].numel;
    }
    char step[32], mean[64] = "", std[64] = "";
    snprintf(step, sizeof step, "%ld", m->step);
    ExcbViewConfig vc;                       /* the input normalisation a PyTorch user has to repeat */
    excb_view_config_for(&vc, &m->cfg, 1, 0);
    for (int c = 0; c < m->cfg.in_ch && c < 3; c++) {
        snprintf(mean + strlen(mean), sizeof mean - strlen(mean), "%s%.9g", c ? "," : "", (double)vc.mean[c]);
        snprintf(std + strlen(std), sizeof std - strlen(std), "%s%.9g", c ? "," : "", (double)vc.std[c]);
    }
    json_t *meta = json_pack("{s:s, s:s, s:s, s:s, s:s, s:s, s:s, s:s}", "format", "pt", "excb.version", EXCB_VERSION,
                             "excb.network", teacher ? "teacher" : "student", "excb.names",
                             backbone_only ? "torchvision" : "excb", "excb.step", step, "excb.input_mean", mean,
                             "excb.input_std", std, "excb.config", config_text);
    int code = meta ? st_write(path, o, k, meta, err)
                    : fail(err, EXCB_EXIT_DATA, "%s: the config (a path in it?) is not UTF-8 text, which the metadata takes only",
                           path);
    json_decref(meta);
    free(o); free(vals); free(w);
    return code;
}

/* --- reading a state dict into a model ------------------------------------------------------------ */
/* "[a, b, c]" of a shape, for messages */
static const char *shape_text(const int64_t *shape, int ndim, char *buf, size_t cap) {
    size_t l = snprintf(buf, cap, "[");
    for (int j = 0; j < ndim && l < cap; j++) l += snprintf(buf + l, cap - l, "%s%lld", j ? ", " : "", (long long)shape[j]);
    if (l < cap) snprintf(buf + l, cap - l, "]");
    return buf;
}

/* The file's tensors of one set under the names the model gives them, sorted for binary search. A
   name is canonical once `set` ("teacher."/"student.", or "") is cut off its front, then every module.
   (DDP), and a name outside the heads gets "backbone." when it lacks it (torchvision's names). Two
   tensors with one canonical name (conv1.weight beside module.conv1.weight) are refused. */
typedef struct { char *name; int tensor; } WeightName;
typedef struct { const ExcbSafetensors *st; WeightName *w; int n; } WeightIndex;

static int cmp_weight_name(const void *a, const void *b) {
    return strcmp(((const WeightName *)a)->name, ((const WeightName *)b)->name);
}

static void weight_index_free(WeightIndex *ix) {
    for (int i = 0; i < ix->n; i++) free(ix->w[i].name);
    free(ix->w);
    memset(ix, 0, sizeof *ix);
}

static int weight_index(WeightIndex *ix, const ExcbSafetensors *st, const char *set, char *err) {
    size_t ls = strlen(set);
    *ix = (WeightIndex){.st = st, .w = xcalloc(st->n + 1, sizeof(WeightName))};
    for (int i = 0; i < st->n; i++) {
        const char *name = st->t[i].name;
        if (strncmp(name, set, ls)) continue;
        name += ls;
        while (!strncmp(name, "module.", 7)) name += 7;
        int prefix = !is_backbone_name(name) && strncmp(name, "classifier.", 11);
        char *c = xmalloc(strlen(name) + 10);
        sprintf(c, "%s%s", prefix ? "backbone." : "", name);
        ix->w[ix->n++] = (WeightName){c, i};
    }
    qsort(ix->w, ix->n, sizeof *ix->w, cmp_weight_name);
    for (int i = 1; i < ix->n; i++)
        if (!strcmp(ix->w[i - 1].name, ix->w[i].name)) {
            int code = fail(err, EXCB_EXIT_DATA, "%s: '%s' and '%s' are both the model's %s: which one is meant?", st->path,
                            st->t[ix->w[i - 1].tensor].name, st->t[ix->w[i].tensor].name, ix->w[i].name);
            weight_index_free(ix);
            return code;
        }
    return 0;
}

/* the file's tensor the model calls `full`, or NULL */
static const ExcbStTensor *weights_find(const WeightIndex *ix, const char *full) {
    WeightName key = {(char *)full, 0};
    const WeightName *w = bsearch(&key, ix->w, ix->n, sizeof *ix->w, cmp_weight_name);
    return w ? &ix->st->t[w->tensor] : NULL;
}

/* a convolution's weight the structure is read from: NULL when absent, else 4-d with every extent in
   1..2^20 (a zero-sized or absurd tensor would make a model of any size); 0 or EXCB_EXIT_DATA */
static int conv_weight(const WeightIndex *ix, const char *name, const ExcbStTensor **t, char *err) {
    *t = weights_find(ix, name);
    if (!*t) return 0;
    int ok = (*t)->ndim == 4;
    for (int j = 0; ok && j < 4; j++) ok = (*t)->shape[j] >= 1 && (*t)->shape[j] <= (1 << 20);
    char s[160];
    return ok ? 0 : fail(err, EXCB_EXIT_DATA, "%s: %s has shape %s: not a convolution's weight", ix->st->path, (*t)->name,
                         shape_text((*t)->shape, (*t)->ndim, s, sizeof s));
}

/* The backbone read off the names and shapes (torchvision's ResNet: conv1, layerS.J.convI, downsample),
   and the heads' widths when the heads are there, as settings of rc. 0, or EXCB_EXIT_DATA. */
static int weights_infer_config(const WeightIndex *ix, ExcbRunConfig *rc, int *heads, char *err) {
    const char *P = ix->st->path;
    const ExcbStTensor *c1, *t;
    int code = conv_weight(ix, "backbone.conv1.weight", &c1, err);
    if (code) return code;
    if (!c1) return fail(err, EXCB_EXIT_DATA, "%s: no conv1.weight (or backbone.conv1.weight): not a ResNet state dict excb reads", P);
    if (c1->shape[3] != c1->shape[2] || (c1->shape[2] != 7 && c1->shape[2] != 3))
        return fail(err, EXCB_EXIT_DATA, "%s: conv1.weight is %lldx%lld: excb's ResNet stems are 7x7 (torchvision's) or 3x3 (CIFAR)",
                    P, (long long)c1->shape[2], (long long)c1->shape[3]);
    char name[128], widths[128] = "", blocks[128] = "";
    size_t wl = 0, bl = 0;
    int stages = 0, total = 0;
    for (int s = 1; s <= EXCB_MAX_STAGES + 1; s++) {
        snprintf(name, sizeof name, "backbone.layer%d.0.conv1.weight", s);
        if ((code = conv_weight(ix, name, &t, err))) return code;
        if (!t) break;
        if (s > EXCB_MAX_STAGES) return fail(err, EXCB_EXIT_DATA, "%s: more than %d stages (layer%d)", P, EXCB_MAX_STAGES, s);
        int j = 1;
        for (;; j++) {                                 /* the stage's blocks: layerS.0, layerS.1, ... */
            snprintf(name, sizeof name, "backbone.layer%d.%d.conv1.weight", s, j);
            if (!weights_find(ix, name)) break;
            if (total + j >= EXCB_MAX_BLOCKS) return fail(err, EXCB_EXIT_DATA, "%s: more than %d residual blocks", P, EXCB_MAX_BLOCKS);
        }
        total += j;
        wl += snprintf(widths + wl, sizeof widths - wl, "%s%lld", s > 1 ? "," : "", (long long)t->shape[0]);
        bl += snprintf(blocks + bl, sizeof blocks - bl, "%s%d", s > 1 ? "," : "", j);
        stages = s;
    }
    if (!stages) return fail(err, EXCB_EXIT_DATA, "%s: no layer1.0.conv1.weight: not a ResNet state dict excb reads", P);
    const ExcbStTensor *p0 = weights_find(ix, "classifier.projector.mlp.0.weight"),
                       *p6 = weights_find(ix, "classifier.projector.mlp.6.weight"),
                       *cv = weights_find(ix, "classifier.centroid_layer.weight_v");
    *heads = p0 && p6 && p0->ndim == 2 && p6->ndim == 2;
    char hidden[24], d[24], K[24];
    snprintf(hidden, sizeof hidden, "%lld", *heads ? (long long)p0->shape[0] : 0LL);
    snprintf(d, sizeof d, "%lld", *heads ? (long long)p6->shape[0] : 0LL);
    snprintf(K, sizeof K, "%lld", cv && cv->ndim == 2 ? (long long)cv->shape[0] : 0LL);
    const struct { const char *key, *value; int when; } to[] = {
        {"stem", c1->shape[2] == 7 ? "imagenet" : "cifar", 1},
        {"block", weights_find(ix, "backbone.layer1.0.conv3.weight") ? "bottleneck" : "basic", 1},
        {"widths", widths, 1}, {"blocks", blocks, 1},
        {"hidden", hidden, *heads}, {"d", d, *heads}, {"K", K, *heads && cv && cv->ndim == 2},
    };
    for (size_t i = 0; i < sizeof to / sizeof to[0]; i++) {
        char why[EXCB_ERR_LEN];
        if (to[i].when && excb_config_set(rc, to[i].key, to[i].value, why))
            return fail(err, EXCB_EXIT_DATA, "%s: the network read off its names does not fit excb: %s", P, why);
    }
    return 0;
}

/* an F32 tensor of the file into dst (n values), after checking its dtype and shape against e */
static int weights_copy(const char *P, const ExcbStTensor *t, const WeightEntry *e, real *dst, char *err) {
    int same = t->ndim == e->ndim;
    for (int j = 0; same && j < e->ndim; j++) same = t->shape[j] == e->shape[j];
    if (e->kind == W_BATCHES) {                    /* an integer scalar; excb's BN has no use for it */
        if (t->numel != 1 || (t->dtype != EXCB_ST_I64 && t->dtype != EXCB_ST_I32))
            return fail(err, EXCB_EXIT_DATA, "%s: %s is not an integer scalar (I64 in PyTorch's state dicts)", P, t->name);
        return 0;
    }
    if (t->dtype != EXCB_ST_F32)
        return fail(err, EXCB_EXIT_DATA, "%s: %s is %s; excb reads F32 weights (convert them first, e.g. .float())", P,
                    t->name, excb_st_dtypes[t->dtype].name);
    if (!same) {
        char want[160], got[160];
        return fail(err, EXCB_EXIT_DATA, "%s: %s has shape %s, the model's %s is %s", P, t->name,
                    shape_text(t->shape, t->ndim, got, sizeof got), e->name, shape_text(e->shape, e->ndim, want, sizeof want));
    }
    for (size_t j = 0; j < e->numel; j++) {
        float v;
        memcpy(&v, t->data + 4 * j, 4);            /* the file's data need not be aligned */
        if (e->kind == W_GAIN) {
            if (v != 1.0f)
                return fail(err, EXCB_EXIT_DATA, "%s: %s[%zu] = %g: excb's prototypes have the gain g = 1 (weight_g frozen at 1)",
                            P, t->name, j, (double)v);
        } else dst[j] = (real)v;
    }
    return 0;
}

/* The model the config makes, against the file: every backbone tensor (and the heads, when the file
   has them) comes from the file, so a model that needs far more floats than the file holds comes from
   shapes that contradict each other. Checked before anything is allocated. */
static int weights_fit_file(const ExcbSafetensors *st, const ExcbConfig *cfg, int heads, char *err) {
    ExcbConfig c = *cfg;
    if (!heads) { c.hidden = 1; c.d = 1; c.K = 2; }       /* the backbone alone, near enough */
    ExcbMemoryPlan mp;
    if (excb_memory_plan(&c, &mp)) return fail(err, EXCB_EXIT_DATA, "%s: its network does not make an excb model", st->path);
    uint64_t need = mp.params / (4 * sizeof(real)), have = 0;
    for (int i = 0; i < st->n; i++) have += st->t[i].bytes / 4;
    if (need > 2 * have + (1 << 20))
        return fail(err, EXCB_EXIT_DATA, "%s: the network its names describe has %llu parameters, the file holds %llu values: "
                    "its shapes contradict each other", st->path, (unsigned long long)need, (unsigned long long)have);
    return 0;
}

/* the file's tensors of the set that the model did not take (used[i] = 0), named on stderr: ten of
   them, then a count; returns how many */
static int weights_report_ignored(const WeightIndex *ix, const uint8_t *used) {
    int ignored = 0;
    for (int i = 0; i < ix->n; i++) {
        if (used[ix->w[i].tensor]) continue;
        if (ignored < 10) fprintf(stderr, "%s%s", ignored ? ", " : "excb: not in the model, ignored: ", ix->st->t[ix->w[i].tensor].name);
        ignored++;
    }
    if (ignored > 10) fprintf(stderr, " and %d more", ignored - 10);
    if (ignored) fprintf(stderr, " (%s)\n", ix->st->path);
    return ignored;
}

/* the base preset of a file without excb's config: the data set its stem and channels suggest */
static const char *weights_preset(int in_ch, int imagenet_stem) {
    return in_ch == 1 ? "fashion-mnist" : imagenet_stem ? "imagenet-r50" : "cifar10-r18";
}

/* the set of a file ("teacher", "student" or "" when it has no such prefixes) for `which` */
static int weights_set(const ExcbSafetensors *st, const char *which, char *set, char *err) {
    int has[2] = {0, 0};
    for (int i = 0; i < st->n; i++) {
        has[0] |= !strncmp(st->t[i].name, "teacher.", 8);
        has[1] |= !strncmp(st->t[i].name, "student.", 8);
    }
    if (which && strcmp(which, "teacher") && strcmp(which, "student"))
        return fail(err, EXCB_EXIT_USAGE, "the network is 'teacher' or 'student', not '%s'", which);
    if (!has[0] && !has[1]) {
        if (which) fprintf(stderr, "excb: %s has no teacher./student. sets: its one network is read\n", st->path);
        set[0] = 0;
        return 0;
    }
    const char *pick = which ? which : has[0] ? "teacher" : "student";
    if (!has[!strcmp(pick, "student") ? 1 : 0]) return fail(err, EXCB_EXIT_DATA, "%s: no tensor begins with '%s.'", st->path, pick);
    sprintf(set, "%s.", pick);
    return 0;
}

int excb_weights_load(const char *path, const char *which, ExcbSettingsHook hook, void *ctx, ExcbRunConfig *rc,
                      ExcbModel *m, ExcbWeightsInfo *info, char *err) {
    ExcbSafetensors st;
    WeightIndex ix = {0};
    memset(info, 0, sizeof *info);
    memset(m, 0, sizeof *m);
    memset(rc, 0, sizeof *rc);
    char set[16];
    int code = excb_safetensors_open(&st, path, err);
    if (code) return code;
    if (!(code = weights_set(&st, which, set, err))) code = weight_index(&ix, &st, set, err);
    if (code) { excb_safetensors_close(&st); return code; }
    snprintf(info->set, sizeof info->set, "%.*s", set[0] ? (int)strlen(set) - 1 : 0, set);
    /* the config: excb's own (an excb export), else read off the names and shapes; the channels from
       the stem either way (a run's config takes them from its data) */
    const char *text = excb_safetensors_meta(&st, "excb.config");
    const ExcbStTensor *c1;
    int heads = 0;
    info->from_excb = text != NULL;
    code = conv_weight(&ix, "backbone.conv1.weight", &c1, err);
    if (!code && c1 && c1->shape[1] != 1 && c1->shape[1] != 3)
        code = fail(err, EXCB_EXIT_DATA, "%s: %s takes %lld input channels; excb's images have 1 or 3", path, c1->name,
                    (long long)c1->shape[1]);
    int in_ch = c1 ? (int)c1->shape[1] : 3;
    if (!code && text) {
        code = excb_config_parse(rc, text, path, err);
        heads = weights_find(&ix, "classifier.projector.mlp.0.weight") != NULL;
    } else if (!code) {
        excb_preset(rc, weights_preset(in_ch, c1 && c1->shape[2] == 7), err);
        rc->model.batch = 16;          /* the evaluation's forwards take 2 x 16 images; any B would do */
        code = weights_infer_config(&ix, rc, &heads, err);
    }
    rc->model.in_ch = in_ch;
    if (!code && hook) code = hook(rc, ctx, err);          /* the command line's settings, last */
    if (!code) code = excb_config_validate(rc, err);
    if (!code) code = weights_fit_file(&st, &rc->model, heads, err);
    if (!code && excb_build(m, &rc->model)) code = fail(err, EXCB_EXIT_CONFIG, "%s: its config does not build a model", path);
    if (code) { weight_index_free(&ix); excb_safetensors_close(&st); return code; }
    /* every tensor the model needs from the file (the heads only when it has them: otherwise they keep
       their seeded initialisation), into the student and the teacher alike */
    WeightEntry *w;
    int n = weight_entries(m, &w), missing = 0;
    uint8_t *used = xcalloc(st.n + 1, 1);
    char first_missing[128] = "";
    for (int i = 0; i < n && !code; i++) {
        if (!heads && !is_backbone_name(w[i].name)) continue;
        const ExcbStTensor *t = weights_find(&ix, w[i].name);
        if (!t) {
            if (w[i].kind == W_BATCHES || w[i].kind == W_GAIN) continue;   /* optional: constants */
            if (!missing++) snprintf(first_missing, sizeof first_missing, "%s", w[i].name);
            continue;
        }
        real *dst = weight_place(m, 0, &w[i]);
        if ((code = weights_copy(path, t, &w[i], dst, err))) break;
        used[t - st.t] = 1;
        info->matched++;
        if (dst) memcpy(weight_place(m, 1, &w[i]), dst, sizeof(real) * w[i].numel);
    }
    if (!code && missing)
        code = fail(err, EXCB_EXIT_DATA, "%s: %d tensor%s of the model %s not in the file, the first: %s (as excb names it)",
                    path, missing, missing > 1 ? "s" : "", missing > 1 ? "are" : "is", first_missing);
    const char *step = excb_safetensors_meta(&st, "excb.step");
    char *end = NULL;
    long steps = step ? strtol(step, &end, 10) : 0;
    if (!code && step && (end == step || *end || steps < 0))
        code = fail(err, EXCB_EXIT_DATA, "%s: __metadata__ excb.step '%s' is not a step count", path, step);
    if (!code) {
        info->ignored = weights_report_ignored(&ix, used);
        info->heads = heads;
        m->step = steps;
        memset(m->momentum, 0, sizeof(real) * m->n_params);
    }
    free(used);
    free(w);
    weight_index_free(&ix);
    excb_safetensors_close(&st);
    if (code) excb_free(m);
    return code;
}

/* ================================================================================================
 * 17. Training: the run directory, metrics, progress, the divergence guard, the loop
 * ================================================================================================
 * A run directory holds:
 *   config.txt          the resolved config (a config file: `excb train --config DIR/config.txt` reruns it)
 *   metrics.jsonl       a "run" header record, then "step", "epoch", "eval" and (on failure) "diverged"
 *                       records, one JSON object per line, flushed per line. Fields that depend on the
 *                       machine's speed sit in one trailing "wall" object; everything else is a function
 *                       of the config and reproduces bit for bit (and across a resume).
 *   ckpt-NNNNNNNNNN.excb the newest `keep` checkpoints, NNNNNNNNNN = steps done
 *   eval.json           the final evaluation
 *   diverged-STEP.txt   only after a divergence: the step's diagnostics and its sample indices
 *   lock                held (flock) by the one excb process working in the directory; it holds that
 *                       process's pid. The kernel releases the lock when the process ends, however it
 *                       ends (kill -9 included), so a stale file never blocks a later run.
 * Every write is checked: a metrics record, a checkpoint, config.txt or eval.json that cannot be
 * written stops the run with exit 74 and the path, before a checkpoint could record a metrics length
 * that is not on disk. SIGINT, SIGTERM and SIGHUP stop the run at the end of the step in progress (in
 * the final evaluation, at the linear probe's next epoch) with a checkpoint of that step and exit
 * 128 + the signal; a second signal kills the process by that signal, after removing the checkpoint
 * file being written, if any.
 */
typedef struct {
    char dir[4096];
    FILE *metrics;
    int metrics_errno;         /* the first failed write to metrics.jsonl (0: none)                   */
    int tty, quiet;
    int writer;                /* 1: this rank writes the run directory (rank 0; section 10b)        */
    double t_start;
    long step_start;
} Run;

/* --- one process per run directory ------------------------------------------------------------------
 * An exclusive flock on DIR/lock, held until the process ends. A second process (a second `train`, a
 * `--resume` of a live run) is refused with exit 75 before it touches anything: it would otherwise
 * delete the first one's checkpoint in progress and interleave its records with the first one's.
 * create = 0 only probes: it takes the lock if the file is there (and leaves the file as it is);
 * create = 1, once the run goes ahead, creates the file if needed and writes this process's pid. */
int excb_lock_run_dir(const char *dir, int create, int *fd, char *err) {
    char path[4200];
    snprintf(path, sizeof path, "%s/lock", dir);
    if (*fd < 0) {
        *fd = open(path, O_RDWR | O_CLOEXEC | O_NOFOLLOW | (create ? O_CREAT : 0), 0666);
        if (*fd < 0 && !create && errno == ENOENT) return 0;        /* no lock file: no live run */
        if (*fd < 0) return fail(err, EXCB_EXIT_CANTCREAT, "cannot create %s: %s", path, strerror(errno));
        if (flock(*fd, LOCK_EX | LOCK_NB)) {
            int busy = errno == EWOULDBLOCK, e = errno;
            char pid[32] = "";
            ssize_t n = busy ? pread(*fd, pid, sizeof pid - 1, 0) : 0;
            pid[n > 0 ? n : 0] = 0;
            pid[strcspn(pid, "\n")] = 0;
            close(*fd);
            *fd = -1;
            if (!busy) return fail(err, EXCB_EXIT_IO, "cannot lock %s: %s", path, strerror(e));
            return fail(err, EXCB_EXIT_TEMPFAIL, "%s is in use by another excb process (pid %s holds %s); nothing "
                        "was changed: wait for it to finish, or stop it (SIGINT saves a checkpoint)", dir, pid[0] ? pid : "?", path);
        }
    }
    if (!create) return 0;
    char pid[32];
    int len = snprintf(pid, sizeof pid, "%ld\n", (long)getpid());
    if (ftruncate(*fd, 0) || pwrite(*fd, pid, len, 0) != len) return fail(err, EXCB_EXIT_IO, "writing %s failed: %s", path, strerror(errno));
    return 0;                            /* *fd stays open (and locked) until the process ends */
}

/* --- signals ------------------------------------------------------------------------------------------
 * The handler only records the signal; the loop stops after the step in progress. A second signal ends
 * the process at once, after removing the temporary file of the write in progress (tmp_begin, section
 * 16). */
/* (stop_signal, the first one, is declared with the ranks before section 15: they agree on it) */
static atomic_int signals_seen;                  /* every thread may take a signal: counted atomically */

/* lock-free atomics, unlink, write, sigaction, sigprocmask and raise: all async-signal-safe */
static void on_stop_signal(int sig) {
    if (atomic_fetch_add(&signals_seen, 1) > 0) {
        static const char msg[] = "\nexcb train: a second signal: exiting now; the newest complete checkpoint is kept\n";
        if (atomic_load_explicit(&tmp_in_flight, memory_order_acquire)) unlink(tmp_path);
        if (write(STDERR_FILENO, msg, sizeof msg - 1) < 0) { /* nothing left to tell */ }
        /* die of the signal itself: the parent sees "killed by SIGINT", not the 130 of a clean stop */
        struct sigaction dfl = {.sa_handler = SIG_DFL};
        sigemptyset(&dfl.sa_mask);
        sigaction(sig, &dfl, NULL);
        sigset_t one;
        sigemptyset(&one);
        sigaddset(&one, sig);
        sigprocmask(SIG_UNBLOCK, &one, NULL);
        raise(sig);
        _exit(EXCB_EXIT_SIGNAL + sig);                  /* not reached */
    }
    atomic_store(&stop_signal, sig);
}

static const char *signal_name(int sig) { return sig == SIGINT ? "SIGINT" : sig == SIGTERM ? "SIGTERM" : sig == SIGHUP ? "SIGHUP" : "a signal"; }

static void path_in(char *out, size_t cap, const char *dir, const char *name) { snprintf(out, cap, "%s/%s", dir, name); }

/* mkdir -p */
static int mkdir_p(const char *dir, char *err) {
    char p[4096];
    snprintf(p, sizeof p, "%s", dir);
    for (char *s = p + 1; *s; s++)
        if (*s == '/') {
            *s = 0;
            if (mkdir(p, 0777) && errno != EEXIST) return fail(err, EXCB_EXIT_CANTCREAT, "cannot create %s: %s", p, strerror(errno));
            *s = '/';
        }
    if (mkdir(p, 0777) && errno != EEXIST) return fail(err, EXCB_EXIT_CANTCREAT, "cannot create %s: %s", p, strerror(errno));
    struct stat st;
    if (stat(p, &st) || !S_ISDIR(st.st_mode)) return fail(err, EXCB_EXIT_CANTCREAT, "%s is not a directory", p);
    return 0;
}

static int cmp_long_desc(const void *a, const void *b) {
    long x = *(const long *)a, y = *(const long *)b;
    return (x < y) - (x > y);
}

/* the steps of the checkpoints in dir, newest first; removes leftover *.tmp files of a killed write */
static int list_checkpoints(const char *dir, long *steps, int max, int clean_tmp) {
    DIR *d = opendir(dir);
    if (!d) return 0;
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d))) {
        long step;
        char tail[8];
        size_t len = strlen(e->d_name);
        if (clean_tmp && len > 4 && !strcmp(e->d_name + len - 4, ".tmp") && !strncmp(e->d_name, "ckpt-", 5)) {
            char p[4400];
            path_in(p, sizeof p, dir, e->d_name);
            unlink(p);
            continue;
        }
        if (len == 20 && sscanf(e->d_name, "ckpt-%10ld%5s", &step, tail) == 2 && !strcmp(tail, ".excb") && n < max)
            steps[n++] = step;
    }
    closedir(d);
    qsort(steps, n, sizeof(long), cmp_long_desc);
    return n;
}

static void ckpt_path(char *out, size_t cap, const char *dir, long step) { snprintf(out, cap, "%s/ckpt-%010ld.excb", dir, step); }

/* The newest checkpoint of dir that verifies; damaged newer ones are reported and skipped (a crash
   cannot make one, but a disk can). 0, or EXCB_EXIT_NOINPUT when there is none. */
int excb_find_checkpoint(const char *dir, char *path, size_t cap, int verbose, char *err) {
    long steps[4096];
    int n = list_checkpoints(dir, steps, 4096, 0);
    for (int i = 0; i < n; i++) {
        ckpt_path(path, cap, dir, steps[i]);
        CkFile ck;
        if (!ck_open(path, &ck, err)) { ck_close(&ck); return 0; }
        if (verbose) fprintf(stderr, "excb: skipping %s\n", err);
    }
    return fail(err, EXCB_EXIT_NOINPUT, "%s: no usable checkpoint (ckpt-*.excb)", dir);
}

/* JSON numbers: non-finite values become null (JSON has no NaN) */
static void jnum(FILE *f, const char *key, double v) {
    if (isfinite(v)) fprintf(f, ",\"%s\":%.9g", key, v);
    else fprintf(f, ",\"%s\":null", key);
}

/* a record's end, flushed; the first failure is kept in r->metrics_errno, and metrics_check turns it
   into exit 74 at the next point where the run can stop cleanly */
static void metrics_end(Run *r, double extra_seconds, double img_per_s) {
    fprintf(r->metrics, ",\"wall\":{\"seconds\":%.3f,\"img_per_s\":%.2f}}\n", extra_seconds, img_per_s);
    if ((fflush(r->metrics) || ferror(r->metrics)) && !r->metrics_errno) r->metrics_errno = errno ? errno : EIO;
}

static int metrics_check(const Run *r, char *err) {
    if (!r->metrics_errno) return 0;
    return fail(err, EXCB_EXIT_IO, "writing %s/metrics.jsonl failed: %s (the newest checkpoint is intact; free "
                "space, then continue with --resume)", r->dir, strerror(r->metrics_errno));
}

static double elapsed_img_per_s(const Run *r, long step, int B) {
    double dt = now_seconds() - r->t_start;
    return dt > 0 ? (double)(step - r->step_start) * B / dt : 0;
}

/* the progress line: a bar with ETA on a terminal, otherwise one plain line every tenth of an epoch */
static void progress(const Run *r, long step, long total, long bpe, const ExcbStepStats *st, int B, int force_line) {
    if (r->quiet) return;
    double ips = elapsed_img_per_s(r, step, B), eta = ips > 0 ? (double)(total - step) * B / ips : 0;
    long epoch = (step - 1) / bpe, in_epoch = (step - 1) % bpe + 1, epochs = total / bpe;
    if (r->tty) {
        char bar[21];
        int filled = (int)(20 * in_epoch / bpe);
        for (int i = 0; i < 20; i++) bar[i] = i < filled ? '#' : '.';
        bar[20] = 0;
        fprintf(stderr, "\r\033[Kepoch %ld/%ld [%s] step %ld/%ld loss %.4f distinct %d | %.0f img/s | ETA %ldh%02ldm%02lds",
                epoch + 1, epochs, bar, step, total, st->loss, st->unique_labels, ips, (long)eta / 3600,
                ((long)eta / 60) % 60, (long)eta % 60);
        if (force_line) fputc('\n', stderr);
        fflush(stderr);
    } else {
        long every = bpe / 10 > 0 ? bpe / 10 : 1;
        if (force_line || in_epoch % every == 0)
            fprintf(stderr, "excb train: epoch %ld/%ld step %ld/%ld loss %.4f distinct %d lr %.4g | %.0f img/s | ETA %.0f s\n",
                    epoch + 1, epochs, step, total, st->loss, st->unique_labels, st->lr, ips, eta);
    }
}

/* --- evaluation sets: the labelled bank and query splits, with their labels --------------------- */
typedef struct {
    ExcbDataset bank, query;
    int has_query;
} EvalSets;

static int open_eval_sets(const ExcbRunConfig *rc, EvalSets *es, char *err) {
    memset(es, 0, sizeof *es);
    int code = excb_data_open(&es->bank, rc->data, rc->bank_split, err);
    if (code) return code;
    if ((code = excb_data_open(&es->query, rc->data, rc->query_split, err))) { excb_data_close(&es->bank); return code; }
    es->has_query = 1;
    ExcbDataset *sets[2] = {&es->bank, &es->query};
    /* labels are class indices: two image folders must name the same classes in the same order, or
       the k-NN and the probe would compare unrelated classes by index */
    if (es->bank.kind == EXCB_DATA_FOLDER && es->query.kind == EXCB_DATA_FOLDER) {
        int same = es->bank.n_classes == es->query.n_classes;
        for (int c = 0; same && c < es->bank.n_classes && es->bank.class_names && es->query.class_names; c++)
            same = !strcmp(es->bank.class_names[c], es->query.class_names[c]);
        if (!same) {
            char a[600] = "", b[600] = "";
            for (int c = 0; c < es->bank.n_classes && es->bank.class_names && strlen(a) < 500; c++)
                snprintf(a + strlen(a), sizeof a - strlen(a), c ? ", %s" : "%s", es->bank.class_names[c]);
            for (int c = 0; c < es->query.n_classes && es->query.class_names && strlen(b) < 500; c++)
                snprintf(b + strlen(b), sizeof b - strlen(b), c ? ", %s" : "%s", es->query.class_names[c]);
            code = fail(err, EXCB_EXIT_DATA, "%s: the %s split's classes {%s} and the %s split's {%s} differ: the "
                            "evaluation compares labels by class, so both need the same class folders", es->bank.path,
                            es->bank.split, a, es->query.split, b);
            excb_data_close(&es->bank); excb_data_close(&es->query);
            return code;
        }
    }
    for (int s = 0; s < 2 && rc->skip_bad; s++) {        /* a skip holds for the evaluation as well */
        sets[s]->skip_bad = 1;
        sets[s]->bad = xcalloc(sets[s]->n ? sets[s]->n : 1, 1);
    }
    for (int s = 0; s < 2; s++) {
        const ExcbDataset *ds = sets[s];
        int ok = ds->labels && ds->n_classes > 0;
        for (long i = 0; ok && i < ds->n; i++) ok = ds->labels[i] >= 0;
        if (!ok) {
            code = fail(err, EXCB_EXIT_DATA, "%s (%s split): evaluation needs every image labelled", ds->path, ds->split);
            excb_data_close(&es->bank); excb_data_close(&es->query);      /* after the message: it names them */
            return code;
        }
    }
    return 0;
}

static void close_eval_sets(EvalSets *es) {
    excb_data_close(&es->bank);
    if (es->has_query) excb_data_close(&es->query);
}

typedef struct {
    long n_bank, n_query;          /* the images evaluated, after bad ones were skipped               */
    long skipped_bank, skipped_query;   /* bad images skipped (skip_bad), dropped from every measure */
    int n_ks;
    double top1[EXCB_MAX_KS], top5[EXCB_MAX_KS];
    int probed, clustered;
    double probe_test, probe_train;
    ExcbClusterScores clusters;
    double seconds;
} EvalResult;

/* mean-centring: the bank's mean row, subtracted from every bank and query row */
static void subtract_mean_row(real *bank, long nb, real *query, long nq, int D) {
    double *mean = xcalloc(D, sizeof(double));
    for (long i = 0; i < nb; i++)
        for (int j = 0; j < D; j++) mean[j] += bank[(size_t)i * D + j];
    for (int j = 0; j < D; j++) mean[j] /= nb;
    for (long i = 0; i < nb; i++)
        for (int j = 0; j < D; j++) bank[(size_t)i * D + j] -= (real)mean[j];
    for (long i = 0; i < nq; i++)
        for (int j = 0; j < D; j++) query[(size_t)i * D + j] -= (real)mean[j];
    free(mean);
}

/* the rows of images marked bad in ds->bad removed from idx, feat (n x D) and assign; how many */
static long drop_bad_rows(const ExcbDataset *ds, long *idx, long *n, real *feat, int D, int32_t *assign) {
    if (!ds->bad) return 0;
    long kept = 0;
    for (long r = 0; r < *n; r++) {
        if (ds->bad[idx[r]]) continue;
        if (kept != r) {
            idx[kept] = idx[r];
            memmove(feat + (size_t)kept * D, feat + (size_t)r * D, sizeof(real) * D);
            if (assign) assign[kept] = assign[r];
        }
        kept++;
    }
    long dropped = *n - kept;
    *n = kept;
    return dropped;
}

/* k-NN on (subsets of) the bank and query splits; `what` adds the linear probe (EVAL_PROBE) and the
   clustering metrics of the query split (EVAL_CLUSTERS; of a model with prototypes). m = NULL: the same measures on the mean-centred pixels
   (excb_pixel_features), without clusters. */
enum { EVAL_KNN = 0, EVAL_PROBE = 1, EVAL_CLUSTERS = 2, EVAL_FULL = 3 };   /* evaluate()'s `what` */
static int evaluate(ExcbModel *m, const ExcbRunConfig *rc, EvalSets *es, long bank_max, long query_max, int what,
                    int teacher, EvalResult *res, char *err) {
    double t0 = now_seconds();
    memset(res, 0, sizeof *res);
    ExcbViewConfig vc;
    const ExcbConfig *cfg = m ? &m->cfg : &rc->model;
    excb_view_config_for(&vc, cfg, rc->epochs, rc->blur);
    long nb, nq;
    long *ib = subset(es->bank.n, bank_max, &nb), *iq = subset(es->query.n, query_max, &nq);
    int D = m ? m->D : cfg->in_ch * cfg->global_size * cfg->global_size;
    int C = es->bank.n_classes > es->query.n_classes ? es->bank.n_classes : es->query.n_classes;
    real *fb = xmalloc(sizeof(real) * nb * D), *fq = xmalloc(sizeof(real) * nq * D);
    int32_t *yb = xmalloc(sizeof(int32_t) * nb), *yq = xmalloc(sizeof(int32_t) * nq);
    int32_t *aq = (what & EVAL_CLUSTERS) && m && m->n_protos ? xmalloc(sizeof(int32_t) * nq) : NULL;
    int code;
    if (m) {
        code = excb_extract_features(m, teacher, &es->bank, &vc, ib, nb, fb, NULL, err);
        if (!code) code = excb_extract_features(m, teacher, &es->query, &vc, iq, nq, fq, aq, err);
    } else {
        code = excb_pixel_features(&es->bank, &vc, cfg->in_ch, ib, nb, fb, err);
        if (!code) code = excb_pixel_features(&es->query, &vc, cfg->in_ch, iq, nq, fq, err);
    }
    if (!code) {
        /* bad images (skip_bad) leave the bank and the queries; kept rows move up in order */
        res->skipped_bank = drop_bad_rows(&es->bank, ib, &nb, fb, D, NULL);
        res->skipped_query = drop_bad_rows(&es->query, iq, &nq, fq, D, aq);
        if (!nb || !nq) code = fail(err, EXCB_EXIT_DATA, "%s: every image of the %s split was bad", es->bank.path,
                                    !nb ? es->bank.split : es->query.split);
    }
    for (long i = 0; !code && i < (nb > nq ? nb : nq) * (long)D; i++)   /* NaN features would vote for anything */
        if ((i < nb * D && !isfinite(fb[i])) || (i < nq * D && !isfinite(fq[i])))
            code = fail(err, EXCB_EXIT_DATA, "the features of %s image %ld are not finite (NaN or Inf): the network's weights "
                        "or BatchNorm statistics are not", i < nb * D && !isfinite(fb[i]) ? "bank" : "query", i / D);
    if (!code && !m) subtract_mean_row(fb, nb, fq, nq, D);
    if (!code) {
        for (long i = 0; i < nb; i++) yb[i] = es->bank.labels[ib[i]];
        for (long i = 0; i < nq; i++) yq[i] = es->query.labels[iq[i]];
        res->n_bank = nb;
        res->n_query = nq;
        res->n_ks = rc->n_knn_ks;
        excb_knn(fb, yb, nb, fq, yq, nq, D, C, rc->knn_ks, rc->n_knn_ks, rc->knn_t, res->top1, res->top5);
        if (what & EVAL_PROBE) {
            res->probed = 1;
            res->probe_test = excb_linear_probe(fb, yb, nb, fq, yq, nq, D, C, rc->probe_epochs, rc->probe_batch,
                                                rc->probe_lr, rc->probe_wd, cfg->seed, &res->probe_train);
            /* a run asked to stop (section 17): the probe stopped at its next epoch, so the full
               evaluation is dropped; the epochs' short k-NN (EVAL_KNN) runs to its end, so that an
               epoch's record and its checkpoint stay one unit */
            if (stop_signal) code = EXCB_EXIT_SIGNAL + stop_signal;
            if (aq) {
                res->clustered = 1;
                excb_cluster_scores(aq, yq, nq, cfg->K, C, &res->clusters);
            }
        }
    }
    res->seconds = now_seconds() - t0;
    free(ib); free(iq); free(fb); free(fq); free(yb); free(yq); free(aq);
    return code;
}

/* the evaluation, printed with every knob that produced it (stdout), and as one JSON object */
static void print_eval(FILE *f, const ExcbModel *m, const ExcbRunConfig *rc, const EvalSets *es, const EvalResult *r, int teacher) {
    const ExcbConfig *cfg = m ? &m->cfg : &rc->model;
    const char *view = es->bank.height == cfg->global_size ? "the whole image" : "resize short side to G*256/224, centre crop";
    if (m)
        fprintf(f, "features: %s backbone, pooled (D = %d), BatchNorm running statistics, evaluation view %dx%d "
                "(%s), step %ld\n", teacher ? "teacher" : "student", m->D, cfg->global_size, cfg->global_size, view, m->step);
    else
        fprintf(f, "features: the pixels of the evaluation view %dx%d (%s; D = %d), normalised, minus the bank's mean image\n",
                cfg->global_size, cfg->global_size, view, cfg->in_ch * cfg->global_size * cfg->global_size);
    fprintf(f, "k-NN: cosine on L2-normalised features, vote weight exp(sim/T), T = %g; bank %s (%s) %ld images, "
            "queries %s %ld images, %d classes\n", rc->knn_t, es->bank.path, es->bank.split, r->n_bank,
            es->query.split, r->n_query, es->bank.n_classes);
    if (r->skipped_bank || r->skipped_query)
        fprintf(f, "  bad images skipped (skip_bad), left out of every measure: %ld of the bank, %ld of the queries\n",
                r->skipped_bank, r->skipped_query);
    for (int j = 0; j < r->n_ks; j++)
        fprintf(f, "  k = %3d   top-1 %6.2f %%   top-5 %6.2f %%\n", rc->knn_ks[j], r->top1[j], r->top5[j]);
    if (r->probed) {
        fprintf(f, "linear probe: standardised frozen features, softmax regression, SGD momentum 0.9, lr %g cosine "
                "to 0, wd %g, batch %d, %d epochs, no augmentation, seed %llu: test top-1 %.2f %% (train %.2f %%), "
                "last epoch\n", rc->probe_lr, rc->probe_wd, rc->probe_batch, rc->probe_epochs,
                (unsigned long long)cfg->seed, r->probe_test, r->probe_train);
    }
    if (r->clustered) {
        const ExcbClusterScores *c = &r->clusters;
        fprintf(f, "clusters: %s centroids (K = %d), each query's argmax cosine, no balancing; %ld queries, %d "
                "clusters used: NMI %.4f  AMI %.4f  ARI %.4f  many-to-one acc %.2f %%  Hungarian acc %s\n",
                teacher ? "teacher" : "student", m->cfg.K, r->n_query, c->used_clusters, c->nmi, c->ami, c->ari,
                100 * c->acc_many_to_one, isnan(c->acc_hungarian) ? "n/a (K != classes)" : "");
        if (!isnan(c->acc_hungarian)) fprintf(f, "  Hungarian-matched acc %.2f %%\n", 100 * c->acc_hungarian);
    }
    fprintf(f, "evaluation time %.1f s\n", r->seconds);
}

static void eval_json(FILE *f, const ExcbRunConfig *rc, const EvalResult *r) {
    fprintf(f, "\"n_bank\":%ld,\"n_query\":%ld,\"skipped_bank\":%ld,\"skipped_query\":%ld,\"knn_t\":%g", r->n_bank,
            r->n_query, r->skipped_bank, r->skipped_query, rc->knn_t);
    char key[32];
    for (int j = 0; j < r->n_ks; j++) {
        snprintf(key, sizeof key, "knn_top1_k%d", rc->knn_ks[j]); jnum(f, key, r->top1[j]);
        snprintf(key, sizeof key, "knn_top5_k%d", rc->knn_ks[j]); jnum(f, key, r->top5[j]);
    }
    if (r->probed) {
        jnum(f, "probe_test_top1", r->probe_test);
        jnum(f, "probe_train_top1", r->probe_train);
    }
    if (r->clustered) {
        jnum(f, "nmi", r->clusters.nmi);
        jnum(f, "ami", r->clusters.ami);
        jnum(f, "ari", r->clusters.ari);
        jnum(f, "acc_many_to_one", r->clusters.acc_many_to_one);
        jnum(f, "acc_hungarian", r->clusters.acc_hungarian);
        fprintf(f, ",\"clusters_used\":%d", r->clusters.used_clusters);
    }
}

/* --- the divergence guard ------------------------------------------------------------------------- */

static int diverged(Run *r, const ExcbModel *m, const int64_t *index, int B, long epoch, double loss, double gnorm,
                    const char *what, long last_ckpt, int writer, char *err) {
    fprintf(r->metrics, "{\"type\":\"diverged\",\"step\":%ld,\"epoch\":%ld,\"what\":\"%s\"", m->step, epoch, what);
    jnum(r->metrics, "loss", loss);
    jnum(r->metrics, "grad_norm", gnorm);
    fprintf(r->metrics, ",\"last_checkpoint_step\":%ld", last_ckpt);
    metrics_end(r, now_seconds() - r->t_start, 0);
    char path[4200], name[64], why[EXCB_ERR_LEN] = "";
    snprintf(name, sizeof name, "diverged-%ld.txt", m->step);
    path_in(path, sizeof path, r->dir, name);
    char *text = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&text, &len);
    fprintf(f, "step %ld (0-based), epoch %ld: %s (loss %g, gradient norm %g)\nlast good checkpoint: step %ld\n"
            "data set indices of the batch's %d images:\n", m->step, epoch, what, loss, gnorm, last_ckpt, B);
    for (int i = 0; i < B; i++) fprintf(f, "%lld\n", (long long)index[i]);
    fclose(f);
    int written = writer ? !write_text_atomic(path, text, why) : 1;  /* rank 0 writes; the others say where */
    free(text);
    return fail(err, EXCB_EXIT_DIVERGED, "step %ld: %s (loss %g, gradient norm %g); nothing of this step was saved, "
                "the last good checkpoint is step %ld; %s%s", m->step, what, loss, gnorm, last_ckpt,
                written ? "the batch's images are listed in " : "the batch's images could not be listed: ", written ? path : why);
}

/* keep the newest `keep` checkpoints */
static void prune_checkpoints(const char *dir, int keep) {
    long steps[4096];
    int n = list_checkpoints(dir, steps, 4096, 0);
    for (int i = keep; i < n; i++) {
        char p[4200];
        ckpt_path(p, sizeof p, dir, steps[i]);
        unlink(p);
    }
}

static int save_checkpoint(Run *r, const ExcbModel *m, ExcbTrainState *ts, const char *config_text, int keep, char *err) {
    if (!r->writer) return 0;            /* another rank's process: rank 0 writes the run's checkpoints */
    if (fflush(r->metrics) && !r->metrics_errno) r->metrics_errno = errno ? errno : EIO;
    int code = metrics_check(r, err);    /* a checkpoint must never count metrics bytes that are not there */
    if (code) return code;
    ts->metrics_bytes = ftell(r->metrics);
    char p[4200];
    ckpt_path(p, sizeof p, r->dir, m->step);
    code = excb_checkpoint_save(p, m, ts, config_text, err);
    if (!code) prune_checkpoints(r->dir, keep);
    return code;
}

static void epoch_record(Run *r, const ExcbModel *m, const ExcbTrainState *ts, long epoch, const EvalResult *knn,
                         const ExcbRunConfig *rc, double epoch_seconds) {
    const double *a = ts->acc;
    int K = m->n_labels;                       /* the labels' range (K; CoKe: head 0's; mvbt: none) */
    double n = a[EXCB_ACC_STEPS] > 0 ? a[EXCB_ACC_STEPS] : 1, total = 0, h = 0;
    long empty = 0, cmin = -1, cmax = 0;
    for (int k = 0; k < K; k++) total += ts->epoch_counts[k];
    for (int k = 0; k < K; k++) {
        long c = ts->epoch_counts[k];
        empty += c == 0;
        cmin = cmin < 0 || c < cmin ? c : cmin;
        cmax = c > cmax ? c : cmax;
        if (c > 0) h -= c / total * log(c / total);
    }
    fprintf(r->metrics, "{\"type\":\"epoch\",\"epoch\":%ld,\"step\":%ld", epoch, m->step);
    jnum(r->metrics, "loss", a[EXCB_ACC_LOSS] / n);
    jnum(r->metrics, "teacher_conf", a[EXCB_ACC_TCONF] / n);
    jnum(r->metrics, "student_conf", a[EXCB_ACC_SCONF] / n);
    jnum(r->metrics, "distinct_per_batch", a[EXCB_ACC_UNIQUE] / n);
    jnum(r->metrics, "changed_labels", a[EXCB_ACC_SEEN] > 0 ? a[EXCB_ACC_CHANGED] / a[EXCB_ACC_SEEN] : NAN);
    jnum(r->metrics, "assign_entropy", a[EXCB_ACC_ENTROPY] / n);
    if (K) {                                   /* a method without labels (mvbt) has no clusters */
        fprintf(r->metrics, ",\"empty_clusters\":%ld,\"cluster_size_min\":%ld,\"cluster_size_max\":%ld", empty, cmin, cmax);
        jnum(r->metrics, "label_entropy_norm", h / log(K));
    }
    const char *extra_names[4];                     /* the method's own monitors (ExCB: s min and max) */
    double extra[4];
    int n_extra = m->method->diagnostics ? m->method->diagnostics(m, extra_names, extra) : 0;
    for (int i = 0; i < n_extra; i++) jnum(r->metrics, extra_names[i], extra[i]);
    if (knn) {
        fprintf(r->metrics, ",");
        eval_json(r->metrics, rc, knn);
    }
    metrics_end(r, epoch_seconds, elapsed_img_per_s(r, m->step, rc->model.batch));   /* the global batch */
    if (!r->quiet) {
        fprintf(stderr, "excb train: epoch %ld done: loss %.4f", epoch + 1, a[EXCB_ACC_LOSS] / n);
        if (K) fprintf(stderr, ", empty clusters %ld of %d, cluster sizes %ld..%ld, label entropy %.4f of log K", empty, K,
                       cmin, cmax, h / log(K));
        for (int j = 0; knn && j < knn->n_ks; j++) fprintf(stderr, "%s k=%d %.2f %%", j ? "," : "; k-NN top-1", rc->knn_ks[j], knn->top1[j]);
        if (knn) fprintf(stderr, " (%ld bank / %ld queries)", knn->n_bank, knn->n_query);
        fprintf(stderr, "\n");
    }
}

/* the loop goes on while the schedule and --stop-after both leave steps to do */
static int steps_left(const ExcbRunConfig *rc, long step) {
    return step < rc->model.total_steps && !(rc->stop_after && step >= rc->stop_after);
}

int excb_train(ExcbRunConfig *rc_in, const char *out_dir, const char *resume_from, int quiet, char *err) {
    ExcbRunConfig rc = *rc_in;
    Run r = {.tty = isatty(STDERR_FILENO), .quiet = quiet};
    snprintf(r.dir, sizeof r.dir, "%s", out_dir);
    int code;
    if ((code = mkdir_p(out_dir, err))) return code;
    /* the data first: the model's channel count and the schedule's length follow from it */
    ExcbDataset ds;
    if ((code = excb_data_open(&ds, rc.data, rc.train_split, err))) return code;
    excb_data_keep(&ds, rc.train_images);               /* a subset of the split, evenly spaced      */
    ds.skip_bad = rc.skip_bad;
    rc.model.in_ch = ds.channels;
    long bpe = ds.n / rc.model.batch;                   /* drop_last, as the official loader        */
    if (bpe < 1) {
        code = fail(err, EXCB_EXIT_CONFIG, "batch %d is larger than the data set (%ld images in %s, %s split)",
                    rc.model.batch, ds.n, ds.path, ds.split);
        excb_data_close(&ds);                      /* after the message, which names what it held */
        return code;
    }
    rc.model.total_steps = rc.epochs * bpe;
    rc.model.warmup_steps = (long)nearbyint(rc.warmup_epochs * bpe);
    rc.model.steps_per_epoch = bpe;                     /* DINO's warm-up and SwAV's queue count epochs */
    if (excb_methods[rc.model.method]->per_image && !rc.model.n_images)
        rc.model.n_images = ds.n;                       /* CoKe's label per image (config.txt keeps N) */
    if (excb_methods[rc.model.method]->per_image && rc.model.n_images < ds.n) {
        code = fail(err, EXCB_EXIT_CONFIG, "key 'coke_num_images' = %ld is below the %ld images of %s (%s split): CoKe "
                    "keeps a label for every one", rc.model.n_images, ds.n, ds.path, ds.split);
        excb_data_close(&ds);
        return code;
    }
    /* data parallelism (section 10b): R ranks, each with its share of every batch; rank 0 writes */
    Ranks rk;
    ExcbConfig local;
    if ((code = ranks_config(&rk, &rc, &local, err))) { excb_data_close(&ds); return code; }
    int writer = r.writer = rk.rank == 0;
    if (!writer) r.quiet = quiet = 1;
    ExcbModel m, dm, *run = &m;        /* run: the model that steps, m itself or its GPU twin dm */
    if (excb_build(&m, &local)) { excb_data_close(&ds); return fail(err, EXCB_EXIT_CONFIG, "cannot build the model"); }
    ranks_attach(&rk, &m, &local);
    /* what is evaluated: the teacher, but for a student-only method (CoKe, mvbt), whose teacher never
       runs a forward pass (its BatchNorm statistics stay at their start) */
    int eval_teacher = !m.method->student_only;
    const char *eval_net = eval_teacher ? "teacher" : "student";
    if (rc.device == EXCB_DEVICE_CUDA) {
        char how[300];                          /* ranks: each its GPU, joined by NCCL or through MPI */
        if (rk.world && !(code = excb_cuda_join(rk.world, (ExcbPrecision)rc.precision, how, sizeof how, err)) && writer)
            fprintf(stderr, "excb train: %s\n", how);
        if (code || (code = excb_cuda_attach(&dm, &m, (ExcbPrecision)rc.precision, err))) {
            if (rk.world) excb_cuda_leave(rk.world, 1);
            excb_free(&m);
            excb_data_close(&ds);
            return code;
        }
        run = &dm;
    }
    /* SIGINT, SIGTERM, SIGHUP: stop after the step in progress, with a checkpoint (from here until this
       returns; every exit below goes through done_model, which restores the handlers). A signal the
       caller ignores (nohup, a background job of a script) stays ignored. */
    static const int stop_sigs[3] = {SIGINT, SIGTERM, SIGHUP};
    struct sigaction on_stop = {.sa_handler = on_stop_signal}, before[3];
    sigemptyset(&on_stop.sa_mask);
    atomic_store(&stop_signal, 0);
    atomic_store(&signals_seen, 0);
    for (int i = 0; i < 3; i++) {
        sigaction(stop_sigs[i], NULL, &before[i]);
        if (before[i].sa_handler != SIG_IGN) sigaction(stop_sigs[i], &on_stop, NULL);
    }
    char *config_text = excb_config_dump(&rc, 0), *config_json = excb_config_dump(&rc, 1);
    ExcbTrainState ts = {0};
    char path[4200];
    long last_ckpt = -1;
    ExcbViewConfig vc;
    excb_view_config_for(&vc, &rc.model, rc.epochs, rc.blur);
    vc.scale_offset = rc.crop_scale_offset;
    if (rc.crop_scales == EXCB_CROP_SCALES_DINO) vc.fixed_scale_split = 0.4;    /* A11's switch: DINO's 0.4 */
    ExcbLoader L;
    EvalSets es;
    int have_eval = 0;
    if (writer && rc.n_knn_ks > 0 && rc.knn_every >= 0) {
        if ((code = open_eval_sets(&rc, &es, err))) goto done_model;
        have_eval = 1;
    }
    if (resume_from) {
        if ((code = excb_checkpoint_load(resume_from, &m, &ts, err))) goto done_model;
        if (run != &m && (code = excb_cuda_upload(run, &m, err))) goto done_model;
        ranks_sync(&rk, &m);
        if (ts.n_samples != ds.n) {
            code = fail(err, EXCB_EXIT_CONFIG, "%s: the checkpoint's run had %ld training images, %s has %ld", resume_from,
                        ts.n_samples, ds.path, ds.n);
            goto done_model;
        }
        last_ckpt = m.step;
        path_in(path, sizeof path, r.dir, "metrics.jsonl");
        struct stat st;
        if (!writer) {
            if (!(r.metrics = fopen("/dev/null", "w"))) { code = fail(err, EXCB_EXIT_IO, "/dev/null: %s", strerror(errno)); goto done_model; }
        } else if (stat(path, &st) || st.st_size < ts.metrics_bytes) {
            code = fail(err, EXCB_EXIT_DATA, "%s is missing or shorter (%lld bytes) than at the checkpoint (%lld bytes)", path,
                        (long long)(stat(path, &st) ? -1 : st.st_size), (long long)ts.metrics_bytes);
            goto done_model;
        }
        else if (truncate(path, ts.metrics_bytes) || !(r.metrics = fopen(path, "a"))) {
            code = fail(err, EXCB_EXIT_IO, "%s: %s", path, strerror(errno));
            goto done_model;
        }
        if (!quiet) fprintf(stderr, "excb train: resuming %s at step %ld of %ld\n", resume_from, m.step, rc.model.total_steps);
    } else {
        ts.n_samples = ds.n;
        ts.prev_labels = xmalloc(sizeof(int32_t) * (ds.n + 1));
        for (long i = 0; i < ds.n; i++) ts.prev_labels[i] = -1;
        ts.epoch_counts = xcalloc(m.n_labels + 1, sizeof(int64_t));
        path_in(path, sizeof path, r.dir, "config.txt");
        if (writer && (code = write_text_atomic(path, config_text, err))) goto done_model;
        path_in(path, sizeof path, r.dir, "metrics.jsonl");
        if (!(r.metrics = fopen(writer ? path : "/dev/null", "w"))) { code = fail(err, EXCB_EXIT_CANTCREAT, "cannot create %s: %s", path, strerror(errno)); goto done_model; }
        char data_json[2 * sizeof ds.path];
        json_escape(data_json, sizeof data_json, ds.path);
        fprintf(r.metrics, "{\"type\":\"run\",\"version\":\"%s\",\"seed\":%llu,\"world_size\":%d,\"data\":\"%s\",\"images\":%ld,"
                "\"steps_per_epoch\":%ld,\"total_steps\":%ld,\"params\":%zu,\"device\":\"%s\",\"precision\":\"%s\",\"config\":%s",
                EXCB_VERSION, (unsigned long long)rc.model.seed, rk.R, data_json, ds.n, bpe, rc.model.total_steps, m.n_params,
                run->ops->name, precision_names[rc.precision], config_json);
        metrics_end(&r, 0, 0);
        if (rc.kmeans_init && m.n_protos) {     /* paper_notes.md §9, on the loader's first batches */
            if ((code = excb_loader_open_share(&L, &ds, &vc, rc.model.batch, rk.world ? rk.R : 1, rk.rank, rc.workers, 0,
                                               err))) goto done_model;
            code = kmeans_init_centroids(&m, run, &rk, &rc, &L, !quiet, err);
            excb_loader_close(&L);
            if (code) {                /* agreed (a data error) or the same on every rank (empty clusters) */
                rank_exit_agreed = 1;
                if (!writer) rank_exit_silent = 1;
                goto done_model;
            }
        }
        if ((code = save_checkpoint(&r, &m, &ts, config_text, rc.keep, err))) goto done_model;
        last_ckpt = 0;
    }
    if (!quiet)
        fprintf(stderr, "excb train: %s, %ld images, %s %dx%d + %d x %dx%d views, B=%d, K=%d, %ld epochs x %ld steps, "
                "%zu parameters, run directory %s\n", ds.path, ds.n, rc.model.in_ch == 1 ? "gray" : "RGB", rc.model.n_global,
                rc.model.global_size, rc.model.n_local, rc.model.local_size, rc.model.local_size, rc.model.batch, rc.model.K,
                rc.epochs, bpe, m.n_params, r.dir);
    if ((code = excb_loader_open_share(&L, &ds, &vc, rc.model.batch, rk.world ? rk.R : 1, rk.rank, rc.workers, m.step,
                                       err))) goto done_model;
    r.t_start = now_seconds();
    r.step_start = m.step;
    if (m.comm) m.comm->seconds = m.comm->bytes = m.comm->calls = 0;    /* the loop's reductions only */
    double seconds_before = ts.seconds;               /* training time of earlier processes of this run */
    double epoch_t0 = now_seconds();
    int B = rc.model.batch, NG = rc.model.n_global * B;     /* the global batch, whatever the ranks */
    int agreed = 0;                                     /* code is every rank's (10b), not this one's alone */
    while (steps_left(&rc, m.step)) {
        ExcbBatch *bt;
        /* a data error or a signal on any rank stops every rank here, at the same step */
        int sig = 0;
        code = ranks_agree(&rk, excb_loader_next(&L, &bt, err), &sig, err);
        if (code) { agreed = 1; break; }
        if (sig) break;
        long epoch = m.step / bpe;
        if (m.step == rc.debug_nan_step) bt->xg[0] = NAN;   /* tests: a poisoned input, as a bad batch would be */
        ExcbStepStats st = {0};
        run->batch_index = bt->index;                       /* CoKe's labels are per image          */
        const int64_t *index = bt->index;                   /* the global batch's images            */
        if (rk.world) {
            excb_comm_gather(rk.world, bt->index, rk.index, sizeof(int64_t) * local.batch);
            index = rk.index;
        }
        if (ranks_step(&rk, run, bt, &st)) {               /* the one step (section 10) */
            code = diverged(&r, &m, index, B, epoch, st.loss, st.grad_norm, isfinite(st.loss) ? "non-finite gradient norm"
                            : "non-finite loss", last_ckpt, writer, err);
            agreed = 1;                                     /* every rank computed the same step    */
            break;
        }
        double loss = st.loss, gnorm = st.grad_norm;
        /* the global batch's labels (10b; m.labels itself for R = 1), from the GPU twin for A21 */
        if (run != &m) run->ops->to_host(m.labels_all, run->labels_all, sizeof(int32_t) * NG);
        const int32_t *labels = m.labels_all;
        /* A21's changed labels: view 1's label (the teacher's; CoKe: head 0's new assignment) against the
           one this image had when last seen */
        long changed = 0, seen = 0;
        for (int i = 0; i < B && m.n_labels; i++) {          /* mvbt has no labels */
            int64_t idx = index[i];
            if (ts.prev_labels[idx] >= 0) { seen++; changed += ts.prev_labels[idx] != labels[i]; }
            ts.prev_labels[idx] = labels[i];
        }
        for (int i = 0; i < NG && m.n_labels; i++) ts.epoch_counts[labels[i]]++;
        m.step = run->step;
        ts.acc[EXCB_ACC_STEPS] += 1;
        ts.acc[EXCB_ACC_LOSS] += loss;
        ts.acc[EXCB_ACC_TCONF] += st.teacher_conf;
        ts.acc[EXCB_ACC_SCONF] += st.student_conf;
        ts.acc[EXCB_ACC_UNIQUE] += st.unique_labels;
        ts.acc[EXCB_ACC_CHANGED] += changed;
        ts.acc[EXCB_ACC_SEEN] += seen;
        ts.acc[EXCB_ACC_ENTROPY] += st.assign_entropy;
        int epoch_end = m.step % bpe == 0;
        if (m.step % rc.log_every == 0 || epoch_end) {
            fprintf(r.metrics, "{\"type\":\"step\",\"step\":%ld,\"epoch\":%ld", m.step, epoch);
            jnum(r.metrics, "loss", loss);
            jnum(r.metrics, "lr", st.lr);
            jnum(r.metrics, "wd", rc.model.weight_decay);
            jnum(r.metrics, "wd_centroid", st.wd_centroid);
            jnum(r.metrics, "teacher_momentum", st.ema_m);
            jnum(r.metrics, "teacher_conf", st.teacher_conf);
            jnum(r.metrics, "student_conf", st.student_conf);
            fprintf(r.metrics, ",\"distinct\":%d", st.unique_labels);
            jnum(r.metrics, "distinct_frac", (double)st.unique_labels / B);
            jnum(r.metrics, "changed_labels", seen ? (double)changed / seen : NAN);
            jnum(r.metrics, "assign_entropy", st.assign_entropy);
            jnum(r.metrics, "grad_norm", gnorm);
            metrics_end(&r, now_seconds() - r.t_start, elapsed_img_per_s(&r, m.step, B));
        }
        if ((code = metrics_check(&r, err))) break;
        progress(&r, m.step, rc.model.total_steps, bpe, &st, B, epoch_end && r.tty);
        int need_state = epoch_end || (rc.ckpt_every && m.step % rc.ckpt_every == 0) || m.step == rc.stop_after
                         || m.step == rc.model.total_steps;
        if (need_state && run != &m && (code = excb_cuda_download(&m, run, err))) break;   /* GPU -> host */
        if (epoch_end) {
            EvalResult knn;
            int do_knn = have_eval && ((rc.knn_every > 0 && (epoch + 1) % rc.knn_every == 0) || m.step == rc.model.total_steps);
            if (do_knn && (code = evaluate(&m, &rc, &es, rc.knn_bank_max, rc.knn_query_max, EVAL_KNN, eval_teacher, &knn, err))) break;
            epoch_record(&r, &m, &ts, epoch, do_knn ? &knn : NULL, &rc, now_seconds() - epoch_t0);
            memset(ts.acc, 0, sizeof ts.acc);
            memset(ts.epoch_counts, 0, sizeof(int64_t) * m.n_labels);
            epoch_t0 = now_seconds();
        }
        if (epoch_end || (rc.ckpt_every && m.step % rc.ckpt_every == 0) || m.step == rc.stop_after) {
            ts.seconds = seconds_before + (now_seconds() - r.t_start);
            if ((code = save_checkpoint(&r, &m, &ts, config_text, rc.keep, err))) break;
            last_ckpt = m.step;
        }
    }
    excb_loader_close(&L);
    /* the loop ended early because of a signal (not at its end or at --stop-after): interrupted */
    int interrupted = !code && stop_signal && steps_left(&rc, m.step) ? stop_signal : 0;
    if (!code && !interrupted && m.step == rc.model.total_steps && have_eval) {
        /* the final evaluation on the whole bank and query splits */
        EvalResult res;
        if (!quiet) fprintf(stderr, "excb train: final evaluation (k-NN, linear probe, clusters) ...\n");
        code = evaluate(&m, &rc, &es, 0, 0, EVAL_FULL, eval_teacher, &res, err);
        if (stop_signal && code == EXCB_EXIT_SIGNAL + stop_signal) { interrupted = stop_signal; code = 0; }  /* cut short */
        else if (!code) {
            fprintf(r.metrics, "{\"type\":\"eval\",\"step\":%ld,\"features\":\"%s\",", m.step, eval_net);
            eval_json(r.metrics, &rc, &res);
            metrics_end(&r, res.seconds, 0);
            char *text = NULL;
            size_t len = 0;
            FILE *f = open_memstream(&text, &len);
            fprintf(f, "{\"step\":%ld,\"features\":\"%s\",", m.step, eval_net);
            eval_json(f, &rc, &res);
            fprintf(f, ",\"config\":%s}\n", config_json);
            fclose(f);
            path_in(path, sizeof path, r.dir, "eval.json");
            if (!(code = metrics_check(&r, err)) && !(code = write_text_atomic(path, text, err))) {
                printf("excb train: finished %ld steps in %s\n", m.step, r.dir);
                print_eval(stdout, &m, &rc, &es, &res, eval_teacher);
            }
            free(text);
        }
    }
    if (interrupted) {
        /* stopped between steps (or during the final evaluation, which is simply dropped): the state is
           the end of step m.step, complete, so a checkpoint of it is as good as any other. A signal that
           comes after the run's work is done changes nothing: the run finished. */
        int sig = interrupted;
        if (m.step != last_ckpt) {
            if (run != &m) code = excb_cuda_download(&m, run, err);
            ts.seconds = seconds_before + (now_seconds() - r.t_start);
            if (!code) code = save_checkpoint(&r, &m, &ts, config_text, rc.keep, err);
            if (!code) last_ckpt = m.step;
        }
        if (!code) {
            if (!writer) rank_exit_silent = 1;        /* rank 0 says where the run is saved */
            ckpt_path(path, sizeof path, r.dir, last_ckpt);
            code = fail(err, EXCB_EXIT_SIGNAL + sig, "%s: stopped after step %ld of %ld; the run is saved in %s: continue "
                        "with --out %s --resume", signal_name(sig), m.step, rc.model.total_steps, path, r.dir);
        }
    } else if (!code && rc.stop_after && m.step >= rc.stop_after && !quiet) {
        fprintf(stderr, "excb train: stopped after step %ld (--stop-after); continue with --out %s --resume\n", m.step, r.dir);
    }
    if (interrupted) agreed = 1;                        /* every rank stops at the same step            */
    if (rk.R > 1 && !quiet) {
        ExcbComm *c = m.comm;
        double steps = m.step > r.step_start ? (double)(m.step - r.step_start) : 1;
        double run_s = fmax(now_seconds() - r.t_start, 1e-9);
        fprintf(stderr, "excb train: %d ranks (%s): %.0f reductions and %.2f MB from each rank a step; a step took %.1f ms",
                rk.R, rk.world ? "Open MPI" : "chunks", c->calls / steps, c->bytes / steps / 1e6, 1e3 * run_s / steps);
        if (rk.world)              /* (a chunk's time in a reduction is the other chunks' steps: not shown) */
            fprintf(stderr, ", %.1f ms of it in reductions (waits for the other ranks included)", 1e3 * c->seconds / steps);
        fprintf(stderr, "\n");
    }
    /* every rank ends here with the same code, or a rank that failed alone ends the job (main: MPI_Abort).
       The job's code is rank 0's when it has one (it wrote, or failed to write, the run's last state: a
       failed save on a stop is 74, not 130), else the largest; only rank 0 prints it */
    if (rk.world && (!code || agreed)) {
        int all[rk.R], own = code;
        excb_comm_gather(rk.world, &own, all, sizeof own);
        code = all[0];
        for (int q = 1; q < rk.R && !code; q++) code = all[q] > code ? all[q] : code;
        for (int q = 1; q < rk.R && !all[0]; q++) code = all[q] > code ? all[q] : code;
        if (!writer && code) {
            rank_exit_silent = 1;
            if (code != own) fail(err, code, "rank %d stops with exit %d, as rank 0 says", rk.rank, code);
        }
        rank_exit_agreed = 1;
    }
    if (ds.n_bad) fprintf(stderr, "excb train: %ld bad training image(s) skipped (skip_bad), each named above\n", ds.n_bad);
done_model:
    if (r.metrics && fclose(r.metrics) && !code) code = fail(err, EXCB_EXIT_IO, "closing %s/metrics.jsonl failed: %s", r.dir, strerror(errno));
    for (int i = 0; i < 3; i++) sigaction(stop_sigs[i], &before[i], NULL);
    atomic_store(&stop_signal, 0);               /* later evaluations in this process run whole */
    if (have_eval) close_eval_sets(&es);
    excb_train_state_free(&ts);
    free(config_text);
    free(config_json);
    if (run != &m) excb_cuda_detach(run);
    if (run != &m && rk.world) excb_cuda_leave(rk.world, code != 0);
    ranks_close(&rk);
    excb_free(&m);
    excb_data_close(&ds);
    return code;
}

/* ================================================================================================
 * 18. Evaluation: frozen features, weighted k-NN, a linear probe, clustering metrics
 * ================================================================================================
 * What is measured, and how (paper_notes.md §9, Evaluation):
 *  - features: the backbone's pooled output (D), teacher weights by default (DINO's eval_knn uses the
 *    teacher), BatchNorm with running statistics, one deterministic view per image: the whole image
 *    when it already has the global crop's side, otherwise Resize(short side to G*256/224) and
 *    CenterCrop(G), as DINO's evaluation transform for G = 224;
 *  - k-NN: L2-normalised features, cosine similarity, the k most similar bank rows vote for their class
 *    with weight exp(sim / T) (DINO eval_knn.py L143-194), top-1 and top-5;
 *  - linear probe: softmax regression on the frozen features (see excb_linear_probe for the protocol);
 *  - clusters: each image's nearest centroid (E1 argmax of the same network, no balancing) against
 *    its class: NMI, AMI, ARI (arithmetic normalisation, as scikit-learn's defaults), many-to-one
 *    accuracy, and Hungarian-matched accuracy when K equals the number of classes.
 */

/* the evaluation view of one image: (C, G, G) floats, normalised like the training views */
static void eval_view(const ExcbViewConfig *vc, const ExcbImage *img, real *out, ExcbViewScratch *scr) {
    int G = vc->global_size, C = img->c;
    const uint8_t *px = img->px;
    int h = img->h, w = img->w;
    if (!(h == G && w == G)) {
        int S = (int)((long)G * 256 / 224), nh, nw;           /* torchvision Resize(S): short side S */
        if (h <= w) { nh = S; nw = (int)((long)S * w / h); } else { nw = S; nh = (int)((long)S * h / w); }
        scratch_reserve(scr, (size_t)C * (h > nh ? h : nh) * (w > nw ? w : nw), 0);
        excb_resize_bicubic(img->px, h, w, w * C, scr->b, nh, nw, C, scr->a);
        int top = (int)nearbyint((nh - G) / 2.0), left = (int)nearbyint((nw - G) / 2.0);   /* CenterCrop */
        px = scr->b + ((size_t)top * nw + left) * C;
        h = nh; w = nw;
    }
    for (int ch = 0; ch < C; ch++)
        for (int y = 0; y < G; y++)
            for (int x = 0; x < G; x++)
                out[((size_t)ch * G + y) * G + x] = (real)(((float)px[((size_t)y * w + x) * C + ch] / 255.0f - vc->mean[ch]) / vc->std[ch]);
}

/* Image i for an evaluation, with C channels: 0 and *skipped = 0, or an exit code. With skip_bad a bad
   image (exit 65) is marked in ds->bad, counted and logged once, and *skipped = 1: its feature row is
   computed from zeros and evaluate() drops it, with the count in its report. */
static int eval_image(ExcbDataset *ds, long i, int C, ExcbImage *img, int *skipped, char *err) {
    *skipped = 0;
    if (ds->bad && ds->bad[i]) { *skipped = 1; return 0; }
    int code = excb_data_get(ds, i, img, err);
    if (!code && img->c != C) code = fail(err, EXCB_EXIT_DATA, "%s: image %ld has %d channels, the model %d", ds->path, i, img->c, C);
    if (code != EXCB_EXIT_DATA || !ds->skip_bad || !ds->bad) return code;
    ds->bad[i] = 1;
    ds->n_bad++;
    fprintf(stderr, "excb: skipping bad image (%ld so far in the %s split): %s\n", ds->n_bad, ds->split, err);
    *skipped = 1;
    return 0;
}

void excb_backbone_features(ExcbModel *m, int teacher, const real *x, int n, real *feat) {
    const ExcbConfig *c = &m->cfg;
    int N = c->n_global * c->batch, D = m->D;
    size_t image = (size_t)c->in_ch * c->global_size * c->global_size;
    const real *P = teacher ? m->teacher : m->params;
    real *run = teacher ? m->teacher_running : m->running, *pad = NULL;
    int eval_bn = m->eval_bn;
    m->eval_bn = 1;
    for (int i0 = 0; i0 < n; i0 += N) {
        int rows = n - i0 < N ? n - i0 : N;
        const real *xi = x + (size_t)i0 * image;
        if (rows < N) {    /* the arena's forward takes N images; BN in evaluation mode keeps rows apart */
            if (!pad) pad = xcalloc((size_t)N * image, sizeof(real));
            memcpy(pad, xi, sizeof(real) * rows * image);
            xi = pad;
        }
        backbone_forward(m, P, run, &m->act_global, xi, m->f, N);
        for (int r = 0; r < rows; r++)
            for (int j = 0; j < D; j++) feat[(size_t)(i0 + r) * D + j] = m->f[(size_t)j * N + r];
    }
    m->eval_bn = eval_bn;
    free(pad);
}

int excb_extract_features(ExcbModel *m, int teacher, ExcbDataset *ds, const ExcbViewConfig *vc,
                          const long *idx, long n, real *feat, int32_t *assign, char *err) {
    const ExcbConfig *c = &m->cfg;
    int N = c->n_global * c->batch, G = c->global_size, C = c->in_ch, D = m->D, K = c->K, d = c->d;
    const real *P = teacher ? m->teacher : m->params;
    real *run = teacher ? m->teacher_running : m->running;
    real *x = xcalloc((size_t)N * C * G * G, sizeof(real));
    ExcbImage img = {0};
    ExcbViewScratch scr = {0};
    int code = 0, eval_bn = m->eval_bn;
    m->eval_bn = 1;
    if (assign) centroids_forward(m, P);
    for (long i0 = 0; i0 < n && !code; i0 += N) {
        int rows = (int)(n - i0 < N ? n - i0 : N);
        for (int r = 0; r < rows && !code; r++) {
            long i = idx ? idx[i0 + r] : i0 + r;
            int skipped;
            if ((code = eval_image(ds, i, C, &img, &skipped, err))) break;
            if (skipped) memset(x + (size_t)r * C * G * G, 0, sizeof(real) * C * G * G);
            else eval_view(vc, &img, x + (size_t)r * C * G * G, &scr);
        }
        if (code) break;
        excb_backbone_features(m, teacher, x, rows, feat + (size_t)i0 * D);   /* one forward: m->f has them */
        if (assign) {
            projector_forward(m, P, run, m->f, N);
            l2norm_rows_forward(m->ut, m->ut_den, m->h, N, d, N, (real)c->norm_eps);
            matmul_tiled('N', 'T', N, K, d, 1.0f, m->ut, d, m->c, d, 0.0f, m->zt, K);
            for (int r = 0; r < rows; r++) {
                const real *z = m->zt + (size_t)r * K;
                int best = 0;
                for (int k = 1; k < K; k++)
                    if (z[k] > z[best]) best = k;
                assign[i0 + r] = best;
            }
        }
    }
    m->eval_bn = eval_bn;
    free(x);
    excb_image_free(&img);
    free(scr.a); free(scr.b); free(scr.f);
    return code;
}

/* The floor a learned representation has to beat: each image's evaluation view itself, its C*G*G
   normalised pixels as a feature row (evaluate() then subtracts the bank's mean image). */
int excb_pixel_features(ExcbDataset *ds, const ExcbViewConfig *vc, int C, const long *idx, long n,
                        real *feat, char *err) {
    int G = vc->global_size, code = 0, skipped;
    ExcbImage img = {0};
    ExcbViewScratch scr = {0};
    for (long r = 0; r < n && !code; r++) {
        if ((code = eval_image(ds, idx[r], C, &img, &skipped, err))) break;
        if (skipped) memset(feat + (size_t)r * C * G * G, 0, sizeof(real) * C * G * G);
        else eval_view(vc, &img, feat + (size_t)r * C * G * G, &scr);
    }
    excb_image_free(&img);
    free(scr.a); free(scr.b); free(scr.f);
    return code;
}

static void l2_normalise_rows(real *x, long n, int D) {
#pragma omp parallel for schedule(static)
    for (long i = 0; i < n; i++) {
        double s = 0;
        for (int j = 0; j < D; j++) s += (double)x[(size_t)i * D + j] * x[(size_t)i * D + j];
        real inv = (real)(1.0 / fmax(sqrt(s), 1e-12));
        for (int j = 0; j < D; j++) x[(size_t)i * D + j] *= inv;
    }
}

void excb_knn(const real *bank_in, const int32_t *bank_labels, long n_bank, const real *query_in,
              const int32_t *query_labels, long n_query, int D, int n_classes, const int *ks, int n_ks,
              double T, double *top1, double *top5) {
    int kmax = 0;
    for (int j = 0; j < n_ks; j++) kmax = ks[j] > kmax ? ks[j] : kmax;
    if (kmax > n_bank) kmax = (int)n_bank;
    real *bank = xmalloc(sizeof(real) * n_bank * D), *query = xmalloc(sizeof(real) * n_query * D);
    memcpy(bank, bank_in, sizeof(real) * n_bank * D);
    memcpy(query, query_in, sizeof(real) * n_query * D);
    l2_normalise_rows(bank, n_bank, D);
    l2_normalise_rows(query, n_query, D);
    long chunk = 256;
    real *sim = xmalloc(sizeof(real) * chunk * n_bank);
    long *hit1 = xcalloc(n_ks, sizeof(long)), *hit5 = xcalloc(n_ks, sizeof(long));
    int nt = max_threads();
    long *nb_idx = xmalloc(sizeof(long) * kmax * nt);
    real *nb_sim = xmalloc(sizeof(real) * kmax * nt);
    double *votes = xmalloc(sizeof(double) * n_classes * nt);
    for (long q0 = 0; q0 < n_query; q0 += chunk) {
        int rows = (int)(n_query - q0 < chunk ? n_query - q0 : chunk);
        matmul('N', 'T', rows, (int)n_bank, D, 1.0f, query + (size_t)q0 * D, D, bank, D, 0.0f, sim, (int)n_bank);
        long h1[EXCB_MAX_KS] = {0}, h5[EXCB_MAX_KS] = {0};
#pragma omp parallel
        {
            int t = thread_id();
            long *ni = nb_idx + (size_t)t * kmax;
            real *ns = nb_sim + (size_t)t * kmax;
            double *v = votes + (size_t)t * n_classes;
            long l1[EXCB_MAX_KS] = {0}, l5[EXCB_MAX_KS] = {0};
#pragma omp for schedule(static)
            for (int r = 0; r < rows; r++) {
                const real *s = sim + (size_t)r * n_bank;
                /* the kmax most similar, kept sorted by (similarity desc, index asc): insertion into a
                   short sorted list; most rows fail the first comparison */
                int have = 0;
                for (long j = 0; j < n_bank; j++) {
                    if (have == kmax && !(s[j] > ns[kmax - 1])) continue;
                    int p = have < kmax ? have++ : kmax - 1;
                    while (p > 0 && s[j] > ns[p - 1]) { ns[p] = ns[p - 1]; ni[p] = ni[p - 1]; p--; }
                    ns[p] = s[j];
                    ni[p] = j;
                }
                int truth = query_labels[q0 + r];
                for (int kj = 0; kj < n_ks; kj++) {
                    int k = ks[kj] < have ? ks[kj] : have;
                    for (int c = 0; c < n_classes; c++) v[c] = 0;
                    for (int j = 0; j < k; j++) v[bank_labels[ni[j]]] += exp((double)ns[j] / T);
                    /* rank of the true class: classes with more votes (ties: lower class first) */
                    int above = 0;
                    for (int c = 0; c < n_classes; c++)
                        above += v[c] > v[truth] || (v[c] == v[truth] && c < truth);
                    l1[kj] += above == 0;
                    l5[kj] += above < 5;
                }
            }
#pragma omp critical
            for (int kj = 0; kj < n_ks; kj++) { h1[kj] += l1[kj]; h5[kj] += l5[kj]; }
        }
        for (int kj = 0; kj < n_ks; kj++) { hit1[kj] += h1[kj]; hit5[kj] += h5[kj]; }
    }
    for (int kj = 0; kj < n_ks; kj++) {
        top1[kj] = 100.0 * hit1[kj] / n_query;
        top5[kj] = 100.0 * hit5[kj] / n_query;
    }
    free(bank); free(query); free(sim); free(hit1); free(hit5); free(nb_idx); free(nb_sim); free(votes);
}

/* --- the linear probe -----------------------------------------------------------------------------
 * loss = mean_i [ -log softmax(W x_i + b)_{y_i} ];  dL/dW = mean_i (p_i - onehot(y_i)) x_i^T, dL/db the same
 * without x. Computed in double. */
double excb_softmax_xent(const real *W, const real *b, const real *x, const int32_t *y, long n, int D, int C,
                         double *dW, double *db) {
    double loss = 0, *z = xmalloc(sizeof(double) * C);
    for (long i = 0; i < n; i++) {
        const real *xi = x + (size_t)i * D;
        double zmax = -INFINITY, sum = 0;
        for (int c = 0; c < C; c++) {
            double a = b[c];
            for (int j = 0; j < D; j++) a += (double)W[(size_t)c * D + j] * xi[j];
            z[c] = a;
            zmax = fmax(zmax, a);
        }
        for (int c = 0; c < C; c++) sum += exp(z[c] - zmax);
        loss += log(sum) + zmax - z[y[i]];
        for (int c = 0; c < C; c++) {
            double g = (exp(z[c] - zmax) / sum - (c == y[i])) / n;
            if (db) db[c] += g;
            if (dW)
                for (int j = 0; j < D; j++) dW[(size_t)c * D + j] += g * xi[j];
        }
    }
    free(z);
    return loss / n;
}

static double probe_accuracy(const real *W, const real *b, const real *x, const int32_t *y, long n, int D, int C) {
    long hit = 0;
#pragma omp parallel for schedule(static) reduction(+ : hit)
    for (long i = 0; i < n; i++) {
        int best = 0;
        double best_z = -INFINITY;
        for (int c = 0; c < C; c++) {
            double a = b[c];
            for (int j = 0; j < D; j++) a += (double)W[(size_t)c * D + j] * x[(size_t)i * D + j];
            if (a > best_z) { best_z = a; best = c; }
        }
        hit += best == y[i];
    }
    return 100.0 * hit / n;
}

/* Protocol: standardise each feature with the training rows' mean and std (a BatchNorm without affine,
   as MAE's probe); W, b start at 0; SGD with momentum 0.9, weight decay on W, lr cosine from `lr` to 0
   per step, batch `batch`, the training rows shuffled each epoch by (seed, epoch). No augmentation:
   the features are computed once (the official probe trains 100 epochs on augmented views instead). */
double excb_linear_probe(const real *train_in, const int32_t *ytr, long ntr, const real *test_in, const int32_t *yte,
                         long nte, int D, int C, int epochs, int batch, double lr, double wd, uint64_t seed,
                         double *train_acc) {
    real *tr = xmalloc(sizeof(real) * ntr * D), *te = xmalloc(sizeof(real) * nte * D);
    for (int j = 0; j < D; j++) {
        double s = 0, ss = 0;
        for (long i = 0; i < ntr; i++) s += train_in[(size_t)i * D + j];
        double mu = s / ntr;
        for (long i = 0; i < ntr; i++) { double v = train_in[(size_t)i * D + j] - mu; ss += v * v; }
        double inv = 1.0 / sqrt(ss / ntr + 1e-6);
        for (long i = 0; i < ntr; i++) tr[(size_t)i * D + j] = (real)((train_in[(size_t)i * D + j] - mu) * inv);
        for (long i = 0; i < nte; i++) te[(size_t)i * D + j] = (real)((test_in[(size_t)i * D + j] - mu) * inv);
    }
    real *W = xcalloc((size_t)C * D, sizeof(real)), *b = xcalloc(C, sizeof(real));
    double *vW = xcalloc((size_t)C * D, sizeof(double)), *vb = xcalloc(C, sizeof(double));
    double *gW = xmalloc(sizeof(double) * C * D), *gb = xmalloc(sizeof(double) * C);
    int64_t *perm = xmalloc(sizeof(int64_t) * ntr);
    real *xb = xmalloc(sizeof(real) * batch * D);
    int32_t *yb = xmalloc(sizeof(int32_t) * batch);
    long steps_per_epoch = (ntr + batch - 1) / batch, total = steps_per_epoch * epochs, t = 0;
    for (int e = 0; e < epochs && !stop_signal; e++) {     /* a run asked to stop: evaluate() drops it */
        excb_permutation(perm, ntr, seed ^ 0x70726f6265ull, e);          /* "probe" */
        for (long s0 = 0; s0 < ntr; s0 += batch, t++) {
            int nb = (int)(ntr - s0 < batch ? ntr - s0 : batch);
            for (int i = 0; i < nb; i++) {
                memcpy(xb + (size_t)i * D, tr + (size_t)perm[s0 + i] * D, sizeof(real) * D);
                yb[i] = ytr[perm[s0 + i]];
            }
            memset(gW, 0, sizeof(double) * C * D);
            memset(gb, 0, sizeof(double) * C);
            excb_softmax_xent(W, b, xb, yb, nb, D, C, gW, gb);
            double step_lr = 0.5 * lr * (1 + cos(M_PI * t / total));
            for (size_t i = 0; i < (size_t)C * D; i++) {
                vW[i] = 0.9 * vW[i] + gW[i] + wd * W[i];
                W[i] -= (real)(step_lr * vW[i]);
            }
            for (int c = 0; c < C; c++) {
                vb[c] = 0.9 * vb[c] + gb[c];
                b[c] -= (real)(step_lr * vb[c]);
            }
        }
    }
    double acc = probe_accuracy(W, b, te, yte, nte, D, C);
    if (train_acc) *train_acc = probe_accuracy(W, b, tr, ytr, ntr, D, C);
    free(tr); free(te); free(W); free(b); free(vW); free(vb); free(gW); free(gb); free(perm); free(xb); free(yb);
    return acc;
}

/* --- clustering metrics ---------------------------------------------------------------------------
 * From the contingency table n_ij (cluster i, class j), a_i = sum_j n_ij, b_j = sum_i n_ij, N:
 *   MI  = sum n_ij/N log(N n_ij / (a_i b_j)),  H(U) = -sum a_i/N log(a_i/N), H(V) likewise
 *   NMI = MI / ((H(U) + H(V)) / 2)
 *   AMI = (MI - E[MI]) / ((H(U) + H(V)) / 2 - E[MI]), E[MI] under the hypergeometric model (Vinh et al.
 *         2010, scikit-learn's expected_mutual_information), in log-gamma form
 *   ARI = (sum C(n_ij,2) - S_a S_b / C(N,2)) / ((S_a + S_b)/2 - S_a S_b / C(N,2)), S_a = sum C(a_i,2) ...
 *   many-to-one = sum_i max_j n_ij / N;  Hungarian = max over one-to-one maps / N (K = classes only)
 * Only clusters that received a point are rows (K = 65536 would make most rows empty). */
void excb_hungarian_max(const double *w, int n, int *perm) {
    /* the O(n^3) shortest augmenting path method on cost = max(w) - w (e-maxx's formulation, 1-based) */
    double wmax = -INFINITY;
    for (int i = 0; i < n * n; i++) wmax = fmax(wmax, w[i]);
    double *u = xcalloc(n + 1, sizeof(double)), *v = xcalloc(n + 1, sizeof(double)), *minv = xmalloc(sizeof(double) * (n + 1));
    int *p = xcalloc(n + 1, sizeof(int)), *way = xcalloc(n + 1, sizeof(int));
    char *used = xmalloc(n + 1);
    for (int i = 1; i <= n; i++) {
        p[0] = i;
        int j0 = 0;
        for (int j = 0; j <= n; j++) { minv[j] = INFINITY; used[j] = 0; }
        do {
            used[j0] = 1;
            int i0 = p[j0], j1 = 0;
            double delta = INFINITY;
            for (int j = 1; j <= n; j++)
                if (!used[j]) {
                    double cur = (wmax - w[(size_t)(i0 - 1) * n + (j - 1)]) - u[i0] - v[j];
                    if (cur < minv[j]) { minv[j] = cur; way[j] = j0; }
                    if (minv[j] < delta) { delta = minv[j]; j1 = j; }
                }
            for (int j = 0; j <= n; j++)
                if (used[j]) { u[p[j]] += delta; v[j] -= delta; }
                else minv[j] -= delta;
            j0 = j1;
        } while (p[j0] != 0);
        do { int j1 = way[j0]; p[j0] = p[j1]; j0 = j1; } while (j0);
    }
    for (int j = 1; j <= n; j++) perm[p[j] - 1] = j - 1;
    free(u); free(v); free(minv); free(p); free(way); free(used);
}

static int cmp_pair(const void *a, const void *b) {
    const int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

static double comb2(double x) { return x * (x - 1) / 2; }

void excb_cluster_scores(const int32_t *pred, const int32_t *truth, long n, int K, int C, ExcbClusterScores *s) {
    memset(s, 0, sizeof *s);
    /* the non-zero cells: sort (cluster, class) pairs and count runs */
    int64_t *key = xmalloc(sizeof(int64_t) * n);
    for (long i = 0; i < n; i++) key[i] = (int64_t)pred[i] * C + truth[i];
    qsort(key, n, sizeof(int64_t), cmp_pair);
    double *a = xcalloc(K, sizeof(double)), *bcol = xcalloc(C, sizeof(double));
    for (long i = 0; i < n; i++) { a[pred[i]] += 1; bcol[truth[i]] += 1; }
    double N = (double)n, mi = 0, sum_comb_nij = 0, majority = 0, best_in_row = 0;
    int64_t row = -1;
    for (long i = 0; i < n;) {
        long j = i;
        while (j < n && key[j] == key[i]) j++;
        double nij = (double)(j - i);
        int ci = (int)(key[i] / C), cj = (int)(key[i] % C);
        mi += nij / N * log(N * nij / (a[ci] * bcol[cj]));
        sum_comb_nij += comb2(nij);
        if (ci != row) { majority += best_in_row; best_in_row = 0; row = ci; }
        best_in_row = fmax(best_in_row, nij);
        i = j;
    }
    majority += best_in_row;
    double hu = 0, hv = 0, sa = 0, sb = 0;
    for (int k = 0; k < K; k++)
        if (a[k] > 0) { hu -= a[k] / N * log(a[k] / N); sa += comb2(a[k]); s->used_clusters++; }
    for (int c = 0; c < C; c++)
        if (bcol[c] > 0) { hv -= bcol[c] / N * log(bcol[c] / N); sb += comb2(bcol[c]); }
    /* E[MI]: sum over all (cluster, class) pairs with both marginals > 0 */
    double emi = 0, lgN = lgamma(N + 1);
    for (int k = 0; k < K; k++) {
        if (a[k] <= 0) continue;
        for (int c = 0; c < C; c++) {
            if (bcol[c] <= 0) continue;
            double ai = a[k], bj = bcol[c];
            double lo = fmax(1, ai + bj - N), hi = fmin(ai, bj);
            double base = lgamma(ai + 1) + lgamma(bj + 1) + lgamma(N - ai + 1) + lgamma(N - bj + 1) - lgN;
            for (double nij = lo; nij <= hi; nij++) {
                double lp = base - lgamma(nij + 1) - lgamma(ai - nij + 1) - lgamma(bj - nij + 1) - lgamma(N - ai - bj + nij + 1);
                emi += nij / N * log(N * nij / (ai * bj)) * exp(lp);
            }
        }
    }
    double mean_h = (hu + hv) / 2;
    s->nmi = mean_h > 0 ? mi / mean_h : 1.0;          /* both partitions trivial: identical, 1 */
    s->ami = mean_h - emi != 0 ? (mi - emi) / (mean_h - emi) : 1.0;
    double expected = sa * sb / comb2(N), maxidx = (sa + sb) / 2;
    s->ari = maxidx - expected != 0 ? (sum_comb_nij - expected) / (maxidx - expected) : 1.0;
    s->acc_many_to_one = majority / N;
    s->acc_hungarian = NAN;
    if (K == C) {
        double *w = xcalloc((size_t)K * K, sizeof(double));
        int *perm = xmalloc(sizeof(int) * K);
        for (long i = 0; i < n; i++) w[(size_t)pred[i] * K + truth[i]] += 1;
        excb_hungarian_max(w, K, perm);
        double matched = 0;
        for (int k = 0; k < K; k++) matched += w[(size_t)k * K + perm[k]];
        s->acc_hungarian = matched / N;
        free(w); free(perm);
    }
    free(key); free(a); free(bcol);
}

/* ================================================================================================
 * 19. Benchmarks: the whole step (random or loaded inputs), and the loader alone
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

/* MACs of what this code computes per sample (the unused direct local rows are not computed): the
   networks and the prototype layer's scores; a method's own loss (CoKe's scores against its centres,
   CARP's blocks, mvbt's d x d products) is not counted */
void excb_count_macs(const ExcbModel *m, double *teacher_fwd, double *student_fwd) {
    const ExcbConfig *c = &m->cfg;
    double Hd = c->hidden, d = c->d, D = m->D, cos = (double)m->n_protos * d;
    double proj = D * Hd + Hd * Hd + Hd * d, pred = d * Hd + Hd * d;
    double bg = backbone_macs(m, c->global_size), bl = backbone_macs(m, c->local_size);
    int views = c->n_global + c->n_local;
    *teacher_fwd = m->method->student_only ? 0 : c->n_global * (bg + proj + cos);
    *student_fwd = c->n_global * bg + c->n_local * bl + views * proj + m->n_dir_crops * cos
                 + (m->with_pred ? views * (pred + cos) : 0);
}

#ifndef TESTING

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* ================================================================================================
 * 20. Command line
 * ================================================================================================ */
static void usage(FILE *f) {
    fprintf(f,
        "usage: excb <command> [options]\n"
        "\n"
        "commands:\n"
        "  train       pre-train with ExCB (or another method: --set method=none|dino|swav|coke|carp|mvbt) into a run directory,\n"
        "              then evaluate (k-NN, linear probe, clusters)\n"
        "              --preset NAME   fashion-mnist (default), fashion-mnist-long, cifar10-r18, stl10-r18,\n"
        "                              imagenet-r50, tiny\n"
        "              --config FILE   'key = value' lines (a run's config.txt is one); applied after the preset\n"
        "              --set KEY=VALUE one setting, applied last (repeatable); --help-config lists every key\n"
        "              --data SPEC --epochs N --seed N --batch B --K K --threads T --workers W: --set shortcuts\n"
        "              --out DIR       run directory (runs/PRESET); an existing run needs --resume or --force\n"
        "              --resume        continue the run in --out from its newest good checkpoint\n"
        "              --force         start over in a directory that holds a run (deletes its checkpoints)\n"
        "              --quiet         no progress on stderr\n"
        "              --stop-after N  stop with a checkpoint once N steps are done (continue with --resume)\n"
        "              --skip-bad-images  skip, count and log undecodable images (training and evaluation)\n"
        "              SIGINT/SIGTERM/SIGHUP stop after the current step with a checkpoint (a second: at once)\n"
        "              --device D      auto (default: the GPU if one answers, else the CPU, said on stderr), cpu,\n"
        "                              cuda (the GPU or exit 69; exit 64 for a method without a GPU twin)\n"
        "              --precision P   fp32 (default), tf32 (GPU: TF32 GEMMs and convolutions); bf16: not yet\n"
        "              mpirun -np R ./excb train ...: R data-parallel ranks, each B/R images of every batch (CPU;\n"
        "                              every method); stop it by signalling the ranks (pkill -INT -x excb)\n"
        "              --chunks R      one process computes each batch as R ranks' shares, one after another: the\n"
        "                              reference that mpirun -np R equals bit for bit\n"
        "  eval        excb eval CHECKPOINT|RUN_DIR: k-NN, linear probe and clustering metrics of a checkpoint\n"
        "              excb eval --pixels [--data SPEC]: the same k-NN and probe on the mean-centred pixels,\n"
        "              the floor a learned representation has to beat\n"
        "              --student (default: teacher) --knn-k 10,20,100,200 --knn-t 0.07 --data SPEC\n"
        "              --bank-split S --query-split S --probe-epochs N --probe-lr X --probe-wd X --set KEY=VALUE\n"
        "              --skip-bad-images: leave undecodable images out of the bank and the queries (counted)\n"
        "              excb eval --weights FILE.safetensors: the same of a weights file (excb export's, a torchvision\n"
        "              ResNet's, a DINO/ExCB-style state dict; tools/pth_to_safetensors.py converts a .pth)\n"
        "  export      excb export CHECKPOINT|RUN_DIR --out FILE.safetensors: the teacher's (--student: the student's)\n"
        "              weights and BatchNorm buffers under PyTorch's names, the config in __metadata__;\n"
        "              --backbone-only: the backbone alone, as torchvision.models.resnet* names it\n"
        "  import      excb import FILE.safetensors --out CHECKPOINT [--student] [--set KEY=VALUE]: a weights file as\n"
        "              an excb checkpoint (backbone read off the names; heads from the file or from the seed)\n"
        "  features    excb features CHECKPOINT|RUN_DIR|--weights FILE --out FILE.safetensors [--data SPEC]\n"
        "              [--split S (the query split)] [--student]: the frozen features excb eval uses (F32, n x D)\n"
        "              and the labels (I64), for numpy: safetensors.numpy.load_file\n"
        "  plot        excb plot RUN_DIR: PNG curves (loss, diagnostics, cluster usage, k-NN, cluster sizes)\n"
        "              into RUN_DIR/plots with gnuplot (apt-get install gnuplot-nox)\n"
        "  inspect     excb inspect CHECKPOINT: verify it and list its tensors (name, type, shape, CRC-32)\n"
        "  audit       excb audit small-batch: every method (excb, none, dino, swav with and without its queue, coke,\n"
        "              carp) at B = 16, 32, 64, 128, 256 on the same 20,000 images; excb audit ablations: each audit\n"
        "              switch (paper_notes.md section 10) against the default at B = 16 and 256. One run directory\n"
        "              each under --out DIR (runs/audit-small-batch, runs/audit-ablations); an interrupted audit\n"
        "              continues where it stopped; writes table.md, results.tsv and plots/\n"
        "              --quick: excb and none at B = 16 on 4,000 images, and checks that none collapses and\n"
        "              excb does not (exit 1 if not)   --jobs J (1): runs at once   --threads T: each run's\n"
        "              --set KEY=VALUE: added to every run (repeatable)   --only ID,ID,...: those methods or\n"
        "              switches only (the ids of the table's run directories, e.g. default,A7-dino-pairing)\n"
        "  bench       time the whole training step, on fixed random inputs or, with --data, on loaded views\n"
        "              --config NAME   resnet20s (default), resnet8s, resnet18, resnet50, tiny, tiny50\n"
        "              --global-size G --local-size L (0: no local crops) --batch B --K K --threads T\n"
        "              --reps R (3)  --min-seconds S (4): each repetition runs >= S seconds\n"
        "              --data SPEC: alternate random and loaded repetitions and print their ratio\n"
        "              --device cpu|cuda|auto (cpu) --precision fp32|tf32: the GPU step, inputs on the GPU\n"
        "              --method excb|none|dino|swav|coke|carp|mvbt (excb): the method (each at its default settings)\n"
        "              --memory: print what the model takes, part by part, without allocating it, and stop\n"
        "  bench-data  time the loader alone (decode + views), in views per second\n"
        "              --config NAME (sizes and views as above) --batch B --seconds S (10) --reps R (3)\n"
        "  views       write a PNG grid of the views of the first images: --out FILE.png --images N (8)\n"
        "              --epoch E (0)\n"
        "\n"
        "data options (bench, bench-data, views):\n"
        "  --data SPEC      a data set: fashion-mnist (the embedded default), an IDX file or folder,\n"
        "                   a CIFAR-10/100 or STL-10 binary folder, or an image folder (PNG/JPEG)\n"
        "  --split S        train (default), test; STL-10 also unlabeled, train+unlabeled\n"
        "  --workers W      loader threads (1); 0 makes batches in the training thread\n"
        "  --blur MODE      as-run (default: what the official code does, A14) or as-configured\n"
        "  --skip-bad-images  skip, count and log undecodable images instead of stopping with exit 65\n"
        "  --seed N         root seed (0)\n"
        "\n"
        "  --help     this text        --version   version and build features\n"
        "exit codes: 0 ok, 1 an audit's check failed (--quick), 3 diverged (NaN/Inf loss or gradient; the last good checkpoint is kept), 64 usage,\n"
        "            65 bad data or a damaged checkpoint, 66 missing input, 69 gnuplot missing, 70 internal,\n"
        "            71 out of memory, 73 cannot create the run directory, 74 I/O, 75 the run directory is in\n"
        "            use by another excb process, 78 bad config or a checkpoint of another run,\n"
        "            128 + N stopped by signal N with a checkpoint (129 SIGHUP, 130 SIGINT, 143 SIGTERM)\n");
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

/* The options every command shares: the model shape and the data. */
typedef struct {
    const char *config, *data, *split, *out;
    int G, L, B, K, T, reps, min_s, workers, blur, skip_bad, seconds, images, epoch;
    int device, precision;
    int memory;                /* bench --memory: print the memory plan and stop                     */
    int method;                /* bench --method: the balancing rule (excb_methods[])                */
    long seed;
} Options;

static int parse_enum(const char *v, const char *const *names, int n) {
    for (int i = 0; i < n && names[i]; i++)
        if (!strcmp(v, names[i])) return i;
    return -1;
}

/* an option with a fixed set of values (--device, --precision, --blur): *out = the value's index in
   names, or a usage error that lists them */
static const char *device_names[] = {"auto", "cpu", "cuda"};             /* in ExcbDevice's order    */

static int parse_choice(const char *cmd, const char *opt, const char *v, const char *const *names, int n, int *out) {
    int i = parse_enum(v, names, n);
    if (i >= 0) {
        *out = i;
        return 0;
    }
    fprintf(stderr, "excb %s: %s is", cmd, opt);
    for (int j = 0; j < n; j++) fprintf(stderr, "%s %s", j == 0 ? "" : j == n - 1 ? " or" : ",", names[j]);
    fprintf(stderr, ", not '%s'\n", v);
    return EXCB_EXIT_USAGE;
}

/* auto: the GPU when one answers, else the CPU, and stderr says which and why; cuda: the GPU or exit 69.
   The CPU runs FP32 only: another precision there is a usage error, not a silent substitution. */
static int resolve_device(const char *cmd, int *device, int precision, const ExcbConfig *c, int quiet) {
    char desc[512];
    const ExcbMethod *me = excb_methods[c->method];
    const char *cpu_only = me->cpu_only ? me->cpu_only(c) : NULL;
    if ((!me->cuda || cpu_only) && *device == EXCB_DEVICE_CUDA) {      /* never a silent CPU run */
        fprintf(stderr, "excb %s: --device cuda: %s%s%s has no GPU twin yet; it runs with --device cpu\n", cmd,
                cpu_only ? "" : "method '", cpu_only ? cpu_only : me->name, cpu_only ? "" : "'");
        return EXCB_EXIT_USAGE;
    }
    if ((!me->cuda || cpu_only) && *device == EXCB_DEVICE_AUTO) {
        *device = EXCB_DEVICE_CPU;
        if (!quiet) fprintf(stderr, "excb %s: --device auto: %s%s%s has no GPU twin yet; running on the CPU\n", cmd,
                            cpu_only ? "" : "method '", cpu_only ? cpu_only : me->name, cpu_only ? "" : "'");
    }
    if (*device != EXCB_DEVICE_CPU) {
        int code = excb_cuda_probe(desc, sizeof desc);
        if (!code) {
            *device = EXCB_DEVICE_CUDA;
            if (!quiet) fprintf(stderr, "excb %s: device: %s\n", cmd, desc);
            return 0;
        }
        if (*device == EXCB_DEVICE_CUDA) { fprintf(stderr, "excb %s: --device cuda: %s\n", cmd, desc); return code; }
        *device = EXCB_DEVICE_CPU;
        if (!quiet) fprintf(stderr, "excb %s: --device auto: %s; running on the CPU\n", cmd, desc);
    }
    if (precision != EXCB_PRECISION_FP32) {
        fprintf(stderr, "excb %s: --precision %s needs the GPU; the CPU path is FP32\n", cmd,
                precision == EXCB_PRECISION_TF32 ? "tf32" : "bf16");
        return EXCB_EXIT_USAGE;
    }
    return 0;
}

static int parse_options(const char *cmd, int argc, char **argv, Options *o) {
    *o = (Options){.config = "resnet20s", .L = -1, .reps = 3, .min_s = 4, .workers = 1, .device = EXCB_DEVICE_CPU,
                   .blur = EXCB_BLUR_AS_RUN, .seconds = 10, .images = 8};
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--skip-bad-images")) { o->skip_bad = 1; continue; }
        if (!strcmp(a, "--memory")) { o->memory = 1; continue; }
        if (!v) { fprintf(stderr, "excb %s: option '%s' needs a value (or is unknown)\n", cmd, a); return EXCB_EXIT_USAGE; }
        i++;
        if (!strcmp(a, "--config")) o->config = v;
        else if (!strcmp(a, "--data")) o->data = v;
        else if (!strcmp(a, "--split")) o->split = v;
        else if (!strcmp(a, "--out")) o->out = v;
        else if (!strcmp(a, "--global-size")) o->G = parse_int(a, v, 4, 4096);
        else if (!strcmp(a, "--local-size")) o->L = parse_int(a, v, 0, 4096);
        else if (!strcmp(a, "--batch")) o->B = parse_int(a, v, 2, 1 << 20);
        else if (!strcmp(a, "--K")) o->K = parse_int(a, v, 2, 1 << 24);
        else if (!strcmp(a, "--threads")) o->T = parse_int(a, v, 1, 4096);
        else if (!strcmp(a, "--reps")) o->reps = parse_int(a, v, 1, 1000);
        else if (!strcmp(a, "--min-seconds")) o->min_s = parse_int(a, v, 0, 100000);
        else if (!strcmp(a, "--workers")) o->workers = parse_int(a, v, 0, 256);
        else if (!strcmp(a, "--seconds")) o->seconds = parse_int(a, v, 1, 100000);
        else if (!strcmp(a, "--images")) o->images = parse_int(a, v, 1, 64);
        else if (!strcmp(a, "--epoch")) o->epoch = parse_int(a, v, 0, 1 << 30);
        else if (!strcmp(a, "--seed")) o->seed = parse_int(a, v, 0, INT32_MAX);
        else if (!strcmp(a, "--device")) { if (parse_choice(cmd, a, v, device_names, 3, &o->device)) return EXCB_EXIT_USAGE; }
        else if (!strcmp(a, "--precision")) { if (parse_choice(cmd, a, v, precision_names, 3, &o->precision)) return EXCB_EXIT_USAGE; }
        else if (!strcmp(a, "--blur")) { if (parse_choice(cmd, a, v, blur_names, 2, &o->blur)) return EXCB_EXIT_USAGE; }
        else if (!strcmp(a, "--method")) {
            const char *names[16] = {0};
            int n = 0;
            while (excb_methods[n] && n < 15) { names[n] = excb_methods[n]->name; n++; }
            if (parse_choice(cmd, a, v, names, n, &o->method)) return EXCB_EXIT_USAGE;
        }
        else { fprintf(stderr, "excb %s: unknown option '%s'\n", cmd, a); return EXCB_EXIT_USAGE; }
    }
    return 0;
}

static int config_from(const char *cmd, const Options *o, ExcbConfig *cfg) {
    if (excb_config_named(cfg, o->config)) {
        fprintf(stderr, "excb %s: unknown config '%s' (resnet20s, resnet18, resnet50, tiny, tiny50)\n", cmd, o->config);
        return EXCB_EXIT_USAGE;
    }
    if (o->G) cfg->global_size = o->G;
    if (o->L == 0) cfg->n_local = 0;
    else if (o->L > 0) cfg->local_size = o->L;
    if (o->B) cfg->batch = o->B;
    if (o->K) cfg->K = o->K;
    if (o->T) cfg->threads = o->T;
    cfg->seed = (uint64_t)o->seed;
    cfg->method = o->method;
    return 0;
}

/* open --data and a loader over it; the model's channel count follows the data */
static int open_data(const char *cmd, const Options *o, ExcbConfig *cfg, ExcbDataset *ds, ExcbLoader *L) {
    char err[EXCB_ERR_LEN];
    int code = excb_data_open(ds, o->data, o->split, err);
    if (code) { fprintf(stderr, "excb %s: %s\n", cmd, err); return code; }
    ds->skip_bad = o->skip_bad;
    cfg->in_ch = ds->channels;
    ExcbViewConfig vc;
    excb_view_config_for(&vc, cfg, 100, o->blur);
    fprintf(stderr, "excb %s: %s (%s split): %ld images, %s, %d class(es)\n", cmd, ds->path, ds->split, ds->n,
            ds->height ? (ds->channels == 1 ? "gray" : "RGB") : "RGB, sizes vary", ds->n_classes);
    code = excb_loader_open(L, ds, &vc, cfg->batch, o->workers, 0, err);
    if (code) { fprintf(stderr, "excb %s: %s\n", cmd, err); excb_data_close(ds); }
    return code;
}

static double median_of(double *v, int n, double *lo, double *hi) {
    qsort(v, n, sizeof(double), cmp_double);
    *lo = v[0];
    *hi = v[n - 1];
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

/* bench --memory: what the model of a configuration takes, part by part, before anything is allocated;
   the loader's batches and the evaluation's features come on top of it */
static int print_memory_plan(const ExcbConfig *cfg) {
    ExcbMemoryPlan p;
    if (excb_memory_plan(cfg, &p)) return EXCB_EXIT_USAGE;
    size_t n_params = p.params / (4 * sizeof(real));
    size_t common = p.params + p.state + p.acts_global + p.acts_local + p.heads + p.backward;
    int big = common + p.cpu_scratch >= ((size_t)1 << 30);     /* GiB, or MiB for small models      */
    const double unit = big ? 1073741824.0 : 1048576.0;
    const char *uname = big ? "GiB" : "MiB";
    char label[9][160];
    snprintf(label[0], sizeof label[0], "parameters: 4 buffers x %zu floats (weights, gradients, momentum, teacher)", n_params);
    snprintf(label[1], sizeof label[1], "BN running statistics (student, teacher), the method's state (ExCB: s)");
    snprintf(label[2], sizeof label[2], "backbone activations, %d x %d global crops of %d^2", cfg->n_global, cfg->batch, cfg->global_size);
    snprintf(label[3], sizeof label[3], "backbone activations, %d x %d local crops of %d^2", cfg->n_local, cfg->batch,
             cfg->n_local ? cfg->local_size : 0);
    snprintf(label[4], sizeof label[4], "features, heads, the criterion's (rows x K=%d) matrices", cfg->K);
    snprintf(label[5], sizeof label[5], "backward scratch: 3 backbone-sized, 4 head-sized gradient buffers");
    snprintf(label[6], sizeof label[6], "CPU only: im2col panels (%d threads), weight-gradient slots", p.threads);
    snprintf(label[7], sizeof label[7], "GPU only, at most: NCHW copies for cuDNN's packed directions");
    snprintf(label[8], sizeof label[8], "GPU only, less: the shortcuts' BN outputs kept in a gradient buffer");
    double part[9] = {p.params, p.state, p.acts_global, p.acts_local, p.heads, p.backward, p.cpu_scratch, p.gpu_packed,
                      -(double)p.gpu_shared_shortcuts};
    printf("excb bench %s G=%d L=%d B=%d K=%d: memory plan (counted, nothing allocated)\n", cfg->name,
           cfg->global_size, cfg->n_local ? cfg->local_size : 0, cfg->batch, cfg->K);
    for (int i = 0; i < 9; i++) printf("  %-86s %9.3f %s\n", label[i], part[i] / unit, uname);
    printf("  %-86s %9.3f %s\n", "total on the CPU", (common + p.cpu_scratch) / unit, uname);
    printf("  %-86s %9.3f %s\n", "total on the GPU, at most, before cuDNN's workspace",
           (common + p.gpu_packed + n_params - p.gpu_shared_shortcuts) / unit, uname);   /* + 1-byte groups */
    return 0;
}

/* The whole training step, timed. With --data, repetitions alternate between the fixed random inputs
   and batches from the loader (its workers running alongside), and each pair gives one ratio. */
/* the benchmark's fixed random views, view-major: this rank's rows v B + r B/R + i of the global batch's
   (one process: all of them), so that the ranks together step the one process's inputs */
static void bench_inputs(real *x, int views, int Bl, int R, int rank, size_t pix, uint64_t seed, int stream) {
    for (size_t e = 0; e < (size_t)views * Bl * pix; e++) {
        size_t row = e / pix, v = row / Bl, global_row = v * Bl * R + (size_t)rank * Bl + row % Bl;
        x[e] = excb_normal(seed, EXCB_RNG_BENCH, stream, 0, global_row * pix + e % pix);
    }
}

static int cmd_bench(int argc, char **argv) {
    Options o;
    ExcbConfig cfg;
    int code = parse_options("bench", argc, argv, &o);
    if (code || (code = config_from("bench", &o, &cfg))) return code;
    if (o.memory) return print_memory_plan(&cfg);
    ExcbDataset ds;
    ExcbLoader L;
    if (o.data && (code = open_data("bench", &o, &cfg, &ds, &L))) return code;
    /* under mpirun (section 10b): each rank steps its share of the same global batch of random inputs,
       on the CPU unless --device cuda says otherwise (as excb train) */
    int R = mpi_world.size > 1 ? mpi_world.size : 1, rank = mpi_world.rank, B = cfg.batch;
    if (R > 1 && (o.data || B % R || B / R < 2)) {
        if (!rank) fprintf(stderr, "excb bench: under mpirun, random inputs and a batch of at least 2 images a rank "
                           "that the %d ranks divide (B = %d)\n", R, B);
        return EXCB_EXIT_USAGE;
    }
    if (R > 1 && o.device == EXCB_DEVICE_AUTO) o.device = EXCB_DEVICE_CPU;
    if ((code = resolve_device("bench", &o.device, o.precision, &cfg, R > 1))) return code;
    cfg.batch = B / R;
    cfg.ranks = R;
    ExcbModel host, dm, *mp = &host;
    if (excb_build(&host, &cfg)) return EXCB_EXIT_USAGE;
    if (R > 1) host.comm = &mpi_world;
    size_t gpix = (size_t)cfg.in_ch * cfg.global_size * cfg.global_size;
    size_t lpix = (size_t)cfg.in_ch * cfg.local_size * cfg.local_size;
    size_t ng = (size_t)cfg.n_global * cfg.batch * gpix, nl = (size_t)cfg.n_local * cfg.batch * lpix;
    real *xg = xmalloc(sizeof(real) * ng), *xl = xmalloc(sizeof(real) * (nl + 1));
    bench_inputs(xg, cfg.n_global, cfg.batch, R, rank, gpix, cfg.seed, 0);
    bench_inputs(xl, cfg.n_local, cfg.batch, R, rank, lpix, cfg.seed, 1);
    char err[EXCB_ERR_LEN];
    real *dxg = NULL, *dxl = NULL;
    if (o.device == EXCB_DEVICE_CUDA) {
        if (o.data) { fprintf(stderr, "excb bench: --data runs on the CPU only\n"); return EXCB_EXIT_USAGE; }
        char how[300];                          /* ranks: each its GPU, joined by NCCL or through MPI */
        if (R > 1 && !(code = excb_cuda_join(&mpi_world, (ExcbPrecision)o.precision, how, sizeof how, err)) && !rank)
            fprintf(stderr, "excb bench: %s\n", how);
        if (code || (code = excb_cuda_attach(&dm, &host, (ExcbPrecision)o.precision, err))) {
            if (R > 1) excb_cuda_leave(&mpi_world, 1);
            fprintf(stderr, "excb bench: %s\n", err);
            return code;
        }
        mp = &dm;
        dxg = excb_cuda_alloc(ng);                  /* fixed inputs live on the GPU, as the peer's do */
        dxl = excb_cuda_alloc(nl + 1);
        excb_cuda_copy_to_device(dxg, xg, ng);
        excb_cuda_copy_to_device(dxl, xl, nl);
        free(xg);
        free(xl);
        xg = dxg;
        xl = dxl;
    }
    ExcbModel *m = mp;                          /* the model that steps: host or its GPU twin   */
    double tm, sm;
    excb_count_macs(m, &tm, &sm);
    double flop_per_img = 2 * tm + 6 * sm;      /* teacher forward + student forward and backward */
    ExcbStepStats st;
    double t0 = now_seconds();
    if (excb_step(m, xg, xl, &st)) { fprintf(stderr, "excb bench: loss diverged\n"); return EXCB_EXIT_DIVERGED; }
    excb_cuda_synchronize();
    double warm = now_seconds() - t0;
    int steps = warm > 0 ? (int)ceil(o.min_s / warm) : 1;
    if (steps < 1) steps = 1;
    if (R > 1) {                                 /* every rank the same steps: rank 0's count */
        excb_comm_broadcast(&mpi_world, &steps, sizeof steps);
        mpi_world.seconds = mpi_world.bytes = 0;     /* the timed steps' reductions only */
        mpi_world.calls = 0;
    }
    /* with --data, random and loaded steps alternate one by one, so slow drifts of the machine hit
       both alike; each repetition's two rates give one ratio */
    double ips[1000], ips_data[1000], ratio[1000];
    for (int r = 0; r < o.reps; r++) {
        double t_random = 0, t_data = 0;
        t0 = now_seconds();
        for (int s = 0; s < steps; s++) {
            if (o.data) t0 = now_seconds();
            if (excb_step(m, xg, xl, &st)) { fprintf(stderr, "excb bench: loss diverged\n"); return EXCB_EXIT_DIVERGED; }
            if (o.data) t_random += now_seconds() - t0;
            if (!o.data) continue;
            t0 = now_seconds();
            ExcbBatch *bt;
            if ((code = excb_loader_next(&L, &bt, err))) { fprintf(stderr, "excb bench: %s\n", err); return code; }
            if (excb_step(m, bt->xg, bt->xl, &st)) { fprintf(stderr, "excb bench: loss diverged\n"); return EXCB_EXIT_DIVERGED; }
            t_data += now_seconds() - t0;
        }
        excb_cuda_synchronize();                     /* the GPU's last step has finished          */
        if (!o.data) t_random = now_seconds() - t0;
        ips[r] = (double)B * steps / t_random;       /* the global batch's images */
        if (o.data) {
            ips_data[r] = cfg.batch * steps / t_data;
            ratio[r] = ips_data[r] / ips[r];
        }
    }
    double lo, hi, med = median_of(ips, o.reps, &lo, &hi);
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    if (o.device == EXCB_DEVICE_CUDA && !rank) {
        size_t now_b, peak_b;
        excb_cuda_memory(&now_b, &peak_b);
        int gpus = R > 1 ? mpi_world.gpus : 1;              /* the ranks' distinct GPUs (10b) */
        double peak_flops = gpus * excb_cuda_peak_flops((ExcbPrecision)o.precision);
        int plans, packed;
        excb_cuda_conv_report(&plans, &packed);
        printf("excb bench %s G=%d L=%d B=%d K=%d device=cuda precision=%s: %.2f img/s [%.2f–%.2f] | %.1f GFLOP/s "
               "(%.4f GFLOP/img) = %.1f %% of %s %s peak %.1f TFLOP/s | GPU memory peak %.1f MiB | host peak %.1f MiB "
               "| %d reps x %d steps | loss %.5f | cuDNN: %d shapes, %d directions on packed copies, %d without a "
               "deterministic algorithm\n",
               cfg.name, cfg.global_size, cfg.n_local ? cfg.local_size : 0, B, cfg.K, precision_names[o.precision],
               med, lo, hi, flop_per_img * med / 1e9, flop_per_img / 1e9,
               peak_flops > 0 ? 100 * flop_per_img * med / peak_flops : 0.0, gpus > 1 ? "the GPUs'" : "the GPU's",
               precision_names[o.precision], peak_flops / 1e12,
               peak_b / 1048576.0, ru.ru_maxrss / 1024.0, o.reps, steps, st.loss, plans, packed,
               excb_cuda_nondeterministic_plans());
    } else if (!rank) {
        printf("excb bench %s G=%d L=%d B=%d K=%d threads=%d: %.2f img/s [%.2f–%.2f] | %.1f GFLOP/s "
               "(%.4f GFLOP/img) | peak %.1f MiB | %d reps x %d steps | loss %.5f\n",
               cfg.name, cfg.global_size, cfg.n_local ? cfg.local_size : 0, B, cfg.K, m->max_threads,
               med, lo, hi, flop_per_img * med / 1e9, flop_per_img / 1e9,
               ru.ru_maxrss / 1024.0, o.reps, steps, st.loss);
    }
    if (R > 1 && !rank)
        printf("excb bench: %d ranks (Open MPI%s), %d images each: %.1f ms a step in %.0f reductions of %.2f MB from "
               "each rank (waits for the other ranks included), of %.1f ms a step\n", R,
               mpi_world.device_sum_real ? " and NCCL" : "", cfg.batch, 1e3 * mpi_world.seconds / (o.reps * steps),
               (double)mpi_world.calls / (o.reps * steps), mpi_world.bytes / (o.reps * steps) / 1e6,
               1e3 * B / med);
    if (o.data) {
        double dlo, dhi, dmed = median_of(ips_data, o.reps, &dlo, &dhi), rlo, rhi, rmed = median_of(ratio, o.reps, &rlo, &rhi);
        printf("excb bench %s on %s (%d loader worker(s)): %.2f img/s [%.2f–%.2f] = %.3f [%.3f–%.3f] of random "
               "inputs | loader busy %.1f s of %.1f s | bad images skipped %ld\n",
               cfg.name, ds.path, o.workers, dmed, dlo, dhi, rmed, rlo, rhi, L.busy_seconds,
               cfg.batch ? (double)L.consumed * cfg.batch / dmed : 0, ds.n_bad);
        excb_loader_close(&L);
        excb_data_close(&ds);
    }
    if (mp != &host) {
        excb_cuda_free(dxg, ng);
        excb_cuda_free(dxl, nl + 1);
        excb_cuda_detach(&dm);
        if (R > 1) excb_cuda_leave(&mpi_world, 0);
    } else {
        free(xg);
        free(xl);
    }
    excb_free(&host);
    return 0;
}

/* The loader alone: decode + views, in views per second. The run is cut into --reps windows of equal
   length (batches arrive in bursts when several workers run, so single batches are not timed). */
static int cmd_bench_data(int argc, char **argv) {
    Options o;
    ExcbConfig cfg;
    int code = parse_options("bench-data", argc, argv, &o);
    if (code || (code = config_from("bench-data", &o, &cfg))) return code;
    if (!o.data) { fprintf(stderr, "excb bench-data: --data is required\n"); return EXCB_EXIT_USAGE; }
    ExcbDataset ds;
    ExcbLoader L;
    if ((code = open_data("bench-data", &o, &cfg, &ds, &L))) return code;
    char err[EXCB_ERR_LEN];
    ExcbBatch *bt;
    if ((code = excb_loader_next(&L, &bt, err))) { fprintf(stderr, "excb bench-data: %s\n", err); return code; }  /* warm-up */
    int views = cfg.n_global + cfg.n_local, reps = o.reps < 1000 ? o.reps : 1000;
    double rate[1000], window = (double)o.seconds / reps, start = now_seconds();
    for (int r = 0; r < reps; r++) {
        double t0 = now_seconds(), t = t0;
        long batches = 0;
        while (t - t0 < window || batches == 0) {
            if ((code = excb_loader_next(&L, &bt, err))) { fprintf(stderr, "excb bench-data: %s\n", err); return code; }
            batches++;
            t = now_seconds();
        }
        rate[r] = (double)batches * cfg.batch * views / (t - t0);
    }
    double total = now_seconds() - start, lo, hi, med = median_of(rate, reps, &lo, &hi);
    int W = o.workers > 0 ? o.workers : 1;
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    printf("excb bench-data %s: %d x %d + %d x %d views, B=%d, %d worker(s): %.0f views/s [%.0f–%.0f] "
           "(%.0f images/s) | per worker %.0f views/s | %d windows in %.1f s | peak %.1f MiB | bad images skipped %ld\n",
           ds.path, cfg.n_global, cfg.global_size, cfg.n_local, cfg.local_size, cfg.batch, o.workers,
           med, lo, hi, med / views, med / W, reps, total, ru.ru_maxrss / 1024.0, ds.n_bad);
    excb_loader_close(&L);
    excb_data_close(&ds);
    return 0;
}

/* A PNG grid: one row per image, its views left to right (local views are drawn at their own size,
   top-aligned), undoing the normalisation. For looking at what the network is trained on. */
static int cmd_views(int argc, char **argv) {
    Options o;
    ExcbConfig cfg;
    int code = parse_options("views", argc, argv, &o);
    if (code || (code = config_from("views", &o, &cfg))) return code;
    if (!o.data || !o.out) { fprintf(stderr, "excb views: --data and --out are required\n"); return EXCB_EXIT_USAGE; }
    cfg.batch = o.images;
    o.workers = 0;
    ExcbDataset ds;
    ExcbLoader L;
    if ((code = open_data("views", &o, &cfg, &ds, &L))) return code;
    L.first_batch = (long)o.epoch * L.batches_per_epoch;                      /* first batch of --epoch */
    char err[EXCB_ERR_LEN];
    ExcbBatch *bt;
    if ((code = excb_loader_next(&L, &bt, err))) { fprintf(stderr, "excb views: %s\n", err); return code; }
    int G = cfg.global_size, Ls = cfg.local_size, C = cfg.in_ch, pad = 2;
    int W = cfg.n_global * (G + pad) + cfg.n_local * (Ls + pad), H = cfg.batch * (G + pad);
    uint8_t *grid = xcalloc((size_t)W * H * C, 1);
    for (int b = 0; b < cfg.batch; b++)
        for (int v = 0; v < cfg.n_global + cfg.n_local; v++) {
            int S = v < cfg.n_global ? G : Ls, x0 = v < cfg.n_global ? v * (G + pad) : cfg.n_global * (G + pad) + (v - cfg.n_global) * (Ls + pad);
            const real *src = v < cfg.n_global ? bt->xg + ((size_t)v * cfg.batch + b) * C * G * G
                                               : bt->xl + ((size_t)(v - cfg.n_global) * cfg.batch + b) * C * Ls * Ls;
            for (int c = 0; c < C; c++)
                for (int y = 0; y < S; y++)
                    for (int x = 0; x < S; x++) {
                        double val = (src[((size_t)c * S + y) * S + x] * L.vc.std[c] + L.vc.mean[c]) * 255.0;
                        grid[(((size_t)b * (G + pad) + y) * W + x0 + x) * C + c] = (uint8_t)fmin(255, fmax(0, nearbyint(val)));
                    }
        }
    code = excb_write_png(o.out, grid, H, W, C, err);
    if (code) fprintf(stderr, "excb views: %s\n", err);
    else printf("excb views: wrote %s (%d images x %d views, epoch %d)\n", o.out, cfg.batch, cfg.n_global + cfg.n_local, o.epoch);
    free(grid);
    excb_loader_close(&L);
    excb_data_close(&ds);
    return code;
}

/* --- excb train ------------------------------------------------------------------------------------
 * Settings are applied in order: the preset (--preset, or the config file's first line, or
 * fashion-mnist), the config file (--config), then every --set and shortcut option in the order given. */
#define MAX_SETS 256
typedef struct { char key[64], value[1100]; } Setting;

/* one more setting (key_len < 0: all of key), in command-line order; 0, or 64 when there are too many */
static int push_setting(const char *cmd, Setting *sets, int *n, const char *key, int key_len, const char *value) {
    if (*n == MAX_SETS) { fprintf(stderr, "excb %s: more than %d settings\n", cmd, MAX_SETS); return EXCB_EXIT_USAGE; }
    snprintf(sets[*n].key, sizeof sets[*n].key, "%.*s", key_len < 0 ? (int)strlen(key) : key_len, key);
    snprintf(sets[*n].value, sizeof sets[*n].value, "%s", value);
    (*n)++;
    return 0;
}

/* the settings of a command line, applied in order (an ExcbSettingsHook) */
typedef struct { const Setting *s; int n; } SettingList;
static int apply_settings(ExcbRunConfig *rc, void *ctx, char *err) {
    const SettingList *l = ctx;
    for (int i = 0; i < l->n; i++) {
        int code = excb_config_set(rc, l->s[i].key, l->s[i].value, err);
        if (code) return code;
    }
    return 0;
}

/* A checkpoint, or a run directory's newest good one (its path into path[4200]), into rc and a model
   built from its config; hook (may be NULL) applies further settings first. 0 or an exit code. */
static int checkpoint_model(const char *target, ExcbSettingsHook hook, void *ctx, ExcbRunConfig *rc, ExcbModel *m,
                            char *path, char *err) {
    int code, in_ch = 0;
    char *text = NULL;
    memset(m, 0, sizeof *m);
    if (is_dir(target)) {
        if ((code = excb_find_checkpoint(target, path, 4200, 1, err))) return code;
    } else snprintf(path, 4200, "%s", target);
    memset(rc, 0, sizeof *rc);
    code = checkpoint_config(path, &text, &in_ch, err);
    if (!code) code = excb_config_parse(rc, text, path, err);
    free(text);
    if (code) return code;
    if (in_ch > 0) rc->model.in_ch = in_ch;
    if (hook && (code = hook(rc, ctx, err))) return code;
    if ((code = excb_config_validate(rc, err))) return code;
    if (excb_build(m, &rc->model)) return fail(err, EXCB_EXIT_CONFIG, "checkpoint %s: its config does not build a model", path);
    ExcbTrainState ts;
    if ((code = excb_checkpoint_load(path, m, &ts, err))) { excb_free(m); return code; }
    excb_train_state_free(&ts);
    return 0;
}

/* The model a command evaluates: of a checkpoint or run directory, or (weights) of a safetensors file,
   whose prefix set is the student's when asked; info says what the file held (a checkpoint holds all) */
static int model_of(const char *target, int weights, int student, ExcbSettingsHook hook, void *ctx, ExcbRunConfig *rc,
                    ExcbModel *m, char *path, ExcbWeightsInfo *info, char *err) {
    *info = (ExcbWeightsInfo){.heads = 1};
    if (!weights) return checkpoint_model(target, hook, ctx, rc, m, path, err);
    snprintf(path, 4200, "%s", target);
    return excb_weights_load(target, student ? "student" : NULL, hook, ctx, rc, m, info, err);
}

/* images with the channels the network takes, or exit 65 said on stderr for command `cmd` */
static int data_fits_model(const char *cmd, const ExcbDataset *ds, const ExcbModel *m, const char *path) {
    if (ds->channels == m->cfg.in_ch) return 0;
    fprintf(stderr, "excb %s: %s has %d-channel images, the network of %s takes %d\n", cmd, ds->path, ds->channels, path,
            m->cfg.in_ch);
    return EXCB_EXIT_DATA;
}

static int help_config(void) {
    ExcbRunConfig rc;
    char err[EXCB_ERR_LEN];
    excb_preset(&rc, "fashion-mnist", err);
    char val[1200];
    printf("config keys (config file lines 'key = value', or --set key=value); the value shown is the fashion-mnist\n"
           "preset's, then the key's default (- : the preset's own) and its range; * marks keys that shape the\n"
           "trajectory and must match on --resume\n\n");
    for (size_t i = 0; i < n_config_keys(); i++) {
        const ConfigKey *k = config_key(i);
        char range[64] = "";
        config_value(&rc, k, val, sizeof val);
        if (k->type == EXCB_KEY_INT || k->type == EXCB_KEY_LONG || k->type == EXCB_KEY_DOUBLE)
            snprintf(range, sizeof range, "[%g, %g]", k->lo, k->hi);
        printf("  %c %-28s %-16s %-14s %-18s %s\n", k->trajectory ? '*' : ' ', k->key, val, k->def ? k->def : "-", range,
               k->help);
    }
    printf("\nmethods (key 'method'):\n");
    for (int j = 0; excb_methods[j]; j++)
        printf("  %-6s %s%s\n", excb_methods[j]->name, excb_methods[j]->summary,
               excb_methods[j]->cuda ? "" : " [CPU only]");
    return 0;
}

/* a config file: a regular file of at most 1 MiB (a run's config.txt is about 2 KB) */
static int read_text_file(const char *path, char **out, char *err) {
    uint8_t *raw = NULL;
    size_t cap = 0, n = 0;
    int code = read_whole_file(path, &raw, &cap, &n, 1 << 20, err);
    if (code) { free(raw); return code == EXCB_EXIT_DATA ? EXCB_EXIT_CONFIG : code; }   /* too large: 78 */
    char *buf = (char *)raw;
    buf[n] = 0;
    if (memchr(buf, 0, n)) { free(buf); return fail(err, EXCB_EXIT_CONFIG, "%s: not a text file (NUL byte)", path); }
    *out = buf;
    return 0;
}

static int cmd_train(int argc, char **argv) {
    const char *preset = NULL, *config_file = NULL, *out = NULL;
    int resume = 0, force = 0, quiet = 0, n_sets = 0;
    static Setting sets[MAX_SETS];
    char err[EXCB_ERR_LEN];
    static const struct { const char *opt, *key; } shortcut[] = {
        {"--data", "data"}, {"--epochs", "epochs"}, {"--seed", "seed"}, {"--threads", "threads"},
        {"--workers", "workers"}, {"--batch", "batch"}, {"--K", "K"},
    };
    long stop_after = 0;
    int device = EXCB_DEVICE_AUTO, precision = EXCB_PRECISION_FP32, chunks = 1;
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) { usage(stdout); return 0; }
        if (!strcmp(a, "--help-config")) return help_config();
        if (!strcmp(a, "--resume")) { resume = 1; continue; }
        if (!strcmp(a, "--force")) { force = 1; continue; }
        if (!strcmp(a, "--quiet") || !strcmp(a, "-q")) { quiet = 1; continue; }
        if (!strcmp(a, "--skip-bad-images")) {             /* = --set skip_bad=1, in its place in the order */
            if (push_setting("train", sets, &n_sets, "skip_bad", -1, "1")) return EXCB_EXIT_USAGE;
            continue;
        }
        if (!v) { fprintf(stderr, "excb train: option '%s' needs a value (or is unknown)\n", a); return EXCB_EXIT_USAGE; }
        i++;
        if (!strcmp(a, "--preset")) { preset = v; continue; }
        if (!strcmp(a, "--config")) { config_file = v; continue; }
        if (!strcmp(a, "--out")) { out = v; continue; }
        if (!strcmp(a, "--device")) { if (parse_choice("train", a, v, device_names, 3, &device)) return EXCB_EXIT_USAGE; continue; }
        if (!strcmp(a, "--precision")) { if (parse_choice("train", a, v, precision_names, 3, &precision)) return EXCB_EXIT_USAGE; continue; }
        if (!strcmp(a, "--chunks")) {
            char *end;
            chunks = (int)strtol(v, &end, 10);
            if (*end || chunks < 1 || chunks > 1024) { fprintf(stderr, "excb train: --chunks needs a count in [1, 1024], got '%s'\n", v); return EXCB_EXIT_USAGE; }
            continue;
        }
        if (!strcmp(a, "--stop-after")) {
            char *end;
            stop_after = strtol(v, &end, 10);
            if (*end || stop_after < 1) { fprintf(stderr, "excb train: --stop-after needs a step count >= 1, got '%s'\n", v); return EXCB_EXIT_USAGE; }
            continue;
        }
        if (!strcmp(a, "--set")) {
            const char *eq = strchr(v, '=');
            if (!eq || eq == v) { fprintf(stderr, "excb train: --set needs key=value, got '%s'\n", v); return EXCB_EXIT_USAGE; }
            if (push_setting("train", sets, &n_sets, v, (int)(eq - v), eq + 1)) return EXCB_EXIT_USAGE;
            continue;
        }
        size_t s;
        for (s = 0; s < sizeof shortcut / sizeof shortcut[0]; s++)
            if (!strcmp(a, shortcut[s].opt)) break;
        if (s == sizeof shortcut / sizeof shortcut[0]) { fprintf(stderr, "excb train: unknown option '%s'\n", a); return EXCB_EXIT_USAGE; }
        if (push_setting("train", sets, &n_sets, shortcut[s].key, -1, v)) return EXCB_EXIT_USAGE;
    }
    ExcbRunConfig rc;
    memset(&rc, 0, sizeof rc);
    int code;
    if (preset && (code = excb_preset(&rc, preset, err))) { fprintf(stderr, "excb train: %s\n", err); return code; }
    char *text = NULL;
    if (config_file) {
        if ((code = read_text_file(config_file, &text, err)) || (code = excb_config_parse(&rc, text, config_file, err))) {
            fprintf(stderr, "excb train: %s\n", err);
            free(text);
            return code;
        }
        free(text);
    }
    if (!rc.preset[0]) excb_preset(&rc, "fashion-mnist", err);
    for (int i = 0; i < n_sets; i++)
        if ((code = excb_config_set(&rc, sets[i].key, sets[i].value, err))) { fprintf(stderr, "excb train: %s\n", err); return code; }
    if ((code = excb_config_validate(&rc, err))) { fprintf(stderr, "excb train: %s\n", err); return code; }
    char dir[4096];
    if (out) snprintf(dir, sizeof dir, "%s", out);
    else snprintf(dir, sizeof dir, "runs/%s", rc.preset);
    /* one process per run directory (section 17): a live run's lock first, so that nothing below even
       looks at a directory another process is working in; the checks then only read, and a refused
       command (64, 66, 78) changes nothing */
    int lock_fd = -1, writer = mpi_world.rank == 0;      /* under mpirun, rank 0 holds the lock (10b) */
    if (writer && is_dir(dir) && (code = excb_lock_run_dir(dir, 0, &lock_fd, err))) { fprintf(stderr, "excb train: %s\n", err); return code; }
    char ckpt[4200] = "";
    static long steps[4096];
    int existing = list_checkpoints(dir, steps, 4096, 0);     /* newest first; removes nothing */
    if (resume) {
        if ((code = excb_find_checkpoint(dir, ckpt, sizeof ckpt, 1, err))) { fprintf(stderr, "excb train --resume: %s\n", err); return code; }
        /* the run's own config, with this command line's settings on top; they must not change the run */
        ExcbRunConfig saved;
        memset(&saved, 0, sizeof saved);
        if ((code = excb_checkpoint_config(ckpt, &text, err)) || (code = excb_config_parse(&saved, text, ckpt, err))) {
            fprintf(stderr, "excb train --resume: %s\n", err);
            free(text);
            return code;
        }
        free(text);
        /* the checkpoint must be this directory's run: every trajectory key of its config equal to
           config.txt's (a checkpoint copied in from another run is refused, exit 78) */
        ExcbRunConfig own;
        memset(&own, 0, sizeof own);
        char own_path[4200];
        path_in(own_path, sizeof own_path, dir, "config.txt");
        if ((code = read_text_file(own_path, &text, err)) || (code = excb_config_parse(&own, text, own_path, err))) {
            fprintf(stderr, "excb train --resume: %s\n", err);
            free(text);
            return code;
        }
        free(text);
        if ((code = excb_config_compatible(&own, &saved, err))) {
            fprintf(stderr, "excb train --resume: %s is not this run's checkpoint: %s says otherwise: %s\n", ckpt, own_path, err);
            return code;
        }
        /* validated once merged: a saved value outside today's range (threads = 2000 from an older
           excb) can be overridden when it does not shape the trajectory (--threads 2) */
        ExcbRunConfig merged = saved;
        for (int i = 0; i < n_sets && !code; i++) code = excb_config_set(&merged, sets[i].key, sets[i].value, err);
        if (code || (code = excb_config_validate(&merged, err)) || (code = excb_config_compatible(&merged, &saved, err))) {
            fprintf(stderr, "excb train --resume %s: %s\n", ckpt, err);
            return code;
        }
        rc = merged;
    } else if (existing && !force) {
        fprintf(stderr, "excb train: %s already holds a run (checkpoint at step %ld): continue it with --resume, "
                "or start over with --force (which deletes its checkpoints and metrics)\n", dir, steps[0]);
        return EXCB_EXIT_USAGE;
    }
    /* the device, for the run's final config (on --resume: the checkpoint's method), settled before
       anything in the run directory is touched */
    if (device == EXCB_DEVICE_AUTO && (chunks > 1 || mpi_world.size > 1))
        device = EXCB_DEVICE_CPU;                  /* several ranks train on the CPU for now (section 10b) */
    if ((code = resolve_device("train", &device, precision, &rc.model, quiet))) return code;
    /* the ranks can share this run (10b), and under mpirun every rank has checked all of the above, before
       rank 0 changes anything */
    rc.chunks = chunks;
    rc.device = device;
    if ((code = ranks_refusal(&rc, err))) { if (writer) fprintf(stderr, "excb train: %s\n", err); return code; }
    if (mpi_world.size > 1) excb_comm_max(&mpi_world, 0);
    /* the run goes ahead: its directory, the lock with this pid; then, under the lock, the leftover
       ckpt-*.tmp of a process that died, and with --force the old checkpoints */
    if ((code = mkdir_p(dir, err)) || (writer && (code = excb_lock_run_dir(dir, 1, &lock_fd, err)))) { fprintf(stderr, "excb train: %s\n", err); return code; }
    if (writer) {
        existing = list_checkpoints(dir, steps, 4096, 1);
        for (int i = 0; force && !resume && i < existing; i++) { char p[4200]; ckpt_path(p, sizeof p, dir, steps[i]); unlink(p); }
    }
    rc.stop_after = stop_after;
    rc.precision = precision;
    code = excb_train(&rc, dir, resume ? ckpt : NULL, quiet, err);
    if (code && !rank_exit_silent) fprintf(stderr, "excb train: %s\n", err);
    if (lock_fd >= 0) close(lock_fd);       /* the lock ends here (or with the process) */
    return code;
}

/* --- excb eval ------------------------------------------------------------------------------------ */
static int cmd_eval(int argc, char **argv) {
    const char *target = NULL;
    int student = 0, pixels = 0, weights = 0, n_sets = 0;
    static Setting sets[MAX_SETS];
    char err[EXCB_ERR_LEN];
    static const struct { const char *opt, *key; } shortcut[] = {
        {"--data", "data"}, {"--knn-k", "knn_k"}, {"--knn-t", "knn_t"}, {"--bank-split", "bank_split"},
        {"--query-split", "query_split"}, {"--probe-epochs", "probe_epochs"}, {"--probe-lr", "probe_lr"},
        {"--probe-wd", "probe_wd"}, {"--probe-batch", "probe_batch"}, {"--threads", "threads"},
    };
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) { usage(stdout); return 0; }
        if (!strcmp(a, "--student")) { student = 1; continue; }
        if (!strcmp(a, "--pixels")) { pixels = 1; continue; }
        if (!strcmp(a, "--weights")) { weights = 1; continue; }      /* the target is a safetensors file */
        if (!strcmp(a, "--skip-bad-images")) {
            if (push_setting("eval", sets, &n_sets, "skip_bad", -1, "1")) return EXCB_EXIT_USAGE;
            continue;
        }
        if (a[0] != '-') {
            if (target) { fprintf(stderr, "excb eval: one checkpoint or run directory, got '%s' and '%s'\n", target, a); return EXCB_EXIT_USAGE; }
            target = a;
            continue;
        }
        if (!v) { fprintf(stderr, "excb eval: option '%s' needs a value (or is unknown)\n", a); return EXCB_EXIT_USAGE; }
        i++;
        const char *key = NULL;
        int key_len = -1;
        if (!strcmp(a, "--set")) {
            const char *eq = strchr(v, '=');
            if (!eq || eq == v) { fprintf(stderr, "excb eval: --set needs key=value, got '%s'\n", v); return EXCB_EXIT_USAGE; }
            key = v;
            key_len = (int)(eq - v);
            v = eq + 1;
        } else {
            for (size_t s = 0; s < sizeof shortcut / sizeof shortcut[0]; s++)
                if (!strcmp(a, shortcut[s].opt)) key = shortcut[s].key;
        }
        if (!key) { fprintf(stderr, "excb eval: unknown option '%s'\n", a); return EXCB_EXIT_USAGE; }
        if (push_setting("eval", sets, &n_sets, key, key_len, v)) return EXCB_EXIT_USAGE;
    }
    if (!target == !pixels || (pixels && weights)) {
        fprintf(stderr, "excb eval: %s\n", pixels ? "--pixels evaluates the pixels, not a checkpoint or weights: drop one of the two"
                                                  : "which checkpoint? excb eval CHECKPOINT|RUN_DIR, --weights FILE.safetensors or --pixels");
        return EXCB_EXIT_USAGE;
    }
    char path[4200] = "";
    int code;
    ExcbRunConfig rc;
    SettingList more = {sets, n_sets};
    EvalSets es;
    EvalResult res;
    if (pixels) {
        excb_preset(&rc, "fashion-mnist", err);        /* its evaluation settings; --data, --set change them */
        if ((code = apply_settings(&rc, &more, err)) || (code = excb_config_validate(&rc, err)) ||
            (code = open_eval_sets(&rc, &es, err))) { fprintf(stderr, "excb eval: %s\n", err); return code; }
        rc.model.in_ch = es.bank.channels;
        /* square images of one size are taken whole; others are resized and centre-cropped to global_size */
        if (es.bank.height && es.bank.height == es.bank.width) rc.model.global_size = es.bank.height;
        if ((code = evaluate(NULL, &rc, &es, 0, 0, EVAL_FULL, 0, &res, err))) fprintf(stderr, "excb eval: %s\n", err);
        else {
            printf("excb eval --pixels %s\n", es.bank.path);
            print_eval(stdout, NULL, &rc, &es, &res, 0);
        }
        close_eval_sets(&es);
        return code;
    }
    ExcbModel m;
    ExcbWeightsInfo info;
    if ((code = model_of(target, weights, student, apply_settings, &more, &rc, &m, path, &info, err))) {
        fprintf(stderr, "excb eval: %s\n", err);
        return code;
    }
    if ((code = open_eval_sets(&rc, &es, err))) { fprintf(stderr, "excb eval: %s\n", err); excb_free(&m); return code; }
    if ((code = data_fits_model("eval", &es.bank, &m, path))) { excb_free(&m); close_eval_sets(&es); return code; }
    fprintf(stderr, "excb eval: %s (step %ld)\n", path, m.step);
    int teacher = !student && !m.method->student_only;   /* a student-only method's teacher never ran */
    int what = info.heads ? EVAL_FULL : EVAL_PROBE;       /* no prototypes in the file: no clusters   */
    code = evaluate(&m, &rc, &es, 0, 0, what, teacher, &res, err);
    if (code) fprintf(stderr, "excb eval: %s\n", err);
    else {
        printf("excb eval %s%s\n", weights ? "--weights " : "", path);
        print_eval(stdout, &m, &rc, &es, &res, teacher);
        if (!info.heads) printf("clusters: none (%s has no projector and prototypes)\n", path);
    }
    excb_free(&m);
    close_eval_sets(&es);
    return code;
}

/* --- excb export, import, features: weights and features for other tools (section 16b) --------------
 * export    CHECKPOINT|RUN_DIR --out FILE.safetensors [--student] [--backbone-only]
 * import    FILE.safetensors --out CHECKPOINT [--student] [--set KEY=VALUE]...
 * features  CHECKPOINT|RUN_DIR|--weights FILE --out FILE.safetensors [--data SPEC] [--split S] [--student]
 * The network is the teacher's unless --student (a student-only method: the student), as in excb eval. */
typedef struct {
    const char *target, *out, *data, *split;
    int student, backbone_only, weights;
    Setting sets[MAX_SETS];
    int n_sets;
} WeightsArgs;

/* the three commands' options; `allowed` names those the command takes. 0, 64, or -1 after --help */
static int weights_args(const char *cmd, int argc, char **argv, const char *allowed, WeightsArgs *a) {
    memset(a, 0, sizeof *a);
    for (int i = 0; i < argc; i++) {
        const char *o = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        size_t lo = strlen(o);
        int takes = 0;                                   /* o is one of the words of `allowed` */
        for (const char *w = strstr(allowed, o); w && !takes; w = strstr(w + 1, o))
            takes = lo > 1 && (w == allowed || w[-1] == ' ') && (w[lo] == ' ' || !w[lo]);
        if (!strcmp(o, "--help") || !strcmp(o, "-h")) { usage(stdout); return -1; }
        if (o[0] != '-') {
            if (a->target) { fprintf(stderr, "excb %s: one input, got '%s' and '%s'\n", cmd, a->target, o); return EXCB_EXIT_USAGE; }
            a->target = o;
        } else if (!takes) {
            fprintf(stderr, "excb %s: unknown option '%s' (this command takes %s)\n", cmd, o, allowed);
            return EXCB_EXIT_USAGE;
        } else if (!strcmp(o, "--student")) a->student = 1;
        else if (!strcmp(o, "--teacher")) a->student = 0;
        else if (!strcmp(o, "--backbone-only")) a->backbone_only = 1;
        else if (!strcmp(o, "--weights")) a->weights = 1;
        else if (!v) { fprintf(stderr, "excb %s: option '%s' needs a value\n", cmd, o); return EXCB_EXIT_USAGE; }
        else {
            i++;
            if (!strcmp(o, "--out")) a->out = v;
            else if (!strcmp(o, "--data")) a->data = v;
            else if (!strcmp(o, "--split")) a->split = v;
            else {                                                        /* --set KEY=VALUE */
                const char *eq = strchr(v, '=');
                if (!eq || eq == v) { fprintf(stderr, "excb %s: --set needs key=value, got '%s'\n", cmd, v); return EXCB_EXIT_USAGE; }
                if (push_setting(cmd, a->sets, &a->n_sets, v, (int)(eq - v), eq + 1)) return EXCB_EXIT_USAGE;
            }
        }
    }
    if (a->data && push_setting(cmd, a->sets, &a->n_sets, "data", -1, a->data)) return EXCB_EXIT_USAGE;
    if (!a->target || !a->out) {
        fprintf(stderr, "excb %s: %s (excb --help)\n", cmd, !a->target ? "which input?" : "--out FILE is needed");
        return EXCB_EXIT_USAGE;
    }
    return 0;
}

/* the three commands' start: their options (`weights` 1: the input is a weights file whatever the
   options say), then the model of the checkpoint or the safetensors file and the network read (1 the
   teacher, 0 the student). 0, an exit code said on stderr, or -1 after --help */
static int weights_command(const char *cmd, int argc, char **argv, const char *allowed, int weights, WeightsArgs *a,
                           ExcbRunConfig *rc, ExcbModel *m, char *path, ExcbWeightsInfo *info, int *teacher) {
    char err[EXCB_ERR_LEN];
    int code = weights_args(cmd, argc, argv, allowed, a);
    if (code) return code;
    a->weights |= weights;
    SettingList more = {a->sets, a->n_sets};
    code = model_of(a->target, a->weights, a->student, apply_settings, &more, rc, m, path, info, err);
    if (code) { fprintf(stderr, "excb %s: %s\n", cmd, err); return code; }
    *teacher = !a->student && !m->method->student_only;
    return 0;
}

static int cmd_export(int argc, char **argv) {
    WeightsArgs a;
    ExcbRunConfig rc;
    ExcbModel m;
    ExcbWeightsInfo info;
    char path[4200], err[EXCB_ERR_LEN];
    int teacher, code = weights_command("export", argc, argv, "--out --student --teacher --backbone-only", 0, &a, &rc, &m,
                                        path, &info, &teacher);
    if (code) return code < 0 ? 0 : code;
    char *text = excb_config_dump(&rc, 0);
    code = excb_weights_save(a.out, &m, teacher, a.backbone_only, text, err);
    if (code) fprintf(stderr, "excb export: %s\n", err);
    else fprintf(stderr, "excb export: %s (step %ld, the %s) -> %s: %s names%s\n", path, m.step, teacher ? "teacher" : "student",
                 a.out, a.backbone_only ? "torchvision's" : "excb's (the official code's)",
                 a.backbone_only ? ", the backbone alone" : "");
    free(text);
    excb_free(&m);
    return code;
}

static int cmd_import(int argc, char **argv) {
    WeightsArgs a;
    ExcbRunConfig rc;
    ExcbModel m;
    ExcbWeightsInfo info;
    char path[4200], err[EXCB_ERR_LEN];
    int teacher, code = weights_command("import", argc, argv, "--out --student --teacher --set", 1, &a, &rc, &m, path,
                                        &info, &teacher);
    if (code) return code < 0 ? 0 : code;
    ExcbTrainState ts = {0};                          /* no training state: step as exported, the rest 0 */
    ts.prev_labels = xmalloc(sizeof(int32_t));
    ts.epoch_counts = xcalloc(m.n_labels + 1, sizeof(int64_t));
    char *text = excb_config_dump(&rc, 0);
    code = excb_checkpoint_save(a.out, &m, &ts, text, err);
    if (code) fprintf(stderr, "excb import: %s\n", err);
    else fprintf(stderr, "excb import: %s -> %s: %d tensors%s%s%s, %s, %s\n", path, a.out, info.matched,
                 info.set[0] ? " of the " : "", info.set, info.set[0] ? " set" : "",
                 info.from_excb ? "excb's config" : "the backbone read off the names and shapes",
                 info.heads ? "heads from the file" : "heads initialised from the seed (not in the file)");
    free(text);
    excb_train_state_free(&ts);
    excb_free(&m);
    return code;
}

static int cmd_features(int argc, char **argv) {
    WeightsArgs a;
    ExcbRunConfig rc;
    ExcbModel m;
    ExcbWeightsInfo info;
    char path[4200], err[EXCB_ERR_LEN];
    int teacher, code = weights_command("features", argc, argv, "--out --student --teacher --weights --data --split --set",
                                        0, &a, &rc, &m, path, &info, &teacher);
    if (code) return code < 0 ? 0 : code;
    const char *split = a.split ? a.split : rc.query_split;
    ExcbDataset ds;
    if ((code = excb_data_open(&ds, rc.data, split, err))) { fprintf(stderr, "excb features: %s\n", err); excb_free(&m); return code; }
    if ((code = data_fits_model("features", &ds, &m, path))) { excb_data_close(&ds); excb_free(&m); return code; }
    ExcbViewConfig vc;
    excb_view_config_for(&vc, &m.cfg, rc.epochs, rc.blur);
    long n = ds.n;
    int D = m.D;
    real *feat = xmalloc(sizeof(real) * (n * D + 1));
    code = excb_extract_features(&m, teacher, &ds, &vc, NULL, n, feat, NULL, err);
    if (!code) {
        float *f32 = xmalloc(sizeof(float) * (n * D + 1));
        int64_t *labels = xmalloc(sizeof(int64_t) * (n + 1));
        for (long i = 0; i < n * D; i++) f32[i] = (float)feat[i];
        for (long i = 0; i < n; i++) labels[i] = ds.labels ? ds.labels[i] : -1;
        StOut o[2] = {{.name = "features", .dtype = EXCB_ST_F32, .ndim = 2, .shape = {n, D}, .data = f32, .bytes = sizeof(float) * n * D},
                      {.name = "labels", .dtype = EXCB_ST_I64, .ndim = 1, .shape = {n}, .data = labels, .bytes = sizeof(int64_t) * n}};
        char step[32];
        snprintf(step, sizeof step, "%ld", m.step);
        json_t *meta = json_pack("{s:s, s:s, s:s, s:s, s:s, s:s, s:s, s:s}", "format", "np", "excb.version", EXCB_VERSION,
                                 "excb.weights", path, "excb.network", teacher ? "teacher" : "student", "excb.step", step,
                                 "excb.data", ds.path, "excb.split", split, "excb.features",
                                 "the backbone's pooled output, BatchNorm running statistics, the evaluation view "
                                 "(the whole image, or resize to G*256/224 and centre-crop G), as excb eval; labels -1: none");
        code = meta ? st_write(a.out, o, 2, meta, err)
                    : fail(err, EXCB_EXIT_DATA, "%s: the paths %s and %s go into its metadata, which takes UTF-8 text only",
                           a.out, path, ds.path);
        json_decref(meta);
        free(f32); free(labels);
    }
    if (code) fprintf(stderr, "excb features: %s\n", err);
    else fprintf(stderr, "excb features: %s (step %ld, the %s), %s (%s split): %ld x %d -> %s\n", path, m.step,
                 teacher ? "teacher" : "student", ds.path, split, n, D, a.out);
    free(feat);
    excb_data_close(&ds);
    excb_free(&m);
    return code;
}

/* --- excb plot --------------------------------------------------------------------------------------
 * Reads RUN_DIR/metrics.jsonl (and the newest checkpoint's cluster sizes), writes the curves as plain
 * columns into RUN_DIR/plots/ (steps.dat, epochs.dat, cluster_sizes.dat) with a gnuplot script, and runs gnuplot (Debian: gnuplot-nox) on it.
 * The .dat files and plots.gp stay: the plots can be redrawn or restyled without excb. */
/* metrics.jsonl and eval.json are read back with jansson, a record at a time: a number field (NAN when
   it is absent, null or not a number), and a record's "type" */
static double json_number(const json_t *o, const char *key) {
    const json_t *v = json_object_get(o, key);
    return json_is_number(v) ? json_number_value(v) : NAN;
}

static int json_record_is(const json_t *o, const char *type) {
    const char *t = json_string_value(json_object_get(o, "type"));
    return t && !strcmp(t, type);
}

static int cmp_real_desc(const void *a, const void *b) {
    real x = *(const real *)a, y = *(const real *)b;
    return (x < y) - (x > y);
}

/* fclose that reports a failed write (ENOSPC, EIO) of anything written through f: 0 or exit 74 */
static int close_checked(FILE *f, const char *path, const char *cmd) {
    int bad = ferror(f) | fflush(f);
    int e = errno;
    if (fclose(f) && !bad) { bad = 1; e = errno; }
    if (!bad) return 0;
    fprintf(stderr, "excb %s: writing %s failed: %s\n", cmd, path, strerror(e ? e : EIO));
    return EXCB_EXIT_IO;
}

/* gnuplot on DIR/plots.gp, run in DIR (its warnings into DIR/gnuplot.log): 0, or exit 69 (not
   installed) or 70 (it failed), said on stderr for command `cmd` */
static int run_gnuplot(const char *cmd, const char *dir) {
    pid_t pid = fork();
    if (pid == 0) {
        if (chdir(dir)) _exit(127);
        int devnull = open("/dev/null", O_WRONLY), log = open("gnuplot.log", O_WRONLY | O_CREAT | O_TRUNC, 0666);
        if (devnull >= 0) dup2(devnull, STDOUT_FILENO);
        if (log >= 0) dup2(log, STDERR_FILENO);          /* its warnings (e.g. a one-epoch x range) */
        execlp("gnuplot", "gnuplot", "plots.gp", (char *)NULL);
        _exit(127);
    }
    int status = 0;
    if (pid < 0 || waitpid(pid, &status, 0) < 0) { fprintf(stderr, "excb %s: cannot start gnuplot: %s\n", cmd, strerror(errno)); return EXCB_EXIT_UNAVAILABLE; }
    if (WIFEXITED(status) && WEXITSTATUS(status) == 127) {
        fprintf(stderr, "excb %s: gnuplot not found (apt-get install gnuplot-nox); the data and script are in %s\n", cmd, dir);
        return EXCB_EXIT_UNAVAILABLE;
    }
    if (!WIFEXITED(status) || WEXITSTATUS(status)) {
        fprintf(stderr, "excb %s: gnuplot failed on %s/plots.gp (its messages: %s/gnuplot.log)\n", cmd, dir, dir);
        return EXCB_EXIT_SOFTWARE;
    }
    return 0;
}

static int cmd_plot(int argc, char **argv) {
    if (argc != 1 || argv[0][0] == '-') {
        if (argc == 1 && (!strcmp(argv[0], "--help") || !strcmp(argv[0], "-h"))) { usage(stdout); return 0; }
        fprintf(stderr, "excb plot: usage: excb plot RUN_DIR\n");
        return EXCB_EXIT_USAGE;
    }
    const char *dir = argv[0];
    char path[4400], err[EXCB_ERR_LEN], plots[4200];
    path_in(path, sizeof path, dir, "metrics.jsonl");
    size_t bytes;
    int fd, code = open_input(path, SIZE_MAX, &fd, &bytes, err);     /* a FIFO would block fopen */
    FILE *in = code ? NULL : fdopen(fd, "r");
    if (!in) { fprintf(stderr, "excb plot: %s\n", code ? err : strerror(errno)); return code ? code : EXCB_EXIT_OSERR; }
    path_in(plots, sizeof plots, dir, "plots");
    if (mkdir_p(plots, err)) { fclose(in); fprintf(stderr, "excb plot: %s\n", err); return EXCB_EXIT_CANTCREAT; }
    char p1[4400], p2[4400];
    path_in(p1, sizeof p1, plots, "steps.dat");
    path_in(p2, sizeof p2, plots, "epochs.dat");
    FILE *fs = fopen(p1, "w"), *fe = fopen(p2, "w");
    if (!fs || !fe) { fclose(in); fprintf(stderr, "excb plot: cannot write into %s\n", plots); return EXCB_EXIT_CANTCREAT; }
    fprintf(fs, "# step loss lr teacher_conf student_conf distinct_frac assign_entropy changed_labels\n");
    fprintf(fe, "# epoch(1-based) loss empty_clusters cluster_size_min cluster_size_max label_entropy_norm knn_top1 (first k)\n");
    char *line = NULL;
    size_t line_cap = 0;
    long n_steps = 0, n_epochs = 0, n_knn = 0;
    int knn_k = 20;
    while (getline(&line, &line_cap, in) >= 0) {
        json_t *o = json_loads(line, 0, NULL);                /* a line that is not a record: skipped */
        if (json_record_is(o, "step")) {
            fprintf(fs, "%ld %.9g %.9g %.9g %.9g %.9g %.9g %.9g\n", (long)json_number(o, "step"), json_number(o, "loss"),
                    json_number(o, "lr"), json_number(o, "teacher_conf"), json_number(o, "student_conf"),
                    json_number(o, "distinct_frac"), json_number(o, "assign_entropy"), json_number(o, "changed_labels"));
            n_steps++;
        } else if (json_record_is(o, "epoch")) {
            double knn = json_number(o, "knn_top1_k20");      /* k = 20 (the README's), else the first k */
            const char *key;
            json_t *v;
            if (!isnan(knn)) knn_k = 20;
            else json_object_foreach(o, key, v)
                if (!strncmp(key, "knn_top1_k", 10) && json_is_number(v)) {
                    knn_k = atoi(key + 10);
                    knn = json_number_value(v);
                    break;
                }
            n_knn += !isnan(knn);
            fprintf(fe, "%ld %.9g %.9g %.9g %.9g %.9g %.9g\n", (long)json_number(o, "epoch") + 1, json_number(o, "loss"),
                    json_number(o, "empty_clusters"), json_number(o, "cluster_size_min"),
                    json_number(o, "cluster_size_max"), json_number(o, "label_entropy_norm"), knn);
            n_epochs++;
        }
        json_decref(o);
    }
    free(line);
    fclose(in);
    int bad_fs = close_checked(fs, p1, "plot"), bad_fe = close_checked(fe, p2, "plot");
    if (bad_fs || bad_fe) return EXCB_EXIT_IO;
    if (!n_steps) { fprintf(stderr, "excb plot: %s has no step records yet\n", path); return EXCB_EXIT_DATA; }
    /* the cluster-size distribution: the newest checkpoint's s, sorted, times K (1 = the balanced size) */
    char ck[4200];
    int have_sizes = 0;
    if (!excb_find_checkpoint(dir, ck, sizeof ck, 1, err)) {
        CkFile f;
        if (!ck_open(ck, &f, err)) {
            for (int i = 0; i < f.l.n; i++)
                if (!strcmp(f.l.e[i].name, "method.cluster_sizes") && f.l.e[i].dtype == CK_F32) {
                    long K = (long)f.l.e[i].shape[0];
                    real *s = xmalloc(sizeof(real) * K);
                    memcpy(s, f.l.e[i].data, sizeof(real) * K);
                    qsort(s, K, sizeof(real), cmp_real_desc);
                    path_in(p1, sizeof p1, plots, "cluster_sizes.dat");
                    FILE *fc = fopen(p1, "w");
                    if (fc) {
                        fprintf(fc, "# rank  s_k*K (sorted; 1 = every cluster equally used)  from %s\n", ck);
                        for (long k = 0; k < K; k++) fprintf(fc, "%ld %.9g\n", k + 1, (double)s[k] * K);
                        if (close_checked(fc, p1, "plot")) { free(s); ck_close(&f); return EXCB_EXIT_IO; }
                        have_sizes = 1;
                    }
                    free(s);
                }
            ck_close(&f);
        }
    }
    path_in(p1, sizeof p1, plots, "plots.gp");
    FILE *g = fopen(p1, "w");
    if (!g) { fprintf(stderr, "excb plot: cannot write %s\n", p1); return EXCB_EXIT_CANTCREAT; }
    fprintf(g, "# excb plot: gnuplot script (run from %s)\nset terminal png size 960,540\nset grid\nset key outside right\n"
               "set output 'loss.png'\nset title 'ExCB loss (E8) per step'\nset xlabel 'step'\n"
               "plot 'steps.dat' using 1:2 with lines title 'loss'\n"
               "set output 'diagnostics.png'\nset title 'teacher/student confidence, distinct clusters per batch / B'\n"
               "plot 'steps.dat' using 1:4 with lines title 'teacher conf', '' using 1:5 with lines title 'student conf', "
               "'' using 1:6 with lines title 'distinct / B', '' using 1:8 with lines title 'changed labels'\n"
               "set output 'clusters.png'\nset title 'cluster usage per epoch (hard teacher labels)'\nset xlabel 'epoch'\n"
               "set logscale y\nplot 'epochs.dat' using 1:($3+0.5) with linespoints title 'empty clusters (+0.5)', "
               "'' using 1:($4+0.5) with linespoints title 'min size (+0.5)', '' using 1:5 with linespoints title 'max size'\n"
               "unset logscale y\n", plots);
    if (n_knn)
        fprintf(g, "set output 'knn.png'\nset title 'k-NN top-1 (%%), k = %d, during training (subsets)'\nset xlabel 'epoch'\n"
                   "plot 'epochs.dat' using 1:7 with linespoints title 'k-NN top-1'\n", knn_k);
    if (have_sizes)
        fprintf(g, "set output 'cluster_sizes.png'\nset title 'cluster-size estimate s (E3), sorted, times K'\n"
                   "set xlabel 'rank'\nset ylabel 's_k K'\nset logscale y\n"
                   "plot 'cluster_sizes.dat' using 1:2 with lines title 's_k K', 1 with lines dashtype 2 title 'balanced'\n");
    if (close_checked(g, p1, "plot")) return EXCB_EXIT_IO;
    if ((code = run_gnuplot("plot", plots))) return code;
    printf("excb plot: %s/{loss,diagnostics,clusters%s%s}.png from %ld steps, %ld epochs\n", plots, n_knn ? ",knn" : "",
           have_sizes ? ",cluster_sizes" : "", n_steps, n_epochs);
    return 0;
}

/* --- excb inspect: a checkpoint's table, verified (every CRC checked on the way) ---------------- */
static int cmd_inspect(int argc, char **argv) {
    if (argc != 1 || argv[0][0] == '-') { fprintf(stderr, "excb inspect: usage: excb inspect CHECKPOINT\n"); return EXCB_EXIT_USAGE; }
    char err[EXCB_ERR_LEN];
    CkFile ck;
    int code = ck_open(argv[0], &ck, err);
    if (code) { fprintf(stderr, "excb inspect: %s\n", err); return code; }
    printf("%s: excb checkpoint version %d, %d entries, %zu bytes, every CRC-32 verified\n", argv[0], CK_VERSION, ck.l.n, ck.len);
    for (int i = 0; i < ck.l.n; i++) {
        const CkEntry *e = &ck.l.e[i];
        char shape[96] = "";
        for (uint32_t j = 0; j < e->ndim; j++)
            snprintf(shape + strlen(shape), sizeof shape - strlen(shape), j ? "x%llu" : "%llu", (unsigned long long)e->shape[j]);
        printf("%-64s %-4s %-18s crc32 %08x\n", e->name, ck_dtype_name[e->dtype], shape, e->crc);
    }
    ck_close(&ck);
    return 0;
}

/* --- excb audit: grids of runs that put a claim to the test (paper_notes.md §10b) -----------------
 * `excb audit small-batch` trains each method of the comparison at each batch size on the same number
 * of images and evaluates it; `excb audit ablations` trains each audit switch of paper_notes.md §10
 * against the default at one small and one large batch. Each run is an ordinary run directory,
 * AUDIT/NAME, made by `excb train` itself (this program, in a child process: the lock, the resume
 * checks and the evaluation are the ones every run has), so `excb plot` and `excb eval` read it too.
 *   - Resuming: a run with eval.json (or a diverged-STEP.txt: divergence is a result) is finished and
 *     is read, never redone; one with a checkpoint goes on with --resume; one without starts afresh.
 *     AUDIT/NAME/audit.txt holds the settings the audit gave the run: when they differ from what this
 *     audit would give (another --quick, another --set), the audit stops with exit 78 rather than mix
 *     two experiments in one table.
 *   - Progress: a line on stderr per run started and ended, with the wall time so far and the ETA of
 *     the whole audit (the mean time of the runs this invocation has finished, times those left).
 *   - Output: AUDIT/table.md (markdown), AUDIT/results.tsv (one row per run), AUDIT/plots/ (gnuplot).
 *   - A signal stops the children at their next step with a checkpoint (they share the terminal's
 *     process group; a kill of this process alone is passed on), and the audit exits 128 + signal:
 *     the same command continues it.
 * The grids, the training budget and the lr rule are the tables below. */
typedef struct { const char *id, *title, *sets; } AuditArm;    /* sets: key=value, separated by blanks */

/* small-batch: each method at its defaults in this harness (paper_notes.md §5b, §5c), with what the
   budget needs: SwAV's queue (3840 rows, a multiple of every B of the grid, as the official 3840 at
   B = 256) starts at the second of the two epochs; CoKe's three heads are K's 3:4:5 (3000, 4000, 5000
   around K = 4096 officially) */
static const AuditArm audit_methods[] = {
    {"excb", "excb", "method=excb"},
    {"none", "none (no balancing)", "method=none"},
    {"dino", "dino", "method=dino"},
    {"swav", "swav (no queue)", "method=swav"},
    {"swav-queue", "swav (queue)", "method=swav swav_queue_length=3840 swav_queue_start_epoch=1"},
    {"coke", "coke", "method=coke coke_k=768,1024,1280"},
    {"carp", "carp", "method=carp"},
};
/* ablations: ExCB with one audit switch away from the official code's choice (paper_notes.md §10) */
static const AuditArm audit_switches[] = {
    {"default", "default (the official code)", ""},
    {"A1-no-boost", "A1 no argmax boost", "boost=0"},
    {"A2-no-clamp", "A2 no clamp", "clamp=1000000"},
    {"A4-raw-counts", "A4 counts before balancing", "count_source=raw"},
    {"A4-soft-counts", "A4 soft counts", "count_kind=soft"},
    {"A4-fp32-term", "A4 float32 count term", "fp16_count_term=0"},
    {"A7-dino-pairing", "A7 DINO's pairing (14 terms)", "pairing=swapped"},
    {"A8A9-no-predictor", "A8/A9 no predictor", "predictor=0"},
    {"A9-predictor-grad", "A9 predictor rows train the centroids", "predictor_centroid_grad=1"},
    {"A10-no-wd-boost", "A10 no centroid wd boost", "centroid_wd_boost=0"},
    {"A11-dino-scales", "A11 DINO's fixed crop scales", "crop_scales=dino"},
    {"A12-random-init", "A12 random centroids", "kmeans_init=0"},
    {"A18-tau-warmup", "A18 teacher temperature 0.02 -> 0.04", "tau_t_warmup=0.02 tau_t_warmup_epochs=1"},
    {"A19-lr-linear", "A19 lr scaled with B", "lr_scaling=linear"},
};
static const int audit_small_batches[] = {16, 32, 64, 128, 256}, audit_ablation_batches[] = {16, 256},
                 audit_quick_batches[] = {16};

/* The budget every run of an audit gets, on top of the default preset (fashion-mnist: ResNet-8,
   K = 1024, 2 x 28 + 6 x 12 crops, 2 epochs, lr 0.6 at every B, the official rule, A19): the first
   10,000 training images (evenly spaced), so 20,000 images seen at every B; k-NN once, at the end, on
   all 60,000 / 10,000. --quick: 2,000 images (4,000 seen), for CI. */
#define AUDIT_BUDGET "train_images=10000 knn_every=0"
#define AUDIT_BUDGET_QUICK "train_images=2000 knn_every=0 kmeans_samples=4000"

typedef struct {
    const AuditArm *arm;
    int batch;
    char dir[4200], sets[4096];
    int finished, diverged;
    long steps;
    double knn, nmi, probe, distinct_end, distinct_min, entropy_end, empty_end, wall;
} AuditRun;

/* a run's results: eval.json, metrics.jsonl (the A21 monitors), audit-wall.txt */
static void audit_read(AuditRun *r, FILE *curve) {
    char path[4400], err[EXCB_ERR_LEN], *text = NULL;
    r->knn = r->nmi = r->probe = r->distinct_end = r->distinct_min = r->entropy_end = r->empty_end = r->wall = NAN;
    r->steps = 0;
    path_in(path, sizeof path, r->dir, "eval.json");
    if (!read_text_file(path, &text, err)) {
        json_t *o = json_loads(text, 0, NULL);
        r->knn = json_number(o, "knn_top1_k20");
        r->nmi = json_number(o, "nmi");
        r->probe = json_number(o, "probe_test_top1");
        json_decref(o);
        free(text);
    }
    path_in(path, sizeof path, r->dir, "audit-wall.txt");
    if (!read_text_file(path, &text, err)) { r->wall = strtod(text, NULL); free(text); }
    path_in(path, sizeof path, r->dir, "metrics.jsonl");
    FILE *f = fopen(path, "r");
    if (!f) return;
    char *line = NULL;
    size_t line_cap = 0;
    double *d = NULL, *h = NULL;
    long n = 0, cap = 0;
    while (getline(&line, &line_cap, f) >= 0) {
        json_t *o = json_loads(line, 0, NULL);
        if (json_record_is(o, "step")) {
            if (n == cap) {
                cap = cap ? 2 * cap : 1024;
                d = realloc(d, sizeof(double) * cap);
                h = realloc(h, sizeof(double) * cap);
                if (!d || !h) { fprintf(stderr, "excb audit: out of memory\n"); exit(EXCB_EXIT_OSERR); }
            }
            d[n] = json_number(o, "distinct_frac");
            h[n] = json_number(o, "assign_entropy");
            r->steps = (long)json_number(o, "step");
            if (curve) fprintf(curve, "%ld %.6g\n", r->steps, d[n]);
            n++;
        } else if (json_record_is(o, "epoch")) r->empty_end = json_number(o, "empty_clusters");
        json_decref(o);
    }
    free(line);
    fclose(f);
    if (n) {                  /* the end: the mean over the last tenth of the records; the minimum over all */
        long from = n - (n + 9) / 10;
        double sd = 0, sh = 0;
        r->distinct_min = d[0];
        for (long i = 0; i < n; i++) r->distinct_min = fmin(r->distinct_min, d[i]);
        for (long i = from; i < n; i++) { sd += d[i]; sh += h[i]; }
        r->distinct_end = sd / (n - from);
        r->entropy_end = sh / (n - from);
    }
    free(d);
    free(h);
}

/* what state the run directory is in: 1 finished (evaluated or diverged), 0 to (re)start or resume */
static int audit_finished(AuditRun *r) {
    char path[4400];
    path_in(path, sizeof path, r->dir, "eval.json");
    struct stat st;
    if (!stat(path, &st)) return r->finished = 1;
    DIR *dd = opendir(r->dir);
    if (dd) {
        struct dirent *e;
        while ((e = readdir(dd)))
            if (!strncmp(e->d_name, "diverged-", 9)) r->diverged = r->finished = 1;
        closedir(dd);
    }
    return r->finished;
}

/* the child: excb train --out DIR --quiet (--resume | --force) [--threads T] --set ... > DIR/log.txt */
static pid_t audit_launch(const char *exe, const AuditRun *r, int resume, const char *threads) {
    static char copy[4096], *args[1100];
    int n = 0;
    args[n++] = "excb"; args[n++] = "train"; args[n++] = "--quiet"; args[n++] = "--out"; args[n++] = (char *)r->dir;
    args[n++] = resume ? "--resume" : "--force";
    if (threads) { args[n++] = "--threads"; args[n++] = (char *)threads; }
    snprintf(copy, sizeof copy, "%s", r->sets);
    for (char *tok = strtok(copy, " "); tok && n < 1096; tok = strtok(NULL, " ")) { args[n++] = "--set"; args[n++] = tok; }
    args[n] = NULL;
    char log[4400];
    path_in(log, sizeof log, r->dir, "log.txt");
    pid_t pid = fork();
    if (pid == 0) {
        int fd = open(log, O_WRONLY | O_CREAT | O_APPEND, 0666);
        if (fd >= 0) { dup2(fd, STDOUT_FILENO); dup2(fd, STDERR_FILENO); }
        execv(exe, args);
        _exit(127);
    }
    return pid;
}

static atomic_int audit_signal;
static void audit_on_signal(int sig) { int none = 0; atomic_compare_exchange_strong(&audit_signal, &none, sig); }

static void audit_duration(char *out, size_t cap, double s) {
    if (!isfinite(s)) snprintf(out, cap, "?");
    else if (s < 3600) snprintf(out, cap, "%dm%02ds", (int)(s / 60), (int)s % 60);
    else snprintf(out, cap, "%dh%02dm", (int)(s / 3600), (int)(s / 60) % 60);
}

static void audit_cell(FILE *f, double v, const char *fmt) {
    if (isnan(v)) fprintf(f, " n/a |");
    else { fputc(' ', f); fprintf(f, fmt, v); fprintf(f, " |"); }
}

/* table.md and results.tsv */
static int audit_tables(const char *out, int ablations, AuditRun *runs, int n_runs, const int *batches, int n_batches,
                        const AuditArm *arms, int n_arms, const char *budget, double wall) {
    char path[4400], tmp[64];
    int vs_default = ablations && !strcmp(arms[0].id, "default");   /* the change columns: against the default */
    path_in(path, sizeof path, out, "results.tsv");
    FILE *t = fopen(path, "w");
    if (!t) { fprintf(stderr, "excb audit: cannot write %s: %s\n", path, strerror(errno)); return EXCB_EXIT_CANTCREAT; }
    fprintf(t, "arm\tbatch\tsteps\tknn_top1_k20\tnmi\tprobe_top1\tdistinct_frac_end\tdistinct_frac_min\tassign_entropy_end\t"
               "empty_clusters_end\tdiverged\twall_s\n");
    for (int i = 0; i < n_runs; i++) {
        AuditRun *r = &runs[i];
        fprintf(t, "%s\t%d\t%ld\t%.4f\t%.4f\t%.4f\t%.4f\t%.4f\t%.4f\t%.0f\t%d\t%.1f\n", r->arm->id, r->batch, r->steps,
                r->knn, r->nmi, r->probe, r->distinct_end, r->distinct_min, r->entropy_end, r->empty_end, r->diverged, r->wall);
    }
    int code = close_checked(t, path, "audit");
    if (code) return code;
    path_in(path, sizeof path, out, "table.md");
    FILE *f = fopen(path, "w");
    if (!f) { fprintf(stderr, "excb audit: cannot write %s: %s\n", path, strerror(errno)); return EXCB_EXIT_CANTCREAT; }
    audit_duration(tmp, sizeof tmp, wall);
    fprintf(f, "# excb audit %s\n\nEvery run: the fashion-mnist preset (ResNet-8, K = 1024, 2 x 28 + 6 x 12 crops, 2 epochs, "
               "lr 0.6 at every B) with `%s`; k-NN top-1 (%%) at k = 20, T = 0.07, on all 10,000 test images against all "
               "60,000 training images (the teacher's backbone; the student's for CoKe, which has no teacher pass); NMI of "
               "the argmax prototype of each test image against its class (n/a without prototypes). "
               "Wall time of the runs: %s.\n\n", ablations ? "ablations" : "small-batch", budget, tmp);
    fprintf(f, "## k-NN top-1 (%%)\n\n| %s |", ablations ? "switch" : "method");
    for (int b = 0; b < n_batches; b++) fprintf(f, " B = %d |", batches[b]);
    if (vs_default) for (int b = 0; b < n_batches; b++) fprintf(f, " change at B = %d |", batches[b]);
    fprintf(f, "\n|---|");
    for (int b = 0; b < n_batches * (vs_default ? 2 : 1); b++) fprintf(f, "---:|");
    fprintf(f, "\n");
    for (int a = 0; a < n_arms; a++) {
        fprintf(f, "| %s |", arms[a].title);
        for (int b = 0; b < n_batches; b++) {
            AuditRun *r = &runs[a * n_batches + b];
            if (r->diverged) fprintf(f, " diverged |"); else audit_cell(f, r->knn, "%.2f");
        }
        if (vs_default)
            for (int b = 0; b < n_batches; b++) audit_cell(f, runs[a * n_batches + b].knn - runs[b].knn, "%+.2f");
        fprintf(f, "\n");
    }
    fprintf(f, "\n## Every run, with the collapse monitors\n\ndistinct/B: the distinct teacher labels of a step over both "
               "global views, divided by B (1/B: every image in one cluster; 2: no two views share one), at the end "
               "(the mean of the last tenth of the step records) and its minimum over the run; entropy: of the "
               "batch's mean teacher assignment (nats; log K = %.2f: every cluster equally used); empty: clusters no teacher label reached in the last "
               "epoch.\n\n| %s | B | steps | k-NN | NMI | probe | distinct/B end | distinct/B min | entropy end | empty | wall |\n"
               "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n", log(1024.0), ablations ? "switch" : "method");
    for (int i = 0; i < n_runs; i++) {
        AuditRun *r = &runs[i];
        audit_duration(tmp, sizeof tmp, r->wall);
        fprintf(f, "| %s | %d | %ld%s |", r->arm->title, r->batch, r->steps, r->diverged ? " (diverged)" : "");
        audit_cell(f, r->knn, "%.2f");
        audit_cell(f, r->nmi, "%.3f");
        audit_cell(f, r->probe, "%.2f");
        audit_cell(f, r->distinct_end, "%.3f");
        audit_cell(f, r->distinct_min, "%.3f");
        audit_cell(f, r->entropy_end, "%.2f");
        audit_cell(f, r->empty_end, "%.0f");
        fprintf(f, " %s |\n", tmp);
    }
    return close_checked(f, path, "audit");
}

/* a gnuplot string in single quotes, where a quote is written twice ("A7 DINO's pairing") */
static void gp_quoted(FILE *g, const char *text) {
    fputc('\'', g);
    for (const char *c = text; *c; c++) {
        if (*c == '\'') fputc('\'', g);
        fputc(*c, g);
    }
    fputc('\'', g);
}

/* plots: k-NN against B (one line per arm), distinct/B against steps at the smallest B */
static int audit_plots(const char *out, int ablations, AuditRun *runs, const int *batches, int n_batches,
                       const AuditArm *arms, int n_arms) {
    char plots[4400], path[4600], err[EXCB_ERR_LEN];
    path_in(plots, sizeof plots, out, "plots");
    if (mkdir_p(plots, err)) { fprintf(stderr, "excb audit: %s\n", err); return EXCB_EXIT_CANTCREAT; }
    for (int a = 0; a < n_arms; a++) {
        snprintf(path, sizeof path, "%s/knn-%s.dat", plots, arms[a].id);
        FILE *f = fopen(path, "w");
        if (!f) { fprintf(stderr, "excb audit: cannot write %s\n", path); return EXCB_EXIT_CANTCREAT; }
        fprintf(f, "# B knn_top1_k20 distinct_frac_end\n");
        for (int b = 0; b < n_batches; b++) {
            AuditRun *r = &runs[a * n_batches + b];
            fprintf(f, "%d %.4f %.4f\n", r->batch, r->knn, r->distinct_end);
        }
        if (close_checked(f, path, "audit")) return EXCB_EXIT_IO;
        snprintf(path, sizeof path, "%s/distinct-%s.dat", plots, arms[a].id);
        if (!(f = fopen(path, "w"))) { fprintf(stderr, "excb audit: cannot write %s\n", path); return EXCB_EXIT_CANTCREAT; }
        fprintf(f, "# step distinct_frac (B = %d)\n", batches[0]);
        AuditRun copy = runs[a * n_batches];
        audit_read(&copy, f);
        if (close_checked(f, path, "audit")) return EXCB_EXIT_IO;
    }
    snprintf(path, sizeof path, "%s/plots.gp", plots);
    FILE *g = fopen(path, "w");
    if (!g) { fprintf(stderr, "excb audit: cannot write %s\n", path); return EXCB_EXIT_CANTCREAT; }
    fprintf(g, "# excb audit: gnuplot script (run from %s)\nset terminal png size 960,540\nset grid\nset key outside right\n",
            plots);
    if (n_batches > 1) {
        fprintf(g, "set output 'knn.png'\nset title 'k-NN top-1 (%%), k = 20, after the same number of images seen at every B'\n"
                   "set xlabel 'batch size B'\nset logscale x 2\nset xrange [%g:%g]\nset xtics (",
                batches[0] / 1.25, batches[n_batches - 1] * 1.25);   /* room for the first and last label */
        for (int b = 0; b < n_batches; b++) fprintf(g, "%s%d", b ? ", " : "", batches[b]);
        fprintf(g, ")\nplot ");
        for (int a = 0; a < n_arms; a++)
        {
            fprintf(g, "%s'knn-%s.dat' using 1:2 with linespoints title ", a ? ", " : "", arms[a].id);
            gp_quoted(g, arms[a].title);
        }
        fprintf(g, "\nunset logscale x\nset autoscale x\nset xtics autofreq\n");
    }
    fprintf(g, "set output 'distinct.png'\nset title 'distinct teacher labels per batch / B, B = %d (collapse: 1/B)'\n"
               "set xlabel 'step'\nset logscale y\nplot ", batches[0]);
    for (int a = 0; a < n_arms; a++)
    {
        fprintf(g, "%s'distinct-%s.dat' using 1:2 with lines title ", a ? ", " : "", arms[a].id);
        gp_quoted(g, arms[a].title);
    }
    fprintf(g, "\n");
    if (close_checked(g, path, "audit")) return EXCB_EXIT_IO;
    (void)ablations;
    return run_gnuplot("audit", plots);
}

#define AUDIT_EXCB_DISTINCT_MIN 1.0      /* excb: at least one distinct label per image of the batch */
#define AUDIT_NONE_DISTINCT_MAX 0.25     /* none: at most B/4 labels for the batch's 2B views         */
/* --quick's check: the qualitative result of the full audit (paper_notes.md §10b gives its numbers):
   at the smallest B, none's teacher collapses to a few labels per batch and excb's does not. The
   thresholds sit far from both sides of what the full and the quick runs measured. k-NN is printed,
   not checked: after 4,000 images the collapsed run's features are still close to the balanced one's. */
static int audit_quick_check(const AuditRun *runs, int n_runs) {
    const AuditRun *ex = NULL, *no = NULL;
    for (int i = 0; i < n_runs; i++) {
        if (!strcmp(runs[i].arm->id, "excb")) ex = &runs[i];
        if (!strcmp(runs[i].arm->id, "none")) no = &runs[i];
    }
    if (!ex || !no) {
        printf("excb audit --quick check: not checked, it needs both excb and none (--only left one out)\n");
        return 0;
    }
    int ok = ex->distinct_end >= AUDIT_EXCB_DISTINCT_MIN && no->distinct_end <= AUDIT_NONE_DISTINCT_MAX;
    printf("excb audit --quick check: at B = %d, excb keeps %.3f distinct teacher labels per image (needs >= %.2f), none "
           "%.3f (collapsed: needs <= %.2f); k-NN excb %.2f %%, none %.2f %%: %s\n", ex->batch, ex->distinct_end,
           AUDIT_EXCB_DISTINCT_MIN, no->distinct_end, AUDIT_NONE_DISTINCT_MAX, ex->knn, no->knn, ok ? "holds" : "FAILS");
    return ok ? 0 : EXCB_EXIT_CHECK;
}

static int cmd_audit(int argc, char **argv) {
    if (argc < 1 || (strcmp(argv[0], "small-batch") && strcmp(argv[0], "ablations"))) {
        if (argc >= 1 && (!strcmp(argv[0], "--help") || !strcmp(argv[0], "-h"))) { usage(stdout); return 0; }
        fprintf(stderr, "excb audit: usage: excb audit small-batch|ablations [--out DIR] [--quick] [--jobs J] [--threads T] "
                "[--set KEY=VALUE] [--only ID,...]\n");
        return EXCB_EXIT_USAGE;
    }
    int ablations = !strcmp(argv[0], "ablations"), quick = 0, jobs = 1;
    const char *out = NULL, *threads = NULL, *only = NULL;
    char extra[2048] = "";
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--quick")) { quick = 1; continue; }
        if (!v) { fprintf(stderr, "excb audit: option '%s' needs a value (or is unknown)\n", a); return EXCB_EXIT_USAGE; }
        i++;
        if (!strcmp(a, "--out")) out = v;
        else if (!strcmp(a, "--only")) only = v;
        else if (!strcmp(a, "--jobs")) jobs = parse_int("--jobs", v, 1, 64);
        else if (!strcmp(a, "--threads")) { parse_int("--threads", v, 0, 1024); threads = v; }
        else if (!strcmp(a, "--set")) {
            if (!strchr(v, '=') || strchr(v, ' ') || strlen(extra) + strlen(v) + 2 > sizeof extra) {
                fprintf(stderr, "excb audit: --set needs key=value without blanks, got '%s'\n", v);
                return EXCB_EXIT_USAGE;
            }
            snprintf(extra + strlen(extra), sizeof extra - strlen(extra), " %s", v);
        } else { fprintf(stderr, "excb audit: unknown option '%s'\n", a); return EXCB_EXIT_USAGE; }
    }
    const AuditArm *arms = ablations ? audit_switches : audit_methods;
    int n_arms = ablations ? (int)(sizeof audit_switches / sizeof *audit_switches)
                           : (int)(sizeof audit_methods / sizeof *audit_methods);
    const int *batches = quick ? audit_quick_batches : ablations ? audit_ablation_batches : audit_small_batches;
    int n_batches = quick ? 1 : ablations ? 2 : 5;
    if (quick && !ablations) n_arms = 2;                /* excb and none: the check's two */
    AuditArm chosen[32];                                 /* --only: those arms, in the table's order */
    if (only) {
        int n = 0;
        for (int a = 0; a < n_arms; a++) {
            size_t len = strlen(arms[a].id);
            for (const char *p = only; *p; p = strchr(p, ',') ? strchr(p, ',') + 1 : p + strlen(p))
                if (!strncmp(p, arms[a].id, len) && (p[len] == ',' || !p[len])) { chosen[n++] = arms[a]; break; }
        }
        int listed = 1;
        for (const char *p = only; (p = strchr(p, ',')); p++) listed++;
        if (n != listed) {
            fprintf(stderr, "excb audit: --only '%s': each entry must be one of", only);
            for (int a = 0; a < n_arms; a++) fprintf(stderr, " %s", arms[a].id);
            fprintf(stderr, " (once each)\n");
            return EXCB_EXIT_USAGE;
        }
        arms = chosen;
        n_arms = n;
    }
    const char *budget = quick ? AUDIT_BUDGET_QUICK : AUDIT_BUDGET;
    char budget_and_extra[2400];                         /* what the tables say every run got */
    snprintf(budget_and_extra, sizeof budget_and_extra, "%s%s", budget, extra);
    char dir[4096];
    snprintf(dir, sizeof dir, "%s", out ? out : quick ? (ablations ? "runs/audit-ablations-quick" : "runs/audit-small-batch-quick")
                                                       : (ablations ? "runs/audit-ablations" : "runs/audit-small-batch"));
    char err[EXCB_ERR_LEN], exe[4096];
    ssize_t len = readlink("/proc/self/exe", exe, sizeof exe - 1);
    if (len <= 0) { fprintf(stderr, "excb audit: cannot find this program (/proc/self/exe): %s\n", strerror(errno)); return EXCB_EXIT_OSERR; }
    exe[len] = 0;
    if (mkdir_p(dir, err)) { fprintf(stderr, "excb audit: %s\n", err); return EXCB_EXIT_CANTCREAT; }
    int n_runs = n_arms * n_batches;
    AuditRun *runs = xcalloc(n_runs, sizeof *runs);
    /* every run's directory and settings; a directory whose audit.txt says otherwise is refused first */
    for (int a = 0; a < n_arms; a++)
        for (int b = 0; b < n_batches; b++) {
            AuditRun *r = &runs[a * n_batches + b];
            r->arm = &arms[a];
            r->batch = batches[b];
            snprintf(r->dir, sizeof r->dir, "%s/%s-B%d", dir, arms[a].id, batches[b]);
            size_t u = (size_t)snprintf(r->sets, sizeof r->sets, "%s batch=%d %s", budget, batches[b], arms[a].sets);
            if (strstr(arms[a].sets, "method=swav"))      /* prototypes frozen for the first 1/40 of the images */
                u += snprintf(r->sets + u, sizeof r->sets - u, " swav_freeze_prototypes_steps=%ld",
                              (quick ? 4000L : 20000L) / 40 / batches[b]);
            snprintf(r->sets + u, sizeof r->sets - u, "%s", extra);
            char path[4400], *text = NULL;
            path_in(path, sizeof path, r->dir, "audit.txt");
            if (is_dir(r->dir)) {
                if (read_text_file(path, &text, err)) {
                    fprintf(stderr, "excb audit: %s exists but has no audit.txt: it is not a run of this audit (move it, or "
                            "choose another --out)\n", r->dir);
                    free(runs);
                    return EXCB_EXIT_CONFIG;
                }
                size_t tl = strlen(text);
                if (tl && text[tl - 1] == '\n') text[tl - 1] = 0;
                if (strcmp(text, r->sets)) {
                    fprintf(stderr, "excb audit: %s was run with '%s', this audit gives it '%s': start the audit in another "
                            "--out, or delete that run\n", r->dir, text, r->sets);
                    free(text);
                    free(runs);
                    return EXCB_EXIT_CONFIG;
                }
                free(text);
            }
        }
    struct sigaction sa = {.sa_handler = audit_on_signal}, before[3];
    sigemptyset(&sa.sa_mask);
    const int sigs[3] = {SIGINT, SIGTERM, SIGHUP};
    for (int i = 0; i < 3; i++) sigaction(sigs[i], &sa, &before[i]);
    double t0 = now_seconds(), spent = 0;
    int done_here = 0, code = 0, running = 0, next = 0, finished = 0;
    pid_t pids[64];
    int slot_run[64], slot_resumed[64];
    double slot_t0[64];
    for (int i = 0; i < n_runs; i++) finished += audit_finished(&runs[i]);
    if (finished)
        fprintf(stderr, "excb audit: %d of %d runs in %s are finished already: read, not redone\n", finished, n_runs, dir);
    while (!code && (next < n_runs || running)) {
        /* start runs while there are slots, no signal and no failure */
        while (running < jobs && next < n_runs && !atomic_load(&audit_signal)) {
            AuditRun *r = &runs[next++];
            if (r->finished) continue;
            char path[4400];
            if ((code = mkdir_p(r->dir, err))) { fprintf(stderr, "excb audit: %s\n", err); break; }
            char line[4200];
            snprintf(line, sizeof line, "%s\n", r->sets);
            path_in(path, sizeof path, r->dir, "audit.txt");
            if ((code = write_text_atomic(path, line, err))) { fprintf(stderr, "excb audit: %s\n", err); break; }
            static long steps[4096];
            int resume = list_checkpoints(r->dir, steps, 4096, 0) > 0;
            pid_t pid = audit_launch(exe, r, resume, threads);
            if (pid < 0) { fprintf(stderr, "excb audit: cannot start a run: %s\n", strerror(errno)); code = EXCB_EXIT_OSERR; break; }
            pids[running] = pid;
            slot_run[running] = (int)(r - runs);
            slot_resumed[running] = resume;
            slot_t0[running] = now_seconds();
            running++;
            fprintf(stderr, "excb audit: [%d/%d] %s, B = %d: %s (log: %s/log.txt)\n", (int)(r - runs) + 1, n_runs,
                    r->arm->title, r->batch, resume ? "resumed from its checkpoint" : "started", r->dir);
        }
        if (!running) break;
        int status;
        pid_t pid = waitpid(-1, &status, 0);
        if (pid < 0) {
            if (errno == EINTR) {                       /* a signal: pass it on to the runs, then wait */
                for (int i = 0; i < running; i++) kill(pids[i], atomic_load(&audit_signal));
                continue;
            }
            fprintf(stderr, "excb audit: waitpid: %s\n", strerror(errno));
            code = EXCB_EXIT_OSERR;
            break;
        }
        int s = 0;
        while (s < running && pids[s] != pid) s++;
        if (s == running) continue;                      /* not one of ours (gnuplot is waited for by itself) */
        AuditRun *r = &runs[slot_run[s]];
        double took = now_seconds() - slot_t0[s];
        int resumed = slot_resumed[s];
        pids[s] = pids[running - 1]; slot_run[s] = slot_run[running - 1];
        slot_resumed[s] = slot_resumed[running - 1]; slot_t0[s] = slot_t0[running - 1];
        running--;
        int rc = WIFEXITED(status) ? WEXITSTATUS(status) : EXCB_EXIT_SIGNAL + WTERMSIG(status);
        if (rc == 0 || rc == EXCB_EXIT_DIVERGED) {
            char path[4400], *text = NULL, line[64];
            double before_s = 0;
            path_in(path, sizeof path, r->dir, "audit-wall.txt");
            if (resumed && !read_text_file(path, &text, err)) { before_s = strtod(text, NULL); free(text); }
            snprintf(line, sizeof line, "%.1f\n", before_s + took);
            if ((code = write_text_atomic(path, line, err))) { fprintf(stderr, "excb audit: %s\n", err); break; }
            audit_finished(r);
            spent += took;
            done_here++;
            finished++;
            int left = n_runs - finished;
            char so_far[64], eta[64];
            audit_duration(so_far, sizeof so_far, now_seconds() - t0);
            audit_duration(eta, sizeof eta, left ? spent / done_here * left / jobs : 0);
            audit_read(r, NULL);
            fprintf(stderr, "excb audit: [%d/%d] %s, B = %d: %s in %.0f s (k-NN %.2f %%, distinct/B %.3f); %d left; "
                    "%s so far, ETA %s\n", (int)(r - runs) + 1, n_runs, r->arm->title, r->batch,
                    rc ? "diverged" : "done", took, r->knn, r->distinct_end, left, so_far, left ? eta : "0m00s");
        } else if (rc > EXCB_EXIT_SIGNAL && atomic_load(&audit_signal)) {
            continue;                                    /* stopped with a checkpoint: the audit resumes it */
        } else {
            fprintf(stderr, "excb audit: %s, B = %d failed with exit %d (its log: %s/log.txt)\n", r->arm->title, r->batch, rc,
                    r->dir);
            code = rc == 127 ? EXCB_EXIT_UNAVAILABLE : rc;
        }
    }
    while (running) {                                    /* after a failure: the others finish their step */
        for (int i = 0; i < running; i++) kill(pids[i], SIGTERM);
        int status;
        if (waitpid(-1, &status, 0) > 0 || errno != EINTR) running--;
    }
    for (int i = 0; i < 3; i++) sigaction(sigs[i], &before[i], NULL);
    int sig = atomic_load(&audit_signal);
    if (!code && sig) {
        fprintf(stderr, "excb audit: stopped by signal %d with %d of %d runs finished; the same command continues it\n", sig,
                finished, n_runs);
        code = EXCB_EXIT_SIGNAL + sig;
    }
    if (!code) {
        double wall = 0;
        for (int i = 0; i < n_runs; i++) { audit_read(&runs[i], NULL); wall += isnan(runs[i].wall) ? 0 : runs[i].wall; }
        code = audit_tables(dir, ablations, runs, n_runs, batches, n_batches, arms, n_arms, budget_and_extra, wall);
        if (!code) {
            char so_far[64];
            audit_duration(so_far, sizeof so_far, wall);
            printf("excb audit %s: %d runs (%s of run time) in %s: %s/table.md, %s/results.tsv, %s/plots/\n",
                   ablations ? "ablations" : "small-batch", n_runs, so_far, dir, dir, dir, dir);
            code = audit_plots(dir, ablations, runs, batches, n_batches, arms, n_arms);
        }
        if (!code && quick && !ablations) code = audit_quick_check(runs, n_runs);
    }
    free(runs);
    return code;
}

static int run_command(int argc, char **argv);

/* Under mpirun (section 10b) each process is one rank of `excb train`: MPI starts here and ends with
   the command; a rank that ends alone with an error ends the whole job with its exit code. */
int main(int argc, char **argv) {
    const char *world = getenv("OMPI_COMM_WORLD_SIZE");
    int launched = world && atoi(world) > 1;
#ifdef EXCB_MPI
    if (launched) {
        int provided;
        MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided);   /* the loader's threads never call MPI */
        if (provided < MPI_THREAD_FUNNELED) {
            fprintf(stderr, "excb: this MPI library gives thread level %d, below MPI_THREAD_FUNNELED\n", provided);
            MPI_Abort(MPI_COMM_WORLD, EXCB_EXIT_UNAVAILABLE);
        }
        MPI_Comm_rank(MPI_COMM_WORLD, &mpi_world.rank);
        MPI_Comm_size(MPI_COMM_WORLD, &mpi_world.size);
        MPI_Comm node;                               /* the ranks that share this node's memory (GPUs) */
        MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, mpi_world.rank, MPI_INFO_NULL, &node);
        MPI_Comm_rank(node, &mpi_world.local_rank);
        MPI_Comm_size(node, &mpi_world.local_size);
        MPI_Comm_free(&node);
        mpi_world.kind = EXCB_COMM_MPI;
    }
#endif
    if (launched && !mpi_world.size) {
        fprintf(stderr, "excb: started by mpirun with %s ranks, but this excb was built without MPI (one process only): "
                "install libopenmpi-dev and rebuild (make says whether it found MPI)\n", world);
        return EXCB_EXIT_USAGE;
    }
    if (launched && (argc < 2 || (strcmp(argv[1], "train") && strcmp(argv[1], "bench")))) {
        if (!mpi_world.rank) fprintf(stderr, "excb: only 'excb train' and 'excb bench' run on several ranks; run '%s' "
                                     "without mpirun\n", argc > 1 ? argv[1] : "");
#ifdef EXCB_MPI
        MPI_Finalize();
#endif
        return EXCB_EXIT_USAGE;
    }
    int code = run_command(argc, argv);
#ifdef EXCB_MPI
    if (launched) {
        if (code && !rank_exit_agreed) MPI_Abort(MPI_COMM_WORLD, code);
        MPI_Finalize();
    }
#endif
    return code;
}

static int run_command(int argc, char **argv) {
    if (argc < 2) { usage(stderr); return EXCB_EXIT_USAGE; }
    if (!strcmp(argv[1], "--help") || !strcmp(argv[1], "-h")) { usage(stdout); return 0; }
    if (!strcmp(argv[1], "--version")) {
        char cuda_line[600] = "not built (make found no nvcc, cuBLAS or cuDNN)";
        if (excb_cuda_built()) {
            char desc[512];
            int rc = excb_cuda_probe(desc, sizeof desc);
            snprintf(cuda_line, sizeof cuda_line, "built (cuBLAS, cuDNN); %s%s", rc ? "at run time: " : "GPU: ", desc);
        }
        printf("excb %s\n"
               "  BLAS/GEMM: %s\n  threads:   %s\n  CUDA:      %s\n  MPI:       %s\n"
               "  data:      zlib %s, libpng %s, libjpeg %d\n  float:     %s, no fast-math, FP contraction off\n",
               EXCB_VERSION,
#ifdef EXCB_USE_DNNL
               "oneDNN dnnl_sgemm",
#else
               "naive (built without oneDNN)",
#endif
#ifdef _OPENMP
               "OpenMP",
#else
               "none",
#endif
               cuda_line,
#ifdef EXCB_MPI
               "Open MPI (mpirun -np R ./excb train: R data-parallel ranks)",
#else
               "not built (one process; --chunks R computes R ranks' shares)",
#endif
               zlibVersion(), png_get_libpng_ver(NULL), JPEG_LIB_VERSION,
#ifdef EXCB_REAL_DOUBLE
               "float64"
#else
               "float32"
#endif
               );
        return 0;
    }
    if (!strcmp(argv[1], "bench")) return cmd_bench(argc - 2, argv + 2);
    if (!strcmp(argv[1], "bench-data")) return cmd_bench_data(argc - 2, argv + 2);
    if (!strcmp(argv[1], "views")) return cmd_views(argc - 2, argv + 2);
    if (!strcmp(argv[1], "train")) return cmd_train(argc - 2, argv + 2);
    if (!strcmp(argv[1], "eval")) return cmd_eval(argc - 2, argv + 2);
    if (!strcmp(argv[1], "export")) return cmd_export(argc - 2, argv + 2);
    if (!strcmp(argv[1], "import")) return cmd_import(argc - 2, argv + 2);
    if (!strcmp(argv[1], "features")) return cmd_features(argc - 2, argv + 2);
    if (!strcmp(argv[1], "plot")) return cmd_plot(argc - 2, argv + 2);
    if (!strcmp(argv[1], "inspect")) return cmd_inspect(argc - 2, argv + 2);
    if (!strcmp(argv[1], "audit")) return cmd_audit(argc - 2, argv + 2);
    fprintf(stderr, "excb: unknown command '%s'\n", argv[1]);
    usage(stderr);
    return EXCB_EXIT_USAGE;
}
#endif /* TESTING */
