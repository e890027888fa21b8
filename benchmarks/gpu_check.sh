#!/usr/bin/env bash
# One command for a GPU machine: the CUDA-only tests, every benchmark at GPU sizes, and an
# end-to-end `train` (torchrun, NCCL, 1 process) + `generate` run. Results go to
# ${OUT:-gpu_results}/: device.txt, summary.txt (the end of every stage's log) and logs.tgz (the
# full logs); about 8 minutes on one H100.
#   bash benchmarks/gpu_check.sh        (from the repository root; installs nothing)
#   BUDGET=420 bash benchmarks/gpu_check.sh   (stop starting stages after 420 s; default 570)
#   SMALL=1 DEVICE=cpu bash benchmarks/gpu_check.sh   (tiny sizes: checks the script itself)
# Each stage has its own time limit, cut to what is left of BUDGET; the torch.compile stages
# compile for a minute or more each.
set -uo pipefail
out="${OUT:-gpu_results}"
mkdir -p "$out/logs"
: > "$out/summary.txt"
py="${PYTHON:-python3}"
dev="${DEVICE:-cuda}"
budget="${BUDGET:-570}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
work="$(mktemp -d)"
finish() {
  tar czf "$out/logs.tgz" -C "$out" logs && rm -rf "$out/logs"
  rm -rf "$work"
}
trap finish EXIT
trap 'exit 143' TERM INT

if [ "${SMALL:-0}" = 1 ]; then  # sizes for a CPU check of the script itself
  TB=4; TS=2; SB=2; SS=2; SMB=2; EI=8; EB=4; PR=500; E2E_N=64; E2E_B=8; E2E_STEPS=4; GEN_N=8
  TRAIN_FAST="fp32 bf16"; TRAIN_COMPILE="bf16"; SAMPLE_FAST="fp32 bf16 overhead"
  SMALL_MODES="bf16"; SAMPLE_COMPILE="bf16"; E2E_EXTRA=(--device cpu); GEN_EXTRA=(--device cpu)
  TESTS=(tests/test_gpu.py)
else
  TB=128; TS=20; SB=500; SS=20; SMB=16; EI=5000; EB=250; PR=10000; E2E_N=8192; E2E_B=128
  E2E_STEPS=150; GEN_N=1000
  TRAIN_FAST="fp32 bf16+fused fp16+fused"; TRAIN_COMPILE="bf16+fused bf16+fused+compile-ro"
  SAMPLE_FAST="fp32 bf16 fp16 bf16+graph overhead"; SMALL_MODES="fp32 bf16 bf16+graph"
  SAMPLE_COMPILE="bf16 bf16+compile-ro bf16+compile-ro+freeze"; E2E_EXTRA=(); GEN_EXTRA=(--cuda-graph)
  TESTS=(tests/test_gpu.py tests/test_metrics_inception.py tests/test_generate_noise.py)
fi

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1
  "$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'cudnn', torch.backends.cudnn.version(), 'cpus', __import__('os').cpu_count())"
  # channels_last pays only where GroupNorm keeps it (CUDA GroupNorm had no NHWC kernels)
  "$py" -c "import torch; x = torch.randn(2, 64, 8, 8, device='$dev').to(memory_format=\
torch.channels_last); y = torch.nn.functional.group_norm(x, 32); print('group_norm keeps \
channels_last:', y.is_contiguous(memory_format=torch.channels_last))"
} 2>&1 | tee "$out/device.txt"

stage() {  # name, time limit in seconds, command...
  local name=$1 limit=$2; shift 2
  local left=$((budget - SECONDS - 5))
  if [ "$left" -lt 15 ]; then
    echo "== $name: skipped, the budget of $budget s is spent" | tee -a "$out/summary.txt"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name ($(date -u +%T), limit $limit s)" | tee -a "$out/summary.txt"
  local start=$SECONDS
  timeout -k 5 "$limit" "$@" > "$out/logs/$name.log" 2>&1
  local rc=$?
  grep -v "^\s*$" "$out/logs/$name.log" | tail -n 30 | tee -a "$out/summary.txt"
  echo "   (exit $rc, $((SECONDS - start)) s)" | tee -a "$out/summary.txt"
}

# Most informative first: when BUDGET runs out, the stages at the end are the ones skipped.
stage tests 150 "$py" -m pytest -q -p no:cacheprovider -m gpu "${TESTS[@]}"
stage train 90 "$py" benchmarks/train_throughput.py --device "$dev" --batch-size $TB \
    --steps $TS --warmup 5 --modes $TRAIN_FAST
stage train_compile 200 "$py" benchmarks/train_throughput.py --device "$dev" --batch-size $TB \
    --steps $TS --warmup 5 --modes $TRAIN_COMPILE
stage profile 60 "$py" benchmarks/profile_step.py --device "$dev" --batch-size $TB \
    --sample-batch-size $SB --mode bf16
stage sample 75 "$py" benchmarks/sample_throughput.py --device "$dev" --batch-size $SB \
    --samplers ddim:100 dpm-solver++:20 --timed-steps $SS --modes $SAMPLE_FAST
stage eval 150 "$py" benchmarks/eval_throughput.py --device "$dev" --num-images $EI \
    --batch-size $EB --pr-size $PR --compile
stage sample_compile 210 "$py" benchmarks/sample_throughput.py --device "$dev" --batch-size $SB \
    --samplers ddim:100 dpm-solver++:20 --timed-steps $SS --modes $SAMPLE_COMPILE
if [ "$dev" = cuda ]; then
  stage sample_small 40 "$py" benchmarks/sample_throughput.py --device cuda --batch-size $SMB \
      --samplers ddim:100 --timed-steps 50 --modes $SMALL_MODES
fi

# End to end: torchrun (NCCL on CUDA) trains on a folder of PNGs, then generate samples.
[ $((budget - SECONDS)) -gt 30 ] && "$py" - "$work/images" $E2E_N <<'PY'
import os, sys
import numpy as np
from PIL import Image
folder, n = sys.argv[1], int(sys.argv[2])
os.makedirs(folder, exist_ok=True)
rng = np.random.default_rng(0)
for i in range(n):
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(f"{folder}/{i:05d}.png")
PY
stage e2e_train 75 "$py" -m torch.distributed.run --standalone --nproc_per_node 1 -m ddpmkit \
    train --dataset folder --root "$work/images" --image-size 32 --batch-size $E2E_B \
    --max-steps $E2E_STEPS --precision bf16 --num-workers 6 --log-intv 25 --num-save-images 0 \
    --chkpt-dir "$work/chkpts" --image-dir "$work/grids" "${E2E_EXTRA[@]}"
cat "$work"/chkpts/*/log.jsonl 2>/dev/null | tee -a "$out/summary.txt"
stage e2e_generate 60 "$py" -m ddpmkit generate --chkpt-dir "$work/chkpts" --dataset folder \
    --chkpt-path "$(ls "$work"/chkpts/*/*.pt 2>/dev/null | tail -n 1)" --sampler ddim --steps 100 \
    --total-size $GEN_N --batch-size 500 --precision bf16 --save-dir "$work/samples" --no-progress \
    "${GEN_EXTRA[@]}"
ls "$work/samples"/* 2>/dev/null | grep -c png | sed 's/^/PNGs written: /' | tee -a "$out/summary.txt"

echo "results in $out/"
