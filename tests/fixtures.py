"""Tiny but real inputs for export tests: a Hugging Face model directory (BERT + WordPiece tokenizer,
written with save_pretrained) and small csv/jsonl data sets."""
from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = ("good bad great awful film movie plot actor fun boring love hate the a is was very not really "
         "and but story scene music script ending long short funny sad best worst").split()


def write_vocab(path: Path):
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS + [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"]
    tokens += list("abcdefghijklmnopqrstuvwxyz")
    path.write_text("\n".join(tokens) + "\n")
    return len(tokens)


def tiny_student(**over) -> dict:
    """Config fields of the distill tests' tiny BERT student (the fixtures' vocabulary, dropout off), with `over`."""
    return {"model_type": "bert", "vocab_size": 88, "hidden_size": 16, "num_hidden_layers": 1,
            "num_attention_heads": 2, "intermediate_size": 32, "max_position_embeddings": 64,
            "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, **over}


def make_teacher_dir(path: Path, layers=2, hidden=32, heads=2, num_labels=2, seed=0, token_level=False) -> Path:
    import torch
    from transformers import (BertConfig, BertForSequenceClassification, BertForTokenClassification,
                              BertTokenizerFast)

    path.mkdir(parents=True, exist_ok=True)
    vocab_size = write_vocab(path / "vocab.txt")
    BertTokenizerFast(vocab=str(path / "vocab.txt")).save_pretrained(str(path))  # transformers 5: vocab=
    cfg = BertConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                     intermediate_size=hidden * 2, max_position_embeddings=64, num_labels=num_labels,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(seed)
    cls = BertForTokenClassification if token_level else BertForSequenceClassification
    cls(cfg).save_pretrained(str(path))
    return path


def make_text_data(path: Path, n=40, seed=0, fmt="jsonl") -> Path:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words = rng.choices(WORDS, k=rng.randint(3, 14))
        rows.append({"uid": f"ex{i:04d}", "sentence": " ".join(words), "label": int("good" in words or "great" in words)})
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        import csv

        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["uid", "sentence", "label"])
            w.writeheader()
            w.writerows(rows)
    return path


def make_ner_data(path: Path, n=20, seed=0) -> Path:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words = rng.choices(WORDS, k=rng.randint(3, 10))
        tags = ["B-POS" if w in ("good", "great", "best") else "O" for w in words]
        rows.append({"tokens": words, "tags": tags})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def export_config(tmp: Path, teacher_dir: Path, data_path: Path, **over) -> dict:
    cfg = {
        "output": str(tmp / "cache"),
        "task": "sentiment",
        "teachers": [{"name": "bert", "path": str(teacher_dir)}],
        "data": {"path": str(data_path), "text": "sentence", "label": "label", "id": "uid"},
        "max_length": 32,
        "outputs": {"logits": True, "hidden_layers": [0, 2], "attention_layers": [1]},
        "dtypes": {"logits": "fp32", "hidden": "fp32", "attention": "fp32"},
        "batch_size": 8,
        "shard_rows": 16,
        "progress_bar": False,
    }
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(cfg.get(k), dict):
            cfg[k] = {**cfg[k], **v}
        else:
            cfg[k] = v
    return cfg


def make_cache(root: Path, n=24, **over) -> Path:
    """A tiny real cache under root (teacher, data, cache): n rows in shards of 8, logits and hidden layer 1."""
    from cachebrew.recipes.export import ExportConfig, run_export

    cfg = export_config(root, make_teacher_dir(root / "teacher"), make_text_data(root / "data.jsonl", n=n),
                        shard_rows=8, outputs={"hidden_layers": [1], "attention_layers": []}, **over)
    run_export(ExportConfig.from_dict(cfg))
    return Path(cfg["output"])


def make_trainer_world(root: Path, dev_rows: int = 24) -> dict:
    """A teacher and its train (48 rows) and dev caches (logits + hidden layers 0-2): the Trainer front ends' tests."""
    from cachebrew.recipes.export import ExportConfig, run_export

    teacher = make_teacher_dir(root / "teacher")
    caches = {}
    for name, n, seed in (("train", 48, 1), ("dev", dev_rows, 2)):
        data = make_text_data(root / f"{name}.jsonl", n=n, seed=seed)
        run_export(ExportConfig.from_dict(export_config(root / name, teacher, data,
                                                        outputs={"hidden_layers": [0, 1, 2], "attention_layers": []})))
        caches[name] = str(root / name / "cache")
    return {"root": root, "teacher": teacher, "caches": caches}
