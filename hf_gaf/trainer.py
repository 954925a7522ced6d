"""`GAFMixin`: Gradient Agreement Filtering for any `transformers.Trainer` subclass; `GAFTrainer`.

`class MyGAFTrainer(GAFMixin, MyTrainer)` keeps everything `MyTrainer` does (its loss, logging,
callbacks, data) and changes what happens to gradients, through public seams of the Trainer:

* `training_step` runs each forward/backward pass (the subclass's own) with DDP's gradient
  all-reduce disabled and moves each parameter's gradient into one row of a `[K, P]` buffer as
  the backward pass produces it: one micro-gradient per pass.
* At the last pass of an optimizer step (`accelerator.sync_gradients`), the micro-gradients of
  every process go through one `GAFExchange` call (the GAF all-reduce), and `.grad` becomes the
  filtered gradient, at the scale of the plain Trainer's accumulated gradient. Parameters that
  got no gradient in any pass on any process keep `.grad = None`. The Trainer then clips and
  steps as usual.
* When nothing is updated the step is skipped: a callback around the optimizer step turns it
  into a no-op (no parameter, optimizer-state or grad-scaler update) that the Trainer recognises
  as skipped, so the LR scheduler stays put; `global_step` still advances.
* `log` adds the `gaf/` statistics; `train` returns the run's GAF summary with its metrics.

What this needs beyond public API is in `hf_gaf.compat`, checked at construction.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from accelerate.utils import DistributedType
from transformers import Trainer, TrainerCallback
from transformers.utils import logging

from . import compat
from .arguments import GAFTrainingArguments, check_gaf_arguments
from .exchange import DEFAULT_BUCKET_SIZE, GAFExchange
from .gradients import GradientBuffer, available_memory, parameter_units
from .rule import GAFResult, Units
from .state import GAFState

__all__ = ["GAFMixin", "GAFTrainer"]

logger = logging.get_logger(__name__)

_UNSUPPORTED = {
    DistributedType.DEEPSPEED: "DeepSpeed",
    DistributedType.FSDP: "FSDP",
    DistributedType.MEGATRON_LM: "Megatron-LM",
    DistributedType.XLA: "XLA/TPU",
}


class GAFMixin:
    """Gradient Agreement Filtering for a [`~transformers.Trainer`] subclass: `class T(GAFMixin, MyTrainer)`.

    Every forward/backward pass on every process is one micro-gradient; the `world_size x
    gradient_accumulation_steps` micro-gradients of an optimizer step are filtered with the GAF
    rule over the Trainer's own process group, and the mean of the accepted ones replaces the
    plain average. With `gaf_threshold=2` training is the plain Trainer's (or the subclass's), up
    to float rounding.

    The options come from `self.args`, which must carry the fields of [`GAFArguments`]
    ([`GAFTrainingArguments`], or `@dataclass class C(GAFArguments, MyTrainingArguments)`).

    Supported: a single process (with `gradient_accumulation_steps >= 2`) and data parallelism
    launched by `accelerate launch` or `torchrun` (DDP on CPU, CUDA and the other `MULTI_*`
    backends), in fp32, bf16 and fp16 with loss scaling. DeepSpeed, FSDP, Megatron-LM, XLA,
    tensor parallelism and `DataParallel` keep no unsharded per-process gradients (or several
    devices per process), so they are refused at construction.

    Attributes:
        gaf_state: the [`GAFState`] callback: switch (`gaf_enabled`), adaptive threshold and the
            counts behind the `gaf/` logs, saved with checkpoints.
        gaf_last_result: the latest step's [`GAFResult`], identical on every process.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        check_gaf_arguments(self.args)
        compat.check_trainer(self)
        self._check_supported_setup()
        self.add_callback(
            GAFState(
                adaptive_window=self.args.gaf_adaptive_window,
                adaptive_std=self.args.gaf_adaptive_std,
                max_consecutive_skipped=self.args.gaf_max_consecutive_skipped_steps,
            )
        )
        self.add_callback(_SkipHandler(self))
        self.add_callback(_SameDataOnEveryRank())
        self._gaf: _Machinery | None = None
        self.gaf_last_result: GAFResult | None = None

    def _check_supported_setup(self) -> None:
        kind = self.accelerator.distributed_type
        if kind in _UNSUPPORTED or getattr(self, "is_distributed_loading_by_transformers", False):
            name = _UNSUPPORTED.get(kind, "tensor parallelism")
            raise ValueError(
                f"GAF does not support {name}: it needs each process's full, unsharded micro-gradients. Supported: "
                "a single process, or data parallelism (DDP) launched with `accelerate launch` or `torchrun` "
                "(distributed types NO, MULTI_CPU, MULTI_GPU and the other MULTI_* backends)."
            )
        if self.args.n_gpu > 1:
            raise ValueError(
                f"GAF does not support torch.nn.DataParallel ({self.args.n_gpu} GPUs in one process): launch one "
                "process per GPU with `accelerate launch` or `torchrun`, or set CUDA_VISIBLE_DEVICES to one GPU."
            )
        world_size = self.accelerator.num_processes
        launched = dist.get_world_size() if dist.is_initialized() else 1
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
    def gaf_state(self) -> GAFState:
        """The run's [`GAFState`] (looked up each time: resuming may replace the callback instance)."""
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, GAFState):
                return callback
        raise RuntimeError("The GAFState callback was removed from this Trainer; GAF cannot run without it.")

    @property
    def gaf_enabled(self) -> bool:
        """Whether steps filter (True) or average every micro-gradient plainly (False); saved with checkpoints.

        A callback may switch it (on every rank alike, e.g. from `state.global_step`), for GAF
        after a warm-up of plain averaging.
        """
        return self.gaf_state.enabled

    @gaf_enabled.setter
    def gaf_enabled(self, enabled: bool) -> None:
        self.gaf_state.switch(enabled)

    # -- gradients ----------------------------------------------------------------------------

    def training_step(self, model, inputs, *args, **kwargs) -> torch.Tensor:
        """One forward/backward pass of the Trainer (subclass) without DDP's all-reduce, captured as a micro-gradient.

        The loss is normalised by the Trainer itself (by the accumulation steps or by
        `num_items_in_batch`), so each captured gradient is what the plain Trainer would add to
        `.grad`. At the last pass of the step the GAF exchange runs and fills `.grad`.
        """
        machinery = self._gaf_machinery()
        num_items_in_batch = args[0] if args else kwargs.get("num_items_in_batch")
        if num_items_in_batch is not None:
            machinery.items.append(self.gaf_num_items(inputs))
        with self.accelerator.no_sync(model), machinery.buffer.capturing(machinery.passes):
            loss = super().training_step(model, inputs, *args, **kwargs)
        machinery.passes += 1
        if self.accelerator.sync_gradients:
            self._gaf_step(machinery, num_items_in_batch)
        return loss

    def gaf_num_items(self, inputs: dict[str, Any]) -> int | None:
        """The items (label tokens) of one micro-batch, counted as the Trainer counts `num_items_in_batch`.

        With token-normalised losses GAF weighs the accepted micro-batches by these counts; a
        Trainer subclass that counts `num_items_in_batch` its own way overrides this to match.
        """
        return compat.count_items(self, inputs)

    def _gaf_machinery(self) -> _Machinery:
        """The step's buffer and exchange; rebuilt when a step begins after the trainable parameters changed."""
        if self._gaf is None or self._gaf.passes == 0:
            named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
            if self._gaf is None or not self._gaf.serves(named):
                if self._gaf is not None:
                    self._gaf.buffer.close()
                self._gaf = _Machinery.build(self, named)
        if self._gaf.passes >= self._gaf.buffer.num_micro:
            raise RuntimeError(
                f"GAF captured more than gradient_accumulation_steps={self._gaf.buffer.num_micro} micro-gradients for "
                "one optimizer step; call training_step only from the Trainer's training loop."
            )
        return self._gaf

    def _gaf_step(self, machinery: _Machinery, num_items_in_batch) -> None:
        """Filter this step's micro-gradients over all processes and install the result as `.grad`."""
        passes, items = machinery.passes, machinery.items
        machinery.passes, machinery.items = 0, []
        state = self.gaf_state
        normalised = num_items_in_batch is not None and compat.loss_is_normalised_by_items(self, num_items_in_batch)
        scale, sizes = self._gaf_weighting(machinery, passes, items, num_items_in_batch if normalised else None)
        threshold = state.threshold(self.args.gaf_threshold)
        units = machinery.units if state.enabled else machinery.plain_units
        try:
            result = machinery.exchange(
                machinery.buffer.buffer, threshold, self.args.gaf_rule,
                out=machinery.buffer.gradient, scale=scale, sizes=sizes, units=units,
            )  # fmt: skip
            received = machinery.received_anywhere()
        except RuntimeError as error:
            raise RuntimeError(f"GAF step {self.state.global_step + 1}: {error}") from error
        if normalised:
            machinery.check_item_counts(result, num_items_in_batch)
        elif sizes is not None:
            machinery.check_passes(result, self.state.global_step + 1)
        self.gaf_last_result = result
        state.record(result, filtered_units=None if units is None else ~np.asarray(units.averaged))
        buffer = machinery.buffer
        scaler = self.accelerator.scaler
        if bool(result.non_finite.any()) and scaler is not None and scaler.is_enabled():
            # Loss scaling must see the overflow to lower its scale: hand it non-finite gradients, so it skips
            # this step and backs off exactly as it would without GAF (the same decision on every rank).
            buffer.gradient.fill_(float("nan"))
            buffer.install(received)
            skipped = False
        elif result.skipped:
            buffer.clear()
            skipped = True
        else:
            buffer.install(received & machinery.updated_parameters(result))
            skipped = False
        if result.num_excluded:
            logger.warning(
                f"GAF step {self.state.global_step + 1}: {result.num_excluded} of {result.num_microgradients} "
                f"micro-gradients were excluded ({int(result.non_finite.sum())} non-finite, the others zero)."
            )
        machinery.skipped = skipped

    def _gaf_weighting(self, machinery: _Machinery, passes: int, items: list, num_items_in_batch):
        """The exchange's `scale` and `sizes`, so that the update is the plain Trainer's on the accepted micro-batches.

        Per-micro-batch mean losses were divided by the step's passes `k`: the update is `k` x
        the mean of the accepted micro-gradients. Token-normalised losses (`num_items_in_batch`
        given) were divided by the step's `num_items_in_batch` `n` (times the number of processes
        when they average tokens across devices): the update is `n / c` x their sum over the
        accepted micro-batches' items, the token mean over the accepted micro-batches.
        """
        k_max = machinery.buffer.num_micro
        absent = [0.0] * (k_max - passes)
        if num_items_in_batch is None:
            return float(passes), None if passes == k_max else [1.0] * passes + absent
        if any(count is None for count in items):
            raise ValueError(
                "GAF weighs token-normalised losses by each micro-batch's items, but could not count them (no "
                "'labels'); override gaf_num_items(inputs) to count them as your Trainer counts num_items_in_batch."
            )
        processes = self.accelerator.num_processes
        if processes > 1 and not self.args.average_tokens_across_devices:
            raise ValueError(
                "GAF with token-normalised losses on several processes needs average_tokens_across_devices=True "
                "(the Trainer's default), so that every micro-batch is normalised by the same token count."
            )
        total = float(num_items_in_batch.sum() if torch.is_tensor(num_items_in_batch) else num_items_in_batch)
        return total / processes, [float(count) for count in items] + absent

    # -- logging --------------------------------------------------------------------------------

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        """Add the `gaf/` statistics of the logging window to training logs; no `grad_norm` for a skipped step."""
        if "loss" in logs:
            logs.update(self.gaf_state.pop_logs())
            if self._gaf is not None and self._gaf.skipped:
                logs.pop("grad_norm", None)
        super().log(logs, *args, **kwargs)

    def train(self, *args, **kwargs):
        """The Trainer's `train`; its metrics also hold the run's GAF summary (`gaf/skipped_fraction`, ...)."""
        output = super().train(*args, **kwargs)
        output.metrics.update(self.gaf_state.summary())
        return output


