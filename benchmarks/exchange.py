"""Benchmark gaf_all_reduce against dist.all_reduce of the same gradient (gloo, CPU).

    python benchmarks/exchange.py                 # P in {1M, 11M, 25M}, 2 and 4 processes
    python benchmarks/exchange.py --quick         # smoke run: small sizes, 2 processes
    python benchmarks/exchange.py --sizes 11M --world-sizes 2 --reps 9

The script launches itself through torchrun once per world size (``--worker`` marks the launched
processes). For each P and K, every repetition times, side by side in the same process group:
``dist.all_reduce`` of a ``[P]`` float32 buffer (what DDP does once per optimizer step, the
reference of the ratios), for ``K > 1`` also ``dist.all_reduce`` of the ``[K, P]`` buffer itself
(an all-reduce moving the same data as the exchange, the ``ar(KP)`` ratios), and
``gaf_all_reduce`` of that ``[K, P]`` buffer with each exchange, writing into a reused ``out``
buffer as a training loop would, with ``scale=M`` so that it returns what the all-reduce returns,
the sum of the (here all accepted) micro-gradients: a trainer matching gradient accumulation
passes ``scale=K`` the same way, and a mean would cost either side the same extra pass. Times
are the median over repetitions after warm-up, of the slowest rank (each collective is preceded
by a barrier); ratios are medians of the per-repetition ratios, which pair calls made seconds
apart. Extra memory per rank is the size of the buffers the exchange keeps (counted exactly from
the tensors it allocated; per-bucket temporaries are bounded by the bucket size and not
included), also shown as a multiple of P. The table is printed and the results written as JSON
with the machine description.
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
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist

EXCHANGES = ("sharded", "all_gather")


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
    parser.add_argument("--quick", action="store_true", help="smoke run: 100K and 1M, 2 processes, 3 reps")
    parser.add_argument("--output", default=None, help="JSON path (default: results/exchange.json, *_quick.json)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # set on launched processes
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.world_sizes, args.reps, args.warmup = "100K,1M", "2", 3, 1
    if args.output is None:
        args.output = str(Path(__file__).parent / "results" / f"exchange{'_quick' if args.quick else ''}.json")
    return args


def machine() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "nproc": os.cpu_count(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }


# -- launched processes ---------------------------------------------------------------------------


def timed(fn) -> float:
    """Seconds for ``fn`` on the slowest rank, all ranks starting together."""
    dist.barrier()
    start = time.perf_counter()
    fn()
    elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return float(elapsed)


def measure(p: int, k: int, args: argparse.Namespace) -> dict:
    """Time all_reduce and both exchanges side by side on one ``[K, P]`` float32 buffer."""
    from hf_gaf.exchange import GAFExchange

    rank, world = dist.get_rank(), dist.get_world_size()
    shared = torch.randn(p, generator=torch.Generator().manual_seed(0))
    local = torch.randn(k, p, generator=torch.Generator().manual_seed(1 + rank)).add_(shared)  # they agree
    flat, same_buffer, out = local[0].clone(), local.clone(), torch.empty(p)
    kwargs = {} if args.bucket_size is None else {"bucket_size": args.bucket_size}
    states = {name: GAFExchange(exchange=name, **kwargs) for name in EXCHANGES}
    calls = {"all_reduce": lambda: dist.all_reduce(flat)}
    if k > 1:
        calls["all_reduce_KP"] = lambda: dist.all_reduce(same_buffer)
    calls.update(
        {name: partial(state, local, args.threshold, out=out, scale=world * k) for name, state in states.items()}
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
    def paired(reference: str) -> dict[str, float]:
        return {
            name: statistics.median(t / ref for t, ref in zip(times[name], times[reference])) for name in EXCHANGES
        }

    memory = {name: state.buffer_bytes for name, state in states.items()}
    return {
        "world_size": world, "P": p, "K": k, "M": world * k, "dtype": "float32",
        "median_s": median, "times_s": times,
        "ratio_to_all_reduce": paired("all_reduce"),
        "ratio_to_all_reduce_of_same_buffer": paired("all_reduce_KP" if k > 1 else "all_reduce"),
        "extra_memory_bytes": memory,
        "extra_memory_in_P": {name: memory[name] / (p * 4) for name in EXCHANGES},
        "accepted": {name: calls[name]().num_accepted for name in EXCHANGES},
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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(args: argparse.Namespace, world: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "rows.json"
        command = [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world),
            "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
            __file__, "--worker", str(result), "--sizes", args.sizes, "--ks", args.ks,
            "--reps", str(args.reps), "--warmup", str(args.warmup), "--threshold", str(args.threshold),
        ]  # fmt: skip
        if args.bucket_size is not None:
            command += ["--bucket-size", str(args.bucket_size)]
        subprocess.run(command, check=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
        return json.loads(result.read_text())


def size_label(p: int) -> str:
    return f"{p / 1e6:g}M" if p >= 10**6 else f"{p / 1e3:g}K"


def table(rows: list[dict]) -> str:
    header = (
        f"{'N':>2} {'P':>6} {'K':>2} | {'all_reduce':>10} {'sharded':>9} {'all_gather':>10} | "
        f"{'sh/ar':>6} {'ag/ar':>6} {'sh/ar(KP)':>9} | {'mem sh':>7} {'mem ag':>7}"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        t, r, mem = row["median_s"], row["ratio_to_all_reduce"], row["extra_memory_in_P"]
        same = row["ratio_to_all_reduce_of_same_buffer"]["sharded"]
        lines.append(
            f"{row['world_size']:>2} {size_label(row['P']):>6} {row['K']:>2} | "
            f"{t['all_reduce'] * 1e3:>8.1f}ms {t['sharded'] * 1e3:>7.1f}ms {t['all_gather'] * 1e3:>8.1f}ms | "
            f"{r['sharded']:>6.2f} {r['all_gather']:>6.2f} {same:>9.2f} | "
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
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
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
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=1))
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
