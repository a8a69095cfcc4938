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
#include <dirent.h>
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
    /* one compute thread per excb: Criterion runs as many tests at once as there are cores, and
       OpenMP threads that outnumber the cores spin at every barrier (a tiny run then takes minutes) */
    setenv("OMP_NUM_THREADS", "1", 1);
    scratch_make(dir, sizeof dir, "test_e2e");
    mkdir(p("data"), 0777);
    make_split(p("data/train-images-idx3-ubyte"), p("data/train-labels-idx1-ubyte"), 256, 1);
    make_split(p("data/t10k-images-idx3-ubyte"), p("data/t10k-labels-idx1-ubyte"), 64, 2);
    cr_assert(access("./excb", X_OK) == 0, "./excb missing: run from the repository root after make");
}

static void teardown(void) { scratch_remove(dir); }

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
    cr_assert_str_eq(ma.method->name, mb.method->name);
    for (int i = 0; i < ma.n_mbuf; i++)              /* the method's state: ExCB's s, DINO's centre, SwAV's queue */
        if (ma.mbuf_spec[i].state)
            cr_expect_eq(memcmp(ma.mbuf[i], mb.mbuf[i], sizeof(float) * ma.mbuf_spec[i].floats), 0, "method.%s differs",
                         ma.mbuf_spec[i].name);
    cr_expect_eq(memcmp(ta.prev_labels, tb.prev_labels, sizeof(int32_t) * ta.n_samples), 0, "previous labels differ");
    cr_expect_eq(memcmp(ta.epoch_counts, tb.epoch_counts, sizeof(int64_t) * ma.n_labels), 0, "epoch counts differ");
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

