"""Sparse logit caches (issue 15): causal-LM teachers, top-k and sampled targets, unbiased KD."""

import json
import math

import pyarrow as pa
import pytest
import torch

from cachebrew import ConfigError, DistillationConfig
from cachebrew.cache.sparse import row_key, sparse_targets, uniforms
from cachebrew.components.loader import CacheBatches, merge_sparse_targets
from cachebrew.distillers.batches import apply_adaptor
from cachebrew.errors import BatchError, CachebrewError
from cachebrew.losses import kd_ce_loss, sparse_kd_loss
from cachebrew.objective import DistillationLoss
from cachebrew.recipes.export import ExportConfig, run_export
from fixtures import make_text_data, write_vocab


# -- the estimator: sampled KD's gradient is the dense one's on average, top-k's is not ------------------------------
def mean_gradient(s, targets, T):
    """Gradient w.r.t. the student logits s (N, V) of the sparse KD loss, averaged over the M target rows sets."""
    M = targets["ids"].shape[0] // s.shape[0]
    leaf = s.clone().requires_grad_(True)
    sparse_kd_loss(leaf.repeat(M, 1), targets, T).backward()  # mean over M*N rows = mean of M per-cache means
    return leaf.grad


def test_sampled_kd_gradient_is_unbiased_and_topk_is_not():
    g = torch.Generator().manual_seed(0)
    N, V, K, T, M = 6, 40, 12, 2.0, 4000
    teacher, student = torch.randn(N, V, generator=g) * 3, torch.randn(N, V, generator=g)
    leaf = student.clone().requires_grad_(True)
    kd_ce_loss(leaf, teacher, T).backward()
    dense = leaf.grad

    # M caches of the same N positions, each with its own draws (distinct row keys)
    keys = [row_key(f"cache{m}-row{i}", 0) for m in range(M) for i in range(N)]
    ids, mass = sparse_targets(teacher.repeat(M, 1), "sampled", K, T, uniforms(keys, None, K, seed=5))
    sampled = mean_gradient(student, {"ids": ids, "mass": mass}, T)
    # the loss too: averaged over the caches, the sparse loss is the dense soft cross-entropy
    mean_loss = sparse_kd_loss(student.repeat(M, 1), {"ids": ids, "mass": mass}, T)
    assert mean_loss.item() == pytest.approx(kd_ce_loss(student, teacher, T).item(), rel=2e-3)
    # each gradient entry is -mass/(T N) + q/(T N): its standard error over M caches is at most sqrt(1/4K)/(T N sqrt M)
    stderr = (0.25 / K) ** 0.5 / (T * N * M ** 0.5)
    err_sampled = (sampled - dense).abs().max().item()

    ids, mass = sparse_targets(teacher, "topk", K, T)
    tail = 1.0 - mass.sum(-1)
    topk = mean_gradient(student, {"ids": ids, "mass": mass, "tail": tail}, T)
    err_topk = (topk - dense).abs().max().item()
    print(f"max |grad - dense grad|: sampled (K={K}, {M} caches) {err_sampled:.2e}, top-{K} {err_topk:.2e}, "
          f"stderr bound {stderr:.2e}; top-{K} leaves {tail.mean().item():.1%} of the teacher's mass in its tail")
    assert err_sampled < 5 * stderr
    assert err_topk > 10 * stderr  # a bias that no number of caches averages away (measured: ~18 x)


def test_draws_are_reproducible_per_row_whatever_the_batch():
    logits = torch.randn(5, 30)
    keys = [row_key(f"r{i}", 0) for i in range(5)]
    ids, mass = sparse_targets(logits, "sampled", 8, 1.0, uniforms(keys, None, 8, seed=1))
    ids2, mass2 = sparse_targets(logits[2:4], "sampled", 8, 1.0, uniforms(keys[2:4], None, 8, seed=1))
    assert torch.equal(ids[2:4], ids2) and torch.equal(mass[2:4], mass2)
    ids3, _ = sparse_targets(logits, "sampled", 8, 1.0, uniforms(keys, None, 8, seed=2))
    assert not torch.equal(ids, ids3)  # another seed, other draws
    assert torch.allclose(mass.sum(-1), torch.ones(5))
    # merged draws: distinct ids first, unused slots are (0, 0)
    for row_ids, row_mass in zip(ids, mass):
        used = row_mass > 0
        assert len(set(row_ids[used].tolist())) == int(used.sum())


