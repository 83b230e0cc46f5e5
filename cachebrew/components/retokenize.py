"""Student-side tokenization: a cache's rows as a student with another tokenizer reads them.

A cache stores each row's text (the augmented text, for augmented copies) beside the teacher's token ids, so a
student whose tokenizer differs from the teacher's tokenizes that text itself, at distill time, while the
teacher's per-row outputs (logits; pooled hidden states such as [CLS]) are reused as they are. Whether the
student's tokenizer is the cache's is decided by content: the same fingerprint (`cache.fingerprint.hash_files`
over the tokenizer files, as the export computed it) reuses the cached ids, so an unchanged tokenizer is a no-op
and a changed one re-tokenizes.

What cannot cross tokenizers is refused before anything runs (`cross_tokenizer_problems`): per-token targets
(token classification, causal LMs) and intermediate matches that pair teacher and student positions one by one.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..cache.fingerprint import hash_files
from ..core.models import TOKENIZER_FILES
from ..core.paths import resolve_path
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
        return cls(str(path), tok, fingerprint, max_length)

    def encode(self, texts: list[str], pairs: list[str] | None = None) -> dict[str, torch.Tensor]:
        """input_ids, attention_mask (and token_type_ids where the tokenizer makes them), padded to the longest."""
        enc = self.tokenizer(texts, pairs, truncation=self.max_length is not None, max_length=self.max_length,
                             padding=True, return_tensors="pt")
        return {k: enc[k].long() for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}


def cross_tokenizer_problems(where: str, token_level: bool, causal_lm: bool, matches) -> list[str]:
    """Why a cache cannot train a student with another tokenizer, one line each (empty: it can)."""
    problems = []
    if token_level or causal_lm:
        kind = "token labels" if token_level else "a causal LM's next-token distributions"
        problems.append(f"{where}: the cache holds per-token targets ({kind}) on the teacher's tokens, which do not "
                        "map onto another tokenizer's; use a student with the teacher's tokenizer (drop "
                        "student.tokenizer)")
    for i, im in enumerate(matches):
        if im.loss not in POSITION_FREE_LOSSES:
            problems.append(
                f"distill.intermediate_matches[{i}]: loss {im.loss!r} pairs the teacher's and the student's positions "
                f"one by one, and the student tokenizes the text differently from the teacher; use a loss that "
                f"reads [CLS] ({', '.join(sorted(POSITION_FREE_LOSSES))}), drop the match, or use a student with "
                "the teacher's tokenizer")
    return problems
