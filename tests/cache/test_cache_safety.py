"""A cache from elsewhere is untrusted: manifests cannot point outside the directory, symlinked shards are
refused, a hand-edited manifest is caught, and nothing in a cache is ever unpickled."""
import json
import os
import pickle
from pathlib import Path

import pytest

from cachebrew.cache import CacheReader
from cachebrew.components.loader import CacheBatches
from cachebrew.errors import CacheFormatError
from cachebrew.recipes.export import ExportConfig, run_export
from fixtures import export_config, make_teacher_dir, make_text_data


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("safety")
    cfg = export_config(root, make_teacher_dir(root / "t"), make_text_data(root / "d.jsonl", n=24),
                        outputs={"hidden_layers": [], "attention_layers": []})
    run_export(ExportConfig.from_dict(cfg))
    return root / "cache"


def _edit(src: Path, dst: Path, change):
    import shutil

    shutil.copytree(src, dst)
    m = json.loads((dst / "manifest.json").read_text())
    change(m)
    (dst / "manifest.json").write_text(json.dumps(m))
    return dst


@pytest.mark.parametrize("bad", ["../outside.arrow", "/etc/passwd", "sub/part-00000.arrow", "part-00000.arrow/..",
                                 "part-1.arrow"])
def test_manifest_paths_cannot_escape(cache, tmp_path, bad):
    edited = _edit(cache, tmp_path / "c", lambda m: m["shards"][0].update(path=bad))
    with pytest.raises(CacheFormatError, match="is not a shard name of this cache"):
        CacheReader(edited)


def test_symlinked_shard_is_refused(cache, tmp_path):
    edited = _edit(cache, tmp_path / "c", lambda m: None)
    shard = edited / "part-00000.arrow"
    target = tmp_path / "elsewhere.arrow"
    shard.rename(target)
    os.symlink(target, shard)
    with pytest.raises(CacheFormatError, match="symbolic link"):
        CacheReader(edited)


def test_hand_edited_manifest_is_caught_before_training(cache, tmp_path):
    edited = _edit(cache, tmp_path / "rows", lambda m: m["shards"][0].update(rows=m["shards"][0]["rows"] + 1))
    assert any("rows, manifest says" in p for p in CacheReader(edited).verify())
    edited = _edit(cache, tmp_path / "fp", lambda m: m.update(fingerprint="0" * 64))
    assert any("fingerprint in the shard differs" in p for p in CacheReader(edited).verify())
    edited = _edit(cache, tmp_path / "ver", lambda m: m.update(format_version=99))
    with pytest.raises(CacheFormatError, match="format_version"):
        CacheBatches(edited, 4)


def test_a_pickle_in_the_cache_is_never_executed(cache, tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    edited = _edit(cache, tmp_path / "c", lambda m: None)
    for name in ("part-00000.arrow.pkl", "data.pkl", "optimizer.pt"):
        (edited / name).write_bytes(pickle.dumps(Evil()))
    reader = CacheReader(edited)
    assert reader.verify() == []
    rows = list(reader.iter_rows())
    batches = list(CacheBatches(edited, 4, shuffle=False))
    assert len(rows) == 24 and sum(len(b["ids"]) for b in batches) == 24
    assert not marker.exists()
