"""Image preprocessing for classification, applied lazily with `Dataset.set_transform`.

Training uses the paper's CIFAR augmentation (random crop with zero padding 4, horizontal flip)
then per-channel normalisation; evaluation only normalises. Transforms run on the fly when rows
are read, so the dataset on disk stays the original images and each epoch sees new augmentations.

Typical use:

```python
mean, std = CIFAR100_MEAN, CIFAR100_STD          # or channel_mean_std(splits["train"])
train = splits["train"].with_transform(
    image_classification_transform(train=True, mean=mean, std=std, label_column="noisy_label")
)
test = splits["test"].with_transform(
    image_classification_transform(train=False, mean=mean, std=std, label_column="fine_label")
)
```

Rows then read as `{"pixel_values": float tensor [C, H, W], "labels": int}`, ready for
[`hf_gaf.train.data.collate_image_classification`].
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from datasets import Dataset
from torch import nn
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
"""Per-channel mean of the CIFAR-100 training images (RGB, scaled to [0, 1])."""

CIFAR100_STD = (0.2673, 0.2564, 0.2762)
"""Per-channel standard deviation of the CIFAR-100 training images (RGB, scaled to [0, 1])."""


class RandomPaddedCrop(nn.Module):
    """Zero-pad by `padding` on every side, then crop a random window of the input's own size.

    The CIFAR augmentation of the paper (`RandomCrop(32, padding=4)`) for any image size, so the
    same pipeline serves 32x32 CIFAR, 8x8 digits and resized inputs.
    """

    def __init__(self, padding: int) -> None:
        super().__init__()
        if padding < 0:
            raise ValueError(f"padding must be >= 0, got {padding}.")
        self.padding = padding

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        height, width = image.shape[-2:]
        padded = F.pad(image, [self.padding])
        top = int(torch.randint(0, 2 * self.padding + 1, ()))
        left = int(torch.randint(0, 2 * self.padding + 1, ()))
        return F.crop(padded, top, left, height, width)


def image_transform(
    *,
    train: bool,
    mean: Sequence[float],
    std: Sequence[float],
    image_size: int | None = None,
    crop_padding: int = 4,
    num_channels: int | None = 3,
) -> v2.Compose:
    """The per-image pipeline: a PIL image, numpy array or tensor in, a float tensor [C, H, W] out.

    Args:
        train: add the training augmentation (random padded crop, horizontal flip).
        mean, std: per-channel normalisation statistics of the training images, in [0, 1] units.
        image_size: resize to `image_size x image_size` first (e.g. 224 for a ViT/16);
            None keeps the stored size.
        crop_padding: zero padding of the random crop (4 in the paper).
        num_channels: 3 converts grayscale to RGB (models built for RGB), 1 converts to
            grayscale, None keeps the stored channels.
    """
    if num_channels not in (1, 3, None):
        raise ValueError(f"num_channels must be 1, 3 or None, got {num_channels}.")
    if len(mean) != len(std) or (num_channels is not None and len(mean) != num_channels):
        raise ValueError(
            f"mean and std need one value per channel (num_channels={num_channels}); got "
            f"{len(mean)} and {len(std)} values. Compute them with channel_mean_std(train_split)."
        )
    steps = _to_float_image(num_channels)
    if image_size is not None:
        steps.append(v2.Resize((image_size, image_size), antialias=True))
    if train:
        steps += [RandomPaddedCrop(crop_padding), v2.RandomHorizontalFlip()]
    steps += [v2.Normalize(mean=list(mean), std=list(std)), v2.ToPureTensor()]
    return v2.Compose(steps)


def _to_float_image(num_channels: int | None) -> list[Callable[[Any], Any]]:
    return [v2.ToImage(), *_convert_channels_to_float(num_channels)]


def _convert_channels_to_float(num_channels: int | None) -> list[Callable[[Any], Any]]:
    """Channel conversion and scaling to [0, 1]; works on one image or a stacked batch of tensors."""
    steps: list[Callable[[Any], Any]] = []
    if num_channels == 3:
        steps.append(v2.RGB())
    elif num_channels == 1:
        steps.append(v2.Grayscale(num_output_channels=1))
    return steps + [v2.ToDtype(torch.float32, scale=True)]


@dataclass
class ImageClassificationTransform:
    """A batch transform for `Dataset.set_transform` / `with_transform`.

    Reads `image_column` and `label_column` and returns `pixel_values` (one tensor per row,
    from `image_transform`) and `labels`. Other columns are not returned: a model's forward
    takes exactly these two. Choose `label_column` per split: the noisy column for training, the
    clean one for evaluation.
    """

    image_transform: Callable[[Any], torch.Tensor]
    image_column: str = "img"
    label_column: str = "label"

    def __call__(self, batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        missing = [column for column in (self.image_column, self.label_column) if column not in batch]
        if missing:
            raise KeyError(
                f"The transform needs columns {missing}, but rows have {sorted(batch)}. Pass "
                f"image_column=/label_column= naming your columns (CIFAR-100: 'img', 'fine_label' "
                f"or 'noisy_label'; digits: 'img', 'label' or 'noisy_label')."
            )
        return {
            "pixel_values": [self.image_transform(image) for image in batch[self.image_column]],
            "labels": list(batch[self.label_column]),
        }


def image_classification_transform(
    *,
    train: bool,
    mean: Sequence[float],
    std: Sequence[float],
    image_column: str = "img",
    label_column: str = "label",
    image_size: int | None = None,
    crop_padding: int = 4,
    num_channels: int | None = 3,
) -> ImageClassificationTransform:
    """The transform to pass to `Dataset.with_transform`; arguments as in [`image_transform`]."""
    pipeline = image_transform(
        train=train, mean=mean, std=std, image_size=image_size, crop_padding=crop_padding, num_channels=num_channels
    )
    return ImageClassificationTransform(pipeline, image_column=image_column, label_column=label_column)


def channel_mean_std(
    dataset: Dataset, *, image_column: str = "img", num_channels: int | None = 3, batch_size: int = 1000
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation of a split's images, in [0, 1] units.

    Compute them on the training split and use them for every split. Images are converted as by
    [`image_transform`] with the same `num_channels` (no resize, no augmentation). Decodes
    every image once: instant for the digits, about a minute for CIFAR-100's 50,000 images (use
    [`CIFAR100_MEAN`] / [`CIFAR100_STD`] there).
    """
    to_image = v2.ToImage()
    to_float = v2.Compose(_convert_channels_to_float(num_channels))
    sums, squares, pixels = [], [], 0
    for batch in dataset.with_format(None).select_columns([image_column]).iter(batch_size=batch_size):
        images = [to_image(image) for image in batch[image_column]]
        if len({image.shape for image in images}) == 1:
            chunks = [to_float(torch.stack(images))]
        else:
            chunks = [to_float(image) for image in images]
        for chunk in chunks:
            values = chunk.double().movedim(-3, 0).flatten(1)
            sums.append(values.sum(1))
            squares.append((values**2).sum(1))
            pixels += values.shape[1]
    if not pixels:
        raise ValueError("channel_mean_std needs at least one image; the dataset is empty.")
    mean = torch.stack(sums).sum(0) / pixels
    std = (torch.stack(squares).sum(0) / pixels - mean**2).clamp_min(0).sqrt()
    return tuple(mean.tolist()), tuple(std.tolist())
