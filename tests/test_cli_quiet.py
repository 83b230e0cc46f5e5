"""`--no-progress` gives clean logs: no progress bars and no transformers load reports (pipelines, CI), and
the student's loading is said in one line of cachebrew's own."""
import subprocess
import sys
from pathlib import Path

import yaml

from fixtures import make_teacher_dir, make_text_data

HERE = Path(__file__).resolve().parent


def test_no_progress_silences_transformers_bars_and_load_reports(tmp_path):
    teacher = make_teacher_dir(tmp_path / "teacher")  # 2 layers; the student keeps 1: a load report says so
    data = make_text_data(tmp_path / "train.jsonl", n=16)

    def train(name, *flags):
        cfg = {"output_dir": str(tmp_path / name), "seed": 1, "max_length": 16,
               "model": {"path": str(teacher), "overrides": {"num_hidden_layers": 1}},
               "data": {"path": str(data), "text": "sentence", "label": "label"},
               "train": {"epochs": 1, "batch_size": 8}}
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
        res = subprocess.run([sys.executable, "-m", "cachebrew", "train", str(tmp_path / f"{name}.yaml"), *flags],
                             cwd=HERE, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-2000:]
        return res.stdout + res.stderr

    loud = train("loud")
    assert "UNEXPECTED" in loud and "it/s]" in loud  # what the flag must remove is there without it
    quiet = train("quiet", "--no-progress")
    assert "UNEXPECTED" not in quiet and "it/s]" not in quiet and "Writing model shards" not in quiet
    assert "trained on 16 examples" in quiet
    # cachebrew's one line instead of the load report
    assert f"student: layers 0-0 of 2 kept from {teacher}\n" in quiet  # its head comes from the teacher dir
