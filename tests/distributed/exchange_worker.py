"""torchrun worker for tests/test_exchange.py: runs every gaf_all_reduce case in one process group.

Usage: torchrun --nproc_per_node N -m tests.distributed.exchange_worker OUT_DIR MODE

Modes: `cases` (every entry of `CASES`), `errors` (`ERRORS`), `subgroup`, `timeout`. Every rank
builds the same M = N * K micro-gradients from a shared seed, passes its own K to the exchange
and compares the result with `filter_microgradients` on all M. It writes `OUT_DIR/{mode}-rank{r}.json`:
per case, the problems found (or the error raised) and a digest of the result's bytes, which the
test compares across ranks. The case lists are importable, so that each case is a pytest case.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from hf_gaf.exchange import GAFExchange, _Layout, gaf_all_reduce
from hf_gaf.kernel import GRAM_CHUNK
from hf_gaf.rule import Units, filter_microgradients


@dataclass(frozen=True)
class Case:
    exchange: str
    rule: str
    k: int
    kind: str
    dtype: torch.dtype
    p: int
    bucket: int | None  # None: the functional gaf_all_reduce with its cached default state
    tau: float
    units: str = "none"  # none, spanning (units crossing shard boundaries), averaged
    sizes: str = "none"  # none, tokens, absent
    rows: str = "block"  # block or list

    @property
    def name(self) -> str:
        parts = [self.exchange, self.rule, f"K{self.k}", self.kind, str(self.dtype)[6:], f"P{self.p}", f"b{self.bucket}"]
        parts += [f"tau{self.tau}", f"units-{self.units}", f"sizes-{self.sizes}", self.rows]
        return "-".join(parts)


def _cases() -> list[Case]:
    # Shards and buckets are whole Gram chunks (16384 columns), so only P = 400_003 spans several
    # ranks and buckets.
    products = [
        (("sharded", "all_gather"), ("sequential", "best_start"), (1, 2), ("mixed", "nan", "zero"), (torch.float32,), (1000,), (None,), (0.97,)),
        (("sharded",), ("sequential", "best_start"), (1, 2), ("mixed", "nan"), (torch.float32,), (1000,), (7,), (1.0,)),
        (("sharded", "all_gather"), ("sequential",), (1, 2), ("mixed",), (torch.float16, torch.bfloat16), (301,), (None, 13), (1.0,)),
        (("sharded",), ("sequential", "best_start"), (1, 2), ("identical", "orthogonal"), (torch.float32,), (50,), (8,), (0.0, 0.5)),
        (("sharded", "all_gather"), ("sequential",), (1, 2), ("mixed", "nan"), (torch.float32,), (2,), (1,), (2.0,)),
        # Several buckets per rank, the last one short and the last rank's shard shorter.
        (("sharded",), ("sequential",), (1, 2), ("mixed", "nan"), (torch.float32,), (400_003,), (1,), (0.97,)),
        (("sharded",), ("best_start",), (2,), ("nan",), (torch.bfloat16,), (400_003,), (1 << 17,), (1.0,)),
    ]
    cases = [Case(*values) for product in products for values in itertools.product(*product)]
    # Units spanning shard and bucket boundaries, averaged units, sizes, absent rows, rows given as a list.
    for exchange, units, sizes, rows in itertools.product(
        ("sharded", "all_gather"), ("spanning", "averaged"), ("none", "tokens", "absent"), ("block", "list")
    ):
        cases.append(Case(exchange, "sequential", 2, "mixed", torch.float32, 400_003, 1 << 16, 0.9, units, sizes, rows))
    cases.append(Case("sharded", "best_start", 2, "nan", torch.float32, 400_003, 1 << 16, 0.9, "spanning", "tokens", "list"))
    return cases


CASES = _cases()
CASE_NAMES = [case.name for case in CASES]


def microgradients(m: int, p: int, kind: str, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """`[M, P]` micro-gradients with some agreement structure, identical on every rank."""
    gen = torch.Generator().manual_seed(seed)
    direction = torch.randn(p, generator=gen)
    signs = torch.where(torch.rand(m, generator=gen) < 0.7, 1.0, -1.0)
    grads = signs[:, None] * direction + 0.8 * torch.randn(m, p, generator=gen)
    if kind == "nan":
        grads[1 % m] = float("nan")
        grads[(m - 1) % m, p // 2] = float("inf")
    elif kind == "zero":
        grads[0] = 0.0
    elif kind == "identical":
        grads[:] = grads[0]
    elif kind == "orthogonal":  # nothing agrees at a small threshold: the step is skipped
        grads = torch.zeros(m, p)
        grads[torch.arange(m), torch.arange(m) % p] = 1.0
    return grads.to(dtype)


def case_units(case: Case) -> Units | None:
    if case.units == "none":
        return None
    sizes = (GRAM_CHUNK * 3 + 5, 17, 150_000, case.p - (GRAM_CHUNK * 3 + 5) - 17 - 150_000)
    return Units(sizes, averaged=(False, True, False, False) if case.units == "averaged" else ())


def case_sizes(case: Case, m: int) -> torch.Tensor | None:
    if case.sizes == "none":
        return None
    sizes = torch.arange(1, m + 1, dtype=torch.float64) * 3
    if case.sizes == "absent":
        sizes[-1] = 0
    return sizes


def result_bytes(result) -> bytes:
    """Every field of a result as raw bytes, for a bit-for-bit comparison across ranks."""
    parts = [result.accepted, result.weights, result.distances, result.updated, torch.as_tensor(result.start).reshape(-1)]
    parts.append(torch.tensor([result.skipped]))
    if result.gradient is not None:
        parts.append(result.gradient)
    return b"".join(t.contiguous().view(torch.uint8).numpy().tobytes() for t in parts)


def compare(result, reference, exact_distances: bool, updated_columns: torch.Tensor | None = None) -> list[str]:
    problems = []
    if not torch.equal(result.accepted, reference.accepted):
        problems.append(f"accepted {result.accepted.tolist()} != {reference.accepted.tolist()}")
    if not torch.equal(result.weights, reference.weights):
        problems.append("weights differ")
    if result.skipped != reference.skipped or not torch.equal(torch.as_tensor(result.start), torch.as_tensor(reference.start)):
        problems.append(f"skipped/start {(result.skipped, result.start)} != {(reference.skipped, reference.start)}")
    if not torch.equal(result.updated, reference.updated):
        problems.append(f"updated {result.updated.tolist()} != {reference.updated.tolist()}")
    # The sharded Gram matrix sums the same float32 chunks, in blocks of rows that BLAS rounds
    # differently and in another order: about 1e-7 apart (2e-6 for bfloat16 input).
    tolerance = 0.0 if exact_distances else 1e-5
    if not torch.allclose(result.distances, reference.distances, rtol=tolerance, atol=tolerance, equal_nan=True):
        problems.append(f"distances {result.distances.tolist()} != {reference.distances.tolist()}")
    if (result.gradient is None) != (reference.gradient is None):
        problems.append("gradient None mismatch")
    elif result.gradient is not None:
        mine, theirs = result.gradient, reference.gradient
        if updated_columns is not None:  # the columns of skipped units hold no meaningful values
            mine, theirs = mine[updated_columns], theirs[updated_columns]
        if mine.dtype != theirs.dtype or mine.shape != theirs.shape:
            problems.append(f"gradient {mine.dtype}{tuple(mine.shape)} != reference")
        elif not torch.equal(mine, theirs):
            problems.append(f"gradient differs, max {float((mine.double() - theirs.double()).abs().max())}")
    return problems


def run_cases(rank: int, world: int) -> dict:
    report = {}
    states: dict = {}
    for seed, case in enumerate(CASES):
        m = world * case.k
        full = microgradients(m, case.p, case.kind, case.dtype, seed)
        local = full[rank * case.k : (rank + 1) * case.k].clone()
        units, sizes = case_units(case), case_sizes(case, m)
        local_sizes = None if sizes is None else sizes[rank * case.k : (rank + 1) * case.k]
        scale = (1.0, 2.0, 3.0)[seed % 3]  # 2.0 is the count of accepted ones in some cases: no division
        reference = filter_microgradients(full, case.tau, rule=case.rule, scale=scale, sizes=sizes, units=units)
        given = list(local.clone()) if case.rows == "list" else local
        problems = []
        if case.bucket is None:
            result = gaf_all_reduce(given, case.tau, rule=case.rule, exchange=case.exchange, scale=scale, sizes=local_sizes, units=units)
        else:
            state = states.setdefault((case.exchange, case.bucket), GAFExchange(exchange=case.exchange, bucket_size=case.bucket))
            out = torch.full((case.p,), 7.0, dtype=case.dtype) if seed % 2 else None
            result = state(given, case.tau, case.rule, out=out, scale=scale, sizes=local_sizes, units=units)
            if out is not None and result.gradient is not None and result.gradient.data_ptr() != out.data_ptr():
                problems.append("gradient not written into out")
            if out is not None and case.exchange == "sharded" and case.units == "none":
                fresh = GAFExchange(exchange=case.exchange, bucket_size=case.bucket)
                fresh(local, case.tau, case.rule, out=torch.empty_like(out), scale=scale)
                shard = _Layout.build(case.p, world, case.bucket).shards[rank]
                expected = (world - 1) * case.k * (shard.stop - shard.start) * local.element_size()
                if fresh.buffer_bytes != expected:
                    problems.append(f"keeps {fresh.buffer_bytes} bytes, expected {expected}")
        if not torch.equal(local.view(torch.uint8), full[rank * case.k : (rank + 1) * case.k].view(torch.uint8)):
            problems.append("local_grads modified")
        columns = None
        if units is not None:
            columns = torch.repeat_interleave(reference.updated, torch.tensor(units.sizes))
        problems += compare(result, reference, exact_distances=case.exchange == "all_gather", updated_columns=columns)
        report[case.name] = {"problems": problems, "digest": hashlib.sha256(result_bytes(result)).hexdigest()}
    return report


def run_subgroup(rank: int, world: int) -> dict:
    """A group whose ranks are not the global ones: all but the first of 4 processes (3 members: the
    small all-gathers go point to point on gloo). Non-members report nothing."""
    members = list(range(1, world))
    group = dist.new_group(members)  # every rank takes part in creating it
    report = {}
    if rank in members:
        k, me = 2, members.index(rank)
        full = microgradients(len(members) * k, 400_003, "mixed", torch.float32, seed=1000)
        reference = filter_microgradients(full, 0.97)
        for exchange in ("sharded", "all_gather"):
            state = GAFExchange(group=group, exchange=exchange, bucket_size=1 << 16)
            result = state(full[me * k : (me + 1) * k].clone(), 0.97)
            problems = compare(result, reference, exact_distances=exchange == "all_gather")
            report[exchange] = {"problems": problems, "digest": hashlib.sha256(result_bytes(result)).hexdigest()}
    dist.barrier()
    return report


def _errors(rank: int, world: int) -> dict:
    good = torch.randn(2, 100, generator=torch.Generator().manual_seed(rank))
    last = world - 1
    return {
        "threshold-one-rank": lambda: GAFExchange()(good, 3.0 if rank == last else 0.97),
        "threshold-all": lambda: GAFExchange(exchange="all_gather")(good, -0.1),
        "threshold-mismatch": lambda: GAFExchange()(good, 0.9 if rank == 0 else 0.97),
        "rule-one-rank": lambda: GAFExchange()(good, 0.97, "bogus" if rank == 0 else "sequential"),
        "rule-mismatch": lambda: GAFExchange()(good, 0.97, "best_start" if rank == 0 else "sequential"),
        "exchange-mismatch": lambda: GAFExchange(exchange="all_gather" if rank == 1 else "sharded")(good, 0.97),
        "K-mismatch": lambda: GAFExchange()(good[: 1 + (rank == 0)], 0.97),
        "P-mismatch": lambda: GAFExchange()(good[:, : 100 - (rank == last)], 0.97),
        "dtype-mismatch": lambda: GAFExchange(exchange="all_gather")(good.half() if rank == 0 else good, 0.97),
        "bucket-mismatch": lambda: GAFExchange(bucket_size=1 << 14 if rank == 0 else 1 << 20)(good, 0.97),
        "units-mismatch": lambda: GAFExchange()(good, 0.97, units=[50, 50] if rank == 1 else [100]),
        "scale-mismatch": lambda: GAFExchange()(good, 0.97, scale=2.0 if rank == 1 else 1.0),
        "scale-one-rank": lambda: GAFExchange()(good, 0.97, scale=math.inf if rank == last else 1.0),
        "sizes-one-rank": lambda: GAFExchange()(good, 0.97, sizes=[1.0, -1.0] if rank == 0 else None),
        "not-2d-one-rank": lambda: GAFExchange()(good[0] if rank == 0 else good, 0.97),
        "bad-out-one-rank": lambda: GAFExchange()(good, 0.97, out=torch.empty(99 if rank == 1 else 100)),
        "exchange-one-rank": lambda: gaf_all_reduce(good, 0.97, exchange="bogus" if rank == 1 else "sharded"),
        # Checked once: a later call with a bad threshold still raises on every rank, from the header.
        "threshold-later-call": lambda: _twice(lambda call: GAFExchange()(good, 3.0 if call and rank == 0 else 0.97)),
    }


ERROR_CASES = list(_errors(0, 3))


def _twice(call) -> None:
    call(0)
    call(1)


def run_errors(rank: int, world: int) -> dict:
    report = {}
    for name, call in _errors(rank, world).items():
        try:
            call()
            report[name] = "no error"
        except (ValueError, TypeError) as error:
            report[name] = f"{type(error).__name__}: {error}"
    # The group is still usable after the errors.
    full = torch.randn(world * 2, 100, generator=torch.Generator().manual_seed(0))
    result = gaf_all_reduce(full[rank * 2 : rank * 2 + 2], 2.0)
    report["after-errors"] = compare(result, filter_microgradients(full, 2.0), exact_distances=False)
    return report


def run_timeout(rank: int, world: int) -> dict:
    """The transfer configuration changes on rank 0 only: every rank must fail within the group's timeout."""
    group = dist.new_group(list(range(world)), timeout=timedelta(seconds=3))
    state = GAFExchange(group=group)
    grads = torch.randn(2, 50_000, generator=torch.Generator().manual_seed(rank))
    state(grads, 0.97)  # agreed: K = 2
    start = time.perf_counter()
    try:
        state(grads[:1] if rank == 0 else grads, 0.97)
        outcome = "no error"
    except RuntimeError as error:
        outcome = f"RuntimeError: {error}"
    return {"outcome": outcome, "seconds": time.perf_counter() - start}


def main() -> None:
    out_dir, mode = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    start = time.perf_counter()
    report = {"cases": run_cases, "errors": run_errors, "subgroup": run_subgroup, "timeout": run_timeout}[mode](rank, world)
    print(f"rank {rank}: {mode} took {time.perf_counter() - start:.1f} s", file=sys.stderr)
    with open(os.path.join(out_dir, f"{mode}-rank{rank}.json"), "w") as f:
        json.dump(report, f, indent=1)
    if mode != "timeout":  # a group that timed out cannot be destroyed cleanly
        dist.destroy_process_group()
    # Reports are written; skip interpreter finalization, where gloo occasionally aborts after
    # destroy_process_group ("terminate called without an active exception").
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
