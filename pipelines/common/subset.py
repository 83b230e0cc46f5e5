"""prepare-data stage: copy a corpus' splits into the pipeline, the train split cut to --train-size rows.

    python ../common/subset.py ../../data/rotten_tomatoes data --train-size 3000 [--eval-size 500]

A size of `all` (or none given) keeps the whole split.
"""
import argparse
from pathlib import Path

import pyarrow.parquet as pq


def size(text: str) -> int | None:
    if text == "all":
        return None
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"a size must be >= 1 or `all`, got {text}")
    return value


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("source")
    ap.add_argument("out")
    ap.add_argument("--train-size", type=size, default=None, help="rows of train to keep, or `all`")
    ap.add_argument("--eval-size", type=size, default=None, help="rows of dev and of test to keep, or `all`")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "dev", "test"):
        table = pq.read_table(Path(args.source) / f"{split}.parquet")
        limit = args.train_size if split == "train" else args.eval_size
        if limit is not None:
            table = table.slice(0, min(limit, table.num_rows))  # splits are pre-shuffled: a prefix is a sample
        pq.write_table(table, out / f"{split}.parquet", compression="zstd")
        print(f"{split}: {table.num_rows} rows")


if __name__ == "__main__":
    main()
