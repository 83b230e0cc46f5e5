"""Every config shipped in pipelines/ validates, and each pipeline's dvc.yaml and run.sh run the same configs."""
import re
from pathlib import Path

import pytest
import yaml

from cachebrew.recipes.distill import DistillRunConfig
from cachebrew.recipes.export import ExportConfig
from cachebrew.recipes.finetune import FinetuneConfig

PIPES = Path(__file__).resolve().parents[1] / "pipelines"
CONFIGS = sorted(PIPES.glob("*/configs/*.yaml"))


def _kind(path: Path):
    name = path.stem
    if name.startswith("export"):
        return ExportConfig
    if name.startswith("distill"):
        return DistillRunConfig
    return FinetuneConfig


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parent.parent.name}/{p.name}")
def test_shipped_config_validates_as_its_own_kind(path):
    """The file's `kind:` is the kind the pipeline runs it as, and the file validates as that kind."""
    from cachebrew.cli import validate_file

    (what, cfg), = validate_file(path).items()
    assert isinstance(cfg, _kind(path)), what


# the pipelines of `cachebrew` commands over config files (the study's own dvc.yaml is tests/test_study.py's)
@pytest.mark.parametrize("pipe", sorted(p.parent for p in PIPES.glob("*/dvc.yaml") if (p.parent / "configs").is_dir()),
                         ids=lambda p: p.name)
def test_every_config_is_run_by_a_stage(pipe):
    dvc = yaml.safe_load((pipe / "dvc.yaml").read_text())
    cmds = " ".join(stage.get("do", stage)["cmd"] for stage in dvc["stages"].values())  # foreach: in `do`
    used = set(re.findall(r"configs/(\w+)\.yaml", cmds))
    on_disk = {p.stem for p in (pipe / "configs").glob("*.yaml")}
    assert used == on_disk, f"configs not run by dvc.yaml: {on_disk - used}; missing: {used - on_disk}"
    for stage in dvc["stages"].values():
        for p in stage.get("do", stage).get("params", []):
            if isinstance(p, dict):
                assert all((pipe / f).is_file() for f in p), p
    assert set(dvc["stages"]) >= {"prepare-data", "train-teacher", "export", "distill", "evaluate"}
    assert "run_stages.py" in (pipe / "run.sh").read_text()


def test_run_stages_runs_dvc_commands_in_order_with_params(tmp_path):
    import subprocess
    import sys

    (tmp_path / "params.yaml").write_text("data: {n: 7}\nname: x\n")
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {
        "one": {"cmd": "echo first ${data.n} >> log.txt", "outs": ["out/a"]},
        "two": {"cmd": "echo second ${name} >> log.txt"}}}))
    runner = PIPES / "common" / "run_stages.py"
    (tmp_path / "out" / "a").mkdir(parents=True)
    (tmp_path / "out" / "a" / "stale").write_text("from an earlier run")
    subprocess.run([sys.executable, str(runner), str(tmp_path / "dvc.yaml")], check=True, capture_output=True)
    assert (tmp_path / "log.txt").read_text().split("\n")[:2] == ["first 7", "second x"]
    assert not (tmp_path / "out" / "a").exists() and (tmp_path / "out").is_dir()  # outs removed first, as DVC does
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"bad": {"cmd": "echo ${nope.x}"}}}))
    res = subprocess.run([sys.executable, str(runner), str(tmp_path / "dvc.yaml")], capture_output=True, text=True)
    assert res.returncode != 0 and "params.yaml has no 'nope.x'" in res.stderr


def test_run_stages_expands_foreach_and_unpacks_dicts_as_dvc_does(tmp_path):
    """The main job's per-seed stages: `foreach: ${students.seeds}` runs one stage per seed with `${item}` filled
    (outs too), and `${students}` unpacks to `--seeds 1 2` — the command DVC runs (tests/test_pipelines.py)."""
    import subprocess
    import sys

    (tmp_path / "params.yaml").write_text("students: {seeds: [1, 2]}\n")
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {
        "train": {"foreach": "${students.seeds}",
                  "do": {"cmd": "mkdir -p m && echo seed ${item} >> log.txt && touch m/s-${item}",
                         "outs": ["m/s-${item}"]}},
        "report": {"cmd": "echo report ${students} >> log.txt"}}}, sort_keys=False))
    runner = PIPES / "common" / "run_stages.py"
    res = subprocess.run([sys.executable, str(runner), str(tmp_path / "dvc.yaml")], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "log.txt").read_text().splitlines() == ["seed 1", "seed 2", "report --seeds 1 2"]
    assert "== stage train@2:" in res.stdout
    (tmp_path / "log.txt").unlink()
    subprocess.run([sys.executable, str(runner), str(tmp_path / "dvc.yaml"), "--only", "train@2"], check=True,
                   capture_output=True)
    assert (tmp_path / "log.txt").read_text().splitlines() == ["seed 2"]
