"""`GAFMixin`: Gradient Agreement Filtering for any `transformers.Trainer` subclass; `GAFTrainer`.

`class MyGAFTrainer(GAFMixin, MyTrainer)` keeps everything `MyTrainer` does (its loss, logging,
callbacks, data) and changes what happens to gradients, through public seams of the Trainer:

* `training_step` runs each forward/backward pass (the subclass's own) as one micro-gradient:
  under data parallelism with DDP's gradient all-reduce disabled, each parameter's gradient
  moved into one row of a `[K, P]` buffer as the backward pass produces it
  ([`~hf_gaf.GradientBuffer`]); under FSDP2 with every pass's reduce-scatter replaced by GAF's
  exchange of unreduced shards ([`~hf_gaf.FSDPExchange`]).
* At the last pass of an optimizer step (`accelerator.sync_gradients`), the micro-gradients of
  every process are filtered in one exchange, and `.grad` becomes the filtered gradient (under
  FSDP2, each rank's sharded gradient), at the scale of the plain Trainer's accumulated gradient.
  Parameters that got no gradient in any pass on any process keep `.grad = None`. The Trainer
  then clips and steps as usual.
* When nothing is updated the step is skipped: a callback around the optimizer step turns it
  into a no-op (no parameter, optimizer-state or grad-scaler update) that the Trainer recognises
  as skipped, so the LR scheduler stays put; `global_step` still advances.
* `log` adds the `gaf/` statistics; `train` returns the run's GAF summary with its metrics.

What this needs beyond public API is in `hf_gaf.compat`, checked at construction.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from accelerate.utils import DistributedType
from transformers import Trainer, TrainerCallback
from transformers.utils import logging

from . import compat
from .arguments import GAFTrainingArguments, check_gaf_arguments
from .exchange import GAFExchange
from .gradients import GradientBuffer, ParameterUnits, available_memory, parameter_units
from .rule import GAFResult, Units, check_microgradients
from .state import GAFState

__all__ = ["GAFMixin", "GAFTrainer"]

logger = logging.get_logger(__name__)

_SUPPORTED = (
    "Supported: a single process, data parallelism (DDP) launched with `accelerate launch` or `torchrun`, and FSDP2 "
    "(`--fsdp full_shard --fsdp_config '{\"fsdp_version\": 2}'`, or `fsdp_version: 2` in the accelerate config)."
)
_UNSUPPORTED = {
    DistributedType.DEEPSPEED: "DeepSpeed",
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

    Supported: a single process (with `gradient_accumulation_steps >= 2`), data parallelism
    launched by `accelerate launch` or `torchrun` (DDP on CPU, CUDA and the other `MULTI_*`
    backends), and FSDP2 (torch >= 2.9), in fp32, bf16 and fp16 with loss scaling. FSDP1,
    DeepSpeed, Megatron-LM, XLA, tensor parallelism and `DataParallel` are refused at
    construction, naming FSDP2 as the sharded way.

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
        self._gaf_run: _Run | None = None
        self._gaf_step = _Step()
        self.gaf_last_result: GAFResult | None = None

    def _check_supported_setup(self) -> None:
        kind = self.accelerator.distributed_type
        if kind == DistributedType.FSDP and not _is_fsdp2(self):
            raise ValueError(
                "GAF does not support FSDP1 (fsdp_version 1): it replaces FSDP2's gradient reduce-scatter. Use FSDP2: "
                "--fsdp_config '{\"fsdp_version\": 2}' (or fsdp_version: 2 in the accelerate config)."
            )
        if kind in _UNSUPPORTED or getattr(self, "is_distributed_loading_by_transformers", False):
            name = _UNSUPPORTED.get(kind, "tensor parallelism (a model sharded at load time)")
            raise ValueError(
                f"GAF does not support {name}: it needs each process's micro-gradients, whole or as FSDP2 shards. {_SUPPORTED}"
            )
        if _is_fsdp2(self):
            compat.check_fsdp2()
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
        check_microgradients(world_size, self.args.gradient_accumulation_steps)

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
        """One forward/backward pass of the Trainer (subclass), captured as a micro-gradient.

        The loss is normalised by the Trainer itself (by the accumulation steps or by
        `num_items_in_batch`), so each captured gradient is what the plain Trainer would add to
        `.grad`. At the last pass of the step the GAF exchange runs and fills `.grad`.
        """
        run, step = self._gaf_run_for(), self._gaf_step
        if step.passes >= run.gradients.num_micro:
            raise RuntimeError(
                f"GAF captured more than gradient_accumulation_steps={run.gradients.num_micro} micro-gradients for one "
                "optimizer step; call training_step only from the Trainer's training loop."
            )
        num_items_in_batch = args[0] if args else kwargs.get("num_items_in_batch")
        if num_items_in_batch is not None:
            step.items.append(self.gaf_num_items(inputs))
        call = self._gaf_call(run, step, num_items_in_batch) if self.accelerator.sync_gradients else None
        with run.gradients.capturing(model, step.passes, call):
            loss = super().training_step(model, inputs, *args, **kwargs)
        step.passes += 1
        if call is not None:
            self._gaf_finish_step(run, call, num_items_in_batch)
        return loss

    def gaf_num_items(self, inputs: dict[str, Any]) -> int | None:
        """The items (label tokens) of one micro-batch, counted as the Trainer counts `num_items_in_batch`.

        With token-normalised losses GAF weighs the accepted micro-batches by these counts; a
        Trainer subclass that counts `num_items_in_batch` its own way overrides this to match.
        """
        return compat.count_items(self, inputs)

    def _gaf_run_for(self) -> _Run:
        """The run's gradient path; rebuilt when a step begins after the trainable parameters changed."""
        if self._gaf_step.passes == 0:
            named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
            if self._gaf_run is None or not self._gaf_run.serves(named):
                if self._gaf_run is not None:
                    self._gaf_run.gradients.close()
                self._gaf_run = _Run.build(self, named)
        return self._gaf_run

    def _gaf_call(self, run: _Run, step: _Step, num_items_in_batch) -> _StepCall:
        """The arguments of this step's exchange, known before its last pass: threshold, units and weighting."""
        normalised = num_items_in_batch is not None and compat.loss_is_normalised_by_items(self, num_items_in_batch)
        scale, sizes = self._gaf_weighting(run, step, num_items_in_batch if normalised else None)
        state = self.gaf_state
        units = run.gradients.units if state.enabled else run.gradients.plain_units
        return _StepCall(state.threshold(self.args.gaf_threshold), self.args.gaf_rule, scale, sizes, units, normalised)

    def _gaf_finish_step(self, run: _Run, call: _StepCall, num_items_in_batch) -> None:
        """Filter this step's micro-gradients over all processes and install the result as `.grad`."""
        step, self._gaf_step = self._gaf_step, _Step()
        try:
            result = run.gradients.exchange(call)
        except RuntimeError as error:
            raise RuntimeError(f"GAF step {self.state.global_step + 1}: {error}") from error
        if call.normalised:
            step.check_item_counts(result, num_items_in_batch)
        elif call.sizes is not None:
            step.check_passes(result, run.gradients.num_micro, self.state.global_step + 1)
        self.gaf_last_result = result
        self.gaf_state.record(result, filtered_units=None if call.units is None else ~np.asarray(call.units.averaged))
        scaler = self.accelerator.scaler
        if bool(result.non_finite.any()) and scaler is not None and scaler.is_enabled():
            # Loss scaling must see the overflow to lower its scale: hand it non-finite gradients, so it skips
            # this step and backs off exactly as it would without GAF (the same decision on every rank).
            run.gradients.fill_non_finite(result)
            run.skipped = False
        elif result.skipped:
            run.gradients.clear()
            run.skipped = True
        else:
            run.gradients.install(result)
            run.skipped = False
        if result.num_excluded:
            logger.warning(
                f"GAF step {self.state.global_step + 1}: {result.num_excluded} of {result.num_microgradients} "
                f"micro-gradients were excluded ({int(result.non_finite.sum())} non-finite, the others zero)."
            )

    def _gaf_weighting(self, run: _Run, step: _Step, num_items_in_batch):
        """The exchange's `scale` and `sizes`, so that the update is the plain Trainer's on the accepted micro-batches.

        Per-micro-batch mean losses were divided by the step's passes `k`: the update is `k` x
        the mean of the accepted micro-gradients. Token-normalised losses (`num_items_in_batch`
        given) were divided by the step's `num_items_in_batch` `n` (times the number of processes
        when they average tokens across devices): the update is `n / c` x their sum over the
        accepted micro-batches' items, the token mean over the accepted micro-batches.
        """
        k_max, passes = run.gradients.num_micro, step.passes + 1
        absent = [0.0] * (k_max - passes)
        if num_items_in_batch is None:
            return float(passes), None if passes == k_max else [1.0] * passes + absent
        if any(count is None for count in step.items):
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
        return total / processes, [float(count) for count in step.items] + absent

    # -- logging --------------------------------------------------------------------------------

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        """Add the `gaf/` statistics of the logging window to training logs; no `grad_norm` for a skipped step."""
        if "loss" in logs:
            logs.update(self.gaf_state.pop_logs())
            if self._gaf_run is not None and self._gaf_run.skipped:
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


