"""Tests of hf_gaf.exchange: single-process behaviour, and gloo process groups through torchrun.

The multi-process tests run many cases per torchrun launch (process start is the cost) with the
worker in tests/distributed/exchange_worker.py; every rank checks its result against
``filter_microgradients`` on all micro-gradients and writes its raw bytes, compared here.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from hf_gaf import GAFExchange, filter_microgradients, gaf_all_reduce
from hf_gaf.exchange import _Layout
from hf_gaf.rule import GRAM_CHUNK

WORKER = Path(__file__).parent / "distributed" / "exchange_worker.py"
LAUNCH_TIMEOUT = 150  # seconds; a hang fails the test instead of blocking the suite


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(nproc: int, out_dir: Path, modes: str) -> None:
    """Run the worker on ``nproc`` gloo processes (the modes in one launch)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
        str(WORKER), str(out_dir), modes,
    ]  # fmt: skip
    done = subprocess.run(command, check=False, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """``launched(nproc)``: the output directory of the one launch at that world size.

    3 processes also run the error cases, in the same launch: starting the processes is the cost.
    4 processes run only a subgroup of 3.
    """
    done: dict[int, Path] = {}

    def launch(nproc: int) -> Path:
        if nproc not in done:
            out_dir = tmp_path_factory.mktemp(f"exchange{nproc}")
            torchrun(nproc, out_dir, {2: "cases", 3: "cases,errors", 4: "subgroup"}[nproc])
            done[nproc] = out_dir
        return done[nproc]

    return launch


def reports(out_dir: Path, mode: str, nproc: int) -> list[dict]:
    return [json.loads((out_dir / f"{mode}-rank{r}.json").read_text()) for r in range(nproc)]


@pytest.mark.parametrize("nproc", [2, 3])
def test_matches_single_process_on_every_rank(launched, nproc):
    out_dir = launched(nproc)
    per_rank = reports(out_dir, "cases", nproc)
    assert len(per_rank[0]) > 50
    for rank, report in enumerate(per_rank):
        assert report.keys() == per_rank[0].keys()
        failures = {case: problems for case, problems in report.items() if problems}
        assert not failures, f"rank {rank}: {failures}"
    blobs = [(out_dir / f"cases-rank{r}.bin").read_bytes() for r in range(nproc)]
    assert all(blob == blobs[0] for blob in blobs), "results are not bit-identical across ranks"


def test_subgroup_of_three_of_four_processes(launched):
    """Group ranks 0-2 are global ranks 1-3; with 3 members every small all-gather is point to point."""
    out_dir = launched(4)
    for rank, report in enumerate(reports(out_dir, "subgroup", 4)):
        assert report == {"subgroup-sharded": [], "subgroup-all_gather": []}, f"rank {rank}: {report}"
    blobs = [(out_dir / f"subgroup-rank{r}.bin").read_bytes() for r in range(4)]
    assert blobs[0] == b"" and blobs[1], "rank 0 is not a member; the members report their results"
    assert blobs[1] == blobs[2] == blobs[3], "results are not bit-identical across the group"


def test_errors_raise_on_every_rank(launched):
    nproc, out_dir = 3, launched(3)
    per_rank = reports(out_dir, "errors", nproc)
    on_every_rank = {
        "threshold-all": "[0, 2]",
        "threshold-mismatch": "threshold is [0.9, 0.97, 0.97]",
        "rule-mismatch": "rule is ['best_start', 'sequential', 'sequential']",
        "exchange-mismatch": "exchange is ['sharded', 'all_gather', 'sharded']",
        "K-mismatch": "K is [2, 1, 1]",
        "P-mismatch": "P is [100, 100, 99]",
        "dtype-mismatch": "dtype is ['torch.float16', 'torch.float32', 'torch.float32']",
        "scale-mismatch": "scale is [1.0, 2.0, 1.0]",
    }
    # Case: (the rank with the bad argument, what its error says, what the others' errors say).
    on_one_rank = {
        "threshold-one-rank": (2, "[0, 2], got 3.0", "rank 2: threshold outside [0, 2]"),
        "rule-one-rank": (0, "Unknown GAF rule 'bogus'", "rank 0: unknown rule"),
        "exchange-one-rank": (1, "Unknown GAF exchange 'bogus'", "rank 1: unknown exchange"),
        "not-2d-one-rank": (0, "[K, P] tensor", "rank 0: invalid micro-gradients or out"),
        "bad-out-one-rank": (1, "out must be a [100]", "rank 1: invalid micro-gradients or out"),
        "scale-one-rank": (2, "scale must be a finite number, got inf", "rank 2: scale not a finite number"),
    }
    for rank, report in enumerate(per_rank):
        for case, needle in on_every_rank.items():
            assert needle in report[case], f"rank {rank}, {case}: {report[case]}"
        for case, (bad_rank, own, others) in on_one_rank.items():
            needle = own if rank == bad_rank else others
            assert needle in report[case], f"rank {rank}, {case}: {report[case]}"
        assert report["after-errors"] == [], "the process group is unusable after the errors"


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
