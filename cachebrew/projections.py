"""Projection layers that map student features to the teacher's width for intermediate matches."""
from __future__ import annotations

import torch


_ACTIVATIONS = {
    k: v for k, v in vars(torch.nn.modules.activation).items()
    if isinstance(v, type) and issubclass(v, torch.nn.Module) and not k.startswith("_")
}


def initializer_builder(std):
    """BERT-style init: normal(0, std) weights for Linear/Embedding, zero bias."""

    def init_weights(module):
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
            module.weight.data.normal_(mean=0.0, std=std)
        if isinstance(module, torch.nn.Linear) and module.bias is not None:
            module.bias.data.zero_()

    return init_weights


def linear_projection(dim_in, dim_out):
    model = torch.nn.Linear(in_features=dim_in, out_features=dim_out, bias=True)
    model.apply(initializer_builder(0.02))
    return model


def projection_with_activation(act_fn):
    """Build a projection factory Linear -> activation; act_fn is a torch activation name or class."""
    if isinstance(act_fn, str):
        if act_fn not in _ACTIVATIONS:
            raise ValueError(f"unknown activation {act_fn!r}; choose from {sorted(_ACTIVATIONS)}")
        act_cls = _ACTIVATIONS[act_fn]
    elif isinstance(act_fn, type) and issubclass(act_fn, torch.nn.Module):
        act_cls = act_fn
    else:
        raise TypeError("act_fn must be an activation name or a torch.nn.Module subclass")

    def projection(dim_in, dim_out):
        model = torch.nn.Sequential(torch.nn.Linear(in_features=dim_in, out_features=dim_out, bias=True), act_cls())
        model.apply(initializer_builder(0.02))
        return model

    return projection
