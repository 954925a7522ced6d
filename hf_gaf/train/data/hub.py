"""Reaching the Hugging Face Hub: file references and what to do when the Hub is out of reach.

Everything in `hf_gaf.train.data` that may touch the network goes through this module, so a missing
connection always ends in the same [`HubUnreachableError`], whose message says how to run
offline instead of showing a retry log and a cache miss.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

import huggingface_hub
from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError, OfflineModeIsEnabled
from huggingface_hub.utils import validate_repo_id

LOCAL_ALTERNATIVES = (
    "pass local paths instead of Hub references: a local folder in the Hub format for a dataset "
    "(e.g. made on a connected machine with `hf download <repo_id> --repo-type dataset "
    "--local-dir <folder>`) and a local file for a label file"
)

_HUB_URL_PREFIXES = ("https://huggingface.co/", "https://hf.co/")

_REPO_TYPE_PREFIXES = {"models": "model", "datasets": "dataset", "spaces": "space"}
"""Plural type prefixes of `hf://` URIs and web URLs, for repositories whose files can be downloaded."""

_FILE_URL_ROUTES = frozenset({"blob", "resolve", "raw", "blame"})
"""Web routes that show one file: `/<route>/<revision>/<path in repo>`."""

# Revisions that contain "/": pull request refs and conversion refs (e.g. refs/convert/parquet).
_SPECIAL_REVISION = re.compile(r"^refs/(?:convert/[\w.-]+|pr/\d+)(?=/|$)")


@dataclass(frozen=True)
class _HubFile:
    """One file in a Hub repository, as [`huggingface_hub.hf_hub_download`] takes it."""

    repo_type: str
    repo_id: str
    revision: str | None
    path_in_repo: str


class HubUnreachableError(ConnectionError):
    """The Hugging Face Hub could not be reached (no connection, or offline mode without a cached copy)."""


@contextlib.contextmanager
def hub_errors_explained(resource: str) -> Iterator[None]:
    """Turn connection failures raised inside the block into a [`HubUnreachableError`].

    `resource` names what was being fetched (e.g. `"dataset 'uoft-cs/cifar100'"`); the message
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

    Hub references are `hf://` URIs and Hugging Face web URLs; anything else is a local path.
    Plain `"org/repo/file"` strings are deliberately *not* Hub references: they are
    indistinguishable from relative paths.
    """
    text = os.fspath(reference)
    return text.startswith(("hf://", *_HUB_URL_PREFIXES))


def resolve_hub_file(
    reference: str | os.PathLike[str],
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    token: str | bool | None = None,
) -> Path:
    """Return a local path for `reference`, downloading it from the Hub when it is a Hub reference.

    Accepted forms:

    - a local path (`"CIFAR-100_human.pt"`, `Path("labels/CIFAR-100_human.pt")`): returned as is,
      after checking it exists;
    - an `hf://` URI, `hf://[<type>s/]<repo_id>[@<revision>]/<path in repo>` with type
      `models`, `datasets` or `spaces`, e.g.
      `"hf://datasets/my-org/cifar-100n@main/CIFAR-100_human.pt"` (without a type prefix the
      repository is a model repository, as everywhere in huggingface_hub; a revision may be a ref
      such as `refs/pr/3` or URL-quoted, `feature%2Fx`);
    - a Hugging Face web URL to the file (its `blob`, `resolve` or `raw` link), e.g.
      `"https://huggingface.co/datasets/my-org/cifar-100n/blob/main/CIFAR-100_human.pt"`.

    References are parsed locally, the same way on every supported huggingface_hub version, and
    without contacting the Hub. Hub files are fetched with [`huggingface_hub.hf_hub_download`]
    into `cache_dir` (default: the Hugging Face cache), so HF_HUB_OFFLINE=1 and a warm cache work
    as usual.

    Raises:
        FileNotFoundError: a local path that does not exist.
        ValueError: a malformed Hub reference, or one naming a repository, folder or bucket instead
            of a file.
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

    hub_file = _parse_hub_file_reference(text)
    resource = f"file {hub_file.path_in_repo!r} of {hub_file.repo_type} repository {hub_file.repo_id!r}"
    with hub_errors_explained(resource):
        local = huggingface_hub.hf_hub_download(
            repo_id=hub_file.repo_id,
            filename=hub_file.path_in_repo,
            repo_type=hub_file.repo_type,
            revision=hub_file.revision,
            cache_dir=cache_dir,
            token=token,
        )
    return Path(local)


