"""evaluate stage: merge `cachebrew evaluate` results into the results table (markdown + JSON).

    python ../common/report.py results/teacher.json results/baseline.json results/distilled.json \
        --names teacher "student, no distillation" "student, distilled from cache" --out results/table.md \
        --teacher 0 --baseline 1 --metrics results/metrics.json

With --teacher and --baseline (indices into the results) each other row gets a "gap closed" column:
(student - no-KD) / (teacher - no-KD), the share of the student -> teacher gap that distillation closed.
--metrics writes the flat {row: score, gap_closed: ...} file that `dvc exp show` tabulates.
"""
import argparse
import json
import re
from pathlib import Path


def gap_closed(student: float, baseline: float, teacher: float) -> float | None:
    return (student - baseline) / (teacher - baseline) if teacher > baseline else None


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("results", nargs="+")
    ap.add_argument("--names", nargs="+", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--teacher", type=int, help="index of the teacher's result (for the gap column)")
    ap.add_argument("--baseline", type=int, help="index of the no-distillation student's result")
    ap.add_argument("--keys", nargs="+", help="short names of the rows in --metrics (default: the names, slugged)")
    ap.add_argument("--metrics", help="flat JSON of scores and gaps, for `dvc metrics show` / `dvc exp show`")
    args = ap.parse_args()
    if len(args.names) != len(args.results) or (args.keys and len(args.keys) != len(args.results)):
        ap.error(f"{len(args.results)} results need as many --names (and --keys), got {len(args.names)}")
    rows = [json.loads(Path(p).read_text()) for p in args.results]
    metric = "f1" if "f1" in rows[0] else "accuracy"
    gaps = args.teacher is not None and args.baseline is not None
    teacher = rows[args.teacher][metric] if gaps else None
    baseline = rows[args.baseline][metric] if gaps else None
    lines = [f"| model | test {metric} |{' gap closed |' if gaps else ''} parameters | size (MB) | "
             f"inference ex/s ({rows[0]['device']}) |",
             "|---|---:|" + ("---:|" if gaps else "") + "---:|---:|---:|"]
    flat = {}
    for i, (name, r) in enumerate(zip(args.names, rows)):
        key = args.keys[i] if args.keys else slug(name)
        flat[key] = round(100 * r[metric], 2)
        cell = ""
        if gaps:
            g = gap_closed(r[metric], baseline, teacher) if i not in (args.teacher, args.baseline) else None
            cell = f" {100 * g:.0f} % |" if g is not None else " |"
            if g is not None:
                flat[f"{key}_gap_closed"] = round(g, 4)
        lines.append(f"| {name} | {100 * r[metric]:.2f} |{cell} {r['parameters'] / 1e6:.1f}M | {r['size_mb']:.1f} | "
                     f"{r['inference_examples_per_second']:,.0f} |")
    for name, r in zip(args.names, rows):
        if r.get("predicted_classes") == 1:  # its score is the majority rate: no comparison rests on it
            lines.append(f"\n**{name} predicts one class on every test example** (accuracy = majority rate "
                         f"{100 * r['majority_rate']:.2f}): it did not train; raise its learning rate or epochs.")
    text = "\n".join(lines) + "\n"
    Path(args.out).write_text(text)
    Path(args.out).with_suffix(".json").write_text(json.dumps(dict(zip(args.names, rows)), indent=2))
    if args.metrics:
        Path(args.metrics).write_text(json.dumps(flat, indent=2) + "\n")
    print(text)


if __name__ == "__main__":
    main()
