"""DistillationTrainer: a transformers.Trainer whose batches carry the teacher's outputs.

The Trainer keeps everything it does well (TrainingArguments, bf16, accumulation, evaluation with
compute_metrics, checkpoints and resume, report_to, callbacks, torchrun); only three things change:
the train batches come from a cachebrew cache (``{'student': inputs, 'teacher_cache': outputs}``),
``compute_loss`` is cachebrew's `objective.DistillationLoss`, the one the distillers call (so TextBrewer's and INC's
criteria behave exactly as in ``cachebrew distill``), and projection layers, when a match needs them,
are trained and checkpointed next to the student. Give ``teacher_model`` instead of ``teacher_cache``
and the same script distils online, which is how the two are compared.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback

from ..components.loader import CacheBatches, CacheLoader, RankShare
from ..configurations import DistillationConfig
from ..core.models import hf_adaptor
from ..core.tensors import scalars_to_host
from ..objective import DistillationLoss, build_projections, mean_teacher_logits
from ..distillers.batches import CACHE_KEY, apply_adaptor, call_model, post_adaptor
from ..errors import CachebrewError, ConfigError
from .criteria import to_distillation_config

PROJECTIONS_FILE = "cachebrew_projections.safetensors"
# hidden-state losses that compare the two sides element by element: a width mismatch gets a linear projection,
# as INC adds its feature matcher (INC's 'KL' then takes log(softmax(.)) of the projection, as inc_kl does)
WIDTH_MATCHED_LOSSES = ("hidden_mse", "cos", "inc_mse", "inc_l1", "inc_kl")


class _EpochAndSchedules(TrainerCallback):
    """Keeps the cache's epoch plan and the distillation weight schedules in step with the Trainer.

    Projections are not part of the model, so their gradients are zeroed here after each optimizer step.
    The epoch is set at each epoch's start, so it is right even when a resumed Trainer wraps the
    loader to skip the batches already trained on.
    """

    def __init__(self, trainer: DistillationTrainer):
        self.trainer = trainer

    def on_epoch_begin(self, args, state, control, **kwargs):
        ds = self.trainer.train_dataset
        if isinstance(ds, CacheBatches):
            ds.set_epoch(int(state.epoch + 1e-6) if state.epoch else 0)

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer.distillation_loss.on_optimizer_step(state.global_step / max(state.max_steps, 1))
        self.trainer._projections().zero_grad()

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer.distillation_loss.on_optimizer_step(state.global_step / max(state.max_steps, 1))
        self.trainer._projections().zero_grad()  # the Trainer zeroes only the model's gradients


def _cache_paths(value) -> list[str]:
    return [str(value)] if isinstance(value, (str, Path)) else [str(v) for v in value]


class DistillationTrainer(Trainer):
    """``Trainer(model=student, args=..., ...)`` plus:

    distillation_config: a cachebrew DistillationConfig (or its dict), an INC KnowledgeDistillationLossConfig /
        IntermediateLayersKnowledgeDistillationLossConfig, or a list of the INC ones.
    teacher_cache: a cache directory or a list of them (several teachers: logits averaged, optionally
        weighted by teacher_weights); the train dataset. Or ``train_dataset=CacheBatches(...)`` directly.
    teacher_model: online mode: a teacher (or list of teachers, logits averaged) run on each train batch.
    eval_cache: evaluate on a cache (its inputs and labels) instead of an eval_dataset.
    adaptor_S / adaptor_T: TextBrewer adaptors; the default reads Hugging Face outputs (logits,
        hidden_states, attentions, loss); adaptor_T=None with a cache takes the cached outputs as they are.
    """

    #: NLPTrainer sets this False: it is built like a plain Trainer and configured later, by ``distill``.
    distillation_config_required = True

    def __init__(self, model=None, args=None, distillation_config=None, teacher_cache=None, teacher_model=None,
                 eval_cache=None, teachers=None, teacher_weights=None, adaptor_S=hf_adaptor, adaptor_T=None,
                 shuffle_buffer=2048, train_dataset=None, eval_dataset=None, **kwargs):
        configure_now = distillation_config is not None or self.distillation_config_required
        if configure_now:
            if distillation_config is None:
                raise ConfigError("DistillationTrainer: distillation_config is required (a DistillationConfig or an "
                                  "INC KnowledgeDistillationLossConfig / IntermediateLayersKnowledgeDistillationLossConfig)")
            sources = [x is not None for x in (teacher_cache, teacher_model)]
            if sum(sources) != 1 and not isinstance(train_dataset, CacheBatches):
                raise ConfigError("DistillationTrainer: give exactly one of teacher_cache (distil from a cache) or "
                                  "teacher_model (distil online)")
        if args is None:
            from transformers import TrainingArguments

            args = TrainingArguments(output_dir="trainer_output")
        if teacher_cache is not None:
            train_dataset = self.cache_dataset(args, teacher_cache, teachers, teacher_weights, shuffle_buffer)
        if eval_cache is not None:
            eval_dataset = CacheBatches(_cache_paths(eval_cache), args.per_device_eval_batch_size, shuffle=False,
                                        ranks=RankShare(args.process_index, args.world_size, "records"))
        super().__init__(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset, **kwargs)
        self.distillation_loss = self.distillation_config = self.teacher_model = None
        if configure_now:
            self.configure_distillation(distillation_config, teacher_model=teacher_model, adaptor_S=adaptor_S,
                                        adaptor_T=adaptor_T)

    @staticmethod
    def cache_dataset(args, teacher_cache, teachers=None, teacher_weights=None, shuffle_buffer=2048) -> CacheBatches:
        """The train batches of a cache (or of several teachers' caches) as these TrainingArguments ask for them."""
        a = args
        return CacheBatches(
            _cache_paths(teacher_cache), a.per_device_train_batch_size, shuffle=a.train_sampling_strategy != "sequential",
            seed=a.data_seed if a.data_seed is not None else a.seed, buffer_size=shuffle_buffer,
            # records: the Trainer averages each rank's loss itself (no global denominators), so a split batch would
            # not make N ranks equal one process here; each rank reads its own record batches
            drop_last=a.dataloader_drop_last, ranks=RankShare(a.process_index, a.world_size, "records"),
            teachers=teachers, teacher_weights=teacher_weights)

    def configure_distillation(self, distillation_config, teacher_model=None, adaptor_S=hf_adaptor, adaptor_T=None):
        """Make this Trainer distil: the loss, its projections, the teacher (online) and the schedules' callback.

        Called by ``__init__``; NLPTrainer calls it from ``distill`` (once per call: a second call replaces the loss)."""
        a = self.args
        self.teacher_model = teacher_model
        teachers_list = teacher_model if isinstance(teacher_model, (list, tuple)) else (
            [teacher_model] if teacher_model is not None else [])
        for t in teachers_list:
            t.to(a.device).eval()
        self.adaptor_S, self.adaptor_T = adaptor_S, adaptor_T if adaptor_T is not None or teacher_model is None \
            else hf_adaptor
        d_config = self._with_projections(to_distillation_config(distillation_config))
        self.distillation_loss = DistillationLoss(d_config, build_projections(d_config, a.device))
        self.distillation_config = d_config
        if a.world_size > 1:
            self._average_projection_grads()
        self._forward_args = self._model_outputs_needed(d_config)
        # the distillation loss is a mean per micro-batch: let the Trainer divide it for gradient accumulation
        self.model_accepts_loss_kwargs = False
        self.loss_is_scaled_for_ga = False
        self.remove_callback(_EpochAndSchedules)
        self.add_callback(_EpochAndSchedules(self))

    # -- configuration -----------------------------------------------------------------------------
    def _with_projections(self, d_config: DistillationConfig) -> DistillationConfig:
        """Add a linear projection to every hidden-state match whose widths differ (INC configs have none)."""
        width_S = getattr(getattr(self.model, "config", None), "hidden_size", None)
        width_T = self._teacher_width()
        if width_S is None or width_T is None or width_S == width_T:
            return d_config
        fields = d_config.to_dict()
        for m in fields.get("intermediate_matches") or []:
            if m.get("feature") == "hidden" and m.get("loss") in WIDTH_MATCHED_LOSSES and not m.get("proj"):
                m["proj"] = ["linear", width_S, width_T]
        return DistillationConfig.from_dict(fields)

    def _teacher_width(self):
        if isinstance(self.train_dataset, CacheBatches):
            hidden = [s for _, s in self.train_dataset.joined.specs if s.kind == "hidden"]
            return int(hidden[0].shape[-1]) if hidden else None
        t = self.teacher_model[0] if isinstance(self.teacher_model, (list, tuple)) else self.teacher_model
        return getattr(getattr(t, "config", None), "hidden_size", None)

    @staticmethod
    def _model_outputs_needed(d_config: DistillationConfig) -> dict:
        features = {im.feature for im in d_config.intermediate_matches}
        args = {}
        if "hidden" in features:
            args["output_hidden_states"] = True
        if "attention" in features:
            args["output_attentions"] = True
        return args

    # -- data ------------------------------------------------------------------------------------------
    def get_train_dataloader(self):
        if not isinstance(self.train_dataset, CacheBatches):
            return super().get_train_dataloader()
        return self._cache_loader(self.train_dataset)

    def get_eval_dataloader(self, eval_dataset=None):
        ds = eval_dataset if eval_dataset is not None and not isinstance(eval_dataset, str) else self.eval_dataset
        if isinstance(ds, CacheBatches):
            return self._cache_loader(ds)
        return super().get_eval_dataloader(eval_dataset)

    def num_examples(self, dataloader) -> int:
        ds = getattr(dataloader, "dataset", None)
        if isinstance(ds, CacheBatches):  # len() counts batches; the Trainer's throughput figures need rows
            return min(len(ds) * ds.batch_size, ds.joined.num_rows)
        return super().num_examples(dataloader)

    def _cache_loader(self, ds: CacheBatches) -> CacheLoader:
        # Batches are already cut, padded and split by rank: no sampler, no accelerate re-sharding.
        a = self.args
        workers = a.dataloader_num_workers
        return CacheLoader(ds, num_workers=workers, pin_memory=a.dataloader_pin_memory,
                           persistent_workers=a.dataloader_persistent_workers and workers > 0,
                           prefetch_factor=a.dataloader_prefetch_factor if workers > 0 else None,
                           generator=torch.Generator().manual_seed(a.seed))

    # -- loss ----------------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if getattr(self, "_plain_loss", False) or self.distillation_loss is None:  # evaluation, or not distilling
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        cached = isinstance(inputs, Mapping) and CACHE_KEY in inputs
        student_inputs = inputs["student"] if cached else inputs
        outputs_S = call_model(model, student_inputs, self._forward_args)
        results_S = post_adaptor(self.adaptor_S(student_inputs, outputs_S))
        if cached:
            results_T = apply_adaptor(self.adaptor_T, student_inputs, inputs[CACHE_KEY], from_cache=True)
        elif self.teacher_model is not None:
            results_T = self._online_teacher(student_inputs)
        else:
            raise CachebrewError("DistillationTrainer: a train batch without 'teacher_cache' and no teacher_model")
        loss, parts = self.distillation_loss(results_S, results_T)
        self._last_parts = {k: v.detach() for k, v in parts.items()}  # read back in log(), not every step
        return (loss, outputs_S) if return_outputs else loss

    @torch.no_grad()
    def _online_teacher(self, batch):
        teachers = self.teacher_model if isinstance(self.teacher_model, (list, tuple)) else [self.teacher_model]
        results = [apply_adaptor(self.adaptor_T, batch, call_model(t, batch, self._forward_args), from_cache=False)
                   for t in teachers]
        if len(results) == 1:
            return results[0]
        merged = dict(results[0])  # the first teacher's features; logits averaged, as MultiTeacherDistiller does
        merged["logits"] = mean_teacher_logits([r["logits"] for r in results])
        return merged

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        if isinstance(inputs, Mapping) and "student" in inputs:
            inputs = inputs["student"]
        self._plain_loss = True
        try:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)
        finally:
            self._plain_loss = False

    def log(self, logs, *args, **kwargs):
        if "loss" in logs and getattr(self, "_last_parts", None):
            parts = self._last_parts
            values = scalars_to_host(list(parts.values()))  # one transfer
            logs = {**logs, **{f"distill/{k}": v for k, v in zip(parts, values)}}
        super().log(logs, *args, **kwargs)

    # -- projections: trained with the student, saved in each checkpoint -------------------------------
    def _projections(self) -> torch.nn.ModuleList:
        if self.distillation_loss is None:
            return torch.nn.ModuleList()
        return torch.nn.ModuleList([p for p in self.distillation_loss.projections if p is not None])

    def _average_projection_grads(self):
        """Projections live outside the DDP-wrapped student: average their gradients across ranks ourselves.

        Averaging after every backward is exact under accumulation too (the mean is linear)."""
        world = self.args.world_size

        def hook(p):
            torch.distributed.all_reduce(p.grad)
            p.grad.div_(world)

        for p in self._projections().parameters():
            p.register_post_accumulate_grad_hook(hook)

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        params = list(self._projections().parameters())
        if params and not any(p is params[0] for g in optimizer.param_groups for p in g["params"]):
            optimizer.add_param_group({"params": params, "weight_decay": self.args.weight_decay})
        return optimizer

    def _save(self, output_dir=None, state_dict=None):
        super()._save(output_dir, state_dict)
        projections = self._projections()
        if len(projections) and self.args.should_save:
            from safetensors.torch import save_model

            save_model(projections, str(Path(output_dir or self.args.output_dir) / PROJECTIONS_FILE))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = Path(resume_from_checkpoint) / PROJECTIONS_FILE
        projections = self._projections()
        if len(projections):
            if not path.is_file():
                raise CachebrewError(f"{resume_from_checkpoint}: no {PROJECTIONS_FILE}, but this distillation "
                                     "config trains projections; was the checkpoint made with another config?")
            from safetensors.torch import load_model

            load_model(projections, str(path))
