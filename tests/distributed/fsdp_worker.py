"""torchrun worker for tests/test_fsdp.py: GAF under FSDP2 (`fully_shard` on a CPU mesh, gloo) against references.

Usage: torchrun --nproc_per_node N -m tests.distributed.fsdp_worker OUT_DIR MODE

Modes:
  cases   every entry of `CASES` (model, K, granularity, threshold, overlap), each against its reference:
          at tau=2 plain FSDP2 training (the gathered parameters, which parameters have a gradient),
          otherwise the data-parallel exchange on the same micro-gradients of an unsharded copy
          (accepted sets, distances, gathered parameters); and `EXTRA`: tau=0 leaves parameters and
          optimizer state untouched, resuming from a sharded checkpoint (torch.distributed.checkpoint),
          the memory of the step's shards, the model accelerate's FSDP2 wrapping gives.
  errors  `ERRORS`: what every rank raises for a mistake on one rank or in the loop.
  hang    the last rank stops itself (SIGSTOP) after step 1; the process group's timeout is 4 s.

Every rank writes `OUT_DIR/{mode}-rank{r}.json`: per case, what it measured or the error it raised.
The case lists are importable, so that each case is a pytest case.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from hf_gaf import GAFExchange, GradientBuffer
from hf_gaf.fsdp import FSDPExchange
from hf_gaf.gradients import parameter_units

from ..lm_utils import VOCABULARY, tiny_llama

STEPS = 3
GRANULARITIES = {
    "model": dict(granularity="model"),
    "tensor": dict(granularity="tensor"),
    "group": dict(granularity="group", group_by=r"(lm\.model\.)?layers\.\d+"),
    "averaged": dict(granularity="model", averaged=["bias", "norm"]),
}


@dataclass(frozen=True)
class Case:
    model: str  # mlp, llama, branchy (a head nobody uses, a branch some passes use), ranked (a branch rank 0 uses)
    k: int
    granularity: str
    tau: float
    overlap: bool = False
    precision: str = "float32"  # float32, or bfloat16 parameters with float32 / bfloat16 reduction

    @property
    def name(self) -> str:
        parts = [self.model, f"K{self.k}", self.granularity, f"tau{self.tau:g}"]
        return "-".join(parts + (["overlap"] if self.overlap else []) + ([self.precision] if self.precision != "float32" else []))


def _cases() -> list[Case]:
    cases = [Case(model, k, "model", 2.0) for model in ("mlp", "llama", "branchy") for k in (1, 2)]
    cases += [Case(model, k, g, 0.97) for model in ("mlp", "llama") for k in (1, 2) for g in GRANULARITIES]
    cases += [Case(model, 2, "model", 0.97) for model in ("branchy", "ranked")]
    cases += [Case(model, 1, "tensor", 0.97, overlap=True) for model in ("mlp", "llama", "ranked")]
    cases += [Case("llama", 1, "group", 0.97, overlap=True), Case("mlp", 1, "tensor", 2.0, overlap=True)]
    cases += [Case("mlp", 2, "model", 2.0, precision=p) for p in ("bf16-reduce-fp32", "bf16-reduce-bf16")]
    return cases


CASES = _cases()
CASE_NAMES = [case.name for case in CASES]
EXTRA = ["untouched", "checkpoint", "memory", "accelerate-wrapping"]
ERRORS = ["k-mismatch", "threshold-mismatch", "outside-capturing", "unsharded-parameter"]


# -- models and data ----------------------------------------------------------------------------


class MLP(nn.Module):
    """Three linear layers, sharded one by one; 9 and 5 rows, so that shards are padded at 2 and 3 ranks."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(8, 9), nn.Linear(9, 5), nn.Linear(5, 3)])

    def forward(self, x, labels, **_):
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else torch.tanh(layer(x))
        return nn.functional.cross_entropy(x.float(), labels)


class Branchy(MLP):
    """`MLP` with a head nobody uses and a branch (in the root module) only some micro-batches go through.

    `branch_on` says which: `"pass"`, the step's first pass on every rank (plain FSDP2 can train
    it); `"rank"`, rank 0's micro-batches only, so the ranks' reduce-scatter layouts differ.
    """

    def __init__(self, branch_on: str):
        super().__init__()
        self.branch = nn.Linear(9, 9)
        self.unused = nn.Linear(9, 3)
        self.offset = nn.Parameter(torch.zeros(3))  # the root module's always-used parameter
        self.branch_on = branch_on

    def forward(self, x, labels, k=0, rank=0):
        hidden = torch.tanh(self.layers[0](x))
        if (k == 0) if self.branch_on == "pass" else (rank == 0):
            hidden = hidden + torch.tanh(self.branch(hidden))
        hidden = torch.tanh(self.layers[1](hidden))
        return nn.functional.cross_entropy((self.layers[2](hidden) + self.offset).float(), labels)


