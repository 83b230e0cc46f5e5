"""The study's choices, made on dev and never on test: arm 1's learning rate (a ladder, then a finalists round),
arm 4's recipe (grids, refinements, rates, copies, a second teacher, two stages, then a finalists round), each
within its step budget; then the reported seeds, the summary of a task, the side-by-side timing and the
confirmation on fresh seeds. Adaptive (what runs next depends on the dev scores so far), so Python, not DVC
stages: every run it asks for is a record (`records`), so a rerun trains only what is not recorded.
"""
from __future__ import annotations

import json
import re
import shutil
import statistics
import time

from .arms import Task, run_textbrewer_online
from .protocol import (CHOICE_SEEDS, COPIES_REFINEMENT, FINALISTS, LR_LADDER, REFINEMENTS, SAME_RECIPE,
                       SECOND_TEACHER_SEED, TIE_SEEDS, TUNE_SEED, TUNE_SEEDS, TWO_STAGE_SPLIT, candidate_cache,
                       candidate_name, candidate_recipe, gap_closed, gap_reference, main_score, mean_sd,
                       second_teacher_cache, with_copies)


def pick(candidates: list[dict]) -> dict:
    """The best dev score among the candidates that did not collapse; a tie keeps the one tried first (the
    choice it would replace: a change must win on dev to be kept)."""
    ok = [r for r in candidates if not r["collapsed"]] or candidates
    return max(ok, key=lambda r: r["dev"])


def choose_among_finalists(screened: list[dict], rerun, size: int = FINALISTS, seeds: tuple[int, ...] = TUNE_SEEDS,
                           tie_seeds: tuple[int, ...] = TIE_SEEDS) -> tuple[dict, list[dict]]:
    """The `size` best of `screened` (runs on seeds[0], TUNE_SEED), each rerun on the other `seeds` by
    `rerun(record, seed)`; the one with the best mean dev score, and the round's scores. Finalists tied at the top
    run on `tie_seeds` in turn until one leads (TIE_SEEDS); still tied, the one better on TUNE_SEED is kept (the
    earlier tried, on a tie there too), as `pick` does."""
    ok = [r for r in screened if not r["collapsed"]] or screened
    finalists = sorted(ok, key=lambda r: -r["dev"])[:size]  # stable: equal dev keeps the order tried
    rounds = []
    for r in finalists:
        devs = [r["dev"]] + [rerun(r, seed)["dev"] for seed in seeds[1:]]
        rounds.append({"variant": r["variant"], "dev": dict(zip(map(str, seeds), devs)),
                       "mean_dev": statistics.mean(devs)})

    def leaders(among):  # rounded, so that equal totals of correct dev examples are equal means
        top = max(round(rounds[i]["mean_dev"], 9) for i in among)
        return [i for i in among if round(rounds[i]["mean_dev"], 9) == top]

    tied = leaders(range(len(rounds)))
    for seed in tie_seeds:
        if len(tied) == 1:
            break
        for i in tied:
            rounds[i]["dev"][str(seed)] = rerun(finalists[i], seed)["dev"]
            rounds[i]["mean_dev"] = statistics.mean(rounds[i]["dev"].values())
        tied = leaders(tied)
    return finalists[tied[0]], rounds


def tune_rate(screen, rerun, round_size: dict) -> tuple[list[dict], dict, list[dict]]:
    """Arm 1's learning rate: `screen(lr)` (seed 0) up LR_LADDER from its first two rungs while the best is the
    largest tried, then the finalists round (`rerun`, as `choose_among_finalists`). If the round's choice is the
    largest rate tried, the ladder has not turned for the final choice either: the next rung is screened and the
    round held again (its earlier runs are records, so only the new ones train). Returns the screened runs, the
    choice and the round."""
    tried = [screen(lr) for lr in LR_LADDER[:2]]

    def can_climb(r):  # r's rate is the largest tried, and the ladder has a next rung
        return len(tried) < len(LR_LADDER) and r["params"]["lr"] == LR_LADDER[len(tried) - 1]

    while True:
        while can_climb(pick(tried)):
            tried.append(screen(LR_LADDER[len(tried)]))
        chosen, rounds = choose_among_finalists(tried, rerun, **round_size)
        if not can_climb(chosen):
            return tried, chosen, rounds
        tried.append(screen(LR_LADDER[len(tried)]))


