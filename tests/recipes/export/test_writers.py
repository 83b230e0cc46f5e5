"""Parallel shard writers and the sync-free batch path of `cachebrew export` (issue #30, item 8).

N writer threads must write the same bytes as one: each shard byte-identical, the manifest the same but for its
timestamp and the `writers` setting itself; a failing thread must stop the others and leave no temp file; padding
is cut without a host sync; `writers` is validated and does not change the fingerprint.

    pytest tests/recipes/export/test_writers.py
"""
import json
import time
from pathlib import Path

import pyarrow as pa
import pytest
import torch

from cachebrew.cache.format import TensorSpec, cut_batch, cut_padding, encode_staged, stage_batch, encode_batch
from cachebrew.errors import CachebrewError, ConfigError
from cachebrew.recipes.export import ExportConfig, run_export
from cachebrew.recipes.export.recipe import ShardWriters, _schema, deal_batches, to_host
from fixtures import export_config, make_teacher_dir, make_text_data
from test_host_syncs import HostSyncs


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("writers")
    return {"teacher": make_teacher_dir(root / "teacher"), "data": make_text_data(root / "data.jsonl", n=44),
            "root": root}


def _export(root: Path, assets, writers: int, **over) -> Path:
    cfg = export_config(root, assets["teacher"], assets["data"], writers=writers, **over)
    run_export(ExportConfig.from_dict(cfg))
    return Path(cfg["output"])


def _manifest(cache: Path) -> dict:
    m = json.loads((cache / "manifest.json").read_text())
    m.pop("created")
    for key in ("output", "writers"):
        m["config"].pop(key)
    return m


@pytest.mark.parametrize("over", [
    # 6 shards of 2 teacher batches each, merged into one record batch per shard; fp32 everywhere
    dict(batch_size=4, shard_rows=8),
    # compact dtypes, record batches of 2 teacher batches (the last one partial), and shard_rows < batch_size
    dict(batch_size=8, shard_rows=4, record_batch_rows=8,
         dtypes={"logits": "fp16", "hidden": "int8", "attention": "bf16"}),
    dict(batch_size=4, shard_rows=12, record_batch_rows=8, outputs={"topk_logits": 1},
         dtypes={"logits": "fp16", "hidden": "bf16", "attention": "fp16"}),
], ids=["fp32", "compact", "topk"])
def test_one_and_four_writers_write_the_same_bytes(tmp_path, assets, over):
    one = _export(tmp_path / "one", assets, 1, **over)
    four = _export(tmp_path / "four", assets, 4, **over)
    shards = sorted(p.name for p in one.glob("part-*.arrow"))
    assert len(shards) >= 4 and shards == sorted(p.name for p in four.glob("part-*.arrow"))
    for name in shards:
        assert (one / name).read_bytes() == (four / name).read_bytes(), name
    assert _manifest(one) == _manifest(four)
    assert [s["index"] for s in _manifest(four)["shards"]] == list(range(len(shards)))  # listed in shard order
    assert not list(four.glob(".*.tmp"))


def test_writers_setting_is_validated_and_not_fingerprinted(tmp_path, assets):
    base = export_config(tmp_path, assets["teacher"], assets["data"])
    for bad in (0, -1, 1.5, "4"):
        with pytest.raises(ConfigError, match=r"writers: must be (null or an integer >= 1|an integer or null)"):
            ExportConfig.from_dict({**base, "writers": bad})
    auto = ExportConfig.from_dict(base)
    assert auto.writers is None and 1 <= auto.writer_threads() <= 4
    assert ExportConfig.from_dict({**base, "writers": 3}).writer_threads() == 3
    assert "writers" not in auto.fingerprint_settings()
    assert auto.fingerprint_settings() == ExportConfig.from_dict({**base, "writers": 3}).fingerprint_settings()


def test_deal_batches_feeds_every_writer_and_keeps_each_shards_order():
    batches = {0: [0, 1], 1: [0, 1, 2], 2: [0], 4: [0, 1]}
    dealt = list(deal_batches([0, 1, 2, 4], batches, 2))
    assert dealt == [(0, 0, 0, False), (1, 1, 0, False), (0, 0, 1, True), (1, 1, 1, False), (1, 1, 2, True),
                     (0, 2, 0, True), (1, 4, 0, False), (1, 4, 1, True)]
    assert list(deal_batches([0, 1], batches, 1)) == [(0, 0, 0, False), (0, 0, 1, True), (0, 1, 0, False),
                                                      (0, 1, 1, False), (0, 1, 2, True)]


class _Row:
    def __init__(self, i):
        self.id, self.copy, self.text, self.text_pair, self.words = f"r{i}", 0, "x", None, None


