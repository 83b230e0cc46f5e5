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

A ``logits_mask`` weights positions instead of selecting them (`paired_logits`): TextBrewer's
``masked_select`` makes a tensor whose size the host must read back from the device before it can go on, a
sync per micro-step; the mask passed to the KD loss gives the same mean (to float rounding) with static
shapes. Selection remains where the numbers need it: a temperature scheduler other than 'constant' (its
per-example temperatures average over the kept rows), a registered KD loss without a ``mask`` argument, or
masks whose shapes do not pair the two sides position by position.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from .configurations import DistillationConfig
from .errors import BatchError
from .losses import cross_tokenizer_kd_loss, global_label_mean, sparse_kd_loss
from .registry import KD_LOSS_MAP, MATCH_LOSS_MAP, PROJ_MAP
from .schedulers import constant_temperature_scheduler

# kd_loss_type -> sparse_kd_loss kind, for caches that store sparse logits (INC's CE keeps its T**2)
SPARSE_KD_KINDS = {"ce": "ce", "kl": "kl", "inc_ce": "ce"}


def select_logits_with_mask(logits_list, masks_list):
    """Keep the positions whose mask is 1 in 3-D (sequence-labelling) logits; 2-D logits pass through.

    TextBrewer's selection, a host sync per tensor: DistillationLoss weights by the mask instead
    (`paired_logits`) and selects only where weighting cannot give TextBrewer's numbers."""
    _check_mask_count(logits_list, masks_list)
    return [_select(logits, _mask_at(masks_list, i)) for i, logits in enumerate(logits_list)]


def _check_mask_count(logits_list, masks_list):
    if len(masks_list) not in (1, len(logits_list)):
        raise BatchError(f"{len(logits_list)} logits tensors but {len(masks_list)} logits_mask tensors")


def _mask_at(masks_list, i):
    """The mask of logits tensor `i`: one mask serves every tensor, or one each."""
    if masks_list is None:
        return None
    return masks_list[0] if len(masks_list) == 1 else masks_list[i]


def _select(logits, mask):
    if isinstance(logits, Mapping):  # sparse targets: keep the same positions of every per-position tensor
        if logits["ids"].dim() == 3:
            keep = mask.to(torch.bool)
            logits = {k: (v[keep] if isinstance(v, torch.Tensor) else v) for k, v in logits.items()}
        return logits
    if logits.dim() == 3:
        mask = mask.unsqueeze(-1).expand_as(logits).to(torch.bool)
        logits = torch.masked_select(logits, mask).view(-1, logits.size(-1))
    return logits


def _position_shape(logits):
    """(batch, len) of per-token logits (dense, or a sparse target's ids); None for per-example logits."""
    rows = logits["ids"] if isinstance(logits, Mapping) else logits
    return tuple(rows.shape[:-1]) if isinstance(rows, torch.Tensor) and rows.dim() == 3 else None


def paired_logits(results_S, results_T, can_weight: Callable[[object], bool] = lambda _l_T: True):
    """Both sides' logits and, per pair, the (batch, len) mask that weights its positions (None: all rows count).

    A pair is weighted by the positions both masks keep when both sides give a logits_mask and logits, teacher
    logits and both masks share one (batch, len) shape: the masks then mark the same positions, as they do wherever
    both come from one batch (cachebrew's loader and distillers copy the student's mask to the teacher side; for a
    student with another tokenizer the teacher's keeps the student positions aligned with teacher tokens). Otherwise, or
    when ``can_weight(teacher_logits)`` says the KD term needs the rows themselves, both sides are cut to rows (a
    host sync): to the positions both masks keep where they share a shape (equal masks: TextBrewer's cut), else each
    side to its own mask as TextBrewer does.
    """
    logits_S, logits_T = list(results_S["logits"]), list(results_T["logits"])
    masks_S, masks_T = results_S.get("logits_mask"), results_T.get("logits_mask")
    for logits, masks in ((logits_S, masks_S), (logits_T, masks_T)):
        if masks is not None:
            _check_mask_count(logits, masks)
    weights = [None] * len(logits_S)
    for i in range(min(len(logits_S), len(logits_T))):
        m_S, m_T = _mask_at(masks_S, i), _mask_at(masks_T, i)
        shape = _position_shape(logits_S[i])
        if (m_S is not None and m_T is not None and shape is not None and shape == _position_shape(logits_T[i])
                == tuple(m_S.shape) == tuple(m_T.shape) and can_weight(logits_T[i])):
            weights[i] = m_S * m_T  # the teacher's mask may keep fewer (a student of another tokenizer)
    for i in range(len(weights)):  # cut to rows; where both masks share a shape, to the positions both keep (equal
        if weights[i] is None:      # masks: TextBrewer's cut; a student of another tokenizer: the aligned ones)
            m_S, m_T = _mask_at(masks_S, i), (_mask_at(masks_T, i) if i < len(logits_T) else None)
            if m_S is not None and m_T is not None and m_S.shape == m_T.shape:
                m_S = m_T = m_S * m_T
            if m_S is not None:
                logits_S[i] = _select(logits_S[i], m_S)
            if m_T is not None:
                logits_T[i] = _select(logits_T[i], m_T)
    for logits, masks in ((logits_S, masks_S), (logits_T, masks_T)):  # logits beyond the pairs: their own mask
        if masks is not None:
            for i in range(len(weights), len(logits)):
                logits[i] = _select(logits[i], _mask_at(masks, i))
    return logits_S, logits_T, weights


