#!/usr/bin/env bash
# bench/gpu_checks.sh: issue 5's GPU figures in one go, on a machine with a GPU.
#   1. tests/test_gpu: every operator and whole training steps against the CPU reference (FP32, TF32),
#      printing each measured difference next to its tolerance
#   2. excb bench --device cuda against the PyTorch peer, same configuration and precision, alternating
#      in the same run: resnet18 2x32 + 6x16 B=256 K=4096, and resnet50 2x224 + 6x96 B=256 K=65536
# usage: bench/gpu_checks.sh PEER_SCRIPT [OUT_DIR]     (PEER_SCRIPT: shared/bench/torch_excb.py)
# Set EXCB=path/to/excb and TEST_GPU=path/to/test_gpu to use other builds; PYTHON for the peer's python.
# SKIP_PEER=1 runs excb's side only. SKIP_R50=1 leaves out the ResNet-50 pair (it needs about 75 GiB of GPU memory at B=256).
set -u
peer=${1:?usage: bench/gpu_checks.sh PEER_SCRIPT [OUT_DIR]}
out=${2:-/tmp/excb_gpu_checks}
mkdir -p "$out"
EXCB=${EXCB:-./excb}
TEST_GPU=${TEST_GPU:-./tests/test_gpu}
PYTHON=${PYTHON:-python3}
here=$(dirname "$0")
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader | tee "$out/gpu.txt"
"$EXCB" --version | tee "$out/version.txt"
echo "== tests/test_gpu"
"$TEST_GPU" --verbose=0 -j1 2>&1 | tee "$out/test_gpu.log" | grep -E "gpu-vs-cpu|Synthesis|FAIL|SKIP|fail" || true
pair() {   # name, excb options, peer options
    for prec in fp32 tf32; do
        echo "== $1 $prec: excb"
        "$EXCB" bench --device cuda --precision "$prec" $2 --reps 3 --min-seconds 3 2>&1 | tee -a "$out/bench.log"
        [ "${SKIP_PEER:-0}" = 1 ] && continue
        echo "== $1 $prec: PyTorch peer"
        "$PYTHON" "$here/torch_peer.py" "$prec" "$peer" --bench --device cuda --channels-last $3 --reps 3 \
            --min-rep-seconds 3 2>&1 | tail -1 | tee -a "$out/bench.log"
    done
}
pair resnet18 "--config resnet18 --global-size 32 --local-size 16 --batch 256 --K 4096" \
              "--arch resnet18 --global-size 32 --local-size 16 --batch 256 --K 4096"
if [ "${SKIP_R50:-0}" != 1 ]; then
    b=${R50_BATCH:-256}      # excb bench --memory: at most 72.6 GiB at 256 before cuDNN's workspace (~2 GiB)
    pair resnet50 "--config resnet50 --global-size 224 --local-size 96 --batch $b --K 65536" \
                  "--arch resnet50 --global-size 224 --local-size 96 --batch $b --K 65536"
fi
