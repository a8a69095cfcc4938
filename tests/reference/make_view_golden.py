#!/usr/bin/python3
"""Golden outputs of the view operators and decoders, computed the way the official code computes
them: torchvision's transforms on PIL images (Pillow 9.4, Debian 12), torchvision's Gaussian blur
re-implemented with torch exactly as torchvision.transforms.functional.gaussian_blur does it.

    /usr/bin/python3 tests/reference/make_view_golden.py   ->  tests/reference/views_golden.bin

Run by `make golden`; CI never runs it (it needs python3-pil, python3-numpy and python3-torch). The
C test suite tests/test_views.c reads the file and checks excb's operators against it.

File format (little-endian): b"EXCBVIEW" then records until the end of the file:
  u32 op, f64 param, u32 in_h, in_w, in_c, in bytes, u32 out_h, out_w, out_c, out bytes,
  and for ops with a crop: u32 top, left, h, w before the input bytes (RESIZE only).
Input and output pixels are interleaved (H, W, C) uint8.
PIPELINE records (a whole view with given random choices, official order, normalised floats):
  u32 op, f64 0, u32 top, left, h, w, S, flip, jitter, order[4], gray, blur, solarize,
  f64 brightness, contrast, saturation, hue, sigma, f32 mean[3], std[3], the input image as above,
  then u32 C, S, S and C*S*S float32 values (planes).
"""
import io
import struct
import sys

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps

OP_RESIZE, OP_BRIGHTNESS, OP_CONTRAST, OP_SATURATION, OP_HUE, OP_GRAY, OP_SOLARIZE, OP_BLUR, \
    OP_CMYK, OP_DECODE, OP_PIPELINE = range(1, 12)

rng = np.random.default_rng(20241122)
out = io.BytesIO()
out.write(b"EXCBVIEW")


def mode_of(c):
    return "L" if c == 1 else "RGB"


def to_array(img):
    a = np.asarray(img, dtype=np.uint8)
    return a if a.ndim == 3 else a[:, :, None]


def record(op, param, inp, outp, crop=None):
    out.write(struct.pack("<Id", op, float(param)))
    if crop is not None:
        out.write(struct.pack("<4I", *crop))
    for a in (inp, outp):
        h, w, c = a.shape
        out.write(struct.pack("<3I", h, w, c))
        out.write(np.ascontiguousarray(a, dtype=np.uint8).tobytes())


def natural(h, w, c):
    """a smooth random image plus noise: edges and flat areas, like photographs, unlike white noise"""
    y, x = np.mgrid[0:h, 0:w]
    a = np.zeros((h, w, c))
    for ch in range(c):
        f = rng.uniform(0.02, 0.3, 2)
        a[:, :, ch] = 128 + 90 * np.sin(f[0] * x + rng.uniform(0, 6)) * np.cos(f[1] * y + rng.uniform(0, 6))
    a += rng.normal(0, 12, a.shape)
    a[rng.random((h, w)) < 0.02] = 255                      # saturated specks test the clipping
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


def pil(a):
    return Image.fromarray(a[:, :, 0] if a.shape[2] == 1 else a, mode_of(a.shape[2]))


# RandomResizedCrop's resize: crop then resize to S x S, bicubic (shrinking, enlarging, one side equal)
for (H, W, c, top, left, h, w, S) in [(40, 50, 3, 3, 5, 30, 41, 16), (28, 28, 1, 2, 0, 11, 14, 28),
                                      (28, 28, 1, 0, 0, 28, 28, 12), (30, 20, 3, 0, 0, 30, 20, 100),
                                      (150, 110, 3, 10, 7, 130, 100, 40), (30, 30, 3, 4, 4, 20, 9, 20),
                                      (17, 23, 1, 0, 3, 17, 17, 17), (9, 9, 3, 1, 1, 5, 7, 96)]:
    a = natural(H, W, c)
    r = pil(a).crop((left, top, left + w, top + h)).resize((S, S), Image.BICUBIC)
    record(OP_RESIZE, 0, a, to_array(r), (top, left, h, w))

