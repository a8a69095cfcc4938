/* test_views.c: the view operators, their random choices, and the loader (excb.c sections 12-13).
 *
 *  - each operator on tiny hand-computed images (arithmetic in the comments);
 *  - each operator against PIL / torchvision, bit for bit, on the golden file written by
 *    tests/reference/make_view_golden.py (the blur within one level on rare ties, see below);
 *  - every probability counted over many draws, within 5 binomial standard deviations;
 *  - the loader: a view is the same whatever the worker count, batch order or resume point.
 */
#include "testutil.h"

static ExcbViewConfig default_vc(int blur_mode) {
    ExcbViewConfig vc;
    excb_view_config_default(&vc, blur_mode);
    return vc;
}

/* ---- hand-computed operators --------------------------------------------------------------------- */
Test(views, bicubic_weights_keys_a_minus_half) {
    /* W(x) = (a+2)|x|^3 - (a+3)|x|^2 + 1 on [0,1), a(|x|^3 - 5|x|^2 + 8|x| - 4) on [1,2), a = -0.5:
       W(0) = 1; W(0.5) = 1.5*0.125 - 2.5*0.25 + 1 = 0.5625; W(1) = 0;
       W(1.5) = -0.5*(3.375 - 11.25 + 12 - 4) = -0.0625; W(2) = 0. The four taps at +-0.5, +-1.5 sum to 1. */
    EXPECT_NEAR(excb_bicubic_weight(0.0), 1.0, 0, "W(0)");
    EXPECT_NEAR(excb_bicubic_weight(0.5), 0.5625, 0, "W(0.5)");
    EXPECT_NEAR(excb_bicubic_weight(-0.5), 0.5625, 0, "W(-0.5)");
    EXPECT_NEAR(excb_bicubic_weight(1.0), 0.0, 0, "W(1)");
    EXPECT_NEAR(excb_bicubic_weight(1.5), -0.0625, 0, "W(1.5)");
    EXPECT_NEAR(excb_bicubic_weight(2.0), 0.0, 0, "W(2)");
}

Test(views, bicubic_on_a_ramp) {
    /* A row 0, 10, ..., 150 (16 px, pixel j's centre at j + 0.5, value 10 j) shrunk to 8 px: output x
       is centred at 2x + 1, and a symmetric, normalised kernel reproduces a linear function, so away
       from the borders out[x] = 10 (2x + 1 - 0.5) = 20x + 5: 45, 65, 85, 105 for x = 2..5. Enlarged to
       32 px, output x sits at (x + 0.5)/2 and gets 10 ((x + 0.5)/2 - 0.5) = 5x - 2.5, which rounds
       half up in PIL's fixed point: 5x - 2 (x = 4..27, again away from the borders). */
    uint8_t row[16], out[32], tmp[64];
    for (int j = 0; j < 16; j++) row[j] = (uint8_t)(10 * j);
    excb_resize_bicubic(row, 1, 16, 16, out, 1, 8, 1, tmp);
    for (int x = 2; x <= 5; x++) cr_expect_eq(out[x], 20 * x + 5, "shrink x=%d: %d", x, out[x]);
    excb_resize_bicubic(row, 1, 16, 16, out, 1, 32, 1, tmp);
    for (int x = 4; x <= 27; x++) cr_expect_eq(out[x], 5 * x - 2, "enlarge x=%d: %d", x, out[x]);
    /* same size: no pass at all, a copy */
    excb_resize_bicubic(row, 1, 16, 16, out, 1, 16, 1, tmp);
    cr_expect_eq(memcmp(out, row, 16), 0);
}

Test(views, solarize_threshold_128) {
    /* values >= 128 become 255 - v: 127 -> 127, 128 -> 127, 200 -> 55, 255 -> 0, 0 -> 0 */
    uint8_t v[5] = {127, 128, 200, 255, 0};
    excb_solarize(v, 5, 128);
    const uint8_t want[5] = {127, 127, 55, 0, 0};
    cr_expect_eq(memcmp(v, want, 5), 0, "%d %d %d %d %d", v[0], v[1], v[2], v[3], v[4]);
}

Test(views, grayscale_itu601_weights) {
    /* L = (19595 R + 38470 G + 7471 B + 32768) >> 16:
       red 255:   (4996725 + 32768) >> 16 = 5029493 / 65536 = 76.7  -> 76
       green 255: (9809850 + 32768) >> 16 = 9842618 / 65536 = 150.2 -> 150
       blue 255:  (1905105 + 32768) >> 16 = 1937873 / 65536 = 29.6  -> 29
       white:     (16711680 + 32768) >> 16 = 255.5 -> 255 */
    uint8_t px[12] = {255, 0, 0, 0, 255, 0, 0, 0, 255, 255, 255, 255};
    excb_grayscale(px, 4, 3);
    const uint8_t want[4] = {76, 150, 29, 255};
    for (int i = 0; i < 4; i++)
        cr_expect(px[3 * i] == want[i] && px[3 * i + 1] == want[i] && px[3 * i + 2] == want[i],
                  "pixel %d: %d %d %d, want %d", i, px[3 * i], px[3 * i + 1], px[3 * i + 2], want[i]);
    uint8_t g[2] = {7, 250};
    excb_grayscale(g, 2, 1);                                            /* gray stays as it is */
    cr_expect(g[0] == 7 && g[1] == 250);
}

