"""BasicDistiller: single teacher, KD on logits plus the adaptor's own losses (TextBrewer semantics)."""
from __future__ import annotations

import logging
import random

from torch import nn

from ..configurations import DistillationConfig, TrainingConfig
from ..errors import ConfigError
from ..objective import DistillationLoss
from .batches import apply_adaptor, get_outputs_from_batch, has_cache, post_adaptor, split_batch, teacher_outputs
from .loop import TrainingLoop, cycled, epoch_plan, step_plan

logger = logging.getLogger("cachebrew")


def _models(m):
    if m is None:
        return []
    if isinstance(m, (list, tuple)):
        return list(m)
    if isinstance(m, dict):
        return list(m.values())
    return [m]


class DistillationContext:
    """``with distiller:`` puts teachers in eval mode and the student in train mode, then restores both."""

    def __enter__(self):
        self._was_training = [(m, m.training) for m in _models(self.model_T) + _models(self.model_S)]
        for m in _models(self.model_T):
            m.eval()
        for m in _models(self.model_S):
            m.train()
        return self

    def __exit__(self, exc_type, exc_val, exc_tb):
        for m, was in self._was_training:
            m.train(was)


class AbstractDistiller(TrainingLoop, DistillationContext):
    def __init__(self, train_config: TrainingConfig, distill_config: DistillationConfig,
                 model_T, model_S, adaptor_T, adaptor_S):
        self._init_runtime(train_config)
        if not isinstance(distill_config, DistillationConfig):
            raise TypeError(f"distill_config must be a DistillationConfig, got {type(distill_config).__name__}")
        if not isinstance(model_S, nn.Module):
            raise TypeError(f"model_S must be a torch.nn.Module, got {type(model_S).__name__}")
        self.d_config = distill_config
        self.model_T = model_T
        self.model_S = model_S
        self.adaptor_T = adaptor_T
        self.adaptor_S = adaptor_S
        self.loss = DistillationLoss(distill_config, self._make_projections())
        self.logits_cache = []

    def _make_projections(self):
        return None  # GeneralDistiller builds the intermediate matches' projections

    @property
    def kd_loss_weight(self):
        """The KD weight now (it follows kd_loss_weight_scheduler), held by the loss component."""
        return self.loss.kd_loss_weight

    @property
    def hard_label_weight(self):
        return self.loss.hard_label_weight

    def _student(self):
        return self.model_S

    def _set_student(self, module):
        self.model_S = module

    def _checkpoint_metadata(self, global_step):
        meta = super()._checkpoint_metadata(global_step)
        meta["distill_config"] = self.d_config.to_dict()
        return meta

    def _on_optimizer_step(self, progress):
        self.loss.on_optimizer_step(progress)

    def initialize_training(self, optimizer, scheduler_class, scheduler_args, scheduler):
        """Add projection layers to the optimizer, wrap for DDP/DP, build the LR scheduler."""
        in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
        for module, group in self._projection_groups():
            params = [p for p in module.parameters() if id(p) not in in_optimizer]
            if params:
                optimizer.add_param_group({"params": params, **group})
        for m in _models(self.model_T):
            m.to(self.device)
        self._wrap_parallel()
        self.loss.reset_weights()
        return optimizer, self._make_scheduler(optimizer, scheduler_class, scheduler_args, scheduler)

    def _projection_groups(self):
        return []

    def _loss_on_batch(self, batch, args):
        return self.train_on_batch(batch, args)

    def _adapt(self, batch, device_args):
        """Forward student (and teacher unless cached) and run both adaptors."""
        (teacher_batch, results_T), (student_batch, results_S) = get_outputs_from_batch(
            batch, self.device, self.model_T, self.model_S, device_args)
        results_T = apply_adaptor(self.adaptor_T, teacher_batch, results_T, from_cache=has_cache(batch))
        results_S = apply_adaptor(self.adaptor_S, student_batch, results_S, from_cache=False)
        return results_S, results_T


class BasicDistiller(AbstractDistiller):
    """Single-teacher single-task distillation with KD on logits; optionally caches teacher logits in memory."""

    def train(self, optimizer, dataloader, num_epochs=None, scheduler_class=None, scheduler_args=None,
              scheduler=None, max_grad_norm=-1.0, num_steps=None, callback=None, batch_postprocessor=None, **args):
        """Train the student for `num_epochs` over `dataloader`, or for `num_steps` cycling over it.

        callback(model=student, step=global_step) runs at each checkpoint; batch_postprocessor maps each batch
        before the models see it; scheduler_class(optimizer=..., **scheduler_args) builds the LR schedule;
        **args go to every model call.
        """
        if num_epochs is None and num_steps is None:
            raise ConfigError("train() needs num_epochs or num_steps")
        optimizer, scheduler = self.initialize_training(optimizer, scheduler_class, scheduler_args, scheduler)
        if num_steps is not None:
            if self._uses_logit_cache():
                raise ConfigError("DistillationConfig.is_caching_logits=True works only with num_epochs, not num_steps")
            start = self._resume_position()[1]
            plan = step_plan(num_steps, self.t_config, cycled(dataloader, batch_postprocessor, start), start)
        elif self._uses_logit_cache():
            logger.info("caching batches and the teacher's logits in memory")
            self.logits_cache = [self.cache_logits(b, args, batch_postprocessor) for b in dataloader]
            plan = epoch_plan(self.logits_cache, num_epochs, self.t_config,
                              before_epoch=lambda _e: random.shuffle(self.logits_cache))
        else:
            plan = epoch_plan(dataloader, num_epochs, self.t_config, prepare=batch_postprocessor,
                              start=self._resume_position())
        return self._fit(optimizer, scheduler, plan, max_grad_norm, callback, args)

    def _uses_logit_cache(self):
        return self.d_config.is_caching_logits

    def train_on_batch(self, batch, args):
        if isinstance(batch, CachedBatch):
            results_S, results_T = self._adapt_cached(batch, args)
        else:
            results_S, results_T = self._adapt(batch, args)
        return self.compute_loss(results_S, results_T)

    def compute_loss(self, results_S, results_T):
        return self.loss.logits_loss(results_S, results_T)

    def cache_logits(self, batch, args, batch_postprocessor):
        if batch_postprocessor is not None:
            batch = batch_postprocessor(batch)
        teacher_batch, _, cache = split_batch(batch, self.device)
        results_T = teacher_outputs(self.model_T, teacher_batch, cache, args)
        results_T = apply_adaptor(self.adaptor_T, teacher_batch, results_T, from_cache=cache is not None)
        return CachedBatch(batch, [lo.to("cpu") for lo in results_T["logits"]])

    def _adapt_cached(self, cached, args):
        _, (student_batch, results_S) = get_outputs_from_batch(
            cached.batch, self.device, None, self.model_S, args, no_teacher_forward=True)
        results_S = post_adaptor(self.adaptor_S(student_batch, results_S))
        results_T = {"logits": [lo.to(self.device) for lo in cached.logits]}
        if "logits_mask" in results_S:
            results_T["logits_mask"] = results_S["logits_mask"]
        return results_S, results_T


class CachedBatch:
    """A batch with the teacher logits computed once for is_caching_logits."""

    def __init__(self, batch, logits):
        self.batch = batch
        self.logits = logits
