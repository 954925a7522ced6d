"""Synthetic label noise: symmetric (the GAF paper's CIFAR-100 noise) and class-dependent.

The noisy labels go to a new column and the clean labels stay where they were, so one dataset
serves both sides of a label-noise experiment: training reads `noisy_label` as its labels,
metrics compare predictions with the clean column and, through `label_flipped`, measure
memorisation on exactly the corrupted rows. CIFAR-100N ([`hf_gaf.train.data.load_cifar100n`])
produces the same three columns, so downstream code does not care where the noise came from.

Both kinds flip exactly `round(rate * n)` rows chosen from `seed`; they differ in where a
flipped label goes:

- symmetric ([`add_symmetric_label_noise`]): to a class drawn uniformly from the others, so
  the wrong labels of a class are spread over all the other classes;
- class-dependent ([`add_class_dependent_label_noise`]): to the one class a fixed confusion
  map names for it (e.g. Shirt to T-shirt/top), as human annotators err. Every wrong label of a
  class then points the same way, a harder case for a filter that looks for agreement: two
  micro-batches with the same kind of mistake can agree with each other.

[`add_label_noise`] names the kind by a string, so that every split which must share one noise
process (the training split, and a validation split held out of the training images whose
labels are as noisy as the training labels, which is the validation data users have) is
corrupted by the same call.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, Value

from .columns import column_as_numpy

NOISY_LABEL_COLUMN = "noisy_label"
"""Column holding the (possibly corrupted) label a model is trained on."""

FLIPPED_COLUMN = "label_flipped"
"""Bool column: True where the noisy label differs from the clean label."""

FASHION_MNIST_CONFUSIONS: dict[str, str] = {
    "T - shirt / top": "Shirt",
    "Shirt": "T - shirt / top",
    "Pullover": "Coat",
    "Coat": "Pullover",
    "Sandal": "Sneaker",
    "Sneaker": "Sandal",
    "Trouser": "Dress",
    "Dress": "Trouser",
    "Bag": "Ankle boot",
    "Ankle boot": "Bag",
}
"""The confusion map of Fashion-MNIST's class-dependent noise, by the Hub's class names.