def _pool(tmp_path, writers):
    spec = TensorSpec("t", "hidden", 0, "fp16", ["L", 4])
    tokens = [{"input_ids": [1, 2, 3], "attention_mask": [1, 1, 1]} for _ in range(2)]
    cfg = type("C", (), {"data": type("D", (), {"text_pair": None})()})()
    schema = _schema(cfg, tokens, [spec], token_level=False)
    return ShardWriters(tmp_path, schema, {"fingerprint": "f"}, [spec], writers=writers), spec, tokens


def test_a_failing_writer_stops_the_others_and_leaves_no_temp_file(tmp_path):
    pool, spec, tokens = _pool(tmp_path, 3)
    good = {spec.column: torch.zeros(2, 3, 4)}
    with pytest.raises(KeyError):
        with pool:
            for slot in range(3):
                pool.put(slot, ("open", slot, slot * 2))
            pool.put(0, ("rows", [_Row(0), _Row(1)], tokens, good, "t", None))
            pool.put(1, ("rows", [_Row(2), _Row(3)], tokens, {}, "t", None))  # no tensor for the column: KeyError
            deadline = time.time() + 60
            while time.time() < deadline:  # the main thread sees the failure on a later put
                pool.put(2, ("rows", [_Row(4), _Row(5)], tokens, good, "t", None))
                time.sleep(0.01)
    assert not any(t.is_alive() for t in pool.threads)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # the three open shards were all discarded


def test_finish_with_a_shard_still_open_publishes_nothing(tmp_path):
    pool, spec, tokens = _pool(tmp_path, 1)
    with pytest.raises(CachebrewError, match="shard 2 was still open"):
        with pool:
            pool.put(0, ("open", 2, 4))
            pool.put(0, ("rows", [_Row(0), _Row(1)], tokens, {spec.column: torch.ones(2, 3, 4)}, "t", None))
            pool.finish()
    assert list(tmp_path.iterdir()) == []


def test_finish_returns_shards_in_index_order(tmp_path):
    pool, spec, tokens = _pool(tmp_path, 2)
    with pool:
        for slot, s in ((0, 3), (1, 1)):
            pool.put(slot, ("open", s, s * 2))
            pool.put(slot, ("rows", [_Row(2 * s), _Row(2 * s + 1)], tokens, {spec.column: torch.ones(2, 3, 4)}, "t",
                            None))
            pool.put(slot, ("close", s))
        infos = pool.finish()
    assert [i.index for i in infos] == [1, 3] and all(i.rows == 2 for i in infos)


@pytest.mark.parametrize("shape,dtype", [(["L", 6], "fp32"), (["L", 6], "int8"), (["L", 6], "bf16"), ([3], "fp16"),
                                         (["L", 2, 3], "fp16")])
def test_cut_batch_needs_no_host_sync_and_equals_the_mask(shape, dtype):
    torch.manual_seed(0)
    lengths = [5, 2, 7, 1]
    dims = [7 if s == "L" else s for s in shape]
    padded = torch.randn(len(lengths), *dims)
    spec = TensorSpec("t", "hidden", 0, dtype, shape)
    with HostSyncs() as syncs:  # the device path (a GPU's, here on the meta device: the same ops, no data)
        cut_batch(spec, padded.to("meta"), lengths)
    assert syncs.ours == []
    if shape[0] == "L":
        keep = torch.arange(7)[None, :] < torch.tensor(lengths)[:, None]
        with HostSyncs() as syncs:
            padded[keep]
        assert len(syncs.ours) == 1  # the mask it replaces: the counter sees that one
        for storage in (None, torch.float16, torch.bfloat16):
            assert torch.equal(cut_padding(padded, lengths, storage), padded[keep].to(storage or padded.dtype))
    # merged from two batches, the arrays equal those of the two batches encoded apart, concatenated
    halves = [(padded[:2], lengths[:2]), (padded[2:], lengths[2:])]
    merged = encode_staged(spec, [stage_batch(spec, t, n) for t, n in halves], lengths)
    apart = [encode_batch(spec, t, n) for t, n in halves]
    for column, array in merged.items():
        assert array.equals(pa.concat_arrays([a[column] for a in apart])), column


def test_cut_padding_without_padding_is_a_view_and_checks_the_row_count():
    t = torch.randn(3, 4, 2)
    flat = cut_padding(t, [4, 4, 4])
    assert flat.shape == (12, 2) and flat.data_ptr() == t.data_ptr()
    assert torch.equal(cut_padding(t, [4, 4, 4], torch.bfloat16), flat.to(torch.bfloat16))
    with pytest.raises(Exception, match="3 row lengths for a batch of 2 rows"):
        cut_padding(t[:2], [4, 4, 4])


def test_to_host_is_a_no_op_on_the_cpu():
    tensors = {"a": torch.ones(2), "b": {"values": torch.zeros(3)}}
    host, ready = to_host(tensors, None)
    assert host is tensors and ready is None
