import numpy as np
import pytest
import torch
from accelerate.data_loader import BatchSamplerShard
from datasets import ClassLabel, Dataset, Features, Value
from torch.utils.data import DataLoader

from hf_gaf.data import ClassBalancedBatchSampler

# Unequal classes: 0 has 10 rows, 1 has 7, 2 has 5, 3 has 12.
LABELS = np.array([0] * 10 + [1] * 7 + [2] * 5 + [3] * 12)
np.random.default_rng(0).shuffle(LABELS)


def batches_of(sampler):
    return [list(batch) for batch in sampler]


def assert_balanced(batches, samples_per_class, num_classes=4):
    for batch in batches:
        assert len(batch) == len(set(batch)) == samples_per_class * num_classes
        assert np.all(np.bincount(LABELS[batch], minlength=num_classes) == samples_per_class)


@pytest.mark.parametrize("samples_per_class", [1, 2, 5])
def test_drop_last_yields_min_floor_balanced_batches_without_reuse(samples_per_class):
    sampler = ClassBalancedBatchSampler(LABELS, samples_per_class)

    batches = batches_of(sampler)

    assert len(sampler) == len(batches) == min(10, 7, 5, 12) // samples_per_class
    assert sampler.batch_size == 4 * samples_per_class
    assert_balanced(batches, samples_per_class)
    used = [index for batch in batches for index in batch]
    assert len(used) == len(set(used))


@pytest.mark.parametrize("samples_per_class", [1, 2, 5])
def test_cycling_yields_max_ceil_balanced_batches_covering_every_row(samples_per_class):
    sampler = ClassBalancedBatchSampler(LABELS, samples_per_class, drop_last=False)

    batches = batches_of(sampler)

    assert len(sampler) == len(batches) == -(-12 // samples_per_class)
    assert_balanced(batches, samples_per_class)
    assert {index for batch in batches for index in batch} == set(range(len(LABELS)))


@pytest.mark.parametrize(("drop_last", "expected"), [(True, 4), (False, 12)])
def test_epochs_hold_whole_optimizer_steps(drop_last, expected):
    # 5 (drop_last) or 12 (cycling) batches, in steps of 4: 1 or 3 whole steps.
    sampler = ClassBalancedBatchSampler(LABELS, 1, drop_last=drop_last, batches_per_step=4)

    batches = batches_of(sampler)

    assert len(sampler) == len(batches) == expected
    assert_balanced(batches, 1)


def test_too_few_batches_for_one_optimizer_step_is_refused():
    with pytest.raises(ValueError, match="batches_per_step=6 .* only 5"):
        ClassBalancedBatchSampler(LABELS, 1, batches_per_step=6)


def test_same_seed_and_epoch_give_the_same_batches():
    first = ClassBalancedBatchSampler(LABELS, 1, seed=7)
    second = ClassBalancedBatchSampler(LABELS, 1, seed=7)
    first.set_epoch(3)
    second.set_epoch(3)

    assert batches_of(first) == batches_of(second)


def test_epochs_and_seeds_reshuffle():
    sampler = ClassBalancedBatchSampler(LABELS, 1, seed=0)
    epoch_0 = batches_of(sampler)
    sampler.set_epoch(1)
    epoch_1 = batches_of(sampler)
    sampler.set_epoch(0)

    assert batches_of(sampler) == epoch_0
    assert epoch_1 != epoch_0
    assert batches_of(ClassBalancedBatchSampler(LABELS, 1, seed=1)) != epoch_0


def test_each_pass_advances_the_epoch_when_set_epoch_is_not_called():
    sampler = ClassBalancedBatchSampler(LABELS, 1, seed=0)
    reference = ClassBalancedBatchSampler(LABELS, 1, seed=0)
    reference.set_epoch(1)

    batches_of(sampler)

    assert sampler.epoch == 1
    assert batches_of(sampler) == batches_of(reference)


def test_classes_absent_from_labels_count_when_num_classes_says_so():
    with pytest.raises(ValueError, match=r"classes \[4\] have \[0\]"):
        ClassBalancedBatchSampler(LABELS, 1, num_classes=5)


def test_too_few_rows_for_samples_per_class_is_refused():
    with pytest.raises(ValueError, match=r"samples_per_class=6 rows, but classes \[2\] have \[5\]"):
        ClassBalancedBatchSampler(LABELS, 6)


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
        ClassBalancedBatchSampler(labels, samples_per_class)


def test_labels_larger_than_num_classes_are_refused():
    with pytest.raises(ValueError, match="num_classes is 3"):
        ClassBalancedBatchSampler(LABELS, 1, num_classes=3)


def test_from_dataset_reads_the_classlabel_column_despite_a_transform():
    features = Features({"noisy_label": ClassLabel(num_classes=4), "x": Value("int64")})
    dataset = Dataset.from_dict({"noisy_label": LABELS, "x": np.arange(len(LABELS))}, features=features)
    dataset = dataset.with_transform(lambda batch: {"only": batch["x"]})

    sampler = ClassBalancedBatchSampler.from_dataset(dataset, 2, label_column="noisy_label", seed=5)

    assert batches_of(sampler) == batches_of(ClassBalancedBatchSampler(LABELS, 2, seed=5))
    with pytest.raises(ValueError, match="'x' must be a ClassLabel"):
        ClassBalancedBatchSampler.from_dataset(dataset, 2, label_column="x")


def test_works_as_a_dataloader_batch_sampler():
    sampler = ClassBalancedBatchSampler(LABELS, 1)
    loader = DataLoader(torch.as_tensor(LABELS), batch_sampler=sampler)

    batches = list(loader)

    assert len(batches) == len(sampler)
    assert all(sorted(batch.tolist()) == [0, 1, 2, 3] for batch in batches)


@pytest.mark.parametrize("drop_last", [True, False])
def test_every_process_gets_whole_balanced_batches_under_accelerate(drop_last):
    num_processes = 3
    shards = [
        batches_of(
            BatchSamplerShard(ClassBalancedBatchSampler(LABELS, 1, seed=2, drop_last=drop_last), num_processes, rank)
        )
        for rank in range(num_processes)
    ]

    assert len({len(shard) for shard in shards}) == 1
    for shard in shards:
        assert_balanced(shard, 1)
    all_batches = [batch for shard in shards for batch in shard]
    sampled = batches_of(ClassBalancedBatchSampler(LABELS, 1, seed=2, drop_last=drop_last))
    assert all(batch in sampled for batch in all_batches)
