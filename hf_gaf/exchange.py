"""GAF across processes: exchange micro-gradients and filter them by agreement.

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
   own x received, received x received; float32 products of column chunks, accumulated in
   float64).
3. All ranks all-gather these tiny partial matrices, each behind a header with the call's
   arguments and the sizes of its micro-gradients, and add them in rank order: every rank holds
   the same bits of `G`, and every rank sees every other rank's arguments.
4. [`~hf_gaf.rule.decide`] on `G`: identical input, identical decision, no broadcast.
5. Each rank averages the accepted rows of its block (rejected rows, possibly NaN, are never
   read) into its slice of the gradient, bucket by bucket, and sends each averaged bucket to
   every other rank as soon as it is ready.

Steps 2 and 5 are an all-to-all and an all-gather written as batches of `isend`/`irecv`
(`batch_isend_irecv`, which NCCL groups into one launch), receives posted before sends. On gloo
this is what makes the exchange cheap: in 1-4 MB messages it moves a shard up to twice as fast
as gloo's `all_to_all_single`, `broadcast` or `all_gather`, which send each tensor as one
message.

Cost per rank, in elements (`M = N K`; a ring all-reduce for reference):

    exchange       sent = received          extra memory
    all_reduce     2 P (N-1)/N              0 (in place)
    all_gather     K P (N-1)                N K P  (+ P result; gloo adds a temporary of N K P)
    sharded        (K+1) P (N-1)/N          K P (N-1)/N  (+ P result)

At `K = 1` the sharded exchange moves exactly what a ring all-reduce moves. Its remaining costs
are the Gram matrix and the mean over `M` rows of a `P/N` block, both memory-bound and computed
while the bucket is in cache, and one all-gather of `N (U M^2 + K + 8)` float64 values. The
all-gather exchange is the naive baseline of the published GAF code, kept for comparison and for
tiny models; it computes the Gram matrix exactly as [`~hf_gaf.rule.filter_microgradients`]
does. At `N = 2`, `K = 1` it moves no more data than the sharded exchange and synchronises fewer
times, so for small `P` on a high-latency link it can be the faster.

State lives in one small object, [`GAFExchange`] (like `PowerSGDState` for DDP comm hooks): the
process group, the exchange, the bucket size, the column layout, the configuration the ranks
agreed on, and the buffers reused between calls (a freshly allocated receive buffer costs more in
page faults than the transfer itself). A training loop keeps one and calls it once per optimizer
step; [`gaf_all_reduce`] is the functional form, backed by a cached default state per group and
exchange.

Arguments are checked across ranks in two places. What fixes the size of the transfers (`K`,
`P`, dtype, units, bucket size) is compared with one all-gather when it first appears on a rank
or changes there, before any large transfer, so that a mistake on one rank never leaves the
others waiting. What the decision depends on (threshold, rule, scale, sizes) travels in the
header of step 3 on every call and is compared there, at no extra synchronisation. Either way a
mismatch raises on every rank. A rank whose transfer configuration changes while the others'
stays (a bug, or ranks whose data ran out at different steps) waits at the check while they
start the transfers: both sides then fail after the process group's timeout, with an error that
says so.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .rule import (
    GRAM_CHUNK,
    RULES,
    GAFResult,
    Units,
    _as_units,
    _columns,
    _decide,
    _numel,
    _staging,
    accepted_mean,
    as_rows,
    check_rule,
    check_scale,
    check_threshold,
    filter_microgradients,
    gram_matrix,
    inner_products,
    mean_of_rows,
)

__all__ = ["DEFAULT_BUCKET_SIZE", "EXCHANGES", "GAFExchange", "gaf_all_reduce"]

EXCHANGES = ("sharded", "all_gather")

# Columns per message of the sharded exchange (rounded down to whole Gram chunks): small enough
# that transfers, the Gram matrix and the mean pipeline, large enough that per-message costs
# vanish. Results never depend on it.
DEFAULT_BUCKET_SIZE = 1 << 20

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# Message tag of the small all-gathers (configuration records, partial Gram matrices); the sharded
# exchange's transfers use tags from 0 to twice the number of bucket rounds.
_SMALL_TAG = 1 << 30

# torch >= 2.10 renamed all_gather_into_tensor; the output is the inputs concatenated along dim 0.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


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
            chunks of `hf_gaf.rule.GRAM_CHUNK`), the unit of its pipeline; results never
            depend on it, but every rank must use the same.

    Unless `out` is passed, `result.gradient` may be a buffer owned by this object, which its
    next call overwrites: copy it (or pass `out`, e.g. the tensor behind `.grad`) to keep it.
    """

    def __init__(
        self,
        group: dist.ProcessGroup | None = None,
        exchange: str = "sharded",
        bucket_size: int = DEFAULT_BUCKET_SIZE,
    ) -> None:
        _check_exchange(exchange)
        if int(bucket_size) < 1:
            raise ValueError(f"bucket_size must be a positive number of elements, got {bucket_size!r}.")
        self.group = group
        self.exchange = exchange
        self.bucket_size = int(bucket_size)
        self._buffers: dict[str, torch.Tensor] = {}
        self._layouts: dict[tuple, _Layout] = {}
        self._agreed: _Configuration | None = None

    @property
    def buffer_bytes(self) -> int:
        """Bytes of the buffers kept between calls: the exchange's extra memory per rank."""
        return sum(buffer.numel() * buffer.element_size() for buffer in self._buffers.values())

    def receive_buffer_bytes(self, k: int, p: int, element_size: int) -> int:
        """Bytes this exchange will keep for `K` micro-gradients of `P` elements (for memory planning)."""
        n = dist.get_world_size(self.group) if _is_distributed(self.group) else 1
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
    ) -> GAFResult:
        """Filter the micro-gradients of all ranks; see [`gaf_all_reduce`] for the contract."""
        if not _is_distributed(self.group):
            return _filter_locally(local_grads, threshold, rule, out, scale, sizes, units)
        rows, configuration = self._agree(local_grads, units)
        call = _Call.check(threshold, rule, scale, sizes, out, configuration)
        if self.exchange == "all_gather":
            return self._all_gather(rows, configuration, call)
        return self._sharded(rows, configuration, call)

    # -- exchanges ------------------------------------------------------------------------------

    def _all_gather(self, rows, configuration: _Configuration, call: _Call) -> GAFResult:
        n = dist.get_world_size(self.group)
        k, p, units = configuration.k, configuration.p, configuration.units
        gathered = self._buffer("gathered", (n * k, p), rows[0])
        _all_gather_single(gathered, _block(rows), group=self.group)
        gram = gram_matrix(gathered, units)
        sizes = call.compare(_all_gather_small(call.header(), self.group))
        decision = _decide(gram, call.threshold, call.rule, sizes, _averaged(units))
        gradient = None
        if not decision.skipped:
            gradient = call.destination(self, p, rows[0])
            accepted_mean(gathered, decision, gradient, scale=call.scale, sizes=sizes, units=units)
        return decision.result(gradient, per_unit=units is not None)

    def _sharded(self, rows, configuration: _Configuration, call: _Call) -> GAFResult:
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
        gradient = call.destination(self, p, rows[0])
        blocks = torch.zeros((u, m, m), dtype=torch.float64, device=rows[0].device)  # own rows first
        staging = _staging(rows, max((c.stop - c.start for c in own_buckets), default=1))
        for j, posted in enumerate(rounds):
            _wait(posted, "its shard of the micro-gradients")
            if j < len(own_buckets):
                columns, segments = own_buckets[j], own_segments[j]
                ours = _columns(rows, columns.start, columns.stop, staging)
                theirs = recv[:, _shift(columns, own.start)]
                inner_products(ours, ours, blocks[:, :k, :k], segments=segments)
                inner_products(ours, theirs, blocks[:, :k, k:], segments=segments)
                inner_products(theirs, theirs, blocks[:, k:, k:], segments=segments)
                if call.sizes is None:
                    mean_of_rows(bucket_rows(columns), gradient[columns], scale=call.scale)
        blocks[:, k:, :k] = blocks[:, :k, k:].transpose(1, 2)
        canonical = torch.cat([torch.arange(k, k + mine.start), torch.arange(k), torch.arange(mine.start + k, m)])
        gram = blocks[:, canonical][:, :, canonical]

        # Step 3: every rank's header and partial Gram matrices; summed in rank order, identically.
        header = call.header()
        messages = _all_gather_small(torch.cat([header, gram.reshape(-1)]), group)
        sizes = call.compare(messages[:, : header.numel()])
        parts = messages[:, header.numel() :].reshape(n, u, m, m)
        gram = parts[0].clone()
        for part in parts[1:]:
            gram += part
        decision = _decide(gram, call.threshold, call.rule, sizes, _averaged(units))
        if decision.skipped:
            return decision.result(None, per_unit=units is not None)

        # Step 5: unless every row was accepted with equal sizes, average the accepted rows of each
        # bucket (rejected ones, possibly NaN, are not read); send each bucket on while the next
        # one is averaged.
        everything = bool(decision.accepted.all()) and sizes is None
        posted = []
        for j in range(layout.rounds):
            if j < len(own_buckets) and not everything:
                columns = own_buckets[j]
                accepted_mean(
                    bucket_rows(columns), decision, gradient[columns], scale=call.scale, sizes=sizes, units=units,
                    start=columns.start,
                )  # fmt: skip
            posted += self._gather_round(gradient, layout, j)
        _wait(posted, "its share of the filtered gradient")
        return decision.result(gradient, per_unit=units is not None)

    def _scatter_round(self, rows, recv: torch.Tensor, layout: _Layout, j: int) -> list:
        """Post round `j` of step 2: bucket `j` of shard `s` of every micro-gradient, to rank `s`."""
        rank, k = dist.get_rank(self.group), len(rows)
        own = layout.shards[rank]
        receives, sends = [], []
        for peer in _peers(len(layout.shards), rank):
            if j < len(layout.buckets[rank]):
                columns = _shift(layout.buckets[rank][j], own.start)
                first = (peer if peer < rank else peer - 1) * k  # recv skips this rank's own rows
                receives += [(recv[first + i, columns], peer) for i in range(k)]
            if j < len(layout.buckets[peer]):
                sends += [(rows[i][layout.buckets[peer][j]], peer) for i in range(k)]
        return _post(receives, sends, self.group, tag=j)

    def _gather_round(self, gradient: torch.Tensor, layout: _Layout, j: int) -> list:
        """Post round `j` of step 5: this rank's averaged bucket `j` to every rank, theirs to it."""
        rank = dist.get_rank(self.group)
        receives, sends = [], []
        for peer in _peers(len(layout.shards), rank):
            if j < len(layout.buckets[peer]):
                receives.append((gradient[layout.buckets[peer][j]], peer))
            if j < len(layout.buckets[rank]):
                sends.append((gradient[layout.buckets[rank][j]], peer))
        return _post(receives, sends, self.group, tag=layout.rounds + j)  # tags distinct from step 2's

    # -- agreement on the configuration -----------------------------------------------------------

    def _agree(self, local_grads, units) -> tuple[torch.Tensor | list[torch.Tensor], _Configuration]:
        """This rank's rows and the transfer configuration, compared across ranks when it is new here."""
        error: Exception | None = None
        rows, configuration = None, None
        try:
            rows = _local_rows(local_grads)
            p = _numel(rows)
            configuration = _Configuration(len(rows), p, rows[0].dtype, _as_units(units, p))
        except (TypeError, ValueError) as caught:
            error = caught
        if error is None and configuration == self._agreed:
            return rows, configuration
        self._agreed = None
        record = _configuration_record(configuration, self.exchange, self.bucket_size, error)
        records = _all_gather_small(record.to(_collective_device(rows, self.group)), self.group).cpu()
        if error is not None:
            raise error
        _check_configurations(records)
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
    except ValueError:
        if _is_distributed(group):  # the other ranks are waiting at the configuration check
            record = _configuration_record(None, exchange, DEFAULT_BUCKET_SIZE, ValueError())
            _all_gather_small(record.to(_collective_device(None, group)), group)
        raise
    if out is None and _is_distributed(group):
        result = state(local_grads, threshold, rule, scale=scale, sizes=sizes, units=units)
        if result.gradient is not None:
            result.gradient = result.gradient.clone()
        return result
    return state(local_grads, threshold, rule, out=out, scale=scale, sizes=sizes, units=units)


