/* test_data.c: the data set readers and decoders (excb.c section 11).
 *
 * Every format is written here, byte by byte, into a fresh temporary folder, then read back through
 * excb_data_open / excb_data_get, the functions `--data` uses. Layout traps get hand-built fixtures
 * (IDX's big-endian sizes, CIFAR-100's coarse-label-first records, STL-10's column-major planes,
 * STL-10's > 2 GiB file). Every bad input the issue lists must give exit code 65 (66 for a missing
 * path) and a message that names the file and the problem; the CLI is checked end to end too.
 */
#define _DEFAULT_SOURCE   /* mkdtemp, truncate, pwrite */
#include "testutil.h"
#include <errno.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>
#include <zlib.h>

static char tmpdir[256];

static void make_tmpdir(void) { scratch_make(tmpdir, sizeof tmpdir, "test_data"); }
static void remove_tmpdir(void) { scratch_remove(tmpdir); }

TestSuite(data, .init = make_tmpdir, .fini = remove_tmpdir);

static const char *tpath(const char *name) {
    static char p[4][512];
    static int k;
    k = (k + 1) % 4;
    snprintf(p[k], sizeof p[k], "%s/%s", tmpdir, name);
    return p[k];
}

static void write_bytes(const char *path, const void *b, size_t n) {
    FILE *f = fopen(path, "wb");
    cr_assert(f, "cannot create %s", path);
    cr_assert_eq(fwrite(b, 1, n, f), n);
    fclose(f);
}

static void write_gz(const char *path, const void *b, size_t n) {
    gzFile f = gzopen(path, "wb");
    cr_assert(f);
    cr_assert_eq(gzwrite(f, b, (unsigned)n), (int)n);
    gzclose(f);
}

static uint8_t *read_bytes(const char *path, size_t *n) {
    FILE *f = fopen(path, "rb");
    cr_assert(f);
    fseek(f, 0, SEEK_END);
    *n = (size_t)ftell(f);
    fseek(f, 0, SEEK_SET);
    uint8_t *b = malloc(*n + 1);
    cr_assert_eq(fread(b, 1, *n, f), *n);
    fclose(f);
    return b;
}

/* an IDX file: 00 00 08 ndim, big-endian sizes, data */
static size_t idx_bytes(uint8_t *out, int nd, const uint32_t *dims, const uint8_t *data) {
    size_t n = 4, count = 1;
    out[0] = out[1] = 0; out[2] = 8; out[3] = (uint8_t)nd;
    for (int i = 0; i < nd; i++) {
        out[n++] = dims[i] >> 24; out[n++] = dims[i] >> 16; out[n++] = dims[i] >> 8; out[n++] = dims[i];
        count *= dims[i];
    }
    memcpy(out + n, data, count);
    return n + count;
}

/* open, expect failure with `code` and a message containing each of the strings given */
static void expect_open_fails(const char *spec, const char *split, int code, const char *must1, const char *must2) {
    ExcbDataset ds;
    char err[EXCB_ERR_LEN] = "";
    int got = excb_data_open(&ds, spec, split, err);
    cr_expect_eq(got, code, "%s: exit code %d, want %d (message: %s)", spec, got, code, err);
    cr_expect(strstr(err, must1) != NULL, "message '%s' lacks '%s'", err, must1);
    if (must2) cr_expect(strstr(err, must2) != NULL, "message '%s' lacks '%s'", err, must2);
}

/* ---- IDX --------------------------------------------------------------------------------------- */
Test(data, idx_hand_built_bytes_big_endian_sizes) {
    /* 2 images of 3 rows x 2 columns: sizes 00000002 00000003 00000002, pixels 0..11 */
    const uint8_t file[] = {0, 0, 8, 3,  0, 0, 0, 2,  0, 0, 0, 3,  0, 0, 0, 2,
                            0, 1, 2, 3, 4, 5,  6, 7, 8, 9, 10, 11};
    const uint8_t labels[] = {0, 0, 8, 1,  0, 0, 0, 2,  7, 3};
    write_bytes(tpath("x-images-idx3-ubyte"), file, sizeof file);
    write_bytes(tpath("x-labels-idx1-ubyte"), labels, sizeof labels);
    ExcbDataset ds;
    char err[EXCB_ERR_LEN];
    cr_assert_eq(excb_data_open(&ds, tpath("x-images-idx3-ubyte"), NULL, err), 0, "%s", err);
    cr_expect_eq(ds.kind, EXCB_DATA_IDX);
    cr_expect_eq(ds.n, 2);
    cr_expect_eq(ds.height, 3);
    cr_expect_eq(ds.width, 2);
    cr_expect_eq(ds.channels, 1);
    cr_assert(ds.labels, "the sibling labels file was not found");
    cr_expect_eq(ds.labels[0], 7);
    cr_expect_eq(ds.labels[1], 3);
    ExcbImage img = {0};
    cr_assert_eq(excb_data_get(&ds, 1, &img, err), 0, "%s", err);
    /* image 1, row 2, column 1 = byte 16 + 6 + 2*2 + 1 = value 11 */
    cr_expect_eq(img.px[2 * 2 + 1], 11);
    cr_expect_eq(img.px[0], 6);
    excb_image_free(&img);
    excb_data_close(&ds);
}

