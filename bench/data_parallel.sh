#!/usr/bin/env bash
# Data parallelism on this machine (issue 18): excb bench's resnet20s step (2 x 28^2 + 6 x 12^2 crops,
# B = 256, K = 4096, random inputs) in one process on both cores, then under mpirun -np 2 with one
# thread per rank (128 images each), alternating ROUNDS times; the second line of each mpirun run is
# the time its rank 0 spent in reductions a step. Usage: bench/data_parallel.sh [ROUNDS] [REPS]
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}; reps=${2:-3}
for r in $(seq "$rounds"); do
  echo "round $r: $(./excb bench --config resnet20s --threads 2 --reps "$reps")"
  mpirun --oversubscribe --allow-run-as-root -np 2 ./excb bench --config resnet20s --threads 1 --reps "$reps" | sed "s/^/round $r: /"
done
