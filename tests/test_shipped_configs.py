"""Every config shipped in pipelines/ validates, and each pipeline's dvc.yaml and run.sh run the same configs."""
import re
from pathlib import Path

import pytest
import yaml

from cachebrew.distill import DistillRunConfig
from cachebrew.export import ExportConfig
from cachebrew.finetune import FinetuneConfig

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
def test_shipped_config_validates(path):
    cfg = _kind(path).from_file(path)
    assert cfg is not None


@pytest.mark.parametrize("pipe", sorted(p.parent for p in PIPES.glob("*/dvc.yaml")), ids=lambda p: p.name)
def test_dvc_and_run_sh_agree(pipe):
    dvc = yaml.safe_load((pipe / "dvc.yaml").read_text())
    cmds = " ".join(stage["cmd"] for stage in dvc["stages"].values())
    run_sh = (pipe / "run.sh").read_text()
    used = set(re.findall(r"configs/(\w+)\.yaml", cmds))
    on_disk = {p.stem for p in (pipe / "configs").glob("*.yaml")}
    assert used == on_disk, f"configs not run by dvc.yaml: {on_disk - used}; missing: {used - on_disk}"
    for name in on_disk:
        assert name in run_sh or "export_$c" in run_sh, name
    for stage in dvc["stages"].values():
        for p in stage.get("params", []):
            if isinstance(p, dict):
                assert all((pipe / f).is_file() for f in p), p
    assert set(dvc["stages"]) >= {"prepare-data", "train-teacher", "export", "distill", "evaluate"}
