"""Which grades a synthetic set holds: IDRiD's class proportions, exact per split, and grader noise.

Grades are decided here before anything is drawn (`sample_grades`), and the lesion planner then
draws what those grades require, so labels never depend on pixels. `_grader_labels` models a
noisy grader on the written CSVs only; `_check_grades` is the one place the valid (DR, DME)
pairs are spelled out.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

IDRID_TRAIN_COUNTS_DR = (134, 20, 136, 74, 49)
IDRID_TRAIN_COUNTS_DME = (177, 41, 195)
# DME 0/1/2 among the 259 training images with DR >= 2 (DR 0-1 always have DME 0).
_DME_COUNTS_REFERABLE = (23, 41, 195)


def _grader_labels(
    grades: Sequence[tuple[int, int]], rate: float, rng: np.random.Generator
) -> list[tuple[int, int]]:
    """The grades a noisy grader writes: each task's grade moves to a neighbour at ``rate``.

    Moves stay on the scales, and DME > 0 keeps DR >= 2 (the labelling rule of IDRiD).
    """
    out = []
    for dr, dme in grades:
        if rng.random() < rate:
            moved = dr + int(rng.choice([-1, 1]))
            if 0 <= moved <= 4 and not (dme > 0 and moved < 2):
                dr = moved
        if dr >= 2 and rng.random() < rate:
            moved = dme + int(rng.choice([-1, 1]))
            dme = moved if 0 <= moved <= 2 else dme
        out.append((dr, dme))
    return out


def _largest_remainder(total: int, weights: Sequence[int]) -> list[int]:
    """Split ``total`` into integers proportional to integer ``weights`` (Hamilton's method).

    Exact integer arithmetic, so e.g. ``total == sum(weights)`` reproduces ``weights``.
    """
    denom = sum(weights)
    nums = [total * w for w in weights]
    counts = [n // denom for n in nums]
    order = sorted(range(len(weights)), key=lambda i: (-(nums[i] % denom), i))
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    return counts


def _round_table(rows: Sequence[int], cols: Sequence[int]) -> list[list[int]]:
    """Integer table with the given row/column sums, close to the independence table.

    Controlled rounding: floor every cell of ``rows[i] * cols[j] / total``, then hand out the
    missing units by largest remainder where both the row and the column still need one.
    """
    total = sum(rows)
    assert total == sum(cols)
    if total == 0:
        return [[0] * len(cols) for _ in rows]
    table = [[r * c // total for c in cols] for r in rows]
    row_left = [r - sum(t) for r, t in zip(rows, table, strict=True)]
    col_left = [c - sum(t[j] for t in table) for j, c in enumerate(cols)]
    cells = sorted(
        ((i, j) for i in range(len(rows)) for j in range(len(cols))),
        key=lambda ij: (-((rows[ij[0]] * cols[ij[1]]) % total), ij),
    )
    for i, j in cells:
        if row_left[i] > 0 and col_left[j] > 0:
            table[i][j] += 1
            row_left[i] -= 1
            col_left[j] -= 1
    for i in range(len(rows)):  # rare leftovers: any cell whose row and column still need one
        for j in range(len(cols)):
            extra = min(row_left[i], col_left[j])
            table[i][j] += extra
            row_left[i] -= extra
            col_left[j] -= extra
    return table


def sample_grades(n: int, seed: int) -> list[tuple[int, int]]:
    """(dr, dme) pairs with IDRiD's joint class proportions, deterministic from seed.

    Counts are exact rather than sampled, so small synthetic sets still contain every class
    (all DR and DME grades from n = 20) and n = 413 reproduces IDRiD's training counts exactly.
    First the DR marginal is allocated by largest remainder, then the DME split of the DR >= 2
    images (IDRiD ratio 23/41/195), then a controlled rounding of the DR-2..4 x DME table;
    DR 0-1 always get DME 0. The list is shuffled with ``seed``.

    Args:
        n: Number of pairs.
        seed: Seed of the shuffle.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    dr_counts = _largest_remainder(n, IDRID_TRAIN_COUNTS_DR)
    referable = dr_counts[2:]
    dme_counts = _largest_remainder(sum(referable), _DME_COUNTS_REFERABLE)
    table = _round_table(referable, dme_counts)
    pairs = [(0, 0)] * dr_counts[0] + [(1, 0)] * dr_counts[1]
    for offset, row in enumerate(table):
        for dme, count in enumerate(row):
            pairs += [(2 + offset, dme)] * count
    order = np.random.default_rng(seed).permutation(len(pairs))
    return [pairs[i] for i in order]


def _check_grades(dr_grade: int, dme_grade: int) -> None:
    """Reject grades outside the scales and DME without referable DR (never seen in IDRiD)."""
    if dr_grade not in range(5):
        raise ValueError(f"dr_grade must be an integer in 0-4, got {dr_grade!r}")
    if dme_grade not in range(3):
        raise ValueError(f"dme_grade must be an integer in 0-2, got {dme_grade!r}")
    if dme_grade > 0 and dr_grade < 2:
        raise ValueError(
            f"DME grade {dme_grade} needs DR grade >= 2 (hard exudates make the retinopathy at "
            f"least moderate), got DR {dr_grade}"
        )
