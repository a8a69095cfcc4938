/* test_weights.c: weights in and out (excb.c section 16b): the safetensors reader against malformed
 * files, export -> import round trips, and state dicts written by PyTorch (torchvision's ResNet class)
 * loaded and run to PyTorch's features.
 *
 * The PyTorch fixtures are tests/reference/weights/NAME.safetensors (the state dict, written by the
 * safetensors library) with NAME.features.safetensors ("input", "features", and in __metadata__ the
 * backbone excb must read off the names); tests/reference/make_weights_fixtures.py writes them. The
 * harness takes every fixture of the directory, or of $EXCB_WEIGHTS_FIXTURES (the same script's --full
 * output: torchvision's real resnet18 and resnet50). */
#define _GNU_SOURCE          /* mkdtemp */
#include "testutil.h"
#include <dirent.h>
#include <jansson.h>
#include <unistd.h>

#define FIXTURES "tests/reference/weights"

static char scratch[64];

static void make_scratch(void) { scratch_make(scratch, sizeof scratch, "weights"); }
static void remove_scratch(void) { scratch_remove(scratch); }

/* a file of the given bytes: an 8-byte length (hlen, as given: it may lie), the header text, then data */
static void write_raw(const char *path, uint64_t hlen, const char *header, const void *data, size_t n) {
    FILE *f = fopen(path, "wb");
    cr_assert(f, "%s", path);
    uint8_t len8[8];
    for (int i = 0; i < 8; i++) len8[i] = (uint8_t)(hlen >> (8 * i));
    fwrite(len8, 1, 8, f);
    fwrite(header, 1, strlen(header), f);
    if (n) fwrite(data, 1, n, f);
    fclose(f);
}

/* one malformed file: the reader refuses it with exit 65, an error naming the file and saying `why` */
static void expect_refused(const char *name, uint64_t hlen, const char *header, size_t data_bytes, const char *why) {
    char path[128], err[EXCB_ERR_LEN] = "";
    snprintf(path, sizeof path, "%s/%s.safetensors", scratch, name);
    static uint8_t zeros[4096];
    cr_assert(data_bytes <= sizeof zeros);
    write_raw(path, hlen == UINT64_MAX ? strlen(header) : hlen, header, zeros, data_bytes);
    ExcbSafetensors st;
    int code = excb_safetensors_open(&st, path, err);
    cr_expect_eq(code, EXCB_EXIT_DATA, "%s: exit %d, not 65 (err: %s)", name, code, err);
    cr_expect(strstr(err, path), "%s: the error names the file: %s", name, err);
    cr_expect(strstr(err, why), "%s: the error says '%s': %s", name, why, err);
    if (!code) excb_safetensors_close(&st);
}

#define HDR UINT64_MAX          /* the header's true length */

