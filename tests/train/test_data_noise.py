import numpy as np
import pytest
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

from hf_gaf.train.data import (
    FASHION_MNIST_CONFUSIONS,
    add_class_dependent_label_noise,
    add_label_noise,
    add_symmetric_label_noise,
)
from hf_gaf.train.data.columns import column_as_numpy

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


# -- class-dependent noise ------------------------------------------------------------------------

# A map that leaves classes 5 and 6 alone: rows of those classes must never be flipped.
PARTIAL_CONFUSIONS = {0: 1, 1: 0, 2: 3, 3: 4, 4: 2}


@pytest.mark.parametrize("rate", [0.0, 0.2, 0.4, 0.6])
def test_class_dependent_flips_exactly_round_rate_times_n_rows_each_to_its_mapped_class(clean, rate):
    noisy = add_class_dependent_label_noise(clean, rate, seed=1, confusions=PARTIAL_CONFUSIONS)

    label, noisy_label, flipped = (np.asarray(noisy[column]) for column in ("label", "noisy_label", "label_flipped"))
    assert flipped.sum() == round(rate * len(clean))
    expected = np.array([PARTIAL_CONFUSIONS.get(c, -1) for c in label[flipped]])
    np.testing.assert_array_equal(noisy_label[flipped], expected)
    assert np.all(noisy_label[~flipped] == label[~flipped])
    assert not flipped[np.isin(label, [5, 6])].any()
    np.testing.assert_array_equal(label, clean["label"])


def test_class_dependent_flips_are_spread_over_the_mapped_classes(clean):
    noisy = add_class_dependent_label_noise(clean, 0.4, seed=0, confusions=PARTIAL_CONFUSIONS)

    label, flipped = np.asarray(noisy["label"]), np.asarray(noisy["label_flipped"])
    eligible = np.isin(label, list(PARTIAL_CONFUSIONS))
    share = flipped.sum() / eligible.sum()  # rows are drawn uniformly among the eligible ones
    for c in PARTIAL_CONFUSIONS:
        rows = label == c
        expected = share * rows.sum()
        assert abs(flipped[rows].sum() - expected) < 5 * np.sqrt(expected)


def test_class_dependent_columns_match_symmetric_noise(clean):
    noisy = add_class_dependent_label_noise(clean, 0.4, seed=0, confusions=PARTIAL_CONFUSIONS)
    symmetric = add_symmetric_label_noise(clean, 0.4, seed=0)

    assert noisy.column_names == symmetric.column_names
    assert noisy.features == symmetric.features


def test_class_dependent_same_seed_same_noise_other_seed_other_noise(clean):
    first = add_class_dependent_label_noise(clean, 0.4, seed=3, confusions=PARTIAL_CONFUSIONS)
    again = add_class_dependent_label_noise(clean, 0.4, seed=3, confusions=PARTIAL_CONFUSIONS)
    other = add_class_dependent_label_noise(clean, 0.4, seed=4, confusions=PARTIAL_CONFUSIONS)

    assert first["noisy_label"] == again["noisy_label"]
    assert first["label_flipped"] != other["label_flipped"]


def test_confusion_map_by_names_equals_map_by_ids(clean):
    names = clean.cast_column("label", ClassLabel(names=list("abcdefg")))

    by_name = add_class_dependent_label_noise(names, 0.3, seed=0, confusions={"a": "b", "b": "a", "c": "d"})
    by_id = add_class_dependent_label_noise(names, 0.3, seed=0, confusions={0: 1, 1: 0, 2: 3})

    assert by_name["noisy_label"] == by_id["noisy_label"]


