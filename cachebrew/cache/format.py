"""Column layout and tensor codecs of a cache shard: the contract between export and distill.

Every example is stored at its true length L. A teacher tensor is one Arrow ``list<primitive>`` column
holding the row's values flattened; its per-row shape comes from the column's spec, where "L" stands
for the row's token count (``len(input_ids)``):

    logits (sequence-level)  [C]         logits (token-level)  [L, C]
    hidden                   [L, H]      attention             [heads, L, L]

Storage dtypes: fp32 (float32), fp16 (float16), bf16 (the raw bits as uint16: Arrow has no bfloat16),
int8 (hidden states only: symmetric per-token quantisation, with a ``<col>.scale`` float32 column of
one scale per token). Top-k logits store the k largest values and a ``<col>.index`` int32 column.
Sparse logits (``extra["sparse"]``: "topk" or "sampled", see `sparse`) store K probability masses per
position and a ``<col>.index`` int32 column of the K token ids; they decode to (ids, masses), never to a dense
vocabulary-wide tensor.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import torch

from ..errors import CacheFormatError
from .sparse import sparse_targets, uniforms

FORMAT_NAME = "cachebrew-cache"
FORMAT_VERSION = 1

STORAGE_DTYPES = ("fp32", "fp16", "bf16", "int8")
KINDS = ("logits", "hidden", "attention")

# Fill value for the logits a top-k cache dropped: exp(-1e4 / T) is 0 for every practical temperature,
# and, unlike -inf, it keeps MSE losses finite.
TOPK_FILL = -1e4

_ARROW_VALUE_TYPE = {"fp32": pa.float32(), "fp16": pa.float16(), "bf16": pa.uint16(), "int8": pa.int8()}
_NUMPY_VALUE_TYPE = {"fp32": np.float32, "fp16": np.float16, "bf16": np.uint16, "int8": np.int8}

# Input columns (besides teacher outputs). Token columns are unpadded lists.
ID, COPY, TASK, TEXT, TEXT_PAIR, WORDS, LABELS = "id", "copy", "task", "text", "text_pair", "words", "labels"
INPUT_IDS, ATTENTION_MASK, TOKEN_TYPE_IDS = "input_ids", "attention_mask", "token_type_ids"
# Where each teacher token lies in the row, for students with another tokenizer (components/alignment.py):
# OFFSETS, per token its character span in the row's text (for a text pair the second text counts from
# len(text) + 1), stored as 2 values per token by `encode_spans`; WORD_IDS, for token-level rows, per token the
# index of its word, -1 for special tokens. Written where the tokenizer gives them (fast tokenizers) unless
# outputs.token_spans is off; a cache without them serves same-tokenizer students and sentence-level targets.
OFFSETS, WORD_IDS = "offsets", "word_ids"
TOKEN_COLUMNS = {INPUT_IDS: pa.int32(), ATTENTION_MASK: pa.int8(), TOKEN_TYPE_IDS: pa.int8(), OFFSETS: pa.int32(),
                 WORD_IDS: pa.int32()}


@dataclass
class TensorSpec:
    """One stored teacher tensor: which teacher, which output, which layer, how it is stored."""

    teacher: str
    kind: str
    layer: int | None
    dtype: str
    shape: list  # ints and "L"
    topk: int | None = None
    extra: dict = field(default_factory=dict)

    @property
    def sparse(self) -> str | None:
        """'topk' or 'sampled' for sparse logits (K id/mass slots per position), else None."""
        return self.extra.get("sparse")

    @property
    def slots(self) -> int:
        return int(self.extra["k"])

    @property
    def column(self) -> str:
        return f"{self.teacher}.{self.kind}" + ("" if self.layer is None else f".{self.layer}")

    def aux_columns(self) -> list[str]:
        cols = []
        if self.dtype == "int8":
            cols.append(self.column + ".scale")
        if self.topk or self.sparse:
            cols.append(self.column + ".index")
        return cols

    def arrow_fields(self) -> list[pa.Field]:
        fields = [pa.field(self.column, pa.list_(_ARROW_VALUE_TYPE[self.dtype]))]
        if self.dtype == "int8":
            fields.append(pa.field(self.column + ".scale", pa.list_(pa.float32())))
        if self.topk or self.sparse:
            fields.append(pa.field(self.column + ".index", pa.list_(pa.int32())))
        return fields

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        return cls(**d)

    def row_shape(self, length: int) -> list[int]:
        shape = [length if s == "L" else int(s) for s in self.shape]
        if self.topk:
            shape[-1] = self.topk
        if self.sparse:
            shape[-1] = self.slots
        return shape


# -- encoding ------------------------------------------------------------------------------------------

def _to_storage(t: torch.Tensor, dtype: str) -> np.ndarray:
    if dtype == "fp32":
        return t.detach().to(torch.float32).cpu().numpy()
    if dtype == "fp16":
        return t.detach().to(torch.float16).cpu().numpy()
    if dtype == "bf16":
        return t.detach().to(torch.bfloat16).cpu().view(torch.int16).numpy().view(np.uint16)
    raise CacheFormatError(f"storage dtype {dtype!r} is not a float format")


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-vector int8 over the last dim: x ≈ q * scale, |q| <= 127."""
    x = x.detach().float()
    scale = x.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / 127.0
    q = torch.round(x / scale).clamp_(-127, 127).to(torch.int8)
    return q, scale.squeeze(-1)