Test(views, brightness_contrast_saturation_factors) {
    /* brightness f: trunc(f v), clipped: 1.5*100 = 150; 1.5*200 = 300 -> 255; 0.5*101 = 50.5 -> 50 */
    uint8_t b[3] = {100, 200, 101};
    excb_adjust_brightness(b, 1, 3, 1.5);
    cr_expect(b[0] == 150 && b[1] == 255 && b[2] == 151, "%d %d %d", b[0], b[1], b[2]);   /* 1.5*101 = 151.5 */
    uint8_t b2[1] = {101};
    excb_adjust_brightness(b2, 1, 1, 0.5);
    cr_expect_eq(b2[0], 50);
    /* contrast on gray [0, 100, 200]: mean 100 -> int(100 + 0.5) = 100; f = 2: 100 + 2 (v - 100) =
       -100 -> 0, 100, 300 -> 255; f = 0.5: 50, 100, 150 */
    uint8_t c[3] = {0, 100, 200};
    excb_adjust_contrast(c, 3, 1, 2.0);
    cr_expect(c[0] == 0 && c[1] == 100 && c[2] == 255, "%d %d %d", c[0], c[1], c[2]);
    uint8_t c2[3] = {0, 100, 200};
    excb_adjust_contrast(c2, 3, 1, 0.5);
    cr_expect(c2[0] == 50 && c2[1] == 100 && c2[2] == 150, "%d %d %d", c2[0], c2[1], c2[2]);
    /* saturation on (200, 100, 0): luma (3919000 + 3847000 + 0 + 32768) >> 16 = 7798768 >> 16 = 118;
       f = 0 gives (118, 118, 118); f = 2: 118 + 2*82 = 282 -> 255, 118 - 36 = 82, 118 - 236 -> 0 */
    uint8_t s[3] = {200, 100, 0};
    excb_adjust_saturation(s, 1, 3, 0.0);
    cr_expect(s[0] == 118 && s[1] == 118 && s[2] == 118, "%d %d %d", s[0], s[1], s[2]);
    uint8_t s2[3] = {200, 100, 0};
    excb_adjust_saturation(s2, 1, 3, 2.0);
    cr_expect(s2[0] == 255 && s2[1] == 82 && s2[2] == 0, "%d %d %d", s2[0], s2[1], s2[2]);
}

Test(views, hue_shift_of_pure_red) {
    /* red (255, 0, 0) is HSV (0, 255, 255). f = 0.1 shifts H by uint8(25.5) = 25: i = floor(150/255) = 0,
       frac = 150/255, t = round(255 (1 - (1 - 150/255))) = 150, p = 0 -> (V, t, p) = (255, 150, 0).
       f = -0.1: uint8(-25.5) = (-25) mod 256 = 231: i = floor(1386/255) = 5, frac = 1386/255 - 5 =
       0.4353, p = 0, q = round(255 (1 - 0.4353)) = 144 -> case 5 (V, p, q) = (255, 0, 144). */
    uint8_t r[3] = {255, 0, 0};
    excb_adjust_hue(r, 1, 3, 0.1);
    cr_expect(r[0] == 255 && r[1] == 150 && r[2] == 0, "%d %d %d", r[0], r[1], r[2]);
    uint8_t r2[3] = {255, 0, 0};
    excb_adjust_hue(r2, 1, 3, -0.1);
    cr_expect(r2[0] == 255 && r2[1] == 0 && r2[2] == 144, "%d %d %d", r2[0], r2[1], r2[2]);
    uint8_t g[3] = {90, 90, 90};                                       /* no saturation: unchanged */
    excb_adjust_hue(g, 1, 3, 0.07);
    cr_expect(g[0] == 90 && g[1] == 90 && g[2] == 90);
}

Test(views, blur_kernel_weights) {
    /* sigma 1, size 3: exp(-1/2) = 0.60653066; sum 2.21306132; weights 0.27406862, 0.45186276 */
    double k[9];
    excb_blur_kernel(k, 3, 1.0);
    EXPECT_NEAR(k[0], 0.27406862, 1e-8, "k[0]");
    EXPECT_NEAR(k[1], 0.45186276, 1e-8, "k[1]");
    EXPECT_NEAR(k[2], 0.27406862, 1e-8, "k[2]");
    /* sigma 1, size 9: sum_{x=-4..4} exp(-x^2/2) = 1 + 2 (0.60653066 + 0.13533528 + 0.01110900
       + 0.00033546) = 2.50662081, so the centre is 1/2.50662081 = 0.39894347 (not 1/sqrt(2 pi):
       the kernel is cut at +-4) and the edge 0.00033546263/2.50662081 = 0.00013383063 */
    excb_blur_kernel(k, 9, 1.0);
    EXPECT_NEAR(k[4], 0.39894347, 1e-8, "centre");
    EXPECT_NEAR(k[0], 0.00013383063, 1e-11, "edge");
    /* an impulse of 255 at the centre of a 9x9 image becomes 255 k[i] k[j], rounded */
    uint8_t img[81] = {0};
    float tmp[81];
    img[40] = 255;
    excb_gaussian_blur(img, 9, 9, 1, 9, 1.0, tmp);
    cr_expect_eq(img[40], (int)nearbyint(255 * k[4] * k[4]), "centre %d", img[40]);     /* 40.58 -> 41 */
    cr_expect_eq(img[41], (int)nearbyint(255 * k[4] * k[5]), "neighbour %d", img[41]);  /* 24.61 -> 25 */
    uint8_t flat[64];
    memset(flat, 77, 64);
    excb_gaussian_blur(flat, 8, 8, 1, 9, 1.7, tmp);
    for (int i = 0; i < 64; i++) cr_expect_eq(flat[i], 77, "a flat image stays flat");
}

