"""cachebrew.inc: Intel's documented distillation script (imports changed) online and from a cache, INC's
numerics against hand-written INC formulas, and one-line errors for bad configs.

Oracle choice: neural-compressor 2.x cannot be installed as a test oracle without pulling in opencv,
pycocotools, pandas and scikit-learn (its install requirements); its distillation criteria are a few lines
of torch each, so the tests below write INC's formulas out (as in criterions.py of neural-compressor 2.x)."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig, BertForSequenceClassification, TrainingArguments

from cachebrew import ConfigError
from cachebrew import DistillationConfig as TextBrewerDistillationConfig
from cachebrew.inc import (DistillationConfig, IntermediateLayersKnowledgeDistillationLossConfig,
                           KnowledgeDistillationLossConfig, NLPTrainer, metrics)
from cachebrew.hf import to_distillation_config
from cachebrew.losses import kd_ce_loss
from cachebrew.objective import DistillationLoss
from fixtures import make_trainer_world
from helpers import cache_rows, max_weight_diff, pad_rows


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_trainer_world(tmp_path_factory.mktemp("inc"), dev_rows=32)


def student(seed=0):
    cfg = BertConfig(vocab_size=88, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                     max_position_embeddings=64, num_labels=2, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    torch.manual_seed(seed)
    return BertForSequenceClassification(cfg)


def training_args(out, **over):
    kw = dict(output_dir=str(out), per_device_train_batch_size=8, per_device_eval_batch_size=16, num_train_epochs=4,
              learning_rate=3e-3, seed=3, use_cpu=True, report_to=[], disable_tqdm=True, save_strategy="no",
              logging_steps=2, train_sampling_strategy="sequential")
    kw.update(over)
    return TrainingArguments(**kw)


def accuracy(eval_pred):
    logits, labels = eval_pred
    return {"accuracy": float((logits.argmax(-1) == labels).mean())}


def intel_script(model, args, train_dataset, eval_dataset, data_collator, teacher_model=None, teacher_cache=None):
    """Intel's documented workflow (ITREX docs/distillation.md) with only its imports changed, plus the
    `teacher_cache=` that cachebrew adds."""
    trainer = NLPTrainer(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                         compute_metrics=accuracy, data_collator=data_collator)
    metric = metrics.Metric(name="eval_accuracy")
    trainer.metrics = metric
    criterion = KnowledgeDistillationLossConfig(temperature=4.0, loss_types=["CE", "CE"], loss_weights=[0.5, 0.5])
    if teacher_cache is None:
        d_conf = DistillationConfig(teacher_model=teacher_model, criterion=criterion)
    else:
        d_conf = DistillationConfig(teacher_cache=teacher_cache, criterion=criterion)
    model = trainer.distill(distillation_config=d_conf)
    return trainer, model


def test_intel_script_online_and_from_cache_returns_the_best_model(world, tmp_path):
    dev = cache_rows(world["caches"]["dev"])
    teacher = BertForSequenceClassification.from_pretrained(str(world["teacher"]))
    online, online_model = intel_script(student(), training_args(tmp_path / "online"), cache_rows(world["caches"]["train"]),
                                        dev, pad_rows, teacher_model=teacher)
    cached, cached_model = intel_script(student(), training_args(tmp_path / "cached"), None, dev, pad_rows,
                                        teacher_cache=world["caches"]["train"])
    assert online.state.global_step == cached.state.global_step == 24  # 48 rows / 8 x 4 epochs
    # one evaluation per epoch although eval_strategy is "no": INC evaluates at every epoch's end
    for trainer in (online, cached):
        scores = [h["eval_accuracy"] for h in trainer.state.log_history if "eval_accuracy" in h]
        assert len(scores) == 4
        assert trainer.model is (online_model if trainer is online else cached_model)
        # distill returned the best model by the metric: evaluating it now gives the best value of the log
        assert trainer.evaluate()["eval_accuracy"] == max(scores)
        tracker = trainer.best_model_tracker
        assert [s for _, s in tracker.scores] == scores and tracker.best_score == max(scores)
        assert max(abs(v - trainer.model.state_dict()[k]).max().item() for k, v in tracker.best_state.items()) == 0
        assert (tmp_path / ("online" if trainer is online else "cached") / "model.safetensors").is_file()
    # same examples in the same order, same INC loss: the cache changes nothing but the teacher's cost
    assert max_weight_diff(online_model, cached_model) < 1e-5
    assert max_weight_diff(online_model, student()) > 1e-3


def test_distill_keeps_the_best_epoch_not_the_last(world, tmp_path):
    seen = []
    script = iter([0.2, 0.9, 0.5])  # the best is epoch 2 of 3

    def eval_func(model):
        seen.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return next(script)

    trainer = NLPTrainer(model=student(), args=training_args(tmp_path / "e", num_train_epochs=3))
    model = trainer.distill(DistillationConfig(teacher_cache=world["caches"]["train"]), eval_func=eval_func)
    assert len(seen) == 3
    final = model.state_dict()
    assert max((seen[1][k] - final[k]).abs().max().item() for k in final) == 0
    assert max((seen[2][k] - final[k]).abs().max().item() for k in final) > 1e-4
    assert trainer.best_model_tracker.best_step == 12  # 6 steps per epoch


def test_smaller_is_better_metric_and_weighted_metrics(world, tmp_path):
    trainer = NLPTrainer(model=student(), args=training_args(tmp_path / "l", num_train_epochs=2),
                         eval_dataset=cache_rows(world["caches"]["dev"]), data_collator=pad_rows)
    trainer.metrics = metrics.Metric(name="eval_loss", greater_is_better=False)
    trainer.distill(DistillationConfig(teacher_cache=world["caches"]["train"]))
    losses = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h]
    assert len(losses) == 2 and trainer.best_model_tracker.best_score == min(losses)
    assert metrics.combined_score([metrics.Metric("a", weight_ratio=0.25), metrics.Metric("b", weight_ratio=0.75)],
                                  {"a": 0.4, "b": 0.8}) == pytest.approx(0.7)


def test_a_textbrewer_config_keeps_textbrewer_numerics(world, tmp_path):
    """The two front ends do not leak: a TextBrewer DistillationConfig means kd_ce without T**2."""
    trainer = NLPTrainer(model=student(), args=training_args(tmp_path / "t", num_train_epochs=1))
    trainer.distill(TextBrewerDistillationConfig(temperature=4), teacher_cache=world["caches"]["train"],
                    eval_func=lambda m: 0.0)
    assert trainer.distillation_loss.kd_loss is kd_ce_loss
    inc = to_distillation_config(KnowledgeDistillationLossConfig(temperature=4, loss_weights=[0, 1]))
    s, t = torch.randn(6, 3), torch.randn(6, 3)
    tb_loss, _ = DistillationLoss(TextBrewerDistillationConfig(temperature=4))({"logits": [s]}, {"logits": [t]})
    inc_loss, _ = DistillationLoss(inc)({"logits": [s]}, {"logits": [t]})
    assert inc_loss.item() == pytest.approx(16 * tb_loss.item(), rel=1e-6)


# -- INC's numerics, written out as INC computes them ------------------------------------------------------------
def inc_kd(kind, s, t, T):
    s, t = s / T, t / T
    if kind == "CE":
        loss = (-F.softmax(t, dim=-1) * F.log_softmax(s, dim=-1)).sum(dim=-1).mean()
    elif kind == "KL":
        with warnings.catch_warnings():  # torch warns that 'mean' averages over classes too: INC's choice
            warnings.simplefilter("ignore")
            loss = F.kl_div(F.log_softmax(s, dim=-1), F.softmax(t, dim=-1))
    else:
        loss = torch.nn.MSELoss()(s, t)
    return loss * T ** 2


@pytest.mark.parametrize("kind", ["CE", "KL", "MSE"])
@pytest.mark.parametrize("T", [1, 2, 4])
def test_kd_loss_is_inc_formula(kind, T):
    g = torch.Generator().manual_seed(T)
    s, t = torch.randn(7, 5, generator=g) * 3, torch.randn(7, 5, generator=g) * 3
    student_loss = torch.tensor(1.7)
    cfg = KnowledgeDistillationLossConfig(temperature=T, loss_types=["CE", kind], loss_weights=[0.3, 0.7])
    total, _ = DistillationLoss(to_distillation_config(cfg))({"logits": [s], "losses": [student_loss]},
                                                            {"logits": [t]})
    expected = 0.3 * student_loss + 0.7 * inc_kd(kind, s, t, T)
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)


def inc_feature(kind, s, t):
    if kind == "MSE":
        return torch.nn.MSELoss()(s, t)
    if kind == "L1":
        return torch.nn.L1Loss()(s, t)
    not_prob = lambda x: (torch.abs(x.sum(dim=-1) - 1.0) > 0.2).any().item()  # noqa: E731 (INC's check)
    if not_prob(s):
        s = torch.softmax(s, dim=-1)
    s = torch.log(s + 1e-9)
    if not_prob(t):
        t = torch.softmax(t, dim=-1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.nn.KLDivLoss()(s, t)


@pytest.mark.parametrize("kind", ["MSE", "KL", "L1"])
def test_intermediate_losses_are_inc_formulas(kind):
    g = torch.Generator().manual_seed(0)
    hidden_S = [torch.randn(3, 6, 8, generator=g) for _ in range(2)]
    hidden_T = [torch.randn(3, 6, 8, generator=g) for _ in range(3)]
    att_S = [torch.softmax(torch.randn(3, 2, 6, 6, generator=g), -1)]
    att_T = [torch.softmax(torch.randn(3, 2, 6, 6, generator=g), -1) for _ in range(2)]
    mask = torch.ones(3, 6)
    mask[:, 4:] = 0  # INC's hooks see no mask: padding counts
    student_loss = torch.tensor(0.9)
    cfg = IntermediateLayersKnowledgeDistillationLossConfig(
        layer_mappings=[[1, 2], [("attentions.0",), ("attentions.1",)]], loss_types=[kind, kind],
        loss_weights=[0.6, 0.4], add_origin_loss=True)
    results_S = {"hidden": hidden_S, "attention": att_S, "inputs_mask": mask, "losses": [student_loss]}
    results_T = {"hidden": hidden_T, "attention": att_T, "inputs_mask": mask}
    total, _ = DistillationLoss(to_distillation_config(cfg))(results_S, results_T)
    expected = (0.6 * inc_feature(kind, hidden_S[1], hidden_T[2]) + 0.4 * inc_feature(kind, att_S[0], att_T[1])
                + student_loss)
    assert total.item() == pytest.approx(expected.item(), rel=1e-5)


# -- bad configs: one line, naming the field ---------------------------------------------------------------------
@pytest.mark.parametrize("bad, named", [
    (lambda: KnowledgeDistillationLossConfig(loss_weights=[0.5, 0.6]), "loss_weights: the two weights must sum to 1"),
    (lambda: KnowledgeDistillationLossConfig(loss_weight_ratio=[1.5, -0.5]), "loss_weight_ratio: each weight"),
    (lambda: KnowledgeDistillationLossConfig(loss_weights=[1.0]), "loss_weights: expected 2 weights"),
    (lambda: KnowledgeDistillationLossConfig(loss_types=["CE", "CE", "CE"]), "loss_types: expected 2 entries"),
    (lambda: KnowledgeDistillationLossConfig(loss_types=["CE", "JS"]), "loss_types[1]: KD loss 'JS'"),
    (lambda: KnowledgeDistillationLossConfig(loss_weights=[0.5, 0.5], loss_weight_ratio=[0.2, 0.8]),
     "the same weights under two names"),
    (lambda: IntermediateLayersKnowledgeDistillationLossConfig(layer_mappings=[[1, 2]], loss_types=["HUBER"]),
     "loss_types[0]: 'HUBER'"),
    (lambda: IntermediateLayersKnowledgeDistillationLossConfig(layer_mappings=[[1, 2], [2, 3]], loss_weights=[1.0]),
     "loss_weights: expected 2 weights"),
    (lambda: IntermediateLayersKnowledgeDistillationLossConfig(layer_mappings=[["bert.encoder.layer.3", 2]]),
     "is hidden_states.4"),
    (lambda: DistillationConfig(criterion="CE"), "DistillationConfig.criterion"),
    (lambda: DistillationConfig(teacher_model=torch.nn.Linear(1, 1), teacher_cache="x"), "not both"),
    (lambda: metrics.Metric(name=""), "Metric.name"),
])
def test_bad_configs_give_one_line_errors(bad, named):
    with pytest.raises(ConfigError) as e:
        bad()
    assert named in str(e.value) and "\n" not in str(e.value)


def test_distill_without_a_metric_or_with_an_unknown_one(world, tmp_path):
    trainer = NLPTrainer(model=student(), args=training_args(tmp_path / "m", num_train_epochs=1),
                         eval_dataset=cache_rows(world["caches"]["dev"]), data_collator=pad_rows)
    d_conf = DistillationConfig(teacher_cache=world["caches"]["train"])
    with pytest.raises(ConfigError, match=r"trainer\.metrics = metrics\.Metric"):
        trainer.distill(d_conf)
    with pytest.raises(ConfigError, match="give exactly one teacher"):
        trainer.distill(DistillationConfig(), eval_func=lambda m: 0.0)
    trainer.metrics = metrics.Metric(name="eval_acc")
    with pytest.raises(ConfigError, match=r"\['eval_acc'\] not in the evaluation results .*'eval_loss'"):
        trainer.distill(d_conf)
