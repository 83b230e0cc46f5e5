"""benchmarks/gpu.sh, the GPU benchmark suite, at toy size on the CPU (SMOKE=1): it runs every step, prints one
ratio table with a number for every arm, and a failing step does not stop the ones after it."""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GPU_SH = ROOT / "benchmarks" / "gpu.sh"
sys.path.insert(0, str(ROOT / "benchmarks"))

ARMS = ["ceiling", "cache", "cache_mem", "online", "textbrewer", "hf_cache", "hf_online"]
DISTILL = ["distill, KD on logits", "distill, KD + 4 hidden_mse (projected)"]
EXPORT_CONFIGS = ["logits only", "logits + 4 hidden", "causal LM, sampled 16"]


def run_suite(out: Path, timeout: int, **env) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if not k.startswith("GPU_SUITE_")}
    # the suite runs `python3`: this interpreter's, whatever PATH says
    e.update(SMOKE="1", PATH=f"{Path(sys.executable).parent}{os.pathsep}{e.get('PATH', '')}", **env)
    return subprocess.run(["bash", str(GPU_SH), str(out)], cwd=ROOT, env=e, capture_output=True, text=True,
                          timeout=timeout)


def table_rows(markdown: str) -> list[list[str]]:
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in markdown.splitlines()
            if line.startswith("|")]
    return [r for r in rows if r[0] not in ("benchmark",) and not set(r[0]) <= set("-:")]


def number(cell: str) -> float:
    """The median of a 'median (min-max)' cell; fails on MISSING, empty or NaN."""
    m = re.match(r"^(-?\d+(?:\.\d+)?) \(", cell)
    assert m, f"not a number: {cell!r}"
    value = float(m.group(1))
    assert math.isfinite(value), cell
    return value


@pytest.mark.slow
def test_smoke_runs_every_step_and_prints_a_number_for_every_arm(tmp_path):
    out = tmp_path / "out"
    res = run_suite(out, timeout=420)
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-3000:]
    for step in ("setup", "distill_logits", "distill_hidden", "export", "reader", "ratios"):
        assert re.search(rf"^\s+{step}\s+passed\b", res.stdout, re.M), res.stdout[-3000:]
        assert (out / "logs" / f"{step}.log").is_file()
    table = (out / "ratios.md").read_text()
    assert table in res.stdout  # printed, and written
    assert "MISSING" not in table and "nan" not in table.lower(), table
    rows = table_rows(table)
    cells = {(r[0], r[1]): r[2] for r in rows}
    for bench in DISTILL:
        for arm in ARMS:  # each arm's own rate
            assert number(cells[(bench, arm)]) > 0, (bench, arm)
        for ratio in ("cache / ceiling", "cache / cache_mem", "cache / online", "cache / textbrewer",
                      "hf_cache / hf_online"):
            assert number(cells[(bench, ratio)]) > 0, (bench, ratio)
    for config in EXPORT_CONFIGS:
        benches = [b for b, _ in cells if b.startswith(f"export, {config} (")]
        assert benches, config
        for name in ("export / bare forward (end to end)", "export / bare forward (marginal)"):
            number(cells[(benches[0], name)])
    assert number(cells[("reader, hidden cache", "1 workers / main process (rows/s)")]) > 0
    for _, _, value in rows:
        number(value)
    # one precision for every arm, stated in the table and in each JSON
    assert table.count("precision bf16 autocast on every arm") == 3, table
    for config in ("logits", "hidden"):
        run = json.loads((out / f"distill_{config}.json").read_text())
        assert run["precision"] == "bf16 autocast on every arm" and run["failed"] == {}
        assert sorted(run["arms"]) == sorted(ARMS)
    assert json.loads((out / "export.json").read_text())["precision"] == "bf16 autocast on every arm"


@pytest.mark.slow
def test_a_failing_step_does_not_stop_the_later_ones(tmp_path):
    out = tmp_path / "out"
    (out).mkdir()
    (out / "distill_logits.json").write_text("{}")  # a figure from an earlier run must not survive a failure
    res = run_suite(out, timeout=240, GPU_SUITE_ONLY="distill_logits reader", GPU_SUITE_FAIL="distill_logits")
    assert res.returncode == 1, res.stdout[-4000:] + res.stderr[-2000:]
    text = res.stdout
    assert re.search(r"^\s+distill_logits\s+FAILED \(exit 1\)", text, re.M), text[-3000:]
    assert re.search(r"^\s+reader\s+passed\b", text, re.M), text[-3000:]  # ran after the failure
    assert re.search(r"^\s+ratios\s+INCOMPLETE", text, re.M)  # the table says a figure is missing
    assert "fails on purpose" in text  # the failing step's log tail, traceback included, is printed
    assert "Traceback" in (out / "logs" / "distill_logits.log").read_text()
    assert not (out / "distill_logits.json").exists()
    assert (out / "reader.json").is_file()
    table = (out / "ratios.md").read_text()
    assert "MISSING: distill_logits.json" in table
    assert number({r[0]: r[2] for r in table_rows(table)}["reader, hidden cache"]) > 0
    assert "2 step(s) failed or incomplete" in res.stderr


def test_ratio_table_reports_a_failed_arm_as_missing(tmp_path, capsys):
    import ratio_table

    rounds = {"ceiling": [100.0, 110.0], "cache": [90.0, 95.0], "cache_mem": [92.0, 99.0], "online": [40.0, 45.0]}
    (tmp_path / "distill_logits.json").write_text(json.dumps({
        "rounds": rounds, "arms": ARMS[:5], "failed": {"textbrewer": "RuntimeError: boom"},
        "precision": "bf16 autocast on every arm", "device": "CPU", "timing": "2 timed steps"}))
    with pytest.raises(SystemExit) as exit_:
        ratio_table.main([str(tmp_path), "--expect", "distill_logits", "export"])
    assert exit_.value.code == 3
    text = capsys.readouterr().out
    cells = {(r[0], r[1]): r[2] for r in table_rows(text)}
    assert cells[("distill, KD on logits", "textbrewer")] == "MISSING"
    assert cells[("distill, KD on logits", "cache / textbrewer")] == "MISSING"
    assert number(cells[("distill, KD on logits", "cache / ceiling")]) == round((90 / 100 + 95 / 110) / 2, 2)
    assert "arm textbrewer (RuntimeError: boom)" in text and "export.json" in text


def test_step_timer_times_the_steps_after_warm_up():
    import time

    import torch

    from suite_timing import StepTimer, apply_precision, describe_precision

    timer = StepTimer("cpu", warmup=2, steps=3)
    for i in range(6):  # a loop marking after each step: steps 2, 3, 4 are timed, the warm-up's 0.6 s is not
        timer.mark(i)
        time.sleep(0.01 if i in (2, 3, 4) else 0.3)
    assert 0.025 < timer.seconds() < 0.5
    short = StepTimer("cpu", warmup=2, steps=3)
    for i in range(4):
        short.mark(i)
    with pytest.raises(RuntimeError, match="fewer than 5 steps"):
        short.seconds()
    switches = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        assert apply_precision("fp32") is None and not torch.backends.cuda.matmul.allow_tf32
        assert apply_precision("bf16") == "bf16" and torch.backends.cuda.matmul.allow_tf32
    finally:  # process-wide: put them back
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = switches
    assert describe_precision("bf16", "cuda") == "bf16 autocast on every arm, TF32 on"
    assert describe_precision("fp32", "cpu") == "fp32 on every arm"
