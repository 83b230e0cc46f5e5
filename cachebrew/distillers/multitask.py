"""MultiTaskDistiller: one student, several tasks, tasks sampled with p(d) proportional to |d|^tau."""
from __future__ import annotations

import logging
from collections import Counter

import numpy as np

from ..errors import ConfigError
from .batches import apply_adaptor, get_outputs_from_batch, has_cache
from .general import GeneralDistiller
from .loop import cycled, step_plan

logger = logging.getLogger("cachebrew")


def task_sampling_weights(sizes: dict[str, int], tau: float) -> dict[str, float]:
    """p(d) = |d|^tau / sum_d' |d'|^tau  (tau=1: proportional to size, tau=0: uniform)."""
    z = sum(pow(v, tau) for v in sizes.values())
    return {k: pow(v, tau) / z for k, v in sizes.items()}


class MultiTaskDistiller(GeneralDistiller):
    """Distils several single-task teachers into one student; supports intermediate matches.

    model_T, adaptor_T and adaptor_S are dicts keyed by task name. model_T may be None (or lack a task)
    when that task's batches carry ``teacher_cache``; adaptor_T may then be None as well.
    Tasks are drawn from numpy's global RNG, as in TextBrewer, so ``np.random.seed`` fixes the task order.
    ``sampled_tasks`` counts the draws of the last ``train``.
    """

    def __init__(self, train_config, distill_config, model_T, model_S, adaptor_T, adaptor_S):
        super().__init__(train_config, distill_config, model_T, model_S, adaptor_T, adaptor_S)
        if not isinstance(adaptor_S, dict):
            raise ConfigError("MultiTaskDistiller: adaptor_S must be a dict {task_name: adaptor}")
        for name, value in (("model_T", model_T), ("adaptor_T", adaptor_T)):
            if value is not None and not isinstance(value, dict):
                raise ConfigError(f"MultiTaskDistiller: {name} must be a dict {{task_name: ...}} or None")
        self.sampled_tasks: Counter = Counter()

    def train(self, optimizer, dataloaders, num_steps, scheduler_class=None, scheduler_args=None, scheduler=None,
              max_grad_norm=-1.0, tau=1, callback=None, batch_postprocessors=None, **args):
        """Train for `num_steps` optimizer steps, drawing each micro-batch's task with p ∝ len(loader)^tau.

        If any dataloader has no length, tasks are drawn uniformly (as in TextBrewer).
        """
        if not isinstance(dataloaders, dict) or not dataloaders:
            raise ConfigError("MultiTaskDistiller.train: dataloaders must be a non-empty dict {task_name: loader}")
        missing = [t for t in dataloaders if t not in self.adaptor_S]
        if missing:
            raise ConfigError(f"MultiTaskDistiller: no adaptor_S for task(s) {missing}")
        optimizer, scheduler = self.initialize_training(optimizer, scheduler_class, scheduler_args, scheduler)
        tasknames = tuple(dataloaders)
        if all(hasattr(v, "__len__") for v in dataloaders.values()):
            weights = task_sampling_weights({k: len(v) for k, v in dataloaders.items()}, tau)
            sampling_weights = tuple(weights[k] for k in tasknames)
            logger.info("task sampling probabilities (tau=%s): %s", tau, weights)
        else:
            logger.info("the size of some datasets is unknown, so tasks are sampled uniformly")
            sampling_weights = None
        counts = dict(self._resume.extra.get("task_counts", {})) if self._resume else {}
        iters = {k: cycled(v, start=counts.get(k, 0)) for k, v in dataloaders.items()}  # resume: each task's position
        self.sampled_tasks = Counter(counts)

        def task_batches():
            while True:
                taskname = str(np.random.choice(tasknames, p=sampling_weights))
                self.sampled_tasks[taskname] += 1
                batch = next(iters[taskname])
                if batch_postprocessors is not None:
                    batch = batch_postprocessors[taskname](batch)
                yield batch, taskname

        plan = step_plan(num_steps, self.t_config, task_batches(), start_step=self._resume_position()[1])
        return self._fit(optimizer, scheduler, plan, max_grad_norm, callback, args)

    def extra_state(self) -> dict:
        """The draws per task so far: a resumed run continues each task's stream where it stopped."""
        return {"task_counts": dict(self.sampled_tasks)}

    def train_on_batch(self, batch_taskname, args):
        batch, taskname = batch_taskname
        model_T = (self.model_T or {}).get(taskname)
        adaptor_T = (self.adaptor_T or {}).get(taskname)
        (teacher_batch, results_T), (student_batch, results_S) = get_outputs_from_batch(
            batch, self.device, model_T, self.model_S, args)
        results_T = apply_adaptor(adaptor_T, teacher_batch, results_T, from_cache=has_cache(batch))
        results_S = apply_adaptor(self.adaptor_S[taskname], student_batch, results_S, from_cache=False)
        return self.compute_loss(results_S=results_S, results_T=results_T)
