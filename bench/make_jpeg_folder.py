#!/usr/bin/python3
"""An ImageNet-style JPEG folder for `make bench-data`: CLASSES sub-folders of IMAGES photographs-like
JPEGs each. Sizes and file sizes follow ImageNet-1k's train set roughly (typical 500 x 375, about
110 KB at quality 90): smooth colour fields, edges and sensor-like noise, so that the decoder does the
work it does on photographs (white noise would be slower, flat colour faster). Deterministic.

    /usr/bin/python3 bench/make_jpeg_folder.py /tmp/excb_jpeg_folder [CLASSES IMAGES]
"""
import os
import sys

import numpy as np
from PIL import Image

out = sys.argv[1] if len(sys.argv) > 1 else "/tmp/excb_jpeg_folder"
classes = int(sys.argv[2]) if len(sys.argv) > 2 else 10
images = int(sys.argv[3]) if len(sys.argv) > 3 else 50
rng = np.random.default_rng(0)
sizes = [(500, 375), (375, 500), (500, 333), (500, 500), (640, 480), (400, 300)]
total = 0
for c in range(classes):
    d = os.path.join(out, f"n{c:08d}")
    os.makedirs(d, exist_ok=True)
    for i in range(images):
        w, h = sizes[rng.integers(len(sizes))]
        small = rng.uniform(0, 255, (h // 25 + 2, w // 25 + 2, 3)).astype(np.uint8)
        base = np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC), dtype=np.float64)
        blocks = rng.uniform(-60, 60, (h // 60 + 1, w // 60 + 1, 3)).repeat(60, 0).repeat(60, 1)[:h, :w]
        img = np.clip(base + blocks + rng.normal(0, 18, (h, w, 3)), 0, 255).astype(np.uint8)
        path = os.path.join(d, f"n{c:08d}_{i}.JPEG")
        Image.fromarray(img).save(path, "JPEG", quality=90)
        total += os.path.getsize(path)
print(f"{out}: {classes * images} JPEGs, mean {total / (classes * images) / 1024:.0f} KiB")
