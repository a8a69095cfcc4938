/* tsan_loader.c: the loader's threads under ThreadSanitizer (`make test-tsan`). Criterion's runner
 * does not run under TSan, so this is a plain program: it drives the loader through the cases that
 * involve several threads (1 to 4 workers, two epochs, a resumed start, a bad file mid-epoch, the
 * skip-bad path) and checks the batches against a single-threaded run. Exit 0 when clean; TSan
 * itself exits non-zero on any data race it sees. */
#define _DEFAULT_SOURCE
#include "excb.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static int failures;
#define CHECK(cond, ...) do { if (!(cond)) { fprintf(stderr, "FAIL: " __VA_ARGS__); fputc('\n', stderr); failures++; } } while (0)

static ExcbViewConfig views(int channels) {
    ExcbViewConfig vc;
    excb_view_config_default(&vc, EXCB_BLUR_AS_CONFIGURED);
    vc.global_size = 12; vc.local_size = 6; vc.channels = channels; vc.epochs = 4; vc.seed = 3;
    return vc;
}

/* batches [first, first + count) as one array, made with `workers` threads; NULL on a loader error */
static real *batches(ExcbDataset *ds, int channels, int workers, long first, int count, int B, size_t *per, int *code) {
    ExcbViewConfig vc = views(channels);
    ExcbLoader L;
    char err[EXCB_ERR_LEN];
    *code = excb_loader_open(&L, ds, &vc, B, workers, first, err);
    if (*code) return NULL;
    size_t ng = 2 * (size_t)B * channels * 144, nl = 6 * (size_t)B * channels * 36;
    *per = ng + nl;
    real *all = malloc(sizeof(real) * *per * count);
    for (int b = 0; b < count; b++) {
        ExcbBatch *bt;
        if ((*code = excb_loader_next(&L, &bt, err))) {
            CHECK(excb_loader_next(&L, &bt, err) == *code, "the error is not returned again");
            break;
        }
        memcpy(all + b * *per, bt->xg, sizeof(real) * ng);
        memcpy(all + b * *per + ng, bt->xl, sizeof(real) * nl);
    }
    excb_loader_close(&L);
    return all;
}

int main(void) {
    /* an in-memory gray data set of 40 images */
    enum { N = 40 };
    static uint8_t px[N * 400];
    static int32_t labels[N];
    for (int i = 0; i < N * 400; i++) px[i] = (uint8_t)(excb_hash(5, 6, 7, 8, (uint64_t)i) & 255);
    ExcbDataset ds = {.kind = EXCB_DATA_IDX, .n = N, .channels = 1, .height = 20, .width = 20, .n_classes = 10,
                      .labels = labels, .n_parts = 1};
    strcpy(ds.path, "memory");
    ds.parts[0] = (ExcbDataPart){.base = px, .n = N, .record = 400};
    size_t per;
    int code;
    real *ref = batches(&ds, 1, 0, 0, 12, 4, &per, &code);
    for (int rep = 0; rep < 20; rep++)
        for (int w = 1; w <= 4; w++) {
            real *got = batches(&ds, 1, w, rep % 2 ? 5 : 0, rep % 2 ? 7 : 12, 4, &per, &code);
            CHECK(!code && !memcmp(got, ref + (rep % 2 ? 5 : 0) * per, sizeof(real) * per * (rep % 2 ? 7 : 12)),
                  "%d workers, start %d: batches differ", w, rep % 2 ? 5 : 0);
            free(got);
        }
    free(ref);
    /* a folder of 12 JPEGs, one truncated: strict mode fails cleanly, skip mode runs */
    char dir[64], path[128], err[EXCB_ERR_LEN];
    snprintf(dir, sizeof dir, "/tmp/excb_tsan_%d", (int)getpid());
    mkdir(dir, 0755);
    snprintf(path, sizeof path, "%s/k", dir);
    mkdir(path, 0755);
    uint8_t img[16 * 16 * 3];
    for (int i = 0; i < 12; i++) {
        for (int j = 0; j < 16 * 16 * 3; j++) img[j] = (uint8_t)(i * 9 + j % 97);
        snprintf(path, sizeof path, "%s/k/%02d.jpg", dir, i);
        if (excb_write_jpeg(path, img, 16, 16, 3, 90, err)) { fprintf(stderr, "%s\n", err); return 1; }
    }
    snprintf(path, sizeof path, "%s/k/07.jpg", dir);
    if (truncate(path, 200)) return 1;
    for (int rep = 0; rep < 20; rep++)
        for (int skip = 0; skip < 2; skip++) {
            ExcbDataset fd;
            if (excb_data_open(&fd, dir, NULL, err)) { fprintf(stderr, "%s\n", err); return 1; }
            fd.skip_bad = skip;
            real *got = batches(&fd, 3, 1 + rep % 3, 0, 9, 2, &per, &code);
            CHECK(skip ? code == 0 : code == EXCB_EXIT_DATA, "skip %d, %d workers: code %d", skip, 1 + rep % 3, code);
            free(got);
            excb_data_close(&fd);
        }
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    if (system(cmd)) return 1;
    printf("tsan_loader: %s (%d failures)\n", failures ? "FAILED" : "clean", failures);
    return failures ? 1 : 0;
}