# The writer threads' large, short-lived buffers live in Arrow's pool and are filled on the calling thread:
# - Arrow's allocator (mimalloc) keeps freed pages for the next record batch; a fresh torch CPU tensor of tens of MB
#   is mapped anew each time and pays a page fault per 4 KB page on first touch (a copy into one measured ~0.2 GB/s
#   on the 2-core dev machine, into pool memory ~3 GB/s).
# - A torch CPU op on many elements runs on an OpenMP team. Called from a writer thread while the teachers' own team
#   holds the cores, every op's fork and join waits for a descheduled thread: cutting and casting one hidden-state
#   tensor measured 75 ms per batch that way, 2-4 ms on the calling thread. Copies go through numpy; casts through
#   torch in chunks of _SERIAL_ELEMENTS, below the size from which ATen parallelises (at::internal::GRAIN_SIZE,
#   32768), so torch's vectorised conversion runs on the calling thread (numpy's fp32 -> fp16 is ~4x slower).
_SERIAL_ELEMENTS = 1 << 14


def _pooled(count: int, dtype) -> np.ndarray:
    """An uninitialised flat array of `count` values in memory from Arrow's pool (the comment above says why)."""
    if count == 0:
        return np.zeros(0, dtype=dtype)
    return np.frombuffer(pa.allocate_buffer(count * np.dtype(dtype).itemsize), dtype=dtype)


def _numpy(t: torch.Tensor) -> np.ndarray:
    """A CPU tensor's values as numpy, without a copy; bf16 as its raw int16 bits (numpy has no bfloat16)."""
    return t.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.numpy()


def _pooled_tensor(shape, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor in pool memory."""
    numel = int(np.prod(shape, dtype=np.int64))
    raw = torch.from_numpy(_pooled(numel * torch.empty((), dtype=dtype).element_size(), np.uint8))
    return raw.view(dtype).view(shape)


def _cast_serial(src: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """src (a contiguous CPU tensor) cast to dtype, into pool memory, on the calling thread (see _SERIAL_ELEMENTS)."""
    out = _pooled_tensor(src.shape, dtype)
    s, d = src.reshape(-1), out.view(-1)
    for i in range(0, s.numel(), _SERIAL_ELEMENTS):
        d[i:i + _SERIAL_ELEMENTS].copy_(s[i:i + _SERIAL_ELEMENTS])
    return out


def _concat_pooled(arrays: list[np.ndarray]) -> np.ndarray:
    """The arrays' values end to end, flat, in pool memory."""
    out = _pooled(sum(a.size for a in arrays), arrays[0].dtype)
    return np.concatenate([a.reshape(-1) for a in arrays], out=out) if out.size else out


def _cat_pooled(tensors: list[torch.Tensor]) -> torch.Tensor:
    """torch.cat of CPU tensors along dim 0, in pool memory, copied by numpy."""
    flat = torch.from_numpy(_concat_pooled([_numpy(t) for t in tensors]))
    out = flat.view(-1, *tensors[0].shape[1:])
    return out.view(torch.bfloat16) if tensors[0].dtype == torch.bfloat16 else out


def _list_array(rows: list[np.ndarray], value_type: pa.DataType) -> pa.ListArray:
    lengths = np.fromiter((r.size for r in rows), dtype=np.int64, count=len(rows))
    offsets = np.zeros(len(rows) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    values = _concat_pooled(rows) if rows else np.zeros(0)
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values, type=value_type))


