"""A causal LM distilled from a teacher with another tokenizer, offline, in bits per character.

    python -m pipelines.lm_cross_tokenizer [--seeds 1 2 3] [--out pipelines/study_results/lm_xtok]
    python -m pipelines.lm_cross_tokenizer --smoke --out /tmp/lm-xtok     # every arm at toy size

Real text: BBC News (data/bbc), cut into ~70-word chunks as in pipelines/lm_study.py, whose teacher recipe this
reuses. Two tokenizers trained on the train split with `tokenizers`, both lower-casing and splitting on
whitespace and punctuation, otherwise unlike: **A**, BPE with 8,000 tokens (the teacher's); **B**, WordPiece with
2,000 tokens ("##" continuation pieces: other ids, other lengths; 16 % of A's token texts are also B's).

1. The teacher (GPT-2 architecture, 3 x 192, tokenizer A) is trained on every train chunk; `cachebrew export`
   writes its top-16 next-token distributions (T = 1; exact masses and the tail) over the students' 600 chunks,
   with each token's character span and A's token texts (the cache every arm reads).
2. Students (GPT-2, 2 x 96, seeds 1-3; each arm the same steps) trained with `cachebrew distill`'s recipe
   (`run_distill`) from that one cache:
   - ``B_hard``: tokenizer B, its own next-token loss only (the cached text re-tokenized; the teacher unused);
   - ``B_cross_kd``: tokenizer B, + KD from the cache across tokenizers (targets at the positions where both
     tokenizations end at one character, ids mapped by token text, GOLD-style matched KL + ULD for the rest:
     losses.cross_tokenizer_kd_loss), ULD over the teacher's unmatched slots (``cross_tokenizer_uld: unmatched``);
   - ``B_cross_kd_zero_padded``: the same with ULD's zero padding (``cross_tokenizer_uld: zero_padded``: the
     student's other probabilities beyond the teacher's unmatched slots pulled towards 0). Which of the two is
     the method is chosen on BBC's dev split at seed 0 (``<out>/runs/screen/``); the table reports both;
   - ``A_hard`` and ``A_kd``: tokenizer A (the teacher's), without and with KD: the same-tokenizer reference.
3. Test: **bits per character** on the test split's chunks, comparable across tokenizers: the summed negative
   log-likelihood (bits) of every predicted token over the characters those tokens cover (from the end of each
   row's first token to the end of its last, so each tokenizer is charged for the same kind of span).
   Mean +- sd over seeds in ``<out>/table.md``, per run in ``<out>/runs/``.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from pipelines.lm_study import arm_runs, chunks, mean_sd_text, setup, train_teacher, train_tokenizer

ROOT = Path(__file__).resolve().parents[1]
STUDENT_VOCAB = {"full": 2000, "smoke": 200}
ARMS = {"B_hard": ("B", False), "B_cross_kd": ("B", True), "B_cross_kd_zero_padded": ("B", True),
        "A_hard": ("A", False), "A_kd": ("A", True)}
ULD = {"B_cross_kd": "unmatched", "B_cross_kd_zero_padded": "zero_padded"}  # the variants screened on dev
TUNE_SEED = 0
LABELS = {"B_hard": "tokenizer B (WordPiece 2k), hard labels only",
          "B_cross_kd": "tokenizer B, + KD from the A-teacher's cache (cross-tokenizer; ULD unmatched)",
          "B_cross_kd_zero_padded": "tokenizer B, + KD from the A-teacher's cache (cross-tokenizer; ULD zero-padded)",
          "A_hard": "tokenizer A (the teacher's BPE 8k), hard labels only",
          "A_kd": "tokenizer A, + KD from the cache (same tokenizer)"}


@torch.no_grad()
def bits_per_character(model, tokenizer, rows: list[dict], max_length: int) -> dict:
    """Summed next-token NLL in bits over the characters the predicted tokens cover (see the module docstring)."""
    model.eval()
    bits = chars = tokens = 0.0
    for i in range(0, len(rows), 32):
        texts = [r["text"] for r in rows[i:i + 32]]
        enc = tokenizer(texts, truncation=True, max_length=max_length, padding=True, return_tensors="pt",
                        return_offsets_mapping=True)
        logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits[:, :-1].float()
        target, keep = enc["input_ids"][:, 1:], enc["attention_mask"][:, 1:].bool()
        nll = -torch.log_softmax(logits, dim=-1).gather(-1, target[..., None])[..., 0]
        bits += float(nll[keep].sum()) / math.log(2)
        tokens += int(keep.sum())
        for b in range(len(texts)):
            n = int(enc["attention_mask"][b].sum())
            if n > 1:
                chars += int(enc["offset_mapping"][b, n - 1, 1] - enc["offset_mapping"][b, 0, 1])
    return {"bits_per_char": bits / chars, "chars": int(chars), "tokens": int(tokens),
            "perplexity": math.exp(bits * math.log(2) / tokens)}


def export(cfg: dict, teacher: Path, data: Path, out: Path) -> dict:
    from cachebrew.recipes.export import ExportConfig, run_export

    result = run_export(ExportConfig.from_dict({
        "output": str(out), "teachers": [{"name": "lm", "path": str(teacher), "model_class": "AutoModelForCausalLM"}],
        "data": {"path": str(data), "text": "text", "label": None, "id": "id"}, "max_length": cfg["max_length"],
        "outputs": {"sparse_logits": {"method": "topk", "k": cfg["k"], "temperature": 1.0}},
        "batch_size": 32, "progress_bar": False}))
    return {"bytes": result.bytes_total, "seconds": result.seconds}


def train_student(cfg: dict, arm: str, cache: Path, tokenizers: dict, seed: int, out: Path):
    from cachebrew.recipes.distill import DistillRunConfig, run_distill

    which, kd = ARMS[arm]
    tok = tokenizers[which]
    s = cfg["student"]
    student = {"config": {"model_type": "gpt2", "vocab_size": max(tok.get_vocab().values()) + 1,
                          "n_positions": cfg["max_length"], "n_embd": s["n_embd"], "n_layer": s["n_layer"],
                          "n_head": s["n_head"], "pad_token_id": 0, "bos_token_id": None, "eos_token_id": None},
               "model_class": "AutoModelForCausalLM", "tokenizer": str(out.parent.parent / f"tokenizer_{which}")}
    t0 = time.perf_counter()
    result = run_distill(DistillRunConfig.from_dict({
        "kind": "distill", "output_dir": str(out), "seed": seed, "caches": [str(cache)], "student": student,
        "distill": {"temperature": 1.0, "hard_label_weight": 1.0, "kd_loss_weight": 1.0 if kd else 0.0,
                    "cross_tokenizer_uld": ULD.get(arm, "unmatched")},
        "train": {"epochs": cfg["epochs"], "batch_size": cfg["batch"], "lr": cfg["lr"], "warmup_ratio": 0.1,
                  "weight_decay": 0.01, "progress_bar": False, "device": "cpu", "keep_checkpoints": 1}}))
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel.from_pretrained(str(out / "last")), result.global_step, time.perf_counter() - t0


def summarise(out: Path, seeds: list[int], info: dict) -> str:
    runs = arm_runs(out, ARMS, seeds)
    ms = lambda xs: mean_sd_text(xs, 4)
    t = info["teacher_test"]
    screen = info.get("uld_screen", {})
    chosen = min(screen, key=screen.get) if screen else None
    lines = [f"Teacher (tokenizer A): {t['bits_per_char']:.4f} bits/char (perplexity {t['perplexity']:.1f}). "
             f"Token texts of A also in B: {info['matched_vocabulary']:.0%} of A's ids. Seeds {seeds}; mean ± sd.", ""]
    if chosen:
        lines += ["ULD variant chosen on the dev split (seed 0, bits/char): " + ", ".join(
            f"{ULD[a]} {v:.4f}" for a, v in screen.items()) + f" -> **{ULD[chosen]}**", ""]
    lines += [
             "| student | bits per character | per seed | steps |", "|---|---:|---|---:|"]
    for arm in ARMS:
        r = runs[arm]
        if r:
            scores = [x["test"]["bits_per_char"] for x in r]
            lines.append(f"| {LABELS[arm]} | {ms(scores)} | {', '.join(f'{v:.4f}' for v in scores)} | "
                         f"{r[0]['steps']} |")
    table = "\n".join(lines) + "\n"
    (out / "table.md").write_text(table)
    return table


def main():
    args, cfg, out, train_rows, _, test_rows, data = setup(__doc__.splitlines()[0],
                                                           ROOT / "pipelines" / "study_results" / "lm_xtok")
    if TUNE_SEED in args.seeds:
        raise SystemExit(f"--seeds: seed {TUNE_SEED} chooses the ULD variant on dev; report on others")
    work, runs = out / "work", out / "runs"
    teacher_dir, cache = work / "teacher", work / "cache_topk"
    record = runs / "teacher.json"
    info = json.loads(record.read_text()) if record.is_file() else {}
    from transformers import AutoTokenizer, GPT2LMHeadModel

    if not (teacher_dir / "config.json").is_file():
        tok_a = train_tokenizer([r["text"] for r in train_rows], cfg["vocab"], teacher_dir)
        info["teacher_seconds"] = train_teacher(cfg, tok_a, train_rows, teacher_dir)
    tok_a = AutoTokenizer.from_pretrained(str(teacher_dir))
    tok_a.save_pretrained(str(work / "tokenizer_A"))
    if not (work / "tokenizer_B" / "tokenizer.json").is_file():
        train_tokenizer([r["text"] for r in train_rows], STUDENT_VOCAB["smoke" if args.smoke else "full"],
                        work / "tokenizer_B", kind="wordpiece")
    tokenizers = {"A": tok_a, "B": AutoTokenizer.from_pretrained(str(work / "tokenizer_B"))}
    test = bits_per_character(GPT2LMHeadModel.from_pretrained(str(teacher_dir)), tok_a, test_rows, cfg["max_length"])
    if "teacher_test" in info and not math.isclose(test["bits_per_char"], info["teacher_test"]["bits_per_char"],
                                                   rel_tol=1e-6):
        raise SystemExit(f"the teacher in {teacher_dir} is not the recorded one; remove {runs} to rerun every arm")
    info["teacher_test"] = test
    if not (cache / "manifest.json").is_file():
        info["cache"] = export(cfg, teacher_dir, data, cache)
    from cachebrew.components.alignment import token_texts, vocabulary_map

    info["matched_vocabulary"] = float((vocabulary_map(token_texts(tok_a), token_texts(tokenizers["B"])) >= 0).mean())
    record.write_text(json.dumps(info, indent=2))
    print(f"teacher: {test['bits_per_char']:.4f} bits/char; {info['matched_vocabulary']:.0%} of A's token texts "
          f"are B's", flush=True)

    def trained(arm: str, seed: int, split: str, rows: list[dict], path: Path) -> dict:
        """The run's record at `path`: the student trained once, scored in bits per character on `split`."""
        if not path.is_file():
            model, steps, seconds = train_student(cfg, arm, cache, tokenizers, seed, work / "students" / f"{arm}-{seed}")
            result = bits_per_character(model, tokenizers[ARMS[arm][0]], rows, cfg["max_length"])
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"arm": arm, "seed": seed, split: result, "steps": steps,
                                        "seconds": seconds}, indent=2))
            print(f"{arm:<11} seed {seed} ({split}): {result['bits_per_char']:.4f} bits/char ({steps} steps, "
                  f"{seconds:.0f} s)", flush=True)
        return json.loads(path.read_text())

    dev_rows = chunks("dev", cfg["chunk_words"], cfg["eval_chunks"])
    # which ULD variant: chosen on dev at seed 0, never on the test split
    info["uld_screen"] = {arm: trained(arm, TUNE_SEED, "dev", dev_rows, runs / "screen" / f"{arm}-seed-{TUNE_SEED}.json")
                          ["dev"]["bits_per_char"] for arm in ULD}
    record.write_text(json.dumps(info, indent=2))
    for seed in args.seeds:
        for arm in ARMS:
            trained(arm, seed, "test", test_rows, runs / arm / f"seed-{seed}.json")
    print(summarise(out, args.seeds, info))


if __name__ == "__main__":
    main()
