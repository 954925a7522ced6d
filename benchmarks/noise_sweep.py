"""Label-noise sweep: GAF (tau 0.97 and 1.0) against plain averaging (tau 2), like the paper's Figure 6.

Every run is an independent `python -m hf_gaf.train` run (built by `hf_gaf.train.build_trainer`
from a command line, see `training_argv`, and scored by `hf_gaf.train.evaluate_run`) on the
embedded handwritten digits
(`hf_gaf.train.data.load_digits_dataset`, 1,437 train / 360 test images, 8x8 grayscale, 10 classes)
with symmetric label noise on the training split (`add_symmetric_label_noise`), micro-batches of
one sample per class (`class_balanced_batches`, batch size 10) and two micro-batches per optimizer
step (`gradient_accumulation_steps=2`, M = 2 as in the paper). For each noise rate and seed, every
threshold sees the same noisy labels, the same initial weights, the same batches and the same number
of optimizer steps (a step GAF skips still counts). Reported per (noise, tau), over seeds:

- clean test accuracy (mean and standard deviation),
- memorisation: the fraction of corrupted training rows the model predicts as their noisy label
  (`hf_gaf.train.metrics.compute_memorization`, "memorized"),
- the fraction of optimizer steps GAF skipped (no two micro-gradients agreed).

Configuration (see docs/results.md for why): timm `resnet18` with `layers=(1, 1, 1, 1)` and
`channels=(16, 32, 64, 128)` (a narrow ResNet-10, 0.32M parameters) on the native 8x8 images, one
input channel, no augmentation, SGD momentum 0.9, constant learning rate, no weight decay,
2,000 optimizer steps (40,000 samples, about 28 epochs).

    python benchmarks/noise_sweep.py                 # 4 noise rates x 3 thresholds x 3 seeds = 36 runs
    python benchmarks/noise_sweep.py --quick         # smoke test: 2 x 2 x 1 runs of 10 steps
    python benchmarks/noise_sweep.py --seeds 0 1 2 3 4 --jobs 1

Writes `benchmarks/results/noise_sweep.json` and `noise_sweep.png` (`noise_sweep_quick.*` with
`--quick`, so a smoke test never overwrites the published numbers). At most `--jobs` (<= 2) runs
train at once, each in its own process limited to `--threads` torch threads.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script: its sibling modules
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


@dataclass
class SweepArguments(RecipeArguments):
    """What to sweep and how each run trains (defaults: the published configuration)."""

    noise_rates: list[float] = field(
        default_factory=lambda: [0.0, 0.2, 0.4, 0.6],
        metadata={"help": "Fractions of training labels flipped to another class (symmetric noise)."},
    )
    thresholds: list[float] = field(
        default_factory=lambda: [0.97, 1.0, 2.0],
        metadata={"help": "GAF cosine-distance thresholds tau; 2 is plain averaging (the baseline)."},
    )
    seeds: list[int] = field(
        default_factory=lambda: [0, 1, 2],
        metadata={"help": "Seeds: each sets the label noise, the initial weights and the batch order."},
    )
    max_steps: int = field(default=2000, metadata={"help": "Optimizer steps per run (skipped GAF steps count)."})
    image_size: int = field(default=8, metadata={"help": "Input size (the digits are 8x8; larger upsamples)."})
    crop_padding: int = field(default=1, metadata={"help": "Padding of the random crop when --augment."})
    quick: bool = field(default=False, metadata={"help": "Smoke test: noise 0 and 0.4, tau 0.97 and 2, one seed, 10 steps."})
    output_dir: str = field(default=str(RESULTS_DIR), metadata={"help": "Where the JSON and PNG go."})
    tag: str = field(
        default="",
        metadata={"help": "Suffix of the output names (noise_sweep_<tag>.json), for extra sweeps beside the main one."},
    )

    def __post_init__(self):
        if self.quick:
            self.noise_rates, self.thresholds, self.seeds = [0.0, 0.4], [0.97, 2.0], [0]
            self.max_steps = min(self.max_steps, 10)
        super().__post_init__()
        if 2.0 not in self.thresholds:
            raise ValueError("--thresholds must include 2 (plain averaging): every comparison is against it.")

    @property
    def stem(self) -> str:
        return output_stem("noise_sweep", quick=self.quick, tag=self.tag)


def training_argv(config: dict[str, Any], noise_rate: float, threshold: float, seed: int, output_dir: str) -> list[str]:
    """The `python -m hf_gaf.train` command line of one run: its defaults are the sweep's configuration."""
    return [
        "--dataset", "digits",
        "--noise_rate", str(noise_rate), "--noise_seed", str(seed), "--seed", str(seed),
        "--gaf_threshold", str(threshold),
        "--max_steps", str(config["max_steps"]),
        *recipe_argv(config),
        "--image_size", str(config["image_size"]), "--crop_padding", str(config["crop_padding"]),
        "--per_device_eval_batch_size", "512",
        "--use_cpu", "True",
        "--output_dir", output_dir,
        "--report_to", "none", "--logging_strategy", "no", "--disable_tqdm", "True",
    ]  # fmt: skip