def test_several_teachers_merge_exactly():
    s = torch.randn(4, 20)
    a = {"ids": torch.randint(0, 20, (4, 6)), "mass": torch.rand(4, 6), "method": "sampled", "temperature": 1.0}
    b = {"ids": torch.randint(0, 20, (4, 6)), "mass": torch.rand(4, 6), "method": "sampled", "temperature": 1.0}
    merged = merge_sparse_targets([a, b], [3.0, 1.0])
    expected = 0.75 * sparse_kd_loss(s, a) + 0.25 * sparse_kd_loss(s, b)
    assert torch.isclose(sparse_kd_loss(s, merged), expected)


# -- causal-LM teacher -> sparse cache -> loader -> loss ---------------------------------------------------------------
def make_causal_teacher(path, vocab_size, seed=0):
    from transformers import BertTokenizerFast, GPT2Config, GPT2LMHeadModel

    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    GPT2LMHeadModel(GPT2Config(vocab_size=vocab_size, n_positions=64, n_embd=32, n_layer=2, n_head=2)).save_pretrained(
        str(path))
    BertTokenizerFast(vocab=str(path / "vocab.txt")).save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm")
    (root / "teacher").mkdir()
    vocab = write_vocab(root / "teacher" / "vocab.txt")
    teacher = make_causal_teacher(root / "teacher", vocab)
    data = make_text_data(root / "text.jsonl", n=20)
    return {"root": root, "teacher": teacher, "data": data, "vocab": vocab}


def export(lm, name, sparse=None, batch_size=8, dtypes=None):
    cfg = {"output": str(lm["root"] / name), "teachers": [{"name": "lm", "path": str(lm["teacher"]),
                                                            "model_class": "AutoModelForCausalLM"}],
           "data": {"path": str(lm["data"]), "text": "sentence", "label": None, "id": "uid"}, "max_length": 24,
           "outputs": {"logits": True, "token_spans": False,  # the logits' bytes alone (spans: test_cross_tokenizer)
                       **({"sparse_logits": sparse} if sparse else {})}, "batch_size": batch_size,
           "shard_rows": 8, "progress_bar": False, "dtypes": dtypes or {"logits": "fp32"}}
    result = run_export(ExportConfig.from_dict(cfg))
    return result


