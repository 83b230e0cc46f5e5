"""The study's arms: one task's teacher and caches, and the runs that train each arm's students.

``Task`` fine-tunes the teacher and exports its caches once, and trains arm 1 (``no_kd``, `cachebrew train`),
arm 2 (``textbrewer``: TextBrewer 0.2.1's own GeneralDistiller, the teacher in memory, inside `cachebrew distill`'s
recipe through its ``make_distiller`` hook), arm 3 (``cache_same``) and arm 4's candidates (``cache_best``:
`cachebrew distill`), each run recorded (`records.Records`) and scored on dev and test.
"""
from __future__ import annotations

import copy
import json
import shutil
import time
from dataclasses import replace
from pathlib import Path

from cachebrew.recipes.distill import DistillRecipe

from .protocol import (AUGMENT_OPS, BEST_CANDIDATES, DATA, MATCH_CANDIDATES, MINILM, PRUNED_CANDIDATES,
                       RECIPE_CANDIDATES, SAME_RECIPE, SECOND_TEACHER_SEED, STUDENT_LAYERS, TEACHER_SEED,
                       TOKEN_AUGMENT_OPS,
                       CHOICE_SEEDS, CollapsedModel, cache_outputs, candidate_cache, check_not_collapsed,
                       intermediate_stage, main_score, prediction_stage)
from .records import Records


class Task:
    """One task's data, teacher and caches; `run_*` train one arm and return its record (cached on disk)."""

    def __init__(self, name: str, spec: dict, out: Path, smoke: bool = False, allow_collapse: bool = False,
                 accept_rebuilt_teachers: bool = False, keep_weights: bool = False, replay: bool = False):
        from cachebrew.components.data import DataConfig

        self.name, self.spec, self.smoke, self.allow_collapse = name, spec, smoke, allow_collapse
        self.accept_rebuilt_teachers = accept_rebuilt_teachers
        self.keep_weights = keep_weights
        self.work = out / "work" / name
        self.records = Records(out / "runs", replay=replay)
        self.runs = self.records.path(name)
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
        self.info = self.fine_tune_teacher("teacher", TEACHER_SEED)
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

        recorded = self.records.get(self.name, f"{name}.json")
        if recorded and self.records.replay:
            return recorded
        self.records.require(self.name, f"{name}.json")
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
        return self.records.put(info, self.name, f"{name}.json")

    def teachers_mean_test(self) -> dict:
        """Test metrics of the two teachers' mean logits — what a two-teacher student imitates, so the teacher its
        gap is measured against: both teachers exported over the test split in one pass, scored from the cache."""
        from cachebrew.components.loader import CacheBatches
        from cachebrew.components.metrics import predictions, score
        from cachebrew.recipes.export import ExportConfig, run_export

        recorded = self.records.get(self.name, "teachers-mean.json")
        if recorded is not None:
            return recorded
        self.records.require(self.name, "teachers-mean.json")
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
        return self.records.put(score(preds, golds, ds.joined.manifest.label_names), self.name, "teachers-mean.json")

    @property
    def model_class(self) -> dict:
        return {"model_class": "AutoModelForTokenClassification"} if self.token_level else {}

    def exported_teacher(self, second: bool) -> dict:
        """An export's teacher entry: the first fine-tuned MiniLM, or the second (SECOND_TEACHER_SEED)."""
        name, folder = ("minilm2", "teacher2") if second else ("minilm", "teacher")
        return {"name": name, "path": str(self.work / folder / "best"), **self.model_class}

    def summary(self) -> dict:
        """The summary a finished run of this task wrote."""
        return json.loads((self.records.root.parent / f"{self.name}.json").read_text())

    def prepare_chosen(self, s: dict) -> dict:
        """prepare(), and every cache the summary's chosen recipe reads exported."""
        return self.prepare({c: s["best_copies"] for c in s["best_cache"].split("+")} if "best_copies" in s else None)

    def export(self, cache: str, copies: int, data) -> float:
        """Export one cache (unless recorded); its seconds, which the runs that read it share."""
        from cachebrew.recipes.export import ExportConfig, run_export

        if cache.endswith("-t2"):
            self.fine_tune_teacher("teacher2", SECOND_TEACHER_SEED)

        first = self.records.get(self.name, f"export-{cache}.json")
        if first and (self.records.replay or (self.work / f"cache_{cache}" / "manifest.json").exists()):
            return first["seconds"]
        self.records.require(self.name, f"export-{cache}.json")
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
        if first:  # rebuilt: the budget keeps the first measurement, which the recorded runs used
            if first.get("rows") not in (None, result.rows_total):  # early records lack the count
                raise SystemExit(f"{self.name}: rebuilt cache_{cache} has {result.rows_total} rows, recorded {first['rows']}")
            return first["seconds"]
        self.records.put({"cache": cache, "copies": copies, "rows": result.rows_total, "seconds": seconds},
                         self.name, f"export-{cache}.json")
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
            return run_textbrewer_online(self.distill_config(out, seed, "plain", recipe, lr),
                                         str(self.work / "teacher" / "best"))

        return self._run("textbrewer", f"same-lr{lr:g}", seed, train, {"recipe": recipe, "lr": lr})

    def run_same(self, seed: int, lr: float) -> dict:
        """Arm 3: `cachebrew distill` from the plain cache with arm 2's recipe and rate."""
        return self.run_cache("cache_same", f"same-lr{lr:g}", seed, "plain", SAME_RECIPE, lr)

    def _run(self, arm: str, variant: str, seed: int, train, params: dict) -> dict:
        """Train (unless recorded), score best/ on dev (as selected) and test; refuse collapsed models.

        On a tuning seed a collapsed candidate is recorded as such (and not chosen) instead of stopping."""
        from cachebrew.recipes.finetune import run_evaluate

        rec = self.records.run(self.name, arm, variant, seed, params)
        if rec is not None:
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
        self.records.put(rec, self.name, arm, variant, f"seed-{seed}.json")
        if not self.keep_weights:  # the record is the result; ~250 MB of weights and checkpoints a run add up
            shutil.rmtree(out)
        print(f"{self.name:16s} {arm:11s} {variant:12s} seed {seed}: dev {rec['dev']:.4f} test {rec['test']:.4f} "
              f"steps {steps} {seconds:.0f}s", flush=True)
        return rec


