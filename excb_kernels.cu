/*
 * excb_kernels.cu: the GPU twin of excb.c's training step, on CUDA, cuBLAS and cuDNN.
 *
 * Read excb.c first: this file adds no method, only a second machine for it. excb.c's sections 9-10
 * (the network and the step) call every operator through a table, m->ops (excb.h, "The operator
 * table"). This file fills a second table, excb_cuda_ops, whose entries take the same arguments as
 * their CPU twins and read and write device memory. excb_cuda_attach makes the device twin of a host
 * model: the same structure, its buffers on the GPU; excb_step on that twin is one step on the GPU.
 *
 * Order, as in excb.c:
 *   0. utilities: error checks that name the file and line, device memory accounting, reductions
 *   1. backbone: convolutions (cuDNN), BatchNorm with ReLU and residual fused, pooling
 *   2. heads: Linear layers (cuBLAS)
 *   3. prototypes: row normalisation, weight norm
 *   4. cluster sizes (E2, E3, A4's float16 rounding)
 *   5. balancing and teacher targets (E3', E4-E6), one block per teacher row, nothing one-hot
 *   6. the loss and its gradient (E7, E8, E11), one block per student row
 *   7. SGD, weight decay and the EMA in one pass over the parameter buffer (E14, E9)
 *   8. the operator table, attach/download/upload, probe
 *
 * Precision. FP32: cuBLAS in its default (no TF32) mode and cuDNN restricted to FMA kernels, so every
 * product is an FP32 product; results differ from the CPU reference only by summation order (tests/
 * test_gpu.c states the tolerance of each quantity). TF32: cuBLAS and cuDNN may round the inputs of
 * GEMMs and convolutions to TF32 (10-bit mantissa), accumulating in FP32; nothing else changes. BF16
 * (autocast-style with FP32 master weights) is not implemented yet: attach refuses it.
 *
 * Determinism. Every reduction here has a fixed shape (fixed blocks, fixed tree), the maxpool backward
 * gathers instead of scattering, and cuDNN is asked for deterministic algorithms only; so a GPU run
 * repeats itself on the same GPU and library versions. It is not bitwise equal to the CPU run.
 *
 * Layouts are excb.h's: activations (C, N, H, W), feature matrices (F, N), similarities (N, K) row-major.
 * cuDNN is told the (C, N, H, W) layout through strides (n stride H*W, c stride N*H*W).
 */
#include <cuda_runtime.h>
#include <cublas_v2.h>
#include <cudnn.h>
#include <cuda_fp16.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

extern "C" {
#include "excb.h"
}
#ifdef EXCB_REAL_DOUBLE
#error "the GPU path is FP32 (real = float); build it without -DEXCB_REAL_DOUBLE"
#endif

/* ================================================================================================
 * 0. Utilities
 * ================================================================================================ */
/* A failed CUDA, cuBLAS or cuDNN call inside a step cannot be recovered from (the step's state is
   half-written): it is reported with this file's line and the process exits with EX_SOFTWARE, or with
   EX_OSERR when the library ran out of device memory (cuDNN's algorithm search allocates its own, for
   one). Nothing is written to the run directory on the way out, so its last checkpoint stays the last
   good one. */
static void die(const char *what, const char *msg, int out_of_memory, const char *file, int line) {
    fprintf(stderr, "excb: %s:%d: %s failed: %s%s\n", file, line, what, msg,
            out_of_memory ? " (out of GPU memory: use a smaller batch or K; excb bench --memory counts what a "
                            "configuration needs)" : "");
    exit(out_of_memory ? EXCB_EXIT_OSERR : EXCB_EXIT_SOFTWARE);
}
#define CUDA_CHECK(call) do { cudaError_t e_ = (call); if (e_ != cudaSuccess) \
    die(#call, cudaGetErrorString(e_), e_ == cudaErrorMemoryAllocation, __FILE__, __LINE__); } while (0)
#define CUBLAS_CHECK(call) do { cublasStatus_t e_ = (call); if (e_ != CUBLAS_STATUS_SUCCESS) \
    die(#call, cublasGetStatusString(e_), e_ == CUBLAS_STATUS_ALLOC_FAILED, __FILE__, __LINE__); } while (0)
#define CUDNN_CHECK(call) do { cudnnStatus_t e_ = (call); if (e_ != CUDNN_STATUS_SUCCESS) \
    die(#call, cudnnGetErrorString(e_), e_ == CUDNN_STATUS_INTERNAL_ERROR_DEVICE_ALLOCATION_FAILED || \
        e_ == CUDNN_STATUS_INTERNAL_ERROR_HOST_ALLOCATION_FAILED, __FILE__, __LINE__); } while (0)
#define KERNEL_CHECK() CUDA_CHECK(cudaGetLastError())
#ifdef EXCB_NCCL
#include <nccl.h>
#define NCCL_CHECK(call) do { ncclResult_t e_ = (call); if (e_ != ncclSuccess) \
    die(#call, ncclGetErrorString(e_), 0, __FILE__, __LINE__); } while (0)
#endif

/* A convolution's cuDNN plan: descriptors and the fastest deterministic algorithm of each direction,
   found once per shape (the equivalent of PyTorch's cudnn.benchmark = True). */
typedef struct {
    int N, Cin, H, W, Cout, k, stride, pad;
    cudnnTensorDescriptor_t x, y;          /* our (C, N, H, W) layout, as strides              */
    cudnnTensorDescriptor_t xp, yp;        /* packed NCHW, for directions without an algorithm for ours */
    int fwd_packed, bwd_data_packed, bwd_filter_packed;
    cudnnFilterDescriptor_t w;
    cudnnConvolutionDescriptor_t conv;
    cudnnConvolutionFwdAlgo_t fwd;
    cudnnConvolutionBwdDataAlgo_t bwd_data;
    cudnnConvolutionBwdFilterAlgo_t bwd_filter;
} ConvPlan;

#define MAX_CONV_PLANS 256
#define N_PARTIALS 1024          /* blocks of a whole-buffer reduction (sum of squares)              */

struct ExcbCuda {
    int ready;
    ExcbPrecision precision;
    cudaStream_t stream;
    cublasHandle_t blas;
    cudnnHandle_t dnn;
    ConvPlan plans[MAX_CONV_PLANS];
    int n_plans;
    void *workspace; size_t workspace_bytes;       /* cuDNN's, grown while plans are made           */
    real *staging; size_t staging_floats;          /* host images land here before the transpose    */
    real *packed_x, *packed_y;                     /* NCHW copies for convolutions run packed       */
    size_t packed_x_floats, packed_y_floats;
    double *partials; size_t partials_cap;         /* per-block partial sums (device)               */
    double *host; size_t host_cap;                 /* pinned: values a reduction finishes on the host */
    int32_t *used;                                 /* clusters used this step (one int)             */
    uint8_t *groups;                               /* each parameter's weight-decay group (E14)     */
    size_t bytes, peak;                            /* device memory held by this file               */
    int nondeterministic_plans;                    /* convolution directions without a deterministic algorithm */
    int device;                                    /* the GPU this process takes (excb_cuda_join)   */
    double *bn_global; size_t bn_global_cap;       /* SyncBN: the global batch's sums (device)      */
    double *bn_red; size_t bn_red_cap;             /* SyncBN: the same on the host, while reduced   */
};
static struct ExcbCuda g;                          /* one GPU per process                            */

static void *dmalloc(size_t bytes) {
    void *p = NULL;
    if (bytes == 0) bytes = 16;
    cudaError_t e = cudaMalloc(&p, bytes);
    if (e != cudaSuccess) {
        size_t free_b = 0, total_b = 0;
        cudaMemGetInfo(&free_b, &total_b);
        fprintf(stderr, "excb: cannot allocate %.1f MiB on the GPU (%s; %.1f MiB free of %.1f MiB; this process "
                "holds %.1f MiB): use a smaller batch or K (excb bench --memory counts what a configuration needs)\n", bytes / 1048576.0, cudaGetErrorString(e),
                free_b / 1048576.0, total_b / 1048576.0, g.bytes / 1048576.0);
        exit(EXCB_EXIT_OSERR);
    }
    g.bytes += bytes;
    if (g.bytes > g.peak) g.peak = g.bytes;
    return p;
}

static void dfree(void *p, size_t bytes) {
    if (!p) return;
    cudaFree(p);
    g.bytes -= bytes;
}

/* Every copy goes through g.stream and is waited for: a plain cudaMemcpy from pageable memory runs on
   the legacy stream and may return before its DMA lands, which kernels on g.stream (a non-blocking
   stream) would not wait for. */
static void copy_sync(void *dst, const void *src, size_t bytes, cudaMemcpyKind kind) {
    CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, kind, g.stream));
    CUDA_CHECK(cudaStreamSynchronize(g.stream));
}

static unsigned blocks_for(size_t n, int threads) {
    size_t b = (n + threads - 1) / threads;
    return (unsigned)(b > 1048576 ? 1048576 : (b ? b : 1));     /* kernels stride over the rest */
}

/* device scratch for per-block partial sums (grown on first use; cudaFree waits for the device) */
static double *partials(size_t n) {
    if (n > g.partials_cap) {
        dfree(g.partials, sizeof(double) * g.partials_cap);
        g.partials = (double *)dmalloc(sizeof(double) * n);
        g.partials_cap = n;
    }
    return g.partials;
}

/* n doubles of the device copied to pinned host memory; the caller sums them in index order, a fixed
   order, so a reduction's result does not depend on timing */
static double *fetch_partials(const double *dev, size_t n) {
    if (n > g.host_cap) {
        if (g.host) cudaFreeHost(g.host);
        CUDA_CHECK(cudaMallocHost((void **)&g.host, sizeof(double) * n));
        g.host_cap = n;
    }
    CUDA_CHECK(cudaMemcpyAsync(g.host, dev, sizeof(double) * n, cudaMemcpyDeviceToHost, g.stream));
    CUDA_CHECK(cudaStreamSynchronize(g.stream));
    return g.host;
}

/* Block-wide sum of a double (every thread gets the total). The tree has a fixed shape: warp
   shuffles, then one warp over the warps' sums; blockDim.x is a multiple of 32. */
__device__ double block_sum(double v, double *smem) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
    __syncthreads();                                 /* smem may still be read by a previous call */
    if (lane == 0) smem[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = lane < nw ? smem[lane] : 0.0;
        for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
        if (lane == 0) smem[32] = v;
    }
    __syncthreads();
    return smem[32];
}

