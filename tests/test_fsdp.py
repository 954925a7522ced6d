"""Tests of hf_gaf.fsdp: GAF under FSDP2 on CPU (gloo), 2 and 3 processes through torchrun.

The worker (tests/distributed/fsdp_worker.py) shards an MLP and a tiny Llama with `fully_shard`
per layer, as accelerate wraps a model, and runs every case against its reference: plain FSDP2
training at tau=2, and the data-parallel exchange on the same micro-gradients otherwise.
"""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from hf_gaf import compat

from .distributed.fsdp_worker import CASES, ERRORS
from .testing_utils import needs_fsdp2

LAUNCH_TIMEOUT = 420  # seconds; a hang fails the test instead of blocking the suite
CASES_BY_NAME = {case.name: case for case in CASES}



@pytest.fixture(scope="module")
def launched(tmp_path_factory, torchrun):
    """`launched(nproc, mode)`: the per-rank reports of the one launch of that mode at that world size."""
    done: dict[tuple[int, str], list[dict]] = {}

    def launch(nproc: int, mode: str) -> list[dict]:
        if (nproc, mode) not in done:
            out_dir = tmp_path_factory.mktemp(f"fsdp{nproc}{mode}")
            expect_failure = mode == "hang"
            torchrun(["-m", "tests.distributed.fsdp_worker", str(out_dir), mode], nproc, timeout=LAUNCH_TIMEOUT,
                     expect_failure=expect_failure)  # fmt: skip
            ranks = range(nproc - 1) if expect_failure else range(nproc)  # the stopped rank writes nothing
            done[nproc, mode] = [json.loads((out_dir / f"{mode}-rank{r}.json").read_text()) for r in ranks]
        return done[nproc, mode]

    return launch


def _case(launched, nproc: int, name: str) -> list[dict]:
    reports = [report[name] for report in launched(nproc, "cases")]
    for rank, report in enumerate(reports):
        assert "error" not in report, f"rank {rank}: {report['error']}"
    return reports


def _flat(accepted) -> list[bool]:
    return list(itertools.chain.from_iterable(accepted)) if isinstance(accepted[0], list) else list(accepted)


def _runs(selected) -> list[tuple[int, str]]:
    """Every case at 2 and 3 processes, and at 1 (FSDP2's single-rank path) where a step has two micro-gradients."""
    return [(nproc, case.name) for case in selected for nproc in (1, 2, 3) if nproc * case.k >= 2]


@needs_fsdp2
@pytest.mark.multiprocess
@pytest.mark.parametrize("nproc, name", _runs(c for c in CASES if c.tau >= 2))
def test_tau_two_is_plain_fsdp2_training(launched, nproc, name):
    reports = _case(launched, nproc, name)
    tolerance = 2e-3 if CASES_BY_NAME[name].precision == "bf16-reduce-bf16" else 1e-5
    for rank, report in enumerate(reports):
        assert report["difference"] < tolerance, f"rank {rank}: gathered parameters differ by {report['difference']}"
        assert report["present"] == report["plain_present"], "other parameters have a gradient than under plain FSDP2"
        assert not any(result["skipped"] for result in report["results"])
    if CASES_BY_NAME[name].model == "branchy":
        assert all("unused.weight" not in present for present in reports[0]["present"]), "the unused head got a gradient"


@needs_fsdp2
@pytest.mark.multiprocess
@pytest.mark.parametrize("nproc, name", _runs(c for c in CASES if c.tau < 2))
def test_filtering_decides_as_the_data_parallel_exchange_on_the_same_microgradients(launched, nproc, name):
    reports = _case(launched, nproc, name)
    for rank, report in enumerate(reports):
        ours, theirs = report["results"], report["reference_results"]
        assert [r["accepted"] for r in ours] == [r["accepted"] for r in theirs], f"rank {rank}: other accepted sets"
        assert [r["skipped"] for r in ours] == [r["skipped"] for r in theirs]
        assert [r["received"] for r in ours] == [r["received"] for r in theirs]
        for mine, reference in zip(ours, theirs):
            for a, b in zip(mine["distances"], reference["distances"]):
                assert (a is None) == (b is None) and (a is None or abs(a - b) < 1e-6), (a, b)
        assert report["difference"] < 1e-5, f"rank {rank}: gathered parameters differ by {report['difference']}"
    assert reports[0]["results"] == reports[-1]["results"], "ranks decided differently"


