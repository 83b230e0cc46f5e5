"""Evaluation metrics: accuracy for classification, entity-level F1 (conlleval chunking) for BIO tagging."""
from __future__ import annotations


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
