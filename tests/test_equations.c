/* test_equations.c: every equation of excb.c against small cases computed by hand (the arithmetic is
 * in the comments). The hand cases T1-T5 of paper_notes.md §5 first, then the operators, schedules, EMA, SGD.
 * Tolerances: float32 results of a few operations are held to a few ulp of their value (~1e-7
 * absolute near 1); results that pass through exp/log get 1e-6 (expf/logf are 1-ulp functions). */
#include "testutil.h"

/* ------------------------------------------------------------------------------------------------ */
/* T1 (E3', E4, E5, E6): s = [0.5, 0.25, 0.125, 0.125], one teacher row z = [0.9, 0.2, -0.3, 0.6]  */
Test(balancing, T1_pipeline) {
    float s[4] = {0.5f, 0.25f, 0.125f, 0.125f}, z[4] = {0.9f, 0.2f, -0.3f, 0.6f};
    float r[4], lo[4], hi[4], q[4], zh[4];
    int32_t lab;
    balance_factors(r, lo, hi, s, 4, 0.001, 0, 0);
    /* r = 4 s / 1 = [2, 1, 0.5, 0.5]; lower = min(r,1) = [1,1,.5,.5]; higher = min(1/r,1) = [.5,1,1,1] */
    const float r_want[4] = {2, 1, 0.5f, 0.5f}, lo_want[4] = {1, 1, 0.5f, 0.5f}, hi_want[4] = {0.5f, 1, 1, 1};
    for (int k = 0; k < 4; k++) {
        EXPECT_NEAR(r[k], r_want[k], 0, "r[%d]", k);
        EXPECT_NEAR(lo[k], lo_want[k], 0, "lower[%d]", k);
        EXPECT_NEAR(hi[k], hi_want[k], 0, "higher[%d]", k);
    }
    balanced_targets(q, &lab, zh, z, lo, hi, 1, 4, 0.01, 1.0, 0.04);
    /* lower branch 1-(1-z)lower: [0.9, 0.2, 1-1.3*.5 = 0.35, 1-0.4*.5 = 0.8]
       upper branch (z'+1)higher-1: [1.9*.5-1 = -0.05, 0.2, 0.35, 0.8]
       argmax = 3 (the raw argmax was 0): boost 0.8*1.01 = 0.808, clamp changes nothing */
    const float zh_want[4] = {-0.05f, 0.2f, 0.35f, 0.808f};
    for (int k = 0; k < 4; k++) EXPECT_NEAR(zh[k], zh_want[k], 1e-7, "zhat[%d]", k);
    /* q_k = exp((zh_k - 0.808)/0.04) / sum: exponents -21.45, -15.2, -11.45, 0
       e^-21.45 = 4.83485e-10, e^-15.2 = 2.50452e-7, e^-11.45 = 1.064947e-5; sum = 1.0000109004
       q = [4.83480e-10, 2.504489e-07, 1.0649359e-05, 0.99998910]. Tolerance: 1e-5 relative (the
       exponent is (zh - max)/0.04, so a 1-ulp error of zh near 0.8 (6e-8) moves q by 1.5e-6 relative;
       expf adds 1 ulp), and 2 ulp absolute for q[3] near 1. */
    const double q_want[4] = {4.83480129e-10, 2.50448907e-07, 1.06493585e-05, 0.99998909971};
    for (int k = 0; k < 4; k++) EXPECT_NEAR(q[k], q_want[k], k == 3 ? 1.2e-7 : 1e-5 * q_want[k], "q[%d]", k);
    cr_expect(lab == 3, "label %d, want 3 (balancing moved the argmax from cluster 0 to 3)", lab);
}

/* T2 (E7, E8, E11): student logits [0.5, 0.1, 0.3, 0.7]/0.1 against T1's target */
Test(loss, T2_cross_entropy_and_gradient) {
    /* Vg = 2, Vl = 0, B = 1, K = 4: rows = 2 direct + 2 predictor, |M| = 2*1 + 2*2 = 6 terms.
       Every student row holds z = [.5,.1,.3,.7]; both teacher rows hold T1's q. Each term's CE is
       the same, so L = CE. p = softmax([5,1,3,7]) = e^[-2,-6,-4,0]/(1+e^-2+e^-4+e^-6)
         = [0.117059, 0.002144, 0.015842, 0.864955];  CE = -sum q log p = 0.145122 */
    const float q1[4] = {4.83480129e-10f, 2.50448907e-07f, 1.06493585e-05f, 0.99998909971f};
    float q[8], zd[8], zp[8];
    double rows[4];
    for (int v = 0; v < 2; v++) memcpy(q + 4 * v, q1, sizeof q1);
    const float z[4] = {0.5f, 0.1f, 0.3f, 0.7f};
    for (int r = 0; r < 2; r++) {
        memcpy(zd + 4 * r, z, sizeof z);
        memcpy(zp + 4 * r, z, sizeof z);
    }
    double L = excb_loss_forward_backward(zd, 2, zp, rows, q, 2, 0, 1, 4, 0.1);
    EXPECT_NEAR(L, 0.145122, 1e-6, "loss");
    /* E11: direct row (1 matching view): (p - q)/(0.1 * 6);  predictor row (2 views): (2p - 2q)/0.6
       p - q = [0.1170589, 0.0021438, 0.0158316, -0.1350342]
       direct: /0.6 = [0.1950982, 0.0035729, 0.0263859, -0.2250570]; predictor: twice that */
    const double gd[4] = {0.19509819, 0.00357293, 0.02638592, -0.22505704};
    for (int k = 0; k < 4; k++) {
        EXPECT_NEAR(zd[k], gd[k], 2e-6, "dL/dz direct[%d]", k);
        EXPECT_NEAR(zp[k], 2 * gd[k], 4e-6, "dL/dz predictor[%d]", k);
    }
}

