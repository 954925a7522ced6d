"""The README's custom-loop examples run as written, under torchrun, with identical models on every rank; so does
examples/fsdp2_custom_loop.py."""

from __future__ import annotations

import re

import pytest

from .testing_utils import REPO, needs_fsdp2


def readme_example(marker: str = "gaf_all_reduce") -> str:
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), flags=re.DOTALL)
    loops = [block for block in blocks if marker in block and "for step in" in block]
    assert len(loops) == 1, f"the README should hold exactly one {marker} example"
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


@pytest.mark.multiprocess
@needs_fsdp2
def test_fsdp2_custom_loop_example_ends_with_the_same_gathered_model_on_every_rank(tmp_path, torchrun):
    script = tmp_path / "example.py"
    example = readme_example("FSDPExchange").replace("dist.destroy_process_group()", "")
    script.write_text(
        example
        + "\nimport hashlib\n"
        + "full = [p.full_tensor().detach().numpy().tobytes() for p in model.parameters()]\n"
        + "digest = hashlib.sha256(b''.join(full)).hexdigest()\n"
        + f"open(r'{tmp_path}' + f'/rank{{dist.get_rank()}}.txt', 'w').write(digest + ' ' + str(result.num_microgradients))\n"
        + "dist.destroy_process_group()\n"
    )
    torchrun([str(script)], 2, timeout=180)
    reports = {(tmp_path / f"rank{rank}.txt").read_text() for rank in range(2)}
    assert len(reports) == 1, "ranks ended with different gathered parameters"
    assert reports.pop().endswith(" 4"), "a step should filter 2 processes x 2 micro-gradients"


@pytest.mark.multiprocess
@needs_fsdp2
def test_the_fsdp2_example_script_trains_and_prints_its_gaf_statistics(torchrun):
    done = torchrun(["examples/fsdp2_custom_loop.py", "--steps", "40", "--log_every", "20"], 2, timeout=180)
    lines = [line for line in done.stdout.splitlines() if line.startswith("step ")]
    assert [line.split(":")[0] for line in lines] == ["step 20", "step 40"], done.stdout
    fractions = [float(line.split("gaf/accepted_fraction ")[1].split(",")[0]) for line in lines]
    assert all(0 < f < 1 for f in fractions), "with noisy micro-batches GAF should reject some, and accept some"