/* two run directories (relative to DIR) that ended at step 64: the same last checkpoint and metrics */
static void expect_same_runs(const char *a, const char *b) {
    char ca[64], cb[64];
    snprintf(ca, sizeof ca, "%s/ckpt-0000000064.excb", a);
    snprintf(cb, sizeof cb, "%s/ckpt-0000000064.excb", b);
    expect_same_checkpoint(p(ca), p(cb));
    snprintf(ca, sizeof ca, "%s/metrics.jsonl", a);
    snprintf(cb, sizeof cb, "%s/metrics.jsonl", b);
    expect_same_metrics(p(ca), p(cb));
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

/* the same for every other method, each with the settings that give its state something to carry:
   DINO's temperature warm-up across the stop, SwAV's queue filling from epoch 1 (the stop falls after
   it is full) and its prototypes frozen for the first 20 steps, CoKe's labels and centres across an
   epoch's end, CARP's per-step partition, mvbt with three global views */
Test(e2e, every_method_resumes_bitwise) {
    static const struct { const char *name, *sets, *stop; } runs[] = {
        {"none", "--set method=none", "27"},
        {"dino", "--set method=dino --set tau_t_warmup_epochs=2 --set tau_t_warmup=0.02", "27"},
        {"swav", "--set method=swav --set swav_queue_length=16 --set swav_queue_start_epoch=1 "
                 "--set swav_freeze_prototypes_steps=20", "40"},
        /* CoKe: two heads, its labels per image and the epoch boundary (step 32) after the stop */
        {"coke", "--set method=coke --set coke_k=16,8", "27"},
        {"carp", "--set method=carp --set carp_block=4", "27"},                 /* a partition per step */
        {"mvbt", "--set method=mvbt --set n_global=3 --set n_local=1", "27"},   /* three global views   */
    };
    for (int i = 0; i < (int)(sizeof runs / sizeof runs[0]); i++) {
        char a[64], b[64];
        snprintf(a, sizeof a, "%s_a", runs[i].name);
        snprintf(b, sizeof b, "%s_b", runs[i].name);
        cr_assert_eq(sh(TRAIN "%s --out '%s'", p("data"), runs[i].sets, p(a)), 0, "%s: excb train failed (%s/log)",
                     runs[i].name, dir);
        cr_assert_eq(sh(TRAIN "%s --out '%s' --stop-after %s", p("data"), runs[i].sets, p(b), runs[i].stop), 0);
        cr_assert_eq(sh(TRAIN "%s --out '%s' --resume", p("data"), runs[i].sets, p(b)), 0, "%s: resume failed", runs[i].name);
        expect_same_runs(a, b);
    }
    /* a method without a GPU twin on --device cuda: exit 64 naming it, before anything is written */
    cr_expect_eq(sh(TRAIN "--set method=dino --device cuda --out '%s'", p("data"), p("gpu")), 64);
    cr_expect(log_has("method 'dino' has no GPU twin"), "the message names the method");
    struct stat st;
    cr_expect(stat(p("gpu"), &st) != 0, "a refused run creates no run directory");
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

/* ---- reliability (issue 13): the lock, signals, paths, another run's checkpoint, bad images, writes,
 * inputs that are not files, ranges. Each case failed before its fix (the issue lists what happened). */

/* `excb train --preset tiny --data DIR/data --out OUT -q [--set EXTRA]` in the background, its output into
   DIR/bg.log; its pid */
/* excb keeps a signal its parent ignored ignored (nohup; a shell's background job ignores SIGINT), so a
   child the tests will signal starts from the default dispositions, whoever started the suite */
static void default_stop_signals(void) {
    signal(SIGINT, SIG_DFL); signal(SIGTERM, SIG_DFL); signal(SIGHUP, SIG_DFL);
}

static pid_t spawn_train_sets(const char *out, const char *const *sets) {
    const char *argv[32] = {"excb", "train", "--preset", "tiny", "--data", p("data"), "--out", out, "-q"};
    int n = 9;
    for (int i = 0; sets && sets[i] && n < 30; i++) { argv[n++] = "--set"; argv[n++] = sets[i]; }
    argv[n] = NULL;
    pid_t pid = fork();
    if (!pid) {
        int fd = open(p("bg.log"), O_WRONLY | O_CREAT | O_TRUNC, 0666);
        dup2(fd, 1); dup2(fd, 2);
        default_stop_signals();
        execv("./excb", (char *const *)argv);
        _exit(127);
    }
    return pid;
}

static pid_t spawn_train(const char *out, const char *extra) {
    const char *sets[2] = {extra, NULL};
    return spawn_train_sets(out, sets);
}

/* a ckpt-*.tmp in dir, now */
static int has_tmp(const char *d) {
    DIR *dd = opendir(d);
    int found = 0;
    for (struct dirent *e; dd && (e = readdir(dd));) found |= strstr(e->d_name, ".tmp") != NULL;
    if (dd) closedir(dd);
    return found;
}

/* the exit status of pid, or -N when signal N killed it (no handler: nothing was saved) */
static int wait_exit(pid_t pid) {
    int st;
    cr_assert_eq(waitpid(pid, &st, 0), pid);
    return WIFEXITED(st) ? WEXITSTATUS(st) : -WTERMSIG(st);
}

static void wait_for_file(const char *path) {
    struct timespec nap = {0, 1000000};
    for (int i = 0; i < 120000 && access(path, F_OK); i++) nanosleep(&nap, NULL);   /* 2 minutes at most */
    cr_assert(access(path, F_OK) == 0, "%s never appeared", path);
}

/* files in dir whose name ends with suffix */
static int count_suffix(const char *dir, const char *suffix) {
    char cmd[800];
    snprintf(cmd, sizeof cmd, "ls -a '%s' | grep -c -- '%s$' > '%s'", dir, suffix, p("count"));
    if (system(cmd) < 0) return -1;
    char *t = slurp_text(p("count"));
    int n = t ? atoi(t) : -1;
    free(t);
    return n;
}

static void expect_complete_lines(const char *path) {
    char *m = slurp_text(path);
    cr_assert(m, "%s missing", path);
    int bad = 0, lines = 0;
    for (char *line = m; *line; lines++) {
        char *nl = strchr(line, '\n');
        if (!nl) { bad++; break; }
        bad += line[0] != '{' || nl[-1] != '}';
        line = nl + 1;
    }
    cr_expect_eq(bad, 0, "%s: %d of %d lines are not one complete record", path, bad, lines);
    free(m);
}

Test(e2e, a_second_process_on_a_live_run_is_refused_with_75_and_changes_nothing) {
    pid_t pid = spawn_train(p("L"), "epochs=1000");        /* 32000 steps: alive for the whole test */
    wait_for_file(p("L/ckpt-0000000004.excb"));
    char *config_before = slurp_text(p("L/config.txt")), *metrics_before = slurp_text(p("L/metrics.jsonl"));
    const char *second[] = {"", "--resume", "--force"};
    for (int i = 0; i < 3; i++) {
        cr_expect_eq(sh(TRAIN "--out '%s' %s", p("data"), p("L"), second[i]), EXCB_EXIT_TEMPFAIL, "train %s", second[i]);
        cr_expect(log_has("in use by another excb process") && log_has("nothing was changed"), "train %s: the message", second[i]);
        cr_expect_eq(kill(pid, 0), 0, "the live run was killed by a refused 'train %s'", second[i]);
    }
    /* what the refused commands could have changed: config.txt, and what the live run had written */
    char *config_after = slurp_text(p("L/config.txt")), *metrics_after = slurp_text(p("L/metrics.jsonl"));
    cr_expect(config_after && !strcmp(config_before, config_after), "config.txt changed");
    cr_expect(metrics_after && !strncmp(metrics_before, metrics_after, strlen(metrics_before)),
              "metrics.jsonl lost what the live run had written");
    free(config_before); free(config_after); free(metrics_before); free(metrics_after);
    kill(pid, SIGINT);
    cr_expect_eq(wait_exit(pid), 130, "the first run, stopped by SIGINT");
    char *log = slurp_text(p("bg.log"));
    cr_expect(log && strstr(log, "SIGINT: stopped after step") && strstr(log, "--resume"), "its message: %s", log ? log : "");
    free(log);
    cr_expect_eq(count_suffix(p("L"), ".tmp"), 0, "no temporary file left");
    expect_complete_lines(p("L/metrics.jsonl"));
    /* the kernel released the lock with the process: the directory is usable again at once */
    cr_expect_eq(sh(TRAIN "--out '%s' --resume --stop-after 1", p("data"), p("L")), 0, "the lock outlived its process");
}

/* SIGINT, SIGTERM and SIGHUP: exit 128 + N, a checkpoint of the last complete step, no .tmp, and the
   resumed run equal bit for bit to one never interrupted */
Test(e2e, signals_stop_with_a_checkpoint_and_the_resumed_run_is_exact) {
    cr_assert_eq(sh(TRAIN "--out '%s'", p("data"), p("a")), 0);
    const int sigs[3] = {SIGINT, SIGTERM, SIGHUP};
    for (int i = 0; i < 3; i++) {
        char run[8], ck[32], path[64];
        snprintf(run, sizeof run, "s%d", i);
        snprintf(ck, sizeof ck, "%s/ckpt-0000000002.excb", run);
        pid_t pid = spawn_train(p(run), NULL);
        wait_for_file(p(ck));
        kill(pid, sigs[i]);
        int code = wait_exit(pid);
        cr_assert_neq(code, 0, "signal %d: the run ended before the signal arrived (62 steps in the time of one poll)", sigs[i]);
        cr_expect_eq(code, 128 + sigs[i], "signal %d: exit %d (negative: killed, nothing saved)", sigs[i], code);
        char *log = slurp_text(p("bg.log"));
        long stopped = -1;
        const char *at = log ? strstr(log, "stopped after step ") : NULL;
        if (at) stopped = atol(at + strlen("stopped after step "));
        snprintf(path, sizeof path, "%s/ckpt-%010ld.excb", run, stopped);
        cr_expect(stopped > 0 && access(p(path), F_OK) == 0, "signal %d: a checkpoint of the step it stopped after: %s",
                  sigs[i], log ? log : "(no message)");
        free(log);
        cr_expect_eq(count_suffix(p(run), ".tmp"), 0, "signal %d: a .tmp left behind", sigs[i]);
        snprintf(path, sizeof path, "%s/metrics.jsonl", run);
        expect_complete_lines(p(path));
        cr_assert_eq(sh(TRAIN "--out '%s' --resume", p("data"), p(run)), 0, "resume after signal %d", sigs[i]);
        snprintf(path, sizeof path, "%s/ckpt-0000000064.excb", run);
        expect_same_checkpoint(p("a/ckpt-0000000064.excb"), p(path));
        snprintf(path, sizeof path, "%s/metrics.jsonl", run);
        expect_same_metrics(p("a/metrics.jsonl"), p(path));
    }
    /* a second signal exits at once (the first would have finished the step), dying of that signal, and
       removes the checkpoint file being written: a model whose checkpoint is 48 MB (K = 16384, d = 256)
       is stopped while a .tmp is there; both signals are made pending, so they arrive back to back (in
       either order: any thread may take one) */
    const char *big[] = {"K=16384", "d=256", "kmeans_init=0", "epochs=1000", "ckpt_every=1", NULL};
    pid_t pid = spawn_train_sets(p("s9"), big);
    wait_for_file(p("s9/ckpt-0000000002.excb"));
    int caught = 0;
    for (int tries = 0; tries < 2000 && !caught; tries++) {
        struct timespec poll = {0, 500000};
        while (!has_tmp(p("s9"))) nanosleep(&poll, NULL);
        kill(pid, SIGSTOP);
        struct timespec settle = {0, 20000000};
        nanosleep(&settle, NULL);                      /* stopped by now */
        caught = has_tmp(p("s9"));
        if (!caught) kill(pid, SIGCONT);
    }
    cr_assert(caught, "never stopped the run while a checkpoint was being written");
    kill(pid, SIGINT);
    kill(pid, SIGTERM);
    kill(pid, SIGCONT);
    int code = wait_exit(pid);
    cr_expect(code == -SIGINT || code == -SIGTERM, "the second signal kills the process: %d", code);
    char *log = slurp_text(p("bg.log"));
    cr_expect(log && strstr(log, "a second signal") && !strstr(log, "stopped after step"), "the second signal's path: %s",
              log ? log : "");
    free(log);
    cr_expect(!has_tmp(p("s9")), "the second signal left the .tmp being written");
    /* a signal the parent ignores (nohup) stays ignored: SIGHUP does nothing, SIGINT still stops */
    pid = fork();
    if (!pid) {
        default_stop_signals();
        signal(SIGHUP, SIG_IGN);
        int fd = open(p("bg.log"), O_WRONLY | O_CREAT | O_TRUNC, 0666);
        dup2(fd, 1); dup2(fd, 2);
        execl("./excb", "excb", "train", "--preset", "tiny", "--data", p("data"), "--out", p("s7"), "-q", "--set", "epochs=1000", (char *)NULL);
        _exit(127);
    }
    wait_for_file(p("s7/ckpt-0000000002.excb"));
    kill(pid, SIGHUP);
    struct timespec wait_a_bit = {0, 300000000};
    nanosleep(&wait_a_bit, NULL);
    cr_expect_eq(kill(pid, 0), 0, "an ignored SIGHUP stopped the run");
    kill(pid, SIGINT);
    cr_expect_eq(wait_exit(pid), 130);
    /* a signal during the final evaluation (a linear probe of 10^6 epochs) stops it within an epoch; the
       checkpoint of the last step is there, and no eval.json */
    pid = spawn_train(p("s8"), "probe_epochs=1000000");
    wait_for_file(p("s8/ckpt-0000000064.excb"));
    struct timespec nap = {0, 100000000};
    nanosleep(&nap, NULL);
    double t0 = (double)time(NULL);
    kill(pid, SIGINT);
    cr_expect_eq(wait_exit(pid), 130);
    cr_expect_leq((double)time(NULL) - t0, 3.0, "the probe was not cut short");
    struct stat st;
    cr_expect(stat(p("s8/eval.json"), &st) != 0, "an interrupted evaluation wrote eval.json");
}

/* a data path with '#', blanks and a newline reads back exactly from config.txt and the checkpoint; the
   truncated path exists too (a decoy with half the images), so a cut path could not go unnoticed */
Test(e2e, a_path_with_hash_blanks_and_newline_survives_resume_and_eval) {
    const char *odd = "da ta #1 \n";
    char cmd[1200];
    snprintf(cmd, sizeof cmd, "cp -r '%s' '%s' && mkdir '%s' && cp '%s'/t10k* '%s'", p("data"), p(odd), p("da ta"), p("data"), p("da ta"));
    cr_assert_eq(system(cmd), 0);
    cr_assert_eq(sh(TRAIN "--out '%s' --stop-after 4", p(odd), p("r")), 0);
    cr_expect_eq(sh(TRAIN "--out '%s' --resume", p(odd), p("r")), 0, "resume read back another path (log: %s/log)", dir);
    cr_expect_eq(sh("./excb eval '%s'", p("r")), 0, "eval read back another path");
    char *ev = slurp_text(p("r/eval.json")), want[600];
    snprintf(want, sizeof want, "\"data\":\"%s/da ta #1 \\u000a\"", dir);
    cr_expect(ev && strstr(ev, want), "eval.json records the path exactly: want %s", want);
    free(ev);
}

/* a checkpoint of a K = 32 run copied into a K = 16 run's directory: exit 78, and nothing appended */
Test(e2e, another_runs_checkpoint_is_refused_with_78) {
    cr_assert_eq(sh(TRAIN "--out '%s' --stop-after 4", p("data"), p("k16")), 0);
    cr_assert_eq(sh(TRAIN "--out '%s' --stop-after 6 --set K=32", p("data"), p("k32")), 0);
    char cmd[1200];
    snprintf(cmd, sizeof cmd, "cp '%s' '%s'", p("k32/ckpt-0000000006.excb"), p("k16/ckpt-0000000006.excb"));
    cr_assert_eq(system(cmd), 0);
    char *before = slurp_text(p("k16/metrics.jsonl"));
    cr_expect_eq(sh(TRAIN "--out '%s' --resume", p("data"), p("k16")), EXCB_EXIT_CONFIG);
    cr_expect(log_has("not this run's checkpoint") && log_has("config.txt") && log_has("'K'"), "the message names the key and config.txt");
    char *after = slurp_text(p("k16/metrics.jsonl"));
    cr_expect(before && after && !strcmp(before, after), "metrics.jsonl changed");
    free(before); free(after);
}

/* an image folder, RGB 12x12 PNGs: NAME/SPLIT/CLASS/i.png, 8 per class, plus one undecodable file per
   split when bad */
static void write_image_folder(const char *root, const char *const *classes, int n_classes, int bad) {
    const char *splits[2] = {"train", "test"};
    char path[700], err[EXCB_ERR_LEN];
    uint8_t px[12 * 12 * 3];
    for (int s = 0; s < 2; s++)
        for (int c = 0; c < n_classes; c++) {
            snprintf(path, sizeof path, "%s/%s/%s", root, splits[s], classes[c]);
            char cmd[800];
            snprintf(cmd, sizeof cmd, "mkdir -p '%s'", path);
            cr_assert_eq(system(cmd), 0);
            for (int i = 0; i < 8; i++) {
                for (int j = 0; j < 12 * 12 * 3; j++) px[j] = (uint8_t)((j / 3) % 12 == c * 4 + 2 ? 230 : excb_hash(3, EXCB_RNG_TEST, s * 8 + i, c, j) % 50);
                snprintf(path, sizeof path, "%s/%s/%s/%d.png", root, splits[s], classes[c], i);
                cr_assert_eq(excb_write_png(path, px, 12, 12, 3, err), 0, "%s", err);
            }
            if (bad && c == 0) {
                snprintf(path, sizeof path, "%s/%s/%s/broken.png", root, splits[s], classes[c]);
                FILE *f = fopen(path, "wb");
                fputs("\x89PNG\r\n\x1a\n this is not a PNG", f);
                fclose(f);
            }
        }
}

Test(e2e, skip_bad_images_holds_for_training_and_every_evaluation) {
    static const char *const ab[] = {"a", "b"}, *const xy[] = {"x", "y"};
    write_image_folder(p("img"), ab, 2, 1);
    cr_expect_eq(sh("./excb train --preset tiny --data '%s' --out '%s' -q", p("img"), p("nb")), EXCB_EXIT_DATA,
                 "without a skip, a bad image stops the run");
    cr_expect(log_has("broken.png"), "and the message names it");
    cr_assert_eq(sh("./excb train --preset tiny --data '%s' --out '%s' -q --skip-bad-images", p("img"), p("sb")), 0,
                 "--skip-bad-images through training, the epochs' k-NN and the final evaluation (log: %s/log)", dir);
    char *ev = slurp_text(p("sb/eval.json"));
    cr_expect(ev && strstr(ev, "\"n_bank\":16,\"n_query\":16,\"skipped_bank\":1,\"skipped_query\":1"), "counted in eval.json: %s", ev ? ev : "");
    free(ev);
    cr_expect_eq(sh("./excb eval '%s'", p("sb")), 0, "excb eval keeps the run's skip");
    cr_expect(log_has("bad images skipped") && log_has("1 of the bank, 1 of the queries"));
    /* train and test splits with different class folders: refused, both named */
    write_image_folder(p("mix"), ab, 2, 0);
    write_image_folder(p("mix2"), xy, 2, 0);
    char cmd[1200];
    snprintf(cmd, sizeof cmd, "rm -r '%s' && mv '%s' '%s'", p("mix/test"), p("mix2/test"), p("mix/test"));
    cr_assert_eq(system(cmd), 0);
    cr_expect_eq(sh("./excb train --preset tiny --data '%s' --out '%s' -q", p("mix"), p("mx")), EXCB_EXIT_DATA);
    cr_expect(log_has("{a, b}") && log_has("{x, y}") && log_has("differ"), "the message names both class sets");
}

/* a full device (/dev/full: every write fails with ENOSPC) under metrics.jsonl, eval.json and a plot's
   data: exit 74 with the path, and no checkpoint that counts unwritten metrics */
Test(e2e, failed_writes_stop_with_74_and_the_path) {
    cr_assert_eq(system("test -w /dev/full"), 0, "/dev/full is needed");
    mkdir(p("w"), 0777);
    cr_assert_eq(symlink("/dev/full", p("w/metrics.jsonl")), 0);
    cr_expect_eq(sh(TRAIN "--out '%s'", p("data"), p("w")), EXCB_EXIT_IO);
    cr_expect(log_has("metrics.jsonl") && log_has("No space left"), "the message names the file and the reason");
    cr_expect_eq(count_suffix(p("w"), ".excb"), 0, "a checkpoint was written over metrics that are not on disk");
    mkdir(p("v"), 0777);
    cr_assert_eq(symlink("/dev/full", p("v/eval.json.tmp")), 0);
    cr_expect_eq(sh(TRAIN "--out '%s'", p("data"), p("v")), EXCB_EXIT_IO);
    cr_expect(log_has("eval.json") && log_has("No space left"));
    struct stat st;
    cr_expect(stat(p("v/eval.json"), &st) != 0, "no eval.json after a failed write");
    mkdir(p("v/plots"), 0777);
    cr_assert_eq(symlink("/dev/full", p("v/plots/epochs.dat")), 0);
    cr_expect_eq(sh("./excb plot '%s'", p("v")), EXCB_EXIT_IO);
    cr_expect(log_has("epochs.dat"));
}

/* inputs are type- and size-checked before they are read: no hang on a FIFO, no 24 GB read of /dev/zero */
Test(e2e, inputs_that_are_not_regular_files_are_refused_at_once) {
    cr_assert_eq(mkfifo(p("fifo"), 0666), 0);
    cr_expect_eq(sh("timeout 20 " TRAIN "--out '%s' --config /dev/zero", p("data"), p("i")), EXCB_EXIT_CONFIG);
    cr_expect(log_has("/dev/zero: not a regular file (a device)"));
    cr_expect_eq(sh("timeout 20 " TRAIN "--out '%s' --config '%s'", p("data"), p("i"), p("data")), EXCB_EXIT_CONFIG);
    cr_expect(log_has("a directory"));
    cr_expect_eq(sh("timeout 20 " TRAIN "--out '%s' --config '%s'", p("data"), p("i"), p("fifo")), EXCB_EXIT_CONFIG);
    char cmd[1200];
    snprintf(cmd, sizeof cmd, "head -c 2000000 /dev/zero | tr '\\0' '#' > '%s'", p("big.conf"));
    cr_assert_eq(system(cmd), 0);
    cr_expect_eq(sh(TRAIN "--out '%s' --config '%s'", p("data"), p("i"), p("big.conf")), EXCB_EXIT_CONFIG);
    cr_expect(log_has("limit"), "a 2 MB config is refused by its size");
    cr_expect_eq(sh("timeout 20 ./excb train --preset tiny -q --data '%s' --out '%s'", p("fifo"), p("i")), EXCB_EXIT_DATA);
    cr_expect(log_has("a FIFO"));
    cr_expect_eq(sh("timeout 20 ./excb eval '%s'", p("fifo")), EXCB_EXIT_DATA, "a FIFO as a checkpoint");
    /* a FIFO named like an image inside an image folder */
    static const char *const ab[] = {"a", "b"};
    write_image_folder(p("ff"), ab, 2, 0);
    cr_assert_eq(mkfifo(p("ff/train/a/img1.png"), 0666), 0);
    cr_expect_eq(sh("timeout 20 ./excb train --preset tiny -q --data '%s' --out '%s'", p("ff"), p("i")), EXCB_EXIT_DATA);
    cr_expect(log_has("img1.png: not a regular file (a FIFO)"));
    cr_expect_eq(sh("timeout 20 ./excb train --preset tiny -q --data '%s' --out '%s' --skip-bad-images", p("ff"), p("i2")), 0,
                 "--skip-bad-images skips it like any bad image");
    /* a directory named like an IDX file is reported as what it is */
    cr_assert_eq(system(strcat(strcpy(cmd, "mkdir -p "), p("fake/train-images-idx3-ubyte"))), 0);
    cr_expect_eq(sh("./excb train --preset tiny -q --data '%s' --out '%s'", p("fake"), p("i")), EXCB_EXIT_DATA);
    cr_expect(log_has("train-images-idx3-ubyte: not a regular file (a directory)"));
}

Test(e2e, ranges_and_messages) {
    const char *out_of_range[] = {"lr_min_factor=-1e300", "probe_wd=-1e300", "knn_bank_max=-5", "knn_query_max=-1",
                                  "centroid_wd_boost=-1", "zero_jitter=2", "clamp=0", "threads=5000", "boost=-0.1"};
    for (size_t i = 0; i < sizeof out_of_range / sizeof *out_of_range; i++) {
        cr_expect_eq(sh(TRAIN "--out '%s' --set %s", p("data"), p("g"), out_of_range[i]), EXCB_EXIT_CONFIG, "%s accepted", out_of_range[i]);
        cr_expect(log_has("is outside"), "%s: the message gives the range", out_of_range[i]);
    }
    /* a batch larger than the data set names what the set holds */
    cr_expect_eq(sh(TRAIN "--out '%s' --set batch=512", p("data"), p("g")), EXCB_EXIT_CONFIG);
    cr_expect(log_has("(256 images in"), "the message counts the images");
    /* the existing-run refusal names the newest checkpoint, not the first in the directory */
    cr_assert_eq(sh(TRAIN "--out '%s' --set keep=5 --stop-after 10", p("data"), p("h")), 0);
    cr_expect_eq(sh(TRAIN "--out '%s'", p("data"), p("h")), EXCB_EXIT_USAGE);
    cr_expect(log_has("checkpoint at step 10"), "the newest checkpoint");
}

/* README promises not covered by a case above, one check each (the README's "Exit codes" section lists
   every promise and the test that holds it to its word) */
Test(e2e, readme_promises) {
    /* "An unknown key or a bad value stops with exit 78 and names it" */
    cr_expect_eq(sh(TRAIN "--out '%s' --set K=12x", p("data"), p("q")), EXCB_EXIT_CONFIG);
    cr_expect(log_has("'K'") && log_has("12x"));
    /* 73: "the run directory or a file in it cannot be created" */
    cr_expect_eq(sh(TRAIN "--out /dev/null/run", p("data")), EXCB_EXIT_CANTCREAT);
    cr_expect(log_has("/dev/null"));
    /* "config.txt: the resolved config, itself a config file": rerunning it gives the same run, bit for bit */
    cr_assert_eq(sh(TRAIN "--out '%s' --stop-after 6", p("data"), p("q1")), 0);
    cr_assert_eq(sh("./excb train -q --config '%s' --out '%s' --stop-after 6", p("q1/config.txt"), p("q2")), 0);
    expect_same_checkpoint(p("q1/ckpt-0000000006.excb"), p("q2/ckpt-0000000006.excb"));
    /* "--help-config: every key, its default and what it does": every key of config.txt is listed */
    cr_assert_eq(sh("./excb train --help-config"), 0);
    char *conf = slurp_text(p("q1/config.txt")), *help = slurp_text(p("log"));
    int missing = 0;
    for (char *line = strtok(conf, "\n"); line; line = strtok(NULL, "\n")) {
        char key[64];
        if (line[0] == '#' || sscanf(line, "%63s =", key) != 1 || !strcmp(key, "preset")) continue;
        char pat[80];
        snprintf(pat, sizeof pat, " %s ", key);
        if (!strstr(help, pat)) { missing++; cr_expect(0, "--help-config lacks '%s'", key); }
    }
    cr_expect_eq(missing, 0);
    free(conf); free(help);
    /* "excb inspect CKPT: verify a checkpoint and list its tensors"; a damaged one: 65 */
    cr_expect_eq(sh("./excb inspect '%s'", p("q1/ckpt-0000000006.excb")), 0);
    cr_expect(log_has("every CRC-32 verified") && log_has("student.") && log_has("teacher.") && log_has("momentum."));
    char cmd[1200];
    snprintf(cmd, sizeof cmd, "head -c 3000 '%s' > '%s'", p("q1/ckpt-0000000006.excb"), p("cut.excb"));
    cr_assert_eq(system(cmd), 0);
    cr_expect_eq(sh("./excb inspect '%s'", p("cut.excb")), EXCB_EXIT_DATA);
    /* "--precision bf16 says so and exits 64" (not yet built; on the CPU every precision but fp32 is 64) */
    cr_expect_eq(sh(TRAIN "--out '%s' --precision bf16", p("data"), p("q3")), EXCB_EXIT_USAGE);
    cr_expect(log_has("bf16"));
    /* "--device auto: the GPU if one answers, else the CPU, said on stderr" */
    cr_expect_eq(sh("./excb train --preset tiny --data '%s' --out '%s' --stop-after 1 --device auto", p("data"), p("q4")), 0);
    cr_expect(log_has("running on the CPU") || log_has("device: "), "the device chosen is said");
    /* "--resume on a directory without a run": 66, and nothing is created */
    cr_expect_eq(sh(TRAIN "--out '%s' --resume", p("data"), p("nothing")), EXCB_EXIT_NOINPUT);
    struct stat st;
    cr_expect(stat(p("nothing"), &st) != 0, "--resume created the directory it did not find");
}

/* --- weights in and out (README, "Weights for PyTorch") ------------------------------------------------ */
/* the log's k-NN, probe and cluster lines (the ones that depend on the weights, not on the paths) */
static char *eval_lines(void) {
    char *log = slurp_text(p("log")), *out = calloc(1, strlen(log ? log : "") + 1);
    for (char *line = log ? strtok(log, "\n") : NULL; line; line = strtok(NULL, "\n"))
        if (strstr(line, "  k = ") || strstr(line, "linear probe:") || strstr(line, "clusters:")) strcat(strcat(out, line), "\n");
    free(log);
    return out;
}

Test(e2e, weights_export_import_features_and_eval_agree) {
    cr_assert_eq(sh(TRAIN "--out '%s' --stop-after 8", p("data"), p("a")), 0);
    char ck[600];                                          /* p()'s buffers rotate: a copy */
    snprintf(ck, sizeof ck, "%s", p("a/ckpt-0000000008.excb"));
    /* export -> import -> export: the same bytes; the imported checkpoint evaluates as the run does */
    cr_assert_eq(sh("./excb export '%s' --out '%s'", p("a"), p("w.safetensors")), 0);
    cr_expect(log_has("step 8, the teacher"));
    cr_assert_eq(sh("./excb import '%s' --out '%s'", p("w.safetensors"), p("imp.excb")), 0);
    cr_assert_eq(sh("./excb export '%s' --out '%s'", p("imp.excb"), p("w2.safetensors")), 0);
    cr_expect_eq(sh("cmp '%s' '%s'", p("w.safetensors"), p("w2.safetensors")), 0, "export(import(export)) is the export");
    cr_assert_eq(sh("./excb eval '%s'", ck), 0);
    char *of_run = eval_lines();
    cr_assert_eq(sh("./excb eval --weights '%s'", p("w.safetensors")), 0);
    char *of_weights = eval_lines();
    cr_assert_eq(sh("./excb eval '%s'", p("imp.excb")), 0);
    char *of_import = eval_lines();
    cr_expect(strstr(of_run, "  k = ") && strstr(of_run, "clusters:"), "%s", of_run);
    cr_expect_str_eq(of_weights, of_run, "eval --weights of the export = eval of the checkpoint");
    cr_expect_str_eq(of_import, of_run, "eval of the imported checkpoint = eval of the checkpoint");
    free(of_run); free(of_weights); free(of_import);
    /* the backbone alone: the same k-NN and probe, and no clusters (the file has no prototypes) */
    cr_assert_eq(sh("./excb export '%s' --backbone-only --out '%s'", ck, p("bb.safetensors")), 0);
    cr_assert_eq(sh("./excb eval --weights '%s'", p("bb.safetensors")), 0);
    cr_expect(log_has("clusters: none"));
    /* NaN in the last BatchNorm's running variance (the file's last bytes): no k-NN of NaN features */
    cr_assert_eq(sh("printf '\\377\\377\\377\\377' | dd of='%s' bs=1 seek=$(($(stat -c %%s '%s') - 4)) conv=notrunc",
                    p("bb.safetensors"), p("bb.safetensors")), 0);
    cr_expect_eq(sh("./excb eval --weights '%s'", p("bb.safetensors")), EXCB_EXIT_DATA);
    cr_expect(log_has("are not finite"));
    /* features: read back; the data's labels; excb eval's features, computed here in this process */
    cr_assert_eq(sh("./excb features '%s' --split test --out '%s'", p("a"), p("f.safetensors")), 0);
    ExcbSafetensors st;
    char err[EXCB_ERR_LEN];
    cr_assert_eq(excb_safetensors_open(&st, p("f.safetensors"), err), 0, "%s", err);
    const ExcbStTensor *f = excb_safetensors_find(&st, "features"), *y = excb_safetensors_find(&st, "labels");
    cr_assert(f && y && f->dtype == EXCB_ST_F32 && y->dtype == EXCB_ST_I64 && f->ndim == 2 && y->ndim == 1);
    cr_expect(f->shape[0] == 64 && y->shape[0] == 64, "the 64 test images: %lld, %lld", (long long)f->shape[0], (long long)y->shape[0]);
    int bad_labels = 0;
    for (int i = 0; i < 64; i++) {
        int64_t v;
        memcpy(&v, y->data + 8 * i, 8);
        bad_labels += v != i % 4;                          /* make_split: class i mod 4 */
    }
    cr_expect_eq(bad_labels, 0);
    ExcbModel m;
    ExcbTrainState ts;
    load_ckpt(ck, &m, &ts);
    ExcbDataset ds;
    ExcbViewConfig vc;
    cr_assert_eq(excb_data_open(&ds, p("data"), "test", err), 0, "%s", err);
    excb_view_config_for(&vc, &m.cfg, 2, 0);
    int D = m.D;
    cr_assert_eq(f->shape[1], D);
    real *want = malloc(sizeof(real) * 64 * D);
    cr_assert_eq(excb_extract_features(&m, 1, &ds, &vc, NULL, 64, want, NULL, err), 0, "%s", err);
    int differ = 0;
    for (int i = 0; i < 64 * D; i++) {
        float v;
        memcpy(&v, f->data + 4 * i, 4);
        differ += v != (float)want[i];
    }
    cr_expect_eq(differ, 0, "the file's features are excb eval's, bit for bit");
    free(want);
    excb_data_close(&ds);
    excb_free(&m);
    excb_train_state_free(&ts);
    excb_safetensors_close(&st);
    /* what is refused: a checkpoint given as weights (65, named), no --out (64), no input (66) */
    cr_expect_eq(sh("./excb eval --weights '%s'", ck), EXCB_EXIT_DATA);
    cr_expect(log_has(ck) && log_has("safetensors"));
    cr_expect_eq(sh("./excb export '%s'", ck), EXCB_EXIT_USAGE);
    cr_expect(log_has("--out"));
    cr_expect_eq(sh("./excb import '%s' --out '%s'", p("none.safetensors"), p("x.excb")), EXCB_EXIT_NOINPUT);
    struct stat sb;
    cr_expect(stat(p("x.excb"), &sb) != 0, "a failed import leaves no file");
}

/* --- excb audit ------------------------------------------------------------------------------------ */
/* The CI form of the small-batch audit on Fashion-MNIST (make data): excb and none at B = 16 on 4,000
   images; the audit's own check (none collapses, excb does not) must hold, the table, the results and
   the plot must be there, and a second call reads the finished runs instead of training again. */
Test(e2e, audit_quick_shows_none_collapse_and_excb_not, .timeout = 600) {
    const char *out = p("aq");
    cr_assert_eq(sh("./excb audit small-batch --quick --out '%s'", out), 0, "the quick audit's check failed (see %s)",
                 p("log"));
    cr_expect(log_has("check: at B = 16") && log_has(": holds"));
    char *tsv = slurp_text(p("aq/results.tsv")), *md = slurp_text(p("aq/table.md"));
    cr_assert(tsv && md, "results.tsv and table.md");
    double dist[2] = {NAN, NAN};
    for (char *line = strtok(tsv, "\n"); line; line = strtok(NULL, "\n")) {
        char arm[32];
        int B;
        long steps;
        double knn, nmi, probe, dend;
        if (sscanf(line, "%31s %d %ld %lf %lf %lf %lf", arm, &B, &steps, &knn, &nmi, &probe, &dend) != 7) continue;
        cr_expect_eq(B, 16);
        cr_expect_eq(steps, 250, "2 epochs of 2,000 images at B = 16: 250 steps, got %ld", steps);
        cr_expect(knn > 60 && knn < 100, "%s: k-NN %g", arm, knn);
        dist[!strcmp(arm, "none")] = dend;
    }
    cr_expect(dist[0] >= 1.0 && dist[1] <= 0.25, "distinct/B: excb %g, none %g", dist[0], dist[1]);
    cr_expect(strstr(md, "| excb | 16 | 250 |") && strstr(md, "| none (no balancing) | 16 | 250 |"), "table rows");
    struct stat st;
    cr_expect(stat(p("aq/plots/distinct.png"), &st) == 0 && st.st_size > 1000, "plots/distinct.png");
    free(tsv); free(md);
    time_t t0 = time(NULL);
    cr_assert_eq(sh("./excb audit small-batch --quick --out '%s'", out), 0);
    cr_expect(log_has("2 of 2 runs") && log_has("finished already"), "the second call reads the finished runs");
    cr_expect(time(NULL) - t0 < 30, "the second call took %ld s: it trained again", (long)(time(NULL) - t0));
    /* another setting is another experiment: refused, nothing mixed into the table */
    cr_expect_eq(sh("./excb audit small-batch --quick --out '%s' --set seed=1", out), EXCB_EXIT_CONFIG);
    cr_expect(log_has("audit.txt") || log_has("was run with"));
}

/* The audit's machinery on the small synthetic set (fast): with lr = 0 nothing learns, so none does not
   collapse and the quick check must fail (exit 1: the check can fail); a run whose evaluation is lost
   resumes from its last checkpoint while the finished one is read; a directory the audit did not make
   is refused (78). */
#define AUDIT_TINY "./excb audit small-batch --quick --out '%s' --set data='%s' --set K=64 --set kmeans_samples=128 " \
                   "--set lr=0 --set knn_k=20"
Test(e2e, audit_check_can_fail_and_an_interrupted_audit_resumes) {
    cr_expect_eq(sh(AUDIT_TINY, p("at"), p("data")), EXCB_EXIT_CHECK, "lr = 0: none cannot collapse");
    cr_expect(log_has("FAILS"));
    cr_assert_eq(unlink(p("at/none-B16/eval.json")), 0);
    cr_expect_eq(sh(AUDIT_TINY, p("at"), p("data")), EXCB_EXIT_CHECK);
    cr_expect(log_has("1 of 2 runs") && log_has("none (no balancing), B = 16: resumed from its checkpoint"));
    struct stat st;
    cr_expect(stat(p("at/none-B16/eval.json"), &st) == 0, "the resumed run was evaluated");
    cr_assert_eq(mkdir(p("foreign"), 0777), 0);
    cr_assert_eq(mkdir(p("foreign/excb-B16"), 0777), 0);
    cr_expect_eq(sh(AUDIT_TINY, p("foreign"), p("data")), EXCB_EXIT_CONFIG);
    cr_expect(log_has("has no audit.txt"));
    /* A4's audit counts have no GPU twin: --device cuda refuses them (64, naming them) before it looks
       for a GPU, and creates nothing */
    cr_expect_eq(sh(TRAIN "--out '%s' --set count_kind=soft --device cuda", p("data"), p("gpu")), EXCB_EXIT_USAGE);
    cr_expect(log_has("count_source and count_kind"));
    struct stat gst;
    cr_expect(stat(p("gpu"), &gst) != 0, "the refused run created its directory");
}

/* excb audit ablations on the synthetic set, two of its arms (--only): the default and A7, whose title
   has a quote ("DINO's pairing") that the gnuplot script must escape (an unescaped one stopped the plots
   with exit 70); the table has the change column against the default, and the ids --only takes are
   checked (64, listing them) */
Test(e2e, audit_ablations_only_two_arms_with_plots) {
    const char *fmt = "./excb audit ablations --quick --out '%s' --set data='%s' --set K=64 --set kmeans_samples=128 "
                      "--set knn_k=20 --only %s";
    cr_expect_eq(sh(fmt, p("ab"), p("data"), "default,A7-nonexistent"), EXCB_EXIT_USAGE);
    cr_expect(log_has("A7-dino-pairing"), "the usage error lists the ids");
    cr_expect_eq(sh(fmt, p("ab"), p("data"), "default,default"), EXCB_EXIT_USAGE, "an id twice");
    cr_assert_eq(sh(fmt, p("ab"), p("data"), "A7-dino-pairing,default"), 0, "the ablation audit failed (see %s)", p("log"));
    char *md = slurp_text(p("ab/table.md")), *gp = slurp_text(p("ab/plots/plots.gp"));
    cr_assert(md && gp);
    cr_expect(strstr(md, "| switch | B = 16 | change at B = 16 |"), "the change column");
    cr_expect(strstr(md, "| default (the official code) |") < strstr(md, "| A7 DINO's pairing"), "the table's order");
    cr_expect(strstr(md, "| default (the official code) | ") && strstr(strstr(md, "| default (the official code) | "), "+0.00 |"),
              "the default's change against itself is +0.00");
    cr_expect(strstr(gp, "title 'A7 DINO''s pairing (14 terms)'"), "the quote written twice");
    struct stat st;
    cr_expect(stat(p("ab/plots/distinct.png"), &st) == 0 && st.st_size > 1000, "plots/distinct.png");
    cr_expect(stat(p("ab/A1-no-boost-B16"), &st) != 0, "an arm --only left out was run");
    free(md); free(gp);
}

/* ------------------------------------------------------------------------------------------------
 * Data parallelism (excb.c section 10b): mpirun -np R against the one-process chunked reference,
 * against the single process, resumed on another R, a killed rank, a rank that reads a bad image.
 * ------------------------------------------------------------------------------------------------ */
/* --oversubscribe: more ranks than cores; --allow-run-as-root: CI runs as root; no single-copy shared
   memory (CMA), which a container without ptrace rights refuses */
#define MPIRUN "mpirun --oversubscribe --allow-run-as-root --mca btl_vader_single_copy_mechanism none -np %d "

/* the MPI tests need mpirun and an excb built with Open MPI: reported SKIPPED otherwise, never passed */
static void need_mpi(void) {
    if (system("command -v mpirun >/dev/null 2>&1")) cr_skip_test("mpirun not installed (openmpi-bin)");
    cr_assert_eq(sh("./excb --version"), 0);
    if (!log_has("MPI:       Open MPI")) cr_skip_test("./excb built without Open MPI (libopenmpi-dev)");
}

Test(e2e, mpirun_equals_the_chunked_reference_bit_for_bit) {
    need_mpi();
    static const struct { int R; const char *set; } cases[] = {{2, ""}, {4, ""}, {2, "--set method=dino"}, {2, "--set method=carp --set K=16 --set carp_block=4"}, {2, "--set method=coke --set coke_k=8,12"},
        {2, "--set method=swav --set swav_freeze_prototypes_steps=4"},
        {4, "--set method=swav --set swav_freeze_prototypes_steps=4 --set swav_queue_length=16 --set swav_queue_start_epoch=0"},
        {2, "--set method=mvbt"}, {2, "--set count_source=raw"}, {4, "--set count_kind=soft"}};
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char c[16], m[16], ma[64];
        snprintf(c, sizeof c, "c%zu", i);
        snprintf(m, sizeof m, "m%zu", i);
        cr_assert_eq(sh(TRAIN "--out '%s' --chunks %d %s", p("data"), p(c), cases[i].R, cases[i].set), 0,
                     "--chunks %d %s (log: %s/log)", cases[i].R, cases[i].set, dir);
        cr_assert_eq(sh(MPIRUN TRAIN "--out '%s' %s", cases[i].R, p("data"), p(m), cases[i].set), 0,
                     "mpirun -np %d %s (log: %s/log)", cases[i].R, cases[i].set, dir);
        expect_same_runs(c, m);
        snprintf(ma, sizeof ma, "%s/metrics.jsonl", m);
        char *hdr = slurp_text(p(ma)), want[32];
        snprintf(want, sizeof want, "\"world_size\":%d,", cases[i].R);
        cr_expect(hdr && strstr(hdr, want), "the run record says %s", want);
        free(hdr);
    }
}

/* R shares against the whole batch in one process, for every method: only the order of the partial
   sums differs. After two steps (four for SwAV, whose queue is in use from step 3; no k-means, whose
   argmax could amplify an ulp into another centroid), every tensor and every state buffer is within 2e-5
   of its largest magnitude (measured on this data: 1.2e-6 to 8.0e-6 over the cases below). The exception
   is a bias whose effect a later normalisation removes: a Linear layer's that a BatchNorm follows, the
   shift of BN(h) (the predictor's BatchNorm undoes it through a Linear layer), h's own bias where BN(h)
   (CoKe) or a per-feature standardisation (mvbt, T1) reads h. Its exact gradient is 0 and what float32
   computes is rounding noise (about 1e-7 on the parameters, up to 1.5e-5 in mvbt's momentum): compared
   absolutely, within 5e-5. */
static double max_abs(const float *a, size_t n) {
    double m = 0;
    for (size_t i = 0; i < n; i++) m = fmax(m, fabs(a[i]));
    return m;
}
static double max_diff(const float *a, const float *b, size_t n) {
    double m = 0;
    for (size_t i = 0; i < n; i++) m = fmax(m, fabs((double)a[i] - b[i]));
    return m;
}
/* Two runs' checkpoints against each other, tensor by tensor: each within `tol` of its largest
   magnitude (biases whose exact gradient is 0, the Linear layers before a BatchNorm and the shifts a
   later standardisation removes, within 5e-5 absolutely), BN statistics and float method state alike,
   the labels equal. Returns the worst relative difference. */
static double expect_runs_close(const char *ck_one, const char *ck, double tol, const char *what_run) {
    ExcbModel a, b;
    ExcbTrainState ta, tb;
    load_ckpt(ck_one, &a, &ta);
    load_ckpt(ck, &b, &tb);
    const float *bufs_a[3] = {a.params, a.teacher, a.momentum}, *bufs_b[3] = {b.params, b.teacher, b.momentum};
    static const char *const what[3] = {"student", "teacher", "momentum"};
    double worst = 0;
    for (int t = 0; t < a.n_tensors; t++) {
        int zero_grad_bias = 0;
        for (int l = 0; l < 3; l++) zero_grad_bias |= a.proj[l].has_bn && a.proj[l].b == t;
        zero_grad_bias |= a.pred[0].has_bn && a.pred[0].b == t;
        zero_grad_bias |= t == a.pred_bn_beta;       /* BN(h)'s shift, which the predictor's BN undoes too */
        zero_grad_bias |= a.method->bn_rows && a.proj[2].b == t;    /* CoKe: h's bias, before BN(h) */
        zero_grad_bias |= !strcmp(a.method->name, "mvbt") && a.proj[2].b == t;   /* T1 standardises h */
        for (int w = 0; w < 3; w++) {
            const ExcbTensor *T = &a.tensors[t];
            double d = max_diff(bufs_a[w] + T->offset, bufs_b[w] + T->offset, T->numel);
            if (zero_grad_bias) {
                cr_expect_leq(d, 5e-5, "%s, %s %s (gradient 0 in exact arithmetic): %g", what_run, what[w], T->name, d);
                continue;
            }
            double rel = d / fmax(max_abs(bufs_a[w] + T->offset, T->numel), 1e-30);
            worst = fmax(worst, rel);
            cr_expect_leq(rel, tol, "%s, %s %s: %g of its largest magnitude", what_run, what[w], T->name, rel);
        }
    }
    double rs = max_diff(a.running, b.running, a.n_running) / max_abs(a.running, a.n_running);
    double rt = max_diff(a.teacher_running, b.teacher_running, a.n_running) / max_abs(a.teacher_running, a.n_running);
    cr_expect_leq(rs, tol, "%s, BN running statistics: %g", what_run, rs);
    cr_expect_leq(rt, tol, "%s, teacher BN running statistics: %g", what_run, rt);
    for (int i = 0; i < a.n_mbuf; i++)               /* the method's state: s, the centre, the queue, ... */
        if (a.mbuf_spec[i].state && !a.mbuf_spec[i].integer) {
            double scale = max_abs(a.mbuf[i], a.mbuf_spec[i].floats);
            double rel = scale > 0 ? max_diff(a.mbuf[i], b.mbuf[i], a.mbuf_spec[i].floats) / scale : 0;
            worst = fmax(worst, rel);
            cr_expect_leq(rel, tol, "%s, method.%s: %g", what_run, a.mbuf_spec[i].name, rel);
        }
    cr_expect_eq(memcmp(ta.prev_labels, tb.prev_labels, sizeof(int32_t) * ta.n_samples), 0, "%s: the labels", what_run);
    excb_train_state_free(&ta); excb_train_state_free(&tb);
    excb_free(&a); excb_free(&b);
    return worst;
}

Test(e2e, chunks_match_one_process_to_a_stated_tolerance) {
    /* SwAV's queue is in use from step 3 (two pushes of 8 rows fill its 16): compared after step 4 */
    static const struct { int R; const char *set; int step; } cases[] = {
        {2, "", 2}, {4, "", 2}, {2, "--set method=dino", 2}, {2, "--set method=carp --set K=16 --set carp_block=4", 2},
        {2, "--set method=coke --set coke_k=8,12", 2},
        {2, "--set method=swav --set swav_freeze_prototypes_steps=0 --set swav_queue_length=16 --set swav_queue_start_epoch=0", 4},
        {2, "--set method=mvbt", 2}, {2, "--set method=mvbt --set n_local=0 --set n_global=2", 2},
        {2, "--set count_source=raw", 2}, {2, "--set count_source=raw --set count_kind=soft", 2}};
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        int R = cases[c].R;
        char one[16], run[16], ck_one[48], ck[48];
        snprintf(one, sizeof one, "one%zu", c);
        snprintf(run, sizeof run, "r%zu", c);
        cr_assert_eq(sh(TRAIN "--out '%s' --set kmeans_init=0 --stop-after %d %s", p("data"), p(one), cases[c].step,
                        cases[c].set), 0);
        cr_assert_eq(sh(TRAIN "--out '%s' --set kmeans_init=0 --stop-after %d --chunks %d %s", p("data"), p(run),
                        cases[c].step, R, cases[c].set), 0);
        snprintf(ck_one, sizeof ck_one, "%s/ckpt-%010d.excb", one, cases[c].step);
        snprintf(ck, sizeof ck, "%s/ckpt-%010d.excb", run, cases[c].step);
        char label[200];
        snprintf(label, sizeof label, "%s R = %d", cases[c].set, R);
        double worst = expect_runs_close(p(ck_one), p(ck), 2e-5, label);
        cr_log_info("%s R = %d: worst relative difference %.3g\n", cases[c].set, R, worst);
    }
}

