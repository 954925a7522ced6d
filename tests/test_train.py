"""`python -m hf_gaf.train`: the entry point, run as a user would (subprocesses, offline)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from hf_gaf.train import parse_arguments

REPO = Path(__file__).resolve().parents[1]
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def run(command: list[str], tmp_path: Path, timeout: float, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, **OFFLINE, "OMP_NUM_THREADS": "1", **env}
    return subprocess.run(
        command, cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=timeout, check=False
    )


def final_results(output_dir: Path) -> dict:
    return json.loads((output_dir / "final_results.json").read_text())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_defaults_are_the_documented_digits_run():
    data_args, model_args, run_args, training_args = parse_arguments([])
    assert data_args.dataset == "digits" and data_args.noise_rate == 0.4
    assert training_args.gaf_threshold == 0.97
    assert training_args.class_balanced_batches
    assert training_args.per_device_train_batch_size == 10 and training_args.gradient_accumulation_steps == 2
    assert training_args.optim == "sgd" and training_args.learning_rate == 0.05
    assert not run_args.baseline
    assert data_args.augment is None and model_args.num_channels is None  # resolved per dataset


def test_command_line_and_json_file_parse_alike(tmp_path):
    flags = ["--gaf_threshold", "1.0", "--gaf_rule", "best_start", "--noise_rate", "0.2", "--model_name", "resnet34"]
    from_flags = parse_arguments(flags)
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"gaf_threshold": 1.0, "gaf_rule": "best_start", "noise_rate": 0.2,
                                  "model_name": "resnet34", "output_dir": from_flags[3].output_dir}))
    from_file = parse_arguments([str(config)])
    assert from_file[0] == from_flags[0] and from_file[1] == from_flags[1]
    assert (from_file[3].gaf_threshold, from_file[3].gaf_rule) == (1.0, "best_start")


def test_bad_threshold_fails_before_training():
    with pytest.raises(ValueError, match=r"threshold .*\[0, 2\]"):
        parse_arguments(["--gaf_threshold", "3"])


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
        [sys.executable, "-m", "hf_gaf.train", "--max_steps", "5", "--output_dir", str(output_dir),
         "--logging_steps", "1"],
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
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = final_results(output_dir)
    assert results["gaf/skipped_steps_total"] == 0
    assert results["gaf/accepted_fraction"] == 1.0
    assert "train_memorized" not in results  # nothing was corrupted


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


def test_accelerate_launch_on_two_cpu_processes(tmp_path):
    output_dir = tmp_path / "two"
    completed = run(
        ["accelerate", "launch", "--config_file", str(REPO / "examples" / "accelerate" / "cpu.yaml"),
         "--main_process_port", str(free_port()), "-m", "hf_gaf.train",
         "--gradient_accumulation_steps", "1", "--max_steps", "3", "--output_dir", str(output_dir),
         "--report_to", "none", "--logging_steps", "1"],
        tmp_path,
        timeout=400,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = final_results(output_dir)
    assert results["gaf/microgradients_per_step"] == 2


def test_processes_the_trainer_does_not_use_are_refused(tmp_path):
    completed = run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(free_port()), "-m", "hf_gaf.train", "--use_cpu", "false", "--max_steps", "1",
         "--output_dir", str(tmp_path / "x"), "--report_to", "none"],
        tmp_path,
        timeout=300,
    )
    assert completed.returncode != 0
    assert "2 processes were launched, but the Trainer trains on 1" in completed.stderr
    assert "--use_cpu" in completed.stderr