Five swapped pairs of classes that look alike at 28x28: two pairs of tops (T-shirt/top and
Shirt, Pullover and Coat), the open and closed low shoes (Sandal and Sneaker) and the two long
narrow garments (Trouser and Dress); Bag and Ankle boot, whose usual confusions (the tops, and
Sneaker) are already paired, make the fifth. Pairs rather than a one-way map, so that every class
both loses and gains rows and the class frequencies stay balanced in expectation; and every class
has a partner, so every row can be flipped. Below a rate of 0.5 the true class keeps the majority
of each class's labels; at 0.5 the two classes of a pair can no longer be told apart from their
labels, and above it they are swapped.
"""


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

    - exactly `round(rate * n)` rows are flipped, chosen uniformly without replacement;
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
    feature = _check_noise_arguments(
        dataset, rate, "add_symmetric_label_noise", label_column, noisy_column, flipped_column
    )
    clean = column_as_numpy(dataset, label_column).astype(np.int64)
    rng = np.random.default_rng(seed)
    n_flips = round(rate * len(clean))
    flipped_rows = rng.choice(len(clean), size=n_flips, replace=False)
    noisy = clean.copy()
    offsets = rng.integers(1, feature.num_classes, size=n_flips)
    noisy[flipped_rows] = (clean[flipped_rows] + offsets) % feature.num_classes
    return _with_noise_columns(dataset, feature, noisy, flipped_rows, noisy_column, flipped_column)


def add_class_dependent_label_noise(
    dataset: Dataset,
    rate: float,
    *,
    seed: int,
    confusions: Mapping[int | str, int | str],
    label_column: str = "label",
    noisy_column: str = NOISY_LABEL_COLUMN,
    flipped_column: str = FLIPPED_COLUMN,
) -> Dataset:
    """Return `dataset` with a class-dependent-noise copy of `label_column` and a record of the flips.

    Args:
        dataset: one split (the training split) with a ClassLabel `label_column`.
        rate: fraction of *all* rows to flip, in [0, 1).
        seed: seeds the choice of rows.
        confusions: the confusion map, `{class: class it is mistaken for}`, by class id or by the
            ClassLabel's names (e.g. [`FASHION_MNIST_CONFUSIONS`]). Classes it leaves out are
            never flipped.
        label_column, noisy_column, flipped_column: as in [`add_symmetric_label_noise`].

    Contract (n rows):

    - exactly `round(rate * n)` rows are flipped, chosen uniformly without replacement among
      the rows whose clean class the map names (every row, when it names every class);
    - a flipped row's noisy label is `confusions[clean label]`, never the clean label itself;
    - columns as in [`add_symmetric_label_noise`]: `noisy_column` a ClassLabel with the names of
      `label_column`, `flipped_column` bool, `label_column` untouched;
    - the result depends only on `seed`, `confusions` and the clean labels.

    Raises:
        TypeError: `dataset` is a DatasetDict.
        ValueError: as [`add_symmetric_label_noise`]; also when the map names a class the
            ClassLabel does not have, maps a class to itself or names one class twice, or when
            fewer rows than `round(rate * n)` belong to the classes it names.
    """
    feature = _check_noise_arguments(
        dataset, rate, "add_class_dependent_label_noise", label_column, noisy_column, flipped_column
    )
    target = _confusion_table(confusions, feature)
    clean = column_as_numpy(dataset, label_column).astype(np.int64)
    eligible = np.flatnonzero(target[clean] >= 0)
    n_flips = round(rate * len(clean))
    if n_flips > len(eligible):
        raise ValueError(
            f"rate {rate} asks for {n_flips} flipped rows, but only {len(eligible)} of the {len(clean)} rows belong to a "
            "class the confusion map names. Lower the rate or map more classes."
        )
    flipped_rows = np.random.default_rng(seed).choice(eligible, size=n_flips, replace=False)
    noisy = clean.copy()
    noisy[flipped_rows] = target[clean[flipped_rows]]
    return _with_noise_columns(dataset, feature, noisy, flipped_rows, noisy_column, flipped_column)


NOISE_TYPES = ("symmetric", "class_dependent")
"""The kinds of synthetic label noise, as [`add_label_noise`] names them."""


def add_label_noise(
    dataset: Dataset,
    rate: float,
    *,
    noise_type: str,
    seed: int,
    confusions: Mapping[int | str, int | str] | None = None,
    label_column: str = "label",
    noisy_column: str = NOISY_LABEL_COLUMN,
    flipped_column: str = FLIPPED_COLUMN,
) -> Dataset:
    """Return `dataset` with label noise of the kind `noise_type` names, and a record of the flips.

    `"symmetric"` is [`add_symmetric_label_noise`], `"class_dependent"` is
    [`add_class_dependent_label_noise`] with `confusions`; the contract (exactly `round(rate * n)`
    rows flipped, the columns, the dependence on `seed` alone) is theirs. Use it for every split that
    must share the training split's noise process, e.g. the validation rows held out of the training
    images: same `noise_type`, `rate` and `confusions`, a `seed` of the split's own (the same seed on
    splits of equal size would flip the same row positions).

    Raises:
        ValueError: `noise_type` is not one of [`NOISE_TYPES`]; `confusions` is missing for
            class-dependent noise (e.g. pass [`FASHION_MNIST_CONFUSIONS`]); or what the function of
            that kind raises.
    """
    columns = dict(label_column=label_column, noisy_column=noisy_column, flipped_column=flipped_column)
    if noise_type == "symmetric":
        return add_symmetric_label_noise(dataset, rate, seed=seed, **columns)
    if noise_type == "class_dependent":
        if confusions is None:
            raise ValueError(
                "Class-dependent noise needs the confusion map, {class: class it is mistaken for}: pass confusions=..., "
                "e.g. hf_gaf.train.data.FASHION_MNIST_CONFUSIONS for Fashion-MNIST."
            )
        return add_class_dependent_label_noise(dataset, rate, seed=seed, confusions=confusions, **columns)
    raise ValueError(f"noise_type must be one of {NOISE_TYPES}, got {noise_type!r}.")


def _check_noise_arguments(
    dataset: Dataset, rate: float, function: str, label_column: str, noisy_column: str, flipped_column: str
) -> ClassLabel:
    """Validate what every kind of noise needs; return the clean label's ClassLabel."""
    if isinstance(dataset, DatasetDict):
        raise TypeError(f"{function} takes one split: pass dataset['train'], and keep the evaluation splits clean.")
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
        raise ValueError(f"Label noise needs at least two classes; {label_column!r} has {feature.num_classes}.")
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
    return feature


def _confusion_table(confusions: Mapping[int | str, int | str], feature: ClassLabel) -> np.ndarray:
    """`confusions` as an array: the class id each class is flipped to, -1 for classes never flipped."""
    target = np.full(feature.num_classes, -1, dtype=np.int64)
    for source, destination in confusions.items():
        source_id, destination_id = _class_id(source, feature), _class_id(destination, feature)
        if source_id == destination_id:
            raise ValueError(f"The confusion map sends class {source!r} to itself; a flip must change the label.")
        if target[source_id] >= 0:
            raise ValueError(f"The confusion map names class {feature.int2str(source_id)!r} (id {source_id}) twice.")
        target[source_id] = destination_id
    return target


def _class_id(value: int | str, feature: ClassLabel) -> int:
    if isinstance(value, str):
        if value not in feature.names:
            raise ValueError(f"The confusion map names class {value!r}, which is not one of {feature.names}.")
        return feature.str2int(value)
    is_id = isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
    if not is_id or not 0 <= value < feature.num_classes:
        raise ValueError(
            f"The confusion map names class {value!r}; classes are ids 0..{feature.num_classes - 1} or the names "
            f"{feature.names}."
        )
    return int(value)


def _with_noise_columns(
    dataset: Dataset,
    feature: ClassLabel,
    noisy: np.ndarray,
    flipped_rows: np.ndarray,
    noisy_column: str,
    flipped_column: str,
) -> Dataset:
    flipped = np.zeros(len(noisy), dtype=bool)
    flipped[flipped_rows] = True
    dataset = dataset.add_column(noisy_column, noisy, feature=ClassLabel(names=feature.names))
    return dataset.add_column(flipped_column, flipped, feature=Value("bool"))
