"""Column layout and tensor codecs of a cache shard: the contract between export and distill.

Every example is stored at its true length L. A teacher tensor is one Arrow ``list<primitive>`` column
holding the row's values flattened; its per-row shape comes from the column's spec, where "L" stands
for the row's token count (``len(input_ids)``):

    logits (sequence-level)  [C]         logits (token-level)  [L, C]
    hidden                   [L, H]      attention             [heads, L, L]

Storage dtypes: fp32 (float32), fp16 (float16), bf16 (the raw bits as uint16: Arrow has no bfloat16),
int8 (hidden states only: symmetric per-token quantisation, with a ``<col>.scale`` float32 column of
one scale per token). Top-k logits store the k largest values and a ``<col>.index`` int32 column.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import torch

from ..errors import CacheFormatError

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
    def column(self) -> str:
        return f"{self.teacher}.{self.kind}" + ("" if self.layer is None else f".{self.layer}")

    def aux_columns(self) -> list[str]:
        cols = []
        if self.dtype == "int8":
            cols.append(self.column + ".scale")
        if self.topk:
            cols.append(self.column + ".index")
        return cols

    def arrow_fields(self) -> list[pa.Field]:
        fields = [pa.field(self.column, pa.list_(_ARROW_VALUE_TYPE[self.dtype]))]
        if self.dtype == "int8":
            fields.append(pa.field(self.column + ".scale", pa.list_(pa.float32())))
        if self.topk:
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


def decode_int_column(table: pa.Table, name: str) -> list[np.ndarray]:
    offsets, values = _list_values(table.column(name).combine_chunks())
    return [values[offsets[i]:offsets[i + 1]] for i in range(len(offsets) - 1)]
