"""A distillation micro-step never waits for the host (issue #30, item 7).

On a GPU, an op whose output shape depends on the data (``x[mask]``, ``masked_select``, ``nonzero``,
``unique``) or that reads a value back (``.item()``, ``bool(t)``, ``if t:``) blocks the Python thread until
the device has caught up, so the next kernels are not queued while the current ones run. These tests run one
micro-step (the distiller's ``_loss_on_batch`` and the backward, as the training loop does) under a dispatch
mode that records such ops, on CPU, for sequence classification with intermediate matches, token
classification with a logits_mask, and a causal LM against a sparse-logit cache, and require none from
cachebrew. Ops raised inside the models themselves (transformers' mask builder checks
``padding_mask.all()``) are counted apart: they are the model's, not the objective's.

    pytest tests/test_host_syncs.py -s   # prints the model-side syncs it saw
"""
from __future__ import annotations

import os
import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import cachebrew
from cachebrew import DistillationConfig
from cachebrew.cache.sparse import sparse_targets
from cachebrew.core.models import hf_adaptor
from cachebrew.losses import cos_loss, kd_ce_loss, sparse_kd_loss
from cachebrew.objective import DistillationLoss, probability_shift_
from cachebrew.presets import KD_LOSS_MAP
from helpers import full_adaptor, loader, make_examples, tiny_bert

aten = torch.ops.aten
# ops that make the host wait for the device: a data-dependent output shape, or a value read back
SYNC_OPS = {aten.nonzero, aten.masked_select, aten._local_scalar_dense, aten.is_nonzero, aten.equal,
            aten._unique, aten._unique2, aten.unique_dim, aten.unique_consecutive, aten.unique_dim_consecutive,
            aten.bincount}
INDEX_OPS = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_}
TORCH_DIR = os.path.dirname(torch.__file__) + os.sep


def _bool_index(args, kwargs):
    indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices)


def _caller() -> str:
    """The innermost frame outside torch: the code that asked for the op."""
    for frame in reversed(traceback.extract_stack()[:-3]):  # minus _caller, record and __torch_dispatch__
        if not frame.filename.startswith(TORCH_DIR):
            return f"{frame.filename}:{frame.lineno}"
    return "?"


class HostSyncs(TorchDispatchMode):
    """Records every host-syncing op, split into the models' (transformers) and everything else's."""

    def __init__(self):
        super().__init__()
        self.ours: list[str] = []
        self.models: list[str] = []

    def record(self, func):
        where = _caller()
        (self.models if f"{os.sep}transformers{os.sep}" in where else self.ours).append(f"{func} at {where}")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func.overloadpacket
        if packet in SYNC_OPS:
            self.record(func)
        elif packet in INDEX_OPS and _bool_index(args, kwargs):
            self.record(f"{func} with a bool index")
        elif packet is aten.repeat_interleave and kwargs.get("output_size") is None and func.name().endswith(
                "Tensor"):
            self.record(func)
        return func(*args, **kwargs)


def test_the_counter_sees_the_syncs_it_looks_for():
    x, m = torch.randn(3, 4), torch.tensor([[1, 0, 1, 1]] * 3).bool()
    with HostSyncs() as syncs:
        x[m], torch.masked_select(x, m), m.nonzero(), x.sum().item(), bool(m.any()), torch.unique(m)
        torch.where(m, x, 0).sum() / m.sum().clamp_min(1)  # the weighted form: nothing to record
    assert len(syncs.ours) == 6, syncs.ours


def micro_step(distiller, batch):
    """One micro-step as TrainingLoop._fit runs it: the loss on the batch, then the backward."""
    with HostSyncs() as syncs:
        loss, _ = distiller._loss_on_batch(batch, {})
        loss.backward()
    if syncs.models:
        print(f"\n{len(syncs.models)} host syncs inside the models (transformers): {syncs.models}")
    assert torch.isfinite(loss)
    return syncs


def distiller(cls, tmp_path, model_T, model_S, adaptor_T, adaptor_S, **distill):
    cfg = cachebrew.TrainingConfig(device="cpu", output_dir=str(tmp_path), progress_bar=False)
    return cls(cfg, DistillationConfig(**distill), model_T, model_S, adaptor_T, adaptor_S)


