"""Student-side tokenization: a cache's rows as a student with another tokenizer reads them.

A cache stores each row's text (the augmented text, for augmented copies; the words, for token-level rows) beside
the teacher's token ids and where each teacher token lies (cache/format.py OFFSETS, WORD_IDS). A student whose
tokenizer differs from the teacher's tokenizes that text itself, at distill time; the teacher's per-row outputs
(logits; pooled hidden states such as [CLS]) are reused as they are, and its per-token outputs are carried onto
the student's tokens by components/alignment.py: hidden states by character spans (the mean of the teacher tokens
a student token overlaps), token labels and their logits by words (first sub-tokens), a causal LM's next-token
distributions where both tokenizations end at the same character, through a vocabulary map. Whether the
student's tokenizer is the cache's is decided by content: the same fingerprint (`cache.fingerprint.hash_files`
over the tokenizer files, as the export computed it) reuses the cached ids, so an unchanged tokenizer is a no-op
and a changed one re-tokenizes.

What cannot cross tokenizers is refused before anything runs (`cross_tokenizer_problems`), one line each, with
what would work instead.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..cache.fingerprint import hash_files
from ..core.models import TOKENIZER_FILES
from ..core.paths import resolve_path
from .alignment import token_texts
from .data import token_spans
from ..errors import CachebrewError

# intermediate-match losses that compare no positions pairwise: pkd and cls_mse read position 0 ([CLS] / <s>) of
# each side, so they hold whatever each side's tokenizer made of the text (users may add theirs)
POSITION_FREE_LOSSES = {"pkd", "cls_mse"}


def tokenizer_fingerprint(path: str | Path) -> str:
    """The fingerprint an export records for a tokenizer directory (`manifest.fingerprint_inputs['tokenizer']`)."""
    files = [Path(path) / f for f in TOKENIZER_FILES if (Path(path) / f).is_file()]
    if not files:
        raise CachebrewError(f"student.tokenizer: {path} holds no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...)")
    return hash_files(files)


@dataclass
class StudentTokenizer:
    """The student's tokenizer, loaded from a directory, and how long its inputs may be."""

    path: str
    tokenizer: object
    fingerprint: str
    max_length: int | None = None

    @classmethod
    def load(cls, path: str, max_length: int | None = None) -> StudentTokenizer:
        from transformers import AutoTokenizer

        local = resolve_path(path)
        fingerprint = tokenizer_fingerprint(local)
        try:
            tok = AutoTokenizer.from_pretrained(local)
        except Exception as e:  # noqa: BLE001 - transformers raises many kinds; the user needs the path and why
            raise CachebrewError(f"student.tokenizer: cannot load a tokenizer from {path}: {e}") from None
        tok.padding_side = "right"  # the alignment reads each row's first n positions (Llama's tokenizers pad left)
        if tok.pad_token is None:  # GPT-2 and Llama have none: pad with the end of text, masked out all the same
            if tok.eos_token is None:
                raise CachebrewError(f"student.tokenizer: {path} has neither a pad token nor an end-of-text token "
                                     "to pad batches with; set pad_token in its tokenizer_config.json")
            tok.pad_token = tok.eos_token
        return cls(str(path), tok, fingerprint, max_length)

    @property
    def gives_spans(self) -> bool:
        """Whether it says where its tokens lie (Hugging Face fast tokenizers), which aligning per token needs."""
        return bool(getattr(self.tokenizer, "is_fast", False))

    def encode(self, texts: list[str], pairs: list[str] | None = None,
               spans: bool = False) -> tuple[dict[str, torch.Tensor], list | None]:
        """input_ids, attention_mask (and token_type_ids where the tokenizer makes them), padded to the longest;
        with ``spans``, also each row's token spans [(start, end)] in the coordinates of cache/format.py's
        OFFSETS (else None)."""
        enc = self.tokenizer(texts, pairs, truncation=self.max_length is not None, max_length=self.max_length,
                             padding=True, return_tensors="pt", return_offsets_mapping=spans)
        out = {k: enc[k].long() for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}
        if not spans:
            return out, None
        rows = []
        for j, text in enumerate(texts):
            n = int(out["attention_mask"][j].sum()) if "attention_mask" in out else out["input_ids"].shape[1]
            rows.append(token_spans(enc["offset_mapping"][j][:n].tolist(), enc.sequence_ids(j)[:n], len(text)))
        return out, rows

    def encode_words(self, words: list[list[str]]) -> tuple[dict[str, torch.Tensor], list[list[int | None]]]:
        """Pre-split words (token-level rows) as the student's padded tokens, and each row's word ids."""
        enc = self.tokenizer(words, is_split_into_words=True, truncation=self.max_length is not None,
                             max_length=self.max_length, padding=True, return_tensors="pt")
        out = {k: enc[k].long() for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}
        return out, [enc.word_ids(j) for j in range(len(words))]

    def token_strings(self) -> list[str]:
        """Each token id's text, decoded alone (as an export records a causal LM teacher's, `Manifest.vocabulary`)."""
        return token_texts(self.tokenizer)