Test(views, flip_and_normalise_in_make_view) {
    /* a 1-channel 4x4 image, crop = the whole image at its own size (no resampling), flip only:
       out(y, x) = (v(y, 3 - x) / 255 - mean) / std, in float as torchvision does */
    ExcbViewConfig vc = default_vc(EXCB_BLUR_AS_RUN);
    vc.n_global = 1; vc.n_local = 0; vc.global_size = 4; vc.channels = 1;
    vc.mean[0] = 0.5f; vc.std[0] = 0.25f;
    uint8_t px[16];
    for (int i = 0; i < 16; i++) px[i] = (uint8_t)(i * 17);
    ExcbImage img = {.px = px, .h = 4, .w = 4, .c = 1};
    ExcbViewParams p = {.top = 0, .left = 0, .h = 4, .w = 4, .flip = 1};
    ExcbViewScratch scr = {0};
    real out[16];
    excb_make_view(&vc, &p, &img, 0, out, &scr);
    for (int y = 0; y < 4; y++)
        for (int x = 0; x < 4; x++) {
            float want = ((float)px[y * 4 + 3 - x] / 255.0f - 0.5f) / 0.25f;      /* e.g. 51 -> -1.2 */
            cr_expect_eq(out[y * 4 + x], want, "(%d,%d): %g vs %g", y, x, out[y * 4 + x], want);
        }
    EXPECT_NEAR(out[0], (51 / 255.0 - 0.5) / 0.25, 1e-6, "pixel (0,0) is source (0,3) = 51");
    free(scr.a); free(scr.b); free(scr.f);
}

/* ---- against PIL / torchvision ------------------------------------------------------------------- */
enum { OP_RESIZE = 1, OP_BRIGHTNESS, OP_CONTRAST, OP_SATURATION, OP_HUE, OP_GRAY, OP_SOLARIZE, OP_BLUR, OP_CMYK, OP_DECODE,
       OP_PIPELINE };

typedef struct { uint32_t h, w, c; uint8_t *px; } GImg;

static int read_gimg(FILE *f, GImg *g) {
    if (fread(&g->h, 4, 1, f) != 1 || fread(&g->w, 4, 1, f) != 1 || fread(&g->c, 4, 1, f) != 1) return -1;
    size_t n = (size_t)g->h * g->w * g->c;
    g->px = malloc(n + 1);
    return fread(g->px, 1, n, f) == n ? 0 : -1;
}

