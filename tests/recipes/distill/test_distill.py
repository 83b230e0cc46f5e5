"""`cachebrew distill`: cache-fed student == online student, kill + resume == uninterrupted, joins, multi-task."""
import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from cachebrew import ConfigError, DistillationConfig, GeneralDistiller, TrainingConfig
from cachebrew.cache import CacheReader
from cachebrew.components.loader import CacheBatches, RankShare
from cachebrew.core.models import hf_adaptor
from cachebrew.core.training import make_optimizer, seed_everything, warmup_linear
from cachebrew.recipes.distill import DistillRunConfig, run_distill
from cachebrew.components.students import build_student
from cachebrew.errors import CacheFormatError, CachebrewError
from cachebrew.recipes.export import ExportConfig, run_export
from fixtures import export_config, make_ner_data, make_teacher_dir, make_text_data, tiny_student

TESTS = Path(__file__).resolve().parents[2]  # cwd of subprocesses: entry points such as slow_teacher:build
STUDENT = tiny_student()
MATCH = [{"layer_T": 2, "layer_S": 1, "feature": "hidden", "loss": "hidden_mse", "weight": 1,
          "proj": ["linear", 16, 32]}]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    teacher, teacher2 = make_teacher_dir(root / "teacher"), make_teacher_dir(root / "teacher2", seed=7)
    train, dev = make_text_data(root / "train.jsonl", n=64, seed=1), make_text_data(root / "dev.jsonl", n=24, seed=2)
    caches = {}
    for name, t, data in (("train", teacher, train), ("dev", teacher, dev), ("train2", teacher2, train)):
        cfg = export_config(root / name, t, data, outputs={"hidden_layers": [0, 2], "attention_layers": []},
                            teachers=[{"name": "b" if name == "train2" else "a", "path": str(t)}])
        run_export(ExportConfig.from_dict(cfg))
        caches[name] = str(root / name / "cache")
    return {"root": root, "teacher": teacher, "caches": caches, "train_data": train}


def distill_cfg(world, out, **over):
    cfg = {"output_dir": str(out), "caches": [world["caches"]["train"]], "eval_cache": world["caches"]["dev"],
           "student": {"config": dict(STUDENT)}, "seed": 3,
           "distill": {"temperature": 4, "hard_label_weight": 0.5, "intermediate_matches": MATCH},
           "train": {"epochs": 2, "batch_size": 8, "lr": 1e-3, "progress_bar": False, "shuffle_buffer": 16}}
    for k, v in over.items():
        cfg[k] = {**cfg[k], **v} if isinstance(v, dict) and isinstance(cfg.get(k), dict) else v
    return cfg


def test_cache_distill_equals_online_distillation(world, tmp_path):
    cfg = DistillRunConfig.from_dict(distill_cfg(world, tmp_path / "run"))
    result = run_distill(cfg)
    assert result.global_step == 16 and result.best is not None and result.teacher is not None
    cached_weights = load_file(tmp_path / "run" / "last" / "model.safetensors")

    # the same job online: the teacher in memory computes its outputs on the same batches, in the same order
    from transformers import AutoModelForSequenceClassification

    teacher = AutoModelForSequenceClassification.from_pretrained(str(world["teacher"]), output_hidden_states=True).eval()
    seed_everything(cfg.seed)
    ds = CacheBatches(cfg.caches, 8, shuffle=True, seed=cfg.seed, buffer_size=16)
    student = build_student(cfg.student, num_labels=2)
    init = copy.deepcopy(student.state_dict())

    class Epochs:  # the cache loader's epoch-dependent order, with the teacher cache removed
        def __init__(self):
            self.epoch = 0

        def __len__(self):
            return len(ds)

        def __iter__(self):
            ds.set_epoch(self.epoch)
            self.epoch += 1
            return iter([{"student": b["student"], "teacher": {k: v for k, v in b["student"].items()}} for b in ds])

    d = GeneralDistiller(TrainingConfig(device="cpu", output_dir=str(tmp_path / "online"), progress_bar=False),
                         DistillationConfig(**cfg.distill), teacher, student, hf_adaptor, hf_adaptor)
    opt = make_optimizer(student, 1e-3, 0.01)
    with d:
        d.train(opt, Epochs(), num_epochs=2, scheduler_class=warmup_linear, max_grad_norm=1.0,
                scheduler_args={"num_warmup_steps": 1, "num_training_steps": 16})
    online = student.state_dict()
    moved = max((online[k] - init[k]).abs().max().item() for k in online)
    diff = max((online[k] - cached_weights[k]).abs().max().item() for k in cached_weights)
    assert moved > 1e-3  # 100x the tolerance below: the comparison is not vacuous
    assert diff < 1e-5, f"cache-fed and online students differ by {diff}"


