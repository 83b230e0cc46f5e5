"""One DistillationTrainer run (under torchrun or alone) for tests/hf/test_hf_trainer.py's DDP test.

    hf_ddp_worker.py CACHE OUT ACCUMULATION
"""
import os
import sys

sys.path[:0] = [os.path.dirname(__file__), os.path.join(os.path.dirname(__file__), "hf")]  # helpers; the test module

import torch  # noqa: E402
from safetensors.torch import save_model  # noqa: E402

from cachebrew.components import CacheBatches, RankShare  # noqa: E402
from cachebrew.hf import DistillationTrainer  # noqa: E402
from test_hf_trainer import INC, args, student  # noqa: E402


class TwoRanksInOne(CacheBatches):
    """What two ranks see, in one process: rank 0's batch k, then rank 1's (each rank reads its own rows)."""

    def __init__(self, cache, batch_size):
        super().__init__(cache, batch_size, shuffle=False, ranks=RankShare(0, 2, "records"))
        self.other = CacheBatches(cache, batch_size, shuffle=False, ranks=RankShare(1, 2, "records"))

    def __len__(self):
        return 2 * super().__len__()

    def __iter__(self):
        for mine, theirs in zip(super().__iter__(), self.other, strict=True):
            yield mine
            yield theirs


torch.set_num_threads(1)
cache, out, accumulation = sys.argv[1], sys.argv[2], int(sys.argv[3])
source = dict(teacher_cache=cache) if "WORLD_SIZE" in os.environ else dict(train_dataset=TwoRanksInOne(cache, 4))
trainer = DistillationTrainer(model=student(), distillation_config=INC, **source,
                              args=args(out, per_device_train_batch_size=4, gradient_accumulation_steps=accumulation,
                                        train_sampling_strategy="sequential",
                                        ddp_backend="gloo" if "WORLD_SIZE" in os.environ else None))
torch.manual_seed(1234)
trainer.distillation_loss.projections[0].reset_parameters()  # the same projection start on every rank and in both runs
trainer.train()
if trainer.args.process_index == 0:
    save_model(trainer.model, os.path.join(out, "student.safetensors"))
    save_model(trainer._projections(), os.path.join(out, "proj.safetensors"))
    print("steps", trainer.state.global_step)
