"""Alignment of a student's tokens with a teacher's of another tokenizer (components/alignment.py), on hand-made
spans with known answers and on real tokenizers (whitespace, unicode, special tokens, pairs, truncation)."""
import numpy as np
import pytest
import torch

from cachebrew.components.alignment import (end_alignment, first_subtoken_alignment, gather_positions, span_alignment,
                                            token_texts, vocabulary_map)
from cachebrew.cache.format import decode_spans, encode_spans
from cachebrew.components.data import token_spans
from cachebrew.losses import cross_tokenizer_kd_loss


def rows(w):
    """Each student row's aligned teacher positions and weights, as {position: weight}."""
    return [{int(i): round(float(w[j, i]), 4) for i in np.flatnonzero(w[j])} for j in range(w.shape[0])]


def test_spans_are_stored_as_gaps_and_lengths():
    spans = [(0, 0), (0, 5), (6, 11), (0, 0), (12, 13), (12, 13), (0, 0)]  # two byte tokens of one character
    assert encode_spans(spans) == [0, 0, 0, 5, 1, 5, 0, 0, 1, 1, -1, 1, 0, 0]
    assert decode_spans(encode_spans(spans)) == [(0, 0), (0, 5), (6, 11), (11, 11), (12, 13), (12, 13), (13, 13)]


def test_spans_overlap_specials_meet_specials():
    text = "hello world"
    teacher = [(0, 0), (0, 5), (6, 11), (0, 0)]                 # [CLS] hello world [SEP]
    student = [(0, 0), (0, 3), (3, 5), (5, 11), (0, 0)]         # <s> hel lo " world" (byte-level: the space) </s>
    assert [text[s:e] for s, e in student[1:4]] == ["hel", "lo", " world"]
    assert rows(span_alignment(teacher, student)) == [{0: 1.0}, {1: 1.0}, {1: 1.0}, {2: 1.0}, {3: 1.0}]
    # the other way: one student token over two teacher tokens takes their mean
    assert rows(span_alignment(student, teacher)) == [{0: 1.0}, {1: 0.5, 2: 0.5}, {3: 1.0}, {4: 1.0}]


def test_a_pair_middle_specials_meet_the_middle_specials():
    # RoBERTa-style teacher "<s> a </s></s> b </s>" vs BERT-style student "[CLS] a [SEP] b [SEP]", text "a" / "b"
    teacher = [(0, 0), (0, 1), (0, 0), (0, 0), (2, 3), (0, 0)]
    student = [(0, 0), (0, 1), (0, 0), (2, 3), (0, 0)]
    assert rows(span_alignment(teacher, student)) == [{0: 1.0}, {1: 1.0}, {2: 0.5, 3: 0.5}, {4: 1.0}, {5: 1.0}]


def test_truncation_leaves_the_tokens_the_teacher_never_saw_unaligned():
    teacher = [(0, 0), (0, 5), (0, 0)]                          # truncated after "hello"
    student = [(0, 0), (0, 5), (6, 11), (0, 0)]
    w = span_alignment(teacher, student)
    assert rows(w) == [{0: 1.0}, {1: 1.0}, {}, {2: 1.0}]
    assert w.sum(axis=1).tolist() == [1.0, 1.0, 0.0, 1.0]


