"""GAFSFTTrainer and GAFSFTConfig: TRL's SFTTrainer with GAF, its defaults kept; hf_gaf without trl."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

trl = pytest.importorskip("trl", reason="the TRL pairing needs trl (pip install 'hf-gaf[test]')")

from trl import SFTConfig, SFTTrainer  # noqa: E402

from hf_gaf import GAFArguments, GAFSFTConfig, GAFSFTTrainer  # noqa: E402

from .lm_utils import InOrder, sequences, tiny_llama, tokenizer  # noqa: E402
from .testing_utils import REPO, max_difference  # noqa: E402


def _sft_defaults() -> dict:
    return {f.name: getattr(SFTConfig(output_dir="unused", use_cpu=True), f.name) for f in dataclasses.fields(SFTConfig)}


@dataclasses.dataclass
class SFTFirst(SFTConfig, GAFArguments):
    pass


@pytest.mark.parametrize("config", [GAFSFTConfig, SFTFirst])
def test_the_gaf_config_keeps_every_sft_default(config):
    args = config(output_dir="unused", use_cpu=True)
    defaults = _sft_defaults()
    for name, value in defaults.items():
        if name not in ("output_dir", "logging_dir"):
            assert getattr(args, name) == value, name
    assert args.learning_rate == 2e-5 and args.logging_steps == 10 and args.gradient_checkpointing
    assert args.gaf_threshold == 0.97


class InOrderSFT(InOrder, SFTTrainer):
    pass


class InOrderGAFSFT(InOrder, GAFSFTTrainer):
    pass


def _dataset():
    from datasets import Dataset

    return Dataset.from_dict({"input_ids": sequences([5, 17, 9, 12, 3, 21, 8, 14])})


def _sft(tmp_path, name, trainer_class, config_class, **extra):
    args = config_class(
        output_dir=str(tmp_path / name), use_cpu=True, report_to="none", per_device_train_batch_size=1,
        gradient_accumulation_steps=2, max_steps=4, learning_rate=0.05, gradient_checkpointing=False, bf16=False,
        seed=0, save_strategy="no", disable_tqdm=True, dataloader_num_workers=0, **extra,
    )  # fmt: skip
    trainer = trainer_class(model=tiny_llama(), args=args, train_dataset=_dataset(), processing_class=tokenizer())
    trainer.train()
    return trainer


def test_gaf_sft_trainer_at_threshold_two_is_the_sft_trainer(tmp_path):
    gaf = _sft(tmp_path, "gaf", InOrderGAFSFT, GAFSFTConfig, gaf_threshold=2.0)
    plain = _sft(tmp_path, "plain", InOrderSFT, SFTConfig)
    assert gaf.gaf_last_result.sizes is not None, "SFT losses are token-normalised: the micro-batches were weighed"
    assert max_difference(gaf.model, plain.model) < 1e-6
    logs = [e for e in gaf.state.log_history if "loss" in e]
    assert all("gaf/accepted_fraction" in e and "mean_token_accuracy" in e for e in logs)  # both trainers' logs


def test_gaf_sft_trainer_filters(tmp_path):
    trainer = _sft(tmp_path, "filter", InOrderGAFSFT, GAFSFTConfig, gaf_threshold=0.0)
    assert trainer.gaf_state.total_skipped == 4


def test_hf_gaf_imports_without_trl_and_the_pairing_names_the_install():
    code = (
        "import sys; sys.modules['trl'] = None\n"
        "import hf_gaf\n"
        "from hf_gaf import GAFTrainer\n"
        "try:\n"
        "    hf_gaf.GAFSFTTrainer\n"
        "except ImportError as error:\n"
        "    print(error)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "need TRL: pip install trl (or pip install 'hf-gaf[trl]')" in done.stdout
