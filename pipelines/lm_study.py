"""Sparse logit caches for a causal LM: dense vs top-k vs sampled targets at equal bytes, vs hard labels only.

    python pipelines/lm_study.py [--seeds 1 2 3] [--out pipelines/study_results/lm]
    python pipelines/lm_study.py --smoke --out /tmp/lm-smoke          # every stage at toy size (CI)

1. A BPE tokenizer (8,000 tokens) is trained on the BBC News train split, whose articles are cut into
   ~70-word chunks (max_length 96 tokens).
2. A GPT-2-architecture teacher (3 layers x 192) is trained from scratch on every train chunk (300 steps of 24;
   sizes that keep the whole study near 20 minutes on 2 CPU cores).
3. `cachebrew export` writes three caches of the teacher's next-token distribution over the students' subset
   (the first 600 train chunks): dense fp16 logits; top-16 (exact masses, tail known); 16 sampled draws
   (unbiased). The two sparse caches cost the same bytes per token (16 slots of an fp16 mass + an int32 id).
   A fourth cache, ``sampled_fresh``, holds epochs - 1 more copies of every row with fresh draws (augment copies
   without operations): the student reads each copy once, so every epoch's targets are new samples, where the
   ``sampled`` arm sees the same 16 draws of a position six times.
4. Students (GPT-2, 2 layers x 96, seeds 1-3, same initialisation per seed for every arm) are trained with
   cachebrew's GeneralDistiller from each cache (pure KD at T = 1), and one on hard labels only (the same
   chunks, the LM loss), each for the same epochs and steps.
5. Held-out perplexity and expected calibration error (15 equal-width bins over the top-1 next-token
   confidence) on the test split's chunks; mean +- sd over seeds in ``<out>/table.md``, per run in ``runs/``.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT / "data" / "bbc"

FULL = dict(vocab=8000, chunk_words=70, max_length=96, student_chunks=600, teacher=dict(n_embd=192, n_layer=3,
            n_head=3, steps=300, batch=24, lr=1.5e-3), student=dict(n_embd=96, n_layer=2, n_head=2), epochs=6,
            batch=16, lr=3e-3, k=16, eval_chunks=400)
SMOKE = dict(vocab=300, chunk_words=30, max_length=40, student_chunks=24, teacher=dict(n_embd=32, n_layer=1,
             n_head=2, steps=4, batch=8, lr=1e-3), student=dict(n_embd=16, n_layer=1, n_head=2), epochs=1,
             batch=8, lr=1e-3, k=4, eval_chunks=16)
ARMS = ("hard_labels", "dense", "topk", "sampled", "sampled_fresh")
LABELS = {"hard_labels": "hard labels", "dense": "dense", "topk": "topk", "sampled": "sampled",
          "sampled_fresh": "sampled, fresh draws each epoch"}


def chunks(split: str, words: int, limit: int | None = None) -> list[dict]:
    import pyarrow.parquet as pq

    out = []
    for rid, text in zip(*pq.read_table(DATA / f"{split}.parquet", columns=["id", "text"]).to_pydict().values()):
        w = text.split()
        out += [{"id": f"{rid}-{i}", "text": " ".join(w[i:i + words])} for i in range(0, len(w) - words // 2, words)]
    return out[:limit] if limit else out


def train_tokenizer(texts: list[str], vocab: int, out: Path, kind: str = "bpe"):
    """A tokenizer trained on `texts`: lower-cased, split on whitespace and punctuation, no special tokens added;
    `kind` "bpe" (this study's, and the teacher's in lm_cross_tokenizer) or "wordpiece" ("##" continuation pieces:
    lm_cross_tokenizer's other vocabulary)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if kind == "bpe":
        tok, trainer = Tokenizer(models.BPE(unk_token="[UNK]")), trainers.BpeTrainer
    else:
        tok, trainer = Tokenizer(models.WordPiece(unk_token="[UNK]")), trainers.WordPieceTrainer
        tok.decoder = decoders.WordPiece()
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainer(vocab_size=vocab, special_tokens=["[PAD]", "[UNK]"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                   model_input_names=["input_ids", "attention_mask"])
    fast.save_pretrained(str(out))
    return fast


def batches(tokenizer, rows: list[dict], size: int, max_length: int, shuffle_seed: int | None = None):
    order = list(range(len(rows)))
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(order)
    for i in range(0, len(order), size):
        enc = tokenizer([rows[j]["text"] for j in order[i:i + size]], truncation=True, max_length=max_length,
                        padding=True, return_tensors="pt")
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        yield {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels}


def gpt2(vocab: int, max_length: int, seed: int, **size):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=max_length, pad_token_id=0, bos_token_id=None,
                                      eos_token_id=None, **size))


