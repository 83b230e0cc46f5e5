"""The one training loop every distiller and the trainer share.

A subclass supplies `_loss_on_batch(batch, args) -> (loss, {name: loss})` and a *plan*: the stream of
(epoch, step_in_epoch, batch) micro-batches, the number of optimizer steps, and when to checkpoint.
Epoch-based, step-based and multi-task training differ only in their plan, so gradient accumulation,
AMP, clipping, DDP gradient sync (or FSDP2 sharding, `shard_module`), weight schedules, logging and checkpoints
are written once.
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.weights import save_checkpoint
from ..core.files import unwrap
from ..configurations import TrainingConfig
from ..core.tensors import scalars_to_host
from ..errors import ConfigError
from ..core.runtime import barrier, ensure_process_group, get_rank, resolve_device, resolve_local_rank
from ..version import __version__
from .batches import prefetch_to_device

logger = logging.getLogger("cachebrew")


def cycle(iterable: Iterable) -> Iterator:
    """Iterate over `iterable` forever, re-entering it (so a shuffling loader reshuffles)."""
    while True:
        yield from iterable


@dataclass
class Plan:
    """What to iterate and when to stop/save. `batches` yields (epoch, step_in_epoch, batch).

    ``is_epoch_end(global_step)``: the step is an epoch's last optimizer step; ``position(epoch, step)``: where a
    run resumed after micro-batch `step` of `epoch` continues, as (epoch, micro-batches consumed)."""

    total_steps: int
    batches: Iterator[tuple[int, int, Any]]
    is_checkpoint: Callable[[int, int], bool]
    is_epoch_end: Callable[[int], bool] = lambda _global_step: False
    position: Callable[[int, int], tuple[int, int]] = lambda epoch, step: (epoch, step + 1)


def shard_module(module: nn.Module, device: torch.device) -> nn.Module:
    """Shard `module` over the process group's ranks with FSDP2 (`fully_shard`), in place: each item of its
    outermost ModuleLists (a transformer's layers) is one unit, then the root takes the rest (embeddings, heads).

    Per layer, so only one layer's full weights exist at a time in forward and backward; that is what lets a
    student too big for one GPU train. Sharding replaces the parameters, so it must happen before an optimizer
    is built over them (DDP, applied at `train`, keeps them).
    """
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        raise ConfigError(f"train.sharding: fsdp needs FSDP2 (torch >= 2.6), this is torch "
                          f"{torch.__version__}") from None
    if device.type == "cuda":
        torch.cuda.set_device(device)  # FSDP2 places the shards on the *current* GPU, which must be this rank's
    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    units: list[tuple[str, nn.Module]] = []
    for name, m in module.named_modules():
        inside = any(name.startswith(prefix + ".") for prefix, _ in units)
        if isinstance(m, nn.ModuleList) and not inside:
            units += [(f"{name}.{i}", layer) for i, layer in enumerate(m)]
    for _, layer in units:  # children before their parent, as fully_shard requires
        fully_shard(layer, mesh=mesh)
    fully_shard(module, mesh=mesh)
    logger.info("student sharded over %d ranks (FSDP2): %d layers, then the rest", mesh.size(), len(units))
    return module


def is_sharded(module) -> bool:
    """Whether `module` is sharded with FSDP2 (`shard_module`)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch < 2.6 has no FSDP2, so nothing is sharded with it
        return False
    return isinstance(module, FSDPModule)


def full_state_dict(module: nn.Module) -> dict:
    """A sharded module's whole state dict, gathered on rank 0's CPU (other ranks get {}): a collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state_dict(module: nn.Module, state: dict) -> None:
    """Load rank 0's whole `state` (other ranks pass {}) into a sharded module, each rank keeping its shard: a
    collective. `state` is consumed (its tensors are replaced by shards)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(module, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


def _positionable(loader):
    """The object that can be told an epoch/position: a cachebrew CacheBatches, directly or in a DataLoader."""
    ds = getattr(loader, "dataset", loader)
    return ds if hasattr(ds, "set_position") else None


def epoch_plan(dataloader, num_epochs: int, t_config: TrainingConfig, prepare=None, before_epoch=None,
               start: tuple[int, int] = (0, 0)) -> Plan:
    """TextBrewer's epoch schedule: `ckpt_frequency` saves per epoch, every `ckpt_epoch_frequency` epochs."""
    accum = t_config.gradient_accumulation_steps
    if not hasattr(dataloader, "__len__"):
        raise ConfigError("the dataloader has no length, so epochs are undefined: pass num_steps instead")
    steps_per_epoch = len(dataloader) // accum
    if steps_per_epoch == 0:
        raise ConfigError(f"the dataloader has {len(dataloader)} batches per epoch, fewer than "
                          f"TrainingConfig.gradient_accumulation_steps={accum}: no optimizer step would run")
    num_epochs = int(num_epochs)
    points = {int(steps_per_epoch * ci / t_config.ckpt_frequency) for ci in range(t_config.ckpt_frequency)}
    logger.info("training steps per epoch: %d, checkpoints at steps %s of each epoch",
                steps_per_epoch, sorted(p or steps_per_epoch for p in points))

    start_epoch, start_step = start
    positionable = _positionable(dataloader)

    def batches():
        for epoch in range(start_epoch, num_epochs):
            skip = start_step if epoch == start_epoch else 0
            if before_epoch is not None:
                before_epoch(epoch)
            if hasattr(getattr(dataloader, "sampler", None), "set_epoch"):
                dataloader.sampler.set_epoch(epoch)  # DistributedSampler reshuffles per epoch only if told
            if positionable is not None:
                positionable.set_position(epoch, skip)  # resume without reading the skipped batches
                numbered = enumerate(dataloader, start=skip)
            else:
                numbered = ((i, b) for i, b in enumerate(dataloader) if i >= skip)
            for step, batch in numbered:
                yield epoch, step, (prepare(batch) if prepare else batch)

    def is_checkpoint(global_step, epoch):
        return (global_step % steps_per_epoch in points
                and ((epoch + 1) % t_config.ckpt_epoch_frequency == 0 or epoch + 1 == num_epochs))

    def position(epoch, step):
        # micro-batches left over by accumulation follow the epoch's last optimizer step: still this epoch's
        return (epoch + 1, 0) if step + 1 >= len(dataloader) else (epoch, step + 1)

    return Plan(steps_per_epoch * num_epochs, batches(), is_checkpoint,
                is_epoch_end=lambda global_step: global_step % steps_per_epoch == 0, position=position)


def step_plan(num_steps: int, t_config: TrainingConfig, batch_stream: Iterator, start_step: int = 0) -> Plan:
    """TextBrewer's step schedule: save every `ckpt_steps` and at the end."""
    num_steps = int(num_steps)
    if num_steps < 1:
        raise ConfigError(f"num_steps must be >= 1, got {num_steps}")
    ckpt_steps = t_config.ckpt_steps or num_steps  # TextBrewer requires ckpt_steps; default: save at the end
    logger.info("total training steps: %d, checkpoint every %d steps", num_steps, ckpt_steps)

    def batches():
        for step, batch in enumerate(batch_stream, start=start_step):
            yield 0, step, batch

    return Plan(num_steps, batches(), lambda gs, _e: gs % ckpt_steps == 0 or gs == num_steps)


def cycled(dataloader, prepare=None, start: int = 0):
    """Endless batches; a CacheBatches loader gets a new epoch (new shuffle) on every pass.
    `start` micro-batches are skipped (positioned, not read, when the loader allows)."""
    positionable = _positionable(dataloader)
    if positionable is None:
        for i, batch in enumerate(cycle(dataloader)):
            if i >= start:
                yield prepare(batch) if prepare else batch
        return
    n = len(dataloader)
    epoch, skip = divmod(start, n)
    while True:
        positionable.set_position(epoch, skip)
        for batch in dataloader:
            yield prepare(batch) if prepare else batch
        epoch, skip = epoch + 1, 0


@dataclass
class StepState:
    """What a step hook sees after each optimizer step (enough to checkpoint a resumable run)."""

    global_step: int
    total_steps: int
    epoch: int
    step: int            # micro-batch index inside the epoch (steps plans: since the start)
    writer_step: int
    optimizer: Any
    scheduler: Any
    scaler: Any
    epoch_end: bool = False                  # this was an epoch's last optimizer step (epoch plans)
    resume_at: tuple[int, int] = (0, 0)      # (epoch, micro-batches consumed): where a resumed run continues


@dataclass
class ResumeState:
    """Where a resumed run starts: counters, plus state dicts for the optimizer, LR scheduler and scaler."""

    global_step: int
    writer_step: int
    epoch: int
    step: int            # micro-batches of `epoch` already consumed
    optimizer: dict
    scheduler: dict | None = None
    scaler: dict | None = None
    extra: dict = field(default_factory=dict)  # distiller-specific state (multi-task draw counts)


class TrainingLoop:
    """Runtime setup (device, DDP, AMP, tensorboard) and `_fit`, the shared loop.

    Pipelines (``cachebrew distill``) write their own resumable checkpoints from a step hook
    (``add_step_hook``), switch TextBrewer's ``gs{N}.safetensors`` writer off (``write_gs_checkpoints =
    False``: one checkpoint path a run), read what to save through ``trained_model``, ``projection_modules``,
    ``optimizer_state`` and ``extra_state``, and continue a run through ``resume_from``; TextBrewer-style scripts
    need none of it.
    """

    t_config: TrainingConfig
    print_freq = 20
    write_gs_checkpoints = True  # TextBrewer's checkpoints at the plan's points; a pipeline with its own sets False

    def _init_runtime(self, train_config: TrainingConfig):
        if not isinstance(train_config, TrainingConfig):
            raise TypeError(f"train_config must be a TrainingConfig, got {type(train_config).__name__}")
        self.t_config = train_config
        self.local_rank = resolve_local_rank(train_config.local_rank)
        self.device = resolve_device(train_config.device, self.local_rank)
        if self.local_rank != -1:
            ensure_process_group(self.device)
        self.rank = get_rank()
        self._tb_writer = None
        self._step_hooks: list[Callable[[StepState], None]] = []
        self._resume: ResumeState | None = None
        self._loss_log: list | None = None

    def add_step_hook(self, hook: Callable[[StepState], None]) -> None:
        """Call `hook(state)` after every optimizer step (checkpointing, evaluation, early stop)."""
        self._step_hooks.append(hook)

    # -- what a pipeline saves ------------------------------------------------------------------------
    def trained_model(self) -> nn.Module:
        """The student as it trains (DDP- or FSDP-wrapped under torchrun): evaluate it, or save `unwrap` of it."""
        return self._student()

    def projection_modules(self) -> list[nn.Module | None]:
        """The trainable modules besides the student (intermediate-match projections), aligned with the matches."""
        return list(self._extra_modules())

    def extra_state(self) -> dict:
        """Distiller-specific state a resumable checkpoint keeps (`ResumeState.extra` gives it back)."""
        return {}

    def resume_from(self, state: ResumeState) -> None:
        """The next `train` continues from `state` instead of starting at step 0."""
        self._resume = state

    def _resume_position(self) -> tuple[int, int]:
        return (self._resume.epoch, self._resume.step) if self._resume else (0, 0)

    # -- hooks for subclasses -------------------------------------------------------------------
    def _student(self) -> nn.Module:
        raise NotImplementedError

    def _set_student(self, module: nn.Module) -> None:
        raise NotImplementedError

    def _extra_modules(self) -> list[nn.Module]:
        """Trainable modules besides the student (projections), wrapped for DDP like the student."""
        return []

    def _loss_on_batch(self, batch, args) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def _on_optimizer_step(self, progress: float) -> None:
        """Called after each optimizer step with global_step / total_steps."""

    def _callback_model(self):
        return self._student()

    # -- runtime ----------------------------------------------------------------------------------
    @property
    def tb_writer(self):
        if self._tb_writer is None and self.t_config.log_dir is not None and self.rank == 0:
            from torch.utils.tensorboard import SummaryWriter  # slow import, only when logging

            self._tb_writer = SummaryWriter(log_dir=str(self.t_config.log_dir))
        return self._tb_writer

    def write_loss(self, total_loss, writer_step, losses_dict=None):
        """Queue one micro-step's losses for tensorboard; `flush_losses` writes them (no host sync here)."""
        if self._loss_log is None:
            return
        self._loss_log.append((writer_step, total_loss.detach(),
                               {name: loss.detach() for name, loss in (losses_dict or {}).items()}))

    def flush_losses(self, progress=None, **postfix) -> None:
        """Write the queued losses with one device-to-host transfer; show their last total on the progress bar."""
        if not self._loss_log:
            return
        queued, self._loss_log[:] = list(self._loss_log), []
        flat = [t for _, total, parts in queued for t in (total, *parts.values())]
        values = iter(scalars_to_host(flat))  # the one sync
        writer = self.tb_writer
        total = None
        for step, _, parts in queued:
            total = next(values)
            named = [(name, next(values)) for name in parts]
            if writer is not None:
                writer.add_scalar("scalar/total_loss", total, step)
                for name, v in named:
                    writer.add_scalar(f"scalar/{name}", v, step)
        if progress is not None:
            progress.set_postfix(loss=f"{total:.4f}", **postfix)

    # DDP's find_unused_parameters=True walks the autograd graph after every forward to find the parameters that
    # will get no gradient: a cost each step, paid for nothing when every parameter takes part in every loss.
    # None: decide from the run (`_find_unused_parameters`); True/False on a distiller instance overrides that,
    # e.g. for a user student whose forward skips modules (DDP's error then names this flag).
    find_unused_parameters: bool | None = None

    def _find_unused_parameters(self) -> bool:
        """Whether some student parameters get no gradient by construction: a multi-task run uses one task's head
        per batch. Recognised without knowing the classes (the distillers know nothing of front ends): per-task
        student adaptors (MultiTaskDistiller's dict), or a student whose forward takes the task (MultiTaskStudent's
        ``task=``). Any other student is taken to use every parameter in each step's loss (TrainingConfig has no
        field for this; set `find_unused_parameters` on the distiller to override)."""
        if self.find_unused_parameters is not None:
            return bool(self.find_unused_parameters)
        if isinstance(getattr(self, "adaptor_S", None), Mapping):
            return True
        try:
            return "task" in inspect.signature(unwrap(self._student()).forward).parameters
        except (TypeError, ValueError):  # a forward without a signature: assume a single task
            return False

    def _trainable(self) -> nn.Module:
        """The student and the extra modules in one container: the names their optimizer state is saved under."""
        return nn.ModuleList([unwrap(m) for m in [self._student(), *self._extra_modules()] if m is not None])

    def optimizer_state(self, optimizer) -> dict:
        """What to checkpoint of `optimizer`: its state dict, or with a sharded student the whole state gathered on
        rank 0's CPU, keyed by parameter name (a collective: every rank calls it; other ranks get {})."""
        if not is_sharded(self._student()):
            return optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(self._trainable(), optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def _load_optimizer_state(self, optimizer, state: dict) -> None:
        """`optimizer_state`'s output back into `optimizer` (sharded: every rank passes the whole state and keeps
        its shard)."""
        if not is_sharded(self._student()):
            optimizer.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(self._trainable(), optimizer, state, options=StateDictOptions(full_state_dict=True))

    def _wrap_parallel(self):
        """DDP (torchrun) or DataParallel around the student and each extra module; a student already sharded
        (`shard_module`) is left as it is, its extra modules (projections, small) still get DDP."""
        student = self._student().to(self.device)
        if self.local_rank != -1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            find_unused = self._find_unused_parameters()
            wrap = lambda m: nn.parallel.DistributedDataParallel(m, device_ids=ids,
                                                                 find_unused_parameters=find_unused)
        elif self.t_config.data_parallel and torch.cuda.device_count() > 1:
            wrap = nn.DataParallel
        else:
            return
        if not isinstance(student, (nn.parallel.DistributedDataParallel, nn.DataParallel)) and not is_sharded(student):
            self._set_student(wrap(student))
        extras = self._extra_modules()
        for i, m in enumerate(extras):
            if m is not None and next(m.parameters(), None) is not None and not isinstance(
                    m, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
                extras[i] = wrap(m)

    def _no_sync(self, sync: bool):
        """Skip DDP's gradient all-reduce (FSDP's reduce-scatter) on accumulation micro-steps; it runs once per
        optimizer step."""
        stack = contextlib.ExitStack()
        if not sync:
            for m in [self._student(), *self._extra_modules()]:
                if isinstance(m, nn.parallel.DistributedDataParallel):
                    stack.enter_context(m.no_sync())
                elif is_sharded(m):
                    m.set_requires_gradient_sync(False)
                    stack.callback(m.set_requires_gradient_sync, True)
        return stack

    def _autocast(self):
        dtype = self.t_config.amp_dtype
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def _make_scheduler(self, optimizer, scheduler_class, scheduler_args, scheduler):
        if scheduler_class is not None:
            return scheduler_class(optimizer=optimizer, **(scheduler_args or {}))
        return scheduler

    # -- the loop -------------------------------------------------------------------------------
    def _fit(self, optimizer, scheduler, plan: Plan, max_grad_norm, callback, args):
        accum = self.t_config.gradient_accumulation_steps
        scaler = torch.amp.GradScaler(self.device.type) if self.t_config.amp_dtype == torch.float16 else None
        print_every = max(plan.total_steps // self.print_freq, 1)
        log_steps = self.t_config.log_steps
        progress = None
        if self.t_config.progress_bar and self.rank == 0:
            from tqdm.auto import tqdm

            progress = tqdm(total=plan.total_steps, desc="train", unit="step", dynamic_ncols=True)
        # losses wait on the device until the next log step: reading one back would stall the GPU's queue
        self._loss_log = [] if progress is not None or self.tb_writer is not None else None
        global_step = writer_step = 0
        resume, self._resume = self._resume, None
        if resume is not None:
            self._load_optimizer_state(optimizer, resume.optimizer)
            if scheduler is not None and resume.scheduler is not None:
                scheduler.load_state_dict(resume.scheduler)
            if scaler is not None and resume.scaler is not None:
                scaler.load_state_dict(resume.scaler)
            global_step, writer_step = resume.global_step, resume.writer_step
            self._on_optimizer_step(global_step / plan.total_steps)
            if progress is not None:
                progress.update(global_step)
            logger.info("resuming at global step %d (epoch %d, micro-batch %d)", global_step, resume.epoch + 1,
                        resume.step)
        current_epoch = resume.epoch if resume is not None else None
        try:
            if global_step >= plan.total_steps:
                return global_step
            for epoch, step, batch in prefetch_to_device(plan.batches, self.device):
                if epoch != current_epoch:
                    # A new epoch drops any partial accumulation, as TextBrewer does.
                    optimizer.zero_grad()
                    current_epoch = epoch
                sync = (step + 1) % accum == 0
                with self._no_sync(sync):
                    with self._autocast():
                        total_loss, losses_dict = self._loss_on_batch(batch, args)
                    self.write_loss(total_loss, writer_step, losses_dict)
                    writer_step += 1
                    total_loss = total_loss / accum
                    (scaler.scale(total_loss) if scaler else total_loss).backward()
                if not sync:
                    continue
                if max_grad_norm > 0:
                    if scaler:
                        scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(self._student().parameters(), max_grad_norm)
                if scaler:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                if scheduler is not None:
                    scheduler.step()
                optimizer.zero_grad()
                global_step += 1
                self._on_optimizer_step(global_step / plan.total_steps)
                if progress is not None:
                    progress.update(1)
                if global_step % log_steps == 0:
                    self.flush_losses(progress, epoch=epoch + 1)
                if global_step % print_every == 0:
                    logger.info("global step %d/%d, epoch %d", global_step, plan.total_steps, epoch + 1)
                if self.tb_writer is not None:
                    self.tb_writer.add_scalar("scalar/learning_rate", optimizer.param_groups[0]["lr"], global_step)
                if plan.is_checkpoint(global_step, epoch):
                    self.save_and_callback(global_step, step, epoch, callback)
                for hook in self._step_hooks:
                    hook(StepState(global_step, plan.total_steps, epoch, step, writer_step, optimizer, scheduler,
                                   scaler, plan.is_epoch_end(global_step), plan.position(epoch, step)))
                if global_step >= plan.total_steps:
                    break
        finally:
            self.flush_losses(progress)
            if progress is not None:
                progress.close()
            if self._tb_writer is not None:
                self._tb_writer.flush()
        logger.info("training finished after %d optimizer steps", global_step)
        return global_step

    def _checkpoint_metadata(self, global_step):
        return {"cachebrew_version": __version__, "global_step": global_step,
                "train_config": self.t_config.to_dict()}

    def save_and_callback(self, global_step, step, epoch, callback):
        """Rank 0 writes gs{global_step}.safetensors (TextBrewer's checkpoint); every rank then runs the callback."""
        if self.rank == 0 and self.write_gs_checkpoints and self.t_config.keep_checkpoints != 0:
            logger.info("saving at global step %d, epoch step %d, epoch %d", global_step, step + 1, epoch + 1)
            core = self._student()
            core = unwrap(core)
            path = os.path.join(self.t_config.output_dir, f"gs{global_step}.safetensors")
            save_checkpoint(core, path, self._checkpoint_metadata(global_step))
            keep = self.t_config.keep_checkpoints
            if keep is not None:
                old = sorted(Path(self.t_config.output_dir).glob("gs*.safetensors"),
                             key=lambda p: int(p.stem[2:]) if p.stem[2:].isdigit() else -1)
                for stale in old[:-keep]:
                    stale.unlink(missing_ok=True)
        barrier()  # other ranks wait until the checkpoint exists
        if callback is not None:
            logger.info("running callback at step %d", global_step)
            callback(model=self._callback_model(), step=global_step)
            self._student().train()
