"""TrainingConfig and DistillationConfig: TextBrewer's fields and defaults, validated on construction.

Every problem in a config is collected and raised at once as a ConfigError whose lines name the field,
so a config file is fixed in one edit. Construction has no side effects (no directories are created).
Configs load from dicts, JSON and YAML (``Config.from_file`` picks by extension) and round-trip
through ``to_dict``.
"""
from __future__ import annotations

import inspect
import json
import os
from typing import Any

import torch

from .core.config import is_int, is_number, read_config_file
from .core.training import AMP_DTYPES
from .errors import ConfigError
from .losses import ULD_VARIANTS
from .registry import (FEATURES, KD_LOSS_MAP, MATCH_LOSS_MAP, PAIR_LOSSES, PROJ_MAP, TEMPERATURE_SCHEDULER,
                      WEIGHT_SCHEDULER, split_spec)

_NONE = "none"


class Config:
    """Base class: construction from dict/JSON/YAML with unknown keys rejected, and to_dict()."""

    @classmethod
    def field_names(cls) -> list[str]:
        return [p for p in inspect.signature(cls.__init__).parameters if p != "self"]

    @classmethod
    def from_dict(cls, dict_object: dict, source: str | None = None):
        if not isinstance(dict_object, dict):
            raise ConfigError(f"{cls.__name__}: expected a mapping, got {type(dict_object).__name__}", source)
        names = cls.field_names()
        errors = [f"{cls.__name__}.{k}: unknown field (valid: {', '.join(names)})" for k in dict_object if k not in names]
        try:  # the known fields are checked too: every problem at once
            config = cls(**{k: v for k, v in dict_object.items() if k in names})
        except ConfigError as e:
            errors += e.errors
        if errors:
            raise ConfigError(errors, source) from None
        return config

    @classmethod
    def from_json_file(cls, json_filename):
        return cls.from_dict(read_config_file(json_filename, "json"), source=str(json_filename))

    @classmethod
    def from_yaml_file(cls, yaml_filename):
        return cls.from_dict(read_config_file(yaml_filename, "yaml"), source=str(yaml_filename))

    @classmethod
    def from_file(cls, filename):
        """JSON or YAML, chosen by extension (.json / .yaml / .yml)."""
        return cls.from_dict(read_config_file(filename), source=str(filename))

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.field_names()}

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, default=repr)

    def __eq__(self, other):
        return type(self) is type(other) and self.to_dict() == other.to_dict()

    def __repr__(self):
        body = ", ".join(f"{k}={v!r}" for k, v in self.to_dict().items())
        return f"{type(self).__name__}({body})"

    __str__ = __repr__


