"""Building the student: a Hugging Face model (pretrained directory or config) or a user entry point,
and, for multi-task distillation, one shared encoder with a classification head per task."""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

from torch import nn

from ..errors import CachebrewError
from ..core.models import call_entry_point
from ..core.paths import resolve_path

logger = logging.getLogger("cachebrew")


@dataclass
class StudentConfig:
    path: str | None = None          # Hugging Face model directory (from_pretrained)
    config: dict | str | None = None  # config fields (with model_type) or a config.json path: random init
    entry_point: str | None = None   # "module:function" returning an nn.Module
    model_class: str | None = None   # default: sequence or token classification from the cache
    overrides: dict | None = None    # config fields to change, e.g. {num_hidden_layers: 3}: keep the first layers
    # the student's own tokenizer (a directory): where it is not the cache's, the student reads the cached text
    # through it (components.retokenize); None: the cache's token ids, i.e. the teacher's tokenizer
    tokenizer: str | None = None


def _hf_config(spec: StudentConfig, num_labels: int | None, want_attention: bool):
    from transformers import AutoConfig

    if spec.path is not None:
        path = resolve_path(spec.path)
        if not (Path(path) / "config.json").is_file():
            raise CachebrewError(f"student.path: {spec.path} is not a Hugging Face model directory (no config.json)")
        cfg = AutoConfig.from_pretrained(path)
    else:
        fields = spec.config
        if isinstance(fields, str):
            try:
                fields = json.loads(Path(fields).read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise CachebrewError(f"student.config: cannot read {spec.config}: {e}") from None
        fields = dict(fields)
        model_type = fields.pop("model_type", "bert")
        try:
            cfg = AutoConfig.for_model(model_type, **fields)
        except ValueError as e:
            raise CachebrewError(f"student.config: {e}") from None
    for key, value in (spec.overrides or {}).items():
        setattr(cfg, key, value)
    if num_labels is not None:
        cfg.num_labels = num_labels
    cfg.output_hidden_states = True
    if want_attention:
        cfg._attn_implementation = "eager"
        cfg.output_attentions = True
    return cfg


def build_student(spec: StudentConfig, *, token_level: bool = False, num_labels: int | None = None,
                  want_attention: bool = False, label_names: list | None = None):
    if spec.entry_point is not None:
        model = call_entry_point(spec.entry_point, "student.entry_point")
        if not isinstance(model, nn.Module):
            raise CachebrewError(f"student.entry_point returned {type(model).__name__}, not a torch.nn.Module")
        return model
    import transformers

    cls_name = spec.model_class or ("AutoModelForTokenClassification" if token_level
                                    else "AutoModelForSequenceClassification")
    cls = getattr(transformers, cls_name, None)
    if cls is None:
        raise CachebrewError(f"student.model_class: transformers has no {cls_name}")
    cfg = _hf_config(spec, num_labels, want_attention)
    if label_names:
        cfg.id2label = dict(enumerate(label_names))
        cfg.label2id = {n: i for i, n in enumerate(label_names)}
    if spec.path is not None:
        kwargs = {"attn_implementation": "eager"} if want_attention else {}
        model, info = cls.from_pretrained(resolve_path(spec.path), config=cfg, output_loading_info=True, **kwargs)
        logger.info("student: %s", describe_loading(spec.path, info))
        return model
    return cls.from_config(cfg)


def describe_loading(source: str, info: dict) -> str:
    """One line for what transformers' load report tables: the layers a truncated model keeps, and the
    weights initialised fresh (the task head), e.g. "layers 0-1 of 6 kept from ...; initialised: classifier"."""
    dropped = {int(m.group(1)) for k in info.get("unexpected_keys", []) if (m := _LAYER.search(k))}
    line = f"layers 0-{min(dropped) - 1} of {max(dropped) + 1} kept from {source}" if dropped else f"from {source}"
    fresh = sorted({k.rsplit(".", 1)[0] for k in info.get("missing_keys", [])})
    return line + ("; initialised: " + ", ".join(fresh) if fresh else "")


_LAYER = re.compile(r"\.layers?\.(\d+)\.")


class MultiTaskStudent(nn.Module):
    """A shared encoder with one linear head per task; ``forward(..., task=name)`` picks the head."""

    def __init__(self, encoder: nn.Module, num_labels: dict[str, int], token_level: dict[str, bool]):
        super().__init__()
        self.encoder = encoder
        hidden = encoder.config.hidden_size
        self.heads = nn.ModuleDict({t: nn.Linear(hidden, n) for t, n in num_labels.items()})
        self.token_level = token_level
        self.dropout = nn.Dropout(getattr(encoder.config, "hidden_dropout_prob", 0.1))

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None, task=None, **kwargs):
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                           **kwargs)
        seq = out.last_hidden_state
        features = seq if self.token_level[task] else seq[:, 0]
        logits = self.heads[task](self.dropout(features))
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1),
                                               ignore_index=-100)
        return SimpleNamespace(logits=logits, loss=loss, hidden_states=out.hidden_states,
                               attentions=getattr(out, "attentions", None))

    def save_pretrained(self, directory, safe_serialization=True):
        """The encoder as a Hugging Face model, plus heads.safetensors and tasks.json (`load_multitask_student`)."""
        from safetensors.torch import save_model

        self.encoder.save_pretrained(str(directory), safe_serialization=safe_serialization)
        save_model(self.heads, str(Path(directory) / "heads.safetensors"))
        (Path(directory) / "tasks.json").write_text(json.dumps({t: {"num_labels": h.out_features,
                                                                    "token_level": self.token_level[t]}
                                                                for t, h in self.heads.items()}))


def build_multitask_student(spec: StudentConfig, num_labels: dict, token_level: dict, want_attention: bool):
    from transformers import AutoModel

    cfg = _hf_config(spec, None, want_attention)
    encoder = AutoModel.from_pretrained(resolve_path(spec.path), config=cfg) if spec.path else AutoModel.from_config(cfg)
    return MultiTaskStudent(encoder, num_labels, token_level)


def load_multitask_student(path) -> MultiTaskStudent:
    """Load what `cachebrew distill` saves for a multi-task run: the encoder, heads.safetensors, tasks.json."""
    from safetensors.torch import load_model
    from transformers import AutoModel

    path = Path(path)
    tasks = json.loads((path / "tasks.json").read_text())
    model = MultiTaskStudent(AutoModel.from_pretrained(str(path)), {t: v["num_labels"] for t, v in tasks.items()},
                             {t: v["token_level"] for t, v in tasks.items()})
    load_model(model.heads, str(path / "heads.safetensors"))
    return model
