"""torchrun worker for the GAFTrainer tests: runs scenarios on every rank and writes one JSON report per rank.

Usage: torchrun --nproc_per_node N -m tests.distributed.trainer_worker OUTPUT_DIR SCENARIO [SCENARIO ...]

Scenarios (each reports under its own keys):
  equivalence   gaf_threshold=2 vs the plain Trainer at K=1 and K=2; counts DDP all-reduces (a comm hook).
  filtering     gaf_threshold=1 on data where the last rank's labels are adversarial.
  unused        a model with a never-used head and a branch some micro-batches use, AdamW with weight decay,
                ddp_find_unused_parameters=True: GAF at tau=2 vs the plain Trainer.
  tokens        a causal LM with micro-batches of different lengths: tau=2 vs the plain Trainer, and the
                update at tau=1 (one micro-batch rejected) vs the token mean over the accepted ones.
  units         per-tensor and grouped GAF with rejections: per-step parameter digests (rank identity).
  adaptive      the adaptive threshold: per-step digests and thresholds (rank identity).
  balanced      class-balanced batches (hf_gaf.train): the labels and indices of every micro-batch.
  bucket        gaf_bucket_size differs across ranks: the error every rank raises.
  lengths       every rank trains on a dataset of another length: the error every rank raises.
  hang          the last rank stops itself (SIGSTOP) after step 2; ddp_timeout is 4 s: what the others raise.
  fsdp2         accelerate's FSDP2 path on CPU (`FSDP2OnCPU`), a tiny Llama wrapped per decoder layer: tau=2 vs the
                plain Trainer under FSDP2 (K=2; K=1 per tensor, decided during the backward pass; K=1 whole model);
                filtering (one micro-batch negated) vs the same GAFTrainer under DDP; tau=0 (every step skipped);
                a sharded checkpoint resumed vs the uninterrupted run.
"""

from __future__ import annotations

import os
import signal
import sys
import time

import torch
import torch.distributed as dist
from transformers import TrainerCallback, TrainingArguments

from hf_gaf import GAFTrainer, GAFTrainingArguments, compat

from ..lm_utils import InOrder, InOrderTrainer, NegateThird, SequenceDataset, collate, sequences, tiny_llama
from ..testing_utils import (
    BASE_OPTIONS,
    FSDP2OnCPU,
    gathered_parameters,
    BatchRecordingClassifier,
    BranchyClassifier,
    ClusterDataset,
    IndexedClusterDataset,
    dump,
    parameters_json,
    train,
)


class CountAllReduces(TrainerCallback):
    """Registers a DDP comm hook that counts the gradient all-reduces DDP performs."""

    def __init__(self):
        self.trainer = None
        self.calls = 0

    def on_train_begin(self, args, state, control, **kwargs):
        ddp = self.trainer.model_wrapped
        assert isinstance(ddp, torch.nn.parallel.DistributedDataParallel), type(ddp)

        def hook(_, bucket):
            self.calls += 1
            work = dist.all_reduce(bucket.buffer().div_(dist.get_world_size()), async_op=True)
            return work.get_future().then(lambda fut: fut.value()[0])

        ddp.register_comm_hook(None, hook)


def run_equivalence(out: str, rank: int, world: int) -> dict:
    report = {}
    for k in (1, 2):
        options = dict(gradient_accumulation_steps=k, max_steps=4, lr_scheduler_type="linear", warmup_steps=1)
        for gaf in (True, False):
            counter = CountAllReduces()
            trainer, recorder = train(f"{out}/eq{k}{gaf}", gaf=gaf, gaf_threshold=2.0, callbacks=[counter], **options)
            name = "gaf" if gaf else "plain"
            report[f"k{k}_{name}_params"] = parameters_json(trainer.model)
            report[f"k{k}_{name}_allreduces"] = counter.calls
            if gaf:
                report[f"k{k}_digests"] = recorder.digests
    return report


def run_filtering(out: str, rank: int, world: int) -> dict:
    dataset = ClusterDataset(flip_labels=rank == world - 1, num_classes=2)
    trainer, recorder = train(
        f"{out}/filtering", dataset=dataset, num_classes=2, gaf_threshold=1.0, max_steps=5,
        gradient_accumulation_steps=2, learning_rate=0.02,
    )  # fmt: skip
    return {"filtering": recorder.to_json(), "filtering_logs": [e for e in trainer.state.log_history if "loss" in e]}