MATCHES = [
    {"layer_T": 0, "layer_S": 0, "feature": "hidden", "loss": "hidden_mse", "weight": 1, "proj": ["linear", 32, 48]},
    {"layer_T": 3, "layer_S": 2, "feature": "hidden", "loss": "cos", "weight": 0.5, "proj": ["relu", 32, 48]},
    {"layer_T": 2, "layer_S": 1, "feature": "attention", "loss": "attention_mse", "weight": 1},
    {"layer_T": 1, "layer_S": 0, "feature": "attention", "loss": "attention_ce", "weight": 0.2},
    {"layer_T": 2, "layer_S": 1, "feature": "attention", "loss": "attention_mse_sum", "weight": 1},
    {"layer_T": 1, "layer_S": 0, "feature": "attention", "loss": "attention_ce_mean", "weight": 0.2},
    {"layer_T": [0, 3], "layer_S": [0, 2], "feature": "hidden", "loss": "nst", "weight": 1},
    {"layer_T": [1, 2], "layer_S": [1, 2], "feature": "hidden", "loss": "fsp", "weight": 1, "proj": ["tanh", 32, 48]},
    {"layer_T": 3, "layer_S": 2, "feature": "hidden", "loss": "pkd", "weight": 1, "proj": ["linear", 32, 48]},
]


def test_sequence_classification_with_every_match_loss(tmp_path):
    teacher, student = tiny_bert(seed=0, layers=3, hidden=48), tiny_bert(seed=1, layers=2, hidden=32)
    batch = next(iter(loader(make_examples(8))))
    assert (batch["attention_mask"] == 0).any()  # padding, so the masks matter
    d = distiller(cachebrew.GeneralDistiller, tmp_path, teacher, student, full_adaptor, full_adaptor,
                  temperature=4, hard_label_weight=0.5, intermediate_matches=MATCHES)
    with d:
        syncs = micro_step(d, batch)
    assert syncs.ours == []


def ner_adaptor(batch, outputs):
    """A NER adaptor: token logits, the positions they count at, labels -100 at padding."""
    return {**full_adaptor(batch, outputs), "logits_mask": batch["attention_mask"]}


@pytest.mark.parametrize("probability_shift", [False, True])
@pytest.mark.parametrize("name", ["GeneralDistiller", "BasicDistiller"])
def test_token_classification_with_logits_mask(tmp_path, name, probability_shift):
    teacher = tiny_bert(seed=0, layers=3, hidden=48, num_labels=5, token_level=True)
    student = tiny_bert(seed=1, layers=2, hidden=32, num_labels=5, token_level=True)
    batch = next(iter(loader(make_examples(8, num_labels=5, token_level=True))))
    assert (batch["labels"] == -100).any()
    matches = MATCHES[:4] if name == "GeneralDistiller" else None
    d = distiller(getattr(cachebrew, name), tmp_path, teacher, student, ner_adaptor, ner_adaptor, temperature=3,
                  hard_label_weight=0.5, probability_shift=probability_shift, intermediate_matches=matches)
    with d:
        syncs = micro_step(d, batch)
    assert syncs.ours == []


