"""The jobs, each a recipe (setup → train → evaluate → save, checkpoints to resume): `export`, `distill`,
`finetune` (`cachebrew train` / `evaluate`). Recipes share components and the cache format, never code
with each other."""
