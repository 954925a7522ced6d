"""`GAFStatistics`: what GAF decided, summarised for the Trainer's logs and carried by checkpoints.

It is a `TrainerCallback` and an `ExportableState`, so `Trainer._save_checkpoint` writes its
counters into `trainer_state.json` (`stateful_callbacks`). On `on_train_begin` it restores them
from the loaded `TrainerState` itself, whatever `restore_callback_states_from_checkpoint` says:
the statistics describe the run, and a resumed run must continue them exactly.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from .rule import GAFResult

__all__ = ["GAFStatistics"]


def _empty_window() -> dict[str, Any]:
    return {
        "steps": 0,
        "skipped": 0,
        "microgradients": 0,
        "accepted": 0,
        "excluded": 0,
        "distance_sum": 0.0,
        "distance_count": 0,
        "distance_min": None,
        "distance_max": None,
    }


class GAFStatistics(TrainerCallback, ExportableState):
    """Counts GAF decisions over the current logging window and over the whole run.

    `update` takes one optimizer step's `GAFResult`; `pop_logs` returns the `gaf/` entries for one
    Trainer log and starts a new window. All values are plain Python numbers (JSON-safe), and
    identical on every process because every process sees the same `GAFResult`.

    Logged keys:
        `gaf/accepted_fraction`: accepted micro-gradients / all micro-gradients in the window.
        `gaf/skipped_steps`, `gaf/skipped_steps_total`: steps where no two micro-gradients agreed.
        `gaf/cosine_distance_{mean,min,max}`: over the comparisons the rule made in the window
            (omitted when it made none).
        `gaf/excluded_microgradients`, `gaf/excluded_microgradients_total`: micro-gradients left
            out for a zero or non-finite norm (never averaged in).
    """

    def __init__(self):
        self.window = _empty_window()
        self.total_steps = 0
        self.total_skipped = 0
        self.total_excluded = 0
        self.total_microgradients = 0
        self.total_accepted = 0

    def update(self, result: GAFResult) -> int:
        """Record one step's decision; returns how many micro-gradients were excluded (zero or non-finite)."""
        distances = result.distances.to(torch.float64)
        compared = ~torch.isnan(distances)
        excluded = int((~result.accepted.cpu() & ~compared.cpu()).sum())
        w = self.window
        w["steps"] += 1
        w["skipped"] += int(result.skipped)
        w["microgradients"] += result.num_microgradients
        w["accepted"] += 0 if result.skipped else result.num_accepted
        w["excluded"] += excluded
        if bool(compared.any()):
            seen = distances[compared]
            w["distance_sum"] += float(seen.sum())
            w["distance_count"] += int(seen.numel())
            low, high = float(seen.min()), float(seen.max())
            w["distance_min"] = low if w["distance_min"] is None else min(w["distance_min"], low)
            w["distance_max"] = high if w["distance_max"] is None else max(w["distance_max"], high)
        self.total_steps += 1
        self.total_skipped += int(result.skipped)
        self.total_excluded += excluded
        self.total_microgradients += result.num_microgradients
        self.total_accepted += 0 if result.skipped else result.num_accepted
        return excluded

    def pop_logs(self) -> dict[str, float]:
        """Return the `gaf/` log entries of the current window (empty if no step was recorded) and reset it."""
        w = self.window
        if w["steps"] == 0:
            return {}
        logs = {
            "gaf/accepted_fraction": w["accepted"] / w["microgradients"],
            "gaf/skipped_steps": w["skipped"],
            "gaf/skipped_steps_total": self.total_skipped,
            "gaf/excluded_microgradients": w["excluded"],
            "gaf/excluded_microgradients_total": self.total_excluded,
        }
        if w["distance_count"]:
            logs["gaf/cosine_distance_mean"] = w["distance_sum"] / w["distance_count"]
            logs["gaf/cosine_distance_min"] = w["distance_min"]
            logs["gaf/cosine_distance_max"] = w["distance_max"]
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

    def state(self) -> dict:
        return {
            "args": {},
            "attributes": {
                "window": dict(self.window),
                "total_steps": self.total_steps,
                "total_skipped": self.total_skipped,
                "total_excluded": self.total_excluded,
                "total_microgradients": self.total_microgradients,
                "total_accepted": self.total_accepted,
            },
        }

    def on_train_begin(self, args, state, control, **kwargs):
        saved = (state.stateful_callbacks or {}).get(type(self).__name__)
        if isinstance(saved, dict):
            for name, value in saved.get("attributes", {}).items():
                setattr(self, name, dict(value) if isinstance(value, dict) else value)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(steps={self.total_steps}, skipped={self.total_skipped}, "
            f"excluded={self.total_excluded})"
        )

