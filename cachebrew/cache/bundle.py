"""One-file bundles of a cache (`cachebrew pack` / `cachebrew unpack`): a tar archive in a zstandard stream.

    cachebrew pack CACHE OUT.tar.zst     # manifest.json first, then the shards, each verified as it is read
    cachebrew unpack FILE.tar.zst DIR    # extracted into a staging dir, every shard verified, then published

A bundle is as untrusted as any file from elsewhere: `unpack` takes only regular files with the names a
cache has (manifest.json, then the part-NNNNN.arrow shards it lists, each of the size it lists); absolute
paths, '..', links, directories and devices are refused before a byte is written. DIR appears only once
every shard matches the manifest's sha256, row count, schema and fingerprint (`CacheReader.verify`).
The shards are already compressed Arrow files; zstd mainly gives the bundle a frame checksum.
"""
from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import zstandard

from ..core.files import atomic_write, publish_dir
from ..errors import CachebrewError, CacheFormatError
from .manifest import MANIFEST, Manifest
from .reader import CacheReader
from .storage import CHUNK

MAX_MANIFEST_BYTES = 64 << 20  # read into memory before anything else: a bound, not a real manifest's size


@dataclass
class BundleReport:
    shards: int
    rows: int
    bytes: int   # of the bundle file (pack) or of the shards written (unpack)


class _Hashing:
    """A read-only stream that hashes what tarfile takes from it (pack checks each shard on the way in)."""

    def __init__(self, stream):
        self.stream, self.sha = stream, hashlib.sha256()

    def read(self, n=-1):
        data = self.stream.read(n)
        self.sha.update(data)
        return data


def _member(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, 0o644, 0  # no dates or owners: one cache, one bundle
    return info


def pack_cache(cache, bundle, level: int = 3, progress=None) -> BundleReport:
    """Write the cache at `cache` (a directory or URI) as the single file `bundle`, published atomically.

    Each shard's sha256 is checked while it streams into the archive, so a corrupt cache is refused rather
    than packed; on any error the bundle path is left as it was (no partial file under the final name).
    """
    reader = CacheReader(cache)
    loc, m = reader.location, reader.manifest
    bundle = Path(bundle)
    if bundle.is_dir():
        raise CachebrewError(f"{bundle}: is a directory; give the bundle's file name (e.g. cache.tar.zst)")
    manifest = loc.read_text(MANIFEST).encode("utf-8")  # the bytes as written, not a re-serialisation

    def write(tmp):
        cctx = zstandard.ZstdCompressor(level=level, write_checksum=True)
        with open(tmp, "wb") as f, cctx.stream_writer(f, closefd=False) as z, \
                tarfile.open(fileobj=z, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            # the manifest first: unpack learns each shard's name and size before any shard byte
            tar.addfile(_member(MANIFEST, len(manifest)), io.BytesIO(manifest))
            for info in sorted(m.shards, key=lambda s: s.index):
                with loc.fs.open_input_stream(loc.join(info.path)) as src:
                    hashing = _Hashing(src)
                    try:
                        tar.addfile(_member(info.path, info.bytes), hashing)
                    except OSError as e:  # tarfile: the file is shorter than the manifest says
                        raise CacheFormatError(f"{loc.where(info.path)}: {e}; run `cachebrew verify` on the "
                                               "cache") from None
                if hashing.sha.hexdigest() != info.sha256:
                    raise CacheFormatError(f"{loc.where(info.path)}: sha256 differs from the manifest's; the cache "
                                           "is corrupt (run `cachebrew verify` on it); nothing packed")
                if progress:
                    progress(info)

    try:
        atomic_write(bundle, write)
    except OSError as e:  # a missing shard, a full disk: the user's to fix, said in one line
        raise CachebrewError(f"{bundle}: not written ({e})") from None
    return BundleReport(len(m.shards), m.num_rows, bundle.stat().st_size)


def _refuse(bundle, member: tarfile.TarInfo, why: str):
    raise CacheFormatError(f"{bundle}: member {member.name!r} {why}; refusing to unpack")


def _check_member(bundle, member: tarfile.TarInfo, staging: Path, expected: dict | None, seen: set):
    """Raise unless `member` is a plain file a cache bundle may hold (expected: shard name -> size)."""
    try:  # the stdlib's path-traversal rules first, for their precise reasons
        tarfile.data_filter(member, str(staging))
    except tarfile.FilterError as e:
        _refuse(bundle, member, f"is unsafe ({e})")
    if member.issym() or member.islnk():
        _refuse(bundle, member, "is a link")
    if not member.isfile():
        _refuse(bundle, member, "is not a regular file (a bundle holds only manifest.json and shards)")
    if member.name in seen:
        _refuse(bundle, member, "appears twice")
    if expected is None:
        if member.name != MANIFEST:
            _refuse(bundle, member, f"comes before {MANIFEST} (a bundle starts with its manifest)")
        if member.size > MAX_MANIFEST_BYTES:
            _refuse(bundle, member, f"is {member.size} bytes, too large for a manifest")
        return
    if member.name not in expected:
        _refuse(bundle, member, "is not a shard listed in the bundle's manifest")
    if member.size != expected[member.name]:
        _refuse(bundle, member, f"is {member.size} bytes, the manifest says {expected[member.name]}")


def unpack_cache(bundle, directory, progress=None) -> BundleReport:
    """Extract a bundle into `directory` (new or empty) after verifying every shard; return what was unpacked.

    Everything is written into a hidden staging directory beside `directory` and published by rename only
    when `CacheReader.verify` finds nothing wrong; on any error the staging directory is removed.
    """
    bundle, dest = Path(bundle), Path(directory)
    if not bundle.is_file():
        raise CachebrewError(f"{bundle}: no such bundle file")
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise CachebrewError(f"{dest}: exists and is not an empty directory; unpack into a new or empty one")
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".unpack", dir=dest.parent))
    try:
        expected, seen, written = None, set(), 0
        try:
            with open(bundle, "rb") as f, \
                    zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True) as z, \
                    tarfile.open(fileobj=z, mode="r|") as tar:
                for member in tar:
                    _check_member(bundle, member, staging, expected, seen)
                    seen.add(member.name)
                    src = tar.extractfile(member)
                    if expected is None:
                        text = src.read()
                        manifest = Manifest.from_dict(_json(bundle, text), f"{bundle}:{MANIFEST}")
                        expected = {s.path: s.bytes for s in manifest.shards}
                        (staging / MANIFEST).write_bytes(text)
                        continue
                    with open(staging / member.name, "wb") as out:
                        shutil.copyfileobj(src, out, CHUNK)
                    written += member.size
        except (tarfile.TarError, zstandard.ZstdError, EOFError) as e:
            raise CacheFormatError(f"{bundle}: not a readable .tar.zst bundle ({e})") from None
        except OSError as e:  # a full disk, a read error: not the bundle's fault, so not called corrupt
            raise CachebrewError(f"{bundle}: cannot unpack into {dest} ({e})") from None
        if expected is None:
            raise CacheFormatError(f"{bundle}: holds no {MANIFEST}; not a cache bundle")
        reader = CacheReader(staging)
        problems = reader.verify(progress=progress)
        if problems:
            raise CacheFormatError(f"{bundle}: " + "; ".join(problems) + f"; nothing unpacked into {dest}")
        publish_dir(staging, dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return BundleReport(len(reader.manifest.shards), reader.num_rows, written)


def _json(bundle, text: bytes):
    try:
        return json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CacheFormatError(f"{bundle}:{MANIFEST}: not valid JSON ({e})") from None
