/* test_step.c: whole training steps.
 *  - parity: one step of excb.c against the independent PyTorch reference (tests/reference, written
 *    from the official code's equations, paper_notes.md) for the tiny BasicBlock net and the tiny Bottleneck/ImageNet-stem net, every
 *    tensor compared; and, when EXCB_TORCH_DUMP names a `torch_excb.py --dump` file, against that
 *    second reference too (skipped, and reported as skipped, otherwise);
 *  - determinism: N steps are bitwise equal across runs and across 1 and 2 threads;
 *  - training: on one fixed batch the loss goes down; s and the teacher follow E3 and E9 exactly. */
#include "testutil.h"
#ifdef _OPENMP
#include <omp.h>
#endif

/* Per-group tolerances on rel_err (max |diff| / max |ref| over a tensor) against the fixture's
 * FLOAT64 step. Rule: about 2x the error of PyTorch's own float32 step against the same float64
 * step, measured with the same metric (`make_fixture.py --yardstick`; worst of the two fixtures):
 *   teacher similarity 3.9e-6 -> 1e-5     targets q 1.1e-6 -> 3e-6 (but 1e-5: q magnifies zh 25x)
 *   student activations 1.2e-5 -> 3e-5    loss 3.8e-7 -> 1e-6
 *   gradients 2.1e-4 -> 6e-4 (3x, see below)
 *   momentum after SGD 2.0e-4 -> 6e-4     parameters after SGD 5.6e-5 -> 1.5e-4 (3x, the same tensor)
 *   teacher after EMA 4.2e-7 -> 1e-6
 * The gradient groups' worst entry is the 2-channel stem BN gamma of tiny50, a sum with cancellation
 * whose error depends on the rounding order upstream more than on any formula: excb.c measured 1.05e-4
 * with its im2col convolutions and 3.79e-4 (momentum 3.65e-4, parameters 1.0e-4) with oneDNN's direct
 * convolutions, the default, whose every layer agrees with a float64 convolution to 5e-7
 * (test_gradients conv2d_many_chunks_vs_direct, tiny50's layers included). Hence 3x there.
 * excb.c's own measured errors are in the closing note of issue 2 (all below PyTorch's). A wrong
 * formula gives errors of 1e-2 and up. */
#define TOL_SIM 1e-5
#define TOL_Q 1e-5
#define TOL_ACT 3e-5
#define TOL_LOSS 1e-6
#define TOL_GRAD 6e-4
#define TOL_MOM 6e-4
#define TOL_PARAM 1.5e-4
#define TOL_TEACHER 1e-6

typedef struct {
    const char *param, *teacher, *momentum, *grad, *param_after, *mom_after, *teacher_after;
    const char *labels;
    int torch_dump;      /* student_logits holds all 16B rows: direct global, direct local, predictor */
} Names;

static const Names OURS = {"param.", "teacher.", "momentum.", "grad.", "param_after.", "momentum_after.",
                           "teacher_after.", "labels", 0};
static const Names PEER = {"student.", "teacher.", "momentum_before.", "grad.", "student_after.",
                           "momentum_after.", "teacher_after.", "teacher_labels", 1};

static const FixTensor *need(const Fixture *fx, const char *prefix, const char *name) {
    char full[160];
    snprintf(full, sizeof full, "%s%s", prefix, name);
    const FixTensor *t = fix_get(fx, full);
    cr_assert(t != NULL, "fixture has no tensor '%s'", full);
    return t;
}

/* feature-major (F, ld) columns [0, N) vs a row-major (N, F) reference */
static double rel_err_T(const float *fm, int ld, const float *rm, int F, int N) {
    float *t = malloc(sizeof(float) * F * N);
    for (int n = 0; n < N; n++)
        for (int f = 0; f < F; f++) t[(size_t)n * F + f] = fm[(size_t)f * ld + n];
    double e = rel_err(t, rm, (size_t)F * N);
    free(t);
    return e;
}

/* Against a float32 reference (torch_excb.py --dump) both sides carry float32 error: tolerances x2. */
static double tol_scale = 1.0;

