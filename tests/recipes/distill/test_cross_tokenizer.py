"""A student with another tokenizer than the teacher's, from the same cache (sentence-level targets).

The teacher (fixtures: a word-level WordPiece vocabulary) is exported once; the student's tokenizer knows only
characters, so it makes other ids and other lengths from the same text. The cache's text is tokenized by the
student at distill time, the teacher's logits are reused as they are, a [CLS] match crosses tokenizers, and what
cannot cross (per-token matches, token labels) is refused in one line each. The same tokenizer in another folder
is the cache's (by content): its cached ids are used and the run is the one without student.tokenizer.
"""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from cachebrew import ConfigError
from cachebrew.components import CacheBatches
from cachebrew.components.retokenize import StudentTokenizer
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


def test_what_cannot_cross_tokenizers_is_refused_in_one_line_each(world, tmp_path):
    with pytest.raises(ConfigError) as e:
        run_distill(config(world, tmp_path / "x", world["chars"], world["vocab_size"], loss="hidden_mse"))
    assert e.value.errors == [
        "distill.intermediate_matches[0]: loss 'hidden_mse' pairs the teacher's and the student's positions one by "
        "one, and the student tokenizes the text differently from the teacher; use a loss that reads [CLS] "
        "(cls_mse, pkd), drop the match, or use a student with the teacher's tokenizer"]
    ner_teacher = make_teacher_dir(world["root"] / "ner_teacher", num_labels=2, token_level=True)
    data = make_ner_data(world["root"] / "ner.jsonl", n=16)
    run_export(ExportConfig.from_dict(export_config(
        world["root"] / "ner", ner_teacher, data,
        data={"path": str(data), "text": None, "tokens": "tokens", "label": "tags", "id": None},
        teachers=[{"name": "a", "path": str(ner_teacher), "model_class": "AutoModelForTokenClassification"}],
        outputs={"hidden_layers": [], "attention_layers": []})))
    cfg = config(world, tmp_path / "ner", world["chars"], world["vocab_size"]).to_dict()
    cfg.update(caches=[str(world["root"] / "ner" / "cache")], eval_cache=None,
               distill={"temperature": 2, "intermediate_matches": []})
    with pytest.raises(ConfigError, match=r"caches \(default\): the cache holds per-token targets \(token labels\)"):
        run_distill(DistillRunConfig.from_dict(cfg))
