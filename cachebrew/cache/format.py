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
TOKEN_COLUMNS = {INPUT_IDS: pa.int32(), ATTENTION_MASK: pa.int8(), TOKEN_TYPE_IDS: pa.int8()}


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


def _list_array(rows: list[np.ndarray], value_type: pa.DataType) -> pa.ListArray:
    lengths = np.fromiter((r.size for r in rows), dtype=np.int64, count=len(rows))
    offsets = np.zeros(len(rows) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    values = np.concatenate([r.reshape(-1) for r in rows]) if rows else np.zeros(0)
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values, type=value_type))


def slice_rows(spec: TensorSpec, batch_tensor: torch.Tensor, lengths: list[int]) -> list[torch.Tensor]:
    """Cut a padded (B, ...) teacher output into unpadded per-row tensors following spec.shape."""
    rows = []
    for i, n in enumerate(lengths):
        t = batch_tensor[i]
        index = tuple(slice(0, n) if s == "L" else slice(None) for s in spec.shape)
        rows.append(t[index])
    return rows


def encode_tensor_rows(spec: TensorSpec, rows: list[torch.Tensor]) -> dict[str, pa.Array]:
    """Arrow arrays (main column and aux columns) for the per-row tensors of one spec."""
    out = {}
    if spec.topk:
        pairs = [r.float().topk(spec.topk, dim=-1) for r in rows]
        out[spec.column] = _list_array([_to_storage(p.values, spec.dtype) for p in pairs],
                                       _ARROW_VALUE_TYPE[spec.dtype])
        out[spec.column + ".index"] = _list_array([p.indices.to(torch.int32).numpy() for p in pairs], pa.int32())
        return out
    if spec.dtype == "int8":
        qs = [quantize_int8(r) for r in rows]
        out[spec.column] = _list_array([q.numpy() for q, _ in qs], pa.int8())
        out[spec.column + ".scale"] = _list_array([s.numpy() for _, s in qs], pa.float32())
        return out
    out[spec.column] = _list_array([_to_storage(r, spec.dtype) for r in rows], _ARROW_VALUE_TYPE[spec.dtype])
    return out


def cuts_on_device(spec: TensorSpec) -> bool:
    """Logits [C] and hidden [L, D] tensors: padding is cut in one masked select (`cut_batch`); attention
    maps (two L axes) and top-k logits take the per-row path."""
    return not spec.topk and "L" not in spec.shape[1:]


def _cut_sparse(spec: TensorSpec, t: torch.Tensor, lengths: list[int], row_keys, per_token: bool) -> dict:
    """Sparse logits of a batch: K (id, mass) slots per kept position. Each row's positions are a view of the batch
    tensor, never gathered into one (positions, vocabulary) copy: at LLM vocabularies that copy alone is larger
    than the rest of the export's working memory."""
    u = None
    if spec.sparse == "sampled":
        if row_keys is None:
            raise CacheFormatError(f"{spec.column}: sampled logits need each row's key to seed its draws")
        u = uniforms(row_keys, lengths if per_token else None, spec.slots, int(spec.extra.get("seed", 0)), t.device)
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
    if per_token:
        L = t.shape[1]
        keep = torch.arange(L, device=t.device)[None, :] < torch.as_tensor(lengths, device=t.device)[:, None]
        flat = t[keep]                                   # (sum of lengths, *dims), rows in order
    else:
        flat = t.reshape(t.shape[0], -1)
    if spec.dtype == "int8":
        q, scale = quantize_int8(flat)
        return {"values": q, "scale": scale}
    storage = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}.get(spec.dtype)
    if storage is None:
        raise CacheFormatError(f"storage dtype {spec.dtype!r} is not a float format")
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
