/* test_train_e2e.c: whole runs of the `excb` binary on a small synthetic data set (4 classes of bar
 * patterns, 12x12, 256 training and 64 test images, written as IDX files): a short training run with
 * every output checked, resume exactness (stop and resume, and a real kill -9), the divergence guard,
 * damaged checkpoints, command-line errors and the plots. The tiny preset: B = 8, 32 steps per epoch,
 * 2 epochs. Run from the repository root (make test), after `make excb`. */
#define _DEFAULT_SOURCE
#include "testutil.h"
#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static char dir[256];

static void write_idx(const char *path, int nd, const uint32_t *dims, const uint8_t *data) {
    FILE *f = fopen(path, "wb");
    cr_assert(f, "cannot create %s", path);
    uint8_t h[4] = {0, 0, 8, (uint8_t)nd};
    fwrite(h, 1, 4, f);
    size_t count = 1;
    for (int i = 0; i < nd; i++) {
        uint8_t b[4] = {dims[i] >> 24, dims[i] >> 16, dims[i] >> 8, dims[i]};
        fwrite(b, 1, 4, f);
        count *= dims[i];
    }
    cr_assert_eq(fwrite(data, 1, count, f), count);
    fclose(f);
}

/* class 0: a horizontal bar, 1: a vertical bar, 2: a diagonal, 3: a hollow square; position jittered and
   noise added, both from the counter RNG */
static void make_split(const char *images, const char *labels, int n, uint64_t stream) {
    int S = 12;
    uint8_t *px = calloc((size_t)n * S * S, 1), *lab = malloc(n);
    for (int i = 0; i < n; i++) {
        int c = i % 4, o = (int)(excb_hash(1, EXCB_RNG_TEST, stream, i, 0) % 5) + 2;
        lab[i] = (uint8_t)c;
        for (int y = 0; y < S; y++)
            for (int x = 0; x < S; x++) {
                int on = c == 0 ? (y == o || y == o + 1) : c == 1 ? (x == o || x == o + 1) : c == 2 ? abs(x - y) <= 1
                       : ((x == 2 || x == 9) && y >= 2 && y <= 9) || ((y == 2 || y == 9) && x >= 2 && x <= 9);
                int noise = (int)(excb_hash(1, EXCB_RNG_TEST, stream, i, 1 + y * S + x) % 40);
                px[((size_t)i * S + y) * S + x] = (uint8_t)(on ? 215 + noise : noise);
            }
    }
    uint32_t di[3] = {n, S, S}, dl[1] = {n};
    write_idx(images, 3, di, px);
    write_idx(labels, 1, dl, lab);
    free(px);
    free(lab);
}

static const char *p(const char *name) {
    static char b[8][512];
    static int k;
    k = (k + 1) % 8;
    snprintf(b[k], sizeof b[k], "%s/%s", dir, name);
    return b[k];
}

static void setup(void) {
    snprintf(dir, sizeof dir, "/tmp/excb_test_e2e_XXXXXX");
    cr_assert(mkdtemp(dir));
    mkdir(p("data"), 0777);
    make_split(p("data/train-images-idx3-ubyte"), p("data/train-labels-idx1-ubyte"), 256, 1);
    make_split(p("data/t10k-images-idx3-ubyte"), p("data/t10k-labels-idx1-ubyte"), 64, 2);
    cr_assert(access("./excb", X_OK) == 0, "./excb missing: run from the repository root after make");
}

static void teardown(void) {
    char cmd[400];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    cr_assert_eq(system(cmd), 0);
}

TestSuite(e2e, .init = setup, .fini = teardown, .timeout = 300);

