/* testutil.h: helpers shared by the Criterion suites: tolerance macros, a tensor-file reader for the
 * parity fixtures, and random fills. Header-only; each suite includes it once. */
#ifndef EXCB_TESTUTIL_H
#define EXCB_TESTUTIL_H

#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "excb.h"

/* A suite's scratch directory: /tmp/excb_NAME_XXXXXX made (dir: at least 64 bytes), and removed with all it
 * holds. The suite defines _DEFAULT_SOURCE (mkdtemp) before it includes this header. */
static inline void scratch_make(char *dir, size_t cap, const char *name) {
    snprintf(dir, cap, "/tmp/excb_%s_XXXXXX", name);
    cr_assert(mkdtemp(dir), "mkdtemp %s", dir);
}
static inline void scratch_remove(const char *dir) {
    char cmd[400];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    cr_assert_eq(system(cmd), 0, "%s", cmd);
}

/* |got - want| <= tol, printing both values (Criterion's old float macro prints neither). */
#define EXPECT_NEAR(got, want, tol, what, ...)                                                     \
    do {                                                                                           \
        double g_ = (double)(got), w_ = (double)(want), t_ = (double)(tol);                         \
        cr_expect(fabs(g_ - w_) <= t_, what ": got %.9g want %.9g (|diff| %.3g > tol %.3g)",        \
                  ##__VA_ARGS__, g_, w_, fabs(g_ - w_), t_);                                        \
    } while (0)

/* Normwise relative difference: max_i |a_i - b_i| / max_i |b_i| (b is the reference). It behaves
 * near zero (an entry that should be 0 is judged against the tensor's scale, not against itself). */
static inline double rel_err(const float *a, const float *b, size_t n) {
    double md = 0, mb = 0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)a[i] - b[i]);
        if (d > md || isnan(d)) md = isnan(d) ? INFINITY : d;
        if (fabs(b[i]) > mb) mb = fabs(b[i]);
    }
    return mb > 0 ? md / mb : md;
}

static inline void fill_normal(float *x, size_t n, uint64_t stream, float scale) {
    for (size_t i = 0; i < n; i++) x[i] = scale * excb_normal(7, EXCB_RNG_TEST, stream, 0, i);
}

/* --- tensor files: tests/reference/NAME.bin ("EXCBFIX1") and torch_excb.py --dump files ------------- */
typedef struct {
    char name[128];
    int ndim, shape[8];
    size_t numel;
    float *data;        /* the values (rounded to float32 when stored as float64)                */
    double *data64;     /* EXCBFIX2: the values in double (exact for either stored type)        */
    int dtype;          /* EXCBFIX2: 0 float32, 1 float64, 2 uint8 (text: data64 NULL, bytes)    */
    char *bytes;        /* uint8 tensors, NUL-terminated                                         */
} FixTensor;

typedef struct {
    int n;
    FixTensor *t;
    int header[64];     /* torch_excb.py dumps only */
} Fixture;

static inline int read_u32(FILE *f, uint32_t *v) { return fread(v, 4, 1, f) == 1 ? 0 : -1; }

/* nd extents into t->shape, their product into t->numel */
static inline int read_dims(FILE *f, FixTensor *t, uint32_t nd) {
    t->ndim = (int)nd;
    t->numel = 1;
    for (uint32_t d = 0; d < nd; d++) {
        uint32_t s;
        if (read_u32(f, &s)) return -1;
        t->shape[d] = (int)s;
        t->numel *= s;
    }
    return 0;
}

static inline int read_tensor(FILE *f, FixTensor *t, int pad4) {
    uint32_t len, nd;
    if (read_u32(f, &len) || len >= sizeof t->name) return -1;
    if (fread(t->name, 1, len, f) != len) return -1;
    t->name[len] = 0;
    if (pad4 && len % 4) fseek(f, 4 - len % 4, SEEK_CUR);
    if (read_u32(f, &nd) || nd > 8) return -1;
    if (read_dims(f, t, nd)) return -1;
    t->data = malloc(sizeof(float) * (t->numel ? t->numel : 1));
    return fread(t->data, sizeof(float), t->numel, f) == t->numel ? 0 : -1;
}

/* EXCBFIX2 (tests/reference/make_method_fixtures.py): each tensor carries a dtype */
static inline int read_tensor_v2(FILE *f, FixTensor *t) {
    uint32_t len, dt, nd;
    if (read_u32(f, &len) || len >= sizeof t->name || fread(t->name, 1, len, f) != len) return -1;
    t->name[len] = 0;
    if (read_u32(f, &dt) || dt > 2 || read_u32(f, &nd) || nd > 8) return -1;
    t->dtype = (int)dt;
    if (read_dims(f, t, nd)) return -1;
    size_t n = t->numel;
    if (dt == 2) {
        t->bytes = malloc(n + 1);
        if (fread(t->bytes, 1, n, f) != n) return -1;
        t->bytes[n] = 0;
        return 0;
    }
    t->data = malloc(sizeof(float) * (n ? n : 1));
    t->data64 = malloc(sizeof(double) * (n ? n : 1));
    for (size_t i = 0; i < n; i++) {
        if (dt == 0) {
            if (fread(&t->data[i], 4, 1, f) != 1) return -1;
            t->data64[i] = t->data[i];
        } else {
            if (fread(&t->data64[i], 8, 1, f) != 1) return -1;
            t->data[i] = (float)t->data64[i];
        }
    }
    return 0;
}

/* Loads any of the formats; returns 0 on success. */
static inline int fixture_load(Fixture *fx, const char *path) {
    memset(fx, 0, sizeof *fx);
    FILE *f = fopen(path, "rb");
    if (!f) return -1;
    char magic[8];
    int32_t h0;
    int pad4 = 0;
    uint32_t n = 0;
    if (fread(magic, 1, 8, f) == 8 && !memcmp(magic, "EXCBFIX2", 8)) {
        if (read_u32(f, &n)) { fclose(f); return -1; }
        fx->t = calloc(n, sizeof(FixTensor));
        fx->n = (int)n;
        for (uint32_t i = 0; i < n; i++)
            if (read_tensor_v2(f, &fx->t[i])) { fclose(f); return -1; }
        fclose(f);
        return 0;
    }
    if (!memcmp(magic, "EXCBFIX1", 8)) {
        if (read_u32(f, &n)) { fclose(f); return -1; }
    } else {                                   /* torch_excb.py: int32 header[64], magic 20251122 */
        fseek(f, 0, SEEK_SET);
        if (fread(fx->header, 4, 64, f) != 64) { fclose(f); return -1; }
        h0 = fx->header[0];
        if (h0 != 20251122 || fx->header[1] != 1) { fclose(f); return -1; }
        n = (uint32_t)fx->header[3];
        pad4 = 1;
    }
    fx->t = calloc(n, sizeof(FixTensor));
    for (uint32_t i = 0; i < n; i++)
        if (read_tensor(f, &fx->t[i], pad4)) { fclose(f); return -1; }
    fx->n = (int)n;
    fclose(f);
    return 0;
}

static inline const FixTensor *fix_get(const Fixture *fx, const char *name) {
    for (int i = 0; i < fx->n; i++)
        if (!strcmp(fx->t[i].name, name)) return &fx->t[i];
    return NULL;
}

static inline void fixture_free(Fixture *fx) {
    for (int i = 0; i < fx->n; i++) { free(fx->t[i].data); free(fx->t[i].data64); free(fx->t[i].bytes); }
    free(fx->t);
    memset(fx, 0, sizeof *fx);
}

#endif
