"""Intel Neural Compressor's distillation criterion configs, translated into a cachebrew DistillationConfig.

INC users write ``KnowledgeDistillationLossConfig(temperature, loss_types, loss_weight_ratio)`` and
``IntermediateLayersKnowledgeDistillationLossConfig(layer_mappings, ...)``; the names and defaults are
kept, and each becomes TextBrewer-style terms so that one loss engine serves every front end.

One deliberate difference: INC's layer mappings name modules (``'bert.encoder.layer.3'``) and hook them,
which needs a live teacher. A cache holds hidden states and attention maps by layer index, so a mapping
here names ``hidden_states`` / ``attentions`` indices: ``[student, teacher]`` where each side is an int
(a hidden_states index) or ``'hidden_states.3'`` / ``'attentions.2'``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..configurations import DistillationConfig
from ..errors import ConfigError

_KD_LOSSES = {"CE": "ce", "KL": "kl", "MSE": "mse"}
_STUDENT_LOSSES = ("CE", "MSE")
_LAYER = re.compile(r"^(hidden_states|hidden|attentions|attention)\.(\d+)$")
# (feature, INC loss type) -> MATCH_LOSS_MAP entry
_MATCH_LOSSES = {("hidden", "MSE"): "hidden_mse", ("hidden", "COS"): "cos",
                 ("attention", "MSE"): "attention_mse", ("attention", "KL"): "attention_ce",
                 ("attention", "CE"): "attention_ce"}


def _pair(name, values, n, errors, allowed=None):
    values = list(values)
    if len(values) != n:
        errors.append(f"{name}: expected {n} entries, got {len(values)} ({values!r})")
    if allowed is not None:
        errors += [f"{name}[{i}]: {v!r} is not one of {list(allowed)}" for i, v in enumerate(values)
                   if str(v).upper() not in allowed]
    return values


@dataclass
class KnowledgeDistillationLossConfig:
    """loss = loss_weight_ratio[0] * the student's own loss on labels + loss_weight_ratio[1] * KD loss.

    loss_types[0] ('CE' or 'MSE') is the loss the model computes from ``labels`` (CE for classification,
    MSE for regression, as Hugging Face models choose); loss_types[1] is the KD loss on the tempered
    logits: 'CE' (soft cross-entropy), 'KL' or 'MSE'.
    """

    temperature: float = 1.0
    loss_types: list = field(default_factory=lambda: ["CE", "CE"])
    loss_weight_ratio: list = field(default_factory=lambda: [0.5, 0.5])

    def __post_init__(self):
        errors = []
        p = "KnowledgeDistillationLossConfig."
        if not isinstance(self.temperature, (int, float)) or self.temperature <= 0:
            errors.append(f"{p}temperature: must be a number > 0, got {self.temperature!r}")
        types = _pair(f"{p}loss_types", self.loss_types, 2, errors)
        if len(types) == 2:
            if str(types[0]).upper() not in _STUDENT_LOSSES:
                errors.append(f"{p}loss_types[0]: student loss {types[0]!r} is not one of {list(_STUDENT_LOSSES)}")
            if str(types[1]).upper() not in _KD_LOSSES:
                errors.append(f"{p}loss_types[1]: KD loss {types[1]!r} is not one of {list(_KD_LOSSES)}")
        _check_weights(f"{p}loss_weight_ratio", self.loss_weight_ratio, 2, errors)
        if errors:
            raise ConfigError(errors)

    def terms(self) -> dict:
        return {"temperature": self.temperature, "kd_loss_type": _KD_LOSSES[str(self.loss_types[1]).upper()],
                "hard_label_weight": float(self.loss_weight_ratio[0]),
                "kd_loss_weight": float(self.loss_weight_ratio[1])}


@dataclass
class IntermediateLayersKnowledgeDistillationLossConfig:
    """Match student layers to teacher layers: ``layer_mappings=[[student, teacher], ...]``.

    loss_types (default 'MSE' each): 'MSE' or 'COS' for hidden states, 'MSE' or 'KL' for attention maps;
    loss_weight_ratio defaults to 1/len(layer_mappings) each; add_origin_loss adds the student's own loss.
    """

    layer_mappings: list = field(default_factory=list)
    loss_types: list | None = None
    loss_weight_ratio: list | None = None
    add_origin_loss: bool = False

    def __post_init__(self):
        p = "IntermediateLayersKnowledgeDistillationLossConfig."
        errors = []
        n = len(self.layer_mappings)
        if n == 0:
            errors.append(f"{p}layer_mappings: give at least one [student_layer, teacher_layer] pair")
        self.loss_types = ["MSE"] * n if self.loss_types is None else list(self.loss_types)
        self.loss_weight_ratio = [1.0 / max(n, 1)] * n if self.loss_weight_ratio is None else list(self.loss_weight_ratio)
        _pair(f"{p}loss_types", self.loss_types, n, errors)
        _check_weights(f"{p}loss_weight_ratio", self.loss_weight_ratio, n, errors)
        self._matches = []
        for i, mapping in enumerate(self.layer_mappings):
            try:
                student, teacher = mapping
                (feat_S, layer_S), (feat_T, layer_T) = _layer(student), _layer(teacher)
            except (TypeError, ValueError) as e:
                errors.append(f"{p}layer_mappings[{i}]: {mapping!r} is not [student_layer, teacher_layer] with "
                              f"each an int or 'hidden_states.N' / 'attentions.N' ({e})")
                continue
            if feat_S != feat_T:
                errors.append(f"{p}layer_mappings[{i}]: matches student {feat_S} with teacher {feat_T}")
                continue
            loss = str(self.loss_types[i]).upper() if i < len(self.loss_types) else "MSE"
            if (feat_S, loss) not in _MATCH_LOSSES:
                ok = [t for f, t in _MATCH_LOSSES if f == feat_S]
                errors.append(f"{p}loss_types[{i}]: {loss!r} does not apply to {feat_S} (use one of {ok})")
                continue
            weight = self.loss_weight_ratio[i] if i < len(self.loss_weight_ratio) else 0.0
            self._matches.append({"layer_S": layer_S, "layer_T": layer_T, "feature": feat_S,
                                  "loss": _MATCH_LOSSES[(feat_S, loss)], "weight": float(weight)})
        if errors:
            raise ConfigError(errors)

    def terms(self) -> dict:
        return {"intermediate_matches": [dict(m) for m in self._matches],
                "hard_label_weight": 1.0 if self.add_origin_loss else 0.0}


def _layer(spec) -> tuple[str, int]:
    if isinstance(spec, int) and not isinstance(spec, bool) and spec >= 0:
        return "hidden", spec
    m = _LAYER.match(str(spec))
    if not m:
        raise ValueError(f"bad layer {spec!r}")
    return ("hidden" if m.group(1).startswith("hidden") else "attention"), int(m.group(2))


def _check_weights(name, values, n, errors):
    values = list(values)
    if len(values) != n:
        errors.append(f"{name}: expected {n} weights, got {len(values)} ({values!r})")
    errors += [f"{name}[{i}]: must be a number >= 0, got {v!r}" for i, v in enumerate(values)
               if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0]


def to_distillation_config(criterion) -> DistillationConfig:
    """A DistillationConfig from a DistillationConfig, an INC criterion config, or a list of them.

    With both INC configs, the KD config's student-loss weight is the hard-label weight (add_origin_loss of
    the intermediate one is then ignored); without a KD config there is no KD term on the logits.
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
        fields.update(kd[0].terms())
    return DistillationConfig(**fields)