Test(reader, every_malformed_header_is_refused_with_its_reason, .init = make_scratch, .fini = remove_scratch) {
    const char *one = "\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}";
    char h[512];
    /* the length field */
    expect_refused("empty_header", HDR, "", 0, "does not begin with '{'");        /* N = 0 */
    char shortp[128], err[EXCB_ERR_LEN] = "";                                     /* 5 bytes in all */
    snprintf(shortp, sizeof shortp, "%s/short.safetensors", scratch);
    FILE *f = fopen(shortp, "wb");
    fwrite("\x02\0\0\0\0", 1, 5, f);
    fclose(f);
    ExcbSafetensors st;
    cr_expect_eq(excb_safetensors_open(&st, shortp, err), EXCB_EXIT_DATA);
    cr_expect(strstr(err, "5 bytes: too short"), "%s", err);
    snprintf(h, sizeof h, "{%s}", one);
    expect_refused("length_past_end", strlen(h) + 9, h, 8, "runs past the end of the file");
    expect_refused("length_above_limit", 100000001ull, h, 8, "above the format's limit");
    expect_refused("not_an_object", HDR, "[1, 2]", 0, "does not begin with '{'");
    expect_refused("bad_json", HDR, "{\"a\": {\"dtype\": }", 0, "header, byte");
    snprintf(h, sizeof h, "{%s,%s}", one, one);
    expect_refused("duplicate_key", HDR, h, 8, "duplicate");
    /* one tensor's entry */
    expect_refused("entry_not_object", HDR, "{\"a\":[0,8]}", 8, "not a JSON object");
    expect_refused("no_dtype", HDR, "{\"a\":{\"shape\":[2],\"data_offsets\":[0,8]}}", 8, "has no dtype");
    expect_refused("unknown_field", HDR, "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8],\"x\":1}}", 8,
                   "unknown field 'x'");
    expect_refused("unknown_dtype", HDR, "{\"a\":{\"dtype\":\"F31\",\"shape\":[2],\"data_offsets\":[0,8]}}", 8,
                   "dtype 'F31' is not one of the format's");
    expect_refused("negative_dim", HDR, "{\"a\":{\"dtype\":\"F32\",\"shape\":[-2],\"data_offsets\":[0,8]}}", 8,
                   "shape[0] is not a non-negative integer");
    expect_refused("fractional_dim", HDR, "{\"a\":{\"dtype\":\"F32\",\"shape\":[2.0],\"data_offsets\":[0,8]}}", 8,
                   "shape[0] is not a non-negative integer");
    expect_refused("nine_dims", HDR, "{\"a\":{\"dtype\":\"F32\",\"shape\":[1,1,1,1,1,1,1,1,2],\"data_offsets\":[0,8]}}", 8,
                   "9 dimensions");
    expect_refused("offsets_one_number", HDR, "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8]}}", 8,
                   "data_offsets is not [begin, end]");
    expect_refused("offsets_reversed", HDR, "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,0]}}", 8,
                   "end before they begin");
    expect_refused("offsets_past_end", HDR, "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,16]}}", 8,
                   "run past the end of the data (8 bytes)");
    /* 2 F32 = 8 bytes, but the offsets give 12 */
    expect_refused("bytes_not_shape", HDR, "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,12]}}", 12,
                   "2 F32 elements need 8 bytes, its data_offsets [0, 12] give 12");
    /* the buffer as a whole: b overlaps a ([0,8] and [4,12]); a hole between [0,8] and [12,20]; data
       left after the last tensor */
    expect_refused("overlap", HDR, "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
                                   "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]}}", 12, "they overlap");
    expect_refused("hole", HDR, "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
                                "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[12,20]}}", 20, "a hole");
    expect_refused("not_at_zero", HDR, "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]}}", 12, "a hole");
    expect_refused("trailing_data", HDR, "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", 16,
                   "the tensors end at byte 8 of the data, which has 16 bytes");
    /* __metadata__ holds strings only */
    snprintf(h, sizeof h, "{\"__metadata__\":{\"step\":3},%s}", one);
    expect_refused("metadata_number", HDR, h, 8, "__metadata__ 'step' is not a string");
    snprintf(h, sizeof h, "{\"__metadata__\":[\"x\"],%s}", one);
    expect_refused("metadata_array", HDR, h, 8, "__metadata__ is not a JSON object");
}

Test(reader, a_valid_file_reads_back_in_data_order, .init = make_scratch, .fini = remove_scratch) {
    /* two tensors given in the header out of data order, a zero-sized one, padding spaces after the
       JSON (what the format's writers do for 8-byte alignment), metadata */
    const char *h = "{\"__metadata__\":{\"k\":\"v\"},\"b\":{\"dtype\":\"I64\",\"shape\":[],\"data_offsets\":[8,16]},"
                    "\"e\":{\"dtype\":\"F32\",\"shape\":[0,3],\"data_offsets\":[16,16]},"
                    "\"a\":{\"dtype\":\"F32\",\"shape\":[1,2],\"data_offsets\":[0,8]}}   ";
    float a[2] = {1.5f, -2.0f};
    int64_t b = 7;
    uint8_t data[16];
    memcpy(data, a, 8);
    memcpy(data + 8, &b, 8);
    char path[128], err[EXCB_ERR_LEN] = "";
    snprintf(path, sizeof path, "%s/ok.safetensors", scratch);
    write_raw(path, strlen(h), h, data, sizeof data);
    ExcbSafetensors st;
    cr_assert_eq(excb_safetensors_open(&st, path, err), 0, "%s", err);
    cr_expect_eq(st.n, 3);
    cr_expect_str_eq(st.t[0].name, "a");
    cr_expect_str_eq(st.t[1].name, "b");
    cr_expect_str_eq(st.t[2].name, "e");
    const ExcbStTensor *ta = excb_safetensors_find(&st, "a"), *tb = excb_safetensors_find(&st, "b");
    cr_assert(ta && tb);
    cr_expect(ta->dtype == EXCB_ST_F32 && ta->ndim == 2 && ta->shape[0] == 1 && ta->shape[1] == 2 && ta->numel == 2);
    cr_expect(tb->dtype == EXCB_ST_I64 && tb->ndim == 0 && tb->numel == 1 && tb->bytes == 8);
    cr_expect(!memcmp(ta->data, a, 8) && !memcmp(tb->data, &b, 8));
    cr_expect_str_eq(excb_safetensors_meta(&st, "k"), "v");
    cr_expect_null(excb_safetensors_meta(&st, "x"));
    excb_safetensors_close(&st);
}

