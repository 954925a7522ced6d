"""CIFAR-100 images from the Hub with CIFAR-100N's human labels attached to the training split.

CIFAR-100N (Wei et al., 2022) gives every CIFAR-100 training image one label from a human
annotator; 40.2% of them disagree with the clean label. The release ships them as
`CIFAR-100_human.pt`, a `torch.save` of numpy arrays (keys `clean_label`, `noisy_label`,
`clean_coarse_label`, `noisy_coarse_label`) in the order of the CIFAR-100 training split.
Nothing in the file links a label to an image except that order, so [`attach_noisy_labels`]
checks it: the file's clean labels must equal the dataset's labels row by row.

A label file can also load and still be wrong. Labels must be integer arrays: float labels would
be truncated by a cast (and NaN would become a huge negative class), so they are refused. The
official release is recognised by its SHA-256 ([`CIFAR100N_RELEASE_SHA256`]); a file shaped
like the release with another digest is an edited or re-saved copy, and loading it warns
([`ModifiedLabelFileWarning`]), because results on it are not comparable with the paper's.
"""

from __future__ import annotations

import hashlib
import os
import warnings
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

CIFAR100N_RELEASE_SHA256 = "3ca5e261fcff3a50f5c19044daa342e6b5392eb0ef70c5b9761766f5f9c68192"
"""SHA-256 of `CIFAR-100_human.pt` as published in the CIFAR-N release (1,600,879 bytes)."""

CIFAR100N_RELEASE_KEYS = frozenset({"clean_label", "noisy_label", "clean_coarse_label", "noisy_coarse_label"})
"""The keys of the release file, each holding [`CIFAR100N_RELEASE_ROWS`] labels."""

CIFAR100N_RELEASE_ROWS = 50_000

CIFAR100N_RELEASE_NOISE_RATE = 0.402
"""Fraction of the release's `noisy_label` that differ from `clean_label` (20,100 of 50,000)."""


class ModifiedLabelFileWarning(UserWarning):
    """A label file shaped like the CIFAR-100N release does not have the release's SHA-256.

    It may be a legitimate re-save (same labels, new bytes) or an edited copy; either way results on
    it are not guaranteed to match the paper's. Silence it with
    `warnings.filterwarnings("ignore", category=ModifiedLabelFileWarning)` once you have checked the file.
    """


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
        dataset: anything [`datasets.load_dataset`] accepts with the layout of
            `uoft-cs/cifar100` (columns `img`, `fine_label`, `coarse_label`; splits
            `train` and `test`): the Hub id, or a local folder holding the same parquet files.
        noisy_labels: the CIFAR-100N label file: a local path, or a file on the Hub as
            `"hf://datasets/<repo_id>[@<revision>]/<path in repo>"` or its
            `https://huggingface.co/...` URL (see [`hf_gaf.train.data.hub.resolve_hub_file`]).
        noisy_label_key: which noisy labels to attach: `"noisy_label"` (100 fine classes,
            checked against `fine_label`) or `"noisy_coarse_label"` (20 superclasses, checked
            against `coarse_label`).
        cache_dir: Hugging Face cache directory for both the dataset and the label file.
        token: Hub token for private repositories (default: the logged-in user, if any).
        **load_dataset_kwargs: passed to [`datasets.load_dataset`] (e.g. `revision`).

    Returns:
        The DatasetDict of `dataset`; its `train` split gains `noisy_label` (a ClassLabel with
        the names of the checked column) and `label_flipped` (bool). Other splits are unchanged,
        so they keep clean labels.

    Raises:
        ValueError: the label file holds non-integer labels or does not match the training split
            (see [`attach_noisy_labels`]); both are checked before the images are loaded,
            except the row-by-row alignment, which needs them.
        CorruptCheckpointError: the label file fails its zip CRC-32 check (it was damaged).
        UntrustedPickleError: the label file contains anything but numpy arrays.
        HubUnreachableError: the Hub was needed but could not be reached; the message says how to
            run offline.

    Warns:
        ModifiedLabelFileWarning: the label file has the release's keys and 50,000 rows but not
            the release's SHA-256 ([`CIFAR100N_RELEASE_SHA256`]): an edited or re-saved copy.
    """
    try:
        label_path = resolve_hub_file(noisy_labels, cache_dir=cache_dir, token=token)
    except FileNotFoundError as error:
        raise FileNotFoundError(
            f"{error} CIFAR-100_human.pt is part of the CIFAR-N release: {CIFAR_N_RELEASE}"
        ) from error
    labels = load_numpy_checkpoint(label_path)
    source = os.fspath(noisy_labels)
    _checked_label_arrays(labels, noisy_label_key, source)
    _warn_if_modified_release(label_path, labels, source)
    with hub_errors_explained(f"dataset {os.fspath(dataset)!r}"):
        splits = datasets.load_dataset(os.fspath(dataset), cache_dir=cache_dir, token=token, **load_dataset_kwargs)
    if not isinstance(splits, DatasetDict) or "train" not in splits:
        found = f"splits {list(splits)}" if isinstance(splits, DatasetDict) else type(splits).__name__
        raise ValueError(
            f"{os.fspath(dataset)!r} must load as a DatasetDict with a 'train' split (got {found}). "
            f"Do not pass split=...: the test split is returned alongside, with clean labels."
        )
    splits["train"] = attach_noisy_labels(
        splits["train"], labels, noisy_label_key=noisy_label_key, source=source
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

    `labels` is the content of a CIFAR-N label file. The checks: both label arrays used (e.g.
    `clean_label` and `noisy_label`) have an integer dtype; the clean labels have one entry
    per row of `train` and equal its label column (e.g. `fine_label`) at every row; the noisy
    labels are classes of that column. A mismatch means the file and the dataset list images in
    different orders (or are different datasets), and every noisy label would land on the wrong
    image, so it is an error, naming the first mismatching row. `source` names the file in errors.

    Raises:
        ValueError: an unknown `noisy_label_key`, a missing key, non-integer labels (float, even
            integral-valued, or NaN), a length or row mismatch, or noisy labels outside the classes.
    """
    clean_key, label_column, file_clean, file_noisy = _checked_label_arrays(labels, noisy_label_key, source)
    feature = train.features.get(label_column)
    if not isinstance(feature, ClassLabel):
        raise ValueError(
            f"The training split needs a ClassLabel column {label_column!r} to check the labels "
            f"against (columns: {train.column_names}); load a dataset in the uoft-cs/cifar100 format."
        )

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

    file_noisy = file_noisy.astype(np.int64)
    file_clean = file_clean.astype(np.int64)
    train = train.add_column(noisy_column, file_noisy, feature=ClassLabel(names=feature.names))
    return train.add_column(flipped_column, file_noisy != file_clean, feature=Value("bool"))


