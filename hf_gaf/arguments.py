"""`GAFArguments`: the options of Gradient Agreement Filtering, for any `TrainingArguments` subclass.

`GAFArguments` is a dataclass of `gaf_*` fields only, so it composes with `TrainingArguments`
and its subclasses (TRL's configs, a user's own) in either base order without touching any of
their fields or defaults; `GAFTrainingArguments` is `TrainingArguments` + `GAFArguments`.
Everything that works with `TrainingArguments` keeps working: `HfArgumentParser` (command line
and JSON), `accelerate launch`, and saving with the other arguments (`training_args.bin`,
`to_dict`, `to_json_string`, TensorBoard hparams).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from transformers import TrainingArguments

from . import compat
from .exchange import EXCHANGES, check_bucket_size, check_exchange
from .gradients import GRANULARITIES, check_granularity
from .rule import RULES, check_rule, check_threshold
from .state import GAFState

__all__ = ["GAF_DESCRIPTION", "GAFArguments", "GAFTrainingArguments"]

GAF_DESCRIPTION = (
    "Gradient Agreement Filtering (GAF): each optimizer step averages only the micro-gradients (one per "
    "forward/backward pass per process) that agree in cosine distance, and skips the step when none do."
)


@dataclass
class GAFArguments:
    """The options of Gradient Agreement Filtering; mix into any [`~transformers.TrainingArguments`] subclass.

    Every optimizer step filters its `world_size x gradient_accumulation_steps` micro-gradients
    by cosine agreement instead of averaging them. Compose it with the arguments of the Trainer
    you use, GAF first (so that its checks run when the arguments are built, before any model
    loads, and `ddp_timeout` reaches a CPU process group):

    ```python
    @dataclass
    class MyConfig(GAFArguments, MyTrainingArguments):
        pass
    ```
    """

    gaf_threshold: float = field(
        default=0.97,
        metadata={
            "help": "Cosine-distance threshold tau in [0, 2]: a micro-gradient joins the running sum when "
            "1 - cos(g, sum) <= tau. 0.95-1.05 filters (0.97 is the paper's best under label noise); "
            "2 keeps everything, i.e. plain averaging."
        },
    )
    gaf_rule: str = field(
        default="sequential",
        metadata={
            "help": "'sequential' (the paper's Algorithm 1 in rank-major order) or 'best_start' (order-robust: "
            "every starting micro-gradient is tried and the largest agreeing set wins).",
            "choices": list(RULES),
        },
    )
    gaf_exchange: str = field(
        default="sharded",
        metadata={
            "help": "How processes exchange micro-gradients: 'sharded' (all-to-all of shards, Gram all-gather, "
            "all-gather of the averaged shards: about the bandwidth of a ring all-reduce) or 'all_gather' (every "
            "process receives every micro-gradient; simple, for tiny models and comparison).",
            "choices": list(EXCHANGES),
        },
    )
    gaf_bucket_size: int | None = field(
        default=None,
        metadata={
            "help": "Elements per message of the sharded exchange (the unit of its pipeline). Results do not depend "
            "on it; every process must use the same. Default: the exchange's own (1M elements)."
        },
    )
    gaf_granularity: str = field(
        default="model",
        metadata={
            "help": "What is compared: 'model' (whole micro-gradients, the paper's rule), 'tensor' (every parameter "
            "tensor on its own) or 'group' (parameters grouped by --gaf_group_by). Each unit is filtered, and "
            "skipped, on its own; a step is skipped when every unit is.",
            "choices": list(GRANULARITIES),
        },
    )
    gaf_group_by: str | None = field(
        default=None,
        metadata={
            "help": "For --gaf_granularity group: a regular expression matched at the start of each parameter name; "
            "parameters with the same match share a unit, e.g. 'model\\.layers\\.\\d+' for one unit per layer."
        },
    )
    gaf_averaged_parameters: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Regular expressions (searched in parameter names) of parameters averaged plainly, as data "
            "parallelism would, instead of filtered, e.g. 'bias' 'norm'."
        },
    )
    gaf_adaptive_window: int = field(
        default=0,
        metadata={
            "help": "Adaptive threshold: the number of recent cosine distances whose mean + "
            "gaf_adaptive_std x standard deviation, capped at gaf_threshold, is each step's threshold. 0: off."
        },
    )
    gaf_adaptive_std: float = field(
        default=1.0,
        metadata={"help": "Adaptive threshold: standard deviations above the mean of the recent distances."},
    )
    gaf_max_consecutive_skipped_steps: int | None = field(
        default=1000,
        metadata={
            "help": "Stop with an error after this many optimizer steps in a row were skipped (nothing agreed, or "
            "every micro-gradient was non-finite): such a run trains nothing. None: never stop."
        },
    )
    gaf_skipped_steps_advance_scheduler: bool = field(
        default=False,
        metadata={
            "help": "Step the learning-rate schedule on skipped steps too, so that it follows global_step. "
            "Default: only updates advance it (the paper's rule; warm-up and decay then stretch)."
        },
    )

    def __post_init__(self):
        check_gaf_arguments(self)
        compat.apply_ddp_timeout(self)
        parent = super()
        if hasattr(parent, "__post_init__"):
            parent.__post_init__()


@dataclass
class GAFTrainingArguments(GAFArguments, TrainingArguments):
    """[`~transformers.TrainingArguments`] with the options of [`GAFArguments`], for [`GAFTrainer`]."""


GAF_FIELDS = tuple(f.name for f in dataclasses.fields(GAFArguments))


def check_gaf_arguments(args) -> None:
    """Validate (and normalise) the `gaf_*` options on `args`; raise naming the fix when one is missing or wrong.

    Accepts any object with the fields of [`GAFArguments`]; Trainers call it on `self.args`
    once, at construction. Each option is checked by the module that owns it: the rule's, the
    exchange's, the units' and the run state's validators.
    """
    missing = [name for name in GAF_FIELDS if not hasattr(args, name)]
    if missing:
        raise TypeError(
            f"{type(args).__name__} has no GAF options ({', '.join(missing[:3])}, ...). Add them: "
            f"`@dataclass class Config(hf_gaf.GAFArguments, {type(args).__name__}): pass`, or use "
            "hf_gaf.GAFTrainingArguments in place of TrainingArguments."
        )
    args.gaf_threshold = check_threshold(args.gaf_threshold)
    check_rule(args.gaf_rule)
    check_exchange(args.gaf_exchange)
    check_bucket_size(args.gaf_bucket_size)
    args.gaf_averaged_parameters = check_granularity(args.gaf_granularity, args.gaf_group_by, args.gaf_averaged_parameters)
    GAFState.check_options(args.gaf_adaptive_window, args.gaf_adaptive_std, args.gaf_max_consecutive_skipped_steps)
