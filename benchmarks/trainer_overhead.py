"""Step-time overhead of GAFTrainer over the plain Trainer on the same model and data (CPU).

Setups (each: GAFTrainer at gaf_threshold=2, so both make the same updates, against Trainer):

- `mlp`: a 3-layer MLP on 32x32 images, about 10 ms per step: the per-step fixed cost of GAF;
- `resnet18`: ResNet-18 (11.2M parameters) at 32x32, 100 classes, one process with gradient
  accumulation (K=2), and with every parameter tensor filtered on its own (`tensor`) or each
  stage (`group`);
- `resnet18-ddp`: the same on 2 processes under torchrun (gloo), K=1.

GAFTrainer and Trainer alternate run by run; a run is a short `trainer.train()`, its step times
come from a callback (time between consecutive optimizer steps, the first step of each run dropped
as warm-up). Reports the median seconds per optimizer step and the GAF/Trainer ratio of medians.

    python benchmarks/trainer_overhead.py            # every setup
    python benchmarks/trainer_overhead.py --quick    # fewer, smaller steps; writes trainer_overhead_quick.json
    python benchmarks/trainer_overhead.py --setups mlp,resnet18
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script: its sibling modules
from common import RESULTS_DIR, command_line, machine, output_stem, write_json  # noqa: E402

# name: (model, processes, gradient accumulation steps, GAF options, per-device batch size)
SETUPS = {
    "mlp": ("mlp", 1, 2, {}, 64),
    "resnet18": ("resnet18", 1, 2, {}, 32),
    "resnet18-tensor": ("resnet18", 1, 2, {"gaf_granularity": "tensor"}, 32),
    "resnet18-group": ("resnet18", 1, 2, {"gaf_granularity": "group", "gaf_group_by": r"timm_model\.(layer\d|conv1|bn1|fc)"}, 32),
    "resnet18-ddp": ("resnet18", 2, 1, {}, 32),
    "resnet18-ddp-tensor": ("resnet18", 2, 1, {"gaf_granularity": "tensor"}, 32),
}
NUM_CLASSES, IMAGE_SIZE = 100, 32


class MLP(nn.Module):
    """A 3-layer MLP taking `pixel_values` and `labels` like a transformers image classifier."""

    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Flatten(), nn.Linear(3 * IMAGE_SIZE**2, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
            nn.Linear(256, NUM_CLASSES),
        )  # fmt: skip

    def forward(self, pixel_values, labels=None):
        logits = self.layers(pixel_values)
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


def build(model_name: str) -> nn.Module:
    from hf_gaf.train.models import create_image_classifier

    torch.manual_seed(0)
    return MLP() if model_name == "mlp" else create_image_classifier(model_name, NUM_CLASSES, image_size=IMAGE_SIZE)


class Images:
    """Random images and labels, generated once (the data pipeline is not what is measured)."""

    def __init__(self, size: int):
        g = torch.Generator().manual_seed(0)
        self.pixels = torch.randn(size, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)
        self.labels = torch.randint(0, NUM_CLASSES, (size,), generator=g)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"pixel_values": self.pixels[i], "labels": self.labels[i]}


def timed_run(gaf: bool, model, dataset, setup: tuple, steps: int, output_dir: str) -> list[float]:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from hf_gaf import GAFTrainer, GAFTrainingArguments

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.marks: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.marks.append(time.perf_counter())

    _, _, accumulation, options, batch_size = setup
    common = dict(
        output_dir=output_dir, use_cpu=True, report_to="none", save_strategy="no", disable_tqdm=True,
        logging_strategy="no", per_device_train_batch_size=batch_size, gradient_accumulation_steps=accumulation,
        max_steps=steps + 1, learning_rate=1e-3, dataloader_num_workers=0, ddp_find_unused_parameters=False, seed=0,
    )  # fmt: skip
    times = StepTimes()
    if gaf:
        args, cls = GAFTrainingArguments(gaf_threshold=2.0, **options, **common), GAFTrainer
    else:
        args, cls = TrainingArguments(**common), Trainer
    cls(model=model, args=args, train_dataset=dataset, callbacks=[times]).train()
    return [b - a for a, b in zip(times.marks, times.marks[1:])]


def measure(setup: tuple, steps: int, repeats: int) -> dict:
    """Alternate GAF and plain runs on one model; return this process's per-step times."""
    torch.set_num_threads(1)
    model_name, processes, accumulation, _, batch_size = setup
    model = build(model_name)
    dataset = Images(batch_size * accumulation * (steps + 1) * processes)
    times = {"gaf": [], "plain": []}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(repeats):
            for kind in ("gaf", "plain") if repeat % 2 == 0 else ("plain", "gaf"):
                times[kind] += timed_run(kind == "gaf", model, dataset, setup, steps, tmp)
    return {"params": sum(p.numel() for p in model.parameters()), "gaf_step_s": times["gaf"], "plain_step_s": times["plain"]}


