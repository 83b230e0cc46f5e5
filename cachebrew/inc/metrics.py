"""ITREX's ``metrics.Metric``: which evaluation result ``NLPTrainer.distill`` keeps the best model by."""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError


@dataclass
class Metric:
    """name: a key of ``trainer.evaluate()``'s result ('eval_accuracy', 'eval_f1', 'eval_loss', ...).

    greater_is_better: the best model has the largest value (False: the smallest, e.g. eval_loss).
    is_relative / criterion: INC's accuracy-tolerance fields (relative or absolute, 0.01), kept for scripts that
    set them; distillation reads neither. weight_ratio: this metric's weight when several are combined
    (``trainer.metrics = [Metric(..., weight_ratio=0.7), Metric(..., weight_ratio=0.3)]``).
    """

    name: str
    greater_is_better: bool = True
    is_relative: bool = True
    criterion: float = 0.01
    weight_ratio: float | None = None

    def __post_init__(self):
        errors = []
        if not isinstance(self.name, str) or not self.name:
            errors.append(f"Metric.name: must be the name of an evaluation result, got {self.name!r}")
        if self.weight_ratio is not None and (not isinstance(self.weight_ratio, (int, float)) or self.weight_ratio < 0):
            errors.append(f"Metric.weight_ratio: must be a number >= 0 or None, got {self.weight_ratio!r}")
        if errors:
            raise ConfigError(errors)


def combined_score(metrics, results: dict) -> float:
    """The one number the best model is chosen by: a Metric's result, or the weighted sum of several (ITREX's
    rule: every metric of a list needs a weight_ratio). A missing name is a ConfigError listing what exists."""
    items = list(metrics) if isinstance(metrics, (list, tuple)) else [metrics]
    if not items or not all(isinstance(m, Metric) for m in items):
        raise ConfigError(f"trainer.metrics: expected a metrics.Metric or a list of them, got {metrics!r}")
    missing = [m.name for m in items if m.name not in results]
    if missing:
        raise ConfigError(f"trainer.metrics: {missing} not in the evaluation results {sorted(results)}; name one of "
                          "those (compute_metrics' keys get the 'eval_' prefix)")
    if len(items) == 1:
        return float(results[items[0].name])
    if any(m.weight_ratio is None for m in items):
        raise ConfigError("trainer.metrics: with several metrics, give each a weight_ratio")
    return float(sum(results[m.name] * m.weight_ratio for m in items))


def greater_is_better(metrics) -> bool:
    items = list(metrics) if isinstance(metrics, (list, tuple)) else [metrics]
    directions = {m.greater_is_better for m in items}
    if len(directions) > 1:
        raise ConfigError("trainer.metrics: combined metrics must agree on greater_is_better")
    return directions.pop()
