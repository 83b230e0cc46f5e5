"""Streaming a cache into training: epoch plans, shuffling, rank/worker streams, decoding, padding.

Ranks split the data in one of two ways (`RankShare.split`). ``"batch"`` (the default): every rank plans the
one-process run's batches at the global batch size (per-rank batch x ranks) and takes its share of each,
rows dealt by length so that every rank holds as many tokens as the others at every step; N ranks then
train on exactly the rows one process trains on at that batch size (with `losses.global_denominators`,
the same losses), but every rank decodes the record batches of every batch. ``"records"``: the rows
are cut into *streams*, one per (rank, DataLoader worker), so that each Arrow record batch is read and
decompressed by one process only: the record batches are dealt to the W ranks in snake
order (long and short rows alike on every rank: a cache is sorted by length inside windows) and the
dealt sequence is cut into W equal row counts (the at most W−1 record batches that straddle a cut are
the only ones two processes decode; `deal_ranges`), and the rank's record batches are
split between its workers at record-batch edges. Each epoch, a stream visits its record batches in a
seeded random order, passes their rows through its own shuffle buffer and cuts them into batches; a
rank yields its streams' batches round-robin, which is the order DataLoader's workers deliver them in.
Record batches are decoded on first use and freed after their last, so memory stays at the shuffle
buffer's size however large the cache.

The plan is a pure function of (seed, epoch, world size or global batch, workers) and of the manifest (no I/O), so a
position (epoch, batches consumed) is all that a resumed run needs. The position lives in shared
memory: DataLoader workers, persistent ones included, read the one the main process set last.
"""
from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from ..core.runtime import get_rank, get_world_size
from ..core.tensors import iter_tensors
from ..errors import CacheFormatError, CachebrewError
from ..cache.format import (ATTENTION_MASK, COPY, ID, INPUT_IDS, LABELS, OFFSETS, TEXT, TEXT_PAIR, TOKEN_TYPE_IDS,
                            WORD_IDS, WORDS, ColumnViews, Selection, TensorSpec, decode_selection, decode_spans,
                            decode_sparse_selection, decode_tensor_column, pad_ints)
from ..cache.reader import CacheReader
from .alignment import (end_alignment, first_subtoken_alignment, gather_positions, padded_index, padded_weights,
                        span_alignment, vocabulary_map)


def _row_refs(reader: CacheReader) -> np.ndarray:
    """(rows, 3) int32: shard, record batch and row inside it, for every row of the cache in order.

    One small array instead of a Python object per row: a million-row cache costs 12 MB here and
    nothing for the garbage collector to walk.
    """
    parts = []
    for si, info in enumerate(reader.manifest.shards):
        for bi, n in enumerate(info.batches or [info.rows]):
            part = np.empty((n, 3), np.int32)
            part[:, 0], part[:, 1], part[:, 2] = si, bi, np.arange(n)
            parts.append(part)
    return np.concatenate(parts) if parts else np.zeros((0, 3), np.int32)


def record_batch_ranges(shard_batches: list[list[int]]) -> np.ndarray:
    """(record batches, 2) int64: [start, stop) global rows of every record batch, in cache order.

    `shard_batches` is each shard's record-batch row counts (a shard of older caches: one entry).
    """
    sizes = np.array([n for batches in shard_batches for n in batches], np.int64)
    stops = np.cumsum(sizes)
    return np.stack([stops - sizes, stops], axis=1) if len(sizes) else np.zeros((0, 2), np.int64)


