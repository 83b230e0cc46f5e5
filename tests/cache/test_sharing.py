"""`cachebrew push`, `pull` and `inspect` through the real command line, on local targets: a plain directory
and a file:// URI (S3 is tests/test_reliability.py's). Copies read back identical; a destination holding
another cache is refused without a traceback."""
import json
import shutil

import numpy as np
import pytest
import torch

from cachebrew.cache import CacheReader
from cachebrew.cache.sharing import copy_cache
from fixtures import make_cache
from helpers import run_cli



@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return make_cache(tmp_path_factory.mktemp("sharing"))


def _same_rows(a, b):
    ra = {(r["id"], r["copy"]): r for r in CacheReader(a).iter_rows()}
    rb = {(r["id"], r["copy"]): r for r in CacheReader(b).iter_rows()}
    assert len(ra) == 24 and ra.keys() == rb.keys()
    for key, row in ra.items():
        for col, v in row.items():
            w = rb[key][col]
            assert torch.equal(v, w) if isinstance(v, torch.Tensor) else np.array_equal(v, w), (key, col)


def test_push_to_a_directory_and_a_file_uri_then_pull_and_inspect(cache, tmp_path):
    m = CacheReader(cache).manifest
    shared = tmp_path / "shared" / "team-cache"
    res = run_cli("push", cache, shared)  # a plain directory: created, parents included
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"{cache} -> {shared}: 3 shard(s) copied" in res.stdout and ", 0 already there" in res.stdout
    assert res.stdout.count(" verified") == 3
    assert CacheReader(shared).verify() == [] and CacheReader(shared).manifest.fingerprint == m.fingerprint

    uri = f"file://{tmp_path / 'by-uri'}"
    res = run_cli("push", cache, uri)
    assert res.returncode == 0 and "3 shard(s) copied" in res.stdout, res.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "by-uri").iterdir()) == ["manifest.json", *sorted(s.path for s in m.shards)]

    local = tmp_path / "pulled"
    res = run_cli("pull", uri, local)
    assert res.returncode == 0 and f"{uri} -> {local}: 3 shard(s) copied" in res.stdout, res.stderr[-2000:]
    assert [s.sha256 for s in CacheReader(local).manifest.shards] == [s.sha256 for s in m.shards]
    _same_rows(cache, local)

    res = run_cli("inspect", local, "--rows", "2")
    assert res.returncode == 0, res.stderr[-2000:]
    out = res.stdout
    assert f"fingerprint  {m.fingerprint}" in out
    assert "rows         24 (24 examples)" in out and "shards       3," in out
    assert f"teacher      bert: {m.teachers['bert']['source']} (weights {m.teachers['bert']['weights_sha256'][:12]}" in out
    assert all(f"  {name} " in out for name in m.columns)
    first = next(CacheReader(local).iter_rows())
    samples = [line for line in out.splitlines() if line.startswith("sample: ")]
    assert len(samples) == 2 and samples[0].startswith(f"sample: id={first['id']!r}, copy=0")
    assert "bert.logits=tensor(2,):float32" in samples[0]


def test_push_refuses_a_destination_holding_another_cache(cache, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(cache, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["fingerprint"] = "f" * 64  # as if exported from other inputs
    (other / "manifest.json").write_text(json.dumps(manifest))
    before = {p.name: p.read_bytes() for p in other.iterdir()}
    res = run_cli("push", cache, other)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert f"{other} holds another cache (fingerprint ffffffffffff…" in res.stderr and "--overwrite" in res.stderr
    assert {p.name: p.read_bytes() for p in other.iterdir()} == before  # untouched
    report = copy_cache(cache, other, overwrite=True)
    assert report.copied == 0 and report.skipped == 3  # the same shards: only the manifest is replaced
    assert CacheReader(other).manifest.fingerprint == CacheReader(cache).manifest.fingerprint
