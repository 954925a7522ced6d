"""Class-balanced micro-batches for any Trainer, and the experiments' GAF trainer.

[`ClassBalancedBatches`] hands the Trainer a [`~hf_gaf.train.data.ClassBalancedSampler`]
through the Trainer's own sampler hook, so the Trainer still builds the dataloader (workers,
pinning, prefetching, `in_order`, multiprocessing context, accelerate's sharding) and resumes it
mid-epoch as it resumes any other. Each process then gets whole balanced batches in turn, so
every micro-batch of every process and accumulation step sees every class.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from transformers import TrainerCallback

from ..trainer import GAFTrainer
from .data import ClassBalancedSampler

__all__ = ["ClassBalancedBatches", "ClassBalancedGAFTrainer"]


class ClassBalancedBatches:
    """Trainer mixin: every training micro-batch holds `per_device_train_batch_size / C` samples of each class.

    Args:
        balance_labels: the integer class of every training row, in the dataset's order (e.g.
            the noisy labels a model is trained on); `None` keeps the Trainer's own sampler.
        num_classes: `C` (default: the largest label + 1).
        *args, **kwargs: everything the Trainer (subclass) takes.

    At every epoch's start the sampler's epoch is set from `state.global_step` (which, unlike
    `state.epoch`, every transformers version has right when a resumed run begins), so a resumed
    run draws the batches the uninterrupted one drew.
    """

    def __init__(self, *args, balance_labels: Sequence[int] | np.ndarray | None = None, num_classes: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.balance_labels = None
        self._balanced_sampler: ClassBalancedSampler | None = None
        if balance_labels is None:
            return
        labels = np.asarray(balance_labels)
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(
                f"balance_labels must hold one integer class per training row, got shape {labels.shape} and dtype "
                f"{labels.dtype}."
            )
        self.balance_labels = labels
        self.num_classes = int(num_classes if num_classes is not None else labels.max() + 1)
        batch_size = self._train_batch_size
        if batch_size % self.num_classes:
            raise ValueError(
                f"Class-balanced batches need the per-device train batch size ({batch_size}) to be a multiple of the "
                f"number of classes ({self.num_classes}); set --per_device_train_batch_size to e.g. "
                f"{self.num_classes * max(1, batch_size // self.num_classes)}."
            )
        self.add_callback(_SamplerEpoch(self))

    def _get_train_sampler(self, *args, **kwargs):
        if self.balance_labels is None:
            return super()._get_train_sampler(*args, **kwargs)
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        self._balanced_sampler = ClassBalancedSampler(
            self.balance_labels,
            self._train_batch_size // self.num_classes,
            num_classes=self.num_classes,
            seed=seed,
            batches_per_step=self.accelerator.num_processes * self.args.gradient_accumulation_steps,
        )
        return self._balanced_sampler


class _SamplerEpoch(TrainerCallback):
    """Sets the balanced sampler's epoch from the Trainer's step count when an epoch begins."""

    def __init__(self, trainer: ClassBalancedBatches):
        self.trainer = trainer

    def on_epoch_begin(self, args, state, control, **kwargs):
        sampler = self.trainer._balanced_sampler
        if sampler is not None:
            sampler.epoch = state.global_step // sampler.steps_per_epoch


class ClassBalancedGAFTrainer(ClassBalancedBatches, GAFTrainer):
    """[`~hf_gaf.GAFTrainer`] with class-balanced micro-batches: the trainer of the paper's experiments."""
