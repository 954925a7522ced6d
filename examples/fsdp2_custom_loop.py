"""GAF in a training loop of your own, on a model you shard with FSDP2 (`fully_shard`).

    torchrun --nproc_per_node 2 examples/fsdp2_custom_loop.py            # CPU, gloo
    torchrun --nproc_per_node 8 examples/fsdp2_custom_loop.py --cuda     # one GPU per process, NCCL

A small classifier on synthetic data where a quarter of each rank's micro-batches carry shuffled
labels: `FSDPExchange` replaces FSDP2's gradient reduce-scatter, so every rank sends each pass's
shards, unreduced, to the rank that owns them; after the step's last pass the ranks agree on which
micro-gradients agree (the same decision everywhere) and each gets its shard of the filtered
gradient as the `.grad` its sharded optimizer steps with. It prints, per logging window, the
share of accepted micro-gradients, the skipped steps, and the accuracy on clean data.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from hf_gaf import FSDPExchange

FEATURES, CLASSES = 16, 4


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--accumulation", type=int, default=2, help="passes (micro-batches) per rank and step, K")
    parser.add_argument("--threshold", type=float, default=0.97, help="GAF's cosine-distance threshold")
    parser.add_argument("--noisy_fraction", type=float, default=0.25, help="share of micro-batches with shuffled labels")
    parser.add_argument("--log_every", type=int, default=50)
    parser.add_argument("--cuda", action="store_true", help="one GPU per process, NCCL")
    return parser.parse_args()


def micro_batch(centers: torch.Tensor, generator: torch.Generator, noisy: bool, device) -> tuple[torch.Tensor, torch.Tensor]:
    labels = torch.randint(0, CLASSES, (32,), generator=generator)
    x = centers[labels] + torch.randn(32, FEATURES, generator=generator)
    if noisy:
        labels = labels[torch.randperm(32, generator=generator)]
    return x.to(device), labels.to(device)


def main() -> None:
    args = parse_arguments()
    dist.init_process_group("nccl" if args.cuda else "gloo")
    rank = dist.get_rank()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if args.cuda else torch.device("cpu")
    if args.cuda:
        torch.cuda.set_device(device)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))

    torch.manual_seed(0)  # the same initial weights and classes on every rank
    centers = 2.0 * torch.randn(CLASSES, FEATURES)
    model = nn.Sequential(nn.Linear(FEATURES, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, CLASSES))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)  # one FSDP unit per layer, then the root
    fully_shard(model.to(device), mesh=mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)  # sharded parameters: sharded optimizer state
    gaf = FSDPExchange(model, num_micro=args.accumulation)

    generator = torch.Generator().manual_seed(1 + rank)  # different data on every rank
    clean = micro_batch(centers, torch.Generator().manual_seed(12345), noisy=False, device=device)
    accepted = seen = skipped = 0
    for step in range(1, args.steps + 1):
        for k in range(args.accumulation):
            noisy = bool(torch.rand(1, generator=generator) < args.noisy_fraction)
            x, y = micro_batch(centers, generator, noisy, device)
            with gaf.capturing(k):  # this pass's shards go to the ranks that own them, unreduced
                nn.functional.cross_entropy(model(x), y).backward()
        result = gaf(args.threshold)  # every .grad: this rank's shard of the filtered gradient, or None
        if not result.skipped:
            optimizer.step()
        optimizer.zero_grad()
        accepted += result.num_accepted
        seen += result.num_microgradients
        skipped += int(result.skipped)
        if step % args.log_every == 0:
            with torch.no_grad():
                accuracy = float((model(clean[0]).argmax(1) == clean[1]).float().mean())
            if rank == 0:
                print(
                    f"step {step}: gaf/accepted_fraction {accepted / seen:.3f}, gaf/skipped_steps {skipped}, "
                    f"clean accuracy {accuracy:.3f}",
                    flush=True,
                )
            accepted = seen = skipped = 0
    gaf.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
