/* test_gradients.c: every backward of excb.c against central finite differences.
 *
 * Method. For an operator y = f(x), the objective is J = sum_i w_i y_i with fixed random weights w
 * (accumulated in double), so the backward is run with dy = w and must give dJ/dx. The central
 * difference (J(x + eps e_i) - J(x - eps e_i)) / (2 eps) is taken for up to 48 entries of each
 * input. Metric: max over checked entries of |fd - analytic| / max |analytic| (normwise, so an entry
 * whose gradient is ~0 is judged against the tensor's scale).
 * Precision. The forward is float32: J carries a rounding error of about |J| 6e-8 sqrt(#outputs),
 * which the difference divides by 2 eps. Linear operators (conv, linear, pooling) have no truncation
 * error, so eps = 1e-2; smooth nonlinear ones (BN, normalisation, the loss) use eps = 1e-3
 * (truncation ~eps^2). Tolerances are ~4-10x the worst error measured on these fixed data:
 *   conv / linear / pooling 2.6e-5 -> 2e-4     BatchNorm (dy) 5.5e-4 -> 2e-3
 *   L2-normalise 7.3e-5, weight norm 2.2e-4 -> 1e-3     loss 6.2e-5, routing 7.9e-5 -> 5e-4
 * ReLU and max-pool have kinks:
 * the data are fixed (counter-based RNG) and were checked to keep every pre-activation and every
 * window's runner-up farther than eps from the switch point, so the checks are deterministic.
 * A wrong backward (a missing term, a transposed index, a wrong scale) gives errors of 1e-1 to 1. */
#define TOL_LINEAR 2e-4
#define TOL_BN 2e-3
#define TOL_NORM 1e-3
#define TOL_LOSS 5e-4
#include "testutil.h"
#include <criterion/parameterized.h>

typedef double (*Objective)(void *ctx);

/* worst normwise error of the analytic gradient g (n entries) of J(x) */
static double fd_check(float *x, const float *g, size_t n, Objective J, void *ctx, float eps) {
    double gmax = 0, worst = 0;
    for (size_t i = 0; i < n; i++) gmax = fabs(g[i]) > gmax ? fabs(g[i]) : gmax;
    size_t n_check = n < 48 ? n : 48;
    for (size_t c = 0; c < n_check; c++) {
        size_t i = n <= 48 ? c : (size_t)(excb_hash(3, 3, n, 0, c) % n);
        float x0 = x[i];
        x[i] = x0 + eps;
        double jp = J(ctx);
        x[i] = x0 - eps;
        double jm = J(ctx);
        x[i] = x0;
        double fd = (jp - jm) / (2.0 * eps);
        double e = fabs(fd - g[i]) / (gmax > 0 ? gmax : 1.0);
        worst = e > worst ? e : worst;
    }
    return worst;
}

static double dot_w(const float *y, const float *w, size_t n) {
    double s = 0;
    for (size_t i = 0; i < n; i++) s += (double)y[i] * w[i];
    return s;
}

#define CHECK(what, err, tol) cr_expect((err) <= (tol), "%s: finite-difference error %.3g > %.1e", what, err, tol)

/* ------------------------------------------------------------------------------------------------ */
/* Convolution: stride and padding variants, w.r.t. input and weights */
typedef struct {
    int N, Cin, H, Cout, k, s, p, Ho;
    float *x, *w, *y, *wobj, *col;
} ConvCtx;

static double conv_J(void *v) {
    ConvCtx *c = v;
    conv2d_forward(c->y, c->x, c->w, c->col, c->N, c->Cin, c->H, c->H, c->Cout, c->k, c->s, c->p);
    return dot_w(c->y, c->wobj, (size_t)c->Cout * c->N * c->Ho * c->Ho);
}

