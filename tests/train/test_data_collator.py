import pytest
import torch
from torch.utils.data import DataLoader

from hf_gaf.train.data import (
    ClassBalancedSampler,
    channel_mean_std,
    collate_image_classification,
    image_classification_transform,
    load_digits_dataset,
)


def test_stacks_pixel_values_and_labels():
    rows = [{"pixel_values": torch.rand(3, 8, 8), "labels": label} for label in (3, 1)]

    batch = collate_image_classification(rows)

    assert batch["pixel_values"].shape == (2, 3, 8, 8) and batch["pixel_values"].dtype == torch.float32
    assert batch["labels"].dtype == torch.long
    assert batch["labels"].tolist() == [3, 1]
    torch.testing.assert_close(batch["pixel_values"][1], rows[1]["pixel_values"])


def test_rows_without_a_transform_name_the_fix():
    with pytest.raises(KeyError, match="remove_unused_columns=False"):
        collate_image_classification([{"img": None, "label": 0}])


def test_digits_through_transform_balanced_sampler_and_collator():
    train = load_digits_dataset()["train"]
    mean, std = channel_mean_std(train)
    sampler = ClassBalancedSampler.from_dataset(train, 2, label_column="label")
    train = train.with_transform(image_classification_transform(train=True, mean=mean, std=std, image_size=16))
    loader = DataLoader(train, sampler=sampler, batch_size=sampler.batch_size, collate_fn=collate_image_classification)

    batch = next(iter(loader))

    assert batch["pixel_values"].shape == (20, 3, 16, 16)
    assert torch.bincount(batch["labels"], minlength=10).tolist() == [2] * 10
