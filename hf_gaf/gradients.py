"""Move a model's gradients in and out of a flat ``[K, P]`` buffer of micro-gradients.

GAF compares whole micro-gradients, so each backward pass's ``.grad`` tensors are copied into one
row of a preallocated buffer with a fixed layout (parameter order and offsets), the exchange
filters the rows, and the filtered ``[P]`` gradient is written back into ``.grad``. The buffer is
allocated once and reused every step, so the page faults of a fresh multi-megabyte allocation are
paid once, not per micro-batch.

The copy is best made during the backward pass (:meth:`GradientBuffer.capturing`), as DDP fills
its buckets: each gradient is moved into the row from a post-accumulate-grad hook while it is
still in cache, and freed at once, so the next parameter's gradient reuses its memory. Measured
on ResNet-18 (CPU), two passes captured that way are faster than two passes accumulated into
``.grad`` by the plain loop, which fault in fresh gradient memory every step.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch

__all__ = ["GradientBuffer"]


class GradientBuffer:
    """A reusable ``[num_micro, P]`` buffer holding one flattened micro-gradient per row.

    The layout is fixed at construction: the parameters in the given order (only those with
    ``requires_grad``), each occupying ``numel`` consecutive entries. Every process of a
    data-parallel job builds it from the same model, so row layouts agree across processes.

    Args:
        params: the model's parameters (e.g. ``model.parameters()``); frozen ones are left out.
        num_micro: rows of the buffer, i.e. the most micro-gradients one optimizer step captures.
        dtype: buffer dtype. By default the parameters' common dtype when they all share one
            (micro-gradients are then stored exactly as autograd produced them, which keeps
            ``threshold=2`` bit-compatible with plain accumulation), else their promoted dtype
            (float32 for a float32/bfloat16 mix).

    Contract: :meth:`capture` moves the current ``.grad`` of every parameter into a row and
    clears ``.grad`` (set to None, so the next backward starts from zero without a fill pass);
    a parameter without ``.grad`` contributes zeros. :meth:`capturing` does the same for the
    backward passes run inside it, moving each gradient as soon as autograd has accumulated it.
    :meth:`write_back` sets ``.grad`` from a flat gradient, in each parameter's own dtype, as
    views of one reused ``[P]`` tensor.
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
        if dtype is None:
            dtype = self.params[0].dtype
            for p in self.params[1:]:
                dtype = torch.promote_types(dtype, p.dtype)
        if not dtype.is_floating_point:
            raise TypeError(f"GradientBuffer dtype must be floating point, got {dtype}.")
        self.offsets: list[int] = []
        total = 0
        for p in self.params:
            self.offsets.append(total)
            total += p.numel()
        self.numel = total
        self.buffer = torch.zeros(num_micro, total, dtype=dtype, device=self.params[0].device)
        self._grad_storage: torch.Tensor | None = None
        self._capture_row: list[torch.Tensor] | None = None  # per-parameter views while capturing
        self._captured: list[bool] = []

    @property
    def num_micro(self) -> int:
        return self.buffer.shape[0]

    def _row(self, k: int) -> torch.Tensor:
        if not 0 <= k < self.num_micro:
            raise IndexError(f"Micro-gradient index {k} is out of range for a buffer of {self.num_micro} rows.")
        return self.buffer[k]

    def _slices(self, flat: torch.Tensor):
        for p, start in zip(self.params, self.offsets):
            yield p, flat[start : start + p.numel()].view(p.shape)

    def capture(self, k: int) -> torch.Tensor:
        """Move every parameter's ``.grad`` into row ``k`` (zeros where there is none); returns the row."""
        with self.capturing(k) as row:  # no backward inside: the exit moves what .grad holds
            return row

    @contextmanager
    def capturing(self, k: int) -> Iterator[torch.Tensor]:
        """Move the gradients of the backward passes run inside the block into row ``k``.

        Each parameter's gradient is moved into the row (and its ``.grad`` set to None) by a
        post-accumulate-grad hook, the moment autograd has accumulated it; several backward
        passes inside the block add up in the row, as they would in ``.grad``. On exit the row
        holds what :meth:`capture` would have captured: gradients a hook did not see (a ``.grad``
        set by hand) are moved in, parameters without any gradient get zeros. Yields the row.
        """
        row = self._row(k)
        if self._capture_row is not None:
            raise RuntimeError("GradientBuffer.capturing is already active; captures cannot be nested.")
        self._capture_row = [target for _, target in self._slices(row)]
        self._captured = [False] * len(self.params)
        handles = [
            p.register_post_accumulate_grad_hook(lambda p, i=i: self._move_grad(i, p))
            for i, p in enumerate(self.params)
        ]
        try:
            yield row
        finally:
            for handle in handles:
                handle.remove()
            with torch.no_grad():
                for i, p in enumerate(self.params):
                    if p.grad is not None:
                        self._move_grad(i, p)
                    elif not self._captured[i]:
                        self._capture_row[i].zero_()
            self._capture_row = None

    def _move_grad(self, index: int, param: torch.Tensor) -> None:
        target = self._capture_row[index]
        if self._captured[index]:
            target.add_(param.grad)
        else:
            target.copy_(param.grad)
            self._captured[index] = True
        param.grad = None

    @property
    def grad_storage(self) -> torch.Tensor:
        """The ``[P]`` tensor behind the ``.grad`` views that :meth:`write_back` installs.

        An exchange can write the filtered gradient straight into it (``out=``), which makes
        :meth:`write_back` an in-place scale, or nothing at all for ``scale=1``.
        """
        if self._grad_storage is None:
            self._grad_storage = torch.empty(self.numel, dtype=self.buffer.dtype, device=self.buffer.device)
        return self._grad_storage

    def write_back(self, flat: torch.Tensor, scale: float = 1.0) -> None:
        """Set every parameter's ``.grad`` to its slice of ``scale * flat``.

        ``flat`` is a ``[P]`` gradient in this buffer's layout, in any floating dtype (or
        :attr:`grad_storage` itself). The result lands in :attr:`grad_storage`, reused every step,
        and each ``.grad`` becomes a view of it (like DDP's ``gradient_as_bucket_view``): no
        allocation and no page faults per step. A parameter whose dtype differs from the buffer's
        gets a ``.grad`` of its own dtype instead. Existing ``.grad`` tensors are replaced.
        """
        if flat.dim() != 1 or flat.numel() != self.numel:
            raise ValueError(f"Expected a flat gradient of {self.numel} elements, got shape {tuple(flat.shape)}.")
        storage = self.grad_storage
        with torch.no_grad():
            if flat.data_ptr() == storage.data_ptr() and flat.dtype == storage.dtype:
                if scale != 1.0:
                    storage.mul_(scale)
            elif scale == 1.0:
                storage.copy_(flat)
            elif flat.dtype == storage.dtype and flat.device == storage.device:
                torch.mul(flat, scale, out=storage)
            else:
                storage.copy_(flat).mul_(scale)
            for p, view in self._slices(storage):
                p.grad = view if view.dtype == p.dtype else view.to(p.dtype)

    def clear(self) -> None:
        """Set every parameter's ``.grad`` to None (what ``model.zero_grad()`` does by default)."""
        for p in self.params:
            p.grad = None