class TrainingConfig(Config):
    """How the student is trained: checkpoints, logging, device, mixed precision, distribution.

    Differences from TextBrewer (documented in docs/from-textbrewer.md): ``device=None`` picks CUDA when present
    and the CPU otherwise; ``amp='bf16'|'fp16'`` uses torch.amp (``fp16=True`` means ``amp='fp16'``,
    ``fp16_opt_level`` is accepted and ignored since there is no apex); ``local_rank=None`` reads
    LOCAL_RANK when launched by torchrun; output_dir is created at the first save, not here;
    ``log_steps`` (cachebrew's): the losses of each micro-step stay on the device and reach
    tensorboard and the progress bar every ``log_steps`` optimizer steps, in one transfer, so a GPU
    never waits for the host inside that window (the same scalars at the same steps as TextBrewer);
    ``keep_checkpoints``: keep the newest K ``gs*.safetensors`` (None: all, 0: write none, the callback still runs).
    """

    def __init__(self, gradient_accumulation_steps=1, ckpt_frequency=1, ckpt_epoch_frequency=1, ckpt_steps=None,
                 log_dir=None, output_dir="./saved_models", device=None, fp16=False, fp16_opt_level="O1",
                 data_parallel=False, local_rank=None, amp=None, progress_bar=True, keep_checkpoints=None,
                 log_steps=50):
        self.gradient_accumulation_steps = gradient_accumulation_steps
        self.ckpt_frequency = ckpt_frequency
        self.ckpt_epoch_frequency = ckpt_epoch_frequency
        self.ckpt_steps = ckpt_steps
        self.log_dir = log_dir
        self.output_dir = output_dir
        self.device = device
        self.fp16 = fp16
        self.fp16_opt_level = fp16_opt_level
        self.data_parallel = data_parallel
        self.local_rank = local_rank
        self.amp = amp
        self.progress_bar = progress_bar
        self.keep_checkpoints = keep_checkpoints
        self.log_steps = log_steps
        self._validate()

    def _validate(self):
        errors = []
        p = "TrainingConfig."
        for name in ("gradient_accumulation_steps", "ckpt_frequency", "ckpt_epoch_frequency", "log_steps"):
            v = getattr(self, name)
            if not is_int(v) or v < 1:
                errors.append(f"{p}{name}: must be an integer >= 1, got {v!r}")
        if self.keep_checkpoints is not None and (not is_int(self.keep_checkpoints) or self.keep_checkpoints < 0):
            errors.append(f"{p}keep_checkpoints: must be None (keep all), 0 (write none: the caller keeps its own) "
                          f"or an integer >= 1, got {self.keep_checkpoints!r}")
        if self.ckpt_steps is not None and (not is_int(self.ckpt_steps) or self.ckpt_steps < 1):
            errors.append(f"{p}ckpt_steps: must be None or an integer >= 1, got {self.ckpt_steps!r}")
        for name in ("log_dir", "output_dir"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, (str, os.PathLike)):
                errors.append(f"{p}{name}: must be a path, got {v!r}")
        if self.output_dir is None:
            errors.append(f"{p}output_dir: must be a path, got None")
        if self.device is not None:
            try:
                torch.device(self.device)
            except (RuntimeError, TypeError):
                errors.append(f"{p}device: not a torch device: {self.device!r}")
        for name in ("fp16", "data_parallel", "progress_bar"):
            if not isinstance(getattr(self, name), bool):
                errors.append(f"{p}{name}: must be true or false, got {getattr(self, name)!r}")
        if self.amp is not None and self.amp not in AMP_DTYPES:
            errors.append(f"{p}amp: must be None, 'bf16' or 'fp16', got {self.amp!r}")
        elif self.fp16 is True and self.amp == "bf16":
            errors.append(f"{p}fp16: fp16=True conflicts with amp='bf16'; set only amp")
        if self.local_rank is not None and (not is_int(self.local_rank) or self.local_rank < -1):
            errors.append(f"{p}local_rank: must be None, -1 or a rank >= 0, got {self.local_rank!r}")
        if self.data_parallel and self.local_rank not in (None, -1):
            errors.append(f"{p}data_parallel: DataParallel and DDP (local_rank={self.local_rank}) are exclusive")
        if errors:
            raise ConfigError(errors)

    @property
    def amp_dtype(self) -> torch.dtype | None:
        """The autocast dtype this config asks for, or None for full precision."""
        mode = self.amp or ("fp16" if self.fp16 else None)
        return AMP_DTYPES.get(mode)


