"""DDP looks for unused parameters only where a run leaves some out by construction (issue #30, item 7).

find_unused_parameters=True traverses the autograd graph after every forward; a single-task student uses
every parameter, a multi-task student one head per batch (per-task adaptors, or a forward taking ``task``).
The two-process runs are in test_ddp.py and tests/recipes/distill/test_distill.py.
"""
import pytest
import torch
from torch import nn

import cachebrew
from cachebrew.components.students import MultiTaskStudent
from helpers import tiny_bert


def make(cls, tmp_path, student, **kw):
    cfg = cachebrew.TrainingConfig(device="cpu", output_dir=str(tmp_path), progress_bar=False)
    return cls(cfg, cachebrew.DistillationConfig(), None, student, None, kw.get("adaptor_S", lambda b, o: {}))


def test_single_task_distillers_do_not_search(tmp_path):
    for cls in (cachebrew.BasicDistiller, cachebrew.GeneralDistiller):
        assert make(cls, tmp_path, tiny_bert())._find_unused_parameters() is False
        assert make(cls, tmp_path, nn.Linear(2, 2))._find_unused_parameters() is False


def test_multi_task_runs_search(tmp_path):
    d = make(cachebrew.MultiTaskDistiller, tmp_path, tiny_bert(), adaptor_S={"a": lambda b, o: {}})
    assert d._find_unused_parameters() is True
    encoder = tiny_bert().bert
    student = MultiTaskStudent(encoder, {"a": 3, "b": 2}, {"a": False, "b": True})
    assert make(cachebrew.GeneralDistiller, tmp_path, student)._find_unused_parameters() is True
    # seen through a wrapper too (DataParallel, DDP)
    d = make(cachebrew.GeneralDistiller, tmp_path, student)
    d.model_S = nn.DataParallel(student)
    assert d._find_unused_parameters() is True


@pytest.mark.parametrize("value", [True, False])
def test_the_distiller_attribute_overrides(tmp_path, value):
    d = make(cachebrew.MultiTaskDistiller, tmp_path, tiny_bert(), adaptor_S={"a": lambda b, o: {}})
    d.find_unused_parameters = value
    assert d._find_unused_parameters() is value


def test_ddp_gets_the_decision(tmp_path, monkeypatch):
    """_wrap_parallel passes the flag to DistributedDataParallel (captured: no process group needed)."""
    seen = []

    class FakeDDP(nn.Module):
        def __init__(self, module, device_ids=None, find_unused_parameters=False):
            super().__init__()
            self.module = module
            seen.append(find_unused_parameters)

    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel", FakeDDP)
    for cls, student, expected in ((cachebrew.GeneralDistiller, tiny_bert(), False),
                                   (cachebrew.GeneralDistiller,
                                    MultiTaskStudent(tiny_bert().bert, {"a": 3}, {"a": False}), True)):
        d = make(cls, tmp_path, student)
        d.local_rank = 0  # as under torchrun
        seen.clear()
        d._wrap_parallel()
        assert seen == [expected] and isinstance(d.model_S, FakeDDP)