__device__ float block_max(float v, float *smem) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_down_sync(0xffffffffu, v, o));
    __syncthreads();
    if (lane == 0) smem[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = lane < nw ? smem[lane] : -INFINITY;
        for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_down_sync(0xffffffffu, v, o));
        if (lane == 0) smem[32] = v;
    }
    __syncthreads();
    return smem[32];
}

/* the first index of the maximum (excb.c's argmax rule: a later equal value does not win) */
__device__ void argmax_merge(float &v, int &i, float v2, int i2) {
    if (v2 > v || (v2 == v && i2 < i)) { v = v2; i = i2; }
}

__device__ int block_argmax(float v, int i, float *smem_v, int *smem_i) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    for (int o = 16; o > 0; o >>= 1) {
        float v2 = __shfl_down_sync(0xffffffffu, v, o);
        int i2 = __shfl_down_sync(0xffffffffu, i, o);
        argmax_merge(v, i, v2, i2);
    }
    __syncthreads();
    if (lane == 0) { smem_v[warp] = v; smem_i[warp] = i; }
    __syncthreads();
    if (warp == 0) {
        v = lane < nw ? smem_v[lane] : -INFINITY;
        i = lane < nw ? smem_i[lane] : 0x7fffffff;
        for (int o = 16; o > 0; o >>= 1) {
            float v2 = __shfl_down_sync(0xffffffffu, v, o);
            int i2 = __shfl_down_sync(0xffffffffu, i, o);
            argmax_merge(v, i, v2, i2);
        }
        if (lane == 0) smem_i[32] = i;
    }
    __syncthreads();
    return smem_i[32];
}

/* excb.c's counter-based randomness, the same bits (A3's jitter draws from it) */
__device__ uint64_t d_mix64(uint64_t x) {
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}
__device__ float d_uniform(uint64_t seed, uint64_t purpose, uint64_t a, uint64_t b, uint64_t counter) {
    uint64_t h = d_mix64(d_mix64(d_mix64(d_mix64(d_mix64(seed ^ 0x6578636200000000ull) ^ purpose) ^ a) ^ b) ^ counter);
    return (float)(h >> 40) * (1.0f / 16777216.0f);
}

/* ================================================================================================
 * 1. Backbone
 * ================================================================================================ */
/* dst (A, B, HW) <- src (B, A, HW): the two outer dimensions of a stack of planes swapped. Images
   (N, C, HW) -> features (C, N, HW) (excb.c backbone_forward's transpose) is A = C, B = N; our layout
   -> packed NCHW for cuDNN is A = N, B = C. */
__global__ void swap_outer_kernel(float *dst, const float *src, int A, int B, int HW) {
    size_t total = (size_t)A * B * HW;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
        size_t p = i % HW, ab = i / HW;                 /* i indexes the destination (a, b, p)       */
        size_t b = ab % B, a = ab / B;
        dst[i] = src[(b * A + a) * HW + p];
    }
}

static void swap_outer(real *dst, const real *src, int A, int B, int HW) {
    swap_outer_kernel<<<blocks_for((size_t)A * B * HW, 256), 256, 0, g.stream>>>(dst, src, A, B, HW);
    KERNEL_CHECK();
}

/* The input may be a host pointer (the loader's batch): it is copied to a staging buffer first. */
static void cuda_images_to_features(real *dst, const real *src, int N, int C, int HW) {
    size_t n = (size_t)N * C * HW;
    cudaPointerAttributes at;
    const real *dev_src = src;
    if (cudaPointerGetAttributes(&at, src) != cudaSuccess || at.type == cudaMemoryTypeUnregistered ||
        at.type == cudaMemoryTypeHost) {
        cudaGetLastError();                                  /* clear a pointer-query error      */
        if (n > g.staging_floats) {
            dfree(g.staging, sizeof(real) * g.staging_floats);
            g.staging = (real *)dmalloc(sizeof(real) * n);
            g.staging_floats = n;
        }
        CUDA_CHECK(cudaMemcpyAsync(g.staging, src, sizeof(real) * n, cudaMemcpyHostToDevice, g.stream));
        dev_src = g.staging;
    }
    swap_outer(dst, dev_src, C, N, HW);
}

/* --- convolutions through cuDNN ------------------------------------------------------------------
 * cuDNN is first told our (C, N, H, W) layout through strides. Not every direction has an algorithm
 * for that layout (cuDNN 9.14 on an H100 has no backward-data one for any shape tried); such a direction
 * runs on packed NCHW copies instead: its inputs are transposed into scratch buffers, cuDNN runs on
 * those, and an output is transposed back. That costs memory traffic and two scratch buffers (the
 * largest input and output of any such convolution); excb_cuda_conv_report says which plans do it. */
static void grow_workspace(size_t bytes) {
    if (bytes <= g.workspace_bytes) return;
    CUDA_CHECK(cudaStreamSynchronize(g.stream));
    dfree(g.workspace, g.workspace_bytes);
    g.workspace = dmalloc(bytes);
    g.workspace_bytes = bytes;
}

static void grow_buffer(real **buf, size_t *have, size_t floats) {
    if (floats <= *have) return;
    CUDA_CHECK(cudaStreamSynchronize(g.stream));
    dfree(*buf, sizeof(real) * *have);
    *buf = (real *)dmalloc(sizeof(real) * floats);
    *have = floats;
}

/* our (C, N, HW) <-> packed (N, C, HW) */
static void to_packed(real *dst, const real *src, int N, int C, int HW) { swap_outer(dst, src, N, C, HW); }
static void from_packed(real *dst, const real *src, int N, int C, int HW) { swap_outer(dst, src, C, N, HW); }

#define WORKSPACE_LIMIT ((size_t)2 << 30)     /* an algorithm needing more than 2 GiB is skipped */

/* the algorithm to use among cudnnFind's results, fastest first: the fastest deterministic one that
   fits WORKSPACE_LIMIT, else the fastest that fits (counted in nondeterministic_plans), else -1 */
template <typename Perf> static int pick_algo(const Perf *perf, int n) {
    for (int i = 0; i < n; i++)
        if (perf[i].status == CUDNN_STATUS_SUCCESS && perf[i].determinism == CUDNN_DETERMINISTIC &&
            perf[i].memory <= WORKSPACE_LIMIT)
            return i;
    for (int i = 0; i < n; i++)
        if (perf[i].status == CUDNN_STATUS_SUCCESS && perf[i].memory <= WORKSPACE_LIMIT) {
            g.nondeterministic_plans++;
            return i;
        }
    return -1;
}

static void no_algorithm(const char *direction, const ConvPlan *p) {
    char msg[200];
    snprintf(msg, sizeof msg, "cuDNN has no %s algorithm for a %dx%d/%d convolution (%d images, %d -> %d channels, "
             "%dx%d) in either layout", direction, p->k, p->k, p->stride, p->N, p->Cin, p->Cout, p->H, p->W);
    die("cudnnFindConvolution*", msg, 0, __FILE__, __LINE__);
}

static ConvPlan *conv_plan(int N, int Cin, int H, int W, int Cout, int k, int stride, int pad) {
    for (int i = 0; i < g.n_plans; i++) {
        ConvPlan *p = &g.plans[i];
        if (p->N == N && p->Cin == Cin && p->H == H && p->W == W && p->Cout == Cout && p->k == k &&
            p->stride == stride && p->pad == pad)
            return p;
    }
    if (g.n_plans == MAX_CONV_PLANS) die("conv_plan", "more distinct convolution shapes than MAX_CONV_PLANS", 0, __FILE__, __LINE__);
    ConvPlan *p = &g.plans[g.n_plans++];
    memset(p, 0, sizeof *p);
    p->N = N; p->Cin = Cin; p->H = H; p->W = W; p->Cout = Cout; p->k = k; p->stride = stride; p->pad = pad;
    int Ho = (H + 2 * pad - k) / stride + 1, Wo = (W + 2 * pad - k) / stride + 1;
    cudnnTensorDescriptor_t *descs[4] = {&p->x, &p->y, &p->xp, &p->yp};
    for (int i = 0; i < 4; i++) CUDNN_CHECK(cudnnCreateTensorDescriptor(descs[i]));
    CUDNN_CHECK(cudnnCreateFilterDescriptor(&p->w));
    CUDNN_CHECK(cudnnCreateConvolutionDescriptor(&p->conv));
    /* ours: N x C x H x W with n stride H*W and c stride N*H*W; packed: plain NCHW */
    CUDNN_CHECK(cudnnSetTensor4dDescriptorEx(p->x, CUDNN_DATA_FLOAT, N, Cin, H, W, H * W, N * H * W, W, 1));
    CUDNN_CHECK(cudnnSetTensor4dDescriptorEx(p->y, CUDNN_DATA_FLOAT, N, Cout, Ho, Wo, Ho * Wo, N * Ho * Wo, Wo, 1));
    CUDNN_CHECK(cudnnSetTensor4dDescriptor(p->xp, CUDNN_TENSOR_NCHW, CUDNN_DATA_FLOAT, N, Cin, H, W));
    CUDNN_CHECK(cudnnSetTensor4dDescriptor(p->yp, CUDNN_TENSOR_NCHW, CUDNN_DATA_FLOAT, N, Cout, Ho, Wo));
    CUDNN_CHECK(cudnnSetFilter4dDescriptor(p->w, CUDNN_DATA_FLOAT, CUDNN_TENSOR_NCHW, Cout, Cin, k, k));
    CUDNN_CHECK(cudnnSetConvolution2dDescriptor(p->conv, pad, pad, stride, stride, 1, 1, CUDNN_CROSS_CORRELATION,
                                                CUDNN_DATA_FLOAT));
    /* FP32: FMA kernels only (no TF32 rounding); TF32: cuDNN's default, which allows TF32 tensor cores */
    CUDNN_CHECK(cudnnSetConvolutionMathType(p->conv, g.precision == EXCB_PRECISION_TF32 ? CUDNN_DEFAULT_MATH
                                                                                       : CUDNN_FMA_MATH));
    /* cudnnFind* times every algorithm (on scratch memory it allocates itself), as PyTorch's
       cudnn.benchmark does; each direction tries our layout first, then the packed one */
    int n = 0, at = -1;
    cudnnConvolutionFwdAlgoPerf_t fp[CUDNN_CONVOLUTION_FWD_ALGO_COUNT];
    for (int packed = 0; packed < 2 && at < 0; packed++) {
        CUDNN_CHECK(cudnnFindConvolutionForwardAlgorithm(g.dnn, packed ? p->xp : p->x, p->w, p->conv, packed ? p->yp : p->y,
                                                         CUDNN_CONVOLUTION_FWD_ALGO_COUNT, &n, fp));
        if ((at = pick_algo(fp, n)) >= 0) { p->fwd = fp[at].algo; p->fwd_packed = packed; grow_workspace(fp[at].memory); }
    }
    if (at < 0) no_algorithm("forward", p);
    cudnnConvolutionBwdDataAlgoPerf_t dp[CUDNN_CONVOLUTION_BWD_DATA_ALGO_COUNT];
    at = -1;
    for (int packed = 0; packed < 2 && at < 0; packed++) {
        CUDNN_CHECK(cudnnFindConvolutionBackwardDataAlgorithm(g.dnn, p->w, packed ? p->yp : p->y, p->conv, packed ? p->xp : p->x,
                                                              CUDNN_CONVOLUTION_BWD_DATA_ALGO_COUNT, &n, dp));
        if ((at = pick_algo(dp, n)) >= 0) { p->bwd_data = dp[at].algo; p->bwd_data_packed = packed; grow_workspace(dp[at].memory); }
    }
    if (at < 0) no_algorithm("backward-data", p);
    cudnnConvolutionBwdFilterAlgoPerf_t wp[CUDNN_CONVOLUTION_BWD_FILTER_ALGO_COUNT];
    at = -1;
    for (int packed = 0; packed < 2 && at < 0; packed++) {
        CUDNN_CHECK(cudnnFindConvolutionBackwardFilterAlgorithm(g.dnn, packed ? p->xp : p->x, packed ? p->yp : p->y, p->conv,
                                                                p->w, CUDNN_CONVOLUTION_BWD_FILTER_ALGO_COUNT, &n, wp));
        if ((at = pick_algo(wp, n)) >= 0) { p->bwd_filter = wp[at].algo; p->bwd_filter_packed = packed; grow_workspace(wp[at].memory); }
    }
    if (at < 0) no_algorithm("backward-filter", p);
    if (p->fwd_packed || p->bwd_data_packed || p->bwd_filter_packed) {     /* scratch for the copies */
        grow_buffer(&g.packed_x, &g.packed_x_floats, (size_t)N * Cin * H * W);
        grow_buffer(&g.packed_y, &g.packed_y_floats, (size_t)N * Cout * Ho * Wo);
    }
    return p;
}

