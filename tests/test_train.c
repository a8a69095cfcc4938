/* test_train.c: the pieces of a run, each on a case small enough to compute by hand: the config file
 * and --set, spherical k-means, checkpoints (round trip, damage, mismatch), the weighted k-NN, the linear
 * probe (its loss, gradient and a separable case) and the clustering metrics (NMI, AMI, ARI,
 * many-to-one, Hungarian). The whole-run checks (resume exactness, kill -9, the divergence guard, a
 * short training run) are in test_train_e2e.c. */
#define _DEFAULT_SOURCE
#include "testutil.h"
#include <jansson.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

/* ---- config files and --set --------------------------------------------------------------------- */
Test(config, precedence_preset_then_file_then_set) {
    ExcbRunConfig rc;
    char err[EXCB_ERR_LEN];
    memset(&rc, 0, sizeof rc);
    /* the file names its preset first, then overrides two keys; --set overrides one of them again */
    const char *file = "# a comment\npreset = cifar10-r18\nK = 512   # trailing comment\n\nlr=0.3\n";
    cr_assert_eq(excb_config_parse(&rc, file, "f.conf", err), 0, "%s", err);
    cr_assert_eq(excb_config_set(&rc, "K", "256", err), 0, "%s", err);
    cr_assert_eq(excb_config_validate(&rc, err), 0, "%s", err);
    cr_expect_str_eq(rc.preset, "cifar10-r18");
    cr_expect_eq(rc.model.K, 256, "--set beats the file");
    cr_expect_eq(rc.model.lr_peak, 0.3, "the file beats the preset");
    cr_expect_eq(rc.model.widths[3], 512, "untouched keys keep the preset's value (ResNet-18 stage 4)");
    cr_expect_eq(rc.model.n_stages, 4);
    /* a command-line preset wins over the file's preset line */
    memset(&rc, 0, sizeof rc);
    cr_assert_eq(excb_preset(&rc, "stl10-r18", err), 0);
    cr_assert_eq(excb_config_parse(&rc, "preset = cifar10-r18\nepochs = 7\n", "g.conf", err), 0, "%s", err);
    cr_expect_str_eq(rc.preset, "stl10-r18");
    cr_expect_eq(rc.model.global_size, 96);
    cr_expect_eq(rc.epochs, 7);
}

/* paths with a '#', blanks at either end, a newline, quotes, backslashes and control bytes come back
   byte for byte through config.txt's quoted form; bare hand-written values keep their old meaning */
Test(config, string_values_with_any_byte_survive_the_dump) {
    static const char *paths[] = {"/data/set #2", " lead and trail ", "/a\nb", "q\"uo\\te\\", "\t\x01\x1f\x7f end",
                                  "#", "\\x41 is not an escape here", "plain/path"};
    char err[EXCB_ERR_LEN];
    for (size_t i = 0; i < sizeof paths / sizeof paths[0]; i++) {
        ExcbRunConfig a, b;
        excb_preset(&a, "tiny", err);
        cr_assert_eq(excb_config_set(&a, "data", paths[i], err), 0, "%s", err);
        char *text = excb_config_dump(&a, 0);
        memset(&b, 0, sizeof b);
        cr_assert_eq(excb_config_parse(&b, text, "config.txt", err), 0, "path %zu: %s", i, err);
        cr_expect_str_eq(b.data, paths[i], "path %zu came back different", i);
        cr_expect_eq(excb_config_compatible(&a, &b, err), 0, "%s", err);
        free(text);
    }
    ExcbRunConfig c;
    memset(&c, 0, sizeof c);
    cr_assert_eq(excb_config_parse(&c, "data = \"/x #1\"  # the set\ntrain_split = train  # bare\n", "h.conf", err), 0, "%s", err);
    cr_expect_str_eq(c.data, "/x #1");
    cr_expect_str_eq(c.train_split, "train", "a bare value ends at the comment, blanks trimmed");
    /* malformed quoted values are refused with the line and the reason */
    const char *bad[][2] = {{"data = \"/x\n", "unterminated"}, {"data = \"/x\\q\"\n", "unknown escape"},
                            {"data = \"/x\" tail\n", "after the closing quote"}, {"data = \"\\x00\"\n", "NUL"}};
    for (int i = 0; i < 4; i++) {
        memset(&c, 0, sizeof c);
        cr_expect_eq(excb_config_parse(&c, bad[i][0], "bad.conf", err), EXCB_EXIT_CONFIG, "case %d accepted", i);
        cr_expect(strstr(err, "bad.conf:1") && strstr(err, bad[i][1]), "case %d: %s", i, err);
    }
}

/* the JSON dump (metrics.jsonl's run record) is JSON for any path: a Latin-1 byte, an overlong form, a
   surrogate and a truncated sequence come out as \u00XX escapes, well-formed UTF-8 as it is */
Test(config, the_json_dump_parses_whatever_bytes_a_path_holds) {
    static const char *paths[] = {"caf\xe9/\xff", "\xc0\xaf overlong", "\xed\xa0\x80 surrogate", "cut \xe2\x82",
                                  "\xc3\xa9t\xc3\xa9 \xf0\x9f\x98\x80 ok", "q\"uo\\te"};
    static const char *want[] = {"caf\\u00e9/\\u00ff", "\\u00c0\\u00af overlong", "\\u00ed\\u00a0\\u0080 surrogate",
                                 "cut \\u00e2\\u0082", "\xc3\xa9t\xc3\xa9 \xf0\x9f\x98\x80 ok", "q\\\"uo\\\\te"};
    char err[EXCB_ERR_LEN];
    for (size_t i = 0; i < sizeof paths / sizeof paths[0]; i++) {
        ExcbRunConfig a;
        excb_preset(&a, "tiny", err);
        cr_assert_eq(excb_config_set(&a, "data", paths[i], err), 0, "%s", err);
        char *text = excb_config_dump(&a, 1);
        json_error_t je;
        json_t *o = json_loads(text, 0, &je);
        cr_assert(o, "path %zu: the dump is not JSON: %s", i, je.text);
        const char *data = json_string_value(json_object_get(o, "data"));
        /* the escapes read back as the code points of the bytes: compare with the expected text, parsed */
        char expect[256];
        snprintf(expect, sizeof expect, "{\"d\":\"%s\"}", want[i]);
        json_t *w = json_loads(expect, 0, &je);
        cr_assert(w, "expected %zu: %s", i, je.text);
        cr_expect_str_eq(data, json_string_value(json_object_get(w, "d")), "path %zu", i);
        json_decref(o);
        json_decref(w);
        free(text);
    }
}

