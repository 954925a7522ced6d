"""Tiny models, synthetic data and recorders shared by the GAFTrainer tests and their torchrun workers."""

from __future__ import annotations

import hashlib
import json

import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments

from hf_gaf import GAFTrainer, GAFTrainingArguments

NUM_FEATURES = 8
NUM_CLASSES = 3


class TinyClassifier(nn.Module):
    """Two linear layers returning `{"loss", "logits"}`, like a transformers model with labels."""

    def __init__(self, num_features: int = NUM_FEATURES, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.hidden = nn.Linear(num_features, 16)
        self.head = nn.Linear(16, num_classes)

    def forward(self, x, labels=None):
        logits = self.head(torch.tanh(self.hidden(x)))
        loss = nn.functional.cross_entropy(logits.float(), labels) if labels is not None else None
        return {"loss": loss, "logits": logits}


class ClusterDataset(torch.utils.data.Dataset):
    """Separable Gaussian clusters, one per class; `flip_labels` shifts every label (adversarial data)."""

    def __init__(
        self, size: int = 96, seed: int = 0, flip_labels: bool = False, spread: float = 1.0, num_classes: int = NUM_CLASSES
    ):
        g = torch.Generator().manual_seed(seed)
        centers = 3.0 * torch.randn(num_classes, NUM_FEATURES, generator=g)
        self.labels = torch.arange(size) % num_classes
        self.x = centers[self.labels] + spread * torch.randn(size, NUM_FEATURES, generator=g)
        if flip_labels:
            self.labels = (self.labels + 1) % num_classes

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.labels[i]}


class IndexedClusterDataset(ClusterDataset):
    """`ClusterDataset` whose items also carry their index, for checking which samples a batch holds."""

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.labels[i], "index": torch.tensor(i)}


class BatchRecordingClassifier(TinyClassifier):
    """`TinyClassifier` that records the labels and dataset indices of every training batch."""

    def __init__(self, num_classes: int = NUM_CLASSES):
        super().__init__(num_classes=num_classes)
        self.batches: list[dict[str, list[int]]] = []

    def forward(self, x, labels=None, index=None):
        if self.training and index is not None:
            self.batches.append({"labels": labels.tolist(), "index": index.tolist()})
        return super().forward(x, labels)


def parameter_digest(model: nn.Module) -> str:
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class Recorder(TrainerCallback):
    """Records, after every optimizer step, a parameter digest, the learning rate and GAF's decision."""

    def __init__(self):
        self.trainer: Trainer | None = None
        self.digests: list[str] = []
        self.accepted: list[list[bool]] = []
        self.skipped: list[bool] = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.digests.append(parameter_digest(model))
        result = getattr(self.trainer, "gaf_last_result", None)
        if result is not None:
            self.accepted.append(result.accepted.tolist())
            self.skipped.append(bool(result.skipped))

    def to_json(self) -> dict:
        return {"digests": self.digests, "accepted": self.accepted, "skipped": self.skipped}


def train(
    output_dir: str,
    *,
    gaf: bool = True,
    dataset: torch.utils.data.Dataset | None = None,
    model_seed: int = 0,
    resume_from_checkpoint: str | None = None,
    num_classes: int = NUM_CLASSES,
    model: nn.Module | None = None,
    **overrides,
) -> tuple[Trainer, Recorder]:
    """Train a `TinyClassifier` with `GAFTrainer` (or the plain `Trainer`) on CPU and return it."""
    options = dict(
        output_dir=output_dir,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        max_steps=6,
        learning_rate=0.05,
        logging_steps=1,
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,
    )
    options.update(overrides)
    torch.manual_seed(model_seed)
    model = model if model is not None else TinyClassifier(num_classes=num_classes)
    recorder = Recorder()
    if gaf:
        trainer = GAFTrainer(model=model, args=GAFTrainingArguments(**options), train_dataset=dataset or ClusterDataset(), callbacks=[recorder])
    else:
        options = {k: v for k, v in options.items() if not k.startswith("gaf_")}
        trainer = Trainer(model=model, args=TrainingArguments(**options), train_dataset=dataset or ClusterDataset(), callbacks=[recorder])
    recorder.trainer = trainer
    trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    return trainer, recorder


def parameters_json(model: nn.Module) -> list[list[float]]:
    return [p.detach().reshape(-1).tolist() for p in model.parameters()]


def dump(path: str, payload: dict) -> None:
    with open(path, "w") as f:
        json.dump(payload, f)
