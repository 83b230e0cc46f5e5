import torch

from cachebrew.utils import display_parameters


def test_display_parameters_equals_textbrewer(textbrewer):
    from textbrewer.utils import display_parameters as tb_display

    from helpers import tiny_bert

    model = tiny_bert()
    for max_level in (None, 1, 3):
        ours, node = display_parameters(model, max_level=max_level)
        theirs, _ = tb_display(model, max_level=max_level)
        assert ours == theirs
    assert node.value[0] == sum(p.numel() for p in model.parameters())


def test_shared_weights_counted_once():
    lin = torch.nn.Linear(4, 4)
    sd = {"a.weight": lin.weight, "b.weight": lin.weight}
    table, node = display_parameters(sd)
    assert node.value[0] == 16
    assert "(shared)" in table
