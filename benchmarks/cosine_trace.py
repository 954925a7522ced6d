"""Cosine distance between micro-gradients over a training run, like the paper's Figure 1.

The paper observes that the two micro-gradients of a step are nearly orthogonal for the whole run
(cosine distance near 1, often above the threshold), which is why filtering on agreement works.
This records that distance at every optimizer step of `GAFTrainer` runs (read from
`GAFTrainer.gaf_last_result` by a callback) with the configuration of `noise_sweep.py` (digits,
one sample per class per micro-batch, M = 2, narrow ResNet-10), for clean and noisy labels.

By default the runs average (tau = 2), so the trace shows the raw distances the filter would
see without the filter changing the trajectory; `--thresholds 0.97` traces a filtering run.

    python benchmarks/cosine_trace.py                # noise 0% and 40%, tau 2, 2,000 steps
    python benchmarks/cosine_trace.py --quick        # 10 steps, smoke test
    python benchmarks/cosine_trace.py --noise_rates 0.4 --thresholds 2 0.97

Writes `benchmarks/results/cosine_trace.json` and `cosine_trace.png` (`cosine_trace_quick.*`
with `--quick`).
"""

from __future__ import annotations

import json
import math
import multiprocessing
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script: its sibling modules
import noise_sweep  # noqa: E402  (the sibling benchmark: same configuration, same run function)
from common import RecipeArguments, command_line, machine, output_stem, pyplot, save_figure, write_json  # noqa: E402

REFERENCE_THRESHOLDS = (0.97, 1.0)


@dataclass
class TraceArguments(noise_sweep.SweepArguments):
    """`noise_sweep.py`'s arguments, with trace defaults: one seed, clean and 40% noise, averaging."""

    noise_rates: list[float] = field(default_factory=lambda: [0.0, 0.4], metadata={"help": "Label noise of each traced run."})
    thresholds: list[float] = field(
        default_factory=lambda: [2.0],
        metadata={"help": "tau of each traced run (2 = averaging: the trace does not change the run)."},
    )
    seeds: list[int] = field(default_factory=lambda: [0], metadata={"help": "Seeds of the traced runs."})
    window: int = field(default=50, metadata={"help": "Steps in the moving average drawn over the trace."})

    def __post_init__(self):
        if self.quick:
            self.noise_rates, self.thresholds, self.seeds = [0.4], [2.0], [0]
            self.max_steps = min(self.max_steps, 10)
        RecipeArguments.__post_init__(self)  # not the sweep's: averaging alone is a trace, not a comparison

    @property
    def stem(self) -> str:
        return output_stem("cosine_trace", quick=self.quick, tag=self.tag)


def step_distances(run: dict[str, Any]) -> list[float]:
    """The mean compared distance of each step (NaN when the rule compared nothing)."""
    out = []
    for values in run["trace_distances"]:
        seen = [v for v in values if v is not None]
        out.append(statistics.fmean(seen) if seen else math.nan)
    return out


