#!/usr/bin/python3
"""The official view pipeline as torchvision runs it on PIL images (transforms.py L84-103), re-built
from PIL and torch calls because torchvision is not packaged here: pil_loader, RandomResizedCrop
(bicubic), flip, ColorJitter(0.4, 0.4, 0.2, 0.1) p 0.8 in random order, RandomGrayscale 0.2, the
as-run blur (0 / 0.9 / 0; kernel 9, float32 conv2d as torchvision), solarize 0.2 on view 2,
ToTensor + Normalize. One process, one thread: the per-worker peer of `excb bench-data`.

    /usr/bin/python3 bench/pil_views.py DIR [SECONDS] [GLOBAL LOCAL NLOCAL]
"""
import math
import os
import random
import sys
import time

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps

torch.set_num_threads(1)
root = sys.argv[1]
seconds = float(sys.argv[2]) if len(sys.argv) > 2 else 20
G, L, NL = (int(x) for x in sys.argv[3:6]) if len(sys.argv) > 5 else (224, 96, 6)
files = sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs)
mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
std = torch.tensor([0.228, 0.224, 0.225])[:, None, None]


def rrc(img, size, scale):
    W, H = img.size
    area = W * H
    for _ in range(10):
        target = area * random.uniform(*scale)
        ratio = math.exp(random.uniform(math.log(3 / 4), math.log(4 / 3)))
        w, h = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < w <= W and 0 < h <= H:
            i, j = random.randint(0, H - h), random.randint(0, W - w)
            return img.crop((j, i, j + w, i + h)).resize((size, size), Image.BICUBIC)
    return img.resize((size, size), Image.BICUBIC)


def hue(img, f):
    h, s, v = img.convert("HSV").split()
    np_h = np.array(h, dtype=np.uint8)
    np_h += np.array(f * 255).astype(np.uint8)
    return Image.merge("HSV", (Image.fromarray(np_h, "L"), s, v)).convert("RGB")


def blur(img, sigma, k=9):
    x = torch.linspace(-4, 4, k)
    pdf = torch.exp(-0.5 * (x / sigma) ** 2)
    k1 = pdf / pdf.sum()
    k2 = torch.outer(k1, k1).expand(3, 1, k, k)
    t = torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].float()
    t = torch.nn.functional.conv2d(torch.nn.functional.pad(t, [4] * 4, mode="reflect"), k2, groups=3)
    return Image.fromarray(torch.round(t)[0].permute(1, 2, 0).to(torch.uint8).numpy())


def view(img, size, scale, p_blur, p_sol):
    img = rrc(img, size, scale)
    if random.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    if random.random() < 0.8:
        for o in torch.randperm(4).tolist():
            if o == 0: img = ImageEnhance.Brightness(img).enhance(random.uniform(0.6, 1.4))
            elif o == 1: img = ImageEnhance.Contrast(img).enhance(random.uniform(0.6, 1.4))
            elif o == 2: img = ImageEnhance.Color(img).enhance(random.uniform(0.8, 1.2))
            else: img = hue(img, random.uniform(-0.1, 0.1))
    if random.random() < 0.2:
        img = img.convert("L").convert("RGB")
    if random.random() < p_blur:
        img = blur(img, random.uniform(0.1, 2.0))
    if random.random() < p_sol:
        img = ImageOps.solarize(img, 128)
    t = torch.from_numpy(np.array(img)).permute(2, 0, 1).float().div(255)
    return t.sub(mean).div(std)


random.seed(0)
n = 0
t0 = time.time()
while time.time() - t0 < seconds:
    img = Image.open(files[n % len(files)]).convert("RGB")
    views = [view(img, G, (0.26, 1), 0.0, 0.0), view(img, G, (0.26, 1), 0.9, 0.2)]
    views += [view(img, L, (0.05, 0.26), 0.0, 0.0) for _ in range(NL)]
    n += 1
dt = time.time() - t0
print(f"PIL/torch views, 1 thread: {n * (2 + NL) / dt:.0f} views/s ({n / dt:.1f} images/s, {n} images in {dt:.1f} s)")