/* The pairing of A7: with Vg = 2, Vl = 1, B = 1 the loss is the mean of 2*1 + 2*3 = 8 terms, and a
 * direct row is matched ONLY by the other view's target. */
Test(loss, pairing_of_views) {
    const int K = 2;
    /* targets: view 0 -> [1, 0], view 1 -> [0, 1]; every student row logits z/0.1 = [0, 0] -> p = 1/2
       each term's CE = log 2, so L = log 2 whatever the pairing ... */
    float q[4] = {1, 0, 0, 1}, zd[4] = {0, 0, 0, 0}, zp[6] = {0};
    double rows[5];
    double L = excb_loss_forward_backward(zd, 2, zp, rows, q, 2, 1, 1, K, 0.1);
    EXPECT_NEAR(L, log(2.0), 1e-7, "loss of 8 equal terms");
    /* ... but the gradient shows it: direct row 0 (view 0) is matched by view 1's q = [0,1]:
       (p - q)/(0.1*8) = [0.5, -0.5]/0.8 = [0.625, -0.625]; direct row 1 by view 0: [-0.625, 0.625];
       predictor rows by both: (2p - q0 - q1)/0.8 = [0, 0] */
    EXPECT_NEAR(zd[0], 0.625, 1e-7, "direct row 0, k=0");
    EXPECT_NEAR(zd[1], -0.625, 1e-7, "direct row 0, k=1");
    EXPECT_NEAR(zd[2], -0.625, 1e-7, "direct row 1, k=0");
    EXPECT_NEAR(zd[3], 0.625, 1e-7, "direct row 1, k=1");
    for (int i = 0; i < 6; i++) EXPECT_NEAR(zp[i], 0, 1e-7, "predictor entry %d", i);
}

/* T3 (E2, E3): hard labels [3, 0, 3, 1] of 2 views x 2 samples */
Test(cluster_sizes, T3_ema_of_hard_counts) {
    float s[4] = {0.5f, 0.25f, 0.125f, 0.125f}, s16[4];
    int32_t labels[4] = {3, 0, 3, 1}, counts[4];
    memcpy(s16, s, sizeof s);
    /* s_hat = [1/4, 1/4, 0, 2/4]; s <- 0.999 s + 0.001 s_hat
       = [0.4995 + 0.00025, 0.24975 + 0.00025, 0.124875, 0.124875 + 0.0005]
       = [0.49975, 0.25, 0.124875, 0.125375] */
    cluster_size_update(s, counts, labels, 4, 4, 0.999, 0);
    const double want[4] = {0.49975, 0.25, 0.124875, 0.125375};
    for (int k = 0; k < 4; k++) EXPECT_NEAR(s[k], want[k], 6e-8, "fp32 s[%d]", k);
    cr_expect(counts[0] == 1 && counts[1] == 1 && counts[2] == 0 && counts[3] == 2, "counts");
    /* A4, float16 term: fp16(0.001) = 1049 * 2^-20 = 0.00100040436; fp16(0.5) * that = 1049 * 2^-21
       exactly (binary16 holds 1049 * 2^-21: 11 significant bits), so term_3 = 1049 * 2^-21 and
       s_3 = 0.125f * 0.999f + 1049 * 2^-21 = 0.124875 + 0.00050020218 */
    cluster_size_update(s16, counts, labels, 4, 4, 0.999, 1);
    float term3 = 1049.0f * 0x1.0p-21f;
    float s3 = 0.125f * 0.999f + term3;
    cr_expect(s16[3] == s3, "fp16 s[3] = %.9g, want %.9g exactly", s16[3], s3);
    EXPECT_NEAR(s16[2], 0.125f * 0.999f, 0, "fp16 s[2] (no count: term 0)");
    for (int k = 0; k < 4; k++) EXPECT_NEAR(s16[k], want[k], 3e-7, "fp16 s[%d] near the fp32 value", k);
}

/* T4 (A1): uniform s, all-negative row: the boost makes the maximum MORE negative */
Test(balancing, T4_negative_max_boost) {
    float s[4] = {0.25f, 0.25f, 0.25f, 0.25f}, z[4] = {-0.5f, -0.2f, -0.9f, -0.3f};
    float r[4], lo[4], hi[4], q[4], zh[4];
    int32_t lab;
    balance_factors(r, lo, hi, s, 4, 0.001, 0, 0);
    balanced_targets(q, &lab, zh, z, lo, hi, 1, 4, 0.01, 1.0, 0.04);
    /* r = 1 everywhere: B is the identity; argmax = 1 (-0.2); -0.2 * 1.01 = -0.202 */
    const float want[4] = {-0.5f, -0.202f, -0.9f, -0.3f};
    for (int k = 0; k < 4; k++) EXPECT_NEAR(zh[k], want[k], 1e-7, "zhat[%d]", k);
}

/* E5 clamp (A2): a boosted maximum above 1 is capped, which can tie it with another entry */
Test(balancing, E5_clamp_caps_the_boosted_maximum) {
    float s[3] = {1.0f / 3, 1.0f / 3, 1.0f / 3}, z[3] = {0.995f, 0.5f, 1.0f / 1.01f}, r[3], lo[3], hi[3], q[3], zh[3];
    int32_t lab;
    balance_factors(r, lo, hi, s, 3, 0.001, 0, 0);
    /* r = 1 (up to rounding of 3 * (1/3)): B is the identity to an ulp; argmax = 0 (0.995);
       0.995 * 1.01 = 1.00495 -> clamped to 1.0; z[2] = 1/1.01 = 0.990099 stays; labels -> 0 */
    balanced_targets(q, &lab, zh, z, lo, hi, 1, 3, 0.01, 1.0, 0.04);
    EXPECT_NEAR(zh[0], 1.0, 0, "boosted maximum clamped");
    EXPECT_NEAR(zh[1], 0.5, 1.2e-7, "other entry unchanged");
    cr_expect(lab == 0, "label %d", lab);
    /* with the clamp widened to 2 the boost shows: 0.995 * 1.01 = 1.00495 */
    balanced_targets(q, &lab, zh, z, lo, hi, 1, 3, 0.01, 2.0, 0.04);
    EXPECT_NEAR(zh[0], 1.00495, 2.4e-7, "boost without the clamp");
}