def run_unused(out: str, rank: int, world: int) -> dict:
    options = dict(
        gradient_accumulation_steps=2, max_steps=6, optim="adamw_torch", weight_decay=0.1, learning_rate=0.02,
        ddp_find_unused_parameters=True, dataset=ClusterDataset(seed=rank),
    )  # fmt: skip
    report = {}
    for gaf in (True, False):
        torch.manual_seed(0)
        model = BranchyClassifier()
        trainer, recorder = train(f"{out}/unused{gaf}", gaf=gaf, model=model, gaf_threshold=2.0, **options)
        name = "gaf" if gaf else "plain"
        report[f"unused_{name}_params"] = parameters_json(trainer.model)
        state = trainer.optimizer.state
        report[f"unused_{name}_steps"] = {n: int(state[p]["step"]) for n, p in trainer.model.named_parameters() if p in state}
        if gaf:
            report["unused_digests"] = recorder.digests
            torch.manual_seed(0)
            report["unused_head_untouched"] = bool(torch.equal(trainer.model.unused.weight, BranchyClassifier().unused.weight))
    return report


class GAFInOrderTrainer(InOrder, GAFTrainer):
    pass


class GAFNegatingTrainer(NegateThird, InOrder, GAFTrainer):
    """The third micro-batch of every step (on every rank) trains on the negated loss."""


def run_tokens(out: str, rank: int, world: int) -> dict:
    """Sequences of different lengths, one per micro-batch, K = 3; accelerate hands rank r every N-th batch."""
    base = {**BASE_OPTIONS, "per_device_train_batch_size": 1, "gradient_accumulation_steps": 3, "max_steps": 2,
            "optim": "sgd", "learning_rate": 1.0, "max_grad_norm": 0.0}  # fmt: skip
    data = sequences([5, 12, 17, 3, 9, 21, 4, 15, 11, 6, 8, 9][: 6 * world])
    report = {}
    for gaf in (True, False):
        cls, args_cls = (GAFInOrderTrainer, GAFTrainingArguments) if gaf else (InOrderTrainer, TrainingArguments)
        extra = {"gaf_threshold": 2.0} if gaf else {}
        trainer = cls(
            model=tiny_llama(), args=args_cls(**base, **extra, output_dir=f"{out}/tok{gaf}"),
            train_dataset=SequenceDataset(data), data_collator=collate,
        )  # fmt: skip
        trainer.train()
        report[f"tokens_{'gaf' if gaf else 'plain'}_params"] = parameters_json(trainer.model)
    # One step at tau = 1: each rank's third micro-batch repeats its first, with the loss negated.
    first, second = data[:world], data[world : 2 * world]
    trainer = GAFNegatingTrainer(
        model=tiny_llama(), args=GAFTrainingArguments(**{**base, "max_steps": 1}, gaf_threshold=1.0, output_dir=f"{out}/tokneg"),
        train_dataset=SequenceDataset(first + second + first), data_collator=collate,
    )  # fmt: skip
    trainer.train()
    result = trainer.gaf_last_result
    report["tokens_accepted"] = result.accepted.tolist()
    report["tokens_params"] = parameters_json(trainer.model)
    # The token mean over the accepted micro-batches, by hand, from the same initial model; canonical order
    # is rank-major: rank r's micro-batches are first[r], second[r], first[r].
    canonical = [collate([{"input_ids": ids}]) for r in range(world) for ids in (first[r], second[r], first[r])]
    accepted = [batch for batch, keep in zip(canonical, result.accepted.tolist()) if keep]
    model = tiny_llama()
    total = sum(compat.count_items(trainer, batch) for batch in accepted)
    sum(model(**batch, num_items_in_batch=total).loss for batch in accepted).backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= p.grad
    report["tokens_expected_params"] = parameters_json(model)
    return report


