"""Metrics through `evaluate`, offline: accuracy, memorisation, Trainer compute_metrics."""

from __future__ import annotations

import math
import socket
from pathlib import Path

import huggingface_hub.constants
import numpy as np
import pytest
import setuptools
import tomllib
import torch
from transformers import EvalPrediction, Trainer, TrainingArguments

from hf_gaf.train.metrics import (
    METRICS_DIR,
    accuracy_metrics,
    argmax_logits,
    available_metrics,
    compute_memorization,
    load_metric,
    memorization_metrics,
)

from ..testing_utils import REPO


# Four corrupted rows (0-3): memorized (0, 3), correct (1), other (2); row 4 is clean and right.
PREDICTIONS = [3, 2, 7, 3, 0]
NOISY = [3, 1, 4, 3, 0]
CLEAN = [1, 2, 6, 5, 0]
EXPECTED = {
    "memorized": 0.5, "correct": 0.25, "other": 0.25, "uncorrupted_accuracy": 1.0, "noise_rate": 0.8, "num_corrupted": 4
}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    def refuse(*args, **kwargs):
        raise AssertionError("a test tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def _one_hot(ids, num_labels=8):
    return np.eye(num_labels, dtype=np.float32)[ids]


def test_metrics_ship_with_the_package_and_are_packaged():
    assert available_metrics() == ["accuracy", "memorization"]
    assert (METRICS_DIR / "accuracy" / "accuracy.py").is_file()
    find = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    assert find.get("namespaces", True), "metric folders have no __init__.py: they are packaged as namespace packages"
    packages = setuptools.find_namespace_packages(where=str(REPO), include=find["include"])
    assert {"hf_gaf.train.metrics.accuracy", "hf_gaf.train.metrics.memorization"} <= set(packages)


def test_accuracy_by_hand():
    accuracy = load_metric("accuracy")
    assert accuracy.compute(predictions=[0, 1, 2, 1], references=[0, 1, 1, 1]) == {"accuracy": 0.75}
    assert accuracy.compute(predictions=[0, 1, 2, 1], references=[0, 1, 1, 1], normalize=False) == {"accuracy": 3}
    weighted = accuracy.compute(predictions=[0, 1, 2], references=[0, 1, 1], sample_weight=[1.0, 1.0, 2.0])
    assert weighted == {"accuracy": 0.5}
    with pytest.raises(ValueError, match="at least one prediction"):
        accuracy.compute(predictions=[], references=[])


def test_unknown_metric_lists_the_shipped_ones():
    with pytest.raises(ValueError, match=r"Unknown hf-gaf metric 'f1'.*\['accuracy', 'memorization'\]"):
        load_metric("f1")


def test_accuracy_metrics_takes_logits_class_ids_or_output_tuples():
    compute_metrics = accuracy_metrics()
    labels = np.array([1, 2, 0, 0])
    logits = _one_hot([1, 2, 3, 0])
    assert compute_metrics(EvalPrediction(predictions=logits, label_ids=labels)) == {"accuracy": 0.75}
    assert compute_metrics(EvalPrediction(predictions=np.array([1, 2, 3, 0]), label_ids=labels)) == {"accuracy": 0.75}
    assert compute_metrics(EvalPrediction(predictions=(logits, np.zeros((4, 5))), label_ids=labels)) == {"accuracy": 0.75}
    with pytest.raises(ValueError, match="label_ids.*3 rows but there are 4 predictions"):
        compute_metrics(EvalPrediction(predictions=logits, label_ids=labels[:3]))
    with pytest.raises(ValueError, match="logits \\[N, num_labels\\] or integer class ids"):
        compute_metrics(EvalPrediction(predictions=np.array([0.2, 0.8]), label_ids=labels[:2]))


def test_argmax_logits_for_preprocess_logits_for_metrics():
    logits = torch.tensor([[0.1, 0.9], [2.0, -1.0]])
    assert argmax_logits(logits, None).tolist() == [1, 0]
    assert argmax_logits((logits, torch.zeros(2, 3)), None).tolist() == [1, 0]


def test_memorization_by_hand():
    assert compute_memorization(PREDICTIONS, NOISY, CLEAN) == EXPECTED
    assert compute_memorization(_one_hot(PREDICTIONS), torch.tensor(NOISY), np.array(CLEAN)) == EXPECTED
    assert compute_memorization(PREDICTIONS, NOISY, CLEAN, flipped=[True, True, True, True, False]) == EXPECTED
    assert load_metric("memorization").compute(
        predictions=PREDICTIONS, references=NOISY, clean_references=CLEAN
    ) == EXPECTED


def test_memorization_without_corrupted_rows_is_nan_not_zero():
    result = compute_memorization([0, 1, 1], [0, 1, 2], [0, 1, 2])
    assert result["num_corrupted"] == 0 and result["noise_rate"] == 0.0
    assert all(math.isnan(result[key]) for key in ("memorized", "correct", "other"))
    assert result["uncorrupted_accuracy"] == pytest.approx(2 / 3)


def test_memorization_with_only_corrupted_rows():
    result = compute_memorization([1, 0], [1, 0], [0, 1])
    assert result["memorized"] == 1.0 and result["num_corrupted"] == 2
    assert math.isnan(result["uncorrupted_accuracy"])


def test_memorization_rejects_misaligned_inputs():
    with pytest.raises(ValueError, match=r"flipped.*first at row 4.*same order"):
        compute_memorization(PREDICTIONS, NOISY, CLEAN, flipped=[True] * 5)
    with pytest.raises(ValueError, match="clean_labels.*4 rows but there are 5 predictions"):
        compute_memorization(PREDICTIONS, NOISY, CLEAN[:4])
    with pytest.raises(ValueError, match="at least one prediction"):
        compute_memorization([], [], [])


def test_memorization_metrics_for_a_trainer():
    compute_metrics = memorization_metrics(CLEAN, flipped=[1, 1, 1, 1, 0])
    assert compute_metrics(EvalPrediction(predictions=_one_hot(PREDICTIONS), label_ids=np.array(NOISY))) == EXPECTED
    with pytest.raises(ValueError, match="6 predictions but was built with 5 clean labels"):
        compute_metrics(EvalPrediction(predictions=_one_hot(PREDICTIONS + [0]), label_ids=np.array(NOISY + [0])))


class _EchoClassifier(torch.nn.Module):
    """Logits are the inputs: predictions are known in advance."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self, logits, labels=None):
        logits = logits * self.scale
        loss = None if labels is None else torch.nn.functional.cross_entropy(logits, labels)
        return {"loss": loss, "logits": logits}


class _Rows(torch.utils.data.Dataset):
    def __init__(self, predictions, labels):
        self.logits, self.labels = torch.from_numpy(_one_hot(predictions)), torch.tensor(labels)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"logits": self.logits[i], "labels": self.labels[i]}


def test_with_transformers_trainer(tmp_path):
    args = TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to="none", per_device_eval_batch_size=2, disable_tqdm=True
    )
    noisy_train = _Rows(PREDICTIONS, NOISY)
    trainer = Trainer(
        model=_EchoClassifier(), args=args, compute_metrics=accuracy_metrics(), preprocess_logits_for_metrics=argmax_logits
    )
    assert trainer.evaluate(noisy_train)["eval_accuracy"] == pytest.approx(3 / 5)

    output = trainer.predict(noisy_train)
    assert compute_memorization(output.predictions, output.label_ids, CLEAN) == EXPECTED

    trainer.compute_metrics = memorization_metrics(CLEAN)
    metrics = trainer.evaluate(noisy_train, metric_key_prefix="train")
    assert metrics["train_memorized"] == 0.5 and metrics["train_num_corrupted"] == 4
