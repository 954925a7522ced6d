"""Smoke test: `benchmarks/fashion_mnist.py --quick` runs end to end on the real Fashion-MNIST copy.

It runs the script in a subprocess (as a user would) into a temporary folder and checks what it
writes. The accuracies of 40-step runs on 200 images mean nothing; what is checked is the
contract of the benchmark: which runs it makes, that every arm processes the same samples, that
the published package and `GAFTrainer` make the same decisions on the same micro-batches, the
early-stopping and curve records, the JSON fields and the plots.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .scripts import assert_png, run_quick

TIMEOUT = 300  # seconds; the quick run takes about a minute on 2 idle cores
QUICK_RUNS = {
    ("symmetric:0", "averaging"),
    ("symmetric:0.4", "averaging"),
    ("symmetric:0.4", "gaf_0.97"),
    ("symmetric:0.4", "published_0.97"),
    ("symmetric:0.4", "averaging_batch_x4"),
    ("symmetric:0.4", "gaf_0.97_best_start_m4"),
    ("class_dependent:0.4", "averaging"),
}
SAMPLES = 40 * 2 * 10  # --quick: 40 steps of 2 micro-batches of 10 images
TRAIN_ROWS = 200


@pytest.fixture(scope="module")
def quick(shared_data, tmp_path_factory) -> tuple[dict, str, Path]:
    out = tmp_path_factory.mktemp("fashion_mnist")
    dataset = str(shared_data / "fashion_mnist")
    result = run_quick("fashion_mnist.py", "--dataset", dataset, "--output_dir", str(out), timeout=TIMEOUT)
    return json.loads((out / "fashion_mnist_quick.json").read_text()), result.stdout, out


def test_writes_the_quick_files_and_never_the_published_ones(quick):
    _, stdout, out = quick

    plots = ["fashion_mnist_quick.png", "fashion_mnist_quick_training.png", "fashion_mnist_quick_samples.png"]
    assert {p.name for p in out.iterdir()} == {"fashion_mnist_quick.json", *plots}
    for name in plots:
        assert_png(out / name)
    assert "test acc" in stdout and "memorised" in stdout and "noisy-train acc" in stdout  # the printed table


def test_runs_every_quick_arm_on_the_same_samples(quick):
    data, _, _ = quick
    runs = data["runs"]

    assert {(r["noise"], r["arm"]) for r in runs} == QUICK_RUNS
    arms = data["arms"]
    for run in runs:
        arm = arms[run["arm"]]
        assert run["samples_processed"] == SAMPLES
        assert run["steps"] == SAMPLES // (10 * arm["batch_multiplier"] * arm["microbatches"])
        assert len(run["skip_trace"]) == run["steps"]
        assert 0.0 <= run["test_accuracy"] <= 1.0 and 0.0 <= run["noisy_train_accuracy"] <= 1.0
        assert run["seconds"] >= run["training_seconds"] > 0


def test_memorisation_is_measured_on_exactly_the_corrupted_rows(quick):
    data, _, _ = quick

    for run in data["runs"]:
        if run["noise_rate"] == 0:
            assert run["num_corrupted"] == 0 and run["memorized"] is None  # NaN is written as null
            assert run["noisy_train_accuracy"] == run["uncorrupted_train_accuracy"]
        else:
            assert run["num_corrupted"] == round(0.4 * TRAIN_ROWS)
            assert 0.0 <= run["memorized"] <= 1.0
            expected = 0.4 * run["memorized"] + 0.6 * run["uncorrupted_train_accuracy"]
            assert run["noisy_train_accuracy"] == pytest.approx(expected)


def test_published_package_decides_as_gaf_trainer_on_the_same_microbatches(quick):
    data, _, _ = quick
    by_arm = {r["arm"]: r for r in data["runs"] if r["noise"] == "symmetric:0.4"}
    ours, published = by_arm["gaf_0.97"], by_arm["published_0.97"]

    # Two micro-batches per step: the package's rule is the paper's, so on the same micro-batches, model,
    # optimizer and clipping it must skip exactly the same steps (the trace of an untraced run, here, also
    # shows that the periodic evaluations of the traced GAF run do not change its training).
    assert "0" in ours["skip_trace"] and "1" in ours["skip_trace"]
    assert published["skip_trace"] == ours["skip_trace"]
    assert published["test_accuracy"] == pytest.approx(ours["test_accuracy"], abs=0.01)
    assert by_arm["averaging"]["skip_trace"] == "0" * by_arm["averaging"]["steps"]


def test_averaging_is_scored_at_its_best_validation_step_too(quick):
    data, _, _ = quick

    for run in (r for r in data["runs"] if r["arm"] == "averaging"):
        stopped, curve = run["early_stopped"], run["curve"]
        best = max(curve, key=lambda p: p["val_accuracy"])  # the first of equal maxima, like the oracle
        assert stopped["step"] == best["step"] and stopped["val_accuracy"] == best["val_accuracy"]
        assert 0.0 <= stopped["test_accuracy"] <= 1.0
    rows = {(r["noise"], r["arm"]): r for r in data["summary"]}
    stopped_rows = {noise for noise, arm in rows if arm == "averaging_early_stopped"}
    assert stopped_rows == {"symmetric:0", "symmetric:0.4", "class_dependent:0.4"}
    assert all(r["gain_over_averaging_mean"] == 0.0 for (_, arm), r in rows.items() if arm == "averaging")


def test_traced_runs_are_evaluated_at_the_same_samples_whatever_the_batch(quick):
    data, _, _ = quick
    traced = {"averaging", "gaf_0.97", "averaging_batch_x4"}

    for run in data["runs"]:
        if run["arm"] in traced and run["noise"] == "symmetric:0.4" or run["arm"] == "averaging":
            assert [p["samples"] for p in run["curve"]] == [0, SAMPLES // 2, SAMPLES]
            for point in run["curve"]:
                assert {"val_accuracy", "test_accuracy", "train_accuracy"} <= set(point)
        else:
            assert run["curve"] == []
