/*
 * excb.h: the interface shared by excb.c (the CPU reference) and excb_kernels.cu (the GPU twin).
 *
 * ExCB: "Efficient Unsupervised Visual Representation Learning with Explicit Cluster Balancing",
 * I. Maniadis Metaxas, G. Tzimiropoulos, I. Patras, ECCV 2024, arXiv 2407.11168.
 * Equation labels E0..E14 are this project's own (paper_notes.md, written from the official code); the paper's
 * own equation numbers are UNCONFIRMED and are never used here.
 *
 * Dimension letters, used in every shape comment of this project:
 *   B  images (samples) in a batch          Vg, Vl  global / local views per image (2, 6)
 *   N  rows of one tensor (e.g. Vg*B)        C  channels      H, W  spatial size
 *   D  backbone feature width                Hd MLP hidden width     d  bottleneck width (256)
 *   K  clusters (prototypes)
 *
 * Memory layouts (one for the whole project, CPU and GPU):
 *   - activations are FEATURE-MAJOR: an image tensor is (C, N, H, W) and a feature matrix is (F, N).
 *     BatchNorm then reads one channel as one contiguous run, a 1x1 convolution and a Linear layer are
 *     the same GEMM  Y(Cout, N*H*W) = W(Cout, Cin) . X(Cin, N*H*W), and BN1d is BN2d with H = W = 1.
 *   - input images arrive as (N, C, H, W) with view-major rows (row = v*B + i), as PyTorch stores them.
 *   - similarity / logit matrices are (N, K) row-major, so each sample's softmax is one contiguous row.
 *   - weights use PyTorch's layouts: conv (Cout, Cin, kh, kw), linear (out, in), centroids (K, d).
 */
#ifndef EXCB_H
#define EXCB_H

#include <stddef.h>
#include <stdint.h>
#include <math.h>

#define EXCB_VERSION "0.1.0"

/* The scalar type of every tensor. float (FP32) is the implementation; -DEXCB_REAL_DOUBLE builds the
 * same source in float64 (naive GEMM), which the finite-difference tests use as an exact-enough
 * reference for whole-network derivatives. */
#ifdef EXCB_REAL_DOUBLE
typedef double real;
#else
typedef float real;
#endif

/* Exit codes of the `excb` program (see README.md, "Exit codes"). */
enum {
    EXCB_EXIT_OK = 0,
    EXCB_EXIT_CHECK = 1,       /* excb audit --quick: the qualitative result did not hold */
    EXCB_EXIT_USAGE = 64,      /* EX_USAGE: bad command line                         */
    EXCB_EXIT_DATA = 65,       /* EX_DATAERR: a file's content is wrong               */
    EXCB_EXIT_NOINPUT = 66,    /* EX_NOINPUT: a file cannot be opened                 */
    EXCB_EXIT_SOFTWARE = 70,   /* EX_SOFTWARE: internal error                         */
    EXCB_EXIT_OSERR = 71,      /* EX_OSERR: out of memory                             */
    EXCB_EXIT_UNAVAILABLE = 69,/* EX_UNAVAILABLE: a helper program (gnuplot) is missing */
    EXCB_EXIT_CANTCREAT = 73,  /* EX_CANTCREAT: the run directory cannot be created   */
    EXCB_EXIT_IO = 74,         /* EX_IOERR: read or write failure                     */
    EXCB_EXIT_TEMPFAIL = 75,   /* EX_TEMPFAIL: the run directory is in use by another process */
    EXCB_EXIT_CONFIG = 78,     /* EX_CONFIG: a bad config file or --set, or a checkpoint of another run */
    EXCB_EXIT_DIVERGED = 3,    /* the loss or the gradient norm became NaN or Inf     */
    EXCB_EXIT_SIGNAL = 128,    /* + the signal: 129 SIGHUP, 130 SIGINT, 143 SIGTERM (a checkpoint was written) */
};

/* ------------------------------------------------------------------------------------------------ */
/* Configuration: every constant of the method is a field here, with its default in excb_config_*. */

typedef enum { EXCB_BLOCK_BASIC = 0, EXCB_BLOCK_BOTTLENECK = 1 } ExcbBlock;
typedef enum { EXCB_STEM_CIFAR = 0, EXCB_STEM_IMAGENET = 1 } ExcbStem;
/* The optimiser. SGD is the official ResNet recipe; LARS and AdamW (ViT) would slot in here. */
typedef enum { EXCB_OPT_SGD = 0 } ExcbOptimizer;
#define EXCB_MAX_STAGES 4

/* Which student rows are scored against which teacher view (excb.c section 6, paper_notes.md §6).
   EXCB: A7's 18 terms (the direct rows of the other global views, the predictor's rows of every crop);
   SWAPPED: DINO's and SwAV's (the direct row of every crop except the teacher's own view, no predictor). */
typedef enum { EXCB_PAIRING_AUTO = 0, EXCB_PAIRING_EXCB = 1, EXCB_PAIRING_SWAPPED = 2 } ExcbPairing;

/* The settings of each balancing rule (excb.c section 5; one table row per field there). */
typedef struct {
    double m_s;                 /* cluster-size EMA momentum "center_momentum", 0.999 (A5)              */
    double boost;               /* E5 argmax boost, 0.01 (factor 1.01, A1)                              */
    double clamp;               /* E5 clamp of the balanced similarity to [-1, 1] (A2)                  */
    double zero_jitter;         /* A3: U(0,1) * 0.001 added where a balancing factor is exactly 0      */
    int fp16_count_term;       /* 1: round the E3 update term through float16 as the official code (A4) */
    int count_source;          /* ExcbCountSource: E2 counts the balanced targets (the code) or raw     */
    int count_kind;            /* ExcbCountKind: hard argmax counts (the code) or soft sums            */
} ExcbBalancingConfig;
typedef enum { EXCB_COUNT_BALANCED = 0, EXCB_COUNT_RAW = 1 } ExcbCountSource;
typedef enum { EXCB_COUNT_HARD = 0, EXCB_COUNT_SOFT = 1 } ExcbCountKind;
typedef enum { EXCB_LR_NONE = 0, EXCB_LR_LINEAR = 1, EXCB_LR_SQRT = 2 } ExcbLrScaling;
typedef enum { EXCB_CROP_SCALES_SCHEDULE = 0, EXCB_CROP_SCALES_DINO = 1 } ExcbCropScales;
typedef struct {
    double center_momentum;     /* D2: centre EMA momentum, 0.9 (D3's warm-up: tau_t_warmup in ExcbConfig) */
} ExcbDinoConfig;
typedef struct {
    double epsilon;             /* S1: exp(scores / epsilon), 0.05                                      */
    int iterations;            /* S1: Sinkhorn-Knopp iterations, 3                                     */
    int queue_length;          /* S2: rows of past teacher projections per global view (0: none)      */
    int queue_start_epoch;     /* S2: the epoch the queue starts filling (15)                          */
    long freeze_prototypes_steps;  /* S3: the prototypes get no update before this step (313)         */
} ExcbSwavConfig;

/* CoKe (excb.c section 5.5): online constrained k-means with dual variables, per-image labels */
#define EXCB_MAX_HEADS 8
typedef struct {
    int n_heads;               /* clustering heads, the length of k[] (3 in the official runs)         */
    int k[EXCB_MAX_HEADS];     /* clusters of each head (3000, 4000, 5000)                             */
    double tau;                 /* T of the cross-entropy (0.1 single view, 0.05 two or more views)    */
    double beta;                /* weight of the predictor branch, 1 - beta for the projection's (0.5)  */
    double gamma;               /* lower bound on a cluster's share, gamma / K ("coke-ratio", 0.4)     */
    double eta;                 /* step of the dual variables ("dual-lr", 20)                           */
} ExcbCokeConfig;
typedef struct {
    int block;                 /* N_B, prototypes per block of the random partition (512)              */
} ExcbCarpConfig;
typedef struct {
    double lambda_d;            /* lambda * d: the off-diagonal weight is lambda_d / d (1: lambda = 1/d) */
} ExcbMvbtConfig;