def test_fashion_mnist_confusions_are_five_swapped_pairs_of_its_classes():
    names = ["T - shirt / top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]

    assert sorted(FASHION_MNIST_CONFUSIONS) == sorted(names)
    assert all(FASHION_MNIST_CONFUSIONS[FASHION_MNIST_CONFUSIONS[c]] == c != FASHION_MNIST_CONFUSIONS[c] for c in names)
    assert FASHION_MNIST_CONFUSIONS["Shirt"] == "T - shirt / top"
    assert FASHION_MNIST_CONFUSIONS["Coat"] == "Pullover"
    assert FASHION_MNIST_CONFUSIONS["Sneaker"] == "Sandal"


def test_fashion_mnist_confusions_keep_class_frequencies_balanced():
    labels = np.repeat(np.arange(10), 600)
    names = ["T - shirt / top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
    split = Dataset.from_dict({"label": labels}, features=Features({"label": ClassLabel(names=names)}))

    noisy = add_class_dependent_label_noise(split, 0.4, seed=0, confusions=FASHION_MNIST_CONFUSIONS)

    counts = np.bincount(noisy["noisy_label"], minlength=10)
    assert np.asarray(noisy["label_flipped"]).sum() == 2400  # every row is eligible: each class has a partner
    assert np.all(np.abs(counts - 600) < 5 * np.sqrt(2 * 0.4 * 0.6 * 600))  # a pair trades rows both ways


def test_confusion_map_with_unknown_class_name_is_refused(clean):
    with pytest.raises(ValueError, match="names class 'Shirt', which is not one of"):
        add_class_dependent_label_noise(clean, 0.2, seed=0, confusions={"Shirt": 0})


@pytest.mark.parametrize("confusions", [{0: 7}, {-1: 0}, {0: 1.5}, {True: 0}])
def test_confusion_map_with_class_id_out_of_range_is_refused(clean, confusions):
    with pytest.raises(ValueError, match=r"classes are ids 0\.\.6"):
        add_class_dependent_label_noise(clean, 0.2, seed=0, confusions=confusions)


def test_confusion_map_sending_a_class_to_itself_is_refused(clean):
    with pytest.raises(ValueError, match="sends class 2 to itself"):
        add_class_dependent_label_noise(clean, 0.2, seed=0, confusions={0: 1, 2: 2})


def test_confusion_map_naming_a_class_twice_is_refused(clean):
    names = clean.cast_column("label", ClassLabel(names=list("abcdefg")))

    with pytest.raises(ValueError, match="names class 'a' .*twice"):
        add_class_dependent_label_noise(names, 0.2, seed=0, confusions={0: 1, "a": 2})


def test_more_flips_than_mapped_rows_is_refused(clean):
    with pytest.raises(ValueError, match=r"only \d+ of the 1001 rows belong to a class the confusion map names"):
        add_class_dependent_label_noise(clean, 0.5, seed=0, confusions={0: 1})


@pytest.mark.parametrize("rate", [-0.1, 1.0])
def test_class_dependent_rate_outside_unit_interval_is_refused(clean, rate):
    with pytest.raises(ValueError, match=r"rate must be in \[0, 1\)"):
        add_class_dependent_label_noise(clean, rate, seed=0, confusions=PARTIAL_CONFUSIONS)


def test_class_dependent_noise_refuses_what_symmetric_noise_refuses(clean):
    with pytest.raises(TypeError, match=r"add_class_dependent_label_noise takes one split"):
        add_class_dependent_label_noise(DatasetDict(train=clean), 0.2, seed=0, confusions=PARTIAL_CONFUSIONS)
    with pytest.raises(ValueError, match="clean label has to stay available"):
        add_class_dependent_label_noise(clean, 0.2, seed=0, confusions=PARTIAL_CONFUSIONS, noisy_column="label")
    with pytest.raises(ValueError, match="'row' must be a ClassLabel"):
        add_class_dependent_label_noise(clean, 0.2, seed=0, confusions=PARTIAL_CONFUSIONS, label_column="row")


def test_fashion_mnist_class_dependent_noise_on_the_real_training_split(shared_data):
    import datasets

    train = datasets.load_dataset(str(shared_data / "fashion_mnist"), split="train")

    noisy = add_class_dependent_label_noise(train, 0.4, seed=0, confusions=FASHION_MNIST_CONFUSIONS)

    label, noisy_label, flipped = (column_as_numpy(noisy, c) for c in ("label", "noisy_label", "label_flipped"))
    assert flipped.sum() == 24_000
    shirt, tshirt = train.features["label"].str2int("Shirt"), train.features["label"].str2int("T - shirt / top")
    assert set(noisy_label[flipped & (label == shirt)]) == {tshirt}
    assert 0.37 < flipped[label == shirt].mean() < 0.43  # 6,000 shirts, 40% +- 5 standard deviations


# -- one entry point for every split of a noise process -------------------------------------------


def test_add_label_noise_is_the_function_of_its_kind(clean):
    symmetric = add_label_noise(clean, 0.4, noise_type="symmetric", seed=5)
    dependent = add_label_noise(clean, 0.4, noise_type="class_dependent", seed=5, confusions=PARTIAL_CONFUSIONS)

    assert symmetric["noisy_label"] == add_symmetric_label_noise(clean, 0.4, seed=5)["noisy_label"]
    expected = add_class_dependent_label_noise(clean, 0.4, seed=5, confusions=PARTIAL_CONFUSIONS)
    assert dependent["noisy_label"] == expected["noisy_label"]
    assert dependent["label_flipped"] == expected["label_flipped"]


def test_add_label_noise_passes_the_column_names(clean):
    noisy = add_label_noise(clean, 0.2, noise_type="symmetric", seed=0, noisy_column="val_label", flipped_column="bad")

    assert {"val_label", "bad"} <= set(noisy.column_names) and "noisy_label" not in noisy.column_names


def test_add_label_noise_refuses_an_unknown_kind_and_a_missing_confusion_map(clean):
    with pytest.raises(ValueError, match=r"noise_type must be one of \('symmetric', 'class_dependent'\), got 'human'"):
        add_label_noise(clean, 0.2, noise_type="human", seed=0)
    with pytest.raises(ValueError, match="needs the confusion map.*FASHION_MNIST_CONFUSIONS"):
        add_label_noise(clean, 0.2, noise_type="class_dependent", seed=0)


@pytest.mark.parametrize("noise_type", ["symmetric", "class_dependent"])
def test_held_out_validation_rows_get_the_training_noise_process(shared_data, noise_type):
    import datasets

    train = datasets.load_dataset(str(shared_data / "fashion_mnist"), split="train")
    training, validation = train.select(range(2000)), train.select(range(len(train) - 1000, len(train)))
    kwargs = dict(noise_type=noise_type, confusions=FASHION_MNIST_CONFUSIONS)

    noisy_train = add_label_noise(training, 0.4, seed=0, **kwargs)
    noisy_validation = add_label_noise(validation, 0.4, seed=1000, **kwargs)

    for split, size in ((noisy_train, 2000), (noisy_validation, 1000)):
        label, noisy_label, flipped = (column_as_numpy(split, c) for c in ("label", "noisy_label", "label_flipped"))
        assert flipped.sum() == round(0.4 * size)
        assert np.all(noisy_label[flipped] != label[flipped]) and np.all(noisy_label[~flipped] == label[~flipped])
        if noise_type == "class_dependent":
            names = split.features["label"].names
            partner = [names.index(FASHION_MNIST_CONFUSIONS[name]) for name in names]
            np.testing.assert_array_equal(noisy_label[flipped], np.asarray(partner)[label[flipped]])
