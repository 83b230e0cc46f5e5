"""Moving caches between locations (`cachebrew push` / `pull`) and listing them (`cachebrew ls`).

Built on `reader` (what a cache holds) and `storage` (where it lives); every shard is verified against
its sha256 while it streams, written under a temporary name, and the manifest is published last.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import pyarrow.fs as pafs

from ..errors import CacheFormatError
from .manifest import MANIFEST
from .reader import CacheReader
from .shards import ShardInfo
from .storage import CHUNK, Location, locate


def _copy_verified(read, write, expected_sha: str, what: str) -> int:
    h = hashlib.sha256()
    n = 0
    while chunk := read(CHUNK):
        h.update(chunk)
        write(chunk)
        n += len(chunk)
    if h.hexdigest() != expected_sha:
        raise CacheFormatError(f"{what}: sha256 {h.hexdigest()[:16]}… differs from the manifest's {expected_sha[:16]}…; "
                               "the source is corrupt (run `cachebrew verify` on it)")
    return n


def copy_shard(src: Location, dest: Location, info: ShardInfo) -> int:
    """Copy one shard from `src` to `dest`, checked against ``info.sha256`` as it streams; the bytes copied.

    It is written under a temporary name and moved to its own name only once verified (and, locally, fsynced),
    so a shard name at the destination never shows a partial or corrupt shard: an interrupted copy is redone.
    `copy_cache` uses it for whole caches, `export` to a URI for the shards each rank wrote.
    """
    with src.fs.open_input_stream(src.join(info.path)) as fin, dest.atomic_output(info.path) as fout:
        return _copy_verified(fin.read, fout.write, info.sha256, src.where(info.path))


@dataclass
class CopyReport:
    copied: int = 0
    skipped: int = 0
    bytes: int = 0


def copy_cache(src, dst, overwrite: bool = False, progress=None) -> CopyReport:
    """Copy a complete cache between any two locations, verifying each shard's sha256 as it streams.

    Shards already at the destination are skipped (locally: after re-hashing them; remotely: when the size
    matches, since objects appear only once complete); a destination holding another cache is refused.
    """
    reader = CacheReader(src)
    m = reader.manifest
    dest = locate(dst)
    dest.fs.create_dir(dest.path, recursive=True)
    if dest.exists(MANIFEST):
        theirs = json.loads(dest.read_text(MANIFEST)).get("fingerprint")
        if theirs != m.fingerprint and not overwrite:
            raise CacheFormatError(f"{dest.uri} holds another cache (fingerprint {str(theirs)[:12]}…, this one "
                                   f"{m.fingerprint[:12]}…); choose another destination or pass --overwrite")
        if theirs != m.fingerprint:
            dest.fs.delete_file(dest.join(MANIFEST))  # unpublish first: the shards below get replaced
    report = CopyReport()
    for info in m.shards:
        target = dest.info(info.path)
        if target.type == pafs.FileType.File and target.size == info.bytes and (
                not dest.local or dest.sha256(info.path) == info.sha256):
            report.skipped += 1
            continue
        report.bytes += copy_shard(reader.location, dest, info)
        report.copied += 1
        if progress:
            progress(info)
    dest.write_atomic(MANIFEST, json.dumps(m.to_dict(), indent=2).encode())
    return report


def find_caches(root, max_depth: int = 4) -> list[str]:
    """Cache directories (those holding a manifest.json) under root, at most max_depth levels down."""
    loc = locate(root)
    found = []
    selector = pafs.FileSelector(loc.path, recursive=True, allow_not_found=True)
    for info in loc.fs.get_file_info(selector):
        depth = info.path[len(loc.path):].strip("/").count("/")
        if info.type == pafs.FileType.File and info.base_name == MANIFEST and depth <= max_depth:
            rel = info.path[len(loc.path):].strip("/")
            parent = rel.rsplit("/", 1)[0] if "/" in rel else ""
            found.append(loc.child(parent))
    if loc.exists(MANIFEST) and loc.child("") not in found:
        found.append(loc.child(""))
    return sorted(found)
