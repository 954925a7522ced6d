"""Running GAF on several local processes, for tests and benchmarks (like `accelerate.test_utils`).

Everything stays on 127.0.0.1, and every launch is bounded in time.
"""

from __future__ import annotations

import os
import platform
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = ["free_port", "machine", "torchrun"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for torchrun's rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(
    target: Sequence[str],
    nproc: int,
    *,
    timeout: float,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike | None = None,
    capture: bool = True,
) -> subprocess.CompletedProcess:
    """Run `torchrun --nproc_per_node nproc TARGET...` on 127.0.0.1 with one thread per process.

    `target` is what follows torchrun's options: a script and its arguments, or
    `["-m", "module", ...]`. Raises `subprocess.TimeoutExpired` after `timeout` seconds; the
    caller checks `returncode`.
    """
    command = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
        f"--master_port={free_port()}", *target,
    ]  # fmt: skip
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    return subprocess.run(
        command, cwd=cwd, env=environment, capture_output=capture, text=True, timeout=timeout, check=False
    )


def machine(*packages: str) -> dict:
    """What a benchmark ran on: CPU, cores, load, Python, and the versions of torch and `packages`."""
    from importlib.metadata import version

    cpu = platform.processor() or platform.machine()
    try:
        text = Path("/proc/cpuinfo").read_text()
        cpu = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), cpu)
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": version("torch"),
    }
    info.update({name: version(name) for name in packages})
    return info