def run_units(out: str, rank: int, world: int) -> dict:
    report = {}
    dataset = ClusterDataset(seed=rank, spread=3.0)
    for name, extra in {"tensor": {"gaf_granularity": "tensor"}, "group": {"gaf_granularity": "group", "gaf_group_by": r"\w+"},
                        "averaged": {"gaf_averaged_parameters": ["bias"]}}.items():  # fmt: skip
        trainer, recorder = train(f"{out}/units{name}", dataset=dataset, gaf_threshold=0.6, max_steps=6, **extra)
        report[f"units_{name}"] = recorder.to_json()
        report[f"units_{name}_updated"] = trainer.gaf_last_result.updated.tolist()
    return report


def run_adaptive(out: str, rank: int, world: int) -> dict:
    dataset = ClusterDataset(seed=rank, spread=3.0)
    options = dict(gaf_threshold=1.0, gaf_adaptive_window=4, gaf_adaptive_std=0.5, max_steps=8, logging_steps=1)
    trainer, recorder = train(f"{out}/adaptive", dataset=dataset, **options)
    thresholds = [e["gaf/threshold"] for e in trainer.state.log_history if "gaf/threshold" in e]
    return {"adaptive": recorder.to_json(), "adaptive_thresholds": thresholds}


def run_balanced(out: str, rank: int, world: int) -> dict:
    from hf_gaf.train.trainer import ClassBalancedGAFTrainer

    torch.manual_seed(0)
    model = BatchRecordingClassifier()
    dataset = IndexedClusterDataset(size=48)
    train(
        f"{out}/balanced", model=model, dataset=dataset, per_device_train_batch_size=6, gaf_threshold=2.0, max_steps=4,
        trainer_class=lambda **kw: ClassBalancedGAFTrainer(**kw, balance_labels=dataset.labels.numpy()),
    )  # fmt: skip
    return {"balanced_batches": model.batches}


def _error_of(run) -> str:
    try:
        run()
    except Exception as error:  # the report is the error itself
        return f"{type(error).__name__}: {error}"
    return "no error"


def run_bucket(out: str, rank: int, world: int) -> dict:
    return {"bucket": _error_of(lambda: train(f"{out}/bucket", gaf_bucket_size=16_384 if rank == 0 else 1 << 20))}


def run_lengths(out: str, rank: int, world: int) -> dict:
    dataset = ClusterDataset(size=48 + 16 * rank)  # each process brings data of its own length
    return {"lengths": _error_of(lambda: train(f"{out}/lengths", dataset=dataset))}


class StopAfter(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGSTOP)


def run_hang(out: str, rank: int, world: int) -> dict:
    callbacks = [StopAfter(2)] if rank == world - 1 else []
    started = time.perf_counter()
    # No logging: GAF's exchange, not the Trainer's loss gather, is the first to wait for the stopped rank.
    run = lambda: train(f"{out}/hang", max_steps=20, ddp_timeout=4, logging_steps=100, callbacks=callbacks)  # noqa: E731
    error = _error_of(run)
    return {"hang": error, "hang_seconds": time.perf_counter() - started}


class FSDP2Trainer(FSDP2OnCPU, InOrderTrainer):
    pass


class FSDP2GAFTrainer(FSDP2OnCPU, GAFInOrderTrainer):
    pass


class FSDP2NegatingTrainer(FSDP2OnCPU, GAFNegatingTrainer):
    pass


def _lm_trainer(cls, out: str, data, **options):
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state()  # every run builds its own accelerator state (FSDP2 or not)
    GradientState._reset_state()
    NegateThird.passes = 0
    base = {**BASE_OPTIONS, "per_device_train_batch_size": 1, "logging_steps": 1, "learning_rate": 0.01}
    args_class = GAFTrainingArguments if issubclass(cls, GAFTrainer) else TrainingArguments
    trainer = cls(model=tiny_llama(), args=args_class(**{**base, **options}, output_dir=out),
                  train_dataset=SequenceDataset(data), data_collator=collate)  # fmt: skip
    return trainer


