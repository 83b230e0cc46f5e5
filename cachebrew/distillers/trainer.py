"""BasicTrainer: plain supervised training (e.g. fine-tuning a teacher) on the same loop as the distillers."""
from __future__ import annotations

from ..configurations import TrainingConfig
from ..errors import BatchError, ConfigError
from .batches import call_model, move_to_device, post_adaptor
from .loop import TrainingLoop, cycled, epoch_plan, step_plan


class BasicTrainer(TrainingLoop):
    """Minimises the sum of the adaptor's ``losses``. ``with trainer:`` puts the model in train mode."""

    def __init__(self, train_config: TrainingConfig, model, adaptor):
        self._init_runtime(train_config)
        self.model = model
        self.adaptor = adaptor

    def __enter__(self):
        self.model_is_training = self.model.training
        self.model.train()
        return self

    def __exit__(self, exc_type, exc_val, exc_tb):
        self.model.train(self.model_is_training)

    def _student(self):
        return self.model

    def _set_student(self, module):
        self.model = module

    def train(self, optimizer, dataloader, num_epochs=None, scheduler_class=None, scheduler_args=None,
              scheduler=None, max_grad_norm=-1.0, num_steps=None, callback=None, batch_postprocessor=None, **args):
        """Same arguments as BasicDistiller.train."""
        if num_epochs is None and num_steps is None:
            raise ConfigError("train() needs num_epochs or num_steps")
        self._wrap_parallel()
        scheduler = self._make_scheduler(optimizer, scheduler_class, scheduler_args, scheduler)
        if num_steps is not None:
            start = self._resume_position()[1]
            plan = step_plan(num_steps, self.t_config, cycled(dataloader, batch_postprocessor, start), start)
        else:
            plan = epoch_plan(dataloader, num_epochs, self.t_config, prepare=batch_postprocessor,
                              start=self._resume_position())
        return self._fit(optimizer, scheduler, plan, max_grad_norm, callback, args)

    def train_on_batch(self, batch, args):
        batch = move_to_device(batch, self.device)
        results = post_adaptor(self.adaptor(batch, call_model(self.model, batch, args)))
        if "losses" not in results:
            raise BatchError("'losses' not in the output of adaptor. Nothing to optimize!")
        total_loss = 0
        for loss in results["losses"]:
            total_loss = total_loss + loss.mean()
        return total_loss

    def _loss_on_batch(self, batch, args):
        loss = self.train_on_batch(batch, args)
        return loss, {}