# ColorJitter's four operators (torchvision.transforms.functional on PIL images)
for c in (3, 1):
    for f in (0.6, 0.93, 1.0, 1.27, 1.4):
        a = natural(19, 23, c)
        record(OP_BRIGHTNESS, f, a, to_array(ImageEnhance.Brightness(pil(a)).enhance(f)))
        a = natural(19, 23, c)
        record(OP_CONTRAST, f, a, to_array(ImageEnhance.Contrast(pil(a)).enhance(f)))
for f in (0.8, 0.95, 1.13, 1.2):
    a = natural(19, 23, 3)
    record(OP_SATURATION, f, a, to_array(ImageEnhance.Color(pil(a)).enhance(f)))
for f in (-0.1, -0.05, -0.001, 0.0, 0.02, 0.0999):
    a = natural(21, 17, 3)
    img = pil(a)
    h, s, v = img.convert("HSV").split()
    np_h = np.array(h, dtype=np.uint8)
    np_h += np.array(f * 255).astype(np.uint8)              # torchvision adjust_hue, PIL branch
    r = Image.merge("HSV", (Image.fromarray(np_h, "L"), s, v)).convert("RGB")
    record(OP_HUE, f, a, to_array(r))

# RandomGrayscale (num_output_channels = 3) and Solarization (threshold 128)
a = natural(16, 16, 3)
g = np.asarray(pil(a).convert("L"))
record(OP_GRAY, 0, a, np.dstack([g, g, g]))
for c in (3, 1):
    a = natural(16, 16, c)
    record(OP_SOLARIZE, 128, a, to_array(ImageOps.solarize(pil(a), 128)))


