"""`cachebrew train`: supervised fine-tuning with BasicTrainer — the teacher before export, or the
no-distillation baseline a distilled student is compared with.

output_dir/best/ holds the model with the best dev score (save_pretrained + tokenizer files), beside
tb/ (tensorboard) and train_results.json, the same layout as `cachebrew distill`.

The label vocabulary is stored in the saved model's config (id2label / label2id), which is what
`cachebrew export` uses to map string labels, so teacher, cache and student agree on label ids.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from .configurations import TrainingConfig
from .core.config_files import apply_overrides, config_to_dict, read_config_file
from .distill.config import StudentConfig
from .distill.metrics import accuracy, entity_f1
from .core.training import make_optimizer, resolve_amp, save_student, seed_everything, warmup_linear
from .distill.student import build_student
from .distillers import BasicTrainer
from .errors import ConfigError
from .paths import resolve_path
from .export.config import AugmentConfig, DataConfig
from .export.data import build_rows, label_vocabulary, load_table, tokenize_rows

logger = logging.getLogger("cachebrew")


@dataclass
class FinetuneTrain:
    epochs: int = 3
    batch_size: int = 32
    lr: float = 5e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    amp: str | None = "auto"
    device: str | None = None
    progress_bar: bool = True


@dataclass
class FinetuneConfig:
    output_dir: str = ""
    model: StudentConfig = field(default_factory=StudentConfig)
    tokenizer: str | None = None     # default: model.path
    data: DataConfig = field(default_factory=DataConfig)
    eval_path: str | None = None     # same columns as data
    max_length: int = 128
    seed: int = 42
    train: FinetuneTrain = field(default_factory=FinetuneTrain)

    @classmethod
    def from_file(cls, path, overrides=None):
        d = read_config_file(path)
        apply_overrides(d, overrides or [])
        errors = []
        known = {f.name for f in fields(cls)}
        errors += [f"{k}: unknown field" for k in d if k not in known]
        kw = {k: v for k, v in d.items() if k in known}
        for key, sub in (("model", StudentConfig), ("data", DataConfig), ("train", FinetuneTrain)):
            value = kw.get(key) or {}
            sub_known = {f.name for f in fields(sub)}
            errors += [f"{key}.{k}: unknown field (valid: {', '.join(sorted(sub_known))})" for k in value
                       if k not in sub_known]
            kw[key] = sub(**{k: v for k, v in value.items() if k in sub_known})
        cfg = cls(**kw)
        if not cfg.output_dir:
            errors.append("output_dir: required")
        if (cfg.model.path is None) == (cfg.model.config is None):
            errors.append("model: give path (pretrained directory) or config")
        if not cfg.data.path:
            errors.append("data.path: required")
        if errors:
            raise ConfigError(errors, str(path))
        return cfg


def _encode(data: DataConfig, tokenizer, max_length, label_map):
    ds = load_table(data)
    rows = build_rows(ds, data, AugmentConfig(), tokenizer.mask_token or "[MASK]")
    return tokenize_rows(rows, tokenizer, max_length, label_map, data.tokens is not None), ds


def pad_batch(examples: list[dict], pad_id: int = 0) -> dict:
    n = max(len(e["input_ids"]) for e in examples)
    batch = {}
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        if key in examples[0]:
            pad = pad_id if key == "input_ids" else 0
            batch[key] = torch.tensor([e[key] + [pad] * (n - len(e[key])) for e in examples])
    if "labels" in examples[0]:
        if isinstance(examples[0]["labels"], list):
            batch["labels"] = torch.tensor([e["labels"] + [-100] * (n - len(e["labels"])) for e in examples])
        else:
            batch["labels"] = torch.tensor([e["labels"] for e in examples])
    return batch


@torch.no_grad()
def predict(model, examples: list[dict], device, batch_size=64):
    """(predictions, gold) per example; token-level: lists over labelled (first sub-word) positions."""
    model.eval()
    preds, golds = [], []
    for i in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in pad_batch(examples[i:i + batch_size]).items()}
        labels = batch.pop("labels")
        logits = model(**batch).logits
        if logits.dim() == 3:
            keep = labels != -100
            for j in range(labels.size(0)):
                preds.append(logits[j].argmax(-1)[keep[j]].tolist())
                golds.append(labels[j][keep[j]].tolist())
        else:
            preds += logits.argmax(-1).tolist()
            golds += labels.tolist()
    return preds, golds


def score(preds, golds, id2label: dict | None) -> dict:
    if preds and isinstance(preds[0], list):
        names = id2label or {}
        tags = lambda seqs: [[names.get(i, names.get(str(i), "O")) for i in s] for s in seqs]
        r = entity_f1(tags(preds), tags(golds))
        r["token_accuracy"] = accuracy([x for s in preds for x in s], [x for s in golds for x in s])
        return r
    return {"accuracy": accuracy(preds, golds)}


def run_finetune(cfg: FinetuneConfig) -> dict:
    from transformers import AutoTokenizer

    seed_everything(cfg.seed)
    tok_path = resolve_path(cfg.tokenizer or cfg.model.path)
    tokenizer = AutoTokenizer.from_pretrained(tok_path)
    eval_data = DataConfig(**{**config_to_dict(cfg.data), "path": cfg.eval_path, "limit": None}) if cfg.eval_path else None
    label_col = []
    if cfg.data.label:  # the vocabulary covers the eval labels too: a small train split may miss a class
        for d in [cfg.data] + ([eval_data] if eval_data else []):
            label_col += list(load_table(d)[d.label])
    label_names, label_map = label_vocabulary(label_col, None)
    train, _ = _encode(cfg.data, tokenizer, cfg.max_length, label_map)
    dev = _encode(eval_data, tokenizer, cfg.max_length, label_map)[0] if eval_data else None
    num_labels = len(label_names) if label_names else int(max(max(t["labels"]) if isinstance(t["labels"], list)
                                                              else t["labels"] for t in train)) + 1
    model = build_student(cfg.model, cfg.data.tokens is not None, num_labels, False, label_names)
    tc = cfg.train
    device = torch.device(tc.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(device)
    loader = torch.utils.data.DataLoader(train, batch_size=tc.batch_size, shuffle=True, collate_fn=pad_batch,
                                         generator=torch.Generator().manual_seed(cfg.seed))
    total = len(loader) * tc.epochs
    out = Path(cfg.output_dir)
    trainer = BasicTrainer(TrainingConfig(output_dir=str(out / "snapshots"), device=str(device),
                                          amp=resolve_amp(tc.amp, device), progress_bar=tc.progress_bar, keep_checkpoints=1,
                                          log_dir=str(out / "tb")), model, lambda b, o: {"losses": o.loss})
    history, best = [], None
    id2label = getattr(model.config, "id2label", None)

    def evaluate(model, step):
        nonlocal best
        if dev is None:
            return
        m = score(*predict(model, dev, device), id2label)
        history.append({"step": step, **m})
        key = "f1" if "f1" in m else "accuracy"
        logger.info("eval at step %d: %s", step, m)
        if best is None or m[key] > best[key]:
            best = {"step": step, **m}
            save_student(model, out / "best", tok_path)

    opt = make_optimizer(model, tc.lr, tc.weight_decay)
    with trainer:
        trainer.train(opt, loader, num_epochs=tc.epochs, scheduler_class=warmup_linear,
                      scheduler_args={"num_warmup_steps": int(tc.warmup_ratio * total), "num_training_steps": total},
                      max_grad_norm=tc.max_grad_norm, callback=evaluate)
    if dev is None:
        save_student(model, out / "best", tok_path)
    results = {"best": best, "history": history, "num_train": len(train), "labels": label_names, "seed": cfg.seed}
    (out / "train_results.json").write_text(json.dumps(results, indent=2))
    return results


def run_evaluate(model_dir: str, data: DataConfig, max_length: int, batch_size: int = 64, device: str | None = None,
                 task: str | None = None) -> dict:
    """Metric, size and CPU/GPU inference speed of a saved model (or one task of a multi-task student)."""
    import functools
    import time

    from transformers import AutoConfig, AutoTokenizer
    import transformers

    from .distill.student import load_multitask_student

    config = AutoConfig.from_pretrained(model_dir)
    if (Path(model_dir) / "tasks.json").is_file():
        if task is None:
            raise ConfigError(f"{model_dir} is a multi-task student: pass --task "
                              f"({', '.join(json.loads((Path(model_dir) / 'tasks.json').read_text()))})")
        model = load_multitask_student(model_dir)
        model.forward = functools.partial(model.forward, task=task)
        config.label2id, config.id2label = {}, None
    else:
        arch = (config.architectures or ["AutoModelForSequenceClassification"])[0]
        model = getattr(transformers, arch).from_pretrained(model_dir)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(dev).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    label2id = {k: int(v) for k, v in (config.label2id or {}).items()}
    ds = load_table(data)
    names, _ = label_vocabulary(ds[data.label], None) if data.label else (None, None)
    label_map = label2id if names and set(names) <= set(label2id) else (
        {n: i for i, n in enumerate(names)} if names else None)
    examples, _ = _encode(data, tokenizer, max_length, label_map)
    t = time.perf_counter()
    preds, golds = predict(model, examples, dev, batch_size)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t
    size = sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors"))
    return {"model": model_dir, "task": task, "data": data.path, **score(preds, golds, config.id2label),
            "parameters": sum(p.numel() for p in model.parameters()), "size_mb": size / 2**20,
            "inference_examples_per_second": len(examples) / seconds, "examples": len(examples),
            "device": dev.type, "threads": torch.get_num_threads()}