Test(data, idx_gzip_folder_round_trip) {
    /* the layout of the Fashion-MNIST folder: four gzipped files */
    enum { N = 5, H = 28, W = 28 };
    static uint8_t px[N * H * W], buf[16 + N * H * W];
    uint8_t lab[N];
    for (int i = 0; i < N * H * W; i++) px[i] = (uint8_t)(i * 37 + 11);
    for (int i = 0; i < N; i++) lab[i] = (uint8_t)(9 - i);
    const uint32_t d3[3] = {N, H, W}, d1[1] = {N};
    char dir[512];
    snprintf(dir, sizeof dir, "%s/fm", tmpdir);
    mkdir(dir, 0755);
    write_gz(tpath("fm/train-images-idx3-ubyte.gz"), buf, idx_bytes(buf, 3, d3, px));
    write_gz(tpath("fm/train-labels-idx1-ubyte.gz"), buf, idx_bytes(buf, 1, d1, lab));
    write_bytes(tpath("fm/t10k-images-idx3-ubyte"), buf, idx_bytes(buf, 3, d3, px));   /* plain: also read */
    ExcbDataset ds;
    char err[EXCB_ERR_LEN];
    cr_assert_eq(excb_data_open(&ds, dir, "train", err), 0, "%s", err);
    cr_expect_eq(ds.n, N);
    cr_expect_eq(ds.n_classes, 10);
    ExcbImage img = {0};
    for (int i = 0; i < N; i++) {
        cr_assert_eq(excb_data_get(&ds, i, &img, err), 0);
        cr_expect_eq(memcmp(img.px, px + i * H * W, H * W), 0, "image %d differs", i);
        cr_expect_eq(ds.labels[i], 9 - i);
    }
    excb_data_close(&ds);
    cr_assert_eq(excb_data_open(&ds, dir, "test", err), 0, "%s", err);
    cr_expect_null(ds.labels, "the test split has no labels file here");
    excb_data_close(&ds);
    excb_image_free(&img);
}

Test(data, fashion_mnist_default_is_the_debian_data) {
    ExcbDataset ds;
    char err[EXCB_ERR_LEN];
    int code = excb_data_open(&ds, "fashion-mnist", "test", err);
    if (code == EXCB_EXIT_NOINPUT) cr_skip_test("Fashion-MNIST not installed (%s)", err);
    cr_assert_eq(code, 0, "%s", err);
    cr_expect_eq(ds.n, 10000);
    cr_expect_eq(ds.height, 28);
    int count[10] = {0};
    for (long i = 0; i < ds.n; i++) count[ds.labels[i]]++;
    for (int c = 0; c < 10; c++) cr_expect_eq(count[c], 1000, "class %d has %d test images", c, count[c]);
    excb_data_close(&ds);
}

Test(data, idx_bad_inputs) {
    const uint32_t d3[3] = {4, 5, 5}, d1[1] = {4};
    uint8_t px[100] = {0}, lab[4] = {1, 2, 3, 4}, buf[200];
    size_t n = idx_bytes(buf, 3, d3, px);
    write_bytes(tpath("trunc-images-idx3-ubyte"), buf, n - 1);
    expect_open_fails(tpath("trunc-images-idx3-ubyte"), NULL, 65, "trunc-images-idx3-ubyte", "truncated");
    write_bytes(tpath("long-images-idx3-ubyte"), buf, n);
    FILE *f = fopen(tpath("long-images-idx3-ubyte"), "ab");
    fputc(0, f);
    fclose(f);
    expect_open_fails(tpath("long-images-idx3-ubyte"), NULL, 65, "long-images", "trailing bytes");
    uint8_t bad = buf[2];
    buf[2] = 0x0D;                                                        /* float32 elements     */
    write_bytes(tpath("f32-images-idx3-ubyte"), buf, n);
    expect_open_fails(tpath("f32-images-idx3-ubyte"), NULL, 65, "f32-images", "0x0D");
    buf[2] = bad;
    buf[0] = 1;                                                           /* wrong magic          */
    write_bytes(tpath("magic-images-idx3-ubyte"), buf, n);
    expect_open_fails(tpath("magic-images-idx3-ubyte"), NULL, 65, "magic-images", "unknown data format");
    buf[0] = 0;
    const uint8_t absurd[] = {0, 0, 8, 3, 0, 0, 0, 1, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF};
    write_bytes(tpath("absurd-images-idx3-ubyte"), absurd, sizeof absurd);
    expect_open_fails(tpath("absurd-images-idx3-ubyte"), NULL, 65, "absurd-images", "absurdly large");
    /* gzip: truncated, and corrupted in the middle of the deflate stream */
    write_gz(tpath("gz-images-idx3-ubyte"), buf, n);
    size_t gl;
    uint8_t *gz = read_bytes(tpath("gz-images-idx3-ubyte"), &gl);
    write_bytes(tpath("gzt-images-idx3-ubyte"), gz, gl - 12);
    expect_open_fails(tpath("gzt-images-idx3-ubyte"), NULL, 65, "gzt-images", "truncated");
    gz[gl / 2] ^= 0xFF;
    gz[gl / 2 + 1] ^= 0x5A;
    write_bytes(tpath("gzc-images-idx3-ubyte"), gz, gl);
    expect_open_fails(tpath("gzc-images-idx3-ubyte"), NULL, 65, "gzc-images", "gzip");
    free(gz);
    /* labels: count mismatch and out of range */
    write_bytes(tpath("ok-images-idx3-ubyte"), buf, n);
    const uint32_t d1b[1] = {3};
    write_bytes(tpath("ok-labels-idx1-ubyte"), buf + 100, idx_bytes(buf + 100, 1, d1b, lab));
    expect_open_fails(tpath("ok-images-idx3-ubyte"), NULL, 65, "ok-labels-idx1-ubyte", "3 labels for 4 images");
    lab[2] = 12;
    write_bytes(tpath("ok-labels-idx1-ubyte"), buf + 100, idx_bytes(buf + 100, 1, d1, lab));
    expect_open_fails(tpath("ok-images-idx3-ubyte"), NULL, 65, "ok-labels-idx1-ubyte", "label 12 of record 2 is outside 0-9");
    write_bytes(tpath("empty-images-idx3-ubyte"), "", 0);
    expect_open_fails(tpath("empty-images-idx3-ubyte"), NULL, 65, "empty-images", "unknown data format");
    expect_open_fails(tpath("missing"), NULL, 66, "missing", "No such file");
}