class IntermediateMatch:
    """One intermediate-feature match: which layers, which feature, which loss, and an optional projection."""

    FIELDS = ("layer_T", "layer_S", "weight", "loss", "feature", "proj")

    def __init__(self, layer_T, layer_S, weight, loss, feature, proj=None):
        self.layer_T = layer_T
        self.layer_S = layer_S
        self.weight = weight
        self.loss = loss
        self.feature = feature
        self.proj = None if proj is None else list(proj)
        if self.proj is not None and len(self.proj) == 3:
            self.proj.append({})  # ['linear', dim_S, dim_T, {optimizer group settings}]
        errors = self.problems("IntermediateMatch")
        if errors:
            raise ConfigError(errors)

    def problems(self, prefix: str) -> list[str]:
        errors = []
        if self.feature not in FEATURES:
            errors.append(f"{prefix}.feature: must be one of {FEATURES}, got {self.feature!r}")
        if self.loss not in MATCH_LOSS_MAP:
            errors.append(f"{prefix}.loss: unknown loss {self.loss!r}; registered: {sorted(MATCH_LOSS_MAP)}")
        pair = self.loss in PAIR_LOSSES
        for name in ("layer_T", "layer_S"):
            v = getattr(self, name)
            if pair:
                if not (isinstance(v, (list, tuple)) and len(v) == 2 and all(is_int(i) and i >= 0 for i in v)):
                    errors.append(f"{prefix}.{name}: loss {self.loss!r} compares two layers; "
                                  f"give a list of two indices >= 0, got {v!r}")
            elif isinstance(v, (list, tuple)) and self.loss in MATCH_LOSS_MAP and self.loss not in PAIR_LOSSES:
                errors.append(f"{prefix}.{name}: loss {self.loss!r} takes one layer index, got the list {v!r}")
            elif not isinstance(v, (list, tuple)) and (not is_int(v) or v < 0):
                errors.append(f"{prefix}.{name}: must be a layer index >= 0, got {v!r}")
        if not is_number(self.weight) or self.weight < 0:
            errors.append(f"{prefix}.weight: must be a number >= 0, got {self.weight!r}")
        if self.proj is not None:
            pr = self.proj
            if not pr or pr[0] not in PROJ_MAP:
                errors.append(f"{prefix}.proj[0]: unknown projection {pr[0] if pr else None!r}; "
                              f"registered: {sorted(PROJ_MAP)}")
            if len(pr) not in (3, 4):
                errors.append(f"{prefix}.proj: expected [name, dim_S, dim_T] or [name, dim_S, dim_T, {{...}}], got {pr!r}")
            else:
                for i, what in ((1, "student dim"), (2, "teacher dim")):
                    if not is_int(pr[i]) or pr[i] < 1:
                        errors.append(f"{prefix}.proj[{i}]: {what} must be an integer >= 1, got {pr[i]!r}")
                if not isinstance(pr[3], dict):
                    errors.append(f"{prefix}.proj[3]: optimizer settings must be a dict, got {pr[3]!r}")
        return errors

    @classmethod
    def from_dict(cls, dict_object):
        if dict_object is None:
            return None
        return cls(**dict_object)

    def to_dict(self):
        d = {k: getattr(self, k) for k in self.FIELDS}
        if d["proj"] is None:
            del d["proj"]
        return d

    def __repr__(self):
        return f"IntermediateMatch({self.to_dict()})"