def run_fsdp2(out: str, rank: int, world: int) -> dict:
    data = sequences([5, 12, 17, 3, 9, 21, 4, 15, 11, 6, 8, 9] * 2)
    report = {}
    for k, granularity in ((2, "model"), (1, "tensor"), (1, "model")):
        options = dict(gradient_accumulation_steps=k, max_steps=3, optim="adamw_torch", weight_decay=0.1)
        plain = _lm_trainer(FSDP2Trainer, f"{out}/fsdp_plain{k}", data, **options)
        plain.train()
        gaf = _lm_trainer(FSDP2GAFTrainer, f"{out}/fsdp_gaf{k}{granularity}", data, gaf_threshold=2.0,
                          gaf_granularity=granularity, **options)  # fmt: skip
        gaf.train()
        name = f"fsdp2_k{k}_{granularity}"
        report[f"{name}_sharded"] = type(gaf.model_wrapped).__name__
        report[f"{name}_overlap"] = gaf._gaf_run.gradients.exchange_state.overlap
        report[f"{name}_gaf"], report[f"{name}_plain"] = gathered_parameters(gaf.model), gathered_parameters(plain.model)
    options = dict(gradient_accumulation_steps=3, max_steps=2, gaf_threshold=1.0, optim="sgd", learning_rate=1.0, max_grad_norm=0.0)
    ddp = _lm_trainer(GAFNegatingTrainer, f"{out}/neg_ddp", data, **options)
    ddp.train()
    sharded = _lm_trainer(FSDP2NegatingTrainer, f"{out}/neg_fsdp", data, **options)
    sharded.train()
    report["fsdp2_filter_accepted"] = [sharded.gaf_last_result.accepted.tolist(), ddp.gaf_last_result.accepted.tolist()]
    report["fsdp2_filter_params"] = [gathered_parameters(sharded.model), gathered_parameters(ddp.model)]
    skipped = _lm_trainer(FSDP2GAFTrainer, f"{out}/skip", data, gradient_accumulation_steps=2, max_steps=3, gaf_threshold=0.0)
    skipped.train()
    report["fsdp2_skip"] = {
        "summary": skipped.gaf_state.summary(),
        "unchanged": gathered_parameters(skipped.model) == gathered_parameters(tiny_llama()),
        "optimizer_state": len(skipped.optimizer.state),
        "learning_rates": [e["learning_rate"] for e in skipped.state.log_history if "learning_rate" in e],
    }
    options = dict(gradient_accumulation_steps=2, max_steps=4, gaf_threshold=0.97, save_strategy="steps", save_steps=2,
                   lr_scheduler_type="linear")  # fmt: skip
    whole = _lm_trainer(FSDP2GAFTrainer, f"{out}/resume", data, **options)
    whole.train()
    resumed = _lm_trainer(FSDP2GAFTrainer, f"{out}/resume", data, **options)
    resumed.train(resume_from_checkpoint=f"{out}/resume/checkpoint-2")
    report["fsdp2_resume"] = {
        "equal": gathered_parameters(whole.model) == gathered_parameters(resumed.model),
        "state": [whole.gaf_state.summary(), resumed.gaf_state.summary()],
        "checkpoint": sorted(os.listdir(f"{out}/resume/checkpoint-2")),
    }
    return report


SCENARIOS = {
    "equivalence": run_equivalence,
    "filtering": run_filtering,
    "unused": run_unused,
    "tokens": run_tokens,
    "units": run_units,
    "adaptive": run_adaptive,
    "balanced": run_balanced,
    "bucket": run_bucket,
    "lengths": run_lengths,
    "hang": run_hang,
    "fsdp2": run_fsdp2,
}


def main() -> None:
    out, scenarios = sys.argv[1], sys.argv[2:]
    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    report: dict = {"world_size": world}
    for scenario in scenarios:
        started = time.perf_counter()
        report.update(SCENARIOS[scenario](out, rank, world))
        print(f"rank {rank}: {scenario} took {time.perf_counter() - started:.1f}s", file=sys.stderr)
    dump(f"{out}/rank{rank}.json", report)
    failed = any(report.get(name, "no error") != "no error" for name in ("bucket", "lengths", "hang"))
    if dist.is_initialized() and not failed:
        dist.destroy_process_group()
    # The report is written. Skip interpreter finalization: there, gloo occasionally aborts
    # ("terminate called without an active exception") after destroy_process_group.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1 if failed else 0)  # a rank that failed must fail the launch, so that torchrun ends it


if __name__ == "__main__":
    main()
