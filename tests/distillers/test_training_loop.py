"""What the loop adds beyond TextBrewer: accumulation, AMP, tensorboard, safe checkpoints, clear errors."""
import copy
import os

import pytest
import torch

from cachebrew import BatchError, ConfigError, DistillationConfig, GeneralDistiller, TrainingConfig
from cachebrew.core.weights import load_checkpoint
from cachebrew.distillers import CustomMatch
from helpers import assert_same_weights, changed, loader, logits_adaptor, make_examples, run_distiller, tiny_bert


def hidden_adaptor(batch, out):
    return {"logits": out.logits, "hidden": out.hidden_states}


@pytest.fixture(scope="module")
def pair():
    return tiny_bert(seed=0, layers=3, hidden=48), tiny_bert(seed=1, layers=2, hidden=32)


MATCH = [{"layer_T": 3, "layer_S": 2, "feature": "hidden", "loss": "hidden_mse", "weight": 1,
          "proj": ["linear", 32, 48]}]


def test_gradient_accumulation_equals_big_batch(cachebrew, tmp_path, pair):
    teacher, student = pair
    ex = make_examples(32)
    kw = dict(adaptor_T=hidden_adaptor, adaptor_S=hidden_adaptor)
    dk = dict(temperature=4, intermediate_matches=MATCH)
    big, _ = run_distiller(cachebrew, "GeneralDistiller", teacher, student, loader(ex, 8), dk, tmp_path / "a", **kw)
    acc, _ = run_distiller(cachebrew, "GeneralDistiller", teacher, student, loader(ex, 4), dk, tmp_path / "b", **kw,
                           train_cfg=dict(gradient_accumulation_steps=2))
    assert changed(student, big) > 1e-3
    assert_same_weights(big, acc, atol=2e-6)
    assert sorted(os.listdir(tmp_path / "a")) == sorted(os.listdir(tmp_path / "b")) == ["gs4.safetensors",
                                                                                      "gs8.safetensors"]


def test_tensorboard_scalars(cachebrew, tmp_path, pair):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    teacher, student = pair
    run_distiller(cachebrew, "GeneralDistiller", teacher, student, loader(make_examples(16)),
                  dict(intermediate_matches=MATCH), tmp_path / "out", adaptor_T=hidden_adaptor,
                  adaptor_S=hidden_adaptor, train_cfg=dict(log_dir=str(tmp_path / "tb")))
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"scalar/total_loss", "scalar/unweighted_kd_loss", "scalar/unweighted_hidden_hidden_mse_2_3",
            "scalar/learning_rate"} <= tags
    totals = acc.Scalars("scalar/total_loss")
    assert [e.step for e in totals] == list(range(8))  # 4 batches x 2 epochs
    assert all(e.value > 0 for e in totals)


def _recording_linears(model, seen: list):
    """A copy of `model` whose every Linear records (autocast on?, autocast dtype, output dtype) per call."""
    model = copy.deepcopy(model)  # the fixture's student stays hook-free

    def hook(module, args, out):
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"), out.dtype))

    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            m.register_forward_hook(hook)
    return model


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_autocast_training_learns(cachebrew, tmp_path, pair, amp):
    teacher, student = pair
    data = loader(make_examples(16))
    dk = dict(temperature=1, intermediate_matches=MATCH)
    full, half = [], []
    fp32, _ = run_distiller(cachebrew, "GeneralDistiller", teacher, _recording_linears(student, full), data, dk,
                            tmp_path / "f", adaptor_T=hidden_adaptor, adaptor_S=hidden_adaptor,
                            train_kwargs=dict(num_epochs=4), lr=1e-2)
    mixed, d = run_distiller(cachebrew, "GeneralDistiller", teacher, _recording_linears(student, half), data, dk,
                             tmp_path / "m", adaptor_T=hidden_adaptor, adaptor_S=hidden_adaptor,
                             train_cfg=dict(amp=amp), lr=1e-2, train_kwargs=dict(num_epochs=4))
    # the student's forward really ran under autocast in the asked dtype (and the fp32 run did not)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    linears = sum(isinstance(m, torch.nn.Linear) for m in student.modules())
    assert len(half) == len(full) == linears * 4 * 4  # every Linear, 4 batches, 4 epochs
    assert set(half) == {(True, dtype, dtype)}
    assert {(on, out) for on, _, out in full} == {(False, torch.float32)}

    def loss(model):
        d.model_S = model
        with torch.no_grad():
            return sum(d.train_on_batch(b, {})[0].item() for b in data)

    start, end_mixed, end_fp32 = loss(copy.deepcopy(student)), loss(mixed), loss(fp32)
    assert end_mixed < 0.9 * start
    assert abs(end_mixed - end_fp32) < 0.05 * start  # 16-bit matmuls, same trajectory
    assert changed(fp32, mixed) > 0  # autocast really ran in reduced precision


