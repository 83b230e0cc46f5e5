"""What every arm of a benchmark shares: one numeric precision, and step timing from inside a training loop.

Precision (`--precision`, one setting applied to every arm of a run, so a ratio measures the cache, not the
arithmetic):
  bf16   torch.autocast(bf16) around every arm's forward + loss (cachebrew amp='bf16', TextBrewer's
         train_on_batch under the same torch.autocast, the Trainer's bf16=True); TF32 on for what stays fp32
  tf32   no autocast, fp32 weights and activations with TF32 matmuls / convolutions on every arm
  fp32   no autocast, TF32 off on every arm (the CPU default; TF32 does not exist there)
The TF32 switches are process-wide (torch.backends), so every arm of the process gets the same ones.

Timing (`StepTimer`): the loop calls mark(i) with the number of steps it has finished; steps
[warmup, warmup + steps) are timed, warm-up excluded. On CUDA the marks are torch.cuda.Event(enable_timing=True)
recorded on the compute stream, read after synchronizing, so the figure is the GPU stream's time over exactly
those steps (host stalls included, as they leave the GPU idle); on the CPU they are time.perf_counter().
"""
from __future__ import annotations

import time

import torch

PRECISIONS = ("bf16", "tf32", "fp32")


def default_precision(device: str) -> str:
    return "bf16" if torch.device(device).type == "cuda" else "fp32"


def apply_precision(precision: str) -> str | None:
    """Set the process-wide TF32 switches for `precision`; return the autocast mode ('bf16' or None)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    tf32 = precision in ("bf16", "tf32")
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    return "bf16" if precision == "bf16" else None


def describe_precision(precision: str, device: str) -> str:
    cuda = torch.device(device).type == "cuda"
    tf32 = (", TF32 on" if precision in ("bf16", "tf32") else ", TF32 off") if cuda else ""
    what = {"bf16": "bf16 autocast", "tf32": "fp32 (TF32 matmuls)" if cuda else "fp32", "fp32": "fp32"}[precision]
    return f"{what} on every arm{tf32}"


def autocast(precision: str, device):
    """The autocast context for `precision` on `device` (a null context for tf32 / fp32)."""
    import contextlib

    if precision != "bf16":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


class StepTimer:
    """Times steps [warmup, warmup + steps) of a loop that calls mark(i) after i steps (i = 0, 1, ...)."""

    def __init__(self, device, warmup: int, steps: int):
        if warmup < 1 or steps < 1:
            raise ValueError(f"warmup and steps must be >= 1, got {warmup} and {steps}")
        self.cuda = torch.device(device).type == "cuda"
        self.first, self.last, self.steps = warmup, warmup + steps, steps
        self._marks: dict = {}

    def mark(self, i: int) -> None:
        if i not in (self.first, self.last) or i in self._marks:
            return
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record(torch.cuda.current_stream())
            self._marks[i] = event
        else:
            self._marks[i] = time.perf_counter()

    def seconds(self) -> float:
        missing = [i for i in (self.first, self.last) if i not in self._marks]
        if missing:
            raise RuntimeError(f"the loop never reached step(s) {missing}: it ran fewer than {self.last} steps")
        start, end = self._marks[self.first], self._marks[self.last]
        if self.cuda:
            end.synchronize()
            return start.elapsed_time(end) / 1e3  # milliseconds
        return end - start
