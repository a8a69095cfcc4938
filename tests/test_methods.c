/* test_methods.c: the balancing rules of excb.c section 5 (ExCB, none, DINO, SwAV) and the pairings.
 *  - parity: one whole step of every fixture in tests/reference/methods/ (written by the independent
 *    float64 reference make_method_fixtures.py) against its float64 truth. Each fixture carries its
 *    configuration (the config text, the step, the schedule's length, the input channels), so the
 *    model is built from the fixture alone and a fixture of any shape or method is checked the same way;
 *  - each new equation against a hand-computed case (the arithmetic is in the comments);
 *  - a property per rule: Sinkhorn's row and column sums, the DINO centre's EMA, `none` equal to
 *    `excb` bit for bit at a uniform s, SwAV's queue and frozen prototypes;
 *  - the loss's term counts for either pairing.
 *
 * The parity rule. Every compared tensor has three versions: excb.c's float32 result c, the reference's
 * float64 truth t, and the same reference run in float32, p (PyTorch's own float32 error on exactly this
 * tensor, stored in the fixture). With e(x) = max_i |x_i - t_i| and S = max_i |t_i|:
 *     e(c) <= RATIO * e(p) + FLOOR * 2^-24 * S'
 * excb.c may be RATIO times less accurate than PyTorch's float32 on the same tensor, plus FLOOR units of
 * float32 rounding of the tensor's scale S'. The forward values (teacher scores, targets, activations,
 * the loss, the method's state, the teacher after its EMA): RATIO 4, FLOOR 16, S' = S. The backward
 * values (gradients, momenta and parameters after SGD), whose rounding accumulates through the whole
 * backward pass and whose summation order differs between any two implementations: RATIO 8, FLOOR 1024
 * (6e-5 of the scale), S' = max(S, 1e-3 x the model's largest gradient), so that a gradient that is 0 in
 * real arithmetic (a bias in front of a BatchNorm) is judged by the rounding of the gradients around it,
 * not by its own noise. Measured on the 18 fixtures (2026-12-02): the worst forward tensor at 0.82 of its
 * tolerance, the worst backward one at 0.44; a wrong formula is off by 1e-2 of S and more (dropping one
 * Sinkhorn iteration, swapping DINO's centre momentum, or matching a local crop's direct row to one
 * view too few each fail 4 to 7 fixtures). Labels and ExCB's cluster sizes (float32 in the official code, reproduced bit for bit) must
 * be equal; so must the balancing factors of the jitter path (A3). The fixtures' states are drawn away
 * from float32 ties (make_method_fixtures.py, "conditioning"): at a ReLU input within rounding of 0 a
 * float32 run may take the other branch, and then every gradient upstream moves by O(1).
 */
#include "testutil.h"
#include <criterion/parameterized.h>
#include <dirent.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define RATIO_FWD 4.0
#define FLOOR_FWD 16.0
#define RATIO_BWD 8.0
#define FLOOR_BWD 1024.0
#define FIXTURE_DIR "tests/reference/methods"

static const FixTensor *need(const Fixture *fx, const char *fmt, const char *name) {
    char full[200];
    snprintf(full, sizeof full, fmt, name);
    const FixTensor *t = fix_get(fx, full);
    cr_assert(t != NULL, "fixture has no tensor '%s'", full);
    return t;
}

/* --- the judge: one group of tensors at a time ------------------------------------------------------ */
typedef struct {
    const char *group;
    int backward;                               /* 1: the backward rule (RATIO_BWD, FLOOR_BWD)         */
    double worst_c, worst_p, worst_margin;     /* the tensor closest to its tolerance                 */
    char where[96];
    int n, failed;
} Group;

static void judge(Group *g, const char *name, const float *c, const FixTensor *truth, const FixTensor *f32,
                  double scale_floor) {
    cr_assert(truth->numel == f32->numel, "%s: truth and float32 copy differ in size", name);
    double ec = 0, ep = 0, S = 0;
    for (size_t i = 0; i < truth->numel; i++) {
        double t = truth->data64[i], dc = fabs(c[i] - t), dp = fabs(f32->data64[i] - t);
        ec = dc > ec || isnan(dc) ? (isnan(dc) ? INFINITY : dc) : ec;
        ep = dp > ep ? dp : ep;
        S = fabs(t) > S ? fabs(t) : S;
    }
    double Sp = S > scale_floor ? S : scale_floor;
    double ratio = g->backward ? RATIO_BWD : RATIO_FWD, floor_ulps = g->backward ? FLOOR_BWD : FLOOR_FWD;
    double tol = ratio * ep + floor_ulps * 0x1p-24 * Sp, margin = tol > 0 ? ec / tol : (ec > 0 ? INFINITY : 0);
    if (getenv("EXCB_VERBOSE")) printf("    %-52s c %.3g  pytorch f32 %.3g  scale %.3g  (%.2f of tol)\n", name, ec, ep, S, margin);
    if (margin > g->worst_margin || !g->n) {
        g->worst_margin = margin;
        g->worst_c = ec;
        g->worst_p = ep;
        snprintf(g->where, sizeof g->where, "%s", name);
    }
    g->n++;
    if (!(ec <= tol)) {
        g->failed++;
        cr_expect(ec <= tol, "%s: excb.c error %.3g > %.0f x PyTorch float32's %.3g + %.0f ulp of %.3g", name, ec, ratio, ep,
                  floor_ulps, Sp);
    }
}

static void group_report(const char *fixture, const Group *g) {
    printf("  %-22s %-20s worst %.3g (PyTorch f32 %.3g) in %s: %.2f of its tolerance\n", fixture, g->group, g->worst_c,
           g->worst_p, g->where, g->worst_margin);
}

/* feature-major (F, ld) columns [0, N) as row-major (N, F) */
static float *transpose_fm(const float *fm, int ld, int F, int N) {
    float *t = malloc(sizeof(float) * ((size_t)F * N + 1));
    for (int n = 0; n < N; n++)
        for (int f = 0; f < F; f++) t[(size_t)n * F + f] = fm[(size_t)f * ld + n];
    return t;
}

/* --- building the model a fixture describes ------------------------------------------------------- */
static void model_from_fixture(const Fixture *fx, const char *path, int threads, ExcbModel *m) {
    ExcbRunConfig rc;
    char err[EXCB_ERR_LEN];
    cr_assert(excb_preset(&rc, "tiny", err) == 0);
    const FixTensor *text = need(fx, "%s", "config");
    cr_assert(excb_config_parse(&rc, text->bytes, path, err) == 0, "%s: %s", path, err);
    snprintf(rc.data, sizeof rc.data, "unused");
    rc.kmeans_init = 0;                                   /* not a step setting; k-means needs K samples */
    cr_assert(excb_config_validate(&rc, err) == 0, "%s: %s", path, err);
    const FixTensor *meta = need(fx, "%s", "meta");      /* step, T, W, steps per epoch, input channels */
    cr_assert(meta->numel == 5 || meta->numel == 6, "%s: meta has %zu values", path, meta->numel);
    ExcbConfig cfg = rc.model;
    snprintf(cfg.name, sizeof cfg.name, "fixture");
    cfg.total_steps = (long)meta->data64[1];
    cfg.warmup_steps = (long)meta->data64[2];
    cfg.steps_per_epoch = (long)meta->data64[3];
    cfg.in_ch = (int)meta->data64[4];
    cfg.n_images = meta->numel > 5 ? (long)meta->data64[5] : 0;   /* CoKe: the data set's size N */
    cfg.threads = threads;
    cr_assert(excb_build(m, &cfg) == 0, "%s: cannot build the model", path);
    for (int t = 0; t < m->n_tensors; t++) {              /* every model tensor comes from the fixture */
        const ExcbTensor *T = &m->tensors[t];
        const FixTensor *p = need(fx, "param.%s", T->name), *te = need(fx, "teacher.%s", T->name),
                        *mo = need(fx, "momentum.%s", T->name);
        cr_assert(p->numel == T->numel, "%s: %s has %zu values in the fixture, %zu in the model", path, T->name, p->numel,
                  T->numel);
        memcpy(m->params + T->offset, p->data, sizeof(float) * T->numel);
        memcpy(m->teacher + T->offset, te->data, sizeof(float) * T->numel);
        memcpy(m->momentum + T->offset, mo->data, sizeof(float) * T->numel);
    }
    for (int i = 0; i < m->n_mbuf; i++) {                 /* the method's state: state.NAME */
        if (!m->mbuf_spec[i].state || !m->mbuf_spec[i].floats) continue;
        const FixTensor *st = need(fx, "state.%s", m->mbuf_spec[i].name);
        cr_assert(st->numel == m->mbuf_spec[i].floats, "%s: state.%s has %zu values, the model %zu", path,
                  m->mbuf_spec[i].name, st->numel, m->mbuf_spec[i].floats);
        if (m->mbuf_spec[i].integer)                      /* CoKe's labels: integers, stored in double */
            for (size_t j = 0; j < st->numel; j++) ((int32_t *)m->mbuf[i])[j] = (int32_t)st->data64[j];
        else
            memcpy(m->mbuf[i], st->data, sizeof(float) * st->numel);
    }
    m->step = (long)meta->data64[0];
}

