"""The CUDA code paths' logic, checked on CPU: device resolution and per-rank RNG state."""
import random
import types

import numpy as np
import pytest
import torch

from cachebrew.core import runtime
from cachebrew.recipes.distill.checkpoints import gather_rng_states, restore_rng, rng_state


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch.cuda as one GPU presents it: available, current device 0, set_device checking its argument."""
    calls = []

    def set_device(device):
        # torch's own check (_get_device_index): a bare "cuda" is refused
        if isinstance(device, torch.device) and device.type == "cuda" and device.index is None:
            raise ValueError("Expected a torch.device with a specified index or an integer, but got:cuda")
        calls.append(device)

    fake = types.SimpleNamespace(is_available=lambda: True, current_device=lambda: 0, set_device=set_device,
                                 device_count=lambda: 1)
    monkeypatch.setattr(runtime.torch, "cuda", fake)
    return calls


def test_one_gpu_without_torchrun_gets_an_indexed_device(fake_cuda):
    for asked in (None, "cuda", torch.device("cuda")):
        assert runtime.resolve_device(asked, runtime.resolve_local_rank(None)) == torch.device("cuda", 0)
    assert runtime.resolve_device("cuda:0", -1) == torch.device("cuda", 0)
    assert runtime.resolve_device("cuda", 3) == torch.device("cuda", 0)  # torchrun, one visible GPU per process
    assert fake_cuda and all(d.index is not None for d in fake_cuda)
    assert runtime.resolve_device("cpu", -1) == torch.device("cpu")


def test_cuda_asked_without_a_gpu_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="CUDA is not available; use device='cpu'"):
        runtime.resolve_device("cuda", -1)


def _draws():
    return torch.rand(3).tolist(), random.random(), float(np.random.rand())


def test_each_rank_restores_its_own_rng_streams(caplog):
    states = []
    for seed in (1, 2):  # what two ranks would hold
        torch.manual_seed(seed), random.seed(seed), np.random.seed(seed)
        states.append(rng_state())
    expected = []
    for s in states:
        restore_rng([s])
        expected.append(_draws())
    assert expected[0] != expected[1]
    restore_rng(states, rank=1, world_size=2)
    with caplog.at_level("WARNING", logger="cachebrew"):
        assert _draws() == expected[1]  # rank 1 continues rank 1's stream, not rank 0's
        assert not caplog.records
        restore_rng(states, rank=0)  # one process resuming a two-rank run: told that dropout will differ
        assert _draws() == expected[0]
        assert "RNG states of 2 rank(s), this run has 1" in caplog.text
    assert len(gather_rng_states()) == 1 and "cuda" not in gather_rng_states()[0]


def test_gpu_rng_state_is_skipped_on_cpu():
    torch.manual_seed(5)
    state = rng_state()
    want = torch.rand(2).tolist()
    state["cuda"] = "not even base64"  # a GPU run's state: restored onto a GPU only, never decoded here
    restore_rng([state], 0, torch.device("cpu"))
    assert torch.rand(2).tolist() == want
    state["cuda"] = ["x", "y"]  # older checkpoints: every visible GPU's state, however many
    restore_rng(state, 0, torch.device("cpu"))
    assert torch.rand(2).tolist() == want