struct conv_case { int k, s, p; };
ParameterizedTestParameters(gradients, conv2d) {
    static struct conv_case cases[] = {{3, 1, 1}, {3, 2, 1}, {1, 1, 0}, {1, 2, 0}, {7, 2, 3}};
    return cr_make_param_array(struct conv_case, cases, sizeof cases / sizeof cases[0]);
}
ParameterizedTest(struct conv_case *cc, gradients, conv2d) {
    ConvCtx c = {.N = 3, .Cin = 3, .H = 9, .Cout = 4, .k = cc->k, .s = cc->s, .p = cc->p};
    c.Ho = (c.H + 2 * c.p - c.k) / c.s + 1;
    size_t nx = (size_t)c.Cin * c.N * c.H * c.H, nw = (size_t)c.Cout * c.Cin * c.k * c.k;
    size_t ny = (size_t)c.Cout * c.N * c.Ho * c.Ho;
    c.x = malloc(4 * nx); c.w = malloc(4 * nw); c.y = malloc(4 * ny); c.wobj = malloc(4 * ny);
    c.col = malloc(4 * (size_t)(1 << 18) * 8 + 4 * nx * 64);
    float *dx = malloc(4 * nx), *dw = calloc(nw, 4), *slots = malloc(4 * nw * 8);
    fill_normal(c.x, nx, 1, 1); fill_normal(c.w, nw, 2, 1); fill_normal(c.wobj, ny, 3, 1);
    conv2d_backward(dx, dw, c.wobj, c.x, c.w, c.col, slots, c.N, c.Cin, c.H, c.H, c.Cout, c.k, c.s, c.p);
    double ex = fd_check(c.x, dx, nx, conv_J, &c, 1e-2f), ew = fd_check(c.w, dw, nw, conv_J, &c, 1e-2f);
    printf("conv k%d s%d p%d: dx %.2e dw %.2e\n", c.k, c.s, c.p, ex, ew);
    CHECK("conv dx", ex, TOL_LINEAR);
    CHECK("conv dw", ew, TOL_LINEAR);
    free(c.x); free(c.w); free(c.y); free(c.wobj); free(c.col); free(dx); free(dw); free(slots);
}

/* Either engine's chunks and slot reduction (oneDNN's primitives, or im2col + GEMM) against a direct
 * double-precision convolution, channels-last, on layers cut into many chunks, with a shorter last
 * chunk, fewer images than slots, the strides and kernels of the backbones, 1 and 3 input channels. */
