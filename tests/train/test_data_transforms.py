import numpy as np
import pytest
import torch
from datasets import ClassLabel, Dataset, Features, Image
from PIL import Image as PILImage

from hf_gaf.train.data import (
    CIFAR100_MEAN,
    CIFAR100_STD,
    channel_mean_std,
    image_classification_transform,
    image_transform,
    load_digits_dataset,
)
from hf_gaf.train.data.transforms import RandomPaddedCrop


@pytest.fixture(scope="module")
def rgb_dataset() -> Dataset:
    rng = np.random.default_rng(0)
    images = [PILImage.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(6)]
    features = Features({"img": Image(), "fine_label": ClassLabel(num_classes=3)})
    return Dataset.from_dict({"img": images, "fine_label": [0, 1, 2, 0, 1, 2]}, features=features)


@pytest.fixture(scope="module")
def digits_train() -> Dataset:
    return load_digits_dataset()["train"]


def test_eval_transform_only_normalises(rgb_dataset):
    transform = image_classification_transform(
        train=False, mean=CIFAR100_MEAN, std=CIFAR100_STD, label_column="fine_label"
    )

    row = rgb_dataset.with_transform(transform)[0]

    raw = torch.tensor(np.array(rgb_dataset[0]["img"]), dtype=torch.float32).permute(2, 0, 1) / 255
    expected = (raw - torch.tensor(CIFAR100_MEAN)[:, None, None]) / torch.tensor(CIFAR100_STD)[:, None, None]
    assert set(row) == {"pixel_values", "labels"}
    assert row["labels"] == 0
    assert type(row["pixel_values"]) is torch.Tensor and row["pixel_values"].dtype == torch.float32
    torch.testing.assert_close(row["pixel_values"], expected)


def test_train_transform_augments_and_keeps_the_shape(rgb_dataset):
    train = rgb_dataset.with_transform(
        image_classification_transform(train=True, mean=CIFAR100_MEAN, std=CIFAR100_STD, label_column="fine_label")
    )
    torch.manual_seed(0)

    views = [train[0]["pixel_values"] for _ in range(8)]

    assert all(view.shape == (3, 32, 32) for view in views)
    assert any(not torch.equal(views[0], view) for view in views[1:])


def test_random_padded_crop_shifts_by_at_most_the_padding():
    image = torch.arange(1, 65, dtype=torch.float32).reshape(1, 8, 8)
    crop = RandomPaddedCrop(2)
    torch.manual_seed(0)

    for _ in range(20):
        out = crop(image)
        assert out.shape == image.shape
        rows, cols = torch.nonzero(out[0] == 1, as_tuple=True)
        if rows.numel():
            assert rows.item() <= 2 and cols.item() <= 2
        assert (out > 0).sum() >= 6 * 6


def test_grayscale_digits_become_rgb_and_are_resized(digits_train):
    mean, std = channel_mean_std(digits_train)
    transform = image_classification_transform(train=True, mean=mean, std=std, image_size=32)

    row = digits_train.with_transform(transform)[0]

    assert row["pixel_values"].shape == (3, 32, 32)
    assert row["labels"] == digits_train[0]["label"]


def test_single_channel_output(digits_train):
    pipeline = image_transform(train=False, mean=(0.3,), std=(0.4,), num_channels=1)

    assert pipeline(digits_train[0]["img"]).shape == (1, 8, 8)


def test_channel_mean_std_matches_numpy(digits_train):
    mean, std = channel_mean_std(digits_train)

    pixels = np.stack([np.asarray(image, dtype=np.float64) / 255 for image in digits_train["img"]])
    assert len(mean) == len(std) == 3
    np.testing.assert_allclose(mean, [pixels.mean()] * 3, rtol=1e-6)
    np.testing.assert_allclose(std, [pixels.std()] * 3, rtol=1e-6)


def test_normalised_training_images_have_zero_mean_unit_std(digits_train):
    mean, std = channel_mean_std(digits_train)
    dataset = digits_train.select(range(200)).with_transform(
        image_classification_transform(train=False, mean=mean, std=std)
    )

    values = torch.stack(dataset[:]["pixel_values"])

    assert abs(values.mean().item()) < 0.15
    assert abs(values.std().item() - 1) < 0.15


def test_missing_column_names_the_fix(rgb_dataset):
    dataset = rgb_dataset.with_transform(
        image_classification_transform(train=False, mean=CIFAR100_MEAN, std=CIFAR100_STD)
    )

    with pytest.raises(KeyError, match=r"needs columns \['label'\].*label_column="):
        dataset[0]


def test_statistics_must_match_the_channels():
    with pytest.raises(ValueError, match="one value per channel"):
        image_transform(train=False, mean=(0.5,), std=(0.5,), num_channels=3)


def test_channel_mean_std_handles_images_of_different_sizes():
    small, large = np.full((2, 2), 0, np.uint8), np.full((4, 4), 255, np.uint8)
    features = Features({"img": Image()})
    dataset = Dataset.from_dict({"img": [PILImage.fromarray(small), PILImage.fromarray(large)]}, features=features)

    mean, std = channel_mean_std(dataset, num_channels=1)

    assert mean == pytest.approx((16 / 20,))
    assert std == pytest.approx((np.sqrt(0.8 * 0.2),))