class Llama(nn.Module):
    """The tiny Llama of the tests (two decoder layers), its loss on the micro-batch's tokens."""

    def __init__(self):
        super().__init__()
        self.lm = tiny_llama()

    def forward(self, input_ids, labels, **_):
        return self.lm(input_ids=input_ids, labels=labels).loss


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    return {"mlp": MLP, "llama": Llama, "branchy": lambda: Branchy("pass"), "ranked": lambda: Branchy("rank")}[name]()


def shard(model: nn.Module, mesh, precision: str = "float32") -> nn.Module:
    """`fully_shard` per layer (per decoder layer for the Llama), then the root, as accelerate wraps a model."""
    policy = MixedPrecisionPolicy()
    if precision != "float32":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=getattr(torch, {"fp32": "float32", "bf16": "bfloat16"}[precision[-4:]]))
    layers = model.lm.model.layers if isinstance(model, Llama) else model.layers
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def batch(case_model: str, step: int, rank: int, k: int, adversarial: bool) -> dict:
    """Micro-batch `k` of rank `rank` at `step`; with `adversarial`, the last rank's labels are shifted."""
    g = torch.Generator().manual_seed(1000 * step + 10 * rank + k)
    if case_model == "llama":
        ids = torch.randint(3, VOCABULARY, (2, 6), generator=g)
        return {"input_ids": ids, "labels": ids}
    x = torch.randn(6, 8, generator=g)
    labels = (x[:, :3].argmax(1) + (1 if adversarial and rank == dist.get_world_size() - 1 else 0)) % 3
    return {"x": x, "labels": labels, "k": k, "rank": rank}


def gathered(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().float().clone() for name, p in model.named_parameters()}


def grads_present(model: nn.Module) -> list[str]:
    return sorted(name for name, p in model.named_parameters() if p.grad is not None)


def units_for(model: nn.Module, granularity: str):
    return parameter_units(model.named_parameters(), **GRANULARITIES[granularity])


# -- the runs -----------------------------------------------------------------------------------


def run_plain(case: Case, mesh) -> tuple[dict, list[list[str]]]:
    """Plain FSDP2 training with gradient accumulation (reduce-scatter on the last pass), AdamW."""
    rank = dist.get_rank()
    model = shard(build(case.model), mesh, case.precision)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    present = []
    for step in range(STEPS):
        for k in range(case.k):
            model.set_requires_gradient_sync(k == case.k - 1)
            (model(**batch(case.model, step, rank, k, case.tau < 2)) / case.k).backward()
        present.append(grads_present(model))
        optimizer.step()
        optimizer.zero_grad()
    return gathered(model), present


def run_gaf(case: Case, mesh) -> tuple[dict, list[dict], list[list[str]], FSDPExchange]:
    """FSDP-GAF: the same loop with every pass inside the exchange's capturing, the Trainer's scaling."""
    rank = dist.get_rank()
    model = shard(build(case.model), mesh, case.precision)
    exchange = FSDPExchange(model, case.k, units_for(model, case.granularity), overlap=case.overlap)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    results, present = [], []
    for step in range(STEPS):
        for k in range(case.k):
            early = dict(threshold=case.tau, scale=case.k) if case.overlap else {}
            with exchange.capturing(k, **early):
                (model(**batch(case.model, step, rank, k, case.tau < 2)) / case.k).backward()
        result = exchange() if case.overlap else exchange(case.tau, scale=case.k)
        results.append(summary(result))
        present.append(grads_present(model))
        if not result.skipped:
            optimizer.step()
        optimizer.zero_grad()
    return gathered(model), results, present, exchange


def run_ddp(case: Case) -> tuple[dict, list[dict]]:
    """The data-parallel exchange on an unsharded copy and the same micro-gradients."""
    rank = dist.get_rank()
    model = build(case.model)
    units = units_for(model, case.granularity)
    buffer, exchange = GradientBuffer(units.parameters, case.k), GAFExchange()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    results = []
    for step in range(STEPS):
        for k in range(case.k):
            with buffer.capturing(k):
                (model(**batch(case.model, step, rank, k, case.tau < 2)) / case.k).backward()
        result = exchange(
            buffer.buffer, case.tau, out=buffer.gradient, scale=case.k, units=units.units(), received=buffer.received
        )
        results.append(summary(result))
        if not result.skipped:
            buffer.install(result.received & units.updated(result))
            optimizer.step()
        optimizer.zero_grad()
    return gathered(model), results


