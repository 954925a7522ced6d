"""Gradient Agreement Filtering (GAF) for the Hugging Face training stack.

The math and the exchange import only torch; the Trainer integration (which pulls in
transformers) loads on first use of ``GAFTrainer`` or ``GAFTrainingArguments``.
"""

from typing import TYPE_CHECKING

from .exchange import EXCHANGES, GAFExchange, gaf_all_reduce
from .gradients import GradientBuffer
from .rule import RULES, GAFResult, filter_microgradients

if TYPE_CHECKING:
    from .trainer import GAFTrainer
    from .training_args import GAFTrainingArguments

__version__ = "0.1.0"

__all__ = [
    "EXCHANGES",
    "RULES",
    "GAFExchange",
    "GAFResult",
    "GAFTrainer",
    "GAFTrainingArguments",
    "GradientBuffer",
    "filter_microgradients",
    "gaf_all_reduce",
]

_LAZY = {"GAFTrainer": ".trainer", "GAFTrainingArguments": ".training_args"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
