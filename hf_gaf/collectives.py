"""What every GAF exchange shares across processes: the checked call, the step's one all-gather, its errors.

An exchange (data parallel, [`~hf_gaf.GAFExchange`]; FSDP2, [`~hf_gaf.FSDPExchange`]) ends a
step the same way. Every rank holds partial Gram matrices of the columns it owns; one all-gather
carries them, each behind a header with the rank's call (threshold, rule, scale, the sizes of its
micro-gradients) and its `received` flags. Every rank then compares the headers, raising on
every rank alike when one rank's call was invalid or differs from the others', sums the partial
matrices in rank order (the same bits on every rank), and runs the rule on that identical input:
[`agree`]. What fixes the size of the transfers is compared once, when it first appears or
changes on a rank, before any large transfer ([`check_configuration`]).

Collectives that time out raise one error, naming the rank waited for where the backend tells
it, and `ddp_timeout` as the setting that bounds the wait ([`wait`]).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from . import compat
from .rule import RULES, Decision, _decide, check_rule, check_scale, check_sizes, check_threshold

__all__ = ["Agreement", "Call", "Field", "agree", "all_gather_small", "check_configuration", "is_distributed", "post", "wait"]

# Message tag of the small all-gathers (configuration records, headers and partial Gram matrices).
SMALL_TAG = 1 << 30


def is_distributed(group: dist.ProcessGroup | None) -> bool:
    """Whether `group` (None: the default group) is initialised and has more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def timeout_error(what: str, error: Exception, peer: int = -1) -> RuntimeError:
    """The error of a collective that did not complete: who was waited for, and what bounds the wait."""
    who = f"rank {peer}" if peer >= 0 else "another rank"
    return RuntimeError(
        f"GAF exchange: {who} did not exchange {what} within the process group's timeout ({error}). A rank may have "
        "hung or died, or the ranks disagree on the micro-gradients (K, P) because their data ran out at different "
        "steps. The timeout is ddp_timeout (TrainingArguments)."
    )