def _takes_mask(loss_fn) -> bool:
    try:
        return "mask" in inspect.signature(loss_fn).parameters
    except (TypeError, ValueError):  # a builtin or C callable without a signature: select instead
        return False


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
        # Weighting by logits_mask needs a KD loss that takes the mask and one temperature for every position:
        # a scheduler's per-example temperatures are normalised over the rows it is given (flsw, cwsm).
        self._dense_kd_weights = _takes_mask(self.kd_loss) and distill_config.temperature_scheduler in (
            None, constant_temperature_scheduler)
        # a causal LM's own loss predicts the next token: its labelled positions are labels[:, 1:]
        self.causal_labels = False
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

    def can_weight(self, logits_T) -> bool:
        """Whether the KD term of these teacher logits can weight positions by a mask (see `paired_logits`)."""
        return isinstance(logits_T, Mapping) or self._dense_kd_weights

    def paired_logits(self, results_S, results_T):
        return paired_logits(results_S, results_T, self.can_weight)

    def kd_term(self, logits_list_S, logits_list_T, results_S, masks=None):
        """Sum of KD losses over paired logits, with probability_shift when configured.

        ``masks[i]``: the positions pair i averages over (`paired_logits`); None or absent: every row."""
        if len(logits_list_S) != len(logits_list_T):
            raise BatchError(f"the student adaptor returned {len(logits_list_S)} logits tensors, "
                             f"the teacher {len(logits_list_T)}")
        masks = list(masks) if masks is not None else [None] * len(logits_list_S)
        labels_list = shift_labels(results_S, masks) if self.config.probability_shift else None
        total = 0
        for i, (l_T, l_S) in enumerate(zip(logits_list_T, logits_list_S)):
            mask = masks[i]
            if isinstance(l_T, Mapping):
                total = total + self.sparse_kd_term(l_S, l_T, mask)
                continue
            if labels_list is not None:
                l_T = probability_shift_(l_T, labels_list[i])
            temperature = self.temperature(l_S, l_T)
            loss = self.kd_loss(l_S, l_T, temperature) if mask is None else \
                self.kd_loss(l_S, l_T, temperature, mask=mask)
            total = total + loss
        return total

    def sparse_kd_term(self, logits_S, target: Mapping, mask=None):
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
        if "matched" in target:  # carried from a teacher with another tokenizer (components/loader.py)
            return cross_tokenizer_kd_loss(logits_S, target, T, mask=mask, uld=c.cross_tokenizer_uld)
        loss = sparse_kd_loss(logits_S, target, T, kind, mask=mask)
        return loss * T ** 2 if c.kd_loss_type == "inc_ce" else loss

    def weighted_kd(self, logits_S, logits_T, results_S, losses_dict, masks=None):
        """The KD term times its current weight; the unweighted term is recorded in `losses_dict`."""
        total_kd_loss = self.kd_term(logits_S, logits_T, results_S, masks)
        losses_dict["unweighted_kd_loss"] = total_kd_loss
        return total_kd_loss * self.kd_loss_weight

    def hard_label_term(self, results_S, total_loss, losses_dict):
        if "losses" in results_S:
            total_hl_loss = 0
            labels = results_S.get("labels")
            labels = labels[0] if isinstance(labels, (list, tuple)) and len(labels) == 1 else labels
            for loss in results_S["losses"]:
                loss = loss.mean()  # .mean(): DataParallel returns one loss per GPU
                if isinstance(labels, torch.Tensor):  # under global_denominators: this rank's share of the mean
                    loss = global_label_mean(loss, labels, shifted=self.causal_labels)
                total_hl_loss = total_hl_loss + loss
            total_loss = total_loss + total_hl_loss * self.hard_label_weight
            losses_dict["unweighted_hard_label_loss"] = total_hl_loss
        return total_loss

    def prediction_loss(self, logits_S, logits_T, results_S, masks=None):
        """The weighted KD term plus the hard-label term: (total, {name: unweighted loss}).

        ``masks``: per logits pair, the positions to average over (`paired_logits`); None: the logits are
        already cut to their positions (or have none to cut)."""
        losses_dict = {}
        total_loss = self.weighted_kd(logits_S, logits_T, results_S, losses_dict, masks)
        total_loss = self.hard_label_term(results_S, total_loss, losses_dict)
        return total_loss, losses_dict

    def logits_loss(self, results_S, results_T):
        """BasicDistiller's loss: KD on the (masked) logits plus the hard-label term; no intermediate matches."""
        logits_S, logits_T, masks = self.paired_logits(results_S, results_T)
        return self.prediction_loss(logits_S, logits_T, results_S, masks)

    def __call__(self, results_S: dict, results_T: dict, extra_terms: Callable[[], list] | None = None):
        """GeneralDistiller's loss: KD, every intermediate match, ``extra_terms()`` and the hard-label term."""
        losses_dict = {}
        total_loss = 0
        if "logits" in results_T and "logits" in results_S:
            logits_S, logits_T, masks = self.paired_logits(results_S, results_T)
            total_loss = self.weighted_kd(logits_S, logits_T, results_S, losses_dict, masks)

        # the student's positions; with a teacher of another tokenizer, those aligned with teacher tokens
        inputs_mask_S = results_T.get("match_mask", results_S.get("inputs_mask"))
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


def shift_labels(results_S, weights=None):
    """Labels aligned with the logits: whole (batch, len) labels where pair i is weighted by a mask
    (``weights[i]`` not None), cut to the logits_mask where the logits were cut. TextBrewer crashes on
    masked ones."""
    labels_list = results_S.get("labels")
    if labels_list is None:
        raise BatchError("probability_shift=True needs 'labels' in the student adaptor's output")
    masks = results_S.get("logits_mask")
    if masks is None:
        return labels_list
    weighted = lambda i: weights is not None and i < len(weights) and weights[i] is not None
    return [lab[_mask_at(masks, i).to(torch.bool)] if lab.dim() == 2 and not weighted(i) else lab
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
