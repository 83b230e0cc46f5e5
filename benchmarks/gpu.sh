#!/usr/bin/env bash
# The GPU benchmark suite in one command: every benchmark in its CUDA configuration, then one ratio table.
#
#   bash benchmarks/gpu.sh [OUT_DIR]            # on a machine with one CUDA GPU; ~10 minutes on an H100
#   SMOKE=1 bash benchmarks/gpu.sh [OUT_DIR]    # the same steps at toy sizes on the CPU (checks the script)
#
# Installs nothing. Needs cachebrew's dependencies importable (torch with CUDA, transformers, pyarrow, datasets,
# zstandard) and textbrewer for the cache / TextBrewer column; on the lent device the missing wheels are in
# ../shared/device-wheels (its README has the one install line).
# Configurations (issue 14): BERT-base teacher (12 x 768) -> 3-layer student, batch 64, seq 128, bf16;
#   distill: logits only, and logits + 4 hidden_mse matches; each with the hf Trainer from the cache and online;
#   export: logits only, logits + 4 hidden layers, and a GPT-2 twin with 16 sampled logit slots, vs the bare bf16 forward; reader: 0, 2 and 4 workers.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results-gpu}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if [[ "${SMOKE:-0}" == 1 ]]; then
    DEV=cpu; D=(--steps 2 --repeats 2 --batch 8 --seq 32 --examples 64 --workers 1)
    E=(--examples 32 --batch 8 --seq 32 --repeats 1); R=(--sizes 2000 --hidden-rows 1000 --workers 0 1 --rounds 1)
else
    python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'benchmarks/gpu.sh: torch sees no CUDA device (SMOKE=1 runs it on the CPU)')"
    DEV=cuda; D=(--steps 30 --repeats 3 --batch 64 --seq 128 --examples 2048 --workers 2)
    E=(--examples 4096 --batch 64 --seq 128 --repeats 3); R=(--sizes 100000 --hidden-rows 20000 --workers 0 2 4 --rounds 2)
fi

python benchmarks/distill_throughput.py --device "$DEV" --config logits --trainer "${D[@]}" --json "$OUT/distill_logits.json"
python benchmarks/distill_throughput.py --device "$DEV" --config hidden --trainer "${D[@]}" --json "$OUT/distill_hidden.json"
python benchmarks/export_throughput.py --device "$DEV" "${E[@]}" --configs "logits only" "logits + 4 hidden" "causal LM, sampled 16" \
    --json "$OUT/export.json"
python benchmarks/reader.py "${R[@]}" --json "$OUT/reader.json"
python benchmarks/ratio_table.py "$OUT" | tee "$OUT/ratios.md"
