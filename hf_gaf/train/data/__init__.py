"""Data for the paper's experiments: Hub datasets, CIFAR-100N labels, label noise, balanced batches, transforms.

See docs/data.md for a walkthrough.
"""

from .balanced_sampler import ClassBalancedSampler
from .cifar100n import CIFAR100_DATASET, attach_noisy_labels, load_cifar100n
from .collator import collate_image_classification
from .digits import load_digits_dataset
from .hub import HubUnreachableError, hub_errors_explained, resolve_hub_file
from .noise import (
    FASHION_MNIST_CONFUSIONS,
    FLIPPED_COLUMN,
    NOISE_TYPES,
    NOISY_LABEL_COLUMN,
    add_class_dependent_label_noise,
    add_label_noise,
    add_symmetric_label_noise,
)
from .numpy_checkpoint import UntrustedPickleError, load_numpy_checkpoint
from .transforms import (
    CIFAR100_MEAN,
    CIFAR100_STD,
    ImageClassificationTransform,
    channel_mean_std,
    image_classification_transform,
    image_transform,
)

__all__ = [
    "CIFAR100_DATASET",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "FASHION_MNIST_CONFUSIONS",
    "FLIPPED_COLUMN",
    "NOISE_TYPES",
    "NOISY_LABEL_COLUMN",
    "ClassBalancedSampler",
    "HubUnreachableError",
    "ImageClassificationTransform",
    "UntrustedPickleError",
    "add_class_dependent_label_noise",
    "add_label_noise",
    "add_symmetric_label_noise",
    "attach_noisy_labels",
    "channel_mean_std",
    "collate_image_classification",
    "hub_errors_explained",
    "image_classification_transform",
    "image_transform",
    "load_cifar100n",
    "load_digits_dataset",
    "load_numpy_checkpoint",
    "resolve_hub_file",
]
