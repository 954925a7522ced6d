"""The README's custom-loop example runs as written, under torchrun, with identical models on every rank."""

from __future__ import annotations

import re

import pytest

from .testing_utils import REPO


def readme_example() -> str:
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), flags=re.DOTALL)
    loops = [block for block in blocks if "gaf_all_reduce" in block]
    assert len(loops) == 1, "the README should hold exactly one gaf_all_reduce example"
    return loops[0]


@pytest.mark.multiprocess
def test_custom_loop_example_keeps_ranks_identical(tmp_path, torchrun):
    script = tmp_path / "example.py"
    example = readme_example().replace("dist.destroy_process_group()", "")
    script.write_text(
        example
        + "\nimport hashlib\n"
        + "digest = hashlib.sha256(b''.join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()\n"
        + f"open(r'{tmp_path}' + f'/rank{{dist.get_rank()}}.txt', 'w').write(digest)\n"
        + "dist.destroy_process_group()\n"
    )
    torchrun([str(script)], 2, timeout=180)
    digests = {(tmp_path / f"rank{rank}.txt").read_text() for rank in range(2)}
    assert len(digests) == 1, "ranks ended with different parameters"
