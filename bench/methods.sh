#!/bin/sh
# The cost of each method: `excb bench` img/s of every method, interleaved round by round so that
# the machine's drift affects them alike, and each method's median as a ratio to ExCB's.
#   sh bench/methods.sh [ROUNDS] [extra excb bench options]   (default: resnet20s 28/12 B=256 K=4096)
#   METHODS="excb coke" sh bench/methods.sh                    (default: every method)
set -eu
methods=${METHODS:-"excb none dino swav coke carp mvbt"}
rounds=${1:-3}
[ $# -gt 0 ] && shift
opts=${*:-"--config resnet20s --global-size 28 --local-size 12 --batch 256 --K 4096"}
out=$(mktemp)
for r in $(seq "$rounds"); do
    for m in $methods; do
        ./excb bench $opts --method "$m" --reps 3 --min-seconds 4 2>/dev/null |
            sed -n "s/.*: \([0-9.]*\) img\/s.*/$m \1/p" >> "$out"
    done
done
awk -v rounds="$rounds" -v methods="$methods" '
    { v[$1, ++n[$1]] = $2 }
    function median(m,   i, j, t, a) {
        for (i = 1; i <= n[m]; i++) a[i] = v[m, i]
        for (i = 1; i <= n[m]; i++) for (j = i + 1; j <= n[m]; j++) if (a[j] < a[i]) { t = a[i]; a[i] = a[j]; a[j] = t }
        lo[m] = a[1]; hi[m] = a[n[m]]
        return n[m] % 2 ? a[(n[m] + 1) / 2] : (a[n[m] / 2] + a[n[m] / 2 + 1]) / 2
    }
    END {
        e = median("excb")
        printf "%-5s %10s %16s %8s  (%d rounds, each the median of 3 repetitions)\n", "method", "img/s", "range", "vs excb", rounds
        nm = split(methods, ms, " ")
        for (k = 1; k <= nm; k++) { m = ms[k]; x = median(m); printf "%-5s %10.2f %7.2f-%-8.2f %8.3f\n", m, x, lo[m], hi[m], x / e }
    }' "$out"
rm -f "$out"
