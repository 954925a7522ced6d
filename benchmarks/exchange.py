"""Benchmark gaf_all_reduce against dist.all_reduce of the same gradient (gloo, CPU).

    python benchmarks/exchange.py                 # P in {1M, 11M, 25M}, 2 and 4 processes
    python benchmarks/exchange.py --quick         # smoke run: small sizes, 2 processes
    python benchmarks/exchange.py --sizes 11M --world-sizes 2 --reps 9

The script launches itself through torchrun once per world size (`--worker` marks the launched
processes). For each P and K, every repetition times, side by side in the same process group:
`dist.all_reduce` of a `[P]` float32 buffer (what DDP does once per optimizer step, the
reference of the ratios), for `K > 1` also `dist.all_reduce` of the `[K, P]` buffer itself (an
all-reduce moving the same data as the exchange, the `ar(KP)` ratios), and `gaf_all_reduce` of
that `[K, P]` buffer with each exchange, writing into a reused `out` buffer as a training loop
would, with `scale=M` so that it returns what the all-reduce returns, the sum of the (here all
accepted) micro-gradients. Three more arms of the sharded exchange run beside it:

- `checked`: the configuration check repeated before every call, as the exchange did before it
  validated once per configuration (one more all-gather per call): the before/after pair;
- `tensor`: every parameter tensor filtered on its own, on the 62 tensors of ResNet-18 (scaled
  to P);
- `group`: the same tensors in 5 groups (stem, 4 stages and head).

Times are the median over repetitions after warm-up, of the slowest rank (each call is preceded
by a barrier); ratios are medians of the per-repetition ratios, which pair calls made seconds
apart. Extra memory per rank is the size of the buffers the exchange keeps (counted exactly from
the tensors it allocated), also shown as a multiple of P. The table is printed and the results
written as JSON with the machine description.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script: its sibling modules
from common import RESULTS_DIR, command_line, machine, output_stem, write_json  # noqa: E402

from hf_gaf.testing import torchrun  # noqa: E402

EXCHANGES = ("sharded", "all_gather")
VARIANTS = ("checked", "tensor", "group")  # arms of the sharded exchange, compared with it

# ResNet-18's parameter tensors (100 classes), the partition of the per-tensor arm; scaled to P.
RESNET18_TENSORS = (
    [9408, 64, 64] + [36864, 64, 64] * 4 + [73728, 128, 128, 147456, 128, 128, 8192, 128, 128, 147456, 128, 128, 147456, 128, 128]
    + [294912, 256, 256, 589824, 256, 256, 32768, 256, 256, 589824, 256, 256, 589824, 256, 256]
    + [1179648, 512, 512, 2359296, 512, 512, 131072, 512, 512, 2359296, 512, 512, 2359296, 512, 512, 51200, 100]
)  # fmt: skip
RESNET18_GROUPS = (3, 12, 15, 15, 15, 2)  # tensors in the stem, in each of the 4 stages, in the head


def parse_size(text: str) -> int:
    scale = {"K": 10**3, "M": 10**6, "G": 10**9}.get(text[-1].upper(), 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1M,11M,25M", help="comma-separated P (elements), e.g. 1M,11M,25M")
    parser.add_argument("--world-sizes", default="2,4", help="comma-separated process counts")
    parser.add_argument("--ks", default="1,2", help="comma-separated micro-gradients per rank K")
    parser.add_argument("--reps", type=int, default=11, help="timed repetitions (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed repetitions first")
    parser.add_argument("--bucket-size", type=int, default=None, help="GAFExchange bucket size (default: its own)")
    parser.add_argument("--threshold", type=float, default=0.97)
    parser.add_argument("--quick", action="store_true", help="smoke run: 100K and 1M, 2 processes, 3 repetitions")
    parser.add_argument("--output", default=None, help="JSON path (default: results/exchange.json, *_quick.json)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # set on launched processes
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.world_sizes, args.reps, args.warmup = "100K,1M", "2", 3, 1
    if args.output is None:
        args.output = str(RESULTS_DIR / f"{output_stem('exchange', quick=args.quick)}.json")
    return args


def scaled_units(p: int, sizes: list[int]):
    """`sizes` scaled to add up to `p` (every unit at least one column), as hf_gaf Units."""
    from hf_gaf import Units

    total = sum(sizes)
    scaled = [max(1, size * p // total) for size in sizes]
    scaled[int(max(range(len(scaled)), key=scaled.__getitem__))] += p - sum(scaled)
    return Units(tuple(scaled))


def grouped(sizes: list[int], groups: tuple[int, ...]) -> list[int]:
    bounds = [0, *torch.tensor(groups).cumsum(0).tolist()]
    return [sum(sizes[a:b]) for a, b in zip(bounds, bounds[1:])]


# -- launched processes ---------------------------------------------------------------------------


def timed(fn) -> float:
    """Seconds for `fn` on the slowest rank, all ranks starting together."""
    dist.barrier()
    start = time.perf_counter()
    fn()
    elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return float(elapsed)


def measure(p: int, k: int, args: argparse.Namespace) -> dict:
    """Time all_reduce, both exchanges and the sharded exchange's variants side by side on one `[K, P]` buffer."""
    from hf_gaf.exchange import GAFExchange

    rank, world = dist.get_rank(), dist.get_world_size()
    shared = torch.randn(p, generator=torch.Generator().manual_seed(0))
    local = torch.randn(k, p, generator=torch.Generator().manual_seed(1 + rank)).add_(shared)  # they agree
    flat, same_buffer, out = local[0].clone(), local.clone(), torch.empty(p)
    kwargs = {} if args.bucket_size is None else {"bucket_size": args.bucket_size}
    states = {name: GAFExchange(exchange=name if name in EXCHANGES else "sharded", **kwargs) for name in (*EXCHANGES, *VARIANTS)}
    per_tensor = scaled_units(p, RESNET18_TENSORS)
    units = {"tensor": per_tensor, "group": scaled_units(p, grouped(list(per_tensor.sizes), RESNET18_GROUPS))}

    def checked():  # the configuration compared across ranks on every call, as before validate-once
        states["checked"]._agreed = None
        return states["checked"](local, args.threshold, out=out, scale=world * k)

    calls = {"all_reduce": lambda: dist.all_reduce(flat)}
    if k > 1:
        calls["all_reduce_KP"] = lambda: dist.all_reduce(same_buffer)
    calls.update({name: partial(states[name], local, args.threshold, out=out, scale=world * k) for name in EXCHANGES})
    calls["checked"] = checked
    calls.update(
        {name: partial(states[name], local, args.threshold, out=out, scale=world * k, units=units[name]) for name in units}
    )
    times: dict[str, list[float]] = {name: [] for name in calls}
    for rep in range(args.warmup + args.reps):
        for name, call in calls.items():
            elapsed = timed(call)
            if rep >= args.warmup:
                times[name].append(elapsed)
    median = {name: statistics.median(values) for name, values in times.items()}

    # Ratios are paired: each repetition runs every call back to back, so the median of the
    # per-repetition ratios cancels the machine's slow drifts that a ratio of medians keeps.
    def paired(names, reference: str) -> dict[str, float]:
        return {name: statistics.median(t / ref for t, ref in zip(times[name], times[reference])) for name in names}

    memory = {name: states[name].buffer_bytes for name in EXCHANGES}
    return {
        "world_size": world, "P": p, "K": k, "M": world * k, "dtype": "float32",
        "units": {name: len(u) for name, u in units.items()},
        "median_s": median, "times_s": times,
        "ratio_to_all_reduce": paired(EXCHANGES, "all_reduce"),
        "ratio_to_all_reduce_of_same_buffer": paired(EXCHANGES, "all_reduce_KP" if k > 1 else "all_reduce"),
        "ratio_to_sharded": paired(VARIANTS, "sharded"),
        "extra_memory_bytes": memory,
        "extra_memory_in_P": {name: memory[name] / (p * 4) for name in EXCHANGES},
        "accepted": {name: calls[name]().num_accepted for name in (*EXCHANGES, *VARIANTS)},
        "scale": world * k,
    }  # fmt: skip