/* ---- CIFAR -------------------------------------------------------------------------------------- */
/* pixel (ch, r, c) of record i, a value that tells all four apart */
static uint8_t cifar_px(int i, int ch, int r, int c) { return (uint8_t)(i * 101 + ch * 67 + r * 7 + c * 3); }

static void write_cifar(const char *path, int n, int hundred, const uint8_t *coarse, const uint8_t *fine) {
    size_t rec = hundred ? 3074 : 3073;
    uint8_t *b = calloc(n, rec);
    for (int i = 0; i < n; i++) {
        uint8_t *r = b + i * rec;
        if (hundred) { r[0] = coarse[i]; r[1] = fine[i]; }
        else r[0] = fine[i];
        uint8_t *px = r + (hundred ? 2 : 1);
        for (int ch = 0; ch < 3; ch++)                        /* byte 1 + ch*1024 + row*32 + col */
            for (int y = 0; y < 32; y++)
                for (int x = 0; x < 32; x++) px[ch * 1024 + y * 32 + x] = cifar_px(i, ch, y, x);
    }
    write_bytes(path, b, n * rec);
    free(b);
}

static void check_cifar_pixels(ExcbDataset *ds, long i, int record_i) {
    ExcbImage img = {0};
    char err[EXCB_ERR_LEN];
    cr_assert_eq(excb_data_get(ds, i, &img, err), 0, "%s", err);
    cr_assert_eq(img.c, 3);
    int bad = 0;
    for (int y = 0; y < 32; y++)
        for (int x = 0; x < 32; x++)
            for (int ch = 0; ch < 3; ch++) bad += img.px[(y * 32 + x) * 3 + ch] != cifar_px(record_i, ch, y, x);
    cr_expect_eq(bad, 0, "image %ld: %d pixels misplaced", i, bad);
    excb_image_free(&img);
}

Test(data, cifar10_folder_round_trip) {
    char dir[512];
    snprintf(dir, sizeof dir, "%s/cifar-10-batches-bin", tmpdir);
    mkdir(dir, 0755);
    uint8_t fine[3] = {0, 9, 4};
    for (int b = 1; b <= 5; b++) {
        char name[64];
        snprintf(name, sizeof name, "cifar-10-batches-bin/data_batch_%d.bin", b);
        write_cifar(tpath(name), 3, 0, NULL, fine);
    }
    write_cifar(tpath("cifar-10-batches-bin/test_batch.bin"), 2, 0, NULL, fine);
    const char *meta = "airplane\nautomobile\nbird\ncat\ndeer\ndog\nfrog\nhorse\nship\ntruck\n\n";
    write_bytes(tpath("cifar-10-batches-bin/batches.meta.txt"), meta, strlen(meta));
    ExcbDataset ds;
    char err[EXCB_ERR_LEN];
    cr_assert_eq(excb_data_open(&ds, dir, "train", err), 0, "%s", err);
    cr_expect_eq(ds.kind, EXCB_DATA_CIFAR10);
    cr_expect_eq(ds.n, 15);
    cr_expect_eq(ds.labels[13], 9);                       /* batch 5, record 1 */
    cr_expect_str_eq(ds.class_names[9], "truck");
    check_cifar_pixels(&ds, 13, 1);
    excb_data_close(&ds);
    cr_assert_eq(excb_data_open(&ds, dir, "test", err), 0, "%s", err);
    cr_expect_eq(ds.n, 2);
    excb_data_close(&ds);
}

