#!/usr/bin/env python3
"""A tiny synthetic IDX folder (4 classes of bars, 12x12, 64 training and 32 test images) for the
scripts in bench/ that need a data set of no size: python3 bench/make_tiny_idx.py DIR"""
import os, random, struct, sys

def write_idx(path, dims, data):
    with open(path, 'wb') as f:
        f.write(bytes([0, 0, 8, len(dims)]) + b''.join(struct.pack('>I', d) for d in dims) + bytes(data))

def split(n, rng):
    px, labels = [], []
    for i in range(n):
        c, o = i % 4, rng.randrange(2, 7)
        labels.append(c)
        for y in range(12):
            for x in range(12):
                on = (y in (o, o + 1)) if c == 0 else (x in (o, o + 1)) if c == 1 else abs(x - y) <= 1 if c == 2 \
                    else (x in (2, 9) and 2 <= y <= 9) or (y in (2, 9) and 2 <= x <= 9)
                px.append(215 + rng.randrange(40) if on else rng.randrange(40))
    return px, labels

out = sys.argv[1]
os.makedirs(out, exist_ok=True)
rng = random.Random(1)
for prefix, n in (('train', 64), ('t10k', 32)):
    px, labels = split(n, rng)
    write_idx(os.path.join(out, prefix + '-images-idx3-ubyte'), [n, 12, 12], px)
    write_idx(os.path.join(out, prefix + '-labels-idx1-ubyte'), [n], labels)