/* the batch's data set indices (CoKe), when the fixture has them */
static int64_t *batch_index_of(const Fixture *fx, int B) {
    const FixTensor *t = fix_get(fx, "batch_index");
    if (!t) return NULL;
    cr_assert(t->numel == (size_t)B, "batch_index has %zu values for B = %d", t->numel, B);
    int64_t *idx = malloc(sizeof(int64_t) * B);
    for (int i = 0; i < B; i++) idx[i] = (int64_t)t->data64[i];
    return idx;
}

/* an integer-valued tensor (labels, targets, the partition) equal to the fixture's, value for value */
static void expect_ints(const char *fname, const char *what, const int32_t *c, const FixTensor *truth) {
    int bad = 0;
    for (size_t i = 0; i < truth->numel; i++) bad += c[i] != (int32_t)truth->data64[i];
    cr_expect(bad == 0, "%s: %d of %zu values of %s differ", fname, bad, truth->numel, what);
}

/* --- one step of a fixture, every tensor judged ----------------------------------------------------- */
static void method_parity(const char *path) {
    Fixture fx;
    cr_assert(fixture_load(&fx, path) == 0, "cannot read fixture %s (regenerate: make method-fixtures)", path);
    const char *base = strrchr(path, '/') ? strrchr(path, '/') + 1 : path;
    char fname[64];
    snprintf(fname, sizeof fname, "%.*s", (int)(strcspn(base, ".")), base);
    ExcbModel m;
    model_from_fixture(&fx, path, 2, &m);
    const ExcbConfig *c = &m.cfg;
    int B = c->batch, NS = (c->n_global + c->n_local) * B, K = m.n_protos, d = c->d;
    int n_dir = m.n_dir_crops * B;
    int64_t *batch_index = batch_index_of(&fx, B);
    m.batch_index = batch_index;
    ExcbStepStats st;
    double loss = excb_forward_loss(&m, need(&fx, "%s", "x_global")->data, need(&fx, "%s", "x_local")->data, &st);
    /* the teacher and its targets: what the fixture's method has (a student-only method: none) */
    Group gt = {.group = "teacher scores"}, gq = {.group = "targets q"}, ga = {.group = "student activations"},
          gl = {.group = "loss"};
    if (!m.method->student_only)
        judge(&gt, "teacher_sim", m.zt, need(&fx, "%s", "teacher_sim"), need(&fx, "f32.%s", "teacher_sim"), 0);
    if (m.method->targets) {
        judge(&gq, "teacher_q", m.q, need(&fx, "%s", "teacher_q"), need(&fx, "f32.%s", "teacher_q"), 0);
        expect_ints(fname, "the teacher labels", m.labels, need(&fx, "%s", "labels"));
    } else {
        cr_expect(fix_get(&fx, "teacher_q") == NULL, "%s: a method with its own loss has no targets q", fname);
    }
    if (fix_get(&fx, "partition"))                         /* CARP's R2, from (seed, step) */
        expect_ints(fname, "the partition", excb_method_buffer(&m, "partition"), fix_get(&fx, "partition"));
    if (fix_get(&fx, "targets"))                           /* CoKe's K6: last epoch's labels */
        expect_ints(fname, "the targets", excb_method_buffer(&m, "targets"), fix_get(&fx, "targets"));
    if (!strcmp(m.method->name, "excb")) {      /* A3 on the jitter path: the draws and the factors, bitwise */
        const FixTensor *jl = need(&fx, "%s", "jitter.lower"), *jh = need(&fx, "%s", "jitter.higher");
        const FixTensor *fl = need(&fx, "%s", "factors.lower"), *fh = need(&fx, "%s", "factors.higher");
        const float *lo = excb_method_buffer(&m, "lower"), *hi = excb_method_buffer(&m, "higher"),
                    *r = excb_method_buffer(&m, "r");
        int bad_draw = 0, bad_factor = 0, jittered = 0;
        for (int k = 0; k < K; k++) {
            bad_draw += excb_uniform(c->seed, EXCB_RNG_JITTER, (uint64_t)m.step, 0, k) != jl->data[k];
            bad_draw += excb_uniform(c->seed, EXCB_RNG_JITTER, (uint64_t)m.step, 1, k) != jh->data[k];
            bad_factor += lo[k] != fl->data[k] || hi[k] != fh->data[k];
            jittered += 1.0f - r[k] == 1.0f;          /* lower was exactly 0 before the jitter      */
        }
        cr_expect(bad_draw == 0, "%s: %d jitter draws differ from the fixture's", fname, bad_draw);
        cr_expect(bad_factor == 0, "%s: %d balancing factors differ", fname, bad_factor);
        if (jittered) printf("  %-22s %d cluster(s) on the A3 jitter path, factors bitwise equal\n", fname, jittered);
    }
    /* the student: features, projection, predictor, logits (recomputed from the kept u and c) */
    float *t;
    judge(&ga, "student_feat", t = transpose_fm(m.f, NS, m.D, NS), need(&fx, "%s", "student_feat"), need(&fx, "f32.%s", "student_feat"), 0);
    free(t);
    judge(&ga, "student_proj", t = transpose_fm(m.h, NS, d, NS), need(&fx, "%s", "student_proj"), need(&fx, "f32.%s", "student_proj"), 0);
    free(t);
    /* the logits, recomputed from the kept rows and c: scaled by 1/tau_s for the cross-entropy methods,
       CARP's raw scores (no temperature) for a method with its own loss */
    float *lg = malloc(sizeof(float) * ((size_t)NS * K + 1));
    float scale = m.method->loss ? 1.0f : (float)(1.0 / c->tau_s);
    if (K) {
        matmul_naive('N', 'T', n_dir, K, d, scale, m.u_dir, d, m.c, d, 0.0f, lg, K);
        judge(&ga, "logits_direct", lg, need(&fx, "%s", "logits_direct"), need(&fx, "f32.%s", "logits_direct"), 0);
    }
    if (m.with_pred) {
        judge(&ga, "student_pred", t = transpose_fm(m.cfg.predictor ? m.p : m.h, NS, d, NS), need(&fx, "%s", "student_pred"), need(&fx, "f32.%s", "student_pred"), 0);
        free(t);
        if (K) {
            matmul_naive('N', 'T', NS, K, d, scale, m.u_pred, d, m.c, d, 0.0f, lg, K);
            judge(&ga, "logits_pred", lg, need(&fx, "%s", "logits_pred"), need(&fx, "f32.%s", "logits_pred"), 0);
        }
    } else {
        cr_expect(fix_get(&fx, "logits_pred") == NULL && fix_get(&fx, "student_pred") == NULL,
                  "%s: without the predictor there are no predictor rows", fname);
    }
    free(lg);
    float lf = (float)loss;
    judge(&gl, "loss", &lf, need(&fx, "%s", "loss"), need(&fx, "f32.%s", "loss"), 0);
    /* the method's state after the loss */
    excb_update_method(&m, &st);
    Group gs = {.group = "method state"};
    for (int i = 0; i < m.n_mbuf; i++) {
        if (!m.mbuf_spec[i].state || !m.mbuf_spec[i].floats) continue;
        const char *nm = m.mbuf_spec[i].name;
        const FixTensor *truth = need(&fx, "state_after.%s", nm);
        if (!strcmp(nm, "cluster_sizes")) {     /* float32 in the official code: the same bits (A4) */
            int diff = 0;
            for (size_t k = 0; k < truth->numel; k++) diff += ((float *)m.mbuf[i])[k] != truth->data[k];
            cr_expect(diff == 0, "%s: %d cluster sizes differ from E3's float32 result", fname, diff);
        }
        char full[80];
        snprintf(full, sizeof full, "state_after.%s", nm);
        if (m.mbuf_spec[i].integer) expect_ints(fname, full, m.mbuf[i], truth);   /* labels: equal */
        else judge(&gs, full, m.mbuf[i], truth, need(&fx, "f32.state_after.%s", nm), 0);
    }
    /* backward, then SGD and the EMA */
    excb_backward(&m);
    double gmax = 0;
    for (int i = 0; i < m.n_tensors; i++) {
        const FixTensor *r = need(&fx, "grad.%s", m.tensors[i].name);
        for (size_t j = 0; j < r->numel; j++) gmax = fabs(r->data64[j]) > gmax ? fabs(r->data64[j]) : gmax;
    }
    Group gg = {.group = "gradients", .backward = 1}, gm = {.group = "momentum after", .backward = 1},
          gp = {.group = "parameters after", .backward = 1},
          gte = {.group = "teacher after"};
    for (int i = 0; i < m.n_tensors; i++) {
        const ExcbTensor *T = &m.tensors[i];
        char full[160];
        snprintf(full, sizeof full, "grad.%s", T->name);
        judge(&gg, full, m.grads + T->offset, need(&fx, "grad.%s", T->name), need(&fx, "f32.grad.%s", T->name), 1e-3 * gmax);
    }
    excb_update(&m, &st);
    for (int i = 0; i < m.n_tensors; i++) {
        const ExcbTensor *T = &m.tensors[i];
        char full[160];
        snprintf(full, sizeof full, "momentum_after.%s", T->name);
        judge(&gm, full, m.momentum + T->offset, need(&fx, "momentum_after.%s", T->name),
              need(&fx, "f32.momentum_after.%s", T->name), 1e-3 * gmax);
        snprintf(full, sizeof full, "param_after.%s", T->name);
        judge(&gp, full, m.params + T->offset, need(&fx, "param_after.%s", T->name), need(&fx, "f32.param_after.%s", T->name),
              1e-3 * gmax);
        snprintf(full, sizeof full, "teacher_after.%s", T->name);
        judge(&gte, full, m.teacher + T->offset, need(&fx, "teacher_after.%s", T->name),
              need(&fx, "f32.teacher_after.%s", T->name), 0);
    }
    printf("%s (%s, pairing %s, K=%d, B=%d, Vg=%d, Vl=%d):\n", fname, m.method->name,
           m.pairing == EXCB_PAIRING_EXCB ? "excb" : "swapped", K, B, c->n_global, c->n_local);
    const Group *all[] = {&gt, &gq, &ga, &gl, &gs, &gg, &gm, &gp, &gte};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++)
        if (all[i]->n) group_report(fname, all[i]);
    excb_free(&m);
    fixture_free(&fx);
    free(batch_index);
}

