"""TextBrewer's `utils` names: loader cycling, BERT-style init and the parameter table, from their homes."""
from .distillers.loop import cycle
from .parameters import LayerNode, display_parameters
from .projections import initializer_builder

__all__ = ["LayerNode", "cycle", "display_parameters", "initializer_builder"]
