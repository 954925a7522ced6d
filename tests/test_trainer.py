"""GAFTrainer: equivalence with Trainer at tau=2, skipped steps, statistics, resume, multi-process runs."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from transformers import TrainingArguments

from hf_gaf import GAFTrainer, GAFTrainingArguments

sys.path.insert(0, str(Path(__file__).parent / "distributed"))
from trainer_fixtures import (  # noqa: E402
    BatchRecordingClassifier,
    ClusterDataset,
    IndexedClusterDataset,
    TinyClassifier,
    train,
)

WORKER = Path(__file__).parent / "distributed" / "trainer_worker.py"


def _assert_same_parameters(a, b, atol=1e-6):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, atol=atol, rtol=1e-5, msg=name)


def _gaf_logs(trainer):
    return [{k: v for k, v in e.items() if k.startswith("gaf/")} for e in trainer.state.log_history if "loss" in e]


def test_threshold_two_equals_the_plain_trainer_with_accumulation(tmp_path):
    options = dict(gradient_accumulation_steps=2, max_steps=6, lr_scheduler_type="linear", warmup_steps=2, max_grad_norm=0.5)
    gaf, _ = train(str(tmp_path / "gaf"), gaf_threshold=2.0, **options)
    plain, _ = train(str(tmp_path / "plain"), gaf=False, **options)
    _assert_same_parameters(gaf.model, plain.model)
    assert [e.get("grad_norm") for e in gaf.state.log_history[:-1]] == pytest.approx(
        [e.get("grad_norm") for e in plain.state.log_history[:-1]], rel=1e-5
    )
    assert all(e["gaf/accepted_fraction"] == 1.0 for e in gaf.state.log_history if "loss" in e)


def test_threshold_two_equals_the_plain_trainer_in_bf16(tmp_path):
    options = dict(gradient_accumulation_steps=3, max_steps=4, bf16=True)
    gaf, _ = train(str(tmp_path / "gaf"), gaf_threshold=2.0, **options)
    plain, _ = train(str(tmp_path / "plain"), gaf=False, **options)
    assert gaf.accelerator.mixed_precision == "bf16"
    _assert_same_parameters(gaf.model, plain.model, atol=1e-5)


def test_rejecting_everything_leaves_parameters_optimizer_and_schedule_untouched(tmp_path):
    torch.manual_seed(0)
    initial = TinyClassifier().state_dict()
    trainer, recorder = train(
        str(tmp_path), gaf_threshold=0.0, max_steps=5, optim="adamw_torch", lr_scheduler_type="linear", warmup_steps=2,
        logging_steps=2,
    )
    assert trainer.state.global_step == 5
    assert all(recorder.skipped) and len(recorder.skipped) == 5
    for name, value in trainer.model.state_dict().items():
        assert torch.equal(value, initial[name]), name
    assert trainer.optimizer.state_dict()["state"] == {}
    assert trainer.lr_scheduler.last_epoch == 0 and trainer.lr_scheduler.get_last_lr() == [0.0, 0.0]
    logs = _gaf_logs(trainer)
    assert [e["gaf/skipped_steps"] for e in logs] == [2, 2]
    assert logs[-1]["gaf/skipped_steps_total"] == 4 and logs[-1]["gaf/accepted_fraction"] == 0.0
    assert trainer.gaf_statistics.total_skipped == 5
    assert all("grad_norm" not in e for e in trainer.state.log_history)


class NaNEveryOtherPass(TinyClassifier):
    """Returns a NaN loss on every third training pass: one non-finite micro-gradient per step at K=3."""

    calls = 0

    def forward(self, x, labels=None):
        out = super().forward(x, labels)
        if self.training:
            NaNEveryOtherPass.calls += 1
            if NaNEveryOtherPass.calls % 3 == 2:
                out["loss"] = out["loss"] * float("nan")
        return out


def test_non_finite_microgradients_are_excluded_and_counted(tmp_path):
    torch.manual_seed(0)
    trainer, recorder = train(
        str(tmp_path), model=NaNEveryOtherPass(), gaf_threshold=2.0, gradient_accumulation_steps=3, max_steps=4, logging_steps=4
    )
    assert recorder.accepted == [[True, False, True]] * 4 and not any(recorder.skipped)
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    logs = _gaf_logs(trainer)[-1]
    assert logs["gaf/excluded_microgradients"] == 4 and logs["gaf/accepted_fraction"] == pytest.approx(2 / 3)


def test_resume_continues_exactly_like_an_uninterrupted_run(tmp_path):
    options = dict(
        gaf_threshold=0.9, gradient_accumulation_steps=3, max_steps=8, save_strategy="steps", save_steps=2,
        logging_steps=3, lr_scheduler_type="linear", warmup_steps=2,
    )
    full, full_recorder = train(str(tmp_path / "full"), **options)
    assert any(not all(a) for a in full_recorder.accepted), "the threshold should reject some micro-gradients"
    resumed, _ = train(
        str(tmp_path / "resumed"), resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-4"), **options
    )
    for (name, p), q in zip(full.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(p, q), name
    assert _gaf_logs(resumed) == _gaf_logs(full)
    assert resumed.gaf_statistics.state() == full.gaf_statistics.state()
    saved = json.loads((tmp_path / "full" / "checkpoint-4" / "trainer_state.json").read_text())
    assert saved["stateful_callbacks"]["GAFStatistics"]["attributes"]["total_steps"] == 4


def test_class_balanced_batches(tmp_path):
    pytest.importorskip("hf_gaf.data")
    torch.manual_seed(0)
    model = BatchRecordingClassifier()
    trainer, _ = train(
        str(tmp_path), model=model, dataset=IndexedClusterDataset(size=60), class_balanced_batches=True,
        per_device_train_batch_size=6, gaf_threshold=2.0, max_steps=6, gradient_accumulation_steps=2,
    )
    assert len(model.batches) == 12
    for batch in model.batches:
        assert sorted(batch["labels"]) == [0, 0, 1, 1, 2, 2]
    epoch = [i for batch in model.batches[:10] for i in batch["index"]]
    assert len(set(epoch)) == len(epoch) == 60


def test_resume_of_class_balanced_batches_after_several_epochs(tmp_path):
    # 48 rows in balanced batches of 6, K = 2: four steps per epoch; resume at step 9, inside the
    # third epoch. The sampler reshuffles per pass, so the resumed run must see the same batches.
    pytest.importorskip("hf_gaf.data")
    options = dict(
        dataset=IndexedClusterDataset(size=48), class_balanced_batches=True, per_device_train_batch_size=6,
        gaf_threshold=0.9, max_steps=14, gradient_accumulation_steps=2, save_strategy="steps", save_steps=3,
    )
    torch.manual_seed(0)
    uninterrupted = BatchRecordingClassifier()
    full, _ = train(str(tmp_path / "full"), model=uninterrupted, **options)
    torch.manual_seed(0)
    resumed_model = BatchRecordingClassifier()
    resumed, _ = train(
        str(tmp_path / "resumed"), model=resumed_model,
        resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-9"), **options,
    )
    assert len(uninterrupted.batches) == 28 and len(resumed_model.batches) == 10
    assert uninterrupted.batches[:8] != uninterrupted.batches[8:16]  # epochs are reshuffled
    assert resumed_model.batches == uninterrupted.batches[-10:]
    for (name, p), q in zip(full.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(p, q), name
    assert resumed.gaf_statistics.state() == full.gaf_statistics.state()


def test_class_balanced_batches_need_a_multiple_of_the_class_count(tmp_path):
    pytest.importorskip("hf_gaf.data")
    with pytest.raises(ValueError, match="multiple of the number of classes"):
        train(str(tmp_path), dataset=ClusterDataset(), class_balanced_batches=True, per_device_train_batch_size=4)


def test_refuses_a_single_microgradient_per_step(tmp_path):
    with pytest.raises(ValueError, match="gradient_accumulation_steps >= 2"):
        train(str(tmp_path), gradient_accumulation_steps=1)


def test_refuses_plain_training_arguments(tmp_path):
    with pytest.raises(TypeError, match="GAFTrainingArguments"):
        GAFTrainer(model=TinyClassifier(), args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True))


@pytest.mark.parametrize("kind, name", [(DistributedType.DEEPSPEED, "DeepSpeed"), (DistributedType.FSDP, "FSDP")])
def test_refuses_sharded_setups(tmp_path, monkeypatch, kind, name):
    monkeypatch.setattr(Accelerator, "distributed_type", property(lambda self: kind))
    args = GAFTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", gradient_accumulation_steps=2)
    with pytest.raises(ValueError, match=f"does not support {name}.*MULTI_CPU"):
        GAFTrainer(model=TinyClassifier(), args=args)


# -- several processes (torchrun, gloo on CPU) ------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(tmp_path: Path, nproc: int, *scenarios: str) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}", str(WORKER), str(tmp_path), *scenarios,
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    if done.returncode:
        pytest.fail(f"torchrun failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}")
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(nproc)]


def _max_difference(a: list[list[float]], b: list[list[float]]) -> float:
    return max(abs(x - y) for p, q in zip(a, b) for x, y in zip(p, q))


@pytest.mark.timeout(360)
def test_two_processes(tmp_path):
    reports = _torchrun(tmp_path, 2, "equivalence", "balanced")
    for k in (1, 2):
        # DDP never all-reduces a GAFTrainer gradient (a counting comm hook sees no call) ...
        assert all(r[f"k{k}_gaf_allreduces"] == 0 for r in reports)
        assert all(r[f"k{k}_plain_allreduces"] == 4 for r in reports)
        # ... yet with tau = 2 training equals the plain DDP Trainer's,
        for report in reports:
            assert _max_difference(report[f"k{k}_params"]["gaf"], report[f"k{k}_params"]["plain"]) < 1e-6
        # and every rank ends every step with bit-identical parameters.
        assert len(reports[0][f"k{k}_digests"]) == 4
        assert reports[0][f"k{k}_digests"] == reports[1][f"k{k}_digests"]
    batches = [r["balanced_batches"] for r in reports]
    for rank_batches in batches:
        assert len(rank_batches) == 8 and all(sorted(b["labels"]) == [0, 0, 1, 1, 2, 2] for b in rank_batches)
    first = [set(b["index"]) for b in batches[0][:4]]
    second = [set(b["index"]) for b in batches[1][:4]]
    assert all(a.isdisjoint(b) for a in first for b in second), "each process must get its own whole batches"


@pytest.mark.timeout(360)
def test_three_processes_reject_the_adversarial_rank(tmp_path):
    reports = _torchrun(tmp_path, 3, "filtering")
    runs = [r["filtering"] for r in reports]
    assert runs[0]["digests"] == runs[1]["digests"] == runs[2]["digests"]
    assert runs[0]["accepted"] == runs[1]["accepted"] == runs[2]["accepted"]
    accepted = torch.tensor(runs[0]["accepted"])  # [steps, 3 ranks x K=2], rank-major
    assert accepted.shape == (5, 6)
    assert not accepted[:, 4:].any(), "the adversarial rank's micro-gradients must all be rejected"
    assert accepted[:, :4].float().mean() >= 0.8
    assert not any(runs[0]["skipped"])
    logs = reports[0]["filtering_logs"]
    assert sum(e["gaf/accepted_fraction"] for e in logs) / len(logs) <= 4 / 6 + 1e-9
    assert all(math.isfinite(e["gaf/cosine_distance_max"]) for e in logs)
