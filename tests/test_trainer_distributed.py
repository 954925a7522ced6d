"""GAFTrainer on several processes (torchrun, gloo on CPU): equivalence, rank identity, weighting, faults."""

from __future__ import annotations

import json
import math

import pytest
import torch

from .testing_utils import needs_fsdp2

pytestmark = pytest.mark.multiprocess

WORKER = ["-m", "tests.distributed.trainer_worker"]


@pytest.fixture(scope="module")
def launched(tmp_path_factory, torchrun):
    """`launched(nproc, *scenarios)`: the per-rank reports of one launch (made once per module)."""
    done: dict[tuple, list[dict]] = {}

    def launch(nproc: int, *scenarios: str, expect_failure: bool = False, ranks: int | None = None) -> list[dict]:
        key = (nproc, scenarios)
        if key not in done:
            out = tmp_path_factory.mktemp("trainer")
            completed = torchrun([*WORKER, str(out), *scenarios], nproc, timeout=300, expect_failure=expect_failure)
            if expect_failure:
                assert completed.returncode != 0, "the launch was expected to fail"
            done[key] = [json.loads((out / f"rank{r}.json").read_text()) for r in range(ranks or nproc)]
        return done[key]

    return launch


TWO = ("equivalence", "unused", "tokens", "units", "adaptive")
THREE = ("filtering", "units", "adaptive")


def _max_difference(a: list[list[float]], b: list[list[float]]) -> float:
    return max(abs(x - y) for p, q in zip(a, b) for x, y in zip(p, q))


@pytest.mark.parametrize("k", [1, 2])
def test_threshold_two_equals_the_plain_ddp_trainer(launched, k):
    reports = launched(2, *TWO)
    # DDP never all-reduces a GAFTrainer gradient (a counting comm hook sees no call) ...
    assert all(r[f"k{k}_gaf_allreduces"] == 0 for r in reports)
    assert all(r[f"k{k}_plain_allreduces"] == 4 for r in reports)
    # ... yet with tau = 2 training equals the plain DDP Trainer's,
    for report in reports:
        assert _max_difference(report[f"k{k}_gaf_params"], report[f"k{k}_plain_params"]) < 1e-6
    # and every rank ends every step with bit-identical parameters.
    assert len(reports[0][f"k{k}_digests"]) == 4
    assert reports[0][f"k{k}_digests"] == reports[1][f"k{k}_digests"]


def test_parameters_without_a_gradient_under_ddp_with_unused_parameters(launched):
    reports = launched(2, *TWO)
    for report in reports:
        assert _max_difference(report["unused_gaf_params"], report["unused_plain_params"]) < 1e-6
        assert report["unused_gaf_steps"] == report["unused_plain_steps"]  # AdamW's step counts
        assert "unused.weight" not in report["unused_gaf_steps"] and report["unused_head_untouched"]
        assert report["unused_gaf_steps"]["branch.weight"] < report["unused_gaf_steps"]["head.weight"]
    assert reports[0]["unused_digests"] == reports[1]["unused_digests"]


def test_token_normalised_losses_on_two_processes(launched):
    reports = launched(2, *TWO)
    for report in reports:
        assert _max_difference(report["tokens_gaf_params"], report["tokens_plain_params"]) < 1e-6
    accepted = reports[0]["tokens_accepted"]
    assert 2 <= sum(accepted) < len(accepted) and not accepted[2] and not accepted[5]  # the negated ones
    for report in reports:  # the token mean over the accepted micro-batches of both ranks
        assert _max_difference(report["tokens_params"], report["tokens_expected_params"]) < 1e-6
    assert reports[0]["tokens_params"] == reports[1]["tokens_params"]


@pytest.mark.parametrize("nproc", [2, 3])
@pytest.mark.parametrize("granularity", ["tensor", "group", "averaged"])
def test_units_decide_alike_on_every_rank(launched, nproc, granularity):
    reports = launched(nproc, *(TWO if nproc == 2 else THREE))
    runs = [r[f"units_{granularity}"] for r in reports]
    assert all(run == runs[0] for run in runs[1:]), "ranks decided or updated differently"
    assert len(runs[0]["digests"]) == 6


@pytest.mark.parametrize("nproc", [2, 3])
def test_the_adaptive_threshold_is_the_same_on_every_rank(launched, nproc):
    reports = launched(nproc, *(TWO if nproc == 2 else THREE))
    thresholds = reports[0]["adaptive_thresholds"]
    assert len(thresholds) == 8 and thresholds[0] == 1.0  # tau until the window of 4 distances is full
    assert any(t < 1.0 for t in thresholds), thresholds
    for report in reports:
        assert report["adaptive_thresholds"] == thresholds and report["adaptive"] == reports[0]["adaptive"]