static void conv_vs_direct(int N, int Cin, int H, int Cout, int K, int S, int P) {
    int Ho = (H + 2 * P - K) / S + 1;
    size_t nx = (size_t)Cin * N * H * H, nw = (size_t)Cout * Cin * K * K, ny = (size_t)Cout * N * Ho * Ho;
    float *x = malloc(4 * nx), *w = malloc(4 * nw), *y = malloc(4 * ny), *dy = malloc(4 * ny);
    float *dx = malloc(4 * nx), *dw = calloc(nw, 4), *col = malloc(4 * ((size_t)1 << 18) * 8 + 4 * (size_t)Cin * K * K * Ho * Ho * 8);
    float *slots = malloc(4 * nw * 8);
    double *rdw = calloc(nw, 8), *rdx = calloc(nx, 8);
    fill_normal(x, nx, 4, 1); fill_normal(w, nw, 5, 1); fill_normal(dy, ny, 6, 1);
    excb_set_threads(2);
    conv2d_forward(y, x, w, col, N, Cin, H, H, Cout, K, S, P);
    conv2d_backward(dx, dw, dy, x, w, col, slots, N, Cin, H, H, Cout, K, S, P);
    double ey = 0, ymax = 0;
    for (int n = 0; n < N; n++)
        for (int oy = 0; oy < Ho; oy++)
            for (int ox = 0; ox < Ho; ox++)
                for (int co = 0; co < Cout; co++) {
                    double acc = 0;
                    size_t yi = (((size_t)n * Ho + oy) * Ho + ox) * Cout + co;       /* (N, Ho, Wo, Cout) */
                    for (int ci = 0; ci < Cin; ci++)
                        for (int i = 0; i < K; i++)
                            for (int j = 0; j < K; j++) {
                                int iy = oy * S - P + i, ix = ox * S - P + j;
                                if (iy < 0 || iy >= H || ix < 0 || ix >= H) continue;
                                size_t xi = (((size_t)n * H + iy) * H + ix) * Cin + ci;
                                size_t wi = (((size_t)co * Cin + ci) * K + i) * K + j;   /* (Cout, Cin, k, k) */
                                acc += (double)w[wi] * x[xi];
                                rdw[wi] += (double)dy[yi] * x[xi];
                                rdx[xi] += (double)dy[yi] * w[wi];
                            }
                    ey = fmax(ey, fabs(acc - y[yi]));
                    ymax = fmax(ymax, fabs(acc));
                }
    double edw = 0, mdw = 0, edx = 0, mdx = 0;
    for (size_t i = 0; i < nw; i++) { edw = fmax(edw, fabs(rdw[i] - dw[i])); mdw = fmax(mdw, fabs(rdw[i])); }
    for (size_t i = 0; i < nx; i++) { edx = fmax(edx, fabs(rdx[i] - dx[i])); mdx = fmax(mdx, fabs(rdx[i])); }
    printf("conv N=%d %d->%d %dx%d k%d s%d: y %.2e dw %.2e dx %.2e\n", N, Cin, Cout, H, H, K, S, ey / ymax, edw / mdw,
           edx / mdx);
    /* float32 sums of up to 576 (y, dx) and up to 10240 (dw) products, against the largest entry;
       measured worst 8.3e-7 (y, 64->8 over 32x32) -> 5e-6 */
    CHECK("chunked conv y", ey / ymax, 5e-6);
    CHECK("chunked conv dw (slots)", edw / mdw, 5e-6);
    CHECK("chunked conv dx", edx / mdx, 5e-6);
    free(x); free(w); free(y); free(dy); free(dx); free(dw); free(col); free(slots); free(rdw); free(rdx);
}

Test(gradients, conv2d_many_chunks_vs_direct) {
    conv_vs_direct(10, 64, 32, 8, 3, 1, 1);    /* 64 channels of 32x32: one image per chunk             */
    conv_vs_direct(37, 16, 28, 16, 3, 1, 1);   /* resnet20s stage 1: chunks of 10, a last one of 7        */
    conv_vs_direct(21, 16, 12, 32, 3, 2, 1);   /* a stride-2 unit; 21 images: slots of 2 and 3            */
    conv_vs_direct(19, 16, 14, 32, 1, 2, 0);   /* a downsample shortcut                                   */
    conv_vs_direct(5, 1, 28, 16, 3, 1, 1);     /* the gray CIFAR-style stem, fewer images than slots      */
    conv_vs_direct(9, 3, 30, 16, 7, 2, 3);     /* the ImageNet stem                                       */
    conv_vs_direct(12, 24, 9, 40, 3, 1, 1);    /* channel counts that are not multiples of 16             */
    conv_vs_direct(8, 3, 16, 2, 7, 2, 3);      /* tiny50's stem and two of its Bottleneck convs            */
    conv_vs_direct(8, 2, 4, 2, 3, 1, 1);
    conv_vs_direct(8, 8, 4, 4, 1, 1, 0);
}

/* ------------------------------------------------------------------------------------------------ */
/* BatchNorm in train mode, with and without ReLU and a residual input */
typedef struct {
    int C, n, relu, channels_last;
    float *y, *g, *b, *res, *out, *mean, *rstd, *wobj;
} BNCtx;

static double bn_J(void *v) {
    BNCtx *c = v;
    batchnorm_forward(c->out, c->mean, c->rstd, NULL, NULL, c->y, c->g, c->b, c->res, c->relu, c->C, c->n, 1e-5f, 0.1f,
                      c->channels_last, NULL);
    return dot_w(c->out, c->wobj, (size_t)c->C * c->n);
}

