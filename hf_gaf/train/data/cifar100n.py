"""CIFAR-100 images from the Hub with CIFAR-100N's human labels attached to the training split.

CIFAR-100N (Wei et al., 2022) gives every CIFAR-100 training image one label from a human
annotator; 40.2% of them disagree with the clean label. The release ships them as
``CIFAR-100_human.pt``, a `torch.save` of numpy arrays (keys ``clean_label``, ``noisy_label``,
``clean_coarse_label``, ``noisy_coarse_label``) in the order of the CIFAR-100 training split.
Nothing in the file links a label to an image except that order, so :func:`attach_noisy_labels`
checks it: the file's clean labels must equal the dataset's labels row by row.
"""

from __future__ import annotations

import os
from typing import Any

import datasets
import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, Value

from .columns import column_as_numpy
from .hub import hub_errors_explained, resolve_hub_file
from .noise import FLIPPED_COLUMN, NOISY_LABEL_COLUMN
from .numpy_checkpoint import load_numpy_checkpoint

CIFAR100_DATASET = "uoft-cs/cifar100"

CIFAR_N_RELEASE = "https://github.com/UCSC-REAL/cifar-10-100n (data/CIFAR-100_human.pt)"

CLEAN_COUNTERPARTS: dict[str, tuple[str, str]] = {
    "noisy_label": ("clean_label", "fine_label"),
    "noisy_coarse_label": ("clean_coarse_label", "coarse_label"),
}
"""For each noisy key of the label file: its clean key in the file and the dataset column it must match."""


def load_cifar100n(
    dataset: str | os.PathLike[str] = CIFAR100_DATASET,
    noisy_labels: str | os.PathLike[str] = "CIFAR-100_human.pt",
    *,
    noisy_label_key: str = "noisy_label",
    cache_dir: str | os.PathLike[str] | None = None,
    token: str | bool | None = None,
    **load_dataset_kwargs: Any,
) -> DatasetDict:
    """Load CIFAR-100 with CIFAR-100N's human labels on its training split.

    Args:
        dataset: anything :func:`datasets.load_dataset` accepts with the layout of
            ``uoft-cs/cifar100`` (columns ``img``, ``fine_label``, ``coarse_label``; splits
            ``train`` and ``test``): the Hub id, or a local folder holding the same parquet files.
        noisy_labels: the CIFAR-100N label file: a local path, or a file on the Hub as
            ``"hf://datasets/<repo_id>[@<revision>]/<path in repo>"`` or its
            ``https://huggingface.co/...`` URL (see :func:`hf_gaf.train.data.hub.resolve_hub_file`).
        noisy_label_key: which noisy labels to attach: ``"noisy_label"`` (100 fine classes,
            checked against ``fine_label``) or ``"noisy_coarse_label"`` (20 superclasses, checked
            against ``coarse_label``).
        cache_dir: Hugging Face cache directory for both the dataset and the label file.
        token: Hub token for private repositories (default: the logged-in user, if any).
        **load_dataset_kwargs: passed to :func:`datasets.load_dataset` (e.g. ``revision``).

    Returns:
        The DatasetDict of `dataset`; its ``train`` split gains ``noisy_label`` (a ClassLabel with
        the names of the checked column) and ``label_flipped`` (bool). Other splits are unchanged,
        so they keep clean labels.

    Raises:
        ValueError: the label file does not match the training split (see :func:`attach_noisy_labels`).
        UntrustedPickleError: the label file contains anything but numpy arrays.
        HubUnreachableError: the Hub was needed but could not be reached; the message says how to
            run offline.
    """
    try:
        label_path = resolve_hub_file(noisy_labels, cache_dir=cache_dir, token=token)
    except FileNotFoundError as error:
        raise FileNotFoundError(
            f"{error} CIFAR-100_human.pt is part of the CIFAR-N release: {CIFAR_N_RELEASE}"
        ) from error
    labels = load_numpy_checkpoint(label_path)
    with hub_errors_explained(f"dataset {os.fspath(dataset)!r}"):
        splits = datasets.load_dataset(os.fspath(dataset), cache_dir=cache_dir, token=token, **load_dataset_kwargs)
    if not isinstance(splits, DatasetDict) or "train" not in splits:
        found = f"splits {list(splits)}" if isinstance(splits, DatasetDict) else type(splits).__name__
        raise ValueError(
            f"{os.fspath(dataset)!r} must load as a DatasetDict with a 'train' split (got {found}). "
            f"Do not pass split=...: the test split is returned alongside, with clean labels."
        )
    splits["train"] = attach_noisy_labels(
        splits["train"], labels, noisy_label_key=noisy_label_key, source=os.fspath(noisy_labels)
    )
    return splits


