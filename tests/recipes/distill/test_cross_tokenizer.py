"""A student with another tokenizer than the teacher's, from the same cache.

The teacher (fixtures: a word-level WordPiece vocabulary) is exported once; the student's tokenizer knows only
characters, so it makes other ids and other lengths from the same text. The cache's text is tokenized by the
student at distill time; the teacher's sentence logits are reused as they are, its hidden states are carried onto
the student's characters by character spans, token labels and their logits by words, a causal LM's next-token
distributions where both tokenizations end at one character; what cannot cross (attention maps, a cache without
spans) is refused in one line each. The same tokenizer in another folder is the cache's (by content): its cached
ids are used and the run is the one without student.tokenizer.
"""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from cachebrew import ConfigError
from cachebrew.components import CacheBatches
from cachebrew.components.retokenize import StudentTokenizer, cross_tokenizer_problems
from cachebrew.configurations import IntermediateMatch
from cachebrew.recipes.distill import DistillRunConfig, run_distill
from cachebrew.recipes.export import ExportConfig, run_export
from fixtures import export_config, make_ner_data, make_teacher_dir, make_text_data, tiny_student

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def char_tokenizer(path):
    """A BERT tokenizer of single characters (no whole words): other ids and longer sequences than the teacher's."""
    from transformers import BertTokenizerFast

    path.mkdir(parents=True)
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = SPECIALS + list(letters) + [f"##{c}" for c in letters]
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab=str(path / "vocab.txt")).save_pretrained(str(path))
    return path, len(vocab)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("xtok")
    teacher = make_teacher_dir(root / "teacher")
    for name, n, seed in (("train", 32, 1), ("dev", 16, 2)):
        run_export(ExportConfig.from_dict(export_config(
            root / name, teacher, make_text_data(root / f"{name}.jsonl", n=n, seed=seed),
            outputs={"hidden_layers": [2], "attention_layers": []})))
    chars, vocab_size = char_tokenizer(root / "chars")
    same = root / "same"  # the teacher's tokenizer files in another folder
    same.mkdir()
    for f in teacher.iterdir():
        if f.name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            shutil.copy(f, same / f.name)
    return {"root": root, "teacher": teacher, "chars": chars, "vocab_size": vocab_size, "same": same}


def config(world, out, tokenizer=None, vocab_size=88, loss="cls_mse"):
    student = {"config": tiny_student(vocab_size=vocab_size, max_position_embeddings=128)}
    if tokenizer is not None:
        student["tokenizer"] = str(tokenizer)
    return DistillRunConfig.from_dict({
        "output_dir": str(out), "seed": 3, "caches": [str(world["root"] / "train" / "cache")],
        "eval_cache": str(world["root"] / "dev" / "cache"), "student": student,
        "distill": {"temperature": 2, "hard_label_weight": 0.5, "intermediate_matches": [
            {"layer_T": 2, "layer_S": 1, "feature": "hidden", "loss": loss, "weight": 1, "proj": ["linear", 16, 32]}]},
        "train": {"epochs": 2, "batch_size": 8, "lr": 1e-2, "progress_bar": False, "shuffle_buffer": 16}})


def test_the_student_reads_the_cached_text_through_its_own_tokenizer(world):
    cache = str(world["root"] / "train" / "cache")
    student_tok = StudentTokenizer.load(str(world["chars"]), max_length=64)
    mine = next(iter(CacheBatches(cache, 8, shuffle=False, student_tokenizer=student_tok)))
    theirs = next(iter(CacheBatches(cache, 8, shuffle=False)))
    rows = {str(r["uid"]): r["sentence"] for r in map(json.loads, (world["root"] / "train.jsonl").read_text().splitlines())}
    texts = [rows[i] for i, _copy in mine["ids"]]  # the rows of the batch (a cache is sorted by length)
    expected = student_tok.tokenizer(texts, padding=True, return_tensors="pt")
    assert torch.equal(mine["student"]["input_ids"], expected["input_ids"])
    assert torch.equal(mine["student"]["attention_mask"], expected["attention_mask"])
    assert mine["student"]["input_ids"].shape[1] > theirs["student"]["input_ids"].shape[1]  # characters: longer
    assert torch.equal(mine["teacher_cache"]["logits"], theirs["teacher_cache"]["logits"])  # the teacher's, as cached
    assert torch.equal(mine["student"]["labels"], theirs["student"]["labels"])
    assert mine["ids"] == theirs["ids"]