class GAFTrainer(GAFMixin, Trainer):
    """[`~transformers.Trainer`] that filters micro-gradients by agreement instead of averaging them.

    [`GAFMixin`] over the plain Trainer; see there for the contract.

    Args:
        args: a [`GAFTrainingArguments`] (default: one with `output_dir="trainer_output"`).
        *trainer_args, **trainer_kwargs: everything [`~transformers.Trainer`] takes.
    """

    def __init__(self, model=None, args: GAFTrainingArguments | None = None, *trainer_args, **trainer_kwargs):
        if args is None:
            args = GAFTrainingArguments(output_dir="trainer_output")
        super().__init__(model, args, *trainer_args, **trainer_kwargs)


class _Machinery:
    """What one run's steps reuse: the buffer, its units, the exchange, and the step in progress."""

    def __init__(self, trainer, named, order, units: Units | None):
        self.named = named
        self.buffer = GradientBuffer(order, trainer.args.gradient_accumulation_steps)
        self.units = units
        whole = Units.whole(self.buffer.numel) if units is None else units
        self.plain_units = Units(whole.sizes, (True,) * len(whole))
        self.unit_of_parameter = np.searchsorted(np.asarray(whole.bounds[1:]), np.asarray(self.buffer.offsets), side="right")
        bucket_size = trainer.args.gaf_bucket_size or DEFAULT_BUCKET_SIZE
        self.exchange = GAFExchange(exchange=trainer.args.gaf_exchange, bucket_size=bucket_size)
        self.group = None
        self.passes = 0
        self.items: list[int | None] = []
        self.skipped = False

    @classmethod
    def build(cls, trainer, named) -> _Machinery:
        order, units = parameter_units(
            named,
            trainer.args.gaf_granularity,
            group_by=trainer.args.gaf_group_by,
            averaged=trainer.args.gaf_averaged_parameters,
        )
        _check_memory(trainer, order)
        return cls(trainer, named, order, units)

    def serves(self, named) -> bool:
        return len(named) == len(self.named) and all(a[1] is b[1] for a, b in zip(named, self.named))

    def received_anywhere(self) -> torch.Tensor:
        """Which parameters got a gradient in any pass of this step on any process."""
        received = self.buffer.received
        if dist.is_initialized() and dist.get_world_size() > 1:
            counts = received.to(torch.int32).to(self.buffer.buffer.device)
            try:
                dist.all_reduce(counts, op=dist.ReduceOp.MAX)
            except RuntimeError as error:
                raise RuntimeError(
                    f"another rank did not answer within the process group's timeout ({error}). A rank may have hung "
                    "or died. The timeout is ddp_timeout (TrainingArguments)."
                ) from error
            received = counts.cpu().bool()
        return received

    def updated_parameters(self, result: GAFResult) -> torch.Tensor:
        return result.updated[torch.from_numpy(self.unit_of_parameter)]

    def check_passes(self, result: GAFResult, step: int) -> None:
        """Raise if the processes ran different numbers of passes in this step (sizes of 1 and 0 tell)."""
        passes = (result.sizes.reshape(-1, self.buffer.num_micro) > 0).sum(1).tolist()
        if len(set(passes)) > 1:
            raise _data_lengths_differ(f"the number of forward/backward passes in step {step}", passes)

    def check_item_counts(self, result: GAFResult, num_items_in_batch) -> None:
        counted = float(result.sizes.sum())
        expected = float(num_items_in_batch.sum() if torch.is_tensor(num_items_in_batch) else num_items_in_batch)
        if abs(counted - expected) > 0.5:
            raise ValueError(
                f"GAF counted {counted:g} items in this step's micro-batches, but the Trainer normalised the loss by "
                f"num_items_in_batch={expected:g}, so the accepted micro-batches cannot be weighed. Override "
                "gaf_num_items(inputs) to count the items of one micro-batch as your Trainer counts them."
            )


