"""Cache reader throughput and memory: decoded batches per second, GB/s, and scaling with cache size.

    python benchmarks/reader.py [--sizes 10000 100000 1000000] [--workers 0 2] [--json out.json]

Synthetic caches in the exact on-disk format (Arrow shards with the default codec, lz4, + manifest, written by cachebrew's
ShardWriter, 8,192-row shards of 256-row record batches as `export` writes them by default), so sizes up to 1M rows
cost seconds, not a teacher run:
  hidden   rows of ~32 tokens (12..52), logits fp32 [3] + 4 hidden layers fp16 [L, 256]  (the distill case)
  logits   the same rows, logits only (for the 10k -> 1M scaling; memory must stay flat)
Each measurement iterates one shuffled epoch of CacheBatches (batch 32, shuffle buffer 2048), in the main
process (workers 0) or in DataLoader worker processes, in a fresh child process whose peak RSS is reported.
GB/s counts shard bytes on disk; "decoded" counts the padded tensors handed to the trainer.
"""
import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa


def make_cache(path: Path, rows: int, hidden_layers: int, width: int = 256, shard_rows: int = 8192,
               batch_rows: int = 256, seed: int = 0):
    from cachebrew.cache.format import ATTENTION_MASK, COPY, ID, INPUT_IDS, LABELS, TASK, TensorSpec, _list_array
    from cachebrew.cache.manifest import Manifest
    from cachebrew.cache.shards import ShardWriter

    rng = np.random.default_rng(seed)
    specs = [TensorSpec("t", "logits", None, "fp32", [3])]
    specs += [TensorSpec("t", "hidden", layer, "fp16", ["L", width]) for layer in range(hidden_layers)]
    fields = [pa.field(ID, pa.string()), pa.field(COPY, pa.int32()), pa.field(TASK, pa.string()),
              pa.field(INPUT_IDS, pa.list_(pa.int32())), pa.field(ATTENTION_MASK, pa.list_(pa.int8())),
              pa.field(LABELS, pa.int64())]
    for s in specs:
        fields += s.arrow_fields()
    schema = pa.schema(fields)
    fingerprint = f"synthetic-{rows}-{hidden_layers}-{seed}"
    infos = []
    for shard, start in enumerate(range(0, rows, shard_rows)):
        n_shard = min(shard_rows, rows - start)
        with ShardWriter(path, shard, schema, {"fingerprint": fingerprint, "format_version": 1,
                                               "first_row": start}) as w:
            for b in range(0, n_shard, batch_rows):
                n = min(batch_rows, n_shard - b)
                lengths = rng.integers(12, 53, n)
                ids = [rng.integers(5, 30000, k, dtype=np.int32) for k in lengths]
                cols = {ID: pa.array([f"ex{start + b + i}" for i in range(n)]), COPY: pa.array(np.zeros(n, np.int32)),
                        TASK: pa.array(["bench"] * n), INPUT_IDS: _list_array(ids, pa.int32()),
                        ATTENTION_MASK: _list_array([np.ones(k, np.int8) for k in lengths], pa.int8()),
                        LABELS: pa.array(rng.integers(0, 3, n))}
                cols["t.logits"] = _list_array([rng.standard_normal(3, dtype=np.float32) for _ in range(n)],
                                               pa.float32())
                for s in specs[1:]:
                    cols[s.column] = _list_array([rng.standard_normal((k, width), dtype=np.float32).astype(np.float16)
                                                  for k in lengths], pa.float16())
                w.write(pa.RecordBatch.from_arrays([cols[f.name] for f in schema], schema=schema))
        infos.append(w.info)
    Manifest(fingerprint=fingerprint, fingerprint_inputs={"dataset": fingerprint}, tensors=specs,
             columns={f.name: str(f.type) for f in schema}, teachers={"t": {"weights_sha256": "0" * 64}},
             shards=infos, tasks={"bench": rows}, config={}, token_level=False, label_names=["a", "b", "c"],
             num_examples=rows, created=datetime.now(timezone.utc).isoformat()).write(path)


