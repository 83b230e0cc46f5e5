#!/usr/bin/env bash
# The stages of dvc.yaml as plain commands (no DVC needed).
set -euo pipefail
cd "$(dirname "$0")"
P() { python -c "import yaml; print(yaml.safe_load(open('params.yaml'))['data']['$1'])"; }
python ../common/subset.py ../../data/wnut16 data --train-size "$(P train_size)" --eval-size "$(P eval_size)"
cachebrew train configs/teacher.yaml --no-progress
cachebrew export configs/export.yaml --no-progress
cachebrew export configs/export_dev.yaml --no-progress
cachebrew train configs/baseline.yaml --no-progress
cachebrew distill configs/distill.yaml --no-progress
mkdir -p results
for m in teacher baseline distilled; do
  cachebrew evaluate models/$m/best data/test.parquet --tokens tokens --label tags --max-length 64 --output results/$m.json > /dev/null
done
python ../common/report.py results/teacher.json results/baseline.json results/distilled.json \
  --names "teacher (MiniLM-L6)" "student 2L, no distillation" "student 2L, distilled from cache" --out results/table.md
