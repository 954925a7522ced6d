"""benchmarks/cosine_trace.py runs end to end with --quick."""

from __future__ import annotations

import json

from .scripts import assert_png, run_quick


def test_cosine_trace_quick(tmp_path):
    run_quick("cosine_trace.py", "--jobs", "1", "--output_dir", str(tmp_path))
    data = json.loads((tmp_path / "cosine_trace_quick.json").read_text())
    assert_png(tmp_path / "cosine_trace_quick.png")
    (run,) = data["runs"]
    assert run["threshold"] == 2.0 and len(run["distances"]) == run["steps"] == 10
    # M = 2: the first micro-gradient starts the sum, the second is compared with it (except at a
    # one-micro-batch step at an epoch's end, which there is none of in 10 steps).
    for step in run["distances"]:
        assert len(step) == 2 and step[0] is None and 0.0 <= step[1] <= 2.0
    (row,) = data["summary"]
    assert row["distance_min"] <= row["distance_mean"] <= row["distance_max"]
