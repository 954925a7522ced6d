"""Accuracy and label-noise memorisation through `evaluate`, offline.

`evaluate.load("accuracy")` fetches its script from the Hub. The metric scripts here ship inside
the package (`hf_gaf/train/metrics/<name>/<name>.py`, the Hub's layout) and `load_metric` hands their
local path to `evaluate.load`, so they behave like Hub metrics and never touch the network.

With `transformers.Trainer`:

    trainer = Trainer(..., compute_metrics=accuracy_metrics())        # {"eval_accuracy": ...}

    # memorisation on a noisy training subset, rows in the dataset's order
    output = trainer.predict(train_subset)                            # labels = noisy labels
    compute_memorization(output.predictions, output.label_ids, train_subset["clean_label"])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import evaluate
import numpy as np
import torch

if TYPE_CHECKING:
    from transformers import EvalPrediction

__all__ = [
    "METRICS_DIR",
    "accuracy_metrics",
    "argmax_logits",
    "available_metrics",
    "compute_memorization",
    "load_metric",
    "memorization_metrics",
]

METRICS_DIR = Path(__file__).resolve().parent
"""Folder holding one sub-folder per metric script, in the Hub's layout."""

ArrayLike = np.ndarray | torch.Tensor | Sequence[int] | Sequence[bool]
ComputeMetrics = Callable[["EvalPrediction"], dict[str, float]]


def available_metrics() -> list[str]:
    """Names `load_metric` accepts: the metric scripts shipped with hf-gaf."""
    return sorted(p.parent.name for p in METRICS_DIR.glob("*/*.py") if p.stem == p.parent.name)


def load_metric(name: str, **kwargs: Any) -> evaluate.EvaluationModule:
    """Load a metric shipped with hf-gaf through `evaluate.load`, without the Hub.

    `kwargs` go to `evaluate.load`. `keep_in_memory` defaults to `True`: these metrics run on
    predictions the Trainer has already gathered, so the arrow cache files (and their locks)
    `evaluate` would otherwise write under `~/.cache` buy nothing.
    """
    if name not in available_metrics():
        raise ValueError(
            f"Unknown hf-gaf metric {name!r}; available: {available_metrics()}. Other metrics come "
            "from the Hub through evaluate.load(name), which needs network (or a local copy of the script)."
        )
    kwargs.setdefault("keep_in_memory", True)
    return evaluate.load(str(METRICS_DIR / name), **kwargs)


def argmax_logits(logits: torch.Tensor | tuple[torch.Tensor, ...], labels: Any = None) -> torch.Tensor:
    """Class ids from logits, for `Trainer(preprocess_logits_for_metrics=argmax_logits)`.

    Keeps one integer per row instead of `num_labels` floats while the Trainer accumulates
    predictions (e.g. 50,000 x 1,000 ImageNet logits). The metrics accept either form.
    """
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    return logits.argmax(dim=-1)


def accuracy_metrics() -> ComputeMetrics:
    """A `compute_metrics` for `transformers.Trainer` returning `{"accuracy": ...}`.

    Predictions may be logits `[N, num_labels]` or class ids `[N]` (see `argmax_logits`).
    The metric is loaded once, here, so a missing or broken metric fails before training starts.
    """
    metric = load_metric("accuracy")

    def compute_metrics(eval_pred: EvalPrediction) -> dict[str, float]:
        predictions, labels = eval_pred[0], eval_pred[1]
        predictions = _class_ids(predictions, "predictions")
        labels = _labels(labels, "label_ids", len(predictions))
        return metric.compute(predictions=predictions, references=labels)

    return compute_metrics


