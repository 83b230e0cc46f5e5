"""CacheBatches streams: every record batch decoded once per epoch whatever the worker count, the order a
pure function of (seed, epoch, world size, workers), positions and epochs reaching persistent workers."""
import os

import pytest
import torch

from cachebrew.components import CacheBatches, CacheLoader, RankShare
from cachebrew.errors import CachebrewError
from cachebrew.recipes.export import ExportConfig, run_export
from fixtures import export_config, make_teacher_dir, make_text_data

ROWS = 96


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """96 rows in 6 shards of 4 record batches (4 rows each): 24 record batches, last-row batches uneven."""
    root = tmp_path_factory.mktemp("streams")
    teacher = make_teacher_dir(root / "teacher")
    data = make_text_data(root / "train.jsonl", n=ROWS, seed=3)
    cfg = export_config(root / "c", teacher, data, outputs={"hidden_layers": [2], "attention_layers": []},
                        shard_rows=16, record_batch_rows=4, batch_size=4)
    run_export(ExportConfig.from_dict(cfg))
    return str(root / "c" / "cache")


def ids(batch):
    return tuple(tuple(k) for k in batch["ids"])


def plan_ids(ds, epoch):
    """What the plan says, read batch by batch in this process (no workers)."""
    reference = CacheBatches(ds.joined, ds.batch_size, seed=ds.seed, buffer_size=ds.buffer_size,
                             ranks=ds.ranks, num_workers=ds.num_workers)
    expected = []
    for stream, rows in reference.plan(epoch):
        decoded = {}
        expected.append(ids(reference._collate(rows, decoded)))
    return expected


@pytest.mark.parametrize("workers", [1, 2, 4])
def test_workers_deliver_the_plan_and_decode_each_record_batch_once(cache, workers, tmp_path, monkeypatch):
    log = tmp_path / "decodes.log"
    original = CacheBatches._record_batch

    def counting(self, ci, shard, batch, decoded):
        if (ci, shard, batch) not in decoded:  # a decode, not a reuse: append-only writes from every worker
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
            os.write(fd, f"{ci},{shard},{batch}\n".encode())
            os.close(fd)
        return original(self, ci, shard, batch, decoded)

    monkeypatch.setattr(CacheBatches, "_record_batch", counting)  # inherited by the forked workers
    ds = CacheBatches(cache, 8, seed=1, buffer_size=12)
    loader = CacheLoader(ds, num_workers=workers)
    got = [ids(b) for b in loader]
    decodes = log.read_text().split()
    record_batches = sum(len(info.batches) for info in ds.joined.manifest.shards)
    assert record_batches == 24
    assert len(decodes) == record_batches and len(set(decodes)) == record_batches  # each exactly once in total
    rows = [k for b in got for k in b]
    assert len(rows) == ROWS and len(set(rows)) == ROWS
    assert len(got) == len(ds) == len(loader)
    monkeypatch.setattr(CacheBatches, "_record_batch", original)
    assert got == plan_ids(ds, 0)


def test_order_depends_on_seed_epoch_and_workers_only(cache):
    one = CacheBatches(cache, 8, seed=1, buffer_size=12)
    again = CacheBatches(cache, 8, seed=1, buffer_size=12)
    assert [ids(b) for b in one] == [ids(b) for b in again]
    two = CacheBatches(cache, 8, seed=1, buffer_size=12, num_workers=2)
    assert [r.tolist() for _, r in two.plan(0)] != [r.tolist() for _, r in one.plan(0)]
    # one shuffle buffer per stream: a batch never mixes the rows of two workers' record batches
    streams = two._streams[0]
    for stream, rows in two.plan(0):
        mine = streams[stream]
        assert all(any(a <= r < b for a, b in mine) for r in rows.tolist())
    # the main process's plan alternates the streams, as DataLoader alternates its workers
    assert [s for s, _ in two.plan(0)][:4] == [0, 1, 0, 1]


def test_persistent_workers_follow_epochs_and_positions(cache):
    ds = CacheBatches(cache, 8, seed=2, buffer_size=12)
    loader = CacheLoader(ds, num_workers=2, persistent_workers=True)
    e0 = [ids(b) for b in loader]
    ds.set_epoch(1)
    e1 = [ids(b) for b in loader]
    assert e1 != e0 and sorted(sum(e1, ())) == sorted(sum(e0, ()))
    assert e0 == plan_ids(ds, 0) and e1 == plan_ids(ds, 1)
    for k in (1, 5, len(ds) - 1, len(ds)):  # mid-round positions too: the next batch is the plan's next
        ds.set_position(0, k)
        assert [ids(b) for b in loader] == e0[k:], k


def test_ranks_split_rows_evenly_with_equal_lengths(cache):
    for world in (2, 3):
        ranks = [CacheBatches(cache, 8, seed=1, buffer_size=12, ranks=RankShare(r, world, "records"),
                              num_workers=2)
                 for r in range(world)]
        assert len({len(r) for r in ranks}) == 1
        seen = [k for r in ranks for b in r for k in ids(b)]
        assert len(seen) == len(set(seen))
        assert len(seen) >= ROWS - world * 8  # at most a partial batch per stream is left for DDP's equal lengths


def test_a_dataloader_with_other_workers_is_a_clear_error(cache):
    ds = CacheBatches(cache, 8)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
    with pytest.raises(CachebrewError, match=r"num_workers=0 but runs in a DataLoader with 2 workers"):
        next(iter(loader))
    with pytest.raises(CachebrewError, match="num_workers must be an integer"):
        CacheBatches(cache, 8, num_workers=-1)


def test_only_the_features_the_losses_use_are_read(cache):
    full = next(iter(CacheBatches(cache, 8, shuffle=False)))["teacher_cache"]
    assert full["hidden"][2] is not None
    logits_only = CacheBatches(cache, 8, shuffle=False, features={("logits", None)})
    batch = next(iter(logits_only))["teacher_cache"]
    assert "hidden" not in batch and torch.equal(batch["logits"], full["logits"])
    assert not any("hidden" in c for c in logits_only._needed[0])  # the columns are not even read
    hidden = next(iter(CacheBatches(cache, 8, shuffle=False, features={("hidden", 2)})))["teacher_cache"]
    assert "logits" not in hidden and torch.equal(hidden["hidden"][2], full["hidden"][2])


def test_a_worker_sends_each_batch_as_one_shared_block(cache):
    """One shared-memory segment per batch (not one per tensor), with the values the main process makes."""
    ds = CacheBatches(cache, 8, seed=4, buffer_size=12, num_workers=1)
    expected = [ds._collate(rows, {}) for _, rows in ds.plan(0)]
    got = list(CacheLoader(ds, num_workers=1))
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        tensors = [a["student"]["input_ids"], a["student"]["attention_mask"], a["student"]["labels"],
                   a["teacher_cache"]["logits"], a["teacher_cache"]["hidden"][2]]
        assert len({t.untyped_storage().data_ptr() for t in tensors}) == 1 and tensors[0].is_shared()
        assert a["ids"] == b["ids"]
        for key in ("input_ids", "attention_mask", "labels"):
            assert torch.equal(a["student"][key], b["student"][key])
        assert torch.equal(a["teacher_cache"]["logits"], b["teacher_cache"]["logits"])
        assert torch.equal(a["teacher_cache"]["hidden"][2], b["teacher_cache"]["hidden"][2])
