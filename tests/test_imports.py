"""The library imports nothing from the paper's experiments, nor what only they need."""

from __future__ import annotations

import subprocess
import sys

import pytest

from .testing_utils import REPO

EXPERIMENT_ONLY = ("timm", "evaluate", "sklearn", "matplotlib")
TRANSFORMERS_ITSELF = "from transformers import Trainer, TrainingArguments"


def _experiment_modules_after(statement: str) -> set[str]:
    code = (
        f"import sys\n{statement}\n"
        f"print('\\n'.join(m for m in sys.modules if m.split('.')[0] in {EXPERIMENT_ONLY!r} or m.split('.')[:2] == ['hf_gaf', 'train']))"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return set(done.stdout.split())


@pytest.mark.parametrize("statement", ["import hf_gaf", "from hf_gaf import GAFTrainer, GAFTrainingArguments, GAFMixin"])
def test_the_library_pulls_in_none_of_the_experiments(statement):
    # transformers 4.x imports scikit-learn itself (transformers.data.metrics) when it is installed.
    added = _experiment_modules_after(statement) - _experiment_modules_after(TRANSFORMERS_ITSELF)
    assert not added, f"{statement} imported {sorted(added)[:10]} beyond what {TRANSFORMERS_ITSELF!r} imports"
