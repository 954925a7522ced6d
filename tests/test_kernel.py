"""Tests of hf_gaf.kernel: inner products by segment, against float64 products, and means of chosen rows."""

from __future__ import annotations

import pytest
import torch

from hf_gaf.kernel import GRAM_CHUNK, accepted_mean, inner_products, mean_of_rows
from hf_gaf.rule import gram_matrix


def _segments(widths: list[int], units: list[int]) -> list[tuple[int, int, int]]:
    out, lo = [], 0
    for width, unit in zip(widths, units):
        out.append((lo, lo + width, unit))
        lo += width
    return out


# Unaligned long segments, one exactly a chunk, short ones between, units recurring out of order.
WIDTHS = [GRAM_CHUNK * 2 + 7, 5, GRAM_CHUNK, 300, GRAM_CHUNK * 3 - 11, 1, 40_000, 2049, 2047]
UNITS = [0, 1, 2, 1, 0, 3, 2, 3, 1]


@pytest.mark.parametrize("rows", ["block", "list", "strided"])
def test_segments_add_each_ones_products_to_its_unit(rows):
    gen = torch.Generator().manual_seed(3)
    p = sum(WIDTHS)
    block = torch.randn(3, p, generator=gen)
    x = {"block": block, "list": [r.clone() for r in block], "strided": torch.randn(3, p + 9, generator=gen)[:, 9:]}[rows]
    reference_rows = x if rows != "list" else block
    segments = _segments(WIDTHS, UNITS)
    out = torch.zeros(4, 3, 3, dtype=torch.float64)
    inner_products(x, x, out, segments=segments)
    exact = torch.zeros(4, 3, 3, dtype=torch.float64)
    for lo, hi, unit in segments:
        piece = torch.stack([r[lo:hi] for r in reference_rows]).double()
        exact[unit] += piece @ piece.T
    scale = exact.diagonal(dim1=1, dim2=2).amax(1)[:, None, None]
    assert ((out - exact).abs() / scale).max() < 1e-5, "a chunk or piece was missed, counted twice or given to another unit"


def test_one_segment_is_the_gram_matrix():
    gen = torch.Generator().manual_seed(4)
    block = torch.randn(4, 3 * GRAM_CHUNK + 123, generator=gen)
    out = torch.zeros(1, 4, 4, dtype=torch.float64)
    inner_products(block, block, out, segments=[(0, block.shape[1], 0)])
    assert torch.equal(out[0], gram_matrix(block))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inner_products_assemble_the_gram_matrix_from_blocks_of_rows(dtype):
    # The sharded exchange reads its own rows in place (a strided view of the caller's [K, P]) and
    # the received ones from another tensor; the blocks must make up the Gram matrix of all rows.
    gen = torch.Generator().manual_seed(10)
    block = torch.randn(5, 200_001, generator=gen).to(dtype)
    mine, theirs = block[1:3], torch.cat([block[:1], block[3:]])
    assert not mine[:, 7:].is_contiguous()
    blocks = torch.zeros(5, 5, dtype=torch.float64)
    inner_products(mine, mine, out=blocks[:2, :2])
    inner_products(mine, theirs, out=blocks[:2, 2:])
    inner_products(theirs, theirs, out=blocks[2:, 2:])
    blocks[2:, :2] = blocks[:2, 2:].T
    canonical = torch.tensor([2, 0, 1, 3, 4])
    exact = block.double() @ block.double().T
    norms = exact.diagonal().sqrt()
    cosine_error = (blocks[canonical][:, canonical] - exact) / (norms[:, None] * norms[None, :])
    assert cosine_error.abs().max() < 1e-5
    assert torch.equal(inner_products(block, block), gram_matrix(block))
    with pytest.raises(ValueError, match="equal length"):
        inner_products(block, block[:, 1:])




def test_accepted_mean_averages_each_units_chosen_rows_and_leaves_skipped_units_alone():
    gen = torch.Generator().manual_seed(5)
    rows = torch.randn(3, 20, generator=gen)
    rows[2, :10] = float("nan")  # a rejected row is never read
    out = torch.full((20,), -7.0)
    accepted_mean(rows, [[0, 1], [], [1, 2]], out, scale=2.0, sizes=torch.tensor([1.0, 3.0, 1.0]).numpy(),
                  segments=[(0, 10, 0), (10, 15, 1), (15, 20, 2)])  # fmt: skip
    torch.testing.assert_close(out[:10], 2.0 * (rows[0, :10] + rows[1, :10]) / 4.0)
    assert torch.equal(out[10:15], torch.full((5,), -7.0))
    torch.testing.assert_close(out[15:], 2.0 * (rows[1, 15:] + rows[2, 15:]) / 4.0)


def test_mean_of_rows_folds_the_scale_into_one_division():
    rows = [torch.tensor([1.0, 2.0]), torch.tensor([3.0, 6.0])]
    assert torch.equal(mean_of_rows(rows), torch.tensor([2.0, 4.0]))
    assert torch.equal(mean_of_rows(rows, scale=2.0), torch.tensor([4.0, 8.0]))  # the plain sum, no division
    half = [r.to(torch.bfloat16) for r in rows]
    assert mean_of_rows(half, out=torch.empty(2, dtype=torch.bfloat16)).dtype == torch.bfloat16