def slice_rows(spec: TensorSpec, batch_tensor: torch.Tensor, lengths: list[int]) -> list[torch.Tensor]:
    """Cut a padded (B, ...) teacher output into unpadded per-row tensors following spec.shape."""
    rows = []
    for i, n in enumerate(lengths):
        t = batch_tensor[i]
        index = tuple(slice(0, n) if s == "L" else slice(None) for s in spec.shape)
        rows.append(t[index])
    return rows


def _storage_rows(spec: TensorSpec, rows: list[torch.Tensor]) -> dict[str, list[np.ndarray]]:
    """Each column's per-row values in storage precision (main column and aux columns), before they become Arrow
    arrays, so that several teacher batches' rows can be concatenated into one record batch in one copy."""
    if spec.topk:
        pairs = [r.float().topk(spec.topk, dim=-1) for r in rows]
        return {spec.column: [_to_storage(p.values, spec.dtype) for p in pairs],
                spec.column + ".index": [p.indices.to(torch.int32).numpy() for p in pairs]}
    if spec.dtype == "int8":
        qs = [quantize_int8(r) for r in rows]
        return {spec.column: [q.numpy() for q, _ in qs], spec.column + ".scale": [s.numpy() for _, s in qs]}
    return {spec.column: [_to_storage(r, spec.dtype) for r in rows]}


def _column_type(spec: TensorSpec, column: str) -> pa.DataType:
    if column.endswith(".index"):
        return pa.int32()
    if column.endswith(".scale"):
        return pa.float32()
    return _ARROW_VALUE_TYPE[spec.dtype]


def encode_tensor_rows(spec: TensorSpec, rows: list[torch.Tensor]) -> dict[str, pa.Array]:
    """Arrow arrays (main column and aux columns) for the per-row tensors of one spec."""
    return {c: _list_array(v, _column_type(spec, c)) for c, v in _storage_rows(spec, rows).items()}


def cuts_on_device(spec: TensorSpec) -> bool:
    """Logits [C] and hidden [L, D] tensors: padding is cut in one concatenation of row slices (`cut_batch`);
    attention maps (two L axes) and top-k logits take the per-row path."""
    return not spec.topk and "L" not in spec.shape[1:]


def cut_padding(t: torch.Tensor, lengths: list[int], dtype: torch.dtype | None = None) -> torch.Tensor:
    """(sum of lengths, *dims): the first lengths[b] positions of each row b of a padded (B, L, *dims) tensor, rows
    in order; on the CPU cast to `dtype` (default: t's), into pool memory, on the calling thread.

    Cut with slices whose bounds the host already knows (the tokenizer's lengths), joined by one concatenation. A
    boolean mask (``t[mask]``) would give the same values, but its output shape depends on the mask's contents, so
    on a GPU the host would wait for the device to count them: once per teacher batch, stalling the queue of
    kernels behind it. Without padding (packed rows) and a cast, the result is a view of t.
    """
    if len(lengths) != t.shape[0]:
        raise CacheFormatError(f"{len(lengths)} row lengths for a batch of {t.shape[0]} rows")
    padded = any(n != t.shape[1] for n in lengths)
    if t.device.type != "cpu":  # the device's kernels: its allocator reuses memory, and the cast follows there
        return torch.cat([t[b, :n] for b, n in enumerate(lengths)]) if padded else t.reshape(-1, *t.shape[2:])
    if padded:
        a = _numpy(t)
        cut = _concat_pooled([a[b, :n] for b, n in enumerate(lengths)]).reshape(sum(lengths), *t.shape[2:])
        cut = torch.from_numpy(cut).view(t.dtype)
    else:  # packed rows: nothing to cut
        cut = t.reshape(-1, *t.shape[2:])
    return cut if dtype is None or dtype == t.dtype else _cast_serial(cut, dtype)