def _checked_label_arrays(
    labels: Any, noisy_label_key: str, source: str
) -> tuple[str, str, np.ndarray, np.ndarray]:
    """The clean key, dataset column, clean labels and noisy labels for `noisy_label_key`, checked.

    Checks what needs no dataset (known key, keys present, integer dtypes), so that
    [`load_cifar100n`] refuses a wrong file before it loads any image.
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
    file_clean = _integer_labels(labels[clean_key], clean_key, source)
    file_noisy = _integer_labels(labels[noisy_label_key], noisy_label_key, source)
    return clean_key, label_column, file_clean, file_noisy


def _integer_labels(values: Any, key: str, source: str) -> np.ndarray:
    """`values` as a flat integer array; any other dtype (float, bool, complex, text) is refused.

    Floats are refused even when every value is integral: a file that stores class indices as
    floats was not written as a label file, and a cast would silently truncate 3.7 to 3 and turn
    NaN into -2**63, so `label_flipped` and the trained labels would disagree with the file.
    The message locates the first NaN, infinite or fractional value to help find the fault.
    """
    array = np.asarray(values).reshape(-1)
    if np.issubdtype(array.dtype, np.integer):
        return array
    detail = ""
    if np.issubdtype(array.dtype, np.floating):
        nan = np.flatnonzero(np.isnan(array))
        infinite = np.flatnonzero(np.isinf(array))
        fractional = np.flatnonzero(np.isfinite(array) & (array != np.round(array)))
        if nan.size:
            detail = f" ({nan.size} NaN, first at row {nan[0]})"
        elif infinite.size:
            detail = f" ({infinite.size} infinite, first at row {infinite[0]})"
        elif fractional.size:
            detail = f" ({fractional.size} non-integer, first at row {fractional[0]}: {array[fractional[0]]})"
        else:
            detail = " (all integral)"
    raise ValueError(
        f"{source}: {key!r} holds {array.dtype} values{detail}, but labels must be integers (class "
        f"indices). Labels stored as floats are refused even when every value is integral: casting "
        f"them would silently truncate fractions (3.7 -> 3) and turn NaN into -2**63. Use "
        f"CIFAR-100_human.pt from the CIFAR-N release ({CIFAR_N_RELEASE}), whose labels are int64, "
        f"or, once you have checked the values, re-save them as integers: "
        f"torch.save({{{key!r}: values.astype(np.int64), ...}}, path)."
    )


def _sha256(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of the file's bytes, read in chunks (`hashlib.file_digest` needs Python 3.11)."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _warn_if_modified_release(path: str | os.PathLike[str], labels: Any, source: str) -> None:
    """Warn with [`ModifiedLabelFileWarning`] if `labels` look like the release but `path` is not it.

    "Look like the release": exactly the release's keys, each with 50,000 entries. Smaller or
    differently keyed files are someone's own labels and are not compared. The digest is of the
    file's bytes, so a re-save of unchanged labels also warns: only the bytes prove the labels are
    the published ones.
    """
    if not isinstance(labels, dict) or set(labels) != CIFAR100N_RELEASE_KEYS:
        return
    if any(np.asarray(values).size != CIFAR100N_RELEASE_ROWS for values in labels.values()):
        return
    digest = _sha256(path)
    if digest == CIFAR100N_RELEASE_SHA256:
        return
    where = repr(source) if os.fspath(path) == source else f"{source!r} (local copy {os.fspath(path)!r})"
    noise_rate = float(np.mean(np.asarray(labels["noisy_label"]) != np.asarray(labels["clean_label"])))
    warnings.warn(
        f"{where} is not the CIFAR-100N release: it has the release's keys and "
        f"{CIFAR100N_RELEASE_ROWS:,} rows, but its SHA-256 is {digest}, while the release file has "
        f"SHA-256 {CIFAR100N_RELEASE_SHA256}. It is a re-saved or edited copy ({noise_rate:.2%} of "
        f"its noisy_label differ from clean_label; the release: {CIFAR100N_RELEASE_NOISE_RATE:.2%}), "
        f"so results on it may not match the paper's. Use CIFAR-100_human.pt from {CIFAR_N_RELEASE}; "
        f"if the copy is intended, silence this with "
        f"warnings.filterwarnings('ignore', category=ModifiedLabelFileWarning).",
        ModifiedLabelFileWarning,
        stacklevel=3,
    )