_DEFAULT_STATES: dict[tuple[object, str], GAFExchange] = {}


def _default_state(group: dist.ProcessGroup | None, exchange: str) -> GAFExchange:
    _check_exchange(exchange)
    key = (group, exchange)
    if key not in _DEFAULT_STATES:
        _DEFAULT_STATES[key] = GAFExchange(group=group, exchange=exchange)
    return _DEFAULT_STATES[key]


# -- arguments ------------------------------------------------------------------------------------


def _check_exchange(exchange: str) -> str:
    if exchange not in EXCHANGES:
        raise ValueError(f"Unknown GAF exchange {exchange!r}; choose one of {', '.join(map(repr, EXCHANGES))}.")
    return exchange


def _is_distributed(group: dist.ProcessGroup | None) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


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


def _filter_locally(local_grads, threshold, rule, out, scale, sizes, units) -> GAFResult:
    rows = _local_rows(local_grads)
    if out is not None:
        _check_out(out, _numel(rows), rows[0].dtype, rows[0].device)
    return filter_microgradients(rows, threshold, rule=rule, out=out, scale=scale, sizes=sizes, units=units)


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


# The per-rank record of the configuration check: an error code, then what sizes the transfers.
_C_ERROR, _C_K, _C_P, _C_DTYPE, _C_EXCHANGE, _C_BUCKET, _C_UNITS, _C_UNITS_HASH = range(8)