def _data_lengths_differ(what: str, per_rank: list[int]) -> ValueError:
    return ValueError(
        f"The processes' training data have different lengths: {what} is {per_rank} by rank, so the ranks would "
        "run different numbers of passes and steps (the process that runs out first leaves the others waiting). "
        "Give the Trainer one map-style dataset, which it shards evenly, or IterableDatasets of equal length per rank."
    )


def _check_memory(trainer, order) -> None:
    """Log what GAF will allocate; refuse, naming K, P and the total, when it clearly does not fit."""
    k = trainer.args.gradient_accumulation_steps
    p = sum(param.numel() for param in order)
    element = torch.finfo(order[0].dtype).bits // 8 if order[0].dtype.is_floating_point else 4
    device = order[0].device
    buffer = GradientBuffer.required_bytes(order, k)
    exchange = GAFExchange(
        exchange=trainer.args.gaf_exchange, bucket_size=trainer.args.gaf_bucket_size or DEFAULT_BUCKET_SIZE
    ).receive_buffer_bytes(k, p, element)
    total = buffer + exchange
    logger.info(
        f"GAF allocates {_gib(total)} on {device}: {k} x {p:,} micro-gradient buffer and the filtered gradient "
        f"({_gib(buffer)}), and the exchange's receive buffer ({_gib(exchange)})."
    )
    free = available_memory(device)
    if free is not None and total > free:
        raise MemoryError(
            f"GAF needs {_gib(total)} on {device} for K={k} micro-gradients of P={p:,} parameters "
            f"({_gib(buffer)} for the [K+1, P] buffer, {_gib(exchange)} for the exchange), but only {_gib(free)} "
            "is available. Lower gradient_accumulation_steps (K) and raise per_device_train_batch_size or the "
            "number of processes instead, or freeze parameters."
        )


