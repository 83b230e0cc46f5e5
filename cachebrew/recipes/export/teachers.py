"""Loading teachers (Hugging Face directories or `module:function` entry points) and reading their outputs.

A teacher is any module whose forward accepts input_ids / attention_mask / token_type_ids and the
Hugging Face flags output_hidden_states / output_attentions, and returns an object or dict with
`logits`, `hidden_states` and `attentions`. Entry points run only because the user named them in the config.
"""
from __future__ import annotations

import weakref
from collections.abc import Mapping
from pathlib import Path

import torch

from ...cache.fingerprint import hash_files
from ...cache.format import TensorSpec
from ...core.models import TOKENIZER_FILES, call_entry_point
from ...errors import CachebrewError, ConfigError
from ...core.paths import resolve_path
from ...core.runtime import launch_env
from .config import ExportConfig, TeacherConfig

# teachers loaded with a device_map -> the device their inputs go to (that of their first parameters)
_PLACED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def load_teacher(tc: TeacherConfig, index: int, want_attention: bool):
    """(model, tokenizer or None). Attention maps need eager attention, so it is requested when exported."""
    where = f"teachers[{index}]"
    if tc.entry_point:
        obj = call_entry_point(tc.entry_point, f"{where}.entry_point")
        model, tokenizer = obj if isinstance(obj, tuple) else (obj, None)
        if not isinstance(model, torch.nn.Module):
            raise CachebrewError(f"{where}.entry_point: {tc.entry_point} returned {type(model).__name__}, "
                                 "not a torch.nn.Module (or a (model, tokenizer) tuple)")
        if tc.dtype not in (None, "auto"):  # auto: as the entry point built it
            model = model.to(getattr(torch, tc.dtype))
        return model.eval(), tokenizer
    path = Path(resolve_path(tc.path))
    if not (path / "config.json").is_file():
        raise CachebrewError(f"{where}.path: {path} is not a Hugging Face model directory (no config.json)")
    if tc.device_map is not None and launch_env()[0] > 1:
        raise ConfigError(f"{where}.device_map: device_map is for one process spanning several GPUs; under torchrun "
                          "each rank loads the whole teacher (drop device_map, or run one process)")
    import transformers

    cls = getattr(transformers, tc.model_class)
    kwargs = {"attn_implementation": "eager"} if want_attention else {}
    if tc.dtype is not None:
        kwargs[dtype_keyword(transformers.__version__)] = tc.dtype if tc.dtype == "auto" else getattr(torch, tc.dtype)
    if tc.device_map is not None:
        kwargs["device_map"] = tc.device_map
    try:
        model = cls.from_pretrained(str(path), **kwargs)
    except Exception as e:
        raise CachebrewError(f"{where}: cannot load {tc.model_class} from {path}: {e}") from None
    if tc.device_map is not None:
        keep_placement(model, where)
    return model.eval(), None


def dtype_keyword(transformers_version: str) -> str:
    """`from_pretrained`'s dtype argument: `dtype` since transformers 4.56, which deprecates `torch_dtype`
    (older releases know only `torch_dtype` and would pass `dtype` on to the model's config)."""
    from packaging.version import Version

    return "dtype" if Version(transformers_version) >= Version("4.56") else "torch_dtype"


def keep_placement(model: torch.nn.Module, where: str) -> None:
    """Keep a device_map teacher where accelerate placed it, and remember where its inputs go.

    The export moves every teacher to its device (`model.to(device)`), which would pull a teacher spread
    over several GPUs onto one, the very thing device_map avoids; so moving this instance is a no-op (as
    accelerate itself wraps `to` on the models it dispatches). Offloaded weights (cpu beside GPUs: accelerate
    leaves them on the meta device and loads them per call) are refused: the fingerprint hashes every weight,
    and there is none to read.
    """
    offloaded = sorted({name.rsplit(".", 1)[0] for name, p in model.named_parameters() if p.device.type == "meta"})
    if offloaded:
        shown = ", ".join(offloaded[:3]) + (f" and {len(offloaded) - 3} more" if len(offloaded) > 3 else "")
        raise CachebrewError(f"{where}.device_map: offloads {shown} to the CPU beside the GPUs, which the export does "
                             "not support; place the whole teacher on GPUs (more GPUs, or dtype: bfloat16)")
    first = next(model.parameters(), None)
    _PLACED[model] = first.device if first is not None else torch.device("cpu")

    def stay(*args, **kwargs):
        if "dtype" in kwargs or any(isinstance(a, torch.dtype) for a in args):
            raise CachebrewError(f"{where}: a teacher loaded with a device_map keeps its dtype; set {where}.dtype")
        return model

    model.to = stay
    model.cuda = stay