def finalists_round(task: Task) -> dict:
    """A finalists round's size: at smoke size 2 finalists on 2 seeds (the same code in a third of the time)."""
    return {"size": 2, "seeds": TUNE_SEEDS[:2], "tie_seeds": TIE_SEEDS[:1]} if task.smoke else {}


def fixed_arms(task: Task, seeds: list[int]) -> dict:
    """The stages whose runs no dev score decides: the teacher and caches, arm 1's rate (tuned on dev: the ladder,
    then its finalists on the tuning seeds, the same round as arm 4's recipe), then arms 1-3 on the tuning seed
    and `seeds`. What arm 4's search starts from."""
    info = task.prepare()
    tried, chosen_no_kd, no_kd_round = tune_rate(lambda lr: task.run_no_kd(TUNE_SEED, lr),
                                                 lambda r, seed: task.run_no_kd(seed, r["params"]["lr"]),
                                                 finalists_round(task))
    lr = chosen_no_kd["params"]["lr"]
    runs = {arm: [] for arm in ("no_kd", "textbrewer", "cache_same", "cache_best")}
    timing = {"textbrewer": [], "cache_same": []}
    for seed in [TUNE_SEED, *seeds]:
        if seed != TUNE_SEED:
            runs["no_kd"].append(task.run_no_kd(seed, lr))
        for arm, run in (("textbrewer", lambda: task.run_textbrewer(seed, SAME_RECIPE, lr)),
                         ("cache_same", lambda: task.run_same(seed, lr))):
            rec = run()
            timing[arm].append(rec)
            if seed != TUNE_SEED:
                runs[arm].append(rec)
    return {"info": info, "tune": {"no_kd": tried}, "finalists": {"no_kd": no_kd_round}, "lr": lr, "runs": runs,
            "timing": timing}


