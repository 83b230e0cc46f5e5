"""`cachebrew pack` / `unpack`: a cache as one .tar.zst file. Round trip, corruption named by shard, unsafe
archive members refused before a byte is written, nothing published unless every shard verifies."""
import io
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import zstandard

from cachebrew.cache import CacheReader
from cachebrew.cache.bundle import pack_cache, unpack_cache
from cachebrew.errors import CachebrewError, CacheFormatError
from fixtures import make_cache
from helpers import run_cli



@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return make_cache(tmp_path_factory.mktemp("bundle"))


def _rows(path):
    return {(r["id"], r["copy"]): r for r in CacheReader(path).iter_rows()}


def _same(a, b):
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    return np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b


def _leftovers(parent: Path):
    """Hidden staging directories or temporary files that an unpack or pack left behind."""
    return [p.name for p in parent.iterdir() if p.name.startswith(".")]


def _tar_bytes(bundle: Path) -> bytearray:
    with open(bundle, "rb") as f:
        return bytearray(zstandard.ZstdDecompressor().stream_reader(f).read())


def _write_bundle(path: Path, members):
    """A .tar.zst of (TarInfo, bytes or None) members, in order: bundles pack would never write."""
    with open(path, "wb") as f, zstandard.ZstdCompressor().stream_writer(f) as z, \
            tarfile.open(fileobj=z, mode="w|") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def test_round_trip_reads_back_identical(cache, tmp_path):
    bundle = tmp_path / "c.tar.zst"
    packed = pack_cache(cache, bundle)
    assert bundle.read_bytes()[:4] == b"\x28\xb5\x2f\xfd"  # a zstd frame
    m = CacheReader(cache).manifest
    assert (packed.shards, packed.rows) == (3, 24) and len(m.shards) == 3
    with tarfile.open(fileobj=io.BytesIO(bytes(_tar_bytes(bundle)))) as tar:
        assert tar.getnames() == ["manifest.json", "part-00000.arrow", "part-00001.arrow", "part-00002.arrow"]
    pack_cache(cache, tmp_path / "again.tar.zst")
    assert (tmp_path / "again.tar.zst").read_bytes() == bundle.read_bytes()  # no dates: one cache, one bundle

    out = tmp_path / "new" / "restored"  # parents created
    report = unpack_cache(bundle, out)
    assert (report.shards, report.rows) == (3, 24) and report.bytes == m.num_bytes
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", *sorted(s.path for s in m.shards)]
    assert (out / "manifest.json").read_bytes() == (cache / "manifest.json").read_bytes()
    a, b = _rows(cache), _rows(out)
    assert len(a) == 24 and a.keys() == b.keys()
    for key, row in a.items():
        assert row.keys() == b[key].keys()
        assert all(_same(v, b[key][col]) for col, v in row.items()), key
    assert CacheReader(out).verify() == [] and _leftovers(out.parent) == []
    empty = tmp_path / "empty"
    empty.mkdir()
    unpack_cache(bundle, empty)  # an existing empty directory is fine
    assert CacheReader(empty).manifest.fingerprint == m.fingerprint