/* train_images: excb_data_keep keeps image floor(i n / max) of the source as image i, its label too.
   15 records of 3 per batch file (labels 0, 9, 4, 0, 9, 4, ...): keep 6 -> source 0, 2, 5, 7, 10, 12
   (i * 15 / 6 = 0, 2.5, 5, 7.5, 10, 12.5, floored), labels 0, 4, 4, 9, 9, 0; pixels as the source's;
   0 and a max at or above n keep every image, untouched. */
Test(data, train_images_keeps_an_evenly_spaced_subset) {
    char dir[512];
    snprintf(dir, sizeof dir, "%s/cifar-10-batches-bin", tmpdir);
    mkdir(dir, 0755);
    uint8_t fine[3] = {0, 9, 4};
    for (int b = 1; b <= 5; b++) {
        char name[64];
        snprintf(name, sizeof name, "cifar-10-batches-bin/data_batch_%d.bin", b);
        write_cifar(tpath(name), 3, 0, NULL, fine);
    }
    write_cifar(tpath("cifar-10-batches-bin/test_batch.bin"), 2, 0, NULL, fine);
    ExcbDataset ds;
    char err[EXCB_ERR_LEN];
    cr_assert_eq(excb_data_open(&ds, dir, "train", err), 0, "%s", err);
    excb_data_keep(&ds, 6);
    cr_assert_eq(ds.n, 6);
    static const long src[6] = {0, 2, 5, 7, 10, 12};
    static const int lab[6] = {0, 4, 4, 9, 9, 0};
    for (int i = 0; i < 6; i++) {
        cr_expect_eq(ds.keep[i], src[i], "image %d is source image %ld, want %ld", i, ds.keep[i], src[i]);
        cr_expect_eq(ds.labels[i], lab[i], "image %d: label %d, want %d", i, ds.labels[i], lab[i]);
        check_cifar_pixels(&ds, i, (int)(src[i] % 3));    /* record src[i] % 3 of its batch file */
    }
    excb_data_close(&ds);
    for (long max = 0; max <= 20; max += 15) {
        cr_assert_eq(excb_data_open(&ds, dir, "train", err), 0, "%s", err);
        excb_data_keep(&ds, max);
        cr_expect(ds.n == 15 && ds.keep == NULL, "max %ld keeps all 15", max);
        excb_data_close(&ds);
    }
}

Test(data, cifar100_coarse_label_comes_first) {
    char dir[512];
    snprintf(dir, sizeof dir, "%s/cifar-100-binary", tmpdir);
    mkdir(dir, 0755);
    uint8_t coarse[2] = {19, 3}, fine[2] = {57, 99};
    write_cifar(tpath("cifar-100-binary/train.bin"), 2, 1, coarse, fine);
    ExcbDataset ds;
    char err[EXCB_ERR_LEN];
    cr_assert_eq(excb_data_open(&ds, dir, "train", err), 0, "%s", err);
    cr_expect_eq(ds.kind, EXCB_DATA_CIFAR100);
    cr_expect_eq(ds.n_classes, 100);
    cr_expect_eq(ds.labels[0], 57, "the fine label is byte 1, not byte 0");
    cr_expect_eq(ds.labels[1], 99);
    check_cifar_pixels(&ds, 1, 1);
    excb_data_close(&ds);
}

Test(data, cifar_bad_inputs) {
    char dir[512];
    snprintf(dir, sizeof dir, "%s/c10", tmpdir);
    mkdir(dir, 0755);
    uint8_t fine[2] = {3, 10};                                          /* 10: out of range       */
    write_cifar(tpath("c10/data_batch_1.bin"), 2, 0, NULL, fine);
    expect_open_fails(tpath("c10/data_batch_1.bin"), NULL, 65, "c10/data_batch_1.bin", "label 10 of record 1 is outside 0-9");
    fine[1] = 2;
    write_cifar(tpath("c10/data_batch_1.bin"), 2, 0, NULL, fine);
    expect_open_fails(dir, "train", 66, "data_batch_2.bin", "No such file");     /* batches 2-5 missing */
    cr_assert_eq(truncate(tpath("c10/data_batch_1.bin"), 3073 * 2 - 100), 0);
    expect_open_fails(tpath("c10/data_batch_1.bin"), NULL, 65, "data_batch_1.bin", "not a whole number of 3073-byte records");
    char d100[512];
    snprintf(d100, sizeof d100, "%s/c100", tmpdir);
    mkdir(d100, 0755);
    uint8_t coarse[1] = {20}, f1[1] = {5};
    write_cifar(tpath("c100/train.bin"), 1, 1, coarse, f1);
    expect_open_fails(d100, "train", 65, "c100/train.bin", "coarse label 20 of record 0 is outside 0-19");
    expect_open_fails(d100, "val", 64, "c100", "splits are train and test");
}

/* ---- STL-10 ------------------------------------------------------------------------------------- */
static uint8_t stl_px(int i, int ch, int r, int c) { return (uint8_t)(i * 13 + ch * 71 + r * 5 + c * 11); }