/* --- the GPU twin over ranks: run on a machine with a GPU, reported SKIP elsewhere ------------------- */
static void need_mpi_and_gpu(void) {
    need_mpi();
    char desc[512];
    if (excb_cuda_probe(desc, sizeof desc)) cr_skip_test("no GPU: %s", desc);
}

/* 2 ranks against one process, both on the GPU, ExCB after two steps: ranks on one GPU (every reduction
   through host memory over MPI; CUDA_VISIBLE_DEVICES with one entry makes them share it) or, with `own`, one GPU
   each (NCCL's gradient all-reduce; SKIP unless the run says NCCL joined them). The tolerance is the
   chunks test's, the same sums in other orders, measured on the CPU only: the first GPU run states
   its own (cuDNN may pick other algorithms for the ranks' smaller batches). */
static void gpu_ranks_against_one(int own) {
    need_mpi_and_gpu();
    const char *one = own ? "g1n" : "g1s", *two = own ? "g2n" : "g2s";
    /* the shared case: both ranks on the first GPU this process may use (the one its own run takes) */
    char share[160] = "";
    const char *visible = getenv("CUDA_VISIBLE_DEVICES");
    if (!own) snprintf(share, sizeof share, "CUDA_VISIBLE_DEVICES=%.*s ", visible && *visible ? (int)strcspn(visible, ",") : 1,
                       visible && *visible ? visible : "0");
    cr_assert_eq(sh(TRAIN "--out '%s' --device cuda --set kmeans_init=0 --stop-after 2", p("data"), p(one)), 0);
    cr_assert_eq(sh("%s" MPIRUN TRAIN "--out '%s' --device cuda --set kmeans_init=0 --stop-after 2", share, 2,
                    p("data"), p(two)), 0);
    if (own && log_has("NCCL is not built in")) cr_skip_test("this build has no NCCL (make found none)");
    if (own && !log_has("all-reduced by NCCL")) cr_skip_test("fewer than 2 GPUs visible: the ranks shared one");
    cr_expect(own || log_has("every reduction through host memory"), "the shared GPU's path was taken");
    /* excb bench on the same ranks: the reductions' time against the step's */
    cr_expect_eq(sh("%s" MPIRUN "./excb bench --config tiny --reps 1 --min-seconds 1 --device cuda", share, 2), 0);
    cr_expect(log_has(own ? "2 ranks (Open MPI and NCCL), 2 images each" : "2 ranks (Open MPI), 2 images each"));
    /* --chunks keeps one device state per process: with --device cuda it is refused (64) */
    cr_expect_eq(sh(TRAIN "--out '%s' --device cuda --chunks 2", p("data"), p("gc")), EXCB_EXIT_USAGE);
    cr_expect(log_has("mpirun -np 2"));
    char a[600], b[600];
    snprintf(a, sizeof a, "%s/ckpt-0000000002.excb", p(one));
    snprintf(b, sizeof b, "%s/ckpt-0000000002.excb", p(two));
    double worst = expect_runs_close(a, b, 2e-5, own ? "2 GPUs, NCCL" : "2 ranks on one GPU");
    cr_log_info("GPU, 2 ranks (%s) against one process: worst relative difference %.3g\n", own ? "NCCL" : "shared", worst);
}

