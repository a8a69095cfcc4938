/* fuzz_readers.c: libFuzzer targets for every reader and decoder of excb.c section 11.
 *
 * One source, four targets, chosen at compile time with -DTARGET=...:
 *   FUZZ_IDX     the IDX parser, on the input as is and, when it is gzip, after excb_gunzip
 *   FUZZ_IMAGE   excb_decode_image: PNG (libpng simplified API) and JPEG (libjpeg-turbo) by magic
 *   FUZZ_CIFAR   excb_data_open on the input saved as a CIFAR-100 train.bin, then every image read
 *   FUZZ_STL     excb_data_open on an STL-10 folder: the input's first byte chooses how many
 *                images train_X.bin holds, the rest becomes train_y.bin; then every image read
 * A finding is any crash, sanitizer report, hang or leak; a clean error (65/66) is the expected
 * outcome for garbage. Built and run by `make fuzz` (clang -fsanitize=fuzzer,address,undefined).
 */
#include "excb.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/stat.h>

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

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    char err[EXCB_ERR_LEN];
    if (!dir[0]) {
        snprintf(dir, sizeof dir, "/tmp/excb_fuzz_%d", (int)getpid());
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
#else
#error "define one of FUZZ_IDX, FUZZ_IMAGE, FUZZ_CIFAR, FUZZ_STL"
#endif
    return 0;
}
