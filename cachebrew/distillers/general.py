"""GeneralDistiller: KD on logits plus intermediate-feature matches (hidden states, attentions)."""
from __future__ import annotations

from torch import nn

from ..errors import BatchError
from ..presets import MATCH_LOSS_MAP, PROJ_MAP
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
        self.projs: list[nn.Module | None] = []
        self.projs_group: list[dict | None] = []
        for im in self.d_config.intermediate_matches:
            if im.proj is not None:
                name, dim_in, dim_out, group = im.proj
                self.projs.append(PROJ_MAP[name](dim_in, dim_out).to(self.device))
                self.projs_group.append(group)
            else:
                self.projs.append(None)
                self.projs_group.append(None)
        self.custom_matches = list(custom_matches or [])
        self._hook_outputs = {"T": [], "S": []}
        for m in self.custom_matches:
            if isinstance(m.proj_func, nn.Module):
                m.proj_func.to(self.device)
        self._register_hooks()
        self.has_custom_matches = bool(self.custom_matches)

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
        losses_dict = {}
        total_loss = 0
        if "logits" in results_T and "logits" in results_S:
            logits_S, logits_T = self._masked_logits(results_S, results_T)
            total_kd_loss = self._kd_term(logits_S, logits_T, results_S)
            total_loss = total_kd_loss * self.kd_loss_weight
            losses_dict["unweighted_kd_loss"] = total_kd_loss

        inputs_mask_S = results_S.get("inputs_mask")
        for ith, im in enumerate(self.d_config.intermediate_matches):
            inter_S, inter_T = self._match_features(ith, im, results_S, results_T)
            proj = self.projs[ith]
            if proj is not None:
                inter_S = [proj(s) for s in inter_S] if isinstance(inter_S, list) else proj(inter_S)
            if im.loss not in ("mmd", "nst"):
                self._check_widths(ith, im, inter_S, inter_T)
            loss = MATCH_LOSS_MAP[im.loss](inter_S, inter_T, mask=inputs_mask_S)
            total_loss = total_loss + loss * im.weight
            name_S = "-".join(map(str, im.layer_S)) if isinstance(im.layer_S, list) else str(im.layer_S)
            name_T = "-".join(map(str, im.layer_T)) if isinstance(im.layer_T, list) else str(im.layer_T)
            losses_dict[f"unweighted_{im.feature}_{im.loss}_{name_S}_{name_T}"] = loss

        if self.has_custom_matches:
            hooks_T, hooks_S = self._hook_outputs["T"], self._hook_outputs["S"]
            if len(hooks_T) != len(self.custom_matches):
                raise BatchError("custom_matches need the teacher's forward pass; they cannot run on a teacher_cache")
            inputs_mask_T = results_T.get("inputs_mask")
            for m, hook_T, hook_S in zip(self.custom_matches, hooks_T, hooks_S):
                if m.proj_func is not None:
                    hook_S = m.proj_func(hook_S)
                total_loss = total_loss + m.weight * m.loss(hook_S, hook_T, inputs_mask_S, inputs_mask_T)
            self._hook_outputs = {"T": [], "S": []}

        total_loss = self._hard_label_term(results_S, total_loss, losses_dict)
        return total_loss, losses_dict

    @staticmethod
    def _match_features(ith, im, results_S, results_T):
        picked = []
        for side, results, layers in (("student", results_S, im.layer_S), ("teacher", results_T, im.layer_T)):
            feats = results.get(im.feature)
            if feats is None:
                raise BatchError(f"intermediate_matches[{ith}] uses feature {im.feature!r}, but the {side} "
                                 f"adaptor returned only {sorted(results)}")
            idx = layers if isinstance(layers, list) else [layers]
            for i in idx:
                if i >= len(feats):
                    raise BatchError(f"intermediate_matches[{ith}].layer_{side[0].upper()}={i} is out of range: "
                                     f"the {side} adaptor returned {len(feats)} {im.feature!r} tensors")
            for i in idx:
                if feats[i] is None:
                    have = [j for j, f in enumerate(feats) if f is not None]
                    raise BatchError(f"intermediate_matches[{ith}].layer_{side[0].upper()}={i}: the {side}'s "
                                     f"{im.feature!r} layer {i} is not in the cache (cached layers: {have})")
            picked.append([feats[i] for i in idx] if isinstance(layers, list) else feats[layers])
        return picked[0], picked[1]

    @staticmethod
    def _check_widths(ith, im, inter_S, inter_T):
        pairs = zip(inter_S, inter_T) if isinstance(inter_S, list) else [(inter_S, inter_T)]
        for s, t in pairs:
            if s.shape[-1] != t.shape[-1]:
                hint = "" if im.proj else f"; add 'proj': ['linear', {s.shape[-1]}, {t.shape[-1]}] to the match"
                raise BatchError(f"intermediate_matches[{ith}] ({im.feature} {im.layer_S} -> {im.layer_T}): student "
                                 f"width {s.shape[-1]} != teacher width {t.shape[-1]}{hint}")