def load_tokenizer(cfg: ExportConfig, teacher_tokenizers: list):
    spec = cfg.tokenizer
    if spec is None:
        first = cfg.teachers[0]
        if first.path:
            spec = first.path
        elif teacher_tokenizers and teacher_tokenizers[0] is not None:
            return teacher_tokenizers[0], "entry_point:" + first.entry_point
        else:
            raise ConfigError("tokenizer: required when the first teacher is an entry point that returns no tokenizer")
    spec = resolve_path(spec)
    if ":" in spec and not Path(spec).exists():
        tok = call_entry_point(spec, "tokenizer")
        return tok, "entry_point:" + spec
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(spec)
    except Exception as e:
        raise CachebrewError(f"tokenizer: cannot load a tokenizer from {spec}: {e}") from None
    files = [Path(spec) / f for f in TOKENIZER_FILES if (Path(spec) / f).is_file()]
    return tok, hash_files(files)


def _get(outputs, key):
    if isinstance(outputs, Mapping):
        return outputs.get(key)
    if isinstance(outputs, (tuple, list)):
        return None
    return getattr(outputs, key, None)


def forward(model, batch: dict, cfg: ExportConfig):
    """The teacher's outputs for a batch; a device_map teacher takes its inputs where its first layers are
    (under accelerate hooks each further layer moves what it receives itself)."""
    device = _PLACED.get(model)
    if device is not None:
        batch = {k: v.to(device) for k, v in batch.items()}
    o = cfg.outputs
    return model(**batch, output_hidden_states=bool(o.hidden_layers), output_attentions=bool(o.attention_layers))


def teacher_tensors(name: str, outputs, cfg: ExportConfig) -> dict[tuple, torch.Tensor]:
    """{(kind, layer): batch tensor} for what the config asks of this teacher, with clear errors."""
    o = cfg.outputs
    got = {}
    if o.logits:
        logits = _get(outputs, "logits")
        if logits is None:
            raise CachebrewError(f"teacher {name!r} returned no 'logits' (outputs.logits is true); use a model with "
                                 "a task head (model_class) or set outputs.logits: false")
        got[("logits", None)] = logits
    for kind, key, layers, flag in (("hidden", "hidden_states", o.hidden_layers, "output_hidden_states"),
                                    ("attention", "attentions", o.attention_layers, "output_attentions")):
        if not layers:
            continue
        states = _get(outputs, key)
        if not states:
            hint = " (attention maps need attn_implementation='eager')" if kind == "attention" else ""
            raise CachebrewError(f"teacher {name!r} returned no '{key}' although outputs.{kind}_layers asks for "
                                 f"{layers}; its forward must honour {flag}=True{hint}")
        for layer in layers:
            if layer >= len(states):
                raise ConfigError(f"outputs.{kind}_layers: layer {layer} is out of range for teacher {name!r}, "
                                  f"which returns {len(states)} {key} (indices 0..{len(states) - 1})")
            t = states[layer]
            if kind == "attention" and o.attention_form == "logits":
                # log-probabilities: the pre-softmax scores up to a per-row constant, which softmax ignores
                t = torch.log(t.float().clamp_min(torch.finfo(torch.float32).tiny))
            got[(kind, layer)] = t
    return got


def tensor_specs(name: str, tensors: dict, cfg: ExportConfig) -> list[TensorSpec]:
    specs = []
    for (kind, layer), t in tensors.items():
        if kind == "logits":
            shape = [int(t.shape[-1])] if t.dim() == 2 else ["L", int(t.shape[-1])]
            topk = cfg.outputs.topk_logits
            if topk is not None and topk >= int(t.shape[-1]):
                topk = None  # nothing to drop
            sp = cfg.outputs.sparse_logits
            extra = {} if sp is None else {"sparse": sp.method, "k": sp.k, "temperature": float(sp.temperature),
                                           "seed": sp.seed}
            if sp is not None and sp.proposal_temperature is not None:
                extra["proposal_temperature"] = float(sp.proposal_temperature)
            specs.append(TensorSpec(name, kind, None, cfg.dtypes.logits, shape, topk, extra))
        elif kind == "hidden":
            specs.append(TensorSpec(name, kind, layer, cfg.dtypes.hidden, ["L", int(t.shape[-1])]))
        else:
            specs.append(TensorSpec(name, kind, layer, cfg.dtypes.attention, [int(t.shape[1]), "L", "L"],
                                    extra={"form": cfg.outputs.attention_form}))
    return specs