def test_three_processes_reject_the_adversarial_rank(launched):
    runs = [r["filtering"] for r in launched(3, *THREE)]
    assert runs[0]["digests"] == runs[1]["digests"] == runs[2]["digests"]
    assert runs[0]["accepted"] == runs[1]["accepted"] == runs[2]["accepted"]
    accepted = torch.tensor(runs[0]["accepted"])  # [steps, 3 ranks x K=2], rank-major
    assert accepted.shape == (5, 6)
    assert not accepted[:, 4:].any(), "the adversarial rank's micro-gradients must all be rejected"
    assert accepted[:, :4].float().mean() >= 0.8
    assert not any(runs[0]["skipped"])
    logs = launched(3, *THREE)[0]["filtering_logs"]
    assert sum(e["gaf/accepted_fraction"] for e in logs) / len(logs) <= 4 / 6 + 1e-9
    assert all(math.isfinite(e["gaf/cosine_distance_max"]) for e in logs)


def test_a_bucket_size_that_differs_across_ranks_is_an_error_on_every_rank(launched):
    for rank, report in enumerate(launched(2, "bucket", expect_failure=True)):
        assert "bucket size is [16384, 1048576] by rank" in report["bucket"], f"rank {rank}: {report['bucket']}"
        assert report["bucket"].startswith("ValueError"), report["bucket"]


def test_data_of_different_lengths_per_rank_are_named_before_training(launched):
    for rank, report in enumerate(launched(2, "lengths", expect_failure=True)):
        assert "training data have different lengths: the number of training batches is [6, 8] by rank" in report["lengths"], (
            f"rank {rank}: {report['lengths']}"
        )


@pytest.mark.timeout(120)
def test_a_hung_rank_makes_the_others_fail_within_ddp_timeout(launched):
    (report,) = launched(2, "hang", expect_failure=True, ranks=1)  # rank 1 stopped itself and wrote nothing
    assert report["hang"].startswith("RuntimeError: GAF step 3:"), report["hang"]
    assert "rank 1 did not" in report["hang"] and "ddp_timeout" in report["hang"]
    assert report["hang_seconds"] < 30, "ddp_timeout=4 did not reach the process group (torch's default is 30 min)"


# -- FSDP2 (accelerate's FSDP2 path on CPU processes, tests.testing_utils.FSDP2OnCPU) ------------------------------


@needs_fsdp2
@pytest.mark.parametrize("run", ["k2_model", "k1_tensor", "k1_model"])
def test_threshold_two_equals_the_plain_trainer_under_fsdp2(launched, run):
    for report in launched(2, "fsdp2"):
        assert report[f"fsdp2_{run}_sharded"] == "FSDPLlamaForCausalLM", "accelerate did not shard the model"
        assert _max_difference(report[f"fsdp2_{run}_gaf"], report[f"fsdp2_{run}_plain"]) < 1e-6
        # With one pass per step and units inside the fully_shard modules, each is decided during the backward pass.
        assert report[f"fsdp2_{run}_overlap"] == (run == "k1_tensor")


@needs_fsdp2
def test_under_fsdp2_the_trainer_filters_as_under_ddp(launched):
    for report in launched(2, "fsdp2"):
        sharded, ddp = report["fsdp2_filter_accepted"]
        assert sharded == ddp and not all(sharded), "the negated micro-batches should be rejected, alike"
        assert _max_difference(*report["fsdp2_filter_params"]) < 1e-6


@needs_fsdp2
def test_under_fsdp2_skipped_steps_leave_model_optimizer_and_schedule_alone(launched):
    for report in launched(2, "fsdp2"):
        skip = report["fsdp2_skip"]
        assert skip["summary"]["gaf/skipped_steps_total"] == skip["summary"]["gaf/steps"] == 3
        assert skip["unchanged"] and skip["optimizer_state"] == 0
        assert skip["learning_rates"] == [skip["learning_rates"][0]] * 3, "the LR schedule moved on skipped steps"


@needs_fsdp2
def test_an_fsdp2_sharded_checkpoint_resumes_with_the_gaf_state(launched):
    for report in launched(2, "fsdp2"):
        resume = report["fsdp2_resume"]
        assert "pytorch_model_fsdp_0" in resume["checkpoint"] and "optimizer_0" in resume["checkpoint"]
        assert resume["equal"], "the resumed run differs from the uninterrupted one"
        assert resume["state"][0] == resume["state"][1] and resume["state"][0]["gaf/steps"] == 4
