"""`torchrun … cachebrew train` (2 gloo ranks on CPU) trains the model one process trains at the same global batch.

    pytest -m slow tests/recipes/test_finetune_ddp.py
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from cachebrew.components.data import pad_batch
from cachebrew.recipes.finetune import FinetuneConfig, FinetuneRecipe
from fixtures import make_teacher_dir, make_text_data

TESTS = Path(__file__).resolve().parents[1]


def torchrun_train(tmp_path, name, cfg) -> Path:
    """`cachebrew train` as 2 gloo ranks under torchrun into tmp_path/name; checks what rank 0 alone writes."""
    (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump({**cfg, "output_dir": str(tmp_path / name)}))
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "LOCAL_RANK", "RANK")}
    env["OMP_NUM_THREADS"] = "1"
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "cachebrew", "train", str(tmp_path / f"{name}.yaml"), "--no-progress"],
                         cwd=TESTS, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = tmp_path / name
    assert res.stderr.count("wrote " + str(out / "train_results.json")) == 1, res.stderr[-3000:]  # rank 0 only
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporaries or stale copies left
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    AutoModelForSequenceClassification.from_pretrained(out / "best")
    AutoTokenizer.from_pretrained(out / "best")
    return out


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.slow
def test_two_ranks_train_the_model_one_process_trains_at_the_same_global_batch(tmp_path):
    """2 ranks × batch 4 == 1 process × batch 8, weights within float tolerance, after 2 epochs with dev scoring.

    DistributedSampler shuffles with ``randperm(n, seed + epoch)`` and deals rank r the positions r, r + 2, …;
    so step k's two rank batches together are positions 8k…8k+7 of that permutation. The reference process
    reads the same permutation through a one-replica DistributedSampler with batch 8 (its own default loader
    shuffles with another generator, kept so single-process runs are unchanged), so both see the same rows
    at every step and DDP's gradient average equals the 8-row mean. The ranks' padding differs (each pads to
    its own longest row), hence a tolerance rather than bit equality. Had every rank trained a whole epoch on
    every row, as before the sampler, each epoch would be 8 steps, not 4, and the weights would differ.

    best/ holds the best epoch's weights, which on this tiny data need not be the last; so a second 2-rank run
    without a dev set (best/ = the final weights) is compared with the reference's final weights.
    """
    teacher = make_teacher_dir(tmp_path / "teacher")
    train = make_text_data(tmp_path / "train.jsonl", n=32, seed=1)
    dev = make_text_data(tmp_path / "dev.jsonl", n=12, seed=2)
    cfg = {"seed": 3, "max_length": 16, "model": {"path": str(teacher)},
           "data": {"path": str(train), "text": "sentence", "label": "label"}, "eval_path": str(dev),
           "train": {"epochs": 2, "batch_size": 4, "lr": 1e-3, "device": "cpu", "progress_bar": False}}
    scored = torchrun_train(tmp_path, "ddp", cfg)  # evaluation under DDP used to fail on the wrapper's .config
    final = torchrun_train(tmp_path, "ddp_final", {k: v for k, v in cfg.items() if k != "eval_path"})
    ddp = json.loads((scored / "train_results.json").read_text())
    assert [h["step"] for h in ddp["history"]] == [4, 8]  # 32 rows / (2 ranks × 4): 4 steps an epoch

    ref = FinetuneRecipe(FinetuneConfig.from_dict(
        {**cfg, "output_dir": str(tmp_path / "one"), "train": {**cfg["train"], "batch_size": 8}}))
    ref.setup()
    sampler = torch.utils.data.distributed.DistributedSampler(ref.train_examples, num_replicas=1, rank=0,
                                                              shuffle=True, seed=cfg["seed"])
    ref.loader = torch.utils.data.DataLoader(ref.train_examples, batch_size=8, sampler=sampler, collate_fn=pad_batch)
    ref.train()
    one = ref.save()

    assert one["best"]["step"] == ddp["best"]["step"]
    assert [h["step"] for h in one["history"]] == [4, 8]
    for a, b in zip(one["history"], ddp["history"]):
        assert a.keys() == b.keys() and all(a[k] == pytest.approx(b[k]) for k in a)
    best = load_file(scored / "best" / "model.safetensors")
    worst = max_difference(load_file(tmp_path / "one" / "best" / "model.safetensors"), best)
    assert worst < 1e-5, f"best/: max weight difference {worst}"
    last = load_file(final / "best" / "model.safetensors")
    worst = max_difference({k: v.detach() for k, v in ref.model.state_dict().items() if k in last}, last)
    assert worst < 1e-5, f"final weights: max difference {worst}"
    init = load_file(teacher / "model.safetensors")
    assert max((last[k] - init[k]).abs().max().item() for k in last if k in init) > 1e-3  # training moved them
