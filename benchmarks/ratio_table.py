"""One ratio table from the JSON files of a benchmark run (benchmarks/gpu.sh writes them into one folder).

    python benchmarks/ratio_table.py OUT_DIR [--expect distill_logits distill_hidden export reader] [--markdown F]

Reads distill_logits.json / distill_hidden.json (distill_throughput.py), export.json (export_throughput.py)
and reader.json (reader.py), whichever exist, and prints a markdown table: each ratio's median over the
interleaved rounds with its range, so one table says what the run measured and how tightly; then each distill
arm's own rate (examples/s), and the precision and timing each benchmark ran with. A figure that should be
there and is not (a file named in --expect that is absent, a distill arm that failed or was not run, a ratio
whose arm is missing, a NaN) is printed as MISSING, listed at the end, and makes the exit status 3.
"""
import argparse
import json
import math
import statistics
from pathlib import Path

DISTILL = {"logits": "KD on logits", "hidden": "KD + 4 hidden_mse (projected)"}
DISTILL_RATIOS = [("cache", "ceiling"), ("cache", "cache_mem"), ("cache", "online"), ("cache", "textbrewer"),
                  ("hf_cache", "hf_online")]
MISSING = "MISSING"


def finite(xs) -> bool:
    return bool(xs) and all(isinstance(x, (int, float)) and math.isfinite(x) for x in xs)


def fmt(rounds: list[float], digits: int = 2) -> str:
    if not finite(rounds):
        return MISSING
    return f"{statistics.median(rounds):.{digits}f} ({min(rounds):.{digits}f}-{max(rounds):.{digits}f})"


def collect(out: Path, expect=()):
    """(ratio rows, arm rows, notes, missing): rows are (benchmark, name, value)."""
    ratios, arms, notes, missing = [], [], [], []
    for stem in expect:
        if not (out / f"{stem}.json").is_file():
            missing.append(f"{stem}.json (its step failed or did not run)")
    for config, what in DISTILL.items():
        path = out / f"distill_{config}.json"
        if not path.is_file():
            continue
        run = json.loads(path.read_text())
        bench = f"distill, {what}"
        rounds = run.get("rounds", {})
        planned = run.get("arms") or list(rounds)
        failed = run.get("failed", {})
        for num, den in DISTILL_RATIOS:
            if num not in planned or den not in planned:
                continue
            if num in rounds and den in rounds:
                value = fmt([x / y for x, y in zip(rounds[num], rounds[den], strict=True)])
            else:
                value = MISSING
            ratios.append((bench, f"{num} / {den}", value))
            if value == MISSING:
                missing.append(f"{bench}: {num} / {den}")
        for arm in planned:
            value = fmt(rounds.get(arm, []), 1)
            if value == MISSING:
                missing.append(f"{bench}: arm {arm}" + (f" ({failed[arm]})" if arm in failed else ""))
            arms.append((bench, arm, value))
        notes.append(f"{bench}: {run.get('device', '?')}, precision {run.get('precision', '?')}, "
                     f"{run.get('timing', '?')}")
    path = out / "export.json"
    if path.is_file():
        run = json.loads(path.read_text())
        for r in run["results"]:
            for name, key in (("export / bare forward (end to end)", "ratio_rounds"),
                              ("export / bare forward (marginal)", "ratio_marginal_rounds")):
                value = fmt(r.get(key, []))
                ratios.append((f"export, {r['config']} ({r.get('rows', '?')} rows)", name, value))
                if value == MISSING:
                    missing.append(f"export, {r['config']}: {name}")
        notes.append(f"export: {run.get('device_name', run.get('device', '?'))}, precision "
                     f"{run.get('precision', '?')} (export amp and bare forward alike)")
    path = out / "reader.json"
    if path.is_file():
        runs = json.loads(path.read_text())
        for cache in sorted({r["cache"] for r in runs}):
            by_workers = {r["workers"]: r for r in runs if r["cache"] == cache}
            base = by_workers.get(0)
            for w, r in sorted(by_workers.items()):
                if w and base:
                    value = fmt([a / b for a, b in zip(r["rows_per_s_rounds"], base["rows_per_s_rounds"],
                                                       strict=True)])
                    ratios.append((f"reader, {cache} cache", f"{w} workers / main process (rows/s)", value))
                    if value == MISSING:
                        missing.append(f"reader, {cache} cache: {w} workers")
    return ratios, arms, notes, missing


def render(ratios, arms, notes, missing) -> str:
    lines = ["| benchmark | ratio | median (range over rounds) |", "|---|---|---:|"]
    lines += [f"| {b} | {n} | {v} |" for b, n, v in ratios]
    if arms:
        lines += ["", "| benchmark | arm | examples/s, median (range over rounds) |", "|---|---|---:|"]
        lines += [f"| {b} | {n} | {v} |" for b, n, v in arms]
    if notes:
        lines += [""] + [f"* {n}" for n in notes]
    if missing:
        lines += ["", f"{MISSING}: " + "; ".join(missing)]
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--expect", nargs="*", default=[],
                    help="JSON stems that must be there (distill_logits distill_hidden export reader)")
    ap.add_argument("--markdown", type=Path, default=None, help="also write the table to this file")
    args = ap.parse_args(argv)
    ratios, arms, notes, missing = collect(args.out, args.expect)
    if not ratios and not arms and not missing:
        raise SystemExit(f"{args.out}: no benchmark JSON files (distill_*.json, export.json, reader.json)")
    text = render(ratios, arms, notes, missing)
    print(text, end="")
    if args.markdown:
        args.markdown.write_text(text)
    if missing:
        raise SystemExit(3)  # the table is printed; some figures are not in it


if __name__ == "__main__":
    main()