def deal_ranges(ranges: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """Rank `rank`'s share of the record batches: dealt in snake order, then evened to equal row counts.

    A cache is sorted longest-first inside each length window, so contiguous row ranges would give rank 0
    the long rows and the last rank the short ones, and every step would wait for the longest rank. Dealing
    record batches 0, 1, 2, 3, ... to ranks 0, 1, 1, 0, 0, 1, ... (snake order) gives each rank long and
    short batches alike. DDP steps together, so the ranks then get equal row counts: a rank over its count
    hands the rows at the end of its share (its last, shortest batch) to the ranks under theirs, in rank
    order; at most `world_size - 1` record batches are split between ranks (and decoded twice). A cache of
    fewer than 4 record batches a rank is dealt in slices of record batches (balanced, each decoded by several
    ranks). One rank keeps the cache order: a single process plans exactly as before.
    """
    if world_size == 1:
        return ranges
    if len(ranges) < 4 * world_size:  # too few to deal evenly (a small cache): deal slices of them instead,
        cuts = [np.linspace(a, b, world_size + 1).round().astype(np.int64) for a, b in ranges]  # decoded by several
        ranges = np.array([[c[i], c[i + 1]] for c in cuts for i in range(world_size) if c[i + 1] > c[i]],
                          np.int64).reshape(-1, 2)
    index = np.arange(len(ranges))
    lap, seat = index // world_size, index % world_size
    owner = np.where(lap % 2 == 0, seat, world_size - 1 - seat)
    shares = [ranges[owner == r] for r in range(world_size)]
    n = int((ranges[:, 1] - ranges[:, 0]).sum())
    targets = [n * (r + 1) // world_size - n * r // world_size for r in range(world_size)]
    kept, pool = [], []
    for share, target in zip(shares, targets):
        head, tail = _split_rows(share, target)
        kept.append(head)
        pool.append(tail)
    pool = np.concatenate(pool) if pool else np.zeros((0, 2), np.int64)
    for r in range(world_size):
        missing = targets[r] - int((kept[r][:, 1] - kept[r][:, 0]).sum())
        if missing:
            given, pool = _split_rows(pool, missing)
            kept[r] = np.concatenate([kept[r], given])
    return kept[rank]


def _split_rows(ranges: np.ndarray, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """(the first `rows` rows of `ranges`, the rest), cutting one range if needed."""
    sizes = ranges[:, 1] - ranges[:, 0]
    stops = np.cumsum(sizes)
    j = int(np.searchsorted(stops, rows, side="left")) if rows > 0 else 0
    if rows <= 0:
        return ranges[:0], ranges
    if j >= len(ranges):
        return ranges, ranges[:0]
    cut = int(ranges[j, 1] - (stops[j] - rows))  # the row where the first part ends inside range j
    head = np.concatenate([ranges[:j], [[ranges[j, 0], cut]]]).astype(np.int64)
    rest = np.concatenate([[[cut, ranges[j, 1]]], ranges[j + 1:]]).astype(np.int64)
    return head[head[:, 1] > head[:, 0]], rest[rest[:, 1] > rest[:, 0]]


def share_of_batch(lengths: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """Positions (in batch order) of rank `rank`'s rows of one global batch, balanced in rows and tokens.

    Rows go longest first to the rank with the fewest tokens so far among those still short of their row
    count (n / world_size, the first n % world_size ranks one more), so no rank waits long for another at
    this step. A pure function of the lengths, which every rank reads alike: the shares partition the batch.
    """
    lengths = np.asarray(lengths)
    n = len(lengths)
    quota = [n // world_size + (r < n % world_size) for r in range(world_size)]
    tokens, counts, owner = [0] * world_size, [0] * world_size, np.empty(n, np.int64)
    for i in np.argsort(-lengths, kind="stable").tolist():
        r = min((r for r in range(world_size) if counts[r] < quota[r]), key=lambda r: (tokens[r], r))
        owner[i] = r
        tokens[r] += int(lengths[i])
        counts[r] += 1
    return np.flatnonzero(owner == rank)


def split_at_edges(ranges: np.ndarray, parts: int) -> list[np.ndarray]:
    """`parts` contiguous groups of whole ranges, with row counts as even as range edges allow."""
    edges = np.concatenate([[0], np.cumsum(ranges[:, 1] - ranges[:, 0])])
    cuts = [0]
    for p in range(1, parts):
        target = edges[-1] * p / parts
        j = int(np.searchsorted(edges, target))
        if j > 0 and (j == len(edges) or target - edges[j - 1] <= edges[j] - target):
            j -= 1
        cuts.append(max(j, cuts[-1]))
    cuts.append(len(ranges))
    return [ranges[a:b] for a, b in zip(cuts, cuts[1:])]


def stream_order(ranges: np.ndarray, rng: random.Random | None, buffer_size: int) -> np.ndarray:
    """One epoch of a stream's rows: its ranges in a random order, rows through a shuffle buffer.

    `rng=None` keeps cache order. An int64 array (8 bytes a row), not a list of Python ints.
    """
    total = int((ranges[:, 1] - ranges[:, 0]).sum()) if len(ranges) else 0
    if rng is None:
        return np.concatenate([np.arange(a, b, dtype=np.int64) for a, b in ranges]) if total else \
            np.zeros(0, np.int64)
    order = list(range(len(ranges)))
    rng.shuffle(order)
    out = np.empty(total, dtype=np.int64)
    n, buf = 0, []
    for u in order:
        for i in range(int(ranges[u, 0]), int(ranges[u, 1])):
            if len(buf) < buffer_size:
                buf.append(i)
                continue
            j = rng.randrange(buffer_size)
            out[n] = buf[j]
            n += 1
            buf[j] = i
    rng.shuffle(buf)
    out[n:] = buf
    return out


def round_robin(counts: list[int]) -> list[tuple[int, int]]:
    """(stream, batch) in the order DataLoader delivers its workers' batches: one from each live worker in turn."""
    return [(s, k) for k in range(max(counts, default=0)) for s, n in enumerate(counts) if k < n]


class JoinedCaches:
    """One or more caches of the same rows, aligned on (id, copy); the first provides the inputs.

    Caches exported from the same data with the same row-producing settings are aligned by position
    (checked row by row as they are read); others are joined through an (id, copy) index.
    """

    def __init__(self, paths: list, teachers: list[str] | None = None):
        if not paths:
            raise CachebrewError("no cache given")
        self.readers = [CacheReader(p) for p in paths]
        primary = self.readers[0].manifest
        for r in self.readers[1:]:
            m = r.manifest
            if m.fingerprint_inputs.get("dataset") != primary.fingerprint_inputs.get("dataset"):
                raise CacheFormatError(
                    f"cannot join {r.path} with {self.readers[0].path}: they were exported from different data "
                    f"(dataset fingerprints {m.fingerprint_inputs.get('dataset', '?')[:12]}… vs "
                    f"{primary.fingerprint_inputs.get('dataset', '?')[:12]}…)")
            if m.num_rows != primary.num_rows:
                raise CacheFormatError(f"cannot join {r.path} ({m.num_rows} rows) with {self.readers[0].path} "
                                       f"({primary.num_rows} rows): different augmentation or limits")
        self.specs: list[tuple[int, TensorSpec]] = []
        seen = {}
        for ci, r in enumerate(self.readers):
            for spec in r.manifest.tensors:
                if spec.teacher in seen and seen[spec.teacher] != ci:
                    continue  # the same teacher in two caches: the first one wins
                seen[spec.teacher] = ci
                self.specs.append((ci, spec))
        available = list(dict.fromkeys(s.teacher for _, s in self.specs))
        if teachers:
            missing = [t for t in teachers if t not in available]
            if missing:
                raise CachebrewError(f"teacher(s) {missing} not in the caches (available: {available})")
            self.specs = [(ci, s) for ci, s in self.specs if s.teacher in teachers]
            self.teachers = list(teachers)
        else:
            self.teachers = available
        self.refs = [_row_refs(r) for r in self.readers]
        self.maps = [None] + [self._alignment(r, i + 1) for i, r in enumerate(self.readers[1:])]
        self.maps = [None if m is None else np.asarray(m, np.int64) for m in self.maps]

    @property
    def manifest(self):
        return self.readers[0].manifest

    @property
    def num_rows(self) -> int:
        return self.manifest.num_rows

    def _alignment(self, reader: CacheReader, ci: int):
        """None when rows line up by position; else the row index in `reader` of each primary row."""
        keys = ("dataset", "tokenizer")
        a, b = self.manifest, reader.manifest
        same_plan = all(a.fingerprint_inputs.get(k) == b.fingerprint_inputs.get(k) for k in keys) and all(
            a.config.get(k) == b.config.get(k) for k in ("augment", "max_length", "batch_size", "sort_window",
                                                         "shard_rows", "data"))
        if same_plan:
            return None
        index = {}
        pos = 0
        for info in reader.manifest.shards:
            table = reader.open_shard(info).select([ID, COPY])
            for i, c in zip(table.column(ID).to_pylist(), table.column(COPY).to_pylist()):
                index[(i, c)] = pos
                pos += 1
        mapping = []
        for info in self.manifest.shards:
            table = self.readers[0].open_shard(info).select([ID, COPY])
            for key in zip(table.column(ID).to_pylist(), table.column(COPY).to_pylist()):
                if key not in index:
                    raise CacheFormatError(f"cannot join {reader.path}: it has no row for example {key[0]!r} copy {key[1]}")
                mapping.append(index[key])
        return mapping


@dataclass(frozen=True)
class RankShare:
    """Which share of the rows this process reads (`CacheBatches(ranks=...)`).

    ``rank`` / ``world_size``: None reads them from the process group (one process without one). ``split``:
    ``"batch"`` (each global batch split over the ranks: N ranks == one process) or ``"records"`` (record batches
    dealt to ranks); see the module docstring. ``evaluation``: every rank reads all of its rows (each row is
    read by exactly one rank; ranks may get different batch counts), always dealing record batches; training
    gives every rank as many batches as the shortest (DDP steps together)."""

    rank: int | None = None
    world_size: int | None = None
    split: str = "batch"
    evaluation: bool = False

    def resolved(self) -> RankShare:
        """This share with rank and world size filled in from the process group where not given."""
        if self.split not in ("batch", "records"):
            raise CachebrewError(f"RankShare.split must be 'batch' or 'records', got {self.split!r}")
        if self.rank is not None and self.world_size is not None:
            return self
        return RankShare(get_rank(), get_world_size(), self.split, self.evaluation)


def identity_collate(batch):
    """collate_fn for DataLoader(CacheBatches, batch_size=None): batches are complete; skip default_convert's walk."""
    return batch


class CacheBatches(torch.utils.data.IterableDataset):
    """Batches of ``{'student': inputs, 'teacher_cache': {...}}`` streamed from cache(s).

    Usable as a plain iterable or through ``CacheLoader(ds, num_workers=n, pin_memory=True)`` (a
    DataLoader that tells the dataset its worker count, which sets the streams, so ``len()``);
    ``features`` (pairs such as ``("logits", None), ("hidden", 4)``) limits what is read and decoded to
    what the losses use;
    ``len()`` is the number of batches this rank sees per epoch, the same on every rank (DDP needs
    it). ``ranks`` (a `RankShare`) says which rows are this process's: by default, under torchrun, each global
    batch of ``batch_size x world_size`` rows split by length (N ranks == one process at that batch; a global
    batch with fewer rows than ranks, the end of a stream, is dropped). ``student_tokenizer`` (a
    `retokenize.StudentTokenizer`): the student reads the rows' text through its own tokenizer, unless that is the
    cache's (same fingerprint: the cached ids are used); the teacher's outputs are the cache's either way.
    ``set_epoch`` and ``set_position`` select what the next iteration yields, in this process and in DataLoader
    workers alike.
    """

    def __init__(self, caches, batch_size: int, *, shuffle=True, seed=0, buffer_size=2048, drop_last=False,
                 teachers=None, teacher_weights=None, features=None, with_labels=True, task: str | None = None,
                 num_workers: int = 0, ranks: RankShare | None = None, student_tokenizer=None):
        self.joined = caches if isinstance(caches, JoinedCaches) else JoinedCaches(
            [caches] if isinstance(caches, (str, Path)) else list(caches), teachers)
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise CachebrewError(f"batch_size must be >= 1, got {batch_size!r}")
        self.shuffle, self.seed, self.buffer_size, self.drop_last = shuffle, seed, buffer_size, drop_last
        self.ranks = (ranks or RankShare()).resolved()
        self.rank, self.world_size = self.ranks.rank, self.ranks.world_size
        # one global batch split over the ranks (training); evaluation deals record batches (every row once)
        self.split_batches = self.ranks.split == "batch" and self.world_size > 1 and not self.ranks.evaluation
        self.teacher_weights = teacher_weights
        self.with_labels = with_labels
        self.task = task
        self.token_level = self.joined.manifest.token_level
        # a causal-LM teacher's cache: the labels are the inputs (Hugging Face causal LMs shift them inside)
        self.causal_lm = any(t.get("model_class") == "AutoModelForCausalLM"
                             for t in (self.joined.manifest.config or {}).get("teachers", []))
        # (epoch, first batch) in shared memory: DataLoader workers hold a copy of this object, but they
        # all see this tensor, so set_epoch/set_position reach persistent workers too
        self._position = torch.zeros(2, dtype=torch.int64).share_memory_()
        self._ranges = record_batch_ranges([info.batches or [info.rows] for info in self.joined.manifest.shards])
        self.num_workers = num_workers
        # what batches carry: every teacher's logits (they are averaged), the first teacher's hidden states and
        # attention maps (the distillers match those), and of those only the `features` asked for
        first = self.joined.teachers[0] if self.joined.teachers else None
        wanted = None if features is None else {(kind, None if layer is None else int(layer)) for kind, layer in features}
        self.specs = [(ci, spec) for ci, spec in self.joined.specs
                      if (spec.kind == "logits" or spec.teacher == first)
                      and (wanted is None or (spec.kind, spec.layer) in wanted)]
        cached_tokenizer = self.joined.manifest.fingerprint_inputs.get("tokenizer")
        # the student's own tokenizer, where it is not the cache's (same fingerprint: a no-op)
        self.student_tokenizer = student_tokenizer if student_tokenizer is not None and \
            student_tokenizer.fingerprint != cached_tokenizer else None
        inputs = {ID, COPY, INPUT_IDS, ATTENTION_MASK, TOKEN_TYPE_IDS} | ({LABELS} if with_labels else set())
        self._vocabulary_map = None
        if self.student_tokenizer is not None:
            inputs |= {TEXT, TEXT_PAIR, WORDS, OFFSETS, WORD_IDS}
            vocabulary = self.joined.manifest.vocabulary
            if self.causal_lm and vocabulary is not None:
                self._vocabulary_map = torch.from_numpy(vocabulary_map(vocabulary, self.student_tokenizer.token_strings()))
        self._needed = [inputs | {c for cj, spec in self.specs if cj == ci
                                  for c in (spec.column, *spec.aux_columns())}
                        for ci in range(len(self.joined.readers))]

    # -- plan -------------------------------------------------------------------------------------
    @property
    def num_workers(self) -> int:
        return self._num_workers

    @num_workers.setter
    def num_workers(self, n: int):
        """DataLoader workers that will read this dataset (0: the main process): one stream each."""
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise CachebrewError(f"num_workers must be an integer >= 0, got {n!r}")
        self._num_workers = n
        if self.split_batches:  # every rank plans the one-process run's streams
            self._streams = [split_at_edges(self._ranges, max(1, n))] * self.world_size
        else:
            self._streams = [self._rank_streams(r) for r in range(self.world_size)]
        per_rank = [sum(self._num_batches(s) for s in streams) for streams in self._streams]
        self._len = per_rank[self.rank] if self.ranks.evaluation else min(per_rank)

    def _rank_streams(self, rank: int) -> list[np.ndarray]:
        return split_at_edges(deal_ranges(self._ranges, rank, self.world_size), max(1, self.num_workers))

    @property
    def planned_batch_size(self) -> int:
        """Rows in one planned batch: the global batch when ranks split batches, else this rank's batch."""
        return self.batch_size * self.world_size if self.split_batches else self.batch_size

    @property
    def alignment_inputs(self) -> dict:
        """What the cache holds that a student with another tokenizer needs (retokenize.cross_tokenizer_problems)."""
        columns = self.joined.manifest.columns
        return {"token_level": self.token_level, "causal_lm": self.causal_lm, "offsets": OFFSETS in columns,
                "word_ids": WORD_IDS in columns, "vocabulary": self.joined.manifest.vocabulary,
                "sparse_logits": any(spec.sparse for _, spec in self.specs if spec.kind == "logits"),
                "teachers": len({spec.teacher for _, spec in self.specs if spec.kind == "logits"})}

    def _num_batches(self, ranges: np.ndarray) -> int:
        rows = int((ranges[:, 1] - ranges[:, 0]).sum())
        full, rest = divmod(rows, self.planned_batch_size)
        if self.drop_last or (self.split_batches and rest < self.world_size):  # a rank would get no row
            return full
        return full + (rest > 0)

    def __len__(self):
        return self._len

    @property
    def epoch(self) -> int:
        return int(self._position[0])

    @property
    def start_batch(self) -> int:
        return int(self._position[1])

    def set_epoch(self, epoch: int):
        self.set_position(epoch, 0)

    def set_position(self, epoch: int, batch: int):
        """Continue from `batch` batches into `epoch` (what a resumed run needs); holds until changed."""
        self._position[0], self._position[1] = int(epoch), int(batch)

    def _schedule(self) -> list[tuple[int, int]]:
        """(stream, batch of that stream) in yield order: fixed by the stream sizes, the same every epoch."""
        return round_robin([self._num_batches(r) for r in self._streams[self.rank]])[:len(self)]

    def _stream_batches(self, epoch: int, s: int) -> list[np.ndarray]:
        """Stream `s`'s batches (global row indices) for `epoch`."""
        streams = self._streams[self.rank]
        rank, world = (0, 1) if self.split_batches else (self.rank, self.world_size)  # batch split: 1 process's plan
        rng = random.Random(f"{self.seed}:{epoch}:{rank}/{world}:{s}/{len(streams)}") if self.shuffle else None
        order = stream_order(streams[s], rng, self.buffer_size)
        size = self.planned_batch_size
        return [order[i:i + size] for i in range(0, len(order), size)]  # views

    def plan(self, epoch: int, start: int = 0) -> list[tuple[int, np.ndarray]]:
        """This rank's batches for `epoch` from batch `start`, in yield order: (stream, global row indices).

        When ranks split batches these are the global batches; `share_of_batch` picks this rank's rows of each.

        Only the streams that appear are shuffled (a worker plans its own stream alone).
        """
        schedule = self._schedule()[start:]
        batches = {s: self._stream_batches(epoch, s) for s in dict.fromkeys(s for s, _ in schedule)}
        return [(s, batches[s][k]) for s, k in schedule]

    # -- iteration -------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        if info is not None and workers != max(1, self.num_workers):
            raise CachebrewError(
                f"CacheBatches was planned for num_workers={self.num_workers} but runs in a DataLoader with "
                f"{workers} workers: build the loader with cachebrew.cache.CacheLoader(dataset, num_workers="
                f"{workers}, ...) or pass CacheBatches(..., num_workers={workers})")
        epoch, start = self.epoch, self.start_batch
        schedule = self._schedule()[start:]
        if info is None:
            mine = [rows for _, rows in self.plan(epoch, start)]
        elif schedule:
            # DataLoader asks worker 0 first; a position in mid-round continues with the next batch's stream there
            stream = (schedule[0][0] + worker) % workers
            batches = self._stream_batches(epoch, stream)
            mine = [batches[k] for s, k in schedule if s == stream]
        else:
            mine = []
        free_after = defaultdict(list)  # batch k -> (cache, shard, record batch) that no later batch reads
        if mine:
            ks = np.concatenate([np.full(len(rows), k, np.int64) for k, rows in enumerate(mine)])
            flat = np.concatenate(mine)
            for ci, (refs, mapping) in enumerate(zip(self.joined.refs, self.joined.maps)):
                where = refs[flat if mapping is None else mapping[flat]].astype(np.int64)
                keys = (where[:, 0] << 32) | where[:, 1]
                uniq, first_from_end = np.unique(keys[::-1], return_index=True)
                for key, k in zip(uniq.tolist(), ks[::-1][first_from_end].tolist()):
                    free_after[k].append((ci, key >> 32, key & 0xFFFFFFFF))
        decoded: dict = {}
        for k, rows in enumerate(mine):
            batch = self._collate(rows, decoded)
            yield pack_shared(batch) if info is not None else batch
            for key in free_after.pop(k, ()):
                decoded.pop(key, None)

    def _record_batch(self, ci: int, shard: int, batch: int, decoded: dict) -> pa.RecordBatch:
        key = (ci, shard, batch)
        if key not in decoded:
            reader = self.joined.readers[ci]
            info = reader.manifest.shards[shard]
            try:
                files = decoded.setdefault("files", {})  # open shard readers, kept for this pass
                if (ci, shard) not in files:
                    # plain reads, not a memory map: compressed buffers are decoded into new memory anyway, and
                    # mapped pages would pile up in the process's RSS; only the columns batches use are read
                    names = reader.manifest.columns
                    fields = [i for i, name in enumerate(names) if name in self._needed[ci]]
                    files[(ci, shard)] = pa.ipc.open_file(reader.open_input(info, mmap=False),
                                                          options=pa.ipc.IpcReadOptions(included_fields=fields))
                decoded[key] = ColumnViews(files[(ci, shard)].get_batch(batch))
            except (pa.ArrowInvalid, OSError) as e:
                raise CacheFormatError(f"{reader.shard_path(info)}: unreadable shard ({e}); "
                                       f"run `cachebrew verify {reader.path}`") from None
        return decoded[key]

    def _select(self, ci: int, rows: list[int], decoded: dict) -> Selection:
        """Where the rows lie: grouped by record batch (decoded once, kept until their last use)."""
        mapping = self.joined.maps[ci]
        refs_all = self.joined.refs[ci]
        index = np.asarray(rows, np.int64)
        groups: dict = {}
        for pos, (shard, batch, row) in enumerate(refs_all[index if mapping is None else mapping[index]].tolist()):
            g = groups.get((shard, batch))
            if g is None:
                g = groups[(shard, batch)] = (self._record_batch(ci, shard, batch, decoded), [], [])
            g[1].append(row)
            g[2].append(pos)
        return Selection(list(groups.values()), len(rows))

    def _collate(self, rows, decoded: dict) -> dict:
        if self.split_batches:
            rows = np.asarray(rows)[share_of_batch(self._select(0, rows, decoded).lengths, self.rank, self.world_size)]
        primary = self._select(0, rows, decoded)
        lengths = primary.lengths.tolist()
        L = max(lengths)
        names = self.joined.readers[0].manifest.columns
        align = None
        if self.student_tokenizer is not None:  # the rows' text in the student's tokens (`_student_tokens`)
            student, align = self._student_tokens(primary, names, L)
        else:
            student = {INPUT_IDS: pad_ints(primary, INPUT_IDS, L, 0)}
            for name in (ATTENTION_MASK, TOKEN_TYPE_IDS):
                if name in names:
                    student[name] = pad_ints(primary, name, L, 0)
        if self.with_labels and self.causal_lm and LABELS not in names:
            labels = student[INPUT_IDS].clone()
            if ATTENTION_MASK in student:
                labels[student[ATTENTION_MASK] == 0] = -100  # padding is not a next token to predict
            student["labels"] = labels
        elif self.with_labels and LABELS in names:
            if names[LABELS].startswith("list"):
                student["labels"] = pad_ints(primary, LABELS, L, -100)
                if align is not None:  # the word's label at the word's first student sub-token
                    student["labels"] = gather_positions(student["labels"], align["index"], fill=-100)
            else:
                student["labels"] = torch.tensor(primary.scalars(LABELS), dtype=torch.long)
        selections = {0: primary}
        keys = list(zip(primary.scalars(ID), primary.scalars(COPY)))
        per_teacher: dict[str, dict] = defaultdict(dict)
        for ci, spec in self.specs:
            if ci not in selections:
                selections[ci] = self._select(ci, rows, decoded)
                other = list(zip(selections[ci].scalars(ID), selections[ci].scalars(COPY)))
                if other != keys:
                    raise CacheFormatError(f"{self.joined.readers[ci].path} is not aligned with "
                                           f"{self.joined.readers[0].path}: rows {other[:2]}… vs {keys[:2]}…")
            padded = decode_sparse_selection(spec, selections[ci], L) if spec.sparse else \
                decode_selection(spec, selections[ci], L)
            if padded is None:  # attention maps, top-k: per row
                table = selections[ci].rows_table([spec.column, *spec.aux_columns()])
                padded = _pad_stack(spec, decode_tensor_column(spec, table, lengths), L)
            if align is not None:
                padded = self._aligned(spec, padded, align)
            per_teacher[spec.teacher][(spec.kind, spec.layer)] = padded
        batch = {"student": student, "teacher_cache": self._teacher_cache(per_teacher, student, align)}
        batch["ids"] = keys
        if self.task is not None:
            student["task"] = self.task  # multi-task students pick their head from it
        return batch

    def _student_tokens(self, primary: Selection, names: dict, length: int) -> tuple[dict, dict | None]:
        """The rows in the student's own tokens and, where the cache says where its tokens lie, how the student's
        positions meet the teacher's (components/alignment.py): {"weights": (B, Ls, L)} by character spans for
        hidden states, {"index": (B, Ls)} by words for token labels or by token ends for causal LMs; None when the
        cache has no spans (sentence-level targets only)."""
        tok = self.student_tokenizer
        if self.token_level:
            student, student_words = tok.encode_words([list(w) for w in primary.scalars(WORDS)])
            if WORD_IDS not in names:
                return student, None
            teacher_words = primary.padded(WORD_IDS, length, 1, -1, np.int64).reshape(primary.size, length)
            index = [first_subtoken_alignment(teacher_words[b, :n].tolist(), student_words[b])
                     for b, n in enumerate(primary.lengths.tolist())]
            return student, {"index": padded_index(index, student[INPUT_IDS].shape[1])}
        spans = OFFSETS in names and tok.gives_spans
        student, student_spans = tok.encode(primary.scalars(TEXT),
                                            primary.scalars(TEXT_PAIR) if TEXT_PAIR in names else None, spans=spans)
        if not spans:
            return student, None
        stored = primary.padded(OFFSETS, length, 2, 0, np.int64).reshape(primary.size, length, 2)
        teacher_spans = [decode_spans(stored[b, :n]) for b, n in enumerate(primary.lengths.tolist())]
        Ls = student[INPUT_IDS].shape[1]
        if self.causal_lm:
            return student, {"index": padded_index([end_alignment(t, s) for t, s in zip(teacher_spans, student_spans)],
                                                   Ls)}
        return student, {"weights": padded_weights([span_alignment(t, s) for t, s in zip(teacher_spans, student_spans)],
                                                   Ls, length)}

    def _aligned(self, spec: TensorSpec, value, align: dict):
        """A teacher tensor carried onto the student's positions: hidden states averaged over the teacher tokens
        each student token overlaps; per-token logits (token labels) and sparse next-token targets (causal LMs)
        taken from the aligned teacher position, the latter's ids mapped into the student's vocabulary
        (unmatched ids flagged for the cross-tokenizer loss, losses.cross_tokenizer_kd_loss)."""
        per_token = bool(spec.shape) and spec.shape[0] == "L"
        if not per_token:
            return value  # one per row: the same whatever tokenizes the text
        if "weights" in align:
            return torch.bmm(align["weights"], value.float()).to(value.dtype) if spec.kind == "hidden" else value
        index = align["index"]
        if not isinstance(value, dict):
            return gather_positions(value, index)
        out = dict(value)
        ids = gather_positions(value["ids"], index)
        for key in ("mass", "tail"):
            if key in value:
                out[key] = gather_positions(value[key], index)
        if self._vocabulary_map is not None:
            mapped = self._vocabulary_map[ids.clamp(max=len(self._vocabulary_map) - 1)]
            out["matched"] = (mapped >= 0) & (out["mass"] > 0)
            ids = mapped.clamp(min=0)
        out["ids"] = ids
        return out

    def _teacher_cache(self, per_teacher, student, align: dict | None = None) -> dict:
        """The adaptor-style dict distillers read: logits (weighted mean over teachers), hidden and attention lists;
        with a student of another tokenizer, ``match_mask``: the student positions aligned with teacher positions."""
        teachers = self.joined.teachers
        cache = {"inputs_mask": student[ATTENTION_MASK] if ATTENTION_MASK in student else None}
        logits = [per_teacher[t][("logits", None)] for t in teachers if ("logits", None) in per_teacher[t]]
        if logits:
            if len(logits) == 1:
                cache["logits"] = logits[0]
            elif isinstance(logits[0], dict):
                w = [1.0] * len(teachers) if self.teacher_weights is None else \
                    [float(self.teacher_weights.get(t, 0.0)) for t in teachers]
                cache["logits"] = merge_sparse_targets(logits, w)
            elif self.teacher_weights is None:
                cache["logits"] = sum(logits) / len(logits)  # MultiTeacherDistiller's mean, same arithmetic
            else:
                w = [float(self.teacher_weights.get(t, 0.0)) for t in teachers]
                cache["logits"] = sum(wi * l for wi, l in zip(w, logits)) / sum(w)
            merged = cache["logits"]
            per_token = (merged["ids"] if isinstance(merged, dict) else merged).dim() == 3
            if (self.token_level or per_token) and ATTENTION_MASK in student:  # token labels, causal LMs
                cache["logits_mask"] = student[ATTENTION_MASK]
                if align is not None and "index" in align:  # only the student positions a teacher position meets
                    cache["logits_mask"] = cache["logits_mask"] * (align["index"] >= 0)
        first = per_teacher[teachers[0]]
        for kind in ("hidden", "attention"):
            layers = sorted(layer for (k, layer) in first if k == kind)
            if layers:
                seq = [None] * (layers[-1] + 1)
                for layer in layers:
                    seq[layer] = first[(kind, layer)]
                cache[kind] = seq
        if align is not None:  # intermediate matches: only the student positions a teacher position meets
            covered = (align["weights"].sum(dim=-1) > 0) if "weights" in align else align["index"] >= 0
            covered = covered.to(torch.long)
            cache["match_mask"] = covered * student[ATTENTION_MASK] if ATTENTION_MASK in student else covered
        if cache["inputs_mask"] is None:
            del cache["inputs_mask"]
        cache["per_teacher_logits"] = {t: per_teacher[t][("logits", None)] for t in teachers
                                       if ("logits", None) in per_teacher[t]}
        return cache


class CacheLoader(torch.utils.data.DataLoader):
    """The DataLoader for CacheBatches: whole batches (no collation), one stream per worker.

    It sets the dataset's worker count (which decides the streams, so the plan and ``len``) before any
    worker starts, and forwards ``set_epoch`` (what transformers' Trainer calls each epoch).
    """

    def __init__(self, dataset: CacheBatches, num_workers: int = 0, **kwargs):
        dataset.num_workers = num_workers
        kwargs.setdefault("collate_fn", identity_collate)
        super().__init__(dataset, batch_size=None, num_workers=num_workers, **kwargs)

    def set_epoch(self, epoch: int):
        self.dataset.set_epoch(epoch)


def merge_sparse_targets(targets: list[dict], weights: list[float]) -> dict:
    """Several teachers' sparse targets as one: their slots side by side, masses scaled by w_t / sum(w).

    Exact for every loss linear in the target (the sparse KD losses): sum_t w_t CE(p_t) = CE(sum_t w_t p_t)."""
    methods = {t["method"] for t in targets}
    temperatures = {t["temperature"] for t in targets}
    if len(temperatures) > 1 or methods != {"sampled"}:
        raise CacheFormatError(f"sparse logits of several teachers are merged when all are 'sampled' at one "
                               f"temperature (top-k tails overlap), got {sorted(methods)} at {sorted(temperatures)}")
    total = sum(weights)
    out = {"ids": torch.cat([t["ids"] for t in targets], dim=-1),
           "mass": torch.cat([t["mass"] * (w / total) for t, w in zip(targets, weights)], dim=-1),
           "method": targets[0]["method"], "temperature": targets[0]["temperature"]}
    if all("matched" in t for t in targets):  # mapped into a student's vocabulary (`CacheBatches._aligned`)
        out["matched"] = torch.cat([t["matched"] for t in targets], dim=-1)
    return out


def _replace(obj, new: dict):
    if isinstance(obj, torch.Tensor):
        return new[id(obj)]
    if isinstance(obj, dict):
        return {k: _replace(v, new) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_replace(v, new) for v in obj)
    return obj


def pack_shared(batch: dict) -> dict:
    """The batch with all its tensors as views of one shared-memory block.

    A DataLoader worker sends every tensor storage through its own shared-memory segment and file
    descriptor; a batch has a dozen (inputs, labels, logits, each hidden layer), and setting up and
    tearing down those segments costs more than decoding the batch. One block per batch: one segment.
    """
    tensors = list({id(t): t for t in iter_tensors(batch)}.values())
    offsets, total = [], 0
    for t in tensors:
        total = (total + 63) // 64 * 64  # each view aligned for its dtype
        offsets.append(total)
        total += t.numel() * t.element_size()
    # allocated in shared memory directly, as torch's default_collate does in workers (not a private copy moved there)
    block = torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(total))
    new = {}
    for t, off in zip(tensors, offsets):
        view = block[off:off + t.numel() * t.element_size()].view(t.dtype).view(t.shape)
        view.copy_(t)
        new[id(t)] = view
    return _replace(batch, new)


def _pad_stack(spec: TensorSpec, tensors: list[torch.Tensor], L: int) -> torch.Tensor:
    """Pad per-row tensors to the batch length on every "L" axis (zeros: masked out by the losses)."""
    if "L" not in spec.shape:
        return torch.stack(tensors)
    shape = [L if s == "L" else int(s) for s in spec.shape]
    if spec.topk:
        shape[-1] = tensors[0].shape[-1]
    fill = -1e4 if spec.kind == "attention" and spec.extra.get("form") == "logits" else 0.0
    out = torch.full([len(tensors)] + shape, fill, dtype=tensors[0].dtype)
    for i, t in enumerate(tensors):
        out[(i,) + tuple(slice(0, n) for n in t.shape)] = t
    return out
