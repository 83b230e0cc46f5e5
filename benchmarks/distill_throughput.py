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
Timed: each runner on fresh objects runs --warmup + --steps (+1) steps; the --steps after the warm-up are timed
from inside its loop (suite_timing.StepTimer: CUDA events on a GPU, read after synchronizing; perf_counter on
the CPU), so model building, the Trainer's setup, loader start-up, warm-up and the final checkpoint are outside
the timed span. Rounds over all runners are interleaved; each ratio is computed within a round (both runners of
a ratio ran minutes apart at most) and reported as the median with the range over rounds, its uncertainty.
Precision (--precision, default bf16 on CUDA, fp32 on CPU) is one setting applied to every arm, TextBrewer's
included (its train_on_batch runs under the same torch.autocast as cachebrew's amp, and the TF32 switches are
process-wide): see suite_timing.py. The run prints it and writes it into the JSON.
KD on logits + hidden_mse on 4 layer pairs through linear projections. On CPU the models are small
(teacher 6x256, student 3x128; --toy: 3x64 -> 3x32, for the smoke run); with --device cuda: BERT-base teacher
-> 3-layer student, seq 128.
"""
import argparse
import itertools
import json
import random
import statistics
import sys
import tempfile
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from suite_timing import PRECISIONS, StepTimer, apply_precision, autocast, default_precision, describe_precision  # noqa: E402


def build(args, tmp):
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    from fixtures import WORDS, write_vocab

    teacher_dir = tmp / "teacher"
    teacher_dir.mkdir()
    vocab = write_vocab(teacher_dir / "vocab.txt")
    BertTokenizerFast(vocab=str(teacher_dir / "vocab.txt")).save_pretrained(str(teacher_dir))
    gpu = args.device == "cuda"
    if args.toy:  # the smoke run's size: checks the code path, measures nothing
        tcfg = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=2, intermediate_size=128)
        scfg = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64)
    elif gpu:
        tcfg = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
        scfg = dict(tcfg, num_hidden_layers=3)
    else:
        tcfg = dict(hidden_size=256, num_hidden_layers=6, num_attention_heads=4, intermediate_size=1024)
        scfg = dict(hidden_size=128, num_hidden_layers=3, num_attention_heads=2, intermediate_size=512)
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


def _train_in(runner, optimizer, data, timer: StepTimer):
    """timer.last + 1 steps; each batch passes a counting batch_postprocessor that marks the timer: batch i is
    asked for after i steps (one step earlier on CUDA, where cachebrew copies one batch ahead: the same shift at
    both marks), so marks at batches `warmup` and `warmup + steps` span `steps` steps."""
    count = itertools.count()

    def counted(batch):
        timer.mark(next(count))
        return batch

    with runner:
        runner.train(optimizer, data, num_epochs=None, num_steps=timer.last + 1, batch_postprocessor=counted)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40, help="timed steps per runner and round (after --warmup)")
    ap.add_argument("--warmup", type=int, default=5, help="steps run before the timed ones (not timed), >= 1")
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
    ap.add_argument("--precision", choices=PRECISIONS, default=None,
                    help="one precision for every arm (default: bf16 on CUDA, fp32 on CPU); see suite_timing.py")
    ap.add_argument("--require-textbrewer", action="store_true",
                    help="a missing textbrewer is a failed arm (exit 1) rather than an arm left out")
    ap.add_argument("--toy", action="store_true", help="tiny models (the smoke run: checks the code, not speed)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.warmup < 1 or args.steps < 1:
        ap.error("--warmup and --steps must be >= 1")
    args.precision = args.precision or default_precision(args.device)
    from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

    import cachebrew
    from cachebrew.components.loader import CacheBatches, CacheLoader
    from cachebrew.core.models import hf_adaptor
    from cachebrew.recipes.export import ExportConfig, run_export

    tmp = Path(tempfile.mkdtemp())
    teacher_dir, vocab, scfg, layers_T = build(args, tmp)
    if args.config == "attention":  # attention maps are compared head by head: give the student the teacher's heads
        scfg = dict(scfg, num_attention_heads=2 if args.toy else 12 if args.device == "cuda" else 4)
    dev = torch.device(args.device)
    amp = apply_precision(args.precision)  # the TF32 switches (process-wide) and cachebrew's autocast mode
    precision = describe_precision(args.precision, args.device)
    print(f"precision: {precision}", flush=True)
    export = run_export(ExportConfig.from_dict({
        "output": str(tmp / "cache"), "teachers": [{"name": "t", "path": str(teacher_dir)}],
        "data": {"path": str(tmp / "train.jsonl")}, "max_length": args.seq, "batch_size": 64, "device": args.device,
        "amp": amp or "none",
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
    steps = args.steps  # the loaders cycle over their epochs: as many steps as asked, whatever --examples
    results = {}
    rates: dict = {}

    def timed(name, make):
        """make() -> run(timer) on fresh objects; rate = timed steps x batch / their time."""
        run = make()
        timer = StepTimer(dev, args.warmup, steps)
        run(timer)
        rates.setdefault(name, []).append(steps * args.batch / timer.seconds())
        results[name] = statistics.median(rates[name])
        print(f"{name:<12} {rates[name][-1]:10.1f} examples/s", flush=True)

    def tc(**kw):
        return cachebrew.TrainingConfig(device=args.device, output_dir=str(tmp / "out"), progress_bar=False, amp=amp,
                                        ckpt_steps=10**9, **kw)

    def ceiling():
        s = student()
        trainer = cachebrew.BasicTrainer(tc(), s, lambda b, o: {"losses": o.loss})
        opt = torch.optim.AdamW(s.parameters(), lr=1e-4)
        return lambda timer: _train_in(trainer, opt, in_memory, timer)

    def distiller(lib, model_T, adaptor_T, data, adaptor_S):
        def make():
            s = student()
            cfg = lib.TrainingConfig(device=args.device, output_dir=str(tmp / lib.__name__), ckpt_steps=10**9,
                                     **({"progress_bar": False, "amp": amp} if lib is cachebrew else {}))
            d = lib.GeneralDistiller(cfg, lib.DistillationConfig(**dk), model_T, s, adaptor_T, adaptor_S)
            if lib is not cachebrew:  # TextBrewer has no bf16 of its own: the same autocast cachebrew's amp puts
                inner = d.train_on_batch  # around forward + loss (backward outside it), so only the cache differs

                def train_on_batch(batch, step_args):
                    with autocast(args.precision, dev):
                        return inner(batch, step_args)
                d.train_on_batch = train_on_batch
            opt = torch.optim.AdamW(s.parameters(), lr=1e-4)
            return lambda timer: _train_in(d, opt, data, timer)
        return make

    def hf_trainer(**source):
        from transformers import TrainerCallback, TrainingArguments

        from cachebrew.hf import DistillationTrainer
        from helpers import cache_rows, pad_rows

        rows = cache_rows(str(tmp / "cache")) if "teacher_model" in source else None

        class Marks(TrainerCallback):  # the Trainer's own step count: mark(i) after its i-th optimizer step
            def __init__(self, timer):
                self.timer = timer

            def on_step_end(self, a, state, control, **kw):
                self.timer.mark(state.global_step)

        def make():
            def run(timer):
                a = TrainingArguments(output_dir=str(tmp / "hf"), per_device_train_batch_size=args.batch,
                                      max_steps=timer.last, learning_rate=1e-4, report_to=[], save_strategy="no",
                                      logging_steps=10**6, disable_tqdm=True, use_cpu=dev.type == "cpu",
                                      bf16=amp == "bf16", dataloader_num_workers=args.workers, seed=0,
                                      # as the distillers' loader: the Trainer re-iterates it every epoch of the
                                      # timed steps, and fresh worker processes each time would be timed too
                                      dataloader_persistent_workers=args.workers > 0,
                                      dataloader_prefetch_factor=4 if args.workers else None)
                extra = {"train_dataset": rows, "data_collator": pad_rows} if rows is not None else {}
                DistillationTrainer(model=student(), args=a, distillation_config=cachebrew.DistillationConfig(**dk),
                                    callbacks=[Marks(timer)], **source, **extra).train()
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
    except ImportError as e:
        if args.require_textbrewer:  # a failed arm (the others still run), and the exit status says so
            def unavailable(error=e):
                raise error
            runners.append(("textbrewer", unavailable))
        else:
            print(f"textbrewer not importable ({e}): no textbrewer arm", flush=True)
    failed = {}
    for _ in range(args.repeats):  # interleaved rounds: a slow minute of the machine hits every runner alike
        for name, make in runners:
            if name in failed:
                continue
            try:  # one arm's failure costs that arm only: the others' figures are still measured and written
                timed(name, make)
            except Exception as e:  # noqa: BLE001 - reported below, and the exit status says so
                traceback.print_exc()
                failed[name] = f"{type(e).__name__}: {e}"
                rates.pop(name, None)
                results.pop(name, None)
                print(f"{name:<12} FAILED ({failed[name]}): left out of this run", flush=True)

    device_name = torch.cuda.get_device_name() if dev.type == "cuda" else "CPU"
    timing = (f"{steps} timed steps after {args.warmup} warm-up steps, "
              f"{'CUDA events' if dev.type == 'cuda' else 'perf_counter'}")
    print(f"\n{device_name}, torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, "
          f"{timing}, loader workers {args.workers}, config {args.config}, precision {precision}, "
          f"median of {args.repeats} interleaved rounds")
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
                                               "precision": precision, "device": device_name, "timing": timing,
                                               "arms": [name for name, _ in runners], "failed": failed,
                                               "args": vars(args)},
                                              indent=2))
    if failed:
        raise SystemExit(f"arms failed: {', '.join(f'{k} ({v})' for k, v in failed.items())}")


if __name__ == "__main__":
    main()