/* the fixtures, found at run time: a new one is checked without editing this file */
typedef struct { char path[200]; } FixturePath;

static int list_fixtures(FixturePath *out, int cap) {
    DIR *dir = opendir(FIXTURE_DIR);
    int n = 0;
    struct dirent *e;
    while (dir && (e = readdir(dir))) {
        size_t len = strlen(e->d_name);
        if (len > 4 && !strcmp(e->d_name + len - 4, ".bin") && n < cap)
            snprintf(out[n++].path, sizeof out[0].path, "%s/%s", FIXTURE_DIR, e->d_name);
    }
    if (dir) closedir(dir);
    return n;
}

static void free_paths(struct criterion_test_params *p) { cr_free(p->params); }

ParameterizedTestParameters(parity, method_fixture) {
    FixturePath *paths = cr_malloc(sizeof(FixturePath) * 64);
    int n = list_fixtures(paths, 64);
    const char *only = getenv("EXCB_FIXTURE");           /* EXCB_FIXTURE=dino_tiny: that one alone */
    for (int i = 0; only && i < n; i++)
        if (strstr(paths[i].path, only)) { paths[0] = paths[i]; n = 1; break; }
    return cr_make_param_array(FixturePath, paths, n, free_paths);
}

ParameterizedTest(FixturePath *fp, parity, method_fixture, .timeout = 120) {
    method_parity(fp->path);
}

/* The fixtures are there, for every method, and cover what the parity rule has to hold across:
   K not a power of two, an odd B, no local crops, a four-stage Bottleneck net, both pairings. A missing
   directory would otherwise pass the parameterized test above with no test at all. */
Test(parity, every_method_has_its_fixtures) {
    FixturePath paths[64];
    int n = list_fixtures(paths, 64);
    cr_assert(n >= 32, "%d fixtures in %s (32 expected: make method-fixtures)", n, FIXTURE_DIR);
    static const char *want[] = {
        "excb_tiny", "excb_odd", "excb_nolocal", "excb_bottleneck4", "none_tiny", "none_odd", "none_nolocal",
        "none_bottleneck4", "dino_tiny", "dino_odd", "dino_nolocal", "dino_bottleneck4", "swav_tiny", "swav_odd",
        "swav_nolocal", "swav_bottleneck4",
        /* the audit switches away from the official code's choices (paper_notes.md §10) */
        "excb_switches_a", "excb_switches_b", "none_switches",
        /* make_more_method_fixtures.py: three global views, a single view, an epoch's start */
        "carp_tiny", "carp_odd", "carp_nolocal", "carp_vg3", "coke_tiny", "coke_boundary", "coke_later", "coke_single",
        "mvbt_tiny", "mvbt_two", "mvbt_vg3"};
    for (size_t i = 0; i < sizeof want / sizeof want[0]; i++) {
        char path[200];
        snprintf(path, sizeof path, "%s/%s.bin", FIXTURE_DIR, want[i]);
        int found = 0;
        for (int k = 0; k < n; k++) found |= !strcmp(paths[k].path, path);
        cr_expect(found, "no fixture %s", path);
    }
}

/* ------------------------------------------------------------------------------------------------ */
/* The pairings' term counts (section 6): |M| = (global direct rows)(Vg - 1) + (local direct rows) Vg
   + (predictor rows) Vg. ExCB's A7: 2*1 + 0 + 8*2 = 18; without local crops 2*1 + 2*2 = 6; swapped
   (DINO, SwAV): 2*1 + 6*2 = 14; swapped without local crops: 2*1 = 2. */
Test(pairing, term_counts) {
    cr_expect_eq(excb_loss_terms(2, 1, 2, 6), 18);
    cr_expect_eq(excb_loss_terms(2, 1, 2, 0), 6);
    cr_expect_eq(excb_loss_terms(8, 0, 2, 6), 14);
    cr_expect_eq(excb_loss_terms(2, 0, 2, 0), 2);
}

/* The swapped loss by hand: Vg = 2, Vl = 1, B = 1, K = 2, tau_s = 1, no predictor; 4 terms.
   q_0 = (1, 0), q_1 = (0, 1). Student rows z_0 = (0, 0), z_1 = (ln 3, 0), z_2 (local) = (0, ln 3).
   softmax: p_0 = (1/2, 1/2), p_1 = (3/4, 1/4), p_2 = (1/4, 3/4).
   Terms: (v0, u1) -ln 3/4 = 0.287682; (v0, u2) -ln 1/4 = 1.386294; (v1, u0) -ln 1/2 = 0.693147;
   (v1, u2) -ln 3/4 = 0.287682. Mean: 2.654806 / 4 = 0.663701.
   dL/dz for row u = (n_u p_u - sum of the matching q) / (tau_s |M| B): row 0 is matched by v1 only:
   (p_0 - q_1)/4 = (0.125, -0.125); row 2 by both views: (2 p_2 - q_0 - q_1)/4 = (-0.125, 0.125). */
Test(pairing, swapped_loss_by_hand) {
    const float l3 = logf(3.0f);
    float z[6] = {0, 0, l3, 0, 0, l3}, q[4] = {1, 0, 0, 1};
    double rows[6];
    double L = excb_loss_forward_backward(z, 3, NULL, rows, q, 2, 1, 1, 2, 1.0);
    EXPECT_NEAR(L, 0.663701, 1e-6, "swapped loss");
    EXPECT_NEAR(z[0], 0.125, 1e-7, "dL/dz row 0");
    EXPECT_NEAR(z[1], -0.125, 1e-7, "dL/dz row 0");
    EXPECT_NEAR(z[4], -0.125, 1e-7, "dL/dz row 2 (local)");
    EXPECT_NEAR(z[5], 0.125, 1e-7, "dL/dz row 2 (local)");
}

/* ------------------------------------------------------------------------------------------------ */
/* S1 by hand, one iteration, eps = 1, N = 2 samples, K = 2 prototypes, S = [[ln 3, 0], [0, 0]]:
   exp: [[3, 1], [1, 1]], / 6 -> [[1/2, 1/6], [1/6, 1/6]].
   prototype masses (over samples): 2/3 and 1/3; divide, then / K: [[3/8, 1/4], [1/8, 1/4]].
   sample masses: 5/8 and 3/8; divide, then / N: [[3/10, 1/5], [1/6, 1/3]]; times N: [[0.6, 0.4], [1/3, 2/3]]. */
Test(sinkhorn, one_iteration_by_hand) {
    float S[4] = {logf(3.0f), 0, 0, 0};
    double sums[8];
    sinkhorn_knopp(S, sums, 2, 2, 1.0, 1, NULL);
    EXPECT_NEAR(S[0], 0.6, 1e-6, "code 0,0");
    EXPECT_NEAR(S[1], 0.4, 1e-6, "code 0,1");
    EXPECT_NEAR(S[2], 1.0 / 3, 1e-6, "code 1,0");
    EXPECT_NEAR(S[3], 2.0 / 3, 1e-6, "code 1,1");
}

