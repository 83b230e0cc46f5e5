"""Where caches live: local directories or any pyarrow / fsspec filesystem URI (s3://, gs://, hdfs://, ...).

Reading goes through pyarrow filesystems (random access, so `distill` streams record batches straight
from object storage); schemes pyarrow does not know are served by fsspec through pyarrow's FSSpecHandler.
Copying whole caches between locations (`push` / `pull`) is `sharing.py`'s, built on this module.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

from ..errors import CachebrewError
from ..core.files import hash_stream

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
        with self.fs.open_input_stream(self.join(name)) as f:
            return hash_stream(f).hexdigest()

    @contextlib.contextmanager
    def atomic_output(self, name: str):
        """An output stream whose bytes appear as `name` only when the block completes: written under a temporary
        name (fsynced when local) and then moved; on an error the temporary is deleted and nothing is published."""
        tmp = self.join(f".{name}.{os.getpid()}.tmp")
        out = self.fs.open_output_stream(tmp)
        try:
            yield out
        except BaseException:
            out.close()
            self.fs.delete_file(tmp)
            raise
        out.close()
        if self.local:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        self.fs.move(tmp, self.join(name))

    def write_atomic(self, name: str, data: bytes):
        with self.atomic_output(name) as f:
            f.write(data)


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
