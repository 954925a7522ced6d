"""benchmarks/trainer_overhead.py runs end to end with --quick, without overwriting the published results."""

from __future__ import annotations

import json

from .scripts import BENCHMARKS, run_quick


def test_trainer_overhead_quick(tmp_path):
    output = tmp_path / "trainer_overhead_quick.json"
    published = (BENCHMARKS / "results" / "trainer_overhead.json").read_bytes()
    result = run_quick("trainer_overhead.py", "--setups", "mlp,resnet18-tensor", "--output", str(output))
    rows = {row["setup"]: row for row in json.loads(output.read_text())["results"]}
    assert set(rows) == {"mlp", "resnet18-tensor"}
    assert rows["resnet18-tensor"]["gaf_options"] == {"gaf_granularity": "tensor"}
    for row in rows.values():
        assert row["steps_measured_each"] == len(row["plain_step_s"]) > 0 and row["ratio"] > 0
    assert "GAF/Trainer" in result.stdout
    assert (BENCHMARKS / "results" / "trainer_overhead.json").read_bytes() == published
