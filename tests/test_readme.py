"""The README's custom-loop example runs as written, under torchrun, with identical models on every rank."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path



def readme_example() -> str:
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), flags=re.DOTALL)
    loops = [block for block in blocks if "gaf_all_reduce" in block]
    assert len(loops) == 1, "the README should hold exactly one gaf_all_reduce example"
    return loops[0]


def test_custom_loop_example_keeps_ranks_identical(tmp_path):
    script = tmp_path / "example.py"
    example = readme_example().replace("dist.destroy_process_group()", "")
    script.write_text(
        example
        + "\nimport hashlib\n"
        + "digest = hashlib.sha256(b''.join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()\n"
        + f"open(r'{tmp_path}' + f'/rank{{dist.get_rank()}}.txt', 'w').write(digest)\n"
        + "dist.destroy_process_group()\n"
    )
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(port), str(script)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert completed.returncode == 0, completed.stderr[-3000:]
    digests = {(tmp_path / f"rank{rank}.txt").read_text() for rank in range(2)}
    assert len(digests) == 1, "ranks ended with different parameters"