typedef struct {
    char name[32];             /* config name, e.g. "resnet20s"                                       */
    /* backbone (paper_notes.md §1) */
    ExcbBlock block;           /* BasicBlock (ResNet-18/20) or Bottleneck (ResNet-50)                  */
    ExcbStem stem;             /* CIFAR: conv3x3/1, no max-pool; ImageNet: conv7x7/2 + maxpool3x3/2    */
    int in_ch;                 /* input channels, 1 (Fashion-MNIST) or 3                              */
    int n_stages;              /* 3 (resnet20s) or 4                                                  */
    int widths[EXCB_MAX_STAGES];   /* stage widths, e.g. 16/32/64 or 64/128/256/512                   */
    int blocks[EXCB_MAX_STAGES];   /* blocks per stage, e.g. 3/3/3 or 2/2/2/2 or 3/4/6/3              */
    /* heads (E0, E1, E10) */
    int hidden;                /* MLP hidden width Hd, 512 (resnet20s) or 2048                        */
    int d;                     /* bottleneck width d, 256                                              */
    int K;                     /* clusters, 65536 in the paper's runs, 4096 for laptop-sized ones      */
    /* views (paper_notes.md §8b) */
    int n_global, n_local;     /* Vg = 2, Vl = 6                                                       */
    int global_size, local_size;   /* crop sides, e.g. 28/12 (Fashion-MNIST), 32/16, 224/96            */
    int batch;                 /* B, images per step (each with all its views)                         */
    /* the criterion: the method, its pairing, and the settings each method reads (excb.c section 5) */
    int method;                /* index into excb_methods[]: excb, none, dino, swav, coke, carp, mvbt  */
    ExcbPairing pairing;       /* which student rows meet which teacher views; auto: the method's own */
    double tau_s;               /* student temperature, 0.1                                             */
    double tau_t;               /* teacher temperature, 0.04, constant (A18); ExCB, none and DINO      */
    double tau_t_warmup;        /* its value in epoch 0 of a linear warm-up (A18's switch; DINO's D3)   */
    int tau_t_warmup_epochs;   /* epochs of that warm-up; 0: none (ExCB's code, DINO's default)        */
    int predictor;             /* 1: the predictor E10 (the code); 0: the identity in its place (A8/A9) */
    int predictor_centroid_grad;   /* 1: predictor rows send gradient to the centroids (A9: 0)        */
    ExcbBalancingConfig excb;  /* ExCB and none: E2..E5                                                */
    ExcbDinoConfig dino;       /* DINO: centering and its temperature warm-up                         */
    ExcbSwavConfig swav;       /* SwAV: Sinkhorn-Knopp, the queue, the frozen prototypes              */
    ExcbCokeConfig coke;       /* CoKe: heads, T, the constraint's gamma and eta, beta                */
    ExcbCarpConfig carp;       /* CARP: the partition's block size                                     */
    ExcbMvbtConfig mvbt;       /* multi-view Barlow Twins: lambda                                      */
    /* normalisation */
    double bn_eps;              /* 1e-5, every BatchNorm                                               */
    double bn_momentum;         /* 0.1, running statistics for evaluation                              */
    double norm_eps;            /* 1e-12, F.normalize: x / max(||x||, eps)                              */
    /* optimisation (E9, E14, Appendix A) */
    ExcbOptimizer optimizer;   /* SGD with momentum and coupled weight decay                           */
    double lr_peak;             /* 0.6, absolute, not scaled by batch (A19)                             */
    int lr_scaling;            /* ExcbLrScaling: A19's switch (none: the code)                          */
    int lr_base_batch;         /* the batch lr_peak is for when it is scaled (1024)                     */
    double lr_min_factor;       /* 1e-4: cosine ends at lr_peak * 1e-4                                 */
    double weight_decay;        /* 1e-4 on weights; 0 on biases and 1-D parameters                     */
    double centroid_wd_boost;   /* 9: centroid wd = wd * (1 + 9 (1+cos(pi t/T))/2), "wdx10c1" (A10)      */
    double sgd_momentum;        /* 0.9                                                                  */
    double ema_start;           /* teacher momentum 0.996 -> 1.0 by cosine (E9)                         */
    long total_steps;          /* T: all optimisation steps of the run                                 */
    long warmup_steps;         /* W: linear lr warm-up (10 epochs in the official config)             */
    long steps_per_epoch;      /* what a method's per-epoch schedule counts in (DINO, SwAV, CoKe)     */
    long n_images;             /* CoKe: images that keep a label, the training set's size N (key coke_num_images;
                                  0 outside a run: B x steps_per_epoch)                                 */
    /* reproducibility and speed */
    uint64_t seed;             /* the one root seed                                                    */
    int threads;               /* worker threads; results do not depend on it                          */
    /* data parallelism (excb.c section 10b): `batch` is one rank's share of a global batch of
       ranks x batch images; 0 or 1: one process with the whole batch. Not a key: a run's config names
       the global batch, and a checkpoint of R ranks resumes on any R' that divides it. */
    int ranks;
} ExcbConfig;

struct ExcbComm;               /* section 10b's ranks; declared with the step below */

/* Named configurations: "resnet20s", "resnet18", "resnet50", "tiny" (tests). 0 on success. */
int excb_config_named(ExcbConfig *cfg, const char *name);

/* ------------------------------------------------------------------------------------------------ */
/* The table of named tensors: parameters, gradients, momentum and teacher share this one layout.   */

typedef enum {
    EXCB_GROUP_WEIGHT = 0,     /* conv and linear weights: weight decay wd                             */
    EXCB_GROUP_NO_DECAY = 1,   /* biases and 1-D parameters (BN gamma/beta): no weight decay          */
    EXCB_GROUP_CENTROID = 2,   /* the centroid direction v: wd times the "wdx10c1" multiplier         */
} ExcbGroup;

typedef struct {
    char name[80];             /* PyTorch state_dict name, e.g. "backbone.layer1.0.conv1.weight"      */
    int ndim, shape[4];
    size_t offset, numel;      /* in floats, from the start of the buffer                             */
    ExcbGroup group;
} ExcbTensor;

/* One convolution followed by its BatchNorm: the unit every ResNet here is built from. */
typedef struct {
    int cin, cout, k, stride, pad;
    int w;                     /* tensor index of the conv weight (cout, cin, k, k)                   */
    int gamma, beta;           /* tensor indices of the BN affine parameters (cout)                   */
    size_t stats;              /* offset of this BN's running mean, then running var, in `running`    */
} ExcbConvBN;

typedef struct {
    int n_main;                /* 2 (basic) or 3 (bottleneck) ConvBN units on the main path           */
    ExcbConvBN main[3];
    int has_down;              /* 1: the shortcut is conv1x1(stride)+BN ("downsample")                */
    ExcbConvBN down;
} ExcbResBlock;

/* Linear (out, in) + bias, optionally followed by BatchNorm1d and ReLU (the MLP heads, E0/E10). */
typedef struct {
    int in, out;
    int w, b;                  /* tensor indices                                                      */
    int has_bn;                /* Linear-BN-ReLU (hidden layers) or a bare Linear (last layer)        */
    int gamma, beta; size_t stats;
} ExcbLinear;

#define EXCB_MAX_BLOCKS 32
#define EXCB_MAX_TENSORS 512

/* Activations of one backbone call (one resolution), kept for the backward pass. */
typedef struct {
    real *y;                   /* conv output, before BN: (Cout, N, Ho, Wo)                           */
    real *a;                   /* after BN and ReLU (and the residual add, last unit of a block)      */
    real *mean, *rstd;         /* batch statistics of the BN (Cout)                                   */
    int N, H, W;               /* output geometry                                                     */
} ExcbUnitActs;

typedef struct {
    int N, H;                  /* images in this call and their input side                            */
    real *x;                   /* input, (C, N, H, H) feature-major                                   */
    ExcbUnitActs stem;
    real *pool;                /* ImageNet stem: max-pool output (C, N, H/4, W/4)                     */
    int32_t *pool_arg;         /* and the flat input index of each output's maximum                   */
    ExcbUnitActs main[EXCB_MAX_BLOCKS][3], down[EXCB_MAX_BLOCKS];
} ExcbBackboneActs;

/* Activations of the heads on N rows (feature-major (F, N)). */
typedef struct {
    real *y[3], *a[3], *mean[3], *rstd[3];    /* projector layers 1..3 (a[2] = h, y/mean/rstd unused) */
} ExcbMLPActs;

/* ------------------------------------------------------------------------------------------------ */
/* A method's named buffers (excb.c section 5): `floats` 4-byte values (real or int32).              */
#define EXCB_MAX_METHOD_BUFFERS 16
typedef struct {
    const char *name;          /* "cluster_sizes"; a state buffer is saved as "method.cluster_sizes"   */
    size_t floats;
    int state;                 /* 1: kept across steps (saved, copied to the GPU); 0: one step's scratch */
    int integer;               /* 1: int32 values (counts, labels, CARP's partition), 0: real           */
} ExcbBuffer;

/* ------------------------------------------------------------------------------------------------ */
/* The model: student, teacher, optimiser state, cluster sizes, and every buffer a step needs.     */

typedef struct ExcbModel {
    ExcbConfig cfg;
    /* structure */
    ExcbConvBN stem;
    int n_blocks;
    ExcbResBlock blocks[EXCB_MAX_BLOCKS];
    int D;                     /* backbone output width                                               */
    ExcbLinear proj[3];        /* projector: D->Hd (BN,ReLU), Hd->Hd (BN,ReLU), Hd->d                 */
    int pred_bn_gamma, pred_bn_beta; size_t pred_bn_stats;   /* BN(d) before the predictor (E10a)  */
    ExcbLinear pred[2];        /* predictor: d->Hd (BN,ReLU), Hd->d                                   */
    int centroids;             /* tensor index of v (K, d)                                            */
    /* parameters: one layout, four buffers */
    int n_tensors;
    ExcbTensor tensors[EXCB_MAX_TENSORS];
    size_t n_params;
    real *params, *grads, *momentum, *teacher;
    size_t n_running;          /* BN running mean/var (evaluation only), student and teacher          */
    int n_bn;                  /* every BatchNorm's statistics block: (offset in `running`, channels) */
    size_t bn_stats[EXCB_MAX_TENSORS]; int bn_channels[EXCB_MAX_TENSORS];
    int bn_beta[EXCB_MAX_TENSORS];     /* and its shift's tensor: PyTorch's buffers follow it (16b)    */
    real *running, *teacher_running;
    /* the method (excb.c section 5): its operations, and its buffers by name. State buffers persist
       across steps (one allocation, `mstate`, saved in checkpoints as "method.NAME", copied to and from
       the GPU); scratch buffers hold one step's values and live in the activation arena. */
    const struct ExcbMethod *method;
    ExcbPairing pairing;       /* resolved: EXCB or SWAPPED                                          */
    int n_dir_crops;           /* crops with a direct student row: Vg (EXCB pairing) or Vg + Vl       */
    int with_pred;             /* 1: the predictor runs (EXCB pairing, or a method that asks for it)  */
    int n_protos;              /* rows of the learned prototype layer: K, or 0 (a method without one) */
    int n_labels;              /* values a label of m->labels takes (A21's monitors), 0: no labels    */
    const int64_t *batch_index;    /* the data set index of each of the step's B images (CoKe's labels);
                                  NULL: step * B + i modulo n_images (random inputs: bench, tests)    */
    int n_mbuf;
    ExcbBuffer mbuf_spec[EXCB_MAX_METHOD_BUFFERS];
    void *mbuf[EXCB_MAX_METHOD_BUFFERS];    /* where each one is (host or device memory)              */
    real *mstate; size_t mstate_floats;
    long step;                 /* optimisation steps done (0-based index of the next step)            */
    /* activation arenas, sized once in excb_build; nothing is allocated inside a step */
    real *arena; size_t arena_floats;
    ExcbBackboneActs act_global, act_local;   /* teacher reuses act_global before the student runs */
    real *f;                   /* backbone features (D, Vg*B + Vl*B): global columns, then local      */
    ExcbMLPActs proj_act;      /* projector activations over all student rows                         */
    real *h;                   /* projection (d, NS) where NS = (Vg+Vl)*B                              */
    real *pre_y, *pre_mean, *pre_rstd;   /* predictor input BN: output (d, NS) and statistics       */
    real *pred_y, *pred_a, *pred_mean, *pred_rstd;    /* predictor hidden layer (Hd, NS)           */
    real *p;                   /* predictor output (d, NS)                                             */
    real *c, *c_inv_norm;      /* unit centroids (K, d) and 1/||v_k|| (K)                              */
    real *u_dir, *u_dir_den;   /* normalised projections of the direct rows (n_dir_crops*B, d), max(||h||, eps) */
    real *u_pred, *u_pred_den;     /* normalised predictor outputs (NS, d) and max(||p||, eps)        */
    real *du_dir, *du_pred;    /* a method without prototypes: its loss's dL/du of those rows (rows, d) */
    real *ut, *ut_den;         /* the teacher's normalised projections (Vg*B, d)                       */
    double *row_loss;          /* loss of each student row, summed in a fixed order                    */
    real *z_dir;               /* direct similarities (n_dir_crops*B, K): global crops first; then dL/dz */
    real *z_pred;              /* predictor similarities of all crops (NS, K), EXCB pairing; then dL/dz */
    real *q;                   /* the method's teacher targets (Vg*B, K)  (E6, D1, S1)                 */
    int32_t *labels;           /* argmax of q per teacher row (Vg*B)  (E2)                              */
    real *zt;                  /* teacher similarities (Vg*B, K)  (E1)                                  */
    double *qbar;              /* mean teacher assignment (K), for the entropy diagnostic            */
    int eval_bn;               /* 1: BatchNorm uses running statistics (feature extraction)          */
    /* backward scratch */
    real *dbuf[3];
    real *dhead[4];            /* head gradients, each max(D,Hd,d) x NS                                */
    real *col;                          /* im2col panels, one per worker                               */
    real *slots;                        /* per-slot partial weight gradients (EXCB_SLOTS of them)    */
    int max_threads;
    /* where the step runs: the operator table (excb_cpu_ops, or excb_cuda_ops for a device twin made by
       excb_cuda_attach, whose every pointer above is a device pointer) */
    const struct ExcbOps *ops;
    struct ExcbCuda *gpu;               /* the device's handles and buffers (NULL on the CPU)         */
    /* data parallelism (excb.c section 10b): the ranks this model's batch-wide sums are reduced over
       (NULL: one process, nothing reduced), and the step's teacher labels of the whole global batch in
       the single process's order (Vg x ranks x batch, view-major; labels itself when comm is NULL) */
    struct ExcbComm *comm;
    int32_t *labels_all;
} ExcbModel;