static void cuda_conv2d_forward(real *y, const real *x, const real *w, real *col, int N, int Cin, int H, int W,
                                int Cout, int k, int stride, int pad) {
    (void)col;
    ConvPlan *p = conv_plan(N, Cin, H, W, Cout, k, stride, pad);
    const float one = 1.0f, zero = 0.0f;
    if (!p->fwd_packed) {
        CUDNN_CHECK(cudnnConvolutionForward(g.dnn, &one, p->x, x, p->w, w, p->conv, p->fwd, g.workspace,
                                            g.workspace_bytes, &zero, p->y, y));
        return;
    }
    int Ho = (H + 2 * pad - k) / stride + 1, Wo = (W + 2 * pad - k) / stride + 1;
    to_packed(g.packed_x, x, N, Cin, H * W);
    CUDNN_CHECK(cudnnConvolutionForward(g.dnn, &one, p->xp, g.packed_x, p->w, w, p->conv, p->fwd, g.workspace,
                                        g.workspace_bytes, &zero, p->yp, g.packed_y));
    from_packed(y, g.packed_y, N, Cout, Ho * Wo);
}

/* dw += (beta = 1: parameter gradients accumulate), dx = (beta = 0), dx may be NULL (the input image) */
static void cuda_conv2d_backward(real *dx, real *dw, const real *dy, const real *x, const real *w, real *col,
                                 real *slots, int N, int Cin, int H, int W, int Cout, int k, int stride, int pad) {
    (void)col; (void)slots;
    ConvPlan *p = conv_plan(N, Cin, H, W, Cout, k, stride, pad);
    const float one = 1.0f, zero = 0.0f;
    int Ho = (H + 2 * pad - k) / stride + 1, Wo = (W + 2 * pad - k) / stride + 1;
    int dy_packed = 0;                                  /* g.packed_y holds dy in NCHW             */
    if (p->bwd_filter_packed) {
        to_packed(g.packed_x, x, N, Cin, H * W);
        to_packed(g.packed_y, dy, N, Cout, Ho * Wo);
        dy_packed = 1;
        CUDNN_CHECK(cudnnConvolutionBackwardFilter(g.dnn, &one, p->xp, g.packed_x, p->yp, g.packed_y, p->conv,
                                                   p->bwd_filter, g.workspace, g.workspace_bytes, &one, p->w, dw));
    } else
        CUDNN_CHECK(cudnnConvolutionBackwardFilter(g.dnn, &one, p->x, x, p->y, dy, p->conv, p->bwd_filter, g.workspace,
                                                   g.workspace_bytes, &one, p->w, dw));
    if (!dx) return;
    if (p->bwd_data_packed) {
        if (!dy_packed) to_packed(g.packed_y, dy, N, Cout, Ho * Wo);
        CUDNN_CHECK(cudnnConvolutionBackwardData(g.dnn, &one, p->w, w, p->yp, g.packed_y, p->conv, p->bwd_data,
                                                 g.workspace, g.workspace_bytes, &zero, p->xp, g.packed_x));
        from_packed(dx, g.packed_x, N, Cin, H * W);
    } else
        CUDNN_CHECK(cudnnConvolutionBackwardData(g.dnn, &one, p->w, w, p->y, dy, p->conv, p->bwd_data, g.workspace,
                                                 g.workspace_bytes, &zero, p->x, dx));
}

/* how the convolutions run: plans, and how many directions run on packed copies */
extern "C" void excb_cuda_conv_report(int *plans, int *packed_directions) {
    *plans = g.n_plans;
    *packed_directions = 0;
    for (int i = 0; i < g.n_plans; i++)
        *packed_directions += g.plans[i].fwd_packed + g.plans[i].bwd_data_packed + g.plans[i].bwd_filter_packed;
}

/* --- BatchNorm (train mode) with ReLU and the residual fused ---------------------------------------
 * excb.c's formulas: statistics in double, out = act(y*scale + shift [+ residual]). A channel is one
 * contiguous run of NHW values; it is cut into chunks of BN_CHUNK, each block sums one chunk (a fixed
 * tree), and one thread per channel adds the chunks in order. */
#define BN_THREADS 256
#define BN_CHUNK 8192

__global__ void bn_partial_kernel(const float *y, int NHW, int n_chunks, double *part) {
    __shared__ double smem[33];
    int c = blockIdx.y, j = blockIdx.x;
    const float *yc = y + (size_t)c * NHW;
    int i0 = j * BN_CHUNK, i1 = min(NHW, i0 + BN_CHUNK);
    double s = 0, ss = 0;
    for (int i = i0 + threadIdx.x; i < i1; i += blockDim.x) {
        double v = yc[i];
        s += v;
        ss += v * v;
    }
    s = block_sum(s, smem);
    ss = block_sum(ss, smem);
    if (threadIdx.x == 0) {
        part[((size_t)c * n_chunks + j) * 2] = s;
        part[((size_t)c * n_chunks + j) * 2 + 1] = ss;
    }
}

__global__ void bn_stats_kernel(const double *part, int n_chunks, int C, int NHW, float eps, float momentum,
                                float *mean, float *rstd, float *run_mean, float *run_var, const float *gamma,
                                const float *beta, float *scale, float *shift) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    double sum = 0, sumsq = 0;
    for (int j = 0; j < n_chunks; j++) {
        sum += part[((size_t)c * n_chunks + j) * 2];
        sumsq += part[((size_t)c * n_chunks + j) * 2 + 1];
    }
    excb_bn_statistics(sum, sumsq, NHW, eps, momentum, gamma[c], beta[c], &mean[c], &rstd[c],
                       run_mean ? &run_mean[c] : NULL, run_mean ? &run_var[c] : NULL, &scale[c], &shift[c]);
}

__global__ void bn_apply_kernel(float *out, const float *y, const float *scale, const float *shift,
                                const float *residual, int relu, int C, int NHW) {
    size_t total = (size_t)C * NHW;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
        int c = (int)(i / NHW);
        float v = y[i] * scale[c] + shift[c];
        if (residual) v += residual[i];
        if (relu) v = v < 0.0f ? 0.0f : v;
        out[i] = v;
    }
}

/* per-channel scratch of the BN kernels: scale and shift (2 C floats) after the partials */
static float *bn_scratch(int C, int n_chunks, double **part) {
    size_t need_d = (size_t)C * n_chunks * 2 + C;              /* partials, then C doubles = 2C floats */
    double *p = partials(need_d);
    *part = p;
    return (float *)(p + (size_t)C * n_chunks * 2);
}

/* SyncBN on the device (excb.c section 10b): this rank's partials folded per channel on the host, in
   chunk order as bn_stats_kernel adds them; the ranks' sums added in rank order by excb_comm_sum_f64
   (through host memory: 2C doubles a BatchNorm, for ranks on one GPU or on several); the global batch's
   sums back on the device as one chunk, (sum, sum of squares) per channel like a partial. */
static const double *bn_global_sums(ExcbComm *comm, const double *part, int C, int n_chunks) {
    const double *h = fetch_partials(part, (size_t)C * n_chunks * 2);
    if (2 * (size_t)C > g.bn_red_cap) {            /* grown once: no allocation per BatchNorm call */
        free(g.bn_red);
        g.bn_red = (double *)malloc(sizeof(double) * 2 * C);
        g.bn_red_cap = 2 * (size_t)C;
    }
    double *red = g.bn_red;
    for (int c = 0; c < C; c++) {
        double s = 0, s2 = 0;
        for (int j = 0; j < n_chunks; j++) {
            s += h[((size_t)c * n_chunks + j) * 2];
            s2 += h[((size_t)c * n_chunks + j) * 2 + 1];
        }
        red[2 * c] = s;
        red[2 * c + 1] = s2;
    }
    excb_comm_sum_f64(comm, red, 2 * (size_t)C);
    if (2 * (size_t)C > g.bn_global_cap) {
        dfree(g.bn_global, sizeof(double) * g.bn_global_cap);
        g.bn_global = (double *)dmalloc(sizeof(double) * 2 * C);
        g.bn_global_cap = 2 * (size_t)C;
    }
    copy_sync(g.bn_global, red, sizeof(double) * 2 * C, cudaMemcpyHostToDevice);
    return g.bn_global;
}

