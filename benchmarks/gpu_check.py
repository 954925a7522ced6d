"""One command that checks hf-gaf on the GPU users train on: correctness, speed and memory on one CUDA GPU.

    python benchmarks/gpu_check.py                      # every check: benchmarks/results/gpu_check.json
    python benchmarks/gpu_check.py --only correctness   # groups or check names, e.g. to rerun what failed
    python benchmarks/gpu_check.py --quick              # tiny sizes: benchmarks/results/gpu_check_quick.json

Synthetic data, no network, one process on one GPU (on a machine with several, pick one with
`CUDA_VISIBLE_DEVICES`: GAF refuses the `DataParallel` the Trainer would otherwise wrap the model in). It
needs what the library needs (torch, accelerate, transformers) and timm for the models, not the paper's kit
`hf_gaf.train` (datasets, evaluate), and runs from a bare copy of the repository: this checkout's `hf_gaf`
is imported whether or not it is installed.

Without a CUDA device it says so and runs the same code at the quick sizes on the CPU, a dry run: the checks
that need CUDA (fp16 loss scaling, peak CUDA memory) are reported as skipped with the reason. Every check is
recorded on its own: one that raises is `failed` with its error and the others still run; the exit status is
1 when any check failed. The JSON is rewritten after every check, so a run cut short keeps what it measured,
and `--time-budget` skips the checks that would start after that many seconds.

Checks, their pass criteria and the full sizes (`FULL`; `QUICK` are the tiny ones):

- `correctness/equivalence/{fp32,bf16}/{k2,k4}`: `GAFTrainer` at `gaf_threshold=2` against `Trainer`, ResNet-18
  at 32x32 (10 classes), micro-batches of 32, 6 optimizer steps, gradient accumulation 2 and 4, SGD without
  gradient clipping (a gradient of the wrong scale then shows one to one in the parameters). The Trainer runs
  twice to measure its own run-to-run difference (cuDNN may pick non-deterministic kernels). Passes when the
  final parameters differ from the Trainer's by at most `max(floor, 10 x that difference)`, in L2 relative to
  how far training moved them, with floor 1e-5 (fp32) and 1e-2 (bf16), and GAF accepted every micro-gradient.
- `correctness/fp16/skipped_step`: fp16 with a `GradScaler`, AdamW with clipping: 4 updates at
  `gaf_threshold=2`, then 3 steps at `gaf_threshold=0`, where no two micro-gradients agree and GAF skips.
  Each of these is compared with the state after the step before it. Passes when every skipped step leaves
  the parameters, the optimizer state (moments, step count, learning rates), the LR scheduler and the
  scaler's state (scale, growth tracker) bit-identical. A step with a non-finite micro-gradient (an fp16
  overflow) goes to the scaler instead, as without GAF: parameters and moments must stay, the scale must
  drop by the backoff factor and the growth tracker restart. The check needs an update before the skipped
  steps and at least one of them with finite micro-gradients, else it fails saying so.
- `correctness/fp16/non_finite`: the same fp16 setup at `gaf_threshold=2` for 6 steps, one training image
  NaN, against the Trainer fed the same data (twice, for its noise). Passes when the loss scale drops at
  every step with a non-finite micro-gradient, the loss scale and the skipped flag after every step are the
  Trainer's (the scaler backs off for the NaN micro-batch exactly as without GAF), and the parameters are
  finite and within `max(1e-2, 10 x the Trainer's run-to-run difference)` of the Trainer's.
- `correctness/filter/{float32,bfloat16,float16}`: `filter_microgradients` on CUDA against the CPU for
  M = 2, 3, 4, 8, 16, 32, 64 micro-gradients of P = 1,000,003 columns (with a NaN and a zero row from M = 4
  and 8 on), both rules, tau = 0.97, on rows built to agree or oppose clearly. Passes when excluded, skipped,
  start and accepted sets are equal (accepted compared when every distance the CPU compared is more than 1e-4
  from tau), distances are within 1e-5 (the Gram matrix's documented cosine error is 2e-7 for float32 and
  3e-6 for half-precision input, on each device) and the filtered gradients pass `torch.testing.assert_close`.
- `speed/resnet18`, `speed/vit_large`: step time of `GAFTrainer` (`gaf_threshold=2`) over `Trainer`, bf16,
  gradient accumulation 2, AdamW; ResNet-18 at 32x32 (100 classes, micro-batches of 100) and ViT-L/16 at
  224x224 (1000 classes, micro-batches of 32). 3 alternating runs of each of 3 warm-up and 20 timed steps; a
  callback times each optimizer step between device synchronisations. Measurements, reported as the ratio of
  medians; they pass when GAF accepted every micro-gradient.
- `speed/filter`: `filter_microgradients(..., out=)` on float32 rows of P = 300M, M = 2, 4, 8, 16, at
  tau = 2 (every row read twice: Gram matrix and mean), CUDA events, median of 5 calls after 2. Passes when
  every row was accepted and the output is their mean (checked on the first 4096 columns).
- `memory/resnet18`, `memory/vit_large`: peak CUDA memory (`torch.cuda.max_memory_allocated`, reset before
  each run) of `GAFTrainer` and `Trainer`, 3 steps of the speed setups, after a one-step run that makes the
  allocations that persist between runs (cuBLAS workspaces). Passes when GAF's extra peak is at most
  the documented `(K + 1) x P x element size` (the `[K, P]` micro-gradient buffer and the `[P]` filtered
  gradient, `GradientBuffer.required_bytes`); since GAF frees `.grad` between passes, expect about `K x P`.

- `correctness/fsdp2/exchange`: `FSDPExchange` at world size 1 (FSDP2's single-rank path, its all-reduce
  hook) in one `torchrun` process: a Llama from a config sharded per decoder layer, K = 3 with one micro-batch
  per step trained on its negated loss, tau 0.97, 3 SGD steps, against the data-parallel exchange on an
  unsharded copy and the same micro-gradients. Passes when the accepted sets are equal, the distances within
  1e-5 and the parameters within 1e-5 (relative to how far training moved them). Runs on the CPU too (gloo).
- `correctness/fsdp2/trainer`: `GAFTrainer` at `gaf_threshold=2` against `Trainer`, both under accelerate's
  FSDP2 (`fsdp="full_shard"`, `fsdp_config={"fsdp_version": 2, "transformer_layer_cls_to_wrap":
  ["LlamaDecoderLayer"]}`), world size 1, K = 2, fp32, 6 AdamW steps on token-normalised losses; passes when
  the model is sharded, every micro-gradient is accepted and the parameters differ by at most 1e-5 in the
  measure of the equivalence checks. Needs CUDA (accelerate runs FSDP only on accelerators; on the CPU the
  same worker runs without FSDP and the check is skipped, `tests/test_trainer_distributed.py` covering the
  FSDP2 path on CPU processes).
- `speed/fsdp2`, `memory/fsdp2`: the same FSDP2 setup in bf16 (`bf16=True`), K = 2, on a 12-layer Llama of
  hidden size 1024 (about 200M parameters): step time of `GAFTrainer` over `Trainer` (medians after warm-up),
  and its extra peak CUDA memory, which must stay within the step's shards and the filtered shard,
  `(K + 1) x P` elements at world size 1. Need CUDA.

The full sizes keep the run well inside an 8-minute window on one H100/H200-class GPU; `--time-budget`
(default 420 s) bounds it in any case.
"""

from __future__ import annotations

import argparse
import copy
import json
import gc
import math
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

