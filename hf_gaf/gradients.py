"""Move a model's gradients in and out of a flat `[K, P]` buffer of micro-gradients.

GAF compares whole micro-gradients, so each backward pass's `.grad` tensors are copied into one
row of a preallocated buffer with a fixed layout (parameter order and offsets), the exchange
filters the rows into the buffer's `[P]` gradient, and every `.grad` becomes a view of it. The
buffers are allocated once and reused every step, so the page faults of a fresh multi-megabyte
allocation are paid once, not per micro-batch.

The copy is best made during the backward pass ([`GradientBuffer.capturing`]), as DDP fills its
buckets: each gradient is moved into the row from a post-accumulate-grad hook while it is still
in cache, and freed at once, so the next parameter's gradient reuses its memory.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch

from .rule import GAFResult, Units

__all__ = ["GRANULARITIES", "GradientBuffer", "ParameterUnits", "available_memory", "check_granularity", "parameter_units"]

GRANULARITIES = ("model", "tensor", "group")


class GradientBuffer:
    """A reusable `[num_micro, P]` buffer holding one flattened micro-gradient per row.

    The layout is fixed at construction: the parameters in the given order (only those with
    `requires_grad`), each occupying `numel` consecutive entries. Every process of a
    data-parallel job builds it from the same model, so row layouts agree across processes.

    Args:
        params: the model's parameters (e.g. `model.parameters()`); frozen ones are left out.
        num_micro: rows of the buffer, i.e. the most micro-gradients one optimizer step captures.
        dtype: buffer dtype. By default the parameters' common dtype when they all share one
            (micro-gradients are then stored exactly as autograd produced them, which keeps
            `threshold=2` bit-compatible with plain accumulation), else their promoted dtype
            (float32 for a float32/bfloat16 mix).

    Contract: [`~GradientBuffer.capturing`] moves the gradients of the backward passes run
    inside it into a row as soon as autograd has accumulated them, and clears `.grad`; a
    parameter without a gradient contributes zeros, and `received` records which parameters got
    one since row 0 was last captured. The hooks that move them are registered once and do
    nothing outside `capturing`; [`~GradientBuffer.close`] removes them. The filtered gradient goes into [`~GradientBuffer.gradient`]
    (pass it as the exchange's `out`), and [`~GradientBuffer.install`] makes every `.grad` a view
    of it, like DDP's `gradient_as_bucket_view`: no copy, no allocation per step.
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], num_micro: int, dtype: torch.dtype | None = None):
        if num_micro < 1:
            raise ValueError(f"GradientBuffer needs num_micro >= 1, got {num_micro}.")
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise ValueError("GradientBuffer got no parameter with requires_grad=True: there is nothing to train.")
        devices = {p.device for p in self.params}
        if len(devices) != 1:
            raise ValueError(
                f"GradientBuffer needs all trainable parameters on one device, got {sorted(map(str, devices))}. "
                "Model parallelism across devices is not supported; use data parallelism (DDP) instead."
            )
        self.dtype = _buffer_dtype(self.params) if dtype is None else dtype
        if not self.dtype.is_floating_point:
            raise TypeError(f"GradientBuffer dtype must be floating point, got {self.dtype}.")
        self.offsets: list[int] = []
        total = 0
        for p in self.params:
            self.offsets.append(total)
            total += p.numel()
        self.numel = total
        self.buffer = torch.zeros(num_micro, total, dtype=self.dtype, device=self.params[0].device)
        self.received = torch.zeros(len(self.params), dtype=torch.bool)
        self._gradient: torch.Tensor | None = None
        self._gradient_views: list[torch.Tensor] = []
        self._row_views = [[view for _, view in self._slices(row)] for row in self.buffer]
        self._capture_row: list[torch.Tensor] | None = None  # the row's per-parameter views while capturing
        self._captured: list[bool] = []
        self._hooks: list = []

    @staticmethod
    def required_bytes(params: Iterable[torch.nn.Parameter], num_micro: int, dtype: torch.dtype | None = None) -> int:
        """Bytes a buffer of `num_micro` rows over `params` allocates: its rows and its gradient."""
        params = [p for p in params if p.requires_grad]
        dtype = _buffer_dtype(params) if dtype is None else dtype
        return (num_micro + 1) * sum(p.numel() for p in params) * torch.finfo(dtype).bits // 8

    @property
    def num_micro(self) -> int:
        return self.buffer.shape[0]

    @property
    def gradient(self) -> torch.Tensor:
        """The `[P]` tensor behind the `.grad` views that [`~GradientBuffer.install`] sets."""
        self._gradient_slices()
        return self._gradient

    def _gradient_slices(self) -> list[torch.Tensor]:
        """Each parameter's view of the gradient, allocated on first use."""
        if self._gradient is None:
            self._gradient = torch.empty(self.numel, dtype=self.dtype, device=self.buffer.device)
            self._gradient_views = [view for _, view in self._slices(self._gradient)]
        return self._gradient_views

    def _slices(self, flat: torch.Tensor):
        for p, start in zip(self.params, self.offsets):
            yield p, flat[start : start + p.numel()].view(p.shape)

    def capture(self, k: int) -> torch.Tensor:
        """Move every parameter's `.grad` into row `k` (zeros where there is none); returns the row."""
        with self.capturing(k) as row:  # no backward inside: the exit moves what .grad holds
            return row

    @contextmanager
    def capturing(self, k: int) -> Iterator[torch.Tensor]:
        """Move the gradients of the backward passes run inside the block into row `k`.

        Each parameter's gradient is moved into the row (and its `.grad` set to None) by a
        post-accumulate-grad hook, the moment autograd has accumulated it; several backward
        passes inside the block add up in the row, as they would in `.grad`. On exit the row
        holds what [`~GradientBuffer.capture`] would have captured: gradients a hook did not see
        (a `.grad` set by hand) are moved in, parameters without any gradient get zeros. Yields
        the row.
        """
        if not 0 <= k < self.num_micro:
            raise IndexError(f"Micro-gradient index {k} is out of range for a buffer of {self.num_micro} rows.")
        if self._capture_row is not None:
            raise RuntimeError("GradientBuffer.capturing is already active; captures cannot be nested.")
        if k == 0:
            self.received.zero_()
        if not self._hooks:
            self._register_hooks()
        self._capture_row = self._row_views[k]
        self._captured = [False] * len(self.params)
        try:
            yield self.buffer[k]
        finally:
            with torch.no_grad():
                for i, p in enumerate(self.params):
                    if p.grad is not None:
                        self._move_grad(i, p)
                    elif not self._captured[i]:
                        self._capture_row[i].zero_()
            self.received |= torch.tensor(self._captured)
            self._capture_row = None

    def _register_hooks(self) -> None:
        """One post-accumulate-grad hook per parameter, kept until `close`; idle outside `capturing`."""
        buffer = weakref.ref(self)

        def hook(param: torch.Tensor, index: int) -> None:
            this = buffer()
            if this is not None and this._capture_row is not None:
                this._move_grad(index, param)

        self._hooks = [p.register_post_accumulate_grad_hook(partial(hook, index=i)) for i, p in enumerate(self.params)]

    def close(self) -> None:
        """Remove the capture hooks from the parameters (a buffer replaced by another must be closed)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def _move_grad(self, index: int, param: torch.Tensor) -> None:
        target = self._capture_row[index]
        if self._captured[index]:
            target.add_(param.grad)
        else:
            target.copy_(param.grad)
            self._captured[index] = True
        param.grad = None

    def install(self, parameters: torch.Tensor | Sequence[bool] | None = None) -> None:
        """Make every parameter's `.grad` its slice of [`~GradientBuffer.gradient`].

        `parameters` (default: all) selects the parameters that get a gradient; the others get
        `.grad = None`, so that optimizers leave them, their state and their weight decay
        alone. A parameter whose dtype differs from the buffer's gets a `.grad` of its own dtype
        (a copy) instead of a view.
        """
        chosen = [True] * len(self.params) if parameters is None else [bool(x) for x in parameters]
        if len(chosen) != len(self.params):
            raise ValueError(f"install got {len(chosen)} flags for {len(self.params)} parameters.")
        with torch.no_grad():
            for p, view, keep in zip(self.params, self._gradient_slices(), chosen):
                p.grad = (view if view.dtype == p.dtype else view.to(p.dtype)) if keep else None

    def write_back(self, flat: torch.Tensor, parameters: torch.Tensor | Sequence[bool] | None = None) -> None:
        """Copy a flat `[P]` gradient (any floating dtype) into [`~GradientBuffer.gradient`] and install it."""
        if flat.dim() != 1 or flat.numel() != self.numel:
            raise ValueError(f"Expected a flat gradient of {self.numel} elements, got shape {tuple(flat.shape)}.")
        with torch.no_grad():
            self.gradient.copy_(flat)
        self.install(parameters)

    def clear(self) -> None:
        """Set every parameter's `.grad` to None (what `model.zero_grad()` does by default)."""
        for p in self.params:
            p.grad = None


