"""Bytes per example of each cache storage option, against the naive padded fp32 layout.

    python benchmarks/cache_size.py [--examples 512] [--json out.json]

Exports the same data with a BERT-style teacher (6 layers, hidden 256, seq up to 128, 4 hidden layers
+ 1 attention layer) once per option and reports on-disk bytes/example and the compression ratio
against storing every tensor padded to max_length in float32 (what a naive `torch.save` of padded
batches costs). Accuracy cost of each option is measured on a real task by the pipelines (issue 5).
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
    ap.add_argument("--json", type=str, default=None)
    args = ap.parse_args()
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    from cachebrew.cache import CacheReader
    from cachebrew.recipes.export import ExportConfig, run_export
    from fixtures import WORDS, write_vocab

    tmp = Path(tempfile.mkdtemp())
    teacher = tmp / "teacher"
    teacher.mkdir()
    vocab = write_vocab(teacher / "vocab.txt")
    BertTokenizerFast(vocab=str(teacher / "vocab.txt")).save_pretrained(str(teacher))
    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig(vocab_size=vocab, hidden_size=256, num_hidden_layers=6,
                                             num_attention_heads=4, intermediate_size=512, num_labels=6,
                                             max_position_embeddings=160)).save_pretrained(str(teacher))
    rng = random.Random(0)
    lengths = []
    with open(tmp / "data.jsonl", "w") as f:
        for i in range(args.examples):
            n = min(int(rng.lognormvariate(3.0, 0.6)), 120)  # skewed lengths, like real sentences
            f.write(json.dumps({"text": " ".join(rng.choices(WORDS, k=max(n, 2))), "label": rng.randrange(6)}) + "\n")
    max_len, hidden, heads, layers = 128, 256, 4, [0, 2, 4, 6]
    options = {
        "fp32": {"logits": "fp32", "hidden": "fp32", "attention": "fp32"},
        "fp16": {"logits": "fp16", "hidden": "fp16", "attention": "fp16"},
        "bf16": {"logits": "bf16", "hidden": "bf16", "attention": "bf16"},
        "int8 hidden + fp16": {"logits": "fp16", "hidden": "int8", "attention": "fp16"},
    }
    results = []
    for name, dtypes in options.items():
        cfg = ExportConfig.from_dict({
            "output": str(tmp / name.replace(" ", "_")), "teachers": [{"name": "t", "path": str(teacher)}],
            "data": {"path": str(tmp / "data.jsonl")}, "max_length": max_len, "batch_size": 32,
            "outputs": {"hidden_layers": layers, "attention_layers": [5]}, "dtypes": dtypes, "progress_bar": False})
        t = time.perf_counter()
        run_export(cfg)
        m = CacheReader(cfg.output).manifest
        lengths = [len(r["input_ids"]) for r in CacheReader(cfg.output).iter_rows()] if not lengths else lengths
        results.append({"option": name, "bytes_per_example": m.num_bytes / m.num_rows,
                        "seconds": time.perf_counter() - t})
    naive = 4 * (6 + len(layers) * max_len * hidden + heads * max_len * max_len) + 2 * 8 * max_len
    mean_len = sum(lengths) / len(lengths)
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
