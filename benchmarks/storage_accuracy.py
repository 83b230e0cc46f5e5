"""What each cache storage option costs in accuracy on a real task (Rotten Tomatoes, the sentiment pipeline).

    bash pipelines/sentiment/run.sh                       # once: teacher, data subset, fp16 caches
    python benchmarks/storage_accuracy.py [--json out.json]

For each storage option the pipeline's train cache is re-exported (same teacher, data, augmentation)
with its hidden states (and logits) stored in that precision, and the pipeline's distill stage is rerun
from it with the same seed; the table gives bytes/example and the distilled student's dev and test
accuracy. fp32 is the reference: any difference is what the storage cost (plus the nondeterminism of
fewer bits flipping an argmax).
"""
import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import yaml

PIPELINE = Path(__file__).resolve().parents[1] / "pipelines" / "sentiment"
OPTIONS = {
    "fp32": {"logits": "fp32", "hidden": "fp32"},
    "fp16": {"logits": "fp32", "hidden": "fp16"},
    "bf16": {"logits": "fp32", "hidden": "bf16"},
    "int8 hidden": {"logits": "fp32", "hidden": "int8"},
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--epochs", type=int, default=None,
                    help="train this many epochs instead of the pipeline's own schedule (configs/distill.yaml)")
    args = ap.parse_args()
    from cachebrew.recipes.distill import DistillRunConfig, run_distill
    from cachebrew.recipes.export import ExportConfig, run_export
    from cachebrew.components.data import DataConfig
    from cachebrew.recipes.finetune import run_evaluate

    if not (PIPELINE / "models" / "teacher" / "best").is_dir():
        sys.exit(f"{PIPELINE / 'models/teacher/best'} is missing: run `bash pipelines/sentiment/run.sh` first")
    export = yaml.safe_load((PIPELINE / "configs" / "export.yaml").read_text())
    distill = yaml.safe_load((PIPELINE / "configs" / "distill.yaml").read_text())
    tmp = Path(tempfile.mkdtemp(prefix="cb-storage-"))
    rows = []
    try:
        for name, dtypes in OPTIONS.items():
            cfg = dict(export, output=str(tmp / name / "cache"), dtypes=dtypes, progress_bar=False,
                       teachers=[{**t, "path": str(PIPELINE / t["path"])} for t in export["teachers"]],
                       data={**export["data"], "path": str(PIPELINE / export["data"]["path"])})
            t = time.perf_counter()
            result = run_export(ExportConfig.from_dict(cfg))
            d = dict(distill, output_dir=str(tmp / name / "run"), caches=[cfg["output"]],
                     eval_cache=str(PIPELINE / distill["eval_cache"]),
                     train={**distill["train"], "progress_bar": False,
                            **({"epochs": args.epochs, "steps": None} if args.epochs else {})})
            run = run_distill(DistillRunConfig.from_dict(d))
            test = run_evaluate(str(tmp / name / "run" / "best"),
                                DataConfig(path=str(PIPELINE / "data" / "test.parquet")), max_length=64)
            row = {"option": name, "bytes_per_example": result.bytes_total / result.rows_total,
                   "dev_accuracy": run.best["score"], "test_accuracy": test["accuracy"],
                   "seconds": time.perf_counter() - t}
            rows.append(row)
            print(f"{name:<12} {row['bytes_per_example']:>9,.0f} B/ex  dev {row['dev_accuracy']:.4f}  "
                  f"test {row['test_accuracy']:.4f}  ({row['seconds']:.0f} s)", flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=2))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
