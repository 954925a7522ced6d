"""Fashion-MNIST with label noise: GAF against what a user would do instead.

Every run is a `python -m hf_gaf.train` run on the local copy of the Hub dataset
`zalando-datasets/fashion_mnist` (`--dataset`, the entry point's own loading, columns `image` and
`label`): built by `hf_gaf.train.build_trainer` from a command line (`training_argv`), trained,
and scored by `hf_gaf.train.evaluate_run` on the clean 10,000-image test split. The training split
is the first `--max_train_samples` images with label noise added by the entry point
(`--noise_type`, `--noise_rate`; seeded by the run's seed), micro-batches hold one image of each
class (`class_balanced_batches`), and two micro-batches feed one optimizer step, as in the paper.

The arms (`ARMS`) share the model, the optimizer, the seeds (noise, initial weights, batch order)
and the number of training samples processed; they differ in what the name says:

- `averaging`: plain averaging (tau 2). Its run also evaluates a clean validation split every
  `--eval_every_samples` and keeps the weights of the best validation accuracy, so it is scored
  twice: at the end, and as `averaging_early_stopped`, the checkpoint an oracle early stop picks.
  The validation images are the last `--validation_size` images of the training split, outside
  the training subset: the oracle costs the baseline no training data.
- `gaf_0.97`, `gaf_1.0`: GAF with the paper's rule (`sequential`).
- `gaf_adaptive`: each step's threshold is `min(1.0, mean + k std)` of the last W cosine
  distances (`--gaf_adaptive_window`, `--gaf_adaptive_std`; see `ADAPTIVE_WINDOW`).
- `label_smoothing_0.1`, `label_smoothing_0.3`: averaging with the Trainer's
  `label_smoothing_factor`; the table shows the better of the two (`label_smoothing_best`), picked
  on the test set, which favours the baseline.
- `averaging_batch_x4`, `averaging_batch_x10`: micro-batches 4 and 10 times larger, for 4 and
  10 times fewer steps (the paper's claim that GAF beats averaging with larger batches).
- `published_0.97`: the published implementation, `step_GAF` of the `gradient-agreement-filtering`
  package, as its README shows, on the same model, optimizer and micro-batches (`train_published`).
- `*_m4`: 4 micro-batches per step (half the steps), where the order of the micro-gradients matters:
  `gaf_0.97_best_start_m4` is the order-robust rule (`--gaf_rule best_start`). With 2 micro-batches
  best_start makes exactly the sequential rule's decisions, so it is only run with 4.

`--arms` run at every `--noise` setting, `--extra_arms` only where they name. Traced runs (every
`averaging` run, and `--traced`) also record, at every periodic evaluation, the accuracy on the
clean validation split, on the first `--curve_samples` test images and on the first
`--curve_samples` training images against their noisy labels: the curves of the paper's Figure 8.

    python benchmarks/fashion_mnist.py            # the sweep: 93 runs
    python benchmarks/fashion_mnist.py --quick    # smoke test: 7 tiny runs
    python benchmarks/fashion_mnist.py --noise symmetric:0.4 --arms averaging gaf_0.97 --extra_arms none --seeds 0

Writes `benchmarks/results/fashion_mnist.json` and three plots beside it: `fashion_mnist.png` (test
accuracy and memorisation vs noise, every arm), `fashion_mnist_training.png` (test and noisy-train
accuracy over training) and `fashion_mnist_samples.png` (test accuracy vs samples processed);
`fashion_mnist_quick.*` with `--quick`, so that a smoke test never overwrites the published files.
At most `--jobs` (<= 2) runs train at once, each in its own process with `--threads` torch threads.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import sys
import tempfile
import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    RESULTS_DIR,
    RecipeArguments,
    command_line,
    machine,
    mean_std,
    output_stem,
    pyplot,
    recipe_argv,
    save_figure,
    write_json,
)

NAME = "fashion_mnist"
DATASET = Path(__file__).resolve().parents[2] / "shared" / "data" / "fashion_mnist"
NUM_CLASSES = 10
MICRO_BATCH = NUM_CLASSES  # one image of each class
MICROBATCHES = 2  # per optimizer step, as in the paper

# The adaptive threshold: min(ADAPTIVE_CAP, mean + ADAPTIVE_STD x std) of the last ADAPTIVE_WINDOW
# cosine distances (one per step with two micro-batches). W = 100 steps is one epoch of the
# 2,000-image subset: enough distances for a stable mean (its standard error is a tenth of their
# spread), few enough to follow their drift early in training. k = 0: a micro-gradient joins when it
# agrees better than the recent average. Under label noise here the distances sit around 0.98 with a
# spread of 0.06-0.1, so k = 0.3 or more would put the threshold at the cap, i.e. make the arm GAF
# tau 1.0 again. The cap 1.0 never admits a micro-gradient pointing against the sum, and is the
# threshold of the first W steps, before the window fills.
ADAPTIVE_WINDOW, ADAPTIVE_STD, ADAPTIVE_CAP = 100, 0.0, 1.0


@dataclass(frozen=True)
class Noise:
    """One label-noise setting, written `type:rate` (`symmetric:0.4`, `class_dependent:0.4`)."""

    type: str
    rate: float

    TYPES = ("symmetric", "class_dependent")

    @classmethod
    def parse(cls, text: str) -> Noise:
        kind, _, rate = text.partition(":")
        if kind not in cls.TYPES or not rate:
            raise ValueError(f"Noise setting {text!r} must be type:rate with type in {cls.TYPES}, e.g. symmetric:0.4.")
        return cls(kind, float(rate))

    def __str__(self) -> str:
        return f"{self.type}:{self.rate:g}"

    @property
    def label(self) -> str:
        return f"{100 * self.rate:.0f}% {'symmetric' if self.type == 'symmetric' else 'class-dep.'}"


@dataclass(frozen=True)
class Arm:
    """One way to train: a GAF threshold and options of `python -m hf_gaf.train`, or the published package.

    `batch_multiplier` scales the micro-batch (and divides the steps), `microbatches` is the number of
    micro-batches per step (the steps scale by `MICROBATCHES / microbatches`): every arm processes the
    same number of training samples.
    """

    name: str
    label: str
    threshold: float
    options: tuple[str, ...] = ()
    batch_multiplier: int = 1
    microbatches: int = MICROBATCHES
    published: bool = False

    @property
    def samples_per_step(self) -> int:
        return MICRO_BATCH * self.batch_multiplier * self.microbatches


def samples_per_run(max_steps: int) -> int:
    """Training samples every arm processes: `max_steps` steps of the base arms."""
    return max_steps * MICROBATCHES * MICRO_BATCH


ARMS = {
    arm.name: arm
    for arm in [
        Arm("averaging", "averaging", 2.0),
        Arm("gaf_0.97", "GAF tau 0.97", 0.97),
        Arm("gaf_1.0", "GAF tau 1.0", 1.0),
        Arm(
            "gaf_adaptive",
            f"GAF adaptive (W {ADAPTIVE_WINDOW}, k {ADAPTIVE_STD:g}, cap {ADAPTIVE_CAP:g})",
            ADAPTIVE_CAP,
            ("--gaf_adaptive_window", str(ADAPTIVE_WINDOW), "--gaf_adaptive_std", str(ADAPTIVE_STD)),
        ),
        Arm("label_smoothing_0.1", "averaging + label smoothing 0.1", 2.0, ("--label_smoothing_factor", "0.1")),
        Arm("label_smoothing_0.3", "averaging + label smoothing 0.3", 2.0, ("--label_smoothing_factor", "0.3")),
        Arm("averaging_batch_x4", "averaging, 4x batch", 2.0, batch_multiplier=4),
        Arm("averaging_batch_x10", "averaging, 10x batch", 2.0, batch_multiplier=10),
        Arm("published_0.97", "published package, tau 0.97", 0.97, published=True),
        Arm("averaging_m4", "averaging, 4 micro-batches", 2.0, microbatches=4),
        Arm("gaf_0.97_m4", "GAF tau 0.97, 4 micro-batches", 0.97, microbatches=4),
        Arm("gaf_0.97_best_start_m4", "GAF tau 0.97 best_start, 4 micro-batches", 0.97, ("--gaf_rule", "best_start"),
            microbatches=4),
        Arm("published_0.97_m4", "published package, tau 0.97, 4 micro-batches", 0.97, microbatches=4, published=True),
    ]
}  # fmt: skip
EARLY_STOPPED_ARM = "averaging"  # its runs are also scored at their best validation accuracy, as EARLY_STOPPED
EARLY_STOPPED = "averaging_early_stopped"
SMOOTHING_BEST = "label_smoothing_best"  # the better label smoothing, per noise setting
LABELS = {name: arm.label for name, arm in ARMS.items()} | {
    EARLY_STOPPED: "averaging + early stopping (oracle)",
    SMOOTHING_BEST: "averaging + best label smoothing",
}
# The extra arms of the 40% settings, and the arms with 4 micro-batches (40% symmetric only).
FOCUS = ["gaf_adaptive", "label_smoothing_0.1", "label_smoothing_0.3", "averaging_batch_x4", "averaging_batch_x10",
         "published_0.97"]  # fmt: skip
FOUR_MICROBATCHES = ["averaging_m4", "gaf_0.97_m4", "gaf_0.97_best_start_m4", "published_0.97_m4"]


@dataclass
class FashionMNISTArguments(RecipeArguments):
    """What to run and how each run trains (defaults: the published configuration)."""

    dataset: str = field(
        default=str(DATASET), metadata={"help": "Fashion-MNIST in the Hub layout (a local folder or the Hub id)."}
    )
    noise: list[str] = field(
        default_factory=lambda: ["symmetric:0", "symmetric:0.2", "symmetric:0.4", "symmetric:0.6", "class_dependent:0.4"],
        metadata={"help": "Label-noise settings, type:rate with type symmetric or class_dependent."},
    )
    arms: list[str] = field(
        default_factory=lambda: ["averaging", "gaf_0.97", "gaf_1.0"],
        metadata={"help": f"Arms run at every noise setting; one of {list(ARMS)}."},
    )
    extra_arms: list[str] = field(
        default_factory=lambda: [
            f"symmetric:0.4={','.join(FOCUS + FOUR_MICROBATCHES)}", f"class_dependent:0.4={','.join(FOCUS)}"
        ],
        metadata={
            "help": "Arms run only at one noise setting, as noise=arm,arm,... (ignored for a setting not in --noise; "
            "none: no extra arms)."
        },
    )
    traced: list[str] = field(
        default_factory=lambda: ["symmetric:0.4=gaf_0.97,gaf_1.0,averaging_batch_x4,averaging_batch_x10"],
        metadata={"help": "Runs evaluated periodically besides every averaging run, as noise=arm,arm,... (or none)."},
    )
    figure_noise: str = field(default="symmetric:0.4", metadata={"help": "Noise setting of the plots over training."})
    seeds: list[int] = field(
        default_factory=lambda: [0, 1, 2],
        metadata={"help": "Seeds: each sets the label noise, the initial weights and the batch order."},
    )
    max_train_samples: int = field(default=2000, metadata={"help": "Training images: the first ones of the train split."})
    validation_size: int = field(
        default=1000, metadata={"help": "Clean validation images for early stopping: the last ones of the train split."}
    )
    max_eval_samples: int | None = field(default=None, metadata={"help": "Test images (default: all 10,000)."})
    curve_samples: int = field(default=1000, metadata={"help": "Test and training images of the periodic evaluations."})
    max_steps: int = field(
        default=1500,
        metadata={
            "help": f"Optimizer steps of the {MICROBATCHES} x {MICRO_BATCH}-image arms; the others process as many samples."
        },
    )
    eval_every_samples: int = field(default=2000, metadata={"help": "Training samples between periodic evaluations."})
    quick: bool = field(default=False, metadata={"help": "Smoke test: a handful of tiny runs, one seed."})
    output_dir: str = field(default=str(RESULTS_DIR), metadata={"help": "Where the JSON and PNG files go."})
    tag: str = field(default="", metadata={"help": "Suffix of the output names, for runs beside the published ones."})

    def __post_init__(self):
        if self.quick:
            self.noise = ["symmetric:0", "symmetric:0.4", "class_dependent:0.4"]
            self.arms = ["averaging"]
            self.extra_arms = ["symmetric:0.4=gaf_0.97,published_0.97,averaging_batch_x4,gaf_0.97_best_start_m4"]
            self.traced, self.figure_noise = ["symmetric:0.4=gaf_0.97,averaging_batch_x4"], "symmetric:0.4"
            self.seeds = [0]
            self.max_train_samples, self.validation_size, self.max_eval_samples, self.curve_samples = 200, 100, 500, 100
            self.max_steps, self.eval_every_samples = 40, 400
        super().__post_init__()
        noise = [Noise.parse(text) for text in self.noise]
        if Noise.parse(self.figure_noise) not in noise:
            raise ValueError(f"--figure_noise {self.figure_noise} is not in --noise {self.noise}.")
        for arm in self.arms:
            _check_arm(arm)
        for specs in (self.extra_arms, self.traced):
            for arms in parse_assignments(specs).values():
                for arm in arms:
                    _check_arm(arm)
        samples = samples_per_run(self.max_steps)
        for arm in {ARMS[a] for _, a in self.grid()}:
            if samples % arm.samples_per_step or self.eval_every_samples % arm.samples_per_step:
                raise ValueError(
                    f"Arm {arm.name} processes {arm.samples_per_step} samples per step, which must divide the "
                    f"{samples} samples of a run (--max_steps) and --eval_every_samples {self.eval_every_samples}."
                )

    @property
    def stem(self) -> str:
        return output_stem(NAME, quick=self.quick, tag=self.tag)

    def grid(self) -> list[tuple[Noise, str]]:
        """Every (noise, arm) to run, in the order of `--noise`, then `--arms`, then `--extra_arms`."""
        extra = parse_assignments(self.extra_arms)
        pairs = []
        for setting in map(Noise.parse, self.noise):
            pairs += [(setting, arm) for arm in dict.fromkeys(self.arms + extra.get(setting, []))]
        return pairs

    def is_traced(self, noise: Noise, arm: str) -> bool:
        return arm == EARLY_STOPPED_ARM or arm in parse_assignments(self.traced).get(noise, [])


def parse_assignments(specs: list[str]) -> dict[Noise, list[str]]:
    """`["symmetric:0.4=a,b", ...]` as `{Noise: [a, b]}`; `["none"]` is nothing."""
    out: dict[Noise, list[str]] = {}
    for spec in specs:
        if spec == "none":
            continue
        setting, sep, arms = spec.partition("=")
        if not sep:
            raise ValueError(f"{spec!r} must be written noise=arm,arm,... e.g. symmetric:0.4=gaf_0.97,averaging.")
        out.setdefault(Noise.parse(setting), []).extend(a for a in arms.split(",") if a)
    return out


def _check_arm(name: str) -> None:
    if name not in ARMS:
        raise ValueError(f"Unknown arm {name!r}; choose among {list(ARMS)}.")


def training_argv(
    config: dict[str, Any], noise: Noise, arm: Arm, seed: int, output_dir: str, *, traced: bool
) -> list[str]:
    """The `python -m hf_gaf.train` command line of one run."""
    steps = samples_per_run(config["max_steps"]) // arm.samples_per_step
    argv = [
        "--dataset", config["dataset"], "--num_channels", "1",
        "--max_train_samples", str(config["max_train_samples"]),
        "--noise_type", noise.type, "--noise_rate", str(noise.rate), "--noise_seed", str(seed), "--seed", str(seed),
        "--gaf_threshold", str(arm.threshold), *arm.options,
        "--class_balanced_batches", "True",
        "--per_device_train_batch_size", str(MICRO_BATCH * arm.batch_multiplier),
        "--gradient_accumulation_steps", str(arm.microbatches),
        "--max_steps", str(steps),
        *recipe_argv(config),
        "--per_device_eval_batch_size", "500",
        "--use_cpu", "True",
        "--output_dir", output_dir,
        "--report_to", "none", "--logging_strategy", "no", "--save_strategy", "no", "--disable_tqdm", "True",
    ]  # fmt: skip
    if config["max_eval_samples"] is not None:
        argv += ["--max_eval_samples", str(config["max_eval_samples"])]
    if traced:
        eval_steps = config["eval_every_samples"] // arm.samples_per_step
        argv += ["--eval_strategy", "steps", "--eval_steps", str(eval_steps), "--eval_on_start", "True"]
    return argv


class StepTrace(TrainerCallback):
    """Records every optimizer step's skip decision, compared cosine distances and threshold (`gaf_last_result`)."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.skipped: list[bool] = []
        self.distances: list[float] = []
        self.thresholds: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        result = self.trainer.gaf_last_result
        self.record(bool(result.skipped), [d for d in result.distances.tolist() if not math.isnan(d)], result.threshold)

    def record(self, skipped: bool, distances: list[float], threshold: float) -> None:
        self.skipped.append(skipped)
        self.distances.extend(distances)
        self.thresholds.append(threshold)

    def summary(self) -> dict[str, Any]:
        """The skip decisions as a string (`"1"`: skipped), and the mean and spread of distances and thresholds."""
        distance, distance_std = mean_std(self.distances)
        return {
            "skip_trace": "".join("1" if s else "0" for s in self.skipped),
            "distance_mean": distance,
            "distance_std": distance_std,
            "threshold_mean": mean_std(self.thresholds)[0],
        }