REPOSITORY = Path(__file__).resolve().parents[1]
# A bare copy of the repository has hf_gaf beside benchmarks/, not installed; and importing this file (the
# tests do) must find the benchmarks' helpers as running it does.
for _path in (REPOSITORY, REPOSITORY / "benchmarks"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import numpy as np  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from torch import nn  # noqa: E402
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402
from transformers.trainer_callback import PrinterCallback  # noqa: E402

import hf_gaf  # noqa: E402
from common import RESULTS_DIR, command_line, machine, output_stem, write_json  # noqa: E402
from hf_gaf import RULES, GAFTrainer, GAFTrainingArguments, GradientBuffer, filter_microgradients  # noqa: E402

NAME = "gpu_check"

# Relative parameter difference to the Trainer that a run at gaf_threshold=2 may always show, by precision.
EQUIVALENCE_FLOOR = {"fp32": 1e-5, "bf16": 1e-2, "fp16": 1e-2}
# How many times the Trainer's own run-to-run difference GAF's may be.
NOISE_FACTOR = 10.0
FILTER_THRESHOLD = 0.97
# Distances closer than this to the threshold may round either way on another device.
DECISION_MARGIN = 1e-4
DISTANCE_TOLERANCE = 1e-5


@dataclass(frozen=True)
class ModelSpec:
    """A timm architecture, its input and its micro-batch size."""

    architecture: str
    image_size: int
    num_labels: int
    batch_size: int
    timm_kwargs: tuple[tuple[str, Any], ...] = ()

    def describe(self) -> str:
        extra = "".join(f", {key}={value}" for key, value in self.timm_kwargs)
        return f"{self.architecture} ({self.image_size}x{self.image_size}{extra}, micro-batch {self.batch_size})"


@dataclass(frozen=True)
class Sizes:
    """How much every check does; see the module docstring for what the full sizes mean."""

    correctness_model: ModelSpec
    equivalence_steps: int
    fp16_updates: int
    fp16_skipped_steps: int
    non_finite_steps: int
    filter_columns: int
    filter_micro: tuple[int, ...]
    speed_models: dict[str, ModelSpec]
    speed_warmup_steps: int
    speed_timed_steps: int
    speed_repeats: int
    memory_steps: int
    filter_time_columns: int
    filter_time_micro: tuple[int, ...]
    filter_time_warmup: int
    filter_time_calls: int
    fsdp2_model: tuple[int, int] = (1024, 12)  # hidden size, decoder layers
    fsdp2_steps: int = 6
    accumulation: int = 2


FULL = Sizes(
    correctness_model=ModelSpec("resnet18", 32, 10, 32),
    equivalence_steps=6,
    fp16_updates=4,
    fp16_skipped_steps=3,
    non_finite_steps=6,
    filter_columns=1_000_003,
    filter_micro=(2, 3, 4, 8, 16, 32, 64),
    speed_models={
        "resnet18": ModelSpec("resnet18", 32, 100, 100),
        "vit_large": ModelSpec("vit_large_patch16_224", 224, 1000, 32),
    },
    speed_warmup_steps=3,
    speed_timed_steps=20,
    speed_repeats=3,
    memory_steps=3,
    filter_time_columns=300_000_000,
    filter_time_micro=(2, 4, 8, 16),
    filter_time_warmup=2,
    filter_time_calls=5,
)

# The same code at sizes a 2-core CPU runs in seconds: one ViT-L block on 32x32 images stands in for ViT-L/16.
QUICK = replace(
    FULL,
    correctness_model=ModelSpec("resnet18", 32, 10, 4),
    equivalence_steps=2,
    fp16_updates=3,
    fp16_skipped_steps=2,
    non_finite_steps=3,
    filter_columns=20_011,
    filter_micro=(2, 3, 4, 8),
    speed_models={
        "resnet18": ModelSpec("resnet18", 32, 100, 4),
        "vit_large": ModelSpec("vit_large_patch16_224", 32, 1000, 4, (("img_size", 32), ("depth", 1))),
    },
    speed_warmup_steps=1,
    speed_timed_steps=2,
    speed_repeats=1,
    memory_steps=2,
    filter_time_columns=1_000_000,
    filter_time_micro=(2, 4),
    filter_time_warmup=1,
    filter_time_calls=2,
    fsdp2_model=(32, 2),
    fsdp2_steps=3,
)


# -- models and data ----------------------------------------------------------------------------------------


class ImageClassifier(nn.Module):
    """A timm network behind the interface the Trainer trains: `pixel_values`, `labels` -> `{"loss", "logits"}`.

    It trains as `TimmWrapperForImageClassification` (what `hf_gaf.train` builds) does: cross-entropy on
    float32 logits, and no `**kwargs` in `forward`, so the Trainer divides each micro-batch's mean loss by the
    accumulation steps and GAF weighs accepted micro-gradients equally. It needs only timm, so the check runs
    on a stock PyTorch stack, without the kit's dependencies.
    """

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        logits = self.network(pixel_values)
        loss = None if labels is None else nn.functional.cross_entropy(logits.float(), labels)
        return {"loss": loss, "logits": logits}


def build_model(spec: ModelSpec) -> ImageClassifier:
    """`spec`'s architecture from timm's own initialisation (seed 0), on the CPU."""
    torch.manual_seed(0)
    network = timm.create_model(spec.architecture, pretrained=False, num_classes=spec.num_labels, **dict(spec.timm_kwargs))
    return ImageClassifier(network)


class SyntheticImages(torch.utils.data.Dataset):
    """Random images and labels, made once (the data pipeline is not what is checked).

    Args:
        size (`int`): number of samples; a run sized to one epoch uses each exactly once.
        spec (`ModelSpec`): image size and number of labels.
        seed (`int`, *optional*, defaults to 0): seed of the images and labels.
        distinct (`int`, *optional*): repeat this many images (labels stay distinct), to bound memory.
        nan_indices (`Iterable[int]`, *optional*): samples whose image is all NaN.
    """

    def __init__(
        self, size: int, spec: ModelSpec, *, seed: int = 0, distinct: int | None = None, nan_indices: Iterable[int] = ()
    ):
        generator = torch.Generator().manual_seed(seed)
        count = size if distinct is None else min(size, distinct)
        self.images = torch.randn(count, 3, spec.image_size, spec.image_size, generator=generator)
        self.labels = torch.randint(0, spec.num_labels, (size,), generator=generator)
        self.nan_indices = frozenset(nan_indices)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        image = self.images[index % len(self.images)]
        if index in self.nan_indices:
            image = torch.full_like(image, math.nan)
        return {"pixel_values": image, "labels": self.labels[index]}


# -- training runs --------------------------------------------------------------------------------------------


def flat_parameters(model: nn.Module) -> torch.Tensor:
    """All parameters as one float32 CPU vector, in `model.parameters()` order."""
    return torch.cat([p.detach().reshape(-1).float().cpu() for p in model.parameters()])


def _cpu_copy(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    if isinstance(value, dict):
        return {key: _cpu_copy(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_cpu_copy(item) for item in value)
    return copy.deepcopy(value)


def differences(before: Any, after: Any, path: str = "") -> list[str]:
    """Where two nested states (dicts, lists, tensors, numbers) are not identical: tensors bit for bit."""
    if isinstance(before, torch.Tensor) or isinstance(after, torch.Tensor):
        same = (
            isinstance(before, torch.Tensor)
            and isinstance(after, torch.Tensor)
            and before.dtype == after.dtype
            and before.shape == after.shape
            and torch.equal(before, after)
        )
        return [] if same else [path or "tensor"]
    if isinstance(before, dict) and isinstance(after, dict):
        if before.keys() != after.keys():
            return [f"{path} keys"]
        return [d for key in before for d in differences(before[key], after[key], f"{path}.{key}")]
    if isinstance(before, (list, tuple)) and isinstance(after, (list, tuple)):
        if len(before) != len(after):
            return [f"{path} length"]
        return [d for i, (a, b) in enumerate(zip(before, after)) for d in differences(a, b, f"{path}[{i}]")]
    if isinstance(before, float) and isinstance(after, float) and math.isnan(before) and math.isnan(after):
        return []
    return [] if before == after else [path or "value"]


def training_state(trainer: Trainer) -> dict[str, Any]:
    """What a skipped step must leave untouched: parameters, optimizer and LR scheduler state, grad scaler."""
    scaler = trainer.accelerator.scaler
    return {
        "parameters": flat_parameters(trainer.model),
        "optimizer": _cpu_copy(trainer.optimizer.state_dict()),
        "lr_scheduler": _cpu_copy(trainer.lr_scheduler.state_dict()),
        "scaler": None if scaler is None else scaler.state_dict(),
    }


class StepRecorder(TrainerCallback):
    """Records every optimizer step: its time, whether it was skipped, the loss scale and GAF's decision.

    A step's time runs from the end of the previous one (or the start of training) to its end, with the
    device synchronised at both ends, so it covers all of the step's work. With `snapshot_steps`, the full
    [`training_state`] is kept after those steps.
    """

    def __init__(self, device: torch.device, snapshot_steps: Iterable[int] = ()):
        self.device = device
        self.snapshot_steps = frozenset(snapshot_steps)
        self.trainer: Trainer | None = None
        self.steps: list[dict[str, Any]] = []
        self.step_times: list[float] = []
        self.snapshots: dict[int, dict[str, Any]] = {}
        self.initial_scale: float | None = None
        self._mark = 0.0

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def on_train_begin(self, args, state, control, **kwargs):
        scaler = self.trainer.accelerator.scaler
        self.initial_scale = None if scaler is None else scaler.get_scale()
        self._mark = self._now()

    def on_step_end(self, args, state, control, **kwargs):
        self.step_times.append(self._now() - self._mark)
        trainer = self.trainer
        record: dict[str, Any] = {
            "step": state.global_step,
            "optimizer_step_skipped": bool(trainer.accelerator.optimizer_step_was_skipped),
        }
        scaler = trainer.accelerator.scaler
        if scaler is not None:
            record["scale"] = scaler.get_scale()
        result = getattr(trainer, "gaf_last_result", None)
        if result is not None:
            record.update(
                gaf_skipped=bool(result.skipped),
                gaf_accepted=result.num_accepted,
                gaf_microgradients=result.num_microgradients,
                gaf_non_finite=bool(result.non_finite.any()),
            )
        self.steps.append(record)
        if state.global_step in self.snapshot_steps:
            self.snapshots[state.global_step] = training_state(trainer)
        self._mark = self._now()

    def on_train_end(self, args, state, control, **kwargs):
        self.trainer = None  # the run's model and optimizer must be freed with the Trainer


class ThresholdSwitch(TrainerCallback):
    """Sets `args.gaf_threshold` to `threshold` from optimizer step `after + 1` on (GAF reads it every step)."""

    def __init__(self, after: int, threshold: float):
        self.after = after
        self.threshold = threshold

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.after:
            args.gaf_threshold = self.threshold


@dataclass
class Run:
    """What one training run leaves for the checks."""

    parameters: torch.Tensor
    steps: list[dict[str, Any]]
    step_times: list[float]
    snapshots: dict[int, dict[str, Any]]
    initial_scale: float | None
    global_step: int
    peak_memory: int | None


@dataclass
class Context:
    """The device, the sizes, and what runs share: the initial models, built once, and a scratch folder."""

    device: torch.device
    sizes: Sizes
    workdir: str
    _templates: dict[ModelSpec, ImageClassifier] = field(default_factory=dict)
    fsdp2: dict[str, Any] | None = None  # the FSDP2 worker's report, once run

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def template(self, spec: ModelSpec) -> ImageClassifier:
        """The initial model of `spec`, on the CPU; runs train copies of it, so all start from the same weights."""
        if spec not in self._templates:
            self._templates[spec] = build_model(spec)
        return self._templates[spec]

    def train(
        self,
        spec: ModelSpec,
        dataset: torch.utils.data.Dataset,
        *,
        gaf_threshold: float | None,
        callbacks: Sequence[TrainerCallback] = (),
        snapshot_steps: Iterable[int] = (),
        **options: Any,
    ) -> Run:
        """Train a fresh copy of `spec`'s initial model with `Trainer` (`gaf_threshold=None`) or `GAFTrainer`.

        Every run gets a copy: the Trainer wraps a model's `forward` for autocast when it prepares it, so a
        reused model would accumulate wrappers (and trained weights) from run to run. `options` are
        `TrainingArguments` fields. On CUDA the peak memory is the most allocated during the run above what was
        allocated before it.
        """
        base = dict(
            output_dir=self.workdir, report_to="none", save_strategy="no", logging_strategy="no", disable_tqdm=True,
            dataloader_num_workers=0, dataloader_pin_memory=self.cuda, use_cpu=not self.cuda, seed=0,
        )  # fmt: skip
        recorder = StepRecorder(self.device, snapshot_steps)
        if gaf_threshold is None:
            trainer_class, args = Trainer, TrainingArguments(**base, **options)
        else:
            trainer_class, args = GAFTrainer, GAFTrainingArguments(**base, **options, gaf_threshold=gaf_threshold)
        model = copy.deepcopy(self.template(spec))
        baseline = _reset_peak_memory(self.device)
        trainer = trainer_class(model=model, args=args, train_dataset=dataset, callbacks=[recorder, *callbacks])
        trainer.remove_callback(PrinterCallback)
        recorder.trainer = trainer
        try:
            trainer.train()
            peak = torch.cuda.max_memory_allocated(self.device) - baseline if self.cuda else None
            return Run(
                parameters=flat_parameters(trainer.model), steps=recorder.steps, step_times=recorder.step_times,
                snapshots=recorder.snapshots, initial_scale=recorder.initial_scale,
                global_step=trainer.state.global_step, peak_memory=peak,
            )  # fmt: skip
        finally:
            recorder.trainer = None
            del trainer, model
            free_memory()


def _reset_peak_memory(device: torch.device) -> int:
    """Free what earlier runs left, restart the peak statistics and return what is still allocated (CUDA)."""
    free_memory()
    if device.type != "cuda":
        return 0
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def free_memory() -> None:
    """Collect cycles (Trainer and callbacks refer to each other) and return cached CUDA blocks."""
    gc.collect()
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def precision_options(precision: str) -> dict[str, bool]:
    return {"fp32": {}, "bf16": {"bf16": True}, "fp16": {"fp16": True}}[precision]


def relative_distance(parameters: torch.Tensor, reference: torch.Tensor, initial: torch.Tensor) -> float:
    """`|parameters - reference| / |reference - initial|` (L2, float64): 0 for the same run, 1 for no training."""
    moved = float((reference.double() - initial.double()).norm())
    return float((parameters.double() - reference.double()).norm()) / moved if moved > 0 else math.nan


# -- checks ---------------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    """What a check found: whether it passed, one line for the table, and the numbers behind it for the JSON."""

    passed: bool
    summary: str
    details: dict[str, Any] = field(default_factory=dict)


class Skipped(Exception):
    """A check that cannot run here; the message says why (e.g. `"needs CUDA: ..."`)."""

    def __init__(self, reason: str, details: dict[str, Any] | None = None):
        super().__init__(reason)
        self.details = details or {}


def require_cuda(context: Context, what: str) -> None:
    if not context.cuda:
        raise Skipped(f"needs CUDA: {what}")


def check_equivalence(context: Context, precision: str, accumulation: int) -> Outcome:
    """`GAFTrainer` at `gaf_threshold=2` trains as `Trainer` does (module docstring: criterion)."""
    sizes, spec = context.sizes, context.sizes.correctness_model
    steps = sizes.equivalence_steps
    dataset = SyntheticImages(steps * accumulation * spec.batch_size, spec, seed=1)
    options = dict(
        per_device_train_batch_size=spec.batch_size, gradient_accumulation_steps=accumulation, max_steps=steps,
        optim="sgd", learning_rate=0.05, max_grad_norm=0.0, **precision_options(precision),
    )  # fmt: skip
    reference = context.train(spec, dataset, gaf_threshold=None, **options)
    repeat = context.train(spec, dataset, gaf_threshold=None, **options)
    gaf = context.train(spec, dataset, gaf_threshold=2.0, **options)
    initial = flat_parameters(context.template(spec))
    difference = relative_distance(gaf.parameters, reference.parameters, initial)
    noise = relative_distance(repeat.parameters, reference.parameters, initial)
    allowed = max(EQUIVALENCE_FLOOR[precision], NOISE_FACTOR * noise)
    all_accepted = all(s["gaf_accepted"] == s["gaf_microgradients"] == accumulation for s in gaf.steps)
    identical = bool(torch.equal(gaf.parameters, reference.parameters))
    passed = difference <= allowed and all_accepted and gaf.global_step == reference.global_step == steps
    return Outcome(
        passed,
        f"relative difference {difference:.2g} (Trainer vs itself {noise:.2g}; allowed {allowed:.2g})"
        + ("" if all_accepted else "; GAF rejected micro-gradients at tau=2"),
        {
            "model": spec.describe(), "precision": precision, "gradient_accumulation_steps": accumulation,
            "optimizer_steps": steps, "relative_difference": difference, "trainer_run_to_run": noise,
            "allowed": allowed, "bit_identical": identical, "all_accepted": all_accepted,
        },
    )  # fmt: skip


def _fp16_options(spec: ModelSpec, steps: int, accumulation: int) -> dict[str, Any]:
    return dict(
        per_device_train_batch_size=spec.batch_size, gradient_accumulation_steps=accumulation, max_steps=steps,
        learning_rate=1e-3, fp16=True,
    )  # fmt: skip


def check_skipped_step(context: Context) -> Outcome:
    """A skipped step under fp16 loss scaling touches nothing (module docstring: criterion).

    Every step at `gaf_threshold=0` is compared with the state after the step before it. A step whose
    micro-gradients were all finite is skipped by GAF: everything must be bit-identical, the scaler's state
    too. A step with a non-finite micro-gradient (an fp16 overflow) is handed to the scaler instead, as without
    GAF: parameters and optimizer moments stay, the scale drops by the backoff factor and the growth tracker
    restarts. Its LR scheduler step is the Trainer's business: with a fused optimizer (the default) the
    scaler's skip happens inside the optimizer, and accelerate reports the step as taken.
    """
    require_cuda(context, "fp16 mixed precision with a GradScaler (accelerate creates one only on accelerators)")
    sizes, spec = context.sizes, context.sizes.correctness_model
    updates, steps, k = sizes.fp16_updates, sizes.fp16_updates + sizes.fp16_skipped_steps, sizes.accumulation
    dataset = SyntheticImages(steps * k * spec.batch_size, spec, seed=2)
    run = context.train(
        spec, dataset, gaf_threshold=2.0, callbacks=[ThresholdSwitch(after=updates, threshold=0.0)],
        snapshot_steps=range(updates, steps + 1), **_fp16_options(spec, steps, k),
    )  # fmt: skip
    problems, clean, backoffs = [], 0, 0
    if torch.equal(run.snapshots[updates]["parameters"], flat_parameters(context.template(spec))):
        problems.append(f"no update in the {updates} steps at gaf_threshold=2 (the check needs one)")
    for step in range(updates + 1, steps + 1):
        before, after, record = run.snapshots[step - 1], run.snapshots[step], run.steps[step - 1]
        scaler_before, scaler_after = before["scaler"], after["scaler"]
        if record["gaf_non_finite"]:
            backoffs += 1
            changed = differences(before["parameters"], after["parameters"], "parameters")
            changed += differences(before["optimizer"]["state"], after["optimizer"]["state"], "optimizer.state")
            expected = (scaler_before["scale"] * scaler_before["backoff_factor"], 0)
            if (scaler_after["scale"], scaler_after["_growth_tracker"]) != expected:
                changed.append(f"scaler {scaler_after['scale']:g}/{scaler_after['_growth_tracker']}, expected "
                               f"{expected[0]:g}/0 (backoff)")  # fmt: skip
        else:
            clean += 1
            changed = [] if record["gaf_skipped"] and record["optimizer_step_skipped"] else ["not skipped"]
            for part in ("parameters", "optimizer", "lr_scheduler", "scaler"):
                changed += differences(before[part], after[part], part)
        if changed:
            problems.append(f"step {step}: {', '.join(changed[:3])}")
    if not clean:
        problems.append("every step at gaf_threshold=0 had a non-finite micro-gradient: no skipped step to check")
    final = run.snapshots[steps]["scaler"]
    return Outcome(
        not problems and run.global_step == steps,
        "; ".join(problems)
        or f"{clean} skipped steps left parameters, AdamW state, LR scheduler and scaler (scale {final['scale']:g}) "
        f"bit-identical" + (f"; {backoffs} overflow steps backed off" if backoffs else ""),
        {
            "model": spec.describe(), "gradient_accumulation_steps": k, "updates": updates,
            "skipped_steps": steps - updates, "clean_skipped_steps": clean, "overflow_steps": backoffs,
            "global_step": run.global_step, "initial_scale": run.initial_scale, "steps": run.steps,
            "problems": problems,
        },
    )  # fmt: skip


def check_non_finite(context: Context) -> Outcome:
    """A NaN micro-batch makes the grad scaler back off as it does without GAF (module docstring: criterion).

    What the scaler did is read after every step: the loss scale, and whether accelerate reports the step as
    skipped. GAF's record must be one of the Trainer's two (they are the same unless a non-deterministic
    kernel tips an fp16 overflow one way in one run).
    """
    require_cuda(context, "fp16 mixed precision with a GradScaler (accelerate creates one only on accelerators)")
    sizes, spec = context.sizes, context.sizes.correctness_model
    steps, k = sizes.non_finite_steps, sizes.accumulation
    dataset = SyntheticImages(steps * k * spec.batch_size, spec, seed=3, nan_indices=(0,))
    options = _fp16_options(spec, steps, k)
    reference = context.train(spec, dataset, gaf_threshold=None, **options)
    repeat = context.train(spec, dataset, gaf_threshold=None, **options)
    gaf = context.train(spec, dataset, gaf_threshold=2.0, **options)
    initial = flat_parameters(context.template(spec))
    difference = relative_distance(gaf.parameters, reference.parameters, initial)
    noise = relative_distance(repeat.parameters, reference.parameters, initial)
    allowed = max(EQUIVALENCE_FLOOR["fp16"], NOISE_FACTOR * noise)

    def scaler_record(run: Run) -> list[tuple[float, bool]]:
        return [(s["scale"], s["optimizer_step_skipped"]) for s in run.steps]

    non_finite_steps = [s["step"] for s in gaf.steps if s["gaf_non_finite"]]
    scales = [s["scale"] for s in gaf.steps]
    previous = [gaf.initial_scale, *scales[:-1]]
    problems = []
    if not non_finite_steps:
        problems.append("no step had a non-finite micro-gradient (the NaN image was not used)")
    if not all(scales[step - 1] < previous[step - 1] for step in non_finite_steps):
        problems.append("the loss scale did not drop at a step with a non-finite micro-gradient")
    if scaler_record(gaf) not in (scaler_record(reference), scaler_record(repeat)):
        problems.append(f"(loss scale, skipped) after each step {scaler_record(gaf)} differ from the Trainer's "
                        f"{scaler_record(reference)}")  # fmt: skip
    if not bool(torch.isfinite(gaf.parameters).all()):
        problems.append("non-finite parameters")
    if not difference <= allowed:
        problems.append(f"parameters differ from the Trainer's by {difference:.2g} (allowed {allowed:.2g})")
    return Outcome(
        not problems,
        "; ".join(problems)
        or f"non-finite micro-gradients at steps {non_finite_steps}: loss scales {scales} as the Trainer's; "
        f"parameters within {difference:.2g} (Trainer vs itself {noise:.2g})",
        {
            "model": spec.describe(), "gradient_accumulation_steps": k, "optimizer_steps": steps,
            "initial_scale": gaf.initial_scale, "gaf_steps": gaf.steps, "trainer_steps": reference.steps,
            "trainer_repeat_steps": repeat.steps, "non_finite_steps": non_finite_steps,
            "relative_difference": difference, "trainer_run_to_run": noise, "allowed": allowed, "problems": problems,
        },
    )  # fmt: skip


def agreement_rows(micro: int, columns: int, seed: int = 0) -> torch.Tensor:
    """`[micro, columns]` float32 rows `sign_i * b + noise_i`: two rows agree (cosine about 0.5) or oppose (-0.5).

    Every distance the rule computes is then far from a threshold near 1, so a decision cannot depend on
    rounding; rows 0 and 1 oppose, so M = 2 is a skipped step. From M = 4 row 1 is NaN, from M = 8 row 2 is
    zero: both must be excluded on every device.
    """
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(columns, generator=generator)
    signs = torch.where(torch.rand(micro, generator=generator) < 0.6, 1.0, -1.0)
    signs[0], signs[1] = 1.0, -1.0
    rows = signs[:, None] * base + torch.randn(micro, columns, generator=generator)
    if micro >= 4:
        rows[1] = math.nan
    if micro >= 8:
        rows[2] = 0.0
    return rows


def _compare_filter(cpu, device, tau: float) -> dict[str, Any]:
    """One case's comparison of the CPU and device `GAFResult`s; `problems` lists what differs.

    The decision (accepted set, start, distances) and the gradient are compared only when every distance the
    CPU's rule compared lies more than `DECISION_MARGIN` from `tau`: nearer, rounding may decide either way.
    """
    problems = []
    for name in ("excluded", "non_finite"):
        if not torch.equal(getattr(cpu, name), getattr(device, name)):
            problems.append(f"{name} {getattr(device, name).tolist()} != CPU {getattr(cpu, name).tolist()}")
    compared = ~torch.isnan(cpu.distances)
    margin = float((cpu.distances[compared] - tau).abs().min()) if bool(compared.any()) else math.inf
    decided = margin > DECISION_MARGIN
    distance_error = gradient_error = None
    if decided:
        if cpu.skipped != device.skipped or cpu.start != device.start or not torch.equal(cpu.accepted, device.accepted):
            problems.append(f"accepted {device.accepted.tolist()} (start {device.start}, skipped {device.skipped}) "
                            f"!= CPU {cpu.accepted.tolist()} (start {cpu.start}, skipped {cpu.skipped})")  # fmt: skip
        elif not torch.equal(compared, ~torch.isnan(device.distances)):
            problems.append("the rule compared other micro-gradients")
        elif bool(compared.any()):
            distance_error = float((cpu.distances[compared] - device.distances[compared]).abs().max())
            if not distance_error <= DISTANCE_TOLERANCE:
                problems.append(f"distances differ by {distance_error:.2g} (tolerance {DISTANCE_TOLERANCE:g})")
    if decided and not problems and cpu.gradient is not None:
        gradient = device.gradient.cpu()
        gradient_error = float((gradient.float() - cpu.gradient.float()).abs().max())
        try:
            torch.testing.assert_close(gradient, cpu.gradient)
        except AssertionError as error:
            problems.append(f"gradients differ: {str(error).splitlines()[0]} (max {gradient_error:.2g})")
    return {
        "accepted": cpu.accepted.tolist(), "skipped": cpu.skipped, "margin_to_threshold": margin,
        "decision_compared": decided, "distance_error": distance_error, "gradient_max_abs_error": gradient_error,
        "problems": problems,
    }  # fmt: skip


def check_filter_devices(context: Context, dtype: torch.dtype) -> Outcome:
    """`filter_microgradients` on the device equals the CPU's (module docstring: criterion).

    In the CPU dry run both sides are the CPU: it checks the code, not the device.
    """
    sizes = context.sizes
    columns, largest = sizes.filter_columns, max(sizes.filter_micro)
    cases, failed = [], []
    for micro in sizes.filter_micro:
        rows = agreement_rows(micro, columns, seed=micro).to(dtype)
        on_device = rows.to(context.device)
        out = torch.empty(columns, dtype=dtype, device=context.device)
        for rule in RULES:
            cpu = filter_microgradients(rows, FILTER_THRESHOLD, rule=rule)
            result = filter_microgradients(on_device, FILTER_THRESHOLD, rule=rule, out=out)
            case = {"micro": micro, "rule": rule, **_compare_filter(cpu, result, FILTER_THRESHOLD)}
            if result.gradient is not None and result.gradient.data_ptr() != out.data_ptr():
                case["problems"].append("the filtered gradient was not written into out")
            cases.append(case)
            if case["problems"]:
                failed.append(f"M={micro} {rule}: {case['problems'][0]}")
        del rows, on_device, out
    worst = max((c["distance_error"] or 0.0 for c in cases), default=0.0)
    near = sum(not c["decision_compared"] for c in cases)
    where = "CUDA vs CPU" if context.cuda else "CPU vs CPU (dry run)"
    return Outcome(
        not failed,
        "; ".join(failed[:2]) or f"{where}: {len(cases)} cases (M = 2..{largest}, both rules) agree; "
        f"distances within {worst:.1g}" + (f"; {near} near the threshold, decision not compared" if near else ""),
        {"dtype": str(dtype).removeprefix("torch."), "columns": columns, "threshold": FILTER_THRESHOLD,
         "device": str(context.device), "float32_matmul_precision": torch.get_float32_matmul_precision(),
         "cases": cases},
    )  # fmt: skip


def check_speed(context: Context, key: str) -> Outcome:
    """Step time of `GAFTrainer` over `Trainer` (module docstring: what is timed)."""
    sizes, spec = context.sizes, context.sizes.speed_models[key]
    warmup, steps, k = sizes.speed_warmup_steps, sizes.speed_warmup_steps + sizes.speed_timed_steps, sizes.accumulation
    dataset = SyntheticImages(steps * k * spec.batch_size, spec, distinct=64)
    options = dict(
        per_device_train_batch_size=spec.batch_size, gradient_accumulation_steps=k, max_steps=steps, bf16=True,
        learning_rate=1e-4,
    )  # fmt: skip
    times: dict[str, list[float]] = {"gaf": [], "trainer": []}
    all_accepted = True
    for repeat in range(sizes.speed_repeats):
        for kind in ("gaf", "trainer") if repeat % 2 == 0 else ("trainer", "gaf"):
            run = context.train(spec, dataset, gaf_threshold=2.0 if kind == "gaf" else None, **options)
            times[kind] += run.step_times[warmup:]
            if kind == "gaf":
                all_accepted &= all(s["gaf_accepted"] == s["gaf_microgradients"] for s in run.steps)
    gaf, trainer = statistics.median(times["gaf"]), statistics.median(times["trainer"])
    ratio = gaf / trainer
    return Outcome(
        all_accepted and math.isfinite(ratio),
        f"GAF {gaf * 1e3:.1f} ms/step, Trainer {trainer * 1e3:.1f} ms/step: ratio {ratio:.3f}"
        + ("" if all_accepted else "; GAF rejected micro-gradients at tau=2"),
        {
            "model": spec.describe(), "parameters": _count_parameters(context.template(spec)),
            "gradient_accumulation_steps": k, "precision": "bf16", "warmup_steps": warmup,
            "timed_steps_per_run": sizes.speed_timed_steps, "runs_each": sizes.speed_repeats,
            "gaf_median_s": gaf, "trainer_median_s": trainer, "ratio": ratio, "gaf_step_s": times["gaf"],
            "trainer_step_s": times["trainer"],
        },
    )  # fmt: skip


def _count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _time_call(device: torch.device, function: Callable[[], Any]) -> float:
    """Seconds `function` takes, from CUDA events on CUDA (the host clock elsewhere)."""
    if device.type != "cuda":
        start = time.perf_counter()
        function()
        return time.perf_counter() - start
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    function()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def check_filter_time(context: Context) -> Outcome:
    """Time of `filter_microgradients` with `out=` at the sizes of a 300M-parameter model (module docstring)."""
    sizes, device = context.sizes, context.device
    columns = sizes.filter_time_columns
    block = torch.randn(max(sizes.filter_time_micro), columns, device=device)
    out = torch.empty(columns, device=device)
    rows_checked = min(columns, 4096)
    results, problems = [], []
    for micro in sizes.filter_time_micro:
        rows = block[:micro]
        call = partial(filter_microgradients, rows, 2.0, out=out)
        for _ in range(sizes.filter_time_warmup):
            call()
        seconds = [_time_call(device, call) for _ in range(sizes.filter_time_calls)]
        result = call()
        if result.num_accepted != micro:
            problems.append(f"M={micro}: {result.num_accepted} rows accepted")
        elif not torch.allclose(out[:rows_checked], rows[:, :rows_checked].mean(0), rtol=1e-5, atol=1e-6):
            problems.append(f"M={micro}: the output is not the mean of the rows")
        median = statistics.median(seconds)
        moved = (2 * micro + 1) * columns * block.element_size()  # rows read twice, output written once
        results.append({"micro": micro, "median_s": median, "seconds": seconds, "bytes_moved": moved,
                        "effective_gb_per_s": moved / median / 1e9})  # fmt: skip
    del block, out
    table = ", ".join(f"M={r['micro']} {r['median_s'] * 1e3:.1f} ms" for r in results)
    return Outcome(
        not problems,
        "; ".join(problems) or f"P={columns / 1e6:g}M float32: {table}",
        {"columns": columns, "dtype": "float32", "threshold": 2.0, "calls": sizes.filter_time_calls,
         "warmup_calls": sizes.filter_time_warmup, "timer": "CUDA events" if context.cuda else "perf_counter",
         "results": results},
    )  # fmt: skip


def check_memory(context: Context, key: str) -> Outcome:
    """Peak CUDA memory of `GAFTrainer` over `Trainer` against the documented buffer (module docstring)."""
    sizes, spec = context.sizes, context.sizes.speed_models[key]
    steps, k = sizes.memory_steps, sizes.accumulation
    dataset = SyntheticImages(steps * k * spec.batch_size, spec, distinct=64)
    options = dict(
        per_device_train_batch_size=spec.batch_size, gradient_accumulation_steps=k, max_steps=steps, bf16=True,
        learning_rate=1e-4,
    )  # fmt: skip
    # What stays allocated once made (cuBLAS workspaces, ...) is made here, not inside a measured run.
    context.train(spec, dataset, gaf_threshold=None, **{**options, "max_steps": 1})
    gaf = context.train(spec, dataset, gaf_threshold=2.0, **options)
    trainer = context.train(spec, dataset, gaf_threshold=None, **options)
    template = context.template(spec)
    p = _count_parameters(template)
    element = next(template.parameters()).element_size()
    documented = GradientBuffer.required_bytes(template.parameters(), k)
    details = {
        "model": spec.describe(), "parameters": p, "gradient_accumulation_steps": k, "element_size": element,
        "documented_bytes": documented, "buffer_bytes": k * p * element, "optimizer_steps": steps,
    }  # fmt: skip
    if gaf.peak_memory is None or trainer.peak_memory is None:
        raise Skipped("needs CUDA: peak memory is torch.cuda.max_memory_allocated", details)
    extra = gaf.peak_memory - trainer.peak_memory
    details.update(gaf_peak_bytes=gaf.peak_memory, trainer_peak_bytes=trainer.peak_memory, extra_bytes=extra,
                   extra_over_buffer=extra / (k * p * element))  # fmt: skip
    return Outcome(
        extra <= documented,
        f"peak {_gib(gaf.peak_memory)} vs {_gib(trainer.peak_memory)}: extra {_gib(extra)} = "
        f"{extra / (p * element):.2f} x P (documented at most (K+1) x P = {_gib(documented)})",
        details,
    )


def _gib(size: int) -> str:
    return f"{size / 2**30:.2f} GiB"


# -- FSDP2 (one torchrun process: FSDP2 needs a process group) -----------------------------------------------


def _llama(hidden: int, layers: int, seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=512, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 64), max_position_embeddings=128,
    )  # fmt: skip
    return LlamaForCausalLM(config)


class SyntheticTokens(torch.utils.data.Dataset):
    """Random token sequences of varying length, labels the tokens (a causal LM's token-normalised loss)."""

    def __init__(self, size: int, length: int = 32, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.sequences = [torch.randint(0, 512, (length - i % 7,), generator=generator) for i in range(size)]

    def __len__(self) -> int:
        return len(self.sequences)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.sequences[index]}


def collate_tokens(examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    longest = max(len(e["input_ids"]) for e in examples)
    ids = torch.zeros(len(examples), longest, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, example in enumerate(examples):
        ids[row, : len(example["input_ids"])], mask[row, : len(example["input_ids"])] = example["input_ids"], 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def fsdp2_exchange_run(device: torch.device, sizes: Sizes) -> dict[str, Any]:
    """`FSDPExchange` at world size 1 against the data-parallel exchange on the same micro-gradients."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from hf_gaf import FSDPExchange, GAFExchange

    hidden, layers = QUICK.fsdp2_model
    k, steps = 3, 3
    data = SyntheticTokens(steps, seed=2)
    batches = [{key: value.to(device) for key, value in collate_tokens([data[i]]).items()} for i in range(steps)]

    def loss(model, step: int, kk: int) -> torch.Tensor:
        """Micro-batch `kk` of `step`: the step's sequence, its last token changed in the second; the third negated."""
        batch = dict(batches[step])
        if kk == 1:
            batch["input_ids"] = batch["input_ids"].clone()
            batch["input_ids"][0, -1] = (batch["input_ids"][0, -1] + 1) % 512
        value = model(**batch).loss / k
        return -value if kk == k - 1 else value  # the last micro-batch of each step pulls the other way

    sharded = _llama(hidden, layers).to(device)
    mesh = init_device_mesh(device.type, (1,))
    for layer in sharded.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(sharded, mesh=mesh)
    exchange = FSDPExchange(sharded, k)
    reference = _llama(hidden, layers).to(device)
    initial = flat_parameters(reference)
    buffer, data_parallel = GradientBuffer(reference.parameters(), k), GAFExchange()
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.5) for m in (sharded, reference)]
    ours, theirs = [], []
    for step in range(steps):
        for kk in range(k):
            with exchange.capturing(kk):
                loss(sharded, step, kk).backward()
            with buffer.capturing(kk):
                loss(reference, step, kk).backward()
        result = exchange(FILTER_THRESHOLD, scale=k)
        expected = data_parallel(buffer.buffer, FILTER_THRESHOLD, out=buffer.gradient, scale=k, received=buffer.received)
        ours.append(result)
        theirs.append(expected)
        if not expected.skipped:
            buffer.install(expected.received)
        for optimizer, skipped in zip(optimizers, (result.skipped, expected.skipped)):
            if not skipped:
                optimizer.step()
            optimizer.zero_grad()
    gathered = torch.cat([p.full_tensor().detach().reshape(-1).float().cpu() for p in sharded.parameters()])
    distance = max(
        (abs(a - b) for r, e in zip(ours, theirs) for a, b in zip(r.distances.tolist(), e.distances.tolist()) if a == a and b == b),
        default=0.0,
    )
    return {
        "accepted": [r.accepted.tolist() for r in ours], "reference_accepted": [e.accepted.tolist() for e in theirs],
        "max_distance_difference": distance,
        "relative_difference": relative_distance(gathered, flat_parameters(reference), initial),
        "parameters": int(initial.numel()), "micro_gradients_per_step": k, "world_size": 1,
    }  # fmt: skip


def fsdp2_trainer_runs(device: torch.device, sizes: Sizes, workdir: str) -> dict[str, Any]:
    """Trainer and GAFTrainer under accelerate's FSDP2: equivalence (fp32), then speed and memory (bf16)."""
    from accelerate.state import AcceleratorState, GradientState

    cuda = device.type == "cuda"
    fsdp = dict(fsdp="full_shard", fsdp_config={"fsdp_version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]})

    def train(gaf: bool, hidden: int, layers: int, steps: int, **options: Any) -> dict[str, Any]:
        AcceleratorState._reset_state()
        GradientState._reset_state()
        base = dict(
            output_dir=workdir, report_to="none", save_strategy="no", logging_strategy="no", disable_tqdm=True,
            per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=steps, seed=0,
            dataloader_num_workers=0, use_cpu=not cuda, **(fsdp if cuda else {}), **options,
        )  # fmt: skip
        args = GAFTrainingArguments(**base, gaf_threshold=2.0) if gaf else TrainingArguments(**base)
        recorder = StepRecorder(device)
        baseline = _reset_peak_memory(device)
        trainer = (GAFTrainer if gaf else Trainer)(
            model=_llama(hidden, layers), args=args, train_dataset=SyntheticTokens(steps * 4), data_collator=collate_tokens,
            callbacks=[recorder],
        )  # fmt: skip
        trainer.remove_callback(PrinterCallback)
        recorder.trainer = trainer
        trainer.train()
        parameters = torch.cat([
            (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().reshape(-1).float().cpu()
            for p in trainer.model.parameters()
        ])  # fmt: skip
        run = {
            "sharded": type(next(trainer.model.parameters())).__name__ == "DTensor", "parameters": parameters,
            "step_times": recorder.step_times, "accepted_all": all(s.get("gaf_accepted") == s.get("gaf_microgradients") for s in recorder.steps),
            "peak_memory": torch.cuda.max_memory_allocated(device) - baseline if cuda else None,
            "numel": int(parameters.numel()),
        }  # fmt: skip
        del trainer
        free_memory()
        return run

    hidden, layers = QUICK.fsdp2_model
    plain, gaf = train(False, hidden, layers, 6, learning_rate=1e-3), train(True, hidden, layers, 6, learning_rate=1e-3)
    initial = flat_parameters(_llama(hidden, layers))
    report: dict[str, Any] = {
        "fsdp": cuda, "sharded": [plain["sharded"], gaf["sharded"]], "accepted_all": gaf["accepted_all"],
        "relative_difference": relative_distance(gaf["parameters"], plain["parameters"], initial),
    }  # fmt: skip
    if cuda:
        hidden, layers = sizes.fsdp2_model
        steps, warmup = sizes.fsdp2_steps + 3, 3
        timed = {"gaf": [], "trainer": []}
        peaks = {}
        for kind in ("trainer", "gaf", "gaf", "trainer"):
            run = train(kind == "gaf", hidden, layers, steps, bf16=True, learning_rate=1e-4)
            timed[kind] += run["step_times"][warmup:]
            peaks[kind] = min(peaks.get(kind, math.inf), run["peak_memory"])
            report["speed_parameters"] = run["numel"]
        report.update(gaf_step_s=timed["gaf"], trainer_step_s=timed["trainer"], gaf_peak_bytes=peaks["gaf"],
                      trainer_peak_bytes=peaks["trainer"], speed_model=f"Llama hidden {hidden}, {layers} layers")  # fmt: skip
    return report


def fsdp2_worker(out: Path, quick: bool) -> None:
    """The `--fsdp2-worker` entry: run by `torchrun --nproc_per_node 1`, writes `out` (JSON)."""
    import torch.distributed as dist

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    sizes = QUICK if quick else FULL
    transformers.logging.set_verbosity_error()
    report: dict[str, Any] = {}
    for name, run in (("exchange", lambda: fsdp2_exchange_run(device, sizes)),
                      ("trainer", lambda: fsdp2_trainer_runs(device, sizes, tempfile.mkdtemp(prefix="gpu_check_fsdp2_")))):  # fmt: skip
        try:
            report[name] = run()
        except Exception as error:  # noqa: BLE001 - recorded per part, the check reports it
            report[name] = {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()}
    write_json(out, report)
    dist.destroy_process_group()


def _fsdp2_report(context: Context) -> dict[str, Any]:
    """The FSDP2 worker's report, from one `torchrun` process run once per gpu_check run."""
    if context.fsdp2 is None:
        import subprocess

        from hf_gaf.testing import free_port

        out = Path(context.workdir) / "fsdp2.json"
        command = [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", "--master_addr=127.0.0.1",
            f"--master_port={free_port()}", str(Path(__file__).resolve()), "--fsdp2-worker", str(out),
            *(["--quick"] if context.sizes is QUICK else []),
        ]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, timeout=900, check=False)
        if done.returncode or not out.exists():
            raise RuntimeError(f"the FSDP2 worker failed ({done.returncode}): {done.stderr[-2000:]}")
        context.fsdp2 = json.loads(out.read_text())
    return context.fsdp2


def _fsdp2_part(context: Context, name: str) -> dict[str, Any]:
    part = _fsdp2_report(context)[name]
    if "error" in part:
        raise RuntimeError(f"{part['error']}\n{part['traceback']}")
    return part


def check_fsdp2_exchange(context: Context) -> Outcome:
    """`FSDPExchange` at world size 1 decides and updates as the data-parallel exchange (module docstring)."""
    part = _fsdp2_part(context, "exchange")
    same = part["accepted"] == part["reference_accepted"]
    rejected = sum(not a for step in part["accepted"] for a in step)
    passed = same and rejected > 0 and part["max_distance_difference"] <= DISTANCE_TOLERANCE and part["relative_difference"] <= 1e-5
    return Outcome(
        passed,
        f"accepted sets {'equal' if same else 'differ'} ({rejected} rejected), distances within "
        f"{part['max_distance_difference']:.1g}, relative parameter difference {part['relative_difference']:.2g}",
        part,
    )


def check_fsdp2_trainer(context: Context) -> Outcome:
    """`GAFTrainer` at tau = 2 under accelerate's FSDP2 trains as `Trainer` does (module docstring)."""
    part = _fsdp2_part(context, "trainer")
    if not part["fsdp"]:
        raise Skipped("needs CUDA: accelerate runs FSDP2 only on accelerators (this dry run trained without it)", part)
    passed = all(part["sharded"]) and part["accepted_all"] and part["relative_difference"] <= EQUIVALENCE_FLOOR["fp32"]
    return Outcome(passed, f"sharded {part['sharded']}, relative difference {part['relative_difference']:.2g}", part)


def check_fsdp2_speed(context: Context) -> Outcome:
    part = _fsdp2_part(context, "trainer")
    if not part["fsdp"]:
        raise Skipped("needs CUDA: accelerate runs FSDP2 only on accelerators", part)
    gaf, trainer = statistics.median(part["gaf_step_s"]), statistics.median(part["trainer_step_s"])
    return Outcome(math.isfinite(gaf / trainer), f"{part['speed_model']}, bf16, K=2: ratio {gaf / trainer:.3f}",
                   {**part, "ratio": gaf / trainer})  # fmt: skip


def check_fsdp2_memory(context: Context) -> Outcome:
    part = _fsdp2_part(context, "trainer")
    if not part["fsdp"]:
        raise Skipped("needs CUDA: peak memory is torch.cuda.max_memory_allocated", part)
    extra, p = part["gaf_peak_bytes"] - part["trainer_peak_bytes"], part["speed_parameters"]
    documented = (context.sizes.accumulation + 1) * p * 4  # shards in the float32 reduce dtype, and the filtered shard
    return Outcome(extra <= documented, f"extra {_gib(extra)} = {extra / (4 * p):.2f} x P (at most (K+1) x P = {_gib(documented)})",
                   {**part, "extra_bytes": extra, "documented_bytes": documented})  # fmt: skip


@dataclass(frozen=True)
class Check:
    """A named check; its group (`correctness`, `speed`, `memory`) is the name's first part."""

    name: str
    run: Callable[[Context], Outcome]
    criterion: str

    @property
    def group(self) -> str:
        return self.name.split("/", 1)[0]


_EQUIVALENCE = "relative parameter difference to Trainer <= max(floor, 10 x Trainer's run-to-run), every micro-gradient accepted"
CHECKS: tuple[Check, ...] = (
    *(
        Check(f"correctness/equivalence/{precision}/k{k}", partial(check_equivalence, precision=precision, accumulation=k),
              f"{_EQUIVALENCE}; floor {EQUIVALENCE_FLOOR[precision]:g}")
        for precision in ("fp32", "bf16")
        for k in (2, 4)
    ),
    Check("correctness/fp16/skipped_step", check_skipped_step,
          "skipped steps leave parameters, optimizer state, LR scheduler and the scaler's scale and growth tracker "
          "bit-identical (steps with a non-finite micro-gradient: the scaler backs off, nothing else changes)"),
    Check("correctness/fp16/non_finite", check_non_finite,
          "the loss scale drops at the NaN micro-batch; loss scale and skipped flag after every step as Trainer's "
          f"fed the same data; parameters within max({EQUIVALENCE_FLOOR['fp16']:g}, 10 x Trainer's run-to-run)"),
    *(
        Check(f"correctness/filter/{name}", partial(check_filter_devices, dtype=dtype),
              f"same excluded/accepted/start/skipped as on the CPU, distances within {DISTANCE_TOLERANCE:g}, "
              "gradients torch.testing.assert_close")
        for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16), ("float16", torch.float16))
    ),
    Check("correctness/fsdp2/exchange", check_fsdp2_exchange,
          "FSDPExchange at world size 1: accepted sets equal to the data-parallel exchange's, distances within "
          f"{DISTANCE_TOLERANCE:g}, parameters within 1e-5"),
    Check("correctness/fsdp2/trainer", check_fsdp2_trainer,
          "GAFTrainer at tau=2 under accelerate's FSDP2: sharded, every micro-gradient accepted, relative parameter "
          f"difference to Trainer under FSDP2 <= {EQUIVALENCE_FLOOR['fp32']:g}"),
    *(
        Check(f"speed/{key}", partial(check_speed, key=key),
              "measured; GAF accepts every micro-gradient at gaf_threshold=2")
        for key in ("resnet18", "vit_large")
    ),
    Check("speed/filter", check_filter_time, "measured; every row accepted at tau=2 and the output is their mean"),
    Check("speed/fsdp2", check_fsdp2_speed, "measured; GAFTrainer over Trainer under FSDP2, bf16, K=2"),
    *(
        Check(f"memory/{key}", partial(check_memory, key=key),
              "peak(GAFTrainer) - peak(Trainer) <= (K+1) x P x element size")
        for key in ("resnet18", "vit_large")
    ),
    Check("memory/fsdp2", check_fsdp2_memory, "peak(GAFTrainer) - peak(Trainer) under FSDP2 <= (K+1) x P x 4 bytes"),
)  # fmt: skip


# -- running, reporting ---------------------------------------------------------------------------------------


def select_checks(only: str | None, checks: Sequence[Check] = CHECKS) -> list[Check]:
    """The checks named by `--only`: comma-separated groups, check names or their leading parts.

    Raises:
        ValueError: a name matches no check; the message lists the groups and checks.
    """
    if not only:
        return list(checks)
    tokens = [token.strip().strip("/") for token in only.split(",") if token.strip()]
    unknown = [t for t in tokens if not any(c.name == t or c.name.startswith(t + "/") for c in checks)]
    if unknown or not tokens:
        groups = sorted({c.group for c in checks})
        raise ValueError(
            f"--only got {', '.join(unknown) or 'nothing'}, which names no check. Give comma-separated groups "
            f"({', '.join(groups)}), check names or their leading parts, e.g. --only correctness/fp16,speed/filter. "
            f"Checks: {', '.join(c.name for c in checks)}."
        )
    return [c for c in checks if any(c.name == t or c.name.startswith(t + "/") for t in tokens)]


def run_check(check: Check, context: Context) -> dict[str, Any]:
    """Run one check and record it: `passed`, `failed` (with the error) or `skipped` (with the reason)."""
    record: dict[str, Any] = {"name": check.name, "group": check.group, "criterion": check.criterion}
    start = time.perf_counter()
    try:
        outcome = check.run(context)
    except Skipped as skipped:
        record.update(status="skipped", reason=str(skipped), details=skipped.details)
    except Exception as error:  # noqa: BLE001 - one failing check must not stop the others
        record.update(status="failed", error=f"{type(error).__name__}: {error}", traceback=traceback.format_exc())
    else:
        record.update(status="passed" if outcome.passed else "failed", summary=outcome.summary,
                      details=outcome.details)  # fmt: skip
        if not outcome.passed:
            record["error"] = outcome.summary
    record["seconds"] = time.perf_counter() - start
    free_memory()
    return record


def run_checks(
    checks: Sequence[Check],
    context: Context,
    *,
    time_budget: float | None = None,
    on_record: Callable[[list[dict[str, Any]]], None] = lambda records: None,
) -> list[dict[str, Any]]:
    """Run `checks` in order, each on its own; `on_record(records)` after each (to save progress).

    A check that would start after `time_budget` seconds is recorded as skipped, naming the `--only` that
    runs it.
    """
    records: list[dict[str, Any]] = []
    start = time.perf_counter()
    for index, check in enumerate(checks, 1):
        elapsed = time.perf_counter() - start
        if time_budget is not None and elapsed >= time_budget:
            record = {
                "name": check.name, "group": check.group, "criterion": check.criterion, "status": "skipped",
                "reason": f"time budget: {elapsed:.0f} s of {time_budget:g} s spent; run it with --only {check.name}",
                "seconds": 0.0,
            }  # fmt: skip
        else:
            record = run_check(check, context)
        records.append(record)
        print(f"[{index:2}/{len(checks)}] {check.name}: {record['status']} ({record['seconds']:.1f} s)", flush=True)
        on_record(records)
    return records


def exit_status(records: Sequence[dict[str, Any]]) -> int:
    """1 if any check failed, else 0 (skipped checks do not fail the run)."""
    return int(any(r["status"] == "failed" for r in records))


def device_info(device: torch.device) -> dict[str, Any]:
    """The accelerator the checks ran on (the CPU and library versions are in `machine`)."""
    info: dict[str, Any] = {"type": device.type, "float32_matmul_precision": torch.get_float32_matmul_precision()}
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        info.update(
            name=properties.name, capability=f"{properties.major}.{properties.minor}",
            memory_bytes=properties.total_memory, multiprocessors=properties.multi_processor_count,
            cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
        )  # fmt: skip
    return info


def print_table(records: Sequence[dict[str, Any]]) -> None:
    width = max(len(r["name"]) for r in records)
    print(f"\n{'check':{width}}  {'status':7} {'time':>6}  result")
    for r in records:
        result = r.get("summary") if r["status"] == "passed" else r.get("error") or r.get("reason") or ""
        result = result.splitlines()[0] if result else ""
        print(f"{r['name']:{width}}  {r['status']:7} {r['seconds']:5.1f}s  {result[:160]}")


def output_tag(only: str | None) -> str:
    """The file-name tag of a `--only` run (`only_correctness-fp16_speed`), so that it never replaces the full run's."""
    if not only:
        return ""
    return "only_" + "_".join(t.strip().strip("/").replace("/", "-") for t in only.split(",") if t.strip())


def parse_arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (implied without CUDA); writes gpu_check_quick.json")
    parser.add_argument(
        "--only",
        help="comma-separated groups (correctness, speed, memory), check names or their leading parts, "
        "e.g. correctness/fp16,speed/filter; writes gpu_check_only_<names>.json. Checks: "
        + ", ".join(c.name for c in CHECKS),
    )
    parser.add_argument("--time-budget", type=float, default=420.0,
                        help="seconds after which no further check starts (default: %(default)s)")  # fmt: skip
    parser.add_argument("--output_dir", type=Path, default=RESULTS_DIR, help="where the JSON goes (default: %(default)s)")
    arguments = parser.parse_args(argv)
    try:
        arguments.checks = select_checks(arguments.only)
    except ValueError as error:
        parser.error(str(error))
    return arguments


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "--fsdp2-worker":  # the FSDP2 checks' torchrun process
        fsdp2_worker(Path(argv[1]), "--quick" in argv)
        return 0
    arguments = parse_arguments(argv)
    if torch.cuda.is_available() and torch.cuda.device_count() > 1:
        print(f"gpu_check runs on one GPU, but {torch.cuda.device_count()} are visible; pick one, e.g. "
              "CUDA_VISIBLE_DEVICES=0 python benchmarks/gpu_check.py", file=sys.stderr)  # fmt: skip
        return 2
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    quick = arguments.quick or device.type != "cuda"
    if device.type != "cuda":
        print("gpu_check: no CUDA device, so this is a tiny dry run of the same code on the CPU (quick sizes); "
              "the checks that need CUDA are reported as skipped.", flush=True)  # fmt: skip
    transformers.logging.set_verbosity_error()  # GAF's expected warnings (the NaN micro-batch) stay out of the table
    path = arguments.output_dir / f"{output_stem(NAME, quick=quick, tag=output_tag(arguments.only))}.json"
    sizes = QUICK if quick else FULL
    payload: dict[str, Any] = {
        "command": command_line("gpu_check.py", argv),
        "dry_run": device.type != "cuda", "quick": quick, "complete": False, "device": device_info(device),
        "machine": machine("transformers", "accelerate", "timm"), "hf_gaf": hf_gaf.__version__,
        "time_budget_s": arguments.time_budget, "sizes": asdict(sizes), "checks": [],
    }  # fmt: skip

    def save(records: list[dict[str, Any]]) -> None:
        write_json(path, {**payload, "checks": records})

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as workdir:
        context = Context(device=device, sizes=sizes, workdir=workdir)
        records = run_checks(arguments.checks, context, time_budget=arguments.time_budget, on_record=save)
    counts = {status: sum(r["status"] == status for r in records) for status in ("passed", "failed", "skipped")}
    payload.update(complete=True, elapsed_s=time.perf_counter() - start, counts=counts)
    save(records)
    name = device_info(device).get("name", "CPU (dry run)")
    print_table(records)
    print(f"\n{name}, torch {torch.__version__}, transformers {transformers.__version__}: {len(records)} checks, "
          f"{counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped in "
          f"{payload['elapsed_s']:.0f} s; wrote {path}")  # fmt: skip
    return exit_status(records)


if __name__ == "__main__":
    sys.exit(main())
