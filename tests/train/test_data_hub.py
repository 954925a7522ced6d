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
    ],
)
def test_hub_references_are_downloaded_with_hf_hub_download(fake_download, tmp_path, reference, expected):
    calls, downloaded = fake_download

    assert resolve_hub_file(reference, cache_dir=tmp_path / "cache") == downloaded
    assert len(calls) == 1
    assert {key: calls[0][key] for key in expected} == expected
    assert calls[0]["cache_dir"] == tmp_path / "cache"


@pytest.mark.parametrize("reference", ["hf://datasets/my-org/cifar-100n", "hf://buckets/my-org/bucket/file.pt"])
def test_references_that_do_not_name_a_repository_file_are_rejected(fake_download, reference):
    with pytest.raises(ValueError, match="must name one file in a Hub repository"):
        resolve_hub_file(reference)
    assert fake_download[0] == []


def test_malformed_hub_reference_is_a_value_error():
    with pytest.raises(ValueError, match="not a valid Hub file reference"):
        resolve_hub_file("hf://datasets/not a repo/file.pt")


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
