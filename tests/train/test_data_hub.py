import huggingface_hub
import pytest
from huggingface_hub.errors import LocalEntryNotFoundError

from hf_gaf.train.data import HubUnreachableError, hub_errors_explained, resolve_hub_file


@pytest.fixture
def fake_download(monkeypatch, tmp_path):
    """Replace hf_hub_download by a recorder that returns a local file."""
    calls = []
    downloaded = tmp_path / "downloaded.pt"
    downloaded.write_bytes(b"x")

    def hf_hub_download(**kwargs):
        calls.append(kwargs)
        return str(downloaded)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    return calls, downloaded


def test_local_path_is_returned_as_is(tmp_path):
    (tmp_path / "labels.pt").write_bytes(b"x")

    assert resolve_hub_file(tmp_path / "labels.pt") == tmp_path / "labels.pt"
    assert resolve_hub_file(str(tmp_path / "labels.pt")) == tmp_path / "labels.pt"


def test_missing_local_path_says_how_to_name_a_hub_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="hf://datasets/<repo_id>/<path in repo>"):
        resolve_hub_file(tmp_path / "absent.pt")


@pytest.mark.parametrize(
    ("reference", "expected"),
    [
        (
            "hf://datasets/my-org/cifar-100n/CIFAR-100_human.pt",
            {
                "repo_id": "my-org/cifar-100n",
                "filename": "CIFAR-100_human.pt",
                "repo_type": "dataset",
                "revision": None,
            },
        ),
        (
            "hf://datasets/my-org/cifar-100n@v1.0/labels/CIFAR-100_human.pt",
            {
                "repo_id": "my-org/cifar-100n",
                "filename": "labels/CIFAR-100_human.pt",
                "repo_type": "dataset",
                "revision": "v1.0",
            },
        ),
        (
            "https://huggingface.co/datasets/my-org/cifar-100n/blob/main/CIFAR-100_human.pt",
            {
                "repo_id": "my-org/cifar-100n",
                "filename": "CIFAR-100_human.pt",
                "repo_type": "dataset",
                "revision": "main",
            },
        ),
        (
            "hf://my-org/some-model/CIFAR-100_human.pt",
            {"repo_id": "my-org/some-model", "filename": "CIFAR-100_human.pt", "repo_type": "model", "revision": None},
        ),
        (
            "hf://datasets/my-org/cifar-100n@refs/pr/3/labels/CIFAR-100_human.pt",
            {"repo_id": "my-org/cifar-100n", "filename": "labels/CIFAR-100_human.pt", "revision": "refs/pr/3"},
        ),
        (
            "hf://spaces/my-org/demo@feature%2Fnoise/CIFAR-100_human.pt",
            {"repo_id": "my-org/demo", "repo_type": "space", "revision": "feature/noise"},
        ),
        (
            "hf://models/my-org/some-model/labels@2024.pt",
            {"repo_id": "my-org/some-model", "filename": "labels@2024.pt", "repo_type": "model", "revision": None},
        ),
        (
            "https://hf.co/datasets/my-org/cifar-100n/resolve/refs%2Fpr%2F3/my%20labels.pt?download=true",
            {"filename": "my labels.pt", "repo_type": "dataset", "revision": "refs/pr/3"},
        ),
        (
            "https://huggingface.co/my-org/some-model/raw/v2/CIFAR-100_human.pt#L1",
            {"repo_id": "my-org/some-model", "filename": "CIFAR-100_human.pt", "repo_type": "model", "revision": "v2"},
        ),
    ],
)
def test_hub_references_are_downloaded_with_hf_hub_download(fake_download, tmp_path, reference, expected):
    calls, downloaded = fake_download

    assert resolve_hub_file(reference, cache_dir=tmp_path / "cache") == downloaded
    assert len(calls) == 1
    assert {key: calls[0][key] for key in expected} == expected
    assert calls[0]["cache_dir"] == tmp_path / "cache"


@pytest.mark.parametrize(
    "reference",
    [
        "hf://datasets/my-org/cifar-100n",
        "hf://datasets/my-org/cifar-100n@v1",
        "hf://buckets/my-org/bucket/file.pt",
        "https://huggingface.co/datasets/my-org/cifar-100n",
        "https://huggingface.co/datasets/my-org/cifar-100n/blob/main",
        "https://huggingface.co/datasets/my-org/cifar-100n/tree/main/labels",
    ],
)
def test_references_that_do_not_name_a_repository_file_are_rejected(fake_download, reference):
    with pytest.raises(ValueError, match="must name one file in a Hub repository"):
        resolve_hub_file(reference)
    assert fake_download[0] == []