/* --- export -> import ----------------------------------------------------------------------------- */
/* the tiny preset's model with parameters, teacher and BN statistics all different */
static void tiny_model(ExcbRunConfig *rc, ExcbModel *m, const char *preset) {
    char err[EXCB_ERR_LEN];
    cr_assert_eq(excb_preset(rc, preset, err), 0, "%s", err);
    snprintf(rc->data, sizeof rc->data, "fashion-mnist");
    rc->model.in_ch = 1;
    cr_assert_eq(excb_config_validate(rc, err), 0, "%s", err);
    cr_assert_eq(excb_build(m, &rc->model), 0);
    fill_normal(m->teacher, m->n_params, 11, 0.5f);       /* the student keeps its initialisation */
    fill_normal(m->running, m->n_running, 12, 1.0f);
    fill_normal(m->teacher_running, m->n_running, 13, 1.0f);
    for (size_t i = 0; i < m->n_running; i++) {           /* variances positive: an honest state */
        m->running[i] = fabsf(m->running[i]) + 0.1f;
        m->teacher_running[i] = fabsf(m->teacher_running[i]) + 0.1f;
    }
    m->step = 1234;
}

static int same_tensors(const ExcbModel *a, const real *pa, const real *ra, const ExcbModel *b, const real *pb,
                        const real *rb, int backbone_only) {
    int same = 1;
    for (int t = 0; t < a->n_tensors; t++) {
        if (backbone_only && strncmp(a->tensors[t].name, "backbone.", 9)) continue;
        same &= !memcmp(pa + a->tensors[t].offset, pb + b->tensors[t].offset, sizeof(real) * a->tensors[t].numel);
    }
    for (int k = 0; k < a->n_bn; k++) {
        if (backbone_only && strncmp(a->tensors[a->bn_beta[k]].name, "backbone.", 9)) continue;
        same &= !memcmp(ra + a->bn_stats[k], rb + b->bn_stats[k], sizeof(real) * 2 * a->bn_channels[k]);
    }
    return same;
}

static int same_files(const char *x, const char *y) {
    char cmd[512];
    snprintf(cmd, sizeof cmd, "cmp -s %s %s", x, y);
    return system(cmd) == 0;
}

static void round_trip(const char *preset, int teacher, int backbone_only) {
    ExcbRunConfig rc, rc2;
    ExcbModel m, m2, m3;
    ExcbWeightsInfo info;
    char err[EXCB_ERR_LEN], a[128], b[128], c[128];
    tiny_model(&rc, &m, preset);
    char *text = excb_config_dump(&rc, 0);
    snprintf(a, sizeof a, "%s/a.safetensors", scratch);
    snprintf(b, sizeof b, "%s/b.safetensors", scratch);
    snprintf(c, sizeof c, "%s/c.safetensors", scratch);
    cr_assert_eq(excb_weights_save(a, &m, teacher, backbone_only, text, err), 0, "%s", err);
    cr_assert_eq(excb_weights_load(a, NULL, NULL, NULL, &rc2, &m2, &info, err), 0, "%s", err);
    cr_expect(info.from_excb && info.heads == !backbone_only && info.ignored == 0, "%s: from_excb %d heads %d ignored %d",
              preset, info.from_excb, info.heads, info.ignored);
    cr_expect_eq(m2.step, m.step);
    /* the network exported, in both networks of the imported model, bit for bit */
    const real *P = teacher ? m.teacher : m.params, *R = teacher ? m.teacher_running : m.running;
    cr_expect(same_tensors(&m, P, R, &m2, m2.params, m2.running, backbone_only), "%s: student of the import", preset);
    cr_expect(same_tensors(&m, P, R, &m2, m2.teacher, m2.teacher_running, backbone_only), "%s: teacher of the import", preset);
    /* and exported again: the same bytes */
    char *text2 = excb_config_dump(&rc2, 0);
    cr_expect_str_eq(text2, text, "the config survives the round trip");
    cr_assert_eq(excb_weights_save(b, &m2, teacher, backbone_only, text2, err), 0, "%s", err);
    cr_expect(same_files(a, b), "%s: export(import(export)) == export, byte for byte", preset);
    /* the student network is the one exported when asked: its file differs from the teacher's */
    cr_assert_eq(excb_weights_save(c, &m, !teacher, backbone_only, text, err), 0, "%s", err);
    cr_expect(!same_files(a, c), "%s: the teacher's and the student's files differ", preset);
    ExcbRunConfig rc3;
    cr_assert_eq(excb_weights_load(c, NULL, NULL, NULL, &rc3, &m3, &info, err), 0, "%s", err);
    cr_expect(same_tensors(&m, teacher ? m.params : m.teacher, teacher ? m.running : m.teacher_running, &m3, m3.params,
                           m3.running, backbone_only), "%s: the other network", preset);
    free(text); free(text2);
    excb_free(&m); excb_free(&m2); excb_free(&m3);
}

