"""Collate transformed rows into the batch an image classifier's `forward` takes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch


def collate_image_classification(examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack rows of `{"pixel_values": tensor [C, H, W], "labels": int}` into one batch.

    Returns `pixel_values` (float tensor [B, C, H, W]) and `labels` (long tensor [B]), the
    keyword arguments of transformers image classifiers, so it serves as a Trainer's
    `data_collator`. Rows come from a dataset with
    [`hf_gaf.train.data.image_classification_transform`] set on it.
    """
    if not examples:
        raise ValueError("Cannot collate an empty batch.")
    first = examples[0]
    if "pixel_values" not in first or "labels" not in first:
        raise KeyError(
            f"Rows need 'pixel_values' and 'labels' but have {sorted(first)}. Set the image "
            f"transform first: dataset.with_transform(image_classification_transform(...)); with a "
            f"Trainer, also pass remove_unused_columns=False so it keeps the image column."
        )
    pixel_values = torch.stack([torch.as_tensor(example["pixel_values"]) for example in examples])
    labels = torch.as_tensor([int(example["labels"]) for example in examples], dtype=torch.long)
    return {"pixel_values": pixel_values.float(), "labels": labels}
