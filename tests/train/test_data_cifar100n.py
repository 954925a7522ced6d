import hashlib
import warnings

import datasets
import huggingface_hub
import numpy as np
import pytest
from .data_fixtures import (
    CIFAR100_FEATURES,
    CIFAR100_FINE_NAMES,
    REAL_CIFAR100N_LABELS,
    cifar100n_labels,
    save_like_cifar_n,
    write_cifar100_folder,
)
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

from hf_gaf.train.data import (
    HubUnreachableError,
    UntrustedPickleError,
    attach_noisy_labels,
    load_cifar100n,
    load_numpy_checkpoint,
)
from hf_gaf.train.data.cifar100n import CIFAR100N_RELEASE_SHA256, ModifiedLabelFileWarning
from hf_gaf.train.data.columns import column_as_numpy

TRAIN_FINE = np.random.default_rng(1).integers(0, 100, 40)
TEST_FINE = np.random.default_rng(2).integers(0, 100, 10)


@pytest.fixture(scope="module")
def cifar_folder(tmp_path_factory):
    """A local folder in the uoft-cs/cifar100 Hub format."""
    return write_cifar100_folder(tmp_path_factory.mktemp("cifar100"), TRAIN_FINE, TEST_FINE)


@pytest.fixture(scope="module")
def label_file(tmp_path_factory):
    """A CIFAR-100_human.pt aligned with `cifar_folder`, with about 40% human-style noise."""
    return save_like_cifar_n(
        cifar100n_labels(TRAIN_FINE, noise_rate=0.4), tmp_path_factory.mktemp("labels") / "CIFAR-100_human.pt"
    )


@pytest.fixture
def cache_dir(tmp_path):
    return tmp_path / "hf_cache"


def test_loads_images_and_attaches_noisy_labels_to_the_train_split(cifar_folder, label_file, cache_dir):
    splits = load_cifar100n(cifar_folder, label_file, cache_dir=cache_dir)

    labels = load_numpy_checkpoint(label_file)
    train, test = splits["train"], splits["test"]
    assert train.column_names == ["img", "fine_label", "coarse_label", "noisy_label", "label_flipped"]
    assert train.features["noisy_label"] == ClassLabel(names=CIFAR100_FINE_NAMES)
    assert train.features["label_flipped"] == Value("bool")
    assert train["fine_label"] == TRAIN_FINE.tolist()
    assert train["noisy_label"] == labels["noisy_label"].tolist()
    np.testing.assert_array_equal(train["label_flipped"], labels["noisy_label"] != labels["clean_label"])
    assert 0 < sum(train["label_flipped"]) < len(train)
    assert test.column_names == ["img", "fine_label", "coarse_label"]
    assert test["fine_label"] == TEST_FINE.tolist()
    assert train[0]["img"].size == (32, 32)


def test_coarse_noisy_labels_are_checked_against_coarse_label(cifar_folder, label_file, cache_dir):
    train = load_cifar100n(cifar_folder, label_file, noisy_label_key="noisy_coarse_label", cache_dir=cache_dir)["train"]

    assert train.features["noisy_label"] == CIFAR100_FEATURES["coarse_label"]
    assert train["noisy_label"] == load_numpy_checkpoint(label_file)["noisy_coarse_label"].tolist()


def test_misaligned_label_file_names_the_first_mismatching_row_and_the_fix(cifar_folder, tmp_path, cache_dir):
    shuffled = TRAIN_FINE.copy()
    shuffled[[7, 30]] = (TRAIN_FINE[[7, 30]] + 1) % 100
    misaligned = save_like_cifar_n(cifar100n_labels(shuffled, noise_rate=0.4), tmp_path / "CIFAR-100_human.pt")

    with pytest.raises(ValueError) as error:
        load_cifar100n(cifar_folder, misaligned, cache_dir=cache_dir)

    message = str(error.value)
    assert f"at row 7, clean_label is {shuffled[7]} but the dataset's fine_label is {TRAIN_FINE[7]}" in message
    assert "2 mismatching rows" in message
    assert "without shuffling, filtering or re-splitting" in message


def test_label_file_of_another_length_is_refused(cifar_folder, tmp_path, cache_dir):
    short = save_like_cifar_n(cifar100n_labels(TRAIN_FINE[:-1], noise_rate=0.4), tmp_path / "CIFAR-100_human.pt")

    with pytest.raises(
        ValueError, match="has 39 'clean_label' and 39 'noisy_label' entries but the training split has 40 rows"
    ):
        load_cifar100n(cifar_folder, short, cache_dir=cache_dir)


def test_label_file_with_a_disallowed_global_is_refused(cifar_folder, tmp_path, cache_dir):
    import torch

    class Payload:
        def __reduce__(self):
            import os

            return (os.system, ("echo this must never run",))

    labels = dict(cifar100n_labels(TRAIN_FINE, noise_rate=0.4), note=Payload())
    torch.save(labels, tmp_path / "CIFAR-100_human.pt")

    with pytest.raises(UntrustedPickleError, match="system"):
        load_cifar100n(cifar_folder, tmp_path / "CIFAR-100_human.pt", cache_dir=cache_dir)