/* T5: properties of B(z; r) over a grid: monotone in z, identity at r = 1, B(1; r<1) = 1,
 * B(-1; r>1) = -1, range kept. Read off balanced_targets' zhat with boost 0 and a huge tau. */
Test(balancing, T5_properties) {
    enum { NZ = 201, K = 5 };
    float s[K] = {0.05f, 0.1f, 0.2f, 0.3f, 0.35f}, r[K], lo[K], hi[K];   /* r = 5 s: .25 .5 1 1.5 1.75 */
    static float z[NZ * K], q[NZ * K], zh[NZ * K];
    int32_t lab[NZ];
    for (int i = 0; i < NZ; i++)
        for (int k = 0; k < K; k++) z[i * K + k] = -1.0f + 2.0f * i / (NZ - 1);
    balance_factors(r, lo, hi, s, K, 0.001, 0, 0);
    balanced_targets(q, lab, zh, z, lo, hi, NZ, K, 0.0, 1.0, 1.0);
    for (int k = 0; k < K; k++) {
        for (int i = 1; i < NZ; i++)
            cr_expect(zh[i * K + k] > zh[(i - 1) * K + k], "B not increasing at k=%d i=%d", k, i);
        for (int i = 0; i < NZ; i++)
            cr_expect(zh[i * K + k] >= -1.0f && zh[i * K + k] <= 1.0f, "out of range at k=%d i=%d", k, i);
    }
    /* identity at r = 1, up to the official form's rounding: 1 - (1 - z) * 1 is z rounded to the
       float grid at the magnitude of 1 - z (<= 2), so within 1 ulp of 1 (2^-23 = 1.19e-7) */
    for (int i = 0; i < NZ; i++) EXPECT_NEAR(zh[i * K + 2], z[i * K + 2], 0x1.0p-23, "identity at r=1, i=%d", i);
    EXPECT_NEAR(zh[(NZ - 1) * K + 0], 1.0, 0, "B(1; r=0.25)");
    EXPECT_NEAR(zh[(NZ - 1) * K + 1], 1.0, 0, "B(1; r=0.5)");
    EXPECT_NEAR(zh[0 * K + 3], -1.0, 0, "B(-1; r=1.5)");
    /* r = 0.25: B(-1) = 1 - 2 * 0.25 = 0.5; r = 1.75: B(1) = 2/1.75 - 1 = 0.142857 */
    EXPECT_NEAR(zh[0 * K + 0], 0.5, 1e-7, "B(-1; r=0.25) = 1 - 2r");
    EXPECT_NEAR(zh[(NZ - 1) * K + 4], 2.0 / 1.75 - 1.0, 2e-7, "B(1; r=1.75) = 2/r - 1");
}

/* A3: a cluster with s_k = 0 exactly: lower = 0 gets U(0,1)*0.001 jitter, 1/r = inf gives higher = 1 */
Test(balancing, A3_dead_cluster_guard) {
    float s[2] = {0.0f, 1.0f}, r[2], lo[2], hi[2];
    balance_factors(r, lo, hi, s, 2, 0.001, 5, 17);
    cr_expect(r[0] == 0.0f, "r[0] = %g", r[0]);
    cr_expect(lo[0] > 0.0f && lo[0] < 0.001f, "lower[0] = %g, want jitter in (0, 0.001)", lo[0]);
    cr_expect(hi[0] == 1.0f, "higher[0] = %g, want 1 (1 - relu(1 - inf))", hi[0]);
    EXPECT_NEAR(r[1], 2.0, 0, "r[1]");
    EXPECT_NEAR(hi[1], 0.5, 0, "higher[1]");
    float lo2[2], hi2[2], r2[2];
    balance_factors(r2, lo2, hi2, s, 2, 0.001, 5, 17);
    cr_expect(lo2[0] == lo[0], "the jitter is a function of (seed, step): same key, same value");
}

/* ------------------------------------------------------------------------------------------------ */
/* E1: weight-normalised cosine layer */
Test(prototypes, E1_weightnorm_cosine) {
    /* v = [[3,4],[0,2]] -> c = [[0.6,0.8],[0,1]], 1/||v|| = [0.2, 0.5] */
    float v[4] = {3, 4, 0, 2}, c[4], inv[2];
    weightnorm_forward(c, inv, v, 2, 2);
    EXPECT_NEAR(c[0], 0.6, 6e-8, "c00");
    EXPECT_NEAR(c[1], 0.8, 6e-8, "c01");
    EXPECT_NEAR(c[2], 0.0, 0, "c10");
    EXPECT_NEAR(c[3], 1.0, 0, "c11");
    EXPECT_NEAR(inv[0], 0.2, 1.5e-8, "1/||v0||");
    /* h = [1, 1] feature-major (d=2, N=1): u = [1,1]/sqrt 2; z = u.c = [1.4/sqrt 2, 1/sqrt 2]
       = [0.98994949, 0.70710678] */
    float h[2] = {1, 1}, u[2], den[1], zz[2];
    l2norm_rows_forward(u, den, h, 1, 2, 1, 1e-12f);
    matmul_naive('N', 'T', 1, 2, 2, 1.0f, u, 2, c, 2, 0.0f, zz, 2);
    EXPECT_NEAR(den[0], sqrt(2.0), 2e-7, "||h||");
    EXPECT_NEAR(zz[0], 0.98994949, 1e-7, "z0");
    EXPECT_NEAR(zz[1], 0.70710678, 1e-7, "z1");
    /* F.normalize's eps: x = 0 gives u = 0/1e-12 = 0, den = eps, no NaN */
    float x0[2] = {0, 0};
    l2norm_rows_forward(u, den, x0, 1, 2, 1, 1e-12f);
    cr_expect(u[0] == 0.0f && u[1] == 0.0f && den[0] == 1e-12f, "zero vector: u=(%g,%g) den=%g", u[0], u[1], den[0]);
}

