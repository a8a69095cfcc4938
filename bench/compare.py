#!/usr/bin/python3
"""Same-run comparison of `excb bench` with the PyTorch peer, against every PyTorch given.

Timings on these shared machines drift by 10 % and more, so the programs alternate, round by round,
on the same benchmark (fixed random inputs, compute only: one training step of 2 global + 6 local
crops, teacher and student, SGD and EMA), and the figure that counts is the ratio within a round.

Two traps are checked in the same run, before any timing:
  * a PyTorch without a real BLAS: Debian's python3-torch without libopenblas0-pthread falls back to
    the reference BLAS (a 2048^3 GEMM at ~8 GFLOP/s instead of ~200), and every Linear layer of the
    peer crawls. Each PyTorch's build line (torch.__config__) and a 2048^3 GEMM at the round's thread
    count are printed, and a GEMM under 50 GFLOP/s stops the comparison.
  * two vCPUs that are really one core: the FMA loop of bench/fma_peak.c at 1 and 2 threads says
    which state the machine is in (2 threads at ~2x the 1-thread figure: two cores).

Each peer runs tuned as a user would: channels-last, AVX-512 ATen kernels, OPENBLAS_CORETYPE removed
(these machines export Haswell, which halves OpenBLAS; set to SkylakeX when OpenBLAS's own detection
falls back to generic code, as it does on some AVX-512 Xeons), and glibc told to keep freed memory (faster
for PyTorch's step); OPENBLAS/OMP/MKL_NUM_THREADS hold its BLAS to the round's thread count. excb runs
as built, with --threads.

    /usr/bin/python3 bench/compare.py --peer PATH/torch_excb.py \\
        [--torch "Debian torch + OpenBLAS=/usr/bin/python3"] [--torch "pip torch=/opt/torchvenv/bin/python"] \\
        [--threads 1,2] [--rounds 3] [--seconds 6]
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys

CONFIGS = [  # excb config, peer arch, G, L, B, K
    ("resnet20s", "small", 28, 12, 256, 4096),
    ("resnet18", "resnet18", 32, 16, 64, 4096),
]
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

GEMM_CHECK = r"""
import sys, time, torch
torch.set_num_threads(int(sys.argv[1]))
cfg = torch.__config__.show()
blas = [l.strip() for l in cfg.splitlines() if "BLAS_INFO" in l or "Math Kernel" in l or "MKL-DNN" in l or "CPU capability" in l]
info = "; ".join(s.split(",")[0] if s.startswith("- Build settings") else s for s in blas)
a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
a @ b
best = 0.0
for _ in range(5):
    t = time.perf_counter(); a @ b; dt = time.perf_counter() - t
    best = max(best, 2 * 2048 ** 3 / dt / 1e9)