def _is_fsdp2(trainer) -> bool:
    plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None)
    return trainer.accelerator.distributed_type == DistributedType.FSDP and getattr(plugin, "fsdp_version", 1) == 2


# -- one step, and what lasts ---------------------------------------------------------------------


@dataclass(frozen=True)
class _StepCall:
    """One step's exchange arguments, and whether its losses were normalised by their items."""

    threshold: float
    rule: str
    scale: float
    sizes: list[float] | None
    units: Units | None
    normalised: bool

    def arguments(self) -> dict[str, Any]:
        return dict(threshold=self.threshold, rule=self.rule, scale=self.scale, sizes=self.sizes, units=self.units)


@dataclass
class _Step:
    """The step in progress: its passes so far and their items."""

    passes: int = 0
    items: list[int | None] = field(default_factory=list)

    def check_passes(self, result: GAFResult, k: int, step: int) -> None:
        """Raise if the processes ran different numbers of passes in this step (sizes of 1 and 0 tell)."""
        passes = (result.sizes.reshape(-1, k) > 0).sum(1).tolist()
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


class _Run:
    """What a run's steps reuse: the parameters it was built for and their gradient path."""

    def __init__(self, named, gradients: _DataParallelGradients | _ShardedGradients):
        self.named = named
        self.gradients = gradients
        self.skipped = False

    @classmethod
    def build(cls, trainer, named) -> _Run:
        args = trainer.args
        units = parameter_units(named, args.gaf_granularity, group_by=args.gaf_group_by, averaged=args.gaf_averaged_parameters)
        k, device = args.gradient_accumulation_steps, units.parameters[0].device
        if _is_fsdp2(trainer):
            gradients = _ShardedGradients(trainer.model, k, units)  # allocates at the first pass
            _check_memory(gradients.plan(), device)
        else:
            exchange = GAFExchange(exchange=args.gaf_exchange, bucket_size=args.gaf_bucket_size)
            _check_memory(_DataParallelGradients.plan(exchange, units, k), device)
            gradients = _DataParallelGradients(trainer.accelerator, units, k, exchange)
        return cls(named, gradients)

    def serves(self, named) -> bool:
        return len(named) == len(self.named) and all(a[1] is b[1] for a, b in zip(named, self.named))


