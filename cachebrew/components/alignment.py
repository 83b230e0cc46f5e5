"""Where a student's tokens meet the teacher's when the two tokenize the same text differently.

A cache stores, per teacher token, its character span in the row's text (``offsets``; for token-level rows the
word it belongs to, ``word_ids``). A student with another tokenizer gets the same from its own tokenizer, and
three alignments follow from the two, each a pure function of (teacher spans, student spans):

- `span_alignment` (intermediate matches): student position j takes the **mean of the teacher tokens whose
  characters overlap its own**; special tokens (empty spans) meet the teacher's specials in the same place
  (before the text, between the texts of a pair, after it). A student token the teacher never saw (the
  teacher's row was truncated earlier) aligns to nothing and is left out of the loss.
- `first_subtoken_alignment` (token-level rows, NER): the first sub-token of each word takes the teacher's first
  sub-token of that word, as labels are placed on first sub-tokens, and a leading special token the teacher's;
  every other position takes nothing.
- `end_alignment` (causal LMs): student position j meets teacher position i where **both tokenizations end at
  the same character**, so both have read exactly the same text and predict what follows it. Of several tokens
  ending at one character (a multi-byte character split into byte tokens), the last.

Spans are ``(start, end)`` character offsets as Hugging Face fast tokenizers return them
(``return_offsets_mapping``), ``start == end`` for special tokens. Alignments are computed per row on the host
(the loader's collate, in DataLoader workers), so a training step only multiplies or gathers.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np
import torch

Span = tuple[int, int]


def _special_keys(spans: Sequence[Span]) -> list:
    """For each token: None if it covers text, else where its special sits: 'lead', 'trail' or ('mid', char)."""
    real = [e > s for s, e in spans]
    first = next((i for i, r in enumerate(real) if r), None)
    last = max((i for i, r in enumerate(real) if r), default=None)
    keys, prev_end = [], None
    for i, (s, e) in enumerate(spans):
        if real[i]:
            keys.append(None)
            prev_end = e
        elif first is None or i < first:
            keys.append("lead")
        elif i > last:
            keys.append("trail")
        else:
            keys.append(("mid", prev_end))
    return keys


def span_alignment(teacher: Sequence[Span], student: Sequence[Span]) -> np.ndarray:
    """(len(student), len(teacher)) weights: row j averages the teacher tokens aligned with student token j.

    A row of zeros: the student token meets no teacher token."""
    t = np.asarray(teacher, np.int64).reshape(-1, 2)
    s = np.asarray(student, np.int64).reshape(-1, 2)
    t_real, s_real = t[:, 1] > t[:, 0], s[:, 1] > s[:, 0]
    hit = (s_real[:, None] & t_real[None, :]
           & (np.maximum(s[:, None, 0], t[None, :, 0]) < np.minimum(s[:, None, 1], t[None, :, 1])))
    specials = defaultdict(list)
    for i, key in enumerate(_special_keys(teacher)):
        if key is not None:
            specials[key].append(i)
    for j, key in enumerate(_special_keys(student)):
        if key is not None:
            hit[j, specials.get(key, [])] = True
    counts = hit.sum(axis=1, keepdims=True)
    return (hit / np.maximum(counts, 1)).astype(np.float32)


def first_subtoken_alignment(teacher_word_ids: Sequence[int | None], student_word_ids: Sequence[int | None]) -> np.ndarray:
    """For each student position: the teacher position whose targets it takes (the first sub-token of the same
    word, at the word's first student sub-token; a leading special token, the teacher's), else -1."""
    first_of_word: dict[int, int] = {}
    prev = None
    for i, w in enumerate(teacher_word_ids):
        if w is not None and w >= 0 and w != prev and w not in first_of_word:
            first_of_word[w] = i
        prev = w
    out = np.full(len(student_word_ids), -1, np.int64)
    is_special = lambda w: w is None or w < 0
    if student_word_ids and teacher_word_ids and is_special(student_word_ids[0]) and is_special(teacher_word_ids[0]):
        out[0] = 0  # [CLS] with [CLS] (its label is -100 on both sides; its hidden state is what cls_mse reads)
    prev = None
    for j, w in enumerate(student_word_ids):
        if w is not None and w >= 0 and w != prev:
            out[j] = first_of_word.get(w, -1)
        prev = w
    return out


def end_alignment(teacher: Sequence[Span], student: Sequence[Span]) -> np.ndarray:
    """For each student position: the teacher position that has read the same characters (same end; leading
    specials meet leading specials), else -1."""
    def last_by_end(spans):
        keys, out = _special_keys(spans), {}
        for i, (s, e) in enumerate(spans):
            if keys[i] is None:
                out[("end", e)] = i
            elif keys[i] == "lead":
                out["lead"] = i
        return out

    t_at = last_by_end(teacher)
    s_at = last_by_end(student)
    out = np.full(len(student), -1, np.int64)
    for key, j in s_at.items():
        out[j] = t_at.get(key, -1)
    return out


def padded_weights(rows: list[np.ndarray], student_len: int, teacher_len: int) -> torch.Tensor:
    """Per-row `span_alignment` weights as one (batch, student_len, teacher_len) tensor (zeros where padded)."""
    out = torch.zeros(len(rows), student_len, teacher_len)
    for b, w in enumerate(rows):
        out[b, :w.shape[0], :w.shape[1]] = torch.from_numpy(w)
    return out


def padded_index(rows: list[np.ndarray], student_len: int) -> torch.Tensor:
    """Per-row teacher positions (-1: none) as one (batch, student_len) int64 tensor, -1 where padded."""
    out = torch.full((len(rows), student_len), -1, dtype=torch.int64)
    for b, idx in enumerate(rows):
        out[b, :len(idx)] = torch.from_numpy(idx)
    return out


def gather_positions(values: torch.Tensor, index: torch.Tensor, fill=0) -> torch.Tensor:
    """values (batch, teacher_len, *rest) at the teacher positions ``index`` (batch, student_len); ``fill`` where
    the index is -1."""
    keep = index >= 0
    safe = index.clamp(min=0)
    picked = values[torch.arange(values.size(0), device=values.device).unsqueeze(1), safe]
    shape = keep.shape + (1,) * (picked.dim() - 2)
    return torch.where(keep.view(shape), picked, torch.as_tensor(fill, dtype=picked.dtype, device=picked.device))


def token_texts(tokenizer) -> list[str]:
    """Each token id's text, decoded alone, for ids 0 .. the largest id (a vocabulary file with a repeated line
    has fewer tokens than ids): what `vocabulary_map` compares. Decoded without the clean-up that joins " ." to
    "."; a SentencePiece word-start piece ("▁the", whose decoder drops the space when it stands alone) keeps its
    leading space, so it stays apart from the same letters inside a word."""
    size = max(max(tokenizer.get_vocab().values()) + 1, len(tokenizer))
    texts = tokenizer.batch_decode([[i] for i in range(size)], clean_up_tokenization_spaces=False)
    pieces = tokenizer.convert_ids_to_tokens(list(range(size)))
    return [" " + t if (piece or "").startswith("\u2581") and not t.startswith(" ") else t
            for t, piece in zip(texts, pieces)]


def vocabulary_map(teacher_strings: Sequence[str], student_strings: Sequence[str]) -> np.ndarray:
    """For each teacher token id: the student token id with the same text (exact match of the decoded strings),
    else -1. A string that decodes to a replacement character (a byte token of a multi-byte character) or to
    nothing matches nothing; of several ids with one string, on either side, the first."""
    student_id: dict[str, int] = {}
    for i, s in enumerate(student_strings):
        if s and "\ufffd" not in s:
            student_id.setdefault(s, i)
    out = np.full(len(teacher_strings), -1, np.int64)
    seen: set[str] = set()
    for i, s in enumerate(teacher_strings):  # one teacher id per student id, so a matched probability counts once
        if s in student_id and s not in seen:
            out[i] = student_id[s]
            seen.add(s)
    return out
