"""The Gradient Agreement Filtering rule, computed from the Gram matrix.

GAF (Chaubard, Eddy & Kochenderfer, 2024, Algorithm 1) walks the micro-gradients of a macrobatch
in a fixed order: the first one starts a running sum ``S``; each next ``g_j`` joins it when its
cosine distance ``1 - cos(g_j, S)`` is at most the threshold ``tau``. The update is ``S / c`` for
``c`` accepted micro-gradients, and the step is skipped when no two agree (``c == 1``).

Every quantity the rule looks at is an inner product of micro-gradients, so it runs on the
``M x M`` Gram matrix ``G = [<g_i, g_j>]`` alone. Keeping ``v = sum_{i accepted} G[i, :]`` and
``s = |S|^2``, the cosine of a candidate is ``v[j] / sqrt(G[j, j] * s)``. That is what makes the
distributed exchange cheap (each process reduces a Gram matrix of its shard, never the vectors)
and what makes order-robust variants affordable: ``"best_start"`` runs the rule from every
starting micro-gradient at once and keeps the run that accepts the most.

This module is pure math: no ``torch.distributed``. The exchange strategies build on it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "RULES",
    "Decision",
    "GAFResult",
    "accepted_mean",
    "check_rule",
    "check_scale",
    "check_threshold",
    "decide",
    "filter_microgradients",
    "gram_matrix",
    "inner_products",
    "mean_of_rows",
    "stack_microgradients",
]

RULES = ("sequential", "best_start")

# Slack on the threshold test, so that rounding in the Gram matrix cannot make a micro-gradient
# disagree with an identical one at tau = 0 (or an antiparallel one at tau = 2).
AGREEMENT_TOLERANCE = 1e-6

# Columns per chunk of the float32 Gram products, accumulated in float64: bounds the float32
# rounding independently of P (measured: cosines within 2e-7 of exact for float32 input, 3e-6
# for bfloat16, from 1K to 11M columns).
GRAM_CHUNK = 1 << 14

# Elements of the block per batched product: bounds the float32 copy of half-precision input.
_GRAM_SPAN = 1 << 22


def check_threshold(threshold: float) -> float:
    """Return ``threshold`` as a float, or raise if it is not a cosine distance in [0, 2]."""
    try:
        tau = float(threshold)
    except (TypeError, ValueError):
        raise TypeError(f"GAF threshold must be a number in [0, 2], got {threshold!r}.") from None
    if not (0.0 <= tau <= 2.0):
        raise ValueError(
            f"GAF threshold must be a cosine distance in [0, 2], got {threshold!r}. "
            "Use 0.95-1.05 for filtering (the paper's best under label noise is 0.97) "
            "or 2 for plain averaging."
        )
    return tau


def check_scale(scale: float) -> float:
    """Return ``scale`` as a float, or raise if it is not a finite number."""
    try:
        value = float(scale)
    except (TypeError, ValueError):
        raise TypeError(f"GAF scale must be a finite number, got {scale!r}.") from None
    if not math.isfinite(value):
        raise ValueError(f"GAF scale must be a finite number, got {scale!r}.")
    return value


def check_rule(rule: str) -> str:
    """Return ``rule`` or raise if it is not one of :data:`RULES`."""
    if rule not in RULES:
        raise ValueError(f"Unknown GAF rule {rule!r}; choose one of {', '.join(map(repr, RULES))}.")
    return rule


@dataclass
class GAFResult:
    """The outcome of filtering one macrobatch of ``M`` micro-gradients.

    Attributes:
        gradient: the filtered mean ``sum_i weights[i] * g_i`` (shape ``[P]``, the dtype of the
            micro-gradients) times the ``scale`` asked for (default 1), or ``None`` when the
            step is skipped.
        accepted: bool ``[M]``, which micro-gradients entered the sum.
        weights: float64 ``[M]``, ``1 / c`` for accepted micro-gradients and 0 otherwise.
        distances: float64 ``[M]``, the cosine distance of each micro-gradient to the running sum
            when the rule compared them; NaN where no comparison happened (the one that started
            the sum, and excluded zero or non-finite micro-gradients).
        skipped: True when fewer than two micro-gradients agree: the optimizer must not step.
        start: index of the micro-gradient that started the sum (``-1`` if none could).
    """

    gradient: torch.Tensor | None
    accepted: torch.Tensor
    weights: torch.Tensor
    distances: torch.Tensor
    skipped: bool
    start: int

    @property
    def num_accepted(self) -> int:
        return int(self.accepted.sum())

    @property
    def num_microgradients(self) -> int:
        return self.accepted.numel()


def stack_microgradients(grads: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """Return the micro-gradients as one ``[M, P]`` floating tensor (flattening each one)."""
    if isinstance(grads, torch.Tensor):
        if grads.dim() != 2:
            raise ValueError(f"Expected micro-gradients as an [M, P] tensor, got shape {tuple(grads.shape)}.")
        block = grads
    else:
        if len(grads) == 0:
            raise ValueError("Expected at least one micro-gradient, got none.")
        sizes = {g.numel() for g in grads}
        if len(sizes) != 1:
            raise ValueError(f"All micro-gradients must have the same number of elements, got sizes {sorted(sizes)}.")
        block = torch.stack([g.reshape(-1) for g in grads])
    if block.shape[0] == 0:
        raise ValueError("Expected at least one micro-gradient, got none.")
    if not block.is_floating_point():
        raise TypeError(f"Micro-gradients must be floating point, got {block.dtype}.")
    return block


def gram_matrix(block: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Add the Gram matrix ``block @ block.T`` of an ``[M, n]`` block into a float64 ``[M, M]``.

    Products are taken in float32 (float64 for float64 input) over chunks of
    :data:`GRAM_CHUNK` columns and accumulated in float64, so that half-precision gradients lose
    nothing and long vectors lose little. The chunks go through one batched matrix product per
    span of columns: a single ``[M, n] @ [n, M]`` product would round like one long float32 sum
    (errors of 1e-4 at 10M columns), and a Python loop over chunks costs more than the reads.
    Passing ``out`` accumulates into it (partial Gram matrices of shards add up); a block that
    starts at a multiple of :data:`GRAM_CHUNK` of a longer vector has the same chunk products.
    """
    return inner_products(block, block, out)