Test(e2e, gpu_ranks_sharing_one_gpu_match_one_gpu_process) { gpu_ranks_against_one(0); }
Test(e2e, gpu_ranks_with_nccl_match_one_gpu_process) { gpu_ranks_against_one(1); }

/* a run of R ranks resumes on R' ranks: R = R' (another transport) continues bit for bit; 2 -> 4 gives
   what the chunked reference gives for 2 -> 4; a batch R does not divide and --chunks under mpirun are
   refused before anything is written; eval under mpirun is refused, bench runs its ranks */
Test(e2e, a_run_of_r_ranks_resumes_on_r_prime) {
    need_mpi();
    cr_assert_eq(sh(TRAIN "--out '%s' --chunks 2", p("data"), p("c2")), 0);
    cr_assert_eq(sh(MPIRUN TRAIN "--out '%s' --stop-after 32", 2, p("data"), p("m")), 0, "log: %s/log", dir);
    cr_assert_eq(sh(TRAIN "--out '%s' --chunks 2 --resume", p("data"), p("m")), 0);
    expect_same_runs("c2", "m");
    cr_assert_eq(sh(MPIRUN TRAIN "--out '%s' --stop-after 32", 2, p("data"), p("x")), 0);
    cr_assert_eq(sh(MPIRUN TRAIN "--out '%s' --resume", 4, p("data"), p("x")), 0, "2 -> 4 ranks (log: %s/log)", dir);
    cr_assert_eq(sh(TRAIN "--out '%s' --chunks 2 --stop-after 32", p("data"), p("y")), 0);
    cr_assert_eq(sh(TRAIN "--out '%s' --chunks 4 --resume", p("data"), p("y")), 0);
    expect_same_checkpoint(p("x/ckpt-0000000064.excb"), p("y/ckpt-0000000064.excb"));
    cr_assert_eq(sh(TRAIN "--out '%s' --resume", p("data"), p("y")), 0, "and on one process (nothing left to do)");
    cr_expect_eq(sh(TRAIN "--out '%s' --chunks 3", p("data"), p("n3")), EXCB_EXIT_CONFIG);
    cr_expect(log_has("batch 8 does not split into 3 equal shares"));
    cr_expect_eq(sh(TRAIN "--out '%s' --chunks 3 --force", p("data"), p("c2")), EXCB_EXIT_CONFIG);
    cr_expect(access(p("c2/ckpt-0000000064.excb"), F_OK) == 0, "a refused --force deleted the run's checkpoints");
    cr_expect_eq(sh(MPIRUN TRAIN "--out '%s' --chunks 2", 2, p("data"), p("mc")), EXCB_EXIT_USAGE);
    cr_expect_eq(sh(MPIRUN "./excb eval '%s'", 2, p("c2")), EXCB_EXIT_USAGE, "eval runs in one process");
    cr_expect(log_has("only 'excb train' and 'excb bench' run on several ranks"));
    cr_expect_eq(sh(MPIRUN "./excb bench --config tiny --reps 1 --min-seconds 1", 2), 0);
    cr_expect(log_has("2 ranks (Open MPI), 2 images each") && log_has("B=4"), "bench reports the global batch");
    struct stat st;
    cr_expect(stat(p("n3/config.txt"), &st) && stat(p("mc/config.txt"), &st),
              "a refused run wrote its config");
}

