import os
import pickle
import shutil

import numpy as np
import pytest
import torch
from .data_fixtures import flip_bit, save_like_cifar_n

from hf_gaf.train.data import UntrustedPickleError, load_numpy_checkpoint
from hf_gaf.train.data.numpy_checkpoint import CorruptCheckpointError


def test_loads_arrays_saved_with_numpy_2_names(tmp_path):
    arrays = {
        "ints": np.arange(6, dtype=np.int64),
        "bytes": np.zeros(3, np.uint8),
        "floats": np.ones((2, 2), np.float32),
    }
    torch.save(arrays, tmp_path / "labels.pt")

    loaded = load_numpy_checkpoint(tmp_path / "labels.pt")

    assert loaded.keys() == arrays.keys()
    for key, array in arrays.items():
        assert loaded[key].dtype == array.dtype
        np.testing.assert_array_equal(loaded[key], array)


def test_loads_arrays_saved_with_numpy_1_names(tmp_path):
    path = save_like_cifar_n({"clean_label": np.array([3, 1, 4])}, tmp_path / "labels.pt")
    assert "numpy.core.multiarray._reconstruct" in torch.serialization.get_unsafe_globals_in_checkpoint(path)

    np.testing.assert_array_equal(load_numpy_checkpoint(path)["clean_label"], [3, 1, 4])


class RunsCommand:
    def __reduce__(self):
        return (os.system, ("echo this must never run",))


class ArbitraryClass:
    pass


@pytest.mark.parametrize("payload", [RunsCommand(), ArbitraryClass()], ids=["os.system", "arbitrary class"])
def test_refuses_files_naming_other_globals(tmp_path, payload):
    torch.save({"clean_label": np.arange(3), "extra": payload}, tmp_path / "evil.pt")

    with pytest.raises(UntrustedPickleError, match="Refusing to load .* could run code"):
        load_numpy_checkpoint(tmp_path / "evil.pt")


def test_refuses_object_arrays(tmp_path):
    torch.save({"names": np.array(["a", None], dtype=object)}, tmp_path / "objects.pt")

    with pytest.raises(UntrustedPickleError, match="other than numeric numpy arrays"):
        load_numpy_checkpoint(tmp_path / "objects.pt")


def test_untrusted_pickle_error_is_an_unpickling_error():
    assert issubclass(UntrustedPickleError, pickle.UnpicklingError)


def test_rejects_files_that_are_not_checkpoints(tmp_path):
    (tmp_path / "plain.pkl").write_bytes(pickle.dumps({"clean_label": [1, 2]}))

    with pytest.raises(ValueError, match="not a torch.save checkpoint"):
        load_numpy_checkpoint(tmp_path / "plain.pkl")


@pytest.mark.parametrize("fraction", [0.0, 0.5, 1.0], ids=["first byte", "middle", "last byte"])
def test_a_flipped_bit_is_refused_naming_the_file_and_the_member(tmp_path, fraction):
    original = save_like_cifar_n(
        {"clean_label": np.arange(300) % 100, "noisy_label": (np.arange(300) * 7) % 100}, tmp_path / "labels.pt"
    )
    corrupt = flip_bit(original, tmp_path / "flipped.pt", fraction=fraction)
    assert corrupt.read_bytes() != original.read_bytes()

    with pytest.raises(CorruptCheckpointError) as error:
        load_numpy_checkpoint(corrupt)

    message = str(error.value)
    assert repr(str(corrupt)) in message
    assert "data.pkl" in message and "CRC-32" in message
    assert "download it again" in message
    np.testing.assert_array_equal(load_numpy_checkpoint(original)["clean_label"], np.arange(300) % 100)


def test_a_flipped_bit_in_the_version_record_is_refused(tmp_path):
    original = save_like_cifar_n({"clean_label": np.arange(5)}, tmp_path / "labels.pt")

    with pytest.raises(CorruptCheckpointError, match="'archive/version'"):
        load_numpy_checkpoint(flip_bit(original, tmp_path / "flipped.pt", member="/version"))


def test_corrupt_checkpoint_error_is_a_value_error():
    assert issubclass(CorruptCheckpointError, ValueError)


def test_truncated_file_is_refused_naming_the_file(tmp_path):
    original = save_like_cifar_n({"clean_label": np.arange(300)}, tmp_path / "labels.pt")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(original.read_bytes()[: original.stat().st_size // 2])

    with pytest.raises(ValueError, match="not a torch.save checkpoint") as error:
        load_numpy_checkpoint(truncated)
    assert repr(str(truncated)) in str(error.value)


def test_real_release_loads_and_a_bit_flipped_copy_is_refused(shared_data, tmp_path):
    release = shared_data / "CIFAR-100_human.pt"
    if not release.is_file():
        pytest.skip(f"the real CIFAR-100N labels are not at {release}")
    assert load_numpy_checkpoint(release)["noisy_label"].shape == (50_000,)
    copy = shutil.copyfile(release, tmp_path / "CIFAR-100_human.pt")

    corrupt = flip_bit(copy, tmp_path / "flipped.pt", fraction=0.5)

    with pytest.raises(CorruptCheckpointError, match="Bad CRC-32") as error:
        load_numpy_checkpoint(corrupt)
    assert repr(str(corrupt)) in str(error.value)