struct bn_case { int relu, residual, channels_last; };
ParameterizedTestParameters(gradients, batchnorm) {   /* the heads' (C, N) layout and the backbone's channels-last */
    static struct bn_case cases[] = {{0, 0, 0}, {1, 0, 0}, {1, 1, 0}, {0, 0, 1}, {1, 0, 1}, {1, 1, 1}};
    return cr_make_param_array(struct bn_case, cases, sizeof cases / sizeof cases[0]);
}
ParameterizedTest(struct bn_case *bc, gradients, batchnorm) {
    BNCtx c = {.C = 3, .n = 20, .relu = bc->relu, .channels_last = bc->channels_last};
    size_t n = (size_t)c.C * c.n;
    c.y = malloc(4 * n); c.out = malloc(4 * n); c.wobj = malloc(4 * n); c.res = bc->residual ? malloc(4 * n) : NULL;
    float g[3] = {1.2f, 0.7f, -0.9f}, b[3] = {0.1f, -0.3f, 0.2f}, mean[3], rstd[3];
    c.g = g; c.b = b; c.mean = mean; c.rstd = rstd;
    fill_normal(c.y, n, 7, 2);
    fill_normal(c.wobj, n, 8, 1);
    if (c.res) fill_normal(c.res, n, 9, 1);
    float *dy = malloc(4 * n), dg[3] = {0}, db[3] = {0};
    bn_J(&c);
    batchnorm_backward(dy, dg, db, c.wobj, c.out, c.y, mean, rstd, g, c.relu, c.C, c.n, c.channels_last, NULL);
    double ey = fd_check(c.y, dy, n, bn_J, &c, 1e-3f), eg = fd_check(g, dg, 3, bn_J, &c, 1e-3f);
    double eb = fd_check(b, db, 3, bn_J, &c, 1e-3f), er = 0;
    if (c.res) {   /* the residual's gradient is the ReLU-gated output gradient */
        float *dr = malloc(4 * n);
        for (size_t i = 0; i < n; i++) dr[i] = c.out[i] > 0 ? c.wobj[i] : 0.0f;
        er = fd_check(c.res, dr, n, bn_J, &c, 1e-3f);
        free(dr);
    }
    printf("batchnorm channels_last=%d relu=%d residual=%d: dy %.2e dgamma %.2e dbeta %.2e dres %.2e\n", bc->channels_last, bc->relu, bc->residual, ey, eg, eb, er);
    CHECK("BN dy", ey, TOL_BN);
    CHECK("BN dgamma", eg, TOL_BN);
    CHECK("BN dbeta", eb, TOL_BN);
    CHECK("BN dresidual", er, TOL_BN);
    free(c.y); free(c.out); free(c.wobj); free(c.res); free(dy);
}

/* ------------------------------------------------------------------------------------------------ */
/* Pooling */
typedef struct { int C, N, H; float *x, *out, *wobj; int32_t *arg; int avg; } PoolCtx;

static double pool_J(void *v) {
    PoolCtx *c = v;
    if (c->avg) {
        avgpool_forward(c->out, c->N, c->x, c->C, c->N, c->H * c->H);
        return dot_w(c->out, c->wobj, (size_t)c->C * c->N);
    }
    maxpool_forward(c->out, c->arg, c->x, c->C, c->N, c->H, c->H);
    int Ho = (c->H + 2 - 3) / 2 + 1;
    return dot_w(c->out, c->wobj, (size_t)c->C * c->N * Ho * Ho);
}

Test(gradients, maxpool_and_avgpool) {
    PoolCtx c = {.C = 2, .N = 2, .H = 7};
    size_t n = (size_t)c.C * c.N * c.H * c.H;
    c.x = malloc(4 * n); c.out = malloc(4 * n); c.wobj = malloc(4 * n); c.arg = malloc(4 * n);
    float *dx = malloc(4 * n);
    fill_normal(c.x, n, 10, 1);
    fill_normal(c.wobj, n, 11, 1);
    pool_J(&c);
    maxpool_backward(dx, c.wobj, c.arg, c.C, c.N, c.H, c.H);
    double em = fd_check(c.x, dx, n, pool_J, &c, 1e-3f);
    c.avg = 1;
    avgpool_backward(dx, c.wobj, c.N, c.C, c.N, c.H * c.H);
    double ea = fd_check(c.x, dx, n, pool_J, &c, 1e-2f);
    printf("maxpool %.2e avgpool %.2e\n", em, ea);
    CHECK("maxpool dx", em, TOL_LINEAR);
    CHECK("avgpool dx", ea, TOL_LINEAR);
    free(c.x); free(c.out); free(c.wobj); free(c.arg); free(dx);
}