@dataclass(frozen=True)
class Call:
    """The arguments of one step that the decision depends on, checked here and compared across ranks.

    A local error is not raised at once: the call still takes part in the exchange, so that every
    rank raises together once the headers have been compared ([`agree`]).

    Attributes:
        threshold, rule, scale: as checked (NaN / the given value where invalid).
        sizes: this rank's `[K]` sizes, float64 (None: all 1).
        k: micro-gradients on this rank.
        error: the first invalid argument's error, raised on this rank by `agree`.
        code: which argument it was (0: none), what the other ranks' errors name.
    """

    threshold: float
    rule: str
    scale: float
    sizes: torch.Tensor | None
    k: int
    error: Exception | None = None
    code: int = 0

    REASONS = ("threshold outside [0, 2]", "unknown rule", "scale not a finite number", "invalid sizes", "invalid out")

    @property
    def out_invalid(self) -> bool:
        """Whether the `extra` check (the `out` buffer) failed."""
        return self.code == len(self.REASONS)

    @classmethod
    def check(cls, threshold, rule, scale, sizes, k: int, extra: Callable[[], object] | None = None) -> Call:
        """Check the arguments of one step; `extra` checks one more (the `out` buffer), reported as 'invalid out'."""
        values: list = [math.nan, rule, math.nan, None]
        checks = (
            lambda: check_threshold(threshold),
            lambda: check_rule(rule),
            lambda: check_scale(scale),
            lambda: check_sizes(sizes, k, "local micro-gradient"),
            extra or (lambda: None),
        )
        for index, check in enumerate(checks):
            try:
                value = check()
            except (TypeError, ValueError) as caught:
                return cls(values[0], values[1], values[2], values[3], k, caught, index + 1)
            if index < 4:
                values[index] = value
        return cls(values[0], values[1], values[2], values[3], k)

    def header(self, received: torch.Tensor | None) -> torch.Tensor:
        """Error code, threshold, rule, scale, whether sizes were given, the `K` sizes, the received flags: float64."""
        rule = RULES.index(self.rule) if self.rule in RULES else -1
        given = self.sizes is not None
        head = torch.tensor([self.code, self.threshold, rule, self.scale, given], dtype=torch.float64)
        flags = torch.zeros(0) if received is None else received.to(torch.float64).cpu()
        return torch.cat([head, self.sizes if given else torch.ones(self.k, dtype=torch.float64), flags])

    def compare(self, headers: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Raise on every rank if any rank's call was invalid or differs; the `[M]` sizes (None: none given) and flags.

        The flags are the received flags of every rank, OR-ed.
        """
        if self.error is not None:
            raise self.error
        codes = headers[:, 0]
        failed = torch.nonzero(codes).flatten().tolist()
        if failed:
            what = "; ".join(f"rank {r}: {self.REASONS[int(codes[r]) - 1]}" for r in failed)
            raise ValueError(f"GAF exchange aborted because of bad arguments on another rank ({what}); see that rank's error.")
        require_same(headers[:, 1], "threshold", "pass the same threshold on every rank")
        require_same(headers[:, 2], "rule", "pass the same rule on every rank", RULES)
        require_same(headers[:, 3], "scale", "pass the same scale on every rank")
        sizes = headers[:, 5 : 5 + self.k].reshape(-1) if bool(headers[:, 4].any()) else None
        return sizes, headers[:, 5 + self.k :].amax(0) > 0


@dataclass
class Agreement:
    """What every rank holds after [`agree`]: the summed Gram matrices, the sizes, the flags and the decision."""

    gram: torch.Tensor
    sizes: torch.Tensor | None
    received: torch.Tensor | None
    decision: Decision


def agree(
    call: Call,
    partial_gram: torch.Tensor,
    group: dist.ProcessGroup | None,
    *,
    averaged: Sequence[bool] | None = None,
    received: torch.Tensor | None = None,
    partial: bool = True,
) -> Agreement:
    """Step 3 of every exchange: all-gather headers and partial Gram matrices, sum them in rank order, decide.

    Args:
        call: this rank's checked [`Call`].
        partial_gram: float64 `[U, M, M]`, the Gram matrices of the columns this rank owns.
        group: the process group (a single process: no communication).
        averaged: per unit, whether it is averaged instead of filtered.
        received: optional bool flags of this rank (e.g. which parameters got a gradient),
            returned OR-ed over every rank.
        partial: False when every rank already holds the whole Gram matrices (the all-gather
            exchange): only the headers travel.

    Raises on every rank if any rank's call was invalid or differs from the others'.
    """
    header = call.header(received)
    message = torch.cat([header, partial_gram.reshape(-1).cpu()]) if partial else header
    if is_distributed(group):
        messages = all_gather_small(message.to(partial_gram.device), group).cpu()
    else:
        messages = message[None]
    sizes, flags = call.compare(messages[:, : header.numel()])
    if partial:
        parts = messages[:, header.numel() :].reshape(-1, *partial_gram.shape)
        gram = parts[0].clone()
        for part in parts[1:]:
            gram += part
    else:
        gram = partial_gram
    decision = _decide(gram, call.threshold, call.rule, sizes, averaged)
    return Agreement(gram, sizes, None if received is None else flags, decision)


@dataclass(frozen=True)
class Field:
    """One number every rank must agree on before the transfers: what it is, and how to fix a mismatch.

    `names` shows values as names (an index into it); otherwise they show as integers.
    """

    what: str
    value: float
    fix: str
    names: Sequence | None = None


def check_configuration(
    fields: Sequence[Field], group: dist.ProcessGroup | None, device: torch.device, error: Exception | None = None
) -> None:
    """Compare `fields` across ranks with one small all-gather; raise on every rank on any mismatch.

    Every rank passes the same number of fields. A rank whose own arguments were invalid passes
    its `error` (its fields may hold anything): it raises it, and the others raise naming that
    rank, instead of waiting for it at the transfers.
    """
    record = torch.tensor([float(error is not None)] + [float(f.value) for f in fields], dtype=torch.float64)
    records = all_gather_small(record.to(device), group).cpu()
    if error is not None:
        raise error
    failed = torch.nonzero(records[:, 0]).flatten().tolist()
    if failed:
        raise ValueError(
            f"GAF exchange aborted because of invalid arguments on rank(s) {failed}; see that rank's error for the fix."
        )
    for index, spec in enumerate(fields):
        require_same(records[:, 1 + index], spec.what, spec.fix, spec.names, counts=True)


def require_same(values: torch.Tensor, what: str, fix: str, names: Sequence | None = None, *, counts: bool = False) -> None:
    """Raise if `values` (one per rank) differ; they show as `names`, as ints for `counts`, else as floats."""
    if bool((values != values[0]).any()):
        shown = [str(names[int(v)]) if names else int(v) if counts else v for v in values.tolist()]
        raise ValueError(f"GAF micro-gradients disagree across ranks: {what} is {shown} by rank; {fix}.")


def collective_device(group: dist.ProcessGroup | None) -> torch.device:
    """Where the small messages of `group` live: the current CUDA device for NCCL, else the CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# -- transfers ------------------------------------------------------------------------------------


def peers(n: int, rank: int) -> list[int]:
    """Every group rank but `rank`."""
    return [peer for peer in range(n) if peer != rank]


def post(receives: list, sends: list, group: dist.ProcessGroup | None, tag: int) -> list[tuple[dist.Work, int]]:
    """Start one batch of point-to-point transfers, receives first, so gloo has each buffer ready when its data arrives.

    `receives` and `sends` are `(tensor, group rank)` pairs. Returns every transfer's work with
    the group rank of its peer (-1 where the backend coalesces the batch into one work).
    """
    ops = [dist.P2POp(dist.irecv, t, global_rank(group, peer), group, tag) for t, peer in receives]
    ops += [dist.P2POp(dist.isend, t, global_rank(group, peer), group, tag) for t, peer in sends]
    works = dist.batch_isend_irecv(ops) if ops else []
    ranks = [peer for _, peer in receives] + [peer for _, peer in sends]
    if len(works) != len(ranks):  # NCCL coalesces a batch into one work
        return [(work, -1) for work in works]
    return list(zip(works, ranks))


def wait(posted: Sequence[tuple[dist.Work, int]], what: str) -> None:
    """Wait for posted transfers; a timeout raises [`timeout_error`] naming the peer."""
    for work, peer in posted:
        try:
            work.wait()
        except RuntimeError as error:
            raise timeout_error(what, error, peer) from error


def run_collective(collective: Callable[[], object], what: str):
    """Run a blocking collective; a timeout raises [`timeout_error`]."""
    try:
        return collective()
    except RuntimeError as error:
        raise timeout_error(what, error) from error


def all_gather_small(tensor: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Every rank's `tensor` (a few numbers), stacked in rank order: `[N, *tensor.shape]`.

    gloo's all-gather passes the pieces around a ring, `N - 1` message latencies; from 3 ranks
    on, one round of point-to-point messages between every pair arrives sooner. With 2 ranks
    the ring is one exchange too, and gloo's all-gather is the faster; other backends use theirs.
    """
    n, rank = dist.get_world_size(group), dist.get_rank(group)
    gathered = tensor.new_empty((n, *tensor.shape))
    if n == 2 or dist.get_backend(group) != "gloo":
        run_collective(lambda: compat.all_gather_into_tensor(gathered.view(-1), tensor.reshape(-1), group), "its header")
        return gathered
    gathered[rank] = tensor
    others = peers(n, rank)
    wait(post([(gathered[peer], peer) for peer in others], [(tensor, peer) for peer in others], group, SMALL_TAG), "its header")
    return gathered


def global_rank(group: dist.ProcessGroup | None, group_rank: int) -> int:
    """The global rank of `group_rank` in `group` (None: the default group)."""
    return group_rank if group is None else dist.get_global_rank(group, group_rank)