class EvaluationTrace(TrainerCallback):
    """Records every periodic evaluation and keeps the weights of the best clean validation accuracy.

    The Trainer evaluates a dict of datasets (`val`, `test`, `train`) one by one, each under its own
    metric prefix (`eval_val_accuracy`, ...), and calls `on_evaluate` for each; the points are
    collected per step. The weights of the first step with the best `eval_val_accuracy` stay in
    memory: they are the checkpoint an oracle early stop on the validation split would restore.
    """

    NAMES = ("val", "test", "train")

    def __init__(self, samples_per_step: int):
        self.samples_per_step = samples_per_step
        self.points: dict[int, dict[str, float]] = {}
        self.best_accuracy = -math.inf
        self.best_step: int | None = None
        self.best_state: dict[str, torch.Tensor] | None = None

    def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
        step = state.global_step
        point = self.points.setdefault(step, {"step": step, "samples": step * self.samples_per_step})
        for name in self.NAMES:
            if f"eval_{name}_accuracy" in metrics:
                point[f"{name}_accuracy"] = metrics[f"eval_{name}_accuracy"]
        if metrics.get("eval_val_accuracy", -math.inf) > self.best_accuracy:
            self.best_accuracy, self.best_step = metrics["eval_val_accuracy"], step
            self.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @property
    def curve(self) -> list[dict[str, float]]:
        return [self.points[step] for step in sorted(self.points)]


