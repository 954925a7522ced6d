import numpy as np
import pytest
from datasets import ClassLabel, DatasetDict, Image
from PIL import Image as PILImage

from hf_gaf.train.data import load_digits_dataset


@pytest.fixture(scope="module")
def digits() -> DatasetDict:
    return load_digits_dataset()


def test_has_all_1797_digits_split_stratified(digits):
    assert len(digits["train"]) + len(digits["test"]) == 1797
    assert len(digits["test"]) == 360
    for split in digits.values():
        counts = np.bincount(split["label"], minlength=10)
        assert counts.max() - counts.min() <= 2 + len(split) // 100


def test_features_are_an_image_and_digit_names(digits):
    assert isinstance(digits["train"].features["img"], Image)
    assert digits["train"].features["label"] == ClassLabel(names=[str(digit) for digit in range(10)])
    image = digits["train"][0]["img"]
    assert isinstance(image, PILImage.Image)
    assert (image.size, image.mode) == ((8, 8), "L")


def test_pixels_span_the_full_byte_range(digits):
    pixels = np.stack([np.asarray(image) for image in digits["test"]["img"]])
    assert pixels.min() == 0 and pixels.max() == 255


def test_split_is_a_function_of_seed(digits):
    same = load_digits_dataset(seed=0)
    other = load_digits_dataset(seed=1, test_size=0.5)

    assert same["test"]["label"] == digits["test"]["label"]
    assert len(other["test"]) == 899
    assert other["train"]["label"] != digits["train"]["label"]


@pytest.mark.parametrize("test_size", [0, 1, 1.5])
def test_test_size_must_be_a_fraction(test_size):
    with pytest.raises(ValueError, match="test_size must be a fraction"):
        load_digits_dataset(test_size=test_size)