/* ------------------------------------------------------------------------------------------------ */
/* Backbone operators on hand cases */
Test(backbone, conv2d_hand_case) {
    /* x = 1..9 as a 3x3 image, w = 3x3 ones, pad 1.
       stride 1: centre = 45, corner (0,0) = 1+2+4+5 = 12, edge (0,1) = 1+2+3+4+5+6 = 21
       stride 2: 2x2 output = [12, 16; 24, 28] (windows at (0,0),(0,2),(2,0),(2,2)) */
    float x[9], w[9], y[9], col[81 * 8];
    for (int i = 0; i < 9; i++) { x[i] = i + 1; w[i] = 1; }
    conv2d_forward(y, x, w, col, 1, 1, 3, 3, 1, 3, 1, 1);
    EXPECT_NEAR(y[4], 45, 0, "centre");
    EXPECT_NEAR(y[0], 12, 0, "corner");
    EXPECT_NEAR(y[1], 21, 0, "edge");
    conv2d_forward(y, x, w, col, 1, 1, 3, 3, 1, 3, 2, 1);
    const float want[4] = {12, 16, 24, 28};
    for (int i = 0; i < 4; i++) EXPECT_NEAR(y[i], want[i], 0, "stride 2 [%d]", i);
}

Test(backbone, batchnorm_train_mode_hand_case) {
    /* y = [1,2,3,4], gamma 1, beta 0: mean 2.5, biased var 1.25, rstd = 1/sqrt(1.25 + 1e-5)
       out = (y - 2.5) rstd = [-1.3416354, -0.4472118, 0.4472118, 1.3416354]
       running: mean 0.9*0 + 0.1*2.5 = 0.25; var 0.9*1 + 0.1*(1.25*4/3) = 0.9 + 0.1666667 = 1.0666667 */
    float y[4] = {1, 2, 3, 4}, out[4], mean, rstd, rm = 0, rv = 1, g = 1, b = 0;
    batchnorm_forward(out, &mean, &rstd, &rm, &rv, y, &g, &b, NULL, 0, 1, 4, 1e-5f, 0.1f, 0, NULL);
    const double want[4] = {-1.3416354, -0.4472118, 0.4472118, 1.3416354};
    for (int i = 0; i < 4; i++) EXPECT_NEAR(out[i], want[i], 3e-7, "out[%d]", i);
    EXPECT_NEAR(mean, 2.5, 0, "mean");
    EXPECT_NEAR(rm, 0.25, 1e-8, "running mean");
    EXPECT_NEAR(rv, 1.0666667, 1.2e-7, "running var (unbiased)");
    /* with ReLU and a residual r = [1,1,1,1]: relu(out + 1) = [0, 0.5527882, 1.4472118, 2.3416354] */
    float res[4] = {1, 1, 1, 1};
    batchnorm_forward(out, &mean, &rstd, NULL, NULL, y, &g, &b, res, 1, 1, 4, 1e-5f, 0.1f, 0, NULL);
    const double want2[4] = {0, 0.5527882, 1.4472118, 2.3416354};
    for (int i = 0; i < 4; i++) EXPECT_NEAR(out[i], want2[i], 3e-7, "out+res, relu [%d]", i);
    /* channels-last, 2 channels interleaved: channel 0 is y, channel 1 is 10 y: mean 25, var 125,
       out = (10y - 25)/sqrt(125 + 1e-5) = (y - 2.5)/sqrt(1.25 + 1e-7) = [-1.3416407, -0.4472136, ...] */
    const double want10[4] = {-1.3416407, -0.4472136, 0.4472136, 1.3416407};
    float y2[8], out2[8], mean2[2], rstd2[2], g2[2] = {1, 1}, b2[2] = {0, 0};
    for (int i = 0; i < 4; i++) {
        y2[2 * i] = y[i];
        y2[2 * i + 1] = 10 * y[i];
    }
    batchnorm_forward(out2, mean2, rstd2, NULL, NULL, y2, g2, b2, NULL, 0, 2, 4, 1e-5f, 0.1f, 1, NULL);
    EXPECT_NEAR(mean2[0], 2.5, 0, "channels-last mean 0");
    EXPECT_NEAR(mean2[1], 25, 0, "channels-last mean 1");
    for (int i = 0; i < 4; i++) {
        EXPECT_NEAR(out2[2 * i], want[i], 3e-7, "channels-last out[%d], channel 0", i);
        EXPECT_NEAR(out2[2 * i + 1], want10[i], 3e-7, "channels-last out[%d], channel 1", i);
    }
}

