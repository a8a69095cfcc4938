#!/bin/sh
# The candidate recipes for the default run, side by side: each one trained and evaluated as
# `./excb train` would, one after another, then one table (k-NN at k = 10 and 20 on the full test set,
# linear probe, NMI, wall time of the whole command, k-means and evaluation included).
#   bench/recipes.sh [DIR (runs/recipes)] [NAME ...]    (default: every recipe below)
# Each run's accuracy figures reproduce bit for bit; its wall time depends on the machine, so the
# script also prints the FMA peak (bench/fma_peak.c) that says what state the machine was in.
set -u
DIR=${1:-runs/recipes}
[ $# -gt 0 ] && shift
EXCB=${EXCB:-./excb}

# name | what it changes against the default preset (B = 32, n_local = 6, 2 epochs; the preset's own
# settings are in excb.c §14). Measured 2026-12-02: paper_notes.md §9 and the README's Results.
recipes() {
    cat <<'EOF'
default|
batch-16|--batch 16
batch-16-n_local-5|--batch 16 --set n_local=5
batch-16-n_local-4|--batch 16 --set n_local=4
EOF
}

make -s bench/fma_peak > /dev/null && bench/fma_peak 1 && bench/fma_peak 2
mkdir -p "$DIR"
printf '| recipe | settings | k-NN k=20 | k-NN k=10 | probe | NMI | wall |\n|---|---|---|---|---|---|---|\n' > "$DIR/table.md"
recipes | while IFS='|' read -r name args; do
    if [ $# -gt 0 ]; then
        case " $* " in *" $name "*) ;; *) continue ;; esac
    fi
    t0=$(date +%s)
    # shellcheck disable=SC2086
    $EXCB train --out "$DIR/$name" --force --quiet $args > "$DIR/$name.log" 2>&1 || { echo "$name failed: $DIR/$name.log"; continue; }
    wall=$(( $(date +%s) - t0 ))
    /usr/bin/python3 - "$DIR/$name/eval.json" "$name" "$args" "$wall" >> "$DIR/table.md" <<'PY'
import json, sys
e, name, args, wall = json.load(open(sys.argv[1])), sys.argv[2], sys.argv[3].strip() or "(the preset)", int(sys.argv[4])
print(f"| {name} | `{args}` | {e['knn_top1_k20']:.2f} % | {e['knn_top1_k10']:.2f} % | {e['probe_test_top1']:.2f} % "
      f"| {e['nmi']:.3f} | {wall // 60} min {wall % 60:02d} s |")
PY
    tail -1 "$DIR/table.md"
done
cat "$DIR/table.md"
