#!/usr/bin/env bash
# The pipeline's stages as plain cachebrew commands (what `dvc repro` runs), for machines without DVC.
set -euo pipefail
cd "$(dirname "$0")"
TRAIN=$(python -c "import yaml; print(yaml.safe_load(open('params.yaml'))['data']['train_size'])")
EVAL=$(python -c "import yaml; print(yaml.safe_load(open('params.yaml'))['data']['eval_size'])")
python ../common/subset.py ../../data/rotten_tomatoes data --train-size "$TRAIN" --eval-size "$EVAL"
cachebrew train configs/teacher.yaml --no-progress
cachebrew export configs/export.yaml --no-progress
cachebrew export configs/export_dev.yaml --no-progress
cachebrew train configs/baseline.yaml --no-progress
cachebrew distill configs/distill.yaml --no-progress
mkdir -p results
cachebrew evaluate models/teacher/best data/test.parquet --max-length 64 --output results/teacher.json > /dev/null
cachebrew evaluate models/baseline/best data/test.parquet --max-length 64 --output results/baseline.json > /dev/null
cachebrew evaluate models/distilled/best data/test.parquet --max-length 64 --output results/distilled.json > /dev/null
python ../common/report.py results/teacher.json results/baseline.json results/distilled.json \
  --names "teacher (MiniLM-L6)" "student 2L, no distillation" "student 2L, distilled from cache" --out results/table.md
