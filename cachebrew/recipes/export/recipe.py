"""`cachebrew export`: run the teachers once over the data and write the cache.

`ExportRecipe`: ``setup`` (data, teachers, tokenizer → fingerprint) → ``load_checkpoint`` (what the output
directory holds: up to date, foreign, or complete shards to resume from — an export's checkpoints are
its complete shards) → ``plan`` (rows, augmentation, tokens, length-sorted order, this rank's shards) →
``run`` (teachers → writer threads → shards) → ``save`` (the manifest, written last).
Setup order matters: the data and teachers are loaded first because the fingerprint is made of their
content; the fingerprint decides whether the output directory is up to date, resumable or foreign;
only then is the plan tokenized and the remaining shards computed. Teacher forwards run on the main
thread, encoding and writing on `writers` threads (each writing whole shards), so disk and compression overlap
with compute.
Under torchrun each rank writes the shards k with k % world_size == rank; rank 0 writes the manifest, last,
once it has seen every listed shard where the manifest goes. Nodes need not share a disk when the output is a
URI: each rank builds its shards in a staging directory of its own and pushes them itself. A local output
must be one directory every node sees; a per-node directory is refused before the teachers run (and, should
it slip through, before the manifest is written), since no node would hold the whole cache.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import math
import os
import queue
import socket
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import torch

from ...cache.fingerprint import combine, hash_state_dict
from ...cache.format import (COPY, FORMAT_VERSION, ID, INPUT_IDS, LABELS, TASK, TEXT, TEXT_PAIR,
                            TOKEN_COLUMNS, WORDS, cut_batch, cuts_on_device, encode_int_rows, encode_staged,
                            stage_batch)
from ...cache.sparse import row_key
from ...cache.manifest import MANIFEST, Manifest
from ...cache.shards import (ShardInfo, ShardWriter, describe_shard, list_shards, read_shard_meta,
                             remove_temp_files)
from ...cache.lock import DirectoryLock
from ...cache.sharing import copy_shard
from ...cache.storage import Location, is_uri, local_path, locate
from ...core.tensors import iter_tensors
from ...core.training import AMP_DTYPES, resolve_amp
from ...errors import CacheFormatError, CachebrewError, CacheMismatchError, ConfigError
from ...core.runtime import all_gather_objects, barrier, broadcast_object, launch_env, resolve_device
from ...version import __version__
from .config import ExportConfig
from ...components.data import (build_rows, chat_renderer, data_fingerprint, label_vocabulary, load_table, pack_rows,
                                pad_batch, sorted_order, tokenize_rows)
from ...components.alignment import token_texts
from .teachers import forward, load_teacher, load_tokenizer, teacher_tensors, tensor_specs

logger = logging.getLogger("cachebrew")


@dataclass
class ExportResult:
    output: str
    fingerprint: str
    skipped: bool
    rows_total: int
    rows_written: int
    shards_written: int
    shards_resumed: int
    bytes_total: int
    seconds: float

    @property
    def rows_per_second(self) -> float:
        return self.rows_written / self.seconds if self.seconds > 0 else 0.0


def _wipe(out: Path):
    for p in list_shards(out).values():
        p.unlink()
    (out / MANIFEST).unlink(missing_ok=True)
    remove_temp_files(out)


def check_output_dir(out: Path, fingerprint: str, overwrite: bool) -> str:
    """'up_to_date', 'resume' (maybe with nothing done yet), after wiping a foreign cache if overwrite."""
    if (out / MANIFEST).is_file():
        try:
            m = Manifest.read(out)
            same = m.fingerprint == fingerprint
        except CacheFormatError:
            same, m = False, None
        if same and all((out / s.path).is_file() for s in m.shards):
            return "up_to_date"
        if not same and not overwrite:
            old = m.fingerprint[:12] if m else "unreadable"
            raise CacheMismatchError(
                f"{out} already holds a cache with fingerprint {old}…, made from other inputs than this export "
                f"({fingerprint[:12]}…): different teachers, data or settings. Use another output directory, "
                "or --overwrite to replace it.")
        _wipe(out)
        return "resume"
    for index, path in list_shards(out).items():
        try:
            theirs = read_shard_meta(path).get("fingerprint")
        except CacheFormatError:
            theirs = None
        if theirs != fingerprint:
            if not overwrite:
                raise CacheMismatchError(
                    f"{path} belongs to an unfinished export of other inputs (fingerprint "
                    f"{(theirs or 'unreadable')[:12]}…, this export {fingerprint[:12]}…). Use another output "
                    "directory, or --overwrite to replace it.")
            _wipe(out)
            break
    return "resume"


class ShardWriters:
    """`writers` threads that encode and write whole shards, each shard by one thread; errors surface on the next put().

    A thread pays for each shard's lz4, sha256 (~0.8-1 GB/s per core on the 2-core dev machine), writes and fsync, one
    shard after another: one thread wrote ~300 MiB/s of hidden states there, less than a GPU teacher hands over, and
    two ~1.6x that when both cores were free (BENCHMARKS.md: export writers). N threads write N shards at once.
    The batch loop deals each group of N shards over the N slots (`deal_batches`), so every thread has a shard to
    write while the teachers run; a shard's bytes do not depend on which thread wrote it or when, so an export with
    N writers is byte-identical to one with a single writer, and each shard is still published on its own by
    `ShardWriter` (temp file, fsync, rename), whatever the other threads are doing when the process dies.
    Items, per slot and in order: ``("open", index, first_row)``, ``("rows", rows, tokens, tensors, task, ready)``
    (`ready`: the event of the batch's device-to-host copies, or None), ``("close", index)``.
    """

    def __init__(self, directory, schema, shard_meta, specs, writers=1, queued_batches=8, record_batch_rows=256,
                 compression="lz4"):
        self.directory, self.schema, self.meta, self.specs = directory, schema, shard_meta, specs
        self.record_batch_rows = record_batch_rows
        self.compression = None if compression == "none" else compression
        # the same bound on queued teacher batches (host memory, pinned on a GPU) whatever the number of threads
        self.queues = [queue.Queue(max(2, -(-queued_batches // writers))) for _ in range(writers)]
        self.error: BaseException | None = None
        self._error_lock = threading.Lock()
        self.abort = threading.Event()
        self.infos: list[ShardInfo] = []
        self.bytes_written = 0
        self.sampled = any(s.sparse == "sampled" for s in specs)
        self.threads = [threading.Thread(target=self._run, args=(q,), name=f"cachebrew-writer-{i}", daemon=True)
                        for i, q in enumerate(self.queues)]
        for t in self.threads:
            t.start()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:  # stop every thread; each removes the temp file of the shard it was writing
            self.cancel()
        return False

    def put(self, slot: int, item):
        while True:
            if self.error is not None:
                raise self.error
            try:
                self.queues[slot].put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def _run(self, q: queue.Queue):
        writer = None
        try:
            while True:
                if self.abort.is_set():
                    raise KeyboardInterrupt("export aborted")
                try:
                    item = q.get(timeout=0.1)
                except queue.Empty:
                    continue
                if item is None:
                    if writer is not None:  # finish() before the shard's close: it is incomplete, not published
                        raise CachebrewError(f"shard {writer.index} was still open when the export finished")
                    return
                op = item[0]
                if op == "open":
                    writer = ShardWriter(self.directory, item[1], self.schema, {**self.meta, "first_row": item[2]},
                                         compression=self.compression)
                    writer.__enter__()
                    pending, pending_rows = [], 0
                elif op == "rows":
                    # teacher batches are gathered into record batches of record_batch_rows rows
                    pending.append(self._stage(*item[1:]))
                    pending_rows += len(item[1])
                    if pending_rows >= self.record_batch_rows:
                        writer.write(self._record_batch(pending))
                        pending, pending_rows = [], 0
                elif op == "close":
                    if pending:
                        writer.write(self._record_batch(pending))
                    writer.__exit__(None, None, None)
                    with self._error_lock:
                        self.infos.append(writer.info)
                        self.bytes_written += writer.info.bytes
                    writer = None
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            with self._error_lock:
                if self.error is None:  # the first failure is the cause; the other threads stop because of it
                    self.error = e
            self.abort.set()
            if writer is not None:
                writer.__exit__(type(e), e, None)  # removes the temp file: no half shard survives

    def _stage(self, rows, tokens, tensors, task, ready):
        """One teacher batch, as compact host memory until its record batch is full (`stage_batch`)."""
        if ready is not None:
            ready.synchronize()  # the device-to-host copies of this batch have landed
        lengths = [len(t[INPUT_IDS]) for t in tokens]
        keys = [row_key(r.id, r.copy) for r in rows] if self.sampled else None
        staged = {spec.column: stage_batch(spec, tensors[spec.column], lengths, keys) for spec in self.specs}
        return rows, tokens, staged, task, lengths

    def _record_batch(self, pending: list) -> pa.RecordBatch:
        """One record batch from the staged teacher batches: each column built once from all their rows."""
        rows = [r for p in pending for r in p[0]]
        tokens = [t for p in pending for t in p[1]]
        lengths = [n for p in pending for n in p[4]]
        cols = {ID: pa.array([r.id for r in rows], pa.string()), COPY: pa.array([r.copy for r in rows], pa.int32()),
                TASK: pa.array([p[3] for p in pending for _ in p[0]], pa.string())}
        names = self.schema.names
        if TEXT in names:
            cols[TEXT] = pa.array([r.text for r in rows], pa.string())
        if TEXT_PAIR in names:
            cols[TEXT_PAIR] = pa.array([r.text_pair for r in rows], pa.string())
        if WORDS in names:
            cols[WORDS] = pa.array([r.words for r in rows], pa.list_(pa.string()))
        for name, typ in TOKEN_COLUMNS.items():
            if name in names:
                cols[name] = encode_int_rows([t[name] for t in tokens], typ)
        if LABELS in names:
            if pa.types.is_list(self.schema.field(LABELS).type):
                cols[LABELS] = encode_int_rows([t["labels"] for t in tokens], pa.int64())
            else:
                cols[LABELS] = pa.array([t["labels"] for t in tokens], pa.int64())
        for spec in self.specs:
            cols.update(encode_staged(spec, [p[2][spec.column] for p in pending], lengths))
        return pa.RecordBatch.from_arrays([cols[n] for n in names], schema=self.schema)

    def finish(self) -> list[ShardInfo]:
        """Wait for every shard to be published; their infos, by shard index."""
        for slot in range(len(self.queues)):
            self.put(slot, None)
        for t in self.threads:
            t.join()
        if self.error is not None:
            raise self.error
        return sorted(self.infos, key=lambda i: i.index)

    def cancel(self):
        self.abort.set()
        for t in self.threads:
            t.join()


def deal_batches(shards: list[int], batches: dict, writers: int):
    """The order the teachers run the batches in: ``(slot, shard, j, last)`` for batch j of each shard.

    The shards go in groups of `writers`, shard i of a group to writer slot i, and their batches are dealt round-robin
    (batch 0 of each shard of the group, then batch 1, ...): the teachers feed all the slots at once rather than fill
    one shard's queue while the other threads wait. `batches[s]`: shard s's batches (only their count is used).
    With one writer this is the plain order, shard after shard.
    """
    for g in range(0, len(shards), writers):
        group = shards[g:g + writers]
        for j in range(max(len(batches[s]) for s in group)):
            for slot, s in enumerate(group):
                if j < len(batches[s]):
                    yield slot, s, j, j == len(batches[s]) - 1


def stage_outputs(specs, outs: dict, lengths: list[int], row_keys: list[int] | None = None) -> dict:
    """Each spec's teacher output as the writer threads take it: on a GPU, already cut and cast (`cut_batch`;
    sparse logits already drawn), so only the stored bytes cross to the host; on the CPU, padded, so the cut
    runs on a writer thread and not between teacher batches."""
    staged = {}
    for spec in specs:
        t = outs[spec.teacher][(spec.kind, spec.layer)].detach()
        staged[spec.column] = cut_batch(spec, t, lengths, row_keys) if t.is_cuda and cuts_on_device(spec) else t
    return staged


def to_host(tensors: dict, stream: torch.cuda.Stream | None = None) -> tuple[dict, torch.cuda.Event | None]:
    """Start copying (nested dicts of) tensors to the host; (host tensors, the event to wait on or None).

    From a GPU the copies go into pinned buffers on `stream`, a copy stream of their own, so they overlap the next
    batch's forward instead of queueing behind it on the compute stream (None: the current stream). The copy
    stream first waits on an event recorded on the compute stream after this batch's kernels, so it reads
    finished outputs; each device tensor is marked as used by the copy stream, so the allocator does not hand its
    memory to the next forward before the copy has read it. The writer thread waits on the returned event before it
    reads the pinned buffers; nothing here blocks the compute thread. On the CPU: the tensors, as they are.
    """
    cuda = [t for t in iter_tensors(tensors) if t.device.type == "cuda"]
    if not cuda:
        return tensors, None
    compute = torch.cuda.current_stream(cuda[0].device)
    stream = stream or compute
    computed = torch.cuda.Event()
    computed.record(compute)
    stream.wait_event(computed)

    def copy(t):
        buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        buf.copy_(t, non_blocking=True)
        if t.is_cuda:
            t.record_stream(stream)
        return buf

    with torch.cuda.stream(stream):
        host = {k: {n: copy(t) for n, t in v.items()} if isinstance(v, dict) else copy(v) for k, v in tensors.items()}
        copied = torch.cuda.Event(blocking=True)  # a writer thread waiting on it sleeps rather than spins on a core
        copied.record(stream)
    return host, copied


def _schema(cfg: ExportConfig, tokens: list[dict], specs, token_level: bool) -> pa.Schema:
    fields = [pa.field(ID, pa.string()), pa.field(COPY, pa.int32()), pa.field(TASK, pa.string())]
    fields.append(pa.field(WORDS, pa.list_(pa.string())) if token_level else pa.field(TEXT, pa.string()))
    if cfg.data.text_pair:
        fields.append(pa.field(TEXT_PAIR, pa.string()))
    for name, typ in TOKEN_COLUMNS.items():
        if name in tokens[0]:
            fields.append(pa.field(name, pa.list_(typ)))
    if "labels" in tokens[0]:
        fields.append(pa.field(LABELS, pa.list_(pa.int64()) if token_level else pa.int64()))
    for spec in specs:
        fields.extend(spec.arrow_fields())
    return pa.schema(fields)


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def staging_dir(uri: str, rank: int = 0) -> Path:
    """Where this rank builds its shards of an export to a URI before pushing them.

    Stable per URI, so a crashed export resumes from what it had computed. Under torchrun every rank has a
    directory of its own (rank 0 the plain one, so a rerun with one process finds its shards): the nodes
    need not share a disk, each rank pushes what it wrote, and no two ranks inspect or clean one directory.
    ``CACHEBREW_STAGING`` moves them (e.g. to a scratch disk on each node).
    """
    base = Path(os.environ.get("CACHEBREW_STAGING", Path.home() / ".cache" / "cachebrew" / "staging"))
    name = hashlib.sha256(uri.encode()).hexdigest()[:16]
    return base / (name if rank == 0 else f"{name}-rank{rank}")


def _lock_name(rank: int) -> str:
    """Each rank's lock file in the output directory; rank 0 looks for the others' to know the directory is shared."""
    return ".lock" if rank == 0 else f".lock-rank{rank}"


def run_export(cfg: ExportConfig) -> ExportResult:
    """Export into cfg.output, a directory or a filesystem URI.

    A URI is built in local staging directories (one per rank); each rank pushes the shards it wrote, verified
    against their checksums, and rank 0 publishes the manifest once every listed shard is at the destination.
    One export at a time per directory (a lock file); a full disk stops with a clear error and only
    complete shards on disk, which a rerun keeps.
    """
    world, rank, _ = launch_env()
    destination = cfg.output if is_uri(cfg.output) else None
    out = staging_dir(cfg.output, rank) if destination else local_path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    with DirectoryLock(out, _lock_name(rank)):
        try:
            recipe = ExportRecipe(cfg, out, destination)
            recipe.setup()
            if recipe.load_checkpoint() == "up_to_date":
                return recipe.up_to_date()
            recipe.plan()
            recipe.run()
            return recipe.save()
        except OSError as e:
            if e.errno not in _DISK_FULL:
                raise
            raise CachebrewError(f"{out}: {e.strerror or 'no space left on device'} while writing the cache. The "
                                 "shard being written was removed; complete shards stay and a rerun resumes from "
                                 "them once there is space (or choose another output).") from None


def _read_manifest(where: Location) -> Manifest | None:
    """The manifest at `where`, or None when there is none or it cannot be read (treated as another cache's)."""
    if not where.exists(MANIFEST):
        return None
    try:
        return Manifest.from_dict(json.loads(where.read_text(MANIFEST)), where.where(MANIFEST))
    except (ValueError, CacheFormatError):  # bad JSON or UTF-8 (both ValueErrors), or not a manifest
        return None


def _shard_problems(where: Location, shards: list[dict]) -> list[str]:
    """The shards (``ShardInfo.to_dict()``) that `where` lacks or holds with another size, each named for a message.

    Sizes only, no checksums: each shard was hashed as it was written (or pushed, verified), and re-reading a
    whole cache over a network filesystem or object store would cost as much as the push itself.
    """
    problems = []
    for s in shards:
        found = where.info(s["path"])
        if found.type != pafs.FileType.File:
            problems.append(s["path"])
        elif found.size != s["bytes"]:
            problems.append(f"{s['path']} ({found.size} bytes, not {s['bytes']})")
    return problems


def check_shards_present(where: Location, parts: list[dict], pushed: bool) -> None:
    """Refuse to publish a manifest that lists a shard `where` lacks, naming it and the rank and host that wrote it.

    `parts` holds one entry per rank, ``{"rank", "host", "shards": [ShardInfo.to_dict(), ...]}``, as rank 0
    gathers them. `pushed`: the shards were pushed to a URI (a failed upload; rerunning pushes them again);
    otherwise they were written into the output directory directly, and a missing one means that directory is
    not shared between the nodes.
    """
    missing = []
    for part in parts:
        problems = _shard_problems(where, part["shards"])
        if problems:
            names = ", ".join(problems[:3]) + (f" and {len(problems) - 3} more" if len(problems) > 3 else "")
            missing.append(f"{names} (rank {part['rank']} on {part['host']})")
    if not missing:
        return
    if pushed:
        raise CacheFormatError(f"{where.uri}: shards pushed by their ranks are missing there: {'; '.join(missing)}. "
                               "The manifest was not written; rerun the export to push them again (nothing is "
                               "recomputed)")
    host0 = next((p["host"] for p in parts if p["rank"] == 0), "?")
    raise CachebrewError(f"{where.uri}: shards written by other ranks are not in this directory as rank 0 on {host0} "
                         f"sees it: {'; '.join(missing)}. The output directory is not shared between the nodes, so "
                         "no node holds the whole cache and no manifest was written. Use a directory on a filesystem "
                         "every node mounts (e.g. file:///shared/cache), or a URI output (s3://bucket/cache), to "
                         "which each rank pushes its own shards")


def check_shared_output(out: Path, peers: list[dict]) -> None:
    """Refuse, before any teacher runs, a local output that is not one directory shared by every rank.

    Each rank holds its lock file in its output directory (`run_export`), recording its pid and host; `peers`
    holds every rank's ``{"rank", "host", "pid"}``. A rank whose lock rank 0 cannot find there writes into a
    directory of its own (a node-local disk), and its shards would be missing from the published cache.
    """
    me = next((p for p in peers if p["rank"] == 0), {"host": "?"})
    for peer in peers:
        if peer["rank"] == 0:
            continue
        try:
            holder = json.loads((out / _lock_name(peer["rank"])).read_text())
        except (OSError, ValueError):  # no such file, or being written: not a lock this run's rank holds
            holder = {}
        if (holder.get("host"), holder.get("pid")) != (peer["host"], peer["pid"]):
            raise CachebrewError(
                f"{out}: the output directory is not shared between the nodes: rank 0 on {me['host']} does not see "
                f"the lock of rank {peer['rank']} on {peer['host']} in it, so that rank's shards would be missing "
                "from the cache. Use a directory on a filesystem every node mounts (e.g. file:///shared/cache), "
                "or a URI output (s3://bucket/cache), to which each rank pushes its own shards")


def _raise_together(own: BaseException | None, decision: str | None) -> None:
    """Stop this rank when a collective check failed: with its own error if it is the cause, else the same message.

    Every rank raises, so none is left waiting in a later collective (for the process group's whole timeout).
    """
    if decision is None:
        return
    if own is not None and str(own) == decision:
        raise own
    if own is not None:
        logger.error("%s", own)  # this rank's own problem, beside the one that stops every rank
    raise CachebrewError(decision)


class ExportRecipe:
    """One export: this rank's shards into the local directory `out`, pushed to `destination` when the output is a
    URI (`run_export` picks the directories, holds the lock and reports a full disk)."""

    def __init__(self, cfg: ExportConfig, out: Path, destination: str | None = None):
        """`out`: where this rank writes its shards; `destination`: the URI it pushes them to, or None (`out` is the
        output)."""
        self.cfg, self.out, self.destination = cfg, out, destination

    def setup(self) -> None:
        """Load everything the fingerprint is made of: the data, the teachers' weights, the tokenizer, settings."""
        cfg = self.cfg
        self.t0 = time.perf_counter()
        self.world, self.rank, local_rank = launch_env()
        self.device = resolve_device(cfg.device, local_rank)
        if self.world > 1 and not torch.distributed.is_initialized():
            # Only barriers and the final gather travel over it. A rank with fewer shards waits in that gather
            # for the slowest rank's whole export, hours on a big teacher: gloo's default 30-minute timeout
            # would kill a healthy run, so the wait is bounded by a day instead.
            torch.distributed.init_process_group("gloo", timeout=timedelta(hours=24))
        self.ds = load_table(cfg.data)
        loaded = [load_teacher(tc, i, bool(cfg.outputs.attention_layers)) for i, tc in enumerate(cfg.teachers)]
        self.teachers = {tc.name: model for tc, (model, _) in zip(cfg.teachers, loaded)}
        self.weights = {name: hash_state_dict(model) for name, model in self.teachers.items()}
        self.tokenizer, tokenizer_hash = load_tokenizer(cfg, [tok for _, tok in loaded])
        self.amp_dtype = AMP_DTYPES.get(resolve_amp(cfg.amp, self.device))
        self.fingerprint_inputs = {
            "format_version": FORMAT_VERSION, "cachebrew": __version__, "torch": torch.__version__,
            "teachers": self.weights, "tokenizer": tokenizer_hash, "dataset": data_fingerprint(cfg.data),
            "export": cfg.fingerprint_settings(), "device_type": self.device.type, "amp": str(self.amp_dtype),
        }
        self.fingerprint = combine(self.fingerprint_inputs)

    def load_checkpoint(self) -> str:
        """'up_to_date' or 'resume', the same on every rank; a problem any rank finds stops every rank.

        A local output: rank 0 checks that it is one directory shared by all ranks, then inspects it (refusing
        a foreign cache). A URI: rank 0 asks the destination (up to date, or a foreign cache, refused now rather
        than after the teachers ran); then each rank inspects its own staging directory.
        """
        if self.destination is None:
            peers = all_gather_objects({"rank": self.rank, "host": socket.gethostname(), "pid": os.getpid()})
            state = self._decided_by_rank0(lambda: self._inspect_output(peers))
        else:
            state = self._decided_by_rank0(self._inspect_destination)
            if state != "up_to_date":
                self._checked_on_every_rank(self._inspect_staging)
        barrier()
        return state

    def _inspect_output(self, peers: list[dict]) -> str:
        if self.world > 1:
            check_shared_output(self.out, peers)
        state = check_output_dir(self.out, self.fingerprint, self.cfg.overwrite)
        remove_temp_files(self.out)
        return state

    def _inspect_destination(self) -> str:
        """'up_to_date' when the destination publishes this cache whole; else 'resume' after unpublishing it.

        A foreign cache there is refused (or, with overwrite, unpublished: this export's shards replace its own).
        """
        dest = locate(self.destination)
        if not dest.exists(MANIFEST):
            return "resume"
        m = _read_manifest(dest)
        if m is not None and m.fingerprint == self.fingerprint:
            if not _shard_problems(dest, [s.to_dict() for s in m.shards]):
                return "up_to_date"
        elif not self.cfg.overwrite:
            old = m.fingerprint[:12] if m else "unreadable"
            raise CacheMismatchError(
                f"{dest.uri} already holds a cache with fingerprint {old}…, made from other inputs than this export "
                f"({self.fingerprint[:12]}…): different teachers, data or settings. Use another output, or "
                "--overwrite to replace it.")
        dest.fs.delete_file(dest.join(MANIFEST))  # unpublished first: the shards it lists are replaced or missing
        return "resume"

    def _inspect_staging(self) -> None:
        check_output_dir(self.out, self.fingerprint, self.cfg.overwrite)  # 'up_to_date' too: its shards are pushed
        remove_temp_files(self.out)

    def _decided_by_rank0(self, decide):
        """decide() on rank 0 and its result on every rank; a CachebrewError (or OSError: a disk, a bucket) it
        raises stops every rank, rank 0 with the error itself."""
        result, own = None, None
        if self.rank == 0:
            try:
                result = decide()
            except (CachebrewError, OSError) as e:
                own = e
        result, decision = broadcast_object((result, str(own) if own else None))
        _raise_together(own, decision)
        return result

    def _checked_on_every_rank(self, check) -> None:
        """check() on every rank; the first CachebrewError (or OSError) in rank order stops every rank with its
        message."""
        own = None
        try:
            check()
        except (CachebrewError, OSError) as e:
            own = e
        found = [m for m in all_gather_objects(str(own) if own else None) if m]
        _raise_together(own, found[0] if found else None)

    def up_to_date(self) -> ExportResult:
        m = Manifest.read(self.out) if self.destination is None else _read_manifest(locate(self.destination))
        where = self.destination or self.out
        logger.info("%s is up to date (fingerprint %s…): nothing to do", where, self.fingerprint[:12])
        return ExportResult(str(where), self.fingerprint, True, m.num_rows, 0, 0, len(m.shards), m.num_bytes,
                            time.perf_counter() - self.t0)

    def plan(self) -> None:
        """Rows (example, copy) → tokens → length-sorted order; shard k is rows [k·R, (k+1)·R) of it."""
        cfg = self.cfg
        self.token_level = cfg.data.tokens is not None
        label_col = self.ds[cfg.data.label] if cfg.data.label else []
        first_model = next(iter(self.teachers.values()))
        label2id = getattr(getattr(first_model, "config", None), "label2id", None)
        self.label_names, label_map = label_vocabulary(label_col, label2id)
        chat = chat_renderer(self.tokenizer) if cfg.data.messages is not None else None
        self.rows = build_rows(self.ds, cfg.data, cfg.augment, getattr(self.tokenizer, "mask_token", None) or "[MASK]",
                               chat)
        self.tokens = tokenize_rows(self.rows, self.tokenizer, None if cfg.packing else cfg.max_length, label_map,
                                    self.token_level, add_special_tokens=chat is None, spans=cfg.outputs.token_spans)
        if cfg.packing:
            self.rows, self.tokens = pack_rows(self.rows, self.tokens, cfg.max_length, self._separator_id(),
                                               self.tokenizer.decode, spans=cfg.outputs.token_spans)
        self.order = sorted_order([len(t[INPUT_IDS]) for t in self.tokens], cfg.sort_window * cfg.batch_size)
        self.n_shards = math.ceil(len(self.order) / cfg.shard_rows)
        mine = [s for s in range(self.n_shards) if s % self.world == self.rank]
        self.on_disk = list_shards(self.out)
        self.done = [s for s in mine if s in self.on_disk]
        self.todo = [s for s in mine if s not in self.on_disk]
        if self.done:
            logger.info("resuming: %d of this rank's %d shards are already complete", len(self.done), len(mine))

    def _vocabulary(self) -> list[str] | None:
        """A causal-LM teacher's token texts by id (each decoded alone), for students with another tokenizer."""
        if not any(tc.model_class == "AutoModelForCausalLM" for tc in self.cfg.teachers) or \
                not self.cfg.outputs.token_spans or not getattr(self.tokenizer, "is_fast", False):
            return None
        return token_texts(self.tokenizer)

    def _separator_id(self) -> int:
        """The token that ends each packed document: the tokenizer's EOS (else its SEP)."""
        for name in ("eos_token_id", "sep_token_id"):
            if getattr(self.tokenizer, name, None) is not None:
                return int(getattr(self.tokenizer, name))
        raise ConfigError(f"packing: the tokenizer ({type(self.tokenizer).__name__}) has no eos_token (nor "
                          "sep_token) to mark where a packed document ends; set one or packing: false")

    def _run_teachers(self, batch_tokens) -> dict:
        batch = pad_batch(batch_tokens, self.pad_id, labels=False)
        if self.device.type == "cuda":
            # From pageable memory a host-to-device copy blocks the compute thread until the GPU has taken it; from
            # pinned memory it is queued like a kernel and the thread goes on (the host allocator keeps the pinned
            # block until the copy has read it).
            batch = {k: v.pin_memory().to(self.device, non_blocking=True) for k, v in batch.items()}
        else:
            batch = {k: v.to(self.device) for k, v in batch.items()}
        outs = {}
        autocast = (torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype
                    else contextlib.nullcontext())
        with torch.inference_mode(), autocast:
            for name, model in self.teachers.items():
                outs[name] = teacher_tensors(name, forward(model, batch, self.cfg), self.cfg)
        return outs

    def run(self) -> None:
        """Teachers on the device, batch by batch; `cfg.writers` writer threads encode and write this rank's shards."""
        cfg, out, order = self.cfg, self.out, self.order
        for model in self.teachers.values():
            model.to(self.device)
        self.pad_id = self.tokenizer.pad_token_id if getattr(self.tokenizer, "pad_token_id", None) is not None else 0
        # output specs from the plan's first batch (the same on every rank)
        probe_idx = list(order[:cfg.batch_size])
        probe = self._run_teachers([self.tokens[i] for i in probe_idx])
        self.specs = [spec for name, tensors in probe.items() for spec in tensor_specs(name, tensors, cfg)]
        self.schema = _schema(cfg, self.tokens, self.specs, self.token_level)
        # device-to-host copies on a stream of their own, beside the teachers' kernels (`to_host`)
        copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        batches = {}
        for s in self.todo:
            shard_order = order[s * cfg.shard_rows:(s + 1) * cfg.shard_rows]
            batches[s] = [shard_order[i:i + cfg.batch_size] for i in range(0, len(shard_order), cfg.batch_size)]
        n_writers = max(1, min(cfg.writer_threads(), len(self.todo)))
        progress = None
        if cfg.progress_bar and self.rank == 0:
            from tqdm.auto import tqdm

            progress = tqdm(total=sum(len(i) for b in batches.values() for i in b), desc=f"export {out.name}",
                            unit="ex", dynamic_ncols=True)
        self.written = 0
        sampled = any(spec.sparse == "sampled" for spec in self.specs)
        try:
            with ShardWriters(out, self.schema, {"fingerprint": self.fingerprint, "format_version": FORMAT_VERSION},
                              self.specs, writers=n_writers, record_batch_rows=cfg.record_batch_rows,
                              compression=cfg.compression) as writers:
                for slot, s, j, last in deal_batches(self.todo, batches, n_writers):
                    idx = batches[s][j]
                    if j == 0:
                        writers.put(slot, ("open", s, s * cfg.shard_rows))
                    batch_tokens = [self.tokens[i] for i in idx]
                    # the probe already ran the plan's first batch: reuse it rather than run the teachers twice (it
                    # is not shard 0's first batch when shard_rows < batch_size)
                    outs = probe if probe is not None and list(idx) == probe_idx else self._run_teachers(batch_tokens)
                    probe = None
                    keys = [row_key(self.rows[i].id, self.rows[i].copy) for i in idx] if sampled else None
                    host, ready = to_host(stage_outputs(self.specs, outs, [len(t[INPUT_IDS]) for t in batch_tokens],
                                                        keys), copy_stream)
                    writers.put(slot, ("rows", [self.rows[i] for i in idx], batch_tokens, host, cfg.task, ready))
                    if last:
                        writers.put(slot, ("close", s))
                    self.written += len(idx)
                    if progress is not None:
                        progress.update(len(idx))
                        progress.set_postfix(written=f"{writers.bytes_written / 2**20:.1f}MiB")
                self.shard_infos = writers.finish()
        finally:
            if progress is not None:
                progress.close()

    def save(self) -> ExportResult:
        """Push (to a URI) and gather every rank's shards; rank 0 checks them and publishes the manifest, last.

        Each rank pushes the shards it wrote from its own staging directory, so no node needs another's disk.
        Rank 0 writes the manifest only after seeing every listed shard, with its recorded size, where the
        manifest goes; any failure stops every rank with one message naming the shard, rank and host.
        """
        infos = [i.to_dict() for i in self.shard_infos] + [describe_shard(self.on_disk[s]).to_dict() for s in self.done]
        host = socket.gethostname()
        if self.destination is not None:
            self._checked_on_every_rank(lambda: self._push(infos, host))
        parts = all_gather_objects({"rank": self.rank, "host": host, "shards": infos})
        total_bytes = self._decided_by_rank0(lambda: self._publish(parts))
        barrier()
        return ExportResult(self.destination or str(self.out), self.fingerprint, False, len(self.order), self.written,
                            len(self.shard_infos), len(self.done), total_bytes, time.perf_counter() - self.t0)

    def _push(self, infos: list[dict], host: str) -> None:
        """This rank's shards, from its staging directory to the destination, each verified as it streams.

        Always copied, even when the destination holds an object of that name and size: a shard computed again
        has other bytes than an earlier push of it, and only this rank's copy matches the checksum it reports.
        """
        src, dest = locate(self.out), locate(self.destination)
        dest.fs.create_dir(dest.path, recursive=True)
        for info in infos:
            try:
                copy_shard(src, dest, ShardInfo(**info))
            except (OSError, CacheFormatError) as e:
                raise CachebrewError(f"{dest.where(info['path'])}: rank {self.rank} on {host} could not push it from "
                                     f"{self.out}: {e}") from e
        logger.info("pushed %d shards from %s to %s", len(infos), self.out, self.destination)

    def _publish(self, parts: list[dict]) -> int:
        """The manifest of every rank's shards, written last where the cache goes; its size in bytes (rank 0)."""
        cfg = self.cfg
        shard_infos = sorted((ShardInfo(**i) for part in parts for i in part["shards"]), key=lambda i: i.index)
        where = locate(self.destination or self.out)
        if [i.index for i in shard_infos] != list(range(self.n_shards)):
            raise CacheFormatError(f"{where.uri}: expected shards 0..{self.n_shards - 1}, "
                                   f"have {[i.index for i in shard_infos]}")
        check_shards_present(where, parts, pushed=self.destination is not None)
        manifest = Manifest(
            fingerprint=self.fingerprint, fingerprint_inputs=self.fingerprint_inputs,
            columns={f.name: str(f.type) for f in self.schema}, tensors=self.specs,
            teachers={tc.name: {"weights_sha256": self.weights[tc.name], "source": tc.path or tc.entry_point,
                                "model_class": tc.model_class} for tc in cfg.teachers},
            shards=shard_infos, tasks={cfg.task: len(self.order)}, config=cfg.to_dict(),
            token_level=self.token_level, label_names=self.label_names, num_examples=len(self.ds),
            created=datetime.now(timezone.utc).isoformat(), vocabulary=self._vocabulary())
        if self.destination is None:
            manifest.write(self.out)
        else:
            where.write_atomic(MANIFEST, json.dumps(manifest.to_dict(), indent=2).encode())
        return manifest.num_bytes
