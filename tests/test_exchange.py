"""Tests of hf_gaf.exchange: single-process behaviour, and gloo process groups through torchrun.

Each multi-process launch runs all its cases (process start is the cost) with the worker in
tests/distributed/exchange_worker.py; every rank checks its result against
`filter_microgradients` on all micro-gradients and reports a digest of its bytes, which each
pytest case compares across ranks.
"""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from hf_gaf import GAFExchange, filter_microgradients, gaf_all_reduce
from hf_gaf.exchange import _Layout
from hf_gaf.kernel import GRAM_CHUNK

from .distributed.exchange_worker import CASE_NAMES, ERROR_CASES

LAUNCH_TIMEOUT = 240  # seconds; a hang fails the test instead of blocking the suite


@pytest.fixture(scope="module")
def launched(tmp_path_factory, torchrun):
    """`launched(nproc, mode)`: the per-rank reports of the one launch of that mode at that world size."""
    done: dict[tuple[int, str], list[dict]] = {}

    def launch(nproc: int, mode: str) -> list[dict]:
        if (nproc, mode) not in done:
            out_dir = tmp_path_factory.mktemp(f"exchange{nproc}{mode}")
            torchrun(["-m", "tests.distributed.exchange_worker", str(out_dir), mode], nproc, timeout=LAUNCH_TIMEOUT)
            done[nproc, mode] = [json.loads((out_dir / f"{mode}-rank{r}.json").read_text()) for r in range(nproc)]
        return done[nproc, mode]

    return launch


@pytest.mark.multiprocess
@pytest.mark.parametrize("nproc", [2, 3])
@pytest.mark.parametrize("case", CASE_NAMES)
def test_matches_single_process_bit_identically_on_every_rank(launched, nproc, case):
    per_rank = [report[case] for report in launched(nproc, "cases")]
    for rank, report in enumerate(per_rank):
        assert not report["problems"], f"rank {rank}: {report['problems']}"
    assert len({report["digest"] for report in per_rank}) == 1, "results are not bit-identical across ranks"


@pytest.mark.multiprocess
@pytest.mark.parametrize("exchange", ["sharded", "all_gather"])
def test_subgroup_of_three_of_four_processes(launched, exchange):
    """Group ranks 0-2 are global ranks 1-3; with 3 members every small all-gather is point to point."""
    reports = launched(4, "subgroup")
    assert reports[0] == {}, "rank 0 is not a member"
    members = [report[exchange] for report in reports[1:]]
    assert all(not member["problems"] for member in members), members
    assert len({member["digest"] for member in members}) == 1


# Case: what every rank's error says.
ON_EVERY_RANK = {
    "threshold-all": "[0, 2]",
    "threshold-mismatch": "threshold is [0.9, 0.97, 0.97]",
    "rule-mismatch": "rule is ['best_start', 'sequential', 'sequential']",
    "exchange-mismatch": "exchange is ['sharded', 'all_gather', 'sharded']",
    "K-mismatch": "K is [2, 1, 1]",
    "P-mismatch": "P is [100, 100, 99]",
    "dtype-mismatch": "dtype is ['torch.float16', 'torch.float32', 'torch.float32']",
    "bucket-mismatch": "bucket size is [16384, 1048576, 1048576]",
    "units-mismatch": "number of units is [1, 2, 1]",
    "scale-mismatch": "scale is [1.0, 2.0, 1.0]",
}
# Case: (the rank with the bad argument, what its error says, what the others' errors say).
ON_ONE_RANK = {
    "threshold-one-rank": (2, "[0, 2], got 3.0", "rank 2: threshold outside [0, 2]"),
    "rule-one-rank": (0, "Unknown GAF rule 'bogus'", "rank 0: unknown rule"),
    "scale-one-rank": (2, "scale must be a finite number, got inf", "rank 2: scale not a finite number"),
    "sizes-one-rank": (0, "sizes must hold one finite number >= 0", "rank 0: invalid sizes"),
    "bad-out-one-rank": (1, "out must be a [100]", "rank 1: invalid out"),
    "not-2d-one-rank": (0, "[K, P] tensor", "invalid arguments on rank(s) [0]"),
    "exchange-one-rank": (1, "Unknown GAF exchange 'bogus'", "invalid arguments on rank(s) [1]"),
    "threshold-later-call": (0, "[0, 2], got 3.0", "rank 0: threshold outside [0, 2]"),
}


def test_every_error_case_is_checked():
    assert set(ERROR_CASES) == set(ON_EVERY_RANK) | set(ON_ONE_RANK)