def compute_memorization(
    predictions: ArrayLike,
    noisy_labels: ArrayLike,
    clean_labels: ArrayLike,
    *,
    flipped: ArrayLike | None = None,
) -> dict[str, float]:
    """Memorisation of corrupted labels on training rows (see the `memorization` metric).

    Args:
        predictions: logits `[N, num_labels]` or class ids `[N]` for N training rows, e.g.
            `trainer.predict(train_subset).predictions`.
        noisy_labels: the labels the model was trained on, e.g. `.label_ids` of the same output.
        clean_labels: the true labels of the same rows, in the same order.
        flipped: optional record of which rows were corrupted (the noise column of
            `hf_gaf.train.data`). A row is corrupted exactly when its noisy and clean labels differ;
            the mask is checked against that, which catches clean labels in another order.

    Returns:
        `memorized`, `correct`, `other` (fractions of corrupted rows predicted as the noisy label,
        the true label, neither), `uncorrupted_accuracy`, `noise_rate` and `num_corrupted`.
        Without corrupted rows the three fractions are NaN and `num_corrupted` is 0.
    """
    predictions = _class_ids(predictions, "predictions")
    noisy = _labels(noisy_labels, "noisy_labels", len(predictions))
    clean = _labels(clean_labels, "clean_labels", len(predictions))
    if flipped is not None:
        _check_flipped(flipped, noisy, clean)
    return load_metric("memorization").compute(
        predictions=predictions, references=noisy, clean_references=clean
    )


def memorization_metrics(clean_labels: ArrayLike, *, flipped: ArrayLike | None = None) -> ComputeMetrics:
    """A `compute_metrics` for evaluating on a noisy training set: the memorisation measures.

    The Trainer passes the noisy labels the dataset holds as `label_ids`; the true labels come
    from here, in the evaluation dataset's order (the Trainer keeps that order, also across
    processes). Use it with the Trainer that evaluates on that dataset, e.g.
    `Trainer(..., eval_dataset=noisy_train_subset, compute_metrics=memorization_metrics(clean))`,
    or call `compute_memorization` on `trainer.predict(...)`.
    """
    clean = _labels(clean_labels, "clean_labels")
    mask = None if flipped is None else np.asarray(flipped)
    metric = load_metric("memorization")

    def compute_metrics(eval_pred: EvalPrediction) -> dict[str, float]:
        predictions = _class_ids(eval_pred[0], "predictions")
        if len(predictions) != len(clean):
            raise ValueError(
                f"memorization_metrics got {len(predictions)} predictions but was built with "
                f"{len(clean)} clean labels: evaluate on the same dataset the clean labels came from."
            )
        noisy = _labels(eval_pred[1], "label_ids", len(predictions))
        if mask is not None:
            _check_flipped(mask, noisy, clean)
        return metric.compute(predictions=predictions, references=noisy, clean_references=clean)

    return compute_metrics


def _to_numpy(values: Any) -> np.ndarray:
    if isinstance(values, (tuple, list)) and values and isinstance(values[0], (np.ndarray, torch.Tensor)):
        values = values[0]  # model outputs beyond the logits, or several label columns
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    return np.asarray(values)


def _class_ids(predictions: Any, name: str) -> np.ndarray:
    array = _to_numpy(predictions)
    if array.ndim == 2:
        return array.argmax(axis=-1)
    if array.ndim == 1 and (array.size == 0 or np.issubdtype(array.dtype, np.integer)):
        return array.astype(np.int64)
    raise ValueError(
        f"`{name}` must be logits [N, num_labels] or integer class ids [N], got shape "
        f"{array.shape} and dtype {array.dtype}."
    )


def _labels(labels: Any, name: str, expected: int | None = None) -> np.ndarray:
    array = _to_numpy(labels)
    if array.ndim != 1 or not (array.size == 0 or np.issubdtype(array.dtype, np.integer)):
        raise ValueError(f"`{name}` must be integer class ids [N], got shape {array.shape} and dtype {array.dtype}.")
    if expected is not None and len(array) != expected:
        raise ValueError(f"`{name}` has {len(array)} rows but there are {expected} predictions; pass one label per prediction, in the same order.")
    return array.astype(np.int64)


def _check_flipped(flipped: ArrayLike, noisy: np.ndarray, clean: np.ndarray) -> None:
    mask = _to_numpy(flipped)
    if mask.shape != noisy.shape:
        raise ValueError(f"`flipped` has shape {mask.shape} but there are {noisy.shape} labels; pass one flag per row.")
    differs = noisy != clean
    mismatched = np.flatnonzero(mask.astype(bool) != differs)
    if mismatched.size:
        row = int(mismatched[0])
        raise ValueError(
            f"`flipped` disagrees with the labels at {mismatched.size} rows, first at row {row}: "
            f"flipped={bool(mask[row])} but noisy label {noisy[row]} vs clean label {clean[row]}. "
            "The clean labels are probably not in the same order as the predictions."
        )