Test(views, operators_match_pil_bit_for_bit) {
    FILE *f = fopen("tests/reference/views_golden.bin", "rb");
    cr_assert(f, "tests/reference/views_golden.bin missing (make golden)");
    char magic[8];
    cr_assert_eq(fread(magic, 1, 8, f), 8);
    cr_assert_eq(memcmp(magic, "EXCBVIEW", 8), 0);
    int cases[12] = {0}, blur_off_by_one = 0;
    size_t blur_pixels = 0;
    uint32_t op;
    double param;
    while (fread(&op, 4, 1, f) == 1) {
        cr_assert_eq(fread(&param, 8, 1, f), 1);
        if (op == OP_PIPELINE) {
            /* a whole view: excb_make_view with the choices PIL/torchvision made, float output equal */
            uint32_t u[14];
            double d[5];
            float ms[6];
            GImg in;
            uint32_t dims[3];
            cr_assert(fread(u, 4, 14, f) == 14 && fread(d, 8, 5, f) == 5 && fread(ms, 4, 6, f) == 6 && !read_gimg(f, &in)
                      && fread(dims, 4, 3, f) == 3, "truncated pipeline record");
            size_t n = (size_t)dims[0] * dims[1] * dims[2];
            float *want = malloc(sizeof(float) * n);
            cr_assert_eq(fread(want, 4, n, f), n);
            ExcbViewConfig vc = default_vc(EXCB_BLUR_AS_RUN);
            vc.n_global = 1; vc.n_local = 0; vc.global_size = (int)u[4]; vc.channels = (int)in.c;
            memcpy(vc.mean, ms, 3 * sizeof(float));
            memcpy(vc.std, ms + 3, 3 * sizeof(float));
            ExcbViewParams p = {.top = (int)u[0], .left = (int)u[1], .h = (int)u[2], .w = (int)u[3], .flip = (int)u[5],
                                .jitter = (int)u[6], .order = {(int)u[7], (int)u[8], (int)u[9], (int)u[10]},
                                .gray = (int)u[11], .blur = (int)u[12], .solarize = (int)u[13],
                                .brightness = d[0], .contrast = d[1], .saturation = d[2], .hue = d[3], .sigma = (float)d[4]};
            ExcbImage img = {.px = in.px, .h = (int)in.h, .w = (int)in.w, .c = (int)in.c};
            ExcbViewScratch scr = {0};
            real *got = malloc(sizeof(real) * n);
            excb_make_view(&vc, &p, &img, 0, got, &scr);
            size_t diff = 0;
            for (size_t i = 0; i < n; i++) diff += got[i] != want[i];
            cr_expect_eq(diff, 0, "pipeline case %d (%u channels, S %u, flip %u jitter %u gray %u blur %u solarize %u): "
                         "%zu of %zu values differ", cases[op], in.c, u[4], u[5], u[6], u[11], u[12], u[13], diff, n);
            cases[op]++;
            free(got); free(want); free(in.px); free(scr.a); free(scr.b); free(scr.f);
            continue;
        }
        uint32_t crop[4] = {0};
        if (op == OP_RESIZE) cr_assert_eq(fread(crop, 4, 4, f), 4);
        GImg in, want;
        cr_assert(!read_gimg(f, &in) && !read_gimg(f, &want), "truncated golden file");
        size_t npx = (size_t)in.h * in.w, nwant = (size_t)want.h * want.w * want.c;
        uint8_t *got = malloc(nwant + 16), *tmp = malloc((size_t)crop[2] * want.w * want.c + 16);
        char err[EXCB_ERR_LEN];
        switch (op) {
        case OP_RESIZE:
            excb_resize_bicubic(in.px + ((size_t)crop[0] * in.w + crop[1]) * in.c, (int)crop[2], (int)crop[3],
                                (int)(in.w * in.c), got, (int)want.h, (int)want.w, (int)in.c, tmp);
            break;
        case OP_BRIGHTNESS: memcpy(got, in.px, nwant); excb_adjust_brightness(got, npx, in.c, param); break;
        case OP_CONTRAST: memcpy(got, in.px, nwant); excb_adjust_contrast(got, npx, in.c, param); break;
        case OP_SATURATION: memcpy(got, in.px, nwant); excb_adjust_saturation(got, npx, in.c, param); break;
        case OP_HUE: memcpy(got, in.px, nwant); excb_adjust_hue(got, npx, in.c, param); break;
        case OP_GRAY: memcpy(got, in.px, nwant); excb_grayscale(got, npx, in.c); break;
        case OP_SOLARIZE: memcpy(got, in.px, nwant); excb_solarize(got, nwant, (int)param); break;
        case OP_BLUR: {
            float *ft = malloc(sizeof(float) * nwant);
            memcpy(got, in.px, nwant);
            excb_gaussian_blur(got, in.h, in.w, in.c, 9, (float)param, ft);
            free(ft);
            break;
        }
        case OP_CMYK: {
            /* through the JPEG path's converter: a 1-row "decode" is not possible, so compare the
               formula on every pixel via a CMYK JPEG is left to OP_DECODE; here the bare rule */
            for (size_t i = 0; i < npx; i++)
                for (int ch = 0; ch < 3; ch++) {
                    int c = in.px[4 * i + ch], k = in.px[4 * i + 3], nk = 255 - k, t = c * nk + 128;
                    int v = nk - (((t >> 8) + t) >> 8);
                    got[3 * i + ch] = (uint8_t)(v < 0 ? 0 : v);
                }
            break;
        }
        case OP_DECODE: {
            ExcbImage img = {0};
            cr_assert_eq(excb_decode_image(in.px, in.w, "golden", &img, err), 0, "decode case %d: %s", cases[op], err);
            cr_assert(img.h == (int)want.h && img.w == (int)want.w && img.c == 3, "decode case %d: size", cases[op]);
            memcpy(got, img.px, nwant);
            excb_image_free(&img);
            break;
        }
        default: cr_assert_fail("unknown golden op %u", op);
        }
        size_t diff = 0;
        int worst = 0;
        for (size_t i = 0; i < nwant; i++) {
            int d = abs(got[i] - want.px[i]);
            diff += d != 0;
            if (d > worst) worst = d;
        }
        if (op == OP_BLUR) {
            /* torchvision convolves in float32 with a 2-D kernel, excb separably in double; a result
               within float32 rounding of .5 could round the other way (1 level). On the committed
               fixture none does, so the count must stay 0; a regenerated fixture may need 1. */
            cr_expect(worst <= 1, "blur sigma %g: a pixel off by %d", param, worst);
            blur_off_by_one += (int)diff;
            blur_pixels += nwant;
        } else {
            cr_expect_eq(diff, 0, "op %u case %d (param %g): %zu of %zu values differ from PIL, worst by %d",
                         op, cases[op], param, diff, nwant, worst);
        }
        cases[op]++;
        free(got); free(tmp); free(in.px); free(want.px);
    }
    fclose(f);
    cr_expect_eq(blur_off_by_one, 0, "blur: %d of %zu values off by one", blur_off_by_one, blur_pixels);
    cr_log_info("golden: %d resize, %d brightness, %d contrast, %d saturation, %d hue, %d gray, %d solarize, "
                "%d blur (%d of %zu values off by one), %d CMYK, %d decode, %d whole-view cases",
                cases[1], cases[2], cases[3], cases[4], cases[5], cases[6], cases[7], cases[8],
                blur_off_by_one, blur_pixels, cases[9], cases[10], cases[11]);
    for (int op = 1; op <= 11; op++) cr_expect(cases[op] > 0, "no golden case for op %d", op);
}

