#!/usr/bin/env bash
# The GPU fast path in one command (issue 11), on a CUDA machine:
#   1. the GPU tests (pytest -m gpu: the kernel at model shapes, compiled; dispatch on CUDA),
#   2. bench/kernel.py: decode attention, batch x context: dense SDPA, torch paths, fused kernels,
#   3. bench/serve.py: the server with fp16 vs logquant at one KV budget.
# Results go to $RESULTS_DIR (default results/): kernel.json, serve_gpu.json.
#
#   bash bench/gpu_smoke.sh             # needs CUDA
#   bash bench/gpu_smoke.sh --dry-run   # any machine: the GPU tests of tests/test_kernels.py (skipped
#                                       # without CUDA), bench/kernel.py --dry-run (the CPU kernel on
#                                       # the CPU), and the serve command printed, not run
# Environment: PYTHON (default python), RESULTS_DIR, KV_BUDGET (default 4GiB).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
RESULTS_DIR=${RESULTS_DIR:-results}
KV_BUDGET=${KV_BUDGET:-4GiB}

dry_run=0
case "${1:-}" in
  --dry-run) dry_run=1 ;;
  "") ;;
  *) echo "usage: $0 [--dry-run]" >&2; exit 2 ;;
esac
if [[ $dry_run == 0 ]] && ! "$PYTHON" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
  echo "gpu_smoke.sh: no CUDA device (use --dry-run to check the script on this machine)" >&2
  exit 1
fi
mkdir -p "$RESULTS_DIR"

echo "== GPU tests"
if [[ $dry_run == 1 ]]; then
  "$PYTHON" -m pytest -q -p no:cacheprovider -m gpu tests/test_kernels.py
else
  "$PYTHON" -m pytest -q -p no:cacheprovider -m gpu tests
fi

echo "== bench/kernel.py"
kernel=("$PYTHON" bench/kernel.py --json "$RESULTS_DIR/kernel.json")
[[ $dry_run == 1 ]] && kernel+=(--dry-run)
"${kernel[@]}"

echo "== bench/serve.py: fp16 vs logquant at $KV_BUDGET of KV cache"
serve=("$PYTHON" bench/serve.py --policies fp16,logquant --kv-cache-memory "$KV_BUDGET" --dataset random
       --input-len 2048 --output-len 256 --num-requests 128 --concurrency 1,32,128 --ignore-eos
       --server-args "--max-num-seqs 128" --json "$RESULTS_DIR/serve_gpu.json")
if [[ $dry_run == 1 ]]; then
  echo "dry run, not started: ${serve[*]}"
else
  "${serve[@]}"
fi
echo "== done: $RESULTS_DIR/kernel.json $( [[ $dry_run == 1 ]] || echo "$RESULTS_DIR/serve_gpu.json" )"