/* What one step reports (A21 diagnostics included). */
typedef struct {
    double loss;               /* E8, the mean over the pairing's terms (18 for ExCB's)               */
    double grad_norm;          /* ||dL/dtheta|| over every parameter (excb_step only)                  */
    float lr, wd_centroid, ema_m;
    int unique_labels;         /* distinct teacher labels over both views (of Vg*B)                   */
    int empty_clusters;        /* clusters with no teacher label this step                            */
    double teacher_conf;       /* mean over teacher rows of max_k q (1/K: uniform, 1: one-hot)        */
    double student_conf;       /* mean over the student's direct global rows of max_k softmax(z/tau_s) */
    double assign_entropy;     /* entropy (nats) of the teacher rows' mean assignment, mean_i q_i     */
} ExcbStepStats;

/* One setting of a run: a row of the key table (excb.c section 14; each method's rows are in its own
   section). Its default, its range and its help come from this row alone: config_defaults, the presets'
   starting point, --help-config and excb_config_validate all read it. */
typedef enum { EXCB_KEY_INT, EXCB_KEY_LONG, EXCB_KEY_DOUBLE, EXCB_KEY_U64, EXCB_KEY_STR, EXCB_KEY_INTLIST,
               EXCB_KEY_ENUM, EXCB_KEY_METHOD } ExcbKeyType;
typedef struct {
    const char *key;
    ExcbKeyType type;
    size_t off, size;          /* offset in ExcbRunConfig; bytes (strings) or capacity (lists)        */
    size_t count_off;          /* lists: offset of their element count                               */
    int trajectory;            /* 1: changing it changes the computed run (must match on --resume)   */
    double lo, hi;             /* numbers: the valid range (a U64 takes every value: lo = hi = 0)    */
    const char *def;           /* the default, as a config file would write it; NULL: the preset's   */
    const char *const *names;  /* EXCB_KEY_ENUM: the values, in the enum's order, NULL-terminated    */
    const char *help;
} ExcbSetting;

/* A method: a balancing rule (how the teacher's scores become targets, and the state that carries over
   between steps; the networks, the loss of section 6 and the optimiser are shared), or a method with its
   own loss and head shape (CoKe, CARP, mvbt). excb.c section 5 has one subsection per method; adding one
   is a subsection there, a line in excb_methods[], a sub-config in ExcbConfig, its tests and its section
   of paper_notes.md. */
typedef struct ExcbMethod {
    const char *name;          /* the value of the config key `method`                                */
    const char *summary;       /* one line for --help-config                                          */
    ExcbPairing pairing;       /* its own pairing (pairing = auto)                                    */
    int cuda;                  /* 1: every operator it calls has a GPU twin (excb_kernels.cu)         */
    /* NULL, or the settings of c that have no GPU twin yet (a line, for --device cuda's exit 64) */
    const char *(*cpu_only)(const ExcbConfig *c);
    const ExcbSetting *settings;   /* its rows of the key table (NULL: none of its own)               */
    int n_settings;
    /* its buffers for a configuration, into out[] (at most EXCB_MAX_METHOD_BUFFERS); returns how many */
    int (*buffers)(const ExcbConfig *c, ExcbBuffer *out);
    /* cross-key rules on its settings (may be NULL): 0, or EXCB_EXIT_CONFIG with err */
    int (*validate)(const ExcbConfig *c, char *err);
    /* the state at step 0 (host memory; may be NULL: no state) */
    void (*init)(struct ExcbModel *m);
    /* before the step's forward pass (may be NULL): SwAV re-normalises the prototypes (S3) */
    void (*begin_step)(struct ExcbModel *m);
    /* the teacher's targets for the whole batch: from m->zt (Vg*B, K) and m->ut (Vg*B, d), with m->c
       holding the teacher's unit centroids, into m->q and m->labels. Changes no state. NULL for a
       method with its own loss, which makes whatever it needs from the teacher there. */
    void (*targets)(struct ExcbModel *m);
    /* the state update after the loss; returns the number of distinct teacher labels (A21) */
    int (*update)(struct ExcbModel *m);
    /* its own loss (may be NULL: section 6's cross-entropy against m->q). It reads the step's student
       rows and returns the loss, leaving dL/dz in m->z_dir (and m->z_pred) where the method has
       prototypes, or dL/du in m->du_dir (and m->du_pred) where it has none. */
    double (*loss)(struct ExcbModel *m);
    /* the shape of its heads: 0 is ExCB's (a learned cosine layer on L2-normalised rows, a teacher) */
    int no_prototypes;         /* 1: no learned prototype layer (CoKe's centres are state, mvbt has none) */
    int raw_rows;              /* 1: its rows are the projection as it is, not L2-normalised (CARP, mvbt) */
    int student_only;          /* 1: no teacher forward pass (the teacher is still the EMA: evaluation) */
    int predictor;             /* 1: the predictor's rows of every crop, whatever the pairing (CoKe)   */
    int min_views;             /* a method with its own loss: the views it needs at least (0 or 1: one) */
    int per_image;             /* 1: its state holds a value per training image (CoKe's labels): the run
                                  sets n_images (coke_num_images) to the training set's size           */
    int ranks;                 /* 1: every batch-wide quantity it keeps is reduced across ranks (excb.c
                                  section 10b), so it trains data-parallel; 0: one process only, for now */
    int bn_rows;               /* 1: its direct rows are of BN(h), the predictor's input BatchNorm: a
                                  projector that ends with a BatchNorm (CoKe); needs the predictor     */
    /* the number of values its labels take (may be NULL: K); 0: it has none */
    int (*label_range)(const ExcbConfig *c);
    /* 1 when this step must leave the centroids untouched (may be NULL: never) */
    int (*centroids_frozen)(const struct ExcbModel *m);
    /* extra fields of the epoch record (host memory): names[i] = values[i]; returns how many (at most 4) */
    int (*diagnostics)(const struct ExcbModel *m, const char **names, double *values);
} ExcbMethod;
/* The new methods' operators (excb.c sections 5.4-5.6), on plain arrays. CoKe: K3 and K4 of one head. */
void coke_dual_update(real *rho, const int32_t *n, int K, int B, double eta, double gamma);
void coke_centre_update(real *cur, real *Nk, const int32_t *n, const int32_t *y, const real *x, int B, int K, int d);
/* CARP: R2's partition of K prototypes from (seed, step); R3-R5 and their backward (z becomes dL/dz) */
void carp_partition(int32_t *perm, int K, uint64_t seed, long step);
/* (comm: the data-parallel ranks whose p-bar is one, excb.c section 10b; NULL: one process) */
double carp_loss_forward_backward(real *z, real *q, const real *zt, real *g, double *pbar, double *row_loss,
                                  const int32_t *perm, int U, int Vg, int B, int K, int nb, struct ExcbComm *comm);
/* mvbt: T1 and its backward; T2/T3 on standardised views (A*B, d), writing dL/dzn (comm: the
   data-parallel ranks whose rows are one batch, excb.c section 10b; NULL: one process) */
void mvbt_standardise(real *zn, double *sd, const real *z, int M, int d, struct ExcbComm *comm);
void mvbt_standardise_backward(real *dz, const real *dzn, const real *zn, const double *sd, int M, int d,
                               struct ExcbComm *comm);
double mvbt_views_loss(real *dzn, const real *zn, real *zbar, real *dzbar, real *cc, double *on, int A, int B, int d,
                       double lambda, struct ExcbComm *comm);
