"""Bytes per token of dense, top-k and sampled logit caches at LLM vocabularies, and what drawing them costs.

    python benchmarks/sparse_logits.py [--vocab 32000 128000] [--tokens 2048] [--json out.json]

Each option is written exactly as `cachebrew export` writes it (TensorSpec -> cut_batch -> encode_cut -> an
Arrow IPC stream with the default lz4 codec), for the same synthetic token-level teacher logits: Zipf-shaped
(logit of the r-th most likely token = -1.5 ln r + noise, ranks shuffled per position), rows of 128 tokens.
Bytes count the logits columns only (ids and masses for sparse options); "ms / 1k tokens" is the time of
cut_batch on this CPU (softmax, top-k or inverse-CDF draws, merging), one thread.
"""
import argparse
import io
import json
import time
from pathlib import Path

import pyarrow as pa
import torch


def teacher_logits(rows, length, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = rows * length
    ranked = -1.5 * torch.log(torch.arange(1, vocab + 1, dtype=torch.float32)) + 0.3 * torch.randn(n, vocab, generator=g)
    perm = torch.argsort(torch.rand(n, vocab, generator=g), dim=-1)
    return torch.empty_like(ranked).scatter_(1, perm, ranked).view(rows, length, vocab)


def encoded_bytes(spec, logits, lengths, keys):
    from cachebrew.cache.format import cut_batch, encode_cut

    t = time.perf_counter()
    cut = cut_batch(spec, logits, lengths, keys)
    seconds = time.perf_counter() - t
    arrays = encode_cut(spec, cut, lengths)
    table = pa.table(arrays)
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema, options=pa.ipc.IpcWriteOptions(compression="lz4")) as w:
        w.write_table(table)
    return len(sink.getvalue()), seconds


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--vocab", type=int, nargs="+", default=[32000, 128000])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    from cachebrew.cache.format import TensorSpec
    from cachebrew.cache.sparse import row_key

    length = 128
    rows = max(1, args.tokens // length)
    lengths = [length] * rows
    keys = [row_key(f"r{i}", 0) for i in range(rows)]
    results = []
    for vocab in args.vocab:
        logits = teacher_logits(rows, length, vocab)
        options = [("dense fp16", dict(dtype="fp16")), ("dense bf16", dict(dtype="bf16"))]
        for k in (12, 64):
            options += [(f"topk k={k}", dict(dtype="fp16", extra={"sparse": "topk", "k": k, "temperature": 1.0})),
                        (f"sampled k={k}", dict(dtype="fp16", extra={"sparse": "sampled", "k": k,
                                                                      "temperature": 1.0, "seed": 0}))]
        tail = None
        for name, kw in options:
            spec = TensorSpec("t", "logits", None, kw["dtype"], ["L", vocab], None, kw.get("extra", {}))
            nbytes, seconds = encoded_bytes(spec, logits, lengths, keys)
            row = {"vocab": vocab, "option": name, "bytes_per_token": nbytes / (rows * length),
                   "ms_per_1k_tokens": 1000 * seconds / (rows * length) * 1000}
            if name.startswith("topk"):
                from cachebrew.cache.sparse import sparse_targets

                _, mass = sparse_targets(logits.view(-1, vocab), "topk", spec.slots)
                tail = row["tail_mass"] = float(1 - mass.sum(-1).mean())
            results.append(row)
            print(f"vocab {vocab:>7,}  {name:<14} {row['bytes_per_token']:>10,.1f} B/token  "
                  f"{row['ms_per_1k_tokens']:>8.1f} ms / 1k tokens"
                  + (f"  (top-k leaves {tail:.1%} of the mass)" if name.startswith("topk") else ""), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
