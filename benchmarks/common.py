"""What every benchmark script shares: where results go, JSON that stays standard, summaries, the machine.

Benchmarks write `benchmarks/results/<name>.json` (and plots beside it); `--quick` smoke runs
write `<name>_quick.*`, so that a smoke test never overwrites the published figures.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hf_gaf.testing import machine

__all__ = [
    "RESULTS_DIR",
    "command_line",
    "json_safe",
    "machine",
    "mean_std",
    "output_stem",
    "pyplot",
    "save_figure",
    "write_json",
]

RESULTS_DIR = Path(__file__).resolve().parent / "results"


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