def train_teacher(cfg: dict, tokenizer, rows: list[dict], out: Path) -> float:
    t = cfg["teacher"]
    model = gpt2(len(tokenizer), cfg["max_length"], 0, n_embd=t["n_embd"], n_layer=t["n_layer"], n_head=t["n_head"])
    opt = torch.optim.AdamW(model.parameters(), lr=t["lr"], weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=t["lr"], total_steps=t["steps"], pct_start=0.1)
    model.train()
    step, epoch, t0 = 0, 0, time.perf_counter()
    while step < t["steps"]:
        for batch in batches(tokenizer, rows, t["batch"], cfg["max_length"], shuffle_seed=epoch):
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step(), sched.step(), opt.zero_grad()
            step += 1
            if step % 100 == 0:
                print(f"teacher step {step}/{t['steps']}: loss {loss.item():.3f}", flush=True)
            if step == t["steps"]:
                break
        epoch += 1
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return time.perf_counter() - t0


@torch.no_grad()
def evaluate(model, tokenizer, rows: list[dict], max_length: int, bins: int = 15) -> dict:
    """Perplexity and ECE of next-token prediction over every real (non-padding) next token."""
    model.eval()
    nll = n = 0.0
    conf_sum, acc_sum, counts = torch.zeros(bins), torch.zeros(bins), torch.zeros(bins)
    for batch in batches(tokenizer, rows, 32, max_length):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
        target, keep = batch["input_ids"][:, 1:], batch["attention_mask"][:, 1:].bool()
        logp = torch.log_softmax(logits[keep], dim=-1)
        y = target[keep]
        nll += -logp.gather(-1, y[:, None]).sum().item()
        n += y.numel()
        conf, pred = logp.exp().max(dim=-1)
        b = (conf * bins).long().clamp_(max=bins - 1)
        conf_sum += torch.zeros(bins).index_add_(0, b, conf)
        acc_sum += torch.zeros(bins).index_add_(0, b, (pred == y).float())
        counts += torch.bincount(b, minlength=bins).float()
    ece = ((acc_sum - conf_sum).abs().sum() / n).item()
    return {"perplexity": math.exp(nll / n), "ece": ece, "accuracy": (acc_sum.sum() / n).item(), "tokens": int(n)}


def export(cfg: dict, teacher: Path, data: Path, out: Path, sparse: dict | None, copies: int = 0) -> dict:
    from cachebrew.recipes.export import ExportConfig, run_export

    result = run_export(ExportConfig.from_dict({
        "output": str(out), "teachers": [{"name": "lm", "path": str(teacher), "model_class": "AutoModelForCausalLM"}],
        "data": {"path": str(data), "text": "text", "label": None, "id": "id"}, "max_length": cfg["max_length"],
        "outputs": {"logits": True, **({"sparse_logits": sparse} if sparse else {})},
        "dtypes": {"logits": "fp16"}, "batch_size": 32, "progress_bar": False,
        **({"augment": {"copies": copies}} if copies else {})}))
    return {"bytes": result.bytes_total, "seconds": result.seconds,
            "bytes_per_token": None}


