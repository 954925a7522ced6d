"""What every benchmark script shares: where results go, JSON that stays standard, summaries, the machine,
and the training recipe of the accuracy sweeps.

Benchmarks write `benchmarks/results/<name>.json` (and plots beside it); `--quick` smoke runs
write `<name>_quick.*`, so that a smoke test never overwrites the published figures.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hf_gaf.testing import machine

__all__ = [
    "MAX_JOBS",
    "RESULTS_DIR",
    "RecipeArguments",
    "command_line",
    "json_safe",
    "machine",
    "mean_std",
    "output_stem",
    "pyplot",
    "recipe_argv",
    "save_figure",
    "write_json",
]

RESULTS_DIR = Path(__file__).resolve().parent / "results"
MAX_JOBS = 2  # the benchmark machine has 2 shared cores


@dataclass
class RecipeArguments:
    """How every run of an accuracy sweep trains, and how many train at once (defaults: the published recipe).

    The sweeps' argument classes extend it; [`recipe_argv`] turns it into the entry point's flags.
    """

    learning_rate: float = field(default=0.05, metadata={"help": "SGD learning rate (constant)."})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum."})
    weight_decay: float = field(default=0.0, metadata={"help": "SGD weight decay."})
    lr_scheduler_type: str = field(default="constant", metadata={"help": "transformers LR scheduler."})
    model_name: str = field(default="resnet18", metadata={"help": "timm architecture."})
    model_kwargs: str = field(
        default='{"layers": [1, 1, 1, 1], "channels": [16, 32, 64, 128]}',
        metadata={"help": "JSON object of timm keyword arguments (default: a narrow ResNet-10, 0.32M parameters)."},
    )
    augment: bool = field(default=False, metadata={"help": "Random padded crop + horizontal flip on training images."})
    threads: int = field(default=1, metadata={"help": "torch threads per run."})
    jobs: int = field(default=2, metadata={"help": f"Runs training at once, at most {MAX_JOBS}."})

    def __post_init__(self):
        if not 1 <= self.jobs <= MAX_JOBS:
            raise ValueError(f"--jobs must be 1 or {MAX_JOBS} (the machine has {MAX_JOBS} shared cores), got {self.jobs}.")
        json.loads(self.model_kwargs)


def recipe_argv(config: dict[str, Any]) -> list[str]:
    """The `python -m hf_gaf.train` flags of a [`RecipeArguments`] (as `dataclasses.asdict`)."""
    return [
        "--learning_rate", str(config["learning_rate"]),
        "--optim", "sgd", "--optim_args", f"momentum={config['momentum']}",
        "--weight_decay", str(config["weight_decay"]),
        "--lr_scheduler_type", config["lr_scheduler_type"],
        "--model_name", config["model_name"], "--model_kwargs", config["model_kwargs"],
        "--augment", str(config["augment"]),
    ]  # fmt: skip


def output_stem(name: str, *, quick: bool, tag: str = "") -> str:
    """`name`, `name_quick` for smoke runs, with `_tag` for extra runs beside the published one."""
    return "_".join([name, *(["quick"] if quick else []), *([tag] if tag else [])])


def command_line(script: str, argv: list[str] | None) -> str:
    """The command that reproduces this run, as written in the docs."""
    arguments = sys.argv[1:] if argv is None else argv
    return " ".join(["python", f"benchmarks/{script}", *arguments])


def json_safe(value: Any) -> Any:
    """`value` as standard JSON types: numpy and 0-d tensor scalars unwrapped, NaN and infinities as None
    (null, not NaN), keys as strings, anything else as its repr."""
    if isinstance(value, (np.generic, torch.Tensor)) and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, dict):
        return {str(key): json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return repr(value)


def write_json(path: Path, payload: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(json_safe(payload), indent=2, allow_nan=False) + "\n")
    return path


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation of the values that are not NaN (NaN, NaN if none)."""
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def pyplot():
    """matplotlib's pyplot on the file-only backend (benchmarks run without a display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path, title: str, *, dpi: int = 120) -> Path:
    """Title, lay out and write a benchmark's figure as PNG, then free it."""
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return path