def _cut_sparse(spec: TensorSpec, t: torch.Tensor, lengths: list[int], row_keys, per_token: bool) -> dict:
    """Sparse logits of a batch: K (id, mass) slots per kept position. Each row's positions are a view of the batch
    tensor, never gathered into one (positions, vocabulary) copy: at LLM vocabularies that copy alone is larger
    than the rest of the export's working memory."""
    u = None
    if spec.sparse == "sampled":
        if row_keys is None:
            raise CacheFormatError(f"{spec.column}: sampled logits need each row's key to seed its draws")
        u = uniforms(row_keys, lengths if per_token else None, spec.slots, int(spec.extra.get("seed", 0)))
        if t.is_cuda:  # from pinned memory: a copy from pageable memory would make the host wait for the GPU
            u = u.pin_memory().to(t.device, non_blocking=True)
    temperature = float(spec.extra.get("temperature", 1.0))
    proposal = spec.extra.get("proposal_temperature")
    if per_token:
        rows = [t[b, :n] for b, n in enumerate(lengths)]
        u_rows = u.split(list(lengths)) if u is not None else [None] * len(rows)
        parts = [sparse_targets(r, spec.sparse, spec.slots, temperature, ur, proposal) for r, ur in zip(rows, u_rows)]
        ids, mass = torch.cat([i for i, _ in parts]), torch.cat([m for _, m in parts])
    else:
        ids, mass = sparse_targets(t.reshape(t.shape[0], -1), spec.sparse, spec.slots, temperature, u, proposal)
    return {"values": mass.to(_TORCH_STORAGE[spec.dtype]), "index": ids.to(torch.int32)}


def cut_batch(spec: TensorSpec, batch_tensor: torch.Tensor, lengths: list[int],
              row_keys: list[int] | None = None) -> dict[str, torch.Tensor]:
    """What will be stored of a padded (B, ...) teacher output, computed where the tensor lives.

    Padding is cut out, values are cast to the storage precision (int8: quantised with per-vector
    scales), all on the tensor's device, so a GPU export copies only the stored bytes to the host.
    Returns ``{"values": (rows' values, flat per row), "scale": ...}`` for `encode_cut`; sparse logits give
    ``{"values": masses (N, K), "index": ids (N, K)}``, the draws of ``sampled`` seeded by `row_keys`.
    """
    t = batch_tensor.detach()
    per_token = bool(spec.shape) and spec.shape[0] == "L"
    if spec.sparse:
        return _cut_sparse(spec, t, lengths, row_keys, per_token)
    storage = _TORCH_STORAGE.get(spec.dtype)
    if storage is None and spec.dtype != "int8":
        raise CacheFormatError(f"storage dtype {spec.dtype!r} is not a float format")
    flat = cut_padding(t, lengths, storage) if per_token else t.reshape(t.shape[0], -1)
    if spec.dtype == "int8":
        q, scale = quantize_int8(flat)
        return {"values": q, "scale": scale}
    return {"values": flat.to(storage)}


