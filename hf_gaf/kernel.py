"""The arithmetic every GAF exchange shares: rows of micro-gradients, their inner products and means.

A macrobatch's `M` micro-gradients are rows: one `[M, P]` block, or a list of `M` flat tensors
read in place (`as_rows`). Everything GAF computes from them is either inner products, summed
into Gram matrices over column ranges (`inner_products`), or means of chosen rows
(`mean_of_rows`, `accepted_mean`). Both are memory-bound passes over the rows, written once here
so that the single-process filter, the data-parallel exchange and the FSDP2 exchange round
alike: the same float32 chunk products accumulated in float64, the same order of additions.

A column range belongs to a unit through *segments*, triples `(lo, hi, unit)` of columns
relative to the rows given: the products of each segment are added into that unit's matrix, and
each segment's mean is taken over that unit's chosen rows.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import numpy as np
import torch

__all__ = [
    "GRAM_CHUNK",
    "accepted_mean",
    "as_rows",
    "inner_products",
    "mean_of_rows",
    "row_length",
    "staging_buffer",
    "take_columns",
]

# Columns per chunk of the float32 Gram products, accumulated in float64: bounds the float32
# rounding independently of P (docs/algorithm.md, "Exactness", gives the measured bounds).
GRAM_CHUNK = 1 << 14

# Elements of the block per batched product: bounds the float32 copy of half-precision input. An
# accelerator takes far larger products at once, and would otherwise wait on kernel launches.
_GRAM_SPAN_CPU = 1 << 22
_GRAM_SPAN_ACCELERATOR = 1 << 26

# Columns below which a piece of a segment is summed elementwise with the other short ones.
_SHORT = 1 << 11


def as_rows(grads: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
    """Validate `M` micro-gradients and return them as rows, without copying them.

    An `[M, P]` tensor is returned as it is; a sequence of `M` equally sized tensors (any shape)
    becomes a list of flat views. The Gram matrix reads a list in spans of columns, copying one
    span of every row at a time, so a list costs no `[M, P]` allocation; one `[M, P]` block (see
    [`~hf_gaf.GradientBuffer`]) costs no copy at all.
    """
    if isinstance(grads, torch.Tensor):
        if grads.dim() != 2:
            raise ValueError(f"Expected micro-gradients as an [M, P] tensor, got shape {tuple(grads.shape)}.")
        rows = grads if grads.stride(-1) == 1 else grads.contiguous()
        first = rows
    else:
        rows = [g.reshape(-1) for g in grads]
        if not rows:
            raise ValueError("Expected at least one micro-gradient, got none.")
        sizes = {row.numel() for row in rows}
        if len(sizes) != 1:
            raise ValueError(f"All micro-gradients must have the same number of elements, got sizes {sorted(sizes)}.")
        if len({(row.dtype, row.device) for row in rows}) != 1:
            raise ValueError("All micro-gradients must have the same dtype and device.")
        rows = [row if row.is_contiguous() else row.contiguous() for row in rows]
        first = rows[0]
    if len(rows) == 0:
        raise ValueError("Expected at least one micro-gradient, got none.")
    if not first.is_floating_point():
        raise TypeError(f"Micro-gradients must be floating point, got {first.dtype}.")
    return rows


def take_columns(
    rows: torch.Tensor | list[torch.Tensor], start: int, stop: int, staging: torch.Tensor | None = None
) -> torch.Tensor:
    """Columns `[start, stop)` of the rows as one `[M, n]` tensor: a view of a block, a copy of a list's spans.

    A list's spans are copied into `staging` (flat, at least `M n` elements; see `staging_buffer`)
    when given: a loop over spans then reuses one buffer instead of allocating, and page-faulting,
    one per span.
    """
    if isinstance(rows, torch.Tensor):
        return rows[:, start:stop]
    pieces = [row[start:stop] for row in rows]
    if staging is None:
        return torch.stack(pieces)
    return torch.stack(pieces, out=staging[: len(pieces) * (stop - start)].view(len(pieces), stop - start))


def staging_buffer(rows: torch.Tensor | list[torch.Tensor], width: int, dtype: torch.dtype | None = None) -> torch.Tensor | None:
    """The reusable buffer `take_columns` copies spans of up to `width` columns of a list into (None for a block)."""
    if isinstance(rows, torch.Tensor):
        return None
    return torch.empty(len(rows) * min(width, row_length(rows)), dtype=dtype or rows[0].dtype, device=rows[0].device)


def row_length(rows: torch.Tensor | list[torch.Tensor]) -> int:
    """Columns per row: `P` of `[M, P]` micro-gradients."""
    return rows.shape[1] if isinstance(rows, torch.Tensor) else rows[0].numel()


def inner_products(
    x: torch.Tensor | list[torch.Tensor],
    y: torch.Tensor | list[torch.Tensor],
    out: torch.Tensor | None = None,
    *,
    segments: Sequence[tuple[int, int, int]] | None = None,
) -> torch.Tensor:
    """Add `x @ y.T` of `[A, n]` and `[B, n]` blocks into a float64 `[A, B]`: the blocks of a Gram matrix.

    The blocks of a Gram matrix whose rows live in different tensors (a process's own
    micro-gradients and those it received) are computed without copying them into one. With
    `segments`, pieces `(lo, hi, unit)` of the columns, the products of each piece are added
    into `out[unit]` (an `[U, A, B]` tensor). Either block may also be a list of flat rows
    (see `as_rows`). Rows may be strided; columns must be contiguous.
    """
    n = row_length(x)
    if row_length(y) != n:
        raise ValueError(f"inner_products needs rows of equal length, got {n} and {row_length(y)} columns.")
    if segments is None:
        if out is None:
            out = torch.zeros(len(x), len(y), dtype=torch.float64, device=x[0].device)
        out += _products(x, y, ((0, n, 0),), 1)[0]
        return out
    if out is None:
        raise ValueError("inner_products with segments needs out, an [U, A, B] float64 tensor.")
    out += _products(x, y, segments, out.shape[0])
    return out


def _products(x, y, segments, units: int) -> torch.Tensor:
    """`[U, A, B]` float64: each segment's columns of `x @ y.T`, from float32 products (float64 if float32 overflowed)."""
    wide = torch.float64 if x[0].dtype == torch.float64 else torch.float32
    products = _segment_products(x, y, segments, units, wide)
    if wide != torch.float64 and not bool(torch.isfinite(products).all()):
        products = _segment_products(x, y, segments, units, torch.float64)
    return products


