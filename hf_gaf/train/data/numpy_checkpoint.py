"""Load a `torch.save` file of numpy arrays without allowing arbitrary code to run.

Label files such as CIFAR-N's `CIFAR-100_human.pt` are pickles: loading one with
`weights_only=False` lets whoever wrote it run code on your machine. [`load_numpy_checkpoint`]
loads with `weights_only=True` and allowlists, for this one load, only the numpy globals that
rebuild plain numeric arrays, and only those the file actually names. Any other global (a function,
an arbitrary class) means the file is not a plain array file, and it is refused before unpickling.

numpy 2 renamed `numpy.core` to `numpy._core`; files written with numpy 1 (like the CIFAR-N
release) name `numpy.core.multiarray._reconstruct`. Globals are therefore allowlisted under the
name written in the file, mapped to the object that exists in the installed numpy.

`torch.save` writes a zip archive that stores a CRC-32 checksum of every member, but `torch.load`
never checks them: a file damaged by a bad download or disk (one flipped bit is enough) loads
silently with wrong values. The checksums are therefore verified with [`zipfile`] before
anything is unpickled.
"""

from __future__ import annotations

import os
import pickle
import zipfile
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

_RECONSTRUCT = np._core.multiarray._reconstruct if hasattr(np, "_core") else np.core.multiarray._reconstruct

SAFE_NUMPY_GLOBALS: dict[str, Callable[..., Any]] = {
    "numpy.core.multiarray._reconstruct": _RECONSTRUCT,
    "numpy._core.multiarray._reconstruct": _RECONSTRUCT,
    "numpy.ndarray": np.ndarray,
    "numpy.dtype": np.dtype,
}
"""Globals a pickle of numeric numpy arrays may name, by the name written in the file."""

_NUMERIC_DTYPES = (
    np.bool_,
    np.int8,
    np.int16,
    np.int32,
    np.int64,
    np.uint8,
    np.uint16,
    np.uint32,
    np.uint64,
    np.float16,
    np.float32,
    np.float64,
)


class UntrustedPickleError(pickle.UnpicklingError):
    """The file references Python objects other than numeric numpy arrays; it was not loaded."""


class CorruptCheckpointError(ValueError):
    """The file is a `torch.save` archive whose stored checksums do not match its contents: it was damaged."""


def load_numpy_checkpoint(path: str | os.PathLike[str]) -> Any:
    """Load `path`, a `torch.save` file holding (containers of) numeric numpy arrays, safely.

    Returns whatever was saved (for CIFAR-N label files: a `dict[str, np.ndarray]`).

    Every member of the archive is checked against its stored CRC-32 first, so a damaged file is
    refused instead of loading with wrong values.

    Raises:
        CorruptCheckpointError: a member of the archive fails its CRC-32 check, or the archive's
            headers are damaged (a `ValueError`). Nothing from the file is unpickled.
        UntrustedPickleError: the file names a global outside [`SAFE_NUMPY_GLOBALS`]
            (e.g. `os.system` or a custom class). Nothing from the file is executed.
        ValueError: the file is not a `torch.save` checkpoint (not a zip archive, or a truncated one).
    """
    path = os.fspath(path)
    _verify_archive_checksums(path)
    try:
        named = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except (ValueError, RuntimeError) as error:
        raise ValueError(
            f"{path!r} is not a torch.save checkpoint ({error}). Expected a file like CIFAR-N's "
            f"CIFAR-100_human.pt (a torch.save of a dict of numpy arrays)."
        ) from error
    unexpected = sorted(set(named) - SAFE_NUMPY_GLOBALS.keys())
    if unexpected:
        raise UntrustedPickleError(
            f"Refusing to load {path!r}: it references {unexpected}, which a file of plain numpy "
            f"arrays never needs, so loading it could run code. Only {sorted(SAFE_NUMPY_GLOBALS)} "
            f"are allowed. Get the file from its original source (e.g. the CIFAR-N release), or "
            f"re-save its arrays with torch.save({{name: numpy_array, ...}}, path)."
        )
    allowed: list[Callable[..., Any] | tuple[Callable[..., Any], str]] = [
        (SAFE_NUMPY_GLOBALS[name], name) for name in named
    ]
    if "numpy.dtype" in named:
        # Unpickling a dtype builds an instance of its concrete class (numpy.dtypes.Int64DType, ...),
        # which weights_only must also accept although the file never names it.
        allowed += [type(np.dtype(scalar_type)) for scalar_type in _NUMERIC_DTYPES]
    with torch.serialization.safe_globals(allowed):
        try:
            return torch.load(path, weights_only=True, map_location="cpu")
        except pickle.UnpicklingError as error:
            raise UntrustedPickleError(
                f"Refusing to load {path!r}: it holds objects other than numeric numpy arrays "
                f"({_unpickler_detail(error)}). Re-save its arrays with "
                f"torch.save({{name: numpy_array, ...}}, path)."
            ) from error


def _verify_archive_checksums(path: str | os.PathLike[str]) -> None:
    """Check that `path` is a zip archive (as `torch.save` writes) and every member matches its CRC-32.

    `torch.load` reads members without checking their checksums, so this is what catches a file
    damaged after it was written. Every member is read in full once; nothing is unpickled.

    Raises:
        ValueError: `path` is not a zip archive, or is a truncated one: not a `torch.save` checkpoint.
        CorruptCheckpointError: a member fails its CRC-32 check or its header is damaged.
    """
    path = os.fspath(path)
    if not zipfile.is_zipfile(path):
        raise ValueError(
            f"{path!r} is not a torch.save checkpoint (it is not a zip archive, or it is truncated). "
            f"Expected a file like CIFAR-N's CIFAR-100_human.pt (a torch.save of a dict of numpy "
            f"arrays); if it is one, it was cut short: download or copy it again."
        )
    member = None
    try:
        with zipfile.ZipFile(path) as archive:
            for entry in archive.infolist():
                member = entry.filename
                with archive.open(entry) as stream:
                    while stream.read(1 << 20):
                        pass
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as error:
        where = f"member {member!r} of the archive" if member is not None else "the archive's directory"
        raise CorruptCheckpointError(
            f"{path!r} is corrupt: {where} does not match its stored checksum or header ({error}). "
            f"The file was damaged after it was written (e.g. an interrupted download or a faulty "
            f"copy), so its values cannot be trusted; download it again from its source (for "
            f"CIFAR-100N labels: the CIFAR-N release, https://github.com/UCSC-REAL/cifar-10-100n)."
        ) from error


def _unpickler_detail(error: pickle.UnpicklingError) -> str:
    """The reason torch's weights-only unpickler gave, without its advice to disable the check."""
    message = str(error)
    _, found, detail = message.partition("WeightsUnpickler error:")
    return detail.strip().split("\n\n")[0] if found else "unsupported content"
