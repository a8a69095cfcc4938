#!/usr/bin/python3
"""Same-run comparison of `excb bench` with the PyTorch peer (shared/bench/torch_excb.py).

Timings on these shared machines drift by 10 % and more, so the two programs alternate, round by
round, on the same inputs-free benchmark (fixed random inputs, compute only), and the figure that
counts is the ratio within a round. The peer runs tuned as shared/PERF.md says: AVX-512 ATen
kernels, OPENBLAS_CORETYPE removed, channels-last, and glibc told to keep freed memory (its faster
malloc setting). excb runs as built, whatever the shell exports.

    /usr/bin/python3 bench/compare.py [--rounds 3] [--seconds 4] [--peer ../shared/bench/torch_excb.py]
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys

CONFIGS = [  # name, peer arch, G, L, B, K
    ("resnet20s", "small", 28, 12, 256, 4096),
    ("resnet18", "resnet18", 32, 16, 64, 4096),
]


def run_peer(peer, arch, G, L, B, K, seconds, threads):
    env = dict(os.environ)
    env.pop("OPENBLAS_CORETYPE", None)
    env.update(ATEN_CPU_CAPABILITY="avx512", MALLOC_MMAP_THRESHOLD_="17179869184",
               MALLOC_TRIM_THRESHOLD_="17179869184")
    cmd = ["/usr/bin/python3", peer, "--bench", "--arch", arch, "--global-size", str(G), "--local-size", str(L),
           "--batch", str(B), "--K", str(K), "--channels-last", "--threads", str(threads), "--warmup", "1",
           "--reps", "1", "--min-rep-seconds", str(seconds)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    d = json.loads(out.strip().splitlines()[-1])
    return d["img_per_s_median"], d["peak_mem_mib"]


def run_excb(name, G, L, B, K, seconds, threads):
    cmd = ["./excb", "bench", "--config", name, "--global-size", str(G), "--local-size", str(L), "--batch", str(B),
           "--K", str(K), "--threads", str(threads), "--reps", "1", "--min-seconds", str(seconds)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    m = re.search(r": ([0-9.]+) img/s .*peak ([0-9.]+) MiB", out)
    return float(m.group(1)), float(m.group(2))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--peer", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "bench", "torch_excb.py"))
    ap.add_argument("--only", default=None, help="run one config by name")
    a = ap.parse_args()
    for name, arch, G, L, B, K in CONFIGS:
        if a.only and a.only != name:
            continue
        ex, pt, exm, ptm, ratio = [], [], [], [], []
        for r in range(a.rounds):
            p, pm = run_peer(a.peer, arch, G, L, B, K, a.seconds, a.threads)
            e, em = run_excb(name, G, L, B, K, a.seconds, a.threads)
            pt.append(p); ptm.append(pm); ex.append(e); exm.append(em); ratio.append(e / p)
            print(f"  round {r + 1}: {name}: PyTorch {p:.2f} img/s, excb {e:.2f} img/s, ratio {e / p:.2f}", file=sys.stderr)
        fmt = lambda v: f"{statistics.median(v):.2f} [{min(v):.2f}–{max(v):.2f}]"
        print(f"{name} G={G} L={L} B={B} K={K} threads={a.threads}, {a.rounds} rounds:")
        print(f"  PyTorch peer : {fmt(pt)} img/s, peak {max(ptm):.0f} MiB (maxrss)")
        print(f"  excb         : {fmt(ex)} img/s, peak {max(exm):.0f} MiB (maxrss)")
        print(f"  speed ratio excb/PyTorch per round: {fmt(ratio)}; memory ratio {max(exm) / max(ptm):.2f}")


if __name__ == "__main__":
    main()