Test(config, dump_parse_round_trip_is_exact) {
    ExcbRunConfig a, b;
    char err[EXCB_ERR_LEN];
    excb_preset(&a, "fashion-mnist", err);
    excb_config_set(&a, "lr", "0.1", err);                  /* 0.1 is not a binary fraction: %.17g must round-trip */
    excb_config_set(&a, "knn_k", "5,7", err);
    excb_config_set(&a, "seed", "18446744073709551615", err);
    cr_assert_eq(excb_config_validate(&a, err), 0, "%s", err);
    char *text = excb_config_dump(&a, 0);
    memset(&b, 0, sizeof b);
    cr_assert_eq(excb_config_parse(&b, text, "dump", err), 0, "%s", err);
    cr_assert_eq(excb_config_validate(&b, err), 0, "%s", err);
    char *again = excb_config_dump(&b, 0);
    cr_expect_str_eq(again, text);
    cr_expect_eq(b.model.lr_peak, 0.1);
    cr_expect_eq(b.model.seed, UINT64_MAX);
    cr_expect_eq(b.n_knn_ks, 2);
    cr_expect_eq(excb_config_compatible(&a, &b, err), 0, "%s", err);
    b.model.K = 2048;
    cr_expect_eq(excb_config_compatible(&a, &b, err), EXCB_EXIT_CONFIG);
    cr_expect(strstr(err, "'K'") != NULL, "%s", err);
    free(text);
    free(again);
}

/* the value of `key` in a config dump, as text */
static void dumped_value(const ExcbRunConfig *rc, const char *key, char *out, size_t cap) {
    char *text = excb_config_dump(rc, 0), pattern[64];
    snprintf(pattern, sizeof pattern, "\n%s = ", key);
    const char *at = strstr(text, pattern);
    cr_assert(at != NULL, "no '%s' in the dump", key);
    at += strlen(pattern);
    size_t n = strcspn(at, "\n");
    cr_assert_lt(n, cap);
    memcpy(out, at, n);
    out[n] = 0;
    free(text);
}

/* Numbers are written in the fewest significant digits that read back as the same double: what a
   user typed comes back as typed (0.6, not %.17g's 0.59999999999999998), and nothing is lost. */