Test(round_trip, export_import_export_is_bitwise, .init = make_scratch, .fini = remove_scratch) {
    round_trip("tiny", 1, 0);
    round_trip("tiny", 0, 0);
    round_trip("tiny", 1, 1);              /* backbone only: torchvision's names */
}

/* The names a PyTorch user meets: a full export carries the official code's names, BatchNorm buffers
   after each BN's bias and weight_g (K, 1) of ones; --backbone-only has torchvision's. */
Test(round_trip, the_files_carry_pytorch_names, .init = make_scratch, .fini = remove_scratch) {
    ExcbRunConfig rc;
    ExcbModel m;
    char err[EXCB_ERR_LEN], a[128], b[128];
    tiny_model(&rc, &m, "tiny");
    char *text = excb_config_dump(&rc, 0);
    snprintf(a, sizeof a, "%s/a.safetensors", scratch);
    snprintf(b, sizeof b, "%s/b.safetensors", scratch);
    cr_assert_eq(excb_weights_save(a, &m, 1, 0, text, err), 0, "%s", err);
    cr_assert_eq(excb_weights_save(b, &m, 1, 1, text, err), 0, "%s", err);
    ExcbSafetensors fa, fb;
    cr_assert_eq(excb_safetensors_open(&fa, a, err), 0, "%s", err);
    cr_assert_eq(excb_safetensors_open(&fb, b, err), 0, "%s", err);
    /* tiny: K = 16, d = 8; the stem's BN has 4 channels */
    const ExcbStTensor *g = excb_safetensors_find(&fa, "classifier.centroid_layer.weight_g");
    cr_assert(g && g->ndim == 2 && g->shape[0] == 16 && g->shape[1] == 1);
    for (int k = 0; k < 16; k++) {
        float v;
        memcpy(&v, g->data + 4 * k, 4);
        cr_expect_eq(v, 1.0f);
    }
    const ExcbStTensor *nb = excb_safetensors_find(&fa, "backbone.bn1.num_batches_tracked");
    cr_assert(nb && nb->dtype == EXCB_ST_I64 && nb->ndim == 0);
    int64_t count;
    memcpy(&count, nb->data, 8);
    cr_expect_eq(count, 1234, "num_batches_tracked = the step");
    const ExcbStTensor *rv = excb_safetensors_find(&fb, "layer1.0.bn2.running_var");
    cr_assert(rv && rv->ndim == 1 && rv->shape[0] == 4);
    cr_expect_null(excb_safetensors_find(&fb, "backbone.conv1.weight"));
    cr_expect_not_null(excb_safetensors_find(&fb, "conv1.weight"));
    cr_expect_null(excb_safetensors_find(&fb, "classifier.projector.mlp.0.weight"), "backbone only");
    cr_expect_str_eq(excb_safetensors_meta(&fa, "excb.config"), text);
    cr_expect_str_eq(excb_safetensors_meta(&fa, "excb.step"), "1234");
    cr_expect_str_eq(excb_safetensors_meta(&fb, "excb.names"), "torchvision");
    excb_safetensors_close(&fa);
    excb_safetensors_close(&fb);
    free(text);
    excb_free(&m);
}