def sparse_cache_batch(method, B=3, L=7, V=40, K=6, T=2.0, seed=0):
    """A causal-LM batch as the cache loader yields it: right padding, labels -100 there, and sparse targets
    (B, L, K) with id 0 / mass 0 at padding positions (and tail 1 - sum(mass) for top-k)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([L, 4, 2])[:B]
    mask = (torch.arange(L)[None] < lengths[:, None]).long()
    input_ids = torch.randint(1, V, (B, L), generator=g) * mask
    keep = mask.bool()
    teacher_rows = torch.randn(int(keep.sum()), V, generator=g) * 3
    u = torch.rand(teacher_rows.size(0), K, generator=g, dtype=torch.float64) if method == "sampled" else None
    ids, mass = sparse_targets(teacher_rows, method, K, T, u)
    target = {"ids": torch.zeros(B, L, K, dtype=torch.long), "mass": torch.zeros(B, L, K),
              "method": method, "temperature": T}
    target["ids"][keep], target["mass"][keep] = ids, mass
    if method == "topk":
        target["tail"] = (1.0 - target["mass"].sum(dim=-1)).clamp_(min=0.0)
    student = {"input_ids": input_ids, "attention_mask": mask, "labels": input_ids.masked_fill(mask == 0, -100)}
    # the loader sets the cache's logits_mask to the student's attention mask; on a GPU each side is its own copy
    return {"student": student, "teacher_cache": {"logits": target, "logits_mask": mask.clone()}}


def tiny_gpt2(V=40, seed=1):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=V, n_positions=16, n_embd=16, n_layer=1, n_head=2, bos_token_id=0,
                                      eos_token_id=0, attn_implementation="eager"))


@pytest.mark.parametrize("method", ["topk", "sampled"])
@pytest.mark.parametrize("kd_loss_type", ["ce", "kl"])
def test_causal_lm_against_sparse_logits(tmp_path, method, kd_loss_type):
    d = distiller(cachebrew.GeneralDistiller, tmp_path, None, tiny_gpt2(), None, hf_adaptor, temperature=2.0,
                  hard_label_weight=0.5, kd_loss_type=kd_loss_type)
    with d:
        syncs = micro_step(d, sparse_cache_batch(method))
    assert syncs.ours == []
    assert d.model_S.lm_head.weight.grad.abs().sum() > 0


# -- weighting by the mask gives the numbers of selecting the positions -------------------------------------------
def token_results(seed=0, B=3, L=6, C=5):
    g = torch.Generator().manual_seed(seed)
    mask = torch.tensor([[1] * L, [1] * 4 + [0] * (L - 4), [1] * 2 + [0] * (L - 2)])[:B]
    labels = torch.randint(0, C, (B, L), generator=g).masked_fill(mask == 0, -100)
    ls = torch.randn(B, L, C, generator=g).requires_grad_(True)
    lt = torch.randn(B, L, C, generator=g)
    return ls, lt, mask, labels


@pytest.mark.parametrize("probability_shift", [False, True])
@pytest.mark.parametrize("kd_loss_type", sorted(KD_LOSS_MAP))
def test_masked_kd_terms_equal_the_selected_rows_without_a_sync(kd_loss_type, probability_shift):
    ls, lt, mask, labels = token_results()
    loss_fn = DistillationLoss(DistillationConfig(temperature=3, kd_loss_type=kd_loss_type,
                                                  probability_shift=probability_shift))
    with HostSyncs() as syncs:
        loss, _ = loss_fn({"logits": [ls], "logits_mask": [mask], "labels": [labels]},
                          {"logits": [lt], "logits_mask": [mask.clone()]})
        loss.backward()
    assert syncs.ours == []
    sel = mask.bool()
    ref_S = ls.detach()[sel].requires_grad_(True)
    ref_T = probability_shift_(lt[sel], labels[sel]) if probability_shift else lt[sel]
    expected = KD_LOSS_MAP[kd_loss_type](ref_S, ref_T, 3)  # TextBrewer: the kept rows, then the loss
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ls.grad[sel], ref_S.grad, rtol=1e-6, atol=1e-8)
    assert (ls.grad[~sel] == 0).all()


@pytest.mark.parametrize("method", ["topk", "sampled"])
def test_masked_sparse_kd_equals_the_selected_rows(method):
    batch = sparse_cache_batch(method)
    target, keep = batch["teacher_cache"]["logits"], batch["student"]["attention_mask"].bool()
    s = torch.randn(*keep.shape, 40, generator=torch.Generator().manual_seed(3))
    for kind in ("ce", "kl"):
        selected = {k: (v[keep] if isinstance(v, torch.Tensor) else v) for k, v in target.items()}
        torch.testing.assert_close(sparse_kd_loss(s, target, 2.0, kind, mask=keep),
                                   sparse_kd_loss(s[keep], selected, 2.0, kind), rtol=1e-6, atol=1e-7)


def test_a_temperature_scheduler_keeps_textbrewers_selection():
    """flsw's per-example temperatures are normalised over the rows it sees: those stay the selected rows."""
    ls, lt, mask, _ = token_results()
    cfg = DistillationConfig(temperature=3, temperature_scheduler=["flsw", 1, 2])
    loss, _ = DistillationLoss(cfg)({"logits": [ls], "logits_mask": [mask]}, {"logits": [lt], "logits_mask": [mask]})
    sel = mask.bool()
    expected = kd_ce_loss(ls[sel], lt[sel], cfg.temperature_scheduler(ls[sel], lt[sel], 3))
    torch.testing.assert_close(loss, expected, rtol=0, atol=0)


def test_all_masked_positions_give_zero_not_nan():
    ls, lt, mask, _ = token_results()
    none = torch.zeros_like(mask)
    loss, _ = DistillationLoss(DistillationConfig(temperature=3))({"logits": [ls], "logits_mask": [none]},
                                                                   {"logits": [lt], "logits_mask": [none]})
    assert loss.item() == 0.0
    assert cos_loss(torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.zeros(2, 3)).item() == 0.0