def _buffer_dtype(params: Sequence[torch.nn.Parameter]) -> torch.dtype:
    dtype = params[0].dtype
    for p in params[1:]:
        dtype = torch.promote_types(dtype, p.dtype)
    return dtype


def check_granularity(granularity: str, group_by: str | None = None, averaged: Sequence[str] = ()) -> list[str]:
    """Check the options that make units; return the averaged patterns as a list (a single string becomes one).

    Raises naming the fix for an unknown granularity, a `group_by` without `"group"` (or the
    reverse), or a pattern that is not a regular expression.
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"Unknown GAF granularity {granularity!r}; choose one of {', '.join(map(repr, GRANULARITIES))}.")
    if (granularity == "group") != (group_by is not None):
        raise ValueError(
            "gaf_granularity='group' needs gaf_group_by, a regular expression naming each parameter's group "
            "(e.g. --gaf_group_by 'model\\.layers\\.\\d+'), and gaf_group_by needs gaf_granularity='group'."
        )
    averaged = [averaged] if isinstance(averaged, str) else list(averaged)
    for pattern in ([group_by] if group_by else []) + averaged:
        try:
            re.compile(pattern)
        except re.error as error:
            raise ValueError(f"GAF parameter pattern {pattern!r} is not a regular expression: {error}.") from None
    return averaged


@dataclass(frozen=True)
class ParameterUnits:
    """A model's trainable parameters, ordered unit by unit, and the unit each belongs to.

    Built by [`parameter_units`]; every process builds the same from the same model. The order
    makes every unit one range of columns of a [`GradientBuffer`] built in it ([`units`]); an
    exchange that lays the parameters out its own way (FSDP2) maps them through `unit_of`.

    Attributes:
        parameters: the trainable parameters, unit by unit.
        names: their names.
        unit_of: each parameter's unit.
        averaged: per unit, whether it is averaged plainly instead of filtered.
        whole_model: one filtered unit and nothing averaged: the paper's rule, without units.
    """

    parameters: tuple[torch.nn.Parameter, ...]
    names: tuple[str, ...]
    unit_of: tuple[int, ...]
    averaged: tuple[bool, ...]

    @property
    def whole_model(self) -> bool:
        return self.averaged == (False,)

    def __len__(self) -> int:
        """Number of units."""
        return len(self.averaged)

    def units(self, sizes: Sequence[int] | None = None) -> Units | None:
        """The [`~hf_gaf.Units`] of the parameters laid out in this order, parameter `i` taking `sizes[i]` columns.

        `sizes` defaults to each parameter's `numel` (a [`GradientBuffer`]). None for the
        whole-model rule, which needs no units.
        """
        if self.whole_model:
            return None
        return Units(self._unit_sizes(sizes), self.averaged)

    def plain(self, sizes: Sequence[int] | None = None) -> Units:
        """The same units all averaged: what a step computes with filtering switched off."""
        return Units(self._unit_sizes(sizes), (True,) * len(self))

    def updated(self, result: GAFResult) -> torch.Tensor:
        """Per parameter, whether its unit was updated in `result`."""
        return result.updated[torch.tensor(self.unit_of)]

    def _unit_sizes(self, sizes: Sequence[int] | None) -> tuple[int, ...]:
        sizes = [p.numel() for p in self.parameters] if sizes is None else list(sizes)
        totals = [0] * len(self)
        for unit, size in zip(self.unit_of, sizes):
            totals[unit] += int(size)
        return tuple(totals)


def parameter_units(
    named_parameters: Iterable[tuple[str, torch.nn.Parameter]],
    granularity: str = "model",
    *,
    group_by: str | None = None,
    averaged: Sequence[str] = (),
) -> ParameterUnits:
    """Order trainable parameters into units of a granularity.

    Args:
        named_parameters: `model.named_parameters()`; frozen parameters are left out.
        granularity: `"model"` (one unit: the paper's rule), `"tensor"` (every parameter tensor
            on its own) or `"group"` (parameters whose names `group_by` matches alike share a
            unit; the others form one more).
        group_by: for `"group"`, a regular expression whose match at the start of a name
            (`re.match`) is the name of the parameter's unit, e.g. `r"model\\.layers\\.\\d+"` for
            one unit per transformer layer.
        averaged: regular expressions (`re.search`); matching parameters are averaged plainly,
            as data parallelism would, in one unit of their own instead of filtered.

    The parameters are ordered unit by unit, in the order units first appear, the averaged ones
    last; see [`ParameterUnits`].
    """
    plain = [re.compile(p) for p in check_granularity(granularity, group_by, averaged)]
    pattern = re.compile(group_by) if group_by is not None else None
    keys: dict[object, list[tuple[str, torch.nn.Parameter]]] = {}
    averaged_params: list[tuple[str, torch.nn.Parameter]] = []
    for name, param in named_parameters:
        if not param.requires_grad:
            continue
        if any(p.search(name) for p in plain):
            averaged_params.append((name, param))
            continue
        if granularity == "model":
            key: object = ""
        elif granularity == "tensor":
            key = name
        else:
            match = pattern.match(name)
            key = match.group(0) if match else None
        keys.setdefault(key, []).append((name, param))
    groups = list(keys.values()) + ([averaged_params] if averaged_params else [])
    if not groups:
        raise ValueError("The model has no trainable parameters: there is nothing to train.")
    flags = (False,) * len(keys) + ((True,) if averaged_params else ())
    order = [(name, param, unit) for unit, group in enumerate(groups) for name, param in group]
    return ParameterUnits(
        parameters=tuple(param for _, param, _ in order),
        names=tuple(name for name, _, _ in order),
        unit_of=tuple(unit for _, _, unit in order),
        averaged=flags,
    )


def available_memory(device: torch.device) -> int | None:
    """Bytes that can still be allocated on `device`, or None when it cannot be told.

    CUDA: the driver's free memory. CPU: the system's available memory, bounded by the cgroup
    limit of a container when there is one.
    """
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type != "cpu":
        return None
    try:
        import psutil

        available = int(psutil.virtual_memory().available)
    except ImportError:
        return None
    try:
        with open("/sys/fs/cgroup/memory.max") as limit_file, open("/sys/fs/cgroup/memory.current") as used_file:
            limit, used = limit_file.read().strip(), int(used_file.read())
        if limit != "max":
            available = min(available, int(limit) - used)
    except (OSError, ValueError):
        pass
    return max(available, 0)
