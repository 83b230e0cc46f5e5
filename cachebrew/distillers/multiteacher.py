"""MultiTeacherDistiller: the student learns the average of several teachers' logits (same task)."""
from __future__ import annotations

from ..errors import BatchError, ConfigError
from .basic import BasicDistiller, CachedBatch
from ..objective import mean_teacher_logits, select_logits_with_mask
from .batches import apply_adaptor, get_outputs_from_batch, has_cache, post_adaptor, split_batch, teacher_outputs


class MultiTeacherDistiller(BasicDistiller):
    """KD against the mean of the teachers' logits. No intermediate matches (as in TextBrewer).

    model_T is a list of teachers, or None when every batch carries ``teacher_cache``: a list with one
    entry per teacher (raw outputs for adaptor_T, or adaptor dicts when adaptor_T is None).
    adaptor_T is one adaptor for all teachers or a list with one per teacher.
    """

    def __init__(self, train_config, distill_config, model_T, model_S, adaptor_T, adaptor_S):
        super().__init__(train_config, distill_config, model_T, model_S, adaptor_T, adaptor_S)
        if isinstance(adaptor_T, (list, tuple)) and model_T is not None and len(adaptor_T) != len(model_T):
            raise ConfigError(f"{len(adaptor_T)} teacher adaptors for {len(model_T)} teachers")

    def _teacher_adaptor(self, i):
        return self.adaptor_T[i] if isinstance(self.adaptor_T, (list, tuple)) else self.adaptor_T

    def train_on_batch(self, batch, args):
        if isinstance(batch, CachedBatch):
            cached = batch
            _, (student_batch, results_S) = get_outputs_from_batch(
                cached.batch, self.device, None, self.model_S, args, no_teacher_forward=True)
            results_S = post_adaptor(self.adaptor_S(student_batch, results_S))
            results_T = [{"logits": [lo.to(self.device) for lo in per_teacher]} for per_teacher in cached.logits]
            if "logits_mask" in results_S:
                results_T[0]["logits_mask"] = results_S["logits_mask"]
        else:
            (teacher_batch, outputs_T), (student_batch, results_S) = get_outputs_from_batch(
                batch, self.device, self.model_T, self.model_S, args)
            results_T = self._adapt_teachers(teacher_batch, outputs_T, from_cache=has_cache(batch))
            results_S = post_adaptor(self.adaptor_S(student_batch, results_S))
        return self._multi_teacher_loss(results_S, results_T)

    def _multi_teacher_loss(self, results_S, results_T):
        logits_list_T = [r["logits"] for r in results_T]
        logits_list_S = results_S["logits"]
        if "logits_mask" in results_S:
            logits_list_S = select_logits_with_mask(logits_list_S, results_S["logits_mask"])
        if "logits_mask" in results_T[0]:
            logits_list_T = [select_logits_with_mask(lt, results_T[0]["logits_mask"]) for lt in logits_list_T]
        mean_logits_T = mean_teacher_logits(logits_list_T)
        return self.loss.prediction_loss(logits_list_S, mean_logits_T, results_S)

    def _adapt_teachers(self, teacher_batch, outputs_T, from_cache):
        if not isinstance(outputs_T, (list, tuple)):
            raise BatchError("MultiTeacherDistiller needs a list of teacher outputs (model_T a list of models, "
                             f"or teacher_cache a list per teacher), got {type(outputs_T).__name__}")
        return [apply_adaptor(self._teacher_adaptor(i), teacher_batch, out, from_cache)
                for i, out in enumerate(outputs_T)]

    def cache_logits(self, batch, args, batch_postprocessor):
        if batch_postprocessor is not None:
            batch = batch_postprocessor(batch)
        teacher_batch, _, cache = split_batch(batch, self.device)
        results_T = self._adapt_teachers(teacher_batch, teacher_outputs(self.model_T, teacher_batch, cache, args),
                                         from_cache=cache is not None)
        return CachedBatch(batch, [[lo.to("cpu") for lo in r["logits"]] for r in results_T])

