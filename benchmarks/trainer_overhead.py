"""Step-time overhead of GAFTrainer over the plain Trainer on the same model and data.

Single process with gradient accumulation (K=2), then 2 processes under torchrun (K=1), both on
CPU. GAFTrainer (gaf_threshold=2, so both make the same updates) and Trainer alternate run by
run; a run is a short `trainer.train()`, its step times come from a callback (time between
consecutive optimizer steps, first step of each run dropped as warm-up). Reports the median
seconds per optimizer step and the GAF/Trainer ratio; target <= 1.05 single-process.

    python benchmarks/trainer_overhead.py            # ResNet-18 (11.2M params), 32x32, 100 classes
    python benchmarks/trainer_overhead.py --quick    # fewer, smaller steps
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "trainer_overhead.json"


def _build(model_name: str, num_classes: int, image_size: int):
    import torch

    from hf_gaf.train.models import create_image_classifier

    torch.manual_seed(0)
    return create_image_classifier(model_name, num_classes, image_size=image_size)


class _Images:
    """Random images and labels, generated once (the data pipeline is not what is measured)."""

    def __init__(self, size: int, num_classes: int, image_size: int):
        import torch

        g = torch.Generator().manual_seed(0)
        self.pixels = torch.randn(size, 3, image_size, image_size, generator=g)
        self.labels = torch.randint(0, num_classes, (size,), generator=g)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"pixel_values": self.pixels[i], "labels": self.labels[i]}


def _timed_run(gaf: bool, model, dataset, opts: dict, output_dir: str) -> list[float]:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from hf_gaf import GAFTrainer, GAFTrainingArguments

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.marks: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.marks.append(time.perf_counter())

    common = dict(
        output_dir=output_dir, use_cpu=True, report_to="none", save_strategy="no", disable_tqdm=True,
        logging_strategy="no", per_device_train_batch_size=opts["batch_size"],
        gradient_accumulation_steps=opts["accumulation"], max_steps=opts["steps"] + 1, learning_rate=1e-3,
        dataloader_num_workers=0, ddp_find_unused_parameters=False, seed=0,
    )
    times = StepTimes()
    if gaf:
        args, cls = GAFTrainingArguments(gaf_threshold=2.0, **common), GAFTrainer
    else:
        args, cls = TrainingArguments(**common), Trainer
    cls(model=model, args=args, train_dataset=dataset, callbacks=[times]).train()
    return [b - a for a, b in zip(times.marks, times.marks[1:])]


def measure(opts: dict) -> dict:
    """Alternate GAF and plain runs on one model; return per-step times (this process)."""
    import torch

    torch.set_num_threads(opts["threads"])
    model = _build(opts["model"], opts["num_classes"], opts["image_size"])
    per_run = opts["batch_size"] * opts["accumulation"] * (opts["steps"] + 1)
    dataset = _Images(per_run * int(os.environ.get("WORLD_SIZE", 1)), opts["num_classes"], opts["image_size"])
    times = {"gaf": [], "plain": []}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(opts["repeats"]):
            order = ("gaf", "plain") if repeat % 2 == 0 else ("plain", "gaf")
            for kind in order:
                times[kind] += _timed_run(kind == "gaf", model, dataset, opts, tmp)
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "gaf_step_s": times["gaf"],
        "plain_step_s": times["plain"],
    }


def summarise(setup: str, raw: dict, opts: dict, processes: int) -> dict:
    gaf, plain = statistics.median(raw["gaf_step_s"]), statistics.median(raw["plain_step_s"])
    return {
        "setup": setup,
        "processes": processes,
        "gradient_accumulation_steps": opts["accumulation"],
        "per_device_batch_size": opts["batch_size"],
        "params": raw["params"],
        "steps_measured_each": len(raw["gaf_step_s"]),
        "trainer_median_s": plain,
        "gaf_trainer_median_s": gaf,
        "ratio": gaf / plain,
        "gaf_step_s": raw["gaf_step_s"],
        "plain_step_s": raw["plain_step_s"],
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_distributed(opts: dict, processes: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rank0.json"
        command = [
            sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}", "--master_addr=127.0.0.1",
            f"--master_port={_free_port()}", __file__, "--worker", str(out), "--options", json.dumps(opts),
        ]
        env = {**os.environ, "OMP_NUM_THREADS": str(opts["threads"])}
        subprocess.run(command, env=env, check=True, timeout=3600, stdout=subprocess.DEVNULL)
        return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer steps and a smaller batch")
    parser.add_argument("--skip-distributed", action="store_true", help="only the single-process measurement")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--options", help=argparse.SUPPRESS)
    cli = parser.parse_args()

    if cli.worker:
        opts = json.loads(cli.options)
        raw = measure(opts)
        if int(os.environ.get("RANK", 0)) == 0:
            Path(cli.worker).write_text(json.dumps(raw))
        return

    opts = dict(
        model="resnet18", num_classes=100, image_size=32, threads=1,
        batch_size=16 if cli.quick else 32, steps=3 if cli.quick else 5, repeats=2 if cli.quick else 4,
    )
    rows = [summarise("1 process, K=2", measure({**opts, "accumulation": 2}), {**opts, "accumulation": 2}, 1)]
    if not cli.skip_distributed:
        two = {**opts, "accumulation": 1}
        rows.append(summarise("2 processes (torchrun, gloo), K=1", run_distributed(two, 2), two, 2))

    import torch
    import transformers

    machine = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads_per_process": opts["threads"],
        "load_average_at_end": os.getloadavg(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }
    print(f"\nGAFTrainer vs Trainer, {opts['model']} at {opts['image_size']}x{opts['image_size']}, "
          f"{opts['num_classes']} classes, CPU, gaf_threshold=2 ({machine['cpu_count']} cores, "
          f"load {machine['load_average_at_end'][0]:.1f})")
    print(f"{'setup':36} {'params':>10} {'batch':>6} {'Trainer s/step':>15} {'GAF s/step':>11} {'ratio':>6}")
    for r in rows:
        print(f"{r['setup']:36} {r['params']:>10,} {r['per_device_batch_size']:>6} {r['trainer_median_s']:>15.3f} "
              f"{r['gaf_trainer_median_s']:>11.3f} {r['ratio']:>6.3f}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"machine": machine, "options": opts, "quick": cli.quick, "results": rows}, indent=2))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