def train_student(cfg: dict, arm: str, cache: Path, vocab: int, seed: int, out: Path):
    import cachebrew
    from cachebrew.components.loader import CacheBatches, CacheLoader
    from cachebrew.core.models import hf_adaptor

    s = cfg["student"]
    model = gpt2(vocab, cfg["max_length"], 1000 + seed, **s)
    kd = {"temperature": 1.0, "kd_loss_weight": 0.0, "hard_label_weight": 1.0} if arm == "hard_labels" else \
        {"temperature": 1.0, "kd_loss_weight": 1.0, "hard_label_weight": 0.0}
    loader = CacheLoader(CacheBatches(str(cache), cfg["batch"], seed=seed))
    tc = cachebrew.TrainingConfig(device="cpu", output_dir=str(out), progress_bar=False, ckpt_steps=10**9,
                                  keep_checkpoints=0, log_dir=None)
    distiller = cachebrew.GeneralDistiller(tc, cachebrew.DistillationConfig(**kd), None, model, None, hf_adaptor)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=0.01)
    epochs = 1 if arm == "sampled_fresh" else cfg["epochs"]  # its cache holds `epochs` copies of every row
    steps = len(loader) * epochs
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg["lr"], total_steps=steps, pct_start=0.1)
    t0 = time.perf_counter()
    with distiller:
        distiller.train(opt, loader, num_epochs=epochs, scheduler=sched)
    return model, steps, time.perf_counter() - t0


def arm_runs(out: Path, arms, seeds: list[int]) -> dict[str, list[dict]]:
    """Each arm's finished runs (``<out>/runs/<arm>/seed-<n>.json``) in seed order: what a table summarises."""
    return {arm: [json.loads(path.read_text()) for s in seeds
                  if (path := out / "runs" / arm / f"seed-{s}.json").is_file()] for arm in arms}


def mean_sd_text(xs: list[float], digits: int) -> str:
    """'mean ± sd' over seeds, the value alone for one seed."""
    if len(xs) == 1:
        return f"{xs[0]:.{digits}f}"
    return f"{statistics.mean(xs):.{digits}f} ± {statistics.stdev(xs):.{digits}f}"


