"""`cachebrew export` throughput against the bare teacher forward pass, per output configuration.

    python benchmarks/export_throughput.py [--examples 1024] [--device cpu|cuda] [--json out.json]

Measured side by side in this one run, on the same teacher, data and batches:
  bare      the teacher's forward pass in inference mode over the same length-sorted batches, outputs
            dropped (the limit: what export would cost if writing were free)
  export    run_export end to end: tokenized plan -> teacher forward -> encode -> Arrow shards (default codec, lz4) on disk
ratio = export ex/s ÷ bare ex/s (target >= 0.9), end to end (loading teachers, hashing their weights,
tokenizing: fixed costs a small benchmark magnifies) and marginal: (rows of the full run − rows of a
half-size run) ÷ (the difference of their times), the rate a large export converges to. Configurations: logits only; logits + 4 hidden layers;
logits + hidden + attention; 3 teachers (logits + 4 hidden each); a causal LM (GPT-2 of the same size, vocabulary
32,000) with 16 sampled or top-16 slots per token (issue 15: the sampling must not dominate; the bare forward
computes the same vocabulary-wide logits). On CPU the teachers are 6x256 (--toy: 3x64 with a 4,096 vocabulary, the
smoke run's size); with --device cuda BERT-base (12x768) and its GPT-2 twin, seq 128.
Precision (--precision, default bf16 on CUDA, fp32 on CPU) is one setting for both sides: export's `amp` and the
bare forward's autocast, with the same process-wide TF32 switches (suite_timing.py). The bare forward is timed
with CUDA events on a GPU (after a whole warm-up pass), export end to end by the wall clock (it ends with its
shards on disk). Configurations that store hidden states or attention run on at most --hidden-examples rows
(BERT-base hidden states are ~786 KB per row at seq 128: 64k rows would be 51 GB of shards); each cache is
deleted as soon as it is timed, so one is on disk at a time. The 6x256 GPT-2 is the worst case for the sampling: its 32k-wide
head is 64 % of its forward's multiply-adds, so the per-token vocabulary work weighs most; the configuration
"causal LM, GPT-2 small shape" (12x768, vocabulary 50,257, random weights) has the proportions of a real one. Each configuration runs in its own child process,
whose peak RSS is reported (one process across configurations could only report the largest so far).
"""
import argparse
import json
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from suite_timing import PRECISIONS, apply_precision, autocast, default_precision, describe_precision  # noqa: E402


