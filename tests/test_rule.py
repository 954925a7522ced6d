"""The GAF rule against an independent, literal implementation of the paper's Algorithm 1."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hf_gaf.kernel import GRAM_CHUNK, inner_products
from hf_gaf.rule import Units, decide, filter_microgradients, gram_matrix

MARGIN = 1e-5  # random cases closer than this to the threshold are ambiguous under rounding


def brute_force(vectors: torch.Tensor, tau: float, rule: str = "sequential"):
    """Algorithm 1 on explicit float64 vectors; returns (accepted list, filtered mean or None, margin)."""
    g = vectors.double()
    m = g.shape[0]
    valid = [bool(torch.isfinite(g[i]).all()) and float(g[i].norm()) > 0 for i in range(m)]
    starts = range(m) if rule == "best_start" else [0]
    best, best_margin = None, math.inf
    for start in starts:
        accepted, total, margin = [], None, math.inf
        for offset in range(m):
            j = (start + offset) % m
            if not valid[j]:
                continue
            if total is None:
                total = g[j].clone()
                accepted.append(j)
                continue
            cos = float(torch.dot(g[j], total) / (g[j].norm() * total.norm()))
            dist = 1.0 - cos
            margin = min(margin, abs(dist - tau))
            if dist <= tau:
                total += g[j]
                accepted.append(j)
        best_margin = min(best_margin, margin)
        if best is None or len(accepted) > len(best[0]):
            best = (sorted(accepted), total)
    accepted, total = best
    mean = total / len(accepted) if len(accepted) >= 2 else None
    return accepted, mean, best_margin


def random_case(gen: torch.Generator):
    m = int(torch.randint(1, 9, (1,), generator=gen))
    p = int(torch.randint(1, 200, (1,), generator=gen))
    common = torch.randn(p, generator=gen, dtype=torch.float64)
    scales = torch.rand(m, 1, generator=gen, dtype=torch.float64) * 3
    vectors = common + scales * torch.randn(m, p, generator=gen, dtype=torch.float64)
    vectors *= torch.rand(m, 1, generator=gen, dtype=torch.float64) * 10 + 0.01
    tau = float(torch.rand(1, generator=gen)) * 1.4 + 0.3
    return vectors, tau


@pytest.mark.parametrize("rule", ["sequential", "best_start"])
def test_matches_brute_force_on_random_cases(rule):
    gen = torch.Generator().manual_seed(0)
    checked = 0
    outcomes = set()
    for _ in range(400):
        vectors, tau = random_case(gen)
        expected, expected_mean, margin = brute_force(vectors, tau, rule)
        if margin < MARGIN:
            continue
        result = filter_microgradients(vectors, tau, rule=rule)
        assert torch.nonzero(result.accepted).flatten().tolist() == expected
        assert result.skipped == (expected_mean is None)
        if expected_mean is None:
            assert result.gradient is None
            assert not result.weights.any()
        else:
            torch.testing.assert_close(result.gradient, expected_mean, rtol=1e-9, atol=1e-12)
            assert torch.allclose(result.weights.sum(), torch.tensor(1.0, dtype=torch.float64))
        outcomes.add((result.skipped, result.num_accepted == result.num_microgradients))
        checked += 1
    assert checked > 350
    exercised = {(True, False), (False, False), (False, True)}  # skip, partial, full acceptance
    assert exercised <= outcomes, "the random cases must exercise skips, partial and full acceptance"


def test_best_start_is_order_robust_where_sequential_is_not():
    a = torch.tensor([1.0, 0.0])
    b = torch.tensor([0.0, 1.0])
    # The first micro-gradient is the odd one out: sequential keeps only it and skips.
    grads = torch.stack([-a - b, a, a + 0.1 * b, a - 0.1 * b])
    sequential = filter_microgradients(grads, 0.5)
    assert sequential.skipped and sequential.accepted.tolist() == [True, False, False, False]
    best = filter_microgradients(grads, 0.5, rule="best_start")
    assert best.accepted.tolist() == [False, True, True, True]
    assert best.start == 1
    torch.testing.assert_close(best.gradient, grads[1:].mean(0))


def test_best_start_ties_go_to_lowest_start():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 0.0])
    result = filter_microgradients(torch.stack([b, a, b * 2, a * 3]), 0.5, rule="best_start")
    assert result.accepted.tolist() == [True, False, True, False]
    assert result.start == 0


def test_distances_are_those_seen_while_filtering():
    grads = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]], dtype=torch.float64)
    result = filter_microgradients(grads, 1.0)
    assert math.isnan(result.distances[0])
    # [0, 1] is orthogonal to S = [1, 0]; then [-1, 0] against S = [1, 1].
    assert result.distances[1].item() == pytest.approx(1.0)
    assert result.distances[2].item() == pytest.approx(1.0 + 1.0 / math.sqrt(2.0))
    assert result.accepted.tolist() == [True, True, False]


@pytest.mark.parametrize("tau", [0.0, 0.5, 2.0])
def test_identical_micro_gradients_agree_at_any_threshold(tau):
    g = torch.randn(1_000_003, generator=torch.Generator().manual_seed(1))
    result = filter_microgradients(torch.stack([g, g, g]), tau)
    assert result.accepted.all()
    torch.testing.assert_close(result.gradient, g)


def test_antiparallel_disagree_until_tau_two():
    g = torch.randn(64, generator=torch.Generator().manual_seed(2))
    grads = torch.stack([g, -g])
    assert filter_microgradients(grads, 1.999).skipped
    assert not filter_microgradients(grads, 2.0).skipped


def test_orthogonal_agree_exactly_at_distance_one():
    grads = torch.eye(2)
    assert filter_microgradients(grads, 1.0).accepted.all()
    assert filter_microgradients(grads, 0.999).skipped


def test_tau_two_is_the_plain_mean():
    gen = torch.Generator().manual_seed(3)
    grads = torch.randn(6, 10_000, generator=gen)
    grads[2] *= -1
    result = filter_microgradients(grads, 2.0)
    assert result.accepted.all() and not result.skipped
    expected = grads[0].clone()
    for row in grads[1:]:
        expected += row
    assert torch.equal(result.gradient, expected / 6)
    torch.testing.assert_close(result.gradient, grads.mean(0))


def test_scale_is_folded_into_the_mean():
    gen = torch.Generator().manual_seed(10)
    grads = torch.randn(3, 1000, generator=gen) + 1.0
    total = grads[0] + grads[1] + grads[2]
    assert torch.equal(filter_microgradients(grads, 2.0, scale=3).gradient, total)  # no division at all
    assert torch.equal(filter_microgradients(grads, 2.0, scale=1).gradient, total / 3)
    torch.testing.assert_close(filter_microgradients(grads, 2.0, scale=2).gradient, 2 * total / 3)
    with pytest.raises(ValueError, match="scale must be a finite number"):
        filter_microgradients(grads, 2.0, scale=math.nan)
    with pytest.raises(TypeError, match="scale must be a finite number"):
        filter_microgradients(grads, 2.0, scale="two")


@pytest.mark.parametrize("bad", ["zero", "nan", "inf"])
@pytest.mark.parametrize("rule", ["sequential", "best_start"])
def test_zero_and_non_finite_micro_gradients_are_excluded(bad, rule):
    gen = torch.Generator().manual_seed(4)
    g = torch.randn(3, 50, generator=gen).abs()
    broken = {"zero": torch.zeros(50), "nan": torch.full((50,), math.nan), "inf": torch.full((50,), math.inf)}[bad]
    broken[0] = 1.0  # a single finite entry must not rescue it
    if bad == "zero":
        broken.zero_()
    grads = torch.stack([broken, g[0], g[1], g[2]])
    result = filter_microgradients(grads, 2.0, rule=rule)
    assert result.accepted.tolist() == [False, True, True, True]
    assert math.isnan(result.distances[0])
    assert torch.isfinite(result.gradient).all()
    torch.testing.assert_close(result.gradient, g.mean(0))


def test_all_but_one_excluded_is_a_skip():
    grads = torch.stack([torch.zeros(5), torch.ones(5), torch.full((5,), math.nan)])
    result = filter_microgradients(grads, 2.0)
    assert result.skipped and result.gradient is None
    assert result.accepted.tolist() == [False, True, False]


def test_nothing_valid_is_a_skip_with_no_start():
    result = filter_microgradients(torch.zeros(3, 4), 2.0, rule="best_start")
    assert result.skipped and result.start == -1 and not result.accepted.any()


def test_single_micro_gradient_is_always_skipped():
    result = filter_microgradients(torch.ones(1, 8), 2.0)
    assert result.skipped and result.accepted.tolist() == [True]
    assert result.gradient is None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(dtype):
    gen = torch.Generator().manual_seed(5)
    common = torch.randn(4096, generator=gen)
    grads = torch.stack([common + 0.3 * torch.randn(4096, generator=gen) for _ in range(4)])
    grads[3] = -common
    low = grads.to(dtype)
    expected, _, _ = brute_force(low.double(), 0.97)
    result = filter_microgradients(low, 0.97)
    assert torch.nonzero(result.accepted).flatten().tolist() == expected == [0, 1, 2]
    assert result.gradient.dtype == dtype
    torch.testing.assert_close(result.gradient.float(), low[:3].float().mean(0), rtol=1e-2, atol=1e-2)


def test_sequence_input_flattens_any_shape():
    gen = torch.Generator().manual_seed(6)
    grads = [torch.randn(3, 4, generator=gen) for _ in range(3)]
    result = filter_microgradients(grads, 2.0)
    torch.testing.assert_close(result.gradient, torch.stack(grads).mean(0).flatten())


def test_gram_matrix_accumulates_float32_chunks_in_float64():
    gen = torch.Generator().manual_seed(7)
    block = torch.randn(3, 200_001, generator=gen)
    exact = block.double() @ block.double().T
    gram = gram_matrix(block)
    assert gram.dtype == torch.float64
    norms = exact.diagonal().sqrt()
    cosine_error = (gram - exact) / (norms[:, None] * norms[None, :])
    assert cosine_error.abs().max() < 1e-6
    split = inner_products(block[:, 100:], block[:, 100:], out=gram_matrix(block[:, :100]))
    assert ((split - gram) / (norms[:, None] * norms[None, :])).abs().max() < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [2, 64])
def test_gram_matrix_batches_whole_chunks_like_a_loop_over_them(m, dtype):
    # m=64 needs several batched products (spans), and 200,001 columns end in a partial chunk; a chunk
    # missed or counted twice would be off by about 1/12. Batched and single float32 products may round
    # differently, hence the float32 tolerance.
    gen = torch.Generator().manual_seed(9)
    block = torch.randn(m, 200_001, generator=gen).to(dtype)
    looped = torch.zeros(m, m, dtype=torch.float64)
    for start in range(0, block.shape[1], GRAM_CHUNK):
        chunk = block[:, start : start + GRAM_CHUNK].float()
        looped += (chunk @ chunk.T).double()
    torch.testing.assert_close(gram_matrix(block), looped, rtol=1e-6, atol=0)


def test_decide_is_deterministic_and_works_from_gram_alone():
    gen = torch.Generator().manual_seed(8)
    vectors = torch.randn(16, 32, generator=gen, dtype=torch.float64) + 1.0
    gram = vectors @ vectors.T
    first, second = decide(gram, 0.97, "best_start"), decide(gram.clone(), 0.97, "best_start")
    assert np.array_equal(first.accepted, second.accepted) and np.array_equal(first.weights, second.weights)
    assert np.array_equal(first.distances, second.distances, equal_nan=True)
    assert np.array_equal(first.accepted[0], filter_microgradients(vectors, 0.97, rule="best_start").accepted.numpy())


@pytest.mark.parametrize("tau", [-0.01, 2.01, math.nan, "high"])
def test_threshold_out_of_range_is_refused(tau):
    with pytest.raises((ValueError, TypeError), match=r"threshold .*\[0, 2\]"):
        filter_microgradients(torch.ones(2, 3), tau)


def test_unknown_rule_is_refused():
    with pytest.raises(ValueError, match="Unknown GAF rule 'greedy'.*sequential.*best_start"):
        filter_microgradients(torch.ones(2, 3), 1.0, rule="greedy")


def test_malformed_inputs_are_refused():
    with pytest.raises(ValueError, match="same number of elements"):
        filter_microgradients([torch.ones(3), torch.ones(4)], 1.0)
    with pytest.raises(ValueError, match=r"\[M, P\]"):
        filter_microgradients(torch.ones(2, 3, 4), 1.0)
    with pytest.raises(TypeError, match="floating point"):
        filter_microgradients(torch.ones(2, 3, dtype=torch.long), 1.0)
    with pytest.raises(ValueError, match="at least one"):
        filter_microgradients([], 1.0)


# -- units, sizes and the float32 overflow ------------------------------------------------------------


@pytest.mark.parametrize("rule", ["sequential", "best_start"])
def test_every_unit_matches_brute_force_on_its_own_columns(rule):
    gen = torch.Generator().manual_seed(11)
    checked = partial = 0
    for _ in range(150):
        vectors, tau = random_case(gen)
        p = vectors.shape[1]
        cuts = sorted(set(torch.randint(1, p, (3,), generator=gen).tolist())) if p > 1 else []
        sizes = [b - a for a, b in zip([0, *cuts], [*cuts, p])]
        expected = [brute_force(vectors[:, a:b], tau, rule) for a, b in zip([0, *cuts], [*cuts, p])]
        if min(margin for _, _, margin in expected) < MARGIN:
            continue
        result = filter_microgradients(vectors, tau, rule=rule, units=sizes)
        assert result.accepted.shape == (len(sizes), vectors.shape[0])
        for unit, ((accepted, mean, _), a, b) in enumerate(zip(expected, [0, *cuts], [*cuts, p])):
            assert torch.nonzero(result.accepted[unit]).flatten().tolist() == accepted
            assert bool(result.updated[unit]) == (mean is not None)
            if mean is not None:
                torch.testing.assert_close(result.gradient[a:b], mean, rtol=1e-9, atol=1e-12)
        assert result.skipped == (not any(mean is not None for _, mean, _ in expected))
        partial += 0 < int(result.updated.sum()) < len(sizes)
        checked += 1
    assert checked > 100 and partial > 5, "units must decide on their own, some updated and some skipped"


def test_one_unit_is_the_whole_model_rule():
    grads = torch.randn(5, 300, generator=torch.Generator().manual_seed(12)) + 1.0
    whole, one = filter_microgradients(grads, 0.97), filter_microgradients(grads, 0.97, units=[300])
    assert torch.equal(whole.gradient, one.gradient) and torch.equal(whole.accepted, one.accepted[0])


def test_averaged_units_take_every_finite_microgradient():
    grads = torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, 4.0], [-1.0, 0.0, math.nan]])
    result = filter_microgradients(grads, 0.0, units=Units((2, 1), averaged=(False, True)))
    assert result.accepted[1].tolist() == [True, True, False]  # zeros count, NaN does not
    assert result.updated.tolist() == [False, True] and not result.skipped
    assert result.gradient[2].item() == pytest.approx(3.0)
    assert result.excluded[1].tolist() == [False, False, True]


def test_sizes_weigh_the_accepted_microgradients_per_item():
    grads = torch.tensor([[2.0, 2.0], [3.0, 3.0], [-5.0, -5.0]], dtype=torch.float64)
    # Sums over 2, 3 and 4 items; the third disagrees: the per-item mean of the first two is 5 / 5.
    result = filter_microgradients(grads, 0.5, sizes=[2, 3, 4], scale=1.0)
    assert result.accepted.tolist() == [True, True, False]
    assert result.gradient.tolist() == [1.0, 1.0]
    assert result.weights.tolist() == [0.2, 0.2, 0.0]


def test_size_zero_is_an_absent_microgradient():
    grads = torch.tensor([[1.0, 1.0], [1.0, 1.1], [math.nan, 0.0]])
    result = filter_microgradients(grads, 2.0, sizes=[1, 1, 0], scale=2.0)
    assert result.accepted.tolist() == [True, True, False]
    assert not result.excluded.any() and not result.non_finite.any()  # absent, not excluded
    torch.testing.assert_close(result.gradient, grads[:2].sum(0))


def test_finite_gradients_whose_float32_products_overflow_are_compared_in_float64():
    grads = torch.randn(3, 1000, generator=torch.Generator().manual_seed(13)) * 1e20
    grads[1] = grads[0] * 2
    result = filter_microgradients(grads, 0.5)
    assert not result.excluded.any() and not result.non_finite.any()
    assert result.accepted[:2].all() and result.distances[1].item() == pytest.approx(0.0, abs=1e-9)
    assert torch.isfinite(gram_matrix(grads)).all()


def test_a_list_of_rows_gives_the_gram_matrix_and_the_bits_of_the_mean_of_a_block():
    gen = torch.Generator().manual_seed(14)
    block = torch.randn(4, 100_003, generator=gen)
    rows = [row.clone() for row in block]
    # The same chunk products, summed alike; BLAS may round a staged copy and a strided view differently.
    expected = gram_matrix(block)
    torch.testing.assert_close(gram_matrix(rows), expected, rtol=0, atol=1e-7 * float(expected.diagonal().max()))
    assert torch.equal(filter_microgradients(rows, 2.0).gradient, filter_microgradients(block, 2.0).gradient)


def test_a_list_of_rows_is_read_span_by_span_as_a_block():
    # With `out`, the rows are read in spans of about a million columns (the last one short), a
    # list's spans staged in one reused buffer. The mean is elementwise: the same bits. The float32
    # products of the Gram matrix depend on the rows' memory stride (the BLAS kernel), which a
    # staged span does not share with the block, so they agree to rounding.
    gen = torch.Generator().manual_seed(15)
    block = torch.randn(2, 2_500_001, generator=gen)
    rows = [row.clone() for row in block]
    from_rows = filter_microgradients(rows, 2.0, out=torch.empty(block.shape[1]), scale=2.0)
    from_block = filter_microgradients(block, 2.0, out=torch.empty(block.shape[1]), scale=2.0)
    assert torch.equal(from_rows.gradient, from_block.gradient) and torch.equal(from_block.gradient, block.sum(0))
    torch.testing.assert_close(from_rows.distances, from_block.distances, rtol=1e-9, atol=0, equal_nan=True)
