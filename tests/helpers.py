"""Shared builders: tiny BERTs from configs, deterministic batches, and one training script that runs
unchanged under `textbrewer` or `cachebrew` (the oracle and the implementation under test)."""
from __future__ import annotations

import copy
import importlib
import os
import subprocess
import sys
from pathlib import Path

import torch

VOCAB = 120


def tiny_bert(seed=0, layers=2, hidden=32, heads=2, num_labels=3, token_level=False):
    from transformers import BertConfig, BertForSequenceClassification, BertForTokenClassification

    cfg = BertConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                     intermediate_size=hidden * 2, max_position_embeddings=64, num_labels=num_labels,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, output_hidden_states=True,
                     output_attentions=True, attn_implementation="eager")
    torch.manual_seed(seed)
    cls = BertForTokenClassification if token_level else BertForSequenceClassification
    return cls(cfg).eval()


def make_examples(n=24, seed=1, max_len=12, num_labels=3, token_level=False):
    """Variable-length examples (so masks matter), padded to max_len."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (n, max_len), generator=g)
    lengths = torch.randint(4, max_len + 1, (n,), generator=g)
    mask = (torch.arange(max_len)[None, :] < lengths[:, None]).long()
    ids = ids * mask
    if token_level:
        labels = torch.randint(0, num_labels, (n, max_len), generator=g).masked_fill(mask == 0, -100)
    else:
        labels = torch.randint(0, num_labels, (n,), generator=g)
    return [{"input_ids": ids[i], "attention_mask": mask[i], "labels": labels[i]} for i in range(n)]


def loader(examples, batch_size=4):
    return torch.utils.data.DataLoader(examples, batch_size=batch_size, shuffle=False)


def full_adaptor(batch, outputs):
    return {"logits": outputs.logits, "hidden": outputs.hidden_states, "attention": outputs.attentions,
            "inputs_mask": batch["attention_mask"], "losses": outputs.loss, "labels": batch["labels"]}


def logits_adaptor(batch, outputs):
    return {"logits": outputs.logits, "losses": outputs.loss, "labels": batch["labels"]}


def run_distiller(lib, name, model_T, model_S, dataloader, distill_kwargs, out_dir, adaptor_T=full_adaptor,
                  adaptor_S=full_adaptor, train_kwargs=None, train_cfg=None, lr=1e-3):
    """The same script for both libraries: returns the student and the optimizer."""
    model_S = copy.deepcopy(model_S)
    torch.manual_seed(1234)  # projections are initialised from the global RNG in both libraries
    tc = dict(device="cpu", output_dir=str(out_dir), **(train_cfg or {}))
    if lib.__name__ == "cachebrew":
        tc.setdefault("progress_bar", False)
    distiller = getattr(lib, name)(
        train_config=lib.TrainingConfig(**tc),
        distill_config=lib.DistillationConfig(**copy.deepcopy(distill_kwargs)),
        model_T=model_T, model_S=model_S, adaptor_T=adaptor_T, adaptor_S=adaptor_S)
    optimizer = torch.optim.AdamW(model_S.parameters(), lr=lr)
    kwargs = dict(num_epochs=2)
    kwargs.update(train_kwargs or {})
    with distiller:
        distiller.train(optimizer, dataloader, **kwargs)
    return model_S, distiller


def assert_same_weights(a, b, atol=1e-6):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    worst = max((sa[k].float() - sb[k].float()).abs().max().item() for k in sa)
    assert worst <= atol, f"max weight difference {worst:.3g} > {atol}"
    return worst


def changed(before, after):
    sb, sa = before.state_dict(), after.state_dict()
    return max((sa[k].float() - sb[k].float()).abs().max().item() for k in sa)


ALLOW_NO_ORACLE = "CACHEBREW_ALLOW_NO_TEXTBREWER"


def import_oracle(name: str = "textbrewer"):
    """The TextBrewer oracle that parity tests compare against (installed by `pip install -e ".[test]"`).

    A missing oracle FAILS the asking test, with the install command, instead of skipping it: a CI run
    without TextBrewer must not pass with every parity check silently skipped. On a machine that lacks it
    on purpose, set CACHEBREW_ALLOW_NO_TEXTBREWER=1 to skip those tests instead (pytest.importorskip).
    Tests get it through the `textbrewer` fixture (conftest.py).
    """
    if os.environ.get(ALLOW_NO_ORACLE) == "1":
        import pytest

        return pytest.importorskip(name)
    try:
        return importlib.import_module(name)
    except ImportError as e:
        import pytest

        pytest.fail(f"the TextBrewer oracle cannot be imported ({e}); install it with `pip install -e \".[test]\"`, "
                    f"or set {ALLOW_NO_ORACLE}=1 to skip the parity tests on purpose", pytrace=False)


def run_cli(*args) -> subprocess.CompletedProcess:
    """`python -m cachebrew ARGS` from the tests directory (entry points such as slow_teacher:build resolve)."""
    return subprocess.run([sys.executable, "-m", "cachebrew", *map(str, args)], cwd=Path(__file__).resolve().parent,
                          capture_output=True, text=True)


def cache_rows(cache):
    """A cache's student inputs and labels as rows, in the cache's order (for online runs that must see the
    same examples in the same order as a run from the cache)."""
    from cachebrew.cache.reader import CacheReader

    return [{k: torch.as_tensor(r[k]).long() for k in ("input_ids", "attention_mask", "token_type_ids", "labels")}
            for r in CacheReader(cache).iter_rows()]


def pad_rows(rows):
    """data_collator for cache_rows: right-pad to the longest row, as the cache loader does."""
    import torch.nn.functional as F

    L = max(len(r["input_ids"]) for r in rows)
    out = {k: torch.stack([F.pad(r[k], (0, L - len(r[k]))) for r in rows])
           for k in ("input_ids", "attention_mask", "token_type_ids")}
    out["labels"] = torch.stack([r["labels"] for r in rows])
    return out


def max_weight_diff(a, b) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    return max((sa[k] - sb[k]).abs().max().item() for k in sa)
