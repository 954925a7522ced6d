import json

import pytest
from transformers import HfArgumentParser

from hf_gaf import GAFTrainingArguments


def _args(**kwargs):
    return GAFTrainingArguments(output_dir="unused", use_cpu=True, report_to="none", **kwargs)


def test_defaults():
    args = _args()
    assert (args.gaf_threshold, args.gaf_rule, args.gaf_exchange) == (0.97, "sequential", "sharded")
    assert args.gaf_bucket_size is None and args.class_balanced_batches is False


def test_command_line():
    parser = HfArgumentParser(GAFTrainingArguments)
    (args,) = parser.parse_args_into_dataclasses(
        ["--output_dir", "x", "--gaf_threshold", "1.05", "--gaf_rule", "best_start", "--gaf_exchange", "all_gather",
         "--gaf_bucket_size", "4096", "--class_balanced_batches", "--class_balanced_num_classes", "4",
         "--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "2"]
    )
    assert args.gaf_threshold == 1.05 and args.gaf_rule == "best_start" and args.gaf_exchange == "all_gather"
    assert args.gaf_bucket_size == 4096 and args.class_balanced_batches and args.class_balanced_num_classes == 4
    assert args.gradient_accumulation_steps == 2


def test_help_lists_gaf_options(capsys):
    with pytest.raises(SystemExit):
        HfArgumentParser(GAFTrainingArguments).parse_args_into_dataclasses(["--help"])
    text = capsys.readouterr().out
    for option in ("--gaf_threshold", "--gaf_rule", "--gaf_exchange", "--gaf_bucket_size", "--class_balanced_batches"):
        assert option in text
    assert "0.97 is the paper's best" in text


def test_json_file_and_saved_arguments_round_trip(tmp_path):
    path = tmp_path / "args.json"
    path.write_text(json.dumps({"output_dir": str(tmp_path), "gaf_threshold": 0.95, "gaf_rule": "best_start", "use_cpu": True}))
    (args,) = HfArgumentParser(GAFTrainingArguments).parse_json_file(str(path))
    assert args.gaf_threshold == 0.95 and args.gaf_rule == "best_start"
    saved = json.loads(args.to_json_string())
    assert saved["gaf_threshold"] == 0.95 and saved["gaf_exchange"] == "sharded"
    assert "gaf_rule" in args.to_sanitized_dict()
    (again,) = HfArgumentParser(GAFTrainingArguments).parse_dict(
        {k: saved[k] for k in ("output_dir", "gaf_threshold", "gaf_rule", "gaf_exchange", "gaf_bucket_size")}
    )
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
        ({"class_balanced_num_classes": 3}, "class_balanced_batches"),
        ({"class_balanced_batches": True, "class_balanced_num_classes": 3, "per_device_train_batch_size": 8}, "multiple"),
    ],
)
def test_invalid_values_raise_clear_errors(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        _args(**kwargs)


def test_command_line_rejects_unknown_choices(capsys):
    with pytest.raises(SystemExit):
        HfArgumentParser(GAFTrainingArguments).parse_args_into_dataclasses(["--output_dir", "x", "--gaf_rule", "greedy"])
    assert "invalid choice" in capsys.readouterr().err
