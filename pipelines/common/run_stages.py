"""Run a pipeline's stages without DVC: each stage's `cmd` from dvc.yaml, in the order written, in the
pipeline's directory, with ${key.sub} filled from params.yaml as DVC fills it (a dict unpacks to
`--key value ...`, a list value to `--key v1 v2`), a `foreach:` stage expanded into one stage per item
(`name@item`, `${item}` filled), each stage's outs removed first (as DVC does). No caching or skipping:
that is what `dvc repro` adds. Used by every pipelines/<task>/run.sh so the two paths run the same commands.

    python pipelines/common/run_stages.py pipelines/trec/dvc.yaml [--only STAGE ...]   # STAGE: name or name@item
"""
import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

PLACEHOLDER = re.compile(r"\$\{\s*([\w.]+)\s*\}")


def lookup(params: dict, dotted: str, where: str):
    node = params
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            raise SystemExit(f"params.yaml has no {dotted!r} (used in: {where[:80]})")
        node = node[key]
    return node


def unpack(value) -> str:
    """A value in a command, as DVC writes it: a dict as `--key value` flags (lists as `--key v1 v2`)."""
    if isinstance(value, dict):
        parts = []
        for k, v in value.items():
            parts.append(f"--{k} " + (" ".join(map(str, v)) if isinstance(v, list) else str(v)))
        return " ".join(parts)
    if isinstance(value, list):
        raise SystemExit(f"cannot put a list into a command ({value!r}); DVC cannot either: use a dict")
    return str(value)


def interpolate(text: str, params: dict) -> str:
    return PLACEHOLDER.sub(lambda m: unpack(lookup(params, m.group(1), text)), text)


def expand(stages: dict, params: dict):
    """(name, stage) in order, a `foreach` stage as one stage per item with `${item}` (and `${key}` for a dict)."""
    for name, stage in stages.items():
        if "foreach" not in stage:
            yield name, stage
            continue
        items = stage["foreach"]
        if isinstance(items, str):
            match = PLACEHOLDER.fullmatch(items.strip())
            items = lookup(params, match.group(1), items) if match else items
        pairs = items.items() if isinstance(items, dict) else ((item, item) for item in items)
        for key, item in pairs:
            yield f"{name}@{key}", yaml.safe_load(interpolate(yaml.safe_dump(stage["do"]),
                                                              {**params, "item": item, "key": key}))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dvc_yaml")
    ap.add_argument("--only", nargs="*", help="stages to run: a name runs all of a foreach stage's items")
    args = ap.parse_args()
    path = Path(args.dvc_yaml).resolve()
    params_file = path.parent / "params.yaml"
    params = yaml.safe_load(params_file.read_text()) if params_file.is_file() else {}
    stages = yaml.safe_load(path.read_text())["stages"]
    for name, stage in expand(stages, params):
        if args.only and name not in args.only and name.split("@")[0] not in args.only:
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