/* S1's property: after its iterations every sample's code sums to 1 (the last normalisation: to float32
   rounding, 1e-6) and every prototype's mass approaches N/K; the error falls with the iterations and is
   below 1e-6 of N/K after 300 (SwAV's eps = 0.05 on cosine scores). */
Test(sinkhorn, rows_and_columns_sum_to_their_shares) {
    enum { N = 37, K = 24 };
    static float S0[N * K], S[N * K];
    double sums[2 * (N + K)], prev = INFINITY;
    for (int i = 0; i < N * K; i++) S0[i] = 2.0f * excb_uniform(3, EXCB_RNG_TEST, 17, 0, i) - 1.0f;
    static const int iters[] = {3, 10, 30, 300};
    for (int t = 0; t < 4; t++) {
        memcpy(S, S0, sizeof S);
        sinkhorn_knopp(S, sums, N, K, 0.05, iters[t], NULL);
        double worst_row = 0, worst_col = 0;
        for (int n = 0; n < N; n++) {
            double r = 0;
            for (int k = 0; k < K; k++) r += S[n * K + k];
            worst_row = fmax(worst_row, fabs(r - 1));
        }
        for (int k = 0; k < K; k++) {
            double c = 0;
            for (int n = 0; n < N; n++) c += S[n * K + k];
            worst_col = fmax(worst_col, fabs(c - (double)N / K) / ((double)N / K));
        }
        printf("sinkhorn %3d iterations: |row sum - 1| <= %.2g, |prototype mass - N/K| <= %.2g of N/K\n", iters[t],
               worst_row, worst_col);
        cr_expect(worst_row <= 1e-6, "%d iterations: a sample's code sums to 1 + %.3g", iters[t], worst_row);
        cr_expect(worst_col < prev, "%d iterations: the prototype masses did not get closer to N/K", iters[t]);
        prev = worst_col;
        if (iters[t] == 300) cr_expect(worst_col <= 1e-6, "300 iterations: prototype mass off by %.3g of N/K", worst_col);
    }
    /* at the smallest epsilon the key allows, exp(S/eps) spans e^+-80: every code still finite and
       summing to 1 (a shift by the largest score alone would underflow whole prototypes to 0 here) */
    memcpy(S, S0, sizeof S);
    S[0] = 1.0f;
    S[1] = -1.0f;                                /* the full cosine range */
    sinkhorn_knopp(S, sums, N, K, 0.0125, 3, NULL);
    int bad = 0;
    for (int n = 0; n < N; n++) {
        double r = 0;
        for (int k = 0; k < K; k++) { bad += !isfinite(S[n * K + k]); r += S[n * K + k]; }
        bad += fabs(r - 1) > 1e-5;
    }
    cr_expect(bad == 0, "eps = 0.0125: %d codes not finite or not summing to 1", bad);
}

/* ------------------------------------------------------------------------------------------------ */
/* D1 by hand: z = (0.2, 0.5, 0.1), c = (0.1, 0.3, 0), tau = 0.1: (z - c)/tau = (1, 2, 1);
   softmax = (e^-1, 1, e^-1) / (1 + 2 e^-1) = (0.211942, 0.576117, 0.211942), label 1. */
Test(dino, targets_by_hand) {
    float z[3] = {0.2f, 0.5f, 0.1f}, c[3] = {0.1f, 0.3f, 0.0f}, q[3];
    int32_t lab;
    dino_targets(q, &lab, z, c, 1, 3, 0.1);
    EXPECT_NEAR(q[0], 0.211942, 1e-6, "q0");
    EXPECT_NEAR(q[1], 0.576117, 1e-6, "q1");
    EXPECT_NEAR(q[2], 0.211942, 1e-6, "q2");
    cr_expect_eq(lab, 1);
}

/* D2 by hand: c = (0.5, -0.2), rows z = (0.1, 0.3) and (0.5, -0.1): mean (0.3, 0.1);
   0.9 * 0.5 + 0.1 * 0.3 = 0.48, 0.9 * -0.2 + 0.1 * 0.1 = -0.17. */
Test(dino, centre_by_hand) {
    float c[2] = {0.5f, -0.2f}, z[4] = {0.1f, 0.3f, 0.5f, -0.1f};
    dino_center_update(c, z, 2, 2, 0.9);
    EXPECT_NEAR(c[0], 0.48, 1e-7, "c0");
    EXPECT_NEAR(c[1], -0.17, 1e-7, "c1");
}

/* D3, numpy.linspace(0.02, 0.04, 5) = 0.02, 0.025, 0.03, 0.035, 0.04 for epochs 0-4, then 0.04;
   linspace(a, b, 1) = [a]; no warm-up: 0.04 from epoch 0. 10 steps per epoch. */
Test(dino, temperature_warmup_by_hand) {
    ExcbConfig c;
    excb_config_named(&c, "tiny");
    c.steps_per_epoch = 10;
    c.tau_t = 0.04;
    c.tau_t_warmup = 0.02;
    c.tau_t_warmup_epochs = 5;
    static const double want[7] = {0.02, 0.025, 0.03, 0.035, 0.04, 0.04, 0.04};
    for (int e = 0; e < 7; e++) EXPECT_NEAR(teacher_tau_at(&c, e * 10 + 9), want[e], 1e-15, "epoch %d", e);
    c.tau_t_warmup_epochs = 1;
    EXPECT_NEAR(teacher_tau_at(&c, 3), 0.02, 0, "one warm-up epoch");
    EXPECT_NEAR(teacher_tau_at(&c, 10), 0.04, 0, "after it");
    c.tau_t_warmup_epochs = 0;
    EXPECT_NEAR(teacher_tau_at(&c, 0), 0.04, 0, "no warm-up");
}

/* ------------------------------------------------------------------------------------------------ */
/* Whole steps of a small model, for the properties that need the step's wiring. */
static void method_model(ExcbModel *m, const char *method, int K, void (*adjust)(ExcbConfig *)) {
    ExcbConfig c;
    excb_config_named(&c, "tiny");
    c.K = K;
    c.seed = 5;
    c.threads = 1;
    for (int i = 0; excb_methods[i]; i++)
        if (!strcmp(excb_methods[i]->name, method)) c.method = i;
    cr_assert_str_eq(excb_methods[c.method]->name, method);
    if (adjust) adjust(&c);
    cr_assert(excb_build(m, &c) == 0);
}

static void step_inputs(const ExcbModel *m, uint64_t stream, float **xg, float **xl) {
    const ExcbConfig *c = &m->cfg;
    size_t ng = (size_t)c->n_global * c->batch * c->in_ch * c->global_size * c->global_size;
    size_t nl = (size_t)c->n_local * c->batch * c->in_ch * c->local_size * c->local_size;
    *xg = malloc(sizeof(float) * ng);
    *xl = malloc(sizeof(float) * (nl + 1));
    fill_normal(*xg, ng, stream, 1);
    fill_normal(*xl, nl, stream + 1, 1);
}

/* D2 in the step: after each step the centre is 0.9 c + 0.1 (mean of that step's teacher scores zt),
   with zt read back from the model (its values after the step are the step's); 3 steps, bitwise. */
Test(dino, centre_follows_its_ema_in_the_step) {
    ExcbModel m;
    method_model(&m, "dino", 16, NULL);
    int NG = m.cfg.n_global * m.cfg.batch, K = m.cfg.K;
    float *ctr = excb_method_buffer(&m, "center"), before[16];
    for (int k = 0; k < K; k++) cr_expect_eq(ctr[k], 0.0f, "DINO's centre starts at 0");
    for (int t = 0; t < 3; t++) {
        float *xg, *xl;
        step_inputs(&m, 40 + 2 * t, &xg, &xl);
        memcpy(before, ctr, sizeof before);
        cr_assert(excb_step(&m, xg, xl, NULL) == 0);
        int bad = 0;
        for (int k = 0; k < K; k++) {
            double acc = 0;
            for (int n = 0; n < NG; n++) acc += m.zt[(size_t)n * K + k];
            float want = before[k] * 0.9f + (float)(acc / NG) * (float)(1.0 - 0.9);
            bad += ctr[k] != want;
        }
        cr_expect(bad == 0, "step %d: %d centre entries differ from D2", t, bad);
        free(xg); free(xl);
    }
    excb_free(&m);
}

/* `none` is ExCB with the factors at 1. At step 0 s is uniform and K = 32 is a power of two, so ExCB's
   r is exactly 1, its factors exactly 1, and the two methods give the same bits; at the next step s is
   no longer uniform and they part (which shows this check can fail). */
