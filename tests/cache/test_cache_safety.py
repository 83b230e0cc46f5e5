"""A cache or checkpoint from elsewhere is untrusted: manifests cannot point outside the directory, symlinked
shards are refused, a hand-edited manifest is caught, and a malicious pickle put where a loader reads (the
manifest, a shard, every file of a run checkpoint that `distill --resume` loads) is refused by name, never run."""
import hashlib
import json
import os
import pickle
import re
from pathlib import Path

import pytest

from cachebrew.cache import CacheReader
from cachebrew.components.loader import CacheBatches
from cachebrew.errors import CachebrewError, CacheFormatError
from cachebrew.recipes.distill import DistillRunConfig, run_distill
from cachebrew.recipes.distill.checkpoints import latest_checkpoint
from cachebrew.recipes.export import ExportConfig, run_export
from fixtures import export_config, make_teacher_dir, make_text_data

STUDENT = {"model_type": "bert", "vocab_size": 89, "hidden_size": 16, "num_hidden_layers": 1,
           "num_attention_heads": 2, "intermediate_size": 32, "max_position_embeddings": 64,
           "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}


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


class Payload:
    """Unpickling this calls os.mkdir(marker): whether a loader executed it is one exists() away."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _live(tmp_path, protocol=pickle.HIGHEST_PROTOCOL) -> tuple[bytes, Path]:
    """A malicious pickle and its marker, shown live: plain pickle.loads does run it (so a test can fail)."""
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(Payload(probe), protocol=protocol))
    assert probe.is_dir()
    marker = tmp_path / "pwned"
    return pickle.dumps(Payload(marker), protocol=protocol), marker


@pytest.mark.parametrize("protocol", [0, pickle.HIGHEST_PROTOCOL])  # 0: ASCII, looks like text to a JSON reader
def test_a_pickle_as_manifest_is_refused_and_never_executed(cache, tmp_path, protocol):
    payload, marker = _live(tmp_path, protocol)
    edited = _edit(cache, tmp_path / "c", lambda m: None)
    (edited / "manifest.json").write_bytes(payload)
    with pytest.raises(CacheFormatError, match=re.escape(f"{edited / 'manifest.json'}: not valid JSON")):
        CacheReader(edited)
    with pytest.raises(CacheFormatError, match="manifest.json: not valid JSON"):
        CacheBatches(edited, 4)
    assert not marker.exists()


def test_a_pickle_as_shard_is_refused_and_never_executed(cache, tmp_path):
    """Even with the manifest edited to match its checksum and size, the bytes are read only as Arrow."""
    payload, marker = _live(tmp_path)
    sha = hashlib.sha256(payload).hexdigest()
    edited = _edit(cache, tmp_path / "c", lambda m: m["shards"][1].update(sha256=sha, bytes=len(payload)))
    (edited / "part-00001.arrow").write_bytes(payload)
    reader = CacheReader(edited)
    assert [p.split(": ")[:2] for p in reader.verify()] == [["part-00001.arrow", "unreadable (Not an Arrow file)"]]
    with pytest.raises(CacheFormatError, match="part-00001.arrow: unreadable shard"):
        list(reader.iter_rows())
    run = DistillRunConfig.from_dict({"output_dir": str(tmp_path / "run"), "caches": [str(edited)], "seed": 1,
                                      "student": {"config": dict(STUDENT)}, "distill": {"temperature": 4},
                                      "train": {"epochs": 1, "batch_size": 8, "progress_bar": False}})
    with pytest.raises(CacheFormatError, match="not training on it: part-00001.arrow: unreadable"):
        run_distill(run)
    assert not marker.exists()


@pytest.fixture(scope="module")
def checkpointed_run(cache, tmp_path_factory):
    """A finished 3-step distill run from the cache, its config, and its newest checkpoint (the one resumed)."""
    out = tmp_path_factory.mktemp("run") / "run"
    cfg = {"output_dir": str(out), "caches": [str(cache)], "seed": 1, "student": {"config": dict(STUDENT)},
           "distill": {"temperature": 4},
           "train": {"steps": 3, "save_every": 2, "batch_size": 8, "progress_bar": False}}
    run_distill(DistillRunConfig.from_dict(cfg))
    ckpt = latest_checkpoint(out / "checkpoints")
    assert sorted(p.name for p in ckpt.iterdir()) == ["optimizer.pt", "projections.safetensors", "scheduler.pt",
                                                      "state.json", "student.safetensors"]
    return cfg, ckpt


@pytest.mark.parametrize("name,how", [("optimizer.pt", "torch.save"), ("optimizer.pt", "pickle"),
                                      ("scheduler.pt", "torch.save"), ("student.safetensors", "pickle"),
                                      ("projections.safetensors", "pickle"), ("state.json", "pickle")])
def test_a_pickle_in_a_checkpoint_is_never_executed_on_resume(checkpointed_run, tmp_path, name, how):
    """`distill --resume` loads the newest checkpoint: each of its files replaced by a malicious pickle (bare,
    or inside torch.save's zip, as a real optimizer.pt is) is refused, named, and never run."""
    import torch

    cfg, ckpt = checkpointed_run
    payload, marker = _live(tmp_path, protocol=2)  # 2: what torch.save writes, so its unpickler reads the opcodes
    target = ckpt / name
    original = target.read_bytes()
    try:
        if how == "torch.save":
            torch.save(Payload(marker), target)
        else:
            target.write_bytes(payload)
        with pytest.raises(CachebrewError, match=f"{re.escape(str(target))}: cannot load this checkpoint file"):
            run_distill(DistillRunConfig.from_dict(cfg), resume=True)
    finally:
        target.write_bytes(original)  # the run is shared by the cases
    assert not marker.exists()