@pytest.mark.multiprocess
@pytest.mark.parametrize("case", ERROR_CASES)
def test_errors_raise_on_every_rank(launched, case):
    for rank, report in enumerate(launched(3, "errors")):
        if case in ON_EVERY_RANK:
            needle = ON_EVERY_RANK[case]
        else:
            bad_rank, own, others = ON_ONE_RANK[case]
            needle = own if rank == bad_rank else others
        assert needle in report[case], f"rank {rank}, {case}: {report[case]}"


@pytest.mark.multiprocess
def test_the_group_is_usable_after_the_errors(launched):
    assert all(report["after-errors"] == [] for report in launched(3, "errors"))


@pytest.mark.multiprocess
def test_a_configuration_that_changes_on_one_rank_fails_on_every_rank_within_the_timeout(launched):
    for rank, report in enumerate(launched(2, "timeout")):
        assert report["outcome"].startswith("RuntimeError: GAF exchange:"), f"rank {rank}: {report['outcome']}"
        assert "ddp_timeout" in report["outcome"] and report["seconds"] < 20, report


# -- single process -------------------------------------------------------------------------------


def random_grads(m: int, p: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(p, generator=gen) + torch.randn(m, p, generator=gen)


@pytest.mark.parametrize("exchange", ["sharded", "all_gather"])
@pytest.mark.parametrize("rule", ["sequential", "best_start"])
def test_without_process_group_filters_locally(exchange, rule):
    grads = random_grads(4, 100)
    grads[2] = float("nan")
    expected = filter_microgradients(grads, 0.97, rule=rule)
    result = gaf_all_reduce(grads, 0.97, rule=rule, exchange=exchange)
    assert torch.equal(result.accepted, expected.accepted)
    assert not result.accepted[2]
    assert torch.equal(result.gradient, expected.gradient)
    assert torch.allclose(result.distances, expected.distances, equal_nan=True)
    out = torch.full((100,), float("nan"))
    assert GAFExchange(exchange=exchange)(grads, 0.97, rule, out=out).gradient is out
    assert torch.equal(out, expected.gradient)


def test_single_micro_gradient_is_skipped():
    result = gaf_all_reduce(torch.ones(1, 10), 2.0)
    assert result.skipped and result.gradient is None


def test_world_size_one_process_group(tmp_path):
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1, timeout=timedelta(seconds=30))
    try:
        grads = random_grads(3, 50, seed=1)
        result = gaf_all_reduce(grads, 2.0)
        assert torch.equal(result.gradient, filter_microgradients(grads, 2.0).gradient)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"threshold": 2.5}, r"\[0, 2\]"),
        ({"threshold": -0.1}, r"\[0, 2\]"),
        ({"rule": "greedy"}, "Unknown GAF rule"),
        ({"exchange": "ring"}, "Unknown GAF exchange"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    kwargs = {"threshold": 0.97, **kwargs}
    with pytest.raises(ValueError, match=match):
        gaf_all_reduce(random_grads(2, 10), **kwargs)


def test_bad_state_arguments_raise():
    with pytest.raises(ValueError, match="Unknown GAF exchange"):
        GAFExchange(exchange="ring")
    with pytest.raises(ValueError, match="bucket_size"):
        GAFExchange(bucket_size=0)
    with pytest.raises(ValueError, match=r"\[K, P\]"):
        gaf_all_reduce(torch.ones(10), 0.97)
    with pytest.raises(ValueError, match="out must be"):
        gaf_all_reduce(random_grads(2, 10), 0.97, out=torch.empty(9))


@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize("p", [1, 2, 1000, GRAM_CHUNK * 5 + 7, GRAM_CHUNK * 64])
@pytest.mark.parametrize("bucket_size", [1, GRAM_CHUNK * 4, 1 << 30])
def test_layout_covers_every_column_once_in_whole_gram_chunks(n, p, bucket_size):
    layout = _Layout.build(p, n, bucket_size)
    assert len(layout.shards) == len(layout.buckets) == n
    assert [s.start for s in layout.shards[1:]] == [s.stop for s in layout.shards[:-1]]
    assert layout.shards[0].start == 0 and layout.shards[-1].stop == p
    assert all(s.start % GRAM_CHUNK == 0 for s in layout.shards if s.stop > s.start)
    widths = [s.stop - s.start for s in layout.shards]
    assert max(widths) - min(widths) <= GRAM_CHUNK  # balanced to a Gram chunk
    step = max(GRAM_CHUNK, bucket_size // GRAM_CHUNK * GRAM_CHUNK)
    for shard, buckets in zip(layout.shards, layout.buckets):
        columns = [c for b in buckets for c in range(b.start, b.stop)]
        assert columns == list(range(shard.start, shard.stop))
        assert all(b.stop - b.start <= step and b.start % GRAM_CHUNK == 0 for b in buckets)
    assert layout.rounds == max(len(b) for b in layout.buckets)