static void compare_bits(const ExcbModel *a, const ExcbModel *b, int *same_params, int *same_state) {
    *same_params = !memcmp(a->params, b->params, sizeof(real) * a->n_params) &&
                   !memcmp(a->teacher, b->teacher, sizeof(real) * a->n_params) &&
                   !memcmp(a->momentum, b->momentum, sizeof(real) * a->n_params);
    *same_state = !memcmp(excb_method_buffer(a, "cluster_sizes"), excb_method_buffer(b, "cluster_sizes"),
                          sizeof(real) * a->cfg.K);
}

Test(none, equals_excb_bitwise_at_a_uniform_s) {
    ExcbModel e, n;
    method_model(&e, "excb", 32, NULL);
    method_model(&n, "none", 32, NULL);
    float *xg, *xl;
    step_inputs(&e, 60, &xg, &xl);
    ExcbStepStats se, sn;
    cr_assert(excb_step(&e, xg, xl, &se) == 0 && excb_step(&n, xg, xl, &sn) == 0);
    int same_params, same_state;
    compare_bits(&e, &n, &same_params, &same_state);
    cr_expect(se.loss == sn.loss && same_params && same_state, "step 0: none and excb differ at a uniform s");
    cr_expect(!memcmp(e.q, n.q, sizeof(real) * e.cfg.n_global * e.cfg.batch * e.cfg.K), "step 0: targets differ");
    const float *s = excb_method_buffer(&e, "cluster_sizes");
    int uniform = 1;
    for (int k = 1; k < 32; k++) uniform &= s[k] == s[0];
    cr_assert(!uniform, "s is still uniform after a step: the second half of this test would prove nothing");
    cr_assert(excb_step(&e, xg, xl, &se) == 0 && excb_step(&n, xg, xl, &sn) == 0);
    cr_expect(memcmp(e.q, n.q, sizeof(real) * e.cfg.n_global * e.cfg.batch * e.cfg.K) != 0,
              "step 1: with a non-uniform s ExCB's targets should differ from none's");
    free(xg); free(xl);
    excb_free(&e);
    excb_free(&n);
}

/* S2: with a queue of 2B rows from epoch 0, the first step puts the teacher's normalised projections
   of each view at the queue's top (the rest still 0, so the queue is not in use); after the second
   it is full and the third step's Sinkhorn runs over 2B + B rows. */
static void swav_queue_of_two_batches(ExcbConfig *c) {
    c->swav.queue_length = 2 * c->batch;
    c->swav.queue_start_epoch = 0;
    c->swav.freeze_prototypes_steps = 0;
}

Test(swav, queue_fills_with_the_teacher_projections) {
    ExcbModel m;
    method_model(&m, "swav", 16, swav_queue_of_two_batches);
    int B = m.cfg.batch, d = m.cfg.d, Lq = 2 * B;
    const float *queue = excb_method_buffer(&m, "queue");
    const char *names[4];
    double values[4];
    for (int t = 0; t < 3; t++) {
        float *xg, *xl;
        step_inputs(&m, 80 + 2 * t, &xg, &xl);
        m.method->diagnostics(&m, names, values);
        cr_expect_eq(values[0], t >= 2 ? 1.0 : 0.0, "step %d: queue in use %g", t, values[0]);
        cr_assert(excb_step(&m, xg, xl, NULL) == 0);
        for (int v = 0; v < 2; v++)
            cr_expect(!memcmp(queue + (size_t)v * Lq * d, m.ut + (size_t)v * B * d, sizeof(float) * B * d),
                      "step %d: view %d's newest queue rows are not this step's teacher projections", t, v);
        float tail = 0;
        for (int j = 0; j < B * d; j++) tail = fmaxf(tail, fabsf(queue[(size_t)B * d + j]));
        if (t == 0) cr_expect_eq(tail, 0.0f, "after one step the older half is still empty");
        else cr_expect(tail > 0, "step %d: the older half holds the previous batch", t);
        free(xg); free(xl);
    }
    excb_free(&m);
}

/* S3: frozen for 2 steps, the prototypes are the re-normalised v (unit rows), their momentum stays 0;
   at the third step they move. */
static void swav_frozen_two_steps(ExcbConfig *c) { c->swav.freeze_prototypes_steps = 2; }

Test(swav, prototypes_frozen_then_trained) {
    ExcbModel m;
    method_model(&m, "swav", 16, swav_frozen_two_steps);
    const ExcbTensor *V = &m.tensors[m.centroids];
    float *v0 = malloc(sizeof(float) * V->numel);
    int K = m.cfg.K, d = m.cfg.d;
    for (int t = 0; t < 3; t++) {
        float *xg, *xl;
        step_inputs(&m, 100 + 2 * t, &xg, &xl);
        memcpy(v0, m.params + V->offset, sizeof(float) * V->numel);
        cr_assert(excb_step(&m, xg, xl, NULL) == 0);
        const float *v = m.params + V->offset, *mom = m.momentum + V->offset;
        double worst_norm = 0, moved = 0, mom_max = 0;
        for (int k = 0; k < K; k++) {
            double ss = 0, ss0 = 0;
            for (int j = 0; j < d; j++) ss0 += (double)v0[k * d + j] * v0[k * d + j];
            for (int j = 0; j < d; j++) {
                ss += (double)v[k * d + j] * v[k * d + j];
                moved = fmax(moved, fabs(v[k * d + j] - v0[k * d + j] / sqrt(ss0)));
                mom_max = fmax(mom_max, fabs(mom[k * d + j]));
            }
            worst_norm = fmax(worst_norm, fabs(sqrt(ss) - 1));
        }
        if (t < 2) {
            cr_expect(worst_norm <= 1e-6, "step %d: a frozen prototype is not the unit row (| ||v|| - 1 | = %.3g)", t, worst_norm);
            cr_expect(moved <= 1e-6 && mom_max == 0, "step %d: a frozen prototype moved by %.3g (momentum %.3g)", t, moved, mom_max);
        } else {
            cr_expect(moved > 1e-4 && mom_max > 0, "step %d: the prototypes did not train after the freeze", t);
        }
        free(xg); free(xl);
    }
    free(v0);
    excb_free(&m);
}

/* A method without a GPU twin is refused by the device twin itself, before any device work: exit 64
   naming it (or, in a build without the CUDA path, that path's own 69). Runs with or without a GPU. */
static void with_threads_and_queue(ExcbConfig *c);
Test(device, cpu_only_method_is_refused_by_the_gpu_twin) {
    for (int i = 0; excb_methods[i]; i++) {
        if (excb_methods[i]->cuda) continue;          /* dino, swav, coke, carp, mvbt */
        ExcbModel m, dm;
        method_model(&m, excb_methods[i]->name, 24, with_threads_and_queue);
        char err[EXCB_ERR_LEN] = "", want[64];
        int code = excb_cuda_attach(&dm, &m, EXCB_PRECISION_FP32, err);
        snprintf(want, sizeof want, "'%s'", excb_methods[i]->name);
        if (excb_cuda_built()) {
            cr_expect_eq(code, EXCB_EXIT_USAGE, "%s: attach returned %d: %s", want, code, err);
            cr_expect(strstr(err, want) != NULL, "the message names the method: %s", err);
        } else {
            cr_expect_eq(code, EXCB_EXIT_UNAVAILABLE);
        }
        excb_free(&m);
    }
}

/* Every key once: the general table and each method's rows together name no key twice (a new method's
   rows cannot shadow another's), and every default reads back as itself through the dump. */
Test(settings, every_key_once_and_defaults_round_trip) {
    ExcbRunConfig rc, back;
    char err[EXCB_ERR_LEN];
    cr_assert(excb_preset(&rc, "fashion-mnist", err) == 0);
    char *text = excb_config_dump(&rc, 0);
    int n = 0, dup = 0;
    char keys[256][64];
    for (char *line = strtok(text, "\n"); line; line = strtok(NULL, "\n")) {
        if (line[0] == '#') continue;
        char k[64];
        if (sscanf(line, "%63s", k) != 1) continue;
        for (int i = 0; i < n; i++) dup += !strcmp(keys[i], k);
        if (n < 256) snprintf(keys[n++], 64, "%s", k);
    }
    cr_expect(dup == 0, "%d keys appear twice in the resolved config", dup);
    cr_expect(n > 60, "only %d keys", n);
    free(text);
    text = excb_config_dump(&rc, 0);
    memset(&back, 0, sizeof back);
    cr_assert(excb_config_parse(&back, text, "dump", err) == 0, "%s", err);
    char *again = excb_config_dump(&back, 0);
    cr_expect_str_eq(again, text, "the resolved config does not read back as itself");
    free(text);
    free(again);
}

/* Determinism for every method: 3 steps with 1 and with 2 threads give the same bits (parameters,
   teacher, momentum, the method's state), with SwAV's queue in use and DINO's centre moving. */
