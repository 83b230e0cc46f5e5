"""`amp: auto` picks bf16 only where the GPU computes in bf16 (issue #30, item 7), on a faked CUDA device.

torch.cuda.is_bf16_supported() is True on any CUDA GPU (emulated before Ampere), so capability decides.
"""
import pytest
import torch

from cachebrew.core.training import AMP_DTYPES, resolve_amp


def fake_gpu(monkeypatch, capability, bf16_native):
    calls = {}

    def is_bf16_supported(including_emulation=True):
        calls["including_emulation"] = including_emulation
        return True if including_emulation else bf16_native

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    return calls


@pytest.mark.parametrize("capability", [(8, 0), (8, 6), (9, 0)])
def test_auto_is_bf16_from_ampere_on(monkeypatch, capability):
    calls = fake_gpu(monkeypatch, capability, bf16_native=True)
    assert resolve_amp("auto", torch.device("cuda", 0)) == "bf16"
    assert calls["including_emulation"] is False  # emulated bf16 must not count


@pytest.mark.parametrize("capability", [(7, 0), (7, 5), (6, 1)])
def test_auto_is_fp16_before_ampere(monkeypatch, capability):
    """V100 (7.0), T4 (7.5): bf16 is emulated there, fp16 runs on the tensor cores (the loop adds a GradScaler)."""
    fake_gpu(monkeypatch, capability, bf16_native=False)
    mode = resolve_amp("auto", torch.device("cuda"))
    assert mode == "fp16" and AMP_DTYPES[mode] is torch.float16


def test_auto_needs_both_capability_and_native_support(monkeypatch):
    fake_gpu(monkeypatch, (8, 0), bf16_native=False)  # e.g. a CUDA build too old for bf16 kernels
    assert resolve_amp("auto", torch.device("cuda")) == "fp16"


def test_auto_on_a_torch_without_including_emulation(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)  # torch 2.2: no emulation is counted
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert resolve_amp("auto", torch.device("cuda")) == "bf16"


def test_auto_on_cpu_is_full_precision_and_asks_no_gpu(monkeypatch):
    def no_gpu(*a, **k):
        raise AssertionError("resolve_amp asked CUDA about a CPU run")

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", no_gpu)
    monkeypatch.setattr(torch.cuda, "get_device_capability", no_gpu)
    assert resolve_amp("auto", torch.device("cpu")) is None


@pytest.mark.parametrize("mode, expected", [(None, None), ("none", None), ("bf16", "bf16"), ("fp16", "fp16")])
def test_explicit_modes_pass_through(mode, expected):
    assert resolve_amp(mode, torch.device("cpu")) == expected
