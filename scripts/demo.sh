#!/usr/bin/env bash
# `make demo`: build the shipped demo corpus (tinyshakespeare) with data_pipeline/build.py, train
# configs/tiny.yaml on whatever device there is, then print the validation loss curve and a sample.
# bf16 where the hardware has it (a GPU, or a CPU with avx512_bf16/AMX), else fp32.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${VENV:-.venv}/bin/python
DATA=demo/data
RUN=demo/run
start=$(date +%s)

echo "== demo: building the corpus (corpus/demo/tinyshakespeare.txt.gz -> $DATA)"
"$PY" data_pipeline/build.py --input corpus/demo/tinyshakespeare.txt.gz --output "$DATA" --val-fraction 0.1 --no-progress

precision=fp32
if grep -qwE 'avx512_bf16|amx_bf16' /proc/cpuinfo 2>/dev/null ||
    "$PY" -c 'import sys, torch; sys.exit(not (torch.cuda.is_available() and torch.cuda.is_bf16_supported()))'; then
    precision=bf16
fi
echo "== demo: training configs/tiny.yaml ($precision) -> $RUN"
rm -rf "$RUN"
"$PY" launch/train.py --config configs/tiny.yaml data.path="$DATA" run.dir="$RUN" train.precision="$precision" --resume none

echo "== demo: validation loss"
"$PY" - "$RUN/metrics.jsonl" <<'EOF'
import json, sys
evals = [r for r in map(json.loads, open(sys.argv[1])) if "val_loss" in r]
for r in evals:
    print(f"  step {r['step']:>4}  val loss {r['val_loss']:.3f}  ppl {r['val_ppl']:>9.1f}  " + "#" * round(4 * r["val_loss"]))
EOF

echo "== demo: sample (launch/generate.py --checkpoint $RUN --prompt 'ROMEO:')"
"$PY" launch/generate.py --checkpoint "$RUN" --prompt "ROMEO:" --max-new-tokens 80 --temperature 0.8 --top-k 200 --seed 1 2>/dev/null
echo
echo "== demo: done in $(( $(date +%s) - start ))s"
