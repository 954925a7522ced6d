"""GAFArguments: defaults, command line, JSON, validation, and composition with any TrainingArguments subclass."""

from __future__ import annotations

import dataclasses
import json

import pytest
from transformers import HfArgumentParser, TrainingArguments

from hf_gaf import GAFArguments, GAFTrainingArguments
from hf_gaf.arguments import GAF_FIELDS, check_gaf_arguments


def _args(**kwargs):
    return GAFTrainingArguments(output_dir="unused", use_cpu=True, report_to="none", **kwargs)


@dataclasses.dataclass
class TunedArguments(TrainingArguments):
    """A TrainingArguments subclass with its own defaults, like TRL's configs."""

    learning_rate: float = 2e-5
    logging_steps: float = 10
    gradient_checkpointing: bool = True
    extra: int = 7


@dataclasses.dataclass
class GAFFirst(GAFArguments, TunedArguments):
    pass


@dataclasses.dataclass
class GAFLast(TunedArguments, GAFArguments):
    pass


def test_defaults():
    args = _args()
    assert (args.gaf_threshold, args.gaf_rule, args.gaf_exchange, args.gaf_granularity) == (0.97, "sequential", "sharded", "model")
    assert args.gaf_bucket_size is None and args.gaf_averaged_parameters == [] and args.gaf_adaptive_window == 0
    assert args.gaf_max_consecutive_skipped_steps == 1000 and args.gaf_skipped_steps_advance_scheduler is False


def test_gaf_arguments_hold_only_gaf_fields():
    assert all(name.startswith("gaf_") for name in GAF_FIELDS)
    assert {f.name for f in dataclasses.fields(GAFTrainingArguments)} == {f.name for f in dataclasses.fields(TrainingArguments)} | set(GAF_FIELDS)


@pytest.mark.parametrize("composed", [GAFFirst, GAFLast])
def test_composition_in_either_order_keeps_the_subclass_defaults(composed):
    args = composed(output_dir="unused", use_cpu=True, report_to="none", gaf_threshold=1.0)
    tuned = TunedArguments(output_dir="unused", use_cpu=True, report_to="none")
    for field in dataclasses.fields(TunedArguments):
        assert getattr(args, field.name) == getattr(tuned, field.name), field.name
    assert args.gaf_threshold == 1.0 and args.gaf_rule == "sequential"
    check_gaf_arguments(args)


def test_gaf_first_validates_when_the_arguments_are_built():
    with pytest.raises(ValueError, match=r"\[0, 2\]"):
        GAFFirst(output_dir="unused", use_cpu=True, report_to="none", gaf_threshold=3.0)


def test_arguments_without_gaf_fields_get_a_one_line_recipe():
    with pytest.raises(TypeError, match=r"TunedArguments has no GAF options.*class Config\(hf_gaf.GAFArguments, TunedArguments\)"):
        check_gaf_arguments(TunedArguments(output_dir="unused", use_cpu=True, report_to="none"))


def test_command_line():
    parser = HfArgumentParser(GAFTrainingArguments)
    (args,) = parser.parse_args_into_dataclasses(
        ["--output_dir", "x", "--gaf_threshold", "1.05", "--gaf_rule", "best_start", "--gaf_exchange", "all_gather",
         "--gaf_bucket_size", "4096", "--gaf_granularity", "group", "--gaf_group_by", r"layers\.\d+",
         "--gaf_averaged_parameters", "bias", "norm", "--gaf_adaptive_window", "50", "--gaf_adaptive_std", "2",
         "--gaf_max_consecutive_skipped_steps", "20", "--gaf_skipped_steps_advance_scheduler",
         "--gradient_accumulation_steps", "2"]
    )  # fmt: skip
    assert args.gaf_threshold == 1.05 and args.gaf_rule == "best_start" and args.gaf_exchange == "all_gather"
    assert args.gaf_bucket_size == 4096 and args.gaf_granularity == "group" and args.gaf_group_by == r"layers\.\d+"
    assert args.gaf_averaged_parameters == ["bias", "norm"]
    assert (args.gaf_adaptive_window, args.gaf_adaptive_std, args.gaf_max_consecutive_skipped_steps) == (50, 2.0, 20)
    assert args.gaf_skipped_steps_advance_scheduler and args.gradient_accumulation_steps == 2


def test_help_lists_gaf_options(capsys):
    with pytest.raises(SystemExit):
        HfArgumentParser(GAFTrainingArguments).parse_args_into_dataclasses(["--help"])
    text = capsys.readouterr().out
    for name in GAF_FIELDS:
        assert f"--{name}" in text
    assert "0.97 is the paper's best" in text


def test_json_file_and_saved_arguments_round_trip(tmp_path):
    path = tmp_path / "args.json"
    path.write_text(json.dumps({"output_dir": str(tmp_path), "gaf_threshold": 0.95, "gaf_rule": "best_start", "use_cpu": True}))
    (args,) = HfArgumentParser(GAFTrainingArguments).parse_json_file(str(path))
    assert args.gaf_threshold == 0.95 and args.gaf_rule == "best_start"
    saved = json.loads(args.to_json_string())
    assert saved["gaf_threshold"] == 0.95 and saved["gaf_exchange"] == "sharded"
    assert "gaf_rule" in args.to_sanitized_dict()
    (again,) = HfArgumentParser(GAFTrainingArguments).parse_dict({k: saved[k] for k in ("output_dir", *GAF_FIELDS)})
    assert (again.gaf_threshold, again.gaf_rule) == (0.95, "best_start")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"gaf_threshold": 2.5}, r"\[0, 2\]"),
        ({"gaf_threshold": -0.1}, r"\[0, 2\]"),
        ({"gaf_threshold": "high"}, "number"),
        ({"gaf_rule": "greedy"}, "best_start"),
        ({"gaf_exchange": "ring"}, "all_gather"),
        ({"gaf_bucket_size": 0}, "gaf_bucket_size"),
        ({"gaf_granularity": "layer"}, "'tensor', 'group'"),
        ({"gaf_granularity": "group"}, "needs gaf_group_by"),
        ({"gaf_group_by": "x"}, "needs gaf_granularity='group'"),
        ({"gaf_averaged_parameters": ["(unclosed"]}, "not a regular expression"),
        ({"gaf_adaptive_window": -1}, "gaf_adaptive_window"),
        ({"gaf_adaptive_std": -1.0}, "gaf_adaptive_std"),
        ({"gaf_max_consecutive_skipped_steps": 0}, "gaf_max_consecutive_skipped_steps"),
    ],
)
def test_invalid_values_raise_clear_errors(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        _args(**kwargs)


def test_command_line_rejects_unknown_choices(capsys):
    with pytest.raises(SystemExit):
        HfArgumentParser(GAFTrainingArguments).parse_args_into_dataclasses(["--output_dir", "x", "--gaf_rule", "greedy"])
    assert "invalid choice" in capsys.readouterr().err
