import numpy as np
import pytest
import torch
from accelerate.data_loader import BatchSamplerShard
from datasets import ClassLabel, Dataset, Features, Value
from torch.utils.data import DataLoader

from hf_gaf.train.data import ClassBalancedSampler

# Unequal classes: 0 has 10 rows, 1 has 7, 2 has 5, 3 has 12.
LABELS = np.array([0] * 10 + [1] * 7 + [2] * 5 + [3] * 12)
np.random.default_rng(0).shuffle(LABELS)


def batches_of(sampler):
    """The batches a DataLoader with the sampler's batch size cuts its indices into."""
    indices = list(sampler)
    assert len(indices) == len(sampler) and len(indices) % sampler.batch_size == 0
    return [indices[i : i + sampler.batch_size] for i in range(0, len(indices), sampler.batch_size)]


def assert_balanced(batches, samples_per_class, num_classes=4):
    for batch in batches:
        assert len(batch) == len(set(batch)) == samples_per_class * num_classes
        assert np.all(np.bincount(LABELS[batch], minlength=num_classes) == samples_per_class)


@pytest.mark.parametrize("samples_per_class", [1, 2, 5])
def test_drop_last_yields_min_floor_balanced_batches_without_reuse(samples_per_class):
    sampler = ClassBalancedSampler(LABELS, samples_per_class)

    batches = batches_of(sampler)

    assert sampler.num_batches == len(batches) == min(10, 7, 5, 12) // samples_per_class
    assert sampler.batch_size == 4 * samples_per_class
    assert_balanced(batches, samples_per_class)
    used = [index for batch in batches for index in batch]
    assert len(used) == len(set(used))


@pytest.mark.parametrize("samples_per_class", [1, 2, 5])
def test_cycling_yields_max_ceil_balanced_batches_covering_every_row(samples_per_class):
    sampler = ClassBalancedSampler(LABELS, samples_per_class, drop_last=False)

    batches = batches_of(sampler)

    assert sampler.num_batches == len(batches) == -(-12 // samples_per_class)
    assert_balanced(batches, samples_per_class)
    assert {index for batch in batches for index in batch} == set(range(len(LABELS)))


@pytest.mark.parametrize(("drop_last", "expected"), [(True, 4), (False, 12)])
def test_epochs_hold_whole_optimizer_steps(drop_last, expected):
    # 5 (drop_last) or 12 (cycling) batches, in steps of 4: 1 or 3 whole steps.
    sampler = ClassBalancedSampler(LABELS, 1, drop_last=drop_last, batches_per_step=4)

    batches = batches_of(sampler)

    assert sampler.num_batches == len(batches) == expected
    assert_balanced(batches, 1)


def test_too_few_batches_for_one_optimizer_step_is_refused():
    with pytest.raises(ValueError, match="batches_per_step=6 .* only 5"):
        ClassBalancedSampler(LABELS, 1, batches_per_step=6)


def test_same_seed_and_epoch_give_the_same_batches():
    first = ClassBalancedSampler(LABELS, 1, seed=7)
    second = ClassBalancedSampler(LABELS, 1, seed=7)
    first.epoch = 3
    second.epoch = 3

    assert batches_of(first) == batches_of(second)


def test_epochs_and_seeds_reshuffle():
    sampler = ClassBalancedSampler(LABELS, 1, seed=0)
    epoch_0 = batches_of(sampler)
    sampler.epoch = 1
    epoch_1 = batches_of(sampler)
    sampler.epoch = 0

    assert batches_of(sampler) == epoch_0
    assert epoch_1 != epoch_0
    assert batches_of(ClassBalancedSampler(LABELS, 1, seed=1)) != epoch_0


def test_each_pass_advances_the_epoch():
    sampler = ClassBalancedSampler(LABELS, 1, seed=0)
    reference = ClassBalancedSampler(LABELS, 1, seed=0)
    reference.epoch = 1

    batches_of(sampler)

    assert sampler.epoch == 1
    assert batches_of(sampler) == batches_of(reference)


def test_classes_absent_from_labels_count_when_num_classes_says_so():
    with pytest.raises(ValueError, match=r"classes \[4\] have \[0\]"):
        ClassBalancedSampler(LABELS, 1, num_classes=5)


def test_too_few_rows_for_samples_per_class_is_refused():
    with pytest.raises(ValueError, match=r"samples_per_class=6 rows, but classes \[2\] have \[5\]"):
        ClassBalancedSampler(LABELS, 6)


@pytest.mark.parametrize(
    ("labels", "samples_per_class", "message"),
    [
        ([], 1, "non-empty 1-D"),
        ([0.5, 1.0], 1, "integer class ids"),
        ([0, -1], 1, ">= 0"),
        ([0, 1], 0, "positive integer"),
    ],
)
def test_bad_arguments_are_refused(labels, samples_per_class, message):
    with pytest.raises(ValueError, match=message):
        ClassBalancedSampler(labels, samples_per_class)


def test_labels_larger_than_num_classes_are_refused():
    with pytest.raises(ValueError, match="num_classes is 3"):
        ClassBalancedSampler(LABELS, 1, num_classes=3)


def test_from_dataset_reads_the_classlabel_column_despite_a_transform():
    features = Features({"noisy_label": ClassLabel(num_classes=4), "x": Value("int64")})
    dataset = Dataset.from_dict({"noisy_label": LABELS, "x": np.arange(len(LABELS))}, features=features)
    dataset = dataset.with_transform(lambda batch: {"only": batch["x"]})

    sampler = ClassBalancedSampler.from_dataset(dataset, 2, label_column="noisy_label", seed=5)

    assert batches_of(sampler) == batches_of(ClassBalancedSampler(LABELS, 2, seed=5))
    with pytest.raises(ValueError, match="'x' must be a ClassLabel"):
        ClassBalancedSampler.from_dataset(dataset, 2, label_column="x")


def test_works_as_a_dataloader_sampler():
    sampler = ClassBalancedSampler(LABELS, 1)
    loader = DataLoader(torch.as_tensor(LABELS), sampler=sampler, batch_size=sampler.batch_size)

    batches = list(loader)

    assert len(batches) == sampler.num_batches
    assert all(sorted(batch.tolist()) == [0, 1, 2, 3] for batch in batches)


@pytest.mark.parametrize("drop_last", [True, False])
def test_every_process_gets_whole_balanced_batches_under_accelerate(drop_last):
    num_processes = 3

    def shard(rank):
        sampler = ClassBalancedSampler(LABELS, 1, seed=2, drop_last=drop_last, batches_per_step=num_processes)
        batch_sampler = torch.utils.data.BatchSampler(sampler, sampler.batch_size, drop_last=False)
        return [list(batch) for batch in BatchSamplerShard(batch_sampler, num_processes, rank)]

    shards = [shard(rank) for rank in range(num_processes)]

    assert len({len(s) for s in shards}) == 1
    for batches in shards:
        assert_balanced(batches, 1)
    all_batches = [batch for batches in shards for batch in batches]
    sampled = batches_of(ClassBalancedSampler(LABELS, 1, seed=2, drop_last=drop_last, batches_per_step=num_processes))
    assert sorted(all_batches) == sorted(sampled)