/* ---- the random choices ----------------------------------------------------------------------- */
/* |count/n - p| <= 5 sqrt(p (1 - p) / n): a fixed-seed draw, so the test is deterministic; 5 sigma
   keeps a correct generator's chance of failing below 1e-6 per check */
static void expect_rate(long count, long n, double p, const char *what) {
    double rate = (double)count / n, bound = 5 * sqrt(p * (1 - p) / n);
    cr_expect(fabs(rate - p) <= bound, "%s: rate %.5f, want %.3f +- %.5f", what, rate, p, bound);
}

Test(views, probabilities_match_the_recipe) {
    enum { N = 20000 };
    for (int mode = 0; mode < 2; mode++) {
        ExcbViewConfig vc = default_vc(mode);
        long flip[3] = {0}, jitter[3] = {0}, gray[3] = {0}, blur[3] = {0}, sol[3] = {0}, n[3] = {0};
        long order_count[24] = {0};
        double bmin = 9, bmax = -9, hmin = 9, hmax = -9, smin = 9, smax = -9, bsum = 0;
        for (long s = 0; s < N; s++)
            for (int v = 0; v < 8; v++) {
                ExcbViewParams p;
                excb_view_params(&vc, 3, s, v, 64, 48, &p);
                int w = v >= 2 ? 2 : v;
                n[w]++;
                flip[w] += p.flip; jitter[w] += p.jitter; gray[w] += p.gray; blur[w] += p.blur; sol[w] += p.solarize;
                int code = 0, used = 0;                            /* Lehmer code of the order */
                for (int i = 0; i < 4; i++) {
                    int smaller = 0;
                    for (int j = 0; j < p.order[i]; j++) smaller += !(used >> j & 1);
                    code = code * (4 - i) + smaller;
                    used |= 1 << p.order[i];
                }
                order_count[code]++;
                bmin = fmin(bmin, p.brightness); bmax = fmax(bmax, p.brightness); bsum += p.brightness;
                hmin = fmin(hmin, p.hue); hmax = fmax(hmax, p.hue);
                smin = fmin(smin, p.sigma); smax = fmax(smax, p.sigma);
            }
        const double p_blur_run[3] = {0.0, 0.9, 0.0}, p_blur_conf[3] = {1.0, 0.1, 0.5}, p_sol[3] = {0, 0.2, 0};
        const char *names[3] = {"global view 1", "global view 2", "local views"};
        for (int w = 0; w < 3; w++) {
            char what[128];
            snprintf(what, sizeof what, "%s flip", names[w]); expect_rate(flip[w], n[w], 0.5, what);
            snprintf(what, sizeof what, "%s jitter", names[w]); expect_rate(jitter[w], n[w], 0.8, what);
            snprintf(what, sizeof what, "%s grayscale", names[w]); expect_rate(gray[w], n[w], 0.2, what);
            snprintf(what, sizeof what, "%s blur (%s)", names[w], mode ? "as-configured" : "as-run");
            expect_rate(blur[w], n[w], mode ? p_blur_conf[w] : p_blur_run[w], what);
            snprintf(what, sizeof what, "%s solarize", names[w]); expect_rate(sol[w], n[w], p_sol[w], what);
        }
        for (int i = 0; i < 24; i++) expect_rate(order_count[i], 8L * N, 1.0 / 24, "jitter order");
        cr_expect(bmin >= 0.6 && bmax < 1.4 && bmin < 0.601 && bmax > 1.399, "brightness in [%g, %g]", bmin, bmax);
        EXPECT_NEAR(bsum / (8.0 * N), 1.0, 5 * 0.8 / sqrt(12.0 * 8 * N), "brightness mean");
        cr_expect(hmin >= -0.1 && hmax < 0.1 && hmin < -0.0999 && hmax > 0.0999, "hue in [%g, %g]", hmin, hmax);
        cr_expect(smin >= 0.1 && smax < 2.0 && smin < 0.101 && smax > 1.999, "sigma in [%g, %g]", smin, smax);
    }
}