def summarise(run: dict[str, Any]) -> dict[str, Any]:
    d = [v for v in step_distances(run) if not math.isnan(v)]
    n = len(d)
    quarter = max(1, n // 4)
    return {
        "noise_rate": run["noise_rate"], "threshold": run["threshold"], "seed": run["seed"], "steps": n,
        "distance_mean": statistics.fmean(d) if d else math.nan,
        "distance_median": statistics.median(d) if d else math.nan,
        "distance_min": min(d, default=math.nan), "distance_max": max(d, default=math.nan),
        "distance_mean_first_quarter": statistics.fmean(d[:quarter]) if d else math.nan,
        "distance_mean_last_quarter": statistics.fmean(d[-quarter:]) if d else math.nan,
        **{f"fraction_above_{t:g}": (sum(v > t for v in d) / n if n else math.nan) for t in REFERENCE_THRESHOLDS},
        "skipped_fraction": run["skipped_fraction"], "test_accuracy": run["test_accuracy"], "memorized": run["memorized"],
    }


def plot(runs: list[dict[str, Any]], path: Path, window: int, title: str) -> None:
    plt = pyplot()
    import numpy as np

    fig, (ax, ax_hist) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [3, 1]})
    colors = iter(["tab:blue", "tab:red", "tab:green", "tab:orange", "tab:purple", "tab:brown"])
    for run in runs:
        d = np.array(step_distances(run))
        steps = np.arange(1, len(d) + 1)
        color = next(colors)
        tau = "averaging" if run["threshold"] == 2.0 else f"GAF tau {run['threshold']:g}"
        label = f"noise {100 * run['noise_rate']:.0f}%, {tau}, seed {run['seed']}"
        ax.scatter(steps, d, s=2, alpha=0.25, color=color)
        if len(d) >= window:
            smooth = np.convolve(np.nan_to_num(d, nan=np.nanmean(d)), np.ones(window) / window, mode="valid")
            ax.plot(steps[window - 1:], smooth, color=color, label=f"{label} ({window}-step mean)")
        else:
            ax.plot(steps, d, color=color, label=label)
        ax_hist.hist(d[~np.isnan(d)], bins=40, range=(0.0, 1.6), alpha=0.5, color=color, orientation="horizontal")
    for t, style in zip(REFERENCE_THRESHOLDS, (":", "--")):
        for a in (ax, ax_hist):
            a.axhline(t, color="black", linestyle=style, linewidth=1, label=f"tau = {t:g}" if a is ax else None)
    ax.set(xlabel="optimizer step", ylabel="cosine distance between the 2 micro-gradients",
           title="Micro-gradient cosine distance during training", ylim=(0.0, 1.6))
    ax_hist.set(xlabel="steps", title="distribution", ylim=(0.0, 1.6))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    save_figure(fig, path, title)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser(TraceArguments).parse_args_into_dataclasses(args=argv)
    config = asdict(args)
    grid = [(noise, tau, seed) for noise in args.noise_rates for tau in args.thresholds for seed in args.seeds]
    print(f"cosine trace: {len(grid)} runs of {args.max_steps} steps, {args.jobs} at a time", flush=True)
    started = time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(noise_sweep.run_one, config, noise, tau, seed, trace=True) for noise, tau, seed in grid]
        runs = [future.result() for future in futures]
    wall = time.perf_counter() - started
    rows = [summarise(run) for run in runs]
    print("\nnoise  tau   seed | cos. distance mean (first 25% -> last 25%) | min   max  | > 0.97  > 1.0 | skipped")
    for r in rows:
        tau = "avg " if r["threshold"] == 2.0 else f"{r['threshold']:.2f}"
        print(f" {100 * r['noise_rate']:3.0f}%  {tau}  {r['seed']:3d}  |  {r['distance_mean']:.3f} "
              f"({r['distance_mean_first_quarter']:.3f} -> {r['distance_mean_last_quarter']:.3f})"
              f"                  | {r['distance_min']:.2f}  {r['distance_max']:.2f} |"
              f"  {100 * r['fraction_above_0.97']:4.0f}%  {100 * r['fraction_above_1']:4.0f}% | {100 * r['skipped_fraction']:4.0f}%")
    print(f"\n{len(runs)} runs in {wall / 60:.1f} min wall")

    result = {
        "benchmark": "cosine_trace", "command": command_line("cosine_trace.py", argv), "config": config,
        "machine": machine("transformers", "timm"), "wall_seconds": wall, "summary": rows,
        "runs": [{**{k: v for k, v in run.items() if k != "trace_distances"}, "distances": run["trace_distances"]} for run in runs],
    }
    out_dir = Path(args.output_dir)
    json_path, png_path = write_json(out_dir / f"{args.stem}.json", result), out_dir / f"{args.stem}.png"
    title = (f"digits 8x8, {args.model_name} {json.loads(args.model_kwargs)}, M = 2 micro-batches x 10 (1/class), "
             f"SGD lr {args.learning_rate:g} momentum {args.momentum:g} wd {args.weight_decay:g}")
    plot(runs, png_path, args.window, title)
    print(f"wrote {json_path} and {png_path}")
    return result


if __name__ == "__main__":
    main()