/* the methods, NULL-terminated; ExcbConfig.method indexes it */
extern const ExcbMethod *const excb_methods[];
/* a method buffer by name (NULL: this model's method has none of that name) */
void *excb_method_buffer(const ExcbModel *m, const char *name);
/* 1 when this step leaves the centroids untouched (SwAV's freeze): no gradient, no SGD update */
int excb_centroids_frozen(const ExcbModel *m);
/* point the state buffers into m->mstate (after it moved: the GPU twin) */
void excb_method_bind_state(ExcbModel *m);

int  excb_build(ExcbModel *m, const ExcbConfig *cfg);        /* 0 ok; allocates everything        */

/* What excb_build allocates for a configuration, in bytes, counted without allocating it: the answer
 * to "does this batch fit?" (`excb bench --memory`). The activation arena is split by purpose. */
typedef struct {
    int threads;               /* CPU threads the im2col panels are counted for                       */
    size_t params;             /* the four parameter buffers: weights, gradients, momentum, teacher  */
    size_t state;              /* BN running statistics (student and teacher), the method's state     */
    size_t acts_global;        /* backbone activations kept for the backward pass, global crops      */
    size_t acts_local;         /* the same for the local crops                                        */
    size_t heads;              /* features, head activations, the criterion's (rows x K) matrices    */
    size_t backward;           /* gradient scratch: three backbone-sized and four head-sized buffers */
    size_t cpu_scratch;        /* CPU only: im2col panels (one per thread), weight-gradient slots    */
    size_t gpu_packed;         /* GPU only, at most: the NCHW copies of convolutions run packed;
                                  cuDNN's workspace comes on top and is known only once planned   */
    size_t gpu_shared_shortcuts;   /* GPU: less, the shortcuts' BN outputs kept in a gradient buffer  */
} ExcbMemoryPlan;
int  excb_memory_plan(const ExcbConfig *cfg, ExcbMemoryPlan *mp);   /* 0 ok; -1 bad config      */
void excb_free(ExcbModel *m);
int  excb_find_tensor(const ExcbModel *m, const char *name);  /* index or -1                      */
/* One ExCB training step on images xg (Vg*B, C, G, G) and xl (Vl*B, C, L, L), view-major rows.  */
int  excb_step(ExcbModel *m, const real *xg, const real *xl, ExcbStepStats *st);
/* The step's parts, in order: teacher + the method's targets + student + loss and dL/dz (changes no
   state but BN running statistics, and SwAV's prototype norms, S3); the method's state update (ExCB:
   E2, E3); backward into m->grads; SGD, EMA and step += 1. excb_step runs them all, with the divergence
   checks between them: the one step the training loop, the benchmark and the tests call.        */
double excb_forward_loss(ExcbModel *m, const real *xg, const real *xl, ExcbStepStats *st);
void excb_update_method(ExcbModel *m, ExcbStepStats *st);
void excb_backward(ExcbModel *m);
void excb_update(ExcbModel *m, ExcbStepStats *st);

/* ------------------------------------------------------------------------------------------------ */
/* Data parallelism (excb.c section 10b): R ranks, each with B/R images of the global batch B. Every
   batch-wide sum is reduced in rank order, so the result does not depend on how the reduction is
   transported: by Open MPI between processes, or in one process that computes the R shares one after
   another (chunks, the reference that mpirun -np R must equal bit for bit). */
typedef enum { EXCB_COMM_CHUNKS = 1, EXCB_COMM_MPI = 2 } ExcbCommKind;
typedef struct ExcbComm {
    int rank, size;            /* this rank, R                                                        */
    int local_rank, local_size;/* MPI: this rank among the ranks of its node, and how many there are  */
    int gpus;                  /* the distinct GPUs the ranks hold (excb_cuda_join; 0 before)         */
    ExcbCommKind kind;
    struct ExcbChunks *chunks; /* CHUNKS: the scheduler the R shares take turns in                   */
    double seconds, bytes;     /* time spent in reductions, and the bytes this rank contributed      */
    long calls;
    /* a sum of device buffers on the devices themselves: NCCL's all-reduce when every rank has a GPU of
       its own (excb_kernels.cu); NULL: device buffers go through host memory (section 10b) */
    void (*device_sum_real)(struct ExcbComm *c, real *x, size_t n, int mean);
} ExcbComm;
/* x[0..n) <- the sum over ranks of every rank's x, added in rank order in double (real: rounded once,
   divided by R first when mean) */
void excb_comm_sum_f64(ExcbComm *c, double *x, size_t n);
void excb_comm_sum_real(ExcbComm *c, real *x, size_t n, int mean);
/* out <- every rank's `bytes` bytes of in, concatenated in rank order (out holds size x bytes) */
void excb_comm_gather(ExcbComm *c, const void *in, void *out, size_t bytes);
/* the largest of the ranks' values (a stop signal, an exit code: every rank then takes the same branch) */
int excb_comm_max(ExcbComm *c, int v);
/* rank 0's `bytes` bytes of x, to every rank */
void excb_comm_broadcast(ExcbComm *c, void *x, size_t bytes);

/* ------------------------------------------------------------------------------------------------ */
/* Operators. Each takes plain pointers and sizes so a CUDA twin can sit behind the same call.     */
/* Convention: activation gradients are written (=), parameter gradients accumulated (+=).        */

/* GEMM, row-major, C = alpha op(A) op(B) + beta C; op(A) is M x K, op(B) is K x N. */
void matmul(char ta, char tb, int M, int N, int K, real alpha, const real *A, int lda,
            const real *B, int ldb, real beta, real *C, int ldc);
void matmul_naive(char ta, char tb, int M, int N, int K, real alpha, const real *A, int lda,
                  const real *B, int ldb, real beta, real *C, int ldc);

/* The backbone's operators on the CPU take channels-last activations, (N, H, W, C); the weights are
   (Cout, Cin, k, k). BatchNorm takes either layout (channels_last 1, or 0 for (C, N*H*W), the heads'
   feature-major (out, N)). */
void conv2d_forward(real *y, const real *x, const real *w, real *col, int N, int Cin, int H,
                    int W, int Cout, int k, int stride, int pad);
void conv2d_backward(real *dx, real *dw, const real *dy, const real *x, const real *w,
                     real *col, real *slots, int N, int Cin, int H, int W, int Cout, int k,
                     int stride, int pad);

/* BatchNorm's statistics of one channel from the double sums of its n values y and of y^2 (the formulas
 * are written out at batchnorm_forward in excb.c): mean, rstd = 1/sqrt(var + eps) with the biased
 * variance, the running statistics' update (run_mean NULL: none) with the unbiased one, and the affine
 * form out = y*scale + shift. One definition, compiled by excb.c and by excb_kernels.cu for the device,
 * so the CPU and the GPU finish the statistics with the same operations. */
#ifdef __CUDACC__
#define EXCB_HOST_DEVICE __host__ __device__
#else
#define EXCB_HOST_DEVICE
#endif
EXCB_HOST_DEVICE static inline void excb_bn_statistics(double sum, double sumsq, int n, real eps, real momentum,
                                                       real gamma, real beta, real *mean, real *rstd,
                                                       real *run_mean, real *run_var, real *scale, real *shift) {
    double mu = sum / n, var = sumsq / n - mu * mu;
    if (var < 0) var = 0;                          /* cancellation can make it slightly negative */
    real rs = (real)(1.0 / sqrt(var + eps));
    *mean = (real)mu;
    *rstd = rs;
    if (run_mean) {
        *run_mean = (1.0f - momentum) * *run_mean + momentum * (real)mu;
        double unbiased = n > 1 ? var * n / (n - 1) : var;
        *run_var = (1.0f - momentum) * *run_var + momentum * (real)unbiased;
    }
    *scale = gamma * rs;
    *shift = beta - (real)mu * *scale;
}
void batchnorm_forward(real *out, real *mean, real *rstd, real *run_mean, real *run_var,
                       const real *y, const real *gamma, const real *beta, const real *residual,
                       int relu, int C, int NHW, real eps, real momentum, int channels_last, struct ExcbComm *comm);
void batchnorm_backward(real *dy, real *dgamma, real *dbeta, const real *dout, const real *out,
                        const real *y, const real *mean, const real *rstd, const real *gamma,
                        int relu, int C, int NHW, int channels_last, struct ExcbComm *comm);

void maxpool_forward(real *out, int32_t *arg, const real *x, int C, int N, int H, int W);
void maxpool_backward(real *dx, const real *dout, const int32_t *arg, int C, int N, int H, int W);
void avgpool_forward(real *f, int ldf, const real *x, int C, int N, int HW);
void avgpool_backward(real *dx, const real *df, int ldf, int C, int N, int HW);

void linear_forward(real *y, const real *x, const real *w, const real *b, int in, int out, int N);
void linear_backward(real *dx, real *dw, real *db, const real *dy, const real *x,
                     const real *w, int in, int out, int N);

/* E1: rows of u = x / max(||x||, eps), from a feature-major x (d, N) with leading dim ldx. */
void l2norm_rows_forward(real *u, real *den, const real *x, int ldx, int d, int N, real eps);
void rows_forward(real *u, const real *x, int ldx, int d, int N);
void rows_backward(real *dx, int ldx, const real *du, int d, int N);
void l2norm_rows_backward(real *dx, int ldx, const real *du, const real *u, const real *den,
                          int d, int N, real eps, int accumulate);
/* weight norm with gain 1: c_k = v_k / ||v_k|| (E1), and dv = (I - c c^T) dc / ||v|| (E13). */
void weightnorm_forward(real *c, real *inv, const real *v, int K, int d);
void weightnorm_backward(real *dv, const real *dc, const real *c, const real *inv, int K, int d);

/* E3': r = K s / sum(s); E4 factors lower = min(r,1), higher = min(1/r,1); A3's jitter (U(0,1) times
   `jitter`) where a factor is exactly 0, drawn from (seed, step). */
void balance_factors(real *r, real *lower, real *higher, const real *s, int K, double jitter,
                     uint64_t seed, long step);
