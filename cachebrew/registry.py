"""User-extensible registries of losses, projections and schedulers, with TextBrewer's names.

Add an entry without editing cachebrew, exactly as in TextBrewer::

    from cachebrew.registry import MATCH_LOSS_MAP     # or cachebrew.presets, TextBrewer's name for it
    MATCH_LOSS_MAP['l1'] = lambda feature_S, feature_T, mask=None: (feature_S - feature_T).abs().mean()

or with the decorator form ``@MATCH_LOSS_MAP.register('l1')``. Configs refer to entries by name and
are validated against the registry contents at construction time.
"""
from __future__ import annotations

from .losses import (att_ce_loss, att_ce_mean_loss, att_mse_loss, att_mse_sum_loss, cls_mse_loss, cos_loss,
                     fsp_loss, hid_mse_loss, inc_kd_ce_loss, inc_kd_kl_loss, inc_kd_mse_loss, inc_kl_feature_loss,
                     inc_l1_feature_loss, inc_mse_feature_loss, kd_ce_loss, kd_kl_loss, kd_mse_loss, mean_mse_loss,
                     mmd_loss, pkd_loss)
from .projections import linear_projection, projection_with_activation
from .schedulers import (constant_temperature_scheduler, cwsm_temperature_scheduler_builder,
                         flsw_temperature_scheduler_builder, linear_decay_weight_scheduler,
                         linear_growth_weight_scheduler)


class Registry(dict):
    """A name -> callable map whose missing-key error lists the valid names."""

    def __init__(self, kind: str, entries: dict):
        super().__init__(entries)
        self.kind = kind

    def __missing__(self, key):
        raise KeyError(f"unknown {self.kind} {key!r}; registered: {sorted(self)}")

    def register(self, name: str):
        """Decorator: ``@KD_LOSS_MAP.register('kl')``."""

        def deco(func):
            if not callable(func):
                raise TypeError(f"{self.kind} {name!r} must be callable")
            self[name] = func
            return func

        return deco


class DynamicKeyDict(Registry):
    """A registry whose entries are builders: ``m[['flsw', 1, 2]]`` or ``m[{'name': 'flsw', 'beta': 1, 'gamma': 2}]``
    calls the builder with the parameters; a plain name returns the entry itself (TextBrewer semantics)."""

    def __getitem__(self, key):
        name, args, kwargs = split_spec(key)
        if args is None:
            return super().__getitem__(name)
        return super().__getitem__(name)(*args, **kwargs)

    def __contains__(self, key):
        try:
            name = split_spec(key)[0]
        except (TypeError, ValueError):
            return False
        return dict.__contains__(self, name)


def split_spec(spec):
    """Split a scheduler spec into (name, positional args or None, keyword args)."""
    if isinstance(spec, str):
        return spec, None, {}
    if isinstance(spec, (list, tuple)):
        if not spec or not isinstance(spec[0], str):
            raise ValueError(f"a list spec starts with the name, got {spec!r}")
        args = list(spec[1:])
        if len(args) == 1 and isinstance(args[0], dict):
            return spec[0], [], dict(args[0])
        return spec[0], args, {}
    if isinstance(spec, dict):
        if "name" not in spec:
            raise ValueError(f"a dict spec needs a 'name' key, got {spec!r}")
        kwargs = {k: v for k, v in spec.items() if k != "name"}
        return spec["name"], [], kwargs
    raise TypeError(f"expected a name, [name, *args] or {{'name': ..., **kwargs}}, got {type(spec).__name__}")


FEATURES = ["hidden", "attention"]

ADAPTOR_KEYS = ["logits", "logits_mask", "losses", "inputs_mask", "labels"] + FEATURES

KD_LOSS_MAP = Registry("kd loss", {
    "mse": kd_mse_loss, "ce": kd_ce_loss,
    "kl": kd_kl_loss,  # not in TextBrewer
    # Intel Neural Compressor's KD terms (x T**2, INC's reductions): what INC's criterion configs select
    "inc_ce": inc_kd_ce_loss, "inc_kl": inc_kd_kl_loss, "inc_mse": inc_kd_mse_loss,
})

MATCH_LOSS_MAP = Registry("match loss", {
    "attention_mse_sum": att_mse_sum_loss,
    "attention_mse": att_mse_loss,
    "attention_ce_mean": att_ce_mean_loss,
    "attention_ce": att_ce_loss,
    "hidden_mse": hid_mse_loss,
    "cos": cos_loss,
    "pkd": pkd_loss,
    "cls_mse": cls_mse_loss,  # cachebrew's: position 0 only, so it also serves students with another tokenizer
    "mean_mse": mean_mse_loss,  # cachebrew's: mean-pooled states (sentence encoders' pooling); spans across tokenizers
    "gram": fsp_loss,
    "fsp": fsp_loss,
    "mmd": mmd_loss,
    "nst": mmd_loss,
    # Intel Neural Compressor's intermediate-layer losses (every element, no padding mask)
    "inc_mse": inc_mse_feature_loss,
    "inc_l1": inc_l1_feature_loss,
    "inc_kl": inc_kl_feature_loss,
})

# Losses that compare relations between two layers: layer_T / layer_S are pairs of indices.
PAIR_LOSSES = {"gram", "fsp", "mmd", "nst"}

PROJ_MAP = Registry("projection", {
    "linear": linear_projection,
    "relu": projection_with_activation("ReLU"),
    "tanh": projection_with_activation("Tanh"),
})

WEIGHT_SCHEDULER = Registry("weight scheduler", {
    "linear_decay": linear_decay_weight_scheduler,
    "linear_growth": linear_growth_weight_scheduler,
})

TEMPERATURE_SCHEDULER = DynamicKeyDict("temperature scheduler", {
    "constant": constant_temperature_scheduler,
    "flsw": flsw_temperature_scheduler_builder,
    "cwsm": cwsm_temperature_scheduler_builder,
})

MAPS = {
    "kd_loss": KD_LOSS_MAP,
    "match_Loss": MATCH_LOSS_MAP,  # TextBrewer's spelling
    "match_loss": MATCH_LOSS_MAP,
    "projection": PROJ_MAP,
    "weight_scheduler": WEIGHT_SCHEDULER,
    "temperature_scheduler": TEMPERATURE_SCHEDULER,
}


def register_new(map_name, name, func):
    """TextBrewer's registration helper: ``register_new('kd_loss', 'kl', my_kl)``."""
    if map_name not in MAPS:
        raise KeyError(f"unknown map {map_name!r}; choose from {sorted(MAPS)}")
    if not callable(func):
        raise TypeError("Functions to be registered is not callable")
    MAPS[map_name][name] = func