class DistillationConfig(Config):
    """What the student learns from the teacher:

    total = kd_loss * kd_loss_weight + sum(adaptor 'losses') * hard_label_weight + sum(match_loss * weight).

    Scheduler options take a name (``'linear_decay'``), TextBrewer's list form (``['flsw', 1, 2]``) or
    the named form (``{'name': 'flsw', 'beta': 1, 'gamma': 2}``). As in TextBrewer, the attributes
    ``temperature_scheduler`` etc. hold the resolved callables (or None); ``to_dict`` returns the specs.
    """

    def __init__(self, temperature=4, temperature_scheduler="none", hard_label_weight=0,
                 hard_label_weight_scheduler="none", kd_loss_type="ce", kd_loss_weight=1,
                 kd_loss_weight_scheduler="none", probability_shift=False, intermediate_matches=None,
                 is_caching_logits=False, cross_tokenizer_uld="unmatched"):
        errors = []
        p = "DistillationConfig."
        self.temperature = temperature
        if not is_number(temperature) or temperature <= 0:
            errors.append(f"{p}temperature: must be a number > 0, got {temperature!r}")
        self._specs = {
            "temperature_scheduler": temperature_scheduler,
            "hard_label_weight_scheduler": hard_label_weight_scheduler,
            "kd_loss_weight_scheduler": kd_loss_weight_scheduler,
        }
        self.temperature_scheduler = self._resolve(
            "temperature_scheduler", temperature_scheduler, TEMPERATURE_SCHEDULER, errors)
        self.hard_label_weight = hard_label_weight
        self.hard_label_weight_scheduler = self._resolve(
            "hard_label_weight_scheduler", hard_label_weight_scheduler, WEIGHT_SCHEDULER, errors)
        self.kd_loss_type = kd_loss_type
        if kd_loss_type not in KD_LOSS_MAP:
            errors.append(f"{p}kd_loss_type: unknown KD loss {kd_loss_type!r}; registered: {sorted(KD_LOSS_MAP)}")
        self.kd_loss_weight = kd_loss_weight
        self.kd_loss_weight_scheduler = self._resolve(
            "kd_loss_weight_scheduler", kd_loss_weight_scheduler, WEIGHT_SCHEDULER, errors)
        for name in ("hard_label_weight", "kd_loss_weight"):
            v = getattr(self, name)
            if not is_number(v) or v < 0:
                errors.append(f"{p}{name}: must be a number >= 0, got {v!r}")
        self.probability_shift = probability_shift
        self.is_caching_logits = is_caching_logits
        for name in ("probability_shift", "is_caching_logits"):
            if not isinstance(getattr(self, name), bool):
                errors.append(f"{p}{name}: must be true or false, got {getattr(self, name)!r}")
        self.cross_tokenizer_uld = cross_tokenizer_uld
        if cross_tokenizer_uld not in ULD_VARIANTS:  # cachebrew's, for a causal-LM teacher of another tokenizer
            errors.append(f"{p}cross_tokenizer_uld: one of {', '.join(ULD_VARIANTS)}, got {cross_tokenizer_uld!r}")
        self.intermediate_matches: list[IntermediateMatch] = []
        if intermediate_matches is not None and not isinstance(intermediate_matches, (list, tuple)):
            errors.append(f"{p}intermediate_matches: must be a list of dicts, got {type(intermediate_matches).__name__}")
            intermediate_matches = []
        for i, im in enumerate(intermediate_matches or []):
            where = f"{p}intermediate_matches[{i}]"
            if isinstance(im, IntermediateMatch):
                self.intermediate_matches.append(im)
                continue
            if not isinstance(im, dict):
                errors.append(f"{where}: must be a dict, got {type(im).__name__}")
                continue
            unknown = [k for k in im if k not in IntermediateMatch.FIELDS]
            missing = [k for k in IntermediateMatch.FIELDS[:5] if k not in im]
            errors += [f"{where}.{k}: unknown key (valid: {', '.join(IntermediateMatch.FIELDS)})" for k in unknown]
            errors += [f"{where}.{k}: required" for k in missing]
            if unknown or missing:
                continue
            try:
                self.intermediate_matches.append(IntermediateMatch(**im))
            except ConfigError as e:
                errors += [msg.replace("IntermediateMatch", where, 1) for msg in e.errors]
        if errors:
            raise ConfigError(errors)

    @staticmethod
    def _resolve(field, spec, registry, errors):
        where = f"DistillationConfig.{field}"
        if spec is None or spec == _NONE:
            return None
        if callable(spec) and not isinstance(spec, (str, list, tuple, dict)):
            return spec
        try:
            name, args, kwargs = split_spec(spec)
        except (TypeError, ValueError) as e:
            errors.append(f"{where}: {e}")
            return None
        if not dict.__contains__(registry, name):
            errors.append(f"{where}: unknown scheduler {name!r}; registered: {sorted(registry)}")
            return None
        entry = dict.__getitem__(registry, name)
        if registry is TEMPERATURE_SCHEDULER and name != "constant":
            if args is None:
                params = [p for p in inspect.signature(entry).parameters.values()
                          if p.default is inspect.Parameter.empty and p.kind is p.POSITIONAL_OR_KEYWORD]
                errors.append(f"{where}: {name!r} needs parameters ({', '.join(p.name for p in params)}); "
                              f"write e.g. [{name!r}, ...] or {{'name': {name!r}, ...}}")
                return None
            try:
                return entry(*args, **kwargs)
            except TypeError as e:
                errors.append(f"{where}: bad parameters for {name!r}: {e}")
                return None
        if args:
            errors.append(f"{where}: {name!r} takes no parameters, got {spec!r}")
            return None
        return entry

    def to_dict(self):
        d = {name: getattr(self, name) for name in self.field_names()}
        d.update({k: (v if not callable(v) or isinstance(v, str) else repr(v)) for k, v in self._specs.items()})
        d["intermediate_matches"] = [im.to_dict() for im in self.intermediate_matches]
        return d