def _segment_products(x, y, segments, units: int, dtype: torch.dtype) -> torch.Tensor:
    """Whole Gram chunks go through batched chunk products; what is left of each segment is summed at once.

    Every Gram chunk (of the column grid, aligned to the rows' first column) that lies inside one
    segment is multiplied with the others of its span in one batched product and added to its
    unit's matrix, whichever segments the span holds: a model's hundreds of parameter tensors cost
    no more batched products than one. What is left of a segment outside whole chunks, at most a
    chunk at either end, is one product when long; the short pieces (biases, norms) are
    gathered into one block, multiplied elementwise and summed per unit, which costs fewer calls
    than one product each.
    """
    out = torch.zeros(units, len(x), len(y), dtype=torch.float64, device=x[0].device)
    owner: dict[int, int] = {}  # aligned chunk -> unit, for the chunks inside one segment
    rest = []
    for lo, hi, unit in segments:
        first, last = -(-lo // GRAM_CHUNK), hi // GRAM_CHUNK
        if first >= last:
            rest.append((lo, hi, unit))
            continue
        if lo < first * GRAM_CHUNK:
            rest.append((lo, first * GRAM_CHUNK, unit))
        if last * GRAM_CHUNK < hi:
            rest.append((last * GRAM_CHUNK, hi, unit))
        owner.update(dict.fromkeys(range(first, last), unit))
    if owner:
        out += _chunked_products(x, y, owner, units, dtype)
    short = [(lo, hi, unit) for lo, hi, unit in rest if hi - lo < _SHORT]
    with _ieee_float32(x[0].device):
        for lo, hi, unit in rest:
            if hi - lo >= _SHORT:
                left = take_columns(x, lo, hi).to(dtype)
                right = left if y is x else take_columns(y, lo, hi).to(dtype)
                out[unit] += (left @ right.T).to(torch.float64)
    if short:
        out += _short_segment_products(x, y, short, units, dtype)
    return out


def _short_segment_products(x, y, short, units: int, dtype: torch.dtype) -> torch.Tensor:
    a, b = len(x), len(y)
    device = x[0].device
    columns = torch.cat([torch.arange(lo, hi, device=device) for lo, hi, _ in short])
    owner = torch.cat([torch.full((hi - lo,), unit, device=device) for lo, hi, unit in short])
    left = _gather_columns(x, columns).to(dtype)
    right = left if y is x else _gather_columns(y, columns).to(dtype)
    sums = torch.zeros(a * b, units, dtype=dtype, device=device)
    span = max(1, _span(device) // (a * b))
    for start in range(0, columns.numel(), span):
        piece = slice(start, start + span)
        products = (left[:, None, piece] * right[None, :, piece]).reshape(a * b, -1)
        sums.index_add_(1, owner[piece], products)
    return sums.T.reshape(units, a, b).to(torch.float64)


def _gather_columns(rows, columns: torch.Tensor) -> torch.Tensor:
    if isinstance(rows, torch.Tensor):
        return rows.index_select(1, columns)
    return torch.stack([row.index_select(0, columns) for row in rows])


def _span(device: torch.device) -> int:
    return _GRAM_SPAN_CPU if device.type == "cpu" else _GRAM_SPAN_ACCELERATOR


@contextlib.contextmanager
def _ieee_float32(device: torch.device) -> Iterator[None]:
    """float32 products in IEEE float32 on CUDA even when TF32 is allowed (TF32 errs by 1e-3 in cosines)."""
    if device.type != "cuda":
        yield
        return
    allowed = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allowed


def _chunked_products(x, y, owner: dict[int, int], units: int, dtype: torch.dtype) -> torch.Tensor:
    """`[U, A, B]`: the products of the chunks in `owner` (chunk index -> unit), a span of chunks per batched product."""
    a, b = len(x), len(y)
    device = x[0].device
    out = torch.zeros(units, a, b, dtype=torch.float64, device=device)
    first, stop = min(owner), max(owner) + 1
    step = max(1, _span(device) // (max(a, b) * GRAM_CHUNK))
    x_staging = staging_buffer(x, min(step, stop - first) * GRAM_CHUNK)
    y_staging = None if y is x else staging_buffer(y, min(step, stop - first) * GRAM_CHUNK)
    one_unit = len(set(owner.values())) == 1
    with _ieee_float32(device):
        for start in range(first, stop, step):
            end = min(start + step, stop)
            present = [c for c in range(start, end) if c in owner]
            if not present:
                continue
            left = take_columns(x, start * GRAM_CHUNK, end * GRAM_CHUNK, x_staging).to(dtype)
            right = left if y is x else take_columns(y, start * GRAM_CHUNK, end * GRAM_CHUNK, y_staging).to(dtype)
            lc, rc = (t.unflatten(1, (-1, GRAM_CHUNK)).transpose(0, 1) for t in (left, right))
            products = torch.bmm(lc, rc.transpose(1, 2))  # [chunks, A, B]
            if one_unit and len(present) == end - start:
                out[owner[start]] += products.to(torch.float64).sum(0)
            else:
                index = torch.tensor([c - start for c in present], device=device)
                unit = torch.tensor([owner[c] for c in present], device=device)
                out.index_add_(0, unit, products.index_select(0, index).to(torch.float64))
    return out


def mean_of_rows(
    rows: Sequence[torch.Tensor],
    out: torch.Tensor | None = None,
    *,
    scale: float = 1.0,
    denominator: float | None = None,
) -> torch.Tensor:
    """Return `scale * sum(rows) / denominator` (default `len(rows)`), reading only `rows`; into `out` if given.

    The first row is copied and the others added in order, in float32 at least, then divided by
    the denominator (`scale == 1`), left alone (`scale == denominator`: the sum that gradient
    accumulation would hold, at no extra pass) or multiplied by `scale / denominator`: one fixed
    arithmetic, so every caller (single process or any exchange) gets the same bits. Writes
    straight into `out` (one pass per row) when no wider accumulator is needed.
    """
    if not rows:
        raise ValueError("mean_of_rows needs at least one row.")
    denominator = float(len(rows)) if denominator is None else float(denominator)
    if out is None:
        out = torch.empty_like(rows[0])
    acc_dtype = torch.promote_types(out.dtype, torch.float32)
    if acc_dtype == out.dtype and len(rows) > 1:
        acc, rest = torch.add(rows[0], rows[1], out=out), rows[2:]
    else:
        acc = out if acc_dtype == out.dtype else torch.empty_like(out, dtype=acc_dtype)
        acc, rest = acc.copy_(rows[0]), rows[1:]
    for row in rest:
        acc.add_(row)
    if scale == 1.0:
        acc.div_(denominator)
    elif scale != denominator:
        acc.mul_(scale / denominator)
    if acc is not out:
        out.copy_(acc)
    return out


def accepted_mean(
    rows: torch.Tensor | list[torch.Tensor],
    chosen: Sequence[Sequence[int]],
    out: torch.Tensor | None = None,
    *,
    scale: float = 1.0,
    sizes: np.ndarray | None = None,
    segments: Sequence[tuple[int, int, int]] | None = None,
) -> torch.Tensor:
    """Write `scale * sum_{i chosen} g_i / sum_{i chosen} sizes[i]` of every segment's unit into `out`.

    `rows` are the `M` micro-gradients (an `[M, n]` tensor or a list of flat rows, see
    `as_rows`); `chosen[u]` lists the rows averaged in unit `u` (empty: the unit is skipped and
    its columns are left as they are); `segments` (default: all columns in unit 0) assign the
    columns to units. Rows that are not chosen are never read, so an excluded NaN micro-gradient
    cannot leak into the result. Consecutive segments with the same chosen rows are averaged in
    one pass.
    """
    n = row_length(rows)
    if out is None:
        out = torch.empty(n, dtype=rows[0].dtype, device=rows[0].device)
    sizes = np.ones(len(rows)) if sizes is None else np.asarray(sizes, dtype=np.float64)
    run: tuple[int, int, tuple[int, ...]] | None = None
    for lo, hi, unit in segments if segments is not None else ((0, n, 0),):
        rows_of_unit = tuple(chosen[unit])
        if run is not None and run[2] == rows_of_unit and run[1] == lo:
            run = (run[0], hi, rows_of_unit)
            continue
        _write_mean(rows, run, out, scale, sizes)
        run = (lo, hi, rows_of_unit)
    _write_mean(rows, run, out, scale, sizes)
    return out


def _write_mean(rows, run, out: torch.Tensor, scale: float, sizes: np.ndarray) -> None:
    if run is None or not run[2]:
        return
    lo, hi, chosen = run
    denominator = float(sizes[list(chosen)].sum())
    mean_of_rows([rows[i][lo:hi] for i in chosen], out[lo:hi], scale=scale, denominator=denominator)

