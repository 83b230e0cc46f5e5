"""`make_optimizer` and `head_lr`: the task head at its own rate, everything else as before."""
import pytest
import torch

from cachebrew.core.training import make_optimizer, warmup_linear
from cachebrew.errors import ConfigError


def tiny_tagger():
    from transformers import BertConfig, BertForTokenClassification

    torch.manual_seed(0)
    return BertForTokenClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                                 num_attention_heads=2, intermediate_size=32, num_labels=3))


def test_without_head_lr_the_groups_are_decay_and_no_decay_at_one_rate():
    model = tiny_tagger()
    opt = make_optimizer(model, 1e-4, 0.01)
    assert [(g["lr"], g["weight_decay"]) for g in opt.param_groups] == [(1e-4, 0.01), (1e-4, 0.0)]
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


def test_head_lr_moves_the_head_by_its_own_rate_and_the_encoder_by_lr():
    model = tiny_tagger()
    opt = make_optimizer(model, 1e-4, 0.0, head_lr=1e-2)
    head = {id(p) for p in model.classifier.parameters()}
    assert {id(p) for g in opt.param_groups if g["lr"] == 1e-2 for p in g["params"]} == head
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.tensor([[1, 2, 3, 4]])
    model(input_ids=ids, labels=torch.tensor([[0, 1, 2, 1]])).loss.backward()
    opt.step()  # Adam's first step moves every parameter with a gradient by ~its group's rate
    moved = {n: (p.detach() - before[n]).abs().max().item() for n, p in model.named_parameters()}
    assert moved["classifier.weight"] == pytest.approx(1e-2, rel=0.01)
    assert moved["bert.encoder.layer.0.output.dense.weight"] == pytest.approx(1e-4, rel=0.01)


def test_the_schedule_scales_each_group_from_its_own_rate():
    opt = make_optimizer(tiny_tagger(), 1e-4, 0.01, head_lr=2e-3)
    sched = warmup_linear(opt, num_warmup_steps=2, num_training_steps=4)
    opt.step()
    sched.step()  # step 1 of 2 warm-up steps: half of each rate
    assert sorted({g["lr"] for g in opt.param_groups}) == pytest.approx([5e-5, 1e-3])


def test_head_lr_on_a_model_without_a_base_model_is_a_config_error():
    with pytest.raises(ConfigError, match=r"train\.head_lr: Linear names no base model"):
        make_optimizer(torch.nn.Linear(2, 2), 1e-4, 0.01, head_lr=1e-3)


def test_a_non_positive_head_lr_is_refused_by_name():
    from cachebrew.recipes.finetune import FinetuneConfig

    with pytest.raises(ConfigError, match=r"train\.head_lr: must be a number > 0"):
        FinetuneConfig.from_dict({"output_dir": "o", "model": {"path": "m"}, "data": {"path": "d.csv"},
                                  "train": {"head_lr": 0}})
