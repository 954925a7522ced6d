"""Gradient Agreement Filtering (GAF) for the Hugging Face training stack.

The math (`kernel`, `rule`), the exchanges across processes (`exchange` for data parallelism,
`fsdp` for FSDP2, loaded on first use) and the gradient buffer (`gradients`) import only torch;
the Trainer integration (`GAFMixin`, `GAFTrainer`,
`GAFArguments`, which pull in transformers) and the TRL pairing (`GAFSFTTrainer`, which needs
trl) load on first use. The paper's experiments live beside the library in `hf_gaf.train`.
"""

from typing import TYPE_CHECKING

from .exchange import EXCHANGES, GAFExchange, gaf_all_reduce
from .gradients import GradientBuffer
from .rule import RULES, GAFResult, Units, filter_microgradients

if TYPE_CHECKING:
    from .arguments import GAFArguments, GAFTrainingArguments
    from .fsdp import FSDPExchange
    from .state import GAFState
    from .trainer import GAFMixin, GAFTrainer
    from .trl import GAFSFTConfig, GAFSFTTrainer

__version__ = "0.2.0"

__all__ = [
    "EXCHANGES",
    "RULES",
    "FSDPExchange",
    "GAFArguments",
    "GAFExchange",
    "GAFMixin",
    "GAFResult",
    "GAFSFTConfig",
    "GAFSFTTrainer",
    "GAFState",
    "GAFTrainer",
    "GAFTrainingArguments",
    "GradientBuffer",
    "Units",
    "filter_microgradients",
    "gaf_all_reduce",
]

_LAZY = {
    "FSDPExchange": ".fsdp",
    "GAFArguments": ".arguments",
    "GAFTrainingArguments": ".arguments",
    "GAFState": ".state",
    "GAFMixin": ".trainer",
    "GAFTrainer": ".trainer",
    "GAFSFTConfig": ".trl",
    "GAFSFTTrainer": ".trl",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
