"""`python -m hf_gaf.train`: the entry point, run as a user would (subprocesses, offline)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_gaf.testing import free_port
from hf_gaf.train import cli
from hf_gaf.train.cli import build_parser, parse_arguments, set_threads

from ..testing_utils import REPO


def run(command: list[str], tmp_path: Path, timeout: float, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    return subprocess.run(
        command, cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=timeout, check=False
    )


def final_results(output_dir: Path) -> dict:
    return json.loads((output_dir / "final_results.json").read_text())


def test_defaults_are_the_documented_digits_run():
    data_args, model_args, run_args, training_args = parse_arguments([])
    assert data_args.dataset == "digits" and data_args.noise_rate == 0.4 and data_args.class_balanced_batches
    assert training_args.gaf_threshold == 0.97
    assert training_args.per_device_train_batch_size == 10 and training_args.gradient_accumulation_steps == 2
    assert training_args.optim == "sgd" and training_args.learning_rate == 0.05
    assert not run_args.baseline
    assert data_args.augment is None and model_args.num_channels is None  # resolved per dataset


def test_command_line_and_json_file_parse_alike(tmp_path):
    flags = ["--gaf_threshold", "1.0", "--gaf_rule", "best_start", "--noise_rate", "0.2", "--model_name", "resnet34"]
    from_flags = parse_arguments(flags)
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"gaf_threshold": 1.0, "gaf_rule": "best_start", "noise_rate": 0.2, "model_name": "resnet34"}))
    from_file = parse_arguments([str(config)])
    assert from_file[0] == from_flags[0] and from_file[1] == from_flags[1] and from_file[2] == from_flags[2]
    for name in ("gaf_threshold", "gaf_rule", "learning_rate", "max_steps", "output_dir", "optim"):
        assert getattr(from_file[3], name) == getattr(from_flags[3], name), name  # the job's defaults apply to JSON too


def test_bad_threshold_fails_before_training():
    with pytest.raises(ValueError, match=r"threshold .*\[0, 2\]"):
        parse_arguments(["--gaf_threshold", "3"])


def test_one_microgradient_per_step_is_refused_before_data_and_model(monkeypatch):
    def must_not_run(*args, **kwargs):
        raise AssertionError("data were prepared before the configuration was checked")

    monkeypatch.setattr(cli, "prepare_data", must_not_run)
    with pytest.raises(ValueError, match=r"world_size x gradient_accumulation_steps = 1 x 1 = 1.*--gradient_accumulation_steps 2"):
        cli.build_trainer(["--gradient_accumulation_steps", "1"])


def test_help_shows_the_gaf_options_as_a_group(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    text = capsys.readouterr().out
    group = text[text.index("Gradient Agreement Filtering:") :]
    assert "averages only the micro-gradients" in group.splitlines()[1]
    assert "--gaf_threshold" in group and "--gaf_granularity" in group
    assert "--gaf_threshold GAF_THRESHOLD" not in text[text.index("\noptions:") : text.index("Gradient Agreement Filtering:")]
    assert "OMP_NUM_THREADS" in text


def test_threads_fit_the_model_unless_the_environment_chose(monkeypatch):
    previous = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        assert set_threads(torch.nn.Linear(10, 10), processes_per_node=1) == 1 == torch.get_num_threads()
        large = torch.nn.Linear(4000, 2000)  # 8M parameters: two threads where two cores are free
        assert set_threads(large, processes_per_node=1) == min(3, len(os.sched_getaffinity(0)))
        assert set_threads(large, processes_per_node=64) == 1
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        torch.set_num_threads(2)
        assert set_threads(torch.nn.Linear(10, 10), processes_per_node=1) == 2
    finally:
        torch.set_num_threads(previous)


@pytest.mark.slow
def test_default_run_resists_label_noise(tmp_path):
    """The README's main job, exactly as documented (only the output folder differs)."""
    output_dir = tmp_path / "default"
    completed = run([sys.executable, "-m", "hf_gaf.train", "--output_dir", str(output_dir)], tmp_path, timeout=1200)
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = final_results(output_dir)
    assert results["gaf/steps"] == 2000 and results["train_noise_rate"] == pytest.approx(0.4, abs=1e-3)
    assert 0.05 < results["gaf/skipped_fraction"] < 0.95, "GAF should filter some steps, not all or none"
    assert results["test_accuracy"] > 0.7
    assert results["train_memorized"] < 0.2