static int bn_ranks(const ExcbComm *comm) { return comm && comm->size > 1 ? comm->size : 1; }

static void cuda_batchnorm_forward(real *out, real *mean, real *rstd, real *run_mean, real *run_var, const real *y,
                                   const real *gamma, const real *beta, const real *residual, int relu, int C,
                                   int NHW, real eps, real momentum, int channels_last, ExcbComm *comm) {
    (void)channels_last;               /* always 0 here: this table's backbone layout is (C, N, H, W) */
    int n_chunks = (NHW + BN_CHUNK - 1) / BN_CHUNK, R = bn_ranks(comm);
    double *part;
    float *scale = bn_scratch(C, n_chunks, &part), *shift = scale + C;
    bn_partial_kernel<<<dim3(n_chunks, C), BN_THREADS, 0, g.stream>>>(y, NHW, n_chunks, part);
    KERNEL_CHECK();
    const double *sums = R > 1 ? bn_global_sums(comm, part, C, n_chunks) : part;   /* SyncBN: the ranks' */
    bn_stats_kernel<<<(C + 127) / 128, 128, 0, g.stream>>>(sums, R > 1 ? 1 : n_chunks, C, NHW * R, eps, momentum, mean,
                                                           rstd, run_mean, run_var, gamma, beta, scale, shift);
    KERNEL_CHECK();
    bn_apply_kernel<<<blocks_for((size_t)C * NHW, 256), 256, 0, g.stream>>>(out, y, scale, shift, residual, relu, C, NHW);
    KERNEL_CHECK();
}

/* backward: g = dout [out > 0], sums of g and g*xhat per channel, then dy = gamma rstd (g - a - xhat b) */
__global__ void bn_back_partial_kernel(const float *dout, const float *out, const float *y, const float *mean,
                                       const float *rstd, int relu, int NHW, int n_chunks, double *part) {
    __shared__ double smem[33];
    int c = blockIdx.y, j = blockIdx.x;
    size_t o = (size_t)c * NHW;
    float mu = mean[c], rs = rstd[c];
    int i0 = j * BN_CHUNK, i1 = min(NHW, i0 + BN_CHUNK);
    double sg = 0, sgx = 0;
    for (int i = i0 + threadIdx.x; i < i1; i += blockDim.x) {
        float gv = (!relu || out[o + i] > 0.0f) ? dout[o + i] : 0.0f;
        sg += gv;
        sgx += (double)gv * ((y[o + i] - mu) * rs);
    }
    sg = block_sum(sg, smem);
    sgx = block_sum(sgx, smem);
    if (threadIdx.x == 0) {
        part[((size_t)c * n_chunks + j) * 2] = sg;
        part[((size_t)c * n_chunks + j) * 2 + 1] = sgx;
    }
}

/* the affine gradients get this rank's sums (the gradient all-reduce adds the shares); the input's
   gradient the means over the global batch: glob's sums over n values (SyncBN), or this rank's */
__global__ void bn_back_stats_kernel(const double *part, int n_chunks, const double *glob, int C, int n, float *dgamma,
                                     float *dbeta, float *a_out, float *b_out) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    double sum_g = 0, sum_gx = 0;
    for (int j = 0; j < n_chunks; j++) {
        sum_g += part[((size_t)c * n_chunks + j) * 2];
        sum_gx += part[((size_t)c * n_chunks + j) * 2 + 1];
    }
    dbeta[c] += (float)sum_g;
    dgamma[c] += (float)sum_gx;
    if (glob) {
        sum_g = glob[2 * c];
        sum_gx = glob[2 * c + 1];
    }
    a_out[c] = (float)(sum_g / n);
    b_out[c] = (float)(sum_gx / n);
}

__global__ void bn_back_apply_kernel(float *dy, const float *dout, const float *out, const float *y,
                                     const float *mean, const float *rstd, const float *gamma, const float *a,
                                     const float *b, int relu, int C, int NHW) {
    size_t total = (size_t)C * NHW;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
        int c = (int)(i / NHW);
        float gv = (!relu || out[i] > 0.0f) ? dout[i] : 0.0f;
        float k1 = gamma[c] * rstd[c];
        dy[i] = k1 * (gv - a[c] - (y[i] - mean[c]) * rstd[c] * b[c]);
    }
}

static void cuda_batchnorm_backward(real *dy, real *dgamma, real *dbeta, const real *dout, const real *out,
                                    const real *y, const real *mean, const real *rstd, const real *gamma, int relu,
                                    int C, int NHW, int channels_last, ExcbComm *comm) {
    (void)channels_last;               /* always 0 here, as above */
    int n_chunks = (NHW + BN_CHUNK - 1) / BN_CHUNK, R = bn_ranks(comm);
    double *part;
    float *a = bn_scratch(C, n_chunks, &part), *b = a + C;
    bn_back_partial_kernel<<<dim3(n_chunks, C), BN_THREADS, 0, g.stream>>>(dout, out, y, mean, rstd, relu, NHW,
                                                                           n_chunks, part);
    KERNEL_CHECK();
    const double *glob = R > 1 ? bn_global_sums(comm, part, C, n_chunks) : NULL;
    bn_back_stats_kernel<<<(C + 127) / 128, 128, 0, g.stream>>>(part, n_chunks, glob, C, NHW * R, dgamma, dbeta, a, b);
    KERNEL_CHECK();
    bn_back_apply_kernel<<<blocks_for((size_t)C * NHW, 256), 256, 0, g.stream>>>(dy, dout, out, y, mean, rstd, gamma,
                                                                                 a, b, relu, C, NHW);
    KERNEL_CHECK();
}

/* --- max-pool 3x3/2 pad 1 (ImageNet stem); the backward gathers, so no two threads add to one cell -- */
__global__ void maxpool_forward_kernel(float *out, int32_t *arg, const float *x, int planes, int H, int W, int Ho, int Wo) {
    size_t total = (size_t)planes * Ho * Wo;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
        size_t pl = i / (Ho * Wo);
        int o = (int)(i % (Ho * Wo)), oy = o / Wo, ox = o % Wo;
        const float *xp = x + pl * H * W;
        float best = -INFINITY;
        int at = -1;
        for (int a = 0; a < 3; a++)
            for (int b = 0; b < 3; b++) {
                int iy = oy * 2 - 1 + a, ix = ox * 2 - 1 + b;
                if (iy < 0 || iy >= H || ix < 0 || ix >= W) continue;
                float v = xp[iy * W + ix];
                if (v > best || isnan(v)) { best = v; at = iy * W + ix; }
            }
        out[i] = best;
        arg[i] = at;
    }
}

static void cuda_maxpool_forward(real *out, int32_t *arg, const real *x, int C, int N, int H, int W) {
    int Ho = (H + 2 - 3) / 2 + 1, Wo = (W + 2 - 3) / 2 + 1;
    maxpool_forward_kernel<<<blocks_for((size_t)C * N * Ho * Wo, 256), 256, 0, g.stream>>>(out, arg, x, C * N, H, W, Ho, Wo);
    KERNEL_CHECK();
}

/* input cell (iy, ix) collects dout of the (at most 2x2) windows that contain it and chose it */
__global__ void maxpool_backward_kernel(float *dx, const float *dout, const int32_t *arg, int planes, int H, int W,
                                        int Ho, int Wo) {
    size_t total = (size_t)planes * H * W;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
        size_t pl = i / (H * W);
        int cell = (int)(i % (H * W)), iy = cell / W, ix = cell % W;
        float acc = 0.0f;
        int oy0 = iy / 2, ox0 = ix / 2;                  /* windows oy with 2oy-1 <= iy <= 2oy+1 */
        for (int oy = oy0; oy <= min(Ho - 1, (iy + 1) / 2); oy++)
            for (int ox = ox0; ox <= min(Wo - 1, (ix + 1) / 2); ox++) {
                size_t o = pl * Ho * Wo + (size_t)oy * Wo + ox;
                if (arg[o] == cell) acc += dout[o];
            }
        dx[i] = acc;
    }
}

static void cuda_maxpool_backward(real *dx, const real *dout, const int32_t *arg, int C, int N, int H, int W) {
    int Ho = (H + 2 - 3) / 2 + 1, Wo = (W + 2 - 3) / 2 + 1;
    maxpool_backward_kernel<<<blocks_for((size_t)C * N * H * W, 256), 256, 0, g.stream>>>(dx, dout, arg, C * N, H, W, Ho, Wo);
    KERNEL_CHECK();
}

/* --- global average pool ----------------------------------------------------------------------------- */
__global__ void avgpool_forward_kernel(float *f, int ldf, const float *x, int C, int N, int HW) {
    size_t total = (size_t)C * N;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
        const float *xp = x + i * HW;
        double acc = 0;
        for (int p = 0; p < HW; p++) acc += xp[p];
        f[(i / N) * ldf + i % N] = (float)(acc / HW);
    }
}

static void cuda_avgpool_forward(real *f, int ldf, const real *x, int C, int N, int HW) {
    avgpool_forward_kernel<<<blocks_for((size_t)C * N, 256), 256, 0, g.stream>>>(f, ldf, x, C, N, HW);
    KERNEL_CHECK();
}

__global__ void avgpool_backward_kernel(float *dx, const float *df, int ldf, int C, int N, int HW) {
    size_t total = (size_t)C * N * HW;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
        size_t cn = i / HW;
        dx[i] = df[(cn / N) * ldf + cn % N] / (float)HW;
    }
}

static void cuda_avgpool_backward(real *dx, const real *df, int ldf, int C, int N, int HW) {
    avgpool_backward_kernel<<<blocks_for((size_t)C * N * HW, 256), 256, 0, g.stream>>>(dx, df, ldf, C, N, HW);
    KERNEL_CHECK();
}

/* ================================================================================================
 * 2. Heads: GEMMs through cuBLAS
 * ================================================================================================
 * excb.c's GEMM is row-major: C (M x N) = alpha op(A) op(B) + beta C. cuBLAS is column-major, where
 * the same memory holds C^T; C^T = op(B)^T op(A)^T, so the call swaps the operands and M with N. */
