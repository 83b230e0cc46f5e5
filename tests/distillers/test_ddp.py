"""DDP under torchrun (2 processes, gloo, CPU) gives the same student as 1 process with the same global batch."""
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the worker scripts live in tests/


def _run(cmd, env_extra=None):
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "LOCAL_RANK", "RANK")}
    env.update(env_extra or {})
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]


@pytest.mark.slow
def test_ddp_two_processes_equals_one(tmp_path):
    worker = os.path.join(TESTS, "ddp_worker.py")
    _run([sys.executable, worker, str(tmp_path / "single")])
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", worker,
          str(tmp_path / "ddp")], {"OMP_NUM_THREADS": "1"})
    for name in ("final.safetensors", "proj.safetensors"):
        one, two = load_file(tmp_path / "single" / name), load_file(tmp_path / "ddp" / name)
        assert one.keys() == two.keys()
        worst = max((one[k] - two[k]).abs().max().item() for k in one)
        assert worst < 1e-5, f"{name}: max difference {worst}"
    # training moved the weights, so the comparison is not vacuous
    from helpers import tiny_bert

    init = tiny_bert(seed=1, layers=2, hidden=32).state_dict()
    final = load_file(tmp_path / "ddp" / "final.safetensors")
    assert max((final[k] - init[k]).abs().max().item() for k in final) > 1e-3
    # 32 examples, global batch 8, accumulation 2: 2 optimizer steps per epoch, saved at each epoch end
    assert sorted(f for f in os.listdir(tmp_path / "ddp") if f.startswith("gs")) == ["gs2.safetensors", "gs4.safetensors"]