Test(config, doubles_are_written_shortest_and_read_back_exactly) {
    ExcbRunConfig rc;
    char err[EXCB_ERR_LEN], v[64];
    excb_preset(&rc, "fashion-mnist", err);
    const struct { const char *in, *out; } cases[] = {
        {"0.6", "0.6"}, {"0.1", "0.1"}, {"1e-6", "1e-06"}, {"0.04", "0.04"}, {"3", "3"}, {"-0.5", "-0.5"},
        {"0.30000000000000004", "0.30000000000000004"},   /* 0.1 + 0.2: needs all 17 digits              */
        {"100", "100"}, {"1.2e5", "120000"}, {"1e22", "1e+22"}, {"2.5e-300", "2.5e-300"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        cr_assert_eq(excb_config_set(&rc, "lr", cases[i].in, err), 0, "%s", err);
        dumped_value(&rc, "lr", v, sizeof v);
        cr_expect_str_eq(v, cases[i].out, "lr = %s was written as %s", cases[i].in, v);
    }
    /* 20,000 doubles with random bits (finite ones): each reads back exactly, and one digit fewer would not */
    uint64_t state = 0x9E3779B97F4A7C15ull;
    for (int i = 0, checked = 0; checked < 20000; i++) {
        state = state * 6364136223846793005ull + 1442695040888963407ull;
        uint64_t bits = state ^ (state >> 29);
        double x;
        memcpy(&x, &bits, sizeof x);
        if (!isfinite(x)) continue;
        checked++;
        rc.model.lr_peak = x;
        dumped_value(&rc, "lr", v, sizeof v);
        cr_assert_eq(strtod(v, NULL), x, "%s does not read back as %.17g", v, x);
        /* significant digits: the mantissa's, without leading zeros or the zeros that end an integer */
        const char *p = v + (v[0] == '-');
        while (*p == '0' || *p == '.') p++;
        int digits = 0, zeros = 0;
        for (; *p && *p != 'e'; p++)
            if (*p >= '0' && *p <= '9') { digits++; zeros = *p == '0' ? zeros + 1 : 0; }
        if (!strchr(v, '.')) digits -= zeros;
        char shorter[64];
        if (digits > 1) {
            snprintf(shorter, sizeof shorter, "%.*g", digits - 1, x);
            cr_assert_neq(strtod(shorter, NULL), x, "%s would do for %s", shorter, v);
        }
    }
}

static void expect_set_fails(const char *key, const char *value, const char *must) {
    ExcbRunConfig rc;
    char err[EXCB_ERR_LEN] = "";
    excb_preset(&rc, "fashion-mnist", err);
    cr_expect_eq(excb_config_set(&rc, key, value, err), EXCB_EXIT_CONFIG, "%s=%s accepted", key, value);
    cr_expect(strstr(err, must) != NULL, "message '%s' lacks '%s'", err, must);
}

Test(config, bad_settings_are_errors_that_name_the_key) {
    expect_set_fails("learning_rate", "0.1", "unknown key 'learning_rate'");
    expect_set_fails("K", "12x", "'K' needs an integer");
    expect_set_fails("K", "", "'K' needs an integer");
    expect_set_fails("K", "99999999999", "'K' needs an integer");
    expect_set_fails("lr", "nan", "'lr' needs a finite number");
    expect_set_fails("seed", "-1", "'seed' needs an unsigned");
    expect_set_fails("widths", "16,0,64", "'widths' needs 1 to 4 positive");
    expect_set_fails("widths", "1,2,3,4,5", "'widths' needs 1 to 4 positive");
    expect_set_fails("blur", "sometimes", "'blur' is as-run or as-configured or none");
    expect_set_fails("block", "wide", "'block' is basic or bottleneck");
    ExcbRunConfig rc;
    char err[EXCB_ERR_LEN] = "";
    memset(&rc, 0, sizeof rc);
    cr_expect_eq(excb_config_parse(&rc, "K = 8\npreset = tiny\n", "late.conf", err), EXCB_EXIT_CONFIG);
    cr_expect(strstr(err, "late.conf:2") && strstr(err, "'preset' must come before"), "%s", err);
    memset(&rc, 0, sizeof rc);
    cr_expect_eq(excb_config_parse(&rc, "K 8\n", "noeq.conf", err), EXCB_EXIT_CONFIG);
    cr_expect(strstr(err, "noeq.conf:1: expected 'key = value'"), "%s", err);
    memset(&rc, 0, sizeof rc);
    cr_expect_eq(excb_config_parse(&rc, "preset = huge\n", "p.conf", err), EXCB_EXIT_CONFIG);
    cr_expect(strstr(err, "unknown preset 'huge'"), "%s", err);
    /* cross-key rules */
    excb_preset(&rc, "fashion-mnist", err);
    excb_config_set(&rc, "widths", "16,32", err);
    cr_expect_eq(excb_config_validate(&rc, err), EXCB_EXIT_CONFIG);
    cr_expect(strstr(err, "widths has 2 stages but blocks has 3"), "%s", err);
    excb_preset(&rc, "fashion-mnist", err);
    excb_config_set(&rc, "kmeans_samples", "1000", err);       /* K = 1024 */
    cr_expect_eq(excb_config_validate(&rc, err), EXCB_EXIT_CONFIG);
    cr_expect(strstr(err, "k-means needs at least K samples"), "%s", err);
}

/* ---- spherical k-means (paper_notes.md §9) --------------------------------------------------------- */
#define DEG (M_PI / 180.0)
Test(kmeans, two_clusters_on_the_circle_by_hand) {
    /* points at 0, 10, 80 and 90 degrees; from any two distinct seeds Lloyd ends at {0,10} and {80,90}
       (with seeds 0 and 10: c2 = mean of 10, 80, 90 ~ 60 deg, then 10 deg moves to c1). Unit centroids
       at 5 and 85 degrees; the student's means: ((1 + cos 10)/2, sin 10 / 2) = (0.99240388, 0.08682409),
       whose norm is cos 5 = 0.99619470. */
    double ang[4] = {0, 10, 80, 90};
    float x[8], c[4], cn[4];
    int32_t assign[4];
    for (int i = 0; i < 4; i++) { x[2 * i] = cos(ang[i] * DEG); x[2 * i + 1] = sin(ang[i] * DEG); }
    for (uint64_t seed = 0; seed < 6; seed++) {
        int empty = -1;
        int restarts = excb_spherical_kmeans(x, 4, 2, 2, 10, 5, seed, c, cn, assign, &empty);
        cr_assert_eq(restarts, 0, "seed %llu: restarts %d", (unsigned long long)seed, restarts);
        cr_expect_eq(empty, 0);
        int a = assign[0];                                  /* which index holds the 5-degree cluster */
        cr_expect(assign[1] == a && assign[2] == 1 - a && assign[3] == 1 - a, "seed %llu: assignment", (unsigned long long)seed);
        EXPECT_NEAR(c[2 * a], cos(5 * DEG), 1e-6, "unit centroid x");
        EXPECT_NEAR(c[2 * a + 1], sin(5 * DEG), 1e-6, "unit centroid y");
        EXPECT_NEAR(c[2 * (1 - a)], cos(85 * DEG), 1e-6, "unit centroid x");
        EXPECT_NEAR(cn[2 * a], 0.99240388, 1e-6, "student mean x");
        EXPECT_NEAR(cn[2 * a + 1], 0.08682409, 1e-6, "student mean y");
        EXPECT_NEAR(hypot(cn[2 * a], cn[2 * a + 1]), 0.99619470, 1e-6, "student mean norm = cos 5");
    }
}

Test(kmeans, restarts_while_a_cluster_is_empty_then_gives_up) {
    /* two distinct points and K = 3: every restart ends with an empty cluster */
    float x[6] = {1, 0, 1, 0, 0, 1}, c[6], cn[6];
    int32_t assign[3];
    int empty = 0;
    cr_expect_eq(excb_spherical_kmeans(x, 3, 2, 3, 5, 4, 1, c, cn, assign, &empty), -1);
    cr_expect_eq(empty, 1);
}

Test(kmeans, same_result_for_any_thread_count) {
    int n = 3000, d = 16, K = 64;
    float *x = malloc(sizeof(float) * n * d), *c1 = malloc(sizeof(float) * K * d), *c2 = malloc(sizeof(float) * K * d);
    float *m1 = malloc(sizeof(float) * K * d), *m2 = malloc(sizeof(float) * K * d);
    int32_t *a1 = malloc(sizeof(int32_t) * n), *a2 = malloc(sizeof(int32_t) * n);
    fill_normal(x, (size_t)n * d, 31, 1.0f);
    for (int i = 0; i < n; i++) {
        double s = 0;
        for (int j = 0; j < d; j++) s += x[i * d + j] * x[i * d + j];
        for (int j = 0; j < d; j++) x[i * d + j] /= sqrt(s);
    }
    excb_set_threads(1);
    int r1 = excb_spherical_kmeans(x, n, d, K, 20, 5, 3, c1, m1, a1, NULL);
    excb_set_threads(2);
    int r2 = excb_spherical_kmeans(x, n, d, K, 20, 5, 3, c2, m2, a2, NULL);
    cr_expect_eq(r1, r2);
    cr_expect(r1 >= 0, "3000 points, 64 clusters: no empty cluster expected");
    cr_expect_eq(memcmp(c1, c2, sizeof(float) * K * d), 0, "unit centroids differ between 1 and 2 threads");
    cr_expect_eq(memcmp(m1, m2, sizeof(float) * K * d), 0, "means differ");
    cr_expect_eq(memcmp(a1, a2, sizeof(int32_t) * n), 0, "assignments differ");
    free(x); free(c1); free(c2); free(m1); free(m2); free(a1); free(a2);
}

/* ---- weighted k-NN ------------------------------------------------------------------------------ */
Test(knn, weighted_vote_by_hand) {
    /* bank (unit after normalisation): b0 = (1,0) class 0 ... the query q = (0.6, 0.8) (given as 3q:
       excb normalises). Similarities: b0 0.6, b1 = (0.8,0.6): 0.96, b2 = (0,1): 0.8, b3 = (-1,0): -0.6.
       Labels b0 1, b1 0, b2 1, b3 1.
         k = 1: b1 -> class 0.
         k = 3, T = 0.07: class 0 gets exp(0.96/0.07) = e^13.714 = 9.05e5, class 1 gets e^(0.8/0.07) +
               e^(0.6/0.07) = e^11.429 + e^8.571 = 9.20e4 + 5.28e3  -> class 0 (the weights decide);
         k = 3, T = 10: class 0 e^0.096 = 1.1008, class 1 e^0.08 + e^0.06 = 1.0833 + 1.0618 = 2.1451
               -> class 1 (the majority decides).
       The query's true class is 0, so top-1 is 100, 100, 0; top-5 is 100 (2 classes). */
    float bank[8] = {1, 0, 0.8f, 0.6f, 0, 1, -1, 0}, query[2] = {1.8f, 2.4f};
    int32_t bl[4] = {1, 0, 1, 1}, ql[1] = {0};
    int ks[2] = {1, 3};
    double t1[2], t5[2];
    excb_knn(bank, bl, 4, query, ql, 1, 2, 2, ks, 2, 0.07, t1, t5);
    cr_expect_eq(t1[0], 100.0);
    cr_expect_eq(t1[1], 100.0, "T = 0.07: the nearest neighbour's weight wins");
    excb_knn(bank, bl, 4, query, ql, 1, 2, 2, ks, 2, 10.0, t1, t5);
    cr_expect_eq(t1[1], 0.0, "T = 10: two votes beat one");
    cr_expect_eq(t5[1], 100.0);
    /* k larger than the bank uses the whole bank: 4 votes, class 1 has 3 of them at T = 10 */
    int kbig[1] = {200};
    excb_knn(bank, bl, 4, query, ql, 1, 2, 2, kbig, 1, 10.0, t1, t5);
    cr_expect_eq(t1[0], 0.0);
}

Test(knn, top5_counts_the_true_class_among_the_five_best) {
    /* 7 classes, one bank row each along a direction of decreasing similarity to the query; the query's
       class is the 6th best (top-5 miss) or the 5th best (top-5 hit). */
    float bank[7 * 2], q[2] = {1, 0};
    int32_t bl[7], ql[1];
    for (int i = 0; i < 7; i++) { bank[2 * i] = cos(i * 20 * DEG); bank[2 * i + 1] = sin(i * 20 * DEG); bl[i] = i; }
    int ks[1] = {7};
    double t1, t5;
    ql[0] = 5;                                              /* the 6th most similar */
    excb_knn(bank, bl, 7, q, ql, 1, 2, 7, ks, 1, 0.07, &t1, &t5);
    cr_expect_eq(t5, 0.0);
    ql[0] = 4;                                              /* the 5th */
    excb_knn(bank, bl, 7, q, ql, 1, 2, 7, ks, 1, 0.07, &t1, &t5);
    cr_expect_eq(t5, 100.0);
    cr_expect_eq(t1, 0.0);
}

/* ---- the linear probe --------------------------------------------------------------------------- */
Test(probe, softmax_xent_by_hand) {
    /* W = 0, b = 0: p = (1/2, 1/2) for both rows, loss = ln 2 = 0.69314718.
       x0 = (1, 2), y0 = 0; x1 = (3, -1), y1 = 1.
       dW[0] = mean((p0 - 1) x0 + p1_0 x1) = ((-0.5)(1,2) + 0.5 (3,-1)) / 2 = (1, -1.5) / 2 = (0.5, -0.75)
       dW[1] = -dW[0] = (-0.5, 0.75);  db = ((-0.5 + 0.5)/2, (0.5 - 0.5)/2) = (0, 0) */
    float W[4] = {0}, b[2] = {0}, x[4] = {1, 2, 3, -1};
    int32_t y[2] = {0, 1};
    double dW[4] = {0}, db[2] = {0};
    double loss = excb_softmax_xent(W, b, x, y, 2, 2, 2, dW, db);
    EXPECT_NEAR(loss, 0.69314718056, 1e-11, "loss");
    double want[4] = {0.5, -0.75, -0.5, 0.75};
    for (int i = 0; i < 4; i++) EXPECT_NEAR(dW[i], want[i], 1e-15, "dW[%d]", i);
    EXPECT_NEAR(db[0], 0, 1e-15, "db0");
    EXPECT_NEAR(db[1], 0, 1e-15, "db1");
}

Test(probe, softmax_xent_gradient_matches_finite_differences) {
    /* central differences in float: step 1e-2 on O(1) weights; the loss is computed in double from
       float inputs, so the error is O(h^2) ~ 1e-4 relative: tolerance 1e-3 of the gradient's scale */
    int n = 5, D = 3, C = 4;
    float W[12], b[4], x[15];
    int32_t y[5] = {0, 3, 1, 1, 2};
    fill_normal(W, 12, 41, 0.7f);
    fill_normal(b, 4, 42, 0.3f);
    fill_normal(x, 15, 43, 1.0f);
    double dW[12] = {0}, db[4] = {0}, scale = 0;
    excb_softmax_xent(W, b, x, y, n, D, C, dW, db);
    for (int i = 0; i < 12; i++) scale = fmax(scale, fabs(dW[i]));
    for (int i = 0; i < 12; i++) {
        float keep = W[i], h = 1e-2f;
        W[i] = keep + h; double lp = excb_softmax_xent(W, b, x, y, n, D, C, NULL, NULL);
        W[i] = keep - h; double lm = excb_softmax_xent(W, b, x, y, n, D, C, NULL, NULL);
        W[i] = keep;
        EXPECT_NEAR(dW[i], (lp - lm) / (2.0 * h), 1e-3 * scale, "dW[%d]", i);
    }
    for (int c = 0; c < 4; c++) {
        float keep = b[c], h = 1e-2f;
        b[c] = keep + h; double lp = excb_softmax_xent(W, b, x, y, n, D, C, NULL, NULL);
        b[c] = keep - h; double lm = excb_softmax_xent(W, b, x, y, n, D, C, NULL, NULL);
        b[c] = keep;
        EXPECT_NEAR(db[c], (lp - lm) / (2.0 * h), 1e-3 * scale, "db[%d]", c);
    }
}

Test(probe, separable_classes_are_learned_and_shuffling_is_seeded) {
    /* three Gaussian blobs 6 sigma apart in 4-D: a linear classifier separates them exactly */
    int ntr = 300, nte = 90, D = 4, C = 3;
    float *tr = malloc(sizeof(float) * ntr * D), *te = malloc(sizeof(float) * nte * D);
    int32_t *ytr = malloc(sizeof(int32_t) * ntr), *yte = malloc(sizeof(int32_t) * nte);
    fill_normal(tr, (size_t)ntr * D, 51, 1.0f);
    fill_normal(te, (size_t)nte * D, 52, 1.0f);
    for (int i = 0; i < ntr; i++) { ytr[i] = i % C; tr[i * D + ytr[i]] += 6; }
    for (int i = 0; i < nte; i++) { yte[i] = i % C; te[i * D + yte[i]] += 6; }
    double train_acc, acc = excb_linear_probe(tr, ytr, ntr, te, yte, nte, D, C, 20, 32, 0.1, 1e-6, 0, &train_acc);
    cr_expect_eq(acc, 100.0, "test accuracy %.2f", acc);
    cr_expect_eq(train_acc, 100.0, "train accuracy %.2f", train_acc);
    /* a label-noise case that is not separable: same seed, same result; another seed may differ */
    for (int i = 0; i < ntr; i += 7) ytr[i] = (ytr[i] + 1) % C;
    double a1 = excb_linear_probe(tr, ytr, ntr, te, yte, nte, D, C, 3, 32, 0.5, 1e-6, 9, NULL);
    double a2 = excb_linear_probe(tr, ytr, ntr, te, yte, nte, D, C, 3, 32, 0.5, 1e-6, 9, NULL);
    cr_expect_eq(a1, a2, "same seed, different accuracy");
    free(tr); free(te); free(ytr); free(yte);
}

/* ---- clustering metrics ----------------------------------------------------------------------------- */
Test(clusters, identical_and_permuted_partitions_score_one) {
    int32_t pred[6] = {1, 1, 0, 0, 2, 2}, truth[6] = {0, 0, 1, 1, 2, 2};
    ExcbClusterScores s;
    excb_cluster_scores(pred, truth, 6, 3, 3, &s);
    EXPECT_NEAR(s.nmi, 1, 1e-12, "NMI");
    EXPECT_NEAR(s.ami, 1, 1e-12, "AMI");
    EXPECT_NEAR(s.ari, 1, 1e-12, "ARI");
    EXPECT_NEAR(s.acc_many_to_one, 1, 0, "many-to-one");
    EXPECT_NEAR(s.acc_hungarian, 1, 0, "Hungarian (needs 1->0, 0->1)");
    cr_expect_eq(s.used_clusters, 3);
}

Test(clusters, independent_partitions_by_hand) {
    /* pred (0,0,1,1), truth (0,1,0,1): every n_ij = 1, a = b = (2,2), N = 4.
       MI = 0 -> NMI 0.  ARI: sum C(n_ij,2) = 0, S_a = S_b = 2, C(4,2) = 6, expected = 4/6, max = 2:
       (0 - 2/3) / (2 - 2/3) = -0.5.  E[MI]: per pair n_ij = 1 (P = 4/6, term log(4/4) = 0) or 2 (P = 1/6,
       term 2/4 log 2): 4 pairs x log2/12 = log2/3; AMI = (0 - log2/3) / (log2 - log2/3) = -0.5.
       many-to-one: 1 + 1 of 4 = 0.5; Hungarian: 2 of 4 = 0.5 */
    int32_t pred[4] = {0, 0, 1, 1}, truth[4] = {0, 1, 0, 1};
    ExcbClusterScores s;
    excb_cluster_scores(pred, truth, 4, 2, 2, &s);
    EXPECT_NEAR(s.nmi, 0, 1e-15, "NMI");
    EXPECT_NEAR(s.ari, -0.5, 1e-15, "ARI");
    EXPECT_NEAR(s.ami, -0.5, 1e-12, "AMI");
    EXPECT_NEAR(s.acc_many_to_one, 0.5, 0, "many-to-one");
    EXPECT_NEAR(s.acc_hungarian, 0.5, 0, "Hungarian");
}

Test(clusters, uneven_partitions_by_hand_and_reference) {
    /* case D: pred (0,0,0,1,1,1), truth (0,0,1,1,1,1); N = 6, a = (3,3), b = (2,4)
       MI = 2/6 ln(6*2/(3*2)) + 1/6 ln(6/(3*4)) + 3/6 ln(18/12) = 0.2310491 - 0.1155245 + 0.2027326 = 0.3182571
       H(U) = ln 2 = 0.6931472, H(V) = -(1/3)ln(1/3) - (2/3)ln(2/3) = 0.6365142; NMI = 0.3182571/0.6648307 = 0.4787040
       ARI: sum C(n_ij,2) = 1 + 0 + 3 = 4, S_a = 6, S_b = 7, expected = 42/15 = 2.8, max = 6.5: 1.2/3.7 = 0.3243243
       many-to-one = (2 + 3)/6; Hungarian (K = C = 2) = (2 + 3)/6.
       AMI from tests/reference/cluster_metrics.py (exact binomials): 0.355245321276 */
    int32_t pred[6] = {0, 0, 0, 1, 1, 1}, truth[6] = {0, 0, 1, 1, 1, 1};
    ExcbClusterScores s;
    excb_cluster_scores(pred, truth, 6, 2, 2, &s);
    EXPECT_NEAR(s.nmi, 0.478703971386, 1e-11, "NMI");
    EXPECT_NEAR(s.ami, 0.355245321276, 1e-11, "AMI");
    EXPECT_NEAR(s.ari, 0.324324324324, 1e-11, "ARI");
    EXPECT_NEAR(s.acc_many_to_one, 5.0 / 6, 1e-15, "many-to-one");
    EXPECT_NEAR(s.acc_hungarian, 5.0 / 6, 1e-15, "Hungarian");
    /* case E: K = 6 clusters of which 4 used, 3 classes; the reference script's values. Hungarian: n/a */
    int32_t pe[8] = {0, 0, 1, 1, 2, 2, 2, 5}, te[8] = {0, 0, 0, 1, 1, 2, 2, 2};
    excb_cluster_scores(pe, te, 8, 6, 3, &s);
    EXPECT_NEAR(s.nmi, 0.557796529090, 1e-11, "NMI E");
    EXPECT_NEAR(s.ami, 0.201186482997, 1e-11, "AMI E");
    EXPECT_NEAR(s.ari, 0.157894736842, 1e-11, "ARI E");
    EXPECT_NEAR(s.acc_many_to_one, 0.75, 1e-15, "many-to-one E");
    cr_expect(isnan(s.acc_hungarian), "Hungarian must be n/a when K != classes");
    cr_expect_eq(s.used_clusters, 4);
}

Test(clusters, hungarian_beats_greedy) {
    /* greedy takes w[0][0] = 3 and is left with 0 + 1 = 4; the optimum is 2 + 3 + 1 = 6 (perm 1, 0, 2) */
    double w[9] = {3, 2, 0, 3, 0, 0, 0, 0, 1};
    int perm[3];
    excb_hungarian_max(w, 3, perm);
    cr_expect(perm[0] == 1 && perm[1] == 0 && perm[2] == 2, "perm %d %d %d", perm[0], perm[1], perm[2]);
    /* against brute force on random 5 x 5 integer matrices */
    for (int t = 0; t < 50; t++) {
        double m[25];
        for (int i = 0; i < 25; i++) m[i] = (double)(excb_hash(5, EXCB_RNG_TEST, t, 0, i) % 10);
        int p[5], best = -1, idx[5] = {0, 1, 2, 3, 4};
        excb_hungarian_max(m, 5, p);
        double got = 0;
        for (int i = 0; i < 5; i++) got += m[i * 5 + p[i]];
        /* all 120 permutations (Heap's algorithm would do; nested loops are plainer) */
        for (int a = 0; a < 5; a++) for (int b = 0; b < 5; b++) for (int c = 0; c < 5; c++)
        for (int d = 0; d < 5; d++) for (int e = 0; e < 5; e++) {
            int q[5] = {a, b, c, d, e}, seen = 0;
            for (int i = 0; i < 5; i++) seen |= 1 << q[i];
            if (seen != 31) continue;
            int s = 0;
            for (int i = 0; i < 5; i++) s += (int)m[i * 5 + q[i]];
            if (s > best) best = s;
        }
        (void)idx;
        cr_expect_eq(got, best, "case %d: Hungarian %g, brute force %d", t, got, best);
    }
}

/* ---- checkpoints ---------------------------------------------------------------------------------- */
static char ckdir[256];
static void make_ckdir(void) { scratch_make(ckdir, sizeof ckdir, "test_ckpt"); }
static void remove_ckdir(void) { scratch_remove(ckdir); }
TestSuite(checkpoint, .init = make_ckdir, .fini = remove_ckdir);

/* the parameter buffers pad each tensor to 64 bytes; padding is not saved (and is 0 in a real model) */
static void zero_padding(const ExcbModel *m, float *buf) {
    size_t end = 0;
    for (int t = 0; t < m->n_tensors; t++) {
        memset(buf + end, 0, sizeof(float) * (m->tensors[t].offset - end));
        end = m->tensors[t].offset + m->tensors[t].numel;
    }
    memset(buf + end, 0, sizeof(float) * (m->n_params - end));
}

/* a tiny model with every buffer set to distinct values, and a train state */
static void filled_model(ExcbModel *m, ExcbTrainState *ts, uint64_t salt) {
    ExcbConfig cfg;
    excb_config_named(&cfg, "tiny");
    cr_assert_eq(excb_build(m, &cfg), 0);
    fill_normal(m->params, m->n_params, 100 + salt, 1.0f);
    fill_normal(m->teacher, m->n_params, 200 + salt, 1.0f);
    fill_normal(m->momentum, m->n_params, 300 + salt, 1.0f);
    zero_padding(m, m->params);                           /* as excb_build leaves it */
    zero_padding(m, m->teacher);
    zero_padding(m, m->momentum);
    fill_normal(m->running, m->n_running, 400 + salt, 1.0f);
    fill_normal(m->teacher_running, m->n_running, 500 + salt, 1.0f);
    fill_normal(excb_method_buffer(m, "cluster_sizes"), cfg.K, 600 + salt, 1.0f);
    m->step = 1234 + (long)salt;
    ts->n_samples = 37;
    ts->prev_labels = malloc(sizeof(int32_t) * 37);
    ts->epoch_counts = malloc(sizeof(int64_t) * cfg.K);
    for (int i = 0; i < 37; i++) ts->prev_labels[i] = (int32_t)(i * 7 % 16) - 1;
    for (int k = 0; k < cfg.K; k++) ts->epoch_counts[k] = k * 1000003LL + (int64_t)salt;
    for (int i = 0; i < EXCB_ACC_N; i++) ts->acc[i] = i * 0.1 + salt;
    ts->metrics_bytes = 98765;
    ts->seconds = 12.5;
}

Test(checkpoint, round_trip_is_bitwise) {
    ExcbModel a, b;
    ExcbTrainState ta = {0}, tb = {0};
    char err[EXCB_ERR_LEN], path[300], *cfg_text;
    filled_model(&a, &ta, 0);
    filled_model(&b, &tb, 1);                              /* different values everywhere */
    excb_train_state_free(&tb);
    snprintf(path, sizeof path, "%s/ck.excb", ckdir);
    cr_assert_eq(excb_checkpoint_save(path, &a, &ta, "preset = tiny\nK = 16\n", err), 0, "%s", err);
    struct stat st;
    char tmp[320];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    cr_expect(stat(tmp, &st) != 0, "the temporary file must be gone after the rename");
    cr_assert_eq(excb_checkpoint_config(path, &cfg_text, err), 0, "%s", err);
    cr_expect_str_eq(cfg_text, "preset = tiny\nK = 16\n");
    free(cfg_text);
    cr_assert_eq(excb_checkpoint_load(path, &b, &tb, err), 0, "%s", err);
    cr_expect_eq(memcmp(a.params, b.params, sizeof(float) * a.n_params), 0, "student");
    cr_expect_eq(memcmp(a.teacher, b.teacher, sizeof(float) * a.n_params), 0, "teacher");
    cr_expect_eq(memcmp(a.momentum, b.momentum, sizeof(float) * a.n_params), 0, "momentum");
    cr_expect_eq(memcmp(a.running, b.running, sizeof(float) * a.n_running), 0, "BN running");
    cr_expect_eq(memcmp(a.teacher_running, b.teacher_running, sizeof(float) * a.n_running), 0, "teacher BN running");
    cr_expect_eq(memcmp(excb_method_buffer(&a, "cluster_sizes"), excb_method_buffer(&b, "cluster_sizes"), sizeof(float) * a.cfg.K), 0, "cluster sizes");
    cr_expect_eq(b.step, a.step);
    cr_expect_eq(tb.n_samples, 37);
    cr_expect_eq(memcmp(ta.prev_labels, tb.prev_labels, sizeof(int32_t) * 37), 0, "previous labels");
    cr_expect_eq(memcmp(ta.epoch_counts, tb.epoch_counts, sizeof(int64_t) * a.cfg.K), 0, "epoch counts");
    cr_expect_eq(memcmp(ta.acc, tb.acc, sizeof ta.acc), 0, "epoch sums");
    cr_expect_eq(tb.metrics_bytes, 98765);
    cr_expect_eq(tb.seconds, 12.5);
    excb_train_state_free(&ta); excb_train_state_free(&tb);
    excb_free(&a); excb_free(&b);
}

static uint8_t *slurp(const char *path, size_t *n) {
    FILE *f = fopen(path, "rb");
    cr_assert(f);
    fseek(f, 0, SEEK_END);
    *n = (size_t)ftell(f);
    fseek(f, 0, SEEK_SET);
    uint8_t *b = malloc(*n);
    cr_assert_eq(fread(b, 1, *n, f), *n);
    fclose(f);
    return b;
}

static void spill(const char *path, const uint8_t *b, size_t n) {
    FILE *f = fopen(path, "wb");
    cr_assert(f);
    cr_assert_eq(fwrite(b, 1, n, f), n);
    fclose(f);
}

Test(checkpoint, truncated_or_one_flipped_byte_is_refused) {
    ExcbModel a, b;
    ExcbTrainState ta = {0}, tb = {0};
    char err[EXCB_ERR_LEN], path[300], bad[300];
    filled_model(&a, &ta, 0);
    filled_model(&b, &tb, 1);
    snprintf(path, sizeof path, "%s/ck.excb", ckdir);
    snprintf(bad, sizeof bad, "%s/bad.excb", ckdir);
    cr_assert_eq(excb_checkpoint_save(path, &a, &ta, "preset = tiny\n", err), 0, "%s", err);
    size_t n;
    uint8_t *bytes = slurp(path, &n);
    /* truncations: to 0, 7, 100 bytes, half, and one byte short */
    size_t cuts[5] = {0, 7, 100, n / 2, n - 1};
    for (int i = 0; i < 5; i++) {
        spill(bad, bytes, cuts[i]);
        err[0] = 0;
        cr_expect_eq(excb_checkpoint_load(bad, &b, &tb, err), EXCB_EXIT_DATA, "cut at %zu accepted", cuts[i]);
        cr_expect(strstr(err, bad) != NULL, "message names the file: %s", err);
    }
    /* one flipped bit at 200 positions spread over the whole file (header, table, data, trailer) */
    int refused = 0;
    for (int i = 0; i < 200; i++) {
        size_t at = (size_t)((double)i / 199 * (n - 1));
        bytes[at] ^= 0x10;
        spill(bad, bytes, n);
        bytes[at] ^= 0x10;
        refused += excb_checkpoint_load(bad, &b, &tb, err) == EXCB_EXIT_DATA;
    }
    cr_expect_eq(refused, 200, "%d of 200 single-bit flips were refused", refused);
    /* the good file still loads, and equals the original */
    cr_expect_eq(excb_checkpoint_load(path, &b, &tb, err), 0, "%s", err);
    cr_expect_eq(memcmp(a.params, b.params, sizeof(float) * a.n_params), 0);
    cr_expect_eq(excb_checkpoint_load("/nonexistent/ck.excb", &b, &tb, err), EXCB_EXIT_NOINPUT);
    free(bytes);
    excb_train_state_free(&ta); excb_train_state_free(&tb);
    excb_free(&a); excb_free(&b);
}

/* A forger's edit of one table entry (the layout of excb.c section 16: a 32-byte header, then 184-byte
   entries: name[112], u32 dtype, u32 ndim, u64 shape[4] at 120, u64 offset at 152, u64 bytes at 160),
   with the file CRC in the trailer recomputed, so that every CRC is valid and only the table lies. */
static void forge_entry(uint8_t *b, size_t n, const char *name, int dim, uint64_t shape, int set_bytes, uint64_t bytes) {
    uint32_t count;
    memcpy(&count, b + 16, 4);
    uint8_t *t = NULL;
    for (uint32_t i = 0; i < count && !t; i++)
        if (!strcmp((const char *)b + 32 + (size_t)i * 184, name)) t = b + 32 + (size_t)i * 184;
    cr_assert(t, "no entry %s", name);
    memcpy(t + 120 + 8 * dim, &shape, 8);
    if (set_bytes) memcpy(t + 160, &bytes, 8);
    uint32_t crc = (uint32_t)crc32(0, b, (uInt)(n - 16));
    memcpy(b + n - 16, &crc, 4);
}

Test(checkpoint, a_table_that_lies_with_valid_crcs_is_refused) {
    ExcbModel a, b;
    ExcbTrainState ta = {0}, tb = {0};
    char err[EXCB_ERR_LEN], path[300], bad[300], *cfg_text = NULL;
    filled_model(&a, &ta, 0);
    filled_model(&b, &tb, 1);
    excb_train_state_free(&tb);
    snprintf(path, sizeof path, "%s/ck.excb", ckdir);
    snprintf(bad, sizeof bad, "%s/forged.excb", ckdir);
    cr_assert_eq(excb_checkpoint_save(path, &a, &ta, "preset = tiny\n", err), 0, "%s", err);
    size_t n;
    uint8_t *good = slurp(path, &n), *bytes = malloc(n);
    /* each forgery: entry, dimension, new extent, and the byte count written with it (or kept) */
    struct { const char *name; int dim; uint64_t shape; int set_bytes; uint64_t bytes; const char *why; } cases[] = {
        /* 37 labels stored (148 bytes); the table claims 1037: a reader that trusted the shape would
           copy 4148 bytes out of a 148-byte entry (the old loader did, and returned 0) */
        {"train.previous_labels", 0, 1037, 0, 0, "shape larger than its bytes"},
        /* 2^62 x (the tensor's other extents) x 4 bytes wraps around 2^64: the product must not overflow */
        {"student.classifier.centroid_layer.weight_v", 0, 1ull << 62, 0, 0, "shape product overflows"},
        /* a second dimension on a 1-d entry: the unused extents must stay 0 */
        {"config", 1, 5, 0, 0, "unused dimension set"},
        /* a shape of 2^38 labels, 1 TiB with its byte count to match: refused as out of the file, never
           as an allocation */
        {"train.previous_labels", 0, 1ull << 38, 1, 1ull << 40, "1 TiB entry"},
    };
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        memcpy(bytes, good, n);
        forge_entry(bytes, n, cases[c].name, cases[c].dim, cases[c].shape, cases[c].set_bytes, cases[c].bytes);
        spill(bad, bytes, n);
        err[0] = 0;
        cr_expect_eq(excb_checkpoint_load(bad, &b, &tb, err), EXCB_EXIT_DATA, "%s: accepted (%s)", cases[c].why, err);
        cr_expect(strstr(err, bad) && strstr(err, cases[c].name), "%s: the message names the file and entry: %s",
                  cases[c].why, err);
        cr_expect(!strstr(err, "memory"), "%s: refused as bad data, not as an allocation: %s", cases[c].why, err);
        err[0] = 0;
        cr_expect_eq(excb_checkpoint_config(bad, &cfg_text, err), EXCB_EXIT_DATA, "%s: config read (%s)", cases[c].why, err);
        excb_train_state_free(&tb);
    }
    /* the forger's tool itself leaves an honest file loadable: only the lie is refused */
    memcpy(bytes, good, n);
    forge_entry(bytes, n, "train.previous_labels", 0, 37, 0, 0);
    spill(bad, bytes, n);
    cr_expect_eq(excb_checkpoint_load(bad, &b, &tb, err), 0, "%s", err);
    cr_expect_eq(memcmp(ta.prev_labels, tb.prev_labels, sizeof(int32_t) * 37), 0);
    free(good); free(bytes);
    excb_train_state_free(&ta); excb_train_state_free(&tb);
    excb_free(&a); excb_free(&b);
}

