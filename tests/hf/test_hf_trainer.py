"""cachebrew.hf.DistillationTrainer: a transformers.Trainer fed by a cache, equal to online distillation."""
import shutil

import pytest
import torch
import torch.nn.functional as F

from transformers import BertConfig, BertForSequenceClassification, TrainingArguments

from cachebrew import ConfigError, DistillationConfig
from cachebrew.hf import (DistillationTrainer, IntermediateLayersKnowledgeDistillationLossConfig,
                          KnowledgeDistillationLossConfig, to_distillation_config)
from cachebrew.losses import kd_kl_loss
from fixtures import make_trainer_world
from helpers import cache_rows, max_weight_diff, pad_rows


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_trainer_world(tmp_path_factory.mktemp("hf"))


def student(dropout=0.0, seed=0):
    cfg = BertConfig(vocab_size=88, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                     max_position_embeddings=64, num_labels=2, hidden_dropout_prob=dropout,
                     attention_probs_dropout_prob=dropout)
    torch.manual_seed(seed)
    return BertForSequenceClassification(cfg)


def args(out, **over):
    kw = dict(output_dir=str(out), per_device_train_batch_size=8, per_device_eval_batch_size=8, num_train_epochs=2,
              learning_rate=1e-3, seed=3, use_cpu=True, report_to=[], disable_tqdm=True, save_strategy="no",
              logging_steps=2)
    kw.update(over)
    return TrainingArguments(**kw)


def accuracy(eval_pred):
    logits, labels = eval_pred
    return {"accuracy": float((logits.argmax(-1) == labels).mean())}


INC = [KnowledgeDistillationLossConfig(temperature=2.0, loss_types=["CE", "KL"], loss_weight_ratio=[0.5, 0.5]),
       IntermediateLayersKnowledgeDistillationLossConfig(layer_mappings=[[1, 2]], loss_types=["MSE"])]


def test_trainer_from_cache_evaluates_saves_resumes_and_reloads(world, tmp_path):
    full = DistillationTrainer(model=student(dropout=0.1), distillation_config=INC, teacher_cache=world["caches"]["train"],
                               eval_cache=world["caches"]["dev"], compute_metrics=accuracy,
                               args=args(tmp_path / "full", save_strategy="steps", save_steps=4, eval_strategy="epoch",
                                         report_to=["tensorboard"]))
    before = student(dropout=0.1)
    full.train()
    assert full.state.global_step == 12  # 48 rows / 8 per batch x 2 epochs, no teacher loaded
    assert max_weight_diff(full.model, before) > 1e-3
    # the projection (student width 16 -> teacher width 32) was added automatically and trained
    assert full.distillation_config.intermediate_matches[0].proj[:3] == ["linear", 16, 32]
    assert (tmp_path / "full" / "checkpoint-8" / "cachebrew_projections.safetensors").is_file()
    assert list((tmp_path / "full").rglob("events.out.tfevents*"))

    # compute_metrics sees the student's predictions on the eval cache
    metrics = full.evaluate()
    from cachebrew.components.loader import CacheBatches

    right = total = 0
    full.model.eval()
    with torch.no_grad():
        for b in CacheBatches(world["caches"]["dev"], 8, shuffle=False):
            labels = b["student"].pop("labels")
            right += (full.model(**b["student"]).logits.argmax(-1) == labels).sum().item()
            total += len(labels)
    assert metrics["eval_accuracy"] == pytest.approx(right / total)
    assert total == 24

    # resume from the step-8 checkpoint (mid second epoch, dropout on): the same final student
    resumed = DistillationTrainer(model=student(dropout=0.1, seed=99), distillation_config=INC,
                                  teacher_cache=world["caches"]["train"], args=args(tmp_path / "resumed"))
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-8"))
    assert resumed.state.global_step == 12
    assert max_weight_diff(resumed.model, full.model) == 0.0
    assert max_weight_diff(resumed._projections(), full._projections()) == 0.0

    # save_model -> from_pretrained gives the same predictions
    full.save_model(str(tmp_path / "final"))
    reloaded = BertForSequenceClassification.from_pretrained(str(tmp_path / "final")).eval()
    b = next(iter(CacheBatches(world["caches"]["dev"], 8, shuffle=False)))["student"]
    b.pop("labels")
    assert torch.equal(reloaded(**b).logits, full.model(**b).logits)


def test_cached_and_online_modes_train_the_same_student(world, tmp_path):
    from transformers import BertForSequenceClassification as Bert

    config = DistillationConfig(temperature=4, hard_label_weight=0.5, kd_loss_weight_scheduler="linear_decay",
                                intermediate_matches=[{"layer_T": 2, "layer_S": 1, "feature": "hidden",
                                                       "loss": "hidden_mse", "weight": 1,
                                                       "proj": ["linear", 16, 32]}])
    common = dict(distillation_config=config, args=args(tmp_path / "x", train_sampling_strategy="sequential"))
    cached = DistillationTrainer(model=student(), teacher_cache=world["caches"]["train"], **common)
    torch.manual_seed(1234)
    cached.distillation_loss.projections[0].reset_parameters()
    cached.train()
    teacher = Bert.from_pretrained(str(world["teacher"]))
    online = DistillationTrainer(model=student(), teacher_model=teacher, data_collator=pad_rows,
                                 train_dataset=cache_rows(world["caches"]["train"]), **common)
    torch.manual_seed(1234)
    online.distillation_loss.projections[0].reset_parameters()
    online.train()
    assert cached.state.global_step == online.state.global_step == 12
    assert max_weight_diff(cached.model, online.model) < 1e-5
    assert max_weight_diff(cached.model, student()) > 1e-3
    # the weight schedule followed the Trainer's steps: linear_decay reaches 0 at the last step
    assert cached.distillation_loss.kd_loss_weight == pytest.approx(0.0)


