"""Distillers train a tiny BERT student to TextBrewer's weights: same init, data order and optimizer."""
import os

import numpy as np
import pytest
import torch

from helpers import (assert_same_weights, changed, full_adaptor, loader, logits_adaptor, make_examples,
                      run_distiller, tiny_bert)

MATCHES = [
    {"layer_T": 0, "layer_S": 0, "feature": "hidden", "loss": "hidden_mse", "weight": 1, "proj": ["linear", 32, 48]},
    {"layer_T": 3, "layer_S": 2, "feature": "hidden", "loss": "cos", "weight": 0.5, "proj": ["relu", 32, 48, {"lr": 5e-3}]},
    {"layer_T": 2, "layer_S": 1, "feature": "attention", "loss": "attention_mse", "weight": 1},
    {"layer_T": 1, "layer_S": 0, "feature": "attention", "loss": "attention_ce", "weight": 0.2},
    {"layer_T": [0, 3], "layer_S": [0, 2], "feature": "hidden", "loss": "nst", "weight": 1},
    {"layer_T": [1, 2], "layer_S": [1, 2], "feature": "hidden", "loss": "fsp", "weight": 1, "proj": ["tanh", 32, 48]},
    {"layer_T": 3, "layer_S": 2, "feature": "hidden", "loss": "pkd", "weight": 1, "proj": ["linear", 32, 48]},
]


@pytest.fixture(scope="module")
def models():
    teacher = tiny_bert(seed=0, layers=3, hidden=48)
    student = tiny_bert(seed=1, layers=2, hidden=32)
    return teacher, student


@pytest.fixture(scope="module")
def data():
    return loader(make_examples(24))


def _both(textbrewer, cachebrew, tmp_path, name, teacher, student, data, distill_kwargs, **kw):
    tb, _ = run_distiller(textbrewer, name, teacher, student, data, distill_kwargs, tmp_path / "tb", **kw)
    cb, distiller = run_distiller(cachebrew, name, teacher, student, data, distill_kwargs, tmp_path / "cb", **kw)
    return tb, cb, distiller


def test_general_distiller_matches_textbrewer(textbrewer, cachebrew, tmp_path, models, data):
    teacher, student = models
    dk = dict(temperature=4, hard_label_weight=0.5, kd_loss_weight=1.0, intermediate_matches=MATCHES)
    from transformers import get_linear_schedule_with_warmup

    tk = dict(num_epochs=2, max_grad_norm=1.0, scheduler_class=get_linear_schedule_with_warmup,
              scheduler_args={"num_warmup_steps": 2, "num_training_steps": 12})
    tb, cb, distiller = _both(textbrewer, cachebrew, tmp_path, "GeneralDistiller", teacher, student, data, dk,
                              train_kwargs=tk)
    assert changed(student, cb) > 1e-3  # training happened
    assert_same_weights(tb, cb)
    # the projections were trained too (their own param groups, one with its own lr)
    assert len([p for p in distiller.projs if p is not None]) == 4


@pytest.mark.parametrize("dk", [
    dict(temperature=8, temperature_scheduler=["flsw", 1, 2], kd_loss_weight_scheduler="linear_decay",
         hard_label_weight=1, hard_label_weight_scheduler="linear_growth"),
    dict(temperature=2, temperature_scheduler=["cwsm", 0.5], kd_loss_type="mse"),
    dict(temperature=4, probability_shift=True, hard_label_weight=0.3),
], ids=["flsw+weight-schedules", "cwsm+mse", "probability_shift"])
def test_basic_distiller_options_match_textbrewer(textbrewer, cachebrew, tmp_path, models, data, dk):
    teacher, student = models
    tb, cb, _ = _both(textbrewer, cachebrew, tmp_path, "BasicDistiller", teacher, student, data, dk,
                      adaptor_T=logits_adaptor, adaptor_S=logits_adaptor)
    assert changed(student, cb) > 1e-3
    assert_same_weights(tb, cb)