@pytest.mark.parametrize(
    ("reference", "reason"),
    [
        ("hf://datasets/not a repo/file.pt", "Repo id must use alphanumeric chars"),
        ("hf://datasets/my-org", "no '<namespace>/<name>' repository id"),
        ("hf://dataset/my-org/cifar-100n/file.pt", "the type prefix must be plural ('datasets/', not 'dataset/')"),
        ("hf://datasets/my-org/cifar-100n@/file.pt", "the revision after '@' is empty"),
        ("hf://datasets/my-org@v1/file.pt", "the repository id must be '<namespace>/<name>', got 'my-org'"),
        ("hf://datasets/my-org/cifar-100n/labels//file.pt", "has an empty segment"),
        ("https://huggingface.co/datasets/my-org/cifar-100n/commit/abc123", "'/commit/' is not a route to a file"),
    ],
)
def test_malformed_hub_reference_is_a_value_error(fake_download, reference, reason):
    with pytest.raises(ValueError, match="not a valid Hub file reference") as error:
        resolve_hub_file(reference)
    assert reason in str(error.value)
    assert fake_download[0] == []


def test_hub_references_are_parsed_without_parse_hf_uri(fake_download, monkeypatch):
    """huggingface_hub 0.34, the supported floor, has no parse_hf_uri: resolving must not need it."""
    def parse_hf_uri(*args, **kwargs):
        pytest.fail("resolve_hub_file called huggingface_hub.parse_hf_uri")

    monkeypatch.setattr(huggingface_hub, "parse_hf_uri", parse_hf_uri, raising=False)

    resolve_hub_file("hf://datasets/my-org/cifar-100n@v1/CIFAR-100_human.pt")

    assert fake_download[0][0]["revision"] == "v1"


@pytest.mark.parametrize(
    "reference",
    [
        "hf://datasets/my-org/cifar-100n/CIFAR-100_human.pt",
        "hf://datasets/my-org/cifar-100n@refs/convert/parquet/default/train/0000.parquet",
        "hf://spaces/my-org/demo@feature%2Fnoise/labels/file@1.pt",
        "hf://my-org/some-model@main/CIFAR-100_human.pt",
        "https://huggingface.co/datasets/my-org/cifar-100n/blob/refs%2Fpr%2F3/dir/my%20labels.pt?download=true",
    ],
)
def test_parsing_agrees_with_parse_hf_uri_where_huggingface_hub_has_it(fake_download, reference):
    if not hasattr(huggingface_hub, "parse_hf_uri"):
        pytest.skip(f"huggingface_hub {huggingface_hub.__version__} has no parse_hf_uri to compare with")
    uri = huggingface_hub.parse_hf_uri(reference)

    resolve_hub_file(reference)

    call = fake_download[0][0]
    assert (call["repo_type"], call["repo_id"], call["revision"], call["filename"]) == (
        uri.type,
        uri.id,
        uri.revision,
        uri.path_in_repo,
    )


def test_offline_mode_without_cache_explains_how_to_run_offline(monkeypatch, tmp_path):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    with pytest.raises(HubUnreachableError, match="offline mode is enabled") as error:
        resolve_hub_file("hf://datasets/my-org/cifar-100n/CIFAR-100_human.pt", cache_dir=tmp_path)
    assert "local file for a label file" in str(error.value)
    assert "'my-org/cifar-100n'" in str(error.value)


def test_connection_failure_explains_how_to_run_offline(monkeypatch):
    def unreachable(**kwargs):
        raise LocalEntryNotFoundError("An error happened while trying to locate the file on the Hub.")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", unreachable)

    with pytest.raises(HubUnreachableError, match="Could not reach the Hugging Face Hub") as error:
        resolve_hub_file("hf://datasets/my-org/cifar-100n/CIFAR-100_human.pt")
    message = str(error.value)
    assert "HF_HUB_OFFLINE=1" in message and "local folder in the Hub format" in message
    assert isinstance(error.value, ConnectionError)


def test_errors_unrelated_to_the_network_pass_through():
    with pytest.raises(KeyError), hub_errors_explained("anything"):
        raise KeyError("not a network problem")