def test_results_checkpoints_and_reload(world, tmp_path):
    run_distill(DistillRunConfig.from_dict(distill_cfg(world, tmp_path / "run")))
    out = tmp_path / "run"
    results = json.loads((out / "results.json").read_text())
    assert [h["step"] for h in results["history"]] == [8, 16]
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    saved = json.loads((out / "best" / "config.json").read_text())  # trained with every layer's hidden states
    assert not saved.get("output_hidden_states") and not saved.get("output_attentions")  # saved for users: none
    model = AutoModelForSequenceClassification.from_pretrained(str(out / "best")).eval()
    tok = AutoTokenizer.from_pretrained(str(out / "best"))
    assert model(**tok(["good film"], return_tensors="pt")).logits.shape == (1, 2)
    # the reported numbers, counted by hand over the 24 dev rows: the teacher's from the cached logits, the
    # best student's by running best/ on each row alone; best is the history row with the highest accuracy
    rows = list(CacheReader(world["caches"]["dev"]).iter_rows())
    golds = [int(r["labels"]) for r in rows]
    teacher = [int(r["a.logits"].argmax()) for r in rows]
    with torch.no_grad():
        student = [int(model(**{k: torch.as_tensor(r[k]).long()[None] for k in
                                ("input_ids", "attention_mask", "token_type_ids")}).logits.argmax()) for r in rows]
    hand = lambda preds: {"accuracy": sum(p == g for p, g in zip(preds, golds, strict=True)) / 24,
                          "predicted_classes": len(set(preds)), "majority_rate": max(golds.count(0), golds.count(1)) / 24}
    assert results["teacher"]["default"] == pytest.approx(hand(teacher))
    assert results["best"]["default"] == pytest.approx(hand(student))
    assert results["best"] == max(results["history"], key=lambda h: h["score"])
    assert results["best"]["score"] == results["best"]["default"]["accuracy"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000008", "step-000016"]
    with pytest.raises(CachebrewError, match="pass --resume"):
        run_distill(DistillRunConfig.from_dict(distill_cfg(world, out)))


def test_evaluation_runs_an_attention_matching_student_without_its_training_outputs():
    """eval_mode: SDPA and no hidden states/maps while evaluating (same logits), training settings back after."""
    from cachebrew.components.students import StudentConfig
    from cachebrew.recipes.distill.recipe import eval_mode

    torch.manual_seed(0)
    model = build_student(StudentConfig(config=dict(STUDENT, num_hidden_layers=2)), num_labels=3,
                          want_attention=True)
    x = {"input_ids": torch.randint(1, 88, (4, 9)), "attention_mask": torch.ones(4, 9, dtype=torch.long)}
    x["attention_mask"][0, 5:] = 0
    model.eval()
    with torch.no_grad():
        trained = model(**x)
    assert len(trained.attentions) == 2 and model.config._attn_implementation == "eager"
    model.train()
    with eval_mode(model) as m, torch.no_grad():
        assert not m.training and m.config._attn_implementation == "sdpa"
        evaluated = m(**x)
    assert evaluated.attentions is None and evaluated.hidden_states is None
    torch.testing.assert_close(evaluated.logits, trained.logits, rtol=1e-5, atol=1e-6)
    assert model.training and model.config._attn_implementation == "eager"
    assert model.config.output_attentions and model.config.output_hidden_states
    assert len(model(**x).attentions) == 2


@pytest.mark.slow
def test_kill_and_resume_gives_the_same_weights(world, tmp_path):
    def write(name, steps):
        cfg = distill_cfg(world, tmp_path / name, student={"config": None, "entry_point": "slow_teacher:slow_student"},
                          train={"epochs": None, "steps": steps, "save_every": 5, "eval_every": 20,
                                 "gradient_accumulation_steps": 2})
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return path

    env = {**os.environ, "CB_STUDENT_DELAY": "0"}
    cmd = lambda p, *extra: [sys.executable, "-m", "cachebrew", "distill", str(p), "--no-progress", *extra]
    full = subprocess.run(cmd(write("full", 60)), cwd=TESTS, env=env, capture_output=True, text=True)
    assert full.returncode == 0, full.stderr[-2000:]
    path = write("cut", 60)
    proc = subprocess.Popen(cmd(path), cwd=TESTS, env={**env, "CB_STUDENT_DELAY": "0.03"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts = tmp_path / "cut" / "checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline and not (ckpts / "step-000025" / "state.json").exists():
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "cut" / "results.json").exists()
    res = subprocess.run(cmd(path, "--resume"), cwd=TESTS, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "resuming" in res.stderr
    a = load_file(tmp_path / "full" / "last" / "model.safetensors")
    b = load_file(tmp_path / "cut" / "last" / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed run ended with different weights"
    ra, rb = (json.loads((tmp_path / n / "results.json").read_text()) for n in ("full", "cut"))
    assert ra["history"] == rb["history"]


def test_multi_teacher_join(world, tmp_path):
    joined = CacheBatches([world["caches"]["train"], world["caches"]["train2"]], 8, shuffle=False)
    a = CacheBatches(world["caches"]["train"], 8, shuffle=False)
    b = CacheBatches(world["caches"]["train2"], 8, shuffle=False)
    seen = 0
    for j, x, y in zip(joined, a, b, strict=True):  # strict: a truncated stream must fail, not pass
        seen += len(j["ids"])
        assert j["ids"] == x["ids"] == y["ids"]
        mean = (x["teacher_cache"]["logits"] + y["teacher_cache"]["logits"]) / 2
        assert torch.equal(j["teacher_cache"]["logits"], mean)
        assert not torch.equal(x["teacher_cache"]["logits"], y["teacher_cache"]["logits"])
    assert seen == 64
    weighted = CacheBatches([world["caches"]["train"], world["caches"]["train2"]], 8, shuffle=False,
                            teacher_weights={"a": 3.0, "b": 1.0})
    w, x, y = next(iter(weighted)), next(iter(a)), next(iter(b))
    torch.testing.assert_close(w["teacher_cache"]["logits"],
                               (3 * x["teacher_cache"]["logits"] + y["teacher_cache"]["logits"]) / 4)
    with pytest.raises(CacheFormatError, match="exported from different data"):
        CacheBatches([world["caches"]["train"], world["caches"]["dev"]], 8)
    with pytest.raises(CachebrewError, match=r"teacher\(s\) \['zzz'\] not in the caches"):
        CacheBatches([world["caches"]["train"]], 8, teachers=["zzz"])
    result = run_distill(DistillRunConfig.from_dict(distill_cfg(
        world, tmp_path / "mt", caches=[world["caches"]["train"], world["caches"]["train2"]],
        distill={"intermediate_matches": []})))
    assert result.global_step == 16


def test_loader_orders_ranks_workers_and_positions(world):
    path = world["caches"]["train"]
    ds = CacheBatches(path, 8, seed=5, buffer_size=16)
    key = lambda b: tuple(tuple(k) for k in b["ids"])
    e0 = [key(b) for b in ds]
    assert len(e0) == len(ds) == 8 and len({k for b in e0 for k in b}) == 64
    ds.set_epoch(1)
    e1 = [key(b) for b in ds]
    assert e1 != e0 and sorted(sum(e1, ())) == sorted(sum(e0, ()))
    ds.set_position(0, 5)
    assert [key(b) for b in ds] == e0[5:]
    assert [key(b) for b in ds] == e0[5:]  # a position holds until it is changed
    ranks = [CacheBatches(path, 8, seed=5, buffer_size=16, ranks=RankShare(r, 2, "records")) for r in (0, 1)]
    seen = [k for r in ranks for b in r for k in key(b)]
    assert len(seen) == 64 and len(set(seen)) == 64 and all(len(r) == 4 for r in ranks)
    plain = CacheBatches(path, 8, shuffle=False)
    lengths = [b["student"]["input_ids"].shape[1] for b in plain]
    assert len(set(lengths)) > 1  # each batch padded to its own longest row
    b = next(iter(plain))
    assert b["teacher_cache"]["hidden"][1] is None and b["teacher_cache"]["hidden"][2].shape[:2] == \
        b["student"]["input_ids"].shape


def test_multitask_distill(world, tmp_path):
    cfg = distill_cfg(world, tmp_path / "mt", caches=[], eval_cache=None,
                      tasks={"one": {"caches": [world["caches"]["train"]], "eval_cache": world["caches"]["dev"]},
                             "two": {"caches": [world["caches"]["dev"]], "eval_cache": world["caches"]["dev"]}},
                      tau=1.0, train={"epochs": None, "steps": 12, "eval_every": 6})
    cfg["caches"] = []
    result = run_distill(DistillRunConfig.from_dict(cfg))
    assert result.global_step == 12 and set(result.best) >= {"one", "two", "score"}
    assert (tmp_path / "mt" / "last" / "heads.safetensors").exists()
    state = json.loads((tmp_path / "mt" / "checkpoints" / "step-000012" / "state.json").read_text())
    assert sum(state["task_counts"].values()) == 12 and set(state["task_counts"]) <= {"one", "two"}


def test_token_level_distill_reports_entity_f1(world, tmp_path):
    teacher = make_teacher_dir(world["root"] / "ner_teacher", num_labels=2, token_level=True)
    for name, seed in (("ner_train", 1), ("ner_dev", 2)):
        data = make_ner_data(world["root"] / f"{name}.jsonl", n=24, seed=seed)
        run_export(ExportConfig.from_dict(export_config(
            world["root"] / name, teacher, data, data={"path": str(data), "text": None, "tokens": "tokens",
                                                       "label": "tags", "id": None},
            teachers=[{"name": "a", "path": str(teacher), "model_class": "AutoModelForTokenClassification"}],
            outputs={"hidden_layers": [2], "attention_layers": []})))
    cfg = distill_cfg(world, tmp_path / "ner", caches=[str(world["root"] / "ner_train" / "cache")],
                      eval_cache=str(world["root"] / "ner_dev" / "cache"))
    result = run_distill(DistillRunConfig.from_dict(cfg))
    # the teacher's entity F1 counted by hand from the eval cache: tags are only B-POS and O, so every entity is
    # one B-POS token and a predicted entity is right exactly where both say B-POS at the same word
    reader = CacheReader(world["root"] / "ner_dev" / "cache")
    pos = reader.manifest.label_names.index("B-POS")
    tp = n_pred = n_gold = right = tokens = 0
    for r in reader.iter_rows():
        labelled = torch.as_tensor(r["labels"]) != -100
        pred, gold = r["a.logits"].argmax(-1)[labelled], torch.as_tensor(r["labels"])[labelled]
        tp += int(((pred == pos) & (gold == pos)).sum())
        n_pred, n_gold = n_pred + int((pred == pos).sum()), n_gold + int((gold == pos).sum())
        right, tokens = right + int((pred == gold).sum()), tokens + len(gold)
    assert n_gold > 0 and n_pred > 0
    p, rec = tp / n_pred, tp / n_gold
    assert result.teacher["default"] == pytest.approx({"precision": p, "recall": rec, "token_accuracy": right / tokens,
                                                       "f1": 2 * p * rec / (p + rec) if tp else 0.0})
    assert result.best["score"] == result.best["default"]["f1"]  # token-level runs select on entity F1
    assert {"f1", "precision", "recall", "token_accuracy"} == set(result.best["default"])


def test_config_errors():
    with pytest.raises(ConfigError) as e:
        DistillRunConfig.from_dict({"student": {"path": "x", "config": {}}, "train": {"epochs": 2, "steps": 3,
                                                                                    "lr": -1, "bogus": 1},
                                    "distill": {"temperature": 0}, "extra": 1})
    text = str(e.value)
    for part in ("output_dir: required", "student: give exactly one", "caches: at least one",
                 "train: give exactly one of epochs or steps", "train.lr", "train.bogus: unknown field",
                 "distill.temperature: must be a number > 0", "extra: unknown field"):
        assert part in text, part


def test_a_gpu_saved_checkpoint_resumes_on_cpu(world, tmp_path, monkeypatch, caplog):
    """optimizer.pt written on cuda:0 (storages tagged so, as torch.save does on a GPU) resumes here, exactly."""
    cfg = distill_cfg(world, tmp_path / "full", train={"epochs": None, "steps": 6, "save_every": 3, "eval_every": 6})
    run_distill(DistillRunConfig.from_dict(cfg))
    cut = tmp_path / "cut"
    run_distill(DistillRunConfig.from_dict({**cfg, "output_dir": str(cut)}))  # then undone back to step 3
    for stale in ("last", "best", "results.json", "checkpoints/step-000006"):
        p = cut / stale
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    ckpt = cut / "checkpoints" / "step-000003"
    assert json.loads((ckpt / "state.json").read_text())["rng"][0].keys() >= {"torch", "python", "numpy"}
    for name in ("optimizer.pt", "scheduler.pt"):
        state = torch.load(ckpt / name, weights_only=True)
        with monkeypatch.context() as m:
            m.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
            torch.save(state, ckpt / name)
    with pytest.raises(RuntimeError, match="CUDA"):  # what a load without map_location does on this machine
        torch.load(ckpt / "optimizer.pt", weights_only=True)
    state = json.loads((ckpt / "state.json").read_text())
    assert state["loader"] == {"global_batch": 8, "num_workers": 0}
    state["loader"]["num_workers"] = 2  # as if a GPU run (2 workers by default) were resumed here
    (ckpt / "state.json").write_text(json.dumps(state))
    with caplog.at_level("WARNING", logger="cachebrew"):
        run_distill(DistillRunConfig.from_dict({**cfg, "output_dir": str(cut)}), resume=True)
    assert "read in another order" in caplog.text
    a, b = (load_file(d / "last" / "model.safetensors") for d in (tmp_path / "full", cut))
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed from a GPU-saved checkpoint, ended elsewhere"


@pytest.mark.slow
def test_two_rank_resume_restores_each_ranks_own_rng(world, tmp_path):
    """torchrun, 2 gloo ranks, dropout on: each rank saves its own RNG stream and a resumed run ends equal."""
    cfg = distill_cfg(world, tmp_path / "x", student={"config": {**STUDENT, "hidden_dropout_prob": 0.2}},
                      train={"epochs": None, "steps": 6, "save_every": 3, "eval_every": 6, "batch_size": 4})
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "LOCAL_RANK", "RANK")}
    env["OMP_NUM_THREADS"] = "1"

    def run(name, *extra):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({**cfg, "output_dir": str(tmp_path / name)}))
        res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                              "-m", "cachebrew", "distill", str(path), "--no-progress", *extra],
                             cwd=TESTS, env=env, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        return res

    run("full")
    run("cut")  # the same run, then undone back to its step-3 checkpoint
    for stale in ("last", "best", "results.json", "checkpoints/step-000006"):
        p = tmp_path / "cut" / stale
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    rng = json.loads((tmp_path / "cut" / "checkpoints" / "step-000003" / "state.json").read_text())["rng"]
    assert len(rng) == 2 and rng[0]["torch"] != rng[1]["torch"]  # the ranks' dropout streams have diverged
    assert "resuming" in run("cut", "--resume").stderr
    a, b = (load_file(tmp_path / n / "last" / "model.safetensors") for n in ("full", "cut"))
    assert all(torch.equal(a[k], b[k]) for k in a), "a resumed 2-rank run ended with different weights"


