"""benchmarks/common.py: the JSON every benchmark writes is standard JSON."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from .scripts import benchmark_module


@pytest.fixture(scope="module")
def common():
    with benchmark_module("common") as module:
        yield module


def test_json_safe_makes_standard_json(common):
    value = {"inf": math.inf, "nan": math.nan, "np": np.float32(1.5), "tensor": torch.tensor(2), "tuple": (1, True), 3: None}
    assert json.loads(json.dumps(common.json_safe(value), allow_nan=False)) == {
        "inf": None, "nan": None, "np": 1.5, "tensor": 2, "tuple": [1, True], "3": None,
    }  # fmt: skip
    assert common.json_safe(object).startswith("<class")


def test_write_json_writes_null_for_non_finite(common, tmp_path):
    path = common.write_json(tmp_path / "sub" / "result.json", {"ratio": math.inf, "values": [1.0, math.nan]})
    assert json.loads(path.read_text()) == {"ratio": None, "values": [1.0, None]}
