"""The study's records: one JSON file per finished piece of work, the memo every stage reads before it trains.

    <out>/runs/<task>/teacher.json, teacher2.json        a fine-tuned teacher: test metrics, seconds, weights hash
    <out>/runs/<task>/export-<cache>.json                an export: rows, seconds (arm 4's budget counts them)
    <out>/runs/<task>/<arm>/<variant>/seed-<n>.json      a trained student: its settings, steps, seconds, dev, test
    <out>/runs/<task>/teachers-mean.json                 the two teachers' mean logits scored on test

A stage that finds its record returns it instead of training (so an interrupted study resumes where it stopped
and a changed stage reruns only what it changes); a record made with other settings is refused rather than
reused. With ``replay=True`` nothing trains at all: the tables are rebuilt from the records alone, and a missing
one is an error naming it.
"""
from __future__ import annotations

import json
from pathlib import Path

from cachebrew.core.files import atomic_write_text


class MissingRecord(SystemExit):
    """A replay needed a record that is not there."""


class Records:
    def __init__(self, root: Path, replay: bool = False):
        self.root, self.replay = Path(root), replay

    def path(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    def get(self, *parts: str) -> dict | None:
        p = self.path(*parts)
        return json.loads(p.read_text()) if p.exists() else None

    def put(self, obj: dict, *parts: str) -> dict:
        p = self.path(*parts)
        p.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(p, json.dumps(obj, indent=2))
        return obj

    def run(self, task: str, arm: str, variant: str, seed: int, params: dict) -> dict | None:
        """The record of a student run with these settings, or None (to train it); other settings are refused."""
        parts = (task, arm, variant, f"seed-{seed}.json")
        rec = self.get(*parts)
        if rec is None:
            self.require(*parts)
            return None
        if rec["params"] != json.loads(json.dumps(params)):
            raise SystemExit(f"{self.path(*parts)}: recorded with other settings than this run's ({rec['params']} vs "
                             f"{params}); move it away to train this run again")
        return rec

    def require(self, *parts: str) -> None:
        """In a replay, the record must exist (nothing trains)."""
        if self.replay and not self.path(*parts).exists():
            raise MissingRecord(f"{self.path(*parts)}: not recorded; a replay rebuilds the tables from records only")
