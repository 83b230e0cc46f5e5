"""report stage: merge `cachebrew evaluate` results into the results table (markdown + JSON).

    python ../common/report.py results/teacher.json results/baseline.json results/distilled.json \
        --names teacher "student, no distillation" "student, distilled from cache" --out results/table.md \
        --teacher 0 --baseline 1 --metrics results/metrics.json

Each positional argument is one row. With --seeds, a row's path may hold `{seed}`: the row is then that model
trained once per seed, reported as mean ± sd (sample sd) over the seeds, with a per-seed table below; in a DVC
stage `${students}` (a params dict `{seeds: [...]}`) unpacks to `--seeds 1 2 3`.

With --teacher and --baseline (indices into the rows) each other row gets a "gap closed" column:
(student - no-KD) / (teacher - no-KD) of the means, the share of the student -> teacher gap that distillation
closed; with seeds, a line says whether the student's mean beats the baseline's by more than the larger sd.
--metrics writes the flat {row: mean, row_sd: sd, row_gap_closed: ...} file that `dvc exp show` tabulates.
"""
import argparse
import json
import re
import statistics
from pathlib import Path


def gap_closed(student: float, baseline: float, teacher: float) -> float | None:
    return (student - baseline) / (teacher - baseline) if teacher > baseline else None


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def load_row(pattern: str, seeds: list[int] | None) -> dict[int | None, dict]:
    """{seed: result} for a row whose path holds `{seed}`, else {None: result}."""
    if "{seed}" in pattern:
        if not seeds:
            raise SystemExit(f"{pattern}: a per-seed path needs --seeds")
        return {s: json.loads(Path(pattern.format(seed=s)).read_text()) for s in seeds}
    return {None: json.loads(Path(pattern).read_text())}


def spread(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("results", nargs="+", help="one result file per row; `{seed}` in a path: one per --seeds")
    ap.add_argument("--names", nargs="+", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seeds", nargs="+", type=int, help="the seeds that `{seed}` in a row's path takes")
    ap.add_argument("--teacher", type=int, help="index of the teacher's row (for the gap column)")
    ap.add_argument("--baseline", type=int, help="index of the no-distillation student's row")
    ap.add_argument("--keys", nargs="+", help="short names of the rows in --metrics (default: the names, slugged)")
    ap.add_argument("--metrics", help="flat JSON of scores and gaps, for `dvc metrics show` / `dvc exp show`")
    args = ap.parse_args()
    if len(args.names) != len(args.results) or (args.keys and len(args.keys) != len(args.results)):
        ap.error(f"{len(args.results)} results need as many --names (and --keys), got {len(args.names)}")
    rows = [load_row(p, args.seeds) for p in args.results]
    first = next(iter(rows[0].values()))
    metric = "f1" if "f1" in first else "accuracy"
    scores = [[100 * r[metric] for r in row.values()] for row in rows]
    means = [statistics.mean(s) for s in scores]
    seeded = any(None not in row for row in rows)
    gaps = args.teacher is not None and args.baseline is not None
    teacher = means[args.teacher] if gaps else None
    baseline = means[args.baseline] if gaps else None
    head = f"test {metric}, mean ± sd over seeds {', '.join(map(str, args.seeds))}" if seeded else f"test {metric}"
    lines = [f"| model | {head} |{' gap closed |' if gaps else ''} parameters | size (MB) | "
             f"inference ex/s ({first['device']}) |",
             "|---|---:|" + ("---:|" if gaps else "") + "---:|---:|---:|"]
    flat = {}
    for i, (name, row, s, mean) in enumerate(zip(args.names, rows, scores, means)):
        key = args.keys[i] if args.keys else slug(name)
        r = next(iter(row.values()))
        flat[key] = round(mean, 2)
        cell = f"{mean:.2f}"
        if None not in row:
            flat[f"{key}_sd"] = round(spread(s), 2)
            cell += f" ± {spread(s):.2f}"
        gap = ""
        if gaps:
            g = gap_closed(mean, baseline, teacher) if i not in (args.teacher, args.baseline) else None
            gap = f" {100 * g:.0f} % |" if g is not None else " |"
            if g is not None:
                flat[f"{key}_gap_closed"] = round(g, 4)
        speed = statistics.mean(x["inference_examples_per_second"] for x in row.values())
        lines.append(f"| {name} | {cell} |{gap} {r['parameters'] / 1e6:.1f}M | {r['size_mb']:.1f} | {speed:,.0f} |")
    if seeded:
        lines += ["", "| model | " + " | ".join(f"seed {s}" for s in args.seeds) + " |",
                  "|---|" + "---:|" * len(args.seeds)]
        for name, row in zip(args.names, rows):
            if None not in row:
                lines.append(f"| {name} | " + " | ".join(f"{100 * row[s][metric]:.2f}" for s in args.seeds) + " |")
        if gaps:
            base_sd = spread(scores[args.baseline])
            for i, (name, s, mean) in enumerate(zip(args.names, scores, means)):
                if i in (args.teacher, args.baseline) or None in rows[i]:
                    continue
                margin, bar = mean - baseline, max(base_sd, spread(s))
                verdict = "beats" if margin > bar else "does not beat"
                lines.append(f"\n{name} {verdict} the no-distillation student by more than the larger sd: "
                             f"{margin:+.2f} points on the mean, larger sd {bar:.2f}.")
    for name, row in zip(args.names, rows):
        for seed, r in row.items():
            if r.get("predicted_classes") == 1:  # its score is the majority rate: no comparison rests on it
                which = f" (seed {seed})" if seed is not None else ""
                lines.append(f"\n**{name}{which} predicts one class on every test example** (accuracy = majority "
                             f"rate {100 * r['majority_rate']:.2f}): it did not train; raise its learning rate or epochs.")
    text = "\n".join(lines) + "\n"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    results = {name: (row[None] if None in row else {str(s): r for s, r in row.items()})
               for name, row in zip(args.names, rows)}
    Path(args.out).with_suffix(".json").write_text(json.dumps(results, indent=2))
    if args.metrics:
        Path(args.metrics).write_text(json.dumps(flat, indent=2) + "\n")
    print(text)


if __name__ == "__main__":
    main()
