"""Running a benchmark script with --quick as a user would, and checking what it writes."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
TIMEOUT = 180  # seconds per script


def run_quick(
    script: str, *arguments: str, timeout: float = TIMEOUT, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """`python benchmarks/<script> --quick ARGUMENTS...` (`env` added to the environment); asserts that it succeeds."""
    command = [sys.executable, str(BENCHMARKS / script), "--quick", *arguments]
    environment = None if env is None else {**os.environ, **env}
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=environment, check=False)
    assert result.returncode == 0, f"{script} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def assert_png(path: Path) -> None:
    assert path.stat().st_size > 10_000
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@contextmanager
def benchmark_module(name: str) -> Iterator[ModuleType]:
    """`benchmarks/<name>.py` imported as module `name` (registered while in use: dataclasses look it up)."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(name, None)