/* the pid of the `excb train` process of MPI rank `rank` whose command line names `out` (0: none yet) */
static pid_t rank_pid(int rank, const char *out) {
    char want[32];
    int wl = snprintf(want, sizeof want, "OMPI_COMM_WORLD_RANK=%d", rank);
    DIR *d = opendir("/proc");
    pid_t found = 0;
    for (struct dirent *e; d && !found && (e = readdir(d));) {
        if (e->d_name[0] < '0' || e->d_name[0] > '9') continue;
        char path[300], buf[1 << 15];
        snprintf(path, sizeof path, "/proc/%s/comm", e->d_name);
        FILE *f = fopen(path, "r");
        if (!f) continue;
        int is_excb = fgets(buf, sizeof buf, f) && !strcmp(buf, "excb\n");
        fclose(f);
        if (!is_excb) continue;
        snprintf(path, sizeof path, "/proc/%s/cmdline", e->d_name);
        int has_out = 0, has_rank = 0;
        if ((f = fopen(path, "r"))) {
            size_t n = fread(buf, 1, sizeof buf - 1, f);
            for (size_t i = 0; i < n; i += strlen(buf + i) + 1) has_out |= !strcmp(buf + i, out);
            fclose(f);
        }
        snprintf(path, sizeof path, "/proc/%s/environ", e->d_name);
        if ((f = fopen(path, "r"))) {
            size_t n = fread(buf, 1, sizeof buf - 1, f);
            buf[n] = 0;
            for (size_t i = 0; i < n; i += strlen(buf + i) + 1)
                has_rank |= !strncmp(buf + i, want, wl) && buf[i + wl] == 0;
            fclose(f);
        }
        if (has_out && has_rank) found = (pid_t)atol(e->d_name);
    }
    if (d) closedir(d);
    return found;
}

