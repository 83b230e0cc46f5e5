"""Training setup shared by `cachebrew distill` and `cachebrew train`: seeds, mixed precision, the
optimizer and schedule of BERT-style fine-tuning, and publishing a trained model."""
from __future__ import annotations

import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError
from .config import is_number
from .files import publish_dir, unwrap
from .models import TOKENIZER_FILES, without_training_outputs

FUSED_ADAMW = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 4)


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_amp(mode: str | None, device: torch.device) -> str | None:
    """A config's `amp` as the mode to use. "auto": bf16 on a GPU that computes in bf16 (Ampere, compute
    capability 8.0, and later), fp16 on an older one, full precision on a CPU (and any other device).

    torch reports bf16 as supported on any CUDA GPU, emulated where the tensor cores lack it (T4, V100): slower
    than fp32 there, while fp16 runs on their tensor cores. The training loop pairs fp16 with a GradScaler."""
    if mode == "auto":
        if device.type != "cuda":
            return None
        return "bf16" if _native_bf16(device) else "fp16"
    return None if mode in (None, "none") else mode


def _native_bf16(device: torch.device) -> bool:
    try:
        supported = torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # torch < 2.3 has no including_emulation and counts no emulation
        supported = torch.cuda.is_bf16_supported()
    return supported and torch.cuda.get_device_capability(device)[0] >= 8


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def warmup_linear(optimizer, num_warmup_steps: int, num_training_steps: int):
    """Linear warm-up then linear decay to 0, the schedule of TextBrewer's and BERT's experiments."""

    def factor(step):
        if step < num_warmup_steps:
            return step / max(1, num_warmup_steps)
        return max(0.0, (num_training_steps - step) / max(1, num_training_steps - num_warmup_steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass
class OptimizerConfig:
    """The optimisation that `cachebrew distill` and `cachebrew train` share (their `train:` sections extend it):
    AdamW (`make_optimizer`), warm-up then linear decay (`warmup_linear`) over `warmup_ratio` of the steps, and
    gradient clipping at `max_grad_norm`.

    ``head_lr``: the task head's own rate (default: ``lr``), as discriminative fine-tuning gives a fresh head a
    larger one. Sentence-transformers checkpoints (all-mpnet-base-v2: hidden values of sd ~0.1, BERT's ~0.5) leave
    a newly initialised head learning for hundreds of steps at an encoder's rate before it predicts more than the
    majority class."""

    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    head_lr: float | None = None

    def optimizer_problems(self, where: str = "train") -> list[str]:
        """Every out-of-range field, as `where.field: ...` messages (the config system reports them together)."""
        e = []
        if not (is_number(self.lr) and self.lr > 0):
            e.append(f"{where}.lr: must be a number > 0, got {self.lr!r}")
        if not (is_number(self.warmup_ratio) and 0 <= self.warmup_ratio < 1):
            e.append(f"{where}.warmup_ratio: must be a number in [0, 1), got {self.warmup_ratio!r}")
        if self.head_lr is not None and not (is_number(self.head_lr) and self.head_lr > 0):
            e.append(f"{where}.head_lr: must be a number > 0 (or null: the same as lr), got {self.head_lr!r}")
        for name in ("weight_decay", "max_grad_norm"):
            if not (is_number(getattr(self, name)) and getattr(self, name) >= 0):
                e.append(f"{where}.{name}: must be a number >= 0, got {getattr(self, name)!r}")
        return e


def head_parameters(model) -> set[int]:
    """The ids of a transformers model's task-head parameters: those outside its base model (the module named by
    ``base_model_prefix``: ``classifier.*``, ``lm_head.*``; a tied output embedding is the base model's)."""
    inner = unwrap(model)  # DDP / torch.compile wrappers hold the same parameters under longer names
    prefix = getattr(inner, "base_model_prefix", "")
    if not prefix or not hasattr(inner, prefix):
        raise ConfigError(f"train.head_lr: {type(inner).__name__} names no base model (base_model_prefix), "
                          "so it has no separate task head; leave head_lr unset")
    base = {id(p) for p in getattr(inner, prefix).parameters()}
    return {id(p) for p in inner.parameters() if id(p) not in base}


def make_optimizer(model, lr, weight_decay, head_lr: float | None = None):
    """AdamW with no weight decay on biases and LayerNorm weights, as BERT fine-tuning does; the task head at
    `head_lr` when given (`OptimizerConfig.head_lr`). Each group keeps its own rate under the schedule.

    The fused kernel where torch has it (CPU and CUDA since 2.4): a small student's step on CPU is
    dominated by the optimizer (15.6M parameters, 11.7M of them word embeddings), which it makes ~6x faster.
    """
    head = head_parameters(model) if head_lr is not None else set()
    groups: dict[tuple[bool, bool], list] = {(h, d): [] for h in (False, True) for d in (True, False)}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decays = not (p.dim() < 2 or "LayerNorm" in name or "layer_norm" in name)
        groups[(id(p) in head, decays)].append(p)
    params = [p for g in groups.values() for p in g]
    fused = FUSED_ADAMW and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    # the encoder's two groups always (the optimizer state a resumable checkpoint holds has them), the head's when
    # head_lr gives it parameters
    return torch.optim.AdamW([{"params": g, "weight_decay": weight_decay if decays else 0.0,
                               "lr": head_lr if in_head else lr}
                              for (in_head, decays), g in groups.items() if g or not in_head],
                             lr=lr, **({"fused": True} if fused else {}))


def save_student(model, path: Path, tokenizer_source: str | None):
    """save_pretrained (or safetensors) into a temporary directory with the tokenizer files, then publish it:
    `path` is always a complete model that `from_pretrained` loads."""
    model = unwrap(model)
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if hasattr(model, "save_pretrained"):
        with without_training_outputs(model):  # the saved config is for the model's users
            model.save_pretrained(str(tmp), safe_serialization=True)
    else:
        from safetensors.torch import save_model

        tmp.mkdir(parents=True)
        save_model(model, str(tmp / "model.safetensors"))
    if tokenizer_source and Path(tokenizer_source).is_dir():
        for f in TOKENIZER_FILES:
            if (Path(tokenizer_source) / f).is_file():
                shutil.copy2(Path(tokenizer_source) / f, tmp / f)
    return publish_dir(tmp, path)