_TORCH_STORAGE = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def encode_cut(spec: TensorSpec, cut: dict[str, torch.Tensor], lengths: list[int]) -> dict[str, pa.Array]:
    """Arrow arrays from `cut_batch`'s CPU tensors (one conversion per column)."""
    values = cut["values"]
    B = len(lengths)
    if spec.shape and spec.shape[0] == "L":
        per_row = [n * int(np.prod(values.shape[1:], dtype=np.int64)) for n in lengths]
    else:
        per_row = [int(np.prod(values.shape[1:], dtype=np.int64))] * B
    offsets = np.zeros(B + 1, dtype=np.int32)
    np.cumsum(per_row, out=offsets[1:])
    offsets = pa.array(offsets, pa.int32())
    out = {}
    if spec.dtype == "int8":
        out[spec.column] = pa.ListArray.from_arrays(offsets, pa.array(values.numpy().reshape(-1), type=pa.int8()))
        scale_offsets = np.zeros(B + 1, dtype=np.int32)
        np.cumsum(lengths, out=scale_offsets[1:])
        out[spec.column + ".scale"] = pa.ListArray.from_arrays(
            pa.array(scale_offsets, pa.int32()), pa.array(cut["scale"].numpy().reshape(-1), type=pa.float32()))
        return out
    array = values.view(torch.int16).numpy().view(np.uint16) if spec.dtype == "bf16" else values.numpy()
    out[spec.column] = pa.ListArray.from_arrays(offsets, pa.array(array.reshape(-1),
                                                                  type=_ARROW_VALUE_TYPE[spec.dtype]))
    if "index" in cut:
        out[spec.column + ".index"] = pa.ListArray.from_arrays(
            offsets, pa.array(cut["index"].numpy().reshape(-1), type=pa.int32()))
    return out


def encode_batch(spec: TensorSpec, batch_tensor: torch.Tensor, lengths: list[int],
                 row_keys: list[int] | None = None) -> dict[str, pa.Array]:
    """Like encode_tensor_rows, from the padded (B, ...) batch tensor (on the CPU)."""
    if not cuts_on_device(spec):
        return encode_tensor_rows(spec, slice_rows(spec, batch_tensor, lengths))
    return encode_cut(spec, cut_batch(spec, batch_tensor, lengths, row_keys), lengths)


def stage_batch(spec: TensorSpec, output, lengths: list[int], row_keys: list[int] | None = None) -> dict:
    """One teacher batch's output for `spec`, as compact host memory that `encode_staged` merges with the next
    batches' into one record batch.

    `output`: `cut_batch`'s dict (a GPU export cuts on the device) or the padded (B, ...) CPU tensor, cut here.
    Per-row specs (attention maps, top-k) become each row's values in storage precision, each its own contiguous
    array, so a writer holding a record batch's worth of teacher batches holds the stored bytes, not the padding.
    """
    if isinstance(output, dict):
        return output
    if cuts_on_device(spec):
        return cut_batch(spec, output, lengths, row_keys)
    rows = _storage_rows(spec, slice_rows(spec, output, lengths))
    return {"rows": {c: [np.ascontiguousarray(r) for r in v] for c, v in rows.items()}}


def encode_staged(spec: TensorSpec, staged: list[dict], lengths: list[int]) -> dict[str, pa.Array]:
    """Arrow arrays for several teacher batches' `stage_batch` outputs (`lengths`: all their rows' token counts, in
    order), merged with one copy per column.

    The batches' tensors are concatenated before they become Arrow arrays, by numpy into pool memory (the comment
    above `_pooled` says why), rather than record batches built per teacher batch and concatenated again
    (``combine_chunks``).
    """
    if "rows" in staged[0]:
        columns = staged[0]["rows"].keys()
        return {c: _list_array([r for s in staged for r in s["rows"][c]], _column_type(spec, c)) for c in columns}
    merged = staged[0] if len(staged) == 1 else {k: _cat_pooled([s[k] for s in staged]) for k in staged[0]}
    return encode_cut(spec, merged, lengths)


def encode_spans(spans) -> list[int]:
    """Token spans [(start, end)] as OFFSETS stores them: per token (start - the previous text token's end,
    length), (0, 0) for a special token (an empty span). Small numbers that compress well (a span as absolute
    offsets grows with the row), read back by `decode_spans`."""
    out, prev_end = [], 0
    for start, end in spans:
        if end > start:
            out += (start - prev_end, end - start)
            prev_end = end
        else:
            out += (0, 0)
    return out


def decode_spans(values) -> list[tuple[int, int]]:
    """`encode_spans` undone: [(start, end)] in the row's text; a special token's span is empty, at the end of
    the text before it."""
    v = np.asarray(values, np.int64).reshape(-1, 2)
    ends = np.cumsum(v[:, 0] + v[:, 1])
    return list(zip((ends - v[:, 1]).tolist(), ends.tolist()))