static void report(const char *group, double worst, double tol) {
    tol *= tol_scale;
    printf("  parity %-22s worst rel err %.3g (tol %.0e)\n", group, worst, tol);
    cr_expect(worst <= tol, "%s: worst relative error %.3g > %.0e", group, worst, tol);
}

static void run_parity(const char *config, const Fixture *fx, const Names *nm, int threads) {
    ExcbConfig cfg;
    ExcbModel m;
    cr_assert(excb_config_named(&cfg, config) == 0);
    cfg.threads = threads;
    long step;
    if (nm->torch_dump) {
        step = fx->header[28] - 1;                   /* header: scheduler step t (1-based), T, W   */
        cfg.total_steps = fx->header[29];
        cfg.warmup_steps = fx->header[30];
    } else {
        const FixTensor *meta = need(fx, "", "meta"); /* step, T, W, K, B                          */
        step = (long)meta->data[0];
        cfg.total_steps = (long)meta->data[1];
        cfg.warmup_steps = (long)meta->data[2];
        cr_assert(meta->data[3] == cfg.K && meta->data[4] == cfg.batch, "fixture K/B match the config");
    }
    cr_assert(excb_build(&m, &cfg) == 0);
    for (int t = 0; t < m.n_tensors; t++) {           /* every model tensor comes from the fixture */
        const ExcbTensor *T = &m.tensors[t];
        const FixTensor *p = need(fx, nm->param, T->name), *te = need(fx, nm->teacher, T->name),
                        *mo = need(fx, nm->momentum, T->name);
        cr_assert(p->numel == T->numel, "%s: %zu values in the fixture, %zu in the model", T->name, p->numel, T->numel);
        memcpy(m.params + T->offset, p->data, sizeof(float) * T->numel);
        memcpy(m.teacher + T->offset, te->data, sizeof(float) * T->numel);
        memcpy(m.momentum + T->offset, mo->data, sizeof(float) * T->numel);
    }
    memcpy(excb_method_buffer(&m, "cluster_sizes"), need(fx, "", "s_before")->data, sizeof(float) * cfg.K);
    m.step = step;
    int B = cfg.batch, NG = cfg.n_global * B, NS = (cfg.n_global + cfg.n_local) * B, K = cfg.K, d = cfg.d;
    ExcbStepStats st;
    double loss = excb_forward_loss(&m, need(fx, "", "x_global")->data, need(fx, "", "x_local")->data, &st);
    /* forward: teacher similarities and targets, labels, student features, projections, logits */
    report("teacher similarity", rel_err(m.zt, need(fx, "", "teacher_sim")->data, (size_t)NG * K), TOL_SIM);
    report("teacher targets q", rel_err(m.q, need(fx, "", "teacher_q")->data, (size_t)NG * K), TOL_Q);
    const FixTensor *lab = need(fx, "", nm->labels);
    int bad = 0;
    for (int i = 0; i < NG; i++) bad += m.labels[i] != (int)lab->data[i];
    cr_expect(bad == 0, "%d of %d teacher labels differ", bad, NG);
    double wa = rel_err_T(m.f, NS, need(fx, "", "student_feat")->data, m.D, NS);
    double e = rel_err_T(m.h, NS, need(fx, "", "student_proj")->data, d, NS);
    wa = e > wa ? e : wa;
    e = rel_err_T(m.p, NS, need(fx, "", "student_pred")->data, d, NS);
    wa = e > wa ? e : wa;
    /* logits: recomputed from the kept u and c (z itself now holds dL/dz) */
    float *lg = malloc(sizeof(float) * (size_t)NS * K);
    const float *ref_dir, *ref_pred;
    if (nm->torch_dump) {
        const float *sl = need(fx, "", "student_logits")->data;
        ref_dir = sl;
        ref_pred = sl + (size_t)NS * K;              /* after 2B direct global + 6B direct local  */
    } else {
        ref_dir = need(fx, "", "logits_direct")->data;
        ref_pred = need(fx, "", "logits_pred")->data;
    }
    matmul_naive('N', 'T', NG, K, d, (float)(1.0 / cfg.tau_s), m.u_dir, d, m.c, d, 0.0f, lg, K);
    e = rel_err(lg, ref_dir, (size_t)NG * K);
    wa = e > wa ? e : wa;
    matmul_naive('N', 'T', NS, K, d, (float)(1.0 / cfg.tau_s), m.u_pred, d, m.c, d, 0.0f, lg, K);
    e = rel_err(lg, ref_pred, (size_t)NS * K);
    wa = e > wa ? e : wa;
    free(lg);
    report("student activations", wa, TOL_ACT);
    double lref = need(fx, "", "loss")->data[0];
    report("loss", fabs(loss - lref) / fabs(lref), TOL_LOSS);
    /* E2/E3: the same labels and the same float operations give the same bits: tolerance 0 */
    excb_update_method(&m, &st);
    const float *s_after = need(fx, "", "s_after")->data;
    report("cluster sizes s", rel_err(excb_method_buffer(&m, "cluster_sizes"), s_after, K), 0);
    /* backward: every parameter gradient */
    excb_backward(&m);
    /* Four gradients are exactly 0 in exact arithmetic: a bias (or BN beta) whose output goes
       through a Linear layer into a BatchNorm, which removes any constant shift (projector mlp.0 and
       mlp.3 biases, predictor mlp.0 bias, predictor_activation bias). Their values on either side are
       rounding noise, so every gradient is judged against max(its own scale, 1e-3 x the largest
       gradient of the model): a structurally-zero gradient must then be ~1e-3 times smaller than
       the others, and an ordinary one is judged as before. */
    double gmax = 0;
    for (int t = 0; t < m.n_tensors; t++) {
        const FixTensor *r = need(fx, nm->grad, m.tensors[t].name);
        for (size_t i = 0; i < r->numel; i++) gmax = fabs(r->data[i]) > gmax ? fabs(r->data[i]) : gmax;
    }
    double wg = 0;
    const char *wg_name = "";
    for (int t = 0; t < m.n_tensors; t++) {
        const ExcbTensor *T = &m.tensors[t];
        const FixTensor *r = need(fx, nm->grad, T->name);
        double rmax = 0;
        for (size_t i = 0; i < r->numel; i++) rmax = fabs(r->data[i]) > rmax ? fabs(r->data[i]) : rmax;
        e = rel_err(m.grads + T->offset, r->data, T->numel);
        if (rmax < 1e-3 * gmax) e *= rmax / (1e-3 * gmax);    /* rel_err divided by rmax    */
        if (getenv("EXCB_VERBOSE")) printf("    %-48s %.3g\n", T->name, e);
        if (e > wg) { wg = e; wg_name = T->name; }
    }
    printf("  (largest gradient error in %s)\n", wg_name);
    report("gradients", wg, TOL_GRAD);
    /* update: SGD, momentum, EMA */
    excb_update(&m, &st);
    double wp = 0, wm = 0, wt = 0;
    for (int t = 0; t < m.n_tensors; t++) {
        const ExcbTensor *T = &m.tensors[t];
        e = rel_err(m.params + T->offset, need(fx, nm->param_after, T->name)->data, T->numel);
        wp = e > wp ? e : wp;
        e = rel_err(m.momentum + T->offset, need(fx, nm->mom_after, T->name)->data, T->numel);
        wm = e > wm ? e : wm;
        e = rel_err(m.teacher + T->offset, need(fx, nm->teacher_after, T->name)->data, T->numel);
        wt = e > wt ? e : wt;
    }
    report("momentum after SGD", wm, TOL_MOM);        /* holds this step's gradient              */
    report("parameters after SGD", wp, TOL_PARAM);
    report("teacher after EMA", wt, TOL_TEACHER);
    excb_free(&m);
}