class _DataParallelGradients:
    """Data parallelism: DDP's all-reduce off, each pass moved into a [`GradientBuffer`] row, one [`GAFExchange`]."""

    def __init__(self, accelerator, units: ParameterUnits, k: int, exchange: GAFExchange):
        self.accelerator = accelerator
        self.parameter_units = units
        self.buffer = GradientBuffer(units.parameters, k)
        self.exchange_state = exchange
        self.units = units.units()
        self.plain_units = units.plain()

    @property
    def num_micro(self) -> int:
        return self.buffer.num_micro

    @staticmethod
    def plan(exchange: GAFExchange, units: ParameterUnits, k: int) -> _MemoryPlan:
        """What this path will allocate: the `[K+1, P]` buffer, and the exchange's receive buffer."""
        params = units.parameters
        p = sum(param.numel() for param in params)
        receive = exchange.receive_buffer_bytes(k, p, params[0].element_size())
        return _MemoryPlan(
            {"the [K+1, P] micro-gradient buffer": GradientBuffer.required_bytes(params, k), "the exchange's receive buffer": receive},
            f"K={k} micro-gradients of P={p:,} parameters",
            "Lower gradient_accumulation_steps (K) and raise per_device_train_batch_size or the number of processes "
            "instead, shard the model with FSDP2, or freeze parameters.",
        )

    @contextlib.contextmanager
    def capturing(self, model, k: int, call: _StepCall | None) -> Iterator[None]:
        with self.accelerator.no_sync(model), self.buffer.capturing(k):
            yield

    def exchange(self, call: _StepCall) -> GAFResult:
        return self.exchange_state(
            self.buffer.buffer, **call.arguments(), out=self.buffer.gradient, received=self.buffer.received
        )

    def install(self, result: GAFResult) -> None:
        self.buffer.install(result.received & self.parameter_units.updated(result))

    def fill_non_finite(self, result: GAFResult) -> None:
        self.buffer.gradient.fill_(float("nan"))
        self.buffer.install(result.received)

    def clear(self) -> None:
        self.buffer.clear()

    def close(self) -> None:
        self.buffer.close()


