"""`cachebrew export`: run the teachers once over the data and write the cache.

`ExportRecipe`: ``setup`` (data, teachers, tokenizer → fingerprint) → ``load_checkpoint`` (what the output
directory holds: up to date, foreign, or complete shards to resume from — an export's checkpoints are
its complete shards) → ``plan`` (rows, augmentation, tokens, length-sorted order, this rank's shards) →
``run`` (teachers → writer thread → shards) → ``save`` (the manifest, written last).
Setup order matters: the data and teachers are loaded first because the fingerprint is made of their
content; the fingerprint decides whether the output directory is up to date, resumable or foreign;
only then is the plan tokenized and the remaining shards computed. Teacher forwards run on the main
thread, encoding and writing on a writer thread, so disk and compression overlap with compute.
Under torchrun each rank writes the shards k with k % world_size == rank; rank 0 writes the manifest.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import math
import os
import queue
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import torch

from ...cache.fingerprint import combine, hash_state_dict
from ...cache.format import (COPY, FORMAT_VERSION, ID, INPUT_IDS, LABELS, TASK, TEXT, TEXT_PAIR,
                            TOKEN_COLUMNS, WORDS, cut_batch, cuts_on_device, encode_batch,
                            encode_cut, encode_int_rows)
from ...cache.sparse import row_key
from ...cache.manifest import MANIFEST, Manifest
from ...cache.shards import (ShardInfo, ShardWriter, describe_shard, list_shards, read_shard_meta,
                             remove_temp_files)
from ...cache.lock import DirectoryLock
from ...cache.sharing import copy_cache
from ...cache.storage import is_uri, local_path
from ...core.tensors import iter_tensors
from ...core.training import AMP_DTYPES, resolve_amp
from ...errors import CacheFormatError, CachebrewError, CacheMismatchError, ConfigError
from ...core.runtime import barrier, launch_env, resolve_device
from ...version import __version__
from .config import ExportConfig
from ...components.data import (build_rows, chat_renderer, data_fingerprint, label_vocabulary, load_table, pack_rows,
                                pad_batch, sorted_order, tokenize_rows)
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


class _WriterThread:
    """Encodes and writes shards off the compute thread; errors surface on the next put()."""

    def __init__(self, directory, schema, shard_meta, specs, maxsize=8, record_batch_rows=256, compression="lz4"):
        self.directory, self.schema, self.meta, self.specs = directory, schema, shard_meta, specs
        self.record_batch_rows = record_batch_rows
        self.compression = None if compression == "none" else compression
        self.q: queue.Queue = queue.Queue(maxsize)
        self.error: BaseException | None = None
        self.abort = threading.Event()
        self.infos = []
        self.bytes_written = 0
        self.thread = threading.Thread(target=self._run, name="cachebrew-writer", daemon=True)
        self.thread.start()

    def put(self, item):
        while True:
            if self.error is not None:
                raise self.error
            try:
                self.q.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def _run(self):
        writer = None
        try:
            while True:
                try:
                    item = self.q.get(timeout=0.1)
                except queue.Empty:
                    if self.abort.is_set():
                        raise KeyboardInterrupt("export aborted")
                    continue
                if item is None:
                    return
                op = item[0]
                if op == "open":
                    writer = ShardWriter(self.directory, item[1], self.schema, {**self.meta, "first_row": item[2]},
                                         compression=self.compression)
                    writer.__enter__()
                    pending = []
                elif op == "rows":
                    # teacher batches are gathered into record batches of record_batch_rows rows
                    pending.append(self._record_batch(*item[1:]))
                    if sum(b.num_rows for b in pending) >= self.record_batch_rows:
                        self._flush(writer, pending)
                elif op == "close":
                    self._flush(writer, pending)
                    writer.__exit__(None, None, None)
                    self.infos.append(writer.info)
                    self.bytes_written += writer.info.bytes
                    writer = None
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            self.error = e
            if writer is not None:
                writer.__exit__(type(e), e, None)  # removes the temp file: no half shard survives

    @staticmethod
    def _flush(writer, pending):
        if pending:
            writer.write(pa.Table.from_batches(pending).combine_chunks().to_batches()[0])
            pending.clear()

    def _record_batch(self, rows, tokens, tensors, task, ready):
        if ready is not None:
            ready.synchronize()  # the device-to-host copies of this batch have landed
        lengths = [len(t[INPUT_IDS]) for t in tokens]
        cols = {ID: pa.array([r.id for r in rows], pa.string()), COPY: pa.array([r.copy for r in rows], pa.int32()),
                TASK: pa.array([task] * len(rows), pa.string())}
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
        keys = [row_key(r.id, r.copy) for r in rows] if any(s.sparse == "sampled" for s in self.specs) else None
        for spec in self.specs:
            t = tensors[spec.column]
            cols.update(encode_cut(spec, t, lengths) if isinstance(t, dict) else encode_batch(spec, t, lengths, keys))
        return pa.RecordBatch.from_arrays([cols[n] for n in names], schema=self.schema)

    def finish(self):
        self.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error

    def cancel(self):
        self.abort.set()
        self.thread.join()


def stage_outputs(specs, outs: dict, lengths: list[int], row_keys: list[int] | None = None) -> dict:
    """Each spec's teacher output as the writer thread takes it: on a GPU, already cut and cast (`cut_batch`;
    sparse logits already drawn), so only the stored bytes cross to the host; on the CPU, padded, so the cut
    runs on the writer thread and not between teacher batches."""
    staged = {}
    for spec in specs:
        t = outs[spec.teacher][(spec.kind, spec.layer)].detach()
        staged[spec.column] = cut_batch(spec, t, lengths, row_keys) if t.is_cuda and cuts_on_device(spec) else t
    return staged


def to_host(tensors: dict) -> tuple[dict, torch.cuda.Event | None]:
    """Start copying (nested dicts of) tensors to the host; (host tensors, the event to wait on or None).

    From a GPU the copies go into pinned buffers without blocking the compute thread, which goes on to
    the next batch; the writer thread waits on the event before it reads them. On the CPU: as they are.
    """
    if all(t.device.type != "cuda" for t in iter_tensors(tensors)):
        return tensors, None

    def copy(t):
        buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        return buf.copy_(t, non_blocking=True)

    host = {k: {n: copy(t) for n, t in v.items()} if isinstance(v, dict) else copy(v) for k, v in tensors.items()}
    event = torch.cuda.Event()
    event.record()
    return host, event


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


def staging_dir(uri: str) -> Path:
    """Where an export to a URI is built before it is pushed; stable per URI, so a crashed export resumes."""
    base = Path(os.environ.get("CACHEBREW_STAGING", Path.home() / ".cache" / "cachebrew" / "staging"))
    return base / hashlib.sha256(uri.encode()).hexdigest()[:16]


def run_export(cfg: ExportConfig) -> ExportResult:
    """Export into cfg.output, a directory or a filesystem URI (built locally, then pushed with checksums).

    One export at a time per directory (a lock file); a full disk stops with a clear error and only
    complete shards on disk, which a rerun keeps.
    """
    if is_uri(cfg.output):
        from dataclasses import replace

        staged = staging_dir(cfg.output)
        result = run_export(replace(cfg, output=str(staged)))
        if launch_env()[1] == 0:
            report = copy_cache(staged, cfg.output, overwrite=cfg.overwrite)
            logger.info("pushed %s to %s: %d shards copied, %d already there", staged, cfg.output, report.copied,
                        report.skipped)
        result.output = cfg.output
        return result
    world, rank, _ = launch_env()
    out = local_path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    with DirectoryLock(out, ".lock" if rank == 0 else f".lock-rank{rank}"):
        try:
            recipe = ExportRecipe(cfg, out)
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


class ExportRecipe:
    """One export into a local directory (`run_export` handles URIs, the lock and a full disk)."""

    def __init__(self, cfg: ExportConfig, out: Path):
        self.cfg, self.out = cfg, out

    def setup(self) -> None:
        """Load everything the fingerprint is made of: the data, the teachers' weights, the tokenizer, settings."""
        cfg = self.cfg
        self.t0 = time.perf_counter()
        self.world, self.rank, local_rank = launch_env()
        self.device = resolve_device(cfg.device, local_rank)
        if self.world > 1 and not torch.distributed.is_initialized():
            torch.distributed.init_process_group("gloo")  # only barriers and the final gather travel over it
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
        """'up_to_date' or 'resume': rank 0 inspects the directory (refusing a foreign cache), every rank hears."""
        state = None
        if self.rank == 0:
            state = check_output_dir(self.out, self.fingerprint, self.cfg.overwrite)
            remove_temp_files(self.out)
        if self.world > 1:
            box = [state]
            torch.distributed.broadcast_object_list(box, src=0)
            state = box[0]
        barrier()
        return state

    def up_to_date(self) -> ExportResult:
        m = Manifest.read(self.out)
        logger.info("%s is up to date (fingerprint %s…): nothing to do", self.out, self.fingerprint[:12])
        return ExportResult(str(self.out), self.fingerprint, True, m.num_rows, 0, 0, len(m.shards), m.num_bytes,
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
                                    self.token_level, add_special_tokens=chat is None)
        if cfg.packing:
            self.rows, self.tokens = pack_rows(self.rows, self.tokens, cfg.max_length, self._separator_id(),
                                               self.tokenizer.decode)
        self.order = sorted_order([len(t[INPUT_IDS]) for t in self.tokens], cfg.sort_window * cfg.batch_size)
        self.n_shards = math.ceil(len(self.order) / cfg.shard_rows)
        mine = [s for s in range(self.n_shards) if s % self.world == self.rank]
        self.on_disk = list_shards(self.out)
        self.done = [s for s in mine if s in self.on_disk]
        self.todo = [s for s in mine if s not in self.on_disk]
        if self.done:
            logger.info("resuming: %d of this rank's %d shards are already complete", len(self.done), len(mine))

    def _separator_id(self) -> int:
        """The token that ends each packed document: the tokenizer's EOS (else its SEP)."""
        for name in ("eos_token_id", "sep_token_id"):
            if getattr(self.tokenizer, name, None) is not None:
                return int(getattr(self.tokenizer, name))
        raise ConfigError(f"packing: the tokenizer ({type(self.tokenizer).__name__}) has no eos_token (nor "
                          "sep_token) to mark where a packed document ends; set one or packing: false")

    def _run_teachers(self, batch_tokens) -> dict:
        batch = {k: v.to(self.device) for k, v in pad_batch(batch_tokens, self.pad_id, labels=False).items()}
        outs = {}
        autocast = (torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype
                    else contextlib.nullcontext())
        with torch.inference_mode(), autocast:
            for name, model in self.teachers.items():
                outs[name] = teacher_tensors(name, forward(model, batch, self.cfg), self.cfg)
        return outs

    def run(self) -> None:
        """Teachers on the device, batch by batch; the writer thread encodes and writes this rank's shards."""
        cfg, out, order = self.cfg, self.out, self.order
        for model in self.teachers.values():
            model.to(self.device)
        self.pad_id = self.tokenizer.pad_token_id if getattr(self.tokenizer, "pad_token_id", None) is not None else 0
        # output specs from the plan's first batch (the same on every rank)
        probe = self._run_teachers([self.tokens[i] for i in order[:cfg.batch_size]])
        self.specs = [spec for name, tensors in probe.items() for spec in tensor_specs(name, tensors, cfg)]
        self.schema = _schema(cfg, self.tokens, self.specs, self.token_level)
        writer = _WriterThread(out, self.schema, {"fingerprint": self.fingerprint, "format_version": FORMAT_VERSION},
                               self.specs, record_batch_rows=cfg.record_batch_rows, compression=cfg.compression)
        rows_todo = sum(len(order[s * cfg.shard_rows:(s + 1) * cfg.shard_rows]) for s in self.todo)
        progress = None
        if cfg.progress_bar and self.rank == 0:
            from tqdm.auto import tqdm

            progress = tqdm(total=rows_todo, desc=f"export {out.name}", unit="ex", dynamic_ncols=True)
        self.written = 0
        try:
            for s in self.todo:
                shard_order = order[s * cfg.shard_rows:(s + 1) * cfg.shard_rows]
                writer.put(("open", s, s * cfg.shard_rows))
                for start in range(0, len(shard_order), cfg.batch_size):
                    idx = shard_order[start:start + cfg.batch_size]
                    batch_tokens = [self.tokens[i] for i in idx]
                    # the probe already ran the plan's first batch: reuse it rather than run the teachers twice
                    outs = probe if (s == 0 and start == 0 and probe is not None) else self._run_teachers(batch_tokens)
                    probe = None
                    keys = [row_key(self.rows[i].id, self.rows[i].copy) for i in idx] if any(
                        spec.sparse == "sampled" for spec in self.specs) else None
                    host, ready = to_host(stage_outputs(self.specs, outs, [len(t[INPUT_IDS]) for t in batch_tokens],
                                                        keys))
                    writer.put(("rows", [self.rows[i] for i in idx], batch_tokens, host, cfg.task, ready))
                    self.written += len(idx)
                    if progress is not None:
                        progress.update(len(idx))
                        progress.set_postfix(written=f"{writer.bytes_written / 2**20:.1f}MiB")
                writer.put(("close", s))
            writer.finish()
        except BaseException:
            writer.cancel()
            raise
        finally:
            if progress is not None:
                progress.close()
        self.shard_infos = writer.infos

    def save(self) -> ExportResult:
        """Describe every shard of every rank, gather, and publish the manifest (rank 0): the cache is complete."""
        cfg, out = self.cfg, self.out
        infos = [i.to_dict() for i in self.shard_infos] + [describe_shard(self.on_disk[s]).to_dict() for s in self.done]
        if self.world > 1:
            gathered = [None] * self.world
            torch.distributed.all_gather_object(gathered, infos)
            infos = [i for part in gathered for i in part]
        total_bytes = 0
        if self.rank == 0:
            shard_infos = sorted((ShardInfo(**i) for i in infos), key=lambda i: i.index)
            if [i.index for i in shard_infos] != list(range(self.n_shards)):
                raise CacheFormatError(f"{out}: expected shards 0..{self.n_shards - 1}, "
                                       f"have {[i.index for i in shard_infos]}")
            manifest = Manifest(
                fingerprint=self.fingerprint, fingerprint_inputs=self.fingerprint_inputs,
                columns={f.name: str(f.type) for f in self.schema}, tensors=self.specs,
                teachers={tc.name: {"weights_sha256": self.weights[tc.name], "source": tc.path or tc.entry_point,
                                    "model_class": tc.model_class} for tc in cfg.teachers},
                shards=shard_infos, tasks={cfg.task: len(self.order)}, config=cfg.to_dict(),
                token_level=self.token_level, label_names=self.label_names, num_examples=len(self.ds),
                created=datetime.now(timezone.utc).isoformat())
            manifest.write(out)
            total_bytes = manifest.num_bytes
        barrier()
        return ExportResult(str(out), self.fingerprint, False, len(self.order), self.written, len(self.shard_infos),
                            len(self.done), total_bytes, time.perf_counter() - self.t0)
