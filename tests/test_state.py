"""GAFState: the adaptive threshold's arithmetic, the counts behind the logs, the skipped-step guard, checkpoints."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hf_gaf import GAFState, filter_microgradients
from hf_gaf.state import TrainsNothingError


def _result(distance_to_first: float, m: int = 2, tau: float = 2.0):
    """A result whose second micro-gradient is at the given cosine distance from the first."""
    angle = np.arccos(1.0 - distance_to_first)
    first = torch.tensor([1.0, 0.0], dtype=torch.float64)
    other = torch.tensor([np.cos(angle), np.sin(angle)], dtype=torch.float64)
    return filter_microgradients(torch.stack([first, *[other] * (m - 1)]), tau)


def test_the_adaptive_threshold_is_mean_plus_k_std_of_the_window_capped_at_tau():
    state = GAFState(adaptive_window=4, adaptive_std=2.0)
    distances = [0.2, 0.4, 0.3, 0.5, 0.9]
    thresholds = []
    for d in distances:
        thresholds.append(state.threshold(0.97))
        state.record(_result(d))
    assert thresholds[:4] == [0.97] * 4  # until the window holds 4 distances
    window = np.array(distances[:4])
    assert thresholds[4] == pytest.approx(min(0.97, window.mean() + 2.0 * window.std()))
    assert state.threshold(0.97) == pytest.approx(min(0.97, np.mean(distances[1:]) + 2.0 * np.std(distances[1:])))
    assert GAFState(adaptive_window=0).threshold(0.97) == 0.97


def test_the_window_counts_only_the_comparisons_the_rule_made():
    state = GAFState(adaptive_window=10)
    grads = torch.tensor([[1.0, 0.0], [0.0, 1.0], [float("nan"), 0.0], [1.0, 1.0]])
    state.record(filter_microgradients(grads, 2.0))  # the NaN one is excluded: two comparisons
    assert len(state.distances) == 2


def test_counts_and_logs_of_a_window():
    state = GAFState()
    state.record(_result(0.5, m=3))
    state.record(_result(1.5, m=2, tau=1.0))  # skipped
    logs = state.pop_logs()
    assert logs["gaf/skipped_steps"] == 1 and logs["gaf/skipped_steps_total"] == 1
    assert logs["gaf/accepted_fraction"] == pytest.approx(3 / 5)  # a skipped step accepts none
    assert logs["gaf/cosine_distance_max"] == pytest.approx(1.5) and logs["gaf/cosine_distance_min"] < 0.5
    assert state.pop_logs() == {}
    assert state.summary()["gaf/skipped_fraction"] == 0.5


def test_units_log_the_fraction_updated():
    state = GAFState()
    grads = torch.tensor([[1.0, 0.0, 1.0], [1.0, 0.0, -1.0]])
    state.record(filter_microgradients(grads, 0.5, units=[2, 1]))  # the first unit agrees, the second not
    assert state.pop_logs()["gaf/units_updated_fraction"] == 0.5


def test_too_many_skipped_steps_in_a_row_stop_the_run_with_the_cause():
    state = GAFState(max_consecutive_skipped=3)
    for _ in range(2):
        state.record(_result(1.5, tau=1.0))
    state.record(_result(0.1))  # an update resets the count
    for _ in range(2):
        state.record(_result(1.5, tau=1.0))
    with pytest.raises(TrainsNothingError, match="last 3 optimizer steps in a row: no two micro-gradients agreed at threshold 1"):
        state.record(_result(1.5, tau=1.0))
    nan = GAFState(max_consecutive_skipped=1)
    with pytest.raises(TrainsNothingError, match="every micro-gradient was non-finite or zero"):
        nan.record(filter_microgradients(torch.full((2, 3), float("nan")), 2.0))


def test_the_state_survives_a_checkpoint_as_json():
    state = GAFState(adaptive_window=3, adaptive_std=1.5, max_consecutive_skipped=50)
    for d in (0.1, 0.7, 0.3, 0.2):
        state.record(_result(d))
    state.switch(False)
    saved = json.loads(json.dumps(state.state()))
    restored = GAFState(**saved["args"])
    restored.on_train_begin(None, type("S", (), {"stateful_callbacks": {"GAFState": saved}})(), None)
    assert restored.state() == state.state()
    assert restored.threshold(0.97) == state.threshold(0.97) and not restored.enabled