def test_causal_teacher_sparse_caches_roundtrip(lm):
    from transformers import GPT2LMHeadModel

    dense = export(lm, "dense", dtypes={"logits": "fp16"})
    topk = export(lm, "topk", {"method": "topk", "k": 8, "temperature": 2.0})
    sampled = export(lm, "sampled", {"method": "sampled", "k": 8, "temperature": 2.0, "seed": 3})
    assert topk.bytes_total < dense.bytes_total / 2 and sampled.bytes_total < dense.bytes_total / 2

    teacher = GPT2LMHeadModel.from_pretrained(str(lm["teacher"])).eval()
    batch = next(iter(CacheBatches(str(lm["root"] / "topk"), 4, shuffle=False)))
    target = batch["teacher_cache"]["logits"]
    V = lm["vocab"]
    # nothing vocabulary-wide on the teacher side: K slots per position
    assert target["ids"].shape[-1] == 8 and all(t.shape[-1] != V for t in batch["teacher_cache"].values()
                                                 if isinstance(t, torch.Tensor))
    student_inputs = batch["student"]
    with torch.no_grad():
        logits = teacher(input_ids=student_inputs["input_ids"], attention_mask=student_inputs["attention_mask"],
                         token_type_ids=student_inputs["token_type_ids"]).logits
    exact = torch.softmax(logits / 2.0, dim=-1).gather(-1, target["ids"])
    mask = student_inputs["attention_mask"].bool()
    assert torch.allclose(target["mass"][mask], exact[mask], atol=1e-5)
    assert torch.allclose(target["tail"][mask], 1 - exact[mask].sum(-1), atol=1e-5)

    # a distillation step from each sparse cache: finite loss, gradients flow, temperature checked
    for name in ("topk", "sampled"):
        b = next(iter(CacheBatches(str(lm["root"] / name), 4, shuffle=False)))
        torch.manual_seed(1)
        student = GPT2LMHeadModel(teacher.config)  # not the teacher: at the teacher, the KD gradient is 0
        out = student(**{k: v for k, v in b["student"].items() if k != "labels"})
        results_S = {"logits": [out.logits], "logits_mask": [b["student"]["attention_mask"]]}
        results_T = apply_adaptor(None, b["student"], b["teacher_cache"], from_cache=True)
        loss, _ = DistillationLoss(DistillationConfig(temperature=2.0))(results_S, results_T)
        loss.backward()
        assert torch.isfinite(loss) and student.lm_head.weight.grad.abs().sum() > 0
        with pytest.raises(BatchError, match="temperature 2"):
            DistillationLoss(DistillationConfig(temperature=1.0))(results_S, results_T)
        with pytest.raises(BatchError, match="dense teacher logits"):
            DistillationLoss(DistillationConfig(temperature=2.0, kd_loss_type="mse"))(results_S, results_T)


def test_sampled_export_is_reproducible_and_batch_independent(lm):
    export(lm, "s1", {"method": "sampled", "k": 6, "seed": 9})
    export(lm, "s2", {"method": "sampled", "k": 6, "seed": 9}, batch_size=3)

    def draws(name):
        import pyarrow.ipc as ipc

        rows = {}
        for shard in sorted((lm["root"] / name).glob("*.arrow")):
            table = ipc.open_file(pa.memory_map(str(shard))).read_all()
            for rid, idx, m in zip(table["id"].to_pylist(), table["lm.logits.index"].to_pylist(),
                                   table["lm.logits"].to_pylist()):
                rows[rid] = (idx, m)
        return rows

    a, b = draws("s1"), draws("s2")
    assert len(a) == 20 and a == b


def test_sparse_config_errors():
    base = {"output": "o", "teachers": [{"name": "t", "path": "p"}], "data": {"path": "d"}}
    with pytest.raises(ConfigError, match=r"outputs\.sparse_logits\.method"):
        ExportConfig.from_dict({**base, "outputs": {"sparse_logits": {"method": "nucleus"}}})
    with pytest.raises(ConfigError, match="supersedes"):
        ExportConfig.from_dict({**base, "outputs": {"topk_logits": 5, "sparse_logits": {"method": "topk"}}})
    with pytest.raises(ConfigError, match=r"sparse_logits\.temperature"):
        ExportConfig.from_dict({**base, "outputs": {"sparse_logits": {"temperature": 0}}})


