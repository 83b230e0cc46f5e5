"""The vectorized decode (one copy from Arrow memory into the padded batch) equals the per-row reference."""
import numpy as np
import pyarrow as pa
import pytest
import torch

from cachebrew.cache.format import (Selection, TensorSpec, decode_int_column, decode_selection, decode_tensor_column,
                                    encode_int_rows, encode_tensor_rows, pad_ints)
from cachebrew.components.loader import _pad_stack


def _record_batches(spec, rows, lengths, split):
    cols = encode_tensor_rows(spec, rows)
    cols["input_ids"] = encode_int_rows([list(range(5, 5 + n)) for n in lengths], pa.int32())
    cols["id"] = pa.array([f"ex{i}" for i in range(len(lengths))])
    table = pa.table(cols)
    # two record batches, as a shard has; the second one read back through IPC, as the loader does
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema) as w:
        w.write_table(table.slice(split), max_chunksize=100)
    second = pa.ipc.open_file(sink.getvalue()).get_batch(0)
    return table.slice(0, split).to_batches()[0], second


@pytest.mark.parametrize("dtype, shape", [(d, s) for d in ("fp32", "fp16", "bf16") for s in (["L", 24], [3], ["L", 3])]
                         + [("int8", ["L", 24])])  # int8 stores hidden states only
def test_decode_selection_equals_per_row_decode(dtype, shape):
    g = torch.Generator().manual_seed(0)
    lengths = [7, 2, 11, 5, 1, 9]
    spec = TensorSpec("t", "hidden" if dtype == "int8" else "logits", None, dtype, shape)
    rows = [torch.randn(*spec.row_shape(n), generator=g) for n in lengths]
    first, second = _record_batches(spec, rows, lengths, split=2)
    # batch order: rows 4, 0, 3, 1, 5 (row 2 not in this batch)
    sel = Selection([(second, [2, 1, 3], [0, 2, 4]), (first, [0, 1], [1, 3])], 5)
    want = [4, 0, 3, 1, 5]
    assert sel.lengths.tolist() == [lengths[i] for i in want]
    assert sel.scalars("id") == [f"ex{i}" for i in want]
    L = max(sel.lengths) + 3
    fast = decode_selection(spec, sel, L)
    table = pa.Table.from_batches([first, second]).take(pa.array(want))
    slow = _pad_stack(spec, decode_tensor_column(spec, table, sel.lengths.tolist()), L)
    assert fast.dtype == slow.dtype and fast.shape == slow.shape
    assert torch.equal(fast, slow)
    ids = pad_ints(sel, "input_ids", L, -7)
    for i, r in enumerate(decode_int_column(table, "input_ids")):
        assert ids[i, :len(r)].tolist() == r.tolist() and (ids[i, len(r):] == -7).all()
    assert np.array_equal(sel.rows_table(["id"]).column("id").to_pylist(), [f"ex{i}" for i in want])


def test_attention_and_topk_take_the_per_row_path():
    sel = Selection([], 0)
    assert decode_selection(TensorSpec("t", "attention", 1, "fp16", [2, "L", "L"]), sel, 1) is None
    assert decode_selection(TensorSpec("t", "logits", None, "fp32", [50], topk=5), sel, 1) is None


@pytest.mark.parametrize("dtype, shape", [(d, s) for d in ("fp32", "fp16", "bf16") for s in (["L", 24], [3], ["L", 3])]
                         + [("int8", ["L", 24]), ("fp16", [2, "L", "L"])])
def test_encode_batch_equals_per_row_encode(dtype, shape):
    from cachebrew.cache.format import encode_batch, slice_rows

    g = torch.Generator().manual_seed(1)
    lengths = [7, 2, 11, 5]
    spec = TensorSpec("t", "hidden" if dtype == "int8" else "attention" if len(shape) == 3 else "logits",
                      None, dtype, shape)
    padded = torch.randn(len(lengths), *[12 if s == "L" else s for s in shape], generator=g)
    fast = encode_batch(spec, padded, lengths)
    slow = encode_tensor_rows(spec, slice_rows(spec, padded, lengths))
    assert fast.keys() == slow.keys()
    for k in fast:
        assert fast[k].equals(slow[k]), k
