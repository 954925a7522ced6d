"""`benchmarks/gpu_check.py`: its CPU dry run end to end, and the harness that keeps one failing check from stopping the rest.

The GPU run happens elsewhere, once; what can be made sure of here is that the same code runs (the dry
run hides every CUDA device from the script, so these tests mean the same on a machine with one), that
its JSON holds every check with a status and a reason, that a failure is recorded without stopping the
others, and that the two fp16 checks, which need CUDA, work when given what accelerate gives them there.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from .scripts import benchmark_module, run_quick

TIMEOUT = 300  # seconds; the dry run takes under a minute on 2 idle cores
CHECK_NAMES = [
    "correctness/equivalence/fp32/k2",
    "correctness/equivalence/fp32/k4",
    "correctness/equivalence/bf16/k2",
    "correctness/equivalence/bf16/k4",
    "correctness/fp16/skipped_step",
    "correctness/fp16/non_finite",
    "correctness/filter/float32",
    "correctness/filter/bfloat16",
    "correctness/filter/float16",
    "correctness/fsdp2/exchange",
    "correctness/fsdp2/trainer",
    "speed/resnet18",
    "speed/vit_large",
    "speed/filter",
    "speed/fsdp2",
    "memory/resnet18",
    "memory/vit_large",
    "memory/fsdp2",
]
NEEDS_CUDA = {
    "correctness/fp16/skipped_step", "correctness/fp16/non_finite", "correctness/fsdp2/trainer", "speed/fsdp2",
    "memory/resnet18", "memory/vit_large", "memory/fsdp2",
}


def _run(out_dir: Path, *arguments: str) -> subprocess.CompletedProcess:
    """The script as a user runs it, with no CUDA device visible and one thread (the machine is shared)."""
    env = {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    return run_quick("gpu_check.py", "--output_dir", str(out_dir), *arguments, timeout=TIMEOUT, env=env)


@pytest.fixture(scope="module")
def gpu_check():
    """The script as a module, for its harness and its checks."""
    with benchmark_module("gpu_check") as module:
        yield module


def test_dry_run_without_cuda(tmp_path):
    result = _run(tmp_path)
    assert "no CUDA device" in result.stdout
    assert [p.name for p in tmp_path.iterdir()] == ["gpu_check_quick.json"]  # never the published gpu_check.json
    data = json.loads((tmp_path / "gpu_check_quick.json").read_text())
    assert data["dry_run"] and data["quick"] and data["complete"] and data["device"]["type"] == "cpu"

    checks = {c["name"]: c for c in data["checks"]}
    assert list(checks) == CHECK_NAMES
    assert data["counts"] == {"passed": len(CHECK_NAMES) - len(NEEDS_CUDA), "failed": 0, "skipped": len(NEEDS_CUDA)}
    for name, check in checks.items():
        assert check["group"] == name.split("/")[0] and check["criterion"]
        assert name in result.stdout  # the table
        if name in NEEDS_CUDA:
            assert check["status"] == "skipped" and check["reason"].startswith("needs CUDA: "), check
        else:
            assert check["status"] == "passed" and check["summary"] and "error" not in check, check

    for precision in ("fp32", "bf16"):
        for k in (2, 4):
            details = checks[f"correctness/equivalence/{precision}/k{k}"]["details"]
            assert details["gradient_accumulation_steps"] == k and details["all_accepted"]
            assert 0.0 <= details["relative_difference"] <= details["allowed"]
    exchange = checks["correctness/fsdp2/exchange"]["details"]
    assert exchange["accepted"] == exchange["reference_accepted"] and not all(exchange["accepted"][0])
    trainer = checks["correctness/fsdp2/trainer"]["details"]  # without CUDA the worker trains without FSDP
    assert trainer["fsdp"] is False and trainer["accepted_all"] and trainer["relative_difference"] <= 1e-5
    for dtype in ("float32", "bfloat16", "float16"):
        cases = checks[f"correctness/filter/{dtype}"]["details"]["cases"]
        assert [(c["micro"], c["rule"]) for c in cases] == [(m, r) for m in (2, 3, 4, 8) for r in ("sequential", "best_start")]
        assert all(not c["problems"] and c["margin_to_threshold"] > 0.1 for c in cases)
        assert all(c["skipped"] for c in cases if c["micro"] == 2)  # rows 0 and 1 oppose by construction
        assert all(c["accepted"][1] is False for c in cases if c["micro"] >= 4)  # the NaN row is excluded
    for model in ("resnet18", "vit_large"):
        speed = checks[f"speed/{model}"]["details"]
        assert len(speed["gaf_step_s"]) == len(speed["trainer_step_s"]) == speed["timed_steps_per_run"] * speed["runs_each"]
        assert speed["ratio"] == pytest.approx(speed["gaf_median_s"] / speed["trainer_median_s"])
        memory = checks[f"memory/{model}"]["details"]  # computed before the run finds no CUDA memory to read
        assert memory["documented_bytes"] == (memory["gradient_accumulation_steps"] + 1) * memory["parameters"] * 4
    timings = checks["speed/filter"]["details"]["results"]
    assert [r["micro"] for r in timings] == [2, 4] and all(r["median_s"] > 0 for r in timings)


def test_only_runs_the_named_checks_into_its_own_file(tmp_path):
    _run(tmp_path, "--only", "correctness/filter,speed/filter")
    data = json.loads((tmp_path / "gpu_check_quick_only_correctness-filter_speed-filter.json").read_text())
    assert [c["name"] for c in data["checks"]] == [
        "correctness/filter/float32", "correctness/filter/bfloat16", "correctness/filter/float16", "speed/filter",
    ]  # fmt: skip


def test_only_rejects_a_name_that_matches_nothing(gpu_check):
    assert [c.name for c in gpu_check.select_checks("memory")] == ["memory/resnet18", "memory/vit_large", "memory/fsdp2"]
    assert gpu_check.select_checks("speed/vit_large,memory/vit_large")[0].name == "speed/vit_large"
    with pytest.raises(ValueError, match=r"speed/vit.*names no check.*correctness, memory, speed"):
        gpu_check.select_checks("speed/vit")  # leading parts are whole parts of a name


def test_a_failing_check_is_recorded_and_the_rest_still_run(gpu_check):
    Check, Outcome, Skipped = gpu_check.Check, gpu_check.Outcome, gpu_check.Skipped

    def boom(context):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    def skip(context):
        raise Skipped("needs CUDA: something")

    checks = [
        Check("correctness/boom", boom, "never raises"),
        Check("correctness/fine", lambda context: Outcome(True, "all good", {"x": 1}), "passes"),
        Check("memory/skip", skip, "needs CUDA"),
        Check("speed/unmet", lambda context: Outcome(False, "ratio 9", {"ratio": 9.0}), "ratio below 2"),
    ]
    saved = []
    records = gpu_check.run_checks(checks, context=None, on_record=lambda records: saved.append(len(records)))
    assert [r["status"] for r in records] == ["failed", "passed", "skipped", "failed"]
    assert records[0]["error"] == "RuntimeError: CUDA error: an illegal memory access was encountered"
    assert "in boom" in records[0]["traceback"]
    assert records[1]["details"] == {"x": 1} and records[2]["reason"] == "needs CUDA: something"
    assert records[3]["error"] == "ratio 9" and records[3]["details"] == {"ratio": 9.0}
    assert saved == [1, 2, 3, 4]  # the JSON is rewritten after every check
    assert gpu_check.exit_status(records) == 1
    assert gpu_check.exit_status(records[1:3]) == 0


def test_a_spent_time_budget_skips_the_checks_left(gpu_check):
    def never(context):
        raise AssertionError("a check started after the time budget was spent")

    checks = [gpu_check.Check("speed/filter", never, "measured")]
    (record,) = gpu_check.run_checks(checks, context=None, time_budget=0.0)
    assert record["status"] == "skipped" and record["reason"].endswith("run it with --only speed/filter")


def test_differences_finds_one_ulp_anywhere_in_a_state(gpu_check):
    state = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.ones(4)}}, "param_groups": [{"lr": 1e-3}]}
    assert gpu_check.differences(state, gpu_check._cpu_copy(state)) == []
    nudged = gpu_check._cpu_copy(state)
    nudged["state"][0]["exp_avg"][2] = torch.nextafter(torch.tensor(1.0), torch.tensor(2.0))
    nudged["param_groups"][0]["lr"] = 1e-3 * (1 + 1e-15)
    assert gpu_check.differences(state, nudged) == [".state.0.exp_avg", ".param_groups[0].lr"]
    assert gpu_check.differences({"x": torch.ones(2)}, {"x": torch.ones(2, dtype=torch.float64)}) == [".x"]


@pytest.mark.parametrize("name", ["correctness/fp16/skipped_step", "correctness/fp16/non_finite"])
def test_fp16_checks_pass_with_what_accelerate_sets_up_on_cuda(gpu_check, monkeypatch, tmp_path, name):
    """The fp16 checks at the quick sizes, given on the CPU what accelerate gives fp16 training on CUDA.

    There, `Accelerator` holds a `GradScaler` (`accelerator.scaler`) and wraps the model's forward in fp16
    autocast (`native_amp`); on the CPU it does neither. Setting both before `train()` prepares the model
    and optimizer runs the checks' own logic (loss scaling, unscaling before clipping, GAF handing
    non-finite gradients to the scaler, the snapshots and comparisons) as on a GPU.
    """

    class LossScaled:
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            if self.args.fp16:
                self.accelerator.scaler = torch.amp.GradScaler("cpu")
                self.accelerator.native_amp = True

    monkeypatch.setattr(gpu_check, "Trainer", type("Trainer", (LossScaled, gpu_check.Trainer), {}))
    monkeypatch.setattr(gpu_check, "GAFTrainer", type("GAFTrainer", (LossScaled, gpu_check.GAFTrainer), {}))
    monkeypatch.setattr(gpu_check, "require_cuda", lambda context, what: None)
    (check,) = gpu_check.select_checks(name)
    context = gpu_check.Context(torch.device("cpu"), gpu_check.QUICK, str(tmp_path))
    outcome = check.run(context)
    assert outcome.passed, outcome.summary
    steps = outcome.details.get("steps") or outcome.details["gaf_steps"]
    assert all(isinstance(step["scale"], float) for step in steps)  # the scaler was there and recorded
