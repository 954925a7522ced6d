"""The bare library: `pip install hf-gaf` pulls in none of the kit's packages, and GAFTrainer trains without them.

pyproject.toml's base dependencies are resolved against the installed distributions into their
whole closure; an environment holding exactly that closure (a fresh virtual environment whose only
site directory links to those distributions) then runs tests/bare_library_step.py. CI also installs
the bare library from scratch in a fresh environment and runs the same script (`.ci/run`).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
import venv
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

from .testing_utils import REPO

KIT_DISTRIBUTIONS = {"datasets", "timm", "torchvision", "evaluate", "pillow", "scikit-learn", "matplotlib", "tensorboard", "trl"}


def _name(requirement: str) -> str:
    return re.sub(r"[-_.]+", "-", Requirement(requirement).name).lower()


def base_dependencies() -> list[str]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]


def closure(requirements: list[str]) -> set[str]:
    """The installed distributions `requirements` need, transitively, extras left out."""
    seen: set[str] = set()
    todo = list(requirements)
    while todo:
        requirement = Requirement(todo.pop())
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue
        name = _name(str(requirement))
        if name in seen:
            continue
        seen.add(name)
        todo += metadata.requires(name) or []
    return seen


def test_the_library_declares_none_of_the_kits_packages():
    needed = closure(base_dependencies())
    assert {"torch", "transformers", "accelerate", "huggingface-hub", "numpy"} <= needed
    assert not needed & KIT_DISTRIBUTIONS, f"pip install hf-gaf would install {sorted(needed & KIT_DISTRIBUTIONS)}"


def test_gaftrainer_trains_in_an_environment_of_only_the_librarys_dependencies(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    for name in closure(base_dependencies()):
        distribution = metadata.distribution(name)
        root = Path(distribution.locate_file(""))
        tops = {Path(str(f)).parts[0] for f in distribution.files or [] if not str(f).startswith("..")}
        for top in tops:
            if not (site / top).exists() and (root / top).exists():
                (site / top).symlink_to(root / top)
    environment = tmp_path / "env"
    venv.create(environment, with_pip=False)
    packages = next((environment / "lib").glob("python3*/site-packages"))
    (packages / "closure.pth").write_text(f"{site}\n{REPO}\n")
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
    done = subprocess.run(
        [str(environment / "bin" / "python"), str(REPO / "tests" / "bare_library_step.py")],
        capture_output=True, text=True, timeout=300, env={**env, "OMP_NUM_THREADS": "1"}, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, f"{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    assert "bare library: 3 GAF steps trained" in done.stdout
