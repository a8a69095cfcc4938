#!/usr/bin/env bash
# Data parallelism on this machine (issue 18): resnet20s (the fashion-mnist preset with 3,3,3 blocks, d = 256,
# K = 4096, B = 256, as excb bench --config resnet20s),
# one process on every core against mpirun -np 2 with one thread per rank, the same steps; each rank
# prints its reductions' share of the step (excb train's last line). Usage: bench/data_parallel.sh [STEPS] [REPS]
set -euo pipefail
cd "$(dirname "$0")/.."
steps=${1:-20}; reps=${2:-3}
out=$(mktemp -d)
common=(--preset fashion-mnist --set blocks=3,3,3 --set d=256 --set K=4096 --batch 256 --set kmeans_init=0 --set log_every=1 --stop-after "$steps")
# a step's time: the last step record's "wall" seconds (since the loop started) over its steps
step_ms() { tail -n 1 "$1/metrics.jsonl" | sed 's/.*"wall":{"seconds":\([0-9.]*\).*/\1/' | awk -v n="$steps" '{printf "%.1f", 1000 * $1 / n}'; }
for r in $(seq "$reps"); do
  ./excb train "${common[@]}" --threads 2 --out "$out/one$r" -q
  echo "rep $r: one process, 2 threads: $(step_ms "$out/one$r") ms a step"
  mpirun --oversubscribe --allow-run-as-root -np 2 ./excb train "${common[@]}" --threads 1 --out "$out/mpi$r" 2>&1 \
    | grep "ranks (Open MPI)" | sed "s/^/rep $r: /"
  echo "rep $r: mpirun -np 2: $(step_ms "$out/mpi$r") ms a step (rank 0's metrics)"
done
rm -rf "$out"