def build(args, tmp: Path):
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    from fixtures import WORDS, write_vocab

    gpu = args.device == "cuda"
    if args.toy:  # the smoke run's size: checks the code path, measures nothing
        cfg = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=2, intermediate_size=128)
    elif gpu:
        cfg = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
    else:
        cfg = dict(hidden_size=256, num_hidden_layers=6, num_attention_heads=4, intermediate_size=1024)
    teachers = []
    for t in range(3):
        d = tmp / f"teacher{t}"
        d.mkdir()
        vocab = write_vocab(d / "vocab.txt")
        BertTokenizerFast(vocab=str(d / "vocab.txt")).save_pretrained(str(d))
        torch.manual_seed(t)
        BertForSequenceClassification(BertConfig(vocab_size=vocab, num_labels=3, max_position_embeddings=160,
                                                 attn_implementation="eager", **cfg)).save_pretrained(str(d))
        teachers.append(d)
    from transformers import GPT2Config, GPT2LMHeadModel

    d = tmp / "causal"
    d.mkdir()
    write_vocab(d / "vocab.txt")
    BertTokenizerFast(vocab=str(d / "vocab.txt")).save_pretrained(str(d))
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=4096 if args.toy else CAUSAL_VOCAB, n_positions=160, n_embd=cfg["hidden_size"], bos_token_id=None,
                               eos_token_id=None,
                               n_layer=cfg["num_hidden_layers"], n_head=cfg["num_attention_heads"])).save_pretrained(str(d))
    if SMALL in args.configs:  # 500 MB of weights: only when asked for
        torch.manual_seed(1)
        d = tmp / "causal_small"
        d.mkdir()
        write_vocab(d / "vocab.txt")
        BertTokenizerFast(vocab=str(d / "vocab.txt")).save_pretrained(str(d))
        GPT2LMHeadModel(GPT2Config(vocab_size=50_257, n_positions=160, n_embd=768, n_layer=12, n_head=12,
                                   bos_token_id=None, eos_token_id=None)).save_pretrained(str(d))
    rng = random.Random(0)
    lines = []
    for i in range(args.examples):
        n = args.seq if gpu else rng.randint(12, 60)
        lines.append(json.dumps({"id": f"ex{i}", "text": " ".join(rng.choices(WORDS, k=n)), "label": i % 3}) + "\n")
    for rows in {args.examples, hidden_rows(args)}:  # the full and a half-size run (for the marginal rate)
        (tmp / f"train-{rows}.jsonl").write_text("".join(lines[:rows]))
        (tmp / f"half-{rows}.jsonl").write_text("".join(lines[:rows // 2]))
    return teachers, cfg["num_hidden_layers"]


def hidden_rows(args) -> int:
    """Rows for the configurations that store hidden states or attention (their shards' size on disk)."""
    return min(args.examples, args.hidden_examples or args.examples)


def export_config(args, tmp, teachers, outputs, name, data):
    causal = teachers[0].name.startswith("causal")
    return {"output": str(tmp / "caches" / name), "task": "bench",
            "teachers": [{"name": f"t{i}", "path": str(t), **({"model_class": "AutoModelForCausalLM"} if causal else {})}
                         for i, t in enumerate(teachers)],
            "data": {"path": str(tmp / data), "text": "text", "label": None if causal else "label", "id": "id"},
            "max_length": args.seq, "outputs": outputs, "batch_size": args.batch, "shard_rows": 1024,
            "dtypes": {"logits": "fp32", "hidden": "fp16", "attention": "fp16"},
            "amp": "bf16" if args.precision == "bf16" else "none", "device": args.device, "progress_bar": False}


def bare_forward(args, cfg_dict):
    """The same plan and batches as export, teacher forward only (inference mode, the same autocast); rows/s."""
    from cachebrew.recipes.export import ExportConfig
    from cachebrew.components.data import build_rows, label_vocabulary, load_table, sorted_order, tokenize_rows
    from cachebrew.components.data import pad_batch
    from cachebrew.recipes.export.teachers import forward, load_teacher, load_tokenizer

    cfg = ExportConfig.from_dict(cfg_dict)
    device = torch.device(args.device)
    ds = load_table(cfg.data)
    loaded = [load_teacher(tc, i, bool(cfg.outputs.attention_layers)) for i, tc in enumerate(cfg.teachers)]
    tokenizer, _ = load_tokenizer(cfg, [tok for _, tok in loaded])
    rows = build_rows(ds, cfg.data, cfg.augment, "[MASK]")
    _, label_map = label_vocabulary(ds[cfg.data.label] if cfg.data.label else [],
                                    getattr(loaded[0][0].config, "label2id", None))
    tokens = tokenize_rows(rows, tokenizer, cfg.max_length, label_map, False)
    order = sorted_order([len(t["input_ids"]) for t in tokens], cfg.sort_window * cfg.batch_size)
    models = [m.to(device) for m, _ in loaded]
    cuda = device.type == "cuda"
    if cuda:  # the GPU stream's time from the first batch to the last (host stalls included: they idle the GPU)
        start_event, end_event = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start_event.record()
    t = time.perf_counter()
    with torch.inference_mode(), autocast(args.precision, device):
        for start in range(0, len(order), cfg.batch_size):
            batch = {k: v.to(device) for k, v in pad_batch([tokens[i] for i in order[start:start + cfg.batch_size]], tokenizer.pad_token_id, labels=False).items()}
            for m in models:
                forward(m, batch, cfg)
    if cuda:
        end_event.record()
        end_event.synchronize()
        return len(order) / (start_event.elapsed_time(end_event) / 1e3)
    return len(order) / (time.perf_counter() - t)


SMALL = "causal LM, GPT-2 small shape, sampled 16"
CONFIGS = ["logits only", "logits + 4 hidden", "logits + hidden + attention", "3 teachers (logits + 4 hidden)",
           "causal LM, sampled 16", "causal LM, top-16", SMALL]
DEFAULT_CONFIGS = CONFIGS[:-1]
CAUSAL_VOCAB = 32_000


def configs(teachers, L, causal):
    hidden = [0, L // 3, 2 * L // 3, L]
    sparse = lambda method: {"logits": True, "hidden_layers": [], "attention_layers": [],
                             "sparse_logits": {"method": method, "k": 16, "temperature": 1.0, "seed": 0}}
    return {
        "causal LM, sampled 16": ([causal], sparse("sampled")),
        "causal LM, top-16": ([causal], sparse("topk")),
        SMALL: ([causal.parent / "causal_small"], sparse("sampled")),
        "logits only": (teachers[:1], {"logits": True, "hidden_layers": [], "attention_layers": []}),
        "logits + 4 hidden": (teachers[:1], {"logits": True, "hidden_layers": hidden, "attention_layers": []}),
        "logits + hidden + attention": (teachers[:1], {"logits": True, "hidden_layers": hidden,
                                                       "attention_layers": [L // 2, L - 1]}),
        "3 teachers (logits + 4 hidden)": (teachers, {"logits": True, "hidden_layers": hidden,
                                                      "attention_layers": []}),
    }


def measure(args, tmp: Path, name: str) -> dict:
    """One configuration, all its rounds, in this (fresh) process: its peak RSS is this configuration's alone."""
    from cachebrew.recipes.export import ExportConfig, run_export

    apply_precision(args.precision)
    L = int((tmp / "layers").read_text())
    teachers = sorted(tmp.glob("teacher*"))
    ts, outputs = configs(teachers, L, tmp / "causal")[name]
    rows = hidden_rows(args) if outputs.get("hidden_layers") or outputs.get("attention_layers") else args.examples
    cfg = export_config(args, tmp, ts, outputs, "".join(c if c.isalnum() else "_" for c in name), f"train-{rows}.jsonl")
    bare_forward(args, cfg)  # warm-up: a whole pass (allocator, kernels, cuBLAS handles, file cache), not timed
    rounds = []
    sync = torch.cuda.synchronize if torch.device(args.device).type == "cuda" else (lambda: None)
    for _ in range(args.repeats):  # interleaved: bare, half export, full export, and again
        bare = bare_forward(args, cfg)
        timings = {}
        for data in (f"half-{rows}.jsonl", f"train-{rows}.jsonl"):
            c = export_config(args, tmp, ts, outputs, f"run-{data[:4]}", data)
            shutil.rmtree(c["output"], ignore_errors=True)
            sync()
            t = time.perf_counter()
            result = run_export(ExportConfig.from_dict(c))
            sync()
            timings[data] = (result.rows_total, time.perf_counter() - t)
            bytes_per_example = result.bytes_total / result.rows_total
            shutil.rmtree(c["output"], ignore_errors=True)  # one cache on disk at a time
        (n1, t1), (n2, t2) = timings[f"half-{rows}.jsonl"], timings[f"train-{rows}.jsonl"]
        rounds.append((bare, n2 / t2, (n2 - n1) / (t2 - t1)))
    med = lambda i: statistics.median(r[i] for r in rounds)
    return {"config": name, "rows": rows, "precision": describe_precision(args.precision, args.device),
            "bare_ex_s": med(0), "export_ex_s": med(1), "export_marginal_ex_s": med(2),
            "ratio": statistics.median(r[1] / r[0] for r in rounds),
            "ratio_marginal": statistics.median(r[2] / r[0] for r in rounds),
            "ratio_rounds": [r[1] / r[0] for r in rounds], "ratio_marginal_rounds": [r[2] / r[0] for r in rounds],
            "rounds": rounds, "bytes_per_example": bytes_per_example,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--examples", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds; medians are reported")
    ap.add_argument("--configs", nargs="+", choices=CONFIGS, default=DEFAULT_CONFIGS)
    ap.add_argument("--hidden-examples", type=int, default=None,
                    help="at most this many rows for configurations storing hidden states / attention (disk)")
    ap.add_argument("--precision", choices=PRECISIONS, default=None,
                    help="export's amp and the bare forward's autocast (default: bf16 on CUDA, fp32 on CPU)")
    ap.add_argument("--toy", action="store_true", help="tiny teachers (the smoke run: checks the code, not speed)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--measure", nargs=2, metavar=("WORKDIR", "CONFIG"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.precision = args.precision or default_precision(args.device)
    if args.measure:
        print(json.dumps(measure(args, Path(args.measure[0]), args.measure[1])))
        return

    tmp = Path(tempfile.mkdtemp(prefix="cb-export-bench-"))
    try:
        _, L = build(args, tmp)
        (tmp / "layers").write_text(str(L))
        results = []
        precision = describe_precision(args.precision, args.device)
        print(f"precision: {precision} (export amp and bare forward alike)", flush=True)
        for name in args.configs:  # each configuration in its own child process: peak RSS per configuration
            cmd = [sys.executable, __file__, "--examples", str(args.examples), "--batch", str(args.batch),
                   "--seq", str(args.seq), "--device", args.device, "--repeats", str(args.repeats),
                   "--precision", args.precision, "--measure", str(tmp), name]
            cmd += ["--hidden-examples", str(args.hidden_examples)] if args.hidden_examples else []
            cmd += ["--toy"] if args.toy else []
            # stderr is not captured: a failing child's traceback lands in this process's stderr (the step's log)
            child = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
            if child.returncode:
                raise SystemExit(f"configuration {name!r}: its child process exited {child.returncode} "
                                 f"(traceback above); stdout tail: {child.stdout[-2000:]}")
            row = json.loads(child.stdout.splitlines()[-1])
            results.append(row)
            spread = lambda xs: f"{min(xs):.2f}-{max(xs):.2f}"
            print(f"{name:<32} {row['rows']:>6} rows  bare {row['bare_ex_s']:7.1f} ex/s  export {row['export_ex_s']:7.1f} ex/s "
                  f"(ratio {row['ratio']:4.2f}, rounds {spread(row['ratio_rounds'])})  marginal "
                  f"{row['export_marginal_ex_s']:7.1f} ex/s (ratio {row['ratio_marginal']:4.2f}, rounds "
                  f"{spread(row['ratio_marginal_rounds'])})  {row['bytes_per_example']:>9,.0f} B/ex  "
                  f"peak RSS {row['peak_rss_mib']:.0f} MiB", flush=True)
        if args.json:
            device_name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
            Path(args.json).write_text(json.dumps({"device": args.device, "device_name": device_name,
                                                   "precision": precision, "examples": args.examples,
                                                   "hidden_examples": hidden_rows(args), "batch": args.batch,
                                                   "results": results}, indent=2))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
