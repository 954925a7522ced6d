"""GAF across data-parallel processes: exchange micro-gradients and filter them by agreement.

[`gaf_all_reduce`] replaces `dist.all_reduce` in a data-parallel loop. Each of the `N`
processes holds `K` micro-gradients of `P` elements (a `[K, P]` tensor); together they are the
`M = N * K` micro-gradients of one macrobatch, in canonical rank-major order (index
`rank * K + k`). Every process gets the [`~hf_gaf.rule.GAFResult`] that
[`~hf_gaf.rule.filter_microgradients`] gives on all `M` of them, with the complete filtered
gradient; the result is bit-identical on every rank.

The rule only needs the `M x M` Gram matrix (see `hf_gaf.rule`), and a Gram matrix is a sum
over columns. So the default `"sharded"` exchange never gathers the vectors:

1. `P` is cut into `N` contiguous shards of whole Gram chunks; rank `s` owns shard `s`. Every
   shard is sent in buckets of about `bucket_size` columns, the unit of its pipeline.
2. Point-to-point sends, straight from the caller's buffer, of every micro-gradient's shard `s`
   to rank `s`, into a receive buffer kept between calls: rank `s` gets its shard of the other
   ranks' `M - K` micro-gradients, reads its own `K` in place, and computes the Gram matrix of
   these `M` rows (one per unit) bucket by bucket as the buckets arrive, in blocks (own x own,
   own x received, received x received).
3. [`~hf_gaf.collectives.agree`]: one all-gather of these tiny partial matrices, each behind a
   header with the call's arguments, the sizes of its micro-gradients and the caller's
   `received` flags; every rank compares the headers, adds the matrices in rank order and runs
   the rule on identical input: the same decision everywhere, no broadcast.
4. Each rank averages the accepted rows of its block (rejected rows, possibly NaN, are never
   read) into its slice of the gradient, bucket by bucket, and sends each averaged bucket to
   every other rank as soon as it is ready.

Steps 2 and 4 are an all-to-all and an all-gather written as batches of `isend`/`irecv`
(`batch_isend_irecv`, which NCCL groups into one launch), receives posted before sends, so that
gloo moves them in many medium messages rather than one large one (docs/algorithm.md measures
the difference).

Cost per rank, in elements (`M = N K`; a ring all-reduce for reference):

    exchange       sent = received          extra memory
    all_reduce     2 P (N-1)/N              0 (in place)
    all_gather     K P (N-1)                N K P  (+ P result; gloo adds a temporary of N K P)
    sharded        (K+1) P (N-1)/N          K P (N-1)/N  (+ P result)

At `K = 1` the sharded exchange moves exactly what a ring all-reduce moves. Its remaining costs
are the Gram matrix and the mean over `M` rows of a `P/N` block, both memory-bound and computed
while the bucket is in cache, and one all-gather of `N (U M^2 + K + R + 5)` float64 values (`R`
received flags). The all-gather exchange is the naive baseline of the published GAF code, kept
for comparison and for tiny models; it computes the Gram matrix exactly as
[`~hf_gaf.rule.filter_microgradients`] does. At `N = 2`, `K = 1` it moves no more data than the
sharded exchange and synchronises fewer times, so for small `P` on a high-latency link it can be
the faster.

State lives in one small object, [`GAFExchange`] (like `PowerSGDState` for DDP comm hooks): the
process group, the exchange, the bucket size, the column layout, the configuration the ranks
agreed on, and the buffers reused between calls, so that no receive buffer is allocated (and
page-faulted) per step. A training loop keeps one and calls it once per optimizer step;
[`gaf_all_reduce`] is the functional form, backed by a cached default state per group and
exchange.

Arguments are checked across ranks in two places. What fixes the size of the transfers (`K`,
`P`, dtype, units, bucket size, number of received flags) is compared with one all-gather when
it first appears on a rank or changes there, before any large transfer, so that a mistake on one
rank never leaves the others waiting. What the decision depends on (threshold, rule, scale,
sizes) travels in the header of step 3 on every call and is compared there, at no extra
synchronisation. Either way a mismatch raises on every rank. A rank whose transfer configuration
changes while the others' stays (a bug, or ranks whose data ran out at different steps) waits at
the check while they start the transfers: both sides then fail after the process group's
timeout, with an error that says so.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from . import compat
from .collectives import Call, Field, agree, check_configuration, collective_device, is_distributed, peers, post, wait
from .kernel import GRAM_CHUNK, accepted_mean, as_rows, inner_products, mean_of_rows, row_length, staging_buffer, take_columns
from .rule import GAFResult, Units, as_units, filter_microgradients, gram_matrix

__all__ = ["DEFAULT_BUCKET_SIZE", "EXCHANGES", "GAFExchange", "check_bucket_size", "check_exchange", "gaf_all_reduce"]

EXCHANGES = ("sharded", "all_gather")

# Columns per message of the sharded exchange (rounded down to whole Gram chunks): small enough
# that transfers, the Gram matrix and the mean pipeline, large enough that per-message costs
# vanish. Results never depend on it.
DEFAULT_BUCKET_SIZE = 1 << 20

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_exchange(exchange: str) -> str:
    """Return `exchange` or raise if it is not one of `EXCHANGES`."""
    if exchange not in EXCHANGES:
        raise ValueError(f"Unknown GAF exchange {exchange!r}; choose one of {', '.join(map(repr, EXCHANGES))}.")
    return exchange


def check_bucket_size(bucket_size: int | None) -> int:
    """Return the bucket size as an int (None: `DEFAULT_BUCKET_SIZE`), or raise if it is not positive."""
    if bucket_size is None:
        return DEFAULT_BUCKET_SIZE
    if int(bucket_size) < 1:
        raise ValueError(
            f"The GAF bucket size (gaf_bucket_size) must be a positive number of elements, got {bucket_size!r}; "
            "leave it unset for the exchange's default."
        )
    return int(bucket_size)


@dataclass(frozen=True)
class _Layout:
    """Who owns which columns, the buckets they travel in, and the units each bucket holds.

    `shards[r]` is the `slice` of columns rank `r` owns (contiguous, whole Gram chunks, possibly
    empty); `buckets[r]` cuts it into consecutive slices of at most `bucket_size` columns;
    `segments[r][j]` lists the pieces `(lo, hi, unit)` of bucket `j` of rank `r`, relative to
    the bucket. Every rank computes the same layout from `(P, N, bucket_size, units)`.
    """

    shards: tuple[slice, ...]
    buckets: tuple[tuple[slice, ...], ...]
    segments: tuple[tuple[tuple[tuple[int, int, int], ...], ...], ...]

    @classmethod
    def build(cls, p: int, n: int, bucket_size: int, units: Units | None = None) -> _Layout:
        chunks = -(-p // GRAM_CHUNK)
        bounds = [min(p, (r * chunks // n) * GRAM_CHUNK) for r in range(n)] + [p]
        shards = tuple(slice(bounds[r], bounds[r + 1]) for r in range(n))
        step = max(1, bucket_size // GRAM_CHUNK) * GRAM_CHUNK
        buckets = tuple(
            tuple(slice(start, min(start + step, shard.stop)) for start in range(shard.start, shard.stop, step))
            for shard in shards
        )
        whole = units or Units.whole(p)
        segments = tuple(tuple(tuple(whole.segments(b.start, b.stop)) for b in rank) for rank in buckets)
        return cls(shards, buckets, segments)

    @property
    def rounds(self) -> int:
        """Message rounds per step: the most buckets any shard has."""
        return max(len(b) for b in self.buckets)


@dataclass(frozen=True)
class _Configuration:
    """What fixes the size of the transfers; compared across ranks when it first appears or changes."""

    k: int
    p: int
    dtype: torch.dtype
    units: Units | None
    flags: int

    def fields(self, exchange: str, bucket_size: int) -> list[Field]:
        units = self.units
        return [
            Field("exchange", EXCHANGES.index(exchange) if exchange in EXCHANGES else -1, "pass the same exchange on every rank", EXCHANGES),
            Field("micro-gradients per rank K", self.k, "pass the same number of micro-gradients (gradient accumulation steps) on every rank"),
            Field("elements per micro-gradient P", self.p, "every rank must flatten the same parameters (same model, same requires_grad)"),
            Field("bucket size", bucket_size, "pass the same bucket_size (gaf_bucket_size) on every rank"),
            Field("number of units", 0 if units is None else len(units), "build the same units (granularity) on every rank"),
            Field("units", 0 if units is None else hash((units.sizes, units.averaged)) % (1 << 52), "build the same units (granularity) on every rank"),
            Field("number of received flags", self.flags, "pass received flags for the same parameters on every rank"),
            Field("dtype", _DTYPES.index(self.dtype) if self.dtype in _DTYPES else -1, "cast the micro-gradients to one dtype on every rank", _DTYPES),
        ]  # fmt: skip


_NO_CONFIGURATION = _Configuration(0, 0, torch.float32, None, 0)


class GAFExchange:
    """Reusable state for [`gaf_all_reduce`]: process group, exchange, bucket size, buffers.

    Create one per training run (identically on every rank) and call it once per optimizer step:

    ```python
    gaf = GAFExchange(exchange="sharded")
    result = gaf(buffer.buffer, threshold=0.97, out=buffer.gradient)  # this rank's [K, P]
    if not result.skipped:
        buffer.install()
    ```

    Args:
        group: process group (`None`: the default group). Without an initialised process group,
            or with a single process, the local micro-gradients are filtered alone.
        exchange: `"sharded"` (all-reduce bandwidth, the default) or `"all_gather"` (naive).
        bucket_size: columns per message of the sharded exchange (rounded down to whole Gram
            chunks of `hf_gaf.kernel.GRAM_CHUNK`), the unit of its pipeline; results never
            depend on it, but every rank must use the same. Default: `DEFAULT_BUCKET_SIZE`.

    Unless `out` is passed, `result.gradient` may be a buffer owned by this object, which its
    next call overwrites: copy it (or pass `out`, e.g. the tensor behind `.grad`) to keep it.
    """

    def __init__(
        self, group: dist.ProcessGroup | None = None, exchange: str = "sharded", bucket_size: int | None = None
    ) -> None:
        self.group = group
        self.exchange = check_exchange(exchange)
        self.bucket_size = check_bucket_size(bucket_size)
        self._buffers: dict[str, torch.Tensor] = {}
        self._layouts: dict[tuple, _Layout] = {}
        self._agreed: _Configuration | None = None

    @property
    def world_size(self) -> int:
        """Processes whose micro-gradients each call filters (1 without a process group)."""
        return dist.get_world_size(self.group) if is_distributed(self.group) else 1

    @property
    def buffer_bytes(self) -> int:
        """Bytes of the buffers kept between calls: the exchange's extra memory per rank."""
        return sum(buffer.numel() * buffer.element_size() for buffer in self._buffers.values())

    def receive_buffer_bytes(self, k: int, p: int, element_size: int) -> int:
        """Bytes this exchange will keep for `K` micro-gradients of `P` elements (for memory planning)."""
        n = self.world_size
        if n == 1:
            return 0
        if self.exchange == "all_gather":
            return n * k * p * element_size
        shard = max(s.stop - s.start for s in _Layout.build(p, n, self.bucket_size).shards)
        return (n - 1) * k * shard * element_size

    def __repr__(self) -> str:
        return f"{type(self).__name__}(exchange={self.exchange!r}, bucket_size={self.bucket_size})"

    def __call__(
        self,
        local_grads: torch.Tensor | Sequence[torch.Tensor],
        threshold: float,
        rule: str = "sequential",
        *,
        out: torch.Tensor | None = None,
        scale: float = 1.0,
        sizes: torch.Tensor | Sequence[float] | None = None,
        units: Units | Sequence[int] | None = None,
        received: torch.Tensor | Sequence[bool] | None = None,
    ) -> GAFResult:
        """Filter the micro-gradients of all ranks; see [`gaf_all_reduce`] for the contract."""
        if not is_distributed(self.group):
            rows = _local_rows(local_grads)
            if out is not None:
                _check_out(out, row_length(rows), rows[0].dtype, rows[0].device)
            result = filter_microgradients(rows, threshold, rule=rule, out=out, scale=scale, sizes=sizes, units=units)
            result.received = None if received is None else torch.as_tensor(received, dtype=torch.bool).cpu()
            return result
        rows, configuration = self._agree(local_grads, units, received)

        def check_out() -> None:
            if out is not None:
                _check_out(out, configuration.p, configuration.dtype, out.device)

        call = Call.check(threshold, rule, scale, sizes, configuration.k, check_out)
        # A bad `out` still takes part in the exchange, with a buffer of this object's, so that every rank raises.
        gradient = out if out is not None and not call.out_invalid else self._buffer("gradient", (configuration.p,), rows[0])
        received = None if received is None else torch.as_tensor(received, dtype=torch.bool).cpu()
        if self.exchange == "all_gather":
            return self._all_gather(rows, configuration, call, gradient, received)
        return self._sharded(rows, configuration, call, gradient, received)

    # -- exchanges ------------------------------------------------------------------------------

    def _all_gather(self, rows, configuration: _Configuration, call: Call, gradient: torch.Tensor, received) -> GAFResult:
        n = dist.get_world_size(self.group)
        k, p, units = configuration.k, configuration.p, configuration.units
        gathered = self._buffer("gathered", (n * k, p), rows[0])
        compat.all_gather_into_tensor(gathered, _block(rows), group=self.group)
        agreement = agree(call, gram_matrix(gathered, units), self.group, averaged=_averaged(units), received=received, partial=False)
        decision = agreement.decision
        if not decision.skipped:
            accepted_mean(gathered, decision.chosen, gradient, scale=call.scale, sizes=decision.sizes, segments=None if units is None else units.segments())
        return decision.result(gradient, per_unit=units is not None, received=agreement.received)

    def _sharded(self, rows, configuration: _Configuration, call: Call, gradient: torch.Tensor, received) -> GAFResult:
        group = self.group
        n, rank = dist.get_world_size(group), dist.get_rank(group)
        k, p, units = configuration.k, configuration.p, configuration.units
        m, u = n * k, len(units) if units is not None else 1
        layout = self._layout(p, n, units)
        own, own_buckets, own_segments = layout.shards[rank], layout.buckets[rank], layout.segments[rank]
        mine = slice(rank * k, (rank + 1) * k)
        # The other ranks' rows of this rank's shard, in canonical order without this rank's own,
        # which are read in place from `rows`.
        recv = self._buffer("recv", (m - k, own.stop - own.start), rows[0])

        def bucket_rows(columns: slice) -> list[torch.Tensor]:
            """The M rows of a bucket of this rank's shard, in canonical order."""
            theirs = recv[:, _shift(columns, own.start)]
            return [*theirs[: mine.start], *(rows[i][columns] for i in range(k)), *theirs[mine.start :]]

        # Step 2, pipelined: every round's messages are posted at once. As each bucket arrives, its
        # Gram matrices are computed in blocks (own x own, own x theirs, theirs x theirs) and, while
        # its rows are in cache, the mean of all of them: the update whenever every micro-gradient
        # is accepted with the same size (always, for M = 2 without sizes, unless skipped).
        rounds = [self._scatter_round(rows, recv, layout, j) for j in range(layout.rounds)]
        blocks = torch.zeros((u, m, m), dtype=torch.float64, device=rows[0].device)  # own rows first
        staging = staging_buffer(rows, max((c.stop - c.start for c in own_buckets), default=1))
        for j, posted in enumerate(rounds):
            wait(posted, "its shard of the micro-gradients")
            if j < len(own_buckets):
                columns, segments = own_buckets[j], own_segments[j]
                ours = take_columns(rows, columns.start, columns.stop, staging)
                theirs = recv[:, _shift(columns, own.start)]
                inner_products(ours, ours, blocks[:, :k, :k], segments=segments)
                inner_products(ours, theirs, blocks[:, :k, k:], segments=segments)
                inner_products(theirs, theirs, blocks[:, k:, k:], segments=segments)
                if call.sizes is None:
                    mean_of_rows(bucket_rows(columns), gradient[columns], scale=call.scale)
        blocks[:, k:, :k] = blocks[:, :k, k:].transpose(1, 2)
        canonical = torch.cat([torch.arange(k, k + mine.start), torch.arange(k), torch.arange(mine.start + k, m)])

        # Step 3: every rank's header and partial Gram matrices; summed in rank order, identically.
        agreement = agree(call, blocks[:, canonical][:, :, canonical], group, averaged=_averaged(units), received=received)
        decision = agreement.decision
        if decision.skipped:
            return decision.result(None, per_unit=units is not None, received=agreement.received)

        # Step 4: unless every row was accepted with equal sizes, average the accepted rows of each
        # bucket (rejected ones, possibly NaN, are not read); send each bucket on while the next
        # one is averaged.
        everything = bool(decision.accepted.all()) and agreement.sizes is None
        whole = units or Units.whole(p)
        posted = []
        for j in range(layout.rounds):
            if j < len(own_buckets) and not everything:
                columns = own_buckets[j]
                accepted_mean(
                    bucket_rows(columns), decision.chosen, gradient[columns], scale=call.scale, sizes=decision.sizes,
                    segments=whole.segments(columns.start, columns.stop),
                )  # fmt: skip
            posted += self._gather_round(gradient, layout, j)
        wait(posted, "its share of the filtered gradient")
        return decision.result(gradient, per_unit=units is not None, received=agreement.received)

    def _scatter_round(self, rows, recv: torch.Tensor, layout: _Layout, j: int) -> list:
        """Post round `j` of step 2: bucket `j` of shard `s` of every micro-gradient, to rank `s`."""
        rank, k = dist.get_rank(self.group), len(rows)
        own = layout.shards[rank]
        receives, sends = [], []
        for peer in peers(len(layout.shards), rank):
            if j < len(layout.buckets[rank]):
                columns = _shift(layout.buckets[rank][j], own.start)
                first = (peer if peer < rank else peer - 1) * k  # recv skips this rank's own rows
                receives += [(recv[first + i, columns], peer) for i in range(k)]
            if j < len(layout.buckets[peer]):
                sends += [(rows[i][layout.buckets[peer][j]], peer) for i in range(k)]
        return post(receives, sends, self.group, tag=j)

    def _gather_round(self, gradient: torch.Tensor, layout: _Layout, j: int) -> list:
        """Post round `j` of step 4: this rank's averaged bucket `j` to every rank, theirs to it."""
        rank = dist.get_rank(self.group)
        receives, sends = [], []
        for peer in peers(len(layout.shards), rank):
            if j < len(layout.buckets[peer]):
                receives.append((gradient[layout.buckets[peer][j]], peer))
            if j < len(layout.buckets[rank]):
                sends.append((gradient[layout.buckets[rank][j]], peer))
        return post(receives, sends, self.group, tag=layout.rounds + j)  # tags distinct from step 2's

    # -- agreement on the configuration -----------------------------------------------------------

    def _agree(self, local_grads, units, received) -> tuple[torch.Tensor | list[torch.Tensor], _Configuration]:
        """This rank's rows and the transfer configuration, compared across ranks when it is new here."""
        error: Exception | None = None
        rows, configuration = None, _NO_CONFIGURATION
        try:
            rows = _local_rows(local_grads)
            p = row_length(rows)
            flags = 0 if received is None else int(torch.as_tensor(received).numel())
            configuration = _Configuration(len(rows), p, rows[0].dtype, as_units(units, p), flags)
        except (TypeError, ValueError) as caught:
            error = caught
        if error is None and configuration == self._agreed:
            return rows, configuration
        self._agreed = None
        device = rows[0].device if rows is not None else collective_device(self.group)
        check_configuration(configuration.fields(self.exchange, self.bucket_size), self.group, device, error)
        self._agreed = configuration
        return rows, configuration

    # -- buffers --------------------------------------------------------------------------------

    def _layout(self, p: int, n: int, units: Units | None) -> _Layout:
        key = (p, n, units)
        if key not in self._layouts:
            self._layouts = {key: _Layout.build(p, n, self.bucket_size, units)}
        return self._layouts[key]

    def _buffer(self, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """A tensor of `shape` and `like`'s dtype and device, reused across calls."""
        buffer = self._buffers.get(name)
        if buffer is None or buffer.shape != shape or buffer.dtype != like.dtype or buffer.device != like.device:
            self._buffers.pop(name, None)  # free the old one first
            buffer = torch.empty(shape, dtype=like.dtype, device=like.device)
            self._buffers[name] = buffer
        return buffer


def gaf_all_reduce(
    local_grads: torch.Tensor | Sequence[torch.Tensor],
    threshold: float,
    *,
    rule: str = "sequential",
    exchange: str = "sharded",
    group: dist.ProcessGroup | None = None,
    out: torch.Tensor | None = None,
    scale: float = 1.0,
    sizes: torch.Tensor | Sequence[float] | None = None,
    units: Units | Sequence[int] | None = None,
    received: torch.Tensor | Sequence[bool] | None = None,
) -> GAFResult:
    """Gradient Agreement Filtering of the micro-gradients of all ranks: GAF's `all_reduce`.

    Args:
        local_grads: this rank's `[K, P]` micro-gradients (`K >= 1`, any floating dtype), or a
            sequence of `K` flat tensors of `P` elements (read in place, never stacked). Every
            rank passes the same `K`, `P` and dtype; together they are micro-gradients
            `rank * K + k`.
        threshold: cosine-distance threshold in [0, 2] (2: plain averaging of the finite,
            non-zero micro-gradients).
        rule: `"sequential"` (the paper's Algorithm 1) or `"best_start"` (order-robust).
        exchange: `"sharded"` (default, all-reduce bandwidth) or `"all_gather"` (naive).
        group: process group; `None` is the default group. Without an initialised process
            group (or with one process) the local micro-gradients are filtered alone.
        out: optional contiguous `[P]` tensor of the input's dtype and device that receives the
            gradient (e.g. [`~hf_gaf.GradientBuffer.gradient`]); it must not overlap
            `local_grads`. Without it, a new tensor is returned. Like an all-reduce buffer, `out`
            may be overwritten even when the step is skipped.
        scale: multiplies the filtered gradient, folded into its division: `scale=c` for `c`
            accepted micro-gradients costs no pass at all (see [`~hf_gaf.rule.mean_of_rows`]). A
            trainer matching gradient accumulation passes `scale=K`.
        sizes: this rank's `[K]` items behind each micro-gradient (see
            [`~hf_gaf.filter_microgradients`]); 0 marks a micro-gradient that is absent this
            step (a shorter last step), which is neither compared nor averaged.
        units: [`~hf_gaf.Units`] filtered each on its own (default: the whole micro-gradient).
        received: optional bool flags of this rank, the same number on every rank (e.g.
            [`~hf_gaf.GradientBuffer.received`], which parameters got a gradient): the result's
            `received` is their OR over every rank, carried in the step's header at no extra
            synchronisation.

    Returns:
        The [`~hf_gaf.rule.GAFResult`] of `filter_microgradients(all M micro-gradients, ...)`,
        bit-identical on every rank: the same decision and the same bits of `gradient` (`[P]`,
        input dtype, `None` when skipped). The sharded exchange sums the same float32 chunk
        products, but in blocks of rows (which BLAS rounds differently) and in another order, so
        its `distances` agree to about 1e-7 (2e-6 for bfloat16 input, whose single-process
        distances are themselves within 3e-6 of exact) and a distance that close to the
        threshold could decide the other way; `"all_gather"` reproduces them exactly.

    Raises:
        ValueError or TypeError on every rank (never a hang) for a threshold outside [0, 2], an
        unknown rule or exchange, a non-finite scale, bad sizes or `out`, or arguments differing
        across ranks. `RuntimeError` naming the rank it waited for when a peer does not answer
        within the process group's timeout.

    A training loop should keep a [`GAFExchange`] (or pass `out`), so that no buffer is
    allocated per step.
    """
    try:
        state = _default_state(group, exchange)
    except ValueError as error:
        if is_distributed(group):  # the other ranks are waiting at the configuration check
            fields = _NO_CONFIGURATION.fields(exchange, DEFAULT_BUCKET_SIZE)
            check_configuration(fields, group, collective_device(group), error)
        raise
    if out is None and is_distributed(group):
        result = state(local_grads, threshold, rule, scale=scale, sizes=sizes, units=units, received=received)
        if result.gradient is not None:
            result.gradient = result.gradient.clone()
        return result
    return state(local_grads, threshold, rule, out=out, scale=scale, sizes=sizes, units=units, received=received)


_DEFAULT_STATES: dict[tuple[object, str], GAFExchange] = {}


def _default_state(group: dist.ProcessGroup | None, exchange: str) -> GAFExchange:
    check_exchange(exchange)
    key = (group, exchange)
    if key not in _DEFAULT_STATES:
        _DEFAULT_STATES[key] = GAFExchange(group=group, exchange=exchange)
    return _DEFAULT_STATES[key]


# -- arguments ------------------------------------------------------------------------------------


def _local_rows(local_grads: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
    """This rank's micro-gradients as rows (see `hf_gaf.rule.as_rows`), read in place."""
    if isinstance(local_grads, torch.Tensor) and local_grads.dim() == 1:
        raise ValueError(
            f"Expected this rank's micro-gradients as a [K, P] tensor, got shape {tuple(local_grads.shape)}; "
            "for a single micro-gradient pass grad.unsqueeze(0)."
        )
    rows = as_rows(local_grads)
    if rows[0].dtype not in _DTYPES:
        raise TypeError(f"Micro-gradients must be one of {', '.join(map(str, _DTYPES))}, got {rows[0].dtype}.")
    return rows


def _block(rows: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
    """The rows as one contiguous `[K, P]` tensor (a copy only for a list)."""
    return rows.contiguous() if isinstance(rows, torch.Tensor) else torch.stack(rows)


def _check_out(out: torch.Tensor, p: int, dtype: torch.dtype, device: torch.device) -> None:
    if out.shape != (p,) or out.dtype != dtype or out.device != device:
        raise ValueError(
            f"out must be a [{p}] {dtype} tensor on {device} like the micro-gradients, "
            f"got {tuple(out.shape)} {out.dtype} on {out.device}."
        )
    if not out.is_contiguous():
        raise ValueError("out must be contiguous; pass a contiguous tensor or omit out.")


def _averaged(units: Units | None) -> tuple[bool, ...] | None:
    return None if units is None else units.averaged


def _shift(columns: slice, offset: int) -> slice:
    return slice(columns.start - offset, columns.stop - offset)