Test(views, random_resized_crop_scales_ratios_and_schedule) {
    /* global crops take (s_min(e), 1) of the area, local (0.05, s_min(e)); s_min(0) = 0.26 and
       s_min(E) = 0.14 (A11). Rounding the sides moves the area and ratio a little on a 200x160
       image: we allow +-3 % relative. */
    ExcbViewConfig vc = default_vc(EXCB_BLUR_AS_RUN);
    vc.epochs = 10;
    const int H = 200, W = 160;
    for (int e = 0; e <= 10; e += 10) {
        double s_min = e == 0 ? 0.26 : 0.14, lo[2] = {1, 1}, hi[2] = {0, 0};
        EXPECT_NEAR(crop_scale_min_at(e, 10), s_min, 1e-12, "s_min(%d)", e);
        for (long s = 0; s < 4000; s++)
            for (int v = 0; v < 8; v++) {
                ExcbViewParams p;
                excb_view_params(&vc, e, s, v, H, W, &p);
                cr_assert(p.top >= 0 && p.left >= 0 && p.top + p.h <= H && p.left + p.w <= W, "crop outside the image");
                double frac = (double)p.h * p.w / (H * W), ratio = (double)p.w / p.h;
                int local = v >= 2;
                lo[local] = fmin(lo[local], frac);
                hi[local] = fmax(hi[local], frac);
                cr_assert(ratio > 0.75 * 0.9 && ratio < 4.0 / 3.0 * 1.1, "ratio %g", ratio);
            }
        cr_expect(lo[0] >= s_min * 0.97 && lo[0] <= s_min * 1.05 && hi[0] > 0.95, "epoch %d global area in [%g, %g]", e, lo[0], hi[0]);
        cr_expect(lo[1] >= 0.05 * 0.97 && lo[1] < 0.06 && hi[1] <= s_min * 1.03 && hi[1] > s_min * 0.95,
                  "epoch %d local area in [%g, %g], want (0.05, %g)", e, lo[1], hi[1], s_min);
    }
    /* a 1 x 100 strip: no try fits, the fallback takes the centre with the ratio clamped to 4/3:
       h = 1, w = round(1 * 4/3) = 1, left = (100 - 1) / 2 = 49 */
    ExcbViewParams p;
    excb_view_params(&vc, 0, 0, 0, 1, 100, &p);
    cr_expect(p.h == 1 && p.w == 1 && p.top == 0 && p.left == 49, "fallback crop %d x %d at (%d, %d)", p.h, p.w, p.top, p.left);
}

Test(views, params_depend_only_on_seed_epoch_sample_view) {
    ExcbViewConfig vc = default_vc(EXCB_BLUR_AS_RUN);
    ExcbViewParams a, b;
    excb_view_params(&vc, 5, 1234, 3, 300, 400, &a);
    excb_view_params(&vc, 5, 1234, 3, 300, 400, &b);
    cr_expect_eq(memcmp(&a, &b, sizeof a), 0, "same key, same view");
    int differ = 0;
    for (int k = 0; k < 4; k++) {
        excb_view_params(&vc, 5 + (k == 0), 1234 + (k == 1), 3 + (k == 2), 300, 400, &b);
        if (k == 3) { vc.seed = 1; excb_view_params(&vc, 5, 1234, 3, 300, 400, &b); }
        differ += a.top != b.top || a.left != b.left || a.h != b.h || a.brightness != b.brightness;
    }
    cr_expect_eq(differ, 4, "epoch, sample, view and seed each change the view");
}

Test(views, permutation_is_a_permutation_per_epoch) {
    enum { N = 1000 };
    int64_t p0[N], p1[N], again[N];
    excb_permutation(p0, N, 0, 0);
    excb_permutation(p1, N, 0, 1);
    excb_permutation(again, N, 0, 0);
    cr_expect_eq(memcmp(p0, again, sizeof p0), 0, "deterministic");
    char seen[N] = {0};
    int fixed = 0, same = 0;
    for (int i = 0; i < N; i++) { seen[p0[i]]++; fixed += p0[i] == i; same += p0[i] == p1[i]; }
    for (int i = 0; i < N; i++) cr_assert_eq(seen[i], 1, "index %d appears %d times", i, seen[i]);
    /* a uniform permutation has 1 fixed point on average (Poisson(1)); two epochs agree at ~1 place */
    cr_expect(fixed < 8 && same < 8, "fixed points %d, agreements between epochs %d", fixed, same);
}

/* ---- the loader ------------------------------------------------------------------------------------ */
/* an in-memory IDX-like data set of n images of 20 x 20 gray pixels */
static void fake_dataset(ExcbDataset *ds, uint8_t *pixels, int32_t *labels, long n) {
    memset(ds, 0, sizeof *ds);
    ds->kind = EXCB_DATA_IDX;
    snprintf(ds->path, sizeof ds->path, "fake");
    ds->n = n; ds->channels = 1; ds->height = 20; ds->width = 20; ds->layout = EXCB_LAYOUT_HWC;
    ds->n_classes = 10; ds->labels = labels;
    for (long i = 0; i < n * 400; i++) pixels[i] = (uint8_t)(excb_hash(1, 2, 3, 4, (uint64_t)i) & 255);
    for (long i = 0; i < n; i++) labels[i] = (int32_t)(i % 10);
    ds->n_parts = 1;
    ds->parts[0] = (ExcbDataPart){.base = pixels, .n = n, .record = 400};
}

