"""Throughput of distillation from a cache vs the ceiling (student-only training) vs online distillation.

    python benchmarks/distill_throughput.py [--steps 40] [--device cpu|cuda] [--json out.json]

All figures are measured in this one run, on this machine, with the same student, batches and loss:
  ceiling      student training on hard labels only, batches already in memory (no distillation)
  cache        cachebrew: CacheBatches streaming the cache from disk -> GeneralDistiller, model_T=None
  cache_mem    the same distillation from batches decoded beforehand and held in memory (the loader's limit)
  online       cachebrew GeneralDistiller with the teacher in memory (teacher forward every step)
  textbrewer   TextBrewer 0.2.1 GeneralDistiller online (if installed)
  hf_cache     cachebrew.hf.DistillationTrainer (transformers.Trainer) from the cache     (--trainer)
  hf_online    the same Trainer with the teacher in memory (teacher_model=), same rows   (--trainer)
Timed: each runner's steady state, (steps of a 3+N-step run - steps of a 3-step run) / (difference of their
times), on fresh objects each, so model building, warm-up and the Trainer's setup cancel out. Rounds over all
runners are interleaved; each ratio is computed within a round (both runners of a ratio ran minutes apart at
most) and reported as the median with the range over rounds, its uncertainty.
KD on logits + hidden_mse on 4 layer pairs through linear projections. On CPU the models are small
(teacher 6x256, student 3x128); with --device cuda: BERT-base teacher -> 3-layer student, seq 128, bf16.
"""
import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def build(args, tmp):
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    from fixtures import WORDS, write_vocab

    teacher_dir = tmp / "teacher"
    teacher_dir.mkdir()
    vocab = write_vocab(teacher_dir / "vocab.txt")
    BertTokenizerFast(vocab=str(teacher_dir / "vocab.txt")).save_pretrained(str(teacher_dir))
    gpu = args.device == "cuda"
    tcfg = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072) if gpu else \
        dict(hidden_size=256, num_hidden_layers=6, num_attention_heads=4, intermediate_size=1024)
    scfg = dict(tcfg, num_hidden_layers=3) if gpu else dict(hidden_size=128, num_hidden_layers=3,
                                                            num_attention_heads=2, intermediate_size=512)
    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig(vocab_size=vocab, num_labels=3, max_position_embeddings=160,
                                             **tcfg)).save_pretrained(str(teacher_dir))
    rng = random.Random(0)
    with open(tmp / "train.jsonl", "w") as f:
        for i in range(args.examples):
            n = args.seq if gpu else rng.randint(12, 48)
            f.write(json.dumps({"text": " ".join(rng.choices(WORDS, k=n)), "label": rng.randrange(3)}) + "\n")
    layers_T = [0, tcfg["num_hidden_layers"] // 3, 2 * tcfg["num_hidden_layers"] // 3, tcfg["num_hidden_layers"]]
    return teacher_dir, vocab, scfg, layers_T


def _train_in(runner, optimizer, data, steps):
    with runner:
        runner.train(optimizer, data, num_epochs=None, num_steps=steps)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--examples", type=int, default=2048)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3,
                    help="rounds over all configurations, interleaved; each rate is the median (machine drift cancels)")
    ap.add_argument("--config", choices=["logits", "hidden", "attention"], default="hidden",
                    help="what is distilled: KD on logits only; + hidden_mse on 4 layers; + attention_mse on 2 layers")
    ap.add_argument("--trainer", action="store_true",
                    help="also time cachebrew.hf.DistillationTrainer from the cache and online (hf_cache, hf_online)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

    import cachebrew
    from cachebrew.components.loader import CacheBatches, CacheLoader
    from cachebrew.core.models import hf_adaptor
    from cachebrew.recipes.export import ExportConfig, run_export

    tmp = Path(tempfile.mkdtemp())
    teacher_dir, vocab, scfg, layers_T = build(args, tmp)
    if args.config == "attention":  # attention maps are compared head by head: give the student the teacher's heads
        scfg = dict(scfg, num_attention_heads=12 if args.device == "cuda" else 4)
    dev = torch.device(args.device)
    amp = "bf16" if dev.type == "cuda" else None
    export = run_export(ExportConfig.from_dict({
        "output": str(tmp / "cache"), "teachers": [{"name": "t", "path": str(teacher_dir)}],
        "data": {"path": str(tmp / "train.jsonl")}, "max_length": args.seq, "batch_size": 64, "device": args.device,
        "outputs": {"hidden_layers": [] if args.config == "logits" else layers_T,
                    "attention_layers": [layers_T[-1] - 1, layers_T[-1] - 2] if args.config == "attention" else []},
        "dtypes": {"hidden": "bf16" if amp else "fp16", "attention": "bf16" if amp else "fp16"},
        "progress_bar": False}))
    attention = args.config == "attention"
    teacher = AutoModelForSequenceClassification.from_pretrained(
        str(teacher_dir), output_hidden_states=True, output_attentions=attention,
        **({"attn_implementation": "eager"} if attention else {}))
    teacher.to(dev).eval()
    d_student = scfg["hidden_size"]
    d_teacher = teacher.config.hidden_size
    matches = [] if args.config == "logits" else [
        {"layer_T": t, "layer_S": s, "feature": "hidden", "loss": "hidden_mse", "weight": 1,
         "proj": ["linear", d_student, d_teacher]} for s, t in enumerate(layers_T)]
    if attention:  # heads must agree: the student has as many heads as the teacher here
        n_S = scfg["num_hidden_layers"]
        matches += [{"layer_T": layers_T[-1] - 1 - i, "layer_S": n_S - 1 - i, "feature": "attention",
                     "loss": "attention_mse", "weight": 1} for i in range(2)]
    dk = dict(temperature=8, hard_label_weight=1.0, intermediate_matches=matches)

    def student():
        torch.manual_seed(1)
        return BertForSequenceClassification(BertConfig(
            vocab_size=vocab, num_labels=3, max_position_embeddings=160, output_hidden_states=True,
            output_attentions=attention, **({"attn_implementation": "eager"} if attention else {}), **scfg)).to(dev)

    cache_ds = CacheBatches(str(tmp / "cache"), args.batch, seed=0)
    loader = CacheLoader(cache_ds, num_workers=args.workers, pin_memory=dev.type == "cuda",
                         persistent_workers=args.workers > 0, prefetch_factor=4 if args.workers else None)
    cached_in_memory = list(CacheBatches(str(tmp / "cache"), args.batch, seed=0))
    in_memory = [b["student"] for b in cached_in_memory]
    steps = min(args.steps, len(in_memory))
    results = {}

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    rates: dict = {}

    def timed(name, make):
        """make() -> run(n) on fresh objects; steady-state rate = extra steps / extra time."""
        spans = {}
        for n in (3, 3 + steps):
            run = make()
            sync()
            t = time.perf_counter()
            run(n)
            sync()
            spans[n] = time.perf_counter() - t
        rates.setdefault(name, []).append(steps * args.batch / (spans[3 + steps] - spans[3]))
        results[name] = statistics.median(rates[name])
        print(f"{name:<12} {rates[name][-1]:10.1f} examples/s", flush=True)

    def tc(**kw):
        return cachebrew.TrainingConfig(device=args.device, output_dir=str(tmp / "out"), progress_bar=False, amp=amp,
                                        ckpt_steps=10**9, **kw)

    def ceiling():
        s = student()
        trainer = cachebrew.BasicTrainer(tc(), s, lambda b, o: {"losses": o.loss})
        opt = torch.optim.AdamW(s.parameters(), lr=1e-4)
        return lambda n: _train_in(trainer, opt, in_memory, n)

    def distiller(lib, model_T, adaptor_T, data, adaptor_S):
        def make():
            s = student()
            cfg = lib.TrainingConfig(device=args.device, output_dir=str(tmp / lib.__name__), ckpt_steps=10**9,
                                     **({"progress_bar": False, "amp": amp} if lib is cachebrew else {}))
            d = lib.GeneralDistiller(cfg, lib.DistillationConfig(**dk), model_T, s, adaptor_T, adaptor_S)
            opt = torch.optim.AdamW(s.parameters(), lr=1e-4)
            return lambda n: _train_in(d, opt, data, n)
        return make

    def hf_trainer(**source):
        from transformers import TrainingArguments

        from cachebrew.hf import DistillationTrainer
        from helpers import cache_rows, pad_rows

        rows = cache_rows(str(tmp / "cache")) if "teacher_model" in source else None

        def make():
            def run(n):
                a = TrainingArguments(output_dir=str(tmp / "hf"), per_device_train_batch_size=args.batch, max_steps=n,
                                      learning_rate=1e-4, report_to=[], save_strategy="no", logging_steps=10**6,
                                      disable_tqdm=True, use_cpu=dev.type == "cpu", bf16=amp == "bf16",
                                      dataloader_num_workers=args.workers, seed=0)
                extra = {"train_dataset": rows, "data_collator": pad_rows} if rows is not None else {}
                DistillationTrainer(model=student(), args=a, distillation_config=cachebrew.DistillationConfig(**dk),
                                    **source, **extra).train()
            return run
        return make

    runners = [("ceiling", ceiling), ("cache", distiller(cachebrew, None, None, loader, hf_adaptor)),
               ("cache_mem", distiller(cachebrew, None, None, cached_in_memory, hf_adaptor)),
               ("online", distiller(cachebrew, teacher, hf_adaptor, in_memory, hf_adaptor))]
    if args.trainer:
        runners += [("hf_cache", hf_trainer(teacher_cache=str(tmp / "cache"))),
                    ("hf_online", hf_trainer(teacher_model=teacher))]
    try:
        import logging

        import textbrewer

        logging.getLogger("Distillation").setLevel(logging.WARNING)
        tad = lambda b, o: {"logits": o.logits, "hidden": o.hidden_states, "attention": o.attentions,
                            "inputs_mask": b["attention_mask"], "losses": o.loss}
        runners.append(("textbrewer", distiller(textbrewer, teacher, tad, in_memory, tad)))
    except ImportError:
        pass
    for _ in range(args.repeats):  # interleaved rounds: a slow minute of the machine hits every runner alike
        for name, make in runners:
            timed(name, make)

    print(f"\n{torch.cuda.get_device_name() if dev.type == 'cuda' else 'CPU'}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, batch {args.batch}, {steps} steps, loader workers {args.workers}, "
          f"config {args.config}, median of {args.repeats} interleaved rounds")
    ratios = {}
    for num, den in (("cache", "ceiling"), ("cache", "cache_mem"), ("cache", "online"), ("cache", "textbrewer"),
                     ("hf_cache", "hf_online")):
        if num in rates and den in rates:
            per_round = [x / y for x, y in zip(rates[num], rates[den], strict=True)]
            ratios[f"{num} / {den}"] = {"median": statistics.median(per_round), "min": min(per_round),
                                        "max": max(per_round), "rounds": per_round}
            print(f"{num + ' / ' + den:<22} = {statistics.median(per_round):.2f}  "
                  f"(rounds {min(per_round):.2f}-{max(per_round):.2f})")
    print(f"(export ran at {export.rows_per_second:.0f} rows/s)")
    if args.json:
        Path(args.json).write_text(json.dumps({"examples_per_second": results, "rounds": rates, "ratios": ratios,
                                               "args": vars(args)},
                                              indent=2))


if __name__ == "__main__":
    main()
