"""GAFMixin and GAFTrainer: equivalence with the Trainer at tau=2, the skip contract, gradients, logs, resume."""

from __future__ import annotations

import json

import pytest
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from transformers import TrainerCallback, TrainingArguments

from hf_gaf import GAFTrainer, GAFTrainingArguments, compat
from hf_gaf.state import TrainsNothingError

from .lm_utils import InOrder, InOrderTrainer, NegateThird, SequenceDataset, collate, sequences, tiny_llama
from .testing_utils import (
    BranchyClassifier,
    ClusterDataset,
    GAFCountingArguments,
    GAFCountingTrainer,
    CountingTrainer,
    TinyClassifier,
    max_difference,
    train,
)


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


def test_threshold_two_equals_the_plain_trainer_on_a_partial_last_step(tmp_path):
    # 44 rows in batches of 4 are 11 micro-batches: with K = 3 every epoch ends with a step of two passes.
    options = dict(dataset=ClusterDataset(size=44), gradient_accumulation_steps=3, num_train_epochs=2, max_steps=-1)
    gaf, recorder = train(str(tmp_path / "gaf"), gaf_threshold=2.0, **options)
    plain, _ = train(str(tmp_path / "plain"), gaf=False, **options)
    assert gaf.state.global_step == plain.state.global_step == 8
    _assert_same_parameters(gaf.model, plain.model)
    assert gaf.gaf_last_result.sizes.tolist() == [1.0, 1.0, 0.0]  # the third row was absent


def test_a_step_of_one_microgradient_is_skipped(tmp_path):
    # With K = 2, an epoch of 11 micro-batches ends with a lone one: nothing can agree with it.
    trainer, recorder = train(str(tmp_path), dataset=ClusterDataset(size=44), gaf_threshold=2.0, max_steps=6)
    assert recorder.skipped == [False] * 5 + [True]
    assert trainer.gaf_last_result.excluded.tolist() == [False, False]


@pytest.mark.parametrize("optim", ["adamw_torch", "sgd"])
def test_parameters_without_a_gradient_keep_none_like_the_plain_trainer(tmp_path, optim):
    # AdamW with weight decay would decay and count a step for a zero .grad; momentum would move it.
    options = dict(
        gradient_accumulation_steps=3, max_steps=8, optim=optim, weight_decay=0.1, learning_rate=0.02,
        optim_args="momentum=0.9" if optim == "sgd" else None,
    )
    torch.manual_seed(0)
    gaf_model, plain_model = BranchyClassifier(), BranchyClassifier()
    plain_model.load_state_dict(gaf_model.state_dict())
    initial = {k: v.clone() for k, v in gaf_model.state_dict().items()}
    gaf, _ = train(str(tmp_path / "gaf"), model=gaf_model, gaf_threshold=2.0, **options)
    plain, _ = train(str(tmp_path / "plain"), model=plain_model, gaf=False, **options)
    _assert_same_parameters(gaf.model, plain.model)
    assert torch.equal(gaf.model.unused.weight, initial["unused.weight"]), "a parameter without gradient moved"
    state = gaf.optimizer.state
    assert gaf.model.unused.weight not in state  # no momentum buffer, no step count
    if optim == "adamw_torch":
        steps = {name: int(state[p]["step"]) for name, p in gaf.model.named_parameters() if p in state}
        plain_steps = {name: int(plain.optimizer.state[p]["step"]) for name, p in plain.model.named_parameters() if p in plain.optimizer.state}
        assert steps == plain_steps and steps["branch.weight"] < steps["head.weight"] == 8