Test(backbone, maxpool_and_avgpool_hand_case) {
    /* x = 0..15 as 4x4; 3x3/2 pad 1 windows: (0,0) rows/cols -1..1 -> max x[1][1] = 5;
       (0,1) rows -1..1 cols 1..3 -> 7; (1,0) -> 13; (1,1) -> 15 */
    float x[16], out[4], dx[16], dout[4] = {1, 2, 3, 4}, f[1];
    int32_t arg[4];
    for (int i = 0; i < 16; i++) x[i] = i;
    maxpool_forward(out, arg, x, 1, 1, 4, 4);
    const float want[4] = {5, 7, 13, 15};
    for (int i = 0; i < 4; i++) EXPECT_NEAR(out[i], want[i], 0, "maxpool[%d]", i);
    maxpool_backward(dx, dout, arg, 1, 1, 4, 4);
    EXPECT_NEAR(dx[5], 1, 0, "dx at 5");
    EXPECT_NEAR(dx[15], 4, 0, "dx at 15");
    EXPECT_NEAR(dx[0], 0, 0, "dx at 0");
    /* mean of 0..15 = 7.5 */
    avgpool_forward(f, 1, x, 1, 1, 16);
    EXPECT_NEAR(f[0], 7.5, 0, "avgpool");
    /* channels-last, 2 channels: channel 1 = 100 - x, so its maxima sit at the windows' smallest x:
       window (0,0) covers x 0,1,4,5 -> 0; (0,1) rows 0..1 cols 1..3 -> 1; (1,0) rows 1..3 cols 0..1 -> 4;
       (1,1) -> 5. So 100, 99, 96, 95 at pixels 0, 1, 4, 5; its mean is 100 - 7.5 = 92.5 */
    float x2[32], out2[8], f2[2];
    int32_t arg2[8];
    for (int i = 0; i < 16; i++) {
        x2[2 * i] = i;
        x2[2 * i + 1] = 100 - i;
    }
    maxpool_forward(out2, arg2, x2, 2, 1, 4, 4);
    const float want1[4] = {100, 99, 96, 95};
    const int32_t at1[4] = {0, 1, 4, 5};
    for (int i = 0; i < 4; i++) {
        EXPECT_NEAR(out2[2 * i], want[i], 0, "channels-last maxpool[%d], channel 0", i);
        EXPECT_NEAR(out2[2 * i + 1], want1[i], 0, "channels-last maxpool[%d], channel 1", i);
        cr_expect(arg2[2 * i + 1] == at1[i], "channels-last argmax[%d] %d, want %d", i, arg2[2 * i + 1], at1[i]);
    }
    avgpool_forward(f2, 1, x2, 2, 1, 16);
    EXPECT_NEAR(f2[0], 7.5, 0, "channels-last avgpool, channel 0");
    EXPECT_NEAR(f2[1], 92.5, 0, "channels-last avgpool, channel 1");
}

Test(heads, linear_hand_case) {
    /* w = [[1,2],[3,4]], b = [10, 20], x = [1, -1] (in=2, N=1): y = [1-2+10, 3-4+20] = [9, 19] */
    float w[4] = {1, 2, 3, 4}, b[2] = {10, 20}, x[2] = {1, -1}, y[2];
    linear_forward(y, x, w, b, 2, 2, 1);
    EXPECT_NEAR(y[0], 9, 0, "y0");
    EXPECT_NEAR(y[1], 19, 0, "y1");
}

/* oneDNN's GEMM (or the naive one) against the definition, every transpose combination */
Test(gemm, matmul_matches_naive) {
    enum { M = 37, N = 53, K = 29 };
    static float A[M * K], B[K * N], C[M * N], R[M * N];
    fill_normal(A, M * K, 1, 1);
    fill_normal(B, K * N, 2, 1);
    const char t[2] = {'N', 'T'};
    for (int a = 0; a < 2; a++)
        for (int b = 0; b < 2; b++) {
            int lda = t[a] == 'N' ? K : M, ldb = t[b] == 'N' ? N : K;
            fill_normal(C, M * N, 3, 1);
            memcpy(R, C, sizeof C);
            matmul(t[a], t[b], M, N, K, 0.5f, A, lda, B, ldb, 0.25f, C, N);
            matmul_naive(t[a], t[b], M, N, K, 0.5f, A, lda, B, ldb, 0.25f, R, N);
            /* sums of 29 products of N(0,1) values: float rounding ~ 29 * 6e-8 * |terms| */
            double e = rel_err(C, R, M * N);
            cr_expect(e < 2e-6, "%c%c: relative error %.3g", t[a], t[b], e);
        }
}

/* ------------------------------------------------------------------------------------------------ */
/* Schedules (Appendix A), EMA (E9), SGD groups (E14) */
Test(schedules, learning_rate) {
    /* W = 10, T = 100, peak 0.6, min 0.6e-4 = 6e-5:
       t=5 (warm-up): 0.6*5/10 = 0.3; t=10: cos(0) = 1 -> 0.6; t=55: cos(pi/2) = 0 ->
       6e-5 + 0.5*(0.6 - 6e-5) = 0.30003; t=100: cos(pi) = -1 -> 6e-5 */
    EXPECT_NEAR(lr_at(5, 100, 10, 0.6, 1e-4), 0.3, 1e-15, "warm-up");
    EXPECT_NEAR(lr_at(10, 100, 10, 0.6, 1e-4), 0.6, 1e-15, "peak");
    EXPECT_NEAR(lr_at(55, 100, 10, 0.6, 1e-4), 0.30003, 1e-12, "half-way");
    EXPECT_NEAR(lr_at(100, 100, 10, 0.6, 1e-4), 6e-5, 1e-15, "end");
    /* a warm-up as long as the run (warmup_epochs = epochs): the last step's cosine would be 0/0; DINO's
       scheduler then has no cosine part, so the run ends at the peak: t=64 of T=W=64 -> 0.6 */
    EXPECT_NEAR(lr_at(63, 64, 64, 0.6, 1e-4), 0.6 * 63 / 64, 1e-15, "warm-up to the end");
    EXPECT_NEAR(lr_at(64, 64, 64, 0.6, 1e-4), 0.6, 1e-15, "warm-up as long as the run, last step");
}

Test(schedules, centroid_weight_decay_wdx10c1) {
    /* wd (1 + 9 (1 + cos(pi t/T))/2): t=0 -> 10 wd = 1e-3; t=T/2 -> 5.5 wd; t=T -> wd */
    EXPECT_NEAR(centroid_wd_at(0, 100, 1e-4, 9), 1e-3, 1e-18, "start");
    EXPECT_NEAR(centroid_wd_at(50, 100, 1e-4, 9), 5.5e-4, 1e-18, "middle");
    EXPECT_NEAR(centroid_wd_at(100, 100, 1e-4, 9), 1e-4, 1e-18, "end");
}