def inner_products(x: torch.Tensor, y: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Add ``x @ y.T`` of ``[A, n]`` and ``[B, n]`` blocks into a float64 ``[A, B]``, as :func:`gram_matrix` does.

    The blocks of a Gram matrix whose rows live in different tensors (a process's own
    micro-gradients and those it received) are computed without copying them into one.
    Rows may be strided; columns must be contiguous.
    """
    (a, n), b = x.shape, y.shape[0]
    if y.shape[1] != n:
        raise ValueError(f"inner_products needs blocks of equal length, got {tuple(x.shape)} and {tuple(y.shape)}.")
    if out is None:
        out = torch.zeros(a, b, dtype=torch.float64, device=x.device)
    compute_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    span = max(1, _GRAM_SPAN // (max(a, b) * GRAM_CHUNK)) * GRAM_CHUNK
    for start in range(0, n, span):
        left = x[:, start : start + span].to(compute_dtype)
        right = left if y is x else y[:, start : start + span].to(compute_dtype)
        whole = left.shape[1] - left.shape[1] % GRAM_CHUNK
        if whole:
            lc, rc = (t[:, :whole].unflatten(1, (-1, GRAM_CHUNK)).transpose(0, 1) for t in (left, right))
            out += torch.bmm(lc, rc.transpose(1, 2)).to(torch.float64).sum(0)  # [chunks, A, B] summed
        if whole < left.shape[1]:
            out += (left[:, whole:] @ right[:, whole:].T).to(torch.float64)
    return out


@dataclass
class Decision:
    """What the rule decides from a Gram matrix; see :class:`GAFResult` for the fields."""

    accepted: torch.Tensor
    weights: torch.Tensor
    distances: torch.Tensor
    skipped: bool
    start: int


def decide(gram: torch.Tensor, threshold: float, rule: str = "sequential") -> Decision:
    """Run the GAF rule on a Gram matrix of ``M`` micro-gradients in canonical order.

    ``"sequential"`` is the paper's Algorithm 1. ``"best_start"`` runs it from every start (the
    others taken cyclically in canonical order) and keeps the run accepting the most
    micro-gradients, the lowest start on ties. Zero or non-finite micro-gradients (non-finite or
    non-positive diagonal) never start or join the sum. The answer is a deterministic function of
    ``gram``, so identical Gram matrices give identical decisions on every process.
    """
    tau = check_threshold(threshold)
    check_rule(rule)
    gram = gram.detach().to(device="cpu", dtype=torch.float64).numpy()
    m = gram.shape[0]
    diag = np.diagonal(gram)
    with np.errstate(invalid="ignore"):
        valid = np.isfinite(diag) & (diag > 0)
    starts = np.arange(m) if rule == "best_start" else np.zeros(1, dtype=np.int64)
    accepted, distances = _run_rule(gram, valid, starts, tau)
    counts = accepted.sum(axis=1)
    best = int(np.argmax(counts))  # argmax returns the first maximum: lowest start wins ties
    count = int(counts[best])
    skipped = count < 2
    weights = np.zeros(m)
    if not skipped:
        weights[accepted[best]] = 1.0 / count
    order = np.roll(np.arange(m), -int(starts[best]))
    candidates = order[valid[order]]
    first = int(candidates[0]) if candidates.size else -1
    return Decision(
        accepted=torch.from_numpy(accepted[best].copy()),
        weights=torch.from_numpy(weights),
        distances=torch.from_numpy(distances[best].copy()),
        skipped=skipped,
        start=first,
    )


def _run_rule(gram: np.ndarray, valid: np.ndarray, starts: np.ndarray, tau: float) -> tuple[np.ndarray, np.ndarray]:
    """Run Algorithm 1 from each start at once; returns ``accepted`` and ``distances``, ``[R, M]``.

    A loop of ``M`` steps over tiny arrays: numpy takes microseconds per step where torch takes
    a hundred (10 ms per optimizer step at M = 64), with the same float64 arithmetic.
    """
    m, runs = gram.shape[0], starts.size
    rows = np.arange(runs)
    safe_gram = np.where(valid[:, None] & valid[None, :], gram, 0.0)
    norms = np.sqrt(np.diagonal(safe_gram))
    accepted = np.zeros((runs, m), dtype=bool)
    distances = np.full((runs, m), math.nan)
    v = np.zeros((runs, m))  # sum of Gram rows of accepted micro-gradients
    s = np.zeros(runs)  # squared norm of the running sum
    started = np.zeros(runs, dtype=bool)
    tiny = np.finfo(np.float64).tiny
    with np.errstate(divide="ignore", invalid="ignore"):
        for offset in range(m):
            j = (starts + offset) % m
            ok = valid[j]
            start_now = ok & ~started
            dist = 1.0 - v[rows, j] / (norms[j] * np.sqrt(np.maximum(s, tiny)))
            compared = ok & started
            join = compared & (dist <= tau + AGREEMENT_TOLERANCE)
            distances[rows[compared], j[compared]] = dist[compared]
            take = start_now | join
            accepted[rows[take], j[take]] = True
            s = np.where(take, s + 2.0 * v[rows, j] + safe_gram[j, j], s)
            v = np.where(take[:, None], v + safe_gram[j], v)
            started |= start_now
    return accepted, distances


def mean_of_rows(
    rows: Sequence[torch.Tensor], out: torch.Tensor | None = None, *, scale: float = 1.0
) -> torch.Tensor:
    """Return ``scale * sum(rows) / len(rows)``, reading only ``rows``; written into ``out`` if given.

    The first row is copied and the others added in order, in float32 at least, then divided by
    ``len(rows)`` (``scale == 1``), left alone (``scale == len(rows)``: the sum that gradient
    accumulation would hold, at no extra pass) or multiplied by ``scale / len(rows)``: one fixed
    arithmetic, so every caller (single process or any exchange) gets the same bits. Writes
    straight into ``out`` (one pass per row) when no wider accumulator is needed.
    """
    if not rows:
        raise ValueError("mean_of_rows needs at least one row.")
    if out is None:
        out = torch.empty_like(rows[0])
    acc_dtype = torch.promote_types(out.dtype, torch.float32)
    if acc_dtype == out.dtype and len(rows) > 1:
        acc, rest = torch.add(rows[0], rows[1], out=out), rows[2:]
    else:
        acc = out if acc_dtype == out.dtype else torch.empty_like(out, dtype=acc_dtype)
        acc, rest = acc.copy_(rows[0]), rows[1:]
    for row in rest:
        acc.add_(row)
    if scale == 1.0:
        acc.div_(len(rows))
    elif scale != len(rows):
        acc.mul_(scale / len(rows))
    if acc is not out:
        out.copy_(acc)
    return out


def accepted_mean(
    block: torch.Tensor, accepted: torch.Tensor, out: torch.Tensor | None = None, *, scale: float = 1.0
) -> torch.Tensor:
    """Return ``scale * S / c``: the mean of the accepted rows of ``block`` (see :func:`mean_of_rows`).

    Rejected rows are never read, so an excluded NaN micro-gradient cannot leak into the result.
    """
    rows = torch.nonzero(accepted.cpu()).flatten().tolist()
    if not rows:
        raise ValueError("accepted_mean needs at least one accepted micro-gradient.")
    return mean_of_rows([block[i] for i in rows], out, scale=scale)


def filter_microgradients(
    grads: torch.Tensor | Sequence[torch.Tensor],
    threshold: float,
    *,
    rule: str = "sequential",
    out: torch.Tensor | None = None,
    scale: float = 1.0,
) -> GAFResult:
    """Filter ``M`` micro-gradients by agreement and average the ones that agree.

    Args:
        grads: an ``[M, P]`` tensor, or a sequence of ``M`` tensors of equal size (any shape and
            floating dtype; each is flattened), in canonical order.
        threshold: cosine-distance threshold ``tau`` in [0, 2]; 2 admits every finite, non-zero
            micro-gradient, i.e. plain averaging.
        rule: ``"sequential"`` (the paper's Algorithm 1) or ``"best_start"`` (order-robust).
        out: optional ``[P]`` tensor to write the filtered gradient into (reused between steps
            it saves an allocation of the model's size).
        scale: multiplies the filtered mean, folded into its division: ``scale=K`` gives what
            ``K`` accumulated backward passes would leave in ``.grad``, without an extra pass
            when all ``K`` are accepted.

    Returns:
        A :class:`GAFResult`; ``gradient`` is ``[P]`` in the input dtype, or None if skipped.
    """
    check_threshold(threshold)
    check_rule(rule)
    scale = check_scale(scale)
    block = stack_microgradients(grads)
    decision = decide(gram_matrix(block), threshold, rule)
    gradient = None if decision.skipped else accepted_mean(block, decision.accepted, out, scale=scale)
    return GAFResult(gradient=gradient, **vars(decision))
