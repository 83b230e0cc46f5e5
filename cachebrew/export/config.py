"""ExportConfig: which teachers, which data, which outputs in which precision, and where to write.

Loaded from YAML/JSON with ``--set key.sub=value`` overrides; every problem is reported at once.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields

from ..cache.format import STORAGE_DTYPES
from ..core.config_files import apply_overrides, config_to_dict, is_int, read_config_file
from ..data_utils import AUGMENTATIONS
from ..errors import ConfigError

MODEL_CLASSES = ("AutoModelForSequenceClassification", "AutoModelForTokenClassification", "AutoModel",
                 "AutoModelForMaskedLM")


@dataclass
class TeacherConfig:
    name: str
    path: str | None = None            # Hugging Face model directory
    entry_point: str | None = None     # "module:function" returning a model (or (model, tokenizer))
    model_class: str = "AutoModelForSequenceClassification"


@dataclass
class DataConfig:
    path: str = ""
    format: str | None = None          # csv / json / parquet / arrow / saved (load_from_disk); None: from extension
    split: str = "train"
    text: str | None = "text"          # column with the text (or None with `tokens`)
    text_pair: str | None = None
    tokens: str | None = None          # column with pre-split words (token-level tasks)
    label: str | None = "label"
    id: str | None = None              # column with a stable example id; None: the row index
    limit: int | None = None


@dataclass
class OutputsConfig:
    logits: bool = True
    topk_logits: int | None = None
    hidden_layers: list = field(default_factory=list)
    attention_layers: list = field(default_factory=list)
    attention_form: str = "probs"      # probs | logits (log-probabilities: pre-softmax scores up to a row constant)


@dataclass
class DtypesConfig:
    logits: str = "fp32"
    hidden: str = "fp16"
    attention: str = "fp16"


@dataclass
class AugmentConfig:
    copies: int = 0                    # augmented copies per example
    include_original: bool = True
    seed: int = 0
    mode: str = "sequence"             # sequence: apply every op in turn; choice: one op drawn per copy
    ops: list = field(default_factory=list)  # [{"name": "masking", "p": 0.1}, ...]


COMPRESSIONS = ("lz4", "zstd", "none")  # Arrow IPC body codecs (any pyarrow reads them) and no codec


@dataclass
class ExportConfig:
    output: str = ""
    task: str = "default"
    teachers: list = field(default_factory=list)
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: str | None = None       # path or module:function; default: the first teacher's path
    max_length: int = 128
    outputs: OutputsConfig = field(default_factory=OutputsConfig)
    dtypes: DtypesConfig = field(default_factory=DtypesConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    batch_size: int = 32
    shard_rows: int = 4096
    record_batch_rows: int = 256       # rows per Arrow record batch: fewer, larger batches decode faster in distill
    # Arrow IPC codec of the shards. lz4 decodes 4x faster per core than zstd on real hidden states, which
    # neither shrinks much (1.00x vs 1.08x); zstd keeps logits-only caches ~30 % smaller (BENCHMARKS.md: codecs)
    compression: str = "lz4"
    sort_window: int = 64              # batches per length-sorting window
    device: str | None = None
    amp: str | None = "auto"           # auto: bf16 on GPU, none on CPU; or none / bf16 / fp16
    overwrite: bool = False
    progress_bar: bool = True

    # -- loading ------------------------------------------------------------------------------------
    @classmethod
    def from_file(cls, path, overrides: list[str] | None = None) -> "ExportConfig":
        data = read_config_file(path)
        if not isinstance(data, dict):
            raise ConfigError("top level must be a mapping", str(path))
        apply_overrides(data, overrides or [])
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, d: dict, source: str | None = None) -> "ExportConfig":
        errors: list[str] = []
        cfg = _build(cls, d, "export", errors)
        if cfg is not None:
            errors += cfg.problems()
        if errors:
            raise ConfigError(errors, source)
        return cfg

    def to_dict(self) -> dict:
        return config_to_dict(self)

    # -- validation ---------------------------------------------------------------------------------
    def problems(self) -> list[str]:
        e = []
        if not self.output:
            e.append("output: required (the cache directory to write)")
        if not self.teachers:
            e.append("teachers: at least one teacher is required")
        names = [t.name for t in self.teachers]
        if len(set(names)) != len(names):
            e.append(f"teachers: names must be unique, got {names}")
        for i, t in enumerate(self.teachers):
            where = f"teachers[{i}]"
            if not t.name or not str(t.name).replace("_", "").replace("-", "").isalnum():
                e.append(f"{where}.name: use letters, digits, '-' and '_' (it names cache columns), got {t.name!r}")
            if (t.path is None) == (t.entry_point is None):
                e.append(f"{where}: give exactly one of path (a Hugging Face model directory) or entry_point (module:function)")
            if t.entry_point is not None and (":" not in t.entry_point or t.entry_point.count(":") != 1):
                e.append(f"{where}.entry_point: expected 'module:function', got {t.entry_point!r}")
            if t.model_class not in MODEL_CLASSES:
                e.append(f"{where}.model_class: one of {MODEL_CLASSES}, got {t.model_class!r}")
        if not self.data.path:
            e.append("data.path: required")
        if self.data.format not in (None, "csv", "json", "jsonl", "parquet", "arrow", "saved"):
            e.append(f"data.format: one of csv, json, jsonl, parquet, arrow, saved (or null), got {self.data.format!r}")
        if (self.data.text is None) == (self.data.tokens is None):
            e.append("data: give exactly one of data.text (a text column) or data.tokens (a column of word lists)")
        for name in ("max_length", "batch_size", "shard_rows", "sort_window", "record_batch_rows"):
            v = getattr(self, name)
            if not is_int(v) or v < 1:
                e.append(f"{name}: must be an integer >= 1, got {v!r}")
        if self.compression not in COMPRESSIONS:
            e.append(f"compression: one of {', '.join(COMPRESSIONS)}, got {self.compression!r}")
        o = self.outputs
        if not (o.logits or o.hidden_layers or o.attention_layers):
            e.append("outputs: nothing to export (logits false and no hidden/attention layers)")
        for key in ("hidden_layers", "attention_layers"):
            layers = getattr(o, key)
            if not isinstance(layers, list) or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0
                                                       for x in layers):
                e.append(f"outputs.{key}: must be a list of layer indices >= 0, got {layers!r}")
            elif len(set(layers)) != len(layers):
                e.append(f"outputs.{key}: duplicate layers in {layers}")
        if o.topk_logits is not None and (not isinstance(o.topk_logits, int) or o.topk_logits < 1):
            e.append(f"outputs.topk_logits: must be null or an integer >= 1, got {o.topk_logits!r}")
        if o.attention_form not in ("probs", "logits"):
            e.append(f"outputs.attention_form: 'probs' or 'logits', got {o.attention_form!r}")
        for kind in ("logits", "hidden", "attention"):
            v = getattr(self.dtypes, kind)
            allowed = STORAGE_DTYPES if kind == "hidden" else tuple(x for x in STORAGE_DTYPES if x != "int8")
            if v not in allowed:
                e.append(f"dtypes.{kind}: one of {allowed}, got {v!r}")
        a = self.augment
        if not is_int(a.copies) or a.copies < 0:
            e.append(f"augment.copies: must be an integer >= 0, got {a.copies!r}")
        elif a.copies == 0 and not a.include_original:
            e.append("augment: include_original is false and copies is 0, so nothing would be exported")
        elif a.copies > 0 and not a.ops:
            e.append("augment.ops: copies > 0 needs at least one operation")
        if a.mode not in ("sequence", "choice"):
            e.append(f"augment.mode: 'sequence' or 'choice', got {a.mode!r}")
        for i, op in enumerate(a.ops):
            if not isinstance(op, dict) or op.get("name") not in AUGMENTATIONS:
                e.append(f"augment.ops[{i}].name: one of {sorted(AUGMENTATIONS)}, got {op!r}")
        if self.amp not in ("auto", None, "none", "bf16", "fp16"):
            e.append(f"amp: one of auto, none, bf16, fp16, got {self.amp!r}")
        return e

    def fingerprint_settings(self) -> dict:
        """The settings that change what is written (not where, not how it is shown)."""
        d = self.to_dict()
        for key in ("output", "overwrite", "progress_bar", "device", "teachers", "tokenizer"):
            d.pop(key, None)
        d["data"].pop("path", None)  # the data is fingerprinted by content
        d["teacher_names"] = [t.name for t in self.teachers]
        return d


_NESTED = {"data": DataConfig, "outputs": OutputsConfig, "dtypes": DtypesConfig, "augment": AugmentConfig}


def _build(cls, d, where, errors):
    if d is None:
        d = {}
    if not isinstance(d, dict):
        errors.append(f"{where}: expected a mapping, got {type(d).__name__}")
        return None
    known = {f.name for f in fields(cls)}
    for k in d:
        if k not in known:
            errors.append(f"{where}.{k}: unknown field (valid: {', '.join(sorted(known))})" if where != "export"
                          else f"{k}: unknown field (valid: {', '.join(sorted(known))})")
    kwargs = {}
    for k, v in d.items():
        if k not in known:
            continue
        prefix = k if where == "export" else f"{where}.{k}"
        if cls is ExportConfig and k in _NESTED:
            v = _build(_NESTED[k], v, prefix, errors)
        elif cls is ExportConfig and k == "teachers":
            if not isinstance(v, list):
                errors.append(f"teachers: expected a list, got {type(v).__name__}")
                continue
            v = [_build(TeacherConfig, t, f"teachers[{i}]", errors) for i, t in enumerate(v)]
            if any(t is None for t in v):
                continue
        kwargs[k] = v
    if cls is TeacherConfig and "name" not in kwargs:
        errors.append(f"{where}.name: required")
        return None
    try:
        return cls(**kwargs)
    except TypeError as e:
        errors.append(f"{where}: {e}")
        return None


