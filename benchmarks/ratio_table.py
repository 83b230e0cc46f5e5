"""One ratio table from the JSON files of a benchmark run (benchmarks/gpu.sh writes them into one folder).

    python benchmarks/ratio_table.py OUT_DIR

Reads distill_logits.json / distill_hidden.json (distill_throughput.py), export.json (export_throughput.py)
and reader.json (reader.py), whichever exist, and prints a markdown table: each ratio's median over the
interleaved rounds with its range, so one table says what the run measured and how tightly.
"""
import json
import statistics
import sys
from pathlib import Path


def fmt(rounds: list[float]) -> str:
    return f"{statistics.median(rounds):.2f} ({min(rounds):.2f}-{max(rounds):.2f})"


def rows(out: Path):
    for config in ("logits", "hidden"):
        path = out / f"distill_{config}.json"
        if not path.is_file():
            continue
        run = json.loads(path.read_text())
        what = "KD on logits" if config == "logits" else "KD + 4 hidden_mse (projected)"
        for name, r in run["ratios"].items():
            yield f"distill, {what}", name, fmt(r["rounds"])
    path = out / "export.json"
    if path.is_file():
        for r in json.loads(path.read_text())["results"]:
            yield f"export, {r['config']}", "export / bare forward (end to end)", fmt(r["ratio_rounds"])
            yield f"export, {r['config']}", "export / bare forward (marginal)", fmt(r["ratio_marginal_rounds"])
    path = out / "reader.json"
    if path.is_file():
        runs = json.loads(path.read_text())
        for cache in sorted({r["cache"] for r in runs}):
            by_workers = {r["workers"]: r for r in runs if r["cache"] == cache}
            base = by_workers.get(0)
            for w, r in sorted(by_workers.items()):
                if w and base:
                    yield (f"reader, {cache} cache", f"{w} workers / main process (rows/s)",
                           fmt([a / b for a, b in zip(r["rows_per_s_rounds"], base["rows_per_s_rounds"], strict=True)]))


def main():
    out = Path(sys.argv[1])
    table = list(rows(out))
    if not table:
        raise SystemExit(f"{out}: no benchmark JSON files (distill_*.json, export.json, reader.json)")
    print("| benchmark | ratio | median (range over rounds) |\n|---|---|---:|")
    for bench, name, value in table:
        print(f"| {bench} | {name} | {value} |")


if __name__ == "__main__":
    main()
