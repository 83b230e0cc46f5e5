"""pipelines/common/report.py: the results table's gap column, the flat metrics file `dvc exp show` reads,
and the note that flags a model predicting one class."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _result(path, acc, classes=2, majority=0.5):
    path.write_text(json.dumps({"accuracy": acc, "predicted_classes": classes, "majority_rate": majority,
                                "parameters": 15_600_000, "size_mb": 59.6, "inference_examples_per_second": 200.0,
                                "device": "cpu"}))
    return str(path)


def _report(tmp_path, baseline_classes=2):
    files = [_result(tmp_path / "t.json", 0.80), _result(tmp_path / "b.json", 0.70, baseline_classes, 0.7),
             _result(tmp_path / "d.json", 0.775)]
    res = subprocess.run([sys.executable, str(ROOT / "pipelines/common/report.py"), *files,
                          "--names", "teacher", "student, no distillation", "student, distilled",
                          "--teacher", "0", "--baseline", "1", "--keys", "teacher", "no_kd", "distilled",
                          "--metrics", str(tmp_path / "metrics.json"), "--out", str(tmp_path / "table.md")],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    return (tmp_path / "table.md").read_text(), json.loads((tmp_path / "metrics.json").read_text())


def test_gap_column_and_metrics(tmp_path):
    table, metrics = _report(tmp_path)
    assert "| student, distilled | 77.50 | 75 % |" in table  # (77.5 - 70) / (80 - 70)
    assert "| student, no distillation | 70.00 | |" in table
    assert metrics == {"teacher": 80.0, "no_kd": 70.0, "distilled": 77.5, "distilled_gap_closed": 0.75}
    assert "predicts one class" not in table


def test_a_collapsed_model_is_flagged(tmp_path):
    table, _ = _report(tmp_path, baseline_classes=1)
    assert "**student, no distillation predicts one class on every test example** (accuracy = majority rate 70.00)" \
        in table