static int g_threads = 1;
static void with_threads_and_queue(ExcbConfig *c) {
    c->threads = g_threads;
    c->swav.queue_length = c->batch;
    c->swav.queue_start_epoch = 0;
    c->swav.freeze_prototypes_steps = 1;
    c->carp.block = 8;                                 /* K = 24: three blocks                     */
    c->coke.n_heads = 2;                               /* two heads, and an epoch's start (step 2) */
    c->coke.k[0] = 24;
    c->coke.k[1] = 10;
    c->steps_per_epoch = 2;
}

Test(determinism, every_method_across_thread_counts, .timeout = 120) {
    static const char *methods[] = {"excb", "none", "dino", "swav", "coke", "carp", "mvbt"};
    for (int i = 0; i < 7; i++) {
        ExcbModel m[2];
        for (int t = 0; t < 2; t++) {
            g_threads = t + 1;
            method_model(&m[t], methods[i], 24, with_threads_and_queue);
            for (int s = 0; s < 3; s++) {
                float *xg, *xl;
                step_inputs(&m[t], 120 + 2 * s, &xg, &xl);
                cr_assert(excb_step(&m[t], xg, xl, NULL) == 0);
                free(xg); free(xl);
            }
        }
        int same = !memcmp(m[0].params, m[1].params, sizeof(real) * m[0].n_params) &&
                   !memcmp(m[0].teacher, m[1].teacher, sizeof(real) * m[0].n_params) &&
                   !memcmp(m[0].momentum, m[1].momentum, sizeof(real) * m[0].n_params) &&
                   !memcmp(m[0].mstate, m[1].mstate, sizeof(real) * m[0].mstate_floats);
        cr_expect(same, "%s: 1 and 2 threads differ", methods[i]);
        excb_free(&m[0]);
        excb_free(&m[1]);
    }
}

/* ------------------------------------------------------------------------------------------------ */
/* CoKe (excb.c 5.4). K3 by hand: K = 4, B = 4, eta = 20, gamma = 0.4, labels y = (0, 0, 0, 1), so
   n = (3, 1, 0, 0). rho -= eta n / B = 5 n: (0, 0.5, 0.1, 0) -> (-15, -4.5, 0.1, 0); += eta gamma / K
   = 2: (-13, -2.5, 2.1, 2); clamped at 0: (0, 0, 2.1, 2). The two clusters that got fewer than
   gamma B / K = 0.4 of the batch (none) rose by 2. */
Test(coke, dual_update_by_hand) {
    real rho[4] = {0, 0.5f, 0.1f, 0};
    int32_t n[4] = {3, 1, 0, 0};
    coke_dual_update(rho, n, 4, 4, 20, 0.4);
    cr_expect_eq(rho[0], 0.0f);
    cr_expect_eq(rho[1], 0.0f);
    cr_expect_float_eq(rho[2], 2.1f, 1e-6);
    cr_expect_float_eq(rho[3], 2.0f, 1e-6);
}

/* K4 by hand, d = 2. Cluster 0 had N = 1 and c = (0, 1); x_0..x_2 = (1, 0), (0, 1), (1, 1) join it:
   alpha = 1/4, c = (0, 0.25) + (2, 2)/4 = (0.5, 0.75), normalised /sqrt(0.8125): (0.5547002, 0.8320503).
   Cluster 1 had N = 0: alpha = 0, c = x_3 / 1 = (3, 4) -> (0.6, 0.8). Clusters 2, 3 get nothing and keep
   their centres and counters (N_2 = 5). */
Test(coke, centre_update_by_hand) {
    real cur[8] = {0, 1, 1, 0, 0.3f, 0.4f, -1, 0}, Nk[4] = {1, 0, 5, 0};
    int32_t n[4] = {3, 1, 0, 0}, y[4] = {0, 0, 0, 1};
    real x[8] = {1, 0, 0, 1, 1, 1, 3, 4};
    coke_centre_update(cur, Nk, n, y, x, 4, 4, 2);
    cr_expect_float_eq(cur[0], 0.5547002f, 1e-6);
    cr_expect_float_eq(cur[1], 0.8320503f, 1e-6);
    cr_expect_float_eq(cur[2], 0.6f, 1e-6);
    cr_expect_float_eq(cur[3], 0.8f, 1e-6);
    cr_expect(cur[4] == 0.3f && cur[5] == 0.4f && cur[6] == -1 && cur[7] == 0, "unassigned centres change");
    cr_expect(Nk[0] == 4 && Nk[1] == 1 && Nk[2] == 5 && Nk[3] == 0, "counters %g %g %g %g", Nk[0], Nk[1], Nk[2], Nk[3]);
}

static void coke_two_heads(ExcbConfig *c) {
    c->coke.n_heads = 2;
    c->coke.k[0] = 16;
    c->coke.k[1] = 8;
}

/* K3 in the step: over 6 steps rho stays >= 0 everywhere and rises, by exactly eta gamma / K in float32
   arithmetic, for every cluster that got no label of the batch (below the bound gamma B / K); a cluster
   that got one falls or stays at 0. The labels of the batch's images are written (K6). */
Test(coke, duals_stay_nonnegative_and_rise_below_the_bound) {
    ExcbModel m;
    method_model(&m, "coke", 16, coke_two_heads);
    const ExcbCokeConfig *k = &m.cfg.coke;
    int KS = k->k[0] + k->k[1], B = m.cfg.batch;
    real *rho = excb_method_buffer(&m, "duals"), before[24];
    const int32_t *n = excb_method_buffer(&m, "counts"), *labels = excb_method_buffer(&m, "labels"),
                  *y = excb_method_buffer(&m, "assign");
    int rose = 0;
    for (int s = 0; s < 6; s++) {
        memcpy(before, rho, sizeof(real) * KS);
        long step = m.step;
        float *xg, *xl;
        step_inputs(&m, 300 + 2 * s, &xg, &xl);
        cr_assert(excb_step(&m, xg, xl, NULL) == 0);
        free(xg); free(xl);
        for (int h = 0, off = 0; h < 2; off += k->k[h], h++)
            for (int j = 0; j < k->k[h]; j++) {
                real r = rho[off + j], b = before[off + j];
                cr_expect(r >= 0, "step %ld head %d: rho_%d = %g < 0", step, h, j, r);
                if (n[off + j] == 0) {          /* below the bound: rho + eta gamma / K, never clamped */
                    real up = b + (real)k->eta * (real)(k->gamma / k->k[h]);
                    cr_expect(r == up, "step %ld head %d: rho_%d %g -> %g, not %g", step, h, j, b, r, up);
                    rose++;
                } else {
                    cr_expect(r <= b, "step %ld head %d: rho_%d rose from %g to %g with %d labels", step, h, j, b, r, n[off + j]);
                }
            }
        long N = m.cfg.n_images > 0 ? m.cfg.n_images : (long)B * m.cfg.steps_per_epoch;
        for (int i = 0; i < B; i++)
            cr_expect_eq(labels[(step * B + i) % N], y[i], "image %ld keeps its new label", (step * B + i) % N);
    }
    cr_expect(rose > 0, "no cluster was below the bound");
    excb_free(&m);
}

/* ------------------------------------------------------------------------------------------------ */
/* CARP (excb.c 5.5). R2: a permutation (every prototype in exactly one block), a pure function of
   (seed, step): the same pair gives the same partition, another step another one; the step uses it. */
Test(carp, partition_is_a_permutation_fixed_by_seed_and_step) {
    enum { K = 512 };
    int32_t a[K], b[K], c2[K];
    for (long step = 0; step < 20; step++) {
        carp_partition(a, K, 7, step);
        carp_partition(b, K, 7, step);
        carp_partition(c2, K, 7, step + 1);
        int seen[K] = {0}, moved = 0;
        for (int k = 0; k < K; k++) { cr_assert(a[k] >= 0 && a[k] < K); seen[a[k]]++; moved += a[k] != k; }
        for (int k = 0; k < K; k++) cr_expect_eq(seen[k], 1, "step %ld: prototype %d in %d blocks", step, k, seen[k]);
        cr_expect(!memcmp(a, b, sizeof a), "step %ld: the same (seed, step), another partition", step);
        cr_expect(memcmp(a, c2, sizeof a), "steps %ld and %ld: the same partition", step, step + 1);
        cr_expect(moved > K / 2, "step %ld: only %d prototypes moved", step, moved);
    }
}

static void carp_blocks_of_8(ExcbConfig *c) { c->carp.block = 8; }

Test(carp, the_step_uses_the_partition_of_its_step) {
    ExcbModel m;
    method_model(&m, "carp", 24, carp_blocks_of_8);
    float *xg, *xl;
    step_inputs(&m, 400, &xg, &xl);
    m.step = 17;
    cr_assert(excb_step(&m, xg, xl, NULL) == 0);
    int32_t want[24];
    carp_partition(want, 24, m.cfg.seed, 17);
    cr_expect(!memcmp(want, excb_method_buffer(&m, "partition"), sizeof want), "step 17 used another partition");
    free(xg); free(xl);
    excb_free(&m);
}