static void parity_from_file(const char *config, const char *path, const Names *nm) {
    Fixture fx;
    cr_assert(fixture_load(&fx, path) == 0, "cannot read fixture %s (regenerate: make fixture)", path);
    printf("%s vs %s:\n", config, path);
    tol_scale = nm->torch_dump ? 2.0 : 1.0;
    run_parity(config, &fx, nm, 2);
    fixture_free(&fx);
}

Test(parity, tiny_basicblock_vs_reference, .timeout = 60) {
    parity_from_file("tiny", "tests/reference/tiny.bin", &OURS);
}

Test(parity, tiny_bottleneck_imagenet_stem_vs_reference, .timeout = 60) {
    parity_from_file("tiny50", "tests/reference/tiny50.bin", &OURS);
}

Test(parity, tiny_vs_torch_excb_dump, .timeout = 60) {
    const char *path = getenv("EXCB_TORCH_DUMP");
    if (!path || !*path)
        cr_skip_test("EXCB_TORCH_DUMP not set: run `make parity-peer` to compare with the PyTorch peer's --dump (PEER=path/to/torch_excb.py)");
    parity_from_file("tiny", path, &PEER);
}

/* ------------------------------------------------------------------------------------------------ */
/* Determinism: a run is a pure function of the seed and the inputs, whatever the thread count. */
static void small_config(ExcbConfig *cfg) {
    /* resnet20s with a batch big enough for several im2col chunks per conv (N*Cin*9*HoWo > 1 MiB
       in stage 1), so the slot reduction of the weight gradients is exercised */
    excb_config_named(cfg, "resnet20s");
    cfg->batch = 8;
    cfg->K = 64;
    cfg->hidden = 64;
    cfg->d = 32;
    cfg->total_steps = 1000;
    cfg->warmup_steps = 2;
    cfg->seed = 11;
}