static void write_stl(const char *path, int n, int first) {
    uint8_t *b = malloc((size_t)n * 27648);
    for (int i = 0; i < n; i++)                        /* byte ch*9216 + col*96 + row: column-major */
        for (int ch = 0; ch < 3; ch++)
            for (int c = 0; c < 96; c++)
                for (int r = 0; r < 96; r++) b[(size_t)i * 27648 + ch * 9216 + c * 96 + r] = stl_px(first + i, ch, r, c);
    write_bytes(path, b, (size_t)n * 27648);
    free(b);
}

Test(data, stl10_column_major_planes_and_labels_1_to_10) {
    char dir[512];
    snprintf(dir, sizeof dir, "%s/stl10_binary", tmpdir);
    mkdir(dir, 0755);
    write_stl(tpath("stl10_binary/train_X.bin"), 3, 0);
    write_bytes(tpath("stl10_binary/train_y.bin"), "\x01\x0A\x05", 3);
    write_stl(tpath("stl10_binary/unlabeled_X.bin"), 2, 3);
    ExcbDataset ds;
    char err[EXCB_ERR_LEN];
    cr_assert_eq(excb_data_open(&ds, dir, "train+unlabeled", err), 0, "%s", err);
    cr_expect_eq(ds.kind, EXCB_DATA_STL10);
    cr_expect_eq(ds.n, 5);
    cr_expect_eq(ds.labels[0], 0, "label byte 1 is class 0");
    cr_expect_eq(ds.labels[1], 9, "label byte 10 is class 9");
    cr_expect_eq(ds.labels[2], 4);
    cr_expect_eq(ds.labels[3], -1, "unlabeled");
    ExcbImage img = {0};
    for (long i = 0; i < 5; i++) {
        cr_assert_eq(excb_data_get(&ds, i, &img, err), 0, "%s", err);
        int bad = 0;
        for (int r = 0; r < 96; r++)
            for (int c = 0; c < 96; c++)
                for (int ch = 0; ch < 3; ch++) bad += img.px[(r * 96 + c) * 3 + ch] != stl_px((int)i, ch, r, c);
        cr_expect_eq(bad, 0, "image %ld: %d pixels misplaced (row/column swapped?)", i, bad);
    }
    excb_image_free(&img);
    excb_data_close(&ds);
    write_bytes(tpath("stl10_binary/train_y.bin"), "\x01\x0B\x05", 3);
    expect_open_fails(dir, "train", 65, "train_y.bin", "label 11 of record 1 is outside 1-10");
    write_bytes(tpath("stl10_binary/train_y.bin"), "\x01\x00\x05", 3);
    expect_open_fails(dir, "train", 65, "train_y.bin", "label 0 of record 1 is outside 1-10");
    write_bytes(tpath("stl10_binary/train_y.bin"), "\x01\x02", 2);
    expect_open_fails(dir, "train", 65, "train_y.bin", "2 labels for 3 images");
}

/* unlabeled_X.bin is 2,764,800,000 bytes: offsets past 2^31 must work. A sparse file costs no disk. */
Test(data, stl10_unlabeled_file_over_2_gib) {
    char dir[512];
    snprintf(dir, sizeof dir, "%s/stl_big", tmpdir);
    mkdir(dir, 0755);
    const char *path = tpath("stl_big/unlabeled_X.bin");
    int fd = open(path, O_CREAT | O_WRONLY | O_TRUNC, 0644);
    cr_assert(fd >= 0);
    off_t size = (off_t)100000 * 27648;                               /* 2,764,800,000 bytes */
    if (ftruncate(fd, size) != 0) { close(fd); cr_skip_test("no sparse 2.6 GiB file here: %s", strerror(errno)); }
    /* image 99999, channel 2 (B), row 95, column 94: byte 99999*27648 + 2*9216 + 94*96 + 95 */
    off_t at = (off_t)99999 * 27648 + 2 * 9216 + 94 * 96 + 95;
    cr_assert(at > ((off_t)1 << 31));
    cr_assert_eq(pwrite(fd, "\xAB", 1, at), 1);
    close(fd);
    ExcbDataset ds;
    char err[EXCB_ERR_LEN];
    cr_assert_eq(excb_data_open(&ds, dir, "unlabeled", err), 0, "%s", err);
    cr_expect_eq(ds.n, 100000);
    ExcbImage img = {0};
    cr_assert_eq(excb_data_get(&ds, 99999, &img, err), 0, "%s", err);
    cr_expect_eq(img.px[(95 * 96 + 94) * 3 + 2], 0xAB);
    cr_expect_eq(img.px[(94 * 96 + 95) * 3 + 2], 0, "row and column swapped");
    excb_image_free(&img);
    excb_data_close(&ds);
}

/* ---- image folders -------------------------------------------------------------------------------- */
static void gradient(uint8_t *px, int h, int w, int c, int seed) {
    for (int y = 0; y < h; y++)
        for (int x = 0; x < w; x++)
            for (int ch = 0; ch < c; ch++) px[(y * w + x) * c + ch] = (uint8_t)(20 + seed * 5 + y * 2 + x * 2 + ch * 30);  /* smooth, < 256 */
}

