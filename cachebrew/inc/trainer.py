"""NLPTrainer: ITREX's ``trainer.distill(distillation_config)`` on the Trainer's own loop.

Built exactly like a ``transformers.Trainer`` (it trains and evaluates as one until ``distill`` is called), so
TrainingArguments, accumulation, bf16, torchrun and callbacks all hold. ``distill`` then does what Intel's
does: trains the student with the configured criterion, evaluates it at the end of every epoch (and at every
evaluation the TrainingArguments ask for) with ``trainer.metrics`` or ``eval_func``, and returns the best model
by that score, loaded into ``trainer.model`` and saved to ``output_dir``.
"""
from __future__ import annotations

from transformers import TrainerCallback

from ..configurations import DistillationConfig as TextBrewerDistillationConfig
from ..errors import ConfigError
from ..hf.trainer import DistillationTrainer
from .config import DistillationConfig
from .metrics import combined_score, greater_is_better


class BestModelTracker(TrainerCallback):
    """Keeps a CPU copy of the student's weights whenever its score beats the best so far (strictly, as INC)."""

    def __init__(self, trainer: NLPTrainer, metrics=None, eval_func=None):
        self.trainer, self.metrics, self.eval_func = trainer, metrics, eval_func
        self.greater = True if eval_func is not None else greater_is_better(metrics)  # INC: eval_func larger = better
        self.best_score = self.best_state = self.best_step = None
        self.scores = []  # (global step, score) of every evaluation

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.eval_func is not None:
            self.consider(float(self.eval_func(self.trainer.model)), state)
        elif args.eval_strategy != "epoch":  # with "epoch" the Trainer evaluates right after this anyway
            control.should_evaluate = True

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if self.eval_func is None and metrics is not None:
            self.consider(combined_score(self.metrics, metrics), state)

    def consider(self, score: float, state) -> None:
        self.scores.append((state.global_step, score))
        if self.best_score is None or (score > self.best_score if self.greater else score < self.best_score):
            self.best_score, self.best_step = score, state.global_step
            self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in self.trainer.model.state_dict().items()}


class NLPTrainer(DistillationTrainer):
    """``NLPTrainer(model=student, args=..., train_dataset=..., eval_dataset=..., compute_metrics=...)``.

    Attributes Intel's scripts set: ``metrics`` (a metrics.Metric or list), ``eval_func``, ``train_func``,
    ``resuming_checkpoint`` (passed to ``train``).
    """

    distillation_config_required = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.metrics = None
        self.eval_func = None
        self.train_func = None
        self.resuming_checkpoint = None
        self.best_model_tracker = None
        self._given_optimizers = (self.optimizer, self.lr_scheduler)

    def distill(self, distillation_config, teacher_model=None, provider: str = "inc", eval_func=None,
                train_func=None, teacher_cache=None):
        """Distil into ``self.model`` and return the best model by ``self.metrics`` (or ``eval_func``).

        distillation_config: a cachebrew.inc DistillationConfig (INC's numerics), or a TextBrewer-style
            cachebrew DistillationConfig (TextBrewer's numerics) with the teacher given here.
        teacher_model / teacher_cache: the teacher, when the config does not carry it (exactly one in all).
        eval_func(model) -> float (larger is better), instead of evaluating ``self.metrics``.
        train_func(model): trains instead of ``self.train()`` (the best-model tracking stays attached).
        """
        if provider != "inc":
            raise ConfigError(f"NLPTrainer.distill: provider {provider!r} is not supported (only 'inc')")
        metrics, teacher_weights = self.metrics, None
        if isinstance(distillation_config, DistillationConfig):
            criterion = distillation_config.distillation_config
            teacher_model = teacher_model if teacher_model is not None else distillation_config.teacher_model
            teacher_cache = teacher_cache if teacher_cache is not None else distillation_config.teacher_cache
            teacher_weights = distillation_config.teacher_weights
            metrics = distillation_config.metrics if distillation_config.metrics is not None else metrics
        elif isinstance(distillation_config, (TextBrewerDistillationConfig, dict)):
            criterion = distillation_config
        else:
            raise ConfigError(f"NLPTrainer.distill: distillation_config must be a cachebrew.inc DistillationConfig "
                              f"(or a TextBrewer-style cachebrew DistillationConfig), got "
                              f"{type(distillation_config).__name__}")
        if (teacher_model is None) == (teacher_cache is None):
            raise ConfigError("NLPTrainer.distill: give exactly one teacher: DistillationConfig(teacher_model=...) or "
                              "distill(teacher_model=...) to distil online, or DistillationConfig(teacher_cache=...) "
                              "to distil from a cachebrew cache")
        eval_func = eval_func if eval_func is not None else self.eval_func
        train_func = train_func if train_func is not None else self.train_func
        if eval_func is None:
            if metrics is None:
                raise ConfigError("NLPTrainer.distill: nothing to choose the best model by: set trainer.metrics = "
                                  "metrics.Metric(name='eval_accuracy') (or DistillationConfig(metrics=...)), or pass "
                                  "eval_func")
            if self.eval_dataset is None:
                raise ConfigError("NLPTrainer.distill: trainer.metrics needs an eval_dataset to evaluate on (or pass "
                                  "eval_func)")
            greater_is_better(metrics)  # validates the metrics before any training
        self.metrics = metrics

        if teacher_cache is not None:
            self.train_dataset = self.cache_dataset(self.args, teacher_cache, teacher_weights=teacher_weights)
        self.configure_distillation(criterion, teacher_model=teacher_model)
        self.optimizer, self.lr_scheduler = self._given_optimizers  # a fresh optimizer unless the user gave one
        tracker = self.best_model_tracker = BestModelTracker(self, metrics=metrics, eval_func=eval_func)
        self.add_callback(tracker)
        try:
            if train_func is not None:
                train_func(self.model)
            else:
                self.train(resume_from_checkpoint=self.resuming_checkpoint)
        finally:
            self.remove_callback(tracker)
        if tracker.best_state is not None:
            self.model.load_state_dict(tracker.best_state)
        self.save_model()
        return self.model