def test_distill_a_student_with_another_tokenizer(world, tmp_path):
    result = run_distill(config(world, tmp_path / "chars", world["chars"], world["vocab_size"]))
    assert result.global_step == 8 and result.best is not None
    saved = json.loads((tmp_path / "chars" / "results.json").read_text())["student_tokenizer"]
    assert saved["retokenized"] == {"caches (default)": True, "eval_cache (default)": True}
    assert saved["fingerprint"] == StudentTokenizer.load(str(world["chars"])).fingerprint
    # best/ carries the tokenizer the student reads, not the teacher's
    assert (tmp_path / "chars" / "best" / "vocab.txt").read_text() == (world["chars"] / "vocab.txt").read_text()
    halfway = load_file(tmp_path / "chars" / "checkpoints" / "step-000004" / "student.safetensors")
    last = load_file(tmp_path / "chars" / "last" / "model.safetensors")
    assert max(float((last[k] - halfway[k]).abs().max()) for k in last) > 1e-3  # it trained


def test_the_teachers_tokenizer_in_another_folder_is_a_no_op(world, tmp_path):
    """Judged by content: the cached ids are read, per-token matches stay allowed, the weights are the run's
    without student.tokenizer."""
    run_distill(config(world, tmp_path / "plain", loss="hidden_mse"))
    run_distill(config(world, tmp_path / "same", world["same"], loss="hidden_mse"))
    saved = json.loads((tmp_path / "same" / "results.json").read_text())["student_tokenizer"]
    assert saved["retokenized"] == {"caches (default)": False, "eval_cache (default)": False}
    a, b = (load_file(tmp_path / n / "last" / "model.safetensors") for n in ("plain", "same"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_hidden_states_follow_character_spans(world):
    """Each character token of the student gets the hidden state of the teacher word it lies in ([CLS] and [SEP]
    theirs); padding and nothing else is left out of the match."""
    from transformers import AutoTokenizer

    cache = str(world["root"] / "train" / "cache")
    student_tok = StudentTokenizer.load(str(world["chars"]), max_length=64)
    features = {("logits", None), ("hidden", 2)}
    mine = next(iter(CacheBatches(cache, 8, shuffle=False, student_tokenizer=student_tok, features=features)))
    theirs = next(iter(CacheBatches(cache, 8, shuffle=False, features=features)))
    teacher_tok = AutoTokenizer.from_pretrained(str(world["teacher"]))
    rows = {str(r["uid"]): r["sentence"] for r in map(json.loads, (world["root"] / "train.jsonl").read_text().splitlines())}
    aligned, cached = mine["teacher_cache"]["hidden"][2], theirs["teacher_cache"]["hidden"][2]
    checked = 0
    for b, (rid, _copy) in enumerate(mine["ids"]):
        text = rows[rid]
        t = teacher_tok(text, return_offsets_mapping=True)["offset_mapping"]
        s = student_tok.tokenizer(text, return_offsets_mapping=True)["offset_mapping"]
        for j, (start, end) in enumerate(s):
            if end > start:  # a character: the teacher word whose span holds it
                i = next(i for i, (ts, te) in enumerate(t) if ts <= start and end <= te)
            else:  # [CLS] -> [CLS], [SEP] -> [SEP]
                i = 0 if j == 0 else len(t) - 1
            assert torch.allclose(aligned[b, j], cached[b, i], atol=1e-6)
            checked += 1
        assert mine["teacher_cache"]["match_mask"][b].sum() == len(s)  # every real student token is matched
    assert checked > 100
    assert aligned.shape[:2] == mine["student"]["input_ids"].shape


@pytest.mark.parametrize("loss", ["hidden_mse", "mean_mse"])
def test_distill_with_a_hidden_state_match_across_tokenizers(world, tmp_path, loss):
    """Per-token (hidden_mse) and mean-pooled (mean_mse) matches read the span-aligned teacher states."""
    result = run_distill(config(world, tmp_path / "hid", world["chars"], world["vocab_size"], loss=loss))
    assert result.global_step == 8
    last = load_file(tmp_path / "hid" / "last" / "model.safetensors")
    plain = run_distill(config(world, tmp_path / "cls", world["chars"], world["vocab_size"]))
    assert plain.global_step == 8
    other = load_file(tmp_path / "cls" / "last" / "model.safetensors")
    assert max(float((last[k] - other[k]).abs().max()) for k in last) > 1e-4  # the per-token match moved it


@pytest.fixture(scope="module")
def ner(world):
    teacher = make_teacher_dir(world["root"] / "ner_teacher", num_labels=2, token_level=True)
    data = make_ner_data(world["root"] / "ner.jsonl", n=16)
    run_export(ExportConfig.from_dict(export_config(
        world["root"] / "ner", teacher, data,
        data={"path": str(data), "text": None, "tokens": "tokens", "label": "tags", "id": None},
        teachers=[{"name": "a", "path": str(teacher), "model_class": "AutoModelForTokenClassification"}],
        outputs={"hidden_layers": [], "attention_layers": []})))
    return {"cache": str(world["root"] / "ner" / "cache"), "data": data}


def test_token_labels_and_their_logits_follow_words(world, ner):
    """The first character of each word carries the word's tag and the teacher's logits at the word's first
    sub-token ([CLS] the teacher's [CLS]); every other position has neither (label -100, out of the KD mask)."""
    student_tok = StudentTokenizer.load(str(world["chars"]), max_length=64)
    mine = next(iter(CacheBatches(ner["cache"], 4, shuffle=False, student_tokenizer=student_tok)))
    theirs_set = CacheBatches(ner["cache"], 4, shuffle=False)
    theirs, theirs_names = next(iter(theirs_set)), theirs_set.joined.manifest.label_names
    tags = {}
    for i, r in enumerate(map(json.loads, ner["data"].read_text().splitlines())):
        tags[str(i)] = r["tags"]
    labels, logits = mine["student"]["labels"], mine["teacher_cache"]["logits"]
    mask = mine["teacher_cache"]["logits_mask"]
    for b, (rid, _copy) in enumerate(mine["ids"]):
        ids = mine["student"]["input_ids"][b].tolist()
        enc = student_tok.tokenizer(json.loads(ner["data"].read_text().splitlines()[int(rid)])["tokens"],
                                    is_split_into_words=True)
        assert enc["input_ids"] == ids[:len(enc["input_ids"])]
        firsts = [j for j, w in enumerate(enc.word_ids()) if w is not None and (j == 0 or enc.word_ids()[j - 1] != w)]
        names = theirs_names
        assert [int(labels[b, j]) for j in firsts] == [names.index(t) for t in tags[rid]]
        assert sorted(torch.nonzero(labels[b] != -100).flatten().tolist()) == firsts
        assert sorted(torch.nonzero(mask[b]).flatten().tolist()) == [0] + firsts  # [CLS] too, as without retokenizing
        # the teacher's logits at the word's first sub-token: the same-tokenizer batch's at its labelled positions
        teacher_firsts = torch.nonzero(theirs["student"]["labels"][b] != -100).flatten()
        assert torch.equal(logits[b, firsts], theirs["teacher_cache"]["logits"][b, teacher_firsts])


def test_distill_a_token_classifier_with_another_tokenizer(world, ner, tmp_path):
    cfg = config(world, tmp_path / "ner", world["chars"], world["vocab_size"]).to_dict()
    cfg.update(caches=[ner["cache"]], eval_cache=ner["cache"], distill={"temperature": 2, "hard_label_weight": 0.5})
    result = run_distill(DistillRunConfig.from_dict(cfg))
    assert result.global_step == 4 and result.best is not None
    saved = json.loads((tmp_path / "ner" / "results.json").read_text())
    assert saved["student_tokenizer"]["retokenized"] == {"caches (default)": True, "eval_cache (default)": True}


def test_a_token_classifier_matches_hidden_states_by_words_across_tokenizers(world, ner, tmp_path):
    """NER rows carry the teacher's hidden states as their labels: each word's first student sub-token takes the
    teacher's state at the word's first sub-token, and only those positions (and [CLS]) enter the match."""
    teacher = make_teacher_dir(world["root"] / "ner_teacher", num_labels=2, token_level=True)
    run_export(ExportConfig.from_dict(export_config(
        tmp_path / "export", teacher, ner["data"],
        data={"path": str(ner["data"]), "text": None, "tokens": "tokens", "label": "tags", "id": None},
        teachers=[{"name": "a", "path": str(teacher)}], outputs={"hidden_layers": [2], "attention_layers": []})))
    cache = str(tmp_path / "export" / "cache")
    student_tok = StudentTokenizer.load(str(world["chars"]), max_length=64)
    mine = next(iter(CacheBatches(cache, 4, shuffle=False, student_tokenizer=student_tok, features=[("hidden", 2)])))
    theirs = next(iter(CacheBatches(cache, 4, shuffle=False, features=[("hidden", 2)])))
    for b in range(len(mine["ids"])):
        firsts = torch.nonzero(mine["student"]["labels"][b] != -100).flatten()
        teacher_firsts = torch.nonzero(theirs["student"]["labels"][b] != -100).flatten()
        assert len(firsts) == len(teacher_firsts) > 0
        assert torch.equal(mine["teacher_cache"]["hidden"][2][b, firsts], theirs["teacher_cache"]["hidden"][2][b, teacher_firsts])
        assert torch.nonzero(mine["teacher_cache"]["match_mask"][b]).flatten().tolist() == [0] + firsts.tolist()
    cfg = config(world, tmp_path / "out", world["chars"], world["vocab_size"], loss="hidden_mse").to_dict()
    cfg.update(caches=[cache], eval_cache=cache)
    assert run_distill(DistillRunConfig.from_dict(cfg)).global_step == 4


def test_what_cannot_cross_tokenizers_is_refused_in_one_line_each(world, tmp_path):
    cfg = config(world, tmp_path / "x", world["chars"], world["vocab_size"]).to_dict()
    cfg["distill"]["intermediate_matches"] = [
        {"layer_T": 1, "layer_S": 1, "feature": "attention", "loss": "attention_mse", "weight": 1}]
    with pytest.raises(ConfigError) as e:
        run_distill(DistillRunConfig.from_dict(cfg))
    assert e.value.errors == [
        "distill.intermediate_matches[0]: feature 'attention' pairs the teacher's and the student's positions two by "
        "two, which do not map across tokenizers; match hidden states (aligned by character spans) or [CLS] (cls_mse, "
        "pkd), or use a student with the teacher's tokenizer"]
    # caches written before token spans were recorded (or by a slow tokenizer)
    old = {"token_level": False, "causal_lm": False, "offsets": False, "word_ids": False, "vocabulary": None,
           "sparse_logits": False}
    hidden = IntermediateMatch(layer_T=2, layer_S=1, feature="hidden", loss="hidden_mse", weight=1)
    assert cross_tokenizer_problems("caches (default)", old, [hidden], True) == [
        "distill.intermediate_matches[0]: loss 'hidden_mse' pairs the teacher's and the student's positions one by "
        "one, and the cache has no token spans to align them by; export it again into a new output directory with "
        "outputs.token_spans on and a fast tokenizer (caches written before cachebrew recorded token spans have none), "
        "or use a loss that reads [CLS] (cls_mse, pkd)"]
    assert cross_tokenizer_problems("caches (default)", {**old, "token_level": True}, [], True) == [
        "caches (default): the cache's token labels sit on the teacher's tokens and it has no word ids to carry them "
        "onto the student's; export it again into a new output directory with outputs.token_spans on and a fast "
        "tokenizer (caches written before cachebrew recorded token spans have none)"]
    lm = {**old, "causal_lm": True, "offsets": True, "vocabulary": ["a"]}
    assert cross_tokenizer_problems("caches (default)", lm, [], True) == [
        "caches (default): a causal LM's distributions cross tokenizers from sparse logits only (export with "
        "outputs.sparse_logits: top-k or sampled)"]
    assert cross_tokenizer_problems("caches (default)", {**lm, "sparse_logits": True}, [], False) == [
        "caches (default): the student's tokenizer gives no token spans (use a Hugging Face fast tokenizer, "
        "tokenizer.json)"]


def test_a_causal_lm_learns_from_a_teacher_with_another_tokenizer(world, tmp_path):
    """Next-token targets at the student positions that end where a teacher token ends (the last character of
    each word, and the leading [CLS]), their ids mapped into the student's vocabulary by token text (specials and
    letters match; whole words are unmatched mass); a causal student distils from them."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from cachebrew.components.alignment import vocabulary_map

    teacher = world["root"] / "lm_teacher"
    for f in world["teacher"].iterdir():
        if f.name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            teacher.mkdir(exist_ok=True)
            shutil.copy(f, teacher / f.name)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=89, n_positions=64, n_embd=32, n_layer=2, n_head=2)).save_pretrained(
        str(teacher))
    data = make_text_data(world["root"] / "lm.jsonl", n=16, seed=5)
    run_export(ExportConfig.from_dict({
        "output": str(world["root"] / "lm_cache"), "progress_bar": False, "max_length": 24, "batch_size": 8,
        "teachers": [{"name": "lm", "path": str(teacher), "model_class": "AutoModelForCausalLM"}],
        "data": {"path": str(data), "text": "sentence", "label": None, "id": "uid"},
        "outputs": {"sparse_logits": {"method": "topk", "k": 6, "temperature": 1.0}}}))
    cache = str(world["root"] / "lm_cache")
    student_tok = StudentTokenizer.load(str(world["chars"]), max_length=24)
    ds = CacheBatches(cache, 4, shuffle=False, student_tokenizer=student_tok)
    mine, theirs = next(iter(ds)), next(iter(CacheBatches(cache, 4, shuffle=False)))
    vocabulary = ds.joined.manifest.vocabulary
    assert len(vocabulary) == 89 and vocabulary[2] == "[CLS]"  # 89 ids: "a" is a word and a letter (ids 18, 88)
    mapping = vocabulary_map(vocabulary, student_tok.token_strings())
    # the special tokens, letters and ##letters match; the words (all longer than a letter) are unmatched mass
    letters = "abcdefghijklmnopqrstuvwxyz"
    assert {vocabulary[i] for i in range(89) if mapping[i] >= 0} == {*SPECIALS, *letters, *(f"##{c}" for c in letters)}
    rows = {str(r["uid"]): r["sentence"] for r in map(json.loads, data.read_text().splitlines())}
    target, cached = mine["teacher_cache"]["logits"], theirs["teacher_cache"]["logits"]
    for b, (rid, _copy) in enumerate(mine["ids"]):
        n_chars = [len(w) for w in rows[rid].split()]
        # the student's tokens: [CLS] c h a r s ... [SEP] (24 at most: cut inside the text); a word's last
        # character sits at the sum of the lengths so far
        last = int(mine["student"]["attention_mask"][b].sum()) - 2
        ends = {0} | {e for e in (sum(n_chars[:k + 1]) for k in range(len(n_chars))) if e <= last}
        kept = set(torch.nonzero(mine["teacher_cache"]["logits_mask"][b]).flatten().tolist())
        assert kept == ends
        for k, j in enumerate(sorted(ends)):  # teacher positions: [CLS] then one per word
            ids, mass = target["ids"][b, j], target["mass"][b, j]
            assert torch.equal(mass, cached["mass"][b, k])
            teacher_ids = cached["ids"][b, k]
            assert torch.equal(target["matched"][b, j], torch.from_numpy(mapping)[teacher_ids] >= 0)
            assert torch.equal(ids[target["matched"][b, j]], torch.from_numpy(mapping)[teacher_ids][target["matched"][b, j]])
    student = {"config": {"model_type": "gpt2", "vocab_size": world["vocab_size"], "n_positions": 64, "n_embd": 16,
                          "n_layer": 1, "n_head": 2}, "model_class": "AutoModelForCausalLM",
               "tokenizer": str(world["chars"])}
    result = run_distill(DistillRunConfig.from_dict({
        "output_dir": str(tmp_path / "lm"), "seed": 1, "caches": [cache], "student": student,
        "distill": {"temperature": 1.0, "hard_label_weight": 1.0},
        "train": {"epochs": 2, "batch_size": 4, "lr": 1e-2, "progress_bar": False}}))
    assert result.global_step == 8
    saved = json.loads((tmp_path / "lm" / "results.json").read_text())["student_tokenizer"]
    assert saved["retokenized"] == {"caches (default)": True}