def test_cli_pack_unpack_and_a_corrupt_shard_in_the_bundle(cache, tmp_path):
    bundle = tmp_path / "c.tar.zst"
    res = run_cli("pack", cache, bundle)
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"-> {bundle}: 3 shard(s), 24 rows" in res.stdout
    res = run_cli("unpack", bundle, tmp_path / "ok")
    assert res.returncode == 0 and "OK (3 shards, 24 rows, verified)" in res.stdout, res.stderr[-2000:]

    raw = _tar_bytes(bundle)  # flip one byte inside part-00001.arrow's data, keep the archive well-formed
    with tarfile.open(fileobj=io.BytesIO(bytes(raw))) as tar:
        member = tar.getmember("part-00001.arrow")
    raw[member.offset_data + member.size // 2] ^= 0x01
    bad = tmp_path / "bad.tar.zst"
    bad.write_bytes(zstandard.ZstdCompressor().compress(bytes(raw)))
    res = run_cli("unpack", bad, tmp_path / "restored")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {bad}: part-00001.arrow: checksum mismatch"), res.stderr
    assert "part-00000" not in res.stderr and "part-00002" not in res.stderr
    assert not (tmp_path / "restored").exists() and _leftovers(tmp_path) == []


    truncated = tmp_path / "cut.tar.zst"  # a damaged zstd stream: named, nothing left
    truncated.write_bytes(bundle.read_bytes()[: bundle.stat().st_size // 2])
    with pytest.raises(CacheFormatError, match=re.escape(f"{truncated}: not a readable .tar.zst bundle")):
        unpack_cache(truncated, tmp_path / "restored")
    assert not (tmp_path / "restored").exists() and _leftovers(tmp_path) == []


def _file(name):
    return tarfile.TarInfo(name)


def _link(name, target, kind=tarfile.SYMTYPE):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


def _dir(name):
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    return info


def _fifo(name):
    info = tarfile.TarInfo(name)
    info.type = tarfile.FIFOTYPE
    return info


@pytest.mark.parametrize("make,why", [
    (lambda t: (_file("../escaped.arrow"), b"x"), "is unsafe"),
    (lambda t: (_file(str(t / "absolute.arrow")), b"x"), "not a shard listed"),
    (lambda t: (_link("part-00000.arrow", "/etc/passwd"), None), "is unsafe"),
    (lambda t: (_link("part-00000.arrow", "manifest.json"), None), "is a link"),
    (lambda t: (_link("part-00000.arrow", "manifest.json", tarfile.LNKTYPE), None), "is a link"),
    (lambda t: (_dir("part-00000.arrow"), None), "not a regular file"),
    (lambda t: (_fifo("part-00000.arrow"), None), "is unsafe"),
    (lambda t: (_file("notes.txt"), b"hello"), "not a shard listed"),
    (lambda t: (_file("manifest.json"), b"{}"), "appears twice"),
    (lambda t: (_file("part-00000.arrow"), b"x"), "is 1 bytes, the manifest says"),
], ids=["dotdot", "absolute", "symlink-out", "symlink-in", "hardlink", "directory", "fifo", "unlisted", "twice",
        "wrong-size"])
def test_unsafe_members_are_refused_before_anything_is_written(cache, tmp_path, make, why):
    info, data = make(tmp_path)
    manifest = (cache / "manifest.json").read_bytes()
    bundle = _write_bundle(tmp_path / "evil.tar.zst", [(_file("manifest.json"), manifest), (info, data)])
    out = tmp_path / "sub" / "out"
    with pytest.raises(CacheFormatError, match=rf"evil.tar.zst: member .* {why}.*refusing to unpack"):
        unpack_cache(bundle, out)
    assert not out.exists() and _leftovers(out.parent) == []
    assert not (tmp_path / "sub" / "escaped.arrow").exists() and not (tmp_path / "absolute.arrow").exists()


def test_a_bundle_starts_with_its_manifest(cache, tmp_path):
    shard = (cache / "part-00000.arrow").read_bytes()
    bundle = _write_bundle(tmp_path / "b.tar.zst", [(_file("part-00000.arrow"), shard)])
    with pytest.raises(CacheFormatError, match="'part-00000.arrow' comes before manifest.json"):
        unpack_cache(bundle, tmp_path / "out")


def test_unpack_refuses_a_non_empty_directory(cache, tmp_path):
    bundle = tmp_path / "c.tar.zst"
    pack_cache(cache, bundle)
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("mine")
    with pytest.raises(CachebrewError, match="exists and is not an empty directory"):
        unpack_cache(bundle, out)
    assert [p.name for p in out.iterdir()] == ["precious.txt"] and (out / "precious.txt").read_text() == "mine"


def test_a_corrupt_cache_is_not_packed_and_an_old_bundle_survives(cache, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(cache, bad)
    shard = bad / "part-00002.arrow"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    bundle = tmp_path / "out" / "c.tar.zst"
    bundle.parent.mkdir()
    bundle.write_bytes(b"the previous bundle")
    with pytest.raises(CacheFormatError, match="part-00002.arrow: sha256 differs from the manifest's"):
        pack_cache(bad, bundle)
    assert bundle.read_bytes() == b"the previous bundle" and _leftovers(bundle.parent) == []