def encode_int_rows(rows: list, value_type: pa.DataType) -> pa.ListArray:
    np_type = {pa.int32(): np.int32, pa.int8(): np.int8, pa.int64(): np.int64}[value_type]
    return _list_array([np.asarray(r, dtype=np_type) for r in rows], value_type)


# -- decoding ------------------------------------------------------------------------------------------

def _list_values(arr: pa.ListArray) -> tuple[np.ndarray, np.ndarray]:
    """(offsets, values) of a list array, values copied into a writable numpy array."""
    arr = arr if arr.offset == 0 else pa.concat_arrays([arr])  # normalise sliced arrays
    offsets = np.asarray(arr.offsets)
    values = np.array(arr.values, copy=True) if len(arr.values) else np.zeros(0)
    return offsets, values


def _from_storage(values: np.ndarray, dtype: str) -> torch.Tensor:
    if dtype == "bf16":
        return torch.from_numpy(values.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(values)


def decode_tensor_column(spec: TensorSpec, table: pa.Table, lengths: list[int], dense_vocab: int | None = None
                         ) -> list[torch.Tensor]:
    """Per-row tensors of one spec, in storage precision (int8 is dequantised to float32).

    Top-k columns are expanded to dense logits over `dense_vocab` classes (default: the spec's last dim),
    with dropped entries set to TOPK_FILL.
    """
    if spec.sparse:
        raise CacheFormatError(f"{spec.column}: sparse logits decode to (ids, masses) with decode_sparse_rows, "
                               "not to a dense tensor")
    arr = table.column(spec.column).combine_chunks()
    offsets, values = _list_values(arr)
    flat = _from_storage(values, spec.dtype)
    if spec.dtype == "int8":
        s_off, s_vals = _list_values(table.column(spec.column + ".scale").combine_chunks())
        scales = torch.from_numpy(s_vals)
    if spec.topk:
        i_off, i_vals = _list_values(table.column(spec.column + ".index").combine_chunks())
        indices = torch.from_numpy(i_vals).long()
    rows = []
    for i, n in enumerate(lengths):
        shape = spec.row_shape(n)
        t = flat[offsets[i]:offsets[i + 1]].reshape(shape)
        if spec.dtype == "int8":
            t = t.float() * scales[s_off[i]:s_off[i + 1]].reshape(shape[:-1] + [1])
        if spec.topk:
            vocab = dense_vocab or int(spec.shape[-1])
            idx = indices[i_off[i]:i_off[i + 1]].reshape(shape)
            dense = torch.full(shape[:-1] + [vocab], TOPK_FILL, dtype=t.dtype)
            t = dense.scatter_(-1, idx, t)
        rows.append(t)
    return rows


class ColumnViews:
    """A decoded record batch with numpy views of its list columns, made once however many batches read it."""

    def __init__(self, batch: pa.RecordBatch):
        self.batch = batch
        self._views: dict = {}

    @property
    def num_rows(self) -> int:
        return self.batch.num_rows

    def list_column(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(offsets, flat values) without copying."""
        v = self._views.get(name)
        if v is None:
            arr = self.batch.column(name)
            v = self._views[name] = (np.asarray(arr.offsets).astype(np.int64),
                                     arr.values.to_numpy(zero_copy_only=False))
        return v

    def scalar_column(self, name: str) -> np.ndarray:
        v = self._views.get(name)
        if v is None:
            v = self._views[name] = self.batch.column(name).to_numpy(zero_copy_only=False)
        return v


class Selection:
    """Rows of one batch, as they lie in decoded record batches: [(ColumnViews, rows in it, batch positions)].

    Columns are read from Arrow memory without copying and copied once, straight into the padded batch
    tensor (one vectorized gather per record batch and column).
    """

    def __init__(self, groups: list, size: int):
        self.groups = [(cv if isinstance(cv, ColumnViews) else ColumnViews(cv), np.asarray(local, np.int64),
                        np.asarray(pos, np.int64)) for cv, local, pos in groups]
        self.size = size
        self.lengths = np.zeros(size, np.int64)
        for cv, local, pos in self.groups:
            off, _ = cv.list_column(INPUT_IDS)
            self.lengths[pos] = off[local + 1] - off[local]

    def scalars(self, name: str) -> list:
        out = np.empty(self.size, dtype=object)
        for cv, local, pos in self.groups:
            out[pos] = cv.scalar_column(name)[local]
        return out.tolist()

    def padded(self, name: str, length: int, width: int, fill, dtype, per_token: bool = True) -> np.ndarray:
        """(size * length, width) array: row i's tokens at [i*length, i*length + len_i); per_token=False: (size, width)."""
        out = np.full(((self.size * length) if per_token else self.size, width), fill, dtype=dtype)
        for cv, local, pos in self.groups:
            off, values = cv.list_column(name)
            values = values.reshape(-1, width)
            starts = off[local] // width
            if not per_token:
                out[pos] = values[starts]
                continue
            lens = off[local + 1] // width - starts
            within = np.arange(int(lens.sum()), dtype=np.int64) - np.repeat(np.cumsum(lens) - lens, lens)
            out[np.repeat(pos * length, lens) + within] = values[np.repeat(starts, lens) + within]
        return out

    def rows_table(self, columns: list[str]) -> pa.Table:
        """The rows in batch order as a table (one-row slices; for the per-row decode path)."""
        pieces = [None] * self.size
        for cv, local, pos in self.groups:
            sub = cv.batch.select(columns)
            for r, p in zip(local.tolist(), pos.tolist()):
                pieces[p] = sub.slice(r, 1)
        return pa.Table.from_batches(pieces)


def pad_ints(sel: Selection, name: str, length: int, value: int) -> torch.Tensor:
    return torch.from_numpy(sel.padded(name, length, 1, value, np.int64).reshape(sel.size, length))


def decode_selection(spec: TensorSpec, sel: Selection, length: int) -> torch.Tensor | None:
    """The batch tensor (B, *shape with L = length), zero-padded, for logits [C] and hidden / token logits [L, D]
    in fp32/fp16/bf16/int8; None for attention maps and top-k, which take the per-row path."""
    if spec.topk or spec.sparse or "L" in spec.shape[1:]:
        return None
    per_token = bool(spec.shape) and spec.shape[0] == "L"
    dims = [int(x) for x in (spec.shape[1:] if per_token else spec.shape)]
    width = int(np.prod(dims, dtype=np.int64)) if dims else 1
    out = sel.padded(spec.column, length, width, 0, _NUMPY_VALUE_TYPE[spec.dtype], per_token)
    if spec.dtype == "int8":
        scale = sel.padded(spec.column + ".scale", length, 1, 0.0, np.float32, per_token)
        out = out.astype(np.float32) * scale
    shape = (sel.size, length, *dims) if per_token else (sel.size, *dims)
    return _from_storage(out.reshape(shape), spec.dtype)


def decode_sparse_selection(spec: TensorSpec, sel: Selection, length: int) -> dict:
    """Sparse logits of a batch as sparse targets: ``{"ids": (B, [L,] K) int64, "mass": (B, [L,] K) float32,
    "method", "temperature"}`` (padding positions: id 0, mass 0) and, for topk, ``"tail"``: the mass left out."""
    per_token = bool(spec.shape) and spec.shape[0] == "L"
    k = spec.slots
    shape = (sel.size, length, k) if per_token else (sel.size, k)
    mass = sel.padded(spec.column, length, k, 0, _NUMPY_VALUE_TYPE[spec.dtype], per_token)
    mass = _from_storage(mass.reshape(shape), spec.dtype).float()
    ids = torch.from_numpy(sel.padded(spec.column + ".index", length, k, 0, np.int32, per_token).reshape(shape)).long()
    out = {"ids": ids, "mass": mass, "method": spec.sparse, "temperature": float(spec.extra.get("temperature", 1.0))}
    if spec.sparse == "topk":
        out["tail"] = (1.0 - mass.sum(dim=-1)).clamp_(min=0.0)
    return out


def decode_int_column(table: pa.Table, name: str) -> list[np.ndarray]:
    offsets, values = _list_values(table.column(name).combine_chunks())
    return [values[offsets[i]:offsets[i + 1]] for i in range(len(offsets) - 1)]
