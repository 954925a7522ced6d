"""The single-process filter as a custom training loop calls it: one `[M, P]` block, a list of rows, with and without `out`.

    python benchmarks/filter.py                  # P in {1M, 11M}, M in {2, 4}
    python benchmarks/filter.py --quick          # smoke run: P = 100K
    python benchmarks/filter.py --sizes 11M --micro 2

`filter_microgradients(rows, threshold, out=..., scale=M)` on float32 micro-gradients that all
agree (every row accepted, so each call computes the Gram matrix and the mean of every row), in
one process with one thread, in four arms called in turn, repetition after repetition:

- `block_out`: an `[M, P]` tensor (a `GradientBuffer`'s rows) and a reused `[P]` `out`: the
  reference;
- `list_out`: the same rows as a list of `M` separate tensors (e.g. gradients gathered from
  several models), with the same `out`;
- `block`: the block without `out`, so each call allocates its result;
- `mean`: `torch.sum(block, 0, out=out)` alone, the least any filter has to read and write.

Reports the median seconds per call and each arm's median ratio to `block_out`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script: its sibling modules
from common import RESULTS_DIR, command_line, machine, output_stem, write_json  # noqa: E402

from hf_gaf import filter_microgradients  # noqa: E402

ARMS = ("block_out", "list_out", "block", "mean")


def parse_size(text: str) -> int:
    scale = {"K": 10**3, "M": 10**6}.get(text[-1].upper(), 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


def measure(p: int, m: int, reps: int, warmup: int) -> dict:
    """Every arm `warmup + reps` times, in turn; the median of each and of each ratio to `block_out`."""
    generator = torch.Generator().manual_seed(0)
    block = torch.randn(p, generator=generator) + 0.1 * torch.randn(m, p, generator=generator)  # they agree
    rows = [row.clone() for row in block]
    out = torch.empty(p)
    calls = {
        "block_out": lambda: filter_microgradients(block, 0.97, out=out, scale=m),
        "list_out": lambda: filter_microgradients(rows, 0.97, out=out, scale=m),
        "block": lambda: filter_microgradients(block, 0.97, scale=m),
        "mean": lambda: torch.sum(block, 0, out=out),
    }
    accepted = {name: calls[name]().num_accepted for name in ARMS[:3]}
    times: dict[str, list[float]] = {name: [] for name in ARMS}
    for repetition in range(warmup + reps):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            if repetition >= warmup:
                times[name].append(time.perf_counter() - start)
    ratios = {name: statistics.median(t / r for t, r in zip(times[name], times["block_out"])) for name in ARMS[1:]}
    return {
        "P": p, "M": m, "accepted": accepted,
        "median_s": {name: statistics.median(t) for name, t in times.items()},
        "ratio_to_block_out": ratios, "times_s": times,
    }  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1M,11M", help="comma-separated P (elements)")
    parser.add_argument("--micro", default="2,4", help="comma-separated micro-gradients M")
    parser.add_argument("--reps", type=int, default=21, help="timed repetitions (median reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed repetitions first")
    parser.add_argument("--quick", action="store_true", help="smoke run: P = 100K, 3 repetitions")
    parser.add_argument("--output", default=None, help="JSON path (default: results/filter.json, *_quick.json)")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.reps, args.warmup = "100K", 3, 1
    torch.set_num_threads(1)
    rows = [measure(parse_size(s), int(m), args.reps, args.warmup) for s in args.sizes.split(",") for m in args.micro.split(",")]

    print("filter_microgradients, float32, 1 thread: median per call, and ratio to block_out")
    print(f"{'P':>11} {'M':>2} | {'block_out':>10} {'list_out':>10} {'block':>10} {'mean':>10} | {'list/b_o':>8} {'block/b_o':>9} {'mean/b_o':>8}")
    for row in rows:
        t, r = row["median_s"], row["ratio_to_block_out"]
        print(f"{row['P']:>11,} {row['M']:>2} | " + " ".join(f"{t[a] * 1e3:>8.2f}ms" for a in ARMS)
              + f" | {r['list_out']:>8.2f} {r['block']:>9.2f} {r['mean']:>8.2f}")  # fmt: skip
    output = Path(args.output) if args.output else RESULTS_DIR / f"{output_stem('filter', quick=args.quick)}.json"
    report = {"command": command_line("filter.py", argv), "machine": machine(), "threads": 1, "results": rows}
    print(f"wrote {write_json(output, report)}")


if __name__ == "__main__":
    main()