/* E4-E6 for N teacher rows: q = softmax(clamp(boost(B(z; r)), -c, c) / tau_t); labels = argmax q.
   lower = higher = NULL: factors 1 (r = 1 everywhere), the `none` method. */
void balanced_targets(real *q, int32_t *labels, real *zhat, const real *z, const real *lower,
                      const real *higher, int N, int K, double boost, double clamp, double tau_t);
/* E2, E3: s <- m_s s + (1-m_s) counts/N, the term rounded through float16 if fp16_term (A4). */
void cluster_size_ema(real *s, const real *frac, int K, double m_s, int fp16_term);
/* A4's audit counts: acc (K doubles) <- the sums over N rows of the hard argmaxes or soft probabilities of
   q (raw = 0) or softmax(z / tau_t) (raw = 1); frac <- acc / N, N the rows of every rank */
void cluster_size_sums(double *acc, int32_t *raw_labels, const real *q, const real *z, int N, int K, double tau_t,
                       int raw, int soft);
void cluster_size_fractions(real *frac, const double *acc, int N, int K, int soft);
void cluster_size_update(real *s, int32_t *counts, const int32_t *labels, int N, int K, double m_s,
                         int fp16_term);
/* E7, E8, E11: the loss over the student rows, matched to the teacher targets q (Vg*B, K); each z is
   replaced by dL/dz. z_dir holds the direct rows of the first n_dir_crops crops (n_dir_crops*B, K):
   row of crop u is matched by every teacher view v != u. z_pred (NULL: none) holds the predictor rows
   of all Vg+Vl crops, each matched by every teacher view. ExCB: n_dir_crops = Vg and z_pred (A7, 18
   terms); DINO and SwAV: n_dir_crops = Vg+Vl, z_pred NULL (14 terms). The mean over terms. */
double excb_loss_forward_backward(real *z_dir, int n_dir_crops, real *z_pred, double *row_loss, const real *q,
                                  int Vg, int Vl, int B, int K, double tau_s);
int excb_loss_terms(int n_dir_crops, int with_pred, int Vg, int Vl);
/* D1: q = softmax((z - center) / tau) for N rows; labels = argmax q. D2: center <- m center +
   (1 - m) mean_rows(z). D3: the teacher temperature of DINO's warm-up at `step`. */
void dino_targets(real *q, int32_t *labels, const real *z, const real *center, int N, int K, double tau);
void dino_center_update(real *center, const real *z, int N, int K, double momentum);
/* S1: Sinkhorn-Knopp on scores S (N, K) in place: S becomes the codes, each row summing to 1, each
   column to N/K, after `iterations` rounds (SwAV's distributed_sinkhorn). sums: K + N doubles of scratch.
   comm (excb.c section 10b): each rank's N rows are its share of one matrix of R N rows; NULL: one process */
void sinkhorn_knopp(real *S, double *sums, int N, int K, double epsilon, int iterations, struct ExcbComm *comm);

/* ------------------------------------------------------------------------------------------------ */
/* The operator table. Sections 9-10 of excb.c (the network and the step) call every operator through
   m->ops, so one copy of the step's logic runs on either machine: excb_cpu_ops holds the functions
   above; excb_cuda_ops (excb_kernels.cu) holds their GPU twins, same arguments, device pointers. The
   few entries that are not plain operators above say what they do. */
typedef struct ExcbOps {
    const char *name;                                           /* "cpu" or "cuda"                  */
    /* the backbone's activation layout: 1 channels-last (N, H, W, C), the CPU's; 0 (C, N, H, W), the
       GPU twin's for now. The backbone's BatchNorm calls pass it on; the heads' pass 0. */
    int channels_last;
    /* (N, C, H*W) images -> the backbone's layout; src may be a host pointer for the GPU twin       */
    void (*images_to_features)(real *dst, const real *src, int N, int C, int HW);
    void (*conv2d_forward)(real *y, const real *x, const real *w, real *col, int N, int Cin, int H, int W,
                           int Cout, int k, int stride, int pad);
    void (*conv2d_backward)(real *dx, real *dw, const real *dy, const real *x, const real *w, real *col,
                            real *slots, int N, int Cin, int H, int W, int Cout, int k, int stride, int pad);
    void (*batchnorm_forward)(real *out, real *mean, real *rstd, real *run_mean, real *run_var, const real *y,
                              const real *gamma, const real *beta, const real *residual, int relu, int C, int NHW,
                              real eps, real momentum, int channels_last, struct ExcbComm *comm);
    void (*batchnorm_backward)(real *dy, real *dgamma, real *dbeta, const real *dout, const real *out,
                               const real *y, const real *mean, const real *rstd, const real *gamma, int relu,
                               int C, int NHW, int channels_last, struct ExcbComm *comm);
    void (*maxpool_forward)(real *out, int32_t *arg, const real *x, int C, int N, int H, int W);
    void (*maxpool_backward)(real *dx, const real *dout, const int32_t *arg, int C, int N, int H, int W);
    void (*avgpool_forward)(real *f, int ldf, const real *x, int C, int N, int HW);
    void (*avgpool_backward)(real *dx, const real *df, int ldf, int C, int N, int HW);
    void (*linear_forward)(real *y, const real *x, const real *w, const real *b, int in, int out, int N);
    void (*linear_backward)(real *dx, real *dw, real *db, const real *dy, const real *x, const real *w, int in,
                            int out, int N);
    void (*gemm)(char ta, char tb, int M, int N, int K, real alpha, const real *A, int lda, const real *B,
                 int ldb, real beta, real *C, int ldc);
    void (*l2norm_rows_forward)(real *u, real *den, const real *x, int ldx, int d, int N, real eps);
    void (*l2norm_rows_backward)(real *dx, int ldx, const real *du, const real *u, const real *den, int d, int N,
                                 real eps, int accumulate);
    /* the raw rows (CARP, mvbt): x (d, ldx) feature-major as u (N, d) row-major; and back, written */
    void (*rows_forward)(real *u, const real *x, int ldx, int d, int N);
    void (*rows_backward)(real *dx, int ldx, const real *du, int d, int N);
    void (*weightnorm_forward)(real *c, real *inv, const real *v, int K, int d);
    void (*weightnorm_backward)(real *dv, const real *dc, const real *c, const real *inv, int K, int d);
    void (*balance_factors)(real *r, real *lower, real *higher, const real *s, int K, double jitter, uint64_t seed,
                            long step);
    void (*balanced_targets)(real *q, int32_t *labels, real *zhat, const real *z, const real *lower,
                             const real *higher, int N, int K, double boost, double clamp, double tau_t);
    /* A21's monitors from q and z_dir (N rows of K): out[0] mean max q, out[1] mean max softmax(z/tau_s),
       out[2] entropy of mean q; scratch: per_row (2N doubles), qbar (K doubles) */
    void (*step_diagnostics)(const real *q, const real *z, double *per_row, double *qbar, int N, int K,
                             double tau_s, double out[3]);
    double (*loss_forward_backward)(real *z_dir, int n_dir_crops, real *z_pred, double *row_loss, const real *q,
                                    int Vg, int Vl, int B, int K, double tau_s);
    /* E2, E3; returns the number of clusters with at least one label (counts stays where the model is) */
    int (*cluster_size_update)(real *s, int32_t *counts, const int32_t *labels, int N, int K, double m_s,
                               int fp16_term);
    /* E14 then E9 over the whole parameter buffer (the GPU twin fuses both into one pass) */
    void (*update)(struct ExcbModel *m, double lr, double wd, double wd_centroid, double ema_m);
    /* plain buffer arithmetic of the step: x = 0; x[:, col0:col0+n] = 0 of a (rows, ld) matrix; dst += src;
       dst += gate > 0 ? src : 0; sum of squares (the gradient norm); copy (a few values back to the host) */
    void (*zero)(real *x, size_t n);
    void (*zero_columns)(real *x, int rows, int ld, int col0, int n);
    void (*add)(real *dst, const real *src, size_t n);
    void (*add_gated)(real *dst, const real *src, const real *gate, size_t n);
    double (*sum_squares)(const real *x, size_t n);
    void (*to_host)(void *dst, const void *src, size_t bytes);
    void (*to_device)(void *dst, const void *src, size_t bytes);   /* host to where the model is */
} ExcbOps;
extern const ExcbOps excb_cpu_ops;
extern const ExcbOps excb_cuda_ops;          /* excb_kernels.cu, in CUDA builds only */

/* ------------------------------------------------------------------------------------------------ */
/* The GPU path (excb_kernels.cu; built when nvcc, cuBLAS and cuDNN are found, see the Makefile).    */
typedef enum { EXCB_DEVICE_AUTO = 0, EXCB_DEVICE_CPU = 1, EXCB_DEVICE_CUDA = 2 } ExcbDevice;
/* FP32: every product in float32. TF32: cuBLAS and cuDNN may round GEMM/convolution inputs to TF32
   (10-bit mantissa) and accumulate in float32; everything else stays FP32. */
typedef enum { EXCB_PRECISION_FP32 = 0, EXCB_PRECISION_TF32 = 1, EXCB_PRECISION_BF16 = 2 } ExcbPrecision;
/* 1 if this binary has the CUDA path compiled in */
int excb_cuda_built(void);
/* 0 when a usable GPU is present (desc gets its name, memory and library versions), else an exit code
   (EXCB_EXIT_UNAVAILABLE) with the reason in desc */
int excb_cuda_probe(char *desc, size_t cap);
/* handles and stream for one precision (attach calls it; the tests call it before single operators) */
int excb_cuda_init(ExcbPrecision precision, char *err);
/* a rank of `world` (mpirun, section 10b) takes its GPU before excb_cuda_init: the node's local rank
   modulo the GPUs it sees. When no two ranks have the same GPU (by its UUID) and NCCL is built in, NCCL
   joins them and world->device_sum_real all-reduces the gradients on the GPUs; otherwise device buffers
   go through host memory over MPI. *how says which. 0, or an exit code with err. Ranks on one GPU
   whose compute mode admits one process are refused (69). excb_cuda_leave releases what the join made
   (NCCL's communicator; `failed`: a rank may be leaving alone, so without waiting for the others); the
   world goes back to host reductions. */