def run_distributed(name: str, steps: int, repeats: int) -> dict:
    from hf_gaf.testing import torchrun

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rank0.json"
        target = [__file__, "--worker", str(out), "--setups", name, "--steps", str(steps), "--repeats", str(repeats)]
        done = torchrun(target, SETUPS[name][1], timeout=3600, capture=False)
        if done.returncode:
            raise SystemExit(f"{name}: the launch failed ({done.returncode})")
        return json.loads(out.read_text())


def summarise(name: str, raw: dict) -> dict:
    model_name, processes, accumulation, options, batch_size = SETUPS[name]
    gaf, plain = statistics.median(raw["gaf_step_s"]), statistics.median(raw["plain_step_s"])
    return {
        "setup": name, "model": model_name, "processes": processes, "gradient_accumulation_steps": accumulation,
        "gaf_options": options, "per_device_batch_size": batch_size, "params": raw["params"],
        "steps_measured_each": len(raw["gaf_step_s"]), "trainer_median_s": plain, "gaf_trainer_median_s": gaf,
        "ratio": gaf / plain, "gaf_step_s": raw["gaf_step_s"], "plain_step_s": raw["plain_step_s"],
    }  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setups", default=",".join(SETUPS), help=f"comma-separated, of {', '.join(SETUPS)}")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per run (default 5, ResNet; 40, MLP)")
    parser.add_argument("--repeats", type=int, default=None, help="runs of each trainer (default 4)")
    parser.add_argument("--quick", action="store_true", help="few steps; writes trainer_overhead_quick.json")
    parser.add_argument("--output", default=None, help="JSON path (default: results/trainer_overhead[_quick].json)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    cli = parser.parse_args(argv)
    names = cli.setups.split(",")
    unknown = set(names) - SETUPS.keys()
    if unknown:
        parser.error(f"unknown setups {sorted(unknown)}; choose among {', '.join(SETUPS)}")

    def sizes(name: str) -> tuple[int, int]:
        steps = cli.steps or (40 if SETUPS[name][0] == "mlp" else 5)
        repeats = cli.repeats or 4
        return (min(steps, 3), 2) if cli.quick else (steps, repeats)

    if cli.worker:
        (name,) = names
        raw = measure(SETUPS[name], *sizes(name))
        if int(os.environ.get("RANK", 0)) == 0:
            Path(cli.worker).write_text(json.dumps(raw))
        return

    rows = []
    for name in names:
        raw = run_distributed(name, *sizes(name)) if SETUPS[name][1] > 1 else measure(SETUPS[name], *sizes(name))
        rows.append(summarise(name, raw))
        print(f"{name}: GAF/Trainer {rows[-1]['ratio']:.3f}", flush=True)
    print(f"\nGAFTrainer vs Trainer at gaf_threshold=2, CPU, one thread per process ({os.cpu_count()} cores)")
    print(f"{'setup':22} {'procs':>5} {'K':>2} {'params':>11} {'batch':>6} {'Trainer s/step':>15} {'GAF s/step':>11} {'ratio':>6}")
    for r in rows:
        print(f"{r['setup']:22} {r['processes']:>5} {r['gradient_accumulation_steps']:>2} {r['params']:>11,} "
              f"{r['per_device_batch_size']:>6} {r['trainer_median_s']:>15.4f} {r['gaf_trainer_median_s']:>11.4f} "
              f"{r['ratio']:>6.3f}")  # fmt: skip
    output = Path(cli.output) if cli.output else RESULTS_DIR / f"{output_stem('trainer_overhead', quick=cli.quick)}.json"
    report = {"command": command_line("trainer_overhead.py", argv), "machine": machine("transformers"), "quick": cli.quick,
              "results": rows}  # fmt: skip
    print(f"wrote {write_json(output, report)}")


if __name__ == "__main__":
    main()
