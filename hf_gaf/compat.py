"""What GAF relies on in transformers and accelerate beyond their public API, checked in one place.

GAF extends the Trainer through public seams: `training_step`, `log`, `train`, callbacks around
the optimizer step (`on_pre_optimizer_step`, `on_optimizer_step`), `Accelerator.no_sync` and the
public `Accelerator.sync_gradients` setter. Four things have no public seam, and live here:

* marking an optimizer step as skipped, so that the Trainer leaves the LR scheduler alone:
  `AcceleratedOptimizer.step_was_skipped` (what `Accelerator.optimizer_step_was_skipped`
  reads) returns the private `_is_overflow`, which accelerate sets for fp16 overflows;
* counting the items of one micro-batch exactly as the Trainer counts `num_items_in_batch`,
  which changed in transformers 5 (causal-LM labels are counted from position 1);
* whether the Trainer normalised a loss by `num_items_in_batch` rather than dividing it by the
  number of accumulation steps;
* `ddp_timeout` on CPU, which transformers hands to the process group only on accelerators.

Under FSDP2 GAF replaces the gradient reduce-scatter of every `fully_shard` module. torch has
public setters for that (`FSDPModule.set_custom_reduce_scatter` from torch 2.9,
`set_all_reduce_hook` from 2.7, `set_gradient_divide_factor` from 2.8), but the interface a
custom reduce-scatter implements (`ReduceScatter`), the default one it replaces and the list of
a module's parameters in reduce-scatter order are private: [`check_fsdp2`] checks them once,
and raises naming torch 2.9 when they are missing.

[`check_trainer`] verifies at construction that each of them behaves as expected on the
installed versions, and raises naming the supported versions when one does not.
"""

from __future__ import annotations

import os
from datetime import timedelta
from importlib.metadata import version

import torch
from packaging.version import Version

__all__ = [
    "FSDP2_MINIMUM_TORCH",
    "MINIMUM_VERSIONS",
    "all_gather_into_tensor",
    "apply_ddp_timeout",
    "check_fsdp2",
    "check_trainer",
    "count_items",
    "fsdp2_supported",
    "fsdp_units",
    "loss_is_normalised_by_items",
    "mark_optimizer_step_skipped",
    "reduce_scatter_interface",
    "restore_default_reduce_scatter",
]

MINIMUM_VERSIONS = {"torch": "2.6", "transformers": "4.56.2", "accelerate": "1.10.1", "huggingface_hub": "0.34.0"}
"""The oldest releases hf-gaf supports (and its CI tests), as declared in pyproject.toml."""


FSDP2_MINIMUM_TORCH = "2.9"
"""The oldest torch whose FSDP2 lets GAF replace the gradient reduce-scatter (`set_custom_reduce_scatter`)."""

_FSDP2_SETTERS = ("set_custom_reduce_scatter", "set_all_reduce_hook", "set_gradient_divide_factor", "set_requires_gradient_sync")


class UnsupportedVersionError(RuntimeError):
    """An installed library does not behave as GAF relies on; the message names the supported versions."""


def _supported() -> str:
    return ", ".join(f"{name} >= {floor}" for name, floor in MINIMUM_VERSIONS.items())


def _require(condition: bool, what: str) -> None:
    if not condition:
        installed = ", ".join(f"{name} {version(name)}" for name in MINIMUM_VERSIONS)
        raise UnsupportedVersionError(
            f"GAF cannot run on the installed versions ({installed}): {what}. hf-gaf supports {_supported()}; "
            "please report this with the versions above."
        )


def check_versions() -> None:
    """Raise if an installed library is older than the supported floor."""
    for name, floor in MINIMUM_VERSIONS.items():
        installed = Version(version(name)).release
        if installed < Version(floor).release:
            raise UnsupportedVersionError(f"hf-gaf needs {name} >= {floor}, found {version(name)}; it supports {_supported()}.")


def check_trainer(trainer) -> None:
    """Check, on this Trainer and the installed versions, everything GAF relies on beyond public API."""
    from accelerate.optimizer import AcceleratedOptimizer
    from transformers import TrainerCallback

    check_versions()
    _require(
        all(hasattr(TrainerCallback, event) for event in ("on_pre_optimizer_step", "on_optimizer_step")),
        "TrainerCallback has no on_pre_optimizer_step/on_optimizer_step events",
    )
    _require(isinstance(getattr(type(trainer.accelerator), "sync_gradients", None), property)
             and type(trainer.accelerator).sync_gradients.fset is not None,
             "Accelerator.sync_gradients cannot be set")  # fmt: skip
    probe = torch.nn.Parameter(torch.ones(1))
    optimizer = AcceleratedOptimizer(torch.optim.SGD([probe], lr=1.0), device_placement=False)
    mark_optimizer_step_skipped(optimizer, True)
    skipped = optimizer.step_was_skipped
    mark_optimizer_step_skipped(optimizer, False)
    _require(skipped and not optimizer.step_was_skipped, "AcceleratedOptimizer.step_was_skipped does not follow _is_overflow")
    synced = trainer.accelerator.sync_gradients
    probe.grad = torch.ones(1)
    trainer.accelerator.sync_gradients = False
    try:
        optimizer.step()
    finally:
        trainer.accelerator.sync_gradients = synced
    _require(bool(probe.detach() == 1.0), "AcceleratedOptimizer.step steps while sync_gradients is False")


def mark_optimizer_step_skipped(optimizer, skipped: bool) -> None:
    """Make `Accelerator.optimizer_step_was_skipped` report this step as skipped (or not)."""
    optimizer._is_overflow = skipped


