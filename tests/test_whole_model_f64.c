/* test_whole_model_f64.c: finite differences of the WHOLE student network, on the float64 build of
 * excb.c (compiled with -DEXCB_REAL_DOUBLE: the same source, real = double, naive GEMM).
 *
 * L(theta_S) = excb_forward_loss is a plain function of the student parameters: the teacher's
 * targets depend only on the teacher and on s, which the forward does not change. So the analytic
 * gradient of excb_backward must equal central differences through everything at once: stem,
 * residual adds, identity and conv shortcuts, max-pool (tiny50), the heads and the loss.
 * The centroids are left out here on purpose: the predictor sees them detached (A9), so the full
 * loss's derivative w.r.t. v is NOT what the step applies; tests/test_gradients.c checks that
 * routing exactly (and shows that its check fails without the stop-gradient).
 *
 * Precision: in float64 the loss (~3-7) carries ~1e-15 of rounding noise. Per entry, eps = 1e-6:
 * noise/eps ~ 1e-9, truncation eps^2 ~ 1e-12. A ReLU or max-pool switch inside +-eps would show up
 * as an error of ~1e-2: the fixture state keeps every checked entry clear of one (deterministic).
 * Tolerance: 1e-6 of the tensor's largest gradient entry; a wrong term gives 1e-2 and more.
 * The swapped pairing (DINO's and SwAV's: every crop's direct row, no predictor) is checked the same way
 * on the method fixtures of tests/reference/methods, built from the configuration they carry; there
 * the centroids are checked too, since every row that scores them sends them its gradient. */
#include "testutil.h"

static void load(ExcbModel *m, const Fixture *fx, const char *prefix, real *dst) {
    char nm[160];
    for (int t = 0; t < m->n_tensors; t++) {
        snprintf(nm, sizeof nm, "%s%s", prefix, m->tensors[t].name);
        const FixTensor *f = fix_get(fx, nm);
        cr_assert(f != NULL, "fixture lacks %s", nm);
        for (size_t i = 0; i < f->numel; i++) dst[m->tensors[t].offset + i] = f->data[i];
    }
}

static real *to_real(const FixTensor *f) {
    real *r = malloc(sizeof(real) * f->numel);
    for (size_t i = 0; i < f->numel; i++) r[i] = f->data[i];
    return r;
}

/* the model a method fixture describes (its config text and meta), with its state */
static void build_from_method_fixture(ExcbModel *m, const Fixture *fx, const char *path) {
    ExcbRunConfig rc;
    char err[EXCB_ERR_LEN];
    cr_assert(excb_preset(&rc, "tiny", err) == 0);
    const FixTensor *text = fix_get(fx, "config"), *meta = fix_get(fx, "meta");
    cr_assert(text && meta, "%s: no config or meta", path);
    cr_assert(excb_config_parse(&rc, text->bytes, path, err) == 0, "%s: %s", path, err);
    snprintf(rc.data, sizeof rc.data, "unused");
    rc.kmeans_init = 0;
    cr_assert(excb_config_validate(&rc, err) == 0, "%s: %s", path, err);
    ExcbConfig cfg = rc.model;
    cfg.total_steps = (long)meta->data64[1];
    cfg.warmup_steps = (long)meta->data64[2];
    cfg.steps_per_epoch = (long)meta->data64[3];
    cfg.in_ch = (int)meta->data64[4];
    cfg.n_images = meta->numel > 5 ? (long)meta->data64[5] : 0;     /* CoKe's labels */
    cr_assert(excb_build(m, &cfg) == 0);
    for (int i = 0; i < m->n_mbuf; i++) {
        if (!m->mbuf_spec[i].state || !m->mbuf_spec[i].floats) continue;
        char nm[96];
        snprintf(nm, sizeof nm, "state.%s", m->mbuf_spec[i].name);
        const FixTensor *st = fix_get(fx, nm);
        cr_assert(st && st->numel == m->mbuf_spec[i].floats, "%s: %s", path, nm);
        for (size_t j = 0; j < st->numel; j++)
            if (m->mbuf_spec[i].integer) ((int32_t *)m->mbuf[i])[j] = (int32_t)st->data64[j];
            else ((real *)m->mbuf[i])[j] = st->data[j];
    }
    m->step = (long)meta->data64[0];
    const FixTensor *bi = fix_get(fx, "batch_index");          /* CoKe: the batch's images */
    if (bi) {
        static int64_t idx[64];
        cr_assert(bi->numel <= 64);
        for (size_t i = 0; i < bi->numel; i++) idx[i] = (int64_t)bi->data64[i];
        m->batch_index = idx;
    }
}