def attach_noisy_labels(
    train: Dataset,
    labels: dict[str, np.ndarray],
    *,
    noisy_label_key: str = "noisy_label",
    noisy_column: str = NOISY_LABEL_COLUMN,
    flipped_column: str = FLIPPED_COLUMN,
    source: str = "the label file",
) -> Dataset:
    """Add CIFAR-N style human labels to `train` after checking they describe the same images.

    `labels` is the content of a CIFAR-N label file. The check: the file's clean labels (e.g.
    ``clean_label``) must have one entry per row of `train` and equal its label column (e.g.
    ``fine_label``) at every row. A mismatch means the file and the dataset list images in
    different orders (or are different datasets), and every noisy label would land on the wrong
    image, so it is an error, naming the first mismatching row.
    """
    if noisy_label_key not in CLEAN_COUNTERPARTS:
        raise ValueError(f"noisy_label_key must be one of {sorted(CLEAN_COUNTERPARTS)}, got {noisy_label_key!r}.")
    clean_key, label_column = CLEAN_COUNTERPARTS[noisy_label_key]
    if not isinstance(labels, dict) or not {clean_key, noisy_label_key} <= labels.keys():
        found = sorted(labels) if isinstance(labels, dict) else type(labels).__name__
        raise ValueError(
            f"{source} must hold a dict with keys {clean_key!r} and {noisy_label_key!r} (found "
            f"{found}). Use CIFAR-100_human.pt from the CIFAR-N release."
        )
    feature = train.features.get(label_column)
    if not isinstance(feature, ClassLabel):
        raise ValueError(
            f"The training split needs a ClassLabel column {label_column!r} to check the labels "
            f"against (columns: {train.column_names}); load a dataset in the uoft-cs/cifar100 format."
        )

    file_clean = np.asarray(labels[clean_key]).reshape(-1)
    file_noisy = np.asarray(labels[noisy_label_key]).reshape(-1)
    dataset_clean = column_as_numpy(train, label_column)
    if not len(file_clean) == len(file_noisy) == len(dataset_clean):
        raise ValueError(
            f"{source} has {len(file_clean)} {clean_key!r} and {len(file_noisy)} "
            f"{noisy_label_key!r} entries but the training split has {len(dataset_clean)} rows. "
            f"Use the full, unfiltered CIFAR-100 training split (50,000 rows) with the matching "
            f"CIFAR-100N file."
        )
    mismatches = np.flatnonzero(file_clean != dataset_clean)
    if mismatches.size:
        row = int(mismatches[0])
        raise ValueError(
            f"{source} does not match the training split: at row {row}, {clean_key} is "
            f"{int(file_clean[row])} but the dataset's {label_column} is {int(dataset_clean[row])} "
            f"({mismatches.size} mismatching rows in all). The file must list the training images "
            f"in the dataset's order: use the original CIFAR-100 train split (uoft-cs/cifar100) "
            f"without shuffling, filtering or re-splitting it before attaching the labels."
        )
    if file_noisy.min(initial=0) < 0 or file_noisy.max(initial=0) >= feature.num_classes:
        raise ValueError(
            f"{source}: {noisy_label_key!r} has values outside [0, {feature.num_classes}) of "
            f"{label_column!r}; the file does not belong to this dataset."
        )

    train = train.add_column(noisy_column, file_noisy.astype(np.int64), feature=ClassLabel(names=feature.names))
    return train.add_column(flipped_column, file_noisy != file_clean, feature=Value("bool"))
