"""MultiTaskDistiller draws tasks with empirical frequencies |d|^tau / sum |d'|^tau."""
import math

import numpy as np
import pytest
import torch

from cachebrew import DistillationConfig, MultiTaskDistiller, TrainingConfig
from cachebrew.distillers import task_sampling_weights


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(2, 2)

    def forward(self, x):
        return self.lin(x)


def _loader(n_batches):
    return torch.utils.data.DataLoader([torch.ones(2)] * n_batches, batch_size=1)


def test_task_sampling_weights_formula():
    w = task_sampling_weights({"a": 100, "b": 400, "c": 900}, tau=0.5)
    assert w == pytest.approx({"a": 10 / 60, "b": 20 / 60, "c": 30 / 60})
    assert task_sampling_weights({"a": 1, "b": 9}, tau=0) == {"a": 0.5, "b": 0.5}


@pytest.mark.parametrize("tau", [1.0, 0.5, 0.0])
def test_empirical_task_frequencies(tmp_path, tau):
    sizes = {"a": 5, "b": 20, "c": 45}
    model_S = Tiny()
    adaptor = lambda batch, out: {"logits": out}
    distiller = MultiTaskDistiller(
        TrainingConfig(device="cpu", output_dir=str(tmp_path), progress_bar=False, ckpt_steps=10_000),
        DistillationConfig(), model_T={k: Tiny() for k in sizes}, model_S=model_S,
        adaptor_T={k: adaptor for k in sizes}, adaptor_S={k: adaptor for k in sizes})
    n = 3000
    np.random.seed(0)
    with distiller:
        distiller.train(torch.optim.SGD(model_S.parameters(), lr=0.0), {k: _loader(v) for k, v in sizes.items()},
                        num_steps=n, tau=tau)
    counts = distiller.sampled_tasks
    assert sum(counts.values()) == n
    z = sum(v ** tau for v in sizes.values())
    for k, v in sizes.items():
        p = v ** tau / z
        sd = math.sqrt(p * (1 - p) / n)
        assert abs(counts[k] / n - p) < 4 * sd, (k, counts[k] / n, p)
