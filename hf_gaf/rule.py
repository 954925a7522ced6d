"""The Gradient Agreement Filtering rule, computed from the Gram matrix.

GAF (Chaubard, Eddy & Kochenderfer, 2024, Algorithm 1) walks the micro-gradients of a macrobatch
in a fixed order: the first one starts a running sum `S`; each next `g_j` joins it when its
cosine distance `1 - cos(g_j, S)` is at most the threshold `tau`. The update is `S / c` for `c`
accepted micro-gradients, and the step is skipped when no two agree (`c == 1`).

Every quantity the rule looks at is an inner product of micro-gradients, so it runs on the
`M x M` Gram matrix `G = [<g_i, g_j>]` alone. Keeping `v = sum_{i accepted} G[i, :]` and
`s = |S|^2`, the cosine of a candidate is `v[j] / sqrt(G[j, j] * s)`. That is what makes the
distributed exchange cheap (each process reduces a Gram matrix of its shard, never the vectors)
and what makes order-robust variants affordable: `"best_start"` runs the rule from every
starting micro-gradient at once and keeps the run that accepts the most.

[`Units`] cut the columns of a micro-gradient into consecutive ranges (parameter tensors, or
groups of them) that are filtered each on its own: one Gram matrix per unit, all of them sums
over disjoint columns of the same products, and one decision per unit. A unit can also be
*averaged*: it takes the mean of every finite micro-gradient, whatever their agreement.

This module is pure math: no `torch.distributed`. Its arithmetic (inner products, means) is
`hf_gaf.kernel`'s; the exchanges across processes build on both.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .kernel import GRAM_CHUNK, accepted_mean, as_rows, inner_products, mean_of_rows, row_length, staging_buffer, take_columns

__all__ = [
    "RULES",
    "Decision",
    "GAFResult",
    "Units",
    "as_units",
    "check_microgradients",
    "check_rule",
    "check_scale",
    "check_sizes",
    "check_threshold",
    "decide",
    "filter_microgradients",
    "gram_matrix",
]

RULES = ("sequential", "best_start")

# Slack on the threshold test, so that rounding in the Gram matrix cannot make a micro-gradient
# disagree with an identical one at tau = 0 (or an antiparallel one at tau = 2).
AGREEMENT_TOLERANCE = 1e-6

# Elements of the block whose Gram matrix and mean are taken in one go, while it is in cache.
_FUSED_SPAN = 1 << 21


def check_threshold(threshold: float) -> float:
    """Return `threshold` as a float, or raise if it is not a cosine distance in [0, 2]."""
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
    """Return `scale` as a float, or raise if it is not a finite number."""
    try:
        value = float(scale)
    except (TypeError, ValueError):
        raise TypeError(f"GAF scale must be a finite number, got {scale!r}.") from None
    if not math.isfinite(value):
        raise ValueError(f"GAF scale must be a finite number, got {scale!r}.")
    return value


def check_rule(rule: str) -> str:
    """Return `rule` or raise if it is not one of `RULES`."""
    if rule not in RULES:
        raise ValueError(f"Unknown GAF rule {rule!r}; choose one of {', '.join(map(repr, RULES))}.")
    return rule


def check_sizes(sizes: torch.Tensor | Sequence[float] | None, count: int, what: str = "micro-gradient") -> torch.Tensor | None:
    """Return `sizes` as a float64 CPU tensor of `count` finite numbers >= 0 (items per `what`), or raise."""
    if sizes is None:
        return None
    sizes = torch.as_tensor(sizes, dtype=torch.float64).reshape(-1).cpu()
    if sizes.numel() != count or not bool(torch.isfinite(sizes).all()) or bool((sizes < 0).any()):
        raise ValueError(f"sizes must hold one finite number >= 0 of items per {what} ({count}), got {sizes.tolist()}.")
    return sizes


def check_microgradients(world_size: int, accumulation_steps: int) -> None:
    """Raise unless a step has at least two micro-gradients (`world_size x accumulation_steps >= 2`) to compare."""
    if world_size * accumulation_steps < 2:
        raise ValueError(
            f"GAF needs at least two micro-gradients per optimizer step, but world_size x "
            f"gradient_accumulation_steps = {world_size} x {accumulation_steps} = {world_size * accumulation_steps}: "
            "every step would be skipped. Set gradient_accumulation_steps >= 2 (e.g. --gradient_accumulation_steps 2), "
            "or launch more processes (accelerate launch / torchrun --nproc_per_node 2)."
        )


@dataclass(frozen=True)
class Units:
    """Consecutive column ranges of a flat micro-gradient, each filtered on its own.

    Args:
        sizes: columns of each unit, in order; they add up to the micro-gradient's length `P`
            (e.g. `[p.numel() for p in params]` filters every parameter tensor on its own).
        averaged: per unit, `True` to average it plainly (the mean of every finite
            micro-gradient, as data parallelism would) instead of filtering it. Default: none.

    Every unit gets its own Gram matrix and its own decision; a unit in which fewer than two
    micro-gradients agree is skipped on its own.
    """

    sizes: tuple[int, ...]
    averaged: tuple[bool, ...] = ()
    bounds: tuple[int, ...] = field(init=False, repr=False)

    def __post_init__(self):
        sizes = tuple(int(s) for s in self.sizes)
        if not sizes or any(s < 1 for s in sizes):
            raise ValueError(f"Units need at least one unit and a positive size for each, got sizes {self.sizes!r}.")
        averaged = tuple(bool(a) for a in self.averaged) if self.averaged else (False,) * len(sizes)
        if len(averaged) != len(sizes):
            raise ValueError(f"Units got {len(sizes)} sizes but {len(averaged)} averaged flags; give one flag per unit.")
        object.__setattr__(self, "sizes", sizes)
        object.__setattr__(self, "averaged", averaged)
        object.__setattr__(self, "bounds", (0, *np.cumsum(sizes).tolist()))

    @classmethod
    def whole(cls, p: int) -> Units:
        """One filtered unit of `p` columns: the paper's whole-model rule."""
        return cls((p,))

    def plain(self) -> Units:
        """The same column ranges, every one averaged: what these units give with filtering switched off."""
        return Units(self.sizes, (True,) * len(self.sizes))

    def __len__(self) -> int:
        return len(self.sizes)

    @property
    def numel(self) -> int:
        return self.bounds[-1]

    def segments(self, start: int = 0, stop: int | None = None) -> list[tuple[int, int, int]]:
        """The pieces `(lo, hi, unit)` of the columns `[start, stop)`, relative to `start`, in order."""
        stop = self.numel if stop is None else stop
        first = int(np.searchsorted(self.bounds, start, side="right")) - 1
        pieces = []
        for unit in range(first, len(self.sizes)):
            lo, hi = max(self.bounds[unit], start), min(self.bounds[unit + 1], stop)
            if lo >= hi:
                break
            pieces.append((lo - start, hi - start, unit))
        return pieces