/* --- what the loader refuses ------------------------------------------------------------------------ */
/* a file with the tensors `names` (F32 unless the name is listed in f16), shapes as written, zero data */
static void write_tensors(const char *path, int n, const char *const *names, const int (*shape)[5], const char *f16) {
    char h[8192];
    size_t l = 0, at = 0;
    l += snprintf(h + l, sizeof h - l, "{");
    for (int i = 0; i < n; i++) {
        int is16 = f16 && !strcmp(names[i], f16);
        size_t numel = 1;
        char dims[64] = "";
        for (int j = 0, dl = 0; j < shape[i][0]; j++) {
            dl += snprintf(dims + dl, sizeof dims - dl, "%s%d", j ? "," : "", shape[i][1 + j]);
            numel *= shape[i][1 + j];
        }
        size_t bytes = numel * (is16 ? 2 : 4);
        l += snprintf(h + l, sizeof h - l, "%s\"%s\":{\"dtype\":\"%s\",\"shape\":[%s],\"data_offsets\":[%zu,%zu]}", i ? "," : "",
                      names[i], is16 ? "F16" : "F32", dims, at, at + bytes);
        at += bytes;
    }
    snprintf(h + l, sizeof h - l, "}");
    uint8_t *zeros = calloc(at + 1, 1);
    write_raw(path, strlen(h), h, zeros, at);
    free(zeros);
}

static void expect_load_refused(const char *path, const char *which, ExcbSettingsHook hook, void *ctx, int want,
                                const char *why) {
    ExcbRunConfig rc;
    ExcbModel m;
    ExcbWeightsInfo info;
    char err[EXCB_ERR_LEN] = "";
    int code = excb_weights_load(path, which, hook, ctx, &rc, &m, &info, err);
    cr_expect_eq(code, want, "%s: exit %d, not %d (err: %s)", path, code, want, err);
    cr_expect(strstr(err, why), "%s: the error says '%s': %s", path, why, err);
    if (!code) excb_free(&m);
}

static int set_widths(ExcbRunConfig *rc, void *ctx, char *err) { return excb_config_set(rc, "widths", ctx, err); }

Test(loader, refuses_wrong_dtypes_shapes_and_missing_tensors, .init = make_scratch, .fini = remove_scratch) {
    char path[128];
    /* the stem in F16 (a .half() state dict): excb reads F32 only */
    const char *names[] = {"conv1.weight", "bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var",
                           "layer1.0.conv1.weight"};
    const int shapes[][5] = {{4, 4, 1, 3, 3}, {1, 4}, {1, 4}, {1, 4}, {1, 4}, {4, 4, 4, 3, 3}};
    snprintf(path, sizeof path, "%s/f16.safetensors", scratch);
    write_tensors(path, 6, names, shapes, "conv1.weight");
    expect_load_refused(path, NULL, NULL, NULL, EXCB_EXIT_DATA, "conv1.weight is F16; excb reads F32");
    /* all F32, but the first block stops after its first conv: its BN and second conv are missing */
    snprintf(path, sizeof path, "%s/missing.safetensors", scratch);
    write_tensors(path, 6, names, shapes, NULL);
    expect_load_refused(path, NULL, NULL, NULL, EXCB_EXIT_DATA, "9 tensors of the model are not in the file, the first: backbone.layer1.0.bn1.weight");
    /* the BN of the stem with 5 channels where its conv has 4 */
    const int bad_bn[][5] = {{4, 4, 1, 3, 3}, {1, 5}, {1, 4}, {1, 4}, {1, 4}, {4, 4, 4, 3, 3}};
    snprintf(path, sizeof path, "%s/shape.safetensors", scratch);
    write_tensors(path, 6, names, bad_bn, NULL);
    expect_load_refused(path, NULL, NULL, NULL, EXCB_EXIT_DATA, "bn1.weight has shape [5], the model's backbone.bn1.weight is [4]");
    /* a stem excb does not have (5x5), and no ResNet at all */
    const int five[][5] = {{4, 4, 1, 5, 5}};
    snprintf(path, sizeof path, "%s/stem.safetensors", scratch);
    write_tensors(path, 1, names, five, NULL);
    expect_load_refused(path, NULL, NULL, NULL, EXCB_EXIT_DATA, "conv1.weight is 5x5");
    const char *other[] = {"encoder.weight"};
    const int other_shape[][5] = {{2, 3, 3}};
    snprintf(path, sizeof path, "%s/other.safetensors", scratch);
    write_tensors(path, 1, other, other_shape, NULL);
    expect_load_refused(path, NULL, NULL, NULL, EXCB_EXIT_DATA, "not a ResNet state dict excb reads");
    /* excb's own export, imported with other widths than its config's: the shapes say so */
    ExcbRunConfig rc;
    ExcbModel m;
    char err[EXCB_ERR_LEN];
    tiny_model(&rc, &m, "tiny");
    char *text = excb_config_dump(&rc, 0);
    snprintf(path, sizeof path, "%s/tiny.safetensors", scratch);
    cr_assert_eq(excb_weights_save(path, &m, 1, 0, text, err), 0, "%s", err);
    expect_load_refused(path, NULL, set_widths, "4,8,16", EXCB_EXIT_DATA,
                        "backbone.layer3.0.conv1.weight has shape [8, 8, 3, 3], the model's backbone.layer3.0.conv1.weight is [16, 8, 3, 3]");
    expect_load_refused(path, "pupil", NULL, NULL, EXCB_EXIT_USAGE, "'teacher' or 'student', not 'pupil'");
    free(text);
    excb_free(&m);
    /* a file that is not there */
    expect_load_refused("/nonexistent/w.safetensors", NULL, NULL, NULL, EXCB_EXIT_NOINPUT, "cannot open");
}

