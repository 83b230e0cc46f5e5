"""The student-side tokenizer's contract with the alignment: right padding and a pad token whatever the tokenizer
ships with, and what cannot cross tokenizers refused by name; the KD term's row cut for a student of another
tokenizer (the positions both masks keep)."""
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from cachebrew.components.retokenize import StudentTokenizer, cross_tokenizer_problems
from cachebrew.errors import CachebrewError
from cachebrew.objective import paired_logits


def _save(tmp_path, **special):
    tok = Tokenizer(models.WordLevel({"<unk>": 0, "</s>": 1, "a": 2, "b": 3}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", **special)
    fast.save_pretrained(str(tmp_path))
    return str(tmp_path)


def test_a_left_padding_tokenizer_without_a_pad_token_pads_right_with_its_end_of_text(tmp_path):
    path = _save(tmp_path, eos_token="</s>", padding_side="left")  # as Llama's and GPT-2's tokenizers ship
    student = StudentTokenizer.load(path)
    enc, spans = student.encode(["a b a", "b"], spans=True)
    assert enc["input_ids"].tolist() == [[2, 3, 2], [3, 1, 1]]  # right-padded with </s>
    assert enc["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert spans == [[(0, 1), (2, 3), (4, 5)], [(0, 1)]]


def test_a_tokenizer_with_nothing_to_pad_with_is_refused_by_path(tmp_path):
    path = _save(tmp_path)
    with pytest.raises(CachebrewError, match=f"student.tokenizer: {path} has neither a pad token"):
        StudentTokenizer.load(path)


def _cache(**kw):
    return {"token_level": False, "causal_lm": False, "offsets": True, "word_ids": False, "vocabulary": None,
            "sparse_logits": False, "teachers": 1, **kw}


def test_what_cannot_cross_is_named():
    assert cross_tokenizer_problems("caches[0]", _cache(), [], gives_spans=False) == []  # sentence logits: fine
    slow_words = cross_tokenizer_problems("caches[0]", _cache(token_level=True, word_ids=True), [], gives_spans=False)
    assert len(slow_words) == 1 and "gives no word ids" in slow_words[0] and slow_words[0].startswith("caches[0]:")
    two = cross_tokenizer_problems("caches[0]", _cache(causal_lm=True, vocabulary=["a"], sparse_logits=True,
                                                       teachers=2), [], gives_spans=True)
    assert len(two) == 1 and "2 teachers" in two[0]
    one = cross_tokenizer_problems("caches[0]", _cache(causal_lm=True, vocabulary=["a"], sparse_logits=True),
                                   [], gives_spans=True)
    assert one == []


def test_rows_cut_to_the_positions_both_masks_keep():
    """When the KD term needs rows (no mask weighting), a student of another tokenizer's logits and the teacher's
    carried ones are cut to the same positions: the student's real tokens that meet a teacher token."""
    logits_S, logits_T = torch.arange(8.0).view(1, 4, 2), -torch.arange(8.0).view(1, 4, 2)
    m_S, m_T = torch.tensor([[1, 1, 1, 0]]), torch.tensor([[1, 0, 1, 0]])  # position 1: no teacher token ends there
    s, t, weights = paired_logits({"logits": [logits_S], "logits_mask": [m_S]},
                                  {"logits": [logits_T], "logits_mask": [m_T]}, can_weight=lambda _l: False)
    assert weights == [None]
    assert s[0].tolist() == [[0.0, 1.0], [4.0, 5.0]] and t[0].tolist() == [[-0.0, -1.0], [-4.0, -5.0]]
