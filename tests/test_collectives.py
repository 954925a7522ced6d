"""Tests of hf_gaf.collectives on one process: the checked call, its header, and the step's agreement.

Across processes the same code runs in every exchange's tests (tests/test_exchange.py, tests/test_fsdp.py).
"""

from __future__ import annotations

import pytest
import torch

from hf_gaf.collectives import Call, agree, require_same


@pytest.mark.parametrize(
    "arguments, code, message",
    [
        (dict(threshold=3.0), 1, r"\[0, 2\]"),
        (dict(rule="bogus"), 2, "Unknown GAF rule"),
        (dict(scale=float("inf")), 3, "finite number"),
        (dict(sizes=[1.0]), 4, "one finite number >= 0 of items per local micro-gradient \\(2\\)"),
    ],
)
def test_a_bad_argument_is_kept_with_its_code_and_raised_at_the_agreement(arguments, code, message):
    call = Call.check(**{"threshold": 0.97, "rule": "sequential", "scale": 1.0, "sizes": None, **arguments}, k=2)
    assert call.code == code and call.error is not None
    with pytest.raises((ValueError, TypeError), match=message):
        agree(call, torch.zeros(1, 2, 2, dtype=torch.float64), None)


def test_a_bad_out_is_the_extra_check():
    def bad_out():
        raise ValueError("out must be a [3] tensor")

    call = Call.check(0.97, "sequential", 1.0, None, 2, bad_out)
    assert call.out_invalid and "out must" in str(call.error)


def test_the_agreement_of_one_process_decides_and_returns_sizes_and_flags():
    gram = torch.tensor([[[4.0, 3.9], [3.9, 4.0]]], dtype=torch.float64)  # two nearly parallel micro-gradients
    call = Call.check(0.5, "sequential", 2.0, [3.0, 1.0], 2)
    agreement = agree(call, gram, None, received=torch.tensor([True, False, True]))
    assert agreement.decision.accepted.tolist() == [[True, True]]
    assert agreement.sizes.tolist() == [3.0, 1.0]
    assert agreement.received.tolist() == [True, False, True]
    assert torch.equal(agreement.gram, gram)


def test_values_that_differ_across_ranks_are_named_with_the_fix():
    require_same(torch.tensor([2.0, 2.0]), "K", "pass the same K")
    with pytest.raises(ValueError, match=r"K is \[2, 1\] by rank; pass the same K"):
        require_same(torch.tensor([2.0, 1.0]), "K", "pass the same K", counts=True)
