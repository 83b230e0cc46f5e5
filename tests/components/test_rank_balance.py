"""Ranks get balanced work: record batches are dealt in snake order, so a length-sorted cache gives every rank
long and short rows alike (tokens per rank within 10 %), every row is read by exactly one rank, and one process
plans exactly as before."""
import numpy as np
import pytest

from cachebrew.components.loader import CacheBatches, RankShare, deal_ranges, record_batch_ranges


@pytest.mark.parametrize("sizes", [[[5, 7, 3], [8, 8], [2]],               # fewer record batches than 4 a rank
                                   [[7, 3, 9, 4] * 5, [6, 2, 8, 5] * 5]])  # 40, of uneven sizes
def test_deal_ranges_cover_every_row_once_with_equal_counts(sizes):
    ranges = record_batch_ranges(sizes)
    n = int(ranges[-1, 1])
    assert np.array_equal(deal_ranges(ranges, 0, 1), ranges)
    for world in (2, 3, 4, 5):
        shares = [deal_ranges(ranges, r, world) for r in range(world)]
        rows = [np.concatenate([np.arange(a, b) for a, b in share]) for share in shares]
        assert sorted(np.concatenate(rows).tolist()) == list(range(n)), world
        counts = [len(r) for r in rows]
        assert counts == [n * (r + 1) // world - n * r // world for r in range(world)], (world, counts)
        if len(ranges) >= 4 * world:  # whole record batches dealt: at most world - 1 of them cut between ranks
            assert sum(len(share) for share in shares) - len(ranges) <= world - 1


@pytest.fixture(scope="module")
def sorted_cache(tmp_path_factory):
    """256 rows of 3-14 words, stored longest-first in one window, record batches of 8 rows."""
    from cachebrew.recipes.export import ExportConfig, run_export
    from fixtures import export_config, make_teacher_dir, make_text_data

    root = tmp_path_factory.mktemp("balance")
    cfg = export_config(root, make_teacher_dir(root / "teacher"), make_text_data(root / "data.jsonl", n=256),
                        shard_rows=64, record_batch_rows=8, batch_size=16, sort_window=16,
                        outputs={"hidden_layers": [], "attention_layers": []})
    run_export(ExportConfig.from_dict(cfg))
    return root / "cache"


@pytest.mark.parametrize("world", [2, 3])
def test_tokens_per_rank_balance_on_a_length_sorted_cache(sorted_cache, world):
    tokens = []
    for rank in range(world):
        ds = CacheBatches(str(sorted_cache), 8, seed=0, ranks=RankShare(rank, world, "records"))
        tokens.append(sum(int(b["student"]["attention_mask"].sum()) for b in ds))
    assert max(tokens) <= 1.1 * min(tokens), tokens
    # the contiguous split it replaces: rank 0 took the first (longest) rows
    lengths = [int(b["student"]["attention_mask"].sum()) for b in CacheBatches(str(sorted_cache), 1, shuffle=False)]
    n = len(lengths)
    contiguous = [sum(lengths[n * r // world:n * (r + 1) // world]) for r in range(world)]
    assert max(contiguous) > 1.1 * min(contiguous), contiguous  # the cache is sorted: the old split was unbalanced


@pytest.mark.parametrize("world", [2, 3])
def test_split_batches_partition_the_one_process_batches_with_balanced_tokens(sorted_cache, world):
    """RankShare.split='batch': at every step the ranks' rows are exactly one process's batch at batch_size x ranks,
    each rank with the same row count (±1 in an epoch's last batch) and, over the epoch, tokens within 10 % of the others (the length-sorted
    cache's contiguous split gave 12-15 vs 6-9 tokens a row); at each step, within one row's length."""
    one = [sorted(b["ids"]) for b in CacheBatches(str(sorted_cache), 4 * world, seed=5, buffer_size=32)]
    ranks = [list(CacheBatches(str(sorted_cache), 4, seed=5, buffer_size=32, ranks=RankShare(r, world)))
             for r in range(world)]
    assert all(len(r) == len(one) for r in ranks)
    totals = [0] * world
    for step, batch in enumerate(one):
        parts = [r[step] for r in ranks]
        assert sorted(i for p in parts for i in p["ids"]) == batch
        tokens = [int(p["student"]["attention_mask"].sum()) for p in parts]
        longest = max(int(p["student"]["attention_mask"].sum(1).max()) for p in parts)
        rows = [len(p["ids"]) for p in parts]
        assert max(rows) - min(rows) <= 1 and max(tokens) - min(tokens) <= longest, (step, rows, tokens)
        totals = [t + n for t, n in zip(totals, tokens)]
    assert max(totals) <= 1.1 * min(totals), totals
