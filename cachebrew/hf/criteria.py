"""Intel Neural Compressor's distillation criterion configs, with INC's numerics, as a cachebrew DistillationConfig.

INC users write ``KnowledgeDistillationLossConfig(temperature, loss_types, loss_weights)`` and
``IntermediateLayersKnowledgeDistillationLossConfig(layer_mappings, loss_types, loss_weights, add_origin_loss)``
(ITREX's documents call the weights ``loss_weight_ratio``: both names are accepted). Names, defaults, checks
and numerics are INC 2.x's (``neural_compressor/compression/distillation/criterions.py``):

* KD: ``loss = w0 * student_loss + w1 * T**2 * kd(s / T, t / T)``, kd being INC's soft CE, its KL (torch's
  default 'mean' over every element) or MSE: the ``inc_ce`` / ``inc_kl`` / ``inc_mse`` entries of KD_LOSS_MAP.
  The two weights must lie in [0, 1] and sum to 1, as INC asserts.
* intermediate layers: ``sum_i w_i * loss_i`` (+ the student loss if add_origin_loss), each loss 'MSE', 'KL'
  or 'L1' over every element, as INC's hooks see them (no padding mask): MATCH_LOSS_MAP's ``inc_*`` entries.
  'COS' (cosine over unmasked positions, hidden states only) is a cachebrew addition.

These configs always mean INC's numerics, wherever they are passed; a TextBrewer ``DistillationConfig`` always
means TextBrewer's (``kd_ce`` has no T**2): the two front ends never leak into each other.

One deliberate difference: INC's layer mappings name modules (``'bert.encoder.layer.3'``) and hook them,
which needs a live teacher. A cache holds hidden states and attention maps by layer index, so a mapping
here names ``hidden_states`` / ``attentions`` indices: ``[student, teacher]`` where each side is an int
(a hidden_states index) or ``'hidden_states.3'`` / ``'attentions.2'``; INC's tuple forms
(``[('hidden_states.3',), ('hidden_states.6',)]``, or one entry for the same layer on both sides) are read too.
"""
from __future__ import annotations

import re

from ..configurations import DistillationConfig
from ..errors import ConfigError

_KD_LOSSES = {"CE": "inc_ce", "KL": "inc_kl", "MSE": "inc_mse"}
_STUDENT_LOSSES = ("CE", "MSE")
_LAYER = re.compile(r"^(hidden_states|hidden|attentions|attention)\.(\d+)$")
_MODULE_LAYER = re.compile(r"(?:^|\.)layer\.(\d+)(?:\.output)?$")
# (feature, INC loss type) -> MATCH_LOSS_MAP entry
_MATCH_LOSSES = {("hidden", "MSE"): "inc_mse", ("hidden", "KL"): "inc_kl", ("hidden", "L1"): "inc_l1",
                 ("hidden", "COS"): "cos",
                 ("attention", "MSE"): "inc_mse", ("attention", "KL"): "inc_kl", ("attention", "L1"): "inc_l1"}


def _weights_argument(prefix, loss_weights, loss_weight_ratio, errors):
    """INC 2.x's ``loss_weights`` or ITREX's ``loss_weight_ratio``: one list, or None when neither is given."""
    given = [(n, v) for n, v in (("loss_weights", loss_weights), ("loss_weight_ratio", loss_weight_ratio))
             if v is not None and list(v) != []]
    if len(given) == 2 and list(given[0][1]) != list(given[1][1]):
        errors.append(f"{prefix}loss_weights {list(loss_weights)!r} and loss_weight_ratio {list(loss_weight_ratio)!r}: "
                      "the same weights under two names; give one")
    return list(given[0][1]) if given else None


