"""Run by tests/distillers/test_ddp.py under torchrun (2 processes, gloo) or as one plain process.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/ddp_worker.py OUT_DIR
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from helpers import loader, make_examples, tiny_bert  # noqa: E402

import cachebrew  # noqa: E402
from cachebrew.core.weights import save_checkpoint  # noqa: E402


def adaptor(batch, out):  # no inputs_mask: every rank's share of the batch then has the same weight
    return {"logits": out.logits, "hidden": out.hidden_states}


def main(out_dir, global_batch=8):
    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    teacher = tiny_bert(seed=0, layers=3, hidden=48)
    student = tiny_bert(seed=1, layers=2, hidden=32)
    examples = make_examples(32)
    if world > 1:
        torch.distributed.init_process_group("gloo")
        sampler = torch.utils.data.DistributedSampler(examples, shuffle=False)
        data = torch.utils.data.DataLoader(examples, batch_size=global_batch // world, sampler=sampler)
    else:
        data = loader(examples, batch_size=global_batch)
    torch.manual_seed(1234)
    distiller = cachebrew.GeneralDistiller(
        cachebrew.TrainingConfig(device="cpu", output_dir=out_dir, progress_bar=False, gradient_accumulation_steps=2),
        cachebrew.DistillationConfig(temperature=4, intermediate_matches=[
            {"layer_T": 3, "layer_S": 2, "feature": "hidden", "loss": "hidden_mse", "weight": 1,
             "proj": ["linear", 32, 48]}]),
        model_T=teacher, model_S=student, adaptor_T=adaptor, adaptor_S=adaptor)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.5)
    with distiller:
        distiller.train(optimizer, data, num_epochs=2)
    if distiller.rank == 0:
        proj = distiller.projs[0].module if hasattr(distiller.projs[0], "module") else distiller.projs[0]
        save_checkpoint(student, os.path.join(out_dir, "final.safetensors"), {"world_size": world})
        save_checkpoint(proj, os.path.join(out_dir, "proj.safetensors"))


if __name__ == "__main__":
    main(sys.argv[1])