Test(data, folder_classes_sorted_and_decoded_by_magic) {
    char root[512], err[EXCB_ERR_LEN];
    snprintf(root, sizeof root, "%s/imgs", tmpdir);
    mkdir(root, 0755);
    mkdir(tpath("imgs/b_dog"), 0755);
    mkdir(tpath("imgs/a_cat"), 0755);
    mkdir(tpath("imgs/a_cat/nested"), 0755);
    uint8_t px[20 * 30 * 3];
    gradient(px, 20, 30, 3, 1);
    cr_assert_eq(excb_write_png(tpath("imgs/b_dog/2.png"), px, 20, 30, 3, err), 0, "%s", err);
    /* ImageNet's n02105855_2933.JPEG is a PNG: decoded by its bytes, like PIL does */
    cr_assert_eq(excb_write_png(tpath("imgs/b_dog/1.JPEG"), px, 20, 30, 3, err), 0, "%s", err);
    cr_assert_eq(excb_write_jpeg(tpath("imgs/a_cat/nested/z.jpg"), px, 20, 30, 3, 95, err), 0, "%s", err);
    gradient(px, 20, 30, 1, 2);
    cr_assert_eq(excb_write_png(tpath("imgs/a_cat/gray.PNG"), px, 20, 30, 1, err), 0, "%s", err);
    write_bytes(tpath("imgs/a_cat/notes.txt"), "not an image", 12);         /* ignored: no image extension */
    ExcbDataset ds;
    cr_assert_eq(excb_data_open(&ds, root, "train", err), 0, "%s", err);
    cr_expect_eq(ds.kind, EXCB_DATA_FOLDER);
    cr_expect_eq(ds.n, 4);
    cr_expect_eq(ds.n_classes, 2);
    cr_expect_str_eq(ds.class_names[0], "a_cat");
    cr_expect_str_eq(ds.class_names[1], "b_dog");
    /* sorted paths: a_cat/gray.PNG, a_cat/nested/z.jpg, b_dog/1.JPEG, b_dog/2.png */
    cr_expect(strstr(ds.files[0], "a_cat/gray.PNG"), "%s", ds.files[0]);
    cr_expect(strstr(ds.files[2], "b_dog/1.JPEG"), "%s", ds.files[2]);
    cr_expect_eq(ds.labels[1], 0);
    cr_expect_eq(ds.labels[2], 1);
    ExcbImage img = {0};
    cr_assert_eq(excb_data_get(&ds, 0, &img, err), 0, "%s", err);         /* gray PNG -> RGB       */
    cr_expect(img.c == 3 && img.h == 20 && img.w == 30);
    cr_expect(img.px[(5 * 30 + 7) * 3 + 0] == px[5 * 30 + 7] && img.px[(5 * 30 + 7) * 3 + 2] == px[5 * 30 + 7]);
    cr_assert_eq(excb_data_get(&ds, 2, &img, err), 0, "a PNG named .JPEG: %s", err);
    gradient(px, 20, 30, 3, 1);
    cr_expect_eq(memcmp(img.px, px, sizeof px), 0, "PNG round trip is lossless");
    cr_assert_eq(excb_data_get(&ds, 1, &img, err), 0, "%s", err);
    int worst = 0;
    for (size_t i = 0; i < sizeof px; i++) { int d = abs(img.px[i] - px[i]); if (d > worst) worst = d; }
    /* measured: 2 on this smooth gradient at quality 95 (libjpeg-turbo 2.1.5); 3 leaves one level */
    cr_expect(worst <= 3, "JPEG q95 round trip: worst pixel error %d > 3", worst);
    excb_image_free(&img);
    excb_data_close(&ds);
    /* flat folder: unlabeled */
    cr_assert_eq(excb_data_open(&ds, tpath("imgs/b_dog"), NULL, err), 0, "%s", err);
    cr_expect_eq(ds.n, 2);
    cr_expect_null(ds.labels);
    excb_data_close(&ds);
}

/* a PNG with a valid IHDR chunk of the given size and nothing after it */
static size_t png_header(uint8_t *b, uint32_t w, uint32_t h, int depth, int color) {
    const uint8_t sig[8] = {0x89, 'P', 'N', 'G', 13, 10, 26, 10};
    memcpy(b, sig, 8);
    uint8_t *c = b + 8;
    c[0] = 0; c[1] = 0; c[2] = 0; c[3] = 13;
    memcpy(c + 4, "IHDR", 4);
    uint8_t *d = c + 8;
    d[0] = w >> 24; d[1] = w >> 16; d[2] = w >> 8; d[3] = w;
    d[4] = h >> 24; d[5] = h >> 16; d[6] = h >> 8; d[7] = h;
    d[8] = (uint8_t)depth; d[9] = (uint8_t)color; d[10] = d[11] = d[12] = 0;
    uint32_t crc = (uint32_t)crc32(0, c + 4, 17);
    d[13] = crc >> 24; d[14] = crc >> 16; d[15] = crc >> 8; d[16] = crc;
    /* then an empty IDAT and IEND, so that libpng's header read gets as far as the image data */
    uint8_t *e = b + 33;
    const char *names[2] = {"IDAT", "IEND"};
    for (int i = 0; i < 2; i++, e += 12) {
        e[0] = e[1] = e[2] = e[3] = 0;
        memcpy(e + 4, names[i], 4);
        uint32_t cc = (uint32_t)crc32(0, e + 4, 4);
        e[8] = cc >> 24; e[9] = cc >> 16; e[10] = cc >> 8; e[11] = cc;
    }
    return 33 + 24;
}