/* mpirun -np 2 of a long tiny run into out, in the background (output in DIR/bg.log); its pid */
static pid_t spawn_mpirun_train(const char *out) {
    pid_t pid = fork();
    if (!pid) {
        default_stop_signals();
        int fd = open(p("bg.log"), O_WRONLY | O_CREAT | O_TRUNC, 0666);
        dup2(fd, 1); dup2(fd, 2);
        execlp("mpirun", "mpirun", "--oversubscribe", "--allow-run-as-root", "--mca", "btl_vader_single_copy_mechanism",
               "none", "-np", "2", "./excb", "train", "--preset",
               "tiny", "--data", p("data"), "--out", out, "-q", "--set", "epochs=1000", (char *)NULL);
        _exit(127);
    }
    return pid;
}

/* kill -9 of one rank mid-run: mpirun ends every other rank within 10 s (measured: 2.1 s; Open MPI sends
   SIGTERM, then SIGKILL a second later) and names the lost rank; the last checkpoint is intact and the
   run resumes. A rank that reads a bad image stops the job with the single process's exit 65. */
Test(e2e, a_killed_rank_ends_the_job_and_the_run_resumes) {
    need_mpi();
    pid_t pid = spawn_mpirun_train(p("k"));
    wait_for_file(p("k/ckpt-0000000002.excb"));
    pid_t victim = 0;
    for (int i = 0; i < 200 && !(victim = rank_pid(1, p("k"))); i++) usleep(10000);
    cr_assert(victim > 0, "rank 1's process not found");
    cr_assert_eq(kill(victim, SIGKILL), 0);
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    int st = 0, done = 0;
    for (int i = 0; i < 600 && !(done = waitpid(pid, &st, WNOHANG) == pid); i++) usleep(50000);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    if (!done) { kill(pid, SIGKILL); waitpid(pid, &st, 0); }
    double waited = (t1.tv_sec - t0.tv_sec) + 1e-9 * (t1.tv_nsec - t0.tv_nsec);
    cr_assert(done, "the job still ran 30 s after a rank was killed");
    cr_expect_leq(waited, 10.0, "the other rank took %.1f s to end", waited);
    cr_expect(WIFEXITED(st) && WEXITSTATUS(st) != 0, "mpirun reports the failure");
    char *log = slurp_text(p("bg.log"));
    cr_expect(log && strstr(log, "rank 1") && strstr(log, "signal 9"), "the message names the lost rank: %s", log ? log : "");
    free(log);
    cr_log_info("a killed rank ended the job in %.2f s\n", waited);
    char ck[4200], err[EXCB_ERR_LEN];
    cr_assert_eq(excb_find_checkpoint(p("k"), ck, sizeof ck, 0, err), 0, "no intact checkpoint: %s", err);
    long at = atol(strrchr(ck, '-') + 1);
    cr_expect_eq(sh(MPIRUN TRAIN "--out '%s' --resume --stop-after %ld --set epochs=1000", 2, p("data"), p("k"), at + 2), 0,
                 "resume after the lost rank (log: %s/log)", dir);
    /* a bad image on a rank: exit 65, the message names it, as one process says */
    static const char *const ab[] = {"a", "b"};
    write_image_folder(p("img"), ab, 2, 1);
    cr_expect_eq(sh(MPIRUN "./excb train --preset tiny --data '%s' --out '%s' -q", 2, p("img"), p("bad")), EXCB_EXIT_DATA);
    cr_expect(log_has("broken.png"), "the message names the image");
}