static void whole_model(const char *config, const char *path) {
    cr_assert(sizeof(real) == 8, "this suite must be built with -DEXCB_REAL_DOUBLE");
    Fixture fx;
    cr_assert(fixture_load(&fx, path) == 0, "cannot read %s", path);
    ExcbModel m;
    if (config) {
        ExcbConfig cfg;
        excb_config_named(&cfg, config);
        cr_assert(excb_build(&m, &cfg) == 0);
        const FixTensor *s = fix_get(&fx, "s_before");
        real *sizes = excb_method_buffer(&m, "cluster_sizes");
        for (int k = 0; k < cfg.K; k++) sizes[k] = s->data[k];
    } else {
        build_from_method_fixture(&m, &fx, path);
    }
    load(&m, &fx, "param.", m.params);
    load(&m, &fx, "teacher.", m.teacher);
    real *before = malloc(sizeof(real) * m.n_params);
    memcpy(before, m.params, sizeof(real) * m.n_params);
    int check_centroids = m.pairing == EXCB_PAIRING_SWAPPED;    /* no detached scoring of them */
    real *xg = to_real(fix_get(&fx, "x_global")), *xl = to_real(fix_get(&fx, "x_local"));
    excb_forward_loss(&m, xg, xl, NULL);
    /* the loss must be a plain function of the parameters: a method whose forward changes them (SwAV's
       re-normalised prototypes) cannot be differenced entry by entry; CoKe's epoch-start copy of its
       centres changes state only, the same way at every call */
    cr_assert(!memcmp(before, m.params, sizeof(real) * m.n_params), "%s: the forward pass changed the parameters", path);
    free(before);
    excb_backward(&m);
    real *g = malloc(sizeof(real) * m.n_params);
    memcpy(g, m.grads, sizeof(real) * m.n_params);
    double worst = 0, gall = 0;
    const char *worst_name = "";
    int checked = 0;
    for (size_t i = 0; i < m.n_params; i++) gall = fabs(g[i]) > gall ? fabs(g[i]) : gall;
    for (int t = 0; t < m.n_tensors; t++) {
        if (t == m.centroids && !check_centroids) continue;
        const ExcbTensor *T = &m.tensors[t];
        /* judged against the tensor's largest entry, or 1e-3 of the model's for the four gradients
           that are exactly 0 (a bias feeding Linear -> BatchNorm): there both sides must be ~0 */
        double gmax = 1e-3 * gall;
        for (size_t i = 0; i < T->numel; i++) gmax = fabs(g[T->offset + i]) > gmax ? fabs(g[T->offset + i]) : gmax;
        size_t n_check = T->numel < 6 ? T->numel : 6;
        for (size_t c = 0; c < n_check; c++) {
            size_t i = T->offset + (T->numel <= 6 ? c : (size_t)(excb_hash(4, 4, t, 0, c) % T->numel));
            const double eps = 1e-6;
            real p0 = m.params[i];
            m.params[i] = p0 + eps;
            double lp = excb_forward_loss(&m, xg, xl, NULL);
            m.params[i] = p0 - eps;
            double lm = excb_forward_loss(&m, xg, xl, NULL);
            m.params[i] = p0;
            double e = fabs((lp - lm) / (2 * eps) - g[i]) / gmax;
            if (e > worst) { worst = e; worst_name = T->name; }
            checked++;
        }
    }
    printf("%s (float64): %d entries of %d tensors, worst error %.2e (%s)\n", config ? config : path, checked,
           m.n_tensors - !check_centroids, worst, worst_name);
    cr_expect(worst <= 1e-6, "whole-model finite differences: %.3g > 1e-6 in %s", worst, worst_name);
    free(g); free(xg); free(xl);
    excb_free(&m);
    fixture_free(&fx);
}

Test(whole_model_f64, basicblock_resnet, .timeout = 300) { whole_model("tiny", "tests/reference/tiny.bin"); }
Test(whole_model_f64, bottleneck_imagenet_stem_maxpool, .timeout = 300) { whole_model("tiny50", "tests/reference/tiny50.bin"); }

/* the swapped pairing, centroids included: DINO's own (odd B, two local crops, a temperature in its
   warm-up) and ExCB's targets with it */
Test(whole_model_f64, swapped_pairing_dino, .timeout = 300) { whole_model(NULL, "tests/reference/methods/dino_odd.bin"); }
Test(whole_model_f64, swapped_pairing_excb, .timeout = 300) { whole_model(NULL, "tests/reference/methods/excb_tiny_swapped.bin"); }

/* the methods with their own loss (excb.c 5.4-5.6): CARP's block softmaxes, consistency and uniformity
   with its raw rows and learned prototypes; CoKe's two branches against its state's centres (no
   prototype parameters), at an epoch's start and later; mvbt's standardisation and both of its forms
   (two views, T2; five, T3) */
Test(whole_model_f64, carp, .timeout = 300) { whole_model(NULL, "tests/reference/methods/carp_odd.bin"); }
Test(whole_model_f64, coke_epoch_start, .timeout = 300) { whole_model(NULL, "tests/reference/methods/coke_boundary.bin"); }
Test(whole_model_f64, coke_two_heads_single_view, .timeout = 300) { whole_model(NULL, "tests/reference/methods/coke_single.bin"); }
Test(whole_model_f64, mvbt_two_views, .timeout = 300) { whole_model(NULL, "tests/reference/methods/mvbt_two.bin"); }
Test(whole_model_f64, mvbt_five_views, .timeout = 300) { whole_model(NULL, "tests/reference/methods/mvbt_vg3.bin"); }