def test_eval_shares_cover_every_row_exactly_once(world):
    """Evaluation is split over ranks (`RankShare(evaluation=True)`): every eval row is scored by exactly one rank, also when
    the ranks' shares differ in batch count — where a training split (every rank as many batches as the shortest)
    would drop rows."""
    dev = world["caches"]["dev"]
    n = CacheReader(dev).num_rows
    for ranks in (1, 2, 3, 5):
        rows = {even: [int(i) for r in range(ranks) for _, batch in CacheBatches(
            dev, 4, shuffle=False, ranks=RankShare(r, ranks, "records", evaluation=not even)).plan(0)
            for i in batch]
            for even in (True, False)}
        assert sorted(rows[False]) == list(range(n)), ranks
        if ranks == 5:  # 24 rows: shares of 4, 5, 5, 5, 5 rows are 1 and 2 batches of 4
            assert len(rows[True]) < n


@pytest.mark.slow
def test_two_ranks_score_the_eval_cache_once_and_log_once(world, tmp_path):
    """torchrun, 2 gloo ranks: the eval scores in results.json equal one process scoring the saved student over the
    whole eval cache (each rank scored its share, the shares were gathered), and the summary is printed once."""
    from cachebrew.recipes.distill.recipe import evaluate
    from transformers import AutoModelForSequenceClassification

    cfg = distill_cfg(world, tmp_path / "run", train={"epochs": None, "steps": 6, "eval_every": 3, "batch_size": 4})
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "LOCAL_RANK", "RANK")}
    env["OMP_NUM_THREADS"] = "1"
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "cachebrew", "distill", str(path), "--no-progress"],
                         cwd=TESTS, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count(": 6 steps,") == 1, res.stdout
    assert res.stderr.count("eval at step 6") == 1, res.stderr  # rank 1 logs warnings only
    final = json.loads((tmp_path / "run" / "results.json").read_text())["final"]
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "run" / "last")
    ds = CacheBatches(world["caches"]["dev"], 4, shuffle=False)
    mine, _ = evaluate(model, ds, torch.device("cpu"), ds.joined.manifest.label_names)
    assert final["default"] == mine and mine["accuracy"] * ds.joined.num_rows == round(mine["accuracy"] * 24)


