"""DistillationLoss: the distillation objective of a DistillationConfig, as one component.

    total = kd(logits_S, logits_T; temperature) * kd_loss_weight
          + sum over intermediate_matches of match_loss(feature_S [projected], feature_T) * weight
          + extra terms (GeneralDistiller's hook-based custom matches)
          + sum(adaptor 'losses') * hard_label_weight

TextBrewer computes this inside each distiller. Here the distillers (BasicDistiller's logits-only
form, GeneralDistiller's full form, MultiTeacherDistiller on averaged logits), cachebrew's distill
recipe (through GeneralDistiller) and `hf.DistillationTrainer` all call this one object, so every
front end has the same numerics: the terms are added in TextBrewer's order, with its masks, probability
shift and temperature schedules. The weights follow their schedulers through ``on_optimizer_step``.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from .configurations import DistillationConfig
from .errors import BatchError
from .losses import sparse_kd_loss
from .presets import KD_LOSS_MAP, MATCH_LOSS_MAP, PROJ_MAP

# kd_loss_type -> sparse_kd_loss kind, for caches that store sparse logits (INC's CE keeps its T**2)
SPARSE_KD_KINDS = {"ce": "ce", "kl": "kl", "inc_ce": "ce"}


def select_logits_with_mask(logits_list, masks_list):
    """Keep the positions whose mask is 1 in 3-D (sequence-labelling) logits; 2-D logits pass through."""
    if len(masks_list) not in (1, len(logits_list)):
        raise BatchError(f"{len(logits_list)} logits tensors but {len(masks_list)} logits_mask tensors")
    out = []
    for i, logits in enumerate(logits_list):
        mask = masks_list[0] if len(masks_list) == 1 else masks_list[i]
        if isinstance(logits, Mapping):  # sparse targets: keep the same positions of every per-position tensor
            if logits["ids"].dim() == 3:
                keep = mask.to(torch.bool)
                logits = {k: (v[keep] if isinstance(v, torch.Tensor) else v) for k, v in logits.items()}
            out.append(logits)
            continue
        if logits.dim() == 3:
            mask = mask.unsqueeze(-1).expand_as(logits).to(torch.bool)
            logits = torch.masked_select(logits, mask).view(-1, logits.size(-1))
        out.append(logits)
    return out


def probability_shift_(tensor, labels):
    """Swap each row's top teacher logit with the gold label's logit so the gold label ranks first.

    Returns a new tensor: the input is left unchanged, because it may be a cached teacher output
    that later epochs read again.
    """
    if tensor.dim() not in (2, 3):
        raise TypeError("Rank of tensor must be 2 or 3")
    original_shape = tensor.shape
    flat = tensor.reshape(-1, tensor.size(-1)).clone()
    max_position = flat.argmax(dim=-1)
    labels = labels.reshape(-1).to(max_position.device)
    labels = torch.where(labels < 0, max_position, labels)  # ignored positions (-100) stay as they are
    index = torch.arange(flat.size(0), device=flat.device)
    max_clone = flat[index, max_position].clone()
    truth_clone = flat[index, labels].clone()
    flat[index, max_position] = truth_clone
    flat[index, labels] = max_clone
    return flat.view(original_shape)


def build_projections(distill_config: DistillationConfig, device=None) -> list[nn.Module | None]:
    """One projection per intermediate match (None where the match has no ``proj``), built from PROJ_MAP."""
    projs = []
    for im in distill_config.intermediate_matches:
        if im.proj is None:
            projs.append(None)
            continue
        name, dim_in, dim_out, _group = im.proj
        proj = PROJ_MAP[name](dim_in, dim_out)
        projs.append(proj.to(device) if device is not None else proj)
    return projs


class DistillationLoss:
    """The loss of one DistillationConfig; ``projections`` (aligned with intermediate_matches) map student
    features to the teacher's width and belong to the caller's optimizer."""

    def __init__(self, distill_config: DistillationConfig, projections: Sequence[nn.Module | None] | None = None):
        self.config = distill_config
        self.kd_loss = KD_LOSS_MAP[distill_config.kd_loss_type]
        n = len(distill_config.intermediate_matches)
        self.projections = list(projections) if projections is not None else [None] * n
        if len(self.projections) != n:
            raise ValueError(f"{len(self.projections)} projections for {n} intermediate matches")
        self.reset_weights()

    # -- weights --------------------------------------------------------------------------------------
    def reset_weights(self) -> None:
        """The configured weights (the start of training)."""
        self.kd_loss_weight = self.config.kd_loss_weight
        self.hard_label_weight = self.config.hard_label_weight

    def on_optimizer_step(self, progress: float) -> None:
        """Apply the weight schedules after an optimizer step, as TextBrewer does; the config stays untouched."""
        if self.config.kd_loss_weight_scheduler is not None:
            self.kd_loss_weight = self.config.kd_loss_weight_scheduler(progress)
        if self.config.hard_label_weight_scheduler is not None:
            self.hard_label_weight = self.config.hard_label_weight_scheduler(progress)

    # -- terms ----------------------------------------------------------------------------------------
    def temperature(self, logits_S, logits_T):
        if self.config.temperature_scheduler is not None:
            return self.config.temperature_scheduler(logits_S, logits_T, self.config.temperature)
        return self.config.temperature

    def kd_term(self, logits_list_S, logits_list_T, results_S):
        """Sum of KD losses over paired logits, with probability_shift when configured."""
        if len(logits_list_S) != len(logits_list_T):
            raise BatchError(f"the student adaptor returned {len(logits_list_S)} logits tensors, "
                             f"the teacher {len(logits_list_T)}")
        labels_list = shift_labels(results_S) if self.config.probability_shift else None
        total = 0
        for i, (l_T, l_S) in enumerate(zip(logits_list_T, logits_list_S)):
            if isinstance(l_T, Mapping):
                total = total + self.sparse_kd_term(l_S, l_T)
                continue
            if labels_list is not None:
                l_T = probability_shift_(l_T, labels_list[i])
            total = total + self.kd_loss(l_S, l_T, self.temperature(l_S, l_T))
        return total

    def sparse_kd_term(self, logits_S, target: Mapping):
        """KD against a sparse-logit cache's targets, which are fixed at the export's temperature."""
        c = self.config
        T = float(target["temperature"])
        if c.temperature_scheduler is not None or abs(float(c.temperature) - T) > 1e-6:
            raise BatchError(f"the cache's sparse logits are the teacher's distribution at temperature {T:g} "
                             f"(outputs.sparse_logits.temperature); set DistillationConfig.temperature: {T:g} and "
                             "no temperature_scheduler")
        if c.probability_shift:
            raise BatchError("probability_shift needs dense teacher logits; this cache stores sparse logits")
        kind = SPARSE_KD_KINDS.get(c.kd_loss_type)
        if kind is None:
            raise BatchError(f"kd_loss_type {c.kd_loss_type!r} needs dense teacher logits; with sparse logits use "
                             f"one of {sorted(SPARSE_KD_KINDS)}")
        loss = sparse_kd_loss(logits_S, target, T, kind)
        return loss * T ** 2 if c.kd_loss_type == "inc_ce" else loss

    def weighted_kd(self, logits_S, logits_T, results_S, losses_dict):
        """The KD term times its current weight; the unweighted term is recorded in `losses_dict`."""
        total_kd_loss = self.kd_term(logits_S, logits_T, results_S)
        losses_dict["unweighted_kd_loss"] = total_kd_loss
        return total_kd_loss * self.kd_loss_weight

    def hard_label_term(self, results_S, total_loss, losses_dict):
        if "losses" in results_S:
            total_hl_loss = 0
            for loss in results_S["losses"]:
                total_hl_loss = total_hl_loss + loss.mean()  # .mean(): DataParallel returns one loss per GPU
            total_loss = total_loss + total_hl_loss * self.hard_label_weight
            losses_dict["unweighted_hard_label_loss"] = total_hl_loss
        return total_loss

    def prediction_loss(self, logits_S, logits_T, results_S):
        """The weighted KD term plus the hard-label term: (total, {name: unweighted loss})."""
        losses_dict = {}
        total_loss = self.weighted_kd(logits_S, logits_T, results_S, losses_dict)
        total_loss = self.hard_label_term(results_S, total_loss, losses_dict)
        return total_loss, losses_dict

    def logits_loss(self, results_S, results_T):
        """BasicDistiller's loss: KD on the (masked) logits plus the hard-label term; no intermediate matches."""
        logits_S, logits_T = masked_logits(results_S, results_T)
        return self.prediction_loss(logits_S, logits_T, results_S)

    def __call__(self, results_S: dict, results_T: dict, extra_terms: Callable[[], list] | None = None):
        """GeneralDistiller's loss: KD, every intermediate match, ``extra_terms()`` and the hard-label term."""
        losses_dict = {}
        total_loss = 0
        if "logits" in results_T and "logits" in results_S:
            logits_S, logits_T = masked_logits(results_S, results_T)
            total_loss = self.weighted_kd(logits_S, logits_T, results_S, losses_dict)

        inputs_mask_S = results_S.get("inputs_mask")
        for ith, im in enumerate(self.config.intermediate_matches):
            inter_S, inter_T = match_features(ith, im, results_S, results_T)
            proj = self.projections[ith]
            if proj is not None:
                inter_S = [proj(s) for s in inter_S] if isinstance(inter_S, list) else proj(inter_S)
            if im.loss not in ("mmd", "nst"):
                check_widths(ith, im, inter_S, inter_T)
            loss = MATCH_LOSS_MAP[im.loss](inter_S, inter_T, mask=inputs_mask_S)
            total_loss = total_loss + loss * im.weight
            name_S = "-".join(map(str, im.layer_S)) if isinstance(im.layer_S, list) else str(im.layer_S)
            name_T = "-".join(map(str, im.layer_T)) if isinstance(im.layer_T, list) else str(im.layer_T)
            losses_dict[f"unweighted_{im.feature}_{im.loss}_{name_S}_{name_T}"] = loss

        for term in (extra_terms() if extra_terms is not None else ()):
            total_loss = total_loss + term

        total_loss = self.hard_label_term(results_S, total_loss, losses_dict)
        return total_loss, losses_dict