int excb_cuda_join(ExcbComm *world, ExcbPrecision precision, char *how, size_t cap, char *err);
void excb_cuda_leave(ExcbComm *world, int failed);
/* the device twin dm of a built host model m: dm is a copy of m whose parameters, optimiser state,
   BN statistics, method state and activation arena live on the GPU (uploaded from m) and whose ops are
   excb_cuda_ops. 0, or an exit code with err (EXCB_EXIT_USAGE for a method without a GPU twin). */
int excb_cuda_attach(ExcbModel *dm, const ExcbModel *m, ExcbPrecision precision, char *err);
/* copy the trainable state (parameters, momentum, teacher, BN statistics, method state, step) of dm into
   the host model m, or of m into dm */
int excb_cuda_download(ExcbModel *m, const ExcbModel *dm, char *err);
int excb_cuda_upload(ExcbModel *dm, const ExcbModel *m, char *err);
void excb_cuda_detach(ExcbModel *dm);
/* bytes of device memory this process holds (its own allocations and the libraries' workspaces), and
   the largest seen */
void excb_cuda_memory(size_t *now, size_t *peak);
void excb_cuda_synchronize(void);
/* plain device buffers (the benchmark keeps its fixed inputs on the GPU, as the PyTorch peer does) */
real *excb_cuda_alloc(size_t floats);
void excb_cuda_copy_to_device(real *dst, const real *src, size_t floats);
void excb_cuda_free(real *p, size_t floats);
/* the GPU's peak in FLOP/s for a precision: FP32 SMs x 256 x clock (Hopper, Ampere-consumer; 128 for
   sm_80), TF32 tensor cores SMs x 2048 x clock on sm_90 (1024 on sm_8x); 0 when unknown */
double excb_cuda_peak_flops(ExcbPrecision precision);
/* convolution directions for which cuDNN offered no deterministic algorithm (then a GPU run does not
   repeat itself bit for bit) */
int excb_cuda_nondeterministic_plans(void);
/* convolution shapes planned so far, and how many of their directions run on packed NCHW copies */
void excb_cuda_conv_report(int *plans, int *packed_directions);
/* lay a model's activation arena out at `base` in the device layout (the shortcuts' BN outputs share the
   first gradient buffer; no im2col panels or slots: col and slots become NULL), touching no memory; how
   the device twin gets its activation pointers. base NULL counts. Returns the floats the layout needs. */
size_t excb_plan_arena(ExcbModel *m, real *base);

/* Schedules (Appendix A). t is the 1-based scheduler step, `step` the 0-based train step. */
double lr_at(long t, long T, long W, double lr_peak, double lr_min_factor);
double lr_peak_for(const ExcbConfig *c);                 /* A19's switch applied to lr_peak            */
double teacher_tau_at(const ExcbConfig *c, long step);   /* A18's switch: the warm-up, then tau_t      */
double centroid_wd_at(long t, long T, double wd, double boost);
double ema_momentum_at(long step, long T, double start);
double crop_scale_min_at(long epoch, long epochs);
/* E9: teacher <- m teacher + (1-m) student, in the official code's real roundings. */
void ema_update(real *teacher, const real *student, size_t n, double m);
/* E14: SGD, momentum, coupled weight decay per group. */
void sgd_update(ExcbModel *m, double lr, double wd, double wd_centroid);

/* Counter-based randomness: a value is a pure function of (seed, purpose, a, b, counter). */
uint64_t excb_hash(uint64_t seed, uint64_t purpose, uint64_t a, uint64_t b, uint64_t counter);
float excb_uniform(uint64_t seed, uint64_t purpose, uint64_t a, uint64_t b, uint64_t counter);
float excb_normal(uint64_t seed, uint64_t purpose, uint64_t a, uint64_t b, uint64_t counter);
enum { EXCB_RNG_INIT = 1, EXCB_RNG_BENCH = 2, EXCB_RNG_TEST = 3, EXCB_RNG_VIEW = 4, EXCB_RNG_JITTER = 5,
       EXCB_RNG_PERM = 6, EXCB_RNG_KMEANS = 7, EXCB_RNG_PROBE = 8, EXCB_RNG_KILL = 9,
       EXCB_RNG_COKE = 10, EXCB_RNG_PARTITION = 11 };

/* float -> IEEE binary16 -> float, round to nearest even (A4's rounding). */
float excb_round_fp16(float x);
float excb_round_fp16_soft(float x);       /* the same in software, for compilers without _Float16 */

/* Multiply-accumulates of one sample (all its views) for the teacher forward and student forward. */
void excb_count_macs(const ExcbModel *m, double *teacher_fwd, double *student_fwd);
void excb_set_threads(int n);

/* ================================================================================================
 * Data sets, views and the loader (excb.c sections 11-13)
 * ================================================================================================
 * Every failure is returned, never exit()ed: a function returns 0 or an exit code (EXCB_EXIT_DATA,
 * _NOINPUT, _IO, _OSERR) and writes one line into err[EXCB_ERR_LEN] naming the file and the problem. */
#define EXCB_ERR_LEN 1024
#define EXCB_MAX_SIDE 65500                  /* widest or tallest image accepted (JPEG's own limit) */
#define EXCB_MAX_PIXELS 89478485L            /* PIL's decompression-bomb threshold (Image.MAX_IMAGE_PIXELS) */

enum { EXCB_DATA_IDX = 1, EXCB_DATA_CIFAR10, EXCB_DATA_CIFAR100, EXCB_DATA_STL10, EXCB_DATA_FOLDER };
/* how one stored image is laid out: interleaved rows (IDX, decoded files), channel planes with rows
   (CIFAR), or channel planes with columns (STL-10, which is column-major within each plane) */
enum { EXCB_LAYOUT_HWC = 0, EXCB_LAYOUT_CHW = 1, EXCB_LAYOUT_CHW_COLMAJOR = 2 };

/* An 8-bit image, interleaved (H, W, C) with C = 1 (gray) or 3 (RGB). Buffers grow on demand and are
   reused: a worker owns one, so the steady state allocates nothing. */
typedef struct {
    uint8_t *px;  size_t cap;              /* pixels, capacity in bytes                              */
    int h, w, c;
    uint8_t *file; size_t file_cap;        /* raw bytes of the last file read (image folders)        */
} ExcbImage;

/* One file of a fixed-size-image data set: `n` records of `record` bytes, image bytes at `offset`. */
typedef struct {
    const uint8_t *base;  long n;  size_t record, offset;
    void *map; size_t map_bytes;           /* base is an mmap of the file (CIFAR, STL-10) ...        */
    uint8_t *owned;                        /* ... or a malloc'd buffer (IDX, decompressed)           */
} ExcbDataPart;

#define EXCB_MAX_PARTS 8
typedef struct {
    int kind;  char path[4096];  char split[32];
    long n;                                /* images                                                  */
    int channels, height, width;           /* height = width = 0: sizes vary (image folders)          */
    int layout;
    int n_classes;  int32_t *labels;       /* labels[i] in [0, n_classes) or -1 (unlabeled); NULL: none */
    int n_parts;  ExcbDataPart parts[EXCB_MAX_PARTS];
    char **files;  char *file_names;       /* image folders: n paths, one blob                        */
    char (*class_names)[64];               /* n_classes names (folder names, label files), or NULL   */
    int skip_bad;                          /* 1: skip undecodable images (counted, logged) instead of failing */
    uint8_t *bad;                          /* n flags, set when an image failed (skip_bad)            */
    long n_bad;                            /* images skipped so far (written by loader workers, under its lock) */
    long *keep;                            /* image i is the source's image keep[i] (excb_data_keep); NULL: all */
} ExcbDataset;

/* --data SPEC: a file, a directory, or the name "fashion-mnist" (the embedded default). split: "train",
   "test", "unlabeled" or "train+unlabeled" (STL-10); NULL = "train". */
int excb_data_open(ExcbDataset *ds, const char *spec, const char *split, char *err);
void excb_data_close(ExcbDataset *ds);
/* keep `max` images of the open set, evenly spaced (source image floor(i n / max)), and renumber them
   0..max-1, labels too; max = 0 or >= n keeps all (the key train_images) */
void excb_data_keep(ExcbDataset *ds, long max);
/* image i as interleaved 8-bit pixels (decoding a file for image folders) */
int excb_data_get(const ExcbDataset *ds, long i, ExcbImage *img, char *err);
void excb_image_free(ExcbImage *img);
/* byte-level readers, also the fuzz targets' entry points; `name` is used in messages only */
int excb_parse_idx(const uint8_t *buf, size_t len, const char *name, int *ndim, uint32_t dims[4],
                   size_t *data_offset, char *err);
int excb_gunzip(const uint8_t *buf, size_t len, uint8_t **out, size_t *out_len, size_t max_out,
                const char *name, char *err);
int excb_check_labels(const uint8_t *buf, long n, size_t stride, int lo, int hi, const char *name,
                      const char *what, char *err);
int excb_decode_image(const uint8_t *buf, size_t len, const char *name, ExcbImage *img, char *err);
/* writers, for the tests and the view dumps: 8-bit PNG (gray or RGB) and baseline JPEG */
int excb_write_png(const char *path, const uint8_t *px, int h, int w, int c, char *err);
int excb_write_jpeg(const char *path, const uint8_t *px, int h, int w, int c, int quality, char *err);

/* What the views of one sample are made of (paper_notes.md §8b; transforms.py L84-103). */
enum { EXCB_BLUR_AS_RUN = 0, EXCB_BLUR_AS_CONFIGURED = 1, EXCB_BLUR_NONE = 2 };
typedef struct {
    int n_global, n_local, global_size, local_size, channels;
    long epochs;                           /* for the crop-scale schedule s_min(e) (A11)             */
    double ratio_min, ratio_max;           /* RandomResizedCrop aspect ratios: 3/4, 4/3              */
    double local_scale_min;                /* 0.05: local crops take (0.05, s_min(e)) of the area    */
    double scale_offset;                   /* added to s_min(e) (0 officially; small images may want more) */
    double fixed_scale_split;              /* > 0: s_min fixed at this (A11's switch, DINO's 0.4), no schedule */
    double p_flip, p_jitter, brightness, contrast, saturation, hue, p_gray;
    double p_blur[3];                      /* global view 1, global view 2, local views (A14)        */
    double blur_sigma_min, blur_sigma_max;  int blur_kernel;
    double p_solarize[3];  int solarize_threshold;
    float mean[3], std[3];                 /* normalisation, A16 (1-channel data: luma-weighted)      */
    uint64_t seed;
} ExcbViewConfig;

