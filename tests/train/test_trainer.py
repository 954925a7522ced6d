"""ClassBalancedBatches through the Trainer's sampler hook: balanced micro-batches, resumes, several processes."""

from __future__ import annotations

import json

import pytest
import torch

from hf_gaf import GAFTrainingArguments
from hf_gaf.train.data import ClassBalancedSampler
from hf_gaf.train.trainer import ClassBalancedGAFTrainer

from ..testing_utils import BatchRecordingClassifier, ClusterDataset, IndexedClusterDataset, train


def _balanced(dataset):
    return lambda **kwargs: ClassBalancedGAFTrainer(**kwargs, balance_labels=dataset.labels.numpy())


def test_every_micro_batch_is_balanced_and_an_epoch_uses_every_row_once(tmp_path):
    torch.manual_seed(0)
    model, dataset = BatchRecordingClassifier(), IndexedClusterDataset(size=60)
    train(
        str(tmp_path), model=model, dataset=dataset, trainer_class=_balanced(dataset), per_device_train_batch_size=6,
        gaf_threshold=2.0, max_steps=6, gradient_accumulation_steps=2,
    )  # fmt: skip
    assert len(model.batches) == 12
    for batch in model.batches:
        assert sorted(batch["labels"]) == [0, 0, 1, 1, 2, 2]
    epoch = [i for batch in model.batches[:10] for i in batch["index"]]
    assert len(set(epoch)) == len(epoch) == 60


def test_the_trainers_dataloader_options_are_honoured(tmp_path):
    dataset = IndexedClusterDataset(size=60)
    trainer = ClassBalancedGAFTrainer(
        model=BatchRecordingClassifier(), train_dataset=dataset, balance_labels=dataset.labels.numpy(),
        args=GAFTrainingArguments(
            output_dir=str(tmp_path), use_cpu=True, report_to="none", per_device_train_batch_size=6,
            gradient_accumulation_steps=2, dataloader_num_workers=2, dataloader_prefetch_factor=3,
            dataloader_pin_memory=False,
        ),
    )  # fmt: skip
    loader = trainer.get_train_dataloader()
    assert loader.num_workers == 2 and loader.prefetch_factor == 3 and not loader.pin_memory
    assert loader.batch_sampler.batch_size == 6 and isinstance(loader.batch_sampler.sampler, ClassBalancedSampler)


def test_resume_inside_the_third_epoch_draws_the_same_batches(tmp_path):
    # 48 rows in balanced batches of 6, K = 2: four steps per epoch; resume at step 9, inside the
    # third epoch. The sampler reshuffles per epoch, so the resumed run must see the same batches.
    dataset = IndexedClusterDataset(size=48)
    options = dict(
        dataset=dataset, trainer_class=_balanced(dataset), per_device_train_batch_size=6, gaf_threshold=0.9,
        max_steps=14, gradient_accumulation_steps=2, save_strategy="steps", save_steps=3,
    )  # fmt: skip
    torch.manual_seed(0)
    uninterrupted = BatchRecordingClassifier()
    full, _ = train(str(tmp_path / "full"), model=uninterrupted, **options)
    torch.manual_seed(0)
    resumed_model = BatchRecordingClassifier()
    resumed, _ = train(
        str(tmp_path / "resumed"), model=resumed_model, resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-9"),
        **options,
    )  # fmt: skip
    assert len(uninterrupted.batches) == 28 and len(resumed_model.batches) == 10
    assert uninterrupted.batches[:8] != uninterrupted.batches[8:16]  # epochs are reshuffled
    assert resumed_model.batches == uninterrupted.batches[-10:]
    for (name, p), q in zip(full.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(p, q), name
    assert resumed.gaf_state.state() == full.gaf_state.state()


def test_the_batch_size_must_be_a_multiple_of_the_class_count(tmp_path):
    dataset = ClusterDataset()
    with pytest.raises(ValueError, match="multiple of the number of classes"):
        train(str(tmp_path), dataset=dataset, trainer_class=_balanced(dataset), per_device_train_batch_size=4)


@pytest.mark.multiprocess
def test_every_process_gets_whole_balanced_batches_of_its_own(tmp_path, torchrun):
    torchrun(["-m", "tests.distributed.trainer_worker", str(tmp_path), "balanced"], 2)
    batches = [json.loads((tmp_path / f"rank{r}.json").read_text())["balanced_batches"] for r in range(2)]
    for rank_batches in batches:
        assert len(rank_batches) == 8 and all(sorted(b["labels"]) == [0, 0, 1, 1, 2, 2] for b in rank_batches)
    first = [set(b["index"]) for b in batches[0][:4]]
    second = [set(b["index"]) for b in batches[1][:4]]
    assert all(a.isdisjoint(b) for a in first for b in second), "each process must get its own whole batches"