/* R3-R5 by hand: K = 2 in one block, B = 1, two crops (the two global views, no local ones).
   Student rows z = (0, 0): p = (1/2, 1/2); teacher rows (ln 3, 0): q = (3/4, 1/4).
   R4: the pairs (crop 0, view 1) and (crop 1, view 0) both give <p, q> = 1/2: L_c = ln 2.
   R5: pbar over the 4 rows = (0.625, 0.375): L_h = ln 2 + 0.625 ln 0.625 + 0.375 ln 0.375 = 0.0315839424.
   dL/dz of crop 0: g = -q / <p,q> / (pairs N_P B = 2) + (ln pbar + 1) / (N_P * 4 rows)
                      = (-0.75 + 0.1324991, -0.25 + 0.0047927) = (-0.6175009, -0.2452073),
   dz = p (g - <p, g>) = (-0.0930734, +0.0930734); crop 1 the same. */
Test(carp, loss_and_gradient_by_hand) {
    real z[4] = {0, 0, 0, 0}, zt[4] = {(real)log(3.0), 0, (real)log(3.0), 0}, q[4], g[4];
    double pbar[2], row_loss[2];
    int32_t perm[2] = {0, 1};
    double L = carp_loss_forward_backward(z, q, zt, g, pbar, row_loss, perm, 2, 2, 1, 2, 2, NULL);
    cr_expect(fabs(L - (log(2.0) + 0.031583942401963216)) < 1e-6, "L = %.9g", L);
    for (int r = 0; r < 2; r++) {
        cr_expect_float_eq(z[2 * r], -0.0930734f, 1e-6);
        cr_expect_float_eq(z[2 * r + 1], 0.0930734f, 1e-6);
    }
    cr_expect_float_eq(q[0], 0.75f, 1e-7);
}

/* the blocks are the partition's: with K = 4 in blocks {3, 0} and {1, 2}, raising the score of
   prototype 1 moves probability from 2 only, never from 0 or 3 (their block's softmax is apart) */
Test(carp, each_block_is_its_own_softmax) {
    real z[4 * 2] = {0}, zt[4 * 2] = {0}, q[8], g[8];
    double pbar[4], row_loss[2];
    int32_t perm[4] = {3, 0, 1, 2};
    z[1] = 2.0f;                                 /* crop 0, prototype 1 */
    carp_loss_forward_backward(z, q, zt, g, pbar, row_loss, perm, 2, 2, 1, 4, 2, NULL);
    /* dL/dz sums to 0 inside each block (a softmax's Jacobian), for every row */
    for (int r = 0; r < 2; r++) {
        cr_expect(fabs(z[4 * r + 3] + z[4 * r + 0]) < 1e-7, "row %d block {3,0}: %g + %g", r, z[4 * r + 3], z[4 * r]);
        cr_expect(fabs(z[4 * r + 1] + z[4 * r + 2]) < 1e-7, "row %d block {1,2}: %g + %g", r, z[4 * r + 1], z[4 * r + 2]);
    }
    cr_expect(z[0] == 0 && z[3] == 0, "block {3, 0} of crop 0 is uniform and matched by a uniform teacher: no gradient");
}

/* ------------------------------------------------------------------------------------------------ */
/* mvbt (excb.c 5.6). T1 + T2 by hand: A = 2, B = 2, d = 1, z = (1, -1 | 1, -1): mean 0, unbiased
   variance 4/3, zn = +-sqrt(3)/2; C = (3/4 + 3/4) / 2 = 0.75; L = (0.75 - 1)^2 = 0.0625. */
Test(mvbt, two_views_by_hand) {
    real z[4] = {1, -1, 1, -1}, zn[4], dzn[4], zbar[2], dzbar[2], cc[1];
    double sd[1], on[2];
    mvbt_standardise(zn, sd, z, 4, 1, NULL);
    cr_expect_float_eq(zn[0], 0.8660254f, 1e-6);
    cr_expect(fabs(sd[0] - sqrt(4.0 / 3)) < 1e-12);
    double L = mvbt_views_loss(dzn, zn, zbar, dzbar, cc, on, 2, 2, 1, 0.5, NULL);
    cr_expect(fabs(L - 0.0625) < 1e-6, "L = %.9g", L);
    /* dzn_0 = zn_1 G / B, G = 2 (0.75 - 1) = -0.5: (-0.2165064, +0.2165064) */
    cr_expect_float_eq(dzn[0], -0.2165064f, 1e-6);
    cr_expect_float_eq(dzn[1], 0.2165064f, 1e-6);
}

/* T3 with three views by hand, d = 2, B = 2, lambda = 1: views zn_a = rows (1, 0), (0, 1) for a = 0, 1 and
   (0, 1), (1, 0) for a = 2. zbar = ((2/3, 1/3), (1/3, 2/3)). on_{a,k} = (1/B) sum_i zn_{a,i,k} zbar_{i,k}:
   views 0, 1: (1 * 2/3) / 2 = 1/3 for both k; view 2: (1 * 1/3) / 2 = 1/6. Invariance:
   (1/3) [4 (1/3 - 1)^2 + 2 (1/6 - 1)^2] = (1/3) (16/9 + 25/18) = 57/54. zbar^T zbar / 2 has the
   off-diagonal (2/9 + 2/9) / 2 = 2/9, twice: 2 (2/9)^2 = 8/81. L = 57/54 + 8/81 = 187/162 = 1.1543210. */
Test(mvbt, three_views_by_hand) {
    real zn[12] = {1, 0, 0, 1, 1, 0, 0, 1, 0, 1, 1, 0}, dzn[12], zbar[4], dzbar[4], cc[4];
    double on[6];
    double L = mvbt_views_loss(dzn, zn, zbar, dzbar, cc, on, 3, 2, 2, 1.0, NULL);
    cr_expect(fabs(L - 187.0 / 162) < 1e-6, "L = %.9g, want 187/162", L);
    cr_expect(fabs(on[0] - 1.0 / 3) < 1e-7 && fabs(on[4] - 1.0 / 6) < 1e-7, "on = %g, %g", on[0], on[4]);
}

/* the property: identical standardised views whose cross-correlation is the identity give L = 0 and no
   gradient, in both forms (A = 2 and A = 3). zn rows (+-1, +-1), B = 4: zn^T zn / 4 = I. */
Test(mvbt, identical_views_with_identity_correlation_cost_nothing) {
    static const real rows[8] = {1, 1, 1, -1, -1, 1, -1, -1};
    for (int A = 2; A <= 3; A++) {
        real zn[24], dzn[24], zbar[8], dzbar[8], cc[4];
        double on[6];
        for (int a = 0; a < A; a++) memcpy(zn + a * 8, rows, sizeof rows);
        double L = mvbt_views_loss(dzn, zn, zbar, dzbar, cc, on, A, 4, 2, 0.5, NULL);
        cr_expect(L == 0, "A = %d: L = %g", A, L);
        for (int i = 0; i < A * 8; i++) cr_expect(dzn[i] == 0, "A = %d: dzn[%d] = %g", A, i, dzn[i]);
    }
}

/* T1's backward against central differences of a weighted sum (float64 accumulation of a float32 op:
   eps = 1e-2 on values of order 1; tolerance 2e-3 of the largest entry, a wrong term is O(1)) */
Test(mvbt, standardise_backward_matches_finite_differences) {
    enum { M = 7, D = 3 };
    real z[M * D], zn[M * D], w[M * D], dz[M * D];
    double sd[D];
    fill_normal(z, M * D, 501, 1);
    fill_normal(w, M * D, 502, 1);
    mvbt_standardise(zn, sd, z, M, D, NULL);
    mvbt_standardise_backward(dz, w, zn, sd, M, D, NULL);
    double worst = 0, gmax = 0;
    for (int i = 0; i < M * D; i++) gmax = fmax(gmax, fabs(dz[i]));
    for (int i = 0; i < M * D; i++) {
        real z0 = z[i];
        double f[2];
        for (int s = 0; s < 2; s++) {
            z[i] = z0 + (s ? -1e-2f : 1e-2f);
            mvbt_standardise(zn, sd, z, M, D, NULL);
            f[s] = 0;
            for (int j = 0; j < M * D; j++) f[s] += (double)w[j] * zn[j];
        }
        z[i] = z0;
        worst = fmax(worst, fabs((f[0] - f[1]) / 2e-2 - dz[i]) / gmax);
    }
    cr_expect(worst < 2e-3, "worst %.3g of the largest entry", worst);
}

