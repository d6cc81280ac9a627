#!/usr/bin/env bash
# One GPU, about 5-8 minutes: throughput and MFU of 124M GPT-2 and the Llama-1B shape in bf16 (compile off
# and on) beside transformers' models, ZeRO 0-3 peak memory vs the planner, checkpoint save MB/s and an NCCL
# all-reduce; all of it into one JSON file (bench/gpu.py says what each figure is).
#
#   bench/gpu.sh [OUT.json]        default: $OUT/gpu.json when $OUT is set, else bench/gpu-results.json
#   GPU_BENCH_TIMEOUT=480 (seconds, the whole run)   PYTHON=.venv/bin/python
#
# Without a CUDA device it says so and exits 0 (nothing to measure).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
OUT_JSON=${1:-${OUT:+$OUT/gpu.json}}
OUT_JSON=${OUT_JSON:-bench/gpu-results.json}

if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "bench/gpu.sh: no CUDA device here (torch.cuda.is_available() is False); nothing to measure"
  exit 0
fi

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader || true
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/gptforge-inductor}
export TOKENIZERS_PARALLELISM=false
# the whole run is bounded; the JSON is rewritten after every section, so a timeout keeps what was measured
status=0
timeout --kill-after=20 "${GPU_BENCH_TIMEOUT:-480}" "$PYTHON" bench/gpu.py --out "$OUT_JSON" || status=$?
if [ "$status" -ne 0 ]; then
  echo "bench/gpu.sh: bench/gpu.py exited $status (124 = timed out); partial results in $OUT_JSON"
fi
echo "bench/gpu.sh: results in $OUT_JSON"
exit "$status"