def _configuration_record(
    configuration: _Configuration | None, exchange: str, bucket_size: int, error: Exception | None
) -> torch.Tensor:
    record = torch.zeros(8, dtype=torch.float64)
    record[_C_ERROR] = float(error is not None)
    record[_C_EXCHANGE] = EXCHANGES.index(exchange) if exchange in EXCHANGES else -1
    record[_C_BUCKET] = bucket_size
    if configuration is not None:
        record[_C_K], record[_C_P] = configuration.k, configuration.p
        record[_C_DTYPE] = _DTYPES.index(configuration.dtype)
        units = configuration.units
        record[_C_UNITS] = 0 if units is None else len(units)
        record[_C_UNITS_HASH] = 0 if units is None else hash((units.sizes, units.averaged)) % (1 << 52)
    return record


def _check_configurations(records: torch.Tensor) -> None:
    failed = torch.nonzero(records[:, _C_ERROR]).flatten().tolist()
    if failed:
        raise ValueError(
            f"GAF exchange aborted because of invalid arguments on rank(s) {failed}; see that rank's error for the fix."
        )
    _require_same(records, _C_EXCHANGE, "exchange", "pass the same exchange on every rank", EXCHANGES)
    same = (
        (_C_K, "micro-gradients per rank K", "pass the same number of micro-gradients (gradient accumulation steps) on every rank"),
        (_C_P, "elements per micro-gradient P", "every rank must flatten the same parameters (same model, same requires_grad)"),
        (_C_BUCKET, "bucket size", "pass the same bucket_size (gaf_bucket_size) on every rank"),
        (_C_UNITS, "number of units", "build the same units (granularity) on every rank"),
        (_C_UNITS_HASH, "units", "build the same units (granularity) on every rank"),
    )
    for field, what, fix in same:
        _require_same(records, field, what, fix, counts=True)
    _require_same(records, _C_DTYPE, "dtype", "cast the micro-gradients to one dtype on every rank", _DTYPES)