def test_label_file_without_the_expected_keys_is_refused(cifar_folder, tmp_path, cache_dir):
    path = save_like_cifar_n({"clean_label": TRAIN_FINE}, tmp_path / "CIFAR-100_human.pt")

    with pytest.raises(ValueError, match="keys 'clean_label' and 'noisy_label'"):
        load_cifar100n(cifar_folder, path, cache_dir=cache_dir)


def test_unknown_noisy_label_key_is_refused(cifar_folder, label_file, cache_dir):
    with pytest.raises(ValueError, match="noisy_label_key must be one of"):
        load_cifar100n(cifar_folder, label_file, noisy_label_key="clean_label", cache_dir=cache_dir)


def test_label_file_from_the_hub_is_resolved_with_hf_hub_download(cifar_folder, label_file, cache_dir, monkeypatch):
    calls = []

    def hf_hub_download(**kwargs):
        calls.append(kwargs)
        return str(label_file)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)

    splits = load_cifar100n(cifar_folder, "hf://datasets/my-org/cifar-100n@v1/CIFAR-100_human.pt", cache_dir=cache_dir)

    assert calls[0]["repo_id"] == "my-org/cifar-100n"
    assert calls[0]["filename"] == "CIFAR-100_human.pt"
    assert (calls[0]["repo_type"], calls[0]["revision"], calls[0]["cache_dir"]) == ("dataset", "v1", cache_dir)
    assert "noisy_label" in splits["train"].column_names


def test_unreachable_hub_dataset_explains_how_to_run_offline(label_file, cache_dir, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)

    with pytest.raises(HubUnreachableError) as error:
        load_cifar100n("uoft-cs/cifar100", label_file, cache_dir=cache_dir)

    message = str(error.value)
    assert "dataset 'uoft-cs/cifar100'" in message
    assert "local folder in the Hub format" in message


def test_connection_error_while_loading_the_dataset_explains_how_to_run_offline(label_file, monkeypatch):
    def load_dataset(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'uoft-cs/cifar100' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)

    with pytest.raises(HubUnreachableError, match="HF_HUB_OFFLINE=1"):
        load_cifar100n("uoft-cs/cifar100", label_file)


def test_missing_label_file_is_reported_before_loading_images(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "load_dataset", pytest.fail)

    with pytest.raises(FileNotFoundError, match="CIFAR-100_human.pt is part of the CIFAR-N release"):
        load_cifar100n("uoft-cs/cifar100", tmp_path / "CIFAR-100_human.pt")


def test_dataset_without_fine_label_is_refused():
    train = Dataset.from_dict({"label": [0, 1]}, features=Features({"label": ClassLabel(num_classes=2)}))
    labels = {"clean_label": np.array([0, 1]), "noisy_label": np.array([1, 1])}

    with pytest.raises(ValueError, match="needs a ClassLabel column 'fine_label'"):
        attach_noisy_labels(train, labels)


def test_single_split_dataset_is_refused(label_file, monkeypatch):
    monkeypatch.setattr(
        datasets, "load_dataset", lambda *args, **kwargs: DatasetDict(test=Dataset.from_dict({"x": [1]}))
    )

    with pytest.raises(ValueError, match=r"with a 'train' split \(got splits \['test'\]\)"):
        load_cifar100n("somewhere", label_file)


@pytest.mark.skipif(
    not REAL_CIFAR100N_LABELS.is_file(), reason=f"real CIFAR-100N labels not found at {REAL_CIFAR100N_LABELS}"
)
def test_real_cifar100n_label_file():
    labels = load_numpy_checkpoint(REAL_CIFAR100N_LABELS)

    assert set(labels) == {"clean_label", "noisy_label", "clean_coarse_label", "noisy_coarse_label"}
    assert all(values.shape == (50_000,) for values in labels.values())
    assert (labels["noisy_label"] != labels["clean_label"]).mean() == pytest.approx(0.402, abs=5e-4)

    train = Dataset.from_dict(
        {"fine_label": labels["clean_label"]}, features=Features({"fine_label": CIFAR100_FEATURES["fine_label"]})
    )
    attached = attach_noisy_labels(train, labels, source=str(REAL_CIFAR100N_LABELS))
    assert column_as_numpy(attached, "label_flipped").mean() == pytest.approx(0.402, abs=5e-4)


def _integral_floats(values):
    return values.astype(np.float64)


def _fractional_floats(values):
    return values + 0.5


def _one_nan(values):
    values = values.astype(np.float32)
    values[5] = np.nan
    return values