def _is_weight(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class CriterionConfig:
    """What INC's two criterion configs share: ITREX's `loss_weight_ratio` name and a repr of their fields."""

    FIELDS: tuple[str, ...] = ()

    @property
    def loss_weight_ratio(self) -> list:
        return self.loss_weights

    def __repr__(self):
        return f"{type(self).__name__}({', '.join(f'{k}={getattr(self, k)!r}' for k in self.FIELDS)})"


class KnowledgeDistillationLossConfig(CriterionConfig):
    """loss = loss_weights[0] * the student's own loss on labels + loss_weights[1] * T**2 * KD loss (INC's).

    loss_types[0] ('CE' or 'MSE') is the loss the model computes from ``labels`` (CE for classification,
    MSE for regression, as Hugging Face models choose); loss_types[1] is the KD loss on the tempered
    logits: 'CE' (soft cross-entropy), 'KL' or 'MSE'. ``loss_weight_ratio`` is ITREX's name for loss_weights.
    """

    FIELDS = ("temperature", "loss_types", "loss_weights")

    def __init__(self, temperature=1.0, loss_types=None, loss_weights=None, *, loss_weight_ratio=None):
        p = "KnowledgeDistillationLossConfig."
        errors = []
        weights = _weights_argument(p, loss_weights, loss_weight_ratio, errors)
        self.temperature = temperature
        self.loss_types = ["CE", "CE"] if loss_types is None else list(loss_types)
        self.loss_weights = [0.5, 0.5] if weights is None else weights
        if not _is_weight(temperature) or temperature <= 0:
            errors.append(f"{p}temperature: must be a number > 0, got {temperature!r}")
        if len(self.loss_types) != 2:
            errors.append(f"{p}loss_types: expected 2 entries [student loss, KD loss], got {self.loss_types!r}")
        else:
            if str(self.loss_types[0]).upper() not in _STUDENT_LOSSES:
                errors.append(f"{p}loss_types[0]: student loss {self.loss_types[0]!r} is not one of "
                              f"{list(_STUDENT_LOSSES)}")
            if str(self.loss_types[1]).upper() not in _KD_LOSSES:
                errors.append(f"{p}loss_types[1]: KD loss {self.loss_types[1]!r} is not one of {list(_KD_LOSSES)}")
        name = f"{p}loss_weights" if loss_weight_ratio is None else f"{p}loss_weight_ratio"
        if len(self.loss_weights) != 2:
            errors.append(f"{name}: expected 2 weights [student, KD], got {self.loss_weights!r}")
        elif not all(_is_weight(w) and 0.0 <= w <= 1.0 for w in self.loss_weights):
            errors.append(f"{name}: each weight must be a number in [0, 1], got {self.loss_weights!r}")
        elif abs(sum(self.loss_weights) - 1.0) >= 1e-9:
            errors.append(f"{name}: the two weights must sum to 1 (INC's rule), got {self.loss_weights!r} "
                          f"(sum {sum(self.loss_weights):g})")
        if errors:
            raise ConfigError(errors)


    def terms(self) -> dict:
        return {"temperature": self.temperature, "kd_loss_type": _KD_LOSSES[str(self.loss_types[1]).upper()],
                "hard_label_weight": float(self.loss_weights[0]), "kd_loss_weight": float(self.loss_weights[1])}


class IntermediateLayersKnowledgeDistillationLossConfig(CriterionConfig):
    """Match student layers to teacher layers: ``layer_mappings=[[student, teacher], ...]``.

    loss_types (default 'MSE' each): 'MSE', 'KL' or 'L1' (INC's), or 'COS' for hidden states; loss_weights
    (ITREX: loss_weight_ratio) default to 1/len(layer_mappings) each; add_origin_loss adds the student's own loss.
    """

    FIELDS = ("layer_mappings", "loss_types", "loss_weights", "add_origin_loss")

    def __init__(self, layer_mappings=None, loss_types=None, loss_weights=None, add_origin_loss=False, *,
                 loss_weight_ratio=None):
        p = "IntermediateLayersKnowledgeDistillationLossConfig."
        errors = []
        weights = _weights_argument(p, loss_weights, loss_weight_ratio, errors)
        self.layer_mappings = list(layer_mappings or [])
        n = len(self.layer_mappings)
        if n == 0:
            errors.append(f"{p}layer_mappings: give at least one [student_layer, teacher_layer] pair")
        self.loss_types = ["MSE"] * n if not loss_types else list(loss_types)
        self.loss_weights = [1.0 / max(n, 1)] * n if weights is None else weights
        self.add_origin_loss = add_origin_loss
        if not isinstance(add_origin_loss, bool):
            errors.append(f"{p}add_origin_loss: must be true or false, got {add_origin_loss!r}")
        if len(self.loss_types) != n:
            errors.append(f"{p}loss_types: expected {n} entries (one per layer mapping), got {self.loss_types!r}")
        if len(self.loss_weights) != n:
            errors.append(f"{p}loss_weights: expected {n} weights (one per layer mapping), got {self.loss_weights!r}")
        errors += [f"{p}loss_weights[{i}]: must be a number >= 0, got {w!r}" for i, w in enumerate(self.loss_weights)
                   if not _is_weight(w) or w < 0]
        self._matches = []
        for i, mapping in enumerate(self.layer_mappings):
            try:
                (feat_S, layer_S), (feat_T, layer_T) = _mapping(mapping)
            except ValueError as e:
                errors.append(f"{p}layer_mappings[{i}]: {mapping!r}: {e}")
                continue
            if feat_S != feat_T:
                errors.append(f"{p}layer_mappings[{i}]: matches student {feat_S} with teacher {feat_T}")
                continue
            loss = str(self.loss_types[i]).upper() if i < len(self.loss_types) else "MSE"
            if (feat_S, loss) not in _MATCH_LOSSES:
                ok = [t for f, t in _MATCH_LOSSES if f == feat_S]
                errors.append(f"{p}loss_types[{i}]: {self.loss_types[i]!r} does not apply to {feat_S} "
                              f"(use one of {ok})")
                continue
            weight = self.loss_weights[i] if i < len(self.loss_weights) else 0.0
            self._matches.append({"layer_S": layer_S, "layer_T": layer_T, "feature": feat_S,
                                  "loss": _MATCH_LOSSES[(feat_S, loss)], "weight": float(weight)})
        if errors:
            raise ConfigError(errors)


    def terms(self) -> dict:
        return {"intermediate_matches": [dict(m) for m in self._matches],
                "hard_label_weight": 1.0 if self.add_origin_loss else 0.0}


def _mapping(item) -> tuple[tuple[str, int], tuple[str, int]]:
    """[student, teacher] (or INC's one-entry form: the same layer on both sides) -> two (feature, index)."""
    if isinstance(item, (str, int)) or not isinstance(item, (list, tuple)) or len(item) not in (1, 2):
        raise ValueError("expected [student_layer, teacher_layer] (or [layer] for the same layer on both sides)")
    sides = [_side(x) for x in item]
    return (sides[0], sides[-1])


def _side(spec) -> tuple[str, int]:
    if isinstance(spec, (list, tuple)):  # INC's (layer_name,) or (layer_name, output_process)
        if len(spec) not in (1, 2) or (len(spec) == 2 and spec[1] not in ("", None)):
            raise ValueError(f"{spec!r}: output_process selects from a hooked module's output; a cache stores "
                             "hidden_states / attentions by index, so give ('hidden_states.N',)")
        spec = spec[0]
    if isinstance(spec, int) and not isinstance(spec, bool) and spec >= 0:
        return "hidden", spec
    m = _LAYER.match(str(spec))
    if m:
        return ("hidden" if m.group(1).startswith("hidden") else "attention"), int(m.group(2))
    module = _MODULE_LAYER.search(str(spec))
    hint = (f"; the output of encoder layer {module.group(1)} is hidden_states.{int(module.group(1)) + 1}"
            if module else "")
    raise ValueError(f"{spec!r} is not a layer index: use an int or 'hidden_states.N' / 'attentions.N' "
                     f"(a cache has no modules to hook){hint}")


def to_distillation_config(criterion) -> DistillationConfig:
    """A DistillationConfig from a DistillationConfig (TextBrewer numerics), its dict, an INC criterion config,
    or a list of INC configs (INC numerics).

    With both INC configs the terms add up: ``w0 * student + w1 * T**2 * kd + sum_i w_i * feature_i``, plus the
    student loss once more if the intermediate config has add_origin_loss.
    """
    if isinstance(criterion, DistillationConfig):
        return criterion
    if isinstance(criterion, dict):
        return DistillationConfig.from_dict(criterion)
    items = list(criterion) if isinstance(criterion, (list, tuple)) else [criterion]
    known = (KnowledgeDistillationLossConfig, IntermediateLayersKnowledgeDistillationLossConfig)
    bad = [type(c).__name__ for c in items if not isinstance(c, known)]
    if bad or not items:
        raise ConfigError(f"distillation_config: expected a DistillationConfig, a KnowledgeDistillationLossConfig, an "
                          f"IntermediateLayersKnowledgeDistillationLossConfig or a list of them, got {bad or items}")
    kd = [c for c in items if isinstance(c, KnowledgeDistillationLossConfig)]
    inter = [c for c in items if isinstance(c, IntermediateLayersKnowledgeDistillationLossConfig)]
    if len(kd) > 1 or len(inter) > 1:
        raise ConfigError("distillation_config: give at most one config of each kind")
    fields = {"kd_loss_weight": 0.0, "hard_label_weight": 0.0, "intermediate_matches": []}
    if inter:
        fields.update(inter[0].terms())
    if kd:
        origin = fields["hard_label_weight"]
        fields.update(kd[0].terms())
        fields["hard_label_weight"] += origin
    return DistillationConfig(**fields)
