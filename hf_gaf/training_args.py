"""`GAFTrainingArguments`: `TrainingArguments` plus the knobs of Gradient Agreement Filtering.

Subclassing keeps everything that already works with `TrainingArguments`: `HfArgumentParser`
(command line and JSON), `accelerate launch`, and saving with the other arguments
(`training_args.bin`, `to_dict`, `to_json_string`, TensorBoard hparams).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

from .exchange import EXCHANGES
from .rule import RULES, check_rule, check_threshold

__all__ = ["GAFTrainingArguments"]


@dataclass
class GAFTrainingArguments(TrainingArguments):
    """[`~transformers.TrainingArguments`] for [`GAFTrainer`], with Gradient Agreement Filtering options.

    Every optimizer step filters its `world_size x gradient_accumulation_steps` micro-gradients
    (one per forward/backward pass per process) by cosine agreement instead of averaging them.
    Values are validated on construction, so a bad command line fails before any model loads.
    """

    gaf_threshold: float = field(
        default=0.97,
        metadata={
            "help": "GAF cosine-distance threshold tau in [0, 2]: a micro-gradient joins the running sum when "
            "1 - cos(g, sum) <= tau. 0.95-1.05 filters (0.97 is the paper's best under label noise); "
            "2 keeps everything, i.e. plain averaging."
        },
    )
    gaf_rule: str = field(
        default="sequential",
        metadata={
            "help": "GAF rule: 'sequential' (the paper's Algorithm 1 in rank-major order) or 'best_start' "
            "(order-robust: every starting micro-gradient is tried and the largest agreeing set wins).",
            "choices": list(RULES),
        },
    )
    gaf_exchange: str = field(
        default="sharded",
        metadata={
            "help": "How processes exchange micro-gradients: 'sharded' (all_to_all + Gram all_reduce + "
            "all_gather, about the bandwidth of a ring all-reduce) or 'all_gather' (every process "
            "receives every micro-gradient; simple, for tiny models and comparison).",
            "choices": list(EXCHANGES),
        },
    )
    gaf_bucket_size: int | None = field(
        default=None,
        metadata={
            "help": "Elements per message of the sharded exchange (the unit of its pipeline: the Gram matrix of "
            "one bucket is computed while the next ones travel). Results do not depend on it. Default: the "
            "exchange's own (1M elements)."
        },
    )
    class_balanced_batches: bool = field(
        default=False,
        metadata={
            "help": "Draw every training micro-batch with exactly per_device_train_batch_size / num_classes "
            "samples of each class (hf_gaf.data.ClassBalancedBatchSampler), so micro-gradients differ by "
            "their samples, not by their class mix. Each process gets whole balanced batches."
        },
    )
    class_balanced_label_column: str = field(
        default="labels",
        metadata={"help": "Column (or item key) of the training dataset holding integer class labels."},
    )
    class_balanced_num_classes: int | None = field(
        default=None,
        metadata={
            "help": "Number of classes for class_balanced_batches (default: inferred from the labels). "
            "per_device_train_batch_size must be a multiple of it."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        self.gaf_threshold = check_threshold(self.gaf_threshold)
        check_rule(self.gaf_rule)
        if self.gaf_exchange not in EXCHANGES:
            raise ValueError(
                f"Unknown gaf_exchange {self.gaf_exchange!r}; choose one of {', '.join(map(repr, EXCHANGES))}."
            )
        if self.gaf_bucket_size is not None and self.gaf_bucket_size < 1:
            raise ValueError(
                f"gaf_bucket_size must be a positive number of elements, got {self.gaf_bucket_size}; "
                "leave it unset for the exchange's default."
            )
        if self.class_balanced_num_classes is not None:
            if not self.class_balanced_batches:
                raise ValueError("class_balanced_num_classes is set but class_balanced_batches is not; set both or neither.")
            if self.class_balanced_num_classes < 1:
                raise ValueError(f"class_balanced_num_classes must be >= 1, got {self.class_balanced_num_classes}.")
            if self.per_device_train_batch_size % self.class_balanced_num_classes:
                raise ValueError(
                    f"class_balanced_batches needs per_device_train_batch_size ({self.per_device_train_batch_size}) "
                    f"to be a multiple of class_balanced_num_classes ({self.class_balanced_num_classes}): each "
                    "micro-batch holds the same number of samples of every class. Use e.g. "
                    f"--per_device_train_batch_size {self.class_balanced_num_classes * max(1, self.per_device_train_batch_size // self.class_balanced_num_classes)}."
                )
