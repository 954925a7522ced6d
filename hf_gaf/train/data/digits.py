"""scikit-learn's handwritten digits as a Hub-style image dataset that needs no network.

1,797 real 8x8 grayscale images of the digits 0-9 ship inside scikit-learn. Stored here as an
`Image` column plus a `ClassLabel` column, they go through exactly the code paths of a Hub
image dataset (transforms, label noise, balanced batches), so the default training run and the
tests exercise the real pipeline in seconds, offline.
"""

from __future__ import annotations

import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image
from PIL import Image as PILImage
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

DIGITS_FEATURES = Features({"img": Image(), "label": ClassLabel(names=[str(digit) for digit in range(10)])})
"""Columns of [`load_digits_dataset`]: `img` (8x8 grayscale PIL image), `label` ("0".."9")."""


def load_digits_dataset(*, test_size: float = 0.2, seed: int = 0) -> DatasetDict:
    """Return the digits as `DatasetDict(train=..., test=...)`, split stratified by class.

    The split depends only on `test_size` and `seed`. Pixel intensities 0..16 become 0..255
    (`round(v * 255 / 16)`); images keep their native 8x8 size (resize them in the transform,
    e.g. `image_size=32` for CIFAR-style ResNets).
    """
    if not 0.0 < test_size < 1.0:
        raise ValueError(f"test_size must be a fraction in (0, 1), got {test_size}.")
    digits = load_digits()
    pixels = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    train_rows, test_rows = train_test_split(
        np.arange(len(pixels)), test_size=test_size, random_state=seed, stratify=digits.target
    )

    def split(rows: np.ndarray) -> Dataset:
        images = [PILImage.fromarray(pixels[row], mode="L") for row in rows]
        return Dataset.from_dict({"img": images, "label": digits.target[rows].tolist()}, features=DIGITS_FEATURES)

    return DatasetDict(train=split(train_rows), test=split(test_rows))