class StepTrace(TrainerCallback):
    """Records every step's cosine distances and skip decision, read from `GAFTrainer.gaf_last_result`."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.distances: list[list[float | None]] = []
        self.skipped: list[bool] = []

    def on_step_end(self, args, state, control, **kwargs):
        result = self.trainer.gaf_last_result
        self.distances.append([None if math.isnan(d) else d for d in result.distances.tolist()])
        self.skipped.append(bool(result.skipped))


def run_one(
    config: dict[str, Any], noise_rate: float, threshold: float, seed: int, *, trace: bool = False
) -> dict[str, Any]:
    """Train one model as `python -m hf_gaf.train` does; return its test accuracy, memorisation and GAF statistics.

    With `trace`, the result also holds every step's cosine distances (`trace_distances`, one list
    of M - 1 values per step, None where the rule made no comparison) and skip decisions, read
    from `GAFTrainer.gaf_last_result` by a callback (used by `cosine_trace.py`).
    """
    import torch
    from transformers import PrinterCallback
    from transformers.utils import logging as hf_logging

    from hf_gaf.train import build_trainer, evaluate_run

    os.environ["OMP_NUM_THREADS"] = str(config["threads"])  # the entry point keeps what the environment chose
    torch.set_num_threads(config["threads"])
    hf_logging.set_verbosity_error()
    started = time.perf_counter()
    cpu_started = time.process_time()
    with tempfile.TemporaryDirectory(prefix="noise_sweep_") as output_dir:
        trainer, data = build_trainer(training_argv(config, noise_rate, threshold, seed, output_dir))
        trainer.remove_callback(PrinterCallback)  # the sweep prints its own one-line summary per run
        tracer = StepTrace(trainer) if trace else None
        if tracer is not None:
            trainer.add_callback(tracer)
        train_output = trainer.train()
        results = evaluate_run(trainer, data)
    traced = {} if tracer is None else {"trace_distances": tracer.distances, "trace_skipped": tracer.skipped}
    return {
        "noise_rate": noise_rate,
        "threshold": threshold,
        "seed": seed,
        "test_accuracy": results["test_accuracy"],
        "train_loss": train_output.training_loss,
        "memorized": results.get("train_memorized", math.nan),
        "corrupted_predicted_clean": results.get("train_correct", math.nan),
        "uncorrupted_train_accuracy": results.get("train_uncorrupted_accuracy", math.nan),
        "num_corrupted": int(results.get("train_num_corrupted", 0)),
        "steps": results["gaf/steps"],
        "skipped_steps": results["gaf/skipped_steps_total"],
        "skipped_fraction": results["gaf/skipped_fraction"],
        "seconds": time.perf_counter() - started,
        "cpu_seconds": time.process_time() - cpu_started,
    } | traced


def summarise(runs: list[dict[str, Any]], noise_rates: list[float], thresholds: list[float]) -> list[dict[str, Any]]:
    """One row per (noise, tau): means and standard deviations over seeds, and the gain over tau = 2."""
    rows = []
    for noise in noise_rates:
        baseline = [r for r in runs if r["noise_rate"] == noise and r["threshold"] == 2.0]
        base_acc = {r["seed"]: r["test_accuracy"] for r in baseline}
        for tau in thresholds:
            group = sorted((r for r in runs if r["noise_rate"] == noise and r["threshold"] == tau), key=lambda r: r["seed"])
            acc, acc_std = mean_std([r["test_accuracy"] for r in group])
            mem, mem_std = mean_std([r["memorized"] for r in group])
            skip, _ = mean_std([r["skipped_fraction"] for r in group])
            gains = [r["test_accuracy"] - base_acc[r["seed"]] for r in group if r["seed"] in base_acc]
            gain, gain_std = mean_std(gains)
            rows.append({
                "noise_rate": noise, "threshold": tau, "seeds": [r["seed"] for r in group],
                "test_accuracy_mean": acc, "test_accuracy_std": acc_std,
                "test_accuracy_per_seed": [r["test_accuracy"] for r in group],
                "gain_over_averaging_mean": gain, "gain_over_averaging_std": gain_std,
                "memorized_mean": mem, "memorized_std": mem_std,
                "skipped_fraction_mean": skip,
            })
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    def pct(x: float) -> str:
        return "   -  " if math.isnan(x) else f"{100 * x:5.1f}"

    lines = [
        "noise  tau   | test acc % (mean ± std) | vs avg (pts) | memorised % | skipped %",
        "-------------+-------------------------+--------------+-------------+----------",
    ]
    for r in rows:
        tau = "avg " if r["threshold"] == 2.0 else f"{r['threshold']:.2f}"
        gain = "      " if r["threshold"] == 2.0 else f"{100 * r['gain_over_averaging_mean']:+5.1f}"
        lines.append(
            f" {100 * r['noise_rate']:3.0f}%  {tau}  |  {pct(r['test_accuracy_mean'])} ± {100 * r['test_accuracy_std']:4.1f}"
            f"          |    {gain}    |    {pct(r['memorized_mean'])}    |  {pct(r['skipped_fraction_mean'])}"
        )
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], runs: list[dict[str, Any]], path: Path, title: str) -> None:
    plt = pyplot()

    fig, (ax_acc, ax_mem) = plt.subplots(1, 2, figsize=(11, 4.2))
    thresholds = sorted({r["threshold"] for r in rows})
    styles = {2.0: {"color": "tab:gray", "marker": "s", "linestyle": "--"}}
    colors = iter(["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"])
    for tau in thresholds:
        group = [r for r in rows if r["threshold"] == tau]
        x = [100 * r["noise_rate"] for r in group]
        label = "averaging (tau = 2)" if tau == 2.0 else f"GAF tau = {tau:g}"
        style = styles.get(tau) or {"color": next(colors), "marker": "o", "linestyle": "-"}
        ax_acc.errorbar(x, [100 * r["test_accuracy_mean"] for r in group], yerr=[100 * r["test_accuracy_std"] for r in group],
                        label=label, capsize=3, **style)
        seed_runs = [r for r in runs if r["threshold"] == tau]
        ax_acc.scatter([100 * r["noise_rate"] for r in seed_runs], [100 * r["test_accuracy"] for r in seed_runs],
                       s=8, alpha=0.35, color=style["color"])
        noisy = [r for r in group if not math.isnan(r["memorized_mean"])]
        ax_mem.errorbar([100 * r["noise_rate"] for r in noisy], [100 * r["memorized_mean"] for r in noisy],
                        yerr=[100 * r["memorized_std"] for r in noisy], label=label, capsize=3, **style)
    ax_acc.set(xlabel="symmetric label noise (%)", ylabel="clean test accuracy (%)", title="Test accuracy vs label noise")
    ax_mem.set(xlabel="symmetric label noise (%)", ylabel="corrupted training rows predicted as noisy label (%)",
               title="Memorisation of corrupted labels")
    for ax in (ax_acc, ax_mem):
        ax.grid(alpha=0.3)
        ax.legend()
    save_figure(fig, path, title)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from transformers import HfArgumentParser

    (sweep,) = HfArgumentParser(SweepArguments).parse_args_into_dataclasses(args=argv)
    config = asdict(sweep)
    grid = [(noise, tau, seed) for noise in sweep.noise_rates for seed in sweep.seeds for tau in sweep.thresholds]
    print(f"noise sweep: {len(grid)} runs of {sweep.max_steps} steps, {sweep.jobs} at a time, {sweep.threads} thread(s) each",
          flush=True)
    started = time.perf_counter()
    runs = []
    with ProcessPoolExecutor(max_workers=sweep.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(run_one, config, noise, tau, seed) for noise, tau, seed in grid]
        for future in futures:
            run = future.result()
            runs.append(run)
            print(f"  noise {100 * run['noise_rate']:3.0f}%  tau {run['threshold']:<4g} seed {run['seed']}: "
                  f"acc {100 * run['test_accuracy']:5.1f}%  memorised {100 * run['memorized']:5.1f}%  "
                  f"skipped {100 * run['skipped_fraction']:5.1f}%  ({run['seconds']:.0f} s, {run['cpu_seconds']:.0f} s CPU)",
                  flush=True)
    wall = time.perf_counter() - started
    rows = summarise(runs, sweep.noise_rates, sweep.thresholds)
    print()
    print(format_table(rows))
    print(f"\n{len(runs)} runs in {wall / 60:.1f} min wall ({sum(r['cpu_seconds'] for r in runs) / 60:.1f} min CPU in the runs)")

    result = {
        "benchmark": "noise_sweep", "command": command_line("noise_sweep.py", argv), "config": config,
        "machine": machine("transformers", "timm"), "wall_seconds": wall, "summary": rows, "runs": runs,
    }
    out_dir = Path(sweep.output_dir)
    json_path, png_path = write_json(out_dir / f"{sweep.stem}.json", result), out_dir / f"{sweep.stem}.png"
    kwargs = json.loads(sweep.model_kwargs)
    title = (f"digits (8x8, {len(sweep.seeds)} seeds), {sweep.model_name} {kwargs}, M = 2 x 10 (1/class), "
             f"{sweep.max_steps} steps, SGD lr {sweep.learning_rate:g} mom {sweep.momentum:g} wd {sweep.weight_decay:g}")
    plot(rows, runs, png_path, title)
    print(f"wrote {json_path} and {png_path}")
    return result


if __name__ == "__main__":
    main()
