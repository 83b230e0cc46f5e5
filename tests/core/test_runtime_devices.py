"""Which GPU each torchrun process gets (`core.runtime.resolve_device`) and how it joins the nccl group, checked on
CPU against a fake torch.cuda with N GPUs; torch.device objects are real, so torch's own parsing applies."""
import inspect

import pytest
import torch

from cachebrew.core import runtime
from cachebrew.errors import CachebrewError, ConfigError


@pytest.fixture
def gpus(monkeypatch):
    """``gpus(n)``: torch.cuda as a process that sees n GPUs; returns the devices passed to set_device."""
    calls = []

    def install(n):
        def set_device(device):
            index = torch.cuda._get_device_index(device)  # torch's own check: a bare "cuda" is refused
            if not 0 <= index < n:
                raise RuntimeError("CUDA error: invalid device ordinal")  # what a real set_device says
            calls.append(torch.device("cuda", index))

        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.cuda, "set_device", set_device)
        return calls

    return install


def torchrun(monkeypatch, local_rank, world=2):
    """The environment torchrun gives one process; returns the local rank the runtime reads from it."""
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("RANK", str(local_rank))
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    return runtime.resolve_local_rank(None)


def test_two_ranks_asking_for_cuda_get_one_gpu_each(gpus, monkeypatch):
    calls = gpus(2)
    got = [runtime.resolve_device("cuda", torchrun(monkeypatch, r)) for r in (0, 1)]
    assert got == [torch.device("cuda", 0), torch.device("cuda", 1)]
    assert calls == got  # each process made its own GPU current


@pytest.mark.parametrize("asked", ["cuda:0", torch.device("cuda", 0), None])
def test_cuda_0_under_torchrun_means_this_ranks_gpu(gpus, monkeypatch, asked):
    """A config is shared by every rank: `cuda:0` in it must not put rank 1 on GPU 0 too."""
    gpus(2)
    assert runtime.resolve_device(asked, torchrun(monkeypatch, 1)) == torch.device("cuda", 1)


def test_another_gpu_index_under_torchrun_is_a_config_error(gpus, monkeypatch):
    gpus(4)
    with pytest.raises(ConfigError, match=r"device: cuda:1 under torchrun .*use 'cuda'"):
        runtime.resolve_device("cuda:1", torchrun(monkeypatch, 0))
    with pytest.raises(ConfigError, match="use 'cuda'"):
        runtime.resolve_device("cuda:3", torchrun(monkeypatch, 1))
    # a rank's own index is accepted: recipes pass the device they resolved on to the training loop
    own = runtime.resolve_device("cuda", torchrun(monkeypatch, 2))
    assert runtime.resolve_device(str(own), 2) == own == torch.device("cuda", 2)


def test_one_visible_gpu_per_process_is_cuda_0_on_every_rank(gpus, monkeypatch):
    """torchrun with CUDA_VISIBLE_DEVICES set per process: rank 1 sees one GPU, and its ordinal is 0, not 1."""
    calls = gpus(1)
    for asked in ("cuda", "cuda:0", None):
        assert runtime.resolve_device(asked, torchrun(monkeypatch, 1)) == torch.device("cuda", 0)
    assert calls and all(d == torch.device("cuda", 0) for d in calls)


def test_more_local_ranks_than_visible_gpus_is_a_clear_error(gpus, monkeypatch):
    gpus(2)
    with pytest.raises(CachebrewError, match=r"LOCAL_RANK=3 but this process sees 2 GPUs.*--nproc_per_node"):
        runtime.resolve_device("cuda", torchrun(monkeypatch, 3, world=4))


def test_without_torchrun_an_explicit_index_is_kept(gpus):
    gpus(2)
    assert runtime.resolve_local_rank(None) == -1  # conftest clears torchrun's variables
    assert runtime.resolve_device("cuda:1", -1) == torch.device("cuda", 1)
    assert runtime.resolve_device("cuda", -1) == torch.device("cuda", 0)
    assert runtime.resolve_device("cpu", -1) == torch.device("cpu")


def test_one_process_of_a_one_rank_torchrun_is_not_distributed(gpus, monkeypatch):
    """WORLD_SIZE=1 (torchrun --nproc_per_node 1) is a plain run: `cuda:1` is taken as given."""
    gpus(2)
    assert runtime.resolve_device("cuda:1", torchrun(monkeypatch, 0, world=1)) == torch.device("cuda", 1)


def test_cuda_without_a_gpu_is_a_clear_error_under_torchrun_too(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for local_rank in (-1, torchrun(monkeypatch, 1)):
        with pytest.raises(RuntimeError, match="CUDA is not available; use device='cpu'"):
            runtime.resolve_device("cuda", local_rank)
    assert runtime.resolve_device(None, 1) == torch.device("cpu")  # nothing asked: the CPU


@pytest.fixture
def init_calls(monkeypatch):
    """dist.init_process_group replaced by a recorder (with torch's real signature), no group yet."""
    calls = []
    real = runtime.dist.init_process_group

    def record(*args, **kwargs):
        calls.append(kwargs)

    record.__signature__ = inspect.signature(real)
    monkeypatch.setattr(runtime.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(runtime.dist, "init_process_group", record)
    return calls


def test_nccl_group_is_told_this_ranks_gpu(init_calls):
    if "device_id" not in inspect.signature(torch.distributed.init_process_group).parameters:
        pytest.skip(f"torch {torch.__version__}: init_process_group has no device_id")
    runtime.ensure_process_group(torch.device("cuda", 1))
    assert init_calls == [{"backend": "nccl", "device_id": torch.device("cuda", 1)}]


def test_gloo_group_gets_no_device_id(init_calls):
    runtime.ensure_process_group(torch.device("cpu"))
    assert init_calls == [{"backend": "gloo"}]


def test_torch_without_device_id_still_starts_nccl(monkeypatch):
    """torch 2.2's init_process_group has no device_id keyword: passing one would be a TypeError."""
    calls = []

    def old_init_process_group(backend=None, init_method=None, timeout=None, world_size=-1, rank=-1, store=None,
                               group_name="", pg_options=None):
        calls.append(backend)

    monkeypatch.setattr(runtime.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(runtime.dist, "init_process_group", old_init_process_group)
    runtime.ensure_process_group(torch.device("cuda", 1))
    assert calls == ["nccl"]