static void expect_decode_fails(const uint8_t *b, size_t n, const char *name, const char *must) {
    ExcbImage img = {0};
    char err[EXCB_ERR_LEN] = "";
    int code = excb_decode_image(b, n, name, &img, err);
    cr_expect_eq(code, 65, "%s: code %d (%s)", name, code, err);
    cr_expect(strstr(err, name) && strstr(err, must), "message '%s' should name '%s' and say '%s'", err, name, must);
    excb_image_free(&img);
}

Test(data, image_decoder_bad_inputs) {
    char err[EXCB_ERR_LEN];
    uint8_t px[64 * 64 * 3];
    gradient(px, 64, 64, 3, 3);
    cr_assert_eq(excb_write_jpeg(tpath("a.jpg"), px, 64, 64, 3, 90, err), 0);
    cr_assert_eq(excb_write_png(tpath("a.png"), px, 64, 64, 3, err), 0);
    size_t jn, pn;
    uint8_t *j = read_bytes(tpath("a.jpg"), &jn), *p = read_bytes(tpath("a.png"), &pn);
    expect_decode_fails(j, jn - jn / 4, "trunc.jpg", "corrupt JPEG");             /* premature end  */
    expect_decode_fails(j, 3, "tiny.jpg", "bad JPEG");
    expect_decode_fails(p, pn - 20, "trunc.png", "bad PNG");
    p[pn - 30] ^= 0x55;                                                            /* breaks a CRC  */
    expect_decode_fails(p, pn, "crc.png", "bad PNG");
    expect_decode_fails((const uint8_t *)"hello, world", 12, "text.JPEG", "not an image");
    expect_decode_fails((const uint8_t *)"BM\0\0\0\0", 6, "x.bmp", "a BMP image");
    expect_decode_fails((const uint8_t *)"", 0, "empty.png", "empty file");
    /* a valid JPEG whose frame header (SOF0: FF C0, length, precision, height, width) claims
       60000 x 60000 pixels: refused before any pixel memory is allocated */
    for (size_t i = 0; i + 9 < jn; i++)
        if (j[i] == 0xFF && j[i + 1] == 0xC0) {
            j[i + 5] = 0xEA; j[i + 6] = 0x60; j[i + 7] = 0xEA; j[i + 8] = 0x60;        /* 0xEA60 = 60000 */
            break;
        }
    expect_decode_fails(j, jn, "huge.jpg", "pixel limit");
    uint8_t hdr[64];
    size_t hn = png_header(hdr, 70000, 70000, 8, 2);
    expect_decode_fails(hdr, hn, "bomb.png", "pixel limit");
    hn = png_header(hdr, 0, 10, 8, 2);
    expect_decode_fails(hdr, hn, "zero.png", "bad PNG");
    hn = png_header(hdr, 10, 10, 16, 2);
    expect_decode_fails(hdr, hn, "deep.png", "16-bit PNG is not supported");
    free(j);
    free(p);
}

Test(data, empty_folder_and_missing_path) {
    mkdir(tpath("empty"), 0755);
    expect_open_fails(tpath("empty"), NULL, 65, "empty", "no images found");
    mkdir(tpath("onlytext"), 0755);
    mkdir(tpath("onlytext/c"), 0755);
    write_bytes(tpath("onlytext/c/readme.txt"), "x", 1);
    expect_open_fails(tpath("onlytext"), NULL, 65, "onlytext/c", "a class folder with no images");
    mkdir(tpath("oneclassempty"), 0755);
    mkdir(tpath("oneclassempty/a"), 0755);
    mkdir(tpath("oneclassempty/b"), 0755);
    uint8_t px[8 * 8 * 3] = {0};
    char err[EXCB_ERR_LEN];
    cr_assert_eq(excb_write_png(tpath("oneclassempty/a/x.png"), px, 8, 8, 3, err), 0);
    expect_open_fails(tpath("oneclassempty"), NULL, 65, "oneclassempty/b", "a class folder with no images");
    expect_open_fails(tpath("does/not/exist"), NULL, 66, "does/not/exist", "No such file");
}