/* Inputs of one step: xg (Vg*B, C, G, G) and xl (Vl*B, C, L, L), N(0,1) from streams s and s+1. */
static void make_inputs(const ExcbConfig *c, uint64_t stream, float **xg, float **xl) {
    size_t ng = (size_t)c->n_global * c->batch * c->in_ch * c->global_size * c->global_size;
    size_t nl = (size_t)c->n_local * c->batch * c->in_ch * c->local_size * c->local_size;
    *xg = malloc(sizeof(float) * ng);
    *xl = malloc(sizeof(float) * (nl + 1));
    fill_normal(*xg, ng, stream, 1);
    fill_normal(*xl, nl, stream + 1, 1);
}

/* device_layout: lay the activations out as the GPU twin does (excb_plan_arena: the shortcuts' BN
   outputs in the first gradient buffer) in a CPU allocation of its own, keeping the CPU's scratch */
static void run_steps(const ExcbConfig *cfg, int threads, int steps, float **params, float **teacher,
                      float **s, double *losses, int device_layout) {
    ExcbConfig c = *cfg;
    c.threads = threads;
    ExcbModel m;
    cr_assert(excb_build(&m, &c) == 0);
    real *device_arena = NULL;
    if (device_layout) {
        real *col = m.col, *slots = m.slots;          /* they stay in excb_build's arena          */
        size_t floats = excb_plan_arena(&m, NULL);
        cr_assert(floats < m.arena_floats, "device layout %zu floats, CPU %zu", floats, m.arena_floats);
        device_arena = malloc(sizeof(real) * floats);
        excb_plan_arena(&m, device_arena);
        m.col = col;
        m.slots = slots;
    }
    for (int t = 0; t < steps; t++) {
        float *xg, *xl;
        make_inputs(&c, 100 + 2 * t, &xg, &xl);       /* a new batch each step                    */
        ExcbStepStats st;
        cr_assert(excb_step(&m, xg, xl, &st) == 0, "step %d diverged", t);
        losses[t] = st.loss;
        free(xg);
        free(xl);
    }
    *params = malloc(sizeof(float) * m.n_params);
    *teacher = malloc(sizeof(float) * m.n_params);
    *s = malloc(sizeof(float) * c.K);
    memcpy(*params, m.params, sizeof(float) * m.n_params);
    memcpy(*teacher, m.teacher, sizeof(float) * m.n_params);
    memcpy(*s, excb_method_buffer(&m, "cluster_sizes"), sizeof(float) * c.K);
    excb_free(&m);
    free(device_arena);
}