@dataclass(frozen=True)
class _Call:
    """The arguments of one call that the decision depends on, checked here and across ranks.

    A local error is not raised at once: the call still takes part in the exchange (with a
    buffer of its own instead of a bad `out`), so that every rank raises together once the
    headers have been compared.
    """

    threshold: float
    rule: str
    scale: float
    sizes: torch.Tensor | None
    out: torch.Tensor | None
    k: int
    error: Exception | None
    code: int

    _REASONS = ("threshold outside [0, 2]", "unknown rule", "scale not a finite number", "invalid sizes", "invalid out")

    @classmethod
    def check(cls, threshold, rule, scale, sizes, out, configuration: _Configuration) -> _Call:
        values: list = [math.nan, rule, math.nan, None]
        error, code = None, 0
        checks = (
            lambda: check_threshold(threshold),
            lambda: check_rule(rule),
            lambda: check_scale(scale),
            lambda: _check_local_sizes(sizes, configuration.k),
            lambda: out is None or _check_out(out, configuration.p, configuration.dtype, out.device),
        )
        for index, check in enumerate(checks):
            try:
                value = check()
            except (TypeError, ValueError) as caught:
                if error is None:
                    error, code = caught, index + 1
                if index == 4:
                    out = None
                continue
            if index < 4:
                values[index] = value
        return cls(values[0], values[1], values[2], values[3], out, configuration.k, error, code)

    def header(self) -> torch.Tensor:
        """Error code, threshold, rule, scale, whether sizes were given, then the `K` sizes: float64."""
        rule = RULES.index(self.rule) if self.rule in RULES else -1
        given = self.sizes is not None
        head = torch.tensor([self.code, self.threshold, rule, self.scale, given], dtype=torch.float64)
        return torch.cat([head, self.sizes if given else torch.ones(self.k, dtype=torch.float64)])

    def compare(self, headers: torch.Tensor) -> torch.Tensor | None:
        """Raise on every rank if any rank's call was invalid or differs; return the `[M]` sizes (None if none given)."""
        headers = headers.cpu()
        if self.error is not None:
            raise self.error
        codes = headers[:, 0]
        failed = torch.nonzero(codes).flatten().tolist()
        if failed:
            what = "; ".join(f"rank {r}: {self._REASONS[int(codes[r]) - 1]}" for r in failed)
            raise ValueError(f"GAF exchange aborted because of bad arguments on another rank ({what}); see that rank's error.")
        _require_same(headers, 1, "threshold", "pass the same threshold on every rank")
        _require_same(headers, 2, "rule", "pass the same rule on every rank", RULES)
        _require_same(headers, 3, "scale", "pass the same scale on every rank")
        if not bool(headers[:, 4].any()):
            return None
        return headers[:, 5:].reshape(-1)

    def destination(self, exchange: GAFExchange, p: int, like: torch.Tensor) -> torch.Tensor:
        return self.out if self.out is not None else exchange._buffer("gradient", (p,), like)


