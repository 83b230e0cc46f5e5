"""evaluate stage: merge `cachebrew evaluate` results into the results table (markdown + JSON).

    python ../common/report.py results/teacher.json results/baseline.json results/distilled.json \
        --names teacher "student, no distillation" "student, distilled from cache" --out results/table.md
"""
import argparse
import json
from pathlib import Path


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("results", nargs="+")
    ap.add_argument("--names", nargs="+", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    rows = [json.loads(Path(p).read_text()) for p in args.results]
    metric = "f1" if "f1" in rows[0] else "accuracy"
    lines = [f"| model | test {metric} | parameters | size (MB) | inference ex/s ({rows[0]['device']}) |",
             "|---|---:|---:|---:|---:|"]
    for name, r in zip(args.names, rows):
        lines.append(f"| {name} | {100 * r[metric]:.2f} | {r['parameters'] / 1e6:.1f}M | {r['size_mb']:.1f} | "
                     f"{r['inference_examples_per_second']:,.0f} |")
    text = "\n".join(lines) + "\n"
    Path(args.out).write_text(text)
    Path(args.out).with_suffix(".json").write_text(json.dumps(dict(zip(args.names, rows)), indent=2))
    print(text)


if __name__ == "__main__":
    main()
