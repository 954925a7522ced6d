"""GAF under FSDP2: agreement filtering in place of `fully_shard`'s gradient reduce-scatter.

Under FSDP2 every rank owns shard `j` of each parameter (dim 0, padded to a multiple of `N`),
and after each module's backward FSDP reduce-scatters the module's flat gradient, so that rank
`j` receives the sum of every rank's shard `j`. [`FSDPExchange`] keeps that layout and replaces
the sum, with the data-parallel exchange's semantics ([`~hf_gaf.GAFExchange`]) and its code for
the rule, the Gram matrices and the step's agreement:

1. Per pass and module, an all-to-all instead of the reduce-scatter: rank `j` receives shard
   `j` of every rank's micro-gradient of that module, without reducing them. Over the `K`
   passes of a step rank `j` so holds its shard of all `M = N K` micro-gradients, the block the
   sharded data-parallel exchange gives it, in the same canonical order (`rank * K + k`).
2. As each module's shards arrive, the Gram matrices of its columns (per unit) are added to the
   step's partial Gram matrices, against the shards of the step's earlier passes.
3. After the step's last pass, [`~hf_gaf.collectives.agree`]: one all-gather of the partial
   Gram matrices behind headers with the call's arguments and which parameters got a gradient,
   summed in rank order, the same decision on every rank.
4. Each rank averages the accepted rows of its shards into its sharded gradient, the `DTensor`
   FSDP hands the optimizer: no all-gather of the result, since the sharded optimizer needs only
   its shard. Parameters of skipped units, and parameters that got no gradient on any rank in any
   pass, keep `.grad = None`.

Memory per rank, beyond FSDP's own sharded parameters, gradients and optimizer state: the step's
shards, `K P` elements in FSDP's reduce dtype, and no tensor of size `P` (the filtered shard is
`P / N`, what FSDP's sharded gradients take). With `overlap`, `K = 1` and units that each lie
within one `fully_shard` module (`gaf_granularity="tensor"`, or groups along the modules), every
module is decided as soon as its shards arrive (one small all-gather per module, during the
backward pass), so only one module's shards are held at a time.

FSDP2 calls the replaced reduce-scatter with the module's gradients laid out by `chunk_cat`:
the parameters that got a gradient in this backward pass, each padded to a multiple of `N`
rows, `N` rows of the same width. Which parameters those were shows only afterwards, when FSDP
calls each one's post-accumulate-grad hook in the same order: a pass that gave every parameter
of the module a gradient (the usual case) is exchanged at once, straight into the step's
storage; one that did not is laid out in full, zeros for the missing parameters, as the hooks
name the present ones, and exchanged after the last of them. Every rank so sends the same
number of elements, whichever parameters its data used. (As under plain FSDP2, a module that
gets no gradient at all on one rank must get none on any: its reduce-scatter is not called.)
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch
import torch.distributed as dist

from . import compat
from .collectives import Call, Field, agree, check_configuration, run_collective
from .gradients import ParameterUnits, parameter_units
from .kernel import accepted_mean, inner_products
from .rule import GAFResult, Units, _decide

__all__ = ["FSDPExchange"]


@dataclass
class _Module:
    """One `fully_shard` module's part of the layout: its trainable parameters and the columns of their shards.

    `chunks[i]` is parameter `i`'s padded shard (`ceil(d0 / N) x` the other dimensions),
    `offsets[i]` where it starts among the module's `width` columns, `segments` the pieces
    `(lo, hi, unit)` of those columns, `units` the units they belong to, `start` the module's
    first column in the rank's flat gradient.
    """

    module: torch.nn.Module
    index: int
    params: list[torch.nn.Parameter]
    numbers: list[int]  # each parameter's index in `parameter_units.parameters`
    chunks: list[int]
    shapes: list[torch.Size]  # each parameter's local shard (unpadded)
    offsets: list[int]
    width: int
    start: int
    segments: list[tuple[int, int, int]]
    units: list[int]
    arrived: list[bool] = field(default_factory=list)  # per pass of the current step


@dataclass
class _Arrival:
    """One module's gradients of the current pass, until its parameters' hooks have named their layout.

    When every parameter got a gradient they are exchanged at once, and the hooks only count
    `offset` up to `width`. Otherwise `source` is this rank's `[N, width]` layout of the present
    parameters, and the hooks copy each one into `send`, the module's full layout, exchanged
    after the last of them.
    """

    module: _Module
    width: int
    source: torch.Tensor | None = None
    send: torch.Tensor | None = None
    offset: int = 0


class FSDPExchange:
    """Gradient Agreement Filtering for a model sharded with FSDP2 (`fully_shard`), in place of its reduce-scatter.

    Build it once, on every rank, after `fully_shard` and before the first backward pass; then
    run every backward pass of a step inside [`~FSDPExchange.capturing`], and call the exchange
    once after the step's last pass, before `optimizer.step()`:

    ```python
    gaf = FSDPExchange(model, num_micro=K)
    for k in range(K):
        with gaf.capturing(k):
            loss_fn(model(inputs[k])).backward()
    result = gaf(threshold=0.97)  # every .grad is this rank's filtered shard, or None
    if not result.skipped:
        optimizer.step()
    optimizer.zero_grad()
    ```

    Args:
        model: the root module, with `fully_shard` applied to it and, usually, to its layers,
            on one 1-D device mesh.
        num_micro: passes per optimizer step, `K` (gradient accumulation steps).
        units: how parameters form units ([`~hf_gaf.gradients.parameter_units`]; default: the
            whole model, the paper's rule).
        overlap: decide every module during the backward pass, as soon as its shards arrive,
            holding one module's shards at a time instead of the step's `K x P`. Needs
            `num_micro=1` and units that each lie within one `fully_shard` module (granularity
            `"tensor"`, or groups along the modules); each step's arguments then go to
            [`~FSDPExchange.capturing`] instead of the call. `"auto"`: whenever possible (for
            a trainer, which knows the arguments before the pass).

    Every trainable parameter must be sharded by `fully_shard` along dim 0 (FSDP2's default).
    The exchange sets each module's gradient divide factor to 1 (it averages itself) and keeps
    its hooks until [`~FSDPExchange.close`]. Needs torch >= 2.9.
    """

    def __init__(
        self, model: torch.nn.Module, num_micro: int, units: ParameterUnits | None = None, *, overlap: bool | str = False
    ) -> None:
        compat.check_fsdp2()
        from torch.distributed.tensor import DTensor, Shard

        if int(num_micro) < 1:
            raise ValueError(f"FSDPExchange needs num_micro >= 1 passes per step, got {num_micro}.")
        self.num_micro = int(num_micro)
        modules = compat.fsdp_units(model)
        if not modules:
            raise ValueError(
                "FSDPExchange needs a model sharded with FSDP2: apply torch.distributed.fsdp.fully_shard to its layers "
                "and to the model first (or use GradientBuffer and GAFExchange for a model that is not sharded)."
            )
        self.parameter_units = units if units is not None else parameter_units(model.named_parameters())
        names = dict(zip(map(id, self.parameter_units.parameters), self.parameter_units.names))
        number = {id(p): i for i, p in enumerate(self.parameter_units.parameters)}
        unit_of = dict(zip(map(id, self.parameter_units.parameters), self.parameter_units.unit_of))

        self.params: list[torch.nn.Parameter] = []
        meshes = set()
        for param in self.parameter_units.parameters:
            if not isinstance(param, DTensor) or tuple(param.placements) != (Shard(0),):
                raise ValueError(
                    f"Parameter {names[id(param)]!r} is not sharded along dim 0 by fully_shard (placements "
                    f"{getattr(param, 'placements', 'none: a plain tensor')}): FSDPExchange needs every trainable "
                    "parameter sharded on one 1-D mesh (fully_shard after every parameter is added, default placement)."
                )
            meshes.add(param.device_mesh)
        if len(meshes) != 1 or next(iter(meshes)).ndim != 1:
            raise ValueError(
                "FSDPExchange needs every parameter on one 1-D device mesh (FSDP, not HSDP or a mesh per parameter), "
                f"got {len(meshes)} meshes."
            )
        self.mesh = next(iter(meshes))
        self.group = self.mesh.get_group()
        self.world_size = self.mesh.size()
        self.rank = self.mesh.get_local_rank()
        n = self.world_size

        self.modules: list[_Module] = []
        managed: set[int] = set()
        start = 0
        for module, managed_params in modules:
            trainable = [p for p in managed_params if p.requires_grad]
            if not trainable:
                continue
            chunks = [-(-p.shape[0] // n) * math.prod(p.shape[1:]) for p in trainable]
            offsets = np.cumsum([0, *chunks]).tolist()
            numbers = []
            for p in trainable:
                if id(p) not in unit_of:
                    raise ValueError("FSDPExchange: a parameter sharded by fully_shard is missing from the units.")
                numbers.append(number[id(p)])
                self.params.append(p)
                managed.add(id(p))
            segments = _merge([(offsets[i], offsets[i + 1], unit_of[id(p)]) for i, p in enumerate(trainable)])
            units_here = sorted({unit for _, _, unit in segments})
            self.modules.append(
                _Module(
                    module, len(self.modules), trainable, numbers, chunks, [p.to_local().shape for p in trainable],
                    offsets[:-1], offsets[-1], start, segments, units_here,
                )  # fmt: skip
            )
            start += offsets[-1]
        missing = [names[id(p)] for p in self.parameter_units.parameters if id(p) not in managed]
        if missing:
            raise ValueError(
                f"FSDPExchange: parameters {missing[:3]} are trainable but no fully_shard module manages them; apply "
                "fully_shard after the whole model is built (PEFT adapters included)."
            )
        self.width = start
        self._chunk = {id(p): (m, i) for m in self.modules for i, p in enumerate(m.params)}
        whole = self.parameter_units.whole_model
        self.units: Units | None = None if whole else self.parameter_units.units(self._unit_sizes())
        self.plain_units = self.parameter_units.plain(self._unit_sizes())
        possible = self.num_micro == 1 and len({u for m in self.modules for u in m.units}) == sum(len(m.units) for m in self.modules)
        if overlap == "auto":
            overlap = possible
        if overlap and not possible:
            raise ValueError(
                "FSDPExchange(overlap=True) decides each module as its shards arrive, which needs num_micro=1 and units "
                f"that each lie within one fully_shard module (e.g. granularity 'tensor'); got num_micro={self.num_micro} "
                "and these units."
            )
        self.overlap = overlap

        self._storage: torch.Tensor | None = None
        self._gradient: torch.Tensor | None = None
        self._pass: int | None = None
        self._passes = 0
        self._arrival: _Arrival | None = None
        self._received = torch.zeros(len(self.parameter_units.parameters), dtype=torch.bool)
        self._gram: torch.Tensor | None = None
        self._early: Call | None = None
        self._early_units: Units | None = None
        self._decided: set[int] = set()
        self._sizes: torch.Tensor | None = None
        # The hooks and the reduce-scatters hold the exchange: dropping it must not silently leave FSDP without a
        # reduce-scatter. close() takes them off.
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_gradient) for p in self.params]
        for m in self.modules:
            m.module.set_gradient_divide_factor(1.0)
            if n > 1:
                m.module.set_custom_reduce_scatter(_reduce_scatter(self, m))
            else:  # FSDP2 calls no reduce-scatter for one rank, but its all-reduce hook with the gradients
                m.module.set_all_reduce_hook(partial(self._on_single_rank_gradients, m))
        self._check_ranks_agree()

    # -- public -------------------------------------------------------------------------------

    @property
    def storage_bytes(self) -> int:
        """Bytes of the step's shards this rank keeps (allocated at the first pass): `K x P` elements, or one module's."""
        return 0 if self._storage is None else self._storage.numel() * self._storage.element_size()

    def required_bytes(self, element_size: int) -> int:
        """Bytes this exchange allocates per rank, for elements of `element_size` bytes: the shards and the gradient."""
        return (self._storage_numel() + self.width) * element_size

    @contextmanager
    def capturing(
        self,
        k: int,
        *,
        threshold: float | None = None,
        rule: str = "sequential",
        scale: float = 1.0,
        sizes: torch.Tensor | Sequence[float] | None = None,
        units: Units | None = None,
    ) -> Iterator[None]:
        """Run pass `k` of a step (0, 1, ..., in order) inside the block; FSDP's gradient sync is on for it.

        With `overlap`, the step's arguments (those of the call: `threshold`, `rule`, `scale`,
        `sizes`, `units`) are given here, every module is decided during the backward pass,
        and the call after the pass takes no arguments.
        """
        if not 0 <= k < self.num_micro or k != self._passes:
            raise IndexError(
                f"FSDPExchange.capturing got pass {k}, expected pass {self._passes} of {self.num_micro}: run the passes of "
                "a step in order, then call the exchange."
            )
        if (threshold is not None) != self.overlap:
            raise TypeError(
                "FSDPExchange(overlap=True) takes the step's arguments in capturing(k, threshold=...); without overlap "
                "they go to the call after the last pass."
            )
        if self.overlap:
            self._early = Call.check(threshold, rule, scale, sizes, 1)
            self._early_units = self._units(units)
        if k == 0:
            self._start_step()
        for m in self.modules:
            m.module.set_requires_gradient_sync(True, recurse=False)
        self._pass = k
        try:
            yield
            if self._arrival is not None:
                raise RuntimeError(
                    "FSDP2 reduce-scattered a module's gradients but called the post-accumulate-grad hooks of only some of "
                    "its parameters, which GAF reads the layout from (is compiled autograd on?); GAF cannot run here."
                )
        finally:
            self._pass = None
        for m in self.modules:
            if not m.arrived[k] and self._storage is not None and not self.overlap:
                self._region(m, k).zero_()
        self._passes += 1

    def __call__(
        self,
        threshold: float | None = None,
        rule: str = "sequential",
        *,
        scale: float = 1.0,
        sizes: torch.Tensor | Sequence[float] | None = None,
        units: Units | None = None,
    ) -> GAFResult:
        """Decide the step from every rank's shards and set each parameter's sharded `.grad`.

        Args:
            threshold, rule, scale: as for [`~hf_gaf.gaf_all_reduce`]; omitted with `overlap`,
                where they went to the step's [`~FSDPExchange.capturing`].
            sizes: this rank's `[K]` items behind each micro-gradient (0: a pass that did not
                run this step).
            units: [`~hf_gaf.Units`] with the exchange's own column sizes (`self.units`,
                `self.plain_units`), to switch averaging on or off; default `self.units`.

        Returns:
            The [`~hf_gaf.rule.GAFResult`] over all `M` micro-gradients, identical on every
            rank; `gradient` is this rank's flat shard of the filtered gradient, `received`
            which parameters (in the order of `parameter_units.parameters`) got a gradient on
            any rank. Each trainable parameter's `.grad`
            is its filtered shard, a `DTensor` view of `gradient`, or None where its unit was
            skipped or it got no gradient anywhere.
        """
        if self._passes == 0:
            raise RuntimeError("FSDPExchange was called before any pass of the step; run the passes inside capturing(k).")
        if self.overlap:
            if threshold is not None:
                raise TypeError("FSDPExchange(overlap=True) took this step's arguments in capturing(); call it without them.")
            call, chosen_units = self._early, self._early_units
        else:
            if threshold is None:
                raise TypeError("FSDPExchange() needs the threshold of the step.")
            call, chosen_units = Call.check(threshold, rule, scale, sizes, self.num_micro), self._units(units)
        averaged = None if chosen_units is None else chosen_units.averaged
        try:
            if self.overlap:
                self._decide_remaining(call, averaged)
                gram, received = self._gram, self._received
                decision = _decide(gram, call.threshold, call.rule, self._sizes, averaged)
            else:
                agreement = agree(call, self._canonical_gram(), self.group, averaged=averaged, received=self._received)
                decision, received = agreement.decision, agreement.received
                if not decision.skipped:
                    for m in self.modules:
                        accepted_mean(
                            self._rows(m), decision.chosen, self._flat_gradient()[m.start : m.start + m.width],
                            scale=call.scale, sizes=decision.sizes, segments=m.segments,
                        )  # fmt: skip
        finally:
            self._passes, self._early, self._early_units = 0, None, None
        result = decision.result(self._flat_gradient(), per_unit=chosen_units is not None, received=received)
        self.install(result)
        return result

    def install(self, result: GAFResult, parameters: torch.Tensor | None = None) -> None:
        """Give every parameter its shard of `result.gradient` as `.grad` (a `DTensor` view), or None.

        By default a parameter gets one when it got a gradient on some rank (`result.received`)
        and its unit was updated; `parameters` (bool, one per parameter) chooses instead.
        """
        from torch.distributed.tensor import DTensor

        if parameters is None:
            parameters = self.parameter_units.updated(result) & result.received & (not result.skipped)
        gradient = self._flat_gradient()
        with torch.no_grad():
            for m in self.modules:
                for i, p in enumerate(m.params):
                    if not bool(parameters[m.numbers[i]]):
                        p.grad = None
                        continue
                    first, shape = m.start + m.offsets[i], m.shapes[i]
                    view = gradient[first : first + shape.numel()].view(shape)
                    p.grad = DTensor.from_local(
                        view if view.dtype == p.dtype else view.to(p.dtype), p.device_mesh, p.placements,
                        run_check=False, shape=p.shape, stride=p.stride(),
                    )  # fmt: skip

    def fill_non_finite(self, result: GAFResult) -> None:
        """Give every parameter that got a gradient a NaN `.grad`: a grad scaler then skips the step and lowers its scale."""
        self._flat_gradient().fill_(float("nan"))
        self.install(result, result.received)

    def close(self) -> None:
        """Remove the hooks and give every module back FSDP's own reduce-scatter."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        for m in self.modules:
            compat.restore_default_reduce_scatter(m.module)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(modules={len(self.modules)}, num_micro={self.num_micro}, "
            f"world_size={self.world_size}, columns={self.width}, overlap={self.overlap})"
        )

    # -- arrivals ------------------------------------------------------------------------------

    def _on_input(self, m: _Module, rows: torch.Tensor) -> None:
        """Module `m`'s gradients of this pass as FSDP lays them out: this rank's `[N, S]` rows to send, unreduced."""
        if self._pass is None:
            raise _outside_capturing()
        if rows.shape[1] == m.width:
            self._place(m, rows)
            self._arrival = _Arrival(m, m.width)
        else:
            self._arrival = _Arrival(m, rows.shape[1], source=rows, send=rows.new_zeros(rows.shape[0], m.width))

    def _place(self, m: _Module, rows: torch.Tensor) -> None:
        """Exchange module `m`'s full `[N, width]` layout: rank `j` receives every rank's row `j`, into the storage."""
        region = self._region(m, self._pass, like=rows)
        if self.world_size == 1:
            region.copy_(rows)
            return
        name = f"its shards of module {m.index} ({type(m.module).__name__})"
        run_collective(lambda: dist.all_to_all_single(region, rows.contiguous(), group=self.group), name)

    def _on_single_rank_gradients(self, m: _Module, output: torch.Tensor) -> None:
        self._on_input(m, output.view(1, -1))

    def _on_gradient(self, param: torch.nn.Parameter) -> None:
        """FSDP set `param`'s sharded gradient: note it, place its shard in the layout, and drop the `.grad`."""
        if self._pass is None:
            raise _outside_capturing()
        m, i = self._chunk[id(param)]
        arrival = self._arrival
        if arrival is None or arrival.module is not m:
            raise RuntimeError(
                f"FSDP2 set the gradient of a parameter of module {m.index} outside its reduce-scatter, so GAF cannot tell "
                "the layout of its gradients. Please report this with the torch version."
            )
        self._received[m.numbers[i]] = True
        chunk = m.chunks[i]
        if arrival.source is not None:
            arrival.send[:, m.offsets[i] : m.offsets[i] + chunk] = arrival.source[:, arrival.offset : arrival.offset + chunk]
        arrival.offset += chunk
        param.grad = None
        if arrival.offset > arrival.width:
            raise RuntimeError(
                f"FSDP2 laid out module {m.index}'s gradients unlike GAF expects (padded shards of {m.chunks} elements); "
                "GAF cannot run on this torch version. Please report this with the torch version."
            )
        if arrival.offset == arrival.width:
            self._arrival = None
            if arrival.source is not None:
                self._place(m, arrival.send)
            self._arrived(m)

    def _arrived(self, m: _Module) -> None:
        """Module `m`'s shards of pass `k` are in place: add their products with this and earlier passes' to the Gram matrices."""
        k, n = self._pass, self.world_size
        m.arrived[k] = True
        new = self._region(m, k)
        gram = self._gram_pass_major()
        for j in range(k + 1):
            inner_products(new, self._region(m, j), gram[:, k * n : (k + 1) * n, j * n : (j + 1) * n], segments=m.segments)
        if self.overlap:
            self._decide_module(m)

    # -- the step ------------------------------------------------------------------------------

    def _start_step(self) -> None:
        for m in self.modules:
            m.arrived = [False] * self.num_micro
        self._received.zero_()
        self._gram = None
        self._decided = set()

    def _gram_pass_major(self) -> torch.Tensor:
        """The step's partial Gram matrices `[U, M, M]`, rows and columns in pass-major order (`k * N + r`)."""
        if self._gram is None:
            m = self.world_size * self.num_micro
            device = self.params[0].device
            self._gram = torch.zeros(len(self.parameter_units), m, m, dtype=torch.float64, device=device)
        return self._gram

    def _canonical_gram(self) -> torch.Tensor:
        """The partial Gram matrices in canonical order (`r * K + k`), the lower blocks filled from the upper."""
        gram = self._gram_pass_major()
        n, k = self.world_size, self.num_micro
        lower = torch.tril(torch.ones(n * k, n * k, dtype=torch.bool, device=gram.device))
        full = torch.where(lower, gram, gram.transpose(1, 2))
        order = torch.tensor([kk * n + r for r in range(n) for kk in range(k)], device=gram.device)
        return full[:, order][:, :, order]

    def _decide_module(self, m: _Module) -> None:
        """Decide module `m`'s units now that all its shards are in (K = 1), and write its filtered shard."""
        call, units = self._early, self._early_units
        averaged = None if units is None else [units.averaged[u] for u in m.units]
        gram = self._canonical_gram()[m.units]
        received = self._received[m.numbers]
        agreement = agree(call, gram, self.group, averaged=averaged, received=received)
        self._received[m.numbers] = agreement.received
        self._gram[m.units] = agreement.gram
        self._sizes = agreement.sizes
        decision = agreement.decision
        local = {unit: index for index, unit in enumerate(m.units)}
        if not decision.skipped:
            accepted_mean(
                self._rows(m), decision.chosen, self._flat_gradient()[m.start : m.start + m.width], scale=call.scale,
                sizes=decision.sizes, segments=[(lo, hi, local[unit]) for lo, hi, unit in m.segments],
            )  # fmt: skip
        self._decided.add(m.index)

    def _decide_remaining(self, call: Call, averaged) -> None:
        """Agree on the units of modules that got no gradient in the pass (none on any rank), so every unit is decided."""
        remaining = [m for m in self.modules if m.index not in self._decided]
        units = sorted({u for m in remaining for u in m.units})
        if not units:
            return
        numbers = [i for m in remaining for i in m.numbers]
        agreement = agree(
            call, self._canonical_gram()[units], self.group, averaged=None if averaged is None else [averaged[u] for u in units],
            received=self._received[numbers],
        )  # fmt: skip
        self._received[numbers] = agreement.received
        self._gram[units] = agreement.gram
        self._sizes = agreement.sizes

    def _units(self, units: Units | None) -> Units | None:
        if units is None:
            return self.units
        if units.sizes != self.plain_units.sizes:
            raise ValueError(
                f"FSDPExchange got units of sizes {units.sizes}; pass units with its own column sizes "
                f"({self.plain_units.sizes}, e.g. exchange.units or exchange.plain_units)."
            )
        return units

    # -- storage -------------------------------------------------------------------------------

    def _storage_numel(self) -> int:
        n, k = self.world_size, self.num_micro
        if self.overlap:
            return n * max(m.width for m in self.modules)
        return k * n * self.width

    def _region(self, m: _Module, k: int, like: torch.Tensor | None = None) -> torch.Tensor:
        """Rank `j`'s shards of module `m` in pass `k`, `[N, width]`, one row per rank."""
        if self._storage is None:
            if like is None:
                raise RuntimeError("FSDPExchange has no storage before the first arrival.")
            self._storage = torch.zeros(self._storage_numel(), dtype=like.dtype, device=like.device)
        n = self.world_size
        if self.overlap:
            return self._storage[: n * m.width].view(n, m.width)
        base = self.num_micro * n * m.start
        return self._storage[base + k * n * m.width : base + (k + 1) * n * m.width].view(n, m.width)

    def _rows(self, m: _Module) -> list[torch.Tensor]:
        """Module `m`'s `M` rows in canonical order (`r * K + k`)."""
        regions = [self._region(m, k) for k in range(self.num_micro)]
        return [regions[k][r] for r in range(self.world_size) for k in range(self.num_micro)]

    def _flat_gradient(self) -> torch.Tensor:
        """This rank's filtered shards of every module, flat, in the parameters' dtype."""
        if self._gradient is None:
            self._gradient = torch.zeros(self.width, dtype=self.params[0].dtype, device=self.params[0].device)
        return self._gradient

    def _unit_sizes(self) -> list[int]:
        sizes = {id(p): chunk for m in self.modules for p, chunk in zip(m.params, m.chunks)}
        return [sizes[id(p)] for p in self.parameter_units.parameters]

    def _check_ranks_agree(self) -> None:
        """Compare the layout across ranks once, before any transfer: a mismatch raises on every rank."""
        if self.world_size == 1:
            return
        layout = hash(tuple((m.width, tuple(m.chunks)) for m in self.modules)) % (1 << 52)
        units = hash((self.plain_units.sizes, self.parameter_units.unit_of)) % (1 << 52)
        fix = "build and shard the same model on every rank"
        fields = [
            Field("passes per step K", self.num_micro, "pass the same num_micro (gradient accumulation steps) on every rank"),
            Field("number of sharded modules", len(self.modules), fix),
            Field("layout of the shards", layout, fix),
            Field("units", units, "build the same units (granularity) on every rank"),
        ]
        device = self.params[0].device
        check_configuration(fields, self.group, device if device.type != "meta" else torch.device("cpu"))


def _merge(segments: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """Consecutive segments of one unit as one."""
    merged: list[tuple[int, int, int]] = []
    for lo, hi, unit in segments:
        if merged and merged[-1][2] == unit and merged[-1][1] == lo:
            merged[-1] = (merged[-1][0], hi, unit)
        else:
            merged.append((lo, hi, unit))
    return merged


def _outside_capturing() -> RuntimeError:
    return RuntimeError(
        "A backward pass ran outside FSDPExchange.capturing(k): GAF would lose its micro-gradient. Run every backward "
        "pass of a training step inside capturing(k), or close() the exchange to train without GAF."
    )


def _reduce_scatter(exchange: FSDPExchange, m: _Module):
    """The reduce-scatter FSDP2 calls for module `m`: hands this rank's rows to the exchange, unreduced."""

    class GAFReduceScatter(compat.reduce_scatter_interface()):
        def allocate(self, size, *, dtype, device):
            return torch.empty(size, dtype=dtype, device=device)

        def __call__(self, output_tensor, input_tensor, group, op, async_op: bool = False):
            exchange._on_input(m, input_tensor.view(exchange.world_size, -1))
            return None

    return GAFReduceScatter()
