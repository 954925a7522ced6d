"""benchmarks/noise_sweep.py runs end to end with --quick, in a subprocess, into a temporary folder.

The numbers of a 10-step run mean nothing; the published figures come from the full run
(docs/results.md).
"""

from __future__ import annotations

import json

from .scripts import assert_png, run_quick

def test_noise_sweep_quick(tmp_path):
    result = run_quick("noise_sweep.py", "--jobs", "1", "--output_dir", str(tmp_path))
    data = json.loads((tmp_path / "noise_sweep_quick.json").read_text())
    assert_png(tmp_path / "noise_sweep_quick.png")
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