def test_hf_trainer_distils_a_causal_student_from_a_sampled_cache(lm, tmp_path):
    """labels = the inputs (padding -100) for a causal-LM cache: the hard-label term is the shifted LM loss."""
    from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments

    from cachebrew.hf import DistillationTrainer

    export(lm, "hf_sampled", {"method": "sampled", "k": 8, "temperature": 1.0, "seed": 1})
    batch = next(iter(CacheBatches(str(lm["root"] / "hf_sampled"), 4, shuffle=False)))["student"]
    mask = batch["attention_mask"].bool()
    assert torch.equal(batch["labels"][mask], batch["input_ids"][mask]) and (batch["labels"][~mask] == -100).all()

    torch.manual_seed(2)
    student = GPT2LMHeadModel(GPT2Config(vocab_size=lm["vocab"], n_positions=64, n_embd=16, n_layer=1, n_head=2))
    before = {k: v.clone() for k, v in student.state_dict().items()}
    args = TrainingArguments(output_dir=str(tmp_path / "o"), per_device_train_batch_size=4, max_steps=3,
                             learning_rate=1e-2, use_cpu=True, report_to=[], disable_tqdm=True, save_strategy="no",
                             logging_steps=1)
    trainer = DistillationTrainer(model=student, args=args, teacher_cache=str(lm["root"] / "hf_sampled"),
                                  distillation_config=DistillationConfig(temperature=1.0, hard_label_weight=0.5))
    trainer.train()
    logged = [h for h in trainer.state.log_history if "distill/unweighted_kd_loss" in h]
    assert logged and all(h["distill/unweighted_hard_label_loss"] > 0 for h in logged)
    assert max((student.state_dict()[k] - v).abs().max().item() for k, v in before.items()) > 1e-4


def lm_perplexity(model, ds) -> float:
    """Held-out perplexity computed apart from the recipe: Hugging Face's own shifted LM loss per row."""
    nll = tokens = 0.0
    model.eval()
    with torch.no_grad():
        for batch in ds:
            inputs = batch["student"]
            for i in range(inputs["input_ids"].size(0)):
                row = {k: v[i:i + 1] for k, v in inputs.items()}
                n = int((row["labels"][:, 1:] != -100).sum())
                nll += model(**row).loss.item() * n
                tokens += n
    return math.exp(nll / tokens)


def test_cachebrew_distill_trains_a_causal_student_and_keeps_it_by_perplexity(lm, tmp_path):
    """`cachebrew distill` from a sampled cache: a GPT-2 student (the teacher's first layer), evaluated on a dense
    cache: its perplexity and the teacher's (from the cached logits) equal Hugging Face's own loss on the rows."""
    from transformers import GPT2LMHeadModel

    from cachebrew.recipes.distill import DistillRunConfig, run_distill

    export(lm, "d_train", {"method": "sampled", "k": 8, "temperature": 1.0, "seed": 4})
    export(lm, "d_eval")  # dense fp32 logits: the teacher can be scored from the cache
    eval_ds = CacheBatches(str(lm["root"] / "d_eval"), 4, shuffle=False)
    student_spec = {"path": str(lm["teacher"]), "overrides": {"n_layer": 1}}
    initial = GPT2LMHeadModel.from_pretrained(str(lm["teacher"]), n_layer=1)
    cfg = DistillRunConfig.from_dict({
        "output_dir": str(tmp_path / "d"), "caches": [str(lm["root"] / "d_train")],
        "eval_cache": str(lm["root"] / "d_eval"), "student": student_spec,
        "distill": {"temperature": 1.0, "hard_label_weight": 1.0},
        "train": {"epochs": 3, "batch_size": 4, "lr": 5e-3, "progress_bar": False, "device": "cpu"}})
    result = run_distill(cfg)

    best = GPT2LMHeadModel.from_pretrained(str(tmp_path / "d" / "best"))
    assert best.config.n_layer == 1
    assert result.best["default"]["perplexity"] == pytest.approx(lm_perplexity(best, eval_ds), rel=1e-4)
    teacher = GPT2LMHeadModel.from_pretrained(str(lm["teacher"]))
    assert result.teacher["default"]["perplexity"] == pytest.approx(lm_perplexity(teacher, eval_ds), rel=1e-4)
    assert result.best["default"]["perplexity"] < 0.9 * lm_perplexity(initial, eval_ds)  # it trained
    scores = [row["score"] for row in json.loads((tmp_path / "d" / "results.json").read_text())["history"]]
    assert len(scores) == 3 and result.best["score"] == max(scores)  # kept by the lowest perplexity