Test(schedules, teacher_momentum_and_crop_scale) {
    /* 1 - 0.004 (1 + cos(pi t/T))/2: 0 -> 0.996; 25 % -> 1 - 0.002*(1 + 0.70711) = 0.99658579;
       50 % -> 0.998; 75 % -> 0.99941421; 100 % -> 1 (paper_notes.md §7: 0.99659 / 0.998 / 0.99941) */
    EXPECT_NEAR(ema_momentum_at(0, 1000, 0.996), 0.996, 1e-15, "start");
    EXPECT_NEAR(ema_momentum_at(250, 1000, 0.996), 0.99658579, 1e-8, "25 %%");
    EXPECT_NEAR(ema_momentum_at(500, 1000, 0.996), 0.998, 1e-15, "50 %%");
    EXPECT_NEAR(ema_momentum_at(750, 1000, 0.996), 0.99941421, 1e-8, "75 %%");
    EXPECT_NEAR(ema_momentum_at(1000, 1000, 0.996), 1.0, 1e-15, "end");
    /* s_min(e) = 0.14 + 0.06 (1 + cos(pi e/E)), E = 400 (paper_notes.md §7):
       0 -> 0.26, 100 -> 0.14 + 0.06*1.70711 = 0.24243, 200 -> 0.20, 300 -> 0.15757, 399 -> 0.14000 */
    EXPECT_NEAR(crop_scale_min_at(0, 400), 0.26, 1e-15, "e=0");
    EXPECT_NEAR(crop_scale_min_at(100, 400), 0.2424264, 1e-7, "e=100");
    EXPECT_NEAR(crop_scale_min_at(200, 400), 0.20, 1e-15, "e=200");
    EXPECT_NEAR(crop_scale_min_at(300, 400), 0.1575736, 1e-7, "e=300");
    EXPECT_NEAR(crop_scale_min_at(399, 400), 0.1400019, 1e-7, "e=399");
}

Test(teacher, E9_ema) {
    /* m = 0.5: t = 2*0.5 + 4*0.5 = 3;  m = 0.996: t = 1*0.996f + 0*0.004f = 0.996f */
    float t[2] = {2, 1}, s[2] = {4, 0};
    ema_update(t, s, 1, 0.5);
    EXPECT_NEAR(t[0], 3, 0, "m=0.5");
    ema_update(t + 1, s + 1, 1, 0.996);
    cr_expect(t[1] == 0.996f, "m=0.996: %.9g", t[1]);
}

Test(optimiser, E14_sgd_groups) {
    ExcbConfig cfg;
    ExcbModel m;
    excb_config_named(&cfg, "tiny");
    cr_assert(excb_build(&m, &cfg) == 0);
    int iw = excb_find_tensor(&m, "backbone.layer1.0.conv1.weight");
    int ib = excb_find_tensor(&m, "backbone.layer1.0.bn1.weight");
    int il = excb_find_tensor(&m, "classifier.projector.mlp.0.bias");
    int ic = excb_find_tensor(&m, "classifier.centroid_layer.weight_v");
    cr_assert(iw >= 0 && ib >= 0 && il >= 0 && ic >= 0, "named tensors exist");
    cr_expect(m.tensors[iw].group == EXCB_GROUP_WEIGHT, "conv weight decays");
    cr_expect(m.tensors[ib].group == EXCB_GROUP_NO_DECAY, "BN gamma does not");
    cr_expect(m.tensors[il].group == EXCB_GROUP_NO_DECAY, "linear bias does not");
    cr_expect(m.tensors[ic].group == EXCB_GROUP_CENTROID, "centroids have their own group");
    /* p = 1, g = 0.5, buf = 0.2, lr = 0.1, momentum 0.9:
       weight (wd 0.1):    g' = 0.6,  buf = 0.18 + 0.6 = 0.78, p = 1 - 0.078 = 0.922
       no decay:           g' = 0.5,  buf = 0.68,             p = 0.932
       centroid (wd 0.3):  g' = 0.8,  buf = 0.98,             p = 0.902 */
    int idx[3] = {iw, il, ic};
    for (int j = 0; j < 3; j++) {
        size_t o = m.tensors[idx[j]].offset;
        m.params[o] = 1; m.grads[o] = 0.5f; m.momentum[o] = 0.2f;
    }
    sgd_update(&m, 0.1, 0.1, 0.3);
    const double pw[3] = {0.922, 0.932, 0.902}, bw[3] = {0.78, 0.68, 0.98};
    for (int j = 0; j < 3; j++) {
        size_t o = m.tensors[idx[j]].offset;
        EXPECT_NEAR(m.momentum[o], bw[j], 1.2e-7, "buf, group %d", j);
        EXPECT_NEAR(m.params[o], pw[j], 1.2e-7, "param, group %d", j);
    }
    excb_free(&m);
}

/* ------------------------------------------------------------------------------------------------ */
/* Building blocks: float16 rounding (A4), counter-based randomness, the parameter table */
Test(numerics, fp16_rounding) {
    /* 0.001 = 1048.576 * 2^-20 -> 1049 * 2^-20 = 0.00100040436; subnormal 1e-7 = 1.68 * 2^-24 -> 2^-23 */
    cr_expect(excb_round_fp16(0.001f) == 1049.0f * 0x1.0p-20f, "fp16(0.001) = %.9g", excb_round_fp16(0.001f));
    cr_expect(excb_round_fp16(1e-7f) == 0x1.0p-23f, "fp16(1e-7) = %.9g", excb_round_fp16(1e-7f));
    cr_expect(excb_round_fp16(65520.0f) == INFINITY, "65520 rounds to inf in binary16");
    /* the software rounding (for compilers without _Float16) equals the hardware one on every 997th
       float bit pattern: 4.3 million values across all binades, subnormals, ties and infinities */
    float hs[3] = {0.001f, 1e-7f, 65520.0f};
    for (int i = 0; i < 3; i++) cr_expect(excb_round_fp16_soft(hs[i]) == excb_round_fp16(hs[i]));
    long mismatches = 0;
    for (uint64_t bits = 0; bits < (1ull << 32); bits += 997) {
        uint32_t b = (uint32_t)bits;
        float x;
        memcpy(&x, &b, 4);
        float h = excb_round_fp16(x), sw = excb_round_fp16_soft(x);
        if (!(h == sw || (isnan(h) && isnan(sw))) || signbit(h) != signbit(sw)) mismatches++;
    }
    cr_expect_eq(mismatches, 0, "software fp16 rounding differs on %ld values", mismatches);
}

