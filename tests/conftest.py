"""Fixtures shared by every test: offline Hub, launching torchrun workers, the project's shared data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hf_gaf.testing import torchrun as _torchrun

from .testing_utils import REPO, SHARED_DATA

# Nothing in the tests may reach the Hugging Face Hub.
for _variable in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_variable, "1")


@pytest.fixture(scope="session")
def torchrun():
    """`torchrun(target, nproc, timeout=...)`: launch from the repository root; fail the test with the output.

    `target` is `["-m", "tests.distributed.<worker>", args...]` or a script and its arguments.
    Pass `expect_failure=True` to get the completed process of a launch meant to fail.
    """

    def launch(target, nproc: int, *, timeout: float = 300, env: dict | None = None, expect_failure: bool = False):
        done = _torchrun(target, nproc, timeout=timeout, env=env, cwd=REPO)
        if done.returncode and not expect_failure:
            pytest.fail(f"torchrun failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}")
        return done

    return launch


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """`../shared/data` beside the repository (the real CIFAR-100N labels, Fashion-MNIST); skip without it."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"needs the project's shared data at {SHARED_DATA}, which is absent on this machine")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Every test starts from a fresh accelerate state and environment.

    accelerate keeps one process-wide state, and transformers 4.56 exports a Trainer's mixed
    precision as `ACCELERATE_MIXED_PRECISION`: a Trainer built with `bf16=True` would leave it to
    every later Trainer of the process.
    """
    environment = dict(os.environ)
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    os.environ.clear()
    os.environ.update(environment)