def test_probability_shift_changes_the_result(cachebrew, tmp_path, models, data):
    teacher, student = models
    a, _ = run_distiller(cachebrew, "GeneralDistiller", teacher, student, data, dict(probability_shift=True),
                         tmp_path / "a", adaptor_T=logits_adaptor, adaptor_S=logits_adaptor)
    b, _ = run_distiller(cachebrew, "GeneralDistiller", teacher, student, data, dict(probability_shift=False),
                         tmp_path / "b", adaptor_T=logits_adaptor, adaptor_S=logits_adaptor)
    assert changed(a, b) > 1e-4


def test_probability_shift_token_level_matches_textbrewer(textbrewer, cachebrew, tmp_path):
    teacher = tiny_bert(seed=0, layers=2, hidden=32, num_labels=5, token_level=True)
    student = tiny_bert(seed=1, layers=1, hidden=32, num_labels=5, token_level=True)
    data = loader(make_examples(16, num_labels=5, token_level=True))

    def adaptor(batch, out):  # TextBrewer crashes with logits_mask + probability_shift, so no mask here
        return {"logits": out.logits, "labels": batch["labels"]}

    dk = dict(temperature=3, probability_shift=True)
    tb, cb, _ = _both(textbrewer, cachebrew, tmp_path, "GeneralDistiller", teacher, student, data, dk,
                      adaptor_T=adaptor, adaptor_S=adaptor)
    assert changed(student, cb) > 1e-3
    assert_same_weights(tb, cb)


def test_probability_shift_with_logits_mask_shifts_the_selected_rows(cachebrew, tmp_path):
    from cachebrew.objective import probability_shift_
    from cachebrew.losses import kd_ce_loss

    d = cachebrew.GeneralDistiller(cachebrew.TrainingConfig(device="cpu", output_dir=str(tmp_path)),
                                   cachebrew.DistillationConfig(temperature=2, probability_shift=True),
                                   None, torch.nn.Linear(1, 1), None, None)
    g = torch.Generator().manual_seed(0)
    lt, ls = torch.randn(2, 4, 5, generator=g), torch.randn(2, 4, 5, generator=g)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    labels = torch.tensor([[0, 4, 2, -100], [3, 1, -100, -100]])
    loss, _ = d.compute_loss({"logits": [ls], "logits_mask": [mask], "labels": [labels]},
                             {"logits": [lt], "logits_mask": [mask]})
    sel = mask.bool()
    shifted = probability_shift_(lt[sel], labels[sel])
    assert (shifted.argmax(-1) == labels[sel]).all()
    torch.testing.assert_close(loss, kd_ce_loss(ls[sel], shifted, 2), rtol=0, atol=0)


def test_multiteacher_distiller_matches_textbrewer(textbrewer, cachebrew, tmp_path, data):
    teachers = [tiny_bert(seed=s, layers=2, hidden=48) for s in (10, 11, 12)]
    student = tiny_bert(seed=1, layers=2, hidden=32)
    dk = dict(temperature=4, hard_label_weight=0.5)
    tb, cb, _ = _both(textbrewer, cachebrew, tmp_path, "MultiTeacherDistiller", teachers, student, data, dk,
                      adaptor_T=logits_adaptor, adaptor_S=logits_adaptor, train_kwargs=dict(num_steps=7),
                      train_cfg=dict(ckpt_steps=3))
    assert changed(student, cb) > 1e-3
    assert_same_weights(tb, cb)
    # averaging matters: one teacher alone gives another student
    single, _ = run_distiller(cachebrew, "MultiTeacherDistiller", teachers[:1], student, data, dk, tmp_path / "one",
                              adaptor_T=logits_adaptor, adaptor_S=logits_adaptor, train_kwargs=dict(num_steps=7),
                              train_cfg=dict(ckpt_steps=3))
    assert changed(single, cb) > 1e-4


