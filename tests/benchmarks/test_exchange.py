"""benchmarks/exchange.py runs end to end with --quick."""

from __future__ import annotations

import json

from .scripts import run_quick


def test_exchange_quick(tmp_path):
    output = tmp_path / "exchange_quick.json"
    result = run_quick("exchange.py", "--output", str(output))
    data = json.loads(output.read_text())
    rows = data["results"]
    assert {(r["world_size"], r["P"], r["K"]) for r in rows} == {(2, p, k) for p in (100_000, 1_000_000) for k in (1, 2)}
    for row in rows:
        # The benchmark's gradients agree: the whole-model arms accept all of them, and so does every
        # per-layer unit. Per tensor (counted over units) the bias units, scaled down to a few
        # columns, agree only by chance; every unit counts its start at least.
        assert row["units"] == {"tensor": 62, "group": 6}
        m = row["M"]
        assert {name: row["accepted"][name] for name in ("sharded", "all_gather", "checked")} == dict.fromkeys(
            ("sharded", "all_gather", "checked"), m
        )
        assert row["accepted"]["group"] == 6 * m
        assert 62 < row["accepted"]["tensor"] <= 62 * m
        assert set(row["ratio_to_sharded"]) == {"checked", "tensor", "group"}
        assert len(row["times_s"]["sharded"]) == data["settings"]["reps"] == 3
        # Memory is counted from the exchange's own buffers: sharded keeps the other rank's K rows of
        # its half, all_gather the whole [N K, P] block.
        assert row["extra_memory_in_P"]["sharded"] <= row["K"] * 0.51
        assert row["extra_memory_in_P"]["all_gather"] == 2 * row["K"]
        if row["K"] == 1:  # the [K, P] buffer is the [P] one
            assert row["ratio_to_all_reduce_of_same_buffer"] == row["ratio_to_all_reduce"]
        else:
            assert len(row["times_s"]["all_reduce_KP"]) == 3
    assert "sh/ar" in result.stdout and "tensor/sh" in result.stdout