@needs_fsdp2
@pytest.mark.multiprocess
def test_the_filtering_cases_reject_microgradients(launched):
    """The comparisons above mean something only if micro-gradients were rejected and accepted."""
    accepted = [
        flag
        for case in CASES
        if case.tau < 2
        for result in launched(2, "cases")[0][case.name]["results"]
        for flag in _flat(result["accepted"])
    ]
    assert 0.2 < accepted.count(False) / len(accepted) < 0.8


@needs_fsdp2
@pytest.mark.multiprocess
@pytest.mark.parametrize("nproc", [1, 2, 3])
def test_tau_zero_leaves_parameters_and_optimizer_state_untouched(launched, nproc):
    for report in (r["untouched"] for r in launched(nproc, "cases")):
        assert report == {"skipped": [True] * 3, "parameters_equal": True, "optimizer_equal": True, "grads_none": True}


@needs_fsdp2
@pytest.mark.multiprocess
@pytest.mark.parametrize("nproc", [1, 2, 3])
def test_a_sharded_checkpoint_resumes_bit_identically(launched, nproc):
    for report in (r["checkpoint"] for r in launched(nproc, "cases")):
        assert "error" not in report, report.get("error")
        assert report["difference"] == 0.0
        assert len([name for name in report["shards"] if name.endswith(".distcp")]) == nproc


@needs_fsdp2
@pytest.mark.multiprocess
@pytest.mark.parametrize("nproc", [1, 2, 3])
def test_a_rank_holds_the_steps_shards_and_with_overlap_one_modules(launched, nproc):
    report = launched(nproc, "cases")[0]["memory"]
    for key, k in (("K2", 2), ("K1", 1)):
        entry = report[key]
        assert entry["storage"] == k * nproc * entry["width"] * entry["element"]  # K x P (padded) elements
    overlap = report["K1-overlap"]
    assert overlap["storage"] == nproc * overlap["widest_module"] * overlap["element"]
    assert overlap["storage"] < report["K1"]["storage"] / 2


@needs_fsdp2
@pytest.mark.multiprocess
def test_the_model_accelerate_wraps_is_served_whole(launched):
    for report in (r["accelerate-wrapping"] for r in launched(2, "cases")):
        assert "error" not in report, report.get("error")
        # accelerate shards norm and lm_head in one fully_shard call: one module of the exchange.
        assert report["modules"] == ["FSDPEmbedding", "FSDPLlamaDecoderLayer", "FSDPLlamaDecoderLayer", "FSDPLlamaRMSNorm"]
        assert report["received"] and report["with_grad"] == report["parameters"]


# Case: what every rank's error says.
ON_EVERY_RANK = {
    "k-mismatch": "passes per step K is [2, 1",
    "threshold-mismatch": "threshold is [0.97, 0.97, 0.9] by rank",
    "outside-capturing": "outside FSDPExchange.capturing",
    "unsharded-parameter": "Parameter 'extra' is not sharded",
}


def test_every_error_case_is_checked():
    assert set(ERRORS) == set(ON_EVERY_RANK)


@needs_fsdp2
@pytest.mark.multiprocess
@pytest.mark.parametrize("case", ERRORS)
def test_errors_raise_on_every_rank(launched, case):
    for rank, report in enumerate(launched(3, "errors")):
        assert ON_EVERY_RANK[case] in report[case], f"rank {rank}: {report[case]}"


@needs_fsdp2
@pytest.mark.multiprocess
def test_a_hung_rank_fails_the_others_within_the_timeout(launched):
    (report,) = launched(2, "hang")
    assert report["outcome"].startswith("RuntimeError: GAF exchange:") and "ddp_timeout" in report["outcome"], report
    assert report["seconds"] < 20, report


# -- one process ----------------------------------------------------------------------------------


@needs_fsdp2
def test_a_model_without_fully_shard_is_refused():
    from hf_gaf import FSDPExchange

    with pytest.raises(ValueError, match="apply torch.distributed.fsdp.fully_shard"):
        FSDPExchange(torch.nn.Linear(2, 2), num_micro=2)


def test_the_installed_torch_is_checked():
    installed = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
    if installed >= (2, 9):
        compat.check_fsdp2()
    else:
        with pytest.raises(compat.UnsupportedVersionError, match=r"torch >= 2\.9"):
            compat.check_fsdp2()


def test_below_the_torch_that_has_the_hooks_the_error_names_it(monkeypatch):
    monkeypatch.setattr(compat, "version", lambda name: "2.8.0" if name == "torch" else "99")
    with pytest.raises(compat.UnsupportedVersionError, match=r"torch >= 2\.9 .*found torch 2\.8\.0"):
        compat.check_fsdp2()
