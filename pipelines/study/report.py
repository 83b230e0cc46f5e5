"""The study's tables: per task the teacher, each arm's mean ± sd over the reported seeds, the gap closed, steps
and wall time, then every seed's score; written to <out>/table.md from the <task>.json summaries."""
from __future__ import annotations

import json
from pathlib import Path

from .protocol import SECOND_TEACHER_SEED, TASKS

LABELS = {"no_kd": "no KD (tuned lr)", "textbrewer": "TextBrewer 0.2.1 online", "cache_same": "cachebrew, same recipe",
          "cache_best": "cachebrew, best recipe"}


def table(summaries: list[dict]) -> str:
    """Per task: the teacher, then each arm's mean ± sd over the reported seeds, gap closed, steps, wall time;
    then every seed's score (the spread behind the means)."""
    lines = ["| task (metric) | model | score, mean ± sd | gap closed | optimizer steps | wall s / run (fastest, median) |",
             "|---|---|---:|---:|---:|---:|"]
    for s in summaries:
        t = f"{s['task']} ({s['metric']}, {len(s['seeds'])} seeds)"
        lines.append(f"| {t} | teacher MiniLM-L6 ({s['teacher_parameters'] / 1e6:.1f}M) | {100 * s['teacher']:.2f} | | | |")
        if s.get("teachers_mean") is not None:  # arm 4 learns from two teachers: its gap is to their mean, if higher
            lines.append(f"| | + second teacher (seed {SECOND_TEACHER_SEED}): {100 * s['second_teacher']:.2f}; "
                         f"their mean logits | {100 * s['teachers_mean']:.2f} | | | |")
        for arm, a in s["arms"].items():
            gap = f"{100 * a['gap_closed']:.0f} %" if a["gap_closed"] is not None else ""
            name = LABELS[arm] + (f" [{s['chosen_best']}]" if arm == "cache_best" else "")
            lines.append(f"| | {name} ({s['student_parameters'] / 1e6:.1f}M) | {100 * a['mean']:.2f} ± {100 * a['sd']:.2f} "
                         f"| {gap} | {a['steps']} | {a['wall_seconds']:.0f}, {a.get('median_wall_seconds', 0):.0f} |")
    seeds = sorted({seed for s in summaries for seed in s["seeds"]})
    lines += ["", "| task | arm | " + " | ".join(f"seed {x}" for x in seeds) + " |",
              "|---|---|" + "---:|" * len(seeds)]
    for s in summaries:
        for arm, a in s["arms"].items():
            per = {int(k): v for k, v in a["per_seed"].items()}
            lines.append(f"| {s['task']} | {LABELS[arm]} | " + " | ".join(
                f"{100 * per[x]:.2f}" if x in per else "" for x in seeds) + " |")
    return "\n".join(lines) + "\n"


def every_summary(out: Path) -> list[dict]:
    """The summaries of every task finished so far under `out`, in the protocol's task order."""
    return [json.loads((out / f"{t}.json").read_text()) for t in TASKS if (out / f"{t}.json").exists()]

