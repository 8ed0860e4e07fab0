#!/usr/bin/env bash
# The whole pipeline on an embedded model, small enough for a laptop CPU (4 to 8 minutes on 2 cores):
# cache activations, train one layer-agnostic SAE, splice it back into the model, write the feature report.
# QWEN_MODEL picks the preset (default qwen2.5-coder-0.5b-instruct); N_TOKENS the sample size.
set -euo pipefail
cd "$(dirname "$0")/.."
model="${QWEN_MODEL:-qwen2.5-coder-0.5b-instruct}"
n_tokens="${N_TOKENS:-30K}"
shards="runs/demo-${model}/shards"  # not under ./shards, the store the README's commands make
run="runs/demo-${model}/sae"
bin=.venv/bin

$bin/cache-acts --model "$model" --n-tokens "$n_tokens" --out "$shards" --max-seq-len 512 --batch-tokens 4096
resume=()  # run again, each stage goes on from what the last run left (or finds it done)
if [ -e "$run/train_config.json" ]; then resume=(--resume); fi
$bin/train-sae --shards "$shards" --out "$run" --batch-size 512 --steps 300 --val-every 50 --save-every 100 --warmup-steps 30 ${resume[@]+"${resume[@]}"}
$bin/eval-sae --sae "$run" --layers 0,6,12,18,24 --n-docs 4
$bin/sae-features --sae "$run" --n-report-features 40
echo
echo "feature report: $(pwd)/$run/features.html"
echo "evaluation:     $(pwd)/$run/eval/eval.json and recovered.png"
echo "next, in the terminal: $bin/sae-features --sae $run --feature N   (one latent of the report)"
echo "                       $bin/sae-features --sae $run --text 'def add(a, b):'   (the latents of a text of your own)"
echo "                       $bin/sae-features --sae $run --text-file f.py --html f.html   (a file's, as a page)"
