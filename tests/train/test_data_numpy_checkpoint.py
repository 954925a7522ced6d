import os
import pickle

import numpy as np
import pytest
import torch
from .data_fixtures import save_like_cifar_n

from hf_gaf.train.data import UntrustedPickleError, load_numpy_checkpoint


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
