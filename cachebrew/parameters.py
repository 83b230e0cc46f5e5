"""A parameter table of a model or state dict: counts, share and MB per module (TextBrewer's display_parameters)."""
from __future__ import annotations

import torch


class LayerNode:
    """One node of the module tree in `display_parameters`: value = [#params, MB]."""

    def __init__(self, name, parent=None, value=None, fullname=None):
        self.name = name
        self.fullname = fullname
        self.value = value
        self.children_name: dict[str, LayerNode] = {}
        self.parent = parent

    def __contains__(self, key):
        return key in self.children_name

    def __getitem__(self, key):
        return self.children_name[key]

    def __setitem__(self, key, value):
        self.children_name[key] = value

    def update(self, value):
        """Add `value` to every ancestor."""
        node = self.parent
        while node is not None:
            node.value = list(value) if node.value is None else [a + b for a, b in zip(node.value, value)]
            node = node.parent

    def format(self, level=0, total=None, indent="--", max_level=None, max_length=None):
        out = ""
        if total is None:
            total = self.value[0]
        if level == 0:
            max_length = self._max_name_length(indent, "  ", max_level=max_level) + 1
            out += "\n" + f"{'LAYER NAME':<{max_length}}\t{'#PARAMS':>15}\t{'RATIO':>10}\t{'MEM(MB)':>8}\n"
        row = f"{indent + self.name + ':':<{max_length}}\t{self.value[0]:15,d}\t{self.value[0] / total:>10.2%}\t{self.value[1]:>8.2f}\n"
        if max_level is not None and level == max_level:
            return out + row
        # A chain of single children is shown as a bare name, as TextBrewer does.
        out += f"{indent + self.name:{max_length}}\n" if len(self.children_name) == 1 else row
        for child in self.children_name.values():
            out += child.format(level + 1, total, indent="  " + indent, max_level=max_level, max_length=max_length)
        return out

    def _max_name_length(self, indent1="--", indent2="  ", level=0, max_level=None):
        length = len(self.name) + len(indent1) + level * len(indent2)
        if max_level is not None and level >= max_level:
            return length
        return max([length] + [c._max_name_length(indent1, indent2, level + 1, max_level) for c in self.children_name.values()])


def display_parameters(model, max_level=None):
    """Return (table, root LayerNode) of parameter counts and memory per module; shared tensors count once."""
    if isinstance(model, torch.nn.Module):
        state_dict = model.state_dict()
    elif isinstance(model, dict):
        state_dict = model
    else:
        raise TypeError("model should be either torch.nn.Module or a dict")
    seen = set()
    root = LayerNode("model", fullname="model")
    for key, value in state_dict.items():
        names = key.split(".")
        current = root
        for i, name in enumerate(names):
            if name not in current:
                current[name] = LayerNode(name, parent=current, fullname=".".join(names[: i + 1]))
            current = current[name]
        if value.data_ptr() in seen:
            current.value = [0, 0]
            current.name += "(shared)"
            current.fullname += "(shared)"
        else:
            seen.add(value.data_ptr())
            current.value = [value.numel(), value.numel() * value.element_size() / 1024 / 1024]
        current.update(current.value)
    return root.format(max_level=max_level), root
