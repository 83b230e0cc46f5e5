"""ExportConfig: which teachers, which data, which outputs in which precision, and where to write.

Loaded from YAML/JSON with ``--set key.sub=value`` overrides; every problem is reported at once.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from ...cache.format import STORAGE_DTYPES
from ...cache.sparse import SPARSE_METHODS
from ...core.config import AMP_MODES, JobConfig, check_choice, check_int, is_int, is_number
from ...components.data import AugmentConfig, DataConfig
from ...augment import AUGMENTATIONS

MODEL_CLASSES = ("AutoModelForSequenceClassification", "AutoModelForTokenClassification", "AutoModel",
                 "AutoModelForMaskedLM", "AutoModelForCausalLM")
# a teacher's weight dtype as loaded (torch's names); auto: the dtype its config.json records
TEACHER_DTYPES = ("auto", "float32", "bfloat16", "float16")
# device_map strategies of Hugging Face accelerate; any other string must name one device ("cpu", "cuda:1")
DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


@dataclass
class TeacherConfig:
    name: str                          # names the teacher's cache columns
    path: str | None = None            # Hugging Face model directory
    entry_point: str | None = None     # "module:function" returning a model (or (model, tokenizer))
    model_class: str = "AutoModelForSequenceClassification"  # token-level data (data.tokens): ...ForTokenClassification
    # the weights' dtype: a bf16 copy of a big teacher needs half the memory (and changes the cache: fingerprinted);
    # None keeps what transformers loads by default
    dtype: str | None = None
    # Hugging Face device_map (path teachers): one process spreads the teacher over several GPUs; same numbers as
    # on one device, so not fingerprinted. A strategy (auto, balanced, ...), one device, or {module: device}
    device_map: str | int | dict | None = None


def device_map_problems(where: str, device_map) -> list[str]:
    """What is wrong with a teacher's device_map (a strategy, one device, or {module prefix: device}).

    Offloading to "disk" is refused here; offloading to "cpu" beside GPUs is refused when the teacher loads,
    since only then is it known (auto places what does not fit on the GPUs on the CPU).
    """
    def bad_device(value) -> str | None:
        if is_int(value):
            return None if value >= 0 else f"a GPU index must be >= 0, got {value!r}"
        if not isinstance(value, str):
            return f"a device must be a string or a GPU index, got {value!r}"
        if value == "disk":
            return ("'disk' offloads weights to files, which the export does not support (every weight is hashed "
                    "into the fingerprint); use GPUs, or dtype: bfloat16 to halve the teacher")
        try:
            torch.device(value)
        except (RuntimeError, ValueError):
            return f"not a device, got {value!r}"
        return None

    path = f"{where}.device_map"
    if isinstance(device_map, dict):
        if not device_map:
            return [f"{path}: an empty mapping places nothing; give {{module prefix: device}} ('' for the whole model)"]
        e = []
        for module, device in device_map.items():
            if not isinstance(module, str):
                e.append(f"{path}: module names must be strings, got {module!r}")
            elif (why := bad_device(device)) is not None:
                e.append(f"{path}[{module!r}]: {why}")
        return e
    if isinstance(device_map, str) and device_map in DEVICE_MAP_STRATEGIES:
        return []
    why = bad_device(device_map)
    if why is None:
        return []
    return [f"{path}: {why} (use a strategy: {', '.join(DEVICE_MAP_STRATEGIES)}; a device such as cpu or cuda:1; "
            "or {module prefix: device})"]


@dataclass
class SparseLogitsConfig:
    """Store K (token id, probability mass) slots per position instead of the dense logits (cache/sparse.py).

    method: 'sampled' (K draws from softmax(logits / temperature), unbiased) or 'topk' (the K most probable ids,
    exact masses; the tail's mass is known). The distill side must use the same temperature.
    """
    method: str = "sampled"
    k: int = 12
    temperature: float = 1.0
    seed: int = 0
    # sampled only: draw from softmax(logits / proposal_temperature) and store importance-weighted masses
    # (count / K * p / q: still unbiased); None draws from the target distribution itself
    proposal_temperature: float | None = None


@dataclass
class OutputsConfig:
    logits: bool = True
    topk_logits: int | None = None     # legacy: top-k values expanded back to dense logits on load (small heads)
    sparse_logits: SparseLogitsConfig | None = None
    hidden_layers: list = field(default_factory=list)
    attention_layers: list = field(default_factory=list)
    attention_form: str = "probs"      # probs | logits (log-probabilities: pre-softmax scores up to a row constant)
    # each token's character span (token-level rows: its word), what students with another tokenizer align by
    # (components/alignment.py); ~2 bytes per token compressed. Needs a fast tokenizer (else not written)
    token_spans: bool = True


@dataclass
class DtypesConfig:
    logits: str = "fp32"
    hidden: str = "fp16"
    attention: str = "fp16"


COMPRESSIONS = ("lz4", "zstd", "none")  # Arrow IPC body codecs (any pyarrow reads them) and no codec


@dataclass
class ExportConfig(JobConfig):
    KIND = "export"
    output: str = ""
    task: str = "default"
    teachers: list[TeacherConfig] = field(default_factory=list)
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: str | None = None       # path or module:function; default: the first teacher's path
    max_length: int = 128
    # causal-LM teachers: documents concatenated (EOS between them) and cut into rows of max_length tokens,
    # run_clm.py's group_texts; false: one row per document, truncated to max_length and padded
    packing: bool = False
    outputs: OutputsConfig = field(default_factory=OutputsConfig)
    dtypes: DtypesConfig = field(default_factory=DtypesConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    batch_size: int = 32
    shard_rows: int = 4096
    record_batch_rows: int = 256       # rows per Arrow record batch: fewer, larger batches decode faster in distill
    # Arrow IPC codec of the shards. lz4 decodes 4x faster per core than zstd on real hidden states, which
    # neither shrinks much (1.00x vs 1.08x); zstd keeps logits-only caches ~30 % smaller (BENCHMARKS.md: codecs)
    compression: str = "lz4"
    # shard writer threads, each encoding and writing whole shards (BENCHMARKS.md: export writers); null: min(4,
    # the CPUs this process may use). Shards are byte-identical whatever the number
    writers: int | None = None
    sort_window: int = 64              # batches per length-sorting window
    device: str | None = None
    amp: str | None = "auto"           # auto: bf16 on Ampere+ GPUs, fp16 on older, none on CPU; or none / bf16 / fp16
    overwrite: bool = False
    progress_bar: bool = True

    @classmethod
    def normalize(cls, data: dict) -> dict:
        d = data.get("data")
        if isinstance(d, dict) and d.get("messages") is not None and "text" not in d:
            d["text"] = None  # chat data: the default text column does not apply
        if isinstance(d, dict) and d.get("tokens") is not None:  # token-level rows: a teacher without a stated
            for t in data.get("teachers") or []:                # class tags them (as the student's default does)
                if isinstance(t, dict) and "model_class" not in t:
                    t["model_class"] = "AutoModelForTokenClassification"
        return data

    # -- validation ---------------------------------------------------------------------------------
    def problems(self) -> list[str]:
        """Every problem, section by section (each section's checks in its own function below)."""
        e = []
        if not self.output:
            e.append("output: required (the cache directory to write)")
        for name in ("max_length", "batch_size", "shard_rows", "sort_window", "record_batch_rows"):
            check_int(e, name, getattr(self, name), 1)
        check_int(e, "writers", self.writers, 1, optional=True)
        check_choice(e, "compression", self.compression, COMPRESSIONS)
        check_choice(e, "amp", self.amp, AMP_MODES)
        return (e + teachers_problems(self.teachers) + data_problems(self.data) + packing_problems(self)
                + outputs_problems(self.outputs) + dtypes_problems(self.dtypes)
                + augment_problems(self.augment, self.outputs))

    def writer_threads(self) -> int:
        """`writers`, or min(4, the CPUs this process may use): each thread takes a core while it compresses and
        hashes, and beyond 4 the disk, not the CPU, is what they wait on."""
        if self.writers is not None:
            return self.writers
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        return max(1, min(4, cpus))

    def fingerprint_settings(self) -> dict:
        """The settings that change what is written (not where, not how it is shown)."""
        d = self.to_dict()
        for key in ("output", "overwrite", "progress_bar", "device", "teachers", "tokenizer", "writers"):
            d.pop(key, None)
        d["data"].pop("path", None)  # the data is fingerprinted by content
        d["teacher_names"] = [t.name for t in self.teachers]
        # the weights' dtype changes the outputs; where they sit (device_map) does not. Counted only when some
        # teacher sets it, so caches exported before the field existed stay up to date
        if any(t.dtype is not None for t in self.teachers):
            d["teacher_dtypes"] = [t.dtype for t in self.teachers]
        # settings added later count only when set: caches exported before they existed stay up to date
        if not d.get("packing"):
            d.pop("packing", None)
        if d["outputs"].get("token_spans", True):
            d["outputs"].pop("token_spans", None)
        sparse = d["outputs"].get("sparse_logits")
        if sparse and sparse.get("proposal_temperature") is None:
            sparse.pop("proposal_temperature", None)
        return d


def teachers_problems(teachers: list[TeacherConfig]) -> list[str]:
    e = []
    if not teachers:
        e.append("teachers: at least one teacher is required")
    names = [t.name for t in teachers]
    if len(set(names)) != len(names):
        e.append(f"teachers: names must be unique, got {names}")
    for i, t in enumerate(teachers):
        where = f"teachers[{i}]"
        if not t.name or not str(t.name).replace("_", "").replace("-", "").isalnum():
            e.append(f"{where}.name: use letters, digits, '-' and '_' (it names cache columns), got {t.name!r}")
        if (t.path is None) == (t.entry_point is None):
            e.append(f"{where}: give exactly one of path (a Hugging Face model directory) or entry_point (module:function)")
        if t.entry_point is not None and (":" not in t.entry_point or t.entry_point.count(":") != 1):
            e.append(f"{where}.entry_point: expected 'module:function', got {t.entry_point!r}")
        if t.model_class not in MODEL_CLASSES:
            e.append(f"{where}.model_class: one of {MODEL_CLASSES}, got {t.model_class!r}")
        if t.dtype is not None:
            check_choice(e, f"{where}.dtype", t.dtype, TEACHER_DTYPES)
        if t.device_map is not None:
            if t.entry_point is not None:
                e.append(f"{where}.device_map: applies to a Hugging Face directory (path); an entry point "
                         "places its own model")
            else:
                e += device_map_problems(where, t.device_map)
    return e


def data_problems(data: DataConfig) -> list[str]:
    e = []
    if not data.path:
        e.append("data.path: required")
    if data.format not in (None, "csv", "json", "jsonl", "parquet", "arrow", "saved"):
        e.append(f"data.format: one of csv, json, jsonl, parquet, arrow, saved (or null), got {data.format!r}")
    given = [k for k in ("text", "tokens", "messages") if getattr(data, k) is not None]
    if len(given) != 1:
        e.append("data: give exactly one of data.text (a text column), data.tokens (a column of word lists) or "
                 f"data.messages (a column of chat conversations), got {given or 'none'}")
    check_int(e, "data.limit", data.limit, 1, optional=True)
    return e


def packing_problems(cfg: ExportConfig) -> list[str]:
    """`packing` concatenates causal-LM documents: no labels, no word lists or text pairs."""
    if not cfg.packing:
        return []
    e = [f"teachers[{i}].model_class: packing concatenates documents for causal-LM teachers; "
         f"{t.model_class!r} reads one example per row (set packing: false)"
         for i, t in enumerate(cfg.teachers) if t.model_class != "AutoModelForCausalLM"]
    if cfg.data.label is not None:
        e.append(f"data.label: a packed row holds parts of several documents and has no label; set "
                 f"data.label: null (got {cfg.data.label!r}) or packing: false")
    if cfg.data.tokens is not None or cfg.data.text_pair is not None:
        e.append("packing: concatenates plain text or chat documents; data.tokens and data.text_pair "
                 "have no meaning in a packed row")
    return e


def outputs_problems(o: OutputsConfig) -> list[str]:
    e = []
    if not (o.logits or o.hidden_layers or o.attention_layers):
        e.append("outputs: nothing to export (logits false and no hidden/attention layers)")
    for key in ("hidden_layers", "attention_layers"):
        layers = getattr(o, key)
        if not isinstance(layers, list) or not all(is_int(x) and x >= 0 for x in layers):
            e.append(f"outputs.{key}: must be a list of layer indices >= 0, got {layers!r}")
        elif len(set(layers)) != len(layers):
            e.append(f"outputs.{key}: duplicate layers in {layers}")
    check_int(e, "outputs.topk_logits", o.topk_logits, 1, optional=True)
    if o.sparse_logits is not None:
        e += sparse_logits_problems(o)
    if o.attention_form not in ("probs", "logits"):
        e.append(f"outputs.attention_form: 'probs' or 'logits', got {o.attention_form!r}")
    return e


def sparse_logits_problems(o: OutputsConfig) -> list[str]:
    e = []
    sp = o.sparse_logits
    check_choice(e, "outputs.sparse_logits.method", sp.method, SPARSE_METHODS)
    check_int(e, "outputs.sparse_logits.k", sp.k, 1)
    check_int(e, "outputs.sparse_logits.seed", sp.seed, 0)
    if not is_number(sp.temperature) or sp.temperature <= 0:
        e.append(f"outputs.sparse_logits.temperature: must be a number > 0, got {sp.temperature!r}")
    pt = sp.proposal_temperature
    if pt is not None and (not is_number(pt) or pt <= 0):
        e.append(f"outputs.sparse_logits.proposal_temperature: must be a number > 0 or null, got {pt!r}")
    elif pt is not None and sp.method != "sampled":
        e.append(f"outputs.sparse_logits.proposal_temperature: only 'sampled' draws from a proposal; method is "
                 f"{sp.method!r}")
    elif pt is not None and is_number(sp.temperature) and pt < sp.temperature:
        e.append(f"outputs.sparse_logits.proposal_temperature: {pt} is below the target's temperature "
                 f"{sp.temperature}; a proposal sharper than the target gives the tail ids it rarely draws "
                 "weights p / q that blow up the variance (use a flatter one, >= temperature)")
    if o.topk_logits is not None:
        e.append("outputs: topk_logits and sparse_logits both set; sparse_logits (method: topk) supersedes "
                 "topk_logits")
    if not o.logits:
        e.append("outputs.sparse_logits: set, but outputs.logits is false")
    return e


def dtypes_problems(dtypes: DtypesConfig) -> list[str]:
    e = []
    for kind in ("logits", "hidden", "attention"):
        v = getattr(dtypes, kind)
        allowed = STORAGE_DTYPES if kind == "hidden" else tuple(x for x in STORAGE_DTYPES if x != "int8")
        if v not in allowed:
            e.append(f"dtypes.{kind}: one of {allowed}, got {v!r}")
    return e


def augment_problems(a: AugmentConfig, outputs: OutputsConfig) -> list[str]:
    e = []
    if a.copies < 0:
        e.append(f"augment.copies: must be an integer >= 0, got {a.copies!r}")
    elif a.copies == 0 and not a.include_original:
        e.append("augment: include_original is false and copies is 0, so nothing would be exported")
    elif a.copies > 0 and not a.ops and getattr(outputs.sparse_logits, "method", None) != "sampled":
        e.append("augment.ops: copies > 0 needs at least one operation (only with sampled sparse logits is a "
                 "copy without operations useful: the same text with fresh draws)")
    if a.mode not in ("sequence", "choice"):
        e.append(f"augment.mode: 'sequence' or 'choice', got {a.mode!r}")
    for i, op in enumerate(a.ops):
        if not isinstance(op, dict) or op.get("name") not in AUGMENTATIONS:
            e.append(f"augment.ops[{i}].name: one of {sorted(AUGMENTATIONS)}, got {op!r}")
    return e