Test(numerics, counter_based_rng) {
    /* two counters of one stream are independent across keys: P(u1 < 1/2 and u2 < 1/2) = 1/4 within
       5 sigma (sigma = sqrt(3/16 / 1e5) = 1.4e-3). With the counter XORed on at the end, as in an
       earlier version, u2 was u1 XOR a fixed mask and this rate was 0 or 1/2. */
    long both = 0;
    for (uint64_t key = 0; key < 100000; key++)
        both += excb_uniform(0, EXCB_RNG_VIEW, 7, key, 1) < 0.5f && excb_uniform(0, EXCB_RNG_VIEW, 7, key, 2) < 0.5f;
    EXPECT_NEAR(both / 1e5, 0.25, 5 * 1.37e-3, "joint rate of two counters");
    cr_expect(excb_uniform(1, 2, 3, 4, 5) == excb_uniform(1, 2, 3, 4, 5), "pure function of the key");
    cr_expect(excb_uniform(1, 2, 3, 4, 5) != excb_uniform(1, 2, 3, 4, 6), "counter changes the value");
    cr_expect(excb_uniform(1, 2, 3, 4, 5) != excb_uniform(2, 2, 3, 4, 5), "seed changes the value");
    /* moments of 200k draws: mean 1/2 +- 3 sigma (sigma = sqrt(1/12/2e5) = 6.5e-4); normal mean 0
       +- 3 * 2.2e-3, variance 1 +- 3 * sqrt(2/2e5) = 1 +- 9.5e-3 */
    double su = 0, sn = 0, sn2 = 0;
    const int n = 200000;
    for (int i = 0; i < n; i++) {
        float u = excb_uniform(9, 1, 0, 0, i), z = excb_normal(9, 1, 0, 0, i);
        cr_assert(u >= 0.0f && u < 1.0f, "uniform out of [0,1): %g", u);
        su += u;
        sn += z;
        sn2 += (double)z * z;
    }
    EXPECT_NEAR(su / n, 0.5, 3 * 6.5e-4, "uniform mean");
    EXPECT_NEAR(sn / n, 0.0, 3 * 2.24e-3, "normal mean");
    EXPECT_NEAR(sn2 / n, 1.0, 9.5e-3, "normal variance");
}

Test(model, parameter_table_matches_pytorch_shapes) {
    /* resnet20s: ResNet-20 (16/32/64, 3 blocks per stage) + heads 64->512->512->256, 256->512->256,
       K = 4096. Conv weights: 144 + 9*(16*16*9 ... ) counted by the table; check a few by name. */
    ExcbConfig cfg;
    ExcbModel m;
    excb_config_named(&cfg, "resnet20s");
    cfg.batch = 2;
    cr_assert(excb_build(&m, &cfg) == 0);
    cr_expect(m.D == 64, "D = %d", m.D);
    int t = excb_find_tensor(&m, "backbone.layer2.0.downsample.0.weight");
    cr_assert(t >= 0);
    cr_expect(m.tensors[t].shape[0] == 32 && m.tensors[t].shape[1] == 16 && m.tensors[t].shape[2] == 1, "downsample shape");
    t = excb_find_tensor(&m, "classifier.centroid_layer.weight_v");
    cr_expect(m.tensors[t].shape[0] == 4096 && m.tensors[t].shape[1] == 256, "centroid shape");
    cr_expect(excb_find_tensor(&m, "backbone.layer1.0.downsample.0.weight") < 0, "no downsample in layer1");
    /* zero_init_residual: the last BN gamma of every block is 0, the others 1 */
    t = excb_find_tensor(&m, "backbone.layer3.2.bn2.weight");
    cr_expect(m.params[m.tensors[t].offset] == 0.0f, "layer3.2.bn2.weight zero-initialised");
    t = excb_find_tensor(&m, "backbone.layer3.2.bn1.weight");
    cr_expect(m.params[m.tensors[t].offset] == 1.0f, "layer3.2.bn1.weight is 1");
    /* the number of trainable parameters, counted by hand:
       stem 1*16*9 + BN 32 = 176
       stage 1: 3 blocks x (2 convs 16*16*9 = 2304 + 2 BN x 32) = 3 x 4672 = 14016
       stage 2: block 0: 16*32*9 + 32*32*9 + ds 16*32 + 3 BN x 64 = 4608 + 9216 + 512 + 192 = 14528;
                blocks 1,2: 2 x (2 x 9216 + 128) = 37120         -> 51648
       stage 3: block 0: 32*64*9 + 64*64*9 + 32*64 + 3 x 128 = 18432 + 36864 + 2048 + 384 = 57728;
                blocks 1,2: 2 x (2 x 36864 + 256) = 147968         -> 205696
       backbone 271536; projector 64*512+512 + 1024 + 512*512+512 + 1024 + 512*256+256
         = 33280 + 1024 + 262656 + 1024 + 131328 = 429312;
       predictor 256*512+512 + 1024 + 512*256+256 = 131584 + 1024 + 131328 = 263936;
       centroids 4096*256 = 1048576; BN(256) 512
       total 271536 + 429312 + 263936 + 1048576 + 512 = 2013872 */
    size_t total = 0;
    for (int i = 0; i < m.n_tensors; i++) total += m.tensors[i].numel;
    cr_expect(total == 2013872, "trainable parameters %zu, want 2013872", total);
    /* conv BNs: stem 1 + stage 1 (3 blocks x 2) 6 + stages 2, 3 (6 + 1 shortcut) 7 each = 21;
       + 2 projector BNs + 1 predictor BN + BN(d) = 25 running-statistics blocks, each mean 0 and
       variance 1 at the start, for student and teacher */
    cr_expect(m.n_bn == 25, "BatchNorms: %d, want 25", m.n_bn);
    int bad = 0;
    for (int b = 0; b < m.n_bn; b++)
        for (int c = 0; c < m.bn_channels[b]; c++) {
            bad += m.running[m.bn_stats[b] + c] != 0.0f || m.running[m.bn_stats[b] + m.bn_channels[b] + c] != 1.0f;
            bad += m.teacher_running[m.bn_stats[b] + c] != 0.0f;
        }
    cr_expect(bad == 0, "%d running statistics not initialised to mean 0, var 1", bad);
    excb_free(&m);
}

