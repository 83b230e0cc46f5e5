"""Writing shards so that a crash never leaves one that looks complete, and finding the complete ones.

A shard is an Arrow IPC *file* (it has a footer, so truncation is detectable) with buffers compressed by
an Arrow IPC codec (lz4 by default; zstd or none). It is written under a temporary dot-name, fsynced,
then renamed to ``part-{index:05d}.arrow``: a file with the final name is always whole. Its schema
metadata carries the cache fingerprint and the shard's place in the export plan, so a resumed export can
tell its own complete shards from a stranger's.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from ..core.files import fsync_dir, sha256_file
from ..errors import CacheFormatError

SHARD_RE = re.compile(r"^part-(\d{5})\.arrow$")
META_KEY = b"cachebrew"


def shard_name(index: int) -> str:
    return f"part-{index:05d}.arrow"


@dataclass
class ShardInfo:
    path: str
    index: int
    rows: int
    bytes: int
    sha256: str
    first_row: int
    batches: list | None = None  # rows per Arrow record batch, for random access without reading

    def to_dict(self):
        return dict(path=self.path, index=self.index, rows=self.rows, bytes=self.bytes, sha256=self.sha256,
                    first_row=self.first_row, batches=self.batches)


class _HashingFile:
    """A write-only file that hashes what passes through, so the checksum costs no second read."""

    def __init__(self, path):
        self.f = open(path, "wb")
        self.h = hashlib.sha256()
        self.n = 0

    def write(self, data):
        mv = memoryview(data)
        self.h.update(mv)
        self.n += mv.nbytes
        return self.f.write(mv)

    def flush(self):
        self.f.flush()

    def close(self):
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()

    @property
    def closed(self):
        return self.f.closed

    def tell(self):
        return self.n


class ShardWriter:
    """Context manager: ``with ShardWriter(dir, index, schema, meta) as w: w.write(record_batch)``.

    On success the shard is published atomically and ``info`` describes it; on error the temp file is removed.
    """

    def __init__(self, directory, index: int, schema: pa.Schema, metadata: dict, compression="lz4"):
        self.directory = Path(directory)
        self.index = index
        self.final = self.directory / shard_name(index)
        self.tmp = self.directory / f".{shard_name(index)}.{os.getpid()}.tmp"
        meta = dict(schema.metadata or {})
        meta[META_KEY] = json.dumps({**metadata, "shard_index": index}, sort_keys=True).encode()
        self.schema = schema.with_metadata(meta)
        self.compression = compression
        self.rows = 0
        self.batch_rows: list[int] = []
        self.info: ShardInfo | None = None
        self.first_row = int(metadata.get("first_row", 0))

    def __enter__(self):
        self.directory.mkdir(parents=True, exist_ok=True)
        self._file = _HashingFile(self.tmp)
        sink = pa.PythonFile(self._file, mode="w")
        options = pa.ipc.IpcWriteOptions(compression=self.compression)
        self._writer = pa.ipc.new_file(sink, self.schema, options=options)
        return self

    def write(self, batch: pa.RecordBatch):
        self._writer.write_batch(batch)
        self.rows += batch.num_rows
        self.batch_rows.append(batch.num_rows)

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None:
                self._writer.close()
                self._file.close()
                os.replace(self.tmp, self.final)
                fsync_dir(self.directory)
                self.info = ShardInfo(self.final.name, self.index, self.rows, self._file.n,
                                      self._file.h.hexdigest(), self.first_row, self.batch_rows)
        finally:
            if not self._file.closed:
                try:
                    self._file.f.close()
                except OSError:  # flushing the rest of a discarded file can fail again (a full disk): it goes anyway
                    pass
            if self.tmp.exists():
                self.tmp.unlink()
        return False


def read_shard_meta(path) -> dict:
    """The cachebrew metadata in a shard's schema (reads only the footer)."""
    try:
        with pa.memory_map(str(path)) as source:
            reader = pa.ipc.open_file(source)
            meta = reader.schema.metadata or {}
    except (pa.ArrowInvalid, OSError) as e:
        raise CacheFormatError(f"{path}: not a readable Arrow shard ({e})") from None
    if META_KEY not in meta:
        raise CacheFormatError(f"{path}: not a cachebrew shard (no '{META_KEY.decode()}' schema metadata)")
    return json.loads(meta[META_KEY])


def describe_shard(path, meta: dict | None = None) -> ShardInfo:
    """Row count, size and checksum of a complete shard on disk."""
    path = Path(path)
    meta = meta or read_shard_meta(path)
    with pa.memory_map(str(path)) as source:
        reader = pa.ipc.open_file(source)
        batches = [reader.get_batch(i).num_rows for i in range(reader.num_record_batches)]
    return ShardInfo(path.name, int(meta["shard_index"]), sum(batches), path.stat().st_size, sha256_file(path),
                     int(meta.get("first_row", 0)), batches)


def remove_temp_files(directory) -> int:
    """Delete leftovers of interrupted writers (dot-named .tmp files)."""
    n = 0
    for p in Path(directory).glob(".part-*.tmp"):
        p.unlink(missing_ok=True)
        n += 1
    return n


def list_shards(directory) -> dict[int, Path]:
    out = {}
    for p in Path(directory).iterdir() if Path(directory).is_dir() else []:
        m = SHARD_RE.match(p.name)
        if m and p.is_file():
            out[int(m.group(1))] = p
    return out
