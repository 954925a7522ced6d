"""`GAFTrainer`: the Hugging Face `Trainer` with Gradient Agreement Filtering.

A drop-in subclass: the Trainer's own loop, callbacks, logging, checkpointing and Accelerate setup
run unchanged, and four hooks change what happens to gradients:

* `training_step` runs each forward/backward pass with DDP's gradient all-reduce disabled and
  moves each parameter's gradient into one row of a `[K, P]` buffer as the backward pass
  produces it: one micro-gradient per pass.
* At the last pass of an optimizer step (`accelerator.sync_gradients`), the micro-gradients of
  every process go through one `GAFExchange` call (the GAF all-reduce) and the filtered gradient
  is written into `.grad`, scaled as the plain Trainer's accumulated gradient would be. The
  Trainer then clips and steps as usual.
* If no two micro-gradients agree the step is skipped exactly like an fp16 overflow is: the
  optimizer (and its grad scaler) does not step, the Trainer sees
  `accelerator.optimizer_step_was_skipped` and leaves the LR scheduler alone, and `global_step`
  still advances so `max_steps`, logging and saving keep their meaning.
* `log` adds the `gaf/` statistics of the logging window (see `GAFStatistics`).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import datasets
import torch
from accelerate.utils import DistributedType
from torch import nn
from torch.utils.data import DataLoader
from transformers import Trainer
from transformers.trainer_utils import seed_worker
from transformers.utils import logging

from .data import ClassBalancedBatchSampler
from .data.columns import column_as_numpy
from .exchange import DEFAULT_BUCKET_SIZE, GAFExchange
from .gradients import GradientBuffer
from .rule import GAFResult
from .statistics import GAFStatistics
from .training_args import GAFTrainingArguments

__all__ = ["GAFTrainer"]

logger = logging.get_logger(__name__)

_UNSUPPORTED = {
    DistributedType.DEEPSPEED: "DeepSpeed",
    DistributedType.FSDP: "FSDP",
    DistributedType.MEGATRON_LM: "Megatron-LM",
    DistributedType.XLA: "XLA/TPU",
}


class GAFTrainer(Trainer):
    """[`~transformers.Trainer`] that filters micro-gradients by agreement instead of averaging them.

    Every forward/backward pass on every process is one micro-gradient; the `world_size x
    gradient_accumulation_steps` micro-gradients of an optimizer step are filtered with the GAF
    rule (`args.gaf_threshold`, `args.gaf_rule`) over the Trainer's own process group, and the
    mean of the accepted ones replaces the plain average. With `gaf_threshold=2` training is the
    plain Trainer's, up to float rounding.

    Supported: a single process (with `gradient_accumulation_steps >= 2`) and data parallelism
    launched by `accelerate launch` or `torchrun` (DDP on CPU, CUDA and the other `MULTI_*`
    backends), in fp32, bf16 and fp16 with loss scaling. DeepSpeed, FSDP, Megatron-LM, XLA and
    tensor parallelism keep no unsharded per-process gradients, so they are refused at construction.

    Args:
        args: a [`GAFTrainingArguments`] (default: one with `output_dir="trainer_output"`).
        *trainer_args, **trainer_kwargs: everything [`~transformers.Trainer`] takes.

    Attributes:
        gaf_last_result: the latest step's [`GAFResult`], identical on every process (its
            `gradient`, `gradient_accumulation_steps x` the filtered mean, is the buffer behind
            `.grad`, which the next step overwrites).
        gaf_statistics: the [`GAFStatistics`] callback behind the `gaf/` logs.
    """

    def __init__(self, model=None, args: GAFTrainingArguments | None = None, *trainer_args, **trainer_kwargs):
        if args is None:
            args = GAFTrainingArguments(output_dir="trainer_output")
        if not isinstance(args, GAFTrainingArguments):
            raise TypeError(
                f"GAFTrainer needs GAFTrainingArguments, got {type(args).__name__}. Replace "
                "`TrainingArguments(...)` with `hf_gaf.GAFTrainingArguments(...)` (same arguments plus gaf_*)."
            )
        trainer_kwargs["callbacks"] = [*(trainer_kwargs.get("callbacks") or []), GAFStatistics()]
        super().__init__(model, args, *trainer_args, **trainer_kwargs)
        self._check_supported_setup()
        self._gaf_exchange: GAFExchange | None = None
        self._gaf_buffer: GradientBuffer | None = None
        self._gaf_micro = 0
        self._gaf_skipped = False
        self.gaf_last_result: GAFResult | None = None

    def _check_supported_setup(self) -> None:
        kind = self.accelerator.distributed_type
        if kind in _UNSUPPORTED or getattr(self, "is_distributed_loading_by_transformers", False):
            name = _UNSUPPORTED.get(kind, "tensor parallelism")
            raise ValueError(
                f"GAFTrainer does not support {name}: GAF needs each process's full, unsharded micro-gradients. "
                "Supported: a single process, or data parallelism (DDP) launched with `accelerate launch` or "
                "`torchrun` (distributed types NO, MULTI_CPU, MULTI_GPU and the other MULTI_* backends)."
            )
        world_size = self.accelerator.num_processes
        launched = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        if launched != world_size:
            raise ValueError(
                f"{launched} processes were launched, but the Trainer trains on {world_size}: each process would train "
                "its own model. On a machine without GPUs, transformers sets up data parallelism only with "
                "use_cpu=True (--use_cpu); with GPUs, check that every process sees one."
            )
        accumulation = self.args.gradient_accumulation_steps
        if world_size * accumulation < 2:
            raise ValueError(
                f"GAF needs at least two micro-gradients per optimizer step, but world_size x "
                f"gradient_accumulation_steps = {world_size} x {accumulation} = 1: every step would be skipped. "
                "Set gradient_accumulation_steps >= 2 (e.g. --gradient_accumulation_steps 2), or launch more "
                "processes (accelerate launch / torchrun --nproc_per_node 2)."
            )

    @property
    def gaf_statistics(self) -> GAFStatistics:
        """The run's `GAFStatistics` callback (looked up each time: resuming may replace the instance)."""
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, GAFStatistics):
                return callback
        statistics = GAFStatistics()
        self.add_callback(statistics)
        return statistics

    # -- gradients ----------------------------------------------------------------------------

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """Fetch one optimizer step's micro-batches; a new macrobatch starts at row 0 of the buffer."""
        self._gaf_micro = 0
        return super().get_batch_samples(epoch_iterator, num_batches, device)

    def training_step(
        self, model: nn.Module, inputs: dict[str, torch.Tensor | Any], num_items_in_batch: torch.Tensor | int | None = None
    ) -> torch.Tensor:
        """One forward/backward pass without DDP's all-reduce, captured as one micro-gradient.

        The loss is normalised by the Trainer itself (by `current_gradient_accumulation_steps` or
        `num_items_in_batch`), so each captured gradient is what the plain Trainer would add to
        `.grad`. At the last pass of the step the GAF exchange runs and fills `.grad`.
        """
        buffer = self._gradient_buffer()
        if self._gaf_micro >= buffer.num_micro:
            raise RuntimeError(
                f"GAFTrainer captured more than gradient_accumulation_steps={buffer.num_micro} micro-gradients "
                "for one optimizer step; call training_step only from the Trainer's training loop."
            )
        with self.accelerator.no_sync(model), buffer.capturing(self._gaf_micro):
            loss = super().training_step(model, inputs, num_items_in_batch)
        self._gaf_micro += 1
        if self.accelerator.sync_gradients:
            self._apply_gaf(buffer)
        return loss

    def _gradient_buffer(self) -> GradientBuffer:
        params = [p for p in self.model.parameters() if p.requires_grad]
        buffer = self._gaf_buffer
        if buffer is None or len(buffer.params) != len(params) or any(a is not b for a, b in zip(buffer.params, params)):
            buffer = self._gaf_buffer = GradientBuffer(params, self.args.gradient_accumulation_steps)
            bucket_size = self.args.gaf_bucket_size or DEFAULT_BUCKET_SIZE
            self._gaf_exchange = GAFExchange(exchange=self.args.gaf_exchange, bucket_size=bucket_size)
        return buffer

    def _apply_gaf(self, buffer: GradientBuffer) -> None:
        """Filter this step's micro-gradients over all processes and write the result into `.grad`.

        The plain Trainer's gradient is `(1 / world_size) x` the sum of all `world_size x k`
        captured gradients, i.e. `k x` their mean (DDP averages over processes, accumulation
        sums the passes). GAF keeps that scale: `.grad = k x` the mean of the accepted ones,
        computed by the exchange straight into the storage behind `.grad` (`scale=k`: when `k`
        micro-gradients are accepted, that is their sum, with no division pass).
        """
        k, self._gaf_micro = self._gaf_micro, 0
        result = self._gaf_exchange(
            buffer.buffer[:k], self.args.gaf_threshold, self.args.gaf_rule, out=buffer.grad_storage, scale=k
        )
        excluded = self.gaf_statistics.update(result)
        if excluded:
            logger.warning(
                f"GAF step {self.state.global_step + 1}: {excluded} of {result.num_microgradients} micro-gradients "
                "had a zero or non-finite norm and were excluded."
            )
        scaler = self.accelerator.scaler
        if excluded and scaler is not None and scaler.is_enabled():
            # Loss scaling must see the overflow to lower its scale: hand it non-finite gradients so it
            # skips this step and backs off, exactly as it would without GAF (same decision on every rank).
            for p in buffer.params:
                p.grad = torch.full_like(p, float("nan"))
            self._set_skipped(False)
        elif result.skipped:
            self._set_skipped(True)
        else:
            buffer.write_back(result.gradient)  # already k x the mean, in grad_storage: installs the views
            self._set_skipped(False)
        self.gaf_last_result = result

    def _set_skipped(self, skipped: bool) -> None:
        """Make the coming optimizer step a no-op that the Trainer recognises as skipped.

        With `sync_gradients` False, `AcceleratedOptimizer.step` does nothing (no optimizer or
        grad-scaler update: that is how accumulation steps work); the loop sets it again before
        the next pass. `optimizer_step_was_skipped` (what an fp16 overflow sets) keeps the
        Trainer from stepping the LR scheduler. With a grad scaler the optimizer overwrites that
        flag on every real step; without one it is reset here.
        """
        self._gaf_skipped = skipped
        if skipped:
            self.accelerator.gradient_state._set_sync_gradients(False)
        self.optimizer._is_overflow = skipped

    def _clip_grad_norm(self, model):
        if self._gaf_skipped:
            return None
        return super()._clip_grad_norm(model)

    def _get_grad_norm(self, model, grad_norm=None):
        # A skipped step has no gradient; computing a norm would unscale fp16 gradients that the
        # grad scaler then never steps on, which breaks its next step.
        if self._gaf_skipped:
            return None
        return super()._get_grad_norm(model, grad_norm=grad_norm)

    # -- logging ------------------------------------------------------------------------------

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the `gaf/` statistics of the logging window to training logs (those with a `loss`)."""
        if "loss" in logs:
            logs.update(self.gaf_statistics.pop_logs())
        super().log(logs, start_time)

    # -- data -----------------------------------------------------------------------------------

    def get_train_dataloader(self) -> DataLoader:
        """The Trainer's train dataloader, or with `class_balanced_batches` one of class-balanced micro-batches.

        The batch sampler yields micro-batches of `per_device_train_batch_size // num_classes`
        samples of every class; `accelerator.prepare` hands whole batches to each process in
        turn, so every micro-gradient (on every process and accumulation step) sees every class.
        """
        if not self.args.class_balanced_batches:
            return super().get_train_dataloader()
        if self.train_dataset is None:
            raise ValueError("GAFTrainer: training requires a train_dataset.")
        if isinstance(self.train_dataset, torch.utils.data.IterableDataset):
            raise ValueError(
                "class_balanced_batches needs a map-style train_dataset (with __len__ and indexing), not an "
                "IterableDataset; turn it off or materialise the dataset."
            )
        labels = self._train_labels()
        num_classes = self.args.class_balanced_num_classes or int(labels.max()) + 1
        batch_size = self._train_batch_size
        if batch_size % num_classes:
            raise ValueError(
                f"class_balanced_batches needs the per-device train batch size ({batch_size}) to be a multiple of "
                f"the number of classes ({num_classes}); set --per_device_train_batch_size to e.g. "
                f"{num_classes * max(1, batch_size // num_classes)}."
            )
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        sampler = ClassBalancedBatchSampler(
            labels,
            batch_size // num_classes,
            num_classes=num_classes,
            seed=seed,
            batches_per_step=self.accelerator.num_processes * self.args.gradient_accumulation_steps,
        )
        dataset, collator = self.train_dataset, self.data_collator
        if isinstance(dataset, datasets.Dataset):
            dataset = self._remove_unused_columns(dataset, description="training")
        else:
            collator = self._get_collator_with_removed_columns(collator, description="training")
        loader = DataLoader(
            dataset,
            batch_sampler=sampler,
            collate_fn=collator,
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory,
            persistent_workers=self.args.dataloader_persistent_workers,
            prefetch_factor=self.args.dataloader_prefetch_factor,
            worker_init_fn=partial(
                seed_worker, num_workers=self.args.dataloader_num_workers, rank=self.args.process_index
            ),
        )
        return self.accelerator.prepare(loader)

    def _train_labels(self) -> torch.Tensor:
        column = self.args.class_balanced_label_column
        dataset = self.train_dataset
        try:
            if isinstance(dataset, datasets.Dataset):
                values = column_as_numpy(dataset, column)
            else:
                values = [dataset[i][column] for i in range(len(dataset))]
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(
                f"class_balanced_batches reads integer labels from column {column!r} of the train_dataset, which "
                f"failed ({error}); set --class_balanced_label_column to the label column."
            ) from None
        labels = torch.as_tensor(values)
        if labels.dim() != 1 or labels.dtype.is_floating_point:
            raise ValueError(
                f"class_balanced_batches needs one integer class label per sample in column {column!r}, got a "
                f"{labels.dtype} tensor of shape {tuple(labels.shape)}."
            )
        return labels
