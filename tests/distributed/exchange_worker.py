"""torchrun worker for tests/test_exchange.py: runs many gaf_all_reduce cases in one process group.

Usage: torchrun --nproc_per_node N exchange_worker.py OUT_DIR MODES  (comma-separated: cases, errors, subgroup)

Every rank builds the same M = N * K micro-gradients from a shared seed, passes its own K to the
exchange and compares the result with ``filter_microgradients`` on all M. It writes
``OUT_DIR/{mode}-rank{r}.json`` (per case: mismatches found, or the error raised) and
``OUT_DIR/{mode}-rank{r}.bin`` (the raw bytes of every result, which the test compares across
ranks). Several modes share one launch, since starting the processes is the slow part.
"""

from __future__ import annotations

import itertools
import math
import json
import os
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from hf_gaf.exchange import GAFExchange, _Layout, gaf_all_reduce
from hf_gaf.rule import filter_microgradients


def microgradients(m: int, p: int, kind: str, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """``[M, P]`` micro-gradients with some agreement structure, identical on every rank."""
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


def result_bytes(result) -> bytes:
    """Every field of a result as raw bytes, for a bit-for-bit comparison across ranks."""
    parts = [result.accepted, result.weights, result.distances, torch.tensor([result.skipped, result.start])]
    if result.gradient is not None:
        parts.append(result.gradient)
    return b"".join(t.contiguous().view(torch.uint8).numpy().tobytes() for t in parts)


def compare(result, reference, exact_distances: bool) -> list[str]:
    problems = []
    if not torch.equal(result.accepted, reference.accepted):
        problems.append(f"accepted {result.accepted.tolist()} != {reference.accepted.tolist()}")
    if not torch.equal(result.weights, reference.weights):
        problems.append("weights differ")
    if (result.skipped, result.start) != (reference.skipped, reference.start):
        problems.append(f"skipped/start {(result.skipped, result.start)} != {(reference.skipped, reference.start)}")
    # The sharded Gram matrix sums the same float32 chunks, in blocks of rows that BLAS rounds
    # differently and in another order: about 1e-7 apart (2e-6 for bfloat16 input).
    tolerance = 0.0 if exact_distances else 1e-5
    if not torch.allclose(result.distances, reference.distances, rtol=tolerance, atol=tolerance, equal_nan=True):
        problems.append(f"distances {result.distances.tolist()} != {reference.distances.tolist()}")
    if (result.gradient is None) != (reference.gradient is None):
        problems.append("gradient None mismatch")
    elif result.gradient is not None:
        if result.gradient.dtype != reference.gradient.dtype or result.gradient.shape != reference.gradient.shape:
            problems.append(f"gradient {result.gradient.dtype}{tuple(result.gradient.shape)} != reference")
        elif not torch.equal(result.gradient, reference.gradient):
            problems.append(
                f"gradient differs, max {float((result.gradient.double() - reference.gradient.double()).abs().max())}"
            )
    return problems


def run_cases(rank: int, world: int) -> tuple[dict, bytes]:
    report, blob = {}, bytearray()
    states = {}
    # (exchange, rule, K, kind, dtype, P, bucket_size or None for gaf_all_reduce, threshold). Shards and
    # buckets are whole Gram chunks (16384 columns), so only P = 400_003 spans several ranks and buckets.
    cases = itertools.chain(
        itertools.product(
            ("sharded", "all_gather"),
            ("sequential", "best_start"),
            (1, 2),
            ("mixed", "nan", "zero"),
            (torch.float32,),
            (1000,),
            (None,),
            (0.97,),
        ),
        itertools.product(
            ("sharded",),
            ("sequential", "best_start"),
            (1, 2),
            ("mixed", "nan"),
            (torch.float32,),
            (1000,),
            (7,),
            (1.0,),
        ),
        itertools.product(
            ("sharded", "all_gather"),
            ("sequential",),
            (1, 2),
            ("mixed",),
            (torch.float16, torch.bfloat16),
            (301,),
            (None, 13),
            (1.0,),
        ),
        itertools.product(
            ("sharded",),
            ("sequential", "best_start"),
            (1, 2),
            ("identical", "orthogonal"),
            (torch.float32,),
            (50,),
            (8,),
            (0.0, 0.5),
        ),
        itertools.product(
            ("sharded", "all_gather"), ("sequential",), (1, 2), ("mixed", "nan"), (torch.float32,), (2,), (1,), (2.0,)
        ),
        # Several buckets per rank, the last one short and the last rank's shard shorter.
        itertools.product(
            ("sharded",), ("sequential",), (1, 2), ("mixed", "nan"), (torch.float32,), (400_003,), (1,), (0.97,)
        ),
        itertools.product(
            ("sharded",), ("best_start",), (2,), ("nan",), (torch.bfloat16,), (400_003,), (1 << 17,), (1.0,)
        ),
    )
    for seed, (exchange, rule, k, kind, dtype, p, bucket, tau) in enumerate(cases):
        name = f"{exchange}-{rule}-K{k}-{kind}-{str(dtype)[6:]}-P{p}-b{bucket}-tau{tau}"
        full = microgradients(world * k, p, kind, dtype, seed)
        local = full[rank * k : (rank + 1) * k].clone()
        scale = (1.0, 2.0, 3.0)[seed % 3]  # 2.0 is the count of accepted ones in some cases: no division
        reference = filter_microgradients(full, tau, rule=rule, scale=scale)
        if bucket is None:  # the functional form with its cached default state
            result = gaf_all_reduce(local, tau, rule=rule, exchange=exchange, scale=scale)
        else:
            state = states.setdefault((exchange, bucket), GAFExchange(exchange=exchange, bucket_size=bucket))
            out = torch.full((p,), 7.0, dtype=dtype) if seed % 2 else None
            result = state(local, tau, rule, out=out, scale=scale)
            if out is not None and result.gradient is not None and result.gradient.data_ptr() != out.data_ptr():
                report.setdefault(name, []).append("gradient not written into out")
            if out is not None and exchange == "sharded":  # it keeps the other ranks' rows of its shard only
                fresh = GAFExchange(exchange=exchange, bucket_size=bucket)
                fresh(local, tau, rule, out=torch.empty_like(out), scale=scale)
                shard = _Layout.build(p, world, bucket).shards[rank]
                expected = (world - 1) * k * (shard.stop - shard.start) * local.element_size()
                if fresh.buffer_bytes != expected:
                    report.setdefault(name, []).append(f"keeps {fresh.buffer_bytes} bytes, expected {expected}")
        if not torch.equal(local.view(torch.uint8), full[rank * k : (rank + 1) * k].view(torch.uint8)):
            report.setdefault(name, []).append("local_grads modified")
        report.setdefault(name, []).extend(compare(result, reference, exact_distances=exchange == "all_gather"))
        blob += name.encode() + result_bytes(result)
    if world >= 3:
        report.update(run_subgroup(rank, world)[0])
    return report, bytes(blob)


def run_subgroup(rank: int, world: int) -> tuple[dict, bytes]:
    """A group whose ranks are not the global ones: the first and last of 3 processes, or all but
    the first of 4 (3 members: the small all-gathers go point to point on gloo). Non-members
    report no problems and no bytes."""
    members = [0, world - 1] if world == 3 else list(range(1, world))
    group = dist.new_group(members)  # every rank takes part in creating it
    report = {f"subgroup-{exchange}": [] for exchange in ("sharded", "all_gather")}
    blob = bytearray()
    if rank in members:
        k, me = 2, members.index(rank)
        full = microgradients(len(members) * k, 400_003, "mixed", torch.float32, seed=1000)
        reference = filter_microgradients(full, 0.97)
        for exchange in report:
            state = GAFExchange(group=group, exchange=exchange.removeprefix("subgroup-"), bucket_size=1 << 16)
            result = state(full[me * k : (me + 1) * k].clone(), 0.97)
            report[exchange] = compare(result, reference, exact_distances=exchange.endswith("all_gather"))
            blob += result_bytes(result)
    dist.barrier()
    return report, bytes(blob)


def run_errors(rank: int, world: int) -> tuple[dict, bytes]:
    good = torch.randn(2, 100, generator=torch.Generator().manual_seed(rank))
    calls = {
        "threshold-one-rank": lambda: gaf_all_reduce(good, 3.0 if rank == world - 1 else 0.97),
        "threshold-all": lambda: gaf_all_reduce(good, -0.1, exchange="all_gather"),
        "threshold-mismatch": lambda: gaf_all_reduce(good, 0.9 if rank == 0 else 0.97),
        "rule-one-rank": lambda: gaf_all_reduce(good, 0.97, rule="bogus" if rank == 0 else "sequential"),
        "rule-mismatch": lambda: gaf_all_reduce(good, 0.97, rule="best_start" if rank == 0 else "sequential"),
        "exchange-one-rank": lambda: gaf_all_reduce(good, 0.97, exchange="bogus" if rank == 1 else "sharded"),
        "exchange-mismatch": lambda: gaf_all_reduce(good, 0.97, exchange="all_gather" if rank == 1 else "sharded"),
        "K-mismatch": lambda: gaf_all_reduce(good[: 1 + (rank == 0)], 0.97),
        "P-mismatch": lambda: GAFExchange()(good[:, : 100 - (rank == world - 1)], 0.97),
        "dtype-mismatch": lambda: gaf_all_reduce(good.half() if rank == 0 else good, 0.97, exchange="all_gather"),
        "scale-mismatch": lambda: gaf_all_reduce(good, 0.97, scale=2.0 if rank == 1 else 1.0),
        "scale-one-rank": lambda: gaf_all_reduce(good, 0.97, scale=math.inf if rank == 2 else 1.0),
        "not-2d-one-rank": lambda: gaf_all_reduce(good[0] if rank == 0 else good, 0.97),
        "bad-out-one-rank": lambda: gaf_all_reduce(good, 0.97, out=torch.empty(99 if rank == 1 else 100)),
    }
    report = {}
    for name, call in calls.items():
        try:
            call()
            report[name] = "no error"
        except (ValueError, TypeError) as error:
            report[name] = f"{type(error).__name__}: {error}"
    # The group is still usable after the errors.
    full = torch.randn(world * 2, 100, generator=torch.Generator().manual_seed(0))
    result = gaf_all_reduce(full[rank * 2 : rank * 2 + 2], 2.0)
    report["after-errors"] = compare(result, filter_microgradients(full, 2.0), exact_distances=False)
    return report, b""


def main() -> None:
    out_dir, modes = sys.argv[1], sys.argv[2].split(",")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    for mode in modes:
        start = time.perf_counter()
        report, blob = {"cases": run_cases, "errors": run_errors, "subgroup": run_subgroup}[mode](rank, world)
        print(f"rank {rank}: {mode} took {time.perf_counter() - start:.1f} s", file=sys.stderr)
        with open(os.path.join(out_dir, f"{mode}-rank{rank}.json"), "w") as f:
            json.dump(report, f, indent=1)
        with open(os.path.join(out_dir, f"{mode}-rank{rank}.bin"), "wb") as f:
            f.write(blob)
    dist.destroy_process_group()
    # Reports are written; skip interpreter finalization, where gloo occasionally aborts after
    # destroy_process_group (see trainer_worker.py).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