static void cuda_gemm(char ta, char tb, int M, int N, int K, real alpha, const real *A, int lda, const real *B,
                      int ldb, real beta, real *C, int ldc) {
    if (M <= 0 || N <= 0) return;
    cublasOperation_t opa = ta == 'N' ? CUBLAS_OP_N : CUBLAS_OP_T, opb = tb == 'N' ? CUBLAS_OP_N : CUBLAS_OP_T;
    CUBLAS_CHECK(cublasSgemm(g.blas, opb, opa, N, M, K, &alpha, B, ldb, A, lda, &beta, C, ldc));
}

__global__ void fill_rows_kernel(float *y, const float *b, int out, int N) {
    size_t total = (size_t)out * N;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x)
        y[i] = b[i / N];
}

/* y (out, N) = b, then y += w . x (addmm, as excb.c) */
static void cuda_linear_forward(real *y, const real *x, const real *w, const real *b, int in, int out, int N) {
    fill_rows_kernel<<<blocks_for((size_t)out * N, 256), 256, 0, g.stream>>>(y, b, out, N);
    KERNEL_CHECK();
    cuda_gemm('N', 'N', out, N, in, 1.0f, w, in, x, N, 1.0f, y, N);
}

/* db[o] += sum_n dy[o, n], one block per row */
__global__ void row_sums_add_kernel(float *db, const float *dy, int N) {
    __shared__ double smem[33];
    const float *r = dy + (size_t)blockIdx.x * N;
    double acc = 0;
    for (int n = threadIdx.x; n < N; n += blockDim.x) acc += r[n];
    acc = block_sum(acc, smem);
    if (threadIdx.x == 0) db[blockIdx.x] += (float)acc;
}

static void cuda_linear_backward(real *dx, real *dw, real *db, const real *dy, const real *x, const real *w, int in,
                                 int out, int N) {
    row_sums_add_kernel<<<out, 256, 0, g.stream>>>(db, dy, N);
    KERNEL_CHECK();
    cuda_gemm('N', 'T', out, in, N, 1.0f, dy, N, x, N, 1.0f, dw, in);
    if (dx) cuda_gemm('T', 'N', in, N, out, 1.0f, w, in, dy, N, 0.0f, dx, N);
}

/* ================================================================================================
 * 3. Prototypes: row normalisation (F.normalize) and weight norm
 * ================================================================================================ */
/* one thread per row n of the feature-major x (d, N): reads are coalesced across threads */
__global__ void l2norm_rows_forward_kernel(float *u, float *den, const float *x, int ldx, int d, int N, float eps) {
    int n = blockIdx.x * blockDim.x + threadIdx.x;
    if (n >= N) return;
    double ss = 0;
    for (int j = 0; j < d; j++) {
        double v = x[(size_t)j * ldx + n];
        ss += v * v;
    }
    float nrm = (float)sqrt(ss), dn = nrm < eps ? eps : nrm;
    if (isnan(nrm)) dn = nrm;
    den[n] = dn;
    for (int j = 0; j < d; j++) u[(size_t)n * d + j] = x[(size_t)j * ldx + n] / dn;
}

static void cuda_l2norm_rows_forward(real *u, real *den, const real *x, int ldx, int d, int N, real eps) {
    l2norm_rows_forward_kernel<<<(N + 127) / 128, 128, 0, g.stream>>>(u, den, x, ldx, d, N, eps);
    KERNEL_CHECK();
}

__global__ void l2norm_rows_backward_kernel(float *dx, int ldx, const float *du, const float *u, const float *den,
                                            int d, int N, float eps, int accumulate) {
    int n = blockIdx.x * blockDim.x + threadIdx.x;
    if (n >= N) return;
    const float *un = u + (size_t)n * d, *dun = du + (size_t)n * d;
    double dot = 0;
    if (den[n] > eps)
        for (int j = 0; j < d; j++) dot += (double)un[j] * dun[j];
    float dotf = (float)dot;
    for (int j = 0; j < d; j++) {
        float gv = (dun[j] - un[j] * dotf) / den[n];
        float *t = &dx[(size_t)j * ldx + n];
        *t = accumulate ? *t + gv : gv;
    }
}

static void cuda_l2norm_rows_backward(real *dx, int ldx, const real *du, const real *u, const real *den, int d, int N,
                                      real eps, int accumulate) {
    l2norm_rows_backward_kernel<<<(N + 127) / 128, 128, 0, g.stream>>>(dx, ldx, du, u, den, d, N, eps, accumulate);
    KERNEL_CHECK();
}

/* the raw rows (CARP, mvbt): u (N, d) = x^T of a (d, ldx) matrix, and back; one thread per value */
__global__ void rows_forward_kernel(float *u, const float *x, int ldx, int d, int N) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (size_t)N * d) return;
    int n = (int)(i / d), j = (int)(i % d);
    u[i] = x[(size_t)j * ldx + n];
}

static void cuda_rows_forward(real *u, const real *x, int ldx, int d, int N) {
    size_t n = (size_t)N * d;
    rows_forward_kernel<<<(unsigned)((n + 255) / 256), 256, 0, g.stream>>>(u, x, ldx, d, N);
    KERNEL_CHECK();
}

__global__ void rows_backward_kernel(float *dx, int ldx, const float *du, int d, int N) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (size_t)N * d) return;
    int j = (int)(i / N), n = (int)(i % N);
    dx[(size_t)j * ldx + n] = du[(size_t)n * d + j];
}

static void cuda_rows_backward(real *dx, int ldx, const real *du, int d, int N) {
    size_t n = (size_t)N * d;
    rows_backward_kernel<<<(unsigned)((n + 255) / 256), 256, 0, g.stream>>>(dx, ldx, du, d, N);
    KERNEL_CHECK();
}

/* one warp per centroid row k */
__global__ void weightnorm_forward_kernel(float *c, float *inv, const float *v, int K, int d) {
    int k = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x & 31;
    if (k >= K) return;
    const float *vk = v + (size_t)k * d;
    double ss = 0;
    for (int j = lane; j < d; j += 32) ss += (double)vk[j] * vk[j];
    for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
    float r = 1.0f / (float)sqrt(ss);
    if (lane == 0) inv[k] = r;
    for (int j = lane; j < d; j += 32) c[(size_t)k * d + j] = vk[j] * r;
}

static void cuda_weightnorm_forward(real *c, real *inv, const real *v, int K, int d) {
    weightnorm_forward_kernel<<<(K + 7) / 8, 256, 0, g.stream>>>(c, inv, v, K, d);
    KERNEL_CHECK();
}