def test_is_caching_logits_matches_textbrewer(textbrewer, cachebrew, tmp_path, models, data):
    import random

    teacher, student = models
    dk = dict(temperature=4, is_caching_logits=True)
    random.seed(3)
    tb, _ = run_distiller(textbrewer, "BasicDistiller", teacher, student, data, dk, tmp_path / "tb",
                          adaptor_T=logits_adaptor, adaptor_S=logits_adaptor)
    random.seed(3)
    cb, _ = run_distiller(cachebrew, "BasicDistiller", teacher, student, data, dk, tmp_path / "cb",
                          adaptor_T=logits_adaptor, adaptor_S=logits_adaptor)
    assert changed(student, cb) > 1e-3
    assert_same_weights(tb, cb)


def test_multitask_distiller_matches_textbrewer(textbrewer, cachebrew, tmp_path):
    student = tiny_bert(seed=1, layers=2, hidden=32)
    teachers = {"a": tiny_bert(seed=20, layers=2, hidden=32), "b": tiny_bert(seed=21, layers=2, hidden=32)}
    loaders = {"a": loader(make_examples(8, seed=5)), "b": loader(make_examples(24, seed=6))}
    adaptors = {"a": full_adaptor, "b": full_adaptor}
    dk = dict(temperature=4, intermediate_matches=[
        {"layer_T": 2, "layer_S": 2, "feature": "hidden", "loss": "hidden_mse", "weight": 1}])
    results = []
    for lib in (textbrewer, cachebrew):
        np.random.seed(0)
        model, _ = run_distiller(lib, "MultiTaskDistiller", teachers, student, loaders, dk, tmp_path / lib.__name__,
                                 adaptor_T=adaptors, adaptor_S=adaptors, train_cfg=dict(ckpt_steps=4),
                                 train_kwargs=dict(num_epochs=None, num_steps=9, tau=0.5))
        results.append(model)
    assert changed(student, results[1]) > 1e-3
    assert_same_weights(*results)


def test_gradient_accumulation_and_checkpoint_steps_match_textbrewer(textbrewer, cachebrew, tmp_path, models):
    teacher, student = models
    data = loader(make_examples(28), batch_size=2)  # 14 batches: accumulation leaves a remainder per epoch
    dk = dict(temperature=4)
    cfg = dict(gradient_accumulation_steps=3, ckpt_frequency=2, ckpt_epoch_frequency=2)
    tb, cb, _ = _both(textbrewer, cachebrew, tmp_path, "GeneralDistiller", teacher, student, data, dk,
                      adaptor_T=logits_adaptor, adaptor_S=logits_adaptor, train_cfg=cfg,
                      train_kwargs=dict(num_epochs=3))
    assert_same_weights(tb, cb)
    steps = lambda d, ext: sorted(int(f[2:].split(".")[0]) for f in os.listdir(d) if f.endswith(ext))
    assert steps(tmp_path / "cb", ".safetensors") == steps(tmp_path / "tb", ".pkl") == [6, 8, 10, 12]  # 4 steps/epoch; saves at 2 and 4 of epochs 2 and 3


def test_basic_trainer_matches_textbrewer(textbrewer, cachebrew, tmp_path, data):
    out = []
    for lib in (textbrewer, cachebrew):
        model = tiny_bert(seed=3, layers=2, hidden=32)
        tc = dict(device="cpu", output_dir=str(tmp_path / lib.__name__), ckpt_steps=5)
        if lib is cachebrew:
            tc["progress_bar"] = False
        trainer = lib.BasicTrainer(lib.TrainingConfig(**tc), model, lambda b, o: {"losses": o.loss})
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with trainer:
            trainer.train(opt, data, num_epochs=None, num_steps=10)
        out.append(model)
    assert changed(tiny_bert(seed=3, layers=2, hidden=32), out[1]) > 1e-3
    assert_same_weights(*out)