def run_task(task: Task, seeds: list[int]) -> dict:
    """A task's whole study: `fixed_arms`, then arm 4's search on dev and its reported seeds; the task's summary."""
    fixed = fixed_arms(task, seeds)
    info, tune, finalists, lr = fixed["info"], fixed["tune"], fixed["finalists"], fixed["lr"]
    runs, timing = fixed["runs"], fixed["timing"]
    round_size = finalists_round(task)
    # -- arm 4: its step budget, then its recipe on dev (seed 0), then the reported seeds ---------------------
    # the budget: arm 2's mean wall time (4 runs), less the share of arm 4's export (the reported seeds share one
    # export), at arm 3's mean seconds per step: arm 4 takes no longer than TextBrewer online, up to what its own
    # matches add per step (attention maps, weights: not budgeted separately; --timing measures the chosen one)
    online = statistics.mean(r["train_seconds"] for r in timing["textbrewer"])
    per_step = statistics.mean(r["train_seconds"] / r["steps"] for r in timing["cache_same"])

    def exported(cache):  # seconds of the export(s) a run reads: "a+b" reads two caches
        return sum(info["export_seconds"][c] for c in cache.split("+"))

    def steps_within(cache):  # at least 2 (toy sizes): a two-stage run needs a step in each stage
        return max(int((online - exported(cache) / len(seeds)) / per_step), 2)

    budget = {cache: steps_within(cache) for cache in {candidate_cache(c) for c in task.candidates}}
    tune["cache_best"] = [task.run_cache("cache_best", candidate_name(c), TUNE_SEED, candidate_cache(c),
                                         candidate_recipe(c), lr, steps=budget[candidate_cache(c)])
                          for c in task.candidates]
    chosen = pick(tune["cache_best"])
    # then refinements of each task's choice, group by group (REFINEMENTS; same cache and steps)
    for group in REFINEMENTS:
        base = chosen
        for suffix, change in group.items():
            recipe = change(base["params"]["recipe"])
            if recipe != base["params"]["recipe"]:  # else nothing to change (no matches to weight)
                tune["cache_best"].append(task.run_cache("cache_best", f"{base['variant']}-{suffix}", TUNE_SEED,
                                                         base["params"]["cache"], recipe, lr,
                                                         steps=base["params"]["steps"]))
        chosen = pick(tune["cache_best"])
    # then the chosen recipe at each other learning rate arm 1's grid tried. Arms 1-3 train at arm 1's
    # tuned rate; arm 4 may choose another, but only within the range the baseline was tuned over.
    tune["cache_best"] += [task.run_cache("cache_best", f"{chosen['variant']}-lr{x:g}", TUNE_SEED,
                                          chosen["params"]["cache"], chosen["params"]["recipe"], x,
                                          steps=chosen["params"]["steps"])
                           for x in sorted({r["params"]["lr"] for r in tune["no_kd"]} - {lr})]
    chosen = pick(tune["cache_best"])
    # then more augmented copies at the final recipe and rate, each cache exported once, at its own budget
    base = chosen
    for k in COPIES_REFINEMENT:
        cache = with_copies(base["params"]["cache"], k)
        if cache == base["params"]["cache"]:
            continue
        if cache not in task.copies_of:
            info["export_seconds"][cache] = task.export(cache, k, task.train)
            task.copies_of[cache] = k
        tune["cache_best"].append(task.run_cache("cache_best", re.sub(r"^k\d+", f"k{k}", base["variant"]), TUNE_SEED,
                                                 cache, base["params"]["recipe"], base["params"]["lr"],
                                                 steps=steps_within(cache)))
    chosen = pick(tune["cache_best"])
    # then two teachers: the second's logits over the same rows, averaged with the first's by the loader
    base, cache = chosen, chosen["params"]["cache"]
    second = second_teacher_cache(cache)
    info["export_seconds"][second] = task.export(second, task.copies_of[cache], task.train)
    task.copies_of[second] = task.copies_of[cache]
    tune["cache_best"].append(task.run_cache("cache_best", f"{base['variant']}-2t", TUNE_SEED, f"{cache}+{second}",
                                             base["params"]["recipe"], base["params"]["lr"],
                                             steps=steps_within(f"{cache}+{second}")))
    # then two-stage distillation of the choice so far (TWO_STAGE_SPLIT), when it matches intermediate layers
    base = pick(tune["cache_best"])
    if base["params"]["recipe"]["intermediate_matches"]:
        p = base["params"]
        tune["cache_best"].append(task.run_cache("cache_best", f"{base['variant']}-2s", TUNE_SEED, p["cache"],
                                                 p["recipe"], p["lr"], steps=p["steps"],
                                                 first_stage_steps=max(int(TWO_STAGE_SPLIT * p["steps"]), 1)))
    # last, the final choice: the finalists of every candidate above on the tuning seeds
    chosen, finalists["cache_best"] = choose_among_finalists(
        tune["cache_best"], lambda r, seed: task.rerun("cache_best", r, seed), **round_size)
    best_recipe, best_variant, best_cache = chosen["params"]["recipe"], chosen["variant"], chosen["params"]["cache"]
    best_lr = chosen["params"]["lr"]
    for seed in seeds:
        runs["cache_best"].append(task.rerun("cache_best", chosen, seed))
    teacher = main_score(info["teacher_test"])
    # a two-teacher arm 4 is measured against what it imitates, the teachers' mean, when that scores higher
    pair = main_score(task.teachers_mean_test()) if "+" in best_cache else None
    no_kd = statistics.mean(r["test"] for r in runs["no_kd"])
    arms = {}
    for arm, recs in runs.items():
        m, sd = mean_sd([r["test"] for r in recs])
        reference = gap_reference(arm, teacher, pair)
        share = exported(best_cache if arm == "cache_best" else "plain") / len(seeds) \
            if arm.startswith("cache") else 0.0
        arms[arm] = {"mean": m, "sd": sd, "per_seed": {r["seed"]: r["test"] for r in recs},
                     "gap_closed": gap_closed(m, no_kd, reference) if arm != "no_kd" else None,
                     "gap_closed_first_teacher": gap_closed(m, no_kd, teacher) if arm != "no_kd" else None,
                     "steps": recs[0]["steps"], "train_seconds": statistics.median(r["train_seconds"] for r in recs),
                     "fastest_train_seconds": min(r["train_seconds"] for r in recs), "export_share_seconds": share}
        # the fastest seed is the one least disturbed by other jobs on the machine (a benchmark's min of repeats)
        arms[arm]["wall_seconds"] = arms[arm]["fastest_train_seconds"] + share
        arms[arm]["median_wall_seconds"] = arms[arm]["train_seconds"] + share
    summary = {"task": task.name, "metric": "f1" if task.token_level else "accuracy", "teacher": teacher,
               "teachers_mean": pair,
               "seeds": seeds, "tuning_seed": TUNE_SEED, "chosen_lr": lr, "best_lr": best_lr, "chosen_best": best_variant,
               "best_recipe": best_recipe, "best_cache": best_cache, "best_copies": task.copies_of[best_cache.split("+")[0]],
               "best_steps": chosen["params"]["steps"],
               "best_first_stage_steps": chosen["params"].get("first_stage_steps"), "arms": arms,
               "tuning": {k: [{"variant": r["variant"], "dev": r["dev"]} for r in v] for k, v in tune.items()},
               "tuning_seeds": list(round_size.get("seeds", TUNE_SEEDS)),
               "tie_seeds": list(round_size.get("tie_seeds", TIE_SEEDS)), "finalists": finalists,
               "second_teacher": main_score(task.fine_tune_teacher("teacher2", SECOND_TEACHER_SEED)["teacher_test"]),
               "spec": task.spec, "teacher_info": info, "teacher_parameters": info["teacher_test"]["parameters"],
               "student_parameters": runs["no_kd"][0]["test_metrics"]["parameters"]}
    return summary