__global__ void weightnorm_backward_kernel(float *dv, const float *dc, const float *c, const float *inv, int K, int d) {
    int k = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x & 31;
    if (k >= K) return;
    const float *ck = c + (size_t)k * d, *dck = dc + (size_t)k * d;
    double dot = 0;
    for (int j = lane; j < d; j += 32) dot += (double)ck[j] * dck[j];
    for (int o = 16; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
    float dotf = (float)dot;
    for (int j = lane; j < d; j += 32) dv[(size_t)k * d + j] += (dck[j] - ck[j] * dotf) * inv[k];
}

static void cuda_weightnorm_backward(real *dv, const real *dc, const real *c, const real *inv, int K, int d) {
    weightnorm_backward_kernel<<<(K + 7) / 8, 256, 0, g.stream>>>(dv, dc, c, inv, K, d);
    KERNEL_CHECK();
}

/* ================================================================================================
 * 4. Cluster sizes: E2's hard counts (integer atomics: exact in any order), E3 with A4's rounding
 * ================================================================================================ */
__global__ void count_labels_kernel(int32_t *counts, const int32_t *labels, int N) {
    int n = blockIdx.x * blockDim.x + threadIdx.x;
    if (n < N) atomicAdd(&counts[labels[n]], 1);
}

__device__ float round_fp16(float x) { return __half2float(__float2half_rn(x)); }

__global__ void cluster_size_kernel(float *s, const int32_t *counts, int N, int K, float m, float one_minus_m,
                                    float one_minus_m16, int fp16_term, int32_t *used) {
    int k = blockIdx.x * blockDim.x + threadIdx.x;
    if (k >= K) return;
    float frac = (float)counts[k] / (float)N;
    float term = fp16_term ? round_fp16(round_fp16(frac) * one_minus_m16) : frac * one_minus_m;
    s[k] = s[k] * m + term;
    if (counts[k] > 0) atomicAdd(used, 1);
}

static int cuda_cluster_size_update(real *s, int32_t *counts, const int32_t *labels, int N, int K, double m_s,
                                    int fp16_term) {
    CUDA_CHECK(cudaMemsetAsync(counts, 0, sizeof(int32_t) * K, g.stream));
    CUDA_CHECK(cudaMemsetAsync(g.used, 0, sizeof(int32_t), g.stream));
    count_labels_kernel<<<(N + 255) / 256, 256, 0, g.stream>>>(counts, labels, N);
    KERNEL_CHECK();
    float m = (float)m_s, omm = (float)(1.0 - m_s), omm16 = __half2float(__float2half_rn(omm));
    cluster_size_kernel<<<(K + 255) / 256, 256, 0, g.stream>>>(s, counts, N, K, m, omm, omm16, fp16_term, g.used);
    KERNEL_CHECK();
    int32_t used = 0;
    CUDA_CHECK(cudaMemcpyAsync(&used, g.used, sizeof used, cudaMemcpyDeviceToHost, g.stream));
    CUDA_CHECK(cudaStreamSynchronize(g.stream));
    return used;
}

/* ================================================================================================
 * 5. Balancing (E3', E4) and the teacher targets (E5, E6)
 * ================================================================================================ */
/* one block: sum |s| (F.normalize(s, p=1)), then every factor; A3's jitter from excb.c's generator */
__global__ void balance_factors_kernel(float *r, float *lower, float *higher, const float *s, int K, float jitter,
                                       uint64_t seed, long step) {
    __shared__ double smem[33];
    double acc = 0;
    for (int k = threadIdx.x; k < K; k += blockDim.x) acc += fabs((double)s[k]);
    double sum = block_sum(acc, smem);
    float den = (float)sum > 1e-12f ? (float)sum : 1e-12f;
    for (int k = threadIdx.x; k < K; k += blockDim.x) {
        float rk = s[k] / den * (float)K;
        float lo = 1.0f - fmaxf(1.0f - rk, 0.0f);
        float hi = 1.0f - fmaxf(1.0f - 1.0f / rk, 0.0f);
        if (lo == 0.0f) lo += d_uniform(seed, EXCB_RNG_JITTER, (uint64_t)step, 0, k) * jitter;
        if (hi == 0.0f) hi += d_uniform(seed, EXCB_RNG_JITTER, (uint64_t)step, 1, k) * jitter;
        r[k] = rk;
        lower[k] = lo;
        higher[k] = hi;
    }
}

static void cuda_balance_factors(real *r, real *lower, real *higher, const real *s, int K, double jitter,
                                 uint64_t seed, long step) {
    balance_factors_kernel<<<1, 1024, 0, g.stream>>>(r, lower, higher, s, K, (float)jitter, seed, step);
    KERNEL_CHECK();
}

/* One block per teacher row: E4 into the q row (as scratch), the first argmax, E5's boost and clamp,
   the softmax E6 (exp in double, sum in double), then the label = argmax q. No (N, K) one-hot tensor
   and no boost-factor tensor: the boost touches one element. */
#define ROW_THREADS 512
__global__ void balanced_targets_kernel(float *q, int32_t *labels, float *zhat, const float *z, const float *lower,
                                        const float *higher, int K, float factor, float clampv, float tau) {
    __shared__ double smem[33];
    __shared__ float smem_v[33];
    __shared__ int smem_i[33];
    int n = blockIdx.x;
    const float *zn = z + (size_t)n * K;
    float *zh = zhat ? zhat + (size_t)n * K : q + (size_t)n * K, *qn = q + (size_t)n * K;
    float bv = -INFINITY;
    int bi = 0x7fffffff;
    for (int k = threadIdx.x; k < K; k += blockDim.x) {
        float lo = lower ? lower[k] : 1.0f, hi = higher ? higher[k] : 1.0f;   /* NULL: `none` */
        float z1 = 1.0f - (1.0f - zn[k]) * lo;                         /* E4, lower branch */
        float z2 = (z1 + 1.0f) * hi - 1.0f;                            /* E4, upper branch */
        zh[k] = z2;
        argmax_merge(bv, bi, z2, k);
    }
    int a = block_argmax(bv, bi, smem_v, smem_i);
    if (threadIdx.x == 0) zh[a] *= factor;                            /* E5 boost (A1)    */
    __syncthreads();
    float mx = -INFINITY;
    for (int k = threadIdx.x; k < K; k += blockDim.x) {
        float v = fminf(fmaxf(zh[k], -clampv), clampv);               /* E5 clamp (A2)    */
        zh[k] = v;
        mx = fmaxf(mx, v / tau);
    }
    mx = block_max(mx, smem_v);
    double sum = 0;
    for (int k = threadIdx.x; k < K; k += blockDim.x) {
        float e = (float)exp((double)(zh[k] / tau - mx));
        qn[k] = e;
        sum += e;
    }
    sum = block_sum(sum, smem);
    float inv = (float)(1.0 / sum);
    bv = -INFINITY;
    bi = 0x7fffffff;
    for (int k = threadIdx.x; k < K; k += blockDim.x) {
        float v = qn[k] * inv;                                         /* E6               */
        qn[k] = v;
        argmax_merge(bv, bi, v, k);
    }
    int best = block_argmax(bv, bi, smem_v, smem_i);
    if (threadIdx.x == 0) labels[n] = best;                            /* for E2           */
}

static void cuda_balanced_targets(real *q, int32_t *labels, real *zhat, const real *z, const real *lower,
                                  const real *higher, int N, int K, double boost, double clamp, double tau_t) {
    balanced_targets_kernel<<<N, ROW_THREADS, 0, g.stream>>>(q, labels, zhat, z, lower, higher, K, (float)(1.0 + boost),
                                                             (float)clamp, (float)tau_t);
    KERNEL_CHECK();
}

/* A21's monitors: per row max q, 1 / sum exp((z - zmax)/tau_s); per cluster the mean q */
__global__ void diag_rows_kernel(const float *q, const float *z, double *per_row, int NG, int K, double tau_s) {
    __shared__ double smem[33];
    __shared__ float smem_f[33];
    int i = blockIdx.x;
    const float *qi = q + (size_t)i * K, *zi = z + (size_t)i * K;
    float qmax = -INFINITY, zmax = -INFINITY;
    for (int k = threadIdx.x; k < K; k += blockDim.x) { qmax = fmaxf(qmax, qi[k]); zmax = fmaxf(zmax, zi[k]); }
    qmax = block_max(qmax, smem_f);
    zmax = block_max(zmax, smem_f);
    double sum = 0;
    for (int k = threadIdx.x; k < K; k += blockDim.x) sum += exp(((double)zi[k] - zmax) / tau_s);
    sum = block_sum(sum, smem);
    if (threadIdx.x == 0) { per_row[i] = qmax; per_row[NG + i] = 1.0 / sum; }
}

__global__ void diag_qbar_kernel(const float *q, double *qbar, int NG, int K) {
    int k = blockIdx.x * blockDim.x + threadIdx.x;
    if (k >= K) return;
    double acc = 0;
    for (int i = 0; i < NG; i++) acc += q[(size_t)i * K + k];
    qbar[k] = acc / NG;
}

static void cuda_step_diagnostics(const real *q, const real *z, double *per_row, double *qbar, int NG, int K,
                                  double tau_s, double out[3]) {
    diag_rows_kernel<<<NG, ROW_THREADS, 0, g.stream>>>(q, z, per_row, NG, K, tau_s);
    KERNEL_CHECK();
    diag_qbar_kernel<<<(K + 255) / 256, 256, 0, g.stream>>>(q, qbar, NG, K);
    KERNEL_CHECK();
    double *h = fetch_partials(per_row, 2 * (size_t)NG);          /* host sums, in excb.c's order */
    double tconf = 0, sconf = 0, ent = 0;
    for (int i = 0; i < NG; i++) { tconf += h[i]; sconf += h[NG + i]; }
    const double *qb = fetch_partials(qbar, K);
    for (int k = 0; k < K; k++)
        if (qb[k] > 0) ent -= qb[k] * log(qb[k]);
    out[0] = tconf / NG;
    out[1] = sconf / NG;
    out[2] = ent;
}

/* ================================================================================================
 * 6. The loss (E7, E8) and its gradient (E11): one block per student row, z replaced by dL/dz
 * ================================================================================================
 * Row r < n_dir_crops*B is the direct row of crop r / B, matched by every other teacher view; the rest
 * are predictor rows of any crop, matched by every teacher view (excb.c section 6, either pairing). */
__global__ void loss_rows_kernel(float *z_dir, int n_dir_crops, float *z_pred, double *row_loss, const float *q, int Vg,
                                 int B, int K, float tau, float scale) {
    __shared__ double smem[33];
    __shared__ float smem_f[33];
    int r = blockIdx.x, n_dir = n_dir_crops * B;
    float *z;
    int i, skip;
    if (r < n_dir) { z = z_dir + (size_t)r * K; i = r % B; skip = r / B < Vg ? r / B : -1; }
    else { z = z_pred + (size_t)(r - n_dir) * K; i = (r - n_dir) % B; skip = -1; }
    float mx = -INFINITY;
    for (int k = threadIdx.x; k < K; k += blockDim.x) mx = fmaxf(mx, z[k] / tau);
    mx = block_max(mx, smem_f);
    double se = 0, qs = 0, ql = 0;
    for (int k = threadIdx.x; k < K; k += blockDim.x) {
        float l = z[k] / tau, qk = 0.0f;
        for (int v = 0; v < Vg; v++)
            if (v != skip) qk += q[((size_t)v * B + i) * K + k];
        float e = (float)exp((double)(l - mx));
        se += e;
        qs += qk;
        ql += (double)qk * l;
        z[k] = e;
    }
    se = block_sum(se, smem);
    qs = block_sum(qs, smem);
    ql = block_sum(ql, smem);
    int n_match = skip >= 0 ? Vg - 1 : Vg;
    float inv_se = (float)(1.0 / se);
    for (int k = threadIdx.x; k < K; k += blockDim.x) {
        float qk = 0.0f;
        for (int v = 0; v < Vg; v++)
            if (v != skip) qk += q[((size_t)v * B + i) * K + k];
        z[k] = ((float)n_match * (z[k] * inv_se) - qk) * scale;       /* E11 / (tau_s |M| B) */
    }
    if (threadIdx.x == 0) row_loss[r] = (mx + log(se)) * qs - ql;
}

static double cuda_loss_forward_backward(real *z_dir, int n_dir_crops, real *z_pred, double *row_loss, const real *q,
                                         int Vg, int Vl, int B, int K, double tau_s) {
    int n_terms = excb_loss_terms(n_dir_crops, z_pred != NULL, Vg, Vl);
    int n_rows = n_dir_crops * B + (z_pred ? (Vg + Vl) * B : 0);
    double scale = 1.0 / (tau_s * n_terms * B);
    loss_rows_kernel<<<n_rows, ROW_THREADS, 0, g.stream>>>(z_dir, n_dir_crops, z_pred, row_loss, q, Vg, B, K, (float)tau_s,
                                                           (float)scale);
    KERNEL_CHECK();
    double *h = fetch_partials(row_loss, n_rows), total = 0;
    for (int r = 0; r < n_rows; r++) total += h[r];              /* excb.c's order              */
    return total / ((double)n_terms * B);
}

/* ================================================================================================
 * 7. SGD with coupled weight decay (E14) and the teacher's EMA (E9): one pass over the parameters
 * ================================================================================================
 * Per element, in excb.c's roundings (the build has no FMA contraction, --fmad=false):
 *   g' = g + wd p;  buf = 0.9 buf + g';  p = p - lr buf;  t = t m + p (1 - m)                        */
#define GROUP_PADDING 255      /* alignment gaps: excb.c's SGD (per tensor) skips them, its EMA (whole buffer) not */
__global__ void update_kernel(float *p, const float *grad, float *buf, float *t, const uint8_t *group, size_t n,
                              float lr, float mom, float wd, float wdc, float m, float omm) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        if (group[i] == GROUP_PADDING) {                     /* E9 only, as excb.c's ema_update  */
            float ti = t[i] * m;
            t[i] = ti + p[i] * omm;
            continue;
        }
        float wdt = group[i] == EXCB_GROUP_WEIGHT ? wd : group[i] == EXCB_GROUP_CENTROID ? wdc : 0.0f;
        float gi = grad[i] + wdt * p[i];
        float bi = buf[i] * mom;
        float b = bi + gi;
        buf[i] = b;
        float pi = p[i] - lr * b;
        p[i] = pi;
        float ti = t[i] * m;
        t[i] = ti + pi * omm;
    }
}

