"""Find the newest checkpoint a run can resume from, passing over ones a killed job left half-written.

The Trainer writes a checkpoint's files one after the other and `trainer_state.json` last, so
a job killed while saving leaves a `checkpoint-N` folder that `resume_from_checkpoint=True`
picks (it is the newest) and then fails on. A checkpoint is complete here when its
`trainer_state.json` parses and every weights, optimizer, scheduler and RNG file in it is whole:
torch files are zip archives whose central directory (written last) is readable, and
safetensors files hold every byte their header announces.
"""

from __future__ import annotations

import json
import os
import re
import struct
import zipfile
from pathlib import Path

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

__all__ = ["is_complete_checkpoint", "last_complete_checkpoint"]

_CHECKPOINT = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


def last_complete_checkpoint(output_dir: str | os.PathLike) -> tuple[Path | None, list[Path]]:
    """The newest complete `checkpoint-N` folder of `output_dir` (None if there is none) and the incomplete newer ones."""
    folder = Path(output_dir)
    candidates = []
    if folder.is_dir():
        for child in folder.iterdir():
            match = _CHECKPOINT.match(child.name)
            if match and child.is_dir():
                candidates.append((int(match.group(1)), child))
    skipped = []
    for _, candidate in sorted(candidates, reverse=True):
        if is_complete_checkpoint(candidate):
            return candidate, skipped
        skipped.append(candidate)
    return None, skipped


def is_complete_checkpoint(folder: str | os.PathLike) -> bool:
    """Whether every file the Trainer writes into a checkpoint is present and whole."""
    folder = Path(folder)
    try:
        state = json.loads((folder / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(state, dict) or "global_step" not in state:
        return False
    for path in folder.iterdir():
        if path.suffix in (".pt", ".pth", ".bin") and not _whole_zip(path):
            return False
        if path.suffix == ".safetensors" and not _whole_safetensors(path):
            return False
    return True


def _whole_zip(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as archive:
            return bool(archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def _whole_safetensors(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            (header_size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_size))
    except (OSError, ValueError, struct.error):
        return False
    ends = [info["data_offsets"][1] for name, info in header.items() if name != "__metadata__"]
    return path.stat().st_size >= 8 + header_size + max(ends, default=0)