def _check_local_sizes(sizes, k: int) -> torch.Tensor | None:
    if sizes is None:
        return None
    sizes = torch.as_tensor(sizes, dtype=torch.float64).reshape(-1).cpu()
    if sizes.numel() != k or not bool(torch.isfinite(sizes).all()) or bool((sizes < 0).any()):
        raise ValueError(f"sizes must hold one finite number >= 0 per local micro-gradient ({k}), got {sizes.tolist()}.")
    return sizes


def _require_same(
    records: torch.Tensor, field: int, what: str, fix: str, names: Sequence | None = None, *, counts: bool = False
) -> None:
    """Raise if `records[:, field]` differs across ranks; values show as `names`, as ints for `counts`, else floats."""
    values = records[:, field]
    if bool((values != values[0]).any()):
        shown = [str(names[int(v)]) if names else int(v) if counts else v for v in values.tolist()]
        raise ValueError(f"GAF micro-gradients disagree across ranks: {what} is {shown} by rank; {fix}.")


def _collective_device(rows, group: dist.ProcessGroup | None) -> torch.device:
    if rows is not None:
        return rows[0].device
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# -- transfers ------------------------------------------------------------------------------------


def _shift(columns: slice, offset: int) -> slice:
    return slice(columns.start - offset, columns.stop - offset)


def _peers(n: int, rank: int) -> list[int]:
    return [peer for peer in range(n) if peer != rank]


def _post(receives: list, sends: list, group: dist.ProcessGroup | None, tag: int) -> list[tuple[dist.Work, int]]:
    """Start one batch of transfers, receives first, so gloo has each buffer ready when its data arrives.

    Returns every transfer's work with the group rank of its peer.
    """
    ops = [dist.P2POp(dist.irecv, t, _global_rank(group, peer), group, tag) for t, peer in receives]
    ops += [dist.P2POp(dist.isend, t, _global_rank(group, peer), group, tag) for t, peer in sends]
    works = dist.batch_isend_irecv(ops) if ops else []
    peers = [peer for _, peer in receives] + [peer for _, peer in sends]
    if len(works) != len(peers):  # NCCL coalesces a batch into one work
        return [(work, -1) for work in works]
    return list(zip(works, peers))


def _wait(posted: Sequence[tuple[dist.Work, int]], what: str) -> None:
    for work, peer in posted:
        try:
            work.wait()
        except RuntimeError as error:
            who = f"rank {peer}" if peer >= 0 else "another rank"
            raise RuntimeError(
                f"GAF exchange: {who} did not exchange {what} within the process group's timeout ({error}). "
                "A rank may have hung or died, or the ranks disagree on the micro-gradients (K, P) because their "
                "data ran out at different steps. The timeout is ddp_timeout (TrainingArguments)."
            ) from error


def _all_gather_small(tensor: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Every rank's `tensor` (a few numbers), stacked in rank order: `[N, *tensor.shape]`.

    gloo's all-gather passes the pieces around a ring, `N - 1` message latencies; from 3 ranks
    on, one round of point-to-point messages between every pair arrives sooner. With 2 ranks
    the ring is one exchange too, and gloo's all-gather is the faster; other backends use theirs.
    """
    n, rank = dist.get_world_size(group), dist.get_rank(group)
    gathered = tensor.new_empty((n, *tensor.shape))
    try:
        if n == 2 or dist.get_backend(group) != "gloo":
            _all_gather_single(gathered.view(-1), tensor.reshape(-1), group=group)
            return gathered
    except RuntimeError as error:
        raise RuntimeError(
            f"GAF exchange: the other ranks did not answer within the process group's timeout ({error}). A rank may "
            "have hung or died. The timeout is ddp_timeout (TrainingArguments)."
        ) from error
    gathered[rank] = tensor
    peers = _peers(n, rank)
    _wait(_post([(gathered[peer], peer) for peer in peers], [(tensor, peer) for peer in peers], group, _SMALL_TAG), "its header")
    return gathered


def _global_rank(group: dist.ProcessGroup | None, group_rank: int) -> int:
    return group_rank if group is None else dist.get_global_rank(group, group_rank)