static ExcbViewConfig small_vc(void) {
    ExcbViewConfig vc = default_vc(EXCB_BLUR_AS_CONFIGURED);
    vc.global_size = 12; vc.local_size = 6; vc.channels = 1; vc.epochs = 4; vc.seed = 42;
    return vc;
}

/* batches first..first+count-1 made with `workers` threads, copied out (xg then xl per batch) */
static real *run_loader(ExcbDataset *ds, int workers, long first, int count, size_t *per_batch) {
    ExcbViewConfig vc = small_vc();
    ExcbLoader L;
    char err[EXCB_ERR_LEN];
    cr_assert_eq(excb_loader_open(&L, ds, &vc, 8, workers, first, err), 0, "%s", err);
    size_t ng = 2 * 8 * 144, nl = 6 * 8 * 36;
    *per_batch = ng + nl;
    real *all = malloc(sizeof(real) * (ng + nl) * count);
    for (int b = 0; b < count; b++) {
        ExcbBatch *bt;
        cr_assert_eq(excb_loader_next(&L, &bt, err), 0, "%s", err);
        cr_assert_eq(bt->id, first + b);
        memcpy(all + b * (ng + nl), bt->xg, sizeof(real) * ng);
        memcpy(all + b * (ng + nl) + ng, bt->xl, sizeof(real) * nl);
    }
    excb_loader_close(&L);
    return all;
}

Test(views, loader_is_deterministic_across_workers_and_resume) {
    enum { N = 50 };                                   /* 6 batches of 8 per epoch: 2 dropped (drop_last) */
    static uint8_t pixels[N * 400];
    int32_t labels[N];
    ExcbDataset ds;
    fake_dataset(&ds, pixels, labels, N);
    size_t per;
    real *serial = run_loader(&ds, 0, 0, 14, &per);          /* 14 batches: into the third epoch */
    real *two = run_loader(&ds, 2, 0, 14, &per);
    real *three = run_loader(&ds, 3, 0, 14, &per);
    real *resumed = run_loader(&ds, 2, 9, 5, &per);           /* resume at batch 9 (epoch 1, step 3) */
    cr_expect_eq(memcmp(serial, two, sizeof(real) * per * 14), 0, "2 workers differ from 0");
    cr_expect_eq(memcmp(serial, three, sizeof(real) * per * 14), 0, "3 workers differ from 0");
    cr_expect_eq(memcmp(serial + 9 * per, resumed, sizeof(real) * per * 5), 0, "resumed batches differ");
    cr_expect_neq(memcmp(serial, serial + 6 * per, sizeof(real) * per), 0, "epoch 1 repeats epoch 0");
    free(serial); free(two); free(three); free(resumed);
}

Test(views, loader_covers_each_image_once_per_epoch) {
    enum { N = 50, B = 8 };
    static uint8_t pixels[N * 400];
    int32_t labels[N];
    ExcbDataset ds;
    fake_dataset(&ds, pixels, labels, N);
    ExcbViewConfig vc = small_vc();
    ExcbLoader L;
    char err[EXCB_ERR_LEN];
    cr_assert_eq(excb_loader_open(&L, &ds, &vc, B, 2, 0, err), 0, "%s", err);
    cr_expect_eq(L.batches_per_epoch, 6);
    int seen[N] = {0};
    for (int b = 0; b < 6; b++) {
        ExcbBatch *bt;
        cr_assert_eq(excb_loader_next(&L, &bt, err), 0);
        cr_expect_eq(bt->epoch, 0);
        for (int i = 0; i < B; i++) {
            seen[bt->index[i]]++;
            cr_expect_eq(bt->labels[i], labels[bt->index[i]]);
        }
    }
    int once = 0, twice = 0;
    for (int i = 0; i < N; i++) { once += seen[i] == 1; twice += seen[i] > 1; }
    cr_expect(once == 48 && twice == 0, "48 images once, 2 dropped: %d once, %d more than once", once, twice);
    excb_loader_close(&L);
}

Test(views, loader_refuses_a_channel_mismatch) {
    /* the views are made for the model's channel count; data with another count is refused up front
       (the error path of a worker, a bad file mid-epoch, is tested end to end in test_data) */
    enum { N = 20 };
    static uint8_t pixels[N * 400];
    int32_t labels[N];
    ExcbDataset ds;
    fake_dataset(&ds, pixels, labels, N);
    ExcbViewConfig vc = small_vc();
    vc.channels = 3;
    ExcbLoader L;
    char err[EXCB_ERR_LEN] = "";
    cr_expect_eq(excb_loader_open(&L, &ds, &vc, 4, 2, 0, err), 65);
    cr_expect(strstr(err, "fake") && strstr(err, "1 channel(s)"), "%s", err);
}

/* Pillow's Convert.c rgb2hsv / hsv2rgb transcribed literally (fmod, round), for an exhaustive check
   of excb_adjust_hue's faster but equal arithmetic on all 2^24 colours */