/* ------------------------------------------------------------------------------------------------ */
/* The audit switches (paper_notes.md §10): each changes what it says and nothing else. One step of the
   same model from the same state and inputs, with the switch at the official code's choice and away
   from it; each quantity after the step is expected bitwise the Same, Different, or not looked at (-):
     zt  the teacher's scores        q   the targets            loss
     gc  the centroid gradient       go  every other gradient
     pc  the centroids after SGD     po  every other parameter after SGD
     st  the cluster-size estimate s after E3
   s starts non-uniform (a fixed random histogram), so that balancing, and what is counted, matter at
   this step. The parity fixtures excb_switches_a/_b and none_switches check the switched values
   themselves against the independent reference; this test checks what each switch leaves alone. */
static void sw_boost(ExcbConfig *c) { c->excb.boost = 0; }
static void sw_clamp(ExcbConfig *c) { c->excb.clamp = 0.5; }      /* 1e6 (off) changes nothing at init  */
static void sw_raw(ExcbConfig *c) { c->excb.count_source = EXCB_COUNT_RAW; }
static void sw_soft(ExcbConfig *c) { c->excb.count_kind = EXCB_COUNT_SOFT; }
static void sw_fp32(ExcbConfig *c) { c->excb.fp16_count_term = 0; }
static void sw_pairing(ExcbConfig *c) { c->pairing = EXCB_PAIRING_SWAPPED; }
static void sw_no_pred(ExcbConfig *c) { c->predictor = 0; }
static void sw_pred_grad(ExcbConfig *c) { c->predictor_centroid_grad = 1; }
static void sw_wd(ExcbConfig *c) { c->centroid_wd_boost = 0; }
static void sw_tau(ExcbConfig *c) { c->tau_t_warmup = 0.02; c->tau_t_warmup_epochs = 1; }
static void sw_lr(ExcbConfig *c) { c->lr_scaling = EXCB_LR_LINEAR; }
static void sw_steps(ExcbConfig *c) { c->total_steps = 100; c->warmup_steps = 10; c->steps_per_epoch = 10; }

Test(audit_switches, each_changes_what_it_says_and_nothing_else) {
    static const struct { const char *name; void (*set)(ExcbConfig *); const char *want; } sw[] = {
        /*                                  zt q loss gc go pc po st */
        {"A1 boost = 0", sw_boost,          "S D D D D D D -"},   /* the argmax moves only below 0 */
        {"A2 clamp = 0.5", sw_clamp,        "S D D D D D D D"},
        {"A4 count_source = raw", sw_raw,   "S S S S S S S D"},
        {"A4 count_kind = soft", sw_soft,   "S S S S S S S D"},
        {"A4 fp16_count_term = 0", sw_fp32, "S S S S S S S D"},
        {"A7 pairing = swapped", sw_pairing,"S S D D D D D S"},
        {"A8/A9 predictor = 0", sw_no_pred, "S S D S D S D S"},   /* A9: the centroids never see it */
        {"A9 predictor_centroid_grad = 1", sw_pred_grad, "S S S D S D S S"},
        {"A10 centroid_wd_boost = 0", sw_wd,"S S S S S D S S"},
        {"A18 tau_t warm-up", sw_tau,       "S D D D D D D S"},   /* a temperature keeps each argmax */
        {"A19 lr_scaling = linear", sw_lr,  "S S S S S D D S"},
    };
    float *xg = NULL, *xl = NULL;
    for (size_t i = 0; i < sizeof sw / sizeof sw[0]; i++) {
        ExcbModel a, b;
        method_model(&a, "excb", 32, sw_steps);
        ExcbConfig c = a.cfg;
        sw[i].set(&c);
        cr_assert(excb_build(&b, &c) == 0, "%s: cannot build", sw[i].name);
        if (!xg) step_inputs(&a, 90, &xg, &xl);
        float hist[32];
        fill_normal(hist, 32, 91, 1);
        double sum = 0;
        for (int k = 0; k < 32; k++) sum += hist[k] = fabsf(hist[k]) + 0.05f;
        for (int k = 0; k < 32; k++) hist[k] = (float)(hist[k] / sum);
        memcpy(excb_method_buffer(&a, "cluster_sizes"), hist, sizeof hist);
        memcpy(excb_method_buffer(&b, "cluster_sizes"), hist, sizeof hist);
        ExcbStepStats sa, sb;
        cr_assert(excb_step(&a, xg, xl, &sa) == 0 && excb_step(&b, xg, xl, &sb) == 0, "%s: step", sw[i].name);
        int NG = a.cfg.n_global * a.cfg.batch, K = a.cfg.K;
        const ExcbTensor *ct = &a.tensors[a.centroids];
        size_t c0 = ct->offset, c1 = ct->offset + ct->numel, n = a.n_params;
        #define SAME_RANGE(x, y, lo, hi) (!memcmp((x) + (lo), (y) + (lo), sizeof(real) * ((hi) - (lo))))
        int same[8] = {
            !memcmp(a.zt, b.zt, sizeof(real) * NG * K),
            !memcmp(a.q, b.q, sizeof(real) * NG * K),
            sa.loss == sb.loss,
            SAME_RANGE(a.grads, b.grads, c0, c1),
            SAME_RANGE(a.grads, b.grads, 0, c0) && SAME_RANGE(a.grads, b.grads, c1, n),
            SAME_RANGE(a.params, b.params, c0, c1),
            SAME_RANGE(a.params, b.params, 0, c0) && SAME_RANGE(a.params, b.params, c1, n),
            !memcmp(excb_method_buffer(&a, "cluster_sizes"), excb_method_buffer(&b, "cluster_sizes"), sizeof hist),
        };
        #undef SAME_RANGE
        static const char *what[8] = {"teacher scores", "targets", "loss", "centroid gradient", "other gradients",
                                      "centroids after", "other parameters after", "cluster sizes after"};
        for (int j = 0; j < 8; j++) {
            char w = sw[i].want[2 * j];
            if (w == '-') continue;
            cr_expect(same[j] == (w == 'S'), "%s: the %s should be %s, %s", sw[i].name, what[j],
                      w == 'S' ? "bitwise the same" : "different", same[j] ? "they are the same" : "they differ");
        }
        excb_free(&a);
        excb_free(&b);
    }
    free(xg); free(xl);
}

/* A11's switch: crop_scales = dino fixes the split of the area at 0.4 (DINO's (0.4, 1) global and
   (0.05, 0.4) local crops), where the schedule's s_min(0) is 0.26. 2,000 draws of each kind: every
   crop's area fraction is inside its range (up to the rounding of its sides), and some global crop
   of the schedule is below 0.4, which the switch forbids (so the check can fail). */
Test(audit_switches, dino_crop_scales_bound_every_crop) {
    ExcbViewConfig vc;
    excb_view_config_default(&vc, EXCB_BLUR_AS_RUN);
    int H = 224, W = 224, below = 0, bad = 0;
    for (int fixed = 0; fixed < 2; fixed++) {
        vc.fixed_scale_split = fixed ? 0.4 : 0;
        for (long i = 0; i < 2000; i++)
            for (int v = 0; v < 3; v++) {                    /* global 0, global 1, a local view */
                ExcbViewParams p;
                excb_view_params(&vc, 0, i, v == 2 ? vc.n_global : v, H, W, &p);
                double frac = (double)p.h * p.w / (H * W), slack = 2.0 * (p.h + p.w) / (H * W);
                if (!fixed) { below += v < 2 && frac < 0.4 - slack; continue; }
                if (v < 2) bad += frac < 0.4 - slack;
                else bad += frac > 0.4 + slack || frac < 0.05 - slack;
            }
    }
    cr_expect(below > 100, "the schedule's global crops below 0.4: %d of 4000 (expected many at s_min = 0.26)", below);
    cr_expect(bad == 0, "%d crops outside DINO's scales with crop_scales = dino", bad);
}

/* A19 and A18's schedules by hand: lr 0.6 at B = 64 of 1024 is 0.0375 (linear), 0.15 (sqrt), 0.6 (none);
   the temperature's warm-up is section 7's teacher_tau_at, which DINO's test above checks value by value */
Test(audit_switches, lr_scaling_by_hand) {
    ExcbConfig c;
    excb_config_named(&c, "tiny");
    c.lr_peak = 0.6; c.batch = 64; c.lr_base_batch = 1024;
    c.lr_scaling = EXCB_LR_NONE;   EXPECT_NEAR(lr_peak_for(&c), 0.6, 0, "none");
    c.lr_scaling = EXCB_LR_LINEAR; EXPECT_NEAR(lr_peak_for(&c), 0.0375, 1e-15, "linear: 0.6 * 64 / 1024");
    c.lr_scaling = EXCB_LR_SQRT;   EXPECT_NEAR(lr_peak_for(&c), 0.15, 1e-15, "sqrt: 0.6 * sqrt(1/16)");
}