Test(model, memory_plan_counted_by_hand) {
    /* tiny: basic blocks, CIFAR stem, 1 channel, widths 4/8/8, one block per stage, 2 x 8^2 global and
       6 x 4^2 local crops of B = 4 images, hidden 16, d 8, K 16. Every buffer is rounded up to 16 floats.
       Global crops, N = 8 images:
         input 1*8*8*8 = 512
         stem 3x3/1, 4 x 8^2: y, a 4*8*64 = 2048 each, mean and rstd 4 -> 16 each: 4128
         block 0 (4 -> 4, stride 1, no shortcut): 2 units as the stem: 8256
         block 1 (4 -> 8, stride 2), 8 x 4^2: n = 8*8*16 = 1024; 2 main units 2*(1024+1024+32) = 4160,
           shortcut 1024+1024+32 = 2080 -> 6240
         block 2 (8 -> 8, stride 2), 8 x 2^2: n = 256; 2*(256+256+32) = 1088 + shortcut 544 -> 1632
         sum 512 + 4128 + 8256 + 6240 + 1632 = 20768 floats = 83072 bytes
       Local crops, N = 24 at 4^2: input 384; stem n = 4*24*16 = 1536: 3104; block 0: 6208;
         block 1, n = 8*24*4 = 768: 3 units of 768+768+32 = 4704; block 2, n = 192: 3 of 416 = 1248
         sum 384 + 3104 + 6208 + 4704 + 1248 = 15648 floats = 62592 bytes
       Backward scratch: the largest backbone buffer is the global stem's 2048 floats, three of them 6144;
         head buffers: max(D 8, hidden 16, d 8) x 32 rows = 512, the fourth max(512, K*d = 128): 4*512 = 2048;
         6144 + 2048 = 8192 floats = 32768 bytes
       GPU packed copies: two of the largest backbone buffer, 2 * 2048 floats = 16384 bytes
       GPU layout: the shortcuts' BN outputs live in a gradient buffer: 1024 + 256 + 768 + 192 = 2240
         floats = 8960 bytes less */
    ExcbConfig cfg;
    excb_config_named(&cfg, "tiny");
    cfg.threads = 1;
    ExcbMemoryPlan p;
    cr_assert(excb_memory_plan(&cfg, &p) == 0);
    cr_expect(p.acts_global == 83072, "global activations %zu bytes, want 83072", p.acts_global);
    cr_expect(p.acts_local == 62592, "local activations %zu bytes, want 62592", p.acts_local);
    cr_expect(p.backward == 32768, "backward scratch %zu bytes, want 32768", p.backward);
    cr_expect(p.gpu_packed == 16384, "packed copies %zu bytes, want 16384", p.gpu_packed);
    cr_expect(p.gpu_shared_shortcuts == 8960, "GPU saving %zu bytes, want 8960", p.gpu_shared_shortcuts);
    /* the plan is what excb_build allocates; the device layout is the plan less the CPU scratch and the
       shortcuts' outputs, which then point at the first gradient buffer */
    ExcbModel m;
    cr_assert(excb_build(&m, &cfg) == 0);
    size_t planned = p.acts_global + p.acts_local + p.heads + p.backward + p.cpu_scratch;
    cr_expect(planned == sizeof(real) * m.arena_floats, "plan %zu bytes, arena %zu", planned, sizeof(real) * m.arena_floats);
    cr_expect(p.params == 4 * sizeof(real) * m.n_params, "parameter buffers");
    int shortcuts = 0;
    for (int b = 0; b < m.n_blocks; b++)
        if (m.blocks[b].has_down) {
            shortcuts++;
            cr_expect(m.act_global.down[b].a != m.dbuf[0] && m.act_local.down[b].a != m.dbuf[0], "CPU block %d", b);
        }
    cr_expect(shortcuts == 2, "tiny has %d shortcuts, want 2", shortcuts);
    real *cpu_arena = m.arena;
    size_t device = excb_plan_arena(&m, cpu_arena);        /* re-laid in place: the layout shrinks */
    cr_expect(sizeof(real) * device == planned - p.cpu_scratch - p.gpu_shared_shortcuts, "device layout %zu floats", device);
    cr_expect(m.col == NULL && m.slots == NULL, "the device layout has no CPU scratch");
    for (int b = 0; b < m.n_blocks; b++)
        if (m.blocks[b].has_down)
            cr_expect(m.act_global.down[b].a == m.dbuf[0] && m.act_local.down[b].a == m.dbuf[0], "GPU block %d", b);
    excb_free(&m);
    cfg.batch = 1;                                   /* a bad configuration is refused, not planned */
    cr_expect(excb_memory_plan(&cfg, &p) == -1);
}
