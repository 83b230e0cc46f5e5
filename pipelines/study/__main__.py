"""Does distilling from the cache pay off? Four arms, three tasks, three seeds, one command.

    python -m pipelines.study [--tasks trec rotten_tomatoes wnut16] [--seeds 1 2 3] [--out pipelines/study_results]
    dvc repro pipelines/study/dvc.yaml                     # the same, stage by stage (teacher, exports, arms 1-3 per
                                                           # seed as DVC stages; arm 4's adaptive search in Python)
    python -m pipelines.study --smoke --out /tmp/smoke     # every stage and arm at toy size (CI)
    python -m pipelines.study --replay                     # the summaries and table.md again from the records alone
    python -m pipelines.study --timing wnut16              # arm 2 and arm 4 timed side by side, today
    python -m pipelines.study --confirm 4 5                # arms 1, 3, 4 as chosen, on fresh seeds

Per task (a fixed training subset, the same for every arm; the full test split):

1. the MiniLM-L6 teacher is fine-tuned once (on the subset; WNUT-16: on the whole train split) and exported
   once per cache: the subset (plain), the subset plus K augmented copies for each K tried, and the dev split
   (checkpoint selection);
2. arm 1's learning rate is tuned **on dev**: screened with seed 0 up a ladder of rates, then the 3 best rerun
   with seeds 100 and 101 and the best mean dev over the three seeds kept (none is a reported seed); the ladder
   climbs until that choice is not the largest rate tried (``tune_rate``); arms 1-3 then run on seed 0
   and each reported seed, the same 2-layer student initialisation for every arm:
   - ``no_kd``       gold labels only, the tuned learning rate (arm 1);
   - ``textbrewer``  TextBrewer 0.2.1's own GeneralDistiller, teacher in memory, the arm-3 recipe (arm 2);
   - ``cache_same``  ``cachebrew distill`` from the plain cache, the same recipe and batches (arm 3);
3. arm 4, ``cache_best``: ``cachebrew distill`` with a step budget that keeps its wall time (its export's share
   included) at most arm 2's mean, its recipe chosen on dev with seed 0 (grids of augmented copies, hard-label
   weight, temperature, what to match; refinements of the choice; then the learning rate, within arm 1's grid;
   then 2 or 4 augmented copies at the final recipe; then a second teacher averaged with the first; then
   two-stage distillation of the choice so far, intermediate layers then prediction layer; last, the 3 best of
   all these on seed 0 rerun with seeds 100 and 101, the best mean dev kept, finalists tied at the top run on
   tie seeds 102, 103, ... until one leads, as for arm 1's rate), then run on the reported seeds. A two-teacher
   arm 4's gap closed is to the teachers' mean logits on test, when higher.

The package: `protocol` (tasks, recipes, candidates, seeds, the verdict's arithmetic), `records` (the memo of
finished runs), `arms` (a task's teacher, caches and the runs of each arm), `search` (the choices on dev, a
task's summary), `report` (the tables). Why the protocol is what it is, and its history: docs/study.md.

Every run keeps its best dev checkpoint and is scored on the test split; its folder of weights is then removed
(``--keep-weights`` keeps them). The script stops with an error if a model predicts a single class (or no
entity), so no table can rest on a collapsed baseline. Each run writes
``<out>/runs/<task>/<arm>/seed-<n>.json`` as it finishes (a rerun skips finished runs); the summary is
``<out>/<task>.json`` and ``<out>/table.md``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

from cachebrew.core.files import atomic_write_text

from .arms import Task
from .protocol import CHOICE_SEEDS, SMOKE, TASKS, TEACHER_SEED
from .report import every_summary as every_task_summary, table
from .search import confirm, fixed_arms, run_task, side_by_side_timing

STAGES = ("all", "teacher", "exports", "arms")


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(obj, indent=2))


def every_summary_of(out: Path, name: str) -> dict:
    return json.loads((out / f"{name}.json").read_text())


def stamp(runs: Path) -> dict:
    """{record: sha256} of a task's records: what a stage leaves for DVC to compare."""
    return {str(p.relative_to(runs)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(runs.rglob("*.json"))}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "study_results"))
    ap.add_argument("--stage", choices=STAGES, default="all",
                    help="one stage of the study (what pipelines/study/dvc.yaml runs), or all of it (default)")
    ap.add_argument("--replay", action="store_true",
                    help="rebuild every finished task's summary and table.md from the records alone (nothing trains)")
    ap.add_argument("--smoke", action="store_true", help="toy sizes, one epoch: checks the protocol runs (CI)")
    ap.add_argument("--report", action="store_true", help="only rewrite table.md from every <task>.json summary in --out")
    ap.add_argument("--timing", choices=list(TASKS), help="time arms 2 and 4 of a finished task side by side, today")
    ap.add_argument("--confirm", nargs="+", type=int, metavar="SEED",
                    help="arms 1, 3, 4 of finished tasks on fresh seeds (never used for a choice): confirm-<task>.json")
    ap.add_argument("--accept-rebuilt-teachers", action="store_true",
                    help="go on with a rebuilt teacher whose weights differ from the recorded one's (another machine "
                         "or library) if its test score is the recorded one")
    ap.add_argument("--keep-weights", action="store_true",
                    help="keep every student's weights and checkpoints under <out>/work (by default a run's folder "
                         "is removed once its record is written: ~250 MB a run, hundreds of runs)")
    args = ap.parse_args(argv)

    def task(name: str) -> Task:  # smoke: toy sizes, where a collapsed model is recorded, not refused
        return Task(name, {**TASKS[name], **SMOKE} if args.smoke else TASKS[name], Path(args.out), smoke=args.smoke,
                    allow_collapse=args.smoke, accept_rebuilt_teachers=args.accept_rebuilt_teachers,
                    keep_weights=args.keep_weights, replay=args.replay)

    def every_summary():  # table.md covers every task run so far, not only those of this invocation
        return every_task_summary(Path(args.out))

    if args.replay:  # the tasks whose summaries exist, recomputed from their records
        names = [s["task"] for s in every_summary() if s["task"] in args.tasks]
        summaries = [run_task(task(name), every_summary_of(Path(args.out), name)["seeds"]) for name in names]
        for s in summaries:
            write_json(Path(args.out) / f"{s['task']}.json", s)
        (Path(args.out) / "table.md").write_text(table(every_summary()))
        return summaries
    if args.report:
        summaries = every_summary()
        (Path(args.out) / "table.md").write_text(table(summaries))
        print(table(summaries))
        return summaries
    import transformers

    transformers.utils.logging.set_verbosity_error()  # load reports of the truncated student are expected
    transformers.utils.logging.disable_progress_bar()
    if args.timing:
        if args.smoke:
            ap.error("--timing times a finished full-size task; it has no --smoke form")
        rows = side_by_side_timing(task(args.timing), args.seeds[:2])  # two seeds: two alternations of the pair
        write_json(Path(args.out) / f"timing-{args.timing}.json", {"date": time.strftime("%Y-%m-%d"), "runs": rows})
        return rows
    if args.confirm:
        if set(args.confirm) & {*CHOICE_SEEDS, *args.seeds}:
            ap.error(f"--confirm: seeds other than the tuning seeds {list(CHOICE_SEEDS)} and the reported seeds {args.seeds}")
        results = []
        for name in args.tasks:  # each task's file as soon as it is done
            r = confirm(task(name), args.confirm)
            write_json(Path(args.out) / f"confirm-{name}.json", r)
            print(name, {arm: (round(100 * a["mean"], 2), a["gap_closed"]) for arm, a in r["arms"].items()}, flush=True)
            results.append(r)
        return results
    if set(CHOICE_SEEDS) & set(args.seeds):
        ap.error(f"--seeds: seeds {list(CHOICE_SEEDS)} are the tuning seeds; report on others")
    out = Path(args.out)
    if args.stage != "all":  # one of the DVC stages: its records, and a stamp naming them (the stage's output)
        for name in args.tasks:
            t = task(name)
            {"teacher": lambda: t.fine_tune_teacher("teacher", TEACHER_SEED), "exports": t.prepare,
             "arms": lambda: fixed_arms(t, args.seeds)}[args.stage]()
            write_json(out / "stages" / f"{args.stage}-{name}{''.join(f'-{s}' for s in args.seeds) if args.stage == 'arms' else ''}.json",
                       {"stage": args.stage, "task": name, "seeds": args.seeds if args.stage == "arms" else None,
                        "records": stamp(t.runs)})
        return None
    summaries = []
    for name in args.tasks:
        s = run_task(task(name), args.seeds)
        write_json(out / f"{name}.json", s)
        summaries.append(s)
        (out / "table.md").write_text(table(every_summary()))
        print(table([s]), flush=True)
    return summaries


if __name__ == "__main__":
    main()