class _Logits(torch.nn.Module):
    """The classifier as the published package calls it: `model(images)` returns logits for its criterion."""

    def __init__(self, classifier: torch.nn.Module):
        super().__init__()
        self.classifier = classifier

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.classifier(pixel_values=pixel_values).logits


def train_published(trainer, arm: Arm, trace: StepTrace) -> int:
    """Train `trainer.model` with the published package's `step_GAF` instead of `trainer.train()`; return the steps.

    Everything but the GAF step is the Trainer's: its optimizer (`create_optimizer`) and LR
    schedule (`create_scheduler`, stepped only on updates, as `GAFTrainer` does), its gradient
    clipping to `max_grad_norm` (registered as a hook before every optimizer step, where the Trainer
    clips), and its training dataloader, whose consecutive groups of `gradient_accumulation_steps`
    batches are the micro-batches of the Trainer's steps, epoch after epoch (the balanced sampler
    reshuffles on every pass). Each micro-batch goes to `step_GAF` as a dataset of its own, as the
    package's README shows.
    """
    from gradient_agreement_filtering import step_GAF
    from torch.utils.data import TensorDataset

    args = trainer.args
    model = _Logits(trainer.model)
    optimizer = trainer.create_optimizer()
    scheduler = trainer.create_scheduler(num_training_steps=args.max_steps, optimizer=optimizer)
    if args.max_grad_norm:

        def clip_gradients(optimizer, *_):
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)

        optimizer.register_step_pre_hook(clip_gradients)
    criterion = torch.nn.CrossEntropyLoss()
    loader = trainer.get_train_dataloader()
    steps = 0
    while steps < args.max_steps:
        batches = iter(loader)  # a new pass: the balanced sampler draws the next epoch's batches
        while steps < args.max_steps and (group := list(islice(batches, arm.microbatches))):
            microbatches = [TensorDataset(batch["pixel_values"], batch["labels"]) for batch in group]
            result = step_GAF(
                model, optimizer, criterion, microbatches,
                wandb=False, verbose=False, cos_distance_thresh=arm.threshold, device=args.device,
            )  # fmt: skip
            if result["agreed_count"]:
                scheduler.step()
            # The package returns the last comparison of the step only: with two micro-batches, the one.
            trace.record(not result["agreed_count"], [result["cosine_distance"]], arm.threshold)
            steps += 1
    return steps