static void cuda_update(ExcbModel *m, double lr, double wd, double wd_centroid, double ema_m) {
    update_kernel<<<blocks_for(m->n_params, 256), 256, 0, g.stream>>>(m->params, m->grads, m->momentum, m->teacher,
        g.groups, m->n_params, (float)lr, (float)m->cfg.sgd_momentum, (float)wd, (float)wd_centroid, (float)ema_m,
        (float)(1.0 - ema_m));
    KERNEL_CHECK();
}

/* --- the step's plain buffer arithmetic ------------------------------------------------------------ */
static void cuda_zero(real *x, size_t n) { CUDA_CHECK(cudaMemsetAsync(x, 0, sizeof(real) * n, g.stream)); }

static void cuda_zero_columns(real *x, int rows, int ld, int col0, int n) {
    if (n <= 0) return;
    CUDA_CHECK(cudaMemset2DAsync(x + col0, sizeof(real) * ld, 0, sizeof(real) * n, rows, g.stream));
}

__global__ void add_kernel(float *dst, const float *src, const float *gate, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        dst[i] += (!gate || gate[i] > 0.0f) ? src[i] : 0.0f;
}

static void cuda_add(real *dst, const real *src, size_t n) {
    add_kernel<<<blocks_for(n, 256), 256, 0, g.stream>>>(dst, src, NULL, n);
    KERNEL_CHECK();
}

static void cuda_add_gated(real *dst, const real *src, const real *gate, size_t n) {
    add_kernel<<<blocks_for(n, 256), 256, 0, g.stream>>>(dst, src, gate, n);
    KERNEL_CHECK();
}

__global__ void sum_squares_kernel(const float *x, size_t n, double *part) {
    __shared__ double smem[33];
    double acc = 0;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        acc += (double)x[i] * x[i];
    acc = block_sum(acc, smem);
    if (threadIdx.x == 0) part[blockIdx.x] = acc;
}

static double cuda_sum_squares(const real *x, size_t n) {
    double *part = partials(N_PARTIALS);
    sum_squares_kernel<<<N_PARTIALS, 256, 0, g.stream>>>(x, n, part);
    KERNEL_CHECK();
    double *h = fetch_partials(part, N_PARTIALS), s = 0;
    for (int i = 0; i < N_PARTIALS; i++) s += h[i];
    return s;
}

static void cuda_to_host(void *dst, const void *src, size_t bytes) {
    CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, g.stream));
    CUDA_CHECK(cudaStreamSynchronize(g.stream));
}

static void cuda_to_device(void *dst, const void *src, size_t bytes) { copy_sync(dst, src, bytes, cudaMemcpyHostToDevice); }

/* ================================================================================================
 * 8. The operator table, the device twin of a model, and the probe
 * ================================================================================================ */
extern "C" const ExcbOps excb_cuda_ops = {
    "cuda",
    0,                                 /* channels_last: the backbone is (C, N, H, W) on the device for now */
    cuda_images_to_features,
    cuda_conv2d_forward,
    cuda_conv2d_backward,
    cuda_batchnorm_forward,
    cuda_batchnorm_backward,
    cuda_maxpool_forward,
    cuda_maxpool_backward,
    cuda_avgpool_forward,
    cuda_avgpool_backward,
    cuda_linear_forward,
    cuda_linear_backward,
    cuda_gemm,
    cuda_l2norm_rows_forward,
    cuda_l2norm_rows_backward,
    cuda_rows_forward,
    cuda_rows_backward,
    cuda_weightnorm_forward,
    cuda_weightnorm_backward,
    cuda_balance_factors,
    cuda_balanced_targets,
    cuda_step_diagnostics,
    cuda_loss_forward_backward,
    cuda_cluster_size_update,
    cuda_update,
    cuda_zero,
    cuda_zero_columns,
    cuda_add,
    cuda_add_gated,
    cuda_sum_squares,
    cuda_to_host,
    cuda_to_device,
};

extern "C" int excb_cuda_built(void) { return 1; }

extern "C" int excb_cuda_probe(char *desc, size_t cap) {
    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess || n == 0) {
        if (e == cudaErrorInsufficientDriver || e == cudaErrorNoDevice)    /* what a machine without one says */
            snprintf(desc, cap, "no usable CUDA device: no GPU, no NVIDIA driver, or a driver older than this "
                     "build's CUDA %d.%d runtime (CUDA says: %s)", CUDART_VERSION / 1000, CUDART_VERSION % 1000 / 10,
                     cudaGetErrorString(e));
        else
            snprintf(desc, cap, "no usable CUDA device (%s)", e != cudaSuccess ? cudaGetErrorString(e) : "none found");
        cudaGetLastError();
        return EXCB_EXIT_UNAVAILABLE;
    }
    cudaDeviceProp p;
    CUDA_CHECK(cudaGetDeviceProperties(&p, 0));
    int drv = 0, rt = 0, blas = 0;
    cudaDriverGetVersion(&drv);
    cudaRuntimeGetVersion(&rt);
    cublasGetProperty(MAJOR_VERSION, &blas);
    int bmin = 0, bpatch = 0;
    cublasGetProperty(MINOR_VERSION, &bmin);
    cublasGetProperty(PATCH_LEVEL, &bpatch);
    size_t v = cudnnGetVersion();
    snprintf(desc, cap, "%s (sm_%d%d, %d SMs, %.1f GiB), driver CUDA %d.%d, runtime %d.%d, cuBLAS %d.%d.%d, cuDNN %zu.%zu.%zu",
             p.name, p.major, p.minor, p.multiProcessorCount, p.totalGlobalMem / 1073741824.0, drv / 1000,
             drv % 1000 / 10, rt / 1000, rt % 1000 / 10, blas, bmin, bpatch, v / 10000, v / 100 % 100, v % 100);
    return 0;
}

extern "C" int excb_cuda_init(ExcbPrecision precision, char *err) {
    if (g.ready) {
        if (g.precision != precision) {
            snprintf(err, EXCB_ERR_LEN, "one process runs one precision on the GPU (attached already as %d)", (int)g.precision);
            return EXCB_EXIT_USAGE;
        }
        return 0;
    }
    char desc[512];
    if (excb_cuda_probe(desc, sizeof desc)) {
        snprintf(err, EXCB_ERR_LEN, "--device cuda: %s", desc);
        return EXCB_EXIT_UNAVAILABLE;
    }
    g.precision = precision;
    CUDA_CHECK(cudaSetDevice(g.device));           /* 0, or the rank's (excb_cuda_join) */
    CUDA_CHECK(cudaStreamCreateWithFlags(&g.stream, cudaStreamNonBlocking));
    CUBLAS_CHECK(cublasCreate(&g.blas));
    CUBLAS_CHECK(cublasSetStream(g.blas, g.stream));
    /* FP32: the default math mode computes FP32 SGEMMs without TF32; TF32: allow tensor cores in TF32 */
    CUBLAS_CHECK(cublasSetMathMode(g.blas, precision == EXCB_PRECISION_TF32 ? CUBLAS_TF32_TENSOR_OP_MATH
                                                                             : CUBLAS_DEFAULT_MATH));
    CUDNN_CHECK(cudnnCreate(&g.dnn));
    CUDNN_CHECK(cudnnSetStream(g.dnn, g.stream));
    g.used = (int32_t *)dmalloc(sizeof(int32_t));
    g.ready = 1;
    return 0;
}

/* --- several ranks (excb.c section 10b) -------------------------------------------------------------
 * Each rank takes the GPU of its node-local rank (MPI's shared-memory split) modulo the GPUs it sees.
 * When no two ranks hold the same GPU (the ranks compare the UUIDs of theirs, so a scheduler that shows
 * each rank one GPU of its own counts as one each) and NCCL is built in, NCCL joins them, its id
 * broadcast over MPI, and all-reduces the gradients on the GPUs (the sum, then x 1/R: NCCL's own order,
 * not excb.c's rank order, so not bit for bit the --chunks run). Ranks that share a GPU (NCCL refuses
 * two ranks on one device) reduce everything through host memory over MPI, as the small reductions
 * (BatchNorm sums, counts, diagnostics) always do. */
#ifdef EXCB_NCCL
static ncclComm_t nccl;            /* from excb_cuda_join to excb_cuda_leave */
static_assert(sizeof(real) == 4, "NCCL's all-reduce is told ncclFloat");

static void nccl_sum_real(ExcbComm *c, real *x, size_t n, int mean) {
    cudaEvent_t t0, t1;
    CUDA_CHECK(cudaEventCreate(&t0));
    CUDA_CHECK(cudaEventCreate(&t1));
    CUDA_CHECK(cudaEventRecord(t0, g.stream));
    NCCL_CHECK(ncclAllReduce(x, x, n, ncclFloat, ncclSum, nccl, g.stream));
    if (mean) {
        float inv = 1.0f / (float)c->size;
        CUBLAS_CHECK(cublasSscal(g.blas, (int)n, &inv, x, 1));
    }
    CUDA_CHECK(cudaEventRecord(t1, g.stream));
    CUDA_CHECK(cudaEventSynchronize(t1));
    float ms = 0;
    CUDA_CHECK(cudaEventElapsedTime(&ms, t0, t1));
    cudaEventDestroy(t0);
    cudaEventDestroy(t1);
    c->seconds += ms / 1000.0;             /* the accounting excb.c's reductions keep (section 10b) */
    c->bytes += (double)n * sizeof(real);
    c->calls++;
}
#endif

