"""Shared components of cachebrew's jobs: the one home of helpers that export, distill, train and the
Trainer front end all need (atomic files, config files, model helpers, training setup).

Nothing here imports a job (`export/`, `distill/`, `finetune`), the distillers or `hf/`; they import it.
"""
