"""Running a benchmark script with --quick as a user would, and checking what it writes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
TIMEOUT = 180  # seconds per script


def run_quick(script: str, *arguments: str) -> subprocess.CompletedProcess:
    """`python benchmarks/<script> --quick ARGUMENTS...`; asserts that it succeeds."""
    command = [sys.executable, str(BENCHMARKS / script), "--quick", *arguments]
    result = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT, check=False)
    assert result.returncode == 0, f"{script} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def assert_png(path: Path) -> None:
    assert path.stat().st_size > 10_000
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