@pytest.mark.slow
def test_resume_on_two_nodes_without_a_shared_output_dir(world, tmp_path):
    """Two torchrun 'nodes' (one process each) whose output_dir are different local folders: rank 0's node holds
    the checkpoints, the other node's folder is empty. `--resume` continues from rank 0's checkpoint on both (the
    other node receives it) and ends with the weights of an uninterrupted 2-process run."""
    import socket

    cfg = distill_cfg(world, tmp_path / "x", train={"epochs": None, "steps": 6, "save_every": 3, "eval_every": 6,
                                                     "batch_size": 4})
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "LOCAL_RANK", "RANK")}
    env["OMP_NUM_THREADS"] = "1"
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))

    def two_nodes(outs, *extra):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank",
                                   str(node), "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port",
                                   str(port), "-m", "cachebrew", "distill", str(path), "--no-progress",
                                   "--set", f"output_dir={out}", *extra],
                                  cwd=TESTS, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for node, out in enumerate(outs)]
        results = [p.communicate(timeout=300) for p in procs]
        for p, (out, err) in zip(procs, results):
            assert p.returncode == 0, err[-3000:]
        return results

    two_nodes([tmp_path / "full0", tmp_path / "full1"])
    two_nodes([tmp_path / "cut0", tmp_path / "cut1"])
    for stale in ("last", "best", "results.json", "checkpoints/step-000006"):  # undo back to the step-3 checkpoint
        p = tmp_path / "cut0" / stale
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    shutil.rmtree(tmp_path / "cut1", ignore_errors=True)  # the other node's disk holds nothing of the run
    (tmp_path / "cut1").mkdir()
    (_, err0), (_, err1) = two_nodes([tmp_path / "cut0", tmp_path / "cut1"], "--resume")
    assert "resuming" in err0 and "received it from rank 0" in err1 + err0
    a, b = (load_file(tmp_path / n / "last" / "model.safetensors") for n in ("full0", "cut0"))
    assert all(torch.equal(a[k], b[k]) for k in a), "a resumed 2-node run ended with different weights"
    assert not list((tmp_path / "cut1").rglob("*.from-rank-0*")), "the received copy is left behind"