def test_rejecting_everything_leaves_parameters_optimizer_and_schedule_untouched(tmp_path):
    torch.manual_seed(0)
    initial = TinyClassifier().state_dict()
    trainer, recorder = train(
        str(tmp_path), gaf_threshold=0.0, max_steps=5, optim="adamw_torch", lr_scheduler_type="linear", warmup_steps=2,
        logging_steps=2, max_grad_norm=1.0,
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
    assert trainer.gaf_state.total_skipped == 5
    assert all("grad_norm" not in e for e in trainer.state.log_history)


def test_skipped_steps_can_advance_the_schedule(tmp_path):
    options = dict(gaf_threshold=0.5, max_steps=20, lr_scheduler_type="linear", warmup_steps=4, learning_rate=0.01)
    stretched, recorder = train(str(tmp_path / "default"), **options)
    following, _ = train(str(tmp_path / "follow"), gaf_skipped_steps_advance_scheduler=True, **options)
    skipped = sum(recorder.skipped)
    assert 0 < skipped < 20
    assert stretched.lr_scheduler.last_epoch == 20 - skipped  # the paper's rule: only updates advance it
    assert following.lr_scheduler.last_epoch == 20  # it follows global_step
    warmup = [e["learning_rate"] for e in stretched.state.log_history if "loss" in e]
    assert max(warmup[:4]) < 0.01, "warm-up stretches over the skipped steps"


def test_non_finite_microgradients_are_excluded_and_counted(tmp_path):
    class NaNEveryThirdPass(TinyClassifier):
        calls = 0

        def forward(self, x, labels=None):
            out = super().forward(x, labels)
            if self.training:
                NaNEveryThirdPass.calls += 1
                if NaNEveryThirdPass.calls % 3 == 2:
                    out["loss"] = out["loss"] * float("nan")
            return out

    torch.manual_seed(0)
    trainer, recorder = train(
        str(tmp_path), model=NaNEveryThirdPass(), gaf_threshold=2.0, gradient_accumulation_steps=3, max_steps=4,
        logging_steps=4,
    )
    assert recorder.accepted == [[True, False, True]] * 4 and not any(recorder.skipped)
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    logs = _gaf_logs(trainer)[-1]
    assert logs["gaf/excluded_microgradients"] == 4 and logs["gaf/accepted_fraction"] == pytest.approx(2 / 3)
    assert trainer.gaf_last_result.non_finite.tolist() == [False, True, False]


def test_huge_finite_gradients_are_compared_not_excluded(tmp_path):
    class Huge(TinyClassifier):
        def forward(self, x, labels=None):
            out = super().forward(x, labels)
            out["loss"] = out["loss"] * 1e20  # finite gradients whose float32 squares overflow
            return out

    torch.manual_seed(0)
    trainer, recorder = train(str(tmp_path), model=Huge(), gaf_threshold=2.0, max_steps=2, optim="adamw_torch")
    assert recorder.accepted == [[True, True]] * 2
    assert trainer.gaf_state.total_excluded == 0 and all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_a_run_that_trains_nothing_stops_with_the_reason(tmp_path):
    class AlwaysNaN(TinyClassifier):
        def forward(self, x, labels=None):
            out = super().forward(x, labels)
            out["loss"] = out["loss"] * float("nan")
            return out

    torch.manual_seed(0)
    with pytest.raises(TrainsNothingError, match=r"last 3 optimizer steps in a row: every micro-gradient was non-finite"):
        train(str(tmp_path / "nan"), model=AlwaysNaN(), gaf_max_consecutive_skipped_steps=3, max_steps=10)
    with pytest.raises(TrainsNothingError, match=r"no two micro-gradients agreed at threshold 0.*raise gaf_threshold"):
        train(str(tmp_path / "tau"), gaf_threshold=0.0, gaf_max_consecutive_skipped_steps=4, max_steps=10)


def test_train_returns_the_gaf_summary(tmp_path):
    trainer, recorder = train(str(tmp_path), gaf_threshold=0.9, max_steps=6)
    metrics = trainer.train().metrics
    assert {"train_loss", "gaf/skipped_fraction", "gaf/accepted_fraction", "gaf/skipped_steps_total"} <= metrics.keys()
    assert metrics["gaf/steps"] == 12 and metrics["gaf/skipped_steps_total"] == trainer.gaf_state.total_skipped


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
    assert resumed.gaf_state.state() == full.gaf_state.state()
    saved = json.loads((tmp_path / "full" / "checkpoint-4" / "trainer_state.json").read_text())
    assert saved["stateful_callbacks"]["GAFState"]["attributes"]["total_steps"] == 4


def test_the_adaptive_threshold_follows_the_recent_distances_and_resumes(tmp_path):
    options = dict(
        dataset=ClusterDataset(spread=3.0), gaf_threshold=1.0, gaf_adaptive_window=3, gaf_adaptive_std=0.5,
        gradient_accumulation_steps=3, max_steps=8, save_strategy="steps", save_steps=4,
    )  # fmt: skip
    full, _ = train(str(tmp_path / "full"), **options)
    thresholds = [e["gaf/threshold"] for e in full.state.log_history if "loss" in e]
    assert thresholds[0] == 1.0 and any(t < 1.0 for t in thresholds), thresholds  # tau until 3 distances are seen
    resumed, _ = train(str(tmp_path / "resumed"), resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-4"), **options)
    for (name, p), q in zip(full.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(p, q), name
    assert [e["gaf/threshold"] for e in resumed.state.log_history if "loss" in e] == thresholds
    assert resumed.gaf_state.state() == full.gaf_state.state()


class SwitchOnAfter(TrainerCallback):
    """GAF after a warm-up of plain averaging: the run-time switch, flipped from a callback."""

    def __init__(self, trainer, step: int):
        self.trainer, self.step = trainer, step

    def on_step_begin(self, args, state, control, **kwargs):
        self.trainer.gaf_enabled = state.global_step >= self.step


def test_the_switch_averages_plainly_while_off_and_is_saved_with_checkpoints(tmp_path):
    options = dict(gaf_threshold=0.0, max_steps=6, save_strategy="steps", save_steps=2)
    torch.manual_seed(0)
    model = TinyClassifier()
    args = GAFTrainingArguments(output_dir=str(tmp_path / "full"), **{**_base(), **options})
    trainer = GAFTrainer(model=model, args=args, train_dataset=ClusterDataset())
    trainer.add_callback(SwitchOnAfter(trainer, 3))
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert [e["gaf/skipped_steps"] for e in logs] == [0, 0, 0, 1, 1, 1]  # averaged while off, tau 0 then skips
    assert [e["gaf/enabled"] for e in logs] == [0, 0, 0, 1, 1, 1]
    saved = json.loads((tmp_path / "full" / "checkpoint-2" / "trainer_state.json").read_text())
    assert saved["stateful_callbacks"]["GAFState"]["attributes"]["enabled"] is False
    plain, _ = train(str(tmp_path / "plain"), gaf=False, max_steps=3)
    partial = GAFTrainer(
        model=_seeded_tiny(), args=GAFTrainingArguments(output_dir=str(tmp_path / "off"), **{**_base(), "max_steps": 3}),
        train_dataset=ClusterDataset(),
    )
    partial.gaf_enabled = False
    partial.train()
    _assert_same_parameters(partial.model, plain.model)  # off is plain averaging


def _base() -> dict:
    from .testing_utils import BASE_OPTIONS

    return dict(BASE_OPTIONS)


def _seeded_tiny() -> TinyClassifier:
    torch.manual_seed(0)
    return TinyClassifier()


@pytest.mark.parametrize("granularity, extra", [("tensor", {}), ("group", {"gaf_group_by": r"\w+"}), ("model", {"gaf_averaged_parameters": ["bias"]})])
def test_threshold_two_equals_the_plain_trainer_for_every_granularity(tmp_path, granularity, extra):
    options = dict(gradient_accumulation_steps=3, max_steps=5, max_grad_norm=1.0)
    gaf, _ = train(str(tmp_path / "gaf"), gaf_threshold=2.0, gaf_granularity=granularity, **extra, **options)
    plain, _ = train(str(tmp_path / "plain"), gaf=False, **options)
    _assert_same_parameters(gaf.model, plain.model)


def test_a_skipped_unit_keeps_its_parameters_and_optimizer_state(tmp_path):
    # Per tensor at tau 0.2, some tensors agree in a step and others do not; the skipped ones stay put.
    trainer, _ = train(str(tmp_path), gaf_threshold=0.2, gaf_granularity="tensor", optim="adamw_torch", max_steps=6)
    logs = _gaf_logs(trainer)
    fractions = [e["gaf/units_updated_fraction"] for e in logs]
    assert any(0 < f < 1 for f in fractions), fractions
    steps = {name: int(trainer.optimizer.state[p]["step"]) for name, p in trainer.model.named_parameters() if p in trainer.optimizer.state}
    assert len(set(steps.values())) > 1, f"every tensor updated alike: {steps}"


def test_a_trainer_subclass_keeps_its_behaviour_through_the_mixin(tmp_path):
    options = dict(gradient_accumulation_steps=2, max_steps=5)
    gaf, _ = train(
        str(tmp_path / "gaf"), gaf_threshold=2.0, trainer_class=GAFCountingTrainer, args_class=GAFCountingArguments, **options
    )
    plain, _ = train(str(tmp_path / "plain"), gaf=False, trainer_class=CountingTrainer, **options)
    assert max_difference(gaf.model, plain.model) < 1e-6
    logs = [e for e in gaf.state.log_history if "loss" in e]
    assert all(e["custom/seen"] == 1.0 and "gaf/accepted_fraction" in e for e in logs)


def test_refuses_a_single_microgradient_per_step(tmp_path):
    with pytest.raises(ValueError, match="gradient_accumulation_steps >= 2"):
        train(str(tmp_path), gradient_accumulation_steps=1)


def test_plain_training_arguments_get_a_one_line_recipe(tmp_path):
    with pytest.raises(TypeError, match=r"has no GAF options.*GAFArguments, TrainingArguments"):
        GAFTrainer(model=TinyClassifier(), args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True))


@pytest.mark.parametrize("kind, name", [(DistributedType.DEEPSPEED, "DeepSpeed"), (DistributedType.FSDP, "FSDP1")])
def test_refuses_sharded_setups_other_than_fsdp2_naming_fsdp2(tmp_path, monkeypatch, kind, name):
    monkeypatch.setattr(Accelerator, "distributed_type", property(lambda self: kind))
    args = GAFTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", gradient_accumulation_steps=2)
    with pytest.raises(ValueError, match=f"does not support {name}.*FSDP2.*fsdp_version.*2"):
        GAFTrainer(model=TinyClassifier(), args=args)


def test_a_buffer_that_does_not_fit_is_refused_before_it_is_allocated(tmp_path, monkeypatch):
    monkeypatch.setattr("hf_gaf.trainer.available_memory", lambda device: 1_000)
    with pytest.raises(MemoryError, match=r"K=2 micro-gradients of P=195 parameters.*Lower gradient_accumulation_steps"):
        train(str(tmp_path), max_steps=1)


# -- token-normalised losses ------------------------------------------------------------------------


class GAFInOrderTrainer(InOrder, GAFTrainer):
    pass


class GAFNegatingTrainer(NegateThird, InOrder, GAFTrainer):
    pass


def _lm_run(tmp_path, name, trainer_class, args_class, lengths, steps, **gaf):
    options = {
        **_base(), "output_dir": str(tmp_path / name), "per_device_train_batch_size": 1, "max_steps": steps,
        "gradient_accumulation_steps": len(lengths) // steps, "optim": "sgd", "learning_rate": 1.0, "max_grad_norm": 0.0,
        "logging_steps": 1, **gaf,
    }  # fmt: skip
    model = tiny_llama()
    trainer = trainer_class(
        model=model, args=args_class(**options), train_dataset=SequenceDataset(sequences(lengths)), data_collator=collate
    )
    trainer.train()
    return trainer


def test_token_normalised_losses_at_threshold_two_are_the_plain_trainer(tmp_path):
    lengths = [5, 17, 9, 12, 3, 21]  # micro-batches of very different token counts
    gaf = _lm_run(tmp_path, "gaf", GAFInOrderTrainer, GAFTrainingArguments, lengths, 2, gaf_threshold=2.0)
    plain = _lm_run(tmp_path, "plain", InOrderTrainer, TrainingArguments, lengths, 2)
    assert gaf.gaf_last_result.sizes is not None, "the micro-batches were weighed by their tokens"
    assert max_difference(gaf.model, plain.model) < 1e-6


def test_the_update_is_the_plain_trainers_on_the_accepted_micro_batches_alone(tmp_path):
    # The third micro-batch repeats the first with its loss negated: it disagrees and is rejected.
    lengths, kept = [5, 19, 5], [5, 19]
    gaf = _lm_run(tmp_path, "gaf", GAFNegatingTrainer, GAFTrainingArguments, lengths, 1, gaf_threshold=1.0)
    assert gaf.gaf_last_result.accepted.tolist() == [True, True, False]
    alone = InOrderTrainer(
        model=tiny_llama(), data_collator=collate, train_dataset=SequenceDataset(sequences(lengths)[:2]),
        args=TrainingArguments(**{**_base(), "output_dir": str(tmp_path / "alone"), "per_device_train_batch_size": 1,
                                  "max_steps": 1, "gradient_accumulation_steps": len(kept), "optim": "sgd",
                                  "learning_rate": 1.0, "max_grad_norm": 0.0}),
    )  # fmt: skip
    alone.train()
    assert max_difference(gaf.model, alone.model) < 1e-6
    # Weighing the accepted micro-gradients equally (K / |A| times their sum) would be off by this factor:
    counts = [compat.count_items(gaf, collate([{"input_ids": ids}])) for ids in sequences(lengths)]
    assert abs(len(lengths) * sum(counts[:2]) / (2 * sum(counts)) - 1) > 0.2