def test_cachebrew_distill_refuses_causal_caches_in_multi_task_runs(lm, tmp_path):
    from cachebrew.recipes.distill import DistillRunConfig, run_distill

    export(lm, "mt", {"method": "topk", "k": 4})
    cfg = DistillRunConfig.from_dict({"output_dir": str(tmp_path / "d"), "student": {"path": str(lm["teacher"])},
                                      "tasks": {"a": {"caches": [str(lm["root"] / "mt")]}},
                                      "train": {"steps": 2, "batch_size": 4, "progress_bar": False}})
    with pytest.raises(ConfigError, match=r"causal-LM student trains from causal-LM caches only.*mt \(causal LM\)"):
        run_distill(cfg)


CHAT_TEMPLATE = ("{% for m in messages %}[CLS] {{ m['role'] }} : {{ m['content'] }} [SEP] {% endfor %}")


def test_chat_data_is_rendered_by_the_tokenizers_template(lm, tmp_path):
    """data.messages: each conversation becomes the chat template's text, tokenized without adding special tokens
    twice; a copy without ops is the same text with fresh draws; bad conversations and templateless tokenizers
    get errors naming the column, row or tokenizer."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(lm["teacher"]))
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(str(tmp_path / "chat_tok"))
    convs = [[{"role": "user", "content": f"good movie {i}"}, {"role": "assistant", "content": "the plot is great"}]
             for i in range(6)]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"uid": f"c{i}", "conv": c}) + "\n" for i, c in enumerate(convs)))
    base = {"teachers": [{"name": "lm", "path": str(lm["teacher"]), "model_class": "AutoModelForCausalLM"}],
            "tokenizer": str(tmp_path / "chat_tok"), "data": {"path": str(data), "messages": "conv", "label": None,
                                                              "id": "uid"},
            "max_length": 40, "outputs": {"sparse_logits": {"method": "sampled", "k": 4}}, "augment": {"copies": 1},
            "progress_bar": False, "shard_rows": 8}
    run_export(ExportConfig.from_dict({**base, "output": str(tmp_path / "chat_cache")}))
    seen = {}
    for batch in CacheBatches(str(tmp_path / "chat_cache"), 4, shuffle=False):
        for (rid, copy), ids, mask, target in zip(batch["ids"], batch["student"]["input_ids"],
                                                  batch["student"]["attention_mask"], batch["teacher_cache"]["logits"]["ids"]):
            seen[(rid, copy)] = (ids[mask.bool()].tolist(), target[mask.bool()])
    assert len(seen) == 12
    for i, conv in enumerate(convs):
        text = tok.apply_chat_template(conv, tokenize=False)
        assert text.startswith("[CLS] user : good movie")
        expected = tok(text, add_special_tokens=False)["input_ids"]
        assert seen[(f"c{i}", 0)][0] == expected == seen[(f"c{i}", 1)][0]  # no doubled [CLS] / [SEP]
    assert any(not torch.equal(seen[(f"c{i}", 0)][1], seen[(f"c{i}", 1)][1]) for i in range(6))  # fresh draws

    with pytest.raises(ConfigError, match=r"data\.messages: the tokenizer .* has no chat template"):
        run_export(ExportConfig.from_dict({**base, "tokenizer": None, "output": str(tmp_path / "no_template")}))
    data.write_text(json.dumps({"uid": "bad", "conv": [{"role": "user"}]}) + "\n")
    with pytest.raises(CachebrewError, match=r"data\.messages: row 0 \(id bad\) of column 'conv' is not a conversation"):
        run_export(ExportConfig.from_dict({**base, "output": str(tmp_path / "bad")}))
    with pytest.raises(ConfigError, match=r"exactly one of data\.text.*\['text', 'messages'\]"):
        ExportConfig.from_dict({**base, "output": "o", "data": {"path": str(data), "messages": "conv", "text": "t"}})


def test_topk_loss_counts_the_tail_as_one_bucket():
    """Coarsened to the K ids + one tail bucket, the top-K loss is a proper divergence: its gradient vanishes when
    the student is the teacher (without the tail term it would push the tail's mass onto the K ids)."""
    teacher = torch.randn(5, 30) * 2
    ids, mass = sparse_targets(teacher, "topk", 6, 1.5)
    target = {"ids": ids, "mass": mass, "tail": 1 - mass.sum(-1)}
    leaf = teacher.clone().requires_grad_(True)
    sparse_kd_loss(leaf, target, 1.5, "kl").backward()
    assert leaf.grad.abs().max().item() < 1e-6
    assert sparse_kd_loss(teacher, target, 1.5, "kl").abs().item() < 1e-5  # KL of a distribution with itself


def test_packing_concatenates_documents_into_full_rows(lm):
    """packing: every document's tokens (each ending in the separator) in order, cut into rows of exactly
    max_length (only the last shorter), no padding, nothing truncated; the cached logits are the teacher's on the
    packed row, and a distillation batch labels every token (no padding to mask)."""
    from transformers import AutoTokenizer, GPT2LMHeadModel

    cfg = {"output": str(lm["root"] / "packed"), "packing": True, "max_length": 16, "batch_size": 4,
           "teachers": [{"name": "lm", "path": str(lm["teacher"]), "model_class": "AutoModelForCausalLM"}],
           "data": {"path": str(lm["data"]), "text": "sentence", "label": None, "id": "uid"},
           "outputs": {"logits": True}, "dtypes": {"logits": "fp32"}, "progress_bar": False, "shard_rows": 8}
    result = run_export(ExportConfig.from_dict(cfg))
    tok = AutoTokenizer.from_pretrained(str(lm["teacher"]))
    docs = [json.loads(line) for line in lm["data"].read_text().splitlines()]
    stream = [t for d in docs for t in tok(d["sentence"])["input_ids"]]  # [CLS] ... [SEP]: already separated
    assert stream.count(tok.sep_token_id) == len(docs)
    rows = {}
    for batch in CacheBatches(cfg["output"], 4, shuffle=False):
        for (rid, _), ids, mask, labels, logits in zip(batch["ids"], batch["student"]["input_ids"],
                                                       batch["student"]["attention_mask"], batch["student"]["labels"],
                                                       batch["teacher_cache"]["logits"]):
            n = int(mask.sum())
            rows[rid] = (ids[:n], logits[:n])
            assert torch.equal(labels[:n], ids[:n])
    assert result.rows_total == len(rows) == math.ceil(len(stream) / 16)
    ordered = sorted(rows, key=lambda r: (int(r.split("@")[0][2:]), int(r.split("@")[1])))
    assert torch.cat([rows[r][0] for r in ordered]).tolist() == stream
    assert [len(rows[r][0]) for r in ordered[:-1]] == [16] * (len(ordered) - 1)
    assert ordered[0] == "ex0000@0"
    teacher = GPT2LMHeadModel.from_pretrained(str(lm["teacher"])).eval()
    with torch.no_grad():
        for r in ordered[:3]:
            ids = rows[r][0][None]
            expected = teacher(input_ids=ids, token_type_ids=torch.zeros_like(ids)).logits[0]
            assert torch.allclose(rows[r][1], expected, atol=1e-5)

    with pytest.raises(ConfigError, match=r"teachers\[0\]\.model_class: packing"):
        ExportConfig.from_dict({**cfg, "teachers": [{"name": "t", "path": "p"}]})
    with pytest.raises(ConfigError, match=r"data\.label: a packed row .*got 'label'"):
        ExportConfig.from_dict({**cfg, "data": {**cfg["data"], "label": "label"}})
    with pytest.raises(ConfigError, match=r"packing: must be true or false, got 'yes'"):
        ExportConfig.from_dict({**cfg, "packing": "yes"})


def test_pack_rows_adds_the_separator_and_packs_each_copy_apart():
    from cachebrew.components.data import PlanRow, pack_rows

    rows = [PlanRow(f"d{i}", c, "x", None, None, None) for i in range(3) for c in (0, 1)]
    tokens = [{"input_ids": [10 * i + 1, 10 * i + 2] + ([99] if i == 1 else []), "attention_mask": [1] * 2}
              for i in range(3) for _ in (0, 1)]
    packed, toks = pack_rows(rows, tokens, 4, 99, lambda ids: " ".join(map(str, ids)))
    assert [(r.id, r.copy) for r in packed] == [("d0@0", 0), ("d1@1", 0), ("d2@2", 0),
                                                ("d0@0", 1), ("d1@1", 1), ("d2@2", 1)]
    assert [t["input_ids"] for t in toks[:3]] == [[1, 2, 99, 11], [12, 99, 21, 22], [99]]
    assert toks[0]["attention_mask"] == [1, 1, 1, 1] and packed[0].text == "1 2 99 11" and packed[0].label is None


def test_sampled_kd_with_a_flatter_proposal_stays_unbiased():
    """Draws from softmax(l / T_q) with masses count / K * p / q: the averaged gradient is still the dense one's
    (within 5 of its own standard errors, measured over the caches), the weights reach tail ids that the plain
    sampler draws less often, and without importance weights the same draws would be biased."""
    g = torch.Generator().manual_seed(1)
    N, V, K, T, Tq, M = 4, 40, 12, 1.0, 3.0, 4000
    teacher, student = torch.randn(N, V, generator=g) * 3, torch.randn(N, V, generator=g)
    leaf = student.clone().requires_grad_(True)
    kd_ce_loss(leaf, teacher, T).backward()
    dense = leaf.grad
    keys = [row_key(f"cache{m}-row{i}", 0) for m in range(M) for i in range(N)]
    u = uniforms(keys, None, K, seed=2)
    ids, mass = sparse_targets(teacher.repeat(M, 1), "sampled", K, T, u, proposal_temperature=Tq)
    plain_ids, plain_mass = sparse_targets(teacher.repeat(M, 1), "sampled", K, T, u)

    def per_cache_grads(mass):  # (M, N, V): d loss / d student of each cache (loss = mean over its N rows)
        q = torch.softmax(student / T, -1)
        m = torch.zeros(M * N, V).scatter_add_(1, ids, mass).view(M, N, V)
        return (m.sum(-1, keepdim=True) * q - m) / (T * N)

    grads = per_cache_grads(mass)
    assert torch.allclose(grads.mean(0), mean_gradient(student, {"ids": ids, "mass": mass}, T), atol=1e-6)
    stderr = grads.std(0) / M ** 0.5
    z = ((grads.mean(0) - dense).abs() / stderr.clamp_min(1e-9)).max().item()
    # the stored masses are the draw frequencies times p / q: without the weights the target would be q, not p
    p_T, q_T = (torch.softmax(teacher / t, -1).repeat(M, 1).gather(1, ids) for t in (T, Tq))
    freq = torch.where(mass > 0, mass * q_T / p_T, 0.0)
    assert torch.allclose(freq * K, (freq * K).round(), atol=1e-3) and torch.allclose(freq.sum(-1), torch.ones(M * N))
    biased = per_cache_grads(freq)
    z_biased = ((biased.mean(0) - dense).abs() / stderr.clamp_min(1e-9)).max().item()
    def distinct(ids, used):  # distinct (position, id) pairs the caches hold
        rows = torch.arange(M * N)[:, None].expand_as(ids) % N
        return len(set(zip(rows[used].tolist(), ids[used].tolist())))

    plain_used = plain_mass > 0
    print(f"proposal T_q={Tq}: max |mean grad - dense| / stderr {z:.1f} (unweighted counts: {z_biased:.0f}); "
          f"distinct (position, id) pairs drawn {distinct(ids, mass > 0)} vs {distinct(plain_ids, plain_used)} from p")
    assert z < 5 and z_biased > 20
    assert distinct(ids, mass > 0) > distinct(plain_ids, plain_used)
    with pytest.raises(ConfigError, match=r"proposal_temperature: only 'sampled'"):
        ExportConfig.from_dict({"output": "o", "teachers": [{"name": "t", "path": "p"}], "data": {"path": "d"},
                                "outputs": {"sparse_logits": {"method": "topk", "proposal_temperature": 2}}})


def test_export_with_a_proposal_stores_importance_weighted_masses(lm):
    from transformers import GPT2LMHeadModel

    export(lm, "proposal", {"method": "sampled", "k": 8, "temperature": 1.0, "proposal_temperature": 2.5, "seed": 3})
    spec = json.loads((lm["root"] / "proposal" / "manifest.json").read_text())["tensors"][0]
    assert spec["extra"]["proposal_temperature"] == 2.5
    batch = next(iter(CacheBatches(str(lm["root"] / "proposal"), 4, shuffle=False)))
    target, inputs = batch["teacher_cache"]["logits"], batch["student"]
    teacher = GPT2LMHeadModel.from_pretrained(str(lm["teacher"])).eval()
    with torch.no_grad():
        logits = teacher(**{k: v for k, v in inputs.items() if k != "labels"}).logits
    mask = inputs["attention_mask"].bool()
    p, q = (torch.softmax(logits / t, -1).gather(-1, target["ids"])[mask] for t in (1.0, 2.5))
    counts = torch.where(target["mass"][mask] > 0, target["mass"][mask] * q / p * 8, 0.0)
    assert torch.allclose(counts, counts.round(), atol=1e-3) and torch.allclose(counts.sum(-1), torch.full_like(p[:, 0], 8))


@pytest.mark.parametrize("vocab", [40, 1000, 32_000])
def test_draws_are_the_inverse_cdf_of_the_teacher_distribution(vocab):
    """Each stored draw is the id whose cumulative teacher probability first reaches the draw's uniform (a float64
    reference): the same id, or its neighbour where float32 rounding of the cumulative sum moves a boundary."""
    g = torch.Generator().manual_seed(vocab)
    logits = torch.randn(64, vocab, generator=g) * 4
    u = uniforms([row_key(f"r{i}", 0) for i in range(64)], None, 16, seed=0)
    ids, mass = sparse_targets(logits, "sampled", 16, 1.0, u)
    cdf = torch.softmax(logits.double(), -1).cumsum(-1)
    reference = torch.searchsorted(cdf, u * cdf[:, -1:]).clamp(max=vocab - 1).sort(-1).values
    counts = (mass * 16).round().long()
    assert torch.equal(counts.sum(-1), torch.full((64,), 16))
    drawn = torch.stack([torch.repeat_interleave(i, c) for i, c in zip(ids, counts)])  # (64, 16), sorted
    assert (drawn - reference).abs().max() <= 1
    assert (drawn != reference).float().mean() < 0.01


def test_new_export_settings_leave_old_fingerprints_alone():
    """packing: false and no proposal are the settings every earlier cache was made with: they must not change
    the fingerprint (else every existing cache would read as foreign); set, they do."""
    base = {"output": "o", "teachers": [{"name": "t", "path": "p", "model_class": "AutoModelForCausalLM"}],
            "data": {"path": "d", "label": None}, "outputs": {"sparse_logits": {"method": "sampled"}}}
    plain = ExportConfig.from_dict(base).fingerprint_settings()
    assert "packing" not in plain and "proposal_temperature" not in plain["outputs"]["sparse_logits"]
    assert ExportConfig.from_dict({**base, "packing": True}).fingerprint_settings()["packing"] is True
    with_q = ExportConfig.from_dict({**base, "outputs": {"sparse_logits": {"method": "sampled",
                                                                           "proposal_temperature": 2.0}}})
    assert with_q.fingerprint_settings()["outputs"]["sparse_logits"]["proposal_temperature"] == 2.0
    with pytest.raises(ConfigError, match=r"proposal_temperature: 0.5 is below the target's temperature 1"):
        ExportConfig.from_dict({**base, "outputs": {"sparse_logits": {"method": "sampled",
                                                                      "proposal_temperature": 0.5}}})
