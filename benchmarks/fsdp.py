"""GAF under FSDP2 against plain FSDP2 and data-parallel GAF: step time and peak memory per rank (gloo, CPU).

    python benchmarks/fsdp.py                    # a 33M-parameter Llama, 2 processes, K = 1 and 2
    python benchmarks/fsdp.py --quick            # smoke run: a tiny Llama, 2 steps

Every arm trains the same Llama (from a config; 8 decoder layers of hidden size 512, vocabulary
8,000: 33.6M parameters) with AdamW on synthetic tokens, 2 processes, one thread each:

- `fsdp2`: plain FSDP2, `fully_shard` per decoder layer and the root, gradient accumulation
  without reduce-scatter until the last pass (what accelerate does);
- `fsdp2_gaf`: the same model with [`~hf_gaf.FSDPExchange`] at tau = 2 (every micro-gradient
  accepted: the update is the plain one, and the cost is GAF's alone), the whole model one unit;
- `fsdp2_gaf_per_unit`: one unit per `fully_shard` module (`gaf_granularity="group"` along the
  decoder layers); with K = 1 each unit is decided during the backward pass (`overlap`);
- `ddp_gaf`: every rank holds the whole model and optimizer, each pass's gradient captured by a
  [`~hf_gaf.GradientBuffer`] and exchanged by [`~hf_gaf.GAFExchange`] (sharded), as `GAFTrainer`
  does under DDP.

Each arm runs in a torchrun launch of its own (`--worker` marks the launched processes), so that
its peak resident memory is its own: `VmHWM` of each rank at the end, the largest over ranks. The
step time is the median over timed steps (after warm-up) of the slowest rank, steps separated by
barriers. Arms run in two rounds in opposite orders, and each arm's figures are the medians over
its rounds. Beside the measured peak, the bytes each rank holds in tensors that live through a
step (parameters, gradients, optimizer state, GAF's buffers) are counted exactly.
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
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script: its sibling modules
from common import RESULTS_DIR, command_line, machine, output_stem, write_json  # noqa: E402

from hf_gaf.testing import torchrun  # noqa: E402

NAME = "fsdp"
ARMS = ("fsdp2", "fsdp2_gaf", "fsdp2_gaf_per_unit", "ddp_gaf")
FULL = dict(hidden=512, layers=8, vocabulary=8000, sequence=64, batch=2, warmup=2, steps=6, rounds=2)
QUICK = dict(hidden=32, layers=2, vocabulary=64, sequence=8, batch=2, warmup=1, steps=2, rounds=1)
PER_UNIT = r"model\.layers\.\d+"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model, 2 steps (writes fsdp_quick.json)")
    parser.add_argument("--accumulation", type=int, nargs="+", default=[1, 2], help="passes per step K")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--output_dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--worker", nargs=3, metavar=("ARM", "K", "OUT"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def build_model(sizes: dict):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=sizes["vocabulary"], hidden_size=sizes["hidden"], intermediate_size=int(2.6875 * sizes["hidden"]),
        num_hidden_layers=sizes["layers"], num_attention_heads=max(1, sizes["hidden"] // 64),
        num_key_value_heads=max(1, sizes["hidden"] // 64), max_position_embeddings=sizes["sequence"],
    )  # fmt: skip
    return LlamaForCausalLM(config)


def micro_batch(sizes: dict, step: int, rank: int, k: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1000 * step + 10 * rank + k)
    return torch.randint(0, sizes["vocabulary"], (sizes["batch"], sizes["sequence"]), generator=generator)


def tensor_bytes(tensors) -> int:
    """Bytes of the local storage of `tensors` (a DTensor's shard), each storage counted once."""
    seen, total = set(), 0
    for t in tensors:
        if t is None:
            continue
        local = t.to_local() if hasattr(t, "to_local") else t
        storage = local.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def peak_resident_bytes() -> int:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def worker(arm: str, k: int, out: str, sizes: dict) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from hf_gaf import FSDPExchange, GAFExchange, GradientBuffer
    from hf_gaf.gradients import parameter_units

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, n = dist.get_rank(), dist.get_world_size()
    model = build_model(sizes)
    gaf = buffer = exchange = None
    if arm.startswith("fsdp2"):
        mesh = init_device_mesh("cpu", (n,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        if arm == "fsdp2_gaf":
            gaf = FSDPExchange(model, k)
        elif arm == "fsdp2_gaf_per_unit":
            units = parameter_units(model.named_parameters(), "group", group_by=PER_UNIT)
            gaf = FSDPExchange(model, k, units, overlap="auto")
    else:
        buffer, exchange = GradientBuffer(model.parameters(), k), GAFExchange()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(index: int):
        for kk in range(k):
            ids = micro_batch(sizes, index, rank, kk)
            if gaf is not None:
                early = dict(threshold=2.0, scale=k) if gaf.overlap else {}
                with gaf.capturing(kk, **early):
                    (model(input_ids=ids, labels=ids).loss / k).backward()
            elif buffer is not None:
                with buffer.capturing(kk):
                    (model(input_ids=ids, labels=ids).loss / k).backward()
            else:
                model.set_requires_gradient_sync(kk == k - 1)
                (model(input_ids=ids, labels=ids).loss / k).backward()
        if gaf is not None:
            result = gaf() if gaf.overlap else gaf(2.0, scale=k)
            assert result.num_accepted == result.accepted.numel(), "tau = 2 accepts every micro-gradient"
        elif buffer is not None:
            result = exchange(buffer.buffer, 2.0, out=buffer.gradient, scale=k, received=buffer.received)
            buffer.install(result.received)
        optimizer.step()
        live = [*model.parameters(), *(p.grad for p in model.parameters())]
        live += [value for state in optimizer.state.values() for value in state.values() if torch.is_tensor(value)]
        live += [buffer.buffer, buffer.gradient] if buffer is not None else []  # .grad views of the latter
        held = tensor_bytes(live) + (gaf.storage_bytes if gaf is not None else 0)
        held += exchange.buffer_bytes if exchange is not None else 0
        optimizer.zero_grad()
        return held

    times, held = [], 0
    for index in range(sizes["warmup"] + sizes["steps"]):
        dist.barrier()
        start = time.perf_counter()
        held = max(held, step(index))
        seconds = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
        dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
        if index >= sizes["warmup"]:
            times.append(float(seconds))
    peak = torch.tensor([peak_resident_bytes(), held], dtype=torch.float64)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    if rank == 0:
        report = {
            "arm": arm, "k": k, "world_size": n, "step_s": statistics.median(times), "steps_s": times,
            "peak_resident_bytes": int(peak[0]), "held_bytes": int(peak[1]),
            "parameters": sum(p.numel() for p in model.parameters()),
            "overlap": bool(gaf is not None and gaf.overlap),
        }  # fmt: skip
        Path(out).write_text(json.dumps(report))
    dist.destroy_process_group()


def launch(arm: str, k: int, quick: bool) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        out = os.path.join(folder, "arm.json")
        target = [__file__, "--worker", arm, str(k), out, *(["--quick"] if quick else [])]
        done = torchrun(target, 2, timeout=3600, capture=False)
        if done.returncode:
            raise RuntimeError(f"arm {arm} (K={k}) failed with exit code {done.returncode}")
        return json.loads(Path(out).read_text())


def table(rows: list[dict]) -> str:
    lines = [
        "| K | arm | step (s) | vs plain FSDP2 | peak resident / rank (GiB) | held in tensors / rank (GiB) |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['k']} | {row['arm']}{' (overlap)' if row['overlap'] else ''} | {row['step_s']:.3f} | "
            f"{row.get('vs_fsdp2', float('nan')):.2f} | {row['peak_resident_bytes'] / 2**30:.2f} | "
            f"{row['held_bytes'] / 2**30:.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    sizes = QUICK if args.quick else FULL
    if args.worker:
        arm, k, out = args.worker
        worker(arm, int(k), out, sizes)
        return {}
    runs: dict[tuple[str, int], list[dict]] = {}
    for round_index in range(sizes["rounds"]):
        order = [(arm, k) for k in args.accumulation for arm in args.arms]
        for arm, k in order if round_index % 2 == 0 else reversed(order):
            print(f"round {round_index + 1}: {arm}, K={k}", flush=True)
            runs.setdefault((arm, k), []).append(launch(arm, k, args.quick))
    rows = []
    for (arm, k), reports in runs.items():
        rows.append({
            **reports[0], "step_s": statistics.median(r["step_s"] for r in reports),
            "peak_resident_bytes": int(statistics.median(r["peak_resident_bytes"] for r in reports)),
            "rounds": reports,
        })  # fmt: skip
    for row in rows:
        plain = next((r for r in rows if r["arm"] == "fsdp2" and r["k"] == row["k"]), None)
        if plain is not None:
            row["vs_fsdp2"] = row["step_s"] / plain["step_s"]
    rows.sort(key=lambda r: (r["k"], ARMS.index(r["arm"])))
    text = table(rows)
    print(text)
    payload = {
        "command": command_line("fsdp.py", argv), "machine": machine("transformers"), "sizes": sizes,
        "world_size": 2, "threads_per_process": 1, "rows": rows, "table": text,
    }  # fmt: skip
    path = write_json(args.output_dir / f"{output_stem(NAME, quick=args.quick)}.json", payload)
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
