"""Reaching the Hugging Face Hub: file references and what to do when the Hub is out of reach.

Everything in `hf_gaf.train.data` that may touch the network goes through this module, so a missing
connection always ends in the same :class:`HubUnreachableError`, whose message says how to run
offline instead of showing a retry log and a cache miss.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import huggingface_hub
from huggingface_hub.errors import HfUriError, LocalEntryNotFoundError, OfflineModeIsEnabled

LOCAL_ALTERNATIVES = (
    "pass local paths instead of Hub references: a local folder in the Hub format for a dataset "
    "(e.g. made on a connected machine with `hf download <repo_id> --repo-type dataset "
    "--local-dir <folder>`) and a local file for a label file"
)


class HubUnreachableError(ConnectionError):
    """The Hugging Face Hub could not be reached (no connection, or offline mode without a cached copy)."""


@contextlib.contextmanager
def hub_errors_explained(resource: str) -> Iterator[None]:
    """Turn connection failures raised inside the block into a :class:`HubUnreachableError`.

    `resource` names what was being fetched (e.g. ``"dataset 'uoft-cs/cifar100'"``); the message
    adds the cause and how to run offline. Other errors (a missing repository, a typo in a
    file name) pass through unchanged: they are not about the network.
    """
    try:
        yield
    except (ConnectionError, TimeoutError, LocalEntryNotFoundError) as error:
        if isinstance(error, HubUnreachableError):
            raise
        if _is_offline_mode(error):
            message = (
                f"Could not get {resource}: offline mode is enabled (HF_HUB_OFFLINE=1) and it is "
                f"not in the Hugging Face cache. To run offline, {LOCAL_ALTERNATIVES}; or fetch it "
                f"once with network access so the cache has it."
            )
        else:
            message = (
                f"Could not reach the Hugging Face Hub to get {resource} ({type(error).__name__}: "
                f"{error}). To run without network, {LOCAL_ALTERNATIVES}; or, if it is already in "
                f"the Hugging Face cache, set HF_HUB_OFFLINE=1 to use the cache without contacting "
                f"the Hub."
            )
        raise HubUnreachableError(message) from error


def _is_offline_mode(error: BaseException) -> bool:
    chain: BaseException | None = error
    while chain is not None:
        if isinstance(chain, OfflineModeIsEnabled) or "OfflineModeIsEnabled" in str(chain):
            return True
        chain = chain.__cause__ or chain.__context__
    return False


def is_hub_file_reference(reference: str | os.PathLike[str]) -> bool:
    """Whether `reference` names a file on the Hub rather than a local path.

    Hub references are ``hf://`` URIs and Hugging Face web URLs; anything else is a local path.
    Plain ``"org/repo/file"`` strings are deliberately *not* Hub references: they are
    indistinguishable from relative paths.
    """
    text = os.fspath(reference)
    return text.startswith(("hf://", "https://huggingface.co/", "https://hf.co/"))


def resolve_hub_file(
    reference: str | os.PathLike[str],
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    token: str | bool | None = None,
) -> Path:
    """Return a local path for `reference`, downloading it from the Hub when it is a Hub reference.

    Accepted forms:

    - a local path (``"CIFAR-100_human.pt"``, ``Path("labels/CIFAR-100_human.pt")``): returned as is,
      after checking it exists;
    - an ``hf://`` URI, ``hf://[<type>s/]<repo_id>[@<revision>]/<path in repo>``, e.g.
      ``"hf://datasets/my-org/cifar-100n@main/CIFAR-100_human.pt"`` (without a type prefix the
      repository is a model repository, as everywhere in huggingface_hub);
    - a Hugging Face web URL to the file, e.g.
      ``"https://huggingface.co/datasets/my-org/cifar-100n/blob/main/CIFAR-100_human.pt"``.

    Hub files are fetched with :func:`huggingface_hub.hf_hub_download` into `cache_dir` (default:
    the Hugging Face cache), so HF_HUB_OFFLINE=1 and a warm cache work as usual.

    Raises:
        FileNotFoundError: a local path that does not exist.
        ValueError: a malformed Hub reference, or one naming a repository or bucket instead of a file.
        HubUnreachableError: the Hub could not be reached.
    """
    text = os.fspath(reference)
    if not is_hub_file_reference(text):
        path = Path(text).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"No file at {str(path)!r}. Pass an existing local file, or a file on the Hub as "
                f"'hf://datasets/<repo_id>/<path in repo>' (or its https://huggingface.co/... URL)."
            )
        return path

    try:
        uri = huggingface_hub.parse_hf_uri(text)
    except HfUriError as error:
        raise ValueError(f"{text!r} is not a valid Hub file reference: {error}") from error
    if uri.is_bucket or not uri.path_in_repo:
        raise ValueError(
            f"{text!r} must name one file in a Hub repository, as "
            f"'hf://datasets/<repo_id>[@<revision>]/<path in repo>'."
        )
    with hub_errors_explained(f"file {uri.path_in_repo!r} of {uri.type} repository {uri.id!r}"):
        local = huggingface_hub.hf_hub_download(
            repo_id=uri.id,
            filename=uri.path_in_repo,
            repo_type=uri.type,
            revision=uri.revision,
            cache_dir=cache_dir,
            token=token,
        )
    return Path(local)