def summary(result) -> dict:
    return {
        "accepted": result.accepted.tolist(),
        "skipped": bool(result.skipped),
        "distances": [d if d == d else None for d in result.distances.reshape(-1).tolist()],
        "received": None if result.received is None else result.received.tolist(),
    }


def max_difference(a: dict, b: dict) -> float:
    return max(float((a[name] - b[name]).abs().max()) for name in a)


def run_case(case: Case, mesh) -> dict:
    params, results, present, _ = run_gaf(case, mesh)
    report = {"results": results, "present": present}
    if case.tau >= 2:
        reference, plain_present = run_plain(case, mesh)
        report["plain_present"] = plain_present
    else:
        reference, ddp_results = run_ddp(case)
        report["reference_results"] = ddp_results
    report["difference"] = max_difference(params, reference)
    return report


# -- the other checks ---------------------------------------------------------------------------


def check_untouched(mesh) -> dict:
    """tau = 0 after a plain step: every step skipped, parameters and AdamW state (step, moments) unchanged."""
    rank = dist.get_rank()
    model = shard(build("mlp"), mesh)
    exchange = FSDPExchange(model, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    for k in range(2):
        with exchange.capturing(k):
            (model(**batch("mlp", 0, rank, k, False)) / 2).backward()
    exchange(2.0, scale=2)
    optimizer.step()
    optimizer.zero_grad()
    before = (gathered(model), _optimizer_state(optimizer))
    skipped = []
    for step in range(1, STEPS + 1):
        for k in range(2):
            with exchange.capturing(k):
                (model(**batch("mlp", step, rank, k, True)) / 2).backward()
        result = exchange(0.0, scale=2)
        skipped.append(bool(result.skipped))
        if not result.skipped:
            optimizer.step()
        optimizer.zero_grad()
    after = (gathered(model), _optimizer_state(optimizer))
    return {
        "skipped": skipped,
        "parameters_equal": all(torch.equal(before[0][n], after[0][n]) for n in before[0]),
        "optimizer_equal": before[1] == after[1],
        "grads_none": grads_present(model) == [],
    }


def _optimizer_state(optimizer) -> list:
    return [
        {key: value.to_local().tolist() if hasattr(value, "to_local") else float(value) for key, value in state.items()}
        for state in optimizer.state.values()
    ]


def check_checkpoint(mesh, out: str) -> dict:
    """Two steps, a sharded checkpoint (model and optimizer, torch.distributed.checkpoint), two more: resumed = uninterrupted."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    rank = dist.get_rank()

    def steps(model, exchange, optimizer, first: int, last: int) -> None:
        for step in range(first, last):
            for k in range(2):
                with exchange.capturing(k):
                    (model(**batch("llama", step, rank, k, False)) / 2).backward()
            if not exchange(0.97, scale=2).skipped:
                optimizer.step()
            optimizer.zero_grad()

    def fresh():
        model = shard(build("llama"), mesh)
        return model, FSDPExchange(model, 2), torch.optim.AdamW(model.parameters(), lr=0.05)

    model, exchange, optimizer = fresh()
    steps(model, exchange, optimizer, 0, 2)
    model_state, optimizer_state = get_state_dict(model, optimizer)
    path = os.path.join(out, "checkpoint")
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=path)
    steps(model, exchange, optimizer, 2, 4)
    uninterrupted = gathered(model)

    model, exchange, optimizer = fresh()
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    steps(model, exchange, optimizer, 2, 4)
    return {"difference": max_difference(gathered(model), uninterrupted), "shards": sorted(os.listdir(path))}


def check_memory(mesh) -> dict:
    """Bytes of the step's shards: K x P / N x N = K P per rank, or one module's with overlap; no buffer of size P."""
    rank = dist.get_rank()
    report = {}
    for k, overlap in ((2, False), (1, False), (1, True)):
        model = shard(build("llama"), mesh)
        exchange = FSDPExchange(model, k, units_for(model, "tensor"), overlap=overlap)
        for kk in range(k):
            early = dict(threshold=0.97) if overlap else {}
            with exchange.capturing(kk, **early):
                model(**batch("llama", 0, rank, kk, False)).backward()
        exchange() if overlap else exchange(0.97, scale=k)
        widest = max(m.width for m in exchange.modules)
        report[f"K{k}{'-overlap' if overlap else ''}"] = {
            "storage": exchange.storage_bytes, "width": exchange.width, "widest_module": widest,
            "parameters": sum(p.numel() for p in model.parameters()), "element": 4,
        }  # fmt: skip
        exchange.close()
    return report


def check_accelerate_wrapping(mesh) -> dict:
    """accelerate's own FSDP2 wrapping (fsdp2_prepare_model) of a tiny Llama: the exchange serves every module it made."""
    from types import SimpleNamespace

    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    rank = dist.get_rank()
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap", transformer_cls_names_to_wrap=["LlamaDecoderLayer"]
    )
    accelerator = SimpleNamespace(
        state=SimpleNamespace(fsdp_plugin=plugin), torch_device_mesh=None, device=torch.device("cpu"),
        is_main_process=rank == 0, mixed_precision="no",
    )  # fmt: skip
    model = fsdp2_prepare_model(accelerator, tiny_llama())
    exchange = FSDPExchange(model, 2)
    for k in range(2):
        with exchange.capturing(k):
            ids = batch("llama", 0, rank, k, False)["input_ids"]
            (model(input_ids=ids, labels=ids).loss / 2).backward()
    result = exchange(2.0, scale=2)
    return {
        "modules": [type(m.module).__name__ for m in exchange.modules],
        "received": bool(result.received.all()),
        "with_grad": len(grads_present(model)),
        "parameters": len(list(model.parameters())),
    }


