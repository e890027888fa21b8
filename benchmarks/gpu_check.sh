#!/usr/bin/env bash
# One command for a GPU machine: the CUDA-only tests, then every benchmark at GPU sizes.
# Results go to ${OUT:-gpu_results}/; about 6-8 minutes on one H100.
#   bash benchmarks/gpu_check.sh            (from the repository root, project installed)
set -uo pipefail
out="${OUT:-gpu_results}"
mkdir -p "$out"
py="${PYTHON:-python}"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  "$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
} 2>&1 | tee "$out/device.txt"

run() {  # name, timeout seconds, command...
  local name=$1 limit=$2; shift 2
  echo "== $name" | tee -a "$out/summary.txt"
  timeout "$limit" "$@" > "$out/$name.txt" 2>&1
  local rc=$?
  tail -n 25 "$out/$name.txt" | tee -a "$out/summary.txt"
  echo "   (exit $rc)" | tee -a "$out/summary.txt"
}

run gpu_tests 150 "$py" -m pytest -q -m gpu tests/test_gpu.py tests/test_metrics_inception.py
run train_throughput 150 "$py" benchmarks/train_throughput.py --device cuda --batch-size 128 \
    --steps 20 --warmup 5
run sample_ddim100 120 "$py" benchmarks/sample_throughput.py --device cuda --samplers ddim \
    --steps 100 --batch-size 500 --precision fp32 bf16 --channels-last
run sample_dpm20 90 "$py" benchmarks/sample_throughput.py --device cuda --samplers dpm-solver++ \
    --steps 20 --batch-size 500 --precision fp32 bf16 --channels-last
run eval_throughput 60 "$py" benchmarks/eval_throughput.py --device cuda
echo "results in $out/"