def worker(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rows = [measure(p, k, args) for p in map(parse_size, args.sizes.split(",")) for k in map(int, args.ks.split(","))]
    if dist.get_rank() == 0:
        Path(args.worker).write_text(json.dumps(rows))
    dist.destroy_process_group()


# -- launcher -------------------------------------------------------------------------------------


def launch(args: argparse.Namespace, world: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "rows.json"
        target = [
            __file__, "--worker", str(result), "--sizes", args.sizes, "--ks", args.ks, "--reps", str(args.reps),
            "--warmup", str(args.warmup), "--threshold", str(args.threshold),
        ]  # fmt: skip
        if args.bucket_size is not None:
            target += ["--bucket-size", str(args.bucket_size)]
        done = torchrun(target, world, timeout=3600, capture=False)
        if done.returncode:
            raise SystemExit(f"the {world}-process launch failed ({done.returncode})")
        return json.loads(result.read_text())


def size_label(p: int) -> str:
    return f"{p / 1e6:g}M" if p >= 10**6 else f"{p / 1e3:g}K"


def table(rows: list[dict]) -> str:
    header = (
        f"{'N':>2} {'P':>6} {'K':>2} | {'all_reduce':>10} {'sharded':>9} {'all_gather':>10} | "
        f"{'sh/ar':>6} {'ag/ar':>6} {'sh/ar(KP)':>9} | {'checked/sh':>10} {'tensor/sh':>9} {'group/sh':>8} | "
        f"{'mem sh':>7} {'mem ag':>7}"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        t, r, v, mem = row["median_s"], row["ratio_to_all_reduce"], row["ratio_to_sharded"], row["extra_memory_in_P"]
        same = row["ratio_to_all_reduce_of_same_buffer"]["sharded"]
        lines.append(
            f"{row['world_size']:>2} {size_label(row['P']):>6} {row['K']:>2} | "
            f"{t['all_reduce'] * 1e3:>8.1f}ms {t['sharded'] * 1e3:>7.1f}ms {t['all_gather'] * 1e3:>8.1f}ms | "
            f"{r['sharded']:>6.2f} {r['all_gather']:>6.2f} {same:>9.2f} | "
            f"{v['checked']:>10.3f} {v['tensor']:>9.3f} {v['group']:>8.3f} | "
            f"{mem['sharded']:>6.2f}P {mem['all_gather']:>6.2f}P"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return
    rows = []
    for world in map(int, args.world_sizes.split(",")):
        rows += launch(args, world)
    print(table(rows))
    report = {
        "command": command_line("exchange.py", argv),
        "machine": machine(),
        "settings": {
            "sizes": [parse_size(s) for s in args.sizes.split(",")],
            "world_sizes": [int(w) for w in args.world_sizes.split(",")],
            "ks": [int(k) for k in args.ks.split(",")],
            "reps": args.reps, "warmup": args.warmup, "threshold": args.threshold,
            "bucket_size": args.bucket_size, "backend": "gloo", "dtype": "float32", "OMP_NUM_THREADS": 1,
        },
        "memory_note": "extra memory = bytes of the buffers GAFExchange keeps (exact); all_reduce is in place",
        "results": rows,
    }  # fmt: skip
    print(f"wrote {write_json(Path(args.output), report)}")


if __name__ == "__main__":
    main()