/* SIGINT to every rank (pkill -INT -x excb): they agree on it before the next step, stop at the same
   step, rank 0 saves it and says so once, the job exits 130; the run resumes */
Test(e2e, a_signal_to_the_ranks_stops_them_at_one_step_with_a_checkpoint) {
    need_mpi();
    pid_t pid = spawn_mpirun_train(p("s"));
    wait_for_file(p("s/ckpt-0000000002.excb"));
    pid_t r0 = 0, r1 = 0;
    for (int i = 0; i < 200 && !(r0 && r1); i++, usleep(10000)) { r0 = rank_pid(0, p("s")); r1 = rank_pid(1, p("s")); }
    cr_assert(r0 > 0 && r1 > 0, "the ranks' processes not found");
    kill(r1, SIGINT);                          /* one after the other, as pkill does */
    kill(r0, SIGINT);
    int code = wait_exit(pid);
    cr_expect_eq(code, 130, "the job's exit: %d", code);
    char *log = slurp_text(p("bg.log"));
    const char *at = log ? strstr(log, "stopped after step ") : NULL;
    cr_expect(at && !strstr(at + 1, "stopped after step "), "one message, from rank 0: %s", log ? log : "");
    long stopped = at ? atol(at + strlen("stopped after step ")) : -1;
    free(log);
    char ck[64];
    snprintf(ck, sizeof ck, "s/ckpt-%010ld.excb", stopped);
    cr_expect(stopped > 0 && access(p(ck), F_OK) == 0, "a checkpoint of step %ld", stopped);
    cr_expect(!has_tmp(p("s")), "a .tmp left behind");
    cr_expect_eq(sh(MPIRUN TRAIN "--out '%s' --resume --stop-after %ld --set epochs=1000", 2, p("data"), p("s"), stopped + 2), 0,
                 "resume (log: %s/log)", dir);
}
