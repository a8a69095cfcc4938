#!/bin/sh
# valgrind (memcheck) on excb's checkpoint reader, through the CLI: a good checkpoint, a truncated one,
# one flipped byte, and nine forgeries whose CRCs were all recomputed (so that only the table lies).
# Each case runs `excb eval`, `excb inspect` and `excb train --resume` (a run directory whose newest
# checkpoint is the forgery: resume must skip it, say so, and continue from the one before).
# valgrind cannot decode AVX-512, so excb is built here for x86-64-v3 (AVX2), CPU only.
# usage: sh bench/valgrind_checkpoints.sh [WORK_DIR]      (about 5 minutes on 2 cores)
set -eu
work=${1:-/tmp/excb_valgrind}
repo=$(cd "$(dirname "$0")/.." && pwd)
rm -rf "$work"; mkdir -p "$work"
git -C "$repo" worktree add -f --detach "$work/src" HEAD >/dev/null 2>&1
make -s -C "$work/src" excb EXCB_CPU_ONLY=1 CFLAGS="-O1 -g -march=x86-64-v3" >/dev/null
exe="$work/src/excb"
python3 "$repo/bench/make_tiny_idx.py" "$work/data"
"$exe" train --preset tiny --data "$work/data" --out "$work/run" --stop-after 4 -q
good="$work/run/ckpt-0000000004.excb"
python3 - "$good" "$work/cases" <<'PY'
import os, struct, sys, zlib
src, out = sys.argv[1], sys.argv[2]
os.makedirs(out)
b = bytearray(open(src, 'rb').read())
count = struct.unpack_from('<I', b, 16)[0]
def entry(name):
    for i in range(count):
        at = 32 + 184 * i
        if b[at:at + 112].rstrip(b'\0') == name.encode(): return at
    raise SystemExit('no entry ' + name)
def save(tag, data, fix=True):
    d = bytearray(data)
    if fix:   # every entry's CRC that lies within the file, then the file's
        for i in range(count):
            at = 32 + 184 * i
            off, n = struct.unpack_from('<QQ', d, at + 152)
            if off + n <= len(d) - 16: struct.pack_into('<I', d, at + 168, zlib.crc32(bytes(d[off:off + n])))
        struct.pack_into('<I', d, len(d) - 16, zlib.crc32(bytes(d[:len(d) - 16])))
    open(os.path.join(out, tag + '.excb'), 'wb').write(d)
def forged(tag, name, field, value, fmt='<Q'):
    d = bytearray(b)
    at = entry(name) + {'dtype': 112, 'ndim': 116, 'shape0': 120, 'shape1': 128, 'shape3': 144, 'offset': 152, 'bytes': 160}[field]
    struct.pack_into(fmt, d, at, value)
    save(tag, d)
save('good', b, fix=False)
save('truncated', b[:len(b) // 2], fix=False)
flip = bytearray(b); flip[len(b) // 2] ^= 1; save('flipped', flip, fix=False)
forged('shape-lies', 'train.previous_labels', 'shape0', 1037)
forged('shape-1TB', 'train.previous_labels', 'shape0', 1 << 38)
d = bytearray(b); at = entry('method.cluster_sizes')
struct.pack_into('<IIQQ', d, at + 112, 3, 2, 1 << 32, 1 << 33); save('shape-overflows', d)
forged('bytes-past-end', 'student.backbone.conv1.weight', 'bytes', 1 << 40)
forged('offset-past-end', 'teacher.bn_running_stats', 'offset', len(b) + 4096)
forged('ndim-5', 'train.step', 'ndim', 5, '<I')
forged('dtype-9', 'train.step', 'dtype', 9, '<I')
forged('unused-extent', 'train.step', 'shape3', 7)
d = bytearray(b); struct.pack_into('<I', d, 16, 0xFFFFFFFF); save('count-huge', d)
PY
printf "%-18s %-8s %-8s %-8s %s\n" case eval inspect resume "valgrind errors (eval/inspect/resume)"
total=0
for f in "$work"/cases/*.excb; do
  tag=$(basename "$f" .excb)
  codes=""; errs=""
  for cmd in eval inspect resume; do
    rm -rf "$work/r"; cp -r "$work/run" "$work/r"
    case $cmd in
      eval)    set -- eval "$f" --probe-epochs 1 ;;
      inspect) set -- inspect "$f" ;;
      resume)  cp "$f" "$work/r/ckpt-0000000005.excb"; set -- train --preset tiny --data "$work/data" --out "$work/r" --resume --stop-after 6 -q ;;
    esac
    rc=0
    valgrind -q --error-exitcode=99 --log-file="$work/vg.log" "$exe" "$@" >/dev/null 2>"$work/err.log" || rc=$?
    n=$(grep -c "^==[0-9]*== [A-Z]" "$work/vg.log" || true)
    total=$((total + n))
    codes="$codes $(printf %-8s $rc)"; errs="$errs/$n"
  done
  printf "%-18s%s %s\n" "$tag" "$codes" "${errs#/}"
done
echo "valgrind errors in all: $total"
git -C "$repo" worktree remove --force "$work/src" >/dev/null 2>&1 || true