@dataclass
class GAFResult:
    """The outcome of filtering one macrobatch of `M` micro-gradients.

    Without [`Units`] every field describes the whole micro-gradients; with `U` units, the
    per-micro-gradient fields gain a leading unit dimension (`[U, M]`).

    Attributes:
        gradient: the filtered gradient `scale * sum_{i accepted} g_i / sum_{i accepted} sizes[i]`
            (the mean of the accepted micro-gradients times `scale` when every size is 1),
            shape `[P]`, the dtype of the micro-gradients; `None` when the step is skipped. The
            columns of a skipped unit hold no meaningful values.
        accepted: bool `[M]` (`[U, M]`), which micro-gradients entered the sum (on a skipped
            step or unit, the one that started it).
        weights: float64 `[M]` (`[U, M]`), `1 / sum(sizes[accepted])` for accepted
            micro-gradients and 0 otherwise: `gradient = scale * sum_i weights[i] * g_i`.
        distances: float64 `[M]` (`[U, M]`), the cosine distance of each micro-gradient to the
            running sum when the rule compared them; NaN where no comparison happened.
        excluded: bool `[M]` (`[U, M]`), micro-gradients left out because their norm is zero or
            not finite: they never start or join the sum.
        non_finite: bool `[M]`, micro-gradients holding an inf or NaN value.
        skipped: True when no unit is updated (in no unit did two micro-gradients agree):
            the optimizer must not step.
        updated: bool `[U]`, the units that are updated (`[1]` without units).
        start: index of the micro-gradient that started the sum (`-1` if none could); a long
            `[U]` tensor with units.
        threshold: the threshold the rule ran with.
        sizes: float64 `[M]`, the sizes the weights come from (`None`: all 1).
        received: bool, the exchange's `received` flags (e.g. which parameters got a gradient)
            OR-ed over every rank; `None` when none were passed.
    """

    gradient: torch.Tensor | None
    accepted: torch.Tensor
    weights: torch.Tensor
    distances: torch.Tensor
    excluded: torch.Tensor
    non_finite: torch.Tensor
    skipped: bool
    updated: torch.Tensor
    start: int | torch.Tensor
    threshold: float
    sizes: torch.Tensor | None = None
    received: torch.Tensor | None = None

    @property
    def num_accepted(self) -> int:
        """Accepted micro-gradients (summed over units)."""
        return int(self.accepted.sum())

    @property
    def num_microgradients(self) -> int:
        return self.accepted.shape[-1]

    @property
    def num_excluded(self) -> int:
        """Micro-gradients left out for a zero or non-finite norm (in any unit)."""
        excluded = self.excluded if self.excluded.dim() == 1 else self.excluded.any(0)
        return int(excluded.sum())