def _parse_hub_file_reference(text: str) -> _HubFile:
    """Split an `hf://` URI or a Hugging Face file URL into repository type, id, revision and path.

    Parsed here, offline, because huggingface_hub has no parser for both forms across the supported
    versions (0.34 to 2.x): `parse_hf_uri` is recent, and `HfFileSystem.resolve_path` asks the
    Hub whether the repository exists. The grammar is `parse_hf_uri`'s:

    - `hf://[<type>s/]<namespace>/<name>[@<revision>]/<path in repo>`; the revision may be
      URL-quoted (`feature%2Fx`) or a ref containing slashes (`refs/pr/3`, `refs/convert/parquet`);
    - `https://huggingface.co/[<type>s/]<namespace>/<name>/<blob|resolve|raw|blame>/<revision>/<path>`
      (or `https://hf.co/...`), with percent-encoded segments; a query or fragment is ignored.

    Without a type prefix the repository is a model repository. The repository id is checked with
    [`huggingface_hub.utils.validate_repo_id`].

    Raises:
        ValueError: the reference is malformed ("is not a valid Hub file reference") or names a
            repository, folder or bucket rather than one file ("must name one file in a Hub repository").
    """
    not_a_file = ValueError(
        f"{text!r} must name one file in a Hub repository, as "
        f"'hf://datasets/<repo_id>[@<revision>]/<path in repo>' (or its "
        f"'https://huggingface.co/datasets/<repo_id>/blob/<revision>/<path in repo>' URL)."
    )

    def invalid(reason: str) -> ValueError:
        return ValueError(
            f"{text!r} is not a valid Hub file reference: {reason}. Write it as "
            f"'hf://[datasets/|spaces/]<namespace>/<name>[@<revision>]/<path in repo>'."
        )

    is_uri = text.startswith("hf://")
    if is_uri:
        segments = text[len("hf://") :].strip("/").split("/")
    else:
        # Decoded per segment; a decoded "/" (a quoted revision such as feature%2Fx) stays quoted
        # so that it does not split the segment.
        segments = [unquote(part).replace("/", "%2F") for part in urlsplit(text).path.split("/") if part]

    prefix = segments[0] if segments else ""
    if prefix == "buckets":
        raise not_a_file
    if prefix == "kernels":
        raise invalid("kernel repositories are not supported; put the file in a dataset repository")
    if prefix in _REPO_TYPE_PREFIXES.values() and len(segments) > 1:
        raise invalid(f"the type prefix must be plural ('{prefix}s/', not '{prefix}/')")
    repo_type = _REPO_TYPE_PREFIXES.get(prefix, "model")
    if prefix in _REPO_TYPE_PREFIXES:
        segments = segments[1:]
    if len(segments) < 2 or not segments[0]:
        raise invalid("it has no '<namespace>/<name>' repository id")

    revision_and_path: str | None = None
    if is_uri:
        location = "/".join(segments)
        at = location.find("@")
        if at != -1 and location[:at].count("/") <= 1:
            repo_id, revision_and_path = location[:at], location[at + 1 :]
            if repo_id.count("/") != 1:
                raise invalid(f"the repository id must be '<namespace>/<name>', got {repo_id!r}")
        else:
            repo_id, path_in_repo = "/".join(segments[:2]), "/".join(segments[2:])
    else:
        repo_id, route = "/".join(segments[:2]), segments[2:]
        if route and route[0] not in _FILE_URL_ROUTES | {"tree"}:
            raise invalid(f"'/{route[0]}/' is not a route to a file; copy the link of the file itself")
        if not route or route[0] == "tree" or len(route) < 3:
            raise not_a_file
        revision_and_path = "/".join(route[1:])

    revision: str | None = None
    if revision_and_path is not None:
        special = _SPECIAL_REVISION.match(revision_and_path)
        if special:
            revision, path_in_repo = special.group(), revision_and_path[special.end() :].removeprefix("/")
        else:
            quoted, _, path_in_repo = revision_and_path.partition("/")
            revision = unquote(quoted)
        if not revision:
            raise invalid("the revision after '@' is empty")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise invalid(str(error).rstrip(".")) from error
    if not path_in_repo:
        raise not_a_file
    if "" in path_in_repo.split("/"):
        raise invalid(f"the path in the repository, {path_in_repo!r}, has an empty segment")
    return _HubFile(repo_type, repo_id, revision, path_in_repo)