Test(determinism, bitwise_equal_across_runs_and_thread_counts, .timeout = 300) {
    ExcbConfig cfg;
    small_config(&cfg);
    ExcbModel probe;
    cr_assert(excb_build(&probe, &cfg) == 0);
    size_t np = probe.n_params;
    excb_free(&probe);
    enum { STEPS = 3 };
    const int threads[3] = {1, 2, 2};
    float *p[3], *t[3], *s[3];
    double l[3][STEPS];
    for (int r = 0; r < 3; r++) run_steps(&cfg, threads[r], STEPS, &p[r], &t[r], &s[r], l[r], 0);
    for (int r = 1; r < 3; r++) {
        cr_expect(memcmp(l[0], l[r], sizeof l[0]) == 0, "run %d (%d threads): losses differ from 1 thread", r, threads[r]);
        cr_expect(memcmp(p[0], p[r], sizeof(float) * np) == 0, "run %d: parameters not bitwise equal", r);
        cr_expect(memcmp(t[0], t[r], sizeof(float) * np) == 0, "run %d: teacher not bitwise equal", r);
        cr_expect(memcmp(s[0], s[r], sizeof(float) * cfg.K) == 0, "run %d: cluster sizes not bitwise equal", r);
    }
    for (int r = 0; r < 3; r++) { free(p[r]); free(t[r]); free(s[r]); }
}

/* The GPU twin's activation layout differs from the CPU's in one place: a shortcut's BN output is
 * written into the first gradient buffer, which is safe only if nothing reads it after its block's
 * residual add. Run with that layout on the CPU, the same steps must give bitwise the same result. */
Test(determinism, device_activation_layout_gives_the_same_steps, .timeout = 120) {
    ExcbConfig cfg;
    small_config(&cfg);                     /* resnet20s: shortcuts in stages 2 and 3             */
    ExcbModel probe;
    cr_assert(excb_build(&probe, &cfg) == 0);
    size_t np = probe.n_params;
    excb_free(&probe);
    enum { STEPS = 3 };
    float *p[2], *t[2], *s[2];
    double l[2][STEPS];
    for (int r = 0; r < 2; r++) run_steps(&cfg, 2, STEPS, &p[r], &t[r], &s[r], l[r], r);
    cr_expect(memcmp(l[0], l[1], sizeof l[0]) == 0, "losses differ: %.9g vs %.9g", l[0][STEPS - 1], l[1][STEPS - 1]);
    cr_expect(memcmp(p[0], p[1], sizeof(float) * np) == 0, "parameters not bitwise equal");
    cr_expect(memcmp(t[0], t[1], sizeof(float) * np) == 0, "teacher not bitwise equal");
    cr_expect(memcmp(s[0], s[1], sizeof(float) * cfg.K) == 0, "cluster sizes not bitwise equal");
    for (int r = 0; r < 2; r++) { free(p[r]); free(t[r]); free(s[r]); }
}

/* ------------------------------------------------------------------------------------------------ */
/* Training signal: with the targets held fixed (teacher momentum 1 and m_s = 1, so neither the
 * teacher nor the cluster sizes move), 30 SGD steps on ONE batch must fit them: the loss falls.
 * (With the full method the targets move every step and the loss on a fixed batch is not a fixed
 * objective: it dips and rises again, which is why the fixed-target version is the check.)
 * Measured: 6.018 -> 3.010 (mean of the last 3 steps); the bound asks for a drop of over 30 %. */
Test(training, loss_goes_down_on_a_fixed_batch, .timeout = 120) {
    ExcbConfig cfg;
    excb_config_named(&cfg, "tiny");
    cfg.batch = 16;
    cfg.K = 32;
    cfg.lr_peak = 0.1;
    cfg.total_steps = 1000;
    cfg.warmup_steps = 2;
    cfg.ema_start = 1.0;
    cfg.excb.m_s = 1.0;
    cfg.seed = 11;
    ExcbModel m;
    cr_assert(excb_build(&m, &cfg) == 0);
    float *xg, *xl;
    make_inputs(&cfg, 1, &xg, &xl);
    enum { STEPS = 30 };
    double loss[STEPS];
    for (int t = 0; t < STEPS; t++) {
        ExcbStepStats st;
        cr_assert(excb_step(&m, xg, xl, &st) == 0, "step %d diverged", t);
        loss[t] = st.loss;
    }
    double last = (loss[STEPS - 3] + loss[STEPS - 2] + loss[STEPS - 1]) / 3;
    printf("fixed batch, fixed targets: loss %.4f (step 1) -> %.4f (mean of steps %d-%d)\n", loss[0], last,
           STEPS - 2, STEPS);
    cr_expect(last < 0.7 * loss[0], "loss %.4f -> %.4f: not a 30 %% drop", loss[0], last);
    free(xg);
    free(xl);
    excb_free(&m);
}

