"""GAF for TRL's supervised fine-tuning: `GAFSFTConfig` and `GAFSFTTrainer`.

The ready-made pairing of [`GAFMixin`] and [`GAFArguments`] with `trl.SFTTrainer` and
`trl.SFTConfig`; any other Trainer subclass (DPOTrainer, a user's own) takes the same two lines
(see docs/trainer.md). Needs `pip install trl` (or `pip install "hf-gaf[trl]"`).
"""

from __future__ import annotations

from dataclasses import dataclass

try:
    from trl import SFTConfig, SFTTrainer
except ImportError as error:  # hf_gaf itself works without trl; only this module needs it
    raise ImportError(
        "hf_gaf.GAFSFTTrainer and GAFSFTConfig need TRL: pip install trl (or pip install 'hf-gaf[trl]')."
    ) from error

from .arguments import GAFArguments
from .trainer import GAFMixin

__all__ = ["GAFSFTConfig", "GAFSFTTrainer"]


@dataclass
class GAFSFTConfig(GAFArguments, SFTConfig):
    """`trl.SFTConfig` with the options of [`GAFArguments`]; every `SFTConfig` default is kept."""


class GAFSFTTrainer(GAFMixin, SFTTrainer):
    """`trl.SFTTrainer` that filters micro-gradients by agreement; at `gaf_threshold=2` it is `SFTTrainer`.

    Args:
        model, args, **kwargs: as for `SFTTrainer`; `args` is a [`GAFSFTConfig`] (default: one
            named after the model, as `SFTTrainer` names its default `SFTConfig`).
    """

    def __init__(self, model, args: GAFSFTConfig | None = None, *trainer_args, **trainer_kwargs):
        if args is None:
            name = model if isinstance(model, str) else model.config._name_or_path
            args = GAFSFTConfig(f"{name.split('/')[-1]}-SFT")
        super().__init__(model, args, *trainer_args, **trainer_kwargs)
