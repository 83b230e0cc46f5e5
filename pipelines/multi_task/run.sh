#!/usr/bin/env bash
# The stages of dvc.yaml as plain commands (no DVC needed).
set -euo pipefail
cd "$(dirname "$0")"
P() { python -c "import yaml; print(yaml.safe_load(open('params.yaml'))['data']['$1'])"; }
python ../common/subset.py ../../data/rotten_tomatoes data/sentiment --train-size "$(P train_size)" --eval-size "$(P eval_size)"
python ../common/subset.py ../../data/trec data/trec --train-size "$(P train_size)" --eval-size "$(P eval_size)"
cachebrew train configs/teacher_sentiment.yaml --no-progress
cachebrew train configs/teacher_trec.yaml --no-progress
for c in sentiment sentiment_dev trec trec_dev; do cachebrew export configs/export_$c.yaml --no-progress; done
cachebrew distill configs/distill.yaml --no-progress
mkdir -p results
cachebrew evaluate models/teacher_sentiment/best data/sentiment/test.parquet --max-length 64 --output results/teacher_sentiment.json > /dev/null
cachebrew evaluate models/distilled/best data/sentiment/test.parquet --task sentiment --max-length 64 --output results/student_sentiment.json > /dev/null
cachebrew evaluate models/teacher_trec/best data/trec/test.parquet --label label_coarse --max-length 48 --output results/teacher_trec.json > /dev/null
cachebrew evaluate models/distilled/best data/trec/test.parquet --task trec --label label_coarse --max-length 48 --output results/student_trec.json > /dev/null
python ../common/report.py results/teacher_sentiment.json results/student_sentiment.json results/teacher_trec.json results/student_trec.json \
  --names "sentiment teacher" "multi-task student: sentiment" "TREC teacher" "multi-task student: TREC" --out results/table.md