def test_short_run_trains_evaluates_and_reports(tmp_path):
    output_dir = tmp_path / "out"
    completed = run(
        [sys.executable, "-m", "hf_gaf.train", "--max_steps", "5", "--output_dir", str(output_dir), "--logging_steps", "1"],
        tmp_path,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = final_results(output_dir)
    assert 0.0 <= results["test_accuracy"] <= 1.0
    assert 0.0 <= results["train_memorized"] <= 1.0 and results["train_num_corrupted"] > 0
    assert any(key.startswith("gaf/") for key in results)
    assert "Logs for tensorboard in" in completed.stdout
    assert list((output_dir / "runs").rglob("events.out.tfevents.*")), "TensorBoard logs were not written"


def test_baseline_is_plain_averaging(tmp_path):
    output_dir = tmp_path / "baseline"
    completed = run(
        [sys.executable, "-m", "hf_gaf.train", "--baseline", "--max_steps", "3", "--output_dir", str(output_dir),
         "--report_to", "none", "--noise_rate", "0"],
        tmp_path,
        timeout=300,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = final_results(output_dir)
    assert results["gaf/skipped_steps_total"] == 0
    assert results["gaf/accepted_fraction"] == 1.0
    assert "train_memorized" not in results  # nothing was corrupted


def test_resume_passes_over_a_checkpoint_left_half_written(tmp_path):
    common = ["--max_steps", "12", "--save_strategy", "steps", "--save_steps", "4", "--report_to", "none"]
    full = tmp_path / "full"
    done = run([sys.executable, "-m", "hf_gaf.train", *common, "--output_dir", str(full)], tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    cut = tmp_path / "cut"
    done = run([sys.executable, "-m", "hf_gaf.train", *common, "--max_steps", "8", "--output_dir", str(cut)], tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    newest = cut / "checkpoint-8"
    (newest / "trainer_state.json").unlink()  # killed while saving: the state is written last
    optimizer = newest / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:1000])
    resumed = run(
        [sys.executable, "-m", "hf_gaf.train", *common, "--output_dir", str(cut), "--resume_from_checkpoint", "True"],
        tmp_path,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Skipping {newest}: it is incomplete" in resumed.stdout
    expected, got = final_results(full), final_results(cut)
    assert {k: got[k] for k in expected if not k.endswith(("runtime", "per_second"))} == {
        k: expected[k] for k in expected if not k.endswith(("runtime", "per_second"))
    }


def test_resuming_a_run_that_already_finished_evaluates_it_without_training(tmp_path):
    common = ["--max_steps", "8", "--save_strategy", "steps", "--save_steps", "4", "--report_to", "none"]
    output_dir = tmp_path / "run"
    done = run([sys.executable, "-m", "hf_gaf.train", *common, "--output_dir", str(output_dir)], tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    first = final_results(output_dir)
    resumed = run(
        [sys.executable, "-m", "hf_gaf.train", *common, "--output_dir", str(output_dir), "--resume_from_checkpoint", "last"],
        tmp_path,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "checkpoint-8 already reached the last step of this run (global step 8 of 8)" in resumed.stdout
    assert sorted(p.name for p in output_dir.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-8"], "it trained on"
    again = final_results(output_dir)
    assert {k: again[k] for k in first if not k.endswith(("runtime", "per_second"))} == {
        k: first[k] for k in first if not k.endswith(("runtime", "per_second"))
    }


def test_unreachable_hub_gives_an_offline_recipe(tmp_path):
    completed = run(
        [sys.executable, "-m", "hf_gaf.train", "--dataset", "uoft-cs/cifar100", "--output_dir", str(tmp_path / "x")],
        tmp_path,
        timeout=120,
    )
    assert completed.returncode != 0
    message = completed.stderr
    assert "Traceback" not in message
    assert "uoft-cs/cifar100" in message and "HF_HUB_OFFLINE" in message and "local" in message


@pytest.mark.multiprocess
def test_accelerate_launch_on_two_cpu_processes(tmp_path):
    output_dir = tmp_path / "two"
    completed = run(
        ["accelerate", "launch", "--config_file", str(REPO / "examples" / "accelerate" / "cpu.yaml"),
         "--main_process_port", str(free_port()), "-m", "hf_gaf.train",
         "--gradient_accumulation_steps", "1", "--max_steps", "3", "--output_dir", str(output_dir),
         "--report_to", "none", "--logging_steps", "1"],
        tmp_path,
        timeout=400,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = final_results(output_dir)
    assert results["gaf/microgradients_per_step"] == 2


@pytest.mark.multiprocess
def test_processes_the_trainer_does_not_use_are_refused(tmp_path, torchrun):
    completed = torchrun(
        ["-m", "hf_gaf.train", "--use_cpu", "false", "--max_steps", "1", "--output_dir", str(tmp_path / "x"),
         "--report_to", "none"],
        2,
        expect_failure=True,
    )  # fmt: skip
    if completed.returncode == 0:  # transformers 4.x sets up gloo data parallelism even without --use_cpu
        assert final_results(tmp_path / "x")["gaf/microgradients_per_step"] == 4, "a process trained a model alone"
        return
    assert "2 processes were launched, but the Trainer trains on 1" in completed.stderr
    assert "--use_cpu" in completed.stderr
