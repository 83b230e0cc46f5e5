"""GeneralDistiller: KD on logits plus intermediate-feature matches (hidden states, attentions)."""
from __future__ import annotations

from torch import nn

from ..errors import BatchError
from ..objective import build_projections
from .basic import BasicDistiller


class CustomMatch:
    """A match between outputs of two modules captured by forward hooks (TextBrewer's experimental API).

    ``loss(hook_S, hook_T, inputs_mask_S, inputs_mask_T)``; needs a live teacher (hooks cannot fire on a cache).
    """

    def __init__(self, module_T, module_S, weight, loss, proj_func=None, proj_group=None):
        self.module_T = module_T
        self.module_S = module_S
        self.weight = weight  # TextBrewer 0.2.1 stored (weight,) and (loss,) tuples here, which broke custom matches
        self.loss = loss
        self.proj_func = proj_func
        self.proj_group = {} if proj_group is None else proj_group

    def to_dict(self):
        return {k: getattr(self, k) for k in ("module_T", "module_S", "weight", "loss", "proj_func", "proj_group")}

    @classmethod
    def from_dict(cls, dict_object):
        return cls(**dict_object)


class GeneralDistiller(BasicDistiller):
    """Single-teacher distillation with `intermediate_matches`; recommended for single-task work.

    Projections named in a match's ``proj`` map the student feature to the teacher's width; they are
    created here (in match order) and added to the optimizer by ``train``.
    """

    def __init__(self, train_config, distill_config, model_T, model_S, adaptor_T, adaptor_S, custom_matches=None):
        super().__init__(train_config, distill_config, model_T, model_S, adaptor_T, adaptor_S)
        self.projs: list[nn.Module | None] = self.loss.projections
        self.projs_group: list[dict | None] = [None if im.proj is None else im.proj[3]
                                               for im in self.d_config.intermediate_matches]
        self.custom_matches = list(custom_matches or [])
        self._hook_outputs = {"T": [], "S": []}
        for m in self.custom_matches:
            if isinstance(m.proj_func, nn.Module):
                m.proj_func.to(self.device)
        self._register_hooks()
        self.has_custom_matches = bool(self.custom_matches)

    def _make_projections(self):
        return build_projections(self.d_config, self.device)

    def _register_hooks(self):
        self._hook_handles = []
        for m in self.custom_matches:
            for side, module in (("T", m.module_T), ("S", m.module_S)):
                self._hook_handles.append(module.register_forward_hook(
                    lambda _m, _i, out, side=side: self._hook_outputs[side].append(out)))

    def _uses_logit_cache(self):
        # In-memory logit caching is a BasicDistiller feature (as in TextBrewer); teacher_cache batches replace it.
        return False

    def _projection_groups(self):
        groups = [(p, g) for p, g in zip(self.projs, self.projs_group) if p is not None]
        groups += [(m.proj_func, m.proj_group) for m in self.custom_matches if isinstance(m.proj_func, nn.Module)]
        return groups

    def _extra_modules(self):
        return self.projs

    def save_and_callback(self, global_step, step, epoch, callback):
        # The callback usually evaluates the student: its forward passes must not feed the custom-match hooks.
        for h in self._hook_handles:
            h.remove()
        try:
            super().save_and_callback(global_step, step, epoch, callback)
        finally:
            self._register_hooks()

    def train_on_batch(self, batch, args):
        results_S, results_T = self._adapt(batch, args)
        return self.compute_loss(results_S, results_T)

    def compute_loss(self, results_S, results_T):
        extra = None
        if self.has_custom_matches:
            extra = lambda: self._custom_match_terms(results_S.get("inputs_mask"), results_T.get("inputs_mask"))
        return self.loss(results_S, results_T, extra)

    def _custom_match_terms(self, inputs_mask_S, inputs_mask_T):
        """The weighted losses of the custom matches, from the hook outputs this batch's forwards recorded."""
        hooks_T, hooks_S = self._hook_outputs["T"], self._hook_outputs["S"]
        if len(hooks_T) != len(self.custom_matches):
            raise BatchError("custom_matches need the teacher's forward pass; they cannot run on a teacher_cache")
        terms = []
        for m, hook_T, hook_S in zip(self.custom_matches, hooks_T, hooks_S):
            if m.proj_func is not None:
                hook_S = m.proj_func(hook_S)
            terms.append(m.weight * m.loss(hook_S, hook_T, inputs_mask_S, inputs_mask_T))
        self._hook_outputs = {"T": [], "S": []}
        return terms
