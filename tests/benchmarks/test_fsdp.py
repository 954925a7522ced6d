"""benchmarks/fsdp.py runs end to end with --quick, on the arms that differ most in what they hold."""

from __future__ import annotations

import json

from ..testing_utils import needs_fsdp2
from .scripts import run_quick


@needs_fsdp2
def test_fsdp_quick(tmp_path):
    result = run_quick(
        "fsdp.py", "--output_dir", str(tmp_path), "--arms", "fsdp2", "fsdp2_gaf_per_unit", "ddp_gaf",
        "--accumulation", "1", timeout=300,
    )  # fmt: skip
    data = json.loads((tmp_path / "fsdp_quick.json").read_text())
    rows = {row["arm"]: row for row in data["rows"]}
    assert set(rows) == {"fsdp2", "fsdp2_gaf_per_unit", "ddp_gaf"} and data["world_size"] == 2
    assert rows["fsdp2"]["vs_fsdp2"] == 1.0 and rows["fsdp2_gaf_per_unit"]["overlap"]
    assert all(row["step_s"] > 0 and row["peak_resident_bytes"] > 0 for row in rows.values())
    # Counted exactly: every rank holds its halves under FSDP2, the whole model and the [K+1, P] buffer under DDP.
    p = rows["fsdp2"]["parameters"]
    assert rows["ddp_gaf"]["held_bytes"] > rows["fsdp2_gaf_per_unit"]["held_bytes"] > rows["fsdp2"]["held_bytes"]
    assert rows["ddp_gaf"]["held_bytes"] >= 4 * p * 4  # parameters, AdamW's two moments, the buffer's rows
    assert "| K | arm |" in result.stdout