/* The random choices of one view, drawn from (seed, epoch, sample, view, purpose) only. */
typedef struct {
    int top, left, h, w;                   /* the crop, in source pixels                             */
    int flip, jitter, order[4], gray, blur, solarize;
    double brightness, contrast, saturation, hue, sigma;
} ExcbViewParams;

/* per-worker buffers for making views (grown on demand, then reused) */
typedef struct { uint8_t *a, *b; size_t cap; float *f; size_t fcap; } ExcbViewScratch;

void excb_view_config_default(ExcbViewConfig *vc, int blur_mode);
/* the defaults, sized for a model configuration (views, sizes, channels, seed) and a run of `epochs` */
void excb_view_config_for(ExcbViewConfig *vc, const ExcbConfig *cfg, long epochs, int blur_mode);
void excb_view_params(const ExcbViewConfig *vc, long epoch, long sample, int view, int src_h, int src_w,
                      ExcbViewParams *p);
/* make view `view` of img; out: channels x S x S floats, normalised (S = global or local size) */
void excb_make_view(const ExcbViewConfig *vc, const ExcbViewParams *p, const ExcbImage *img, int view,
                    real *out, ExcbViewScratch *scr);
/* the individual operators, exposed for the tests (8-bit interleaved images, in place unless noted) */
void excb_resize_bicubic(const uint8_t *src, int sh, int sw, int sstride, uint8_t *dst, int dh, int dw,
                         int c, uint8_t *tmp);
void excb_adjust_brightness(uint8_t *px, size_t npx, int c, double f);
void excb_adjust_contrast(uint8_t *px, size_t npx, int c, double f);
void excb_adjust_saturation(uint8_t *px, size_t npx, int c, double f);
void excb_adjust_hue(uint8_t *px, size_t npx, int c, double f);
void excb_grayscale(uint8_t *px, size_t npx, int c);
void excb_gaussian_blur(uint8_t *px, int h, int w, int c, int ksize, double sigma, float *tmp);
void excb_solarize(uint8_t *px, size_t n, int threshold);
void excb_blur_kernel(double *k, int ksize, double sigma);
double excb_bicubic_weight(double x);

/* The loader: a deterministic permutation per epoch, batches made by background workers. */
typedef struct {
    real *xg, *xl;                         /* (Vg*B, C, G, G) and (Vl*B, C, L, L), view-major        */
    int32_t *labels;  int64_t *index;      /* per sample: label (-1 none) and data set index          */
    long id, epoch, step_in_epoch;         /* global batch number, its epoch, its place in the epoch  */
    int state;  int err_code;  char err[EXCB_ERR_LEN];
} ExcbBatch;

typedef struct ExcbLoader {
    ExcbDataset *ds;  ExcbViewConfig vc;  int batch, n_workers, n_slots;
    int global_batch, share_first;         /* a rank's share (section 10b): images share_first .. + batch
                                              of each global batch (one process: 0 .. batch)         */
    long batches_per_epoch, first_batch;   /* batch ids start here (0, or the data cursor on resume)  */
    long consumed, released;               /* batches handed out; batches the caller is done with  */
    ExcbBatch *slots;
    void *threads;  void *workers;  void *sync;  /* pthread handles, per-worker state, mutex + condvars */
    int stop;
    int error_code;  char error[EXCB_ERR_LEN];  /* a failed batch: every later call returns it again */
    double busy_seconds;                   /* summed worker time spent making batches                */
} ExcbLoader;

/* start at global batch `first_batch` (0 for a new run; the data cursor on resume); workers = 0 makes
   batches in the caller's thread */
int excb_loader_open(ExcbLoader *L, ExcbDataset *ds, const ExcbViewConfig *vc, int batch, int workers,
                     long first_batch, char *err);
/* the same for one of `shares` ranks (excb.c section 10b): its global_batch / shares images of every
   global batch, share after share; the images and views are the single process's, whatever shares is */
int excb_loader_open_share(ExcbLoader *L, ExcbDataset *ds, const ExcbViewConfig *vc, int global_batch, int shares,
                           int share, int workers, long first_batch, char *err);
/* the next batch, in order; valid until the next call. Returns 0 or the exit code of a data error,
   and that same error from every later call (its worker has stopped). */
int excb_loader_next(ExcbLoader *L, ExcbBatch **out, char *err);
void excb_loader_close(ExcbLoader *L);
void excb_permutation(int64_t *perm, long n, uint64_t seed, long epoch);

/* ================================================================================================
 * Runs: configuration and presets, centroid initialisation, checkpoints, training, evaluation
 * (excb.c sections 14-18)
 * ================================================================================================ */
#define EXCB_MAX_KS 8
/* Everything `excb train` needs beyond the model's own ExcbConfig. Each field is a key of the config
   file and of --set (excb.c, "the key table"); excb train --help-config lists them with their help. */
typedef struct {
    ExcbConfig model;
    int n_widths, n_blocks;    /* lengths of the widths and blocks lists; equal, = model.n_stages     */
    char preset[32];           /* the preset the defaults came from                                   */
    char data[1024];           /* --data SPEC (fashion-mnist, a folder, a file)                        */
    char train_split[32];      /* pre-training split ("train", "train+unlabeled")                    */
    long train_images;         /* pre-train on this many of its images, evenly spaced (0: all)         */
    char bank_split[32];       /* k-NN memory bank and linear-probe training split ("train")          */
    char query_split[32];      /* k-NN queries and linear-probe test split ("test", "val")            */
    long epochs;               /* E                                                                    */
    double warmup_epochs;      /* linear lr warm-up, in epochs (10 officially)                         */
    int workers, blur, skip_bad;
    double crop_scale_offset;  /* added to the official crop-scale bound s_min(e) (A11); 0 officially   */
    int crop_scales;           /* ExcbCropScales: the schedule (the code) or DINO's fixed scales (A11)  */
    int log_every;             /* steps between step records (and plain progress lines)               */
    int ckpt_every;            /* steps between checkpoints (0: end of epoch only)                     */
    int keep;                  /* checkpoints kept in the run directory (the newest ones)             */
    int knn_every;             /* epochs between k-NN evaluations during training (0: only at the end) */
    int knn_ks[EXCB_MAX_KS], n_knn_ks;    /* k values of the weighted k-NN                           */
    double knn_t;              /* its temperature T (0.07)                                             */
    long knn_bank_max, knn_query_max;     /* during training: evenly spaced subsets (0: all)         */
    int kmeans_init;           /* 1: spherical k-means centroids (paper_notes.md §9); 0: random (ablation) */
    long kmeans_samples;       /* projections collected (500000 officially)                            */
    int kmeans_iters, kmeans_restarts;    /* Lloyd iterations (50); restarts allowed while a cluster is empty */
    int probe_epochs, probe_batch;        /* linear probe on frozen features                           */
    double probe_lr, probe_wd;
    long stop_after;           /* stop with a checkpoint after this many steps (0: run to the end); set by
                                  --stop-after, not a config key: it does not belong to the run       */
    long debug_nan_step;       /* tests: put a NaN into step N's input (-1: never)                     */
    int device;                /* ExcbDevice, set by --device (auto resolved to cpu or cuda before the run) */
    int precision;             /* ExcbPrecision, set by --precision; neither is a config key: a run may resume
                                  on another machine, and the checkpoint format is the same                */
    int chunks;                /* --chunks R: one process computes each global batch as R ranks' shares, one
                                  after another (excb.c section 10b), the reference mpirun -np R equals; not a
                                  key either: a checkpoint resumes on any number of ranks                   */
} ExcbRunConfig;

/* Presets: "fashion-mnist" (the fast default), "fashion-mnist-long", "cifar10-r18", "stl10-r18",
   "imagenet-r50", "tiny" (tests). 0 ok, EXCB_EXIT_CONFIG for an unknown name (err says which exist). */
int excb_preset(ExcbRunConfig *rc, const char *name, char *err);
/* checks ranges and cross-key rules after all settings; sets model.n_stages. 0 or EXCB_EXIT_CONFIG */
int excb_config_validate(ExcbRunConfig *rc, char *err);
/* key = value (one setting); 0 or EXCB_EXIT_CONFIG with err naming the key and the problem */
int excb_config_set(ExcbRunConfig *rc, const char *key, const char *value, char *err);
/* a config file: "key = value" lines, '#' comments; `name` is used in messages */
int excb_config_parse(ExcbRunConfig *rc, const char *text, const char *name, char *err);
/* the resolved config as a config file (json = 0) or one JSON object (json = 1); malloc'd */
char *excb_config_dump(const ExcbRunConfig *rc, int json);
/* the keys that shape the trajectory equal in both (resume); 0 or EXCB_EXIT_CONFIG naming the key */
int excb_config_compatible(const ExcbRunConfig *run, const ExcbRunConfig *ckpt, char *err);

/* paper_notes.md §9: spherical k-means on n unit rows x (n, d). Seeds are distinct random rows; Lloyd
   iterations with argmax E-steps and normalised-mean M-steps (an empty cluster keeps its centroid);
   restarted with new seeds while a cluster is empty after the last E-step. c gets the unit centroids
   (the teacher's), c_next one more M-step's unnormalised means (the student's). Returns the restarts
   used, or -1 when clusters were still empty after max_restarts (then *empty says how many). */
int excb_spherical_kmeans(const real *x, long n, int d, int K, int iters, int max_restarts, uint64_t seed,
                          real *c, real *c_next, int32_t *assign, int *empty);

