"""Symmetric label noise, as in the GAF paper's CIFAR-100 experiments.

The noisy labels go to a new column and the clean labels stay where they were, so one dataset
serves both sides of a label-noise experiment: training reads ``noisy_label`` as its labels,
metrics compare predictions with the clean column and, through ``label_flipped``, measure
memorisation on exactly the corrupted rows. CIFAR-100N (:func:`hf_gaf.train.data.load_cifar100n`)
produces the same three columns, so downstream code does not care where the noise came from.
"""

from __future__ import annotations

import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, Value

from .columns import column_as_numpy

NOISY_LABEL_COLUMN = "noisy_label"
"""Column holding the (possibly corrupted) label a model is trained on."""

FLIPPED_COLUMN = "label_flipped"
"""Bool column: True where the noisy label differs from the clean label."""


def add_symmetric_label_noise(
    dataset: Dataset,
    rate: float,
    *,
    seed: int,
    label_column: str = "label",
    noisy_column: str = NOISY_LABEL_COLUMN,
    flipped_column: str = FLIPPED_COLUMN,
) -> Dataset:
    """Return `dataset` with a symmetric-noise copy of `label_column` and a record of the flips.

    Contract (n rows, C classes):

    - exactly ``round(rate * n)`` rows are flipped, chosen uniformly without replacement;
    - a flipped row's noisy label is drawn uniformly from the C - 1 classes *other* than its clean
      label, so every flip really changes the label;
    - `noisy_column` is a ClassLabel with the same names as `label_column`; `flipped_column` is a
      bool column; `label_column` is left untouched (it stays the clean label);
    - the result depends only on `seed` and the clean labels (same seed, same flips).

    Raises:
        TypeError: `dataset` is a DatasetDict (noise belongs on the training split only).
        ValueError: `rate` is outside [0, 1); `label_column` is missing or not a ClassLabel with
            at least two classes; `noisy_column` equals `label_column` or already exists.
    """
    if isinstance(dataset, DatasetDict):
        raise TypeError(
            "add_symmetric_label_noise takes one split: pass dataset['train'], and keep the evaluation splits clean."
        )
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"rate must be in [0, 1), got {rate}: it is the fraction of labels to flip.")
    feature = dataset.features.get(label_column)
    if not isinstance(feature, ClassLabel):
        raise ValueError(
            f"Column {label_column!r} must be a ClassLabel (found {feature!r}; columns: "
            f"{dataset.column_names}). Pass label_column=<your label column>, or cast it with "
            f"dataset.cast_column({label_column!r}, ClassLabel(names=...))."
        )
    if feature.num_classes < 2:
        raise ValueError(f"Symmetric noise needs at least two classes; {label_column!r} has {feature.num_classes}.")
    if noisy_column == label_column:
        raise ValueError(
            f"noisy_column must differ from label_column ({label_column!r}): the clean label has to "
            f"stay available for metrics."
        )
    for column in (noisy_column, flipped_column):
        if column in dataset.column_names:
            raise ValueError(
                f"Column {column!r} already exists; remove it first "
                f"(dataset.remove_columns({column!r})) or pick another name."
            )

    clean = column_as_numpy(dataset, label_column).astype(np.int64)
    rng = np.random.default_rng(seed)
    n_flips = round(rate * len(clean))
    flipped_rows = rng.choice(len(clean), size=n_flips, replace=False)
    noisy = clean.copy()
    offsets = rng.integers(1, feature.num_classes, size=n_flips)
    noisy[flipped_rows] = (clean[flipped_rows] + offsets) % feature.num_classes
    flipped = np.zeros(len(clean), dtype=bool)
    flipped[flipped_rows] = True

    noisy_feature = ClassLabel(names=feature.names)
    dataset = dataset.add_column(noisy_column, noisy, feature=noisy_feature)
    return dataset.add_column(flipped_column, flipped, feature=Value("bool"))