def _gib(size: int) -> str:
    return f"{size / 2**30:.2f} GiB"


class _SkipHandler(TrainerCallback):
    """Turns the optimizer step of a skipped GAF step into a no-op the Trainer recognises as skipped.

    Around `optimizer.step()`: with `sync_gradients` False, accelerate's optimizer step does
    nothing (no optimizer or grad-scaler update: that is how accumulation steps work), and the
    step is marked as skipped so the Trainer does not step the LR scheduler (unless
    `gaf_skipped_steps_advance_scheduler`). A grad scaler that unscaled no gradients is reset to
    its own scale, so its growth tracker is untouched.
    """

    def __init__(self, trainer: GAFMixin):
        self.trainer = trainer

    def _skipped(self) -> bool:
        machinery = self.trainer._gaf
        return machinery is not None and machinery.skipped

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self._skipped():
            self.trainer.accelerator.sync_gradients = False

    def on_optimizer_step(self, args, state, control, **kwargs):
        trainer = self.trainer
        if not self._skipped():
            if trainer.accelerator.scaler is None:
                compat.mark_optimizer_step_skipped(trainer.optimizer, False)
            return
        trainer.accelerator.sync_gradients = True
        compat.mark_optimizer_step_skipped(trainer.optimizer, not args.gaf_skipped_steps_advance_scheduler)
        scaler = trainer.accelerator.scaler
        if scaler is not None and scaler.is_enabled():
            scaler.update(new_scale=scaler.get_scale())


class _SameDataOnEveryRank(TrainerCallback):
    """Checks before the first step that every process has as many training batches as the others."""

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        if not (dist.is_initialized() and dist.get_world_size() > 1) or train_dataloader is None:
            return
        try:
            length = len(train_dataloader)
        except TypeError:  # an iterable dataset: checked step by step
            length = -1
        lengths = [None] * dist.get_world_size()
        dist.all_gather_object(lengths, length)
        if len(set(lengths)) > 1:
            raise _data_lengths_differ("the number of training batches", lengths)