def cross_tokenizer_problems(where: str, cache: dict, matches, gives_spans: bool) -> list[str]:
    """Why a cache cannot train a student with another tokenizer, one line each (empty: it can).

    ``cache``: what the cache holds, {"token_level", "causal_lm", "offsets", "word_ids", "vocabulary",
    "sparse_logits", "teachers"} (`CacheBatches.alignment_inputs`); ``gives_spans``: whether the student's tokenizer
    reports where its tokens lie."""
    problems = []
    reexport = ("export it again into a new output directory with outputs.token_spans on and a fast tokenizer "
                "(caches written before cachebrew recorded token spans have none)")
    fast = "the student's tokenizer gives no token spans (use a Hugging Face fast tokenizer, tokenizer.json)"
    if cache["token_level"]:
        if not cache["word_ids"]:
            problems.append(f"{where}: the cache's token labels sit on the teacher's tokens and it has no word ids "
                            f"to carry them onto the student's; {reexport}")
        elif not gives_spans:
            problems.append(f"{where}: the student's tokenizer gives no word ids (use a Hugging Face fast "
                            "tokenizer, tokenizer.json)")
    elif cache["causal_lm"]:
        if not (cache["offsets"] and cache["vocabulary"] is not None):
            problems.append(f"{where}: the cache's next-token distributions sit on the teacher's tokens and it has "
                            f"no token spans or vocabulary to carry them onto the student's; {reexport}, and, for "
                            "packed rows, a teacher tokenizer whose tokens decode one by one into the text (the "
                            "export's log says when they do not)")
        elif not cache["sparse_logits"]:
            problems.append(f"{where}: a causal LM's distributions cross tokenizers from sparse logits only (export "
                            "with outputs.sparse_logits: top-k or sampled)")
        elif not gives_spans:
            problems.append(f"{where}: {fast}")
        elif cache["teachers"] > 1:
            problems.append(f"{where}: next-token distributions of {cache['teachers']} teachers cross tokenizers one "
                            "teacher at a time (their ids would meet on the student's vocabulary twice); distil from "
                            "one teacher's cache, or select one with the caches' teacher filter")
    for i, im in enumerate(matches):
        if im.loss in POSITION_FREE_LOSSES:
            continue
        if im.feature != "hidden":
            problems.append(
                f"distill.intermediate_matches[{i}]: feature {im.feature!r} pairs the teacher's and the student's "
                f"positions two by two, which do not map across tokenizers; match hidden states (aligned by "
                f"character spans) or [CLS] ({', '.join(sorted(POSITION_FREE_LOSSES))}), or use a student with the "
                "teacher's tokenizer")
        elif cache["token_level"]:
            continue  # aligned by words (first sub-tokens), as the labels are; the word-id problem is reported above
        elif not cache["offsets"]:
            problems.append(
                f"distill.intermediate_matches[{i}]: loss {im.loss!r} pairs the teacher's and the student's positions "
                f"one by one, and the cache has no token spans to align them by; {reexport}, or use a loss that "
                f"reads [CLS] ({', '.join(sorted(POSITION_FREE_LOSSES))})")
        elif not gives_spans:
            problems.append(f"distill.intermediate_matches[{i}]: {fast}")
    return list(dict.fromkeys(problems))