class _ShardedGradients:
    """FSDP2: every pass's reduce-scatter replaced by an [`~hf_gaf.FSDPExchange`] on the wrapped model.

    With one pass per step and units within `fully_shard` modules, each module is decided during
    the backward pass (`overlap`), so the step's arguments go to the pass instead of the call.
    """

    def __init__(self, model, k: int, units: ParameterUnits):
        from .fsdp import FSDPExchange

        self.exchange_state = FSDPExchange(model, k, units, overlap="auto")
        self.units = self.exchange_state.units
        self.plain_units = self.exchange_state.plain_units
        self.num_micro = k

    def plan(self) -> _MemoryPlan:
        """What the exchange will allocate on this rank: the step's shards and this rank's filtered shard."""
        exchange = self.exchange_state
        element = exchange.params[0].element_size()
        gradient = exchange.width * element
        return _MemoryPlan(
            {"the step's micro-gradient shards": exchange.required_bytes(element) - gradient, "this rank's filtered shard": gradient},
            f"K={self.num_micro} micro-gradients in shards of {exchange.width:,} elements",
            "Lower gradient_accumulation_steps (K) and raise per_device_train_batch_size, shard over more processes, "
            "or freeze parameters.",
        )

    @contextlib.contextmanager
    def capturing(self, model, k: int, call: _StepCall | None) -> Iterator[None]:
        early = call.arguments() if call is not None and self.exchange_state.overlap else {}
        with self.exchange_state.capturing(k, **early):
            yield

    def exchange(self, call: _StepCall) -> GAFResult:
        if self.exchange_state.overlap:
            return self.exchange_state()
        return self.exchange_state(**call.arguments())

    def install(self, result: GAFResult) -> None:
        """The exchange installed the sharded gradients itself."""

    def fill_non_finite(self, result: GAFResult) -> None:
        self.exchange_state.fill_non_finite(result)

    def clear(self) -> None:
        for param in self.exchange_state.params:
            param.grad = None

    def close(self) -> None:
        self.exchange_state.close()


def _data_lengths_differ(what: str, per_rank: list[int]) -> ValueError:
    return ValueError(
        f"The processes' training data have different lengths: {what} is {per_rank} by rank, so the ranks would "
        "run different numbers of passes and steps (the process that runs out first leaves the others waiting). "
        "Give the Trainer one map-style dataset, which it shards evenly, or IterableDatasets of equal length per rank."
    )


@dataclass(frozen=True)
class _MemoryPlan:
    """What a gradient path will allocate (bytes by purpose), for what, and how to need less."""

    parts: dict[str, int]
    what: str
    fix: str


def _check_memory(plan: _MemoryPlan, device: torch.device) -> None:
    """Log what GAF will allocate; refuse before allocating, naming the sizes and the fix, when it clearly does not fit."""
    total = sum(plan.parts.values())
    parts = ", ".join(f"{_gib(size)} for {name}" for name, size in plan.parts.items())
    logger.info(f"GAF allocates {_gib(total)} on {device} for {plan.what}: {parts}.")
    free = available_memory(device)
    if free is not None and total > free:
        raise MemoryError(
            f"GAF needs {_gib(total)} on {device} for {plan.what} ({parts}), but only {_gib(free)} is available. "
            f"{plan.fix}"
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
        run = self.trainer._gaf_run
        return run is not None and run.skipped

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