/* run a shell command, its output into DIR/log; the exit status */
static int sh(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static int sh(const char *fmt, ...) {
    char cmd[4096];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(cmd, sizeof cmd, fmt, ap);
    va_end(ap);
    char full[4600];
    snprintf(full, sizeof full, "%s >'%s/log' 2>&1", cmd, dir);
    int st = system(full);
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

static char *slurp_text(const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *b = malloc(n + 1);
    cr_assert_eq(fread(b, 1, n, f), (size_t)n);
    b[n] = 0;
    fclose(f);
    return b;
}

static int log_has(const char *what) {
    char *log = slurp_text(p("log"));
    int has = log && strstr(log, what);
    free(log);
    return has;
}

#define TRAIN "./excb train --preset tiny --data '%s' -q "

/* a checkpoint into a model of its own config */
static void load_ckpt(const char *path, ExcbModel *m, ExcbTrainState *ts) {
    char *text, err[EXCB_ERR_LEN];
    ExcbRunConfig rc;
    memset(&rc, 0, sizeof rc);
    cr_assert_eq(excb_checkpoint_config(path, &text, err), 0, "%s", err);
    cr_assert_eq(excb_config_parse(&rc, text, path, err), 0, "%s", err);
    cr_assert_eq(excb_config_validate(&rc, err), 0, "%s", err);
    free(text);
    rc.model.in_ch = 1;
    cr_assert_eq(excb_build(m, &rc.model), 0);
    cr_assert_eq(excb_checkpoint_load(path, m, ts, err), 0, "%s", err);
}

/* everything but the time spent is equal, bit for bit */
static void expect_same_checkpoint(const char *a, const char *b) {
    ExcbModel ma, mb;
    ExcbTrainState ta, tb;
    load_ckpt(a, &ma, &ta);
    load_ckpt(b, &mb, &tb);
    cr_expect_eq(ma.step, mb.step, "steps %ld and %ld", ma.step, mb.step);
    cr_expect_eq(memcmp(ma.params, mb.params, sizeof(float) * ma.n_params), 0, "student differs: %s vs %s", a, b);
    cr_expect_eq(memcmp(ma.teacher, mb.teacher, sizeof(float) * ma.n_params), 0, "teacher differs");
    cr_expect_eq(memcmp(ma.momentum, mb.momentum, sizeof(float) * ma.n_params), 0, "momentum differs");
    cr_expect_eq(memcmp(ma.running, mb.running, sizeof(float) * ma.n_running), 0, "BN statistics differ");
    cr_expect_eq(memcmp(ma.teacher_running, mb.teacher_running, sizeof(float) * ma.n_running), 0, "teacher BN differ");
    cr_expect_eq(memcmp(ma.s, mb.s, sizeof(float) * ma.cfg.K), 0, "cluster sizes differ");
    cr_expect_eq(memcmp(ta.prev_labels, tb.prev_labels, sizeof(int32_t) * ta.n_samples), 0, "previous labels differ");
    cr_expect_eq(memcmp(ta.epoch_counts, tb.epoch_counts, sizeof(int64_t) * ma.cfg.K), 0, "epoch counts differ");
    cr_expect_eq(memcmp(ta.acc, tb.acc, sizeof ta.acc), 0, "epoch sums differ");
    /* not compared: train.seconds and train.metrics_bytes (metrics.jsonl's length includes the "wall"
       timing fields, whose digits vary); expect_same_metrics compares the metrics themselves */
    excb_train_state_free(&ta); excb_train_state_free(&tb);
    excb_free(&ma); excb_free(&mb);
}

/* metrics.jsonl equal line for line once the trailing "wall" (time) object is cut off */
static void expect_same_metrics(const char *a, const char *b) {
    char *x = slurp_text(a), *y = slurp_text(b);
    cr_assert(x && y);
    int lines = 0;
    char *sx, *sy, *lx = strtok_r(x, "\n", &sx), *ly = strtok_r(y, "\n", &sy);
    for (; lx && ly; lx = strtok_r(NULL, "\n", &sx), ly = strtok_r(NULL, "\n", &sy), lines++) {
        char *wx = strstr(lx, ",\"wall\":"), *wy = strstr(ly, ",\"wall\":");
        if (wx) *wx = 0;
        if (wy) *wy = 0;
        cr_expect_str_eq(lx, ly, "metrics line %d", lines + 1);
    }
    cr_expect(!lx && !ly, "one metrics file is longer (%d equal lines)", lines);
    free(x);
    free(y);
}

Test(e2e, short_run_writes_every_output_and_learns) {
    cr_assert_eq(sh(TRAIN "--out '%s'", p("data"), p("a")), 0, "excb train failed (see %s/log)", dir);
    char *m = slurp_text(p("a/metrics.jsonl"));
    cr_assert(m);
    cr_expect(!strncmp(m, "{\"type\":\"run\"", 13), "the first record is the header");
    int steps = 0, epochs = 0, evals = 0;
    for (char *q = m; (q = strstr(q, "\"type\":\"step\"")); q++) steps++;
    for (char *q = m; (q = strstr(q, "\"type\":\"epoch\"")); q++) epochs++;
    for (char *q = m; (q = strstr(q, "\"type\":\"eval\"")); q++) evals++;
    cr_expect_eq(steps, 64, "log_every 1: one step record per step (2 epochs x 32)");
    cr_expect_eq(epochs, 2);
    cr_expect_eq(evals, 1);
    for (const char *key = "loss\0lr\0wd\0teacher_momentum\0teacher_conf\0student_conf\0distinct\0changed_labels\0"
                           "assign_entropy\0empty_clusters\0cluster_size_min\0cluster_size_max\0knn_top1_k1\0"
                           "probe_test_top1\0nmi\0ami\0ari\0acc_many_to_one\0acc_hungarian\0";
         *key; key += strlen(key) + 1) {
        char pat[64];
        snprintf(pat, sizeof pat, "\"%s\":", key);
        cr_expect(strstr(m, pat), "metrics.jsonl lacks %s", key);
    }
    /* every line is one complete object */
    int bad = 0;
    for (char *line = m; *line;) {
        char *nl = strchr(line, '\n');
        cr_assert(nl, "the last line is not terminated");
        bad += line[0] != '{' || nl[-1] != '}';
        line = nl + 1;
    }
    cr_expect_eq(bad, 0);
    free(m);
    struct stat st;
    cr_expect(stat(p("a/config.txt"), &st) == 0 && stat(p("a/eval.json"), &st) == 0);
    cr_expect(stat(p("a/ckpt-0000000064.excb"), &st) == 0, "final checkpoint");
    /* the bars are easy: 1-NN on the final teacher's features is far above chance (25 %) */
    char *ev = slurp_text(p("a/eval.json"));
    double knn = atof(strstr(ev, "\"knn_top1_k1\":") + 14);
    cr_expect(knn >= 75.0, "k-NN top-1 %.1f %%", knn);
    free(ev);
    /* excb eval of the run directory gives the same k-NN numbers as the run's own evaluation */
    cr_expect_eq(sh("./excb eval '%s'", p("a")), 0);
    cr_expect(log_has("k =   1   top-1"), "excb eval prints its k-NN table");
}

Test(e2e, stop_and_resume_equals_an_uninterrupted_run) {
    cr_assert_eq(sh(TRAIN "--out '%s'", p("data"), p("a")), 0);
    cr_assert_eq(sh(TRAIN "--out '%s' --stop-after 27", p("data"), p("b")), 0);   /* mid-epoch, off the ckpt grid */
    struct stat st;
    cr_expect(stat(p("b/ckpt-0000000027.excb"), &st) == 0, "a checkpoint at the stop");
    cr_expect(stat(p("b/eval.json"), &st) != 0, "a stopped run has no final evaluation yet");
    cr_assert_eq(sh(TRAIN "--out '%s' --resume", p("data"), p("b")), 0, "resume failed");
    expect_same_checkpoint(p("a/ckpt-0000000064.excb"), p("b/ckpt-0000000064.excb"));
    expect_same_metrics(p("a/metrics.jsonl"), p("b/metrics.jsonl"));
}

Test(e2e, kill_9_at_a_random_moment_then_resume_equals_an_uninterrupted_run) {
    cr_assert_eq(sh(TRAIN "--out '%s'", p("data"), p("a")), 0);
    for (int round = 0; round < 2; round++) {
        char run[16];
        snprintf(run, sizeof run, "k%d", round);
        pid_t pid = fork();
        if (!pid) {
            int fd = open("/dev/null", O_WRONLY);
            dup2(fd, 1); dup2(fd, 2);
            execl("./excb", "excb", "train", "--preset", "tiny", "--data", p("data"), "--out", p(run), "-q", (char *)NULL);
            _exit(127);
        }
        /* kill it between 20 and 120 ms after the first checkpoint after k-means appears */
        struct timespec nap = {0, 2000000};
        for (int i = 0; i < 5000 && access(p(round ? "k1/ckpt-0000000002.excb" : "k0/ckpt-0000000002.excb"), F_OK); i++)
            nanosleep(&nap, NULL);
        long wait_ms = 20 + (long)(excb_hash(2, EXCB_RNG_TEST, round, 0, 0) % 100);
        struct timespec t = {0, wait_ms * 1000000};
        nanosleep(&t, NULL);
        kill(pid, SIGKILL);
        int status;
        waitpid(pid, &status, 0);
        cr_assert_eq(sh(TRAIN "--out '%s' --resume", p("data"), p(run)), 0, "resume after kill -9 failed (log: %s/log)", dir);
        char fin[64];
        snprintf(fin, sizeof fin, "%s/ckpt-0000000064.excb", run);
        expect_same_checkpoint(p("a/ckpt-0000000064.excb"), p(fin));
        snprintf(fin, sizeof fin, "%s/metrics.jsonl", run);
        expect_same_metrics(p("a/metrics.jsonl"), p(fin));
    }
}

Test(e2e, nan_stops_with_code_3_and_keeps_the_last_good_checkpoint) {
    /* a NaN in step 13's input (ckpt_every 2: the last good checkpoint is step 12) */
    int code = sh(TRAIN "--out '%s' --set debug_nan_step=13", p("data"), p("n"));
    cr_expect_eq(code, EXCB_EXIT_DIVERGED, "exit %d", code);
    struct stat st;
    cr_expect(stat(p("n/ckpt-0000000012.excb"), &st) == 0, "last good checkpoint kept");
    cr_expect(stat(p("n/ckpt-0000000014.excb"), &st) != 0 && stat(p("n/ckpt-0000000013.excb"), &st) != 0,
              "nothing saved after the divergence");
    cr_expect(stat(p("n/diverged-13.txt"), &st) == 0, "diagnostic file");
    char *m = slurp_text(p("n/metrics.jsonl"));
    char *last = m + strlen(m) - 2;
    while (last > m && last[-1] != '\n') last--;
    cr_expect(strstr(last, "\"type\":\"diverged\"") && strstr(last, "\"step\":13") && strstr(last, "\"loss\":null")
              && strstr(last, "\"last_checkpoint_step\":12"), "last record: %s", last);
    free(m);
    /* the kept checkpoint is intact and usable */
    cr_expect_eq(sh("./excb eval '%s'", p("n/ckpt-0000000012.excb")), 0);
}

Test(e2e, damaged_checkpoints_are_refused_and_resume_falls_back) {
    cr_assert_eq(sh(TRAIN "--out '%s'", p("data"), p("a")), 0);
    cr_assert_eq(sh(TRAIN "--out '%s' --stop-after 30", p("data"), p("d")), 0);
    /* flip one byte in the middle of the newest checkpoint */
    FILE *f = fopen(p("d/ckpt-0000000030.excb"), "r+b");
    cr_assert(f);
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, n / 2, SEEK_SET);
    int c = fgetc(f);
    fseek(f, n / 2, SEEK_SET);
    fputc(c ^ 0x01, f);
    fclose(f);
    cr_expect_eq(sh("./excb eval '%s'", p("d/ckpt-0000000030.excb")), EXCB_EXIT_DATA);
    cr_expect(log_has("ckpt-0000000030.excb") && log_has("damaged"), "the message names the file and says why");
    /* truncated */
    char cmd[1200];
    snprintf(cmd, sizeof cmd, "head -c 5000 '%s' > '%s'", p("d/ckpt-0000000030.excb"), p("short.excb"));
    cr_assert_eq(system(cmd), 0);
    cr_expect_eq(sh("./excb eval '%s'", p("short.excb")), EXCB_EXIT_DATA);
    cr_expect(log_has("truncated"));
    /* resume skips the damaged newest checkpoint (saying so) and continues from step 28 */
    cr_expect_eq(sh("./excb train --preset tiny --data '%s' --out '%s' --resume", p("data"), p("d")), 0);
    cr_expect(log_has("skipping") && log_has("resuming") && log_has("at step 28"), "fallback reported");
    expect_same_checkpoint(p("a/ckpt-0000000064.excb"), p("d/ckpt-0000000064.excb"));
}

Test(e2e, command_line_errors_have_their_exit_codes) {
    cr_expect_eq(sh(TRAIN "--out '%s' --set no_such_key=1", p("data"), p("e")), EXCB_EXIT_CONFIG);
    cr_expect(log_has("unknown key 'no_such_key'"));
    cr_expect_eq(sh(TRAIN "--out '%s' --frobnicate 1", p("data"), p("e")), EXCB_EXIT_USAGE);
    cr_expect_eq(sh(TRAIN "--out '%s' --config '%s'", p("data"), p("e"), p("missing.conf")), EXCB_EXIT_NOINPUT);
    cr_expect_eq(sh("./excb train --preset tiny --data '%s' --out '%s' -q", p("nothing-here"), p("e")), EXCB_EXIT_NOINPUT);
    cr_assert_eq(sh(TRAIN "--out '%s' --stop-after 4", p("data"), p("e")), 0);
    cr_expect_eq(sh(TRAIN "--out '%s'", p("data"), p("e")), EXCB_EXIT_USAGE, "an existing run needs --resume or --force");
    cr_expect(log_has("--resume") && log_has("--force"));
    cr_expect_eq(sh(TRAIN "--out '%s' --resume --set K=32", p("data"), p("e")), EXCB_EXIT_CONFIG, "resume may not change K");
    cr_expect(log_has("key 'K'"));
    cr_expect_eq(sh(TRAIN "--out '%s' --resume --stop-after 6 --set log_every=3", p("data"), p("e")), 0,
                 "keys that do not change the trajectory may change on resume");
    cr_expect_eq(sh(TRAIN "--out '%s' --force --stop-after 2", p("data"), p("e")), 0);
    cr_expect_eq(sh("./excb eval '%s'", p("e/none.excb")), EXCB_EXIT_NOINPUT);
    cr_expect_eq(sh("./excb eval '%s'", p("data/train-labels-idx1-ubyte")), EXCB_EXIT_DATA, "not a checkpoint");
    cr_expect(log_has("bad magic"));
    cr_expect_eq(sh("./excb --help"), 0);
    cr_expect_eq(sh("./excb --version"), 0);
    cr_expect(log_has("BLAS/GEMM") && log_has("CUDA"), "--version lists the build features");
}

/* an uncompressed IDX file's payload (after its 4 + 4 * ndim header bytes) */
static uint8_t *idx_payload(const char *path, int ndim) {
    char *raw = slurp_text(path);
    cr_assert(raw, "cannot read %s", path);
    return (uint8_t *)raw + 4 + 4 * ndim;
}

/* excb eval --pixels: the floor, measured with the same k-NN. Recomputed here independently: mean-centre
   the raw pixels with the bank's mean image, cosine similarity, each query takes its nearest bank
   image's label (k = 1: the vote weight does not matter). Every query's best similarity must beat the
   runner-up by 2e-5: excb computes the cosines in float32, whose rounding over 144 terms of unit vectors
   stays below 144 * 2^-24 = 8.6e-6 (and as much for the normalisation), so it cannot pick another
   neighbour, and the accuracy is compared exactly. */
Test(e2e, pixel_baseline_is_the_nearest_mean_centred_image) {
    enum { NB = 256, NQ = 64, D = 144 };
    uint8_t *bank = idx_payload(p("data/train-images-idx3-ubyte"), 3), *query = idx_payload(p("data/t10k-images-idx3-ubyte"), 3);
    uint8_t *yb = idx_payload(p("data/train-labels-idx1-ubyte"), 1), *yq = idx_payload(p("data/t10k-labels-idx1-ubyte"), 1);
    static double mean[D], b[NB][D], q[D];
    for (int i = 0; i < NB; i++)
        for (int j = 0; j < D; j++) mean[j] += bank[i * D + j] / (double)NB;
    for (int i = 0; i < NB; i++) {
        double n = 0;
        for (int j = 0; j < D; j++) { b[i][j] = bank[i * D + j] - mean[j]; n += b[i][j] * b[i][j]; }
        for (int j = 0; j < D; j++) b[i][j] /= sqrt(n);
    }
    int hits = 0;
    for (int i = 0; i < NQ; i++) {
        double n = 0, best = -2, second = -2;
        for (int j = 0; j < D; j++) { q[j] = query[i * D + j] - mean[j]; n += q[j] * q[j]; }
        int arg = -1;
        for (int k = 0; k < NB; k++) {
            double s = 0;
            for (int j = 0; j < D; j++) s += q[j] * b[k][j];
            s /= sqrt(n);
            if (s > best) { second = best; best = s; arg = k; } else if (s > second) second = s;
        }
        cr_assert_gt(best - second, 2e-5, "query %d: a near tie (%g vs %g) makes the exact check unsound", i, best, second);
        hits += yb[arg] == yq[i];
    }
    char expect[64];
    snprintf(expect, sizeof expect, "k =   1   top-1 %6.2f %%", 100.0 * hits / NQ);
    cr_assert_eq(sh("./excb eval --pixels --data '%s' --knn-k 1,3 --probe-epochs 20", p("data")), 0, "see %s/log", dir);
    cr_expect(log_has(expect), "expected '%s' (see %s/log)", expect, dir);
    cr_expect(log_has("features: the pixels of the evaluation view 12x12") && log_has("D = 144"));
    cr_expect(log_has("linear probe:") && !log_has("clusters:"), "a probe, and no clusters without centroids");
    cr_expect_eq(sh("./excb eval --pixels '%s'", p("data")), EXCB_EXIT_USAGE, "--pixels takes no checkpoint");
    free(bank - 16); free(query - 16); free(yb - 8); free(yq - 8);
}

Test(e2e, plot_writes_pngs_with_gnuplot) {
    cr_assert_eq(sh(TRAIN "--out '%s'", p("data"), p("a")), 0);
    if (system("command -v gnuplot >/dev/null 2>&1")) {
        cr_expect_eq(sh("./excb plot '%s'", p("a")), EXCB_EXIT_UNAVAILABLE, "without gnuplot: exit 69");
        cr_skip_test("gnuplot is not installed (apt-get install gnuplot-nox): only the missing-tool path was checked");
    }
    cr_assert_eq(sh("./excb plot '%s'", p("a")), 0, "excb plot failed (log: %s/log)", dir);
    const char *pngs[] = {"a/plots/loss.png", "a/plots/diagnostics.png", "a/plots/clusters.png", "a/plots/knn.png",
                          "a/plots/cluster_sizes.png"};
    for (int i = 0; i < 5; i++) {
        FILE *f = fopen(p(pngs[i]), "rb");
        unsigned char sig[8] = {0};
        cr_expect(f && fread(sig, 1, 8, f) == 8 && !memcmp(sig, "\x89PNG\r\n\x1a\n", 8), "%s is not a PNG", pngs[i]);
        if (f) fclose(f);
    }
}
