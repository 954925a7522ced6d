"""Train an image classifier with GAF: `python -m hf_gaf.train` (or `accelerate launch -m hf_gaf.train`).

Every option comes through [`~transformers.HfArgumentParser`]: the
[`~hf_gaf.GAFTrainingArguments`] (all of `TrainingArguments` plus `--gaf_*`) and the data and
model arguments below; a single `.json` file instead of flags works too. With no arguments it
trains on the embedded handwritten digits with 40% symmetric label noise, offline, in about a
minute on a CPU, then prints the clean test accuracy, how much of the corrupted training labels
the model memorised, the GAF statistics and where the logs went.

Examples:

```bash
python -m hf_gaf.train                                  # GAF on the embedded digits
python -m hf_gaf.train --baseline                       # the same run with plain averaging
accelerate launch -m hf_gaf.train --dataset uoft-cs/cifar100 \\
    --noisy_labels CIFAR-100_human.pt --model_name resnetv2_34 ...   # CIFAR-100N
```
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Any

import datasets
import numpy as np
import torch
from datasets import ClassLabel, DatasetDict
from transformers import HfArgumentParser, TrainerState, set_seed
from transformers.integrations import TensorBoardCallback

from .. import rule
from ..arguments import GAF_DESCRIPTION, GAF_FIELDS, GAFTrainingArguments
from .checkpoints import last_complete_checkpoint
from .data import (
    CIFAR100_MEAN,
    CIFAR100_STD,
    FASHION_MNIST_CONFUSIONS,
    FLIPPED_COLUMN,
    NOISY_LABEL_COLUMN,
    HubUnreachableError,
    add_class_dependent_label_noise,
    add_symmetric_label_noise,
    channel_mean_std,
    collate_image_classification,
    hub_errors_explained,
    image_classification_transform,
    load_cifar100n,
    load_digits_dataset,
)
from .data.columns import column_as_numpy
from .metrics import accuracy_metrics, argmax_logits, compute_memorization
from .models import create_image_classifier
from .trainer import ClassBalancedGAFTrainer

EMBEDDED_DATASET = "digits"

# The default run: the embedded digits, one sample of each class per micro-batch and two
# micro-batches per step as in the paper, SGD with momentum; the configuration of
# benchmarks/noise_sweep.py (docs/results.md says why it departs from the paper's lr and decay).
DEFAULTS: dict[str, Any] = {
    "output_dir": "outputs/gaf-digits",
    "learning_rate": 0.05,
    "optim": "sgd",
    "optim_args": "momentum=0.9",
    "weight_decay": 0.0,
    "lr_scheduler_type": "constant",
    "max_steps": 2000,
    "per_device_train_batch_size": 10,
    "per_device_eval_batch_size": 256,
    "gradient_accumulation_steps": 2,
    "class_balanced_batches": True,
    "logging_steps": 200,
    "eval_strategy": "no",
    "save_strategy": "no",
    "report_to": ["tensorboard"],
    "remove_unused_columns": False,
    "dataloader_num_workers": 0,
    "seed": 0,
}

# What the embedded digits need that other datasets do not: a narrow ResNet (0.32M parameters)
# on the native 8x8 grayscale images, without the padded crop that would erase most of a digit.
DIGITS_MODEL_KWARGS = {"layers": [1, 1, 1, 1], "channels": [16, 32, 64, 128]}


@dataclass
class DataArguments:
    """Which images and labels to train on, and how much label noise to add."""

    dataset: str = field(
        default=EMBEDDED_DATASET,
        metadata={
            "help": "'digits' (scikit-learn's handwritten digits, embedded, no network) or anything "
            "datasets.load_dataset accepts: a Hub id (uoft-cs/cifar100, ILSVRC/imagenet-1k) or a local folder "
            "in the same format."
        },
    )
    noisy_labels: str | None = field(
        default=None,
        metadata={
            "help": "CIFAR-100N human labels for the training split: a local CIFAR-100_human.pt or "
            "hf://datasets/<repo>/<path>. Needs a dataset in the uoft-cs/cifar100 format."
        },
    )
    noise_rate: float = field(
        default=0.4,
        metadata={"help": "Fraction of training labels flipped (see --noise_type)."},
    )
    noise_type: str = field(
        default="symmetric",
        metadata={
            "help": "Where a flipped label goes: 'symmetric' (to a different random class) or 'class_dependent' (to "
            "the class it is confused with, by the Fashion-MNIST confusion map "
            "hf_gaf.train.data.FASHION_MNIST_CONFUSIONS: five swapped pairs such as Shirt and T-shirt/top).",
            "choices": ["symmetric", "class_dependent"],
        },
    )
    noise_seed: int = field(default=0, metadata={"help": "Seed of the label noise (independent of --seed)."})
    image_column: str | None = field(
        default=None, metadata={"help": "Image column (default: 'img' if present, else 'image')."}
    )
    label_column: str | None = field(
        default=None,
        metadata={"help": "Clean label column (default: 'fine_label' if present, else 'label')."},
    )
    train_split: str = field(default="train", metadata={"help": "Split to train on."})
    eval_split: str = field(default="test", metadata={"help": "Split with clean labels to evaluate on."})
    image_size: int | None = field(
        default=None, metadata={"help": "Resize images to this size (default: keep the stored size)."}
    )
    augment: bool | None = field(
        default=None,
        metadata={"help": "Random padded crop and horizontal flip on training images (default: on, off for digits)."},
    )
    crop_padding: int = field(default=4, metadata={"help": "Padding of the random crop (4 in the paper)."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Truncate the training split."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Truncate the evaluation split."})
    class_balanced_batches: bool = field(
        default=False,
        metadata={
            "help": "Draw every training micro-batch with exactly per_device_train_batch_size / num_classes samples "
            "of each class (of the labels trained on), so micro-gradients differ by their samples, not their class mix."
        },
    )


@dataclass
class ModelArguments:
    """Which timm architecture to train."""

    model_name: str = field(
        default="resnet18",
        metadata={"help": "timm architecture: resnet18, resnet34, resnetv2_34 (PreAct), vit_large_patch16_224, ..."},
    )
    pretrained: bool = field(
        default=False, metadata={"help": "Start from timm's pretrained weights (needs the Hub or its cache)."}
    )
    model_kwargs: str | None = field(
        default=None,
        metadata={
            "help": "JSON object of timm architecture arguments, e.g. '{\"drop_path_rate\": 0.1}' (default: none; "
            f"for digits {json.dumps(DIGITS_MODEL_KWARGS)}, a narrow ResNet-10)."
        },
    )
    num_channels: int | None = field(
        default=None,
        metadata={"help": "Input channels; images are converted (default: 3, and 1 for the grayscale digits)."},
    )

    def timm_kwargs(self, dataset: str) -> dict[str, Any]:
        if self.model_kwargs is None:
            return dict(DIGITS_MODEL_KWARGS) if dataset == EMBEDDED_DATASET else {}
        kwargs = json.loads(self.model_kwargs)
        if not isinstance(kwargs, dict):
            raise ValueError(f"--model_kwargs must be a JSON object, got {self.model_kwargs!r}.")
        return kwargs


@dataclass
class RunArguments:
    """Options of this script itself."""

    baseline: bool = field(
        default=False, metadata={"help": "Plain averaging instead of GAF (the same as --gaf_threshold 2)."}
    )


def has_accelerator() -> bool:
    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6
    return accelerator.is_available() if accelerator is not None else torch.cuda.is_available()


THREADS_HELP = (
    "Threads: unless OMP_NUM_THREADS is set, each process uses one intra-op thread per 4M trainable parameters, "
    "at most its share of the CPU cores (one for the embedded digits' 0.32M-parameter model): more threads than "
    "a model can use spin-wait, and collapse on a machine whose cores other jobs share."
)


def build_parser() -> HfArgumentParser:
    """The entry point's parser; its `--help` shows the GAF options as a group of their own."""
    parser = HfArgumentParser(
        (DataArguments, ModelArguments, RunArguments, GAFTrainingArguments),
        description=f"{__doc__.splitlines()[0]}\n\n{THREADS_HELP}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    group = parser.add_argument_group("Gradient Agreement Filtering", GAF_DESCRIPTION)
    for action in parser._actions:  # argparse has no public way to regroup options
        if action.dest in GAF_FIELDS:
            for container in parser._action_groups:
                if action in container._group_actions:
                    container._group_actions.remove(action)
            group._group_actions.append(action)
    # transformers runs DDP on CPU only with use_cpu; without a GPU, torchrun/accelerate launch need it.
    parser.set_defaults(**DEFAULTS, use_cpu=not has_accelerator())
    return parser


def parse_arguments(argv: list[str] | None = None):
    """The command line (or a single `.json` file of the same options) as the four dataclasses, with the job's defaults."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 1 and argv[0].endswith(".json"):
        with open(argv[0]) as f:
            return parser.parse_dict({**DEFAULTS, "use_cpu": not has_accelerator(), **json.load(f)})
    return parser.parse_args_into_dataclasses(args=argv)


def set_threads(model: torch.nn.Module, processes_per_node: int) -> int:
    """Set torch's intra-op threads for `model` (see `THREADS_HELP`) unless OMP_NUM_THREADS chose; returns them."""
    if "OMP_NUM_THREADS" in os.environ:
        return torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    threads = max(1, min(cores // max(processes_per_node, 1), 1 + parameters // 4_000_000))
    torch.set_num_threads(threads)
    return threads


def check_microgradients(training_args: GAFTrainingArguments) -> None:
    """Refuse, before any data or model is built, a run with one micro-gradient per step (the library's check)."""
    rule.check_microgradients(training_args.world_size, training_args.gradient_accumulation_steps)


def resolve_dataset_defaults(data_args: DataArguments, model_args: ModelArguments) -> None:
    """Fill the options left unset (None) with what the chosen dataset needs."""
    digits = data_args.dataset == EMBEDDED_DATASET
    if data_args.augment is None:
        data_args.augment = not digits
    if model_args.num_channels is None:
        model_args.num_channels = 1 if digits else 3


def load_splits(data_args: DataArguments) -> DatasetDict:
    """The raw splits: digits, CIFAR-100N, or any image classification dataset from the Hub."""
    if data_args.dataset == EMBEDDED_DATASET:
        return load_digits_dataset()
    if data_args.noisy_labels is not None:
        return load_cifar100n(data_args.dataset, data_args.noisy_labels)
    with hub_errors_explained(f"dataset {data_args.dataset!r}"):
        return datasets.load_dataset(data_args.dataset)


def pick_column(split: datasets.Dataset, chosen: str | None, candidates: tuple[str, ...], what: str) -> str:
    if chosen is not None:
        if chosen not in split.column_names:
            raise ValueError(f"--{what}_column {chosen!r} is not a column; the dataset has {split.column_names}.")
        return chosen
    for name in candidates:
        if name in split.column_names:
            return name
    raise ValueError(f"No {what} column among {split.column_names}; name it with --{what}_column.")


def prepare_data(data_args: DataArguments, model_args: ModelArguments) -> dict[str, Any]:
    """Load, add label noise, and attach transforms; returns datasets and column names."""
    splits = load_splits(data_args)
    for name in (data_args.train_split, data_args.eval_split):
        if name not in splits:
            raise ValueError(f"Split {name!r} not found; the dataset has {list(splits)} (see --train_split/--eval_split).")
    train, evaluation = splits[data_args.train_split], splits[data_args.eval_split]
    if data_args.max_train_samples is not None:
        train = train.select(range(min(data_args.max_train_samples, len(train))))
    if data_args.max_eval_samples is not None:
        evaluation = evaluation.select(range(min(data_args.max_eval_samples, len(evaluation))))
    image_column = pick_column(train, data_args.image_column, ("img", "image"), "image")
    label_column = pick_column(train, data_args.label_column, ("fine_label", "label"), "label")

    if NOISY_LABEL_COLUMN in train.column_names:
        if data_args.noise_rate:
            print(f"--noise_rate ignored: the training split already carries {NOISY_LABEL_COLUMN!r} labels.")
    elif data_args.noise_rate > 0 and data_args.noise_type == "class_dependent":
        train = add_class_dependent_label_noise(
            train, data_args.noise_rate, seed=data_args.noise_seed, confusions=FASHION_MNIST_CONFUSIONS,
            label_column=label_column,
        )
    elif data_args.noise_rate > 0:
        train = add_symmetric_label_noise(train, data_args.noise_rate, seed=data_args.noise_seed, label_column=label_column)
    train_label_column = NOISY_LABEL_COLUMN if NOISY_LABEL_COLUMN in train.column_names else label_column

    if data_args.dataset == EMBEDDED_DATASET or model_args.num_channels != 3:
        mean, std = channel_mean_std(train, image_column=image_column, num_channels=model_args.num_channels)
    else:
        mean, std = CIFAR100_MEAN, CIFAR100_STD
    common = dict(
        mean=mean, std=std, image_column=image_column, image_size=data_args.image_size, num_channels=model_args.num_channels
    )
    labels: ClassLabel = train.features[label_column]
    return {
        "train": train.with_transform(
            image_classification_transform(
                train=data_args.augment, crop_padding=data_args.crop_padding, label_column=train_label_column, **common
            )
        ),
        "train_eval": train.with_transform(
            image_classification_transform(train=False, label_column=train_label_column, **common)
        ),
        "test": evaluation.with_transform(image_classification_transform(train=False, label_column=label_column, **common)),
        "raw_train": train,
        "label_column": label_column,
        "train_label_column": train_label_column,
        "label_names": labels.names,
        "image_size": data_args.image_size or _stored_image_size(train, image_column),
    }


def _stored_image_size(split: datasets.Dataset, image_column: str) -> int:
    width, height = split[0][image_column].size
    return max(width, height)


def build_trainer(argv: list[str] | None = None) -> tuple[ClassBalancedGAFTrainer, dict[str, Any]]:
    """Parse `argv` (default: the command line), prepare the data and return the untrained trainer.

    Also returns the prepared data ([`prepare_data`]), which [`evaluate_run`] needs for the
    memorisation of the corrupted labels. Benchmarks build their runs here, so that they train
    exactly what `python -m hf_gaf.train` trains.
    """
    data_args, model_args, run_args, training_args = parse_arguments(argv)
    if run_args.baseline:
        training_args.gaf_threshold = 2.0
    check_microgradients(training_args)
    resolve_dataset_defaults(data_args, model_args)
    set_seed(training_args.seed)
    data = prepare_data(data_args, model_args)
    model = create_image_classifier(
        model_args.model_name,
        len(data["label_names"]),
        image_size=data["image_size"],
        in_chans=model_args.num_channels,
        pretrained=model_args.pretrained,
        id2label=data["label_names"],
        **model_args.timm_kwargs(data_args.dataset),
    )
    set_threads(model, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    balance = data_args.class_balanced_batches
    trainer = ClassBalancedGAFTrainer(
        model=model,
        args=training_args,
        train_dataset=data["train"],
        eval_dataset=data["test"],
        data_collator=collate_image_classification,
        compute_metrics=accuracy_metrics(),
        preprocess_logits_for_metrics=argmax_logits,
        balance_labels=column_as_numpy(data["raw_train"], data["train_label_column"]) if balance else None,
        num_classes=len(data["label_names"]),
    )
    return trainer, data


def evaluate_run(trainer: ClassBalancedGAFTrainer, data: dict[str, Any]) -> dict[str, float]:
    """After training: clean test metrics (`test_*`), memorisation of the corrupted training labels
    (`train_*`, when labels were corrupted) and the GAF totals (`gaf/*`)."""
    results = {f"test_{k.removeprefix('eval_')}": v for k, v in trainer.evaluate(metric_key_prefix="eval").items()}
    raw_train = data["raw_train"]
    flipped = np.asarray(raw_train[FLIPPED_COLUMN]) if FLIPPED_COLUMN in raw_train.column_names else None
    if flipped is not None and flipped.any():
        prediction = trainer.predict(data["train_eval"], metric_key_prefix="train")
        memorization = compute_memorization(
            prediction.predictions,
            prediction.label_ids,
            np.asarray(raw_train[data["label_column"]]),
            flipped=flipped,
        )
        results.update({f"train_{k}": v for k, v in memorization.items()})
    results.update(trainer.gaf_state.summary())
    return results


def resume_point(resume_from_checkpoint: str | None, output_dir: str) -> str | None:
    """What to resume from: a path as given, or for `True`/`last` the newest complete checkpoint of `output_dir`."""
    if resume_from_checkpoint is None or resume_from_checkpoint.lower() in ("false", "none", ""):
        return None
    if resume_from_checkpoint.lower() not in ("true", "last"):
        return resume_from_checkpoint
    checkpoint, skipped = last_complete_checkpoint(output_dir)
    for partial in skipped:
        print(f"Skipping {partial}: it is incomplete (a job killed while saving it?); resuming from an earlier one.")
    if checkpoint is None:
        raise FileNotFoundError(f"--resume_from_checkpoint {resume_from_checkpoint}: no complete checkpoint in {output_dir}.")
    return str(checkpoint)


def finished_checkpoint(checkpoint: str | None, args) -> TrainerState | None:
    """The state of `checkpoint` when it already reached the run's last step (`--max_steps`, or the epochs'), else None.

    The Trainer resumed from such a checkpoint would train one more step; the entry point evaluates it instead.
    """
    if checkpoint is None:
        return None
    state = TrainerState.load_from_json(os.path.join(checkpoint, "trainer_state.json"))
    last = args.max_steps if args.max_steps > 0 else state.max_steps
    return state if state.global_step >= last > 0 else None


def evaluate_checkpoint(trainer: ClassBalancedGAFTrainer, checkpoint: str, state: TrainerState) -> None:
    """Give `trainer` the model, the Trainer state and the GAF state of a finished `checkpoint`, without training."""
    trainer.model = type(trainer.model).from_pretrained(checkpoint).to(trainer.args.device)
    trainer.state = state
    trainer.gaf_state.restore(state)


def main(argv: list[str] | None = None) -> dict[str, float]:
    trainer, data = build_trainer(argv)
    checkpoint = resume_point(trainer.args.resume_from_checkpoint, trainer.args.output_dir)
    finished = finished_checkpoint(checkpoint, trainer.args)
    if finished is not None:
        print(
            f"{checkpoint} already reached the last step of this run (global step {finished.global_step} of "
            f"{finished.max_steps}): evaluating it, without training. Raise --max_steps (or --num_train_epochs) to "
            "train on from it."
        )
        evaluate_checkpoint(trainer, checkpoint, finished)
    else:
        trainer.train(resume_from_checkpoint=checkpoint)
    results = evaluate_run(trainer, data)
    trainer.log_metrics("final", results)
    trainer.save_metrics("final", results)
    if trainer.is_world_process_zero():
        print(f"Results written to {os.path.join(trainer.args.output_dir, 'final_results.json')}")
        for callback in trainer.callback_handler.callbacks:
            logging_dir = getattr(callback, "logging_dir", None) or getattr(trainer.args, "logging_dir", None)
            if isinstance(callback, TensorBoardCallback) and logging_dir:  # transformers 4.x: only args know it
                print(f"Logs for tensorboard in {logging_dir} (tensorboard --logdir {logging_dir})")
    return results


def cli() -> None:
    try:
        main()
    except HubUnreachableError as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    cli()