def count_items(trainer, inputs) -> int | None:
    """The items of one micro-batch as the Trainer counts them for `num_items_in_batch` (None: no labels).

    transformers 5 counts `shift_labels` when the collator provides them, and causal-LM labels
    from position 1 (the Trainer's `_loss_shifts_labels`); 4.x counts every label.
    """
    if not isinstance(inputs, dict) or "labels" not in inputs:
        return None
    labels = inputs["labels"]
    if hasattr(trainer, "_loss_shifts_labels"):
        if "shift_labels" in inputs:
            labels = inputs["shift_labels"]
        elif trainer._loss_shifts_labels:
            labels = labels[..., 1:]
    if not isinstance(labels, torch.Tensor):
        return None
    return int(labels.ne(-100).sum())


def loss_is_normalised_by_items(trainer, num_items_in_batch) -> bool:
    """Whether the Trainer normalised this step's losses by `num_items_in_batch` (not by the accumulation steps)."""
    explicit = getattr(trainer, "loss_is_scaled_for_ga", None)
    if explicit is not None:
        return bool(explicit)
    return (trainer.model_accepts_loss_kwargs and num_items_in_batch is not None) or trainer.compute_loss_func is not None


def apply_ddp_timeout(args) -> None:
    """Create the CPU process group with `args.ddp_timeout` before transformers creates it without one.

    transformers passes `ddp_timeout` to accelerate's `PartialState` only on accelerators; with
    `use_cpu` the gloo group keeps torch's 30-minute default, so a hung peer blocks every rank
    that long. Creating the state first, through accelerate's public `PartialState`, gives the
    group the requested timeout; the Trainer then reuses that state.
    """
    from accelerate import PartialState

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or torch.distributed.is_initialized():
        return
    use_cpu = getattr(args, "use_cpu", False) or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    if not use_cpu or PartialState._shared_state:
        return
    PartialState(cpu=True, backend=getattr(args, "ddp_backend", None) or "gloo", timeout=timedelta(seconds=args.ddp_timeout))


def all_gather_into_tensor(output: torch.Tensor, input: torch.Tensor, group=None) -> None:
    """`dist.all_gather_single` (torch >= 2.10), or the `all_gather_into_tensor` it renamed: inputs concatenated."""
    gather = getattr(torch.distributed, "all_gather_single", None) or torch.distributed.all_gather_into_tensor
    gather(output, input, group=group)


def check_fsdp2() -> None:
    """Raise, naming torch 2.9, unless FSDP2 lets GAF replace its gradient reduce-scatter on the installed torch."""
    from torch.distributed.fsdp import FSDPModule

    installed = Version(version("torch")).release
    missing = [name for name in _FSDP2_SETTERS if not hasattr(FSDPModule, name)]
    if installed < Version(FSDP2_MINIMUM_TORCH).release or missing:
        raise UnsupportedVersionError(
            f"GAF under FSDP2 needs torch >= {FSDP2_MINIMUM_TORCH} (FSDPModule.set_custom_reduce_scatter), found torch "
            f"{version('torch')}. Upgrade torch, or train with data parallelism (DDP) instead of FSDP."
        )
    try:
        reduce_scatter_interface()
        _default_reduce_scatter()
    except ImportError as error:
        _require(False, f"torch.distributed.fsdp has no ReduceScatter interface ({error})")


def fsdp2_supported() -> bool:
    """Whether [`check_fsdp2`] passes on the installed torch."""
    try:
        check_fsdp2()
    except UnsupportedVersionError:
        return False
    return True


def reduce_scatter_interface() -> type:
    """FSDP2's `ReduceScatter` interface (private in torch), which a custom reduce-scatter implements."""
    from torch.distributed.fsdp._fully_shard._fsdp_api import ReduceScatter

    return ReduceScatter


def _default_reduce_scatter() -> type:
    from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultReduceScatter

    return DefaultReduceScatter


def restore_default_reduce_scatter(module) -> None:
    """Give an FSDP2 module back the reduce-scatter it had before a custom one was set, and no divide factor."""
    module.set_custom_reduce_scatter(_default_reduce_scatter()())
    group = module._get_fsdp_state()._fsdp_param_group
    if group is not None:
        group.gradient_divide_factor = None
        group._all_reduce_hook = None


def fsdp_units(model) -> list[tuple[object, list]]:
    """Every `fully_shard` call's module and the parameters it shards, in the order its reduce-scatter lays them out.

    One call may cover several modules (`fully_shard([norm, lm_head])`, as accelerate wraps a
    model's last layers): they share one state and one reduce-scatter, listed once, under the
    first of them. Raises when a call's parameters were split into several groups (a
    per-parameter mesh), which a custom reduce-scatter cannot serve.
    """
    from torch.distributed.fsdp import FSDPModule

    units, seen = [], set()
    for module in model.modules():
        if not isinstance(module, FSDPModule):
            continue
        state = module._get_fsdp_state()
        if id(state) in seen:
            continue
        seen.add(id(state))
        groups = getattr(state, "_fsdp_param_groups", None)
        if groups is not None and len(groups) > 1:
            raise ValueError(
                f"GAF under FSDP2 needs one parameter group per fully_shard call, but {type(module).__name__} has "
                f"{len(groups)} (a shard_placement_fn giving parameters different meshes); shard them on one mesh."
            )
        group = state._fsdp_param_group
        params = [] if group is None else [fsdp_param.sharded_param for fsdp_param in group.fsdp_params]
        _require(all(isinstance(p, torch.nn.Parameter) for p in params), "FSDP2 parameter groups hold no sharded parameters")
        units.append((module, params))
    return units
