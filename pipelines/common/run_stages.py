"""Run a pipeline's stages without DVC: each stage's `cmd` from dvc.yaml, in the order written, in the
pipeline's directory, with ${key.sub} filled from params.yaml, each stage's outs removed first (as DVC
does). No caching or skipping: that is what `dvc repro` adds. Used by every pipelines/<task>/run.sh so the two paths run the same commands.

    python pipelines/common/run_stages.py pipelines/sentiment/dvc.yaml [--only STAGE ...]
"""
import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml


def interpolate(cmd: str, params: dict) -> str:
    def value(match):
        node = params
        for key in match.group(1).split("."):
            if not isinstance(node, dict) or key not in node:
                raise SystemExit(f"params.yaml has no {match.group(1)!r} (used in: {cmd[:80]})")
            node = node[key]
        return str(node)

    return re.sub(r"\$\{([\w.]+)\}", value, cmd)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dvc_yaml")
    ap.add_argument("--only", nargs="*")
    args = ap.parse_args()
    path = Path(args.dvc_yaml).resolve()
    params_file = path.parent / "params.yaml"
    params = yaml.safe_load(params_file.read_text()) if params_file.is_file() else {}
    stages = yaml.safe_load(path.read_text())["stages"]
    for name, stage in stages.items():
        if args.only and name not in args.only:
            continue
        cmd = interpolate(" ".join(stage["cmd"]) if isinstance(stage["cmd"], list) else stage["cmd"], params)
        for out in stage.get("outs", []):
            target = path.parent / (out if isinstance(out, str) else next(iter(out)))
            # as `dvc repro` does: a stage starts from no outputs, so a rerun never meets stale ones
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            elif target.exists() or target.is_symlink():
                target.unlink()
            target.parent.mkdir(parents=True, exist_ok=True)
        print(f"== stage {name}: {cmd}", flush=True)
        if subprocess.run(cmd, shell=True, cwd=path.parent).returncode != 0:
            sys.exit(f"stage {name!r} failed")


if __name__ == "__main__":
    main()
