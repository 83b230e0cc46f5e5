"""Evaluation metrics: accuracy for classification, entity-level F1 (conlleval chunking) for BIO tagging,
perplexity and next-token accuracy for causal language models."""
from __future__ import annotations

import math
from collections import Counter

import torch


def accuracy(pred: list[int], gold: list[int]) -> float:
    return sum(int(p == g) for p, g in zip(pred, gold)) / max(len(gold), 1)


def bio_entities(tags: list[str]) -> set[tuple[str, int, int]]:
    """(type, start, end) chunks; an I- tag that does not continue its type starts a new chunk (conlleval)."""
    chunks, start, kind = set(), None, None
    for i, tag in enumerate(list(tags) + ["O"]):
        prefix, _, label = tag.partition("-")
        continues = prefix == "I" and kind == label
        if start is not None and not continues:
            chunks.add((kind, start, i))
            start, kind = None, None
        if prefix in ("B", "I") and not continues:
            start, kind = i, label
    return chunks


def entity_f1(pred: list[list[str]], gold: list[list[str]]) -> dict:
    tp = n_pred = n_gold = 0
    for p, g in zip(pred, gold):
        ep, eg = bio_entities(p), bio_entities(g)
        tp += len(ep & eg)
        n_pred += len(ep)
        n_gold += len(eg)
    precision = tp / n_pred if n_pred else 0.0
    recall = tp / n_gold if n_gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def tag_names(id2label) -> dict:
    """{id: tag} from a label-name list (cache manifests) or an id2label mapping (model configs, keys int or str)."""
    if not id2label:
        return {}
    if isinstance(id2label, dict):
        return {int(k): v for k, v in id2label.items()}
    return dict(enumerate(id2label))


def score(preds: list, golds: list, id2label=None) -> dict:
    """The one scorer of every job: accuracy for sequence labels; for token labels (lists per example) entity
    F1 over the BIO tags named by `id2label` (an id it does not name reads as "O") plus token accuracy.

    `cachebrew distill` keeps `best/` by it and `cachebrew train` / `evaluate` report it, so a model is chosen
    and reported by the same numbers.
    """
    if preds and isinstance(preds[0], list):
        names = tag_names(id2label)
        tags = lambda seqs: [[names.get(i, "O") for i in s] for s in seqs]
        r = entity_f1(tags(preds), tags(golds))
        r["token_accuracy"] = accuracy([x for s in preds for x in s], [x for s in golds for x in s])
        return r
    counts = Counter(golds)
    # a model that predicts one class everywhere scores the majority rate: these two make that visible
    return {"accuracy": accuracy(preds, golds), "predicted_classes": len(set(preds)),
            "majority_rate": max(counts.values()) / len(golds) if golds else 0.0}


def main_metric(metrics: dict) -> str:
    """The number a job reports first: perplexity for a language model, entity F1 when there is one, accuracy
    otherwise."""
    if "perplexity" in metrics:
        return "perplexity"
    return "f1" if "f1" in metrics else "accuracy"


def selection_score(metrics: dict) -> float:
    """The number a job maximises when it keeps `best/`: the main metric, negated log-perplexity for a language
    model (lower perplexity is better; its log keeps several tasks' mean on one scale)."""
    if "perplexity" in metrics:
        return -metrics["nll"]
    return metrics[main_metric(metrics)]


def next_token_counts(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, int, int]:
    """(summed negative log-likelihood, correct top-1 predictions, tokens) of a causal LM's batch.

    Position t predicts token t + 1 (the shift Hugging Face causal LMs apply to ``labels`` inside); positions whose
    next label is -100 (padding) do not count. Summed, not averaged, so that batches of any padding combine exactly.
    """
    logits, target = logits[:, :-1].float(), labels[:, 1:].to(logits.device)
    keep = target != -100
    logp = torch.log_softmax(logits[keep], dim=-1)
    y = target[keep]
    nll = -logp.gather(-1, y[:, None]).sum().item()
    return nll, int((logp.argmax(-1) == y).sum().item()), int(y.numel())


def lm_score(nll: float, correct: int, tokens: int) -> dict:
    """Perplexity (exp of the mean token NLL), that mean, and next-token accuracy, from `next_token_counts` sums."""
    mean = nll / max(tokens, 1)
    return {"perplexity": math.exp(mean), "nll": mean, "accuracy": correct / max(tokens, 1), "tokens": tokens}


def predictions(logits, labels) -> tuple[list, list]:
    """(predicted ids, gold ids) of a batch; token level (3-d logits): lists over the labelled (!= -100) positions."""
    if logits.dim() == 3:
        keep = labels != -100
        arg = logits.argmax(-1)
        return ([arg[i][keep[i].to(arg.device)].tolist() for i in range(labels.size(0))],
                [labels[i][keep[i]].tolist() for i in range(labels.size(0))])
    return logits.argmax(-1).tolist(), labels.tolist()