/* ------------------------------------------------------------------------------------------------ */
/* Linear */
typedef struct { int in, out, N; float *x, *w, *b, *y, *wobj; } LinCtx;

static double lin_J(void *v) {
    LinCtx *c = v;
    linear_forward(c->y, c->x, c->w, c->b, c->in, c->out, c->N);
    return dot_w(c->y, c->wobj, (size_t)c->out * c->N);
}

Test(gradients, linear) {
    LinCtx c = {.in = 7, .out = 70, .N = 5};   /* out > 64: two row tiles */
    size_t nx = (size_t)c.in * c.N, nw = (size_t)c.out * c.in, ny = (size_t)c.out * c.N;
    c.x = malloc(4 * nx); c.w = malloc(4 * nw); c.b = malloc(4 * c.out); c.y = malloc(4 * ny); c.wobj = malloc(4 * ny);
    fill_normal(c.x, nx, 12, 1); fill_normal(c.w, nw, 13, 1); fill_normal(c.b, c.out, 14, 1); fill_normal(c.wobj, ny, 15, 1);
    float *dx = malloc(4 * nx), *dw = calloc(nw, 4), *db = calloc(c.out, 4);
    linear_backward(dx, dw, db, c.wobj, c.x, c.w, c.in, c.out, c.N);
    double ex = fd_check(c.x, dx, nx, lin_J, &c, 1e-2f), ew = fd_check(c.w, dw, nw, lin_J, &c, 1e-2f);
    double eb = fd_check(c.b, db, c.out, lin_J, &c, 1e-2f);
    printf("linear: dx %.2e dw %.2e db %.2e\n", ex, ew, eb);
    CHECK("linear dx", ex, TOL_LINEAR);
    CHECK("linear dw", ew, TOL_LINEAR);
    CHECK("linear db", eb, TOL_LINEAR);
    free(c.x); free(c.w); free(c.b); free(c.y); free(c.wobj); free(dx); free(dw); free(db);
}

/* ------------------------------------------------------------------------------------------------ */
/* L2 normalisation (feature-major input with a leading dimension wider than N) and weight norm */
typedef struct { int d, N, ld; float *x, *u, *den, *wobj; int wn; } NormCtx;

static double norm_J(void *v) {
    NormCtx *c = v;
    if (c->wn) weightnorm_forward(c->u, c->den, c->x, c->N, c->d);
    else l2norm_rows_forward(c->u, c->den, c->x, c->ld, c->d, c->N, 1e-12f);
    return dot_w(c->u, c->wobj, (size_t)c->N * c->d);
}

