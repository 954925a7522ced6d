"""Tiny models, synthetic data, recorders and training helpers shared by the tests and their torchrun workers."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments

from hf_gaf import GAFArguments, GAFMixin, GAFTrainer, GAFTrainingArguments, compat

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

NUM_FEATURES = 8
NUM_CLASSES = 3

# TrainingArguments every test run shares: CPU, no logging integrations, no saving.
BASE_OPTIONS = dict(
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


class BranchyClassifier(TinyClassifier):
    """A head that is never used, and a branch only micro-batches whose first label is 0 go through.

    So in a step some parameters get no gradient at all (`unused`), and some get one in some
    micro-batches only (`branch`): what LayerDrop, conditional computation and MoE experts do.
    """

    def __init__(self, num_classes: int = NUM_CLASSES):
        super().__init__(num_classes=num_classes)
        self.branch = nn.Linear(16, 16)
        self.unused = nn.Linear(16, num_classes)

    def forward(self, x, labels=None):
        hidden = torch.tanh(self.hidden(x))
        if labels is not None and int(labels[0]) == 0:
            hidden = hidden + torch.tanh(self.branch(hidden))
        logits = self.head(hidden)
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
    """Records, after every optimizer step, a parameter digest and GAF's decision."""

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
    trainer_class: type[Trainer] | None = None,
    args_class: type[TrainingArguments] | None = None,
    callbacks: list[TrainerCallback] | None = None,
    **overrides,
) -> tuple[Trainer, Recorder]:
    """Train a `TinyClassifier` (or `model`) with `GAFTrainer` (`gaf=False`: the plain `Trainer`) on CPU.

    `callbacks` that have a `trainer` attribute get the trainer before training starts.
    """
    options = {**BASE_OPTIONS, "output_dir": output_dir, **overrides}
    torch.manual_seed(model_seed)
    model = model if model is not None else TinyClassifier(num_classes=num_classes)
    recorder = Recorder()
    if gaf:
        trainer_class, args_class = trainer_class or GAFTrainer, args_class or GAFTrainingArguments
    else:
        trainer_class, args_class = trainer_class or Trainer, args_class or TrainingArguments
        options = {k: v for k, v in options.items() if not k.startswith("gaf_")}
    trainer = trainer_class(
        model=model,
        args=args_class(**options),
        train_dataset=dataset if dataset is not None else ClusterDataset(),
        callbacks=[recorder, *(callbacks or [])],
    )
    for callback in (recorder, *(callbacks or [])):
        if hasattr(callback, "trainer"):
            callback.trainer = trainer
    trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    return trainer, recorder


needs_fsdp2 = pytest.mark.skipif(
    not compat.fsdp2_supported(), reason=f"GAF under FSDP2 needs torch >= {compat.FSDP2_MINIMUM_TORCH}"
)


class FSDP2OnCPU:
    """Trainer mixin: accelerate's FSDP2 path on CPU processes (gloo), which accelerate itself runs only on accelerators.

    With `use_cpu=True` accelerate sets up data parallelism and drops an FSDP plugin; this puts
    the FSDP2 plugin back (one `fully_shard` per decoder layer, as `fsdp_config` with
    `transformer_layer_cls_to_wrap` asks) and marks the process state as FSDP, so that the
    Trainer, accelerate and GAF take their FSDP2 code paths: wrapping, `no_sync`, gradient
    clipping, sharded checkpoints. A test device, not a way to train: a GPU runs the real one
    (benchmarks/gpu_check.py).
    """

    fsdp_layers = ("LlamaDecoderLayer",)

    def create_accelerator_and_postprocess(self):
        from accelerate.state import PartialState
        from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

        super().create_accelerator_and_postprocess()
        plugin = FullyShardedDataParallelPlugin(
            fsdp_version=2, auto_wrap_policy="transformer_based_wrap", transformer_cls_names_to_wrap=list(self.fsdp_layers)
        )
        self.accelerator.state.fsdp_plugin = plugin
        self.accelerator.state.distributed_type = DistributedType.FSDP
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # AcceleratorState copies it on every init
        self.is_fsdp_enabled = True


def gathered_parameters(model: nn.Module) -> list[list[float]]:
    """Every parameter, whole (an FSDP2 `DTensor` gathered from its shards), flat, as lists."""
    return [(p.full_tensor() if hasattr(p, "full_tensor") else p).detach().reshape(-1).tolist() for p in model.parameters()]


class CountingTrainer(Trainer):
    """A user's own Trainer subclass: a custom loss (mean-squared logit penalty added) and its own log entry."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs)
        loss = outputs["loss"] + 0.01 * outputs["logits"].float().pow(2).mean()
        return (loss, outputs) if return_outputs else loss

    def log(self, logs, *args, **kwargs):
        logs["custom/seen"] = 1.0
        super().log(logs, *args, **kwargs)


class GAFCountingTrainer(GAFMixin, CountingTrainer):
    """`CountingTrainer` with GAF, the two-line recipe."""


@dataclass
class GAFCountingArguments(GAFArguments, TrainingArguments):
    """Arguments for `GAFCountingTrainer`."""


def parameters_json(model: nn.Module) -> list[list[float]]:
    return [p.detach().reshape(-1).tolist() for p in model.parameters()]


def max_difference(a: nn.Module, b: nn.Module) -> float:
    return max(float((p.detach() - q.detach()).abs().max()) for p, q in zip(a.parameters(), b.parameters()))


def dump(path: str, payload: dict) -> None:
    with open(path, "w") as f:
        json.dump(payload, f)