def side_by_side_timing(task: Task, seeds: list[int]) -> list[dict]:
    """Arm 2 and arm 4 (its chosen recipe and steps) trained alternately on the same machine and day, seed by
    seed: wall time compared within one run, as the benchmarks do. Needs the task's summary and work dir."""
    s = task.summary()
    task.prepare_chosen(s)
    rows = []
    for seed in seeds:
        for arm in ("textbrewer", "cache_best"):
            out = task.work / "timing" / f"{arm}-seed-{seed}"
            if out.exists():
                shutil.rmtree(out)
            t = time.perf_counter()
            if arm == "textbrewer":
                run_textbrewer_online(task.distill_config(out, seed, "plain", SAME_RECIPE, s["chosen_lr"]),
                                      str(task.work / "teacher" / "best"))
            else:
                task.distill(out, seed, s["best_cache"], s["best_recipe"], s["best_lr"], s["best_steps"],
                             s.get("best_first_stage_steps"))
            rows.append({"arm": arm, "seed": seed, "train_seconds": time.perf_counter() - t})
            if not task.keep_weights:
                shutil.rmtree(out)
            print(f"{task.name} timing {arm:11s} seed {seed}: {rows[-1]['train_seconds']:.0f}s", flush=True)
    return rows


def confirm(task: Task, seeds: list[int]) -> dict:
    """Arms 1, 3 and 4 of a finished task, exactly as chosen and run there, on seeds no choice ever saw: does the
    gap closed hold on fresh seeds? (Arm 2 is left out: it trained the same weights as arm 3 on every seed.)"""
    s = task.summary()
    if set(seeds) & {*CHOICE_SEEDS, *s["seeds"]}:
        raise SystemExit(f"--confirm {seeds}: {task.name} was tuned on seeds {list(CHOICE_SEEDS)} and reported seeds {s['seeds']}; "
                         f"fresh seeds only")
    task.prepare_chosen(s)
    lr = s["chosen_lr"]
    chosen = json.loads((task.runs / "cache_best" / s["chosen_best"] / f"seed-{TUNE_SEED}.json").read_text())
    runs = {"no_kd": [], "cache_same": [], "cache_best": []}
    for seed in seeds:
        runs["no_kd"].append(task.run_no_kd(seed, lr))
        runs["cache_same"].append(task.run_same(seed, lr))
        runs["cache_best"].append(task.rerun("cache_best", chosen, seed))
    no_kd = statistics.mean(r["test"] for r in runs["no_kd"])
    arms = {}
    for arm, recs in runs.items():
        m, sd = mean_sd([r["test"] for r in recs])
        reference = gap_reference(arm, s["teacher"], s.get("teachers_mean"))
        arms[arm] = {"mean": m, "sd": sd, "per_seed": {r["seed"]: r["test"] for r in recs},
                     "gap_closed": gap_closed(m, no_kd, reference) if arm != "no_kd" else None}
    return {"task": task.name, "seeds": seeds, "teacher": s["teacher"], "chosen_best": s["chosen_best"], "arms": arms}