def setup(description: str, default_out: Path):
    """The LM studies' common start: --seeds / --out / --smoke; ``work/`` and ``runs/`` under the output folder;
    BBC's train and test chunks; the students' share of the train chunks written as JSONL (the data every cache is
    exported over). Returns (args, cfg, out, train_rows, student_rows, test_rows, data)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--out", default=str(default_out))
    ap.add_argument("--smoke", action="store_true", help="every arm at toy size (CI)")
    args = ap.parse_args()
    cfg = SMOKE if args.smoke else FULL
    out = Path(args.out)
    (out / "work").mkdir(parents=True, exist_ok=True)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    train_rows = chunks("train", cfg["chunk_words"])
    student_rows = train_rows[:cfg["student_chunks"]]
    test_rows = chunks("test", cfg["chunk_words"], cfg["eval_chunks"])
    data = out / "work" / "student_train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in student_rows))
    return args, cfg, out, train_rows, student_rows, test_rows, data


def summarise(out: Path, seeds: list[int]) -> str:
    runs = arm_runs(out, ARMS, seeds)
    info = json.loads((out / "runs" / "teacher.json").read_text())
    ms = lambda xs: mean_sd_text(xs, 2)
    lines = [f"Teacher: perplexity {info['test']['perplexity']:.2f}, ECE {100 * info['test']['ece']:.2f} % "
             f"({info['test']['tokens']:,} test tokens). Seeds {seeds}; mean ± sd.", "",
             "| student trained on | cache bytes / token | perplexity | ECE (%) | next-token accuracy (%) | steps |",
             "|---|---:|---:|---:|---:|---:|"]
    for arm in ARMS:
        r = runs[arm]
        if not r:
            continue
        bpt = info["caches"]["sampled" if arm == "hard_labels" else arm]["bytes_per_token"]
        lines.append(f"| {LABELS[arm]} | {'—' if arm == 'hard_labels' else f'{bpt:,.0f}'} | "
                     f"{ms([x['test']['perplexity'] for x in r])} | {ms([100 * x['test']['ece'] for x in r])} | "
                     f"{ms([100 * x['test']['accuracy'] for x in r])} | {r[0]['steps']} |")
    lines += ["", "Per seed (perplexity / ECE %):", "", "| arm | " + " | ".join(f"seed {s}" for s in seeds) + " |",
              "|---|" + "---:|" * len(seeds)]
    for arm in ARMS:
        if runs[arm]:
            lines.append(f"| {arm} | " + " | ".join(f"{x['test']['perplexity']:.2f} / {100 * x['test']['ece']:.2f}"
                                                    for x in runs[arm]) + " |")
    table = "\n".join(lines) + "\n"
    (out / "table.md").write_text(table)
    return table


def main():
    args, cfg, out, train_rows, student_rows, test_rows, data = setup(
        __doc__.splitlines()[0], ROOT / "pipelines" / "study_results" / "lm")
    work, runs = out / "work", out / "runs"
    torch.set_num_threads(torch.get_num_threads())

    teacher_dir = work / "teacher"
    record = runs / "teacher.json"
    info = json.loads(record.read_text()) if record.is_file() else None
    trained = not (teacher_dir / "config.json").is_file()
    if trained:  # first run, or work/ was removed: the teacher is retrained and checked against the record
        tokenizer = train_tokenizer([r["text"] for r in train_rows], cfg["vocab"], teacher_dir)
        seconds = train_teacher(cfg, tokenizer, train_rows, teacher_dir)
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(teacher_dir))
        seconds = None
    if trained or info is None:
        from transformers import GPT2LMHeadModel

        test = evaluate(GPT2LMHeadModel.from_pretrained(str(teacher_dir)), tokenizer, test_rows, cfg["max_length"])
        if info is not None and not math.isclose(test["perplexity"], info["test"]["perplexity"], rel_tol=1e-6):
            sys.exit(f"the retrained teacher scores perplexity {test['perplexity']:.4f}, the recorded one "
                     f"{info['test']['perplexity']:.4f}: the recorded arms came from another teacher; remove {runs} "
                     "to rerun every arm")
        if info is None:
            info = {"train_seconds": seconds, "test": test, "caches": {}, "config": cfg,
                    "train_chunks": len(train_rows), "student_chunks": len(student_rows)}
        print(f"teacher: test perplexity {test['perplexity']:.2f}, ECE {100 * test['ece']:.2f} %", flush=True)
    tokens = sum(int(m.sum()) for b in batches(tokenizer, student_rows, 64, cfg["max_length"])
                 for m in [b["attention_mask"]])
    info["student_tokens"] = tokens
    sampled = {"method": "sampled", "k": cfg["k"], "temperature": 1.0, "seed": 0}
    for arm, sparse, copies in (("dense", None, 0), ("topk", {"method": "topk", "k": cfg["k"], "temperature": 1.0}, 0),
                                ("sampled", sampled, 0), ("sampled_fresh", sampled, cfg["epochs"] - 1)):
        if arm in info["caches"] and (work / f"cache_{arm}" / "manifest.json").is_file():
            continue
        c = export(cfg, teacher_dir, data, work / f"cache_{arm}", sparse, copies)
        c["bytes_per_token"] = c["bytes"] / tokens  # all copies, per token of the students' data
        info["caches"][arm] = {**info["caches"].get(arm, {}), **c}
        print(f"cache {arm}: {c['bytes_per_token']:,.0f} bytes/token", flush=True)
    record.write_text(json.dumps(info, indent=2))

    for seed in args.seeds:
        for arm in ARMS:
            path = runs / arm / f"seed-{seed}.json"
            if path.is_file():
                continue
            cache = work / f"cache_{'sampled' if arm == 'hard_labels' else arm}"
            model, steps, seconds = train_student(cfg, arm, cache, len(tokenizer), seed, work / "students" / arm)
            test = evaluate(model, tokenizer, test_rows, cfg["max_length"])
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"arm": arm, "seed": seed, "test": test, "steps": steps, "seconds": seconds},
                                       indent=2))
            print(f"{arm:<12} seed {seed}: perplexity {test['perplexity']:.2f}  ECE {100 * test['ece']:.2f} %  "
                  f"({steps} steps, {seconds:.0f} s)", flush=True)
    print(summarise(out, args.seeds))


if __name__ == "__main__":
    main()
