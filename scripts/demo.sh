#!/usr/bin/env bash
# `make demo`: a first run in about two minutes on two CPU cores. Learn a small SentencePiece vocabulary
# for the shipped demo corpus (tinyshakespeare), build it with data_pipeline/build.py, train
# configs/tiny.yaml on whatever device there is, then print the validation loss curve and a sample.
# A 2,048-piece vocabulary instead of GPT-2's 50,257 keeps the output layer, which dominates a model this
# small, cheap: the same reason nanoGPT's Shakespeare demo is character-level.
# bf16 on a GPU that has it, else fp32: at this size autocast's casts cost more than bf16 matmuls save on
# a CPU (measured: fp32 2x faster than bf16 on an avx512_bf16 Xeon). PRECISION= overrides.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${VENV:-.venv}/bin/python
DATA=demo/data
RUN=demo/run
start=$(date +%s)

echo "== demo: a 2,048-piece SentencePiece vocabulary for corpus/demo/tinyshakespeare.txt.gz -> demo/sp.model"
mkdir -p demo
"$PY" - <<'EOF'
import gzip
from pathlib import Path

from gptforge.tokenizer import train_sentencepiece

text = gzip.decompress(Path("corpus/demo/tinyshakespeare.txt.gz").read_bytes()).decode()
Path("demo/sp_train.txt").write_text(text)
train_sentencepiece(["demo/sp_train.txt"], "demo/sp", vocab_size=2048)
EOF

echo "== demo: building the corpus (-> $DATA)"
"$PY" data_pipeline/build.py --input corpus/demo/tinyshakespeare.txt.gz --output "$DATA" --val-fraction 0.1 \
    --tokenizer sentencepiece:demo/sp.model --no-progress --overwrite

precision=${PRECISION:-}  # PRECISION=fp32 make demo forces fp32
if [ -z "$precision" ]; then
    precision=fp32
    if "$PY" -c 'import sys, torch; sys.exit(not (torch.cuda.is_available() and torch.cuda.is_bf16_supported()))'; then
        precision=bf16
    fi
fi
echo "== demo: training configs/tiny.yaml ($precision) -> $RUN"
rm -rf "$RUN"
"$PY" launch/train.py --config configs/tiny.yaml data.path="$DATA" run.dir="$RUN" train.precision="$precision" \
    train.eval_iters=4 train.save_interval=300 train.sample_interval=0 --resume none

echo "== demo: validation loss"
"$PY" - "$RUN/metrics.jsonl" <<'EOF'
import json, sys
evals = [r for r in map(json.loads, open(sys.argv[1])) if "val_loss" in r]
for r in evals:
    print(f"  step {r['step']:>4}  val loss {r['val_loss']:.3f}  ppl {r['val_ppl']:>7.1f}  " + "#" * round(6 * r["val_loss"]))
EOF

echo "== demo: sample (launch/generate.py --checkpoint $RUN --prompt 'ROMEO:')"
"$PY" launch/generate.py --checkpoint "$RUN" --prompt "ROMEO:" --max-new-tokens 80 --temperature 0.8 --top-k 200 --seed 1 2>/dev/null
echo
echo "== demo: done in $(( $(date +%s) - start ))s"
