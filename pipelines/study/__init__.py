"""The study: does distilling from the cache pay off? (`python -m pipelines.study --help`; docs/study.md)."""
