"""Distillation fed by teacher_cache batches: the teacher is never called and may be None."""

import pytest
import torch

from helpers import assert_same_weights, changed, full_adaptor, loader, make_examples, run_distiller, tiny_bert
from test_distiller_parity import MATCHES


class CachedLoader:
    """Batches of {'student': batch, 'teacher_cache': outputs} computed once, like a cache read back."""

    def __init__(self, batches, caches):
        self.items = [{"student": b, "teacher_cache": c} for b, c in zip(batches, caches, strict=True)]

    def __iter__(self):
        return iter(self.items)

    def __len__(self):
        return len(self.items)


class Forbidden(torch.nn.Module):
    def forward(self, *a, **k):
        raise AssertionError("the teacher must not be called when a teacher_cache is given")


def _teacher_outputs(teacher, data, adapt):
    outs = []
    with torch.no_grad():
        for b in data:
            o = teacher(**b)
            outs.append(full_adaptor(b, o) if adapt else o)
    return outs


@pytest.fixture(scope="module")
def setup():
    teacher = tiny_bert(seed=0, layers=3, hidden=48)
    student = tiny_bert(seed=1, layers=2, hidden=32)
    data = loader(make_examples(24))
    return teacher, student, data


DK = dict(temperature=4, hard_label_weight=0.5, intermediate_matches=MATCHES)


@pytest.mark.parametrize("mode", ["adaptor-dict", "raw-outputs", "model_T-present-but-unused"])
def test_cache_fed_general_distiller_equals_online(cachebrew, textbrewer, tmp_path, setup, mode):
    teacher, student, data = setup
    online, _ = run_distiller(cachebrew, "GeneralDistiller", teacher, student, data, DK, tmp_path / "online")
    batches = list(data)
    if mode == "adaptor-dict":
        cached = CachedLoader(batches, _teacher_outputs(teacher, batches, adapt=True))
        model_T, adaptor_T = None, None
    elif mode == "raw-outputs":
        cached = CachedLoader(batches, _teacher_outputs(teacher, batches, adapt=False))
        model_T, adaptor_T = None, full_adaptor
    else:
        cached = CachedLoader(batches, _teacher_outputs(teacher, batches, adapt=True))
        model_T, adaptor_T = Forbidden(), None
    fed, _ = run_distiller(cachebrew, "GeneralDistiller", model_T, student, cached, DK, tmp_path / "cache",
                           adaptor_T=adaptor_T)
    assert changed(student, fed) > 1e-3
    assert_same_weights(online, fed, atol=0)  # same arithmetic, so bit-identical
    # and both equal TextBrewer's online run
    tb, _ = run_distiller(textbrewer, "GeneralDistiller", teacher, student, data, DK, tmp_path / "tb")
    assert_same_weights(tb, fed)


def test_cached_outputs_not_mutated_by_probability_shift(cachebrew, tmp_path, setup):
    teacher, student, data = setup
    batches = list(data)
    caches = _teacher_outputs(teacher, batches, adapt=True)
    before = [c["logits"].clone() for c in caches]
    run_distiller(cachebrew, "GeneralDistiller", None, student, CachedLoader(batches, caches),
                  dict(probability_shift=True), tmp_path, adaptor_T=None)
    for b, c in zip(before, caches, strict=True):
        assert torch.equal(b, c["logits"])


def test_multiteacher_from_cache_equals_online(cachebrew, tmp_path, setup):
    _, student, data = setup
    teachers = [tiny_bert(seed=s, layers=2, hidden=48) for s in (10, 11)]
    dk = dict(temperature=4)
    online, _ = run_distiller(cachebrew, "MultiTeacherDistiller", teachers, student, data, dk, tmp_path / "o")
    batches = list(data)
    per_teacher = [_teacher_outputs(t, batches, adapt=True) for t in teachers]
    caches = [list(x) for x in zip(*per_teacher, strict=True)]
    fed, _ = run_distiller(cachebrew, "MultiTeacherDistiller", None, student, CachedLoader(batches, caches), dk,
                           tmp_path / "c", adaptor_T=None)
    assert changed(student, fed) > 1e-3
    assert_same_weights(online, fed, atol=0)


def test_missing_cache_without_teacher_is_a_clear_error(cachebrew, tmp_path, setup):
    _, student, data = setup
    with pytest.raises(cachebrew.BatchError, match="model_T is None.*teacher_cache"):
        run_distiller(cachebrew, "GeneralDistiller", None, student, data, DK, tmp_path)