def test_words_first_subtokens_and_token_ends():
    # teacher: [CLS] New ##castle won [SEP]; student: <s> Newc astle w on </s> (words 0, 1)
    assert first_subtoken_alignment([-1, 0, 0, 1, -1], [None, 0, 0, 1, 1, None]).tolist() == [0, 1, -1, 3, -1, -1]
    # a word the teacher cut off takes nothing; a student without a leading special has no [CLS] to meet
    assert first_subtoken_alignment([-1, 0, -1], [None, 0, 1, None]).tolist() == [0, 1, -1, -1]
    assert first_subtoken_alignment([-1, 0, 1, -1], [0, 1]).tolist() == [1, 2]
    # "the cat": teacher "the"|" cat", student "t"|"he"|" c"|"at": the ends 3 and 7 are shared
    assert end_alignment([(0, 3), (3, 7)], [(0, 1), (1, 3), (3, 5), (5, 7)]).tolist() == [-1, 0, -1, 1]
    # one character in two byte tokens (same span): the last of them has read it
    assert end_alignment([(0, 0), (0, 1), (0, 1), (1, 2)], [(0, 0), (0, 1), (1, 2)]).tolist() == [0, 2, 3]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """A byte-level BPE (GPT-2 style) and a WordPiece (BERT style), trained on the same few lines."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    lines = ["The café served naïve crêpes.", "Hello  world, hello again!", "Emoji 🙂 and spaces   here."] * 20
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bpe.post_processor = processors.TemplateProcessing(single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>",
                                                       special_tokens=[("<s>", 0), ("</s>", 1)])
    wp = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    wp.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    wp.train_from_iterator(lines, trainers.WordPieceTrainer(vocab_size=120, special_tokens=["[UNK]", "[CLS]", "[SEP]"]))
    wp.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
                                                      special_tokens=[("[CLS]", 1), ("[SEP]", 2)])
    return (PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>"),
            PreTrainedTokenizerFast(tokenizer_object=wp, unk_token="[UNK]"))


def spans_of(tok, text, pair=None):
    enc = tok(text, pair, return_offsets_mapping=True)
    spans = token_spans(enc["offset_mapping"], enc.sequence_ids(), len(text))
    stored = decode_spans(encode_spans(spans))  # as a cache holds them: text spans exact, specials empty
    assert [sp for sp in stored if sp[1] > sp[0]] == [sp for sp in spans if sp[1] > sp[0]]
    return stored


@pytest.mark.parametrize("text", ["The café served naïve crêpes.", "Hello  world, hello again!",
                                  "Emoji 🙂 and spaces   here."])
def test_real_tokenizers_align_tokens_that_share_characters(tokenizers, text):
    bpe, wp = tokenizers
    t_spans, s_spans = spans_of(bpe, text), spans_of(wp, text)
    assert len(t_spans) != len(s_spans) or t_spans != s_spans  # they do tokenize differently
    w = span_alignment(t_spans, s_spans)
    for j, (s, e) in enumerate(s_spans):
        hit = np.flatnonzero(w[j])
        assert w[j].sum() == pytest.approx(1.0)  # every student token meets a teacher token (nothing truncated)
        if e > s:  # each aligned teacher token shares at least one character with the student token
            assert all(set(range(*t_spans[i])) & set(range(s, e)) for i in hit)
        else:
            assert all(t_spans[i][0] == t_spans[i][1] for i in hit)  # specials meet specials
    # token ends shared by both tokenizations: the same text read; the emoji's byte tokens end together
    idx = end_alignment(t_spans, s_spans)
    for j, i in enumerate(idx.tolist()):
        if i >= 0 and s_spans[j][1] > s_spans[j][0]:
            assert t_spans[i][1] == s_spans[j][1]


def test_real_tokenizers_on_a_pair(tokenizers):
    bpe, wp = tokenizers
    t_spans, s_spans = spans_of(bpe, "Hello world", "again"), spans_of(wp, "Hello world", "again")
    w = span_alignment(t_spans, s_spans)
    text = "Hello world again"  # the pair's coordinates: the second text from len(first) + 1
    middle = [j for j, (s, e) in enumerate(s_spans) if s == e][1]  # the student's [SEP] between the texts
    between = [t_spans[i] for i in np.flatnonzero(w[middle])]
    assert len(between) == 2 and all(s == e for s, e in between)  # the teacher's </s> </s>
    for j, (s, e) in enumerate(s_spans):
        if e > s:  # the student token's characters lie inside the teacher tokens it meets
            assert text[s:e] in "".join(text[t_spans[i][0]:t_spans[i][1]] for i in np.flatnonzero(w[j]))


def test_gather_and_vocabulary_map():
    values = torch.arange(12.0).view(1, 4, 3)
    out = gather_positions(values, torch.tensor([[2, -1, 0]]), fill=-1.0)
    assert out.tolist() == [[[6.0, 7.0, 8.0], [-1.0, -1.0, -1.0], [0.0, 1.0, 2.0]]]
    teacher = ["the", " cat", "\ufffd", "", "dog", "the"]
    student = ["x", " cat", "the", "dog", "the"]
    assert vocabulary_map(teacher, student).tolist() == [2, 1, -1, -1, 3, -1]


def carried_target():
    """A teacher's sampled target carried into a 10-token student vocabulary: ids 2 and 5 matched (0.4, 0.2),
    two unmatched slots (0.3, 0.1)."""
    return {"ids": torch.tensor([[[2, 5, 0, 0]]]), "mass": torch.tensor([[[0.4, 0.2, 0.3, 0.1]]]),
            "matched": torch.tensor([[[True, True, False, False]]])}


def test_cross_tokenizer_loss_is_zero_with_no_gradient_at_the_carried_distribution():
    q = torch.full((10,), 1e-30)
    q[2], q[5], q[7], q[8] = 0.4, 0.2, 0.3, 0.1  # matched ids exact; the unmatched mass on any two other tokens
    logits = q.log().view(1, 1, 10).requires_grad_()
    loss = cross_tokenizer_kd_loss(logits, carried_target())
    loss.backward()
    assert loss.item() < 1e-6
    assert float(logits.grad.abs().max()) < 1e-4


def test_cross_tokenizer_loss_value_and_gradient_elsewhere():
    logits = torch.zeros(1, 1, 10, requires_grad=True)  # uniform student: q = 0.1 everywhere
    loss = cross_tokenizer_kd_loss(logits, carried_target())
    loss.backward()
    loss = loss.item()
    # matched KL with the rest lumped: 0.4 ln 4 + 0.2 ln 2 + 0.4 ln(0.4 / 0.8);
    # ULD: the teacher's 2 unmatched slots sorted (0.3, 0.1) vs the student's 2 largest others (0.1 each): 0.2 + 0
    expected = 0.4 * np.log(4) + 0.2 * np.log(2) + 0.4 * np.log(0.5) + (0.2 - 0.0005) + 0
    assert loss == pytest.approx(expected, abs=1e-5)
    assert float(logits.grad.abs().max()) > 1e-2
    assert float(logits.grad[0, 0, 2]) < 0  # the under-weighted matched token is pushed up


def test_a_top_k_tail_asks_nothing_of_the_students_other_tokens():
    """A top-k cache of the teacher's own tokenizer: every slot matched, 0.4 of the mass in the tail. The student
    that puts the matched masses where the teacher does and spreads the rest over the other tokens is at 0, with no
    gradient (ULD has no unmatched slot to compare its other probabilities with)."""
    target = {"ids": torch.tensor([[[2, 5]]]), "mass": torch.tensor([[[0.4, 0.2]]]),
              "matched": torch.tensor([[[True, True]]])}
    q = torch.full((10,), 0.05)
    q[2], q[5] = 0.4, 0.2
    logits = q.log().view(1, 1, 10).requires_grad_()
    loss = cross_tokenizer_kd_loss(logits, target)
    loss.backward()
    assert loss.item() < 1e-6
    assert float(logits.grad.abs().max()) < 1e-5


def test_zero_padded_uld_pulls_the_students_unnamed_tokens_down_against_a_top_k_tail():
    """``uld="zero_padded"`` (ULD's zero padding): a sampled target is still met exactly at the carried
    distribution; with a top-k tail, the student's two largest other probabilities (0.05 each) are compared with
    the zero-padded unmatched slots (none here), so the loss is 2 x (0.05 - 0.0005) and its gradient lowers them."""
    q = torch.full((10,), 1e-30)
    q[2], q[5], q[7], q[8] = 0.4, 0.2, 0.3, 0.1
    sampled = q.log().view(1, 1, 10).requires_grad_()
    loss = cross_tokenizer_kd_loss(sampled, carried_target(), uld="zero_padded")
    loss.backward()
    assert loss.item() < 1e-6 and float(sampled.grad.abs().max()) < 1e-4
    target = {"ids": torch.tensor([[[2, 5]]]), "mass": torch.tensor([[[0.4, 0.2]]]),
              "matched": torch.tensor([[[True, True]]])}
    q = torch.full((10,), 0.05)
    q[2], q[5] = 0.4, 0.2
    logits = q.log().view(1, 1, 10).requires_grad_()
    loss = cross_tokenizer_kd_loss(logits, target, uld="zero_padded")
    loss.backward()
    assert loss.item() == pytest.approx(2 * (0.05 - 0.0005), abs=1e-6)
    assert float(logits.grad[0, 0, [0, 1, 3, 4, 6, 7, 8, 9]].max()) > 0  # gradient descent lowers the unnamed
    with pytest.raises(ValueError, match="'padded' is not"):
        cross_tokenizer_kd_loss(logits, target, uld="padded")


def test_the_uld_choice_is_validated_by_name():
    from cachebrew.configurations import DistillationConfig
    from cachebrew.errors import ConfigError

    assert DistillationConfig(cross_tokenizer_uld="zero_padded").to_dict()["cross_tokenizer_uld"] == "zero_padded"
    with pytest.raises(ConfigError, match="cross_tokenizer_uld: one of unmatched, zero_padded, got 'pad'"):
        DistillationConfig(cross_tokenizer_uld="pad")


def test_sentencepiece_word_starts_keep_their_space():
    """A Metaspace tokenizer's "▁the" decodes alone to "the": its text keeps the space, so it maps to a byte-level
    BPE's " the" and not to the same letters inside a word."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    sp = Tokenizer(models.WordLevel({"<unk>": 0, "\u2581the": 1, "the": 2, "\u2581.": 3}, unk_token="<unk>"))
    sp.pre_tokenizer = pre_tokenizers.Metaspace()
    sp.decoder = decoders.Metaspace()
    texts = token_texts(PreTrainedTokenizerFast(tokenizer_object=sp, unk_token="<unk>"))
    assert texts[1:] == [" the", "the", " ."]
    assert vocabulary_map([" the", "the", "x"], texts).tolist() == [1, 2, -1]
