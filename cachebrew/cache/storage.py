"""Where caches live: local directories or any pyarrow / fsspec filesystem URI (s3://, gs://, hdfs://, ...).

Reading goes through pyarrow filesystems (random access, so `distill` streams record batches straight
from object storage); schemes pyarrow does not know are served by fsspec through pyarrow's FSSpecHandler.
Copies (`push` / `pull`) verify every byte against the manifest's sha256, write each file under a
temporary name and publish it by rename, and write the manifest last, so an interrupted copy is resumed
file by file and a reader never sees a manifest whose shards are not all there.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

from ..errors import CacheFormatError, CachebrewError
from .manifest import MANIFEST

CHUNK = 8 << 20


def is_uri(location) -> bool:
    return isinstance(location, str) and "://" in location and not location.startswith("file://")


def local_path(location) -> Path:
    s = str(location)
    return Path(s[len("file://"):]) if s.startswith("file://") else Path(s)


@dataclass
class Location:
    """A cache directory on a filesystem: ``fs`` and ``path`` as pyarrow wants them, ``uri`` for messages."""

    fs: pafs.FileSystem
    path: str
    uri: str
    local: bool
    query: str = ""   # connection options of the URI (?endpoint_override=...), kept for child locations

    def child(self, name: str) -> str:
        """An openable location for a sub-directory (with the URI's options)."""
        return f"{self.uri.rstrip('/')}/{name}{self.query}" if name else f"{self.uri}{self.query}"

    def join(self, name: str) -> str:
        return f"{self.path.rstrip('/')}/{name}"

    def where(self, name: str) -> str:
        return f"{self.uri.rstrip('/')}/{name}"

    def info(self, name: str) -> pafs.FileInfo:
        return self.fs.get_file_info(self.join(name))

    def exists(self, name: str) -> bool:
        return self.info(name).type == pafs.FileType.File

    def read_text(self, name: str) -> str:
        with self.fs.open_input_stream(self.join(name)) as f:
            return f.read().decode("utf-8")

    def open_input(self, name: str, mmap: bool = True):
        """A random-access file: memory-mapped (or plain reads) locally, ranged reads on object stores."""
        import pyarrow as pa

        if self.local:
            return pa.memory_map(self.join(name)) if mmap else pa.OSFile(self.join(name))
        return self.fs.open_input_file(self.join(name))

    def sha256(self, name: str) -> str:
        h = hashlib.sha256()
        with self.fs.open_input_stream(self.join(name)) as f:
            while chunk := f.read(CHUNK):
                h.update(chunk)
        return h.hexdigest()

    def write_atomic(self, name: str, data: bytes):
        tmp = self.join(f".{name}.{os.getpid()}.tmp")
        with self.fs.open_output_stream(tmp) as f:
            f.write(data)
        self.fs.move(tmp, self.join(name))


def locate(location) -> Location:
    """Local path, file:// URI or filesystem URI -> Location. s3:// takes endpoint_override etc. as URI query."""
    if not is_uri(location):
        path = local_path(location).resolve()
        return Location(pafs.LocalFileSystem(), str(path), str(path), True)
    try:
        fs, path = pafs.FileSystem.from_uri(location)
    except (ValueError, OSError) as e:  # pyarrow.ArrowInvalid is a ValueError: a scheme pyarrow lacks
        fs, path = _fsspec(location, e)
    base, _, query = location.partition("?")
    return Location(fs, path.rstrip("/"), base.rstrip("/"), False, f"?{query}" if query else "")


def _fsspec(location: str, why):
    try:
        import fsspec
        from pyarrow.fs import FSSpecHandler, PyFileSystem
    except ImportError:
        raise CachebrewError(f"{location}: pyarrow cannot open this URI ({why}) and fsspec is not installed") from None
    try:
        fs, path = fsspec.core.url_to_fs(location)
    except (ValueError, ImportError) as e:
        raise CachebrewError(f"{location}: no filesystem for this URI ({e})") from None
    return PyFileSystem(FSSpecHandler(fs)), path


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
    from .reader import CacheReader

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
        tmp = dest.join(f".{info.path}.{os.getpid()}.tmp")
        with reader.location.fs.open_input_stream(reader.location.join(info.path)) as fin, \
                dest.fs.open_output_stream(tmp) as fout:
            try:
                report.bytes += _copy_verified(fin.read, fout.write, info.sha256, reader.location.where(info.path))
            except BaseException:
                fout.close()
                dest.fs.delete_file(tmp)
                raise
        if dest.local:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        dest.fs.move(tmp, dest.join(info.path))
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