# -- errors -------------------------------------------------------------------------------------


def check_error(name: str, mesh) -> str:
    rank, n = dist.get_rank(), dist.get_world_size()
    model = shard(build("mlp"), mesh)
    try:
        if name == "k-mismatch":
            FSDPExchange(model, 2 if rank == 0 else 1)
        elif name == "threshold-mismatch":
            exchange = FSDPExchange(model, 1)
            with exchange.capturing(0):
                model(**batch("mlp", 0, rank, 0, False)).backward()
            exchange(0.9 if rank == n - 1 else 0.97)
        elif name == "outside-capturing":
            FSDPExchange(model, 1)
            model(**batch("mlp", 0, rank, 0, False)).backward()
        elif name == "unsharded-parameter":
            model.extra = nn.Parameter(torch.ones(3))
            FSDPExchange(model, 1)
        return "no error"
    except Exception as error:  # noqa: BLE001 - the report is the error
        return f"{type(error).__name__}: {error}"


def check_hang(mesh) -> dict:
    """The last rank stops itself after the backward pass of step 2: the others wait for it in the step's agreement."""
    rank, n = dist.get_rank(), dist.get_world_size()
    model = shard(build("mlp"), mesh)
    exchange = FSDPExchange(model, 1)
    start = None
    try:
        for step in range(4):
            with exchange.capturing(0):
                model(**batch("mlp", step, rank, 0, False)).backward()
            if step == 2:
                if rank == n - 1:
                    os.kill(os.getpid(), signal.SIGSTOP)
                start = time.monotonic()
            exchange(0.97)
        return {"outcome": "finished", "seconds": None}
    except Exception as error:  # noqa: BLE001 - the report is the error
        return {"outcome": f"{type(error).__name__}: {error}", "seconds": time.monotonic() - start if start else None}


def main() -> None:
    out, mode = sys.argv[1], sys.argv[2]
    timeout = timedelta(seconds=4 if mode == "hang" else 120)
    dist.init_process_group("gloo", timeout=timeout)
    rank, n = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (n,))
    torch.manual_seed(0)
    report: dict = {}
    if mode == "cases":
        for case in CASES:
            try:
                report[case.name] = run_case(case, mesh)
            except Exception:  # noqa: BLE001 - reported per case
                report[case.name] = {"error": traceback.format_exc()}
        for name, check in (("untouched", check_untouched), ("memory", check_memory), ("accelerate-wrapping", check_accelerate_wrapping)):
            try:
                report[name] = check(mesh)
            except Exception:  # noqa: BLE001
                report[name] = {"error": traceback.format_exc()}
        try:
            report["checkpoint"] = check_checkpoint(mesh, out)
        except Exception:  # noqa: BLE001
            report["checkpoint"] = {"error": traceback.format_exc()}
    elif mode == "errors":
        for name in ERRORS:
            report[name] = check_error(name, mesh)
    elif mode == "hang":
        report = check_hang(mesh)
    with open(os.path.join(out, f"{mode}-rank{rank}.json"), "w") as f:
        json.dump(report, f)
    sys.stdout.flush()
    sys.stderr.flush()
    if mode == "hang":  # fail the launch, so that torchrun ends the stopped rank
        os._exit(1)
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # skip interpreter finalization, where gloo occasionally aborts after destroy_process_group


if __name__ == "__main__":
    main()
