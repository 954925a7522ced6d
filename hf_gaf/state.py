"""`GAFState`: what GAF keeps from step to step, logged by the Trainer and carried by its checkpoints.

It is a `TrainerCallback` and an `ExportableState`, so `Trainer._save_checkpoint` writes it into
`trainer_state.json` (`stateful_callbacks`); `on_train_begin` restores it from the loaded
`TrainerState` itself, whatever `restore_callback_states_from_checkpoint` says: a resumed run
must continue exactly like the uninterrupted one. It holds:

* the switch: `enabled`, True by default; off, steps average every micro-gradient plainly;
* the adaptive threshold's window of recent cosine distances;
* the counts behind the `gaf/` logs, over the logging window and over the run, and the number
  of skipped steps in a row, which stops a run that trains nothing.

Every process sees the same [`~hf_gaf.rule.GAFResult`], so the state is identical on every rank.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import numpy as np
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState
from transformers.utils import logging

from .rule import GAFResult

__all__ = ["GAFState", "TrainsNothingError"]

logger = logging.get_logger(__name__)

# Above this share of skipped steps, the end of training warns that the run barely trained.
MOSTLY_SKIPPED = 0.95


class TrainsNothingError(RuntimeError):
    """Too many optimizer steps in a row were skipped: the run is not training."""


def _empty_window() -> dict[str, Any]:
    return {
        "steps": 0,
        "skipped": 0,
        "microgradients": 0,
        "accepted": 0,
        "excluded": 0,
        "units": 0,
        "units_updated": 0,
        "distance_sum": 0.0,
        "distance_count": 0,
        "distance_min": None,
        "distance_max": None,
    }


class GAFState(TrainerCallback, ExportableState):
    """The run state of Gradient Agreement Filtering: switch, adaptive threshold, statistics.

    Args:
        adaptive_window: how many recent cosine distances set the adaptive threshold (0: off).
        adaptive_std: standard deviations above their mean.
        max_consecutive_skipped: raise [`TrainsNothingError`] after this many skipped steps in
            a row (None: never).

    Logged keys (every `logging_steps`, with the training loss):
        `gaf/accepted_fraction`: accepted micro-gradients / micro-gradients in the window (per
            filtered unit, with units).
        `gaf/skipped_steps`, `gaf/skipped_steps_total`: steps where nothing was updated.
        `gaf/excluded_microgradients`, `gaf/excluded_microgradients_total`: micro-gradients left
            out for a zero or non-finite norm (never averaged in).
        `gaf/cosine_distance_{mean,min,max}`: over the comparisons the rule made in the window
            (omitted when it made none).
        `gaf/units_updated_fraction`: filtered units updated / filtered units (with units only).
        `gaf/threshold`: the threshold of the window's last step (with the adaptive threshold).
        `gaf/enabled`: 1 while filtering is on, 0 while it is switched off (only once switched).
    """

    def __init__(self, adaptive_window: int = 0, adaptive_std: float = 1.0, max_consecutive_skipped: int | None = None):
        self.check_options(adaptive_window, adaptive_std, max_consecutive_skipped)
        self.adaptive_window = int(adaptive_window)
        self.adaptive_std = float(adaptive_std)
        self.max_consecutive_skipped = max_consecutive_skipped
        self.enabled = True
        self.switched = False
        self.distances: deque[float] = deque(maxlen=max(self.adaptive_window, 1))
        self.last_threshold: float | None = None
        self.window = _empty_window()
        self.total_steps = 0
        self.total_skipped = 0
        self.total_excluded = 0
        self.total_microgradients = 0
        self.total_accepted = 0
        self.consecutive_skipped = 0

    @staticmethod
    def check_options(adaptive_window: int, adaptive_std: float, max_consecutive_skipped: int | None) -> None:
        """Raise naming the fix unless the options are a window >= 0, a number of deviations >= 0, a limit >= 1 or None."""
        if adaptive_window < 0:
            raise ValueError(f"gaf_adaptive_window must be >= 0 (0 turns the adaptive threshold off), got {adaptive_window}.")
        if not adaptive_std >= 0:
            raise ValueError(f"gaf_adaptive_std must be a number >= 0, got {adaptive_std}.")
        if max_consecutive_skipped is not None and max_consecutive_skipped < 1:
            raise ValueError(
                f"gaf_max_consecutive_skipped_steps must be >= 1, or None to never stop, got {max_consecutive_skipped}."
            )

    # -- the decision's inputs ----------------------------------------------------------------

    def threshold(self, tau: float) -> float:
        """This step's threshold: `tau`, or `min(tau, mean + k std)` of the window once it is full."""
        if not self.adaptive_window or len(self.distances) < self.adaptive_window:
            return tau
        recent = np.asarray(self.distances)
        return float(min(tau, recent.mean() + self.adaptive_std * recent.std()))

    def switch(self, enabled: bool) -> None:
        """Turn filtering on or off from the next step on (do it alike on every rank, e.g. from a callback)."""
        self.enabled = bool(enabled)
        self.switched = True

    # -- recording ----------------------------------------------------------------------------

    def record(self, result: GAFResult, filtered_units: np.ndarray | None = None) -> None:
        """Count one optimizer step's result; raise [`TrainsNothingError`] past the skipped-step limit.

        `filtered_units` (bool `[U]`) says which units were filtered, not averaged; by default all.
        """
        accepted = result.accepted.numpy().reshape(-1, result.num_microgradients)
        excluded = result.excluded.numpy().reshape(-1, result.num_microgradients)
        distances = result.distances.numpy().reshape(-1, result.num_microgradients)
        updated = result.updated.numpy()
        filtered = np.ones(len(updated), dtype=bool) if filtered_units is None else np.asarray(filtered_units)
        present = result.num_microgradients if result.sizes is None else int((result.sizes.numpy() > 0).sum())
        seen = distances[filtered][np.isfinite(distances[filtered])]
        num_excluded = int(excluded.any(axis=0).sum())
        num_accepted = int(accepted[filtered & updated].sum())

        w = self.window
        w["steps"] += 1
        w["skipped"] += int(result.skipped)
        w["microgradients"] += present * int(filtered.sum())
        w["accepted"] += num_accepted
        w["excluded"] += num_excluded
        w["units"] += int(filtered.sum())
        w["units_updated"] += int((updated & filtered).sum())
        if seen.size:
            w["distance_sum"] += float(seen.sum())
            w["distance_count"] += int(seen.size)
            low, high = float(seen.min()), float(seen.max())
            w["distance_min"] = low if w["distance_min"] is None else min(w["distance_min"], low)
            w["distance_max"] = high if w["distance_max"] is None else max(w["distance_max"], high)
        self.total_steps += 1
        self.total_skipped += int(result.skipped)
        self.total_excluded += num_excluded
        self.total_microgradients += present * int(filtered.sum())
        self.total_accepted += num_accepted
        if self.adaptive_window and self.enabled:
            self.distances.extend(seen.tolist())
        self.last_threshold = result.threshold
        self.consecutive_skipped = self.consecutive_skipped + 1 if result.skipped else 0
        limit = self.max_consecutive_skipped
        if limit is not None and self.consecutive_skipped >= limit:
            if num_excluded == present:
                why = "every micro-gradient was non-finite or zero (NaN/inf losses or inputs)"
                fix = "find the NaN: check the data, lower the learning rate, or use bf16 instead of fp16"
            else:
                why = f"no two micro-gradients agreed at threshold {result.threshold:g}"
                fix = "raise gaf_threshold (0.97-1.05), use larger micro-batches, or gaf_rule='best_start'"
            raise TrainsNothingError(
                f"GAF skipped the last {self.consecutive_skipped} optimizer steps in a row: {why}. The model is not "
                f"training; {fix}. (gaf_max_consecutive_skipped_steps={limit} sets this limit.)"
            )

    def pop_logs(self) -> dict[str, float]:
        """Return the `gaf/` log entries of the current window (empty if no step was recorded) and reset it."""
        w = self.window
        if w["steps"] == 0:
            return {}
        logs = {
            "gaf/accepted_fraction": w["accepted"] / max(w["microgradients"], 1),
            "gaf/skipped_steps": w["skipped"],
            "gaf/skipped_steps_total": self.total_skipped,
            "gaf/excluded_microgradients": w["excluded"],
            "gaf/excluded_microgradients_total": self.total_excluded,
        }
        if w["distance_count"]:
            logs["gaf/cosine_distance_mean"] = w["distance_sum"] / w["distance_count"]
            logs["gaf/cosine_distance_min"] = w["distance_min"]
            logs["gaf/cosine_distance_max"] = w["distance_max"]
        if w["units"] > w["steps"]:
            logs["gaf/units_updated_fraction"] = w["units_updated"] / w["units"]
        if self.adaptive_window and self.last_threshold is not None:
            logs["gaf/threshold"] = self.last_threshold
        if self.switched:
            logs["gaf/enabled"] = int(self.enabled)
        self.window = _empty_window()
        return logs

    def summary(self) -> dict[str, float]:
        """Whole-run totals, for a final report: steps, skipped steps and accepted micro-gradients."""
        steps = max(self.total_steps, 1)
        return {
            "gaf/steps": self.total_steps,
            "gaf/microgradients_per_step": self.total_microgradients / steps,
            "gaf/accepted_fraction": self.total_accepted / max(self.total_microgradients, 1),
            "gaf/skipped_steps_total": self.total_skipped,
            "gaf/skipped_fraction": self.total_skipped / steps,
            "gaf/excluded_microgradients_total": self.total_excluded,
        }

    # -- checkpoints and the training loop ------------------------------------------------------

    def state(self) -> dict:
        return {
            "args": {
                "adaptive_window": self.adaptive_window,
                "adaptive_std": self.adaptive_std,
                "max_consecutive_skipped": self.max_consecutive_skipped,
            },
            "attributes": {
                "enabled": self.enabled,
                "switched": self.switched,
                "distances": list(self.distances),
                "last_threshold": self.last_threshold,
                "window": dict(self.window),
                "total_steps": self.total_steps,
                "total_skipped": self.total_skipped,
                "total_excluded": self.total_excluded,
                "total_microgradients": self.total_microgradients,
                "total_accepted": self.total_accepted,
                "consecutive_skipped": self.consecutive_skipped,
            },
        }

    def on_train_begin(self, args, state, control, **kwargs):
        self.restore(state)

    def restore(self, state) -> None:
        """Take the values saved in a `TrainerState` (a checkpoint's `trainer_state.json`), if it holds any."""
        saved = (state.stateful_callbacks or {}).get(type(self).__name__)
        if isinstance(saved, dict):
            for name, value in saved.get("attributes", {}).items():
                if name == "distances":
                    self.distances = deque(value, maxlen=max(self.adaptive_window, 1))
                else:
                    setattr(self, name, dict(value) if isinstance(value, dict) else value)

    def on_train_end(self, args, state, control, **kwargs):
        if self.total_steps and self.total_skipped / self.total_steps > MOSTLY_SKIPPED:
            logger.warning(
                f"GAF skipped {self.total_skipped} of {self.total_steps} optimizer steps "
                f"({self.total_skipped / self.total_steps:.0%}): the model barely trained. Raise gaf_threshold, use "
                "larger micro-batches, or check the data for NaNs (gaf/excluded_microgradients_total="
                f"{self.total_excluded})."
            )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(enabled={self.enabled}, steps={self.total_steps}, skipped={self.total_skipped}, "
            f"excluded={self.total_excluded})"
        )
