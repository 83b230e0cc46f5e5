"""Entry-point teachers for export tests (named in configs as `slow_teacher:build`, etc.)."""
import os
import time

import torch


def build():
    """The teacher in $CB_TEACHER_DIR, slowed down so a test can kill the export mid-run."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(os.environ["CB_TEACHER_DIR"])
    return _slowed(model, float(os.environ.get("CB_TEACHER_DELAY", "0.05")))


def _slowed(model, delay: float):
    """Make every forward sleep `delay` seconds first."""
    original = model.forward

    def slow_forward(*args, **kwargs):
        time.sleep(delay)
        return original(*args, **kwargs)

    model.forward = slow_forward
    return model


class NoHidden(torch.nn.Module):
    """Returns logits only, whatever it is asked for."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(1, 2)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, **kwargs):
        return {"logits": self.lin(input_ids[:, :1].float())}


def no_hidden():
    return NoHidden()


def slow_student():
    """A small BERT student (dropout on, so resuming must restore RNG state) whose steps take a while."""
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=88, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                     max_position_embeddings=64, num_labels=2, output_hidden_states=True)
    return _slowed(BertForSequenceClassification(cfg), float(os.environ.get("CB_STUDENT_DELAY", "0")))
