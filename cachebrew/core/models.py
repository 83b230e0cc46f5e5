"""Model helpers every job shares: user entry points, tokenizer files, and the Hugging Face adaptor.

Teachers (export), students (distill, train) and the Trainer front end are Hugging Face models or
`module:function` entry points; they all read outputs through `hf_adaptor`.
"""
from __future__ import annotations

import contextlib
import importlib
import sys

from ..errors import CachebrewError

TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "merges.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model", "added_tokens.json")


@contextlib.contextmanager
def without_training_outputs(model):
    """A Hugging Face model's config with `output_hidden_states` / `output_attentions` off, restored after.

    Distillation builds students that return every layer's hidden states and attention maps; evaluation reads
    logits only, and a saved model's users should not pay for those outputs on each forward pass."""
    config = getattr(model, "config", None)
    flags = {k: getattr(config, k) for k in ("output_hidden_states", "output_attentions") if hasattr(config, k)}
    try:
        for k in flags:
            setattr(config, k, False)
        yield model
    finally:
        for k, v in flags.items():
            setattr(config, k, v)


def call_entry_point(spec: str, where: str):
    """Call the user's `module:function` (no arguments); `where` names the config field in errors."""
    module_name, func_name = spec.split(":", 1)
    if "" not in sys.path and "." not in sys.path:
        sys.path.insert(0, "")  # `module:function` resolves against the working directory, like `python -m`
    try:
        func = getattr(importlib.import_module(module_name), func_name)
    except (ImportError, AttributeError) as e:
        raise CachebrewError(f"{where}: cannot import {spec!r}: {e}") from None
    return func()


def hf_adaptor(batch, outputs):
    """Student adaptor for Hugging Face-style outputs: everything the distillation config may ask for."""
    get = (lambda k: outputs.get(k)) if isinstance(outputs, dict) else (lambda k: getattr(outputs, k, None))
    out = {"logits": get("logits")}
    if get("hidden_states") is not None:
        out["hidden"] = get("hidden_states")
    if get("attentions") is not None:
        out["attention"] = get("attentions")
    if "attention_mask" in batch:
        out["inputs_mask"] = batch["attention_mask"]
    if get("loss") is not None:
        out["losses"] = get("loss")
    if "labels" in batch:
        out["labels"] = batch["labels"]
        if out["logits"] is not None and out["logits"].dim() == 3 and "attention_mask" in batch:
            out["logits_mask"] = batch["attention_mask"]
    return out
