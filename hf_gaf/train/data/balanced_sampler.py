"""Class-balanced micro-batches: every batch holds exactly `samples_per_class` rows of every class.

The GAF paper trains CIFAR-100N with micro-batches of 100 = 1 x 100 classes. Balanced micro-batches
make micro-gradients comparable: their disagreement then comes from the labels, not from which
classes a batch happened to draw, which is what gradient agreement filtering needs to see.

[`ClassBalancedSampler`] is a plain index sampler: its indices, cut into consecutive groups of
`batch_size` (as a `DataLoader` with that batch size does), are the balanced batches. So it goes
to a Trainer through the Trainer's own sampler hook, and every dataloader option the Trainer
honours still applies.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from datasets import ClassLabel, Dataset
from torch.utils.data import Sampler

from .columns import column_as_numpy


class ClassBalancedSampler(Sampler[int]):
    """Yield dataset indices whose consecutive groups of `batch_size` hold `samples_per_class` of every class.

    Pass it to `DataLoader(dataset, sampler=sampler, batch_size=sampler.batch_size, ...)` (or
    return it from a Trainer's `_get_train_sampler`). Every batch has
    `batch_size = samples_per_class * num_classes` indices, in random order, none repeated;
    `len(sampler)` is a whole number of batches.

    Epoch contract (C classes with counts n_c, k = `samples_per_class`):

    - `drop_last=True` (default): `num_batches = min_c floor(n_c / k)`; every index is
      used at most once per epoch; rows of larger classes beyond that are left out of this epoch
      (a different random subset each epoch).
    - `drop_last=False`: `num_batches = max_c ceil(n_c / k)`; every index is used at
      least once per epoch; smaller classes are cycled, each pass over a class being a fresh
      permutation (an index never appears twice in one batch).

    Shuffling: each epoch draws new per-class permutations from `(seed, epoch)`; the batches of
    an epoch are a pure function of the labels, `seed` and `epoch`. Assign `epoch` to choose the
    epoch the next pass yields; each pass advances it by one. There is deliberately no
    `set_epoch`: dataloader wrappers call it with counts of their own (accelerate's
    `skip_first_batches` restarts at 0 when a run resumes mid-epoch), and
    [`~hf_gaf.train.trainer.ClassBalancedBatches`] sets the epoch from the Trainer's step count
    instead. Every process builds the same batches from the same seed.

    Distributed training and gradient accumulation: accelerate hands *whole* batches to processes
    (`split_batches=False`, its default), and every batch is balanced, so every micro-batch of
    every process and every accumulation step is balanced. With `split_batches=True` a batch
    would be cut into pieces that are not balanced; do not use it with this sampler.
    `batches_per_step` (processes x accumulation steps) rounds the epoch's batch count to a
    multiple of it (down with `drop_last`, up otherwise), so that no optimizer step gets a
    partial macrobatch: GAF needs every step's micro-gradients, and a lone one is always skipped.
    """

    def __init__(
        self,
        labels: Sequence[int] | np.ndarray | torch.Tensor,
        samples_per_class: int,
        *,
        num_classes: int | None = None,
        seed: int = 0,
        drop_last: bool = True,
        batches_per_step: int = 1,
    ) -> None:
        labels = np.asarray(labels)
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer) or labels.size == 0:
            raise ValueError(
                f"labels must be a non-empty 1-D sequence of integer class ids, got shape "
                f"{labels.shape} and dtype {labels.dtype}."
            )
        if int(samples_per_class) != samples_per_class or samples_per_class < 1:
            raise ValueError(f"samples_per_class must be a positive integer, got {samples_per_class!r}.")
        if labels.min() < 0:
            raise ValueError(f"labels must be class ids >= 0, found {labels.min()}.")
        if num_classes is None:
            num_classes = int(labels.max()) + 1
        elif labels.max() >= num_classes:
            raise ValueError(f"labels hold class {labels.max()} but num_classes is {num_classes}.")
        counts = np.bincount(labels, minlength=num_classes)
        short = np.flatnonzero(counts < samples_per_class)
        if short.size:
            raise ValueError(
                f"Every class needs at least samples_per_class={samples_per_class} rows, but classes "
                f"{short[:10].tolist()}{'...' if short.size > 10 else ''} have "
                f"{counts[short[:10]].tolist()}. Lower samples_per_class, or remove classes that have "
                f"(almost) no rows and remap the labels."
            )

        self.samples_per_class = int(samples_per_class)
        self.num_classes = int(num_classes)
        self.batch_size = self.samples_per_class * self.num_classes
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0
        order = np.argsort(labels, kind="stable")
        self._class_indices = np.split(order, np.cumsum(counts)[:-1])
        per_class_batches = counts // self.samples_per_class if drop_last else -(-counts // self.samples_per_class)
        if int(batches_per_step) != batches_per_step or batches_per_step < 1:
            raise ValueError(f"batches_per_step must be a positive integer, got {batches_per_step!r}.")
        num_batches = int(per_class_batches.min() if drop_last else per_class_batches.max())
        steps = num_batches // batches_per_step if drop_last else -(-num_batches // batches_per_step)
        if steps == 0:
            raise ValueError(
                f"One optimizer step needs batches_per_step={batches_per_step} balanced batches, but the "
                f"smallest class fills only {num_batches}. Lower samples_per_class, the number of processes "
                f"or gradient_accumulation_steps, or pass drop_last=False to cycle the smaller classes."
            )
        self.batches_per_step = int(batches_per_step)
        self._num_batches = steps * batches_per_step

    @classmethod
    def from_dataset(
        cls,
        dataset: Dataset,
        samples_per_class: int,
        *,
        label_column: str = "label",
        seed: int = 0,
        drop_last: bool = True,
        batches_per_step: int = 1,
    ) -> ClassBalancedSampler:
        """Build the sampler from a ClassLabel column of `dataset` (ignoring any transform set on it).

        Balance on the labels the model is trained on: for a noisy training set that is the noisy
        column (`noisy_label`), since the clean labels are unknown in a real noisy dataset.
        """
        feature = dataset.features.get(label_column)
        if not isinstance(feature, ClassLabel):
            raise ValueError(
                f"Column {label_column!r} must be a ClassLabel to balance on (found {feature!r}; "
                f"columns: {dataset.column_names}). Pass label_column=<the training label column>."
            )
        labels = column_as_numpy(dataset, label_column)
        return cls(
            labels,
            samples_per_class,
            num_classes=feature.num_classes,
            seed=seed,
            drop_last=drop_last,
            batches_per_step=batches_per_step,
        )

    @property
    def num_batches(self) -> int:
        return self._num_batches

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps one epoch of batches makes, `batches_per_step` batches each."""
        return self._num_batches // self.batches_per_step

    def __len__(self) -> int:
        return self._num_batches * self.batch_size

    def batches(self) -> np.ndarray:
        """The next pass's batches, `[num_batches, batch_size]`; advances the epoch by one."""
        rng = np.random.default_rng([self.seed, self.epoch])
        needed = self._num_batches * self.samples_per_class
        columns = [self._draw(indices, needed, rng) for indices in self._class_indices]
        batches = np.stack(columns, axis=1).reshape(self._num_batches, self.batch_size)
        self.epoch += 1
        return rng.permuted(batches, axis=1)

    def __iter__(self) -> Iterator[int]:
        yield from self.batches().reshape(-1).tolist()

    def _draw(self, indices: np.ndarray, needed: int, rng: np.random.Generator) -> np.ndarray:
        """`needed` indices of one class: consecutive fresh permutations, each batch-sized chunk duplicate-free."""
        drawn = rng.permutation(indices)
        while len(drawn) < needed:
            chunk_start = len(drawn) - len(drawn) % self.samples_per_class
            straddling = drawn[chunk_start:]
            fresh = rng.permutation(indices)
            in_chunk = np.isin(fresh, straddling)
            drawn = np.concatenate([drawn, fresh[~in_chunk], fresh[in_chunk]])
        return drawn[:needed].reshape(self._num_batches, self.samples_per_class)