static void pil_hue_reference(uint8_t *px, uint8_t shift) {
    int r = px[0], g = px[1], b = px[2];
    int maxc = r > g ? (r > b ? r : b) : (g > b ? g : b), minc = r < g ? (r < b ? r : b) : (g < b ? g : b);
    uint8_t uh, us, uv = (uint8_t)maxc;
    if (minc == maxc) { uh = 0; us = 0; }
    else {
        float cr = (float)(maxc - minc), s = cr / (float)maxc, h;
        float rc = ((float)(maxc - r)) / cr, gc = ((float)(maxc - g)) / cr, bc = ((float)(maxc - b)) / cr;
        if (r == maxc) h = bc - gc;
        else if (g == maxc) h = 2.0 + rc - bc;
        else h = 4.0 + gc - rc;
        h = fmod((h / 6.0 + 1.0), 1.0);
        int ih = (int)(h * 255.0), is = (int)(s * 255.0);
        uh = (uint8_t)(ih < 0 ? 0 : ih > 255 ? 255 : ih);
        us = (uint8_t)(is < 0 ? 0 : is > 255 ? 255 : is);
    }
    uh = (uint8_t)(uh + shift);
    if (us == 0) { px[0] = px[1] = px[2] = uv; return; }
    int i = floor((float)uh * 6.0 / 255.0);
    float f = (float)uh * 6.0 / 255.0 - (float)i, fs = ((float)us) / 255.0;
    int p = round((float)uv * (1.0 - fs)), q = round((float)uv * (1.0 - fs * f)), t = round((float)uv * (1.0 - fs * (1.0 - f)));
    uint8_t up = (uint8_t)(p < 0 ? 0 : p > 255 ? 255 : p), uq = (uint8_t)(q < 0 ? 0 : q > 255 ? 255 : q),
            ut = (uint8_t)(t < 0 ? 0 : t > 255 ? 255 : t);
    const uint8_t out[6][3] = {{uv, ut, up}, {uq, uv, up}, {up, uv, ut}, {up, uq, uv}, {ut, up, uv}, {uv, up, uq}};
    memcpy(px, out[i % 6], 3);
}

Test(views, hue_equals_pil_formulas_on_every_colour) {
    const double f = 0.07;                                       /* shift uint8(17.85) = 17 */
    uint8_t *img = malloc(3u << 24), *ref = malloc(3u << 24);
    for (uint32_t c = 0; c < (1u << 24); c++) { img[3 * c] = c >> 16; img[3 * c + 1] = c >> 8; img[3 * c + 2] = c; }
    memcpy(ref, img, 3u << 24);
    excb_adjust_hue(img, 1u << 24, 3, f);
    long bad = 0;
    for (uint32_t c = 0; c < (1u << 24); c++) {
        pil_hue_reference(ref + 3 * c, 17);
        bad += memcmp(img + 3 * c, ref + 3 * c, 3) != 0;
    }
    cr_expect_eq(bad, 0, "%ld of 16777216 colours differ from the literal PIL formulas", bad);
    free(img);
    free(ref);
}

Test(views, tiny_and_extreme_images_make_finite_views) {
    /* 1x1, strips, and tiny images through every operator (jitter, gray, blur with sigma up to 2 and
       reflect padding wider than the image, solarize), both channel counts; under ASan in CI */
    const int sizes[][2] = {{1, 1}, {1, 300}, {300, 1}, {2, 3}, {5, 5}, {97, 13}};
    for (int c = 1; c <= 3; c += 2)
        for (size_t k = 0; k < sizeof sizes / sizeof *sizes; k++) {
            int H = sizes[k][0], W = sizes[k][1];
            uint8_t *px = malloc((size_t)H * W * c);
            for (int i = 0; i < H * W * c; i++) px[i] = (uint8_t)(i * 41 + 7);
            ExcbImage img = {.px = px, .h = H, .w = W, .c = c};
            ExcbViewConfig vc = default_vc(EXCB_BLUR_AS_CONFIGURED);
            vc.global_size = 20; vc.local_size = 7; vc.channels = c;
            vc.p_jitter = vc.p_gray = 1; vc.p_blur[0] = vc.p_blur[1] = vc.p_blur[2] = 1; vc.p_solarize[1] = 1;
            ExcbViewScratch scr = {0};
            real out[3 * 20 * 20];
            for (int v = 0; v < 8; v++) {
                ExcbViewParams p;
                excb_view_params(&vc, 1, (long)k, v, H, W, &p);
                cr_assert(p.h >= 1 && p.w >= 1 && p.top + p.h <= H && p.left + p.w <= W, "%dx%d: crop %dx%d at (%d,%d)", H, W, p.h, p.w, p.top, p.left);
                excb_make_view(&vc, &p, &img, v, out, &scr);
                int S = v < 2 ? 20 : 7, bad = 0;
                for (int i = 0; i < c * S * S; i++) bad += !isfinite(out[i]) || fabs(out[i]) > 5;
                cr_expect_eq(bad, 0, "%dx%dx%d view %d: %d values out of range", H, W, c, v, bad);
            }
            free(scr.a); free(scr.b); free(scr.f); free(px);
        }
}
