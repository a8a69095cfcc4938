#!/bin/sh
# kill -9 at random moments, then resume: the final checkpoint and metrics must equal an uninterrupted run's.
#   bench/kill_resume.sh [KILLS (10)] [STEPS (150)] [DIR (/tmp/excb_kill)]
# Runs the default preset (Fashion-MNIST) at B = 64 (k-means on 5k samples) for STEPS steps, a checkpoint every
# 3 steps, once straight and once killed KILLS times (each kill 1-9 s after a resume starts, or after the
# first checkpoint appears for a fresh start; the delays come from a fixed seed), resuming each
# time. Compares `excb inspect` of the two final checkpoints (every tensor's CRC-32; only the time spent
# and metrics.jsonl's byte length may differ) and metrics.jsonl without its "wall" timing fields.
set -u
KILLS=${1:-10}; STEPS=${2:-150}; DIR=${3:-/tmp/excb_kill}
EXCB=${EXCB:-./excb}
ARGS="--batch 64 --set ckpt_every=3 --set knn_every=0 --set kmeans_samples=5000 --stop-after $STEPS -q"
rm -rf "$DIR" && mkdir -p "$DIR"
t0=$(date +%s)
$EXCB train --out "$DIR/straight" $ARGS || { echo "straight run failed"; exit 1; }
echo "straight run: $(( $(date +%s) - t0 )) s"
seed=12345; kills=0; resumes=0; fresh=0; failures=0
start() {
    if ls "$DIR"/killed/ckpt-*.excb >/dev/null 2>&1; then
        $EXCB train --out "$DIR/killed" $ARGS --resume 2>>"$DIR/resume.log" & resumes=$((resumes + 1))
    else
        $EXCB train --out "$DIR/killed" $ARGS --force 2>>"$DIR/resume.log" & fresh=$((fresh + 1))
    fi
    pid=$!
}
while [ $kills -lt $KILLS ]; do
    start
    if [ $resumes -eq 0 ]; then      # a fresh start: let k-means finish and the first checkpoint land
        while kill -0 $pid 2>/dev/null && ! ls "$DIR"/killed/ckpt-*.excb >/dev/null 2>&1; do sleep 0.05; done
    fi
    seed=$(( (seed * 1103515245 + 12345) % 2147483648 ))
    ms=$(( 1000 + seed % 8000 ))
    sleep "$(printf '%d.%03d' $((ms / 1000)) $((ms % 1000)))"
    if kill -9 $pid 2>/dev/null; then
        wait $pid 2>/dev/null
        kills=$((kills + 1))
        last=$(ls "$DIR"/killed/ckpt-*.excb 2>/dev/null | tail -1)
        echo "kill $kills after ${ms} ms; newest checkpoint: ${last##*/}"
    else
        wait $pid; rc=$?
        [ $rc -ne 0 ] && { failures=$((failures + 1)); echo "a run exited with $rc"; }
        break          # finished before the kill: no more kills possible
    fi
done
start; wait $pid; rc=$?
[ $rc -ne 0 ] && { failures=$((failures + 1)); echo "the final resume exited with $rc"; }
a="$DIR/straight/ckpt-$(printf %010d $STEPS).excb"; b="$DIR/killed/ckpt-$(printf %010d $STEPS).excb"
$EXCB inspect "$a" | grep -v -e '^/' -e '^train.seconds' -e '^train.metrics_bytes' > "$DIR/a.txt"
$EXCB inspect "$b" | grep -v -e '^/' -e '^train.seconds' -e '^train.metrics_bytes' > "$DIR/b.txt"
sed 's/,"wall":.*//' "$DIR/straight/metrics.jsonl" > "$DIR/ma.txt"
sed 's/,"wall":.*//' "$DIR/killed/metrics.jsonl" > "$DIR/mb.txt"
same=1
cmp -s "$DIR/a.txt" "$DIR/b.txt" || { same=0; echo "checkpoints differ:"; diff "$DIR/a.txt" "$DIR/b.txt" | head; }
cmp -s "$DIR/ma.txt" "$DIR/mb.txt" || { same=0; echo "metrics differ"; }
echo "kills $kills, resumes $resumes, fresh starts (killed before the first checkpoint) $((fresh - 1 < 0 ? 0 : fresh - 1)), failures $failures, final state equal: $([ $same = 1 ] && echo yes || echo NO) ($(grep -c . "$DIR/a.txt") tensors compared by CRC-32, $(grep -c . "$DIR/ma.txt") metrics lines)"
[ $same = 1 ] && [ $failures = 0 ]
