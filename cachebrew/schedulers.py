"""Loss-weight and temperature schedulers (TextBrewer semantics).

Weight schedulers map training progress x in [0, 1] to a weight; temperature schedulers map
(logits_S, logits_T, base_temperature) to a scalar or per-example temperature.
"""
from __future__ import annotations

import torch


def linear_growth_weight_scheduler(x):
    return x


def linear_decay_weight_scheduler(x):
    return 1 - x


def constant_temperature_scheduler(logits_S, logits_T, base_temperature):
    return base_temperature


def flsw_temperature_scheduler_builder(beta, gamma, eps=1e-4, *args):
    """Per-example temperature from student/teacher logit disagreement (arXiv:1911.07471)."""

    def flsw_temperature_scheduler(logits_S, logits_T, base_temperature):
        with torch.no_grad():
            v = logits_S.detach().float()
            t = logits_T.detach().float()
            v = v / (torch.norm(v, dim=-1, keepdim=True) + eps)
            t = t / (torch.norm(t, dim=-1, keepdim=True) + eps)
            w = torch.pow((1 - (v * t).sum(dim=-1)), gamma)
            return base_temperature + (w.mean() - w) * beta

    return flsw_temperature_scheduler


def cwsm_temperature_scheduler_builder(beta, *args):
    """Per-example temperature from the student's confidence (arXiv:1911.07471)."""

    def cwsm_temperature_scheduler(logits_S, logits_T, base_temperature):
        with torch.no_grad():
            v = torch.softmax(logits_S.detach().float(), dim=-1)
            w = 1 / (v.max(dim=-1)[0] + 1e-3)
            return base_temperature + (w.mean() - w) * beta

    return cwsm_temperature_scheduler