def score(trainer, data: dict[str, Any]) -> dict[str, float]:
    """Clean test accuracy, memorisation of the corrupted labels and accuracy on the noisy training labels.

    `evaluate_run` measures the corrupted rows (memorised: predicted as their noisy label) and the
    others (accuracy); the accuracy on the labels trained on follows from the two. Without corrupted
    rows it is the plain training accuracy.
    """
    from hf_gaf.train import evaluate_run

    results = evaluate_run(trainer, data)
    if "train_memorized" in results:
        rate = results["train_noise_rate"]
        noisy_train = rate * results["train_memorized"] + (1 - rate) * results["train_uncorrupted_accuracy"]
    else:
        noisy_train = trainer.evaluate(data["train_eval"], metric_key_prefix="train")["train_accuracy"]
    return {
        "test_accuracy": results["test_accuracy"],
        "memorized": results.get("train_memorized", math.nan),
        "noisy_train_accuracy": noisy_train,
        "uncorrupted_train_accuracy": results.get("train_uncorrupted_accuracy", noisy_train),
        "num_corrupted": int(results.get("train_num_corrupted", 0)),
    }


def periodic_datasets(config: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
    """The datasets of the periodic evaluations: clean validation images, test images, noisy training images.

    The validation images are the last `validation_size` of the training split, outside the training
    subset, with the test split's transform (the same preprocessing and statistics).
    """
    import datasets

    train = datasets.load_dataset(config["dataset"], split="train")
    start = len(train) - config["validation_size"]
    if start < config["max_train_samples"]:
        raise ValueError(
            f"--validation_size {config['validation_size']} and --max_train_samples {config['max_train_samples']} "
            f"overlap in a training split of {len(train)} images; lower one of them."
        )
    transform = data["test"].format["format_kwargs"]["transform"]
    size = config["curve_samples"]
    return {
        "val": train.select(range(start, len(train))).with_transform(transform),
        "test": data["test"].select(range(min(size, len(data["test"])))),
        "train": data["train_eval"].select(range(min(size, len(data["train_eval"])))),
    }


def run_one(config: dict[str, Any], noise: Noise, arm_name: str, seed: int, traced: bool) -> dict[str, Any]:
    """Train and score one run in this process; return its metrics, GAF statistics, curve and timings."""
    from transformers import PrinterCallback
    from transformers.utils import logging as hf_logging

    from hf_gaf.train import build_trainer

    os.environ["OMP_NUM_THREADS"] = str(config["threads"])  # the entry point then leaves torch's threads alone
    torch.set_num_threads(config["threads"])
    hf_logging.set_verbosity_error()
    arm = ARMS[arm_name]
    started, cpu_started = time.perf_counter(), time.process_time()
    with tempfile.TemporaryDirectory(prefix=f"{NAME}_") as output_dir:
        trainer, data = build_trainer(training_argv(config, noise, arm, seed, output_dir, traced=traced))
        trainer.remove_callback(PrinterCallback)
        steps = StepTrace(trainer)
        evaluations = EvaluationTrace(arm.samples_per_step) if traced else None
        if evaluations is not None:
            trainer.eval_dataset = periodic_datasets(config, data)
            trainer.add_callback(evaluations)
        training_started = time.perf_counter()
        if arm.published:
            num_steps = train_published(trainer, arm, steps)
        else:
            trainer.add_callback(steps)
            num_steps = trainer.train().global_step
        training_seconds = time.perf_counter() - training_started
        if evaluations is not None:
            trainer.remove_callback(evaluations)
            trainer.eval_dataset = data["test"]
        run = {"noise": str(noise), "noise_type": noise.type, "noise_rate": noise.rate, "arm": arm.name, "seed": seed}
        run |= score(trainer, data)
        if arm.name == EARLY_STOPPED_ARM:
            trainer.model.load_state_dict(evaluations.best_state)
            stopped = {"step": evaluations.best_step, "val_accuracy": evaluations.best_accuracy}
            run["early_stopped"] = stopped | score(trainer, data)
    skipped = sum(steps.skipped)
    return run | {
        "steps": num_steps,
        "samples_processed": num_steps * arm.samples_per_step,
        "skipped_steps": skipped,
        "skipped_fraction": skipped / max(num_steps, 1),
        **steps.summary(),
        "curve": [] if evaluations is None else evaluations.curve,
        "training_seconds": training_seconds,
        "seconds": time.perf_counter() - started,
        "cpu_seconds": time.process_time() - cpu_started,
    }


def scored_runs(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The runs as table entries: every run under its arm, and each averaging run's early stop as `EARLY_STOPPED`."""
    entries = []
    for run in runs:
        entries.append(run)
        if "early_stopped" in run:
            entries.append(run | run["early_stopped"] | {"arm": EARLY_STOPPED, "skipped_fraction": 0.0})
    return entries


def summarise(runs: list[dict[str, Any]], noise: list[Noise]) -> list[dict[str, Any]]:
    """One row per (noise, arm): means and spreads over seeds, and the gain over averaging of the same seed."""
    entries = scored_runs(runs)
    order = ["averaging", EARLY_STOPPED, *(arm for arm in ARMS if arm != "averaging")]
    rows = []
    for setting in noise:
        here = [e for e in entries if e["noise"] == str(setting)]
        base = {e["seed"]: e["test_accuracy"] for e in here if e["arm"] == "averaging"}
        for arm in order:
            group = sorted((e for e in here if e["arm"] == arm), key=lambda e: e["seed"])
            if group:
                rows.append(_row(setting, arm, group, base))
        smoothing = [r for r in rows if r["noise"] == str(setting) and r["arm"].startswith("label_smoothing_")]
        if smoothing:
            best = max(smoothing, key=lambda r: r["test_accuracy_mean"])
            rows.append(best | {
                "arm": SMOOTHING_BEST, "label": f"{LABELS[SMOOTHING_BEST]} ({ARMS[best['arm']].options[-1]})",
                "best_of": [r["arm"] for r in smoothing], "picked": best["arm"],
            })  # fmt: skip
    return rows


def _row(noise: Noise, arm: str, group: list[dict[str, Any]], base: dict[int, float]) -> dict[str, Any]:
    def stats(key: str) -> tuple[float, float]:
        return mean_std([e[key] for e in group])

    acc, acc_std = stats("test_accuracy")
    mem, mem_std = stats("memorized")
    gain, gain_std = mean_std([e["test_accuracy"] - base[e["seed"]] for e in group if e["seed"] in base])
    row = {
        "noise": str(noise), "noise_type": noise.type, "noise_rate": noise.rate, "arm": arm, "label": LABELS[arm],
        "seeds": [e["seed"] for e in group],
        "test_accuracy_mean": acc, "test_accuracy_std": acc_std,
        "test_accuracy_per_seed": [e["test_accuracy"] for e in group],
        "gain_over_averaging_mean": gain, "gain_over_averaging_std": gain_std,
        "memorized_mean": mem, "memorized_std": mem_std,
        "noisy_train_accuracy_mean": stats("noisy_train_accuracy")[0],
        "skipped_fraction_mean": stats("skipped_fraction")[0],
        "samples_processed": group[0]["samples_processed"],
        "seconds_mean": stats("seconds")[0],
    }  # fmt: skip
    if arm == EARLY_STOPPED:
        row["stopped_at_steps"] = [e["step"] for e in group]
    return row


def format_table(rows: list[dict[str, Any]]) -> str:
    def pct(x: float) -> str:
        return "  -  " if math.isnan(x) else f"{100 * x:5.1f}"

    header = "test acc % (mean ± std) | vs avg | memorised % | noisy-train acc % | skipped % | s/run"
    lines = [f"{'noise':<16} {'arm':<48} {header}", "-" * (66 + len(header))]
    for r in rows:
        if r["arm"].startswith("label_smoothing_") and r["arm"] != SMOOTHING_BEST:
            continue
        gain = "      " if r["arm"] == "averaging" else f"{100 * r['gain_over_averaging_mean']:+6.1f}"
        lines.append(
            f"{Noise.parse(r['noise']).label:<16} {r['label']:<48} "
            f"{pct(r['test_accuracy_mean'])} ± {100 * r['test_accuracy_std']:4.1f}"
            f"          | {gain} |    {pct(r['memorized_mean'])}    |       {pct(r['noisy_train_accuracy_mean'])}       |"
            f"   {pct(r['skipped_fraction_mean'])}   | {r['seconds_mean']:5.0f}"
        )
    return "\n".join(lines)


# One look per arm in every plot: baselines dotted with squares, GAF solid with circles, the published
# package with triangles.
STYLES = {
    "averaging": ("black", "s", "--"),
    EARLY_STOPPED: ("gray", "s", ":"),
    SMOOTHING_BEST: ("tab:olive", "s", ":"),
    "averaging_batch_x4": ("tab:orange", "s", ":"),
    "averaging_batch_x10": ("tab:brown", "s", ":"),
    "averaging_m4": ("dimgray", "D", ":"),
    "gaf_0.97": ("tab:blue", "o", "-"),
    "gaf_1.0": ("tab:cyan", "o", "-"),
    "gaf_adaptive": ("tab:purple", "o", "-"),
    "gaf_0.97_m4": ("tab:green", "D", "-"),
    "gaf_0.97_best_start_m4": ("tab:pink", "D", "-"),
    "published_0.97": ("tab:red", "^", "-."),
    "published_0.97_m4": ("darkred", "v", "-."),
}


def _style(arm: str) -> dict[str, Any]:
    color, marker, linestyle = STYLES.get(arm, ("tab:olive", "s", ":"))
    return {"color": color, "marker": marker, "linestyle": linestyle}


def _plotted(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows a plot shows: the two label smoothings only through the better one."""
    return [r for r in rows if not (r["arm"].startswith("label_smoothing_") and r["arm"] != SMOOTHING_BEST)]


def plot_noise(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Test accuracy and memorisation vs symmetric noise (lines) and at class-dependent noise (bars), every arm."""
    plt = pyplot()
    rows = _plotted(rows)
    arms = list(dict.fromkeys(r["arm"] for r in rows))
    dependent = list(dict.fromkeys(r["noise"] for r in rows if r["noise_type"] == "class_dependent"))
    dependent_arms = [a for a in arms if any(r["arm"] == a and r["noise"] in dependent for r in rows)]
    metrics = [("test_accuracy", "clean test accuracy (%)"), ("memorized", "corrupted training rows memorised (%)")]
    fig, axes = plt.subplots(2, 2, figsize=(15, 10), gridspec_kw={"width_ratios": [3, 2]}, squeeze=False)
    for (ax_sym, ax_dep), (key, label) in zip(axes, metrics):
        for arm in arms:
            sym = [r for r in rows if r["arm"] == arm and r["noise_type"] == "symmetric"]
            sym = [r for r in sym if not math.isnan(r[f"{key}_mean"])]
            if sym:
                ax_sym.errorbar([100 * r["noise_rate"] for r in sym], [100 * r[f"{key}_mean"] for r in sym],
                                yerr=[100 * r[f"{key}_std"] for r in sym], label=LABELS[arm], capsize=3, **_style(arm))
        for i, noise in enumerate(dependent):
            for r in (r for r in rows if r["noise"] == noise):
                style = _style(r["arm"])
                y = dependent_arms.index(r["arm"]) + 0.25 * i
                ax_dep.errorbar([100 * r[f"{key}_mean"]], [y], xerr=[100 * r[f"{key}_std"]], capsize=3,
                                color=style["color"], marker=style["marker"])
        ax_sym.set(xlabel="symmetric label noise (%)", ylabel=label)
        ax_dep.set(xlabel=label, title=f"class-dependent noise ({', '.join(Noise.parse(n).label for n in dependent)})")
        ax_dep.set_yticks(range(len(dependent_arms)), [LABELS[a] for a in dependent_arms], fontsize=8)
        ax_dep.invert_yaxis()
        for ax in (ax_sym, ax_dep):
            ax.grid(alpha=0.3)
    axes[0][0].set_title("symmetric noise, mean ± std over seeds")
    if axes[0][0].get_legend_handles_labels()[0]:
        axes[0][0].legend(fontsize=7, ncol=2)
    save_figure(fig, path, title, dpi=110)


def _mean_curves(runs: list[dict[str, Any]], key: str, x: str) -> tuple[list[float], list[float], list[float]]:
    """Mean and standard deviation over seeds of one curve metric, at each x (`step` or `samples`)."""
    values: dict[float, list[float]] = defaultdict(list)
    for run in runs:
        for point in run["curve"]:
            if key in point:
                values[point[x]].append(point[key])
    xs = sorted(values)
    stats = [mean_std(values[v]) for v in xs]
    return xs, [100 * m for m, _ in stats], [100 * s for _, s in stats]


def plot_training(runs: list[dict[str, Any]], noise: Noise, path: Path, title: str) -> None:
    """The paper's Figure 8: clean test accuracy and noisy-train accuracy over the steps, averaging vs GAF."""
    fig, ax = pyplot().subplots(figsize=(9, 5))
    base = ARMS["averaging"].samples_per_step  # the arms whose steps are comparable
    traced = [r for r in runs if r["noise"] == str(noise) and r["curve"] and ARMS[r["arm"]].samples_per_step == base]
    for arm in dict.fromkeys(r["arm"] for r in traced):
        group, color = [r for r in traced if r["arm"] == arm], _style(arm)["color"]
        for key, linestyle, what in (("test_accuracy", "-", "test (clean)"), ("train_accuracy", "--", "train (noisy)")):
            xs, mean, std = _mean_curves(group, key, "step")
            low, high = [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)]
            ax.plot(xs, mean, linestyle=linestyle, color=color, label=f"{LABELS[arm]}: {what}")
            ax.fill_between(xs, low, high, color=color, alpha=0.15)
    ax.set(xlabel="optimizer step", ylabel="accuracy (%)",
           title=f"Accuracy over training, {noise.label} noise (mean ± std over seeds)")
    _save_traced(fig, ax, path, title)


def _save_traced(fig, ax, path: Path, title: str) -> None:
    """Grid, a legend when anything was traced (an empty plot says nothing was), and the file."""
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    save_figure(fig, path, title, dpi=110)


def plot_samples(runs: list[dict[str, Any]], noise: Noise, path: Path, title: str) -> None:
    """Clean test accuracy vs training samples processed, for every traced arm (batch sizes differ)."""
    fig, ax = pyplot().subplots(figsize=(9, 5))
    traced = [r for r in runs if r["noise"] == str(noise) and r["curve"]]
    for arm in dict.fromkeys(r["arm"] for r in traced):
        xs, mean, std = _mean_curves([r for r in traced if r["arm"] == arm], "test_accuracy", "samples")
        ax.errorbar([x / 1000 for x in xs], mean, yerr=std, label=LABELS[arm], capsize=2, markersize=3, **_style(arm))
    ax.set(xlabel="training samples processed (thousands)", ylabel="clean test accuracy (%)",
           title=f"Test accuracy vs samples processed, {noise.label} noise (mean ± std over seeds)")
    _save_traced(fig, ax, path, title)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser(FashionMNISTArguments).parse_args_into_dataclasses(args=argv)
    config = asdict(args)
    noise = [Noise.parse(text) for text in args.noise]
    grid = [(setting, arm, seed) for seed in args.seeds for setting, arm in args.grid()]
    print(f"{NAME}: {len(grid)} runs, {args.jobs} at a time, {args.threads} thread(s) each", flush=True)
    started = time.perf_counter()
    runs = []
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(run_one, config, s, arm, seed, args.is_traced(s, arm)) for s, arm, seed in grid]
        for done, future in enumerate(as_completed(futures), 1):
            run = future.result()
            runs.append(run)
            print(f"  [{done}/{len(grid)}] {Noise.parse(run['noise']).label:<16} {run['arm']:<24} seed {run['seed']}: "
                  f"acc {100 * run['test_accuracy']:5.1f}%  memorised {100 * run['memorized']:5.1f}%  "
                  f"skipped {100 * run['skipped_fraction']:5.1f}%  "
                  f"({run['seconds']:.0f} s, {run['training_seconds']:.0f} s training)",
                  flush=True)  # fmt: skip
    wall = time.perf_counter() - started
    runs.sort(key=lambda r: grid.index((Noise.parse(r["noise"]), r["arm"], r["seed"])))
    rows = summarise(runs, noise)
    print()
    print(format_table(rows))
    cpu = sum(r["cpu_seconds"] for r in runs)
    print(f"\n{len(runs)} runs in {wall / 60:.1f} min wall ({cpu / 60:.1f} min CPU in the runs)")

    result = {
        "benchmark": NAME, "command": command_line(f"{NAME}.py", argv), "config": config,
        "arms": {name: asdict(arm) for name, arm in ARMS.items()},
        "machine": machine("transformers", "timm", "datasets", "gradient-agreement-filtering"),
        "wall_seconds": wall, "summary": rows, "runs": runs,
    }  # fmt: skip
    out = Path(args.output_dir)
    json_path = write_json(out / f"{args.stem}.json", result)
    title = (f"Fashion-MNIST, {args.max_train_samples} training images (28x28), {len(args.seeds)} seed(s); "
             f"{args.model_name} {args.model_kwargs}\n{MICROBATCHES} x {MICRO_BATCH} images (1 per class) per step, "
             f"{args.max_steps} steps, SGD lr {args.learning_rate:g} momentum {args.momentum:g} "
             f"weight decay {args.weight_decay:g}")
    plots = [out / f"{args.stem}.png", out / f"{args.stem}_training.png", out / f"{args.stem}_samples.png"]
    plot_noise(rows, plots[0], title)
    plot_training(runs, Noise.parse(args.figure_noise), plots[1], title)
    plot_samples(runs, Noise.parse(args.figure_noise), plots[2], title)
    print(f"wrote {json_path} and {', '.join(p.name for p in plots)}")
    return result


if __name__ == "__main__":
    main()
