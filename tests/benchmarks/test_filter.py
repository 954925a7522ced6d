"""benchmarks/filter.py runs end to end with --quick, without overwriting the published results."""

from __future__ import annotations

import json

from .scripts import run_quick


def test_filter_quick(tmp_path):
    output = tmp_path / "filter_quick.json"
    result = run_quick("filter.py", "--output", str(output))
    rows = json.loads(output.read_text())["results"]
    assert [(r["P"], r["M"]) for r in rows] == [(100_000, 2), (100_000, 4)]
    for row in rows:
        assert row["accepted"] == dict.fromkeys(("block_out", "list_out", "block"), row["M"])  # all agree
        assert all(len(times) == 3 for times in row["times_s"].values())
        assert set(row["ratio_to_block_out"]) == {"list_out", "block", "mean"}
    assert "list/b_o" in result.stdout