/* A copy of a safetensors file with its header edited by `edit` (the data as they are, unless edit
   writes into them): how the tests make a file that differs from a valid one in one thing. */
typedef void (*HeaderEdit)(json_t *header, uint8_t *data);
static void rewrite(const char *from, const char *to, HeaderEdit edit) {
    FILE *f = fopen(from, "rb");
    cr_assert(f, "%s", from);
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    uint8_t *b = malloc(n);
    cr_assert_eq(fread(b, 1, n, f), (size_t)n);
    fclose(f);
    uint64_t hl = 0;
    for (int i = 7; i >= 0; i--) hl = hl << 8 | b[i];
    json_t *h = json_loadb((const char *)b + 8, hl, 0, NULL);
    cr_assert(h);
    edit(h, b + 8 + hl);
    char *text = json_dumps(h, JSON_COMPACT);
    write_raw(to, strlen(text), text, b + 8 + hl, n - 8 - hl);
    free(text);
    json_decref(h);
    free(b);
}

static void drop_config(json_t *h, uint8_t *data) {
    (void)data;
    json_object_del(json_object_get(h, "__metadata__"), "excb.config");
}

static void gain_two(json_t *h, uint8_t *data) {          /* weight_g[0] = 2 */
    json_t *off = json_object_get(json_object_get(h, "classifier.centroid_layer.weight_g"), "data_offsets");
    float two = 2.0f;
    memcpy(data + json_integer_value(json_array_get(off, 0)), &two, 4);
}

static void bad_step(json_t *h, uint8_t *data) {
    (void)data;
    json_object_set_new(json_object_get(h, "__metadata__"), "excb.step", json_string("12x"));
}

/* A file without excb's config (what another tool writes from excb's names) still has the heads: their
   widths are read off the shapes too, and every tensor lands where the config would have put it. */
Test(loader, heads_are_read_off_the_names_without_excbs_config, .init = make_scratch, .fini = remove_scratch) {
    ExcbRunConfig rc, rc2;
    ExcbModel m, m2;
    ExcbWeightsInfo info;
    char err[EXCB_ERR_LEN], a[128], b[128];
    tiny_model(&rc, &m, "tiny");
    char *text = excb_config_dump(&rc, 0);
    snprintf(a, sizeof a, "%s/a.safetensors", scratch);
    snprintf(b, sizeof b, "%s/b.safetensors", scratch);
    cr_assert_eq(excb_weights_save(a, &m, 1, 0, text, err), 0, "%s", err);
    rewrite(a, b, drop_config);
    cr_assert_eq(excb_weights_load(b, NULL, NULL, NULL, &rc2, &m2, &info, err), 0, "%s", err);
    cr_expect(info.heads && !info.from_excb && info.ignored == 0);
    /* tiny: hidden 16, d 8, K 16, widths 4,8,8 */
    cr_expect(rc2.model.hidden == 16 && rc2.model.d == 8 && rc2.model.K == 16, "hidden %d d %d K %d", rc2.model.hidden,
              rc2.model.d, rc2.model.K);
    cr_expect(rc2.model.widths[0] == 4 && rc2.model.widths[2] == 8 && rc2.model.n_stages == 3);
    cr_expect(same_tensors(&m, m.teacher, m.teacher_running, &m2, m2.params, m2.running, 0), "every tensor in its place");
    excb_free(&m2);
    free(text);
    excb_free(&m);
}

