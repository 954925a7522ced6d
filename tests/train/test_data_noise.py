import numpy as np
import pytest
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

from hf_gaf.train.data import add_symmetric_label_noise

NUM_CLASSES = 7


@pytest.fixture(scope="module")
def clean() -> Dataset:
    labels = np.random.default_rng(0).integers(0, NUM_CLASSES, 1001)
    features = Features({"label": ClassLabel(num_classes=NUM_CLASSES), "row": Value("int64")})
    return Dataset.from_dict({"label": labels, "row": np.arange(len(labels))}, features=features)


@pytest.mark.parametrize("rate", [0.0, 0.2, 0.4, 0.75, 0.999])
def test_flips_exactly_round_rate_times_n_rows_each_to_a_different_class(clean, rate):
    noisy = add_symmetric_label_noise(clean, rate, seed=1)

    label, noisy_label, flipped = (np.asarray(noisy[column]) for column in ("label", "noisy_label", "label_flipped"))
    assert flipped.sum() == round(rate * len(clean))
    assert np.all(noisy_label[flipped] != label[flipped])
    assert np.all(noisy_label[~flipped] == label[~flipped])
    np.testing.assert_array_equal(label, clean["label"])


def test_columns_keep_the_clean_label_and_add_noisy_and_flipped(clean):
    noisy = add_symmetric_label_noise(clean, 0.4, seed=0)

    assert noisy.column_names == ["label", "row", "noisy_label", "label_flipped"]
    assert noisy.features["noisy_label"] == clean.features["label"]
    assert noisy.features["label_flipped"] == Value("bool")


def test_custom_column_names(clean):
    renamed = clean.rename_column("label", "fine_label")

    noisy = add_symmetric_label_noise(
        renamed, 0.1, seed=0, label_column="fine_label", noisy_column="train_label", flipped_column="corrupted"
    )

    assert {"fine_label", "train_label", "corrupted"} <= set(noisy.column_names)


def test_same_seed_same_noise_other_seed_other_noise(clean):
    first = add_symmetric_label_noise(clean, 0.4, seed=3)
    again = add_symmetric_label_noise(clean, 0.4, seed=3)
    other = add_symmetric_label_noise(clean, 0.4, seed=4)

    assert first["noisy_label"] == again["noisy_label"]
    assert first["label_flipped"] != other["label_flipped"]


def test_flipped_labels_cover_all_other_classes_evenly(clean):
    noisy = add_symmetric_label_noise(clean, 0.9, seed=0)

    label, noisy_label, flipped = (np.asarray(noisy[column]) for column in ("label", "noisy_label", "label_flipped"))
    offsets = (noisy_label[flipped] - label[flipped]) % NUM_CLASSES
    counts = np.bincount(offsets, minlength=NUM_CLASSES)
    assert counts[0] == 0
    expected = flipped.sum() / (NUM_CLASSES - 1)
    assert np.all(np.abs(counts[1:] - expected) < 5 * np.sqrt(expected))


@pytest.mark.parametrize("rate", [-0.1, 1.0, 1.5])
def test_rate_outside_unit_interval_is_refused(clean, rate):
    with pytest.raises(ValueError, match=r"rate must be in \[0, 1\)"):
        add_symmetric_label_noise(clean, rate, seed=0)


def test_non_classlabel_column_is_refused(clean):
    with pytest.raises(ValueError, match="'row' must be a ClassLabel"):
        add_symmetric_label_noise(clean, 0.2, seed=0, label_column="row")


def test_missing_column_is_refused(clean):
    with pytest.raises(ValueError, match="'fine_label' must be a ClassLabel.*columns: \\['label', 'row'\\]"):
        add_symmetric_label_noise(clean, 0.2, seed=0, label_column="fine_label")


def test_overwriting_the_clean_label_is_refused(clean):
    with pytest.raises(ValueError, match="clean label has to stay available"):
        add_symmetric_label_noise(clean, 0.2, seed=0, noisy_column="label")


def test_existing_noisy_column_is_refused(clean):
    noisy = add_symmetric_label_noise(clean, 0.2, seed=0)

    with pytest.raises(ValueError, match="'noisy_label' already exists"):
        add_symmetric_label_noise(noisy, 0.2, seed=0)


def test_dataset_dict_is_refused(clean):
    with pytest.raises(TypeError, match=r"pass dataset\['train'\]"):
        add_symmetric_label_noise(DatasetDict(train=clean), 0.2, seed=0)
