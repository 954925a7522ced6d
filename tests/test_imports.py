"""The library imports nothing from the paper's experiments, nor what only they need."""

from __future__ import annotations

import subprocess
import sys

import pytest

from .testing_utils import REPO

EXPERIMENT_ONLY = ("timm", "evaluate", "sklearn", "matplotlib")


@pytest.mark.parametrize("statement", ["import hf_gaf", "from hf_gaf import GAFTrainer, GAFTrainingArguments, GAFMixin"])
def test_the_library_pulls_in_none_of_the_experiments(statement):
    code = (
        f"import sys\n{statement}\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {EXPERIMENT_ONLY!r} or m.split('.')[:2] == ['hf_gaf', 'train']))"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]", f"{statement} imported {done.stdout.strip()}"