Test(loader, refuses_aliases_gains_steps_channels_and_absurd_shapes, .init = make_scratch, .fini = remove_scratch) {
    ExcbRunConfig rc;
    ExcbModel m;
    char err[EXCB_ERR_LEN], a[128], b[128];
    tiny_model(&rc, &m, "tiny");
    char *text = excb_config_dump(&rc, 0);
    snprintf(a, sizeof a, "%s/a.safetensors", scratch);
    snprintf(b, sizeof b, "%s/b.safetensors", scratch);
    cr_assert_eq(excb_weights_save(a, &m, 1, 0, text, err), 0, "%s", err);
    free(text);
    excb_free(&m);
    /* two tensors for the model's conv1 (conv1 and module.conv1): which one is meant? */
    const char *twice[] = {"conv1.weight", "module.conv1.weight", "layer1.0.conv1.weight"};
    const int twice_shapes[][5] = {{4, 4, 1, 3, 3}, {4, 4, 1, 3, 3}, {4, 4, 4, 3, 3}};
    write_tensors(b, 3, twice, twice_shapes, NULL);
    expect_load_refused(b, NULL, NULL, NULL, EXCB_EXIT_DATA, "'conv1.weight' and 'module.conv1.weight' are both the model's backbone.conv1.weight");
    rewrite(a, b, gain_two);
    expect_load_refused(b, NULL, NULL, NULL, EXCB_EXIT_DATA, "weight_g[0] = 2: excb's prototypes have the gain g = 1");
    rewrite(a, b, bad_step);
    expect_load_refused(b, NULL, NULL, NULL, EXCB_EXIT_DATA, "excb.step '12x' is not a step count");
    /* a stem of 5 input channels; a zero-sized first conv; a width of 2^20 from a 4 MB tensor, whose
       model (2^20 x 2^20 x 9 floats further on) the file could never hold */
    const char *names[] = {"conv1.weight", "layer1.0.conv1.weight"};
    const int five[][5] = {{4, 4, 5, 3, 3}, {4, 4, 4, 3, 3}}, empty[][5] = {{4, 4, 1, 3, 3}, {4, 4, 0, 3, 3}},
              wide[][5] = {{4, 4, 1, 3, 3}, {4, 1 << 20, 1, 1, 1}};
    write_tensors(b, 2, names, five, NULL);
    expect_load_refused(b, NULL, NULL, NULL, EXCB_EXIT_DATA, "takes 5 input channels; excb's images have 1 or 3");
    write_tensors(b, 2, names, empty, NULL);
    expect_load_refused(b, NULL, NULL, NULL, EXCB_EXIT_DATA, "layer1.0.conv1.weight has shape [4, 0, 3, 3]: not a convolution's weight");
    write_tensors(b, 2, names, wide, NULL);
    expect_load_refused(b, NULL, NULL, NULL, EXCB_EXIT_DATA, "its shapes contradict each other");
}

/* --- PyTorch's state dicts and features ------------------------------------------------------------- */
static int set_size(ExcbRunConfig *rc, void *ctx, char *err) {
    char side[16];
    snprintf(side, sizeof side, "%d", *(int *)ctx);
    int code = excb_config_set(rc, "global_size", side, err);
    if (!code) code = excb_config_set(rc, "n_local", "0", err);       /* the features need global crops only */
    return code;
}

/* the config text the fixture says excb should read ("stem=... block=... widths=... blocks=... in_ch=N")
   against what it read */
static void expect_config(const char *name, const char *want, const ExcbRunConfig *rc) {
    char got[256], w[64] = "", b[64] = "";
    for (int i = 0; i < rc->model.n_stages; i++) {
        snprintf(w + strlen(w), sizeof w - strlen(w), "%s%d", i ? "," : "", rc->model.widths[i]);
        snprintf(b + strlen(b), sizeof b - strlen(b), "%s%d", i ? "," : "", rc->model.blocks[i]);
    }
    snprintf(got, sizeof got, "stem=%s block=%s widths=%s blocks=%s in_ch=%d",
             rc->model.stem == EXCB_STEM_IMAGENET ? "imagenet" : "cifar", rc->model.block == EXCB_BLOCK_BOTTLENECK ? "bottleneck" : "basic",
             w, b, rc->model.in_ch);
    cr_expect_str_eq(got, want, "%s: the backbone read off the names", name);
}

/* Tolerance of the features, relative to the largest |feature| of the fixture: PyTorch and excb sum
   the same products in other orders (im2col GEMM against oneDNN/MKL-DNN convolutions), float32 with
   a unit roundoff of 6e-8 over sums of up to 4608 terms (3x3x512) and 10-50 layers. Measured worst:
   1.6e-7 to 5.3e-7 (the committed cut fixtures; 8.5e-7 in make test-asan's build, whose GEMM is not
   oneDNN's), 7.6e-7 (torchvision's resnet18) and 1.9e-6 (its resnet50, make_weights_fixtures.py
   --full): 1e-5 leaves a margin of 5x at ResNet-50's depth. */