Test(gradients, l2_normalise_and_weight_norm) {
    NormCtx c = {.d = 6, .N = 5, .ld = 9};
    size_t nx = (size_t)c.d * c.ld, nu = (size_t)c.N * c.d;
    c.x = malloc(4 * nx); c.u = malloc(4 * nu); c.den = malloc(4 * c.ld); c.wobj = malloc(4 * nu);
    fill_normal(c.x, nx, 16, 1); fill_normal(c.wobj, nu, 17, 1);
    float *dx = calloc(nx, 4);
    norm_J(&c);
    l2norm_rows_backward(dx, c.ld, c.wobj, c.u, c.den, c.d, c.N, 1e-12f, 0);
    double e = fd_check(c.x, dx, nx, norm_J, &c, 1e-3f);
    /* accumulate mode adds to what is there */
    for (size_t i = 0; i < nx; i++) dx[i] = 1.0f;
    l2norm_rows_backward(dx, c.ld, c.wobj, c.u, c.den, c.d, c.N, 1e-12f, 1);
    float *d2 = calloc(nx, 4);
    l2norm_rows_backward(d2, c.ld, c.wobj, c.u, c.den, c.d, c.N, 1e-12f, 0);
    int bad = 0;
    for (int j = 0; j < c.d; j++)
        for (int n = 0; n < c.N; n++) bad += dx[j * c.ld + n] != 1.0f + d2[j * c.ld + n];
    cr_expect(bad == 0, "accumulate mode: %d entries differ", bad);
    /* weight norm: v (K = N rows, d) -> c */
    c.wn = 1;
    float *dv = calloc(nu, 4);
    norm_J(&c);
    weightnorm_backward(dv, c.wobj, c.u, c.den, c.N, c.d);
    double ew = fd_check(c.x, dv, nu, norm_J, &c, 1e-3f);
    printf("l2 normalise %.2e, weight norm %.2e\n", e, ew);
    CHECK("l2norm dx", e, TOL_NORM);
    CHECK("weightnorm dv", ew, TOL_NORM);
    free(c.x); free(c.u); free(c.den); free(c.wobj); free(dx); free(d2); free(dv);
}

/* ------------------------------------------------------------------------------------------------ */
/* The loss (E7, E8, E11) w.r.t. every student row, and the centroid routing (A8, A9) */
typedef struct {
    int Vg, Vl, B, K, d;
    float *zd, *zp, *q, *tmp_d, *tmp_p;
    double *rows;
    /* for the routing check */
    float *v, *c_fixed, *u_dir, *u_pred, *c, *inv;
    int detach;
} LossCtx;

static double loss_J(void *v) {
    LossCtx *c = v;
    size_t nd = (size_t)c->Vg * c->B * c->K, np = (size_t)(c->Vg + c->Vl) * c->B * c->K;
    memcpy(c->tmp_d, c->zd, 4 * nd);
    memcpy(c->tmp_p, c->zp, 4 * np);
    return excb_loss_forward_backward(c->tmp_d, c->Vg, c->tmp_p, c->rows, c->q, c->Vg, c->Vl, c->B, c->K, 0.1);
}

static void random_targets(float *q, int rows, int K, uint64_t stream) {
    for (int r = 0; r < rows; r++) {
        double s = 0;
        for (int k = 0; k < K; k++) s += (q[r * K + k] = expf(3 * excb_normal(7, EXCB_RNG_TEST, stream, r, k)));
        for (int k = 0; k < K; k++) q[r * K + k] /= (float)s;
    }
}

Test(gradients, loss_all_student_rows) {
    LossCtx c = {.Vg = 2, .Vl = 3, .B = 3, .K = 7};
    size_t nd = (size_t)c.Vg * c.B * c.K, np = (size_t)(c.Vg + c.Vl) * c.B * c.K;
    c.zd = malloc(4 * nd); c.zp = malloc(4 * np); c.q = malloc(4 * nd);
    c.tmp_d = malloc(4 * nd); c.tmp_p = malloc(4 * np); c.rows = malloc(8 * 64);
    fill_normal(c.zd, nd, 18, 0.5f); fill_normal(c.zp, np, 19, 0.5f);
    random_targets(c.q, c.Vg * c.B, c.K, 20);
    loss_J(&c);
    float *gd = malloc(4 * nd), *gp = malloc(4 * np);
    memcpy(gd, c.tmp_d, 4 * nd);
    memcpy(gp, c.tmp_p, 4 * np);
    double ed = fd_check(c.zd, gd, nd, loss_J, &c, 1e-3f), ep = fd_check(c.zp, gp, np, loss_J, &c, 1e-3f);
    printf("loss: direct rows %.2e, predictor rows %.2e\n", ed, ep);
    CHECK("dL/dz direct", ed, TOL_LOSS);
    CHECK("dL/dz predictor", ep, TOL_LOSS);
    free(c.zd); free(c.zp); free(c.q); free(c.tmp_d); free(c.tmp_p); free(c.rows); free(gd); free(gp);
}

