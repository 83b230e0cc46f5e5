"""`train.sharding: fsdp`: the student sharded over torchrun's ranks with FSDP2 instead of replicated with DDP.

Checked on the CPU with 2 gloo ranks: a sharded run resumes to the same weights as an uninterrupted one, and
ends within float rounding of the DDP run at the same global batch (the same gradients, reduced another way).
Its checkpoints, best/ and last/ are whole models in the usual files.

    pytest tests/recipes/distill/test_sharded_student.py            # the config checks
    pytest tests/recipes/distill/test_sharded_student.py -m slow    # the torchrun runs
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from cachebrew.errors import ConfigError
from cachebrew.recipes.distill import DistillRunConfig, run_distill
from cachebrew.recipes.export import ExportConfig, run_export
from fixtures import export_config, make_teacher_dir, make_text_data, tiny_student

TESTS = Path(__file__).resolve().parents[2]
STUDENT = tiny_student(num_hidden_layers=2, hidden_dropout_prob=0.2)
MATCH = [{"layer_T": 2, "layer_S": 2, "feature": "hidden", "loss": "hidden_mse", "weight": 1,
          "proj": ["linear", 16, 32]}]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded")
    teacher = make_teacher_dir(root / "teacher")
    caches = {}
    for name, n, seed in (("train", 64, 1), ("dev", 20, 2)):  # dev: 20 rows, shares of 3 and 2 batches of 4
        cfg = export_config(root / name, teacher, make_text_data(root / f"{name}.jsonl", n=n, seed=seed),
                            outputs={"hidden_layers": [0, 2], "attention_layers": []})
        run_export(ExportConfig.from_dict(cfg))
        caches[name] = str(root / name / "cache")
    return caches


def distill_cfg(world, out, **train):
    return {"output_dir": str(out), "caches": [world["train"]], "eval_cache": world["dev"],
            "student": {"config": dict(STUDENT)}, "seed": 3,
            "distill": {"temperature": 4, "hard_label_weight": 0.5, "intermediate_matches": MATCH},
            "train": {"epochs": None, "steps": 6, "save_every": 3, "eval_every": 3, "batch_size": 4, "lr": 1e-3,
                      "progress_bar": False, "shuffle_buffer": 16, **train}}


def test_sharding_config_errors(world, tmp_path):
    with pytest.raises(ConfigError) as e:
        DistillRunConfig.from_dict(distill_cfg(world, tmp_path, sharding="zero3"))
    assert "train.sharding: one of null, fsdp, got 'zero3'" in str(e.value)
    with pytest.raises(ConfigError, match="train.amp: fp16 is not supported with train.sharding: fsdp"):
        DistillRunConfig.from_dict(distill_cfg(world, tmp_path, sharding="fsdp", amp="fp16"))
    multi = {**distill_cfg(world, tmp_path, sharding="fsdp"), "caches": [],
             "tasks": {"a": {"caches": [world["train"]]}}}
    with pytest.raises(ConfigError, match="train.sharding: fsdp is not supported for multi-task distillation"):
        DistillRunConfig.from_dict(multi)


def test_sharding_outside_torchrun_is_refused(world, tmp_path, monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    cfg = DistillRunConfig.from_dict(distill_cfg(world, tmp_path / "run", sharding="fsdp"))
    with pytest.raises(ConfigError, match="train.sharding: fsdp shards the student over torchrun's ranks"):
        run_distill(cfg)


def torchrun(cfg: dict, path: Path, *extra) -> subprocess.CompletedProcess:
    path.write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "LOCAL_RANK", "RANK")}
    env["OMP_NUM_THREADS"] = "1"
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "cachebrew", "distill", str(path), "--no-progress", *extra],
                         cwd=TESTS, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


@pytest.mark.slow
def test_two_rank_sharded_run_resumes_exactly_and_matches_ddp(world, tmp_path):
    """torchrun, 2 gloo ranks, dropout on: a sharded run cut back to its step-3 checkpoint and resumed ends with the
    uninterrupted run's weights; both end within 1e-5 of the replicated (DDP) run at the same global batch."""
    def run(name, sharding, *extra):
        cfg = distill_cfg(world, tmp_path / name, sharding=sharding)
        return torchrun(cfg, tmp_path / f"{name}.yaml", *extra)

    assert "sharded" not in run("ddp", None).stderr
    assert "student sharded over 2 ranks (FSDP2): 2 layers, then the rest" in run("full", "fsdp").stderr
    run("cut", "fsdp")
    for stale in ("last", "best", "results.json", "checkpoints/step-000006"):
        p = tmp_path / "cut" / stale
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    assert "resuming" in run("cut", "fsdp", "--resume").stderr

    weights = {n: load_file(tmp_path / n / "last" / "model.safetensors") for n in ("ddp", "full", "cut")}
    assert weights["full"].keys() == weights["ddp"].keys()
    for k, v in weights["full"].items():
        assert torch.equal(v, weights["cut"][k]), f"a resumed sharded run ended with other weights: {k}"
        torch.testing.assert_close(v, weights["ddp"][k], rtol=0, atol=1e-5, msg=lambda m: f"{k}: {m}")
    # the sharded checkpoint is a whole model in the usual files: the step-3 student equals DDP's
    step3 = {n: load_file(tmp_path / n / "checkpoints" / "step-000003" / "student.safetensors")
             for n in ("ddp", "full")}
    for k, v in step3["full"].items():
        torch.testing.assert_close(v, step3["ddp"][k], rtol=0, atol=1e-5)
    # every rank evaluated in step (shares of 3 and 2 batches): the scores equal the replicated run's
    scores = {n: json.loads((tmp_path / n / "results.json").read_text())["history"] for n in ("ddp", "full")}
    assert [h["step"] for h in scores["full"]] == [3, 6]
    for a, b in zip(scores["full"], scores["ddp"]):
        assert a["default"] == pytest.approx(b["default"], abs=1e-6)
