"""The paper's experiments, beside the GAF library: `python -m hf_gaf.train`.

Hub image datasets, CIFAR-100N labels, label noise and class-balanced batches (`data`), timm
models as transformers models (`models`), accuracy and memorisation metrics (`metrics`), the
experiments' trainer (`trainer`) and the entry point (`cli`). The library (`hf_gaf`) imports
nothing from here.
"""

from .cli import build_trainer, evaluate_run, main, parse_arguments

__all__ = ["build_trainer", "evaluate_run", "main", "parse_arguments"]