def measure(path: str, workers: int, batch: int = 32) -> dict:
    """One shuffled epoch; runs in a child process so peak RSS belongs to this measurement alone."""
    import torch

    from cachebrew.components.loader import CacheBatches, CacheLoader

    torch.set_num_threads(1)
    ds = CacheBatches(path, batch, shuffle=True, seed=0, buffer_size=2048)
    loader = CacheLoader(ds, num_workers=workers)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    rows = decoded = 0
    for b in loader:
        rows += len(b["ids"])
        decoded += sum(v.numel() * v.element_size() for v in b["student"].values())
        cache = b["teacher_cache"]
        decoded += cache["logits"].numel() * 4 + sum(h.numel() * h.element_size() for h in cache.get("hidden", []))
    seconds = time.perf_counter() - t
    disk = ds.joined.manifest.num_bytes
    return {"rows": rows, "seconds": seconds, "rows_per_s": rows / seconds, "batches_per_s": len(ds) / seconds,
            "disk_gb_per_s": disk / seconds / 1e9, "decoded_gb_per_s": decoded / seconds / 1e9,
            "disk_bytes": disk, "rss_before_mib": rss0 / 1024,
            # the main process, or the largest loader worker when there are workers
            "peak_rss_mib": max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                                resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1024}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="*", default=[10_000, 100_000, 1_000_000],
                    help="logits-only cache sizes (none: only the hidden cache)")
    ap.add_argument("--hidden-rows", type=int, default=20_000)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--record-batch-rows", type=int, default=256, help="export's record_batch_rows (before: 32)")
    ap.add_argument("--rounds", type=int, default=1, help="interleaved rounds per worker count (medians reported)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--measure", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure[0], int(args.measure[1]))))
        return
    tmp = Path(tempfile.mkdtemp(prefix="cb-reader-bench-"))

    def child(path, workers):
        # stderr is not captured: a failing child's traceback lands in this process's stderr (the step's log)
        run = subprocess.run([sys.executable, __file__, "--measure", str(path), str(workers)],
                             stdout=subprocess.PIPE, text=True)
        if run.returncode:
            raise SystemExit(f"reader measurement ({path.name}, {workers} workers): child exited {run.returncode} "
                             f"(traceback above)")
        return json.loads(run.stdout.strip().splitlines()[-1])

    results = []
    try:
        cases = [("hidden", args.hidden_rows, 4)] + [("logits", n, 0) for n in args.sizes]
        for kind, n, layers in cases:
            path = tmp / f"{kind}-{n}"
            t = time.perf_counter()
            make_cache(path, n, layers, batch_rows=args.record_batch_rows)
            made = time.perf_counter() - t
            runs = {w: [] for w in args.workers}
            for _ in range(args.rounds):  # interleaved: this machine's speed drifts between minutes
                for w in args.workers:
                    runs[w].append(child(path, w))
            for w in args.workers:
                rates = sorted(x["rows_per_s"] for x in runs[w])
                r = {"cache": kind, "rows_in_cache": n, "workers": w, "record_batch_rows": args.record_batch_rows,
                     **sorted(runs[w], key=lambda x: x["rows_per_s"])[len(rates) // 2], "rounds": len(rates),
                     "rows_per_s_all": rates, "rows_per_s_rounds": [x["rows_per_s"] for x in runs[w]]}
                results.append(r)
                print(f"{kind:<7} {n:>9,} rows  workers {w}  {r['rows_per_s']:>9,.0f} rows/s "
                      f"(rounds {', '.join(f'{x:,.0f}' for x in rates)})  {r['batches_per_s']:>7,.1f} batches/s  "
                      f"disk {r['disk_gb_per_s']:.3f} GB/s  decoded {r['decoded_gb_per_s']:.3f} GB/s  "
                      f"peak RSS {r['peak_rss_mib']:,.0f} MiB (cache {r['disk_bytes'] / 2**20:,.0f} MiB, "
                      f"built in {made:.0f} s)", flush=True)
            if 1 in runs and 2 in runs:
                ratios = sorted(b["rows_per_s"] / a["rows_per_s"] for a, b in zip(runs[1], runs[2]))
                print(f"{kind:<7} 2 workers / 1 worker: median {ratios[len(ratios) // 2]:.2f} "
                      f"(per round {', '.join(f'{x:.2f}' for x in ratios)})", flush=True)
            shutil.rmtree(path)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