Test(checkpoint, another_models_checkpoint_is_refused_by_name_and_shape) {
    ExcbModel a, b;
    ExcbTrainState ta = {0}, tb = {0};
    char err[EXCB_ERR_LEN], path[300];
    filled_model(&a, &ta, 0);
    ExcbConfig cfg;
    excb_config_named(&cfg, "tiny");
    cfg.K = 32;                                            /* one shape differs: the centroids */
    cr_assert_eq(excb_build(&b, &cfg), 0);
    snprintf(path, sizeof path, "%s/ck.excb", ckdir);
    cr_assert_eq(excb_checkpoint_save(path, &a, &ta, "preset = tiny\n", err), 0, "%s", err);
    cr_expect_eq(excb_checkpoint_load(path, &b, &tb, err), EXCB_EXIT_CONFIG);
    cr_expect(strstr(err, "train.epoch_label_counts") || strstr(err, "classifier.centroid_layer.weight_v"),
              "message names the tensor: %s", err);
    cr_expect(strstr(err, "16") && strstr(err, "32"), "message gives both shapes: %s", err);
    excb_free(&b);
    excb_config_named(&cfg, "tiny50");                     /* another architecture: names differ */
    cr_assert_eq(excb_build(&b, &cfg), 0);
    cr_expect_eq(excb_checkpoint_load(path, &b, &tb, err), EXCB_EXIT_CONFIG);
    cr_expect(strstr(err, "has no tensor") || strstr(err, "expects"), "%s", err);
    excb_train_state_free(&ta);
    excb_free(&a); excb_free(&b);
}