/* After one step: s follows E3 from the step's own labels, and the teacher follows E9, exactly. */
Test(training, size_estimate_and_ema_follow_their_formulas, .timeout = 120) {
    ExcbConfig cfg;
    small_config(&cfg);
    ExcbModel m;
    cr_assert(excb_build(&m, &cfg) == 0);
    float *xg, *xl;
    make_inputs(&cfg, 1, &xg, &xl);
    ExcbStepStats st;
    cr_assert(excb_step(&m, xg, xl, &st) == 0);       /* a first step so that s is not uniform  */
    float *s0 = malloc(sizeof(float) * cfg.K), *t0 = malloc(sizeof(float) * m.n_params);
    const float *sizes = excb_method_buffer(&m, "cluster_sizes");
    memcpy(s0, sizes, sizeof(float) * cfg.K);
    memcpy(t0, m.teacher, sizeof(float) * m.n_params);
    long step0 = m.step;
    cr_assert(excb_step(&m, xg, xl, &st) == 0);
    int NG = cfg.n_global * cfg.batch, *cnt = calloc(cfg.K, sizeof(int));
    for (int i = 0; i < NG; i++) cnt[m.labels[i]]++;
    int bad = 0, uniq = 0;
    for (int k = 0; k < cfg.K; k++) {
        /* E3 with the float16 term (A4): s = s*0.999f + fp16(fp16(count/NG) * fp16(0.001)) */
        float term = excb_round_fp16(excb_round_fp16((float)cnt[k] / (float)NG) * excb_round_fp16(0.001f));
        bad += sizes[k] != s0[k] * 0.999f + term;
        uniq += cnt[k] > 0;
    }
    cr_expect(bad == 0, "%d of %d cluster sizes differ from E3", bad, cfg.K);
    cr_expect(st.unique_labels == uniq && st.empty_clusters == cfg.K - uniq, "A21 monitors");
    double mom = ema_momentum_at(step0, cfg.total_steps, cfg.ema_start);
    cr_expect(st.ema_m == (float)mom, "reported EMA momentum");
    float mf = (float)mom, omf = (float)(1.0 - mom);
    bad = 0;
    for (size_t i = 0; i < m.n_params; i++) {
        float tt = t0[i] * mf;                        /* E9 with PyTorch's two roundings         */
        bad += m.teacher[i] != tt + m.params[i] * omf;
    }
    cr_expect(bad == 0, "%d teacher values differ from E9", bad);
    free(cnt); free(s0); free(t0); free(xg); free(xl);
    excb_free(&m);
}

/* A NaN loss changes nothing: no update, no cluster-size step, the exit code for divergence. */
Test(training, diverged_step_leaves_the_state_intact, .timeout = 60) {
    ExcbConfig cfg;
    excb_config_named(&cfg, "tiny");
    ExcbModel m;
    cr_assert(excb_build(&m, &cfg) == 0);
    float *xg, *xl;
    make_inputs(&cfg, 1, &xg, &xl);
    xg[3] = NAN;
    float *p0 = malloc(sizeof(float) * m.n_params);
    memcpy(p0, m.params, sizeof(float) * m.n_params);
    cr_expect(excb_step(&m, xg, xl, NULL) == EXCB_EXIT_DIVERGED, "a NaN input must report divergence");
    cr_expect(memcmp(p0, m.params, sizeof(float) * m.n_params) == 0 && m.step == 0, "state changed");
    free(p0); free(xg); free(xl);
    excb_free(&m);
}
