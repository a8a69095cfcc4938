/* fuzz_readers.c: libFuzzer targets for every reader and decoder of excb.c section 11.
 *
 * One source, six targets, chosen at compile time with -DFUZZ_<TARGET>:
 *   FUZZ_IDX     the IDX parser, on the input as is and, when it is gzip, after excb_gunzip
 *   FUZZ_IMAGE   excb_decode_image: PNG (libpng simplified API) and JPEG (libjpeg-turbo) by magic
 *   FUZZ_CIFAR   excb_data_open on the input saved as a CIFAR-100 train.bin, then every image read
 *   FUZZ_STL     excb_data_open on an STL-10 folder: the input's first byte chooses how many
 *                images train_X.bin holds, the rest becomes train_y.bin; then every image read
 *   FUZZ_SAFETENSORS  the safetensors reader (excb.c section 16b), from memory: a file it accepts must
 *                have every tensor inside the buffer (each byte is read), unique names, and tensors that
 *                tile the data exactly
 *   FUZZ_CKPT    the checkpoint reader (excb.c section 16): excb_checkpoint_config, the config parser on
 *                its text, and excb_checkpoint_load into a tiny model. The CRCs are recomputed after the
 *                fuzzer's mutation (every in-bounds entry's, then the file's), so the mutations reach the
 *                table, the shapes and the loader instead of stopping at the first CRC check; the CRC
 *                checks themselves are covered by tests/test_train.c and test_train_e2e.c.
 * A finding is any crash, sanitizer report, hang or leak; a clean error (65/66) is the expected
 * outcome for garbage. Built and run by `make fuzz` (clang -fsanitize=fuzzer,address,undefined).
 * The scratch files live in /dev/shm (tmpfs) when it exists: the file-based targets then run 10-20x
 * faster than on a disk-backed /tmp.
 */
#include "excb.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/stat.h>
#include <zlib.h>

static char dir[64];

static void write_file(const char *name, const uint8_t *b, size_t n) {
    char path[256];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "wb");
    if (!f) abort();
    if (n && fwrite(b, 1, n, f) != n) abort();
    fclose(f);
}

static void read_everything(const char *split) {
    ExcbDataset ds;
    char err[EXCB_ERR_LEN];
    if (excb_data_open(&ds, dir, split, err) == 0) {
        ExcbImage img = {0};
        for (long i = 0; i < ds.n; i++)
            if (excb_data_get(&ds, i, &img, err)) abort();   /* a validated set must read cleanly */
        excb_image_free(&img);
        excb_data_close(&ds);
    }
}

#if defined(FUZZ_CKPT)
static uint32_t rd32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static uint64_t rd64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }
static void wr32(uint8_t *p, uint32_t v) { memcpy(p, &v, 4); }

/* the layout of excb.c section 16: a 32-byte header (entry count at 16), 184-byte table entries (offset
   at 152, bytes at 160, CRC at 168), a 16-byte trailer whose first word is the file's CRC-32 */
static void fix_crcs(uint8_t *b, size_t n) {
    if (n < 48) return;
    uint32_t count = rd32(b + 16);
    for (uint64_t i = 0; i < count && 32 + (i + 1) * 184 <= n - 16; i++) {
        uint8_t *t = b + 32 + i * 184;
        uint64_t off = rd64(t + 152), bytes = rd64(t + 160);
        if (off <= n - 16 && bytes <= n - 16 - off) wr32(t + 168, (uint32_t)crc32(0, b + off, (uInt)bytes));
    }
    wr32(b + n - 16, (uint32_t)crc32(0, b, (uInt)(n - 16)));
}