#define FEATURE_TOL 1e-5

Test(pytorch, state_dicts_load_and_give_pytorchs_features) {
    const char *dir = getenv("EXCB_WEIGHTS_FIXTURES") ? getenv("EXCB_WEIGHTS_FIXTURES") : FIXTURES;
    DIR *d = opendir(dir);
    cr_assert(d, "no fixture directory %s", dir);
    struct dirent *e;
    int fixtures = 0;
    while ((e = readdir(d))) {
        size_t l = strlen(e->d_name);
        const char *suffix = ".features.safetensors";
        if (l <= strlen(suffix) || strcmp(e->d_name + l - strlen(suffix), suffix)) continue;
        char name[256], weights[600], feats[600], err[EXCB_ERR_LEN];
        snprintf(name, sizeof name, "%.*s", (int)(l - strlen(suffix)), e->d_name);
        snprintf(weights, sizeof weights, "%s/%s.safetensors", dir, name);
        snprintf(feats, sizeof feats, "%s/%s", dir, e->d_name);
        ExcbSafetensors ref;
        cr_assert_eq(excb_safetensors_open(&ref, feats, err), 0, "%s", err);
        const ExcbStTensor *x = excb_safetensors_find(&ref, "input"), *f = excb_safetensors_find(&ref, "features");
        cr_assert(x && f && x->ndim == 4 && f->ndim == 2 && x->shape[0] == f->shape[0], "%s: input and features", feats);
        int N = (int)x->shape[0], side = (int)x->shape[2], D = (int)f->shape[1];
        ExcbRunConfig rc;
        ExcbModel m;
        ExcbWeightsInfo info;
        cr_assert_eq(excb_weights_load(weights, NULL, set_size, &side, &rc, &m, &info, err), 0, "%s", err);
        expect_config(name, excb_safetensors_meta(&ref, "config"), &rc);
        cr_expect_eq(m.D, D, "%s: feature width", name);
        cr_expect(!info.heads && !info.from_excb);
        real *xr = malloc(sizeof(real) * x->numel), *got = malloc(sizeof(real) * N * D);
        float *want = malloc(sizeof(float) * N * D), *got32 = malloc(sizeof(float) * N * D);
        for (size_t i = 0; i < x->numel; i++) { float v; memcpy(&v, x->data + 4 * i, 4); xr[i] = v; }
        memcpy(want, f->data, sizeof(float) * N * D);
        excb_backbone_features(&m, 1, xr, N, got);
        for (int i = 0; i < N * D; i++) got32[i] = (float)got[i];
        double worst = rel_err(got32, want, (size_t)N * D);
        printf("pytorch: %-22s %3d tensors matched, %d ignored (set '%s'), %d x %d features: worst |excb - PyTorch| / max|PyTorch| "
               "%.2e (tolerance %.0e)\n", name, info.matched, info.ignored, info.set, N, D, worst, FEATURE_TOL);
        cr_expect(worst <= FEATURE_TOL, "%s: features differ from PyTorch's by %.3g of their scale", name, worst);
        /* DINO's layout: the teacher by default; the student (its weights + 0.01) when asked */
        if (strstr(name, "dino")) {
            cr_expect_str_eq(info.set, "teacher");
            cr_expect_eq(info.ignored, 3, "teacher.head.last_layer.weight and fc.weight, fc.bias are listed, not loaded");
            ExcbRunConfig rs;
            ExcbModel s;
            cr_assert_eq(excb_weights_load(weights, "student", set_size, &side, &rs, &s, &info, err), 0, "%s", err);
            cr_expect_str_eq(info.set, "student");
            int c1 = excb_find_tensor(&m, "backbone.conv1.weight");
            double dmax = 0, dmin = 1;
            for (size_t i = 0; i < m.tensors[c1].numel; i++) {
                double dd = s.params[m.tensors[c1].offset + i] - m.params[m.tensors[c1].offset + i];
                dmax = fmax(dmax, dd);
                dmin = fmin(dmin, dd);
            }
            EXPECT_NEAR(dmax, 0.01, 1e-6, "%s: the student's conv1 is the teacher's + 0.01", name);
            EXPECT_NEAR(dmin, 0.01, 1e-6, "%s: the student's conv1 is the teacher's + 0.01", name);
            excb_free(&s);
        }
        free(xr); free(got); free(want); free(got32);
        excb_free(&m);
        excb_safetensors_close(&ref);
        fixtures++;
    }
    closedir(d);
    cr_expect(fixtures >= 1, "no fixture in %s", dir);
}
