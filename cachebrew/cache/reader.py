"""Opening, checking and reading a cache directory.

`CacheReader` validates the manifest on open; `verify()` re-checks every shard's checksum, row count and
schema and names the bad shard. Reading decodes rows back to tensors (`read_rows`), the building block
of the streaming loader used by distill.
"""
from __future__ import annotations

import json

import pyarrow as pa

from ..errors import CacheFormatError
from .format import (ATTENTION_MASK, COPY, ID, INPUT_IDS, LABELS, TASK, TEXT, TEXT_PAIR, TOKEN_TYPE_IDS, WORDS,
                     decode_int_column, decode_tensor_column)
from .manifest import MANIFEST, Manifest
from .shards import META_KEY
from .storage import locate


class CacheReader:
    """A cache in a local directory or at a filesystem URI (s3://bucket/cache, ...)."""

    def __init__(self, path):
        self.location = locate(path)
        self.path = self.location.uri if not self.location.local else self.location.path
        if self.location.local:
            self.manifest = Manifest.read(self.location.path)
        else:
            where = self.location.where(MANIFEST)
            try:
                text = self.location.read_text(MANIFEST)
            except FileNotFoundError:
                raise CacheFormatError(f"{where}: missing; not a cache, or an incomplete copy") from None
            except OSError as e:
                raise CacheFormatError(f"{where}: cannot read ({e})") from None
            try:
                d = json.loads(text)
            except json.JSONDecodeError as e:
                raise CacheFormatError(f"{where}: not valid JSON ({e})") from None
            self.manifest = Manifest.from_dict(d, where)

    @property
    def num_rows(self) -> int:
        return self.manifest.num_rows

    def shard_path(self, info) -> str:
        return self.location.where(info.path)

    def open_input(self, info, mmap: bool = True):
        """The shard as a random-access file (memory map locally unless mmap=False), for pa.ipc.open_file."""
        try:
            return self.location.open_input(info.path, mmap)
        except FileNotFoundError:
            raise CacheFormatError(f"{self.shard_path(info)}: shard listed in the manifest is missing") from None

    def open_shard(self, info) -> pa.Table:
        source = self.open_input(info)
        try:
            with source:
                return pa.ipc.open_file(source).read_all()
        except (pa.ArrowInvalid, OSError) as e:
            raise CacheFormatError(f"{self.shard_path(info)}: unreadable shard ({e})") from None

    def verify(self, progress=None) -> list[str]:
        """Problems found, one line per bad shard (empty: the cache is intact)."""
        problems = []
        expected = [(name, t) for name, t in self.manifest.columns.items()]
        for info in self.manifest.shards:
            if not self.location.exists(info.path):
                problems.append(f"{info.path}: missing")
                continue
            digest = self.location.sha256(info.path)
            if digest != info.sha256:
                problems.append(f"{info.path}: checksum mismatch (sha256 {digest[:16]}…, "
                                f"manifest says {info.sha256[:16]}…)")
                continue
            try:
                with self.open_input(info) as source:
                    reader = pa.ipc.open_file(source)
                    schema = reader.schema
                    rows = sum(reader.get_batch(i).num_rows for i in range(reader.num_record_batches))
            except (pa.ArrowInvalid, OSError) as e:
                problems.append(f"{info.path}: unreadable ({e})")
                continue
            if rows != info.rows:
                problems.append(f"{info.path}: {rows} rows, manifest says {info.rows}")
            got = [(f.name, str(f.type)) for f in schema]
            if got != expected:
                problems.append(f"{info.path}: schema differs from the manifest's columns")
            meta = (schema.metadata or {}).get(META_KEY)
            if meta is None or f'"fingerprint": "{self.manifest.fingerprint}"' not in meta.decode():
                problems.append(f"{info.path}: fingerprint in the shard differs from the manifest's")
            if progress:
                progress(info)
        return problems

    def read_rows(self, table: pa.Table) -> list[dict]:
        """Decode a shard table into per-row dicts: inputs as numpy arrays, teacher outputs as tensors."""
        ids = decode_int_column(table, INPUT_IDS)
        lengths = [len(x) for x in ids]
        rows = [{ID: i, COPY: c, TASK: t} for i, c, t in zip(table.column(ID).to_pylist(),
                                                              table.column(COPY).to_pylist(),
                                                              table.column(TASK).to_pylist())]
        for name in (INPUT_IDS, ATTENTION_MASK, TOKEN_TYPE_IDS):
            if name in table.column_names:
                for r, v in zip(rows, ids if name == INPUT_IDS else decode_int_column(table, name)):
                    r[name] = v
        for name in (TEXT, TEXT_PAIR, WORDS):
            if name in table.column_names:
                for r, v in zip(rows, table.column(name).to_pylist()):
                    r[name] = v
        if LABELS in table.column_names:
            col = table.column(LABELS)
            values = decode_int_column(table, LABELS) if pa.types.is_list(col.type) else col.to_pylist()
            for r, v in zip(rows, values):
                r[LABELS] = v
        for spec in self.manifest.tensors:
            for r, t in zip(rows, decode_tensor_column(spec, table, lengths)):
                r[spec.column] = t
        return rows

    def iter_rows(self):
        for info in sorted(self.manifest.shards, key=lambda s: s.index):
            yield from self.read_rows(self.open_shard(info))