/* ---- the command line, end to end: exit codes and messages ------------------------------------ */
static int run_cli(const char *args, char *out, size_t cap) {
    char cmd[1024];
    snprintf(cmd, sizeof cmd, "./excb %s 2>&1", args);
    FILE *p = popen(cmd, "r");
    cr_assert(p, "popen");
    size_t n = fread(out, 1, cap - 1, p);
    out[n] = 0;
    int st = pclose(p);
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

/* a one-class folder ROOT/k holding n small JPEGs 0.jpg .. n-1.jpg */
static void jpeg_class(const char *root, int n) {
    char dir[256], err[EXCB_ERR_LEN];
    mkdir(tpath(root), 0755);
    snprintf(dir, sizeof dir, "%s/k", root);
    mkdir(tpath(dir), 0755);
    uint8_t px[24 * 24 * 3];
    for (int i = 0; i < n; i++) {
        char name[300];
        snprintf(name, sizeof name, "%s/%d.jpg", dir, i);
        gradient(px, 24, 24, 3, i);
        cr_assert_eq(excb_write_jpeg(tpath(name), px, 24, 24, 3, 90, err), 0, "%s", err);
    }
}

Test(data, cli_exit_codes_and_skip_bad_images) {
    if (access("./excb", X_OK) != 0) cr_skip_test("./excb not built");
    char out[8192], args[1024];
    jpeg_class("cli", 6);
    write_bytes(tpath("cli/k/3.jpg"), "GIF89a....", 10);                   /* a GIF named .jpg */
    const char *shape = "--config tiny --global-size 16 --local-size 8 --batch 2 --seconds 1";
    snprintf(args, sizeof args, "bench-data --data %s %s", tpath("cli"), shape);
    cr_expect_eq(run_cli(args, out, sizeof out), 65, "a bad image stops the run with 65: %s", out);
    cr_expect(strstr(out, "cli/k/3.jpg") && strstr(out, "a GIF image"), "message: %s", out);
    snprintf(args, sizeof args, "bench-data --data %s %s --skip-bad-images --workers 2", tpath("cli"), shape);
    cr_expect_eq(run_cli(args, out, sizeof out), 0, "--skip-bad-images: %s", out);
    cr_expect(strstr(out, "skipping bad image") && strstr(out, "bad images skipped 1"), "output: %s", out);
    snprintf(args, sizeof args, "bench-data --data %s %s", tpath("nothing-here"), shape);
    cr_expect_eq(run_cli(args, out, sizeof out), 66, "missing data: %s", out);
    snprintf(args, sizeof args, "bench-data --data %s %s --blur sometimes", tpath("cli"), shape);
    cr_expect_eq(run_cli(args, out, sizeof out), 64, "bad option value: %s", out);
}

/* ---- the loader over a folder with one bad file ----------------------------------------------------- */
static void folder_with_a_bad_file(char *root) {
    snprintf(root, 512, "%s/ld", tmpdir);
    jpeg_class("ld", 8);
    size_t n;
    uint8_t *j = read_bytes(tpath("ld/k/5.jpg"), &n);
    write_bytes(tpath("ld/k/5.jpg"), j, n / 2);                                /* truncated JPEG */
    free(j);
}

static ExcbViewConfig rgb_views(void) {
    ExcbViewConfig vc;
    excb_view_config_default(&vc, EXCB_BLUR_AS_RUN);
    vc.global_size = 16; vc.local_size = 8; vc.channels = 3; vc.epochs = 10;
    return vc;
}

Test(data, loader_error_is_reported_again_and_never_hangs) {
    char root[512], err[EXCB_ERR_LEN] = "";
    folder_with_a_bad_file(root);
    ExcbDataset ds;
    cr_assert_eq(excb_data_open(&ds, root, NULL, err), 0, "%s", err);
    ExcbViewConfig vc = rgb_views();
    ExcbLoader L;
    cr_assert_eq(excb_loader_open(&L, &ds, &vc, 2, 2, 0, err), 0, "%s", err);
    int code = 0, batches = 0;
    ExcbBatch *bt;
    while (batches < 8 && !(code = excb_loader_next(&L, &bt, err))) batches++;
    cr_expect_eq(code, 65, "the truncated JPEG must stop the epoch (got %d after %d batches)", code, batches);
    cr_expect(strstr(err, "ld/k/5.jpg") && strstr(err, "JPEG"), "%s", err);
    err[0] = 0;
    cr_expect_eq(excb_loader_next(&L, &bt, err), 65, "a second call returns the error again");
    cr_expect(strstr(err, "ld/k/5.jpg"), "%s", err);
    excb_loader_close(&L);
    excb_data_close(&ds);
}

Test(data, loader_skips_a_bad_file_when_asked) {
    char root[512], err[EXCB_ERR_LEN];
    folder_with_a_bad_file(root);
    ExcbDataset ds;
    cr_assert_eq(excb_data_open(&ds, root, NULL, err), 0, "%s", err);
    ds.skip_bad = 1;
    ExcbViewConfig vc = rgb_views();
    ExcbLoader L;
    cr_assert_eq(excb_loader_open(&L, &ds, &vc, 2, 2, 0, err), 0, "%s", err);
    for (int b = 0; b < 8; b++) {                                     /* two epochs of 4 batches */
        ExcbBatch *bt;
        cr_assert_eq(excb_loader_next(&L, &bt, err), 0, "batch %d: %s", b, err);
        for (int i = 0; i < 2; i++) cr_expect_neq(bt->index[i], 5, "the bad image was used");
    }
    cr_expect_eq(ds.n_bad, 1, "counted once, however often it came up");
    excb_loader_close(&L);
    excb_data_close(&ds);
}