print(torch.__version__ + " | " + info + " | GEMM 2048^3 %.1f GFLOP/s" % best)
"""


CORETYPE = {}   # interpreter -> the OPENBLAS_CORETYPE it runs with (None: OpenBLAS's own detection)


def peer_env(threads, python=None):
    env = dict(os.environ)
    env.pop("OPENBLAS_CORETYPE", None)
    if CORETYPE.get(python):
        env["OPENBLAS_CORETYPE"] = CORETYPE[python]
    # torch.set_num_threads does not reach a pthreads OpenBLAS (Debian's): it would use every core at "1 thread"
    n = str(threads)
    env.update(ATEN_CPU_CAPABILITY="avx512", MALLOC_MMAP_THRESHOLD_="17179869184",
               MALLOC_TRIM_THRESHOLD_="17179869184", OPENBLAS_NUM_THREADS=n, OMP_NUM_THREADS=n, MKL_NUM_THREADS=n)
    return env


def gemm_check(python, threads):
    out = subprocess.run([python, "-c", GEMM_CHECK, str(threads)], env=peer_env(threads, python), capture_output=True,
                         text=True)
    if out.returncode:
        return None, out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "failed"
    line = out.stdout.strip().splitlines()[-1]
    gflops = float(re.search(r"GEMM 2048\^3 ([0-9.]+)", line).group(1))
    # OpenBLAS 0.3.21 does not know every AVX-512 CPU (an Intel Xeon of this kind reads as "Prescott",
    # generic code at ~30 GFLOP/s): a user would name the core, so the peer gets that chance once
    if gflops < 50 and not CORETYPE.get(python) and "BLAS_INFO=generic" in line:
        CORETYPE[python] = "SkylakeX"
        g2, line2 = gemm_check(python, threads)
        if g2 is not None and g2 > gflops:
            return g2, line2 + " (OPENBLAS_CORETYPE=SkylakeX: its own detection gave %.1f)" % gflops
        CORETYPE[python] = None
    return gflops, line


def run_peer(python, peer, arch, G, L, B, K, seconds, threads):
    cmd = [python, peer, "--bench", "--arch", arch, "--global-size", str(G), "--local-size", str(L),
           "--batch", str(B), "--K", str(K), "--channels-last", "--threads", str(threads), "--warmup", "1",
           "--reps", "1", "--min-rep-seconds", str(seconds)]
    out = subprocess.run(cmd, env=peer_env(threads, python), capture_output=True, text=True, check=True).stdout
    d = json.loads(out.strip().splitlines()[-1])
    return d["img_per_s_median"], d["peak_mem_mib"]


def run_excb(name, G, L, B, K, seconds, threads):
    cmd = [os.path.join(ROOT, "excb"), "bench", "--config", name, "--global-size", str(G), "--local-size", str(L),
           "--batch", str(B), "--K", str(K), "--threads", str(threads), "--reps", "1", "--min-seconds", str(seconds)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return float(re.search(r": ([0-9.]+) img/s", out).group(1)), float(re.search(r"peak ([0-9.]+) MiB", out).group(1))


def fma_peak(threads):
    exe = os.path.join(HERE, "fma_peak")
    subprocess.run(["make", "-s", "-C", os.path.dirname(HERE), "bench/fma_peak"], check=True,  # the Makefile's rule
                   stdout=subprocess.DEVNULL)
    return subprocess.run([exe, str(threads)], capture_output=True, text=True, check=True).stdout.strip()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--peer", required=True, help="the PyTorch peer, torch_excb.py")
    ap.add_argument("--torch", action="append", default=[], metavar="LABEL=PYTHON",
                    help="a PyTorch to compare with, by its interpreter (repeatable)")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=6)
    ap.add_argument("--only", default=None, help="one config by name")
    a = ap.parse_args()
    torches = [t.split("=", 1) for t in (a.torch or ["Debian torch=/usr/bin/python3"])]
    threads = [int(t) for t in a.threads.split(",")]
    configs = [c for c in CONFIGS if not a.only or c[0] == a.only]

    print("machine:", *(fma_peak(t) for t in threads), sep="\n  ")
    for label, python in torches:
        for t in threads:
            gflops, line = gemm_check(python, t)
            print(f"{label} ({python}), {t} thread(s): {line}")
            if gflops is None or gflops < 50:
                sys.exit(f"{label}: no usable BLAS (GEMM {gflops} GFLOP/s): install libopenblas0-pthread, or drop it")

    rows = []
    for t in threads:
        for name, arch, G, L, B, K in configs:
            ex, peers, mem = [], {label: [] for label, _ in torches}, {"excb": []}
            for r in range(a.rounds):
                rate, peak = run_excb(name, G, L, B, K, a.seconds, t)
                ex.append(rate)
                mem["excb"].append(peak)
                for label, python in torches:
                    rate, peak = run_peer(python, a.peer, arch, G, L, B, K, a.seconds, t)
                    peers[label].append(rate)
                    mem.setdefault(label, []).append(peak)
                print(f"  round {r + 1}, {name}, {t} thread(s): excb {ex[-1]:.2f}"
                      + "".join(f", {label} {peers[label][-1]:.2f}" for label, _ in torches) + " img/s", file=sys.stderr)
            best = [max(peers[label][r] for label, _ in torches) for r in range(a.rounds)]
            ratio = [e / p for e, p in zip(ex, best)]
            rows.append((f"{name} {G}/{L} B={B} K={K}", t, ex, peers, ratio, mem))

    fmt = lambda v: ", ".join(f"{x:.2f}" for x in v)
    print("\n| config | threads | excb img/s | " + " | ".join(label for label, _ in torches) + " | excb / best PyTorch |")
    print("|---" * (4 + len(torches)) + "|")
    for cfg, t, ex, peers, ratio, mem in rows:
        print(f"| {cfg} | {t} | {fmt(ex)} | " + " | ".join(fmt(peers[label]) for label, _ in torches)
              + f" | **{statistics.median(ratio):.2f}×** [{min(ratio):.2f}–{max(ratio):.2f}] |")
    print("\n(img/s per round; the ratio is excb's over the faster PyTorch of the same round: median [min–max])")
    print("\n| config | threads | peak resident memory, MiB (median of the rounds): excb | "
          + " | ".join(label for label, _ in torches) + " |")
    print("|---" * (3 + len(torches)) + "|")
    for cfg, t, ex, peers, ratio, mem in rows:
        print(f"| {cfg} | {t} | {statistics.median(mem['excb']):.0f} | "
              + " | ".join(f"{statistics.median(mem[label]):.0f}" for label, _ in torches) + " |")


if __name__ == "__main__":
    main()