def gram_matrix(block: torch.Tensor | list[torch.Tensor], units: Units | None = None) -> torch.Tensor:
    """The Gram matrix `block @ block.T` of `M` rows (see `as_rows`): float64 `[M, M]`, or `[U, M, M]` per unit.

    Products are taken in float32 (float64 for float64 input) over chunks of `GRAM_CHUNK`
    columns and accumulated in float64, so that half-precision gradients lose nothing and long
    vectors lose little. The chunks go through one batched matrix product per span of columns: a
    single `[M, P] @ [P, M]` product would round like one long float32 sum, and a Python loop
    over chunks costs more than the reads (docs/algorithm.md measures both). A finite block whose
    float32 products overflow is recomputed in float64, so an inf on the diagonal always means
    an inf or NaN in the micro-gradient.
    """
    m, device = len(block), block[0].device
    if units is None:
        return inner_products(block, block)
    out = torch.zeros(len(units), m, m, dtype=torch.float64, device=device)
    return inner_products(block, block, out, segments=units.segments(0, row_length(block)))


@dataclass
class Decision:
    """What the rule decides from the Gram matrices of `U` units (arrays `[U, M]`); see `GAFResult`."""

    accepted: np.ndarray
    weights: np.ndarray
    distances: np.ndarray
    excluded: np.ndarray
    non_finite: np.ndarray
    updated: np.ndarray
    start: np.ndarray
    threshold: float
    sizes: np.ndarray | None = None

    @property
    def skipped(self) -> bool:
        return not bool(self.updated.any())

    @property
    def chosen(self) -> list[list[int]]:
        """Per unit, the rows its update averages: the accepted ones of an updated unit, none of a skipped one."""
        return [np.flatnonzero(self.accepted[u]).tolist() if self.updated[u] else [] for u in range(len(self.updated))]

    @property
    def everything_accepted(self) -> bool:
        """Every unit updated with every micro-gradient: the update is the mean of all rows."""
        return bool(self.accepted.all() and self.updated.all())

    def result(self, gradient: torch.Tensor | None, per_unit: bool, received: torch.Tensor | None = None) -> GAFResult:
        """The `GAFResult` of this decision; without `per_unit` the unit dimension is dropped."""

        def view(array: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(array if per_unit else array[0])

        return GAFResult(
            gradient=None if self.skipped else gradient,
            accepted=view(self.accepted),
            weights=view(self.weights),
            distances=view(self.distances),
            excluded=view(self.excluded),
            non_finite=torch.from_numpy(self.non_finite),
            skipped=self.skipped,
            updated=torch.from_numpy(self.updated),
            start=torch.from_numpy(self.start) if per_unit else int(self.start[0]),
            threshold=self.threshold,
            sizes=None if self.sizes is None else torch.from_numpy(self.sizes),
            received=received,
        )


def decide(
    gram: torch.Tensor,
    threshold: float,
    rule: str = "sequential",
    *,
    sizes: torch.Tensor | Sequence[float] | None = None,
    averaged: Sequence[bool] | None = None,
) -> Decision:
    """Run the GAF rule on the Gram matrix of `M` micro-gradients (`[M, M]`, or `[U, M, M]` per unit).

    `"sequential"` is the paper's Algorithm 1. `"best_start"` runs it from every start (the
    others taken cyclically in canonical order) and keeps the run accepting the most
    micro-gradients, the lowest start on ties. Zero or non-finite micro-gradients (non-finite or
    non-positive diagonal) never start or join the sum. Units flagged in `averaged` accept every
    finite micro-gradient instead. `sizes` (default all 1) set the weights, `1 / sum(sizes)`
    over the accepted ones; a micro-gradient of size 0 is absent (neither compared, accepted nor
    counted as excluded). The answer is a deterministic function of its inputs, so identical
    Gram matrices give identical decisions on every process.
    """
    return _decide(gram, check_threshold(threshold), check_rule(rule), check_sizes(sizes, gram.shape[-1]), averaged)


def _decide(gram: torch.Tensor, tau: float, rule: str, sizes: torch.Tensor | None, averaged) -> Decision:
    """`decide` on arguments already checked: what the exchanges call, having checked them once."""
    grams = gram.detach().to(device="cpu", dtype=torch.float64).numpy()
    if grams.ndim == 2:
        grams = grams[None]
    u, m = grams.shape[0], grams.shape[-1]
    given = None if sizes is None else sizes.numpy()
    sizes = np.ones(m) if given is None else given
    averaged = np.zeros(u, dtype=bool) if averaged is None else np.asarray(averaged, dtype=bool)
    present = sizes > 0  # size 0: absent this step
    diag = np.diagonal(grams, axis1=1, axis2=2)  # [U, M]
    finite = np.isfinite(diag)
    with np.errstate(invalid="ignore"):
        valid = finite & (diag > 0) & present
    starts = np.arange(m) if rule == "best_start" else np.zeros(1, dtype=np.int64)

    accepted, distances = _run_rule(grams, valid, starts, tau)  # [U, R, M]
    counts = accepted.sum(axis=2)
    best = np.argmax(counts, axis=1)  # argmax returns the first maximum: lowest start wins ties
    units = np.arange(u)
    accepted, distances = accepted[units, best], distances[units, best]
    first_valid = np.array([_first(np.roll(valid[i], -int(starts[best[i]]))) for i in range(u)])
    start = np.where(first_valid >= 0, (first_valid + starts[best]) % m, -1)
    updated = counts[units, best] >= 2

    accepted[averaged] = finite[averaged] & present
    distances[averaged] = math.nan
    updated[averaged] = accepted[averaged].any(axis=1)
    start[averaged] = -1

    weights = np.zeros((u, m))
    totals = (accepted * sizes).sum(axis=1)
    rows = updated & (totals > 0)
    weights[rows] = accepted[rows] / totals[rows, None]
    excluded = ~valid & present
    excluded[averaged] = ~finite[averaged] & present
    return Decision(
        accepted=accepted,
        weights=weights,
        distances=distances,
        excluded=excluded,
        non_finite=~finite.all(axis=0) & present,
        updated=updated,
        start=start.astype(np.int64),
        threshold=tau,
        sizes=given,
    )


def _first(mask: np.ndarray) -> int:
    hits = np.flatnonzero(mask)
    return int(hits[0]) if hits.size else -1


def _run_rule(
    grams: np.ndarray, valid: np.ndarray, starts: np.ndarray, tau: float
) -> tuple[np.ndarray, np.ndarray]:
    """Run Algorithm 1 for every unit from each start at once; `accepted` and `distances`, `[U, R, M]`.

    A loop of `M` steps over tiny arrays, in numpy: per-call overheads dominate at this size,
    and numpy's are the smaller (docs/algorithm.md), with the same float64 arithmetic.
    """
    u, m = valid.shape
    r = starts.size
    runs = u * r
    unit = np.repeat(np.arange(u), r)
    first = np.tile(starts, u)
    rows = np.arange(runs)
    safe = np.where(valid[:, :, None] & valid[:, None, :], grams, 0.0)
    norms = np.sqrt(np.diagonal(safe, axis1=1, axis2=2))  # [U, M]
    accepted = np.zeros((runs, m), dtype=bool)
    distances = np.full((runs, m), math.nan)
    v = np.zeros((runs, m))  # sum of Gram rows of accepted micro-gradients
    s = np.zeros(runs)  # squared norm of the running sum
    started = np.zeros(runs, dtype=bool)
    tiny = np.finfo(np.float64).tiny
    with np.errstate(divide="ignore", invalid="ignore"):
        for offset in range(m):
            j = (first + offset) % m
            ok = valid[unit, j]
            start_now = ok & ~started
            dist = 1.0 - v[rows, j] / (norms[unit, j] * np.sqrt(np.maximum(s, tiny)))
            compared = ok & started
            join = compared & (dist <= tau + AGREEMENT_TOLERANCE)
            distances[rows[compared], j[compared]] = dist[compared]
            take = start_now | join
            accepted[rows[take], j[take]] = True
            s = np.where(take, s + 2.0 * v[rows, j] + safe[unit, j, j], s)
            v = np.where(take[:, None], v + safe[unit, j], v)
            started |= start_now
    return accepted.reshape(u, r, m), distances.reshape(u, r, m)


def filter_microgradients(
    grads: torch.Tensor | Sequence[torch.Tensor],
    threshold: float,
    *,
    rule: str = "sequential",
    out: torch.Tensor | None = None,
    scale: float = 1.0,
    sizes: torch.Tensor | Sequence[float] | None = None,
    units: Units | Sequence[int] | None = None,
) -> GAFResult:
    """Filter `M` micro-gradients by agreement and average the ones that agree.

    Args:
        grads: an `[M, P]` tensor, or a sequence of `M` tensors of equal size (any shape and
            floating dtype), in canonical order; read in place (see `as_rows`).
        threshold: cosine-distance threshold `tau` in [0, 2]; 2 admits every finite, non-zero
            micro-gradient, i.e. plain averaging.
        rule: `"sequential"` (the paper's Algorithm 1) or `"best_start"` (order-robust).
        out: optional `[P]` tensor to write the filtered gradient into (reused between steps
            it saves an allocation of the model's size).
        scale: multiplies the filtered gradient, folded into its division: `scale=K` gives what
            `K` accumulated backward passes would leave in `.grad`, without an extra pass when
            all `K` are accepted.
        sizes: `[M]` items (tokens, samples) behind each micro-gradient, when each is a sum over
            its items: the result is then `scale` times the mean per item over the accepted
            micro-batches. Default: all 1, the mean of the accepted micro-gradients.
        units: [`Units`], or the sizes of consecutive column ranges, each filtered on its own
            (default: the whole micro-gradient, the paper's rule).

    Returns:
        A [`GAFResult`]; `gradient` is `[P]` in the input dtype, or None if skipped.
    """
    tau, rule, scale = check_threshold(threshold), check_rule(rule), check_scale(scale)
    rows = as_rows(grads)
    units = as_units(units, row_length(rows))
    sizes = check_sizes(sizes, len(rows))
    averaged = None if units is None else units.averaged
    segments = None if units is None else units.segments()
    if out is None or sizes is not None:
        decision = _decide(gram_matrix(rows, units), tau, rule, sizes, averaged)
        if decision.skipped:
            return decision.result(None, per_unit=units is not None)
        gradient = accepted_mean(rows, decision.chosen, out, scale=scale, sizes=decision.sizes, segments=segments)
        return decision.result(gradient, per_unit=units is not None)
    # With an `out` to write into, the mean of every row is taken while each span of columns is in cache for
    # the Gram matrix: it is the update whenever everything is accepted, and costs no pass over memory.
    gram = torch.zeros(len(units) if units else 1, len(rows), len(rows), dtype=torch.float64, device=rows[0].device)
    n, step = row_length(rows), _FUSED_SPAN // len(rows) // GRAM_CHUNK * GRAM_CHUNK or GRAM_CHUNK
    staging = staging_buffer(rows, step)
    for start in range(0, n, step):
        stop = min(start + step, n)
        span = take_columns(rows, start, stop, staging)
        pieces = ((0, stop - start, 0),) if units is None else units.segments(start, stop)
        inner_products(span, span, gram, segments=pieces)
        mean_of_rows(list(span), out[start:stop], scale=scale)
    decision = _decide(gram, tau, rule, None, averaged)
    if not decision.skipped and not decision.everything_accepted:
        accepted_mean(rows, decision.chosen, out, scale=scale, segments=segments)
    return decision.result(out, per_unit=units is not None)


def as_units(units: Units | Sequence[int] | None, p: int) -> Units | None:
    """`units` as [`Units`] covering `p` columns (None stays None), or raise naming the mismatch."""
    if units is None:
        return None
    units = units if isinstance(units, Units) else Units(tuple(units))
    if units.numel != p:
        raise ValueError(f"The units cover {units.numel} columns but the micro-gradients have P = {p}; their sizes must add up to P.")
    return units