/* ---- the run directory's lock ------------------------------------------------------------------ */
/* flock locks belong to an open file description: a second open of DIR/lock, even in this process,
   meets the first one's lock exactly as another process would */
Test(rundir, the_lock_admits_one_holder_and_names_it) {
    char dir[] = "/tmp/excb_test_lock_XXXXXX", err[EXCB_ERR_LEN], pid[32], path[64];
    cr_assert(mkdtemp(dir));
    snprintf(path, sizeof path, "%s/lock", dir);
    int a = -1, b = -1, c = -1;
    /* a probe of a directory without a lock file creates nothing */
    cr_assert_eq(excb_lock_run_dir(dir, 0, &a, err), 0, "%s", err);
    cr_expect(a < 0 && access(path, F_OK) != 0, "the probe created %s", path);
    cr_assert_eq(excb_lock_run_dir(dir, 1, &a, err), 0, "%s", err);
    cr_expect_eq(excb_lock_run_dir(dir, 0, &b, err), EXCB_EXIT_TEMPFAIL, "a probe was admitted beside the holder");
    cr_expect_eq(excb_lock_run_dir(dir, 1, &c, err), EXCB_EXIT_TEMPFAIL, "a second holder was admitted");
    snprintf(pid, sizeof pid, "pid %ld", (long)getpid());
    cr_expect(strstr(err, pid) && strstr(err, "in use"), "the refusal names the holder: %s", err);
    close(a);                                          /* as the kernel does when a process ends */
    b = -1;
    cr_expect_eq(excb_lock_run_dir(dir, 0, &b, err), 0, "the lock outlived its holder: %s", err);
    cr_expect_eq(excb_lock_run_dir(dir, 1, &b, err), 0, "the probe's lock, taken on: %s", err);
    close(b);
    unlink(path);
    rmdir(dir);
}