static void fuzz_checkpoint(const uint8_t *data, size_t size) {
    static ExcbModel m;
    static int built;
    char err[EXCB_ERR_LEN], path[128];
    if (!built) {                               /* the seeds are checkpoints of this model (gray input) */
        ExcbConfig cfg;
        if (excb_config_named(&cfg, "tiny")) abort();
        cfg.in_ch = 1;
        cfg.batch = 8;
        if (excb_build(&m, &cfg)) abort();
        built = 1;
    }
    uint8_t *b = malloc(size ? size : 1);
    memcpy(b, data, size);
    fix_crcs(b, size);
    snprintf(path, sizeof path, "%s/ckpt.excb", dir);
    FILE *f = fopen(path, "wb");
    if (!f) abort();
    if (size && fwrite(b, 1, size, f) != size) abort();
    fclose(f);
    free(b);
    char *text = NULL;
    if (excb_checkpoint_config(path, &text, err) == 0) {
        ExcbRunConfig rc;
        memset(&rc, 0, sizeof rc);
        if (excb_config_parse(&rc, text, path, err) == 0) excb_config_validate(&rc, err);
        free(text);
    }
    ExcbTrainState ts;
    if (excb_checkpoint_load(path, &m, &ts, err) == 0) excb_train_state_free(&ts);
}
#endif

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    char err[EXCB_ERR_LEN];
    if (!dir[0]) {
        snprintf(dir, sizeof dir, "%s/excb_fuzz_%d", access("/dev/shm", W_OK) ? "/tmp" : "/dev/shm", (int)getpid());
        mkdir(dir, 0700);
    }
#if defined(FUZZ_IDX)
    int nd;
    uint32_t dims[4];
    size_t off;
    excb_parse_idx(data, size, "fuzz", &nd, dims, &off, err);
    uint8_t *out;
    size_t n;
    if (excb_gunzip(data, size, &out, &n, 1 << 24, "fuzz", err) == 0) {
        excb_parse_idx(out, n, "fuzz", &nd, dims, &off, err);
        free(out);
    }
#elif defined(FUZZ_IMAGE)
    ExcbImage img = {0};
    excb_decode_image(data, size, "fuzz", &img, err);
    excb_image_free(&img);
#elif defined(FUZZ_CIFAR)
    write_file("train.bin", data, size);
    read_everything("train");
#elif defined(FUZZ_STL)
    if (size < 1) return 0;
    size_t images = data[0] % 3, xbytes = images * 27648;
    /* the image file is mostly zeros (27 KB per image); the fuzzer drives the labels file */
    static uint8_t zeros[3 * 27648];
    write_file("train_X.bin", zeros, xbytes);
    write_file("train_y.bin", data + 1, size - 1);
    read_everything("train");
#elif defined(FUZZ_CKPT)
    fuzz_checkpoint(data, size);
#elif defined(FUZZ_SAFETENSORS)
    uint8_t *b = malloc(size ? size : 1);          /* the parser takes the buffer over */
    memcpy(b, data, size);
    ExcbSafetensors st;
    if (excb_safetensors_parse(&st, b, size, "fuzz.safetensors", err) == 0) {
        size_t covered = 0;
        volatile uint8_t sink = 0;
        for (int i = 0; i < st.n; i++) {
            const ExcbStTensor *t = &st.t[i];
            for (size_t j = 0; j < t->bytes; j++) sink ^= t->data[j];      /* out of bounds: ASan says */
            if (excb_safetensors_find(&st, t->name) != t) abort();         /* a name given twice      */
            covered += t->bytes;
        }
        if (st.n && (size_t)(st.t[st.n - 1].data + st.t[st.n - 1].bytes - st.buf) != size) abort();
        if (st.n && covered != size - (size_t)(st.t[0].data - st.buf)) abort();   /* holes or overlaps */
        for (int i = 0; i < st.n_meta; i++)
            if (excb_safetensors_meta(&st, st.meta_key[i]) == NULL) abort();
        (void)sink;
        excb_safetensors_close(&st);
    }
#else
#error "define one of FUZZ_IDX, FUZZ_IMAGE, FUZZ_CIFAR, FUZZ_STL, FUZZ_CKPT, FUZZ_SAFETENSORS"
#endif
    return 0;
}