/* J(v) = L(z_dir = u_dir . c(v)^T, z_pred = u_pred . c_fixed^T): the predictor sees the centroids
 * as constants (stop-gradient). The analytic dv = weightnorm_backward(dz_dir^T u_dir) must match
 * THIS J, and must NOT match the J in which the predictor also moves with v (detach = 0). */
static double routing_J(void *v) {
    LossCtx *c = v;
    int NG = c->Vg * c->B, NS = (c->Vg + c->Vl) * c->B;
    weightnorm_forward(c->c, c->inv, c->v, c->K, c->d);
    matmul_naive('N', 'T', NG, c->K, c->d, 1.0f, c->u_dir, c->d, c->c, c->d, 0.0f, c->zd, c->K);
    matmul_naive('N', 'T', NS, c->K, c->d, 1.0f, c->u_pred, c->d, c->detach ? c->c_fixed : c->c, c->d, 0.0f, c->zp, c->K);
    return excb_loss_forward_backward(c->zd, c->Vg, c->zp, c->rows, c->q, c->Vg, c->Vl, c->B, c->K, 0.1);
}

Test(gradients, centroids_learn_only_from_direct_global_rows) {
    LossCtx c = {.Vg = 2, .Vl = 2, .B = 3, .K = 5, .d = 4, .detach = 1};
    int NG = c.Vg * c.B, NS = (c.Vg + c.Vl) * c.B;
    size_t nv = (size_t)c.K * c.d;
    c.v = malloc(4 * nv); c.c = malloc(4 * nv); c.c_fixed = malloc(4 * nv); c.inv = malloc(4 * c.K);
    c.u_dir = malloc(4 * NG * c.d); c.u_pred = malloc(4 * NS * c.d);
    c.zd = malloc(4 * NG * c.K); c.zp = malloc(4 * NS * c.K); c.q = malloc(4 * NG * c.K); c.rows = malloc(8 * 64);
    fill_normal(c.v, nv, 21, 1);
    float *x = malloc(4 * NS * c.d), den[64];
    fill_normal(x, (size_t)NS * c.d, 22, 1);                /* x is (d, N) feature-major */
    l2norm_rows_forward(c.u_dir, den, x, NS, c.d, NG, 1e-12f);
    l2norm_rows_forward(c.u_pred, den, x, NS, c.d, NS, 1e-12f);
    random_targets(c.q, NG, c.K, 23);
    weightnorm_forward(c.c_fixed, c.inv, c.v, c.K, c.d);
    routing_J(&c);                                          /* c.zd now holds dL/dz_dir    */
    float *dc = malloc(4 * nv), *dv = calloc(nv, 4);
    matmul_naive('T', 'N', c.K, c.d, NG, 1.0f, c.zd, c.K, c.u_dir, c.d, 0.0f, dc, c.d);
    weightnorm_backward(dv, dc, c.c, c.inv, c.K, c.d);
    double e_detached = fd_check(c.v, dv, nv, routing_J, &c, 1e-3f);
    c.detach = 0;
    double e_attached = fd_check(c.v, dv, nv, routing_J, &c, 1e-3f);
    printf("centroid routing: vs stop-gradient loss %.2e, vs loss without stop-gradient %.2e\n", e_detached, e_attached);
    CHECK("dv with the predictor's centroids detached", e_detached, TOL_LOSS);
    cr_expect(e_attached > 0.1, "the check cannot tell routed from unrouted gradients (%.3g)", e_attached);
    free(c.v); free(c.c); free(c.c_fixed); free(c.inv); free(c.u_dir); free(c.u_pred);
    free(c.zd); free(c.zp); free(c.q); free(c.rows); free(x); free(dc); free(dv);
}

/* The whole network (residual adds, shortcuts, max-pool, heads, loss) is checked in float64 by
 * tests/test_whole_model_f64.c: in float32 a ReLU network's finite differences are limited by
 * kinks above eps ~ 1e-3 and by rounding below it (measured: 1-10 % either way). */
