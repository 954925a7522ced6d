"""Smoke tests: the benchmark scripts run end to end with --quick.

They run the real scripts in a subprocess (as a user would), into a temporary folder, and check
the JSON and PNG they write. The numbers of a 10-step run mean nothing; the published figures come
from the full runs (docs/results.md).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
TIMEOUT = 120  # seconds per script; each takes ~10-20 s on an idle 2-core machine


def _run(script: str, out_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(BENCHMARKS / script), "--quick", "--jobs", "1", "--output_dir", str(out_dir), *extra]
    result = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT, check=False)
    assert result.returncode == 0, f"{script} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def _png(path: Path) -> None:
    assert path.stat().st_size > 10_000
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_noise_sweep_quick(tmp_path):
    result = _run("noise_sweep.py", tmp_path)
    data = json.loads((tmp_path / "noise_sweep_quick.json").read_text())
    _png(tmp_path / "noise_sweep_quick.png")
    assert "noise_sweep.json" not in {p.name for p in tmp_path.iterdir()}  # --quick never overwrites the real results

    runs = data["runs"]
    assert {(r["noise_rate"], r["threshold"]) for r in runs} == {(0.0, 0.97), (0.0, 2.0), (0.4, 0.97), (0.4, 2.0)}
    for run in runs:
        assert run["steps"] == data["config"]["max_steps"] == 10  # same optimizer steps for every arm
        assert 0.0 <= run["test_accuracy"] <= 1.0
        assert 0.0 <= run["skipped_fraction"] <= 1.0
    noisy = [r for r in runs if r["noise_rate"] == 0.4]
    clean = [r for r in runs if r["noise_rate"] == 0.0]
    # 40% of the 1,437 training rows are corrupted; memorisation is measured on exactly those rows.
    assert all(r["num_corrupted"] == round(0.4 * 1437) and 0.0 <= r["memorized"] <= 1.0 for r in noisy)
    assert all(r["num_corrupted"] == 0 and r["memorized"] is None for r in clean)  # NaN is written as null
    averaging = {r["noise_rate"]: r for r in data["summary"] if r["threshold"] == 2.0}
    assert all(row["gain_over_averaging_mean"] == 0.0 for row in averaging.values())
    assert "test acc" in result.stdout and "skipped" in result.stdout  # the printed table


def test_cosine_trace_quick(tmp_path):
    _run("cosine_trace.py", tmp_path)
    data = json.loads((tmp_path / "cosine_trace_quick.json").read_text())
    _png(tmp_path / "cosine_trace_quick.png")
    (run,) = data["runs"]
    assert run["threshold"] == 2.0 and len(run["distances"]) == run["steps"] == 10
    # M = 2: the first micro-gradient starts the sum, the second is compared with it (except at a
    # one-micro-batch step at an epoch's end, which there is none of in 10 steps).
    for step in run["distances"]:
        assert len(step) == 2 and step[0] is None and 0.0 <= step[1] <= 2.0
    (row,) = data["summary"]
    assert row["distance_min"] <= row["distance_mean"] <= row["distance_max"]


def test_exchange_quick(tmp_path):
    output = tmp_path / "exchange_quick.json"
    command = [sys.executable, str(BENCHMARKS / "exchange.py"), "--quick", "--output", str(output)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT, check=False)
    assert result.returncode == 0, f"exchange.py failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    data = json.loads(output.read_text())
    rows = data["results"]
    assert {(r["world_size"], r["P"], r["K"]) for r in rows} == {(2, p, k) for p in (100_000, 1_000_000) for k in (1, 2)}
    for row in rows:
        assert row["accepted"] == {"sharded": row["M"], "all_gather": row["M"]}  # the benchmark's gradients agree
        assert len(row["times_s"]["sharded"]) == data["settings"]["reps"] == 3
        # Memory is counted from the exchange's own buffers: sharded keeps the other rank's K rows of
        # its half, all_gather the whole [N K, P] block.
        assert row["extra_memory_in_P"]["sharded"] <= row["K"] * 0.51
        assert row["extra_memory_in_P"]["all_gather"] == 2 * row["K"]
        if row["K"] == 1:  # the [K, P] buffer is the [P] one
            assert row["ratio_to_all_reduce_of_same_buffer"] == row["ratio_to_all_reduce"]
        else:
            assert len(row["times_s"]["all_reduce_KP"]) == 3
    assert "sh/ar" in result.stdout