class TextBrewerOnline(DistillRecipe):
    """Arm 2: `cachebrew distill`'s recipe with TextBrewer 0.2.1's GeneralDistiller swapped in, the teacher in memory.

    Everything else is the recipe's own (seed, loaders and their order, student initialisation, AdamW, the
    warm-up/linear schedule, clipping, evaluation on the dev cache keeping best/), so arm 2 and arm 3 differ only
    in where the teacher outputs come from: the teacher computes them from the batch's inputs."""

    def __init__(self, cfg, teacher_dir: str):
        super().__init__(cfg)
        self.teacher_dir = teacher_dir

    def make_distiller(self, t_config):
        import textbrewer
        import transformers
        from transformers import AutoConfig

        from cachebrew.core.models import hf_adaptor

        arch = (AutoConfig.from_pretrained(self.teacher_dir).architectures or ["AutoModelForSequenceClassification"])[0]
        teacher = getattr(transformers, arch).from_pretrained(self.teacher_dir, output_hidden_states=True).eval()
        tb_config = textbrewer.TrainingConfig(device=str(self.device), output_dir=str(self.out / "textbrewer"),
                                              log_dir=None, ckpt_frequency=1)
        return textbrewer.GeneralDistiller(tb_config, textbrewer.DistillationConfig(**self.cfg.distill), teacher,
                                           self.student, hf_adaptor, hf_adaptor)

    def train_batches(self, task: str):
        return OnlineBatches(super().train_batches(task))


class OnlineBatches:
    """A cache loader's epochs with the cached teacher outputs dropped: the teacher reads the student's inputs.

    Each pass is the next epoch of the loader's order, as cachebrew's loop asks for it (TextBrewer's loop does not
    tell a loader its epoch)."""

    def __init__(self, loader):
        self.loader, self.epoch = loader, 0

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        self.loader.set_epoch(self.epoch)
        self.epoch += 1
        for b in self.loader:
            yield {"teacher": b["student"], "student": b["student"]}


def run_textbrewer_online(cfg, teacher_dir: str) -> int:
    """Arm 2's run of `cfg`; its optimizer steps."""
    recipe = TextBrewerOnline(cfg, teacher_dir)
    recipe.setup()
    return recipe.save(recipe.train()).global_step