# torchvision's GaussianBlur(kernel_size=9, sigma): float32 2-D convolution, reflect padding, round
def tv_blur(a, sigma, k=9):
    half = (k - 1) * 0.5
    x = torch.linspace(-half, half, steps=k)
    pdf = torch.exp(-0.5 * (x / sigma).pow(2))
    k1 = pdf / pdf.sum()
    k2 = torch.mm(k1[:, None], k1[None, :])
    t = torch.from_numpy(a.copy()).permute(2, 0, 1)[None].to(torch.float32)
    c = t.shape[1]
    t = torch.nn.functional.pad(t, [k // 2] * 4, mode="reflect")
    t = torch.nn.functional.conv2d(t, k2.expand(c, 1, k, k), groups=c)
    return torch.round(t)[0].permute(1, 2, 0).to(torch.uint8).numpy()


for (H, W, c, sigma) in [(24, 24, 3, 0.1), (24, 24, 3, 0.73), (28, 28, 1, 1.5), (12, 12, 1, 2.0),
                         (40, 31, 3, 1.99)]:
    a = natural(H, W, c)
    record(OP_BLUR, sigma, a, tv_blur(a, torch.tensor(sigma, dtype=torch.float32).item()))

# Pillow's CMYK -> RGB conversion
a = rng.integers(0, 256, (8, 32, 4), dtype=np.uint8)
record(OP_CMYK, 0, a, to_array(Image.frombytes("CMYK", (32, 8), a.tobytes()).convert("RGB")))



# Whole views: the official order (transforms.py L84-103) with the random choices written down:
# RandomResizedCrop -> flip -> ColorJitter (in `order`) -> RandomGrayscale -> GaussianBlur ->
# Solarization -> ToTensor -> Normalize.
def tv_hue(img, f):
    if img.mode == "L":
        return img                                         # adjust_hue leaves L images alone
    h, s, v = img.convert("HSV").split()
    np_h = np.array(h, dtype=np.uint8)
    np_h += np.array(f * 255).astype(np.uint8)
    return Image.merge("HSV", (Image.fromarray(np_h, "L"), s, v)).convert("RGB")


def view(a, top, left, h, w, S, flip, jitter, order, gray, blur, solarize, fac, sigma, mean, std):
    img = pil(a).crop((left, top, left + w, top + h)).resize((S, S), Image.BICUBIC)
    if flip:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    if jitter:
        for o in order:
            if o == 0:
                img = ImageEnhance.Brightness(img).enhance(fac[0])
            elif o == 1:
                img = ImageEnhance.Contrast(img).enhance(fac[1])
            elif o == 2:
                img = ImageEnhance.Color(img).enhance(fac[2])
            else:
                img = tv_hue(img, fac[3])
    if gray and img.mode == "RGB":
        g = np.asarray(img.convert("L"))
        img = Image.fromarray(np.dstack([g, g, g]), "RGB")
    if blur:
        img = pil(tv_blur(to_array(img), torch.tensor(sigma, dtype=torch.float32).item()))
    if solarize:
        img = ImageOps.solarize(img, 128)
    t = torch.from_numpy(to_array(img).copy()).permute(2, 0, 1).to(torch.float32).div(255)
    c = t.shape[0]
    m = torch.tensor(mean[:c], dtype=torch.float32)[:, None, None]
    sd = torch.tensor(std[:c], dtype=torch.float32)[:, None, None]
    return t.sub(m).div(sd).numpy()


for k in range(10):
    c = 3 if k % 3 else 1
    H, W = (36, 30) if c == 3 else (28, 28)
    a = natural(H, W, c)
    S = [20, 12, 24, 16][k % 4]
    h = int(rng.integers(5, H + 1)); w = int(rng.integers(5, W + 1))
    top = int(rng.integers(0, H - h + 1)); left = int(rng.integers(0, W - w + 1))
    flip, jitter, gray, blur, solarize = (int(rng.random() < p) for p in (0.5, 0.8, 0.3, 0.6, 0.3))
    order = [int(x) for x in rng.permutation(4)]
    fac = [rng.uniform(0.6, 1.4), rng.uniform(0.6, 1.4), rng.uniform(0.8, 1.2), rng.uniform(-0.1, 0.1)]
    sigma = rng.uniform(0.1, 2.0)
    mean, std = [0.485, 0.456, 0.406], [0.228, 0.224, 0.225]
    if c == 1:
        mean, std = [0.459], [0.2253]
    out_f = view(a, top, left, h, w, S, flip, jitter, order, gray, blur, solarize, fac, sigma, mean, std)
    out.write(struct.pack("<Id", OP_PIPELINE, 0.0))
    out.write(struct.pack("<14I", top, left, h, w, S, flip, jitter, *order, gray, blur, solarize))
    out.write(struct.pack("<5d", *fac, sigma))
    out.write(struct.pack("<6f", *(mean + [0, 0])[:3], *(std + [1, 1])[:3]))
    out.write(struct.pack("<3I", H, W, c))
    out.write(a.tobytes())
    out.write(struct.pack("<3I", c, S, S))
    out.write(np.ascontiguousarray(out_f, dtype=np.float32).tobytes())

# Decoders: files written by PIL, decoded by PIL with .convert("RGB") (what ImageFolder does). The
# input record holds the file's bytes as a 1 x len x 1 "image".
def encoded(img, fmt, **kw):
    b = io.BytesIO()
    img.save(b, fmt, **kw)
    return np.frombuffer(b.getvalue(), dtype=np.uint8)


def decode_case(img, fmt, **kw):
    data = encoded(img, fmt, **kw)
    dec = Image.open(io.BytesIO(data.tobytes())).convert("RGB")
    record(OP_DECODE, 0, data.reshape(1, -1, 1), to_array(dec))


rgb = pil(natural(37, 45, 3))
decode_case(rgb, "JPEG", quality=90)                                     # 4:2:0 YCbCr
decode_case(rgb, "JPEG", quality=75, subsampling=0)                      # 4:4:4
decode_case(rgb, "JPEG", quality=85, progressive=True)
decode_case(pil(natural(20, 33, 1)), "JPEG", quality=90)                 # grayscale JPEG
decode_case(rgb.convert("CMYK"), "JPEG", quality=95)                     # Adobe CMYK JPEG
decode_case(rgb, "PNG")
decode_case(pil(natural(20, 33, 1)), "PNG")                              # gray
rgba = rgb.convert("RGBA")
rgba.putalpha(Image.fromarray(natural(37, 45, 1)[:, :, 0]))
decode_case(rgba, "PNG")                                                 # alpha is dropped, not blended
la = pil(natural(20, 33, 1)).convert("LA")
decode_case(la, "PNG")
pal = rgb.convert("P", palette=Image.ADAPTIVE, colors=50)
pal.info["transparency"] = 3
decode_case(pal, "PNG")                                                  # palette + tRNS

path = sys.argv[1] if len(sys.argv) > 1 else "tests/reference/views_golden.bin"
with open(path, "wb") as f:
    f.write(out.getvalue())
print(f"wrote {path}: {len(out.getvalue())} bytes")
