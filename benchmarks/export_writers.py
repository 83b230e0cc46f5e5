"""How fast `cachebrew export`'s shard writers turn teacher outputs into shards on disk, with 1, 2, 4 writer threads.

    python benchmarks/export_writers.py [--writers 1 2 4] [--rows 2048] [--repeats 3] [--form cut|padded] [--dir D]

The writers alone, fed as fast as Python can hand them batches: no teacher runs, so the rate is the ceiling the
writing puts on an export whose teachers are faster (a GPU's). The batches are what the recipe's batch loop hands
the writers, made up once before timing and handed out again and again: 32 rows of 12-128 tokens (uniform),
sequence logits (2 classes, fp32) and 4 hidden layers of width 768 stored as fp16, about 0.4 MB per row.
--form cut: the tensors already cut to the rows' lengths and cast (what a GPU export copies to the host);
--form padded: padded fp32 tensors, cut and cast on the writer threads (what a CPU export hands them).
Shards of 256 rows, record batches of 256 rows (the default: 8 teacher batches merged per record batch), lz4,
written with `ShardWriters` exactly as the export writes them (temp file, sha256 on the way, fsync, rename), in
--dir (default: a temporary directory, deleted after each run). Rounds are interleaved (1, 2, 4, 1, 2, 4, ...);
each cell is the median over rounds with the range. MiB/s counts the shard bytes on disk. Before and after the
rounds, sha256 on 1, 2 and 4 threads at once shows how much CPU the machine gives extra threads at the time (on a
shared machine, what more writers can get at all).
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

from cachebrew.cache.format import INPUT_IDS, FORMAT_VERSION, TensorSpec
from cachebrew.recipes.export import recipe


@dataclass
class Row:
    id: str
    copy: int
    text: str
    text_pair: str | None = None
    words: list | None = None


def make_batches(args, specs) -> list[tuple]:
    """A pool of distinct batches (rows, tokens, tensors) in the form the batch loop hands the writers."""
    rng = random.Random(0)
    torch.manual_seed(0)
    pool = []
    for b in range(args.pool):
        lengths = [rng.randint(12, args.max_length) for _ in range(args.batch_size)]
        rows = [Row(f"ex{b:03d}-{i:03d}", 0, " ".join(["word"] * (n - 2))) for i, n in enumerate(lengths)]
        tokens = [{INPUT_IDS: [rng.randrange(30000) for _ in range(n)], "attention_mask": [1] * n,
                   "token_type_ids": [0] * n, "labels": rng.randrange(2)} for n in lengths]
        tensors = {}
        for spec in specs:
            if spec.kind == "logits":
                tensors[spec.column] = {"values": torch.randn(len(lengths), 2)} if args.form == "cut" else \
                    torch.randn(len(lengths), 2)
            elif args.form == "cut":
                tensors[spec.column] = {"values": torch.randn(sum(lengths), args.hidden).to(torch.float16)}
            else:
                tensors[spec.column] = torch.randn(len(lengths), max(lengths), args.hidden)
        pool.append((rows, tokens, tensors))
    return pool


def run_once(args, writers: int, specs, schema, pool, out: Path) -> dict:
    """Every shard of the plan through `writers` threads; (seconds, bytes on disk)."""
    n_shards = args.rows // args.shard_rows
    per_shard = args.shard_rows // args.batch_size
    shards = {s: list(range(per_shard)) for s in range(n_shards)}
    meta = {"fingerprint": "benchmark", "format_version": FORMAT_VERSION}
    t0 = time.perf_counter()
    k = 0
    with recipe.ShardWriters(out, schema, meta, specs, writers=writers, record_batch_rows=args.record_batch_rows,
                             compression="lz4") as pool_writers:
        for slot, s, j, last in recipe.deal_batches(list(shards), shards, writers):
            if j == 0:
                pool_writers.put(slot, ("open", s, s * args.shard_rows))
            rows, tokens, tensors = pool[k % len(pool)]
            k += 1
            pool_writers.put(slot, ("rows", rows, tokens, tensors, "bench", None))
            if last:
                pool_writers.put(slot, ("close", s))
        infos = pool_writers.finish()
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "bytes": sum(i.bytes for i in infos), "shards": len(infos)}


def cores_free() -> str:
    """sha256 of 256 MB on 1, 2 and 4 threads at once (hashlib releases the GIL): how much CPU the writers can get
    on this machine right now, beside whatever else runs on it."""
    import hashlib
    import threading

    data = bytes(256 * 2**20)
    rates = {}
    for n in (1, 2, 4):
        threads = [threading.Thread(target=lambda: hashlib.sha256(data).digest()) for _ in range(n)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        rates[n] = n * len(data) / 2**20 / (time.perf_counter() - t0)
    return ", ".join(f"{n} thread{'s' if n > 1 else ''} {r:.0f} MiB/s (×{r / rates[1]:.2f})" for n, r in rates.items())


def n_bytes(results: dict) -> int:
    return next(iter(results.values()))[0]["bytes"]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--writers", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--rows", type=int, default=2048)
    p.add_argument("--shard-rows", type=int, default=256)
    p.add_argument("--record-batch-rows", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--pool", type=int, default=8, help="distinct batches made up front and handed out in turn")
    p.add_argument("--form", choices=("cut", "padded"), default="cut")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dir", default=None, help="where the shards go (default: a temporary directory)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    specs = [TensorSpec("t", "logits", None, "fp32", [2])] + [
        TensorSpec("t", "hidden", layer, "fp16", ["L", args.hidden]) for layer in range(args.layers)]
    pool = make_batches(args, specs)
    cfg = SimpleNamespace(data=SimpleNamespace(text_pair=None))
    schema = recipe._schema(cfg, pool[0][1], specs, token_level=False)
    print(f"sha256 on this machine now: {cores_free()}", flush=True)
    base = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="cb-writers-"))
    results = {n: [] for n in args.writers}
    for r in range(args.repeats):
        for n in args.writers:
            out = base / f"run-{n}"
            shutil.rmtree(out, ignore_errors=True)
            res = run_once(args, n, specs, schema, pool, out)
            res["mib_s"] = res["bytes"] / 2**20 / res["seconds"]
            results[n].append(res)
            print(f"round {r + 1} writers {n}: {res['bytes'] / 2**20:.0f} MiB in {res['seconds']:.2f} s = "
                  f"{res['mib_s']:.0f} MiB/s", flush=True)
            shutil.rmtree(out, ignore_errors=True)
    if not args.dir:
        shutil.rmtree(base, ignore_errors=True)
    print(f"sha256 on this machine after the rounds: {cores_free()}")
    print(f"\n--form {args.form}: {args.rows} rows, {n_bytes(results) / 2**20:.0f} MiB of shards per run")
    print(f"| writers | MiB/s (median) | range over {args.repeats} rounds | seconds (median) | × 1 writer |")
    print("|---:|---:|---:|---:|---:|")
    one = statistics.median(x["mib_s"] for x in results[args.writers[0]])
    for n in args.writers:
        rates = [x["mib_s"] for x in results[n]]
        med = statistics.median(rates)
        print(f"| {n} | {med:.0f} | {min(rates):.0f}–{max(rates):.0f} | "
              f"{statistics.median(x['seconds'] for x in results[n]):.2f} | {med / one:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": {str(k): v for k, v in results.items()}},
                                              indent=1))


if __name__ == "__main__":
    sys.exit(main())