def mean_teacher_logits(logits_per_teacher: list[list]) -> list:
    """MultiTeacherDistiller's target: for each logits head, the plain mean over teachers (in teacher order)."""
    return [sum(per_head) / len(per_head) for per_head in zip(*logits_per_teacher)]


def masked_logits(results_S, results_T):
    """Both sides' logits, each cut to its ``logits_mask`` positions when the adaptor gave one."""
    logits_S, logits_T = results_S["logits"], results_T["logits"]
    if "logits_mask" in results_S:
        logits_S = select_logits_with_mask(logits_S, results_S["logits_mask"])
    if "logits_mask" in results_T:
        logits_T = select_logits_with_mask(logits_T, results_T["logits_mask"])
    return logits_S, logits_T


def shift_labels(results_S):
    """Labels aligned with the (possibly logits_mask-selected) logits; TextBrewer crashes on masked ones."""
    labels_list = results_S.get("labels")
    if labels_list is None:
        raise BatchError("probability_shift=True needs 'labels' in the student adaptor's output")
    if "logits_mask" not in results_S:
        return labels_list
    masks = results_S["logits_mask"]
    return [lab[(masks[0] if len(masks) == 1 else masks[i]).to(torch.bool)] if lab.dim() == 2 else lab
            for i, lab in enumerate(labels_list)]


def match_features(ith, im, results_S, results_T):
    """The student's and the teacher's tensors that intermediate match `ith` compares, or a BatchError naming it."""
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


def check_widths(ith, im, inter_S, inter_T):
    pairs = zip(inter_S, inter_T) if isinstance(inter_S, list) else [(inter_S, inter_T)]
    for s, t in pairs:
        if s.shape[-1] != t.shape[-1]:
            hint = "" if im.proj else f"; add 'proj': ['linear', {s.shape[-1]}, {t.shape[-1]}] to the match"
            raise BatchError(f"intermediate_matches[{ith}] ({im.feature} {im.layer_S} -> {im.layer_T}): student "
                             f"width {s.shape[-1]} != teacher width {t.shape[-1]}{hint}")