/* The training state outside the model, saved in every checkpoint. */
enum { EXCB_ACC_STEPS, EXCB_ACC_LOSS, EXCB_ACC_TCONF, EXCB_ACC_SCONF, EXCB_ACC_UNIQUE, EXCB_ACC_CHANGED,
       EXCB_ACC_SEEN, EXCB_ACC_ENTROPY, EXCB_ACC_N };
typedef struct {
    long n_samples;            /* size of the pre-training split                                      */
    int32_t *prev_labels;      /* each sample's teacher label (view 1) when last seen, -1: not yet    */
    int64_t *epoch_counts;     /* K: teacher labels (both views) so far this epoch                    */
    double acc[EXCB_ACC_N];    /* sums over this epoch's steps                                        */
    int64_t metrics_bytes;     /* length of metrics.jsonl when the checkpoint was written             */
    double seconds;            /* training time so far (informative only; not part of any comparison) */
} ExcbTrainState;

/* Checkpoints (paper_notes.md §9): magic, version, a table of named tensors with a CRC-32 each, a CRC-32
   of the whole file; written to a temporary file, fsync'ed, renamed, directory fsync'ed. */
int excb_checkpoint_save(const char *path, const ExcbModel *m, const ExcbTrainState *ts, const char *config_text,
                         char *err);
/* the resolved config stored in a checkpoint (malloc'd text); verifies the whole file first */
int excb_checkpoint_config(const char *path, char **config_text, char *err);
/* everything into a model built from that config, and ts (allocated here); verifies names and shapes */
int excb_checkpoint_load(const char *path, ExcbModel *m, ExcbTrainState *ts, char *err);
void excb_train_state_free(ExcbTrainState *ts);

/* The whole run (excb.c section 17) into out_dir: data, model, k-means init, the loop with metrics,
   checkpoints and the divergence guard, k-NN every knn_every epochs and the final evaluation. With
   resume_from (a checkpoint of this run directory) it continues that run; rc must be its config.
   0, or an exit code with err (EXCB_EXIT_DIVERGED: the last good checkpoint is intact). */
int excb_train(ExcbRunConfig *rc, const char *out_dir, const char *resume_from, int quiet, char *err);
/* one process per run directory: an exclusive flock on DIR/lock, held while *fd stays open and released
   by the kernel when the process ends however it ends. *fd < 0: open and lock the file (create = 0: only
   if it exists, else 0 with *fd still -1); then create = 1 writes this process's pid into it. 0, or
   EXCB_EXIT_TEMPFAIL when another process holds it (err names its pid), or EXCB_EXIT_CANTCREAT/IO */
int excb_lock_run_dir(const char *dir, int create, int *fd, char *err);
/* the newest checkpoint of a run directory that verifies (damaged newer ones are skipped, with a note
   on stderr when verbose); 0 or EXCB_EXIT_NOINPUT */
int excb_find_checkpoint(const char *dir, char *path, size_t cap, int verbose, char *err);

/* --- evaluation --- */
/* backbone features (n, D) of images idx[0..n) (NULL: 0..n-1), BN in evaluation mode, the evaluation view
   (the whole image, or resize the short side to G*256/224 and centre-crop G); the teacher's weights or
   the student's. assign (may be NULL): each image's nearest centroid of the same network (E1 argmax,
   no balancing). With ds->skip_bad (and ds->bad allocated) a bad image is marked in ds->bad and
   counted in ds->n_bad, and its row is computed from a zero input: the caller drops the marked rows. */
int excb_extract_features(ExcbModel *m, int teacher, ExcbDataset *ds, const ExcbViewConfig *vc,
                          const long *idx, long n, real *feat, int32_t *assign, char *err);
/* the same evaluation view's C*G*G pixels as each image's feature row, for the pixel baseline */
int excb_pixel_features(ExcbDataset *ds, const ExcbViewConfig *vc, int C, const long *idx, long n,
                        real *feat, char *err);
/* weighted k-NN as DINO's eval_knn: cosine similarity of L2-normalised rows, vote weight exp(sim/T);
   top1[j], top5[j] in percent for k = ks[j] */
void excb_knn(const real *bank, const int32_t *bank_labels, long n_bank, const real *query,
              const int32_t *query_labels, long n_query, int D, int n_classes, const int *ks, int n_ks,
              double T, double *top1, double *top5);
/* the linear probe's loss on n rows: mean softmax cross-entropy of W x + b (W (C, D)); adds dW, db */
double excb_softmax_xent(const real *W, const real *b, const real *x, const int32_t *y, long n, int D, int C,
                         double *dW, double *db);
/* a linear probe: features standardised with the training rows' mean and std, softmax regression by
   SGD (momentum 0.9, cosine lr to 0, wd on W, shuffled by (seed, epoch)). Returns the test top-1 (%) of
   the last epoch; *train_acc gets its training top-1. */
double excb_linear_probe(const real *train, const int32_t *ytr, long ntr, const real *test, const int32_t *yte,
                         long nte, int D, int C, int epochs, int batch, double lr, double wd, uint64_t seed,
                         double *train_acc);
typedef struct {
    double nmi, ami, ari;      /* arithmetic-mean normalisation (scikit-learn's default)              */
    double acc_many_to_one;    /* each cluster votes its majority class                               */
    double acc_hungarian;      /* one-to-one matching; NAN unless K == number of classes              */
    int used_clusters;
} ExcbClusterScores;
void excb_cluster_scores(const int32_t *pred, const int32_t *truth, long n, int K, int C, ExcbClusterScores *s);
/* the optimal one-to-one assignment maximising sum w[i][perm[i]] of an n x n matrix (Hungarian method) */
void excb_hungarian_max(const double *w, int n, int *perm);

/* --- weights in and out: safetensors with PyTorch's names (excb.c section 16b) --- */
/* A safetensors file read and verified (the format exactly: an 8-byte little-endian header length, a
   JSON header of at most 100 MB parsed by jansson, dtype/shape/data_offsets per tensor, offsets that
   cover the byte buffer with no hole and no overlap, __metadata__ of strings). Tensors are in the
   order of their data. */
#define EXCB_ST_MAX_DIMS 8
typedef struct {
    char *name;
    int dtype;                 /* EXCB_ST_F32, ...: an index into excb_st_dtypes                      */
    int ndim;
    int64_t shape[EXCB_ST_MAX_DIMS];
    uint64_t numel;
    const uint8_t *data;       /* into the file's bytes                                               */
    size_t bytes;
} ExcbStTensor;
typedef struct {
    char path[4096];
    uint8_t *buf; size_t len;
    int n; ExcbStTensor *t;
    int n_meta; char **meta_key, **meta_value;
} ExcbSafetensors;
enum { EXCB_ST_BOOL, EXCB_ST_U8, EXCB_ST_I8, EXCB_ST_F8_E5M2, EXCB_ST_F8_E4M3, EXCB_ST_I16, EXCB_ST_U16, EXCB_ST_F16,
       EXCB_ST_BF16, EXCB_ST_I32, EXCB_ST_U32, EXCB_ST_F32, EXCB_ST_F64, EXCB_ST_I64, EXCB_ST_U64, EXCB_ST_N_DTYPES };
typedef struct { const char *name; int size; } ExcbStDtype;
extern const ExcbStDtype excb_st_dtypes[EXCB_ST_N_DTYPES];   /* their names in the header, bytes each */
/* the bytes buf[0..len) (taken over: freed by excb_safetensors_close, also on failure) as the file
   `path`; 0, or EXCB_EXIT_DATA with err naming the file and the problem */
int excb_safetensors_parse(ExcbSafetensors *st, uint8_t *buf, size_t len, const char *path, char *err);
int excb_safetensors_open(ExcbSafetensors *st, const char *path, char *err);   /* + 66 unreadable */
const ExcbStTensor *excb_safetensors_find(const ExcbSafetensors *st, const char *name);
const char *excb_safetensors_meta(const ExcbSafetensors *st, const char *key);   /* NULL: absent */
void excb_safetensors_close(ExcbSafetensors *st);

/* What a weights file holds, as loaded by excb_weights_load. */
typedef struct {
    int matched, ignored;      /* tensors used; tensors of the file that are not the model's          */
    int heads;                 /* 1: the projector, predictor and prototypes came from the file       */
    int from_excb;             /* 1: the file carries excb's config (an excb export)                  */
    char set[16];              /* the prefix group taken: "teacher", "student" or ""                  */
} ExcbWeightsInfo;
/* The model's weights under PyTorch's names: one network (the teacher's or the student's), its BatchNorm
   buffers (running_mean, running_var, num_batches_tracked), the prototypes as weight_v with weight_g = 1,
   the config text and step in __metadata__. backbone_only: the backbone alone, named as torchvision
   names it (no "backbone." prefix). Written atomically; 0 or an exit code with err. */
int excb_weights_save(const char *path, const ExcbModel *m, int teacher, int backbone_only, const char *config_text,
                      char *err);
/* A weights file (excb's export, a torchvision ResNet state dict, a DINO/ExCB-style one) into a model
   built here, whose config rc gets: from the file's excb config when it has one, else the backbone read
   off the tensor names and shapes with the defaults of the closest preset. which: "teacher", "student"
   or NULL (the teacher's when the file has both). Prefixes module., backbone. and teacher./student. are
   stripped as prefixes; names left unmatched are listed on stderr. hook (may be NULL) then applies further
   settings (the command line's) before the model is built. Both networks of m get the weights.
   0, or EXCB_EXIT_DATA/NOINPUT/CONFIG with err. */
typedef int (*ExcbSettingsHook)(ExcbRunConfig *rc, void *ctx, char *err);   /* more settings: 0 or a code */
int excb_weights_load(const char *path, const char *which, ExcbSettingsHook hook, void *ctx, ExcbRunConfig *rc,
                      ExcbModel *m, ExcbWeightsInfo *info, char *err);
/* the backbone's pooled features (n, D) of n input images x (n, C, G, G), BatchNorm in evaluation mode */
void excb_backbone_features(ExcbModel *m, int teacher, const real *x, int n, real *feat);

#endif /* EXCB_H */
