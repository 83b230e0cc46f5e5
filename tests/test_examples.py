"""The README's quickstart, run as a user runs it: `python examples/quickstart.py` exits 0 and reports that the
cache-fed student equals the online one (the script itself exits 1 when they differ)."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_runs_and_the_cache_fed_student_equals_the_online_one(tmp_path):
    res = subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart.py")], cwd=tmp_path,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "cache-fed student == online student: True" in res.stdout, res.stdout[-2000:]
    agree = [line for line in res.stdout.splitlines() if "agrees with the teacher on" in line]
    assert len(agree) == 2 and agree[0].split(" on ")[-1] == agree[1].split(" on ")[-1], agree