extern "C" int excb_cuda_join(ExcbComm *world, ExcbPrecision precision, char *how, size_t cap, char *err) {
    if (g.ready) {             /* a GPU taken before the join would keep every rank on device 0 */
        snprintf(err, EXCB_ERR_LEN, "internal: excb_cuda_join after the GPU was set up in this process");
        return EXCB_EXIT_SOFTWARE;
    }
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) n = 0;
    cudaGetLastError();
    if (excb_comm_max(world, n == 0)) {             /* every rank takes this branch if any rank must */
        if (n == 0) return excb_cuda_init(precision, err);     /* says why there is no GPU */
        snprintf(err, EXCB_ERR_LEN, "--device cuda: another rank sees no GPU");
        return EXCB_EXIT_UNAVAILABLE;
    }
    g.device = (world->local_size ? world->local_rank : world->rank) % n;
    /* shared: two ranks anywhere hold the same GPU. Every rank gathers every rank's UUID. */
    cudaDeviceProp prop;
    CUDA_CHECK(cudaGetDeviceProperties(&prop, g.device));
    unsigned char *uuids = (unsigned char *)malloc(sizeof prop.uuid * (size_t)world->size);
    if (!uuids) { snprintf(err, EXCB_ERR_LEN, "--device cuda: out of memory"); return EXCB_EXIT_OSERR; }
    excb_comm_gather(world, &prop.uuid, uuids, sizeof prop.uuid);
    const size_t u = sizeof prop.uuid;
    int mine_shared = 0;                                       /* another rank holds this rank's GPU */
    world->gpus = 0;
    for (int a = 0; a < world->size; a++) {
        int first = 1;                                         /* no earlier rank holds a's GPU */
        for (int b = 0; b < a; b++) first &= memcmp(uuids + a * u, uuids + b * u, u) != 0;
        world->gpus += first;
        mine_shared |= a != world->rank && !memcmp(uuids + a * u, uuids + world->rank * u, u);
    }
    free(uuids);
    int shared = world->gpus < world->size;
    /* a GPU in an exclusive compute mode takes one process: two ranks on it would fail to start the second's
       context, with CUDA's words only */
    int mode = cudaComputeModeDefault;
    CUDA_CHECK(cudaDeviceGetAttribute(&mode, cudaDevAttrComputeMode, g.device));
    int exclusive = mine_shared && mode != cudaComputeModeDefault;
    if (excb_comm_max(world, exclusive)) {
        snprintf(err, EXCB_ERR_LEN, "--device cuda: %d ranks share a GPU whose compute mode lets one process in (%s): "
                 "give each rank a GPU of its own, or set the compute mode to Default (nvidia-smi -c 0)", world->size,
                 exclusive ? prop.name : "another rank's");
        return EXCB_EXIT_UNAVAILABLE;
    }
    int code = excb_cuda_init(precision, err);
    if (code) return code;
#ifdef EXCB_NCCL
    if (!shared) {
        ncclUniqueId id;
        if (world->rank == 0) NCCL_CHECK(ncclGetUniqueId(&id));
        excb_comm_broadcast(world, &id, sizeof id);
        NCCL_CHECK(ncclCommInitRank(&nccl, world->size, id, world->rank));
        world->device_sum_real = nccl_sum_real;
        snprintf(how, cap, "%d ranks with a GPU each (this rank: device %d): gradients all-reduced by NCCL, BatchNorm "
                 "sums and counts through host memory over MPI", world->size, g.device);
        return 0;
    }
#endif
    snprintf(how, cap, "%d ranks, %d GPU(s) visible to this rank (device %d): every reduction through host memory over "
             "MPI (%s)", world->size, n, g.device, shared ? "ranks share a GPU, and NCCL takes one GPU per rank"
             : "NCCL is not built in");
    return 0;
}

extern "C" void excb_cuda_leave(ExcbComm *world, int failed) {
#ifdef EXCB_NCCL
    if (world->device_sum_real == nccl_sum_real) {
        /* a rank that fails alone must not wait for the others (MPI_Abort ends them next): abort */
        if (failed) ncclCommAbort(nccl);
        else {
            cudaStreamSynchronize(g.stream);
            ncclCommDestroy(nccl);
        }
        nccl = NULL;
        world->device_sum_real = NULL;
    }
#else
    (void)world; (void)failed;
#endif
}

/* the device twin: a struct copy of m with every buffer on the GPU */
extern "C" int excb_cuda_attach(ExcbModel *dm, const ExcbModel *m, ExcbPrecision precision, char *err) {
    if (precision == EXCB_PRECISION_BF16) {
        snprintf(err, EXCB_ERR_LEN, "--precision bf16 is not implemented yet (fp32 and tf32 are)");
        return EXCB_EXIT_USAGE;
    }
    /* never a silent CPU run (excb.c section 5). The hooks a GPU step does not honour yet (a host loop
       over the parameters before the step; the fused update does not skip frozen centroids) keep a
       method off the GPU even if it were marked cuda = 1. */
    if (!m->method->cuda || m->method->begin_step || m->method->centroids_frozen) {
        snprintf(err, EXCB_ERR_LEN, "method '%s' has no GPU twin yet: run it with --device cpu", m->method->name);
        return EXCB_EXIT_USAGE;
    }
    int code = excb_cuda_init(precision, err);
    if (code) return code;
    *dm = *m;
    size_t np = m->n_params, nr = m->n_running;
    dm->params = (real *)dmalloc(sizeof(real) * np);
    dm->grads = (real *)dmalloc(sizeof(real) * np);
    dm->momentum = (real *)dmalloc(sizeof(real) * np);
    dm->teacher = (real *)dmalloc(sizeof(real) * np);
    dm->running = (real *)dmalloc(sizeof(real) * nr);
    dm->teacher_running = (real *)dmalloc(sizeof(real) * nr);
    dm->mstate = (real *)dmalloc(sizeof(real) * m->mstate_floats);   /* the method's state: ExCB's s */
    excb_method_bind_state(dm);
    /* the activation arena: excb.c's device layout (the shortcuts' BN outputs share a gradient buffer;
       no im2col panels or gradient slots, which cuDNN does not need) with a device base */
    size_t floats = excb_plan_arena(dm, NULL);
    dm->arena = (real *)dmalloc(sizeof(real) * floats);
    dm->arena_floats = floats;
    excb_plan_arena(dm, dm->arena);
    /* each parameter's group, for the fused update */
    uint8_t *grp = (uint8_t *)malloc(np);
    memset(grp, GROUP_PADDING, np);                  /* the alignment gaps between tensors stay as they are */
    for (int t = 0; t < m->n_tensors; t++) memset(grp + m->tensors[t].offset, m->tensors[t].group, m->tensors[t].numel);
    g.groups = (uint8_t *)dmalloc(np);
    copy_sync(g.groups, grp, np, cudaMemcpyHostToDevice);
    free(grp);
    dm->ops = &excb_cuda_ops;
    dm->gpu = &g;
    dm->eval_bn = 0;
    return excb_cuda_upload(dm, m, err);
}

static void copy_state(ExcbModel *dst, const ExcbModel *src, cudaMemcpyKind kind) {
    size_t np = src->n_params, nr = src->n_running;
    copy_sync(dst->params, src->params, sizeof(real) * np, kind);
    copy_sync(dst->momentum, src->momentum, sizeof(real) * np, kind);
    copy_sync(dst->teacher, src->teacher, sizeof(real) * np, kind);
    copy_sync(dst->running, src->running, sizeof(real) * nr, kind);
    copy_sync(dst->teacher_running, src->teacher_running, sizeof(real) * nr, kind);
    copy_sync(dst->mstate, src->mstate, sizeof(real) * src->mstate_floats, kind);
    dst->step = src->step;
}

extern "C" int excb_cuda_download(ExcbModel *m, const ExcbModel *dm, char *err) {
    (void)err;
    CUDA_CHECK(cudaStreamSynchronize(g.stream));
    copy_state(m, dm, cudaMemcpyDeviceToHost);
    return 0;
}

extern "C" int excb_cuda_upload(ExcbModel *dm, const ExcbModel *m, char *err) {
    (void)err;
    CUDA_CHECK(cudaStreamSynchronize(g.stream));
    copy_state(dm, m, cudaMemcpyHostToDevice);
    return 0;
}

extern "C" void excb_cuda_detach(ExcbModel *dm) {
    if (!dm || dm->ops != &excb_cuda_ops) return;
    cudaStreamSynchronize(g.stream);
    size_t np = dm->n_params;
    dfree(dm->params, sizeof(real) * np);
    dfree(dm->grads, sizeof(real) * np);
    dfree(dm->momentum, sizeof(real) * np);
    dfree(dm->teacher, sizeof(real) * np);
    dfree(dm->running, sizeof(real) * dm->n_running);
    dfree(dm->teacher_running, sizeof(real) * dm->n_running);
    dfree(dm->mstate, sizeof(real) * dm->mstate_floats);
    dfree(dm->arena, sizeof(real) * dm->arena_floats);
    dfree(g.groups, np);
    g.groups = NULL;
    memset(dm, 0, sizeof *dm);
}

extern "C" void excb_cuda_memory(size_t *now, size_t *peak) {
    *now = g.bytes;
    *peak = g.peak;
}

extern "C" void excb_cuda_synchronize(void) {
    if (g.ready) CUDA_CHECK(cudaStreamSynchronize(g.stream));
}

extern "C" real *excb_cuda_alloc(size_t floats) { return (real *)dmalloc(sizeof(real) * floats); }

extern "C" void excb_cuda_copy_to_device(real *dst, const real *src, size_t floats) {
    copy_sync(dst, src, sizeof(real) * floats, cudaMemcpyHostToDevice);
}

extern "C" int excb_cuda_nondeterministic_plans(void) { return g.nondeterministic_plans; }

extern "C" void excb_cuda_free(real *p, size_t floats) { dfree(p, sizeof(real) * floats); }

extern "C" double excb_cuda_peak_flops(ExcbPrecision precision) {
    int sms = 0, khz = 0, major = 0, minor = 0;
    if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, g.device) != cudaSuccess ||   /* this rank's */
        cudaDeviceGetAttribute(&khz, cudaDevAttrClockRate, g.device) != cudaSuccess ||
        cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, g.device) != cudaSuccess ||
        cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, g.device) != cudaSuccess) {
        cudaGetLastError();
        return 0;
    }
    double hz = khz * 1e3;
    if (precision == EXCB_PRECISION_FP32) return sms * ((major == 8 && minor == 0) ? 128.0 : 256.0) * hz;
    if (precision == EXCB_PRECISION_TF32) return sms * (major >= 9 ? 2048.0 : 1024.0) * hz;
    return sms * (major >= 9 ? 4096.0 : 2048.0) * hz;
}
