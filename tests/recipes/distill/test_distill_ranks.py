"""`torchrun cachebrew distill` on N gloo ranks trains what one process trains at the same global batch.

Each global batch is split over the ranks by length (`rank_split: batch`) and every batch-wide loss denominator
(token counts of masked KD, hidden-state MSE and the model's own token-level cross-entropy) is the global batch's,
so DDP's gradient mean is the one-process gradient: classification on 3 ranks, NER on 2, and a run resumed on 2
ranks from a one-process checkpoint, each ending with the one-process weights to float tolerance. The NER run with
`rank_split: records` (record batches dealt, unequal token counts per rank) is the control: it does not match.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from cachebrew.recipes.distill import DistillRunConfig, run_distill
from cachebrew.recipes.export import ExportConfig, run_export
from fixtures import export_config, make_ner_data, make_teacher_dir, make_text_data, tiny_student

pytestmark = pytest.mark.slow
TESTS = Path(__file__).resolve().parents[2]
STUDENT = tiny_student()  # dropout off: each rank would draw its own masks
GLOBAL_BATCH = 6


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    root = tmp_path_factory.mktemp("ranks")
    out = {}
    teacher = make_teacher_dir(root / "teacher")
    data = make_text_data(root / "train.jsonl", n=40, seed=1)
    run_export(ExportConfig.from_dict(export_config(root / "cls", teacher, data, shard_rows=8,
                                                    outputs={"hidden_layers": [2], "attention_layers": []})))
    out["cls"] = str(root / "cls" / "cache")
    ner_teacher = make_teacher_dir(root / "ner_teacher", num_labels=2, token_level=True)
    ner = make_ner_data(root / "ner.jsonl", n=40, seed=1)
    run_export(ExportConfig.from_dict(export_config(
        root / "ner", ner_teacher, ner, shard_rows=8,
        data={"path": str(ner), "text": None, "tokens": "tokens", "label": "tags", "id": None},
        teachers=[{"name": "a", "path": str(ner_teacher), "model_class": "AutoModelForTokenClassification"}],
        outputs={"hidden_layers": [2], "attention_layers": []})))
    out["ner"] = str(root / "ner" / "cache")
    return out


def config(cache, out, ranks, **train):
    return {"output_dir": str(out), "caches": [cache], "student": {"config": dict(STUDENT)}, "seed": 3,
            "distill": {"temperature": 4, "hard_label_weight": 0.5, "intermediate_matches": [
                {"layer_T": 2, "layer_S": 1, "feature": "hidden", "loss": "hidden_mse", "weight": 1,
                 "proj": ["linear", 16, 32]}]},
            "train": {"epochs": None, "steps": 6, "save_every": 3, "batch_size": GLOBAL_BATCH // ranks,
                      "lr": 3e-3, "progress_bar": False, "shuffle_buffer": 16, "verify_caches": False, **train}}


def torchrun(cfg, ranks, tmp_path, *extra):
    path = tmp_path / f"{Path(cfg['output_dir']).name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "LOCAL_RANK", "RANK")}
    env["OMP_NUM_THREADS"] = "1"
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                          str(ranks), "-m", "cachebrew", "distill", str(path), "--no-progress", *extra],
                         cwd=TESTS, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def weights(out):
    return load_file(Path(out) / "last" / "model.safetensors")


def max_diff(a, b):
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.fixture(scope="module")
def one_process(caches, tmp_path_factory):
    root = tmp_path_factory.mktemp("one")
    for task in ("cls", "ner"):
        run_distill(DistillRunConfig.from_dict(config(caches[task], root / task, 1)))
    return root


def test_three_ranks_train_the_one_process_classifier(caches, one_process, tmp_path):
    torchrun(config(caches["cls"], tmp_path / "cls3", 3), 3, tmp_path)
    one, three = weights(one_process / "cls"), weights(tmp_path / "cls3")
    assert max_diff(one, three) < 1e-5, max_diff(one, three)  # measured 3.9e-6: each rank pads to its own length
    halfway = load_file(one_process / "cls" / "checkpoints" / "step-000003" / "student.safetensors")
    assert max_diff(one, halfway) > 1e-3  # the last 3 steps moved the weights: the bound above is not vacuous


def test_two_ranks_train_the_one_process_ner_student_and_dealt_records_do_not(caches, one_process, tmp_path):
    torchrun(config(caches["ner"], tmp_path / "ner2", 2), 2, tmp_path)
    one, two = weights(one_process / "ner"), weights(tmp_path / "ner2")
    assert max_diff(one, two) < 1e-5, max_diff(one, two)
    torchrun(config(caches["ner"], tmp_path / "records", 2, rank_split="records"), 2, tmp_path)
    assert max_diff(one, weights(tmp_path / "records")) > 1e-3  # other rows per step: another run (measured 2e-2)


def test_a_one_process_run_resumes_on_two_ranks(caches, one_process, tmp_path):
    """Resumed from step 3 of the one-process NER run on 2 ranks (batch_size halved, global batch kept)."""
    cut = tmp_path / "cut"
    shutil.copytree(one_process / "ner" / "checkpoints" / "step-000003", cut / "checkpoints" / "step-000003")
    res = torchrun(config(caches["ner"], cut, 2), 2, tmp_path, "--resume")
    assert "resuming" in res.stderr and "another order" not in res.stderr
    one, resumed = weights(one_process / "ner"), weights(cut)
    assert max_diff(one, resumed) < 1e-5, max_diff(one, resumed)