@pytest.mark.parametrize("key", ["noisy_label", "clean_label"])
@pytest.mark.parametrize(
    ("corrupt", "dtype", "detail"),
    [
        (_integral_floats, "float64", "all integral"),
        (_fractional_floats, "float64", f"40 non-integer, first at row 0: {TRAIN_FINE[0] + 0.5}"),
        (_one_nan, "float32", "1 NaN, first at row 5"),
    ],
    ids=["integral floats", "fractional floats", "NaN"],
)
def test_float_labels_are_refused_naming_the_file_and_the_key(tmp_path, monkeypatch, key, corrupt, dtype, detail):
    def load_dataset(*args, **kwargs):
        pytest.fail("the images were loaded before the label file was checked")

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    labels = cifar100n_labels(TRAIN_FINE, noise_rate=0.4)
    labels[key] = corrupt(labels[key])
    path = save_like_cifar_n(labels, tmp_path / "CIFAR-100_human.pt")

    with pytest.raises(ValueError) as error:
        load_cifar100n("uoft-cs/cifar100", path)

    message = str(error.value)
    assert message.startswith(f"{path}: {key!r} holds {dtype} values ({detail})")
    assert "labels must be integers" in message


def test_float_labels_are_refused_by_attach_noisy_labels():
    train = Dataset.from_dict(
        {"fine_label": [0, 1, 2]}, features=Features({"fine_label": CIFAR100_FEATURES["fine_label"]})
    )
    labels = {"clean_label": np.array([0, 1, 2]), "noisy_label": np.array([0.0, 1.7, 2.0])}

    expected = r"^my file: 'noisy_label' holds float64 values \(1 non-integer, first at row 1: 1.7\)"
    with pytest.raises(ValueError, match=expected):
        attach_noisy_labels(train, labels, source="my file")


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.int32])
def test_integer_labels_of_any_width_are_accepted(cifar_folder, tmp_path, cache_dir, dtype):
    labels = {key: values.astype(dtype) for key, values in cifar100n_labels(TRAIN_FINE, noise_rate=0.4).items()}
    path = save_like_cifar_n(labels, tmp_path / "CIFAR-100_human.pt")

    train = load_cifar100n(cifar_folder, path, cache_dir=cache_dir)["train"]

    assert train["noisy_label"] == labels["noisy_label"].astype(np.int64).tolist()
    np.testing.assert_array_equal(train["label_flipped"], labels["noisy_label"] != labels["clean_label"])


def _serve_train_split(monkeypatch, fine_label):
    """Make datasets.load_dataset return a train split with only `fine_label` (no images to decode)."""
    train = Dataset.from_dict(
        {"fine_label": np.asarray(fine_label)}, features=Features({"fine_label": CIFAR100_FEATURES["fine_label"]})
    )
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: DatasetDict(train=train))


def _release_warnings(record):
    return [warning for warning in record if issubclass(warning.category, ModifiedLabelFileWarning)]


def test_files_unlike_the_release_are_not_compared_with_it(cifar_folder, label_file, cache_dir):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        load_cifar100n(cifar_folder, label_file, cache_dir=cache_dir)

    assert _release_warnings(record) == []


def test_a_release_shaped_file_with_another_digest_is_reported_as_a_modified_copy(tmp_path, monkeypatch):
    fine = np.random.default_rng(3).integers(0, 100, 50_000)
    labels = cifar100n_labels(fine, noise_rate=0.4)
    path = save_like_cifar_n(labels, tmp_path / "CIFAR-100_human.pt")
    _serve_train_split(monkeypatch, fine)

    with pytest.warns(ModifiedLabelFileWarning) as record:
        train = load_cifar100n("uoft-cs/cifar100", path)["train"]

    message = str(_release_warnings(record)[0].message)
    assert repr(str(path)) in message
    assert "is not the CIFAR-100N release" in message
    assert f"SHA-256 {CIFAR100N_RELEASE_SHA256}" in message
    assert hashlib.sha256(path.read_bytes()).hexdigest() in message
    assert train["noisy_label"] == labels["noisy_label"].tolist()


def test_release_digest_is_the_sha256_of_the_real_file(shared_data):
    release = shared_data / "CIFAR-100_human.pt"
    if not release.is_file():
        pytest.skip(f"the real CIFAR-100N labels are not at {release}")

    assert hashlib.sha256(release.read_bytes()).hexdigest() == CIFAR100N_RELEASE_SHA256


def test_real_release_is_recognised_and_a_modified_copy_is_reported(shared_data, tmp_path, monkeypatch):
    release = shared_data / "CIFAR-100_human.pt"
    if not release.is_file():
        pytest.skip(f"the real CIFAR-100N labels are not at {release}")
    labels = load_numpy_checkpoint(release)
    _serve_train_split(monkeypatch, labels["clean_label"])

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        train = load_cifar100n("uoft-cs/cifar100", release)["train"]
    assert _release_warnings(record) == []
    assert column_as_numpy(train, "label_flipped").sum() == 20_100

    labels["noisy_label"][123] = (labels["noisy_label"][123] + 1) % 100
    modified = save_like_cifar_n(labels, tmp_path / "CIFAR-100_human.pt")
    with pytest.warns(ModifiedLabelFileWarning, match="is not the CIFAR-100N release"):
        train = load_cifar100n("uoft-cs/cifar100", modified)["train"]
    assert train[123]["noisy_label"] == labels["noisy_label"][123]