def test_gradient_accumulation_matches_the_larger_batch(world, tmp_path):
    kd = KnowledgeDistillationLossConfig(temperature=2.0)
    big = DistillationTrainer(model=student(), distillation_config=kd, teacher_cache=world["caches"]["train"],
                              args=args(tmp_path / "a", train_sampling_strategy="sequential", num_train_epochs=1))
    big.train()
    small = DistillationTrainer(model=student(), distillation_config=kd, teacher_cache=world["caches"]["train"],
                                args=args(tmp_path / "b", train_sampling_strategy="sequential", num_train_epochs=1,
                                          per_device_train_batch_size=4, gradient_accumulation_steps=2))
    small.train()
    assert big.state.global_step == small.state.global_step == 6
    assert max_weight_diff(big.model, small.model) < 1e-5


def test_inc_configs_translate_to_inc_terms():
    d = to_distillation_config(INC)
    assert (d.temperature, d.kd_loss_type, d.kd_loss_weight, d.hard_label_weight) == (2.0, "inc_kl", 0.5, 0.5)
    im = d.intermediate_matches[0]
    assert (im.layer_S, im.layer_T, im.feature, im.loss, im.weight) == (1, 2, "hidden", "inc_mse", 1.0)
    inter = IntermediateLayersKnowledgeDistillationLossConfig(
        layer_mappings=[["hidden_states.1", "hidden_states.2"], ["attentions.0", "attentions.1"]],
        loss_types=["COS", "KL"], add_origin_loss=True)
    d = to_distillation_config(inter)
    assert [(m.feature, m.loss, m.weight) for m in d.intermediate_matches] == [("hidden", "cos", 0.5),
                                                                             ("attention", "inc_kl", 0.5)]
    assert (d.kd_loss_weight, d.hard_label_weight) == (0.0, 1.0)
    # cachebrew's own 'kl' (TextBrewer-style configs) is KL(teacher || student) on tempered logits, batch mean
    s, t = torch.randn(5, 3), torch.randn(5, 3)
    expected = F.kl_div(F.log_softmax(s / 2, -1), F.log_softmax(t / 2, -1), reduction="batchmean", log_target=True)
    assert kd_kl_loss(s, t, 2) == pytest.approx(expected.item(), abs=1e-6)


@pytest.mark.parametrize("bad, named", [
    (lambda: KnowledgeDistillationLossConfig(loss_types=["CE", "L7"]), "loss_types[1]"),
    (lambda: KnowledgeDistillationLossConfig(loss_weight_ratio=[0.5]), "loss_weight_ratio"),
    (lambda: KnowledgeDistillationLossConfig(loss_weights=[0.5, 0.6]), "loss_weights"),
    (lambda: KnowledgeDistillationLossConfig(temperature=0), "temperature"),
    (lambda: IntermediateLayersKnowledgeDistillationLossConfig(layer_mappings=[["bert.encoder.layer.0", 1]]),
     "layer_mappings[0]"),
    (lambda: IntermediateLayersKnowledgeDistillationLossConfig(layer_mappings=[[1, "attentions.1"]]), "layer_mappings[0]"),
    (lambda: IntermediateLayersKnowledgeDistillationLossConfig(layer_mappings=[[1, 2]], loss_types=["COS", "MSE"]),
     "loss_types"),
    (lambda: IntermediateLayersKnowledgeDistillationLossConfig(layer_mappings=[["attentions.1", "attentions.1"]],
                                                               loss_types=["COS"]), "loss_types[0]"),
    (lambda: to_distillation_config("ce"), "distillation_config"),
])
def test_bad_criteria_name_the_field(bad, named):
    with pytest.raises(ConfigError) as e:
        bad()
    assert named in str(e.value)


def test_trainer_needs_exactly_one_teacher_source(world, tmp_path):
    with pytest.raises(ConfigError, match="exactly one of teacher_cache"):
        DistillationTrainer(model=student(), distillation_config=INC, args=args(tmp_path / "n"))
    shutil.rmtree(tmp_path / "n", ignore_errors=True)


@pytest.mark.slow
def test_ddp_under_torchrun_equals_one_process_with_accumulation(world, tmp_path):
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    worker = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "hf_ddp_worker.py")
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "LOCAL_RANK", "RANK")}
    env["OMP_NUM_THREADS"] = "1"
    runs = {"single": [sys.executable, worker, world["caches"]["train"], str(tmp_path / "single"), "2"],
            "ddp": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", worker,
                    world["caches"]["train"], str(tmp_path / "ddp"), "1"]}
    for name, cmd in runs.items():
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        assert "steps 12" in res.stdout  # 48 rows, global batch 8, 2 epochs
    for f in ("student.safetensors", "proj.safetensors"):
        one, two = load_file(tmp_path / "single" / f), load_file(tmp_path / "ddp" / f)
        worst = max((one[k] - two[k]).abs().max().item() for k in one)
        assert worst < 1e-5, f"{f}: max difference {worst}"
    trained, init = load_file(tmp_path / "ddp" / "student.safetensors"), student().state_dict()
    assert max((trained[k] - init[k]).abs().max().item() for k in trained) > 1e-3