def test_checkpoints_are_safetensors_with_config(cachebrew, tmp_path, pair):
    from safetensors import safe_open

    teacher, student = pair
    calls = []
    trained, _ = run_distiller(cachebrew, "GeneralDistiller", teacher, student, loader(make_examples(16)),
                               dict(temperature=6), tmp_path, adaptor_T=logits_adaptor, adaptor_S=logits_adaptor,
                               train_kwargs=dict(num_epochs=None, num_steps=6,
                                                 callback=lambda model, step: calls.append((type(model), step))),
                               train_cfg=dict(ckpt_steps=4))
    assert calls == [(type(student), 4), (type(student), 6)]
    assert sorted(os.listdir(tmp_path)) == ["gs4.safetensors", "gs6.safetensors"]
    fresh = load_checkpoint(tiny_bert(seed=9, layers=2, hidden=32), tmp_path / "gs6.safetensors")
    assert_same_weights(fresh, trained, atol=0)
    with safe_open(tmp_path / "gs6.safetensors", "pt") as f:
        meta = f.metadata()
    assert meta["global_step"] == "6" and '"temperature": 6' in meta["distill_config"]


def test_interrupted_checkpoint_leaves_no_file(tmp_path, monkeypatch):
    import cachebrew.core.weights as ck

    def dies_midway(model, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(ck, "save_model", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        ck.save_checkpoint(torch.nn.Linear(2, 2), tmp_path / "gs1.safetensors")
    assert os.listdir(tmp_path) == []


def test_width_mismatch_without_proj_names_the_match(cachebrew, tmp_path, pair):
    teacher, student = pair
    bad = [{"layer_T": 3, "layer_S": 2, "feature": "hidden", "loss": "hidden_mse", "weight": 1}]
    with pytest.raises(BatchError, match=r"intermediate_matches\[0\].*32 != teacher width 48.*'proj': \['linear', 32, 48\]"):
        run_distiller(cachebrew, "GeneralDistiller", teacher, student, loader(make_examples(8)),
                      dict(intermediate_matches=bad), tmp_path, adaptor_T=hidden_adaptor, adaptor_S=hidden_adaptor)


def test_out_of_range_layer_and_missing_feature(cachebrew, tmp_path, pair):
    teacher, student = pair
    far = [dict(MATCH[0], layer_T=9)]
    with pytest.raises(BatchError, match=r"intermediate_matches\[0\].layer_T=9 is out of range.*4 'hidden'"):
        run_distiller(cachebrew, "GeneralDistiller", teacher, student, loader(make_examples(8)),
                      dict(intermediate_matches=far), tmp_path, adaptor_T=hidden_adaptor, adaptor_S=hidden_adaptor)
    att = [{"layer_T": 1, "layer_S": 1, "feature": "attention", "loss": "attention_mse", "weight": 1}]
    with pytest.raises(BatchError, match="uses feature 'attention', but the student adaptor returned only"):
        run_distiller(cachebrew, "GeneralDistiller", teacher, student, loader(make_examples(8)),
                      dict(intermediate_matches=att), tmp_path, adaptor_T=hidden_adaptor, adaptor_S=hidden_adaptor)


def test_train_argument_errors(cachebrew, tmp_path, pair):
    teacher, student = pair
    with pytest.raises(ConfigError, match="num_epochs or num_steps"):
        run_distiller(cachebrew, "BasicDistiller", teacher, student, loader(make_examples(8)), {}, tmp_path,
                      train_kwargs=dict(num_epochs=None))
    with pytest.raises(ConfigError, match="fewer than TrainingConfig.gradient_accumulation_steps=4"):
        run_distiller(cachebrew, "BasicDistiller", teacher, student, loader(make_examples(8)), {}, tmp_path,
                      train_cfg=dict(gradient_accumulation_steps=4))
    with pytest.raises(ConfigError, match="is_caching_logits=True works only with num_epochs"):
        run_distiller(cachebrew, "BasicDistiller", teacher, student, loader(make_examples(8)),
                      dict(is_caching_logits=True), tmp_path, train_kwargs=dict(num_epochs=None, num_steps=2))


def test_context_restores_modes(cachebrew, tmp_path, pair):
    teacher, student = copy.deepcopy(pair[0]).train(), copy.deepcopy(pair[1]).eval()
    d = GeneralDistiller(TrainingConfig(device="cpu", output_dir=str(tmp_path)), DistillationConfig(),
                         teacher, student, logits_adaptor, logits_adaptor)
    with d:
        assert not teacher.training and student.training
    assert teacher.training and not student.training


def test_custom_match_works(cachebrew, tmp_path, pair):
    """A custom match on the classifier outputs with an MSE loss equals kd_loss_type='mse' at T=1
    (TextBrewer 0.2.1's custom matches crash on a typo)."""
    teacher, student = pair
    data = loader(make_examples(16))
    reference, _ = run_distiller(cachebrew, "GeneralDistiller", teacher, student, data,
                                 dict(kd_loss_type="mse", temperature=1), tmp_path / "r",
                                 adaptor_T=logits_adaptor, adaptor_S=logits_adaptor)
    s = copy.deepcopy(student)
    d = GeneralDistiller(TrainingConfig(device="cpu", output_dir=str(tmp_path / "c"), progress_bar=False),
                         DistillationConfig(kd_loss_weight=0), teacher, s, logits_adaptor, logits_adaptor,
                         custom_matches=[CustomMatch(teacher.classifier, s.classifier, 1.0,
                                                     lambda hs, ht, ms, mt: torch.nn.functional.mse_loss(hs, ht))])
    with d:
        d.train(torch.optim.AdamW(s.parameters(), lr=1e-3), data, num_epochs=2)
    assert changed(student, s) > 1e-3
    assert_same_weights(reference, s, atol=1e-6)


def test_training_steps_read_nothing_back_between_log_steps(cachebrew, tmp_path, pair, monkeypatch):
    """12 optimizer steps (24 micro-steps), logged every 4: cachebrew's code reads tensors back 3 times.

    Reads are counted where cachebrew's own code asks for a value (torch's and transformers' internals
    are theirs: Adam's step counter, for one, is a CPU tensor even on a GPU)."""
    import traceback

    teacher, student = pair
    reads = []
    for name in ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *a, _original=original, _name=name, **k):
            caller = traceback.extract_stack(limit=2)[0]
            if f"{os.sep}cachebrew{os.sep}" in caller.filename:
                reads.append(f"{_name} in {caller.name}")
            return _original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    batches = list(loader(make_examples(48), batch_size=2))
    run_distiller(cachebrew, "GeneralDistiller", teacher, student, batches, dict(intermediate_matches=MATCH),
                  tmp_path / "out", adaptor_T=hidden_adaptor, adaptor_S=hidden_adaptor, train_kwargs=dict(num_epochs=1),
                  train_cfg=dict(log_dir=str(tmp_path / "tb"), log_steps=4, gradient_accumulation_steps=2,
                                 progress_bar=True))
    assert reads == ["tolist in scalars_to_host"] * 3, reads  # the logger's one transfer per log step
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("scalar/total_loss")] == list(range(24))  # still every micro-step