def test_a_run_writes_one_kind_of_checkpoint(world, tmp_path):
    """The files a `cachebrew distill` run writes: its checkpoints/step-N (the one checkpoint path), best/, last/,
    results.json and tensorboard logs, and nothing else: TextBrewer's gs{N}.safetensors stay with TextBrewer's API."""
    cfg = distill_cfg(world, tmp_path / "run", train={"epochs": 2, "save_every": 4, "eval_every": 4})
    run_distill(DistillRunConfig.from_dict(cfg))
    out = tmp_path / "run"
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert not [f for f in files if Path(f).name.startswith("gs")], files
    assert sorted({f.split("/")[0] for f in files}) == ["best", "checkpoints", "last", "results.json", "tb"]
    steps = sorted({f.split("/")[1] for f in files if f.startswith("checkpoints/")})
    assert steps == ["step-000012", "step-000016"]  # every 4 steps (16 in all), the newest keep_checkpoints=2
    for step in steps:
        assert sorted(f.split("/")[2] for f in files if f.startswith(f"checkpoints/{step}/")) == [
            "optimizer.pt", "projections.safetensors", "scheduler.pt", "state.json", "student.safetensors"]
    state = json.loads((out / "checkpoints" / "step-000016" / "state.json").read_text())
    assert (state["epoch"], state["step"]) == (2, 0)  # after the last step of epoch 2: the plan's position
    state = json.loads((out / "checkpoints" / "step-000012" / "state.json").read_text())
    assert (state["epoch"], state["step"]) == (1, 4)
