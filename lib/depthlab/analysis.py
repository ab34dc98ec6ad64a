"""Numbers from finished runs: the best learning rate of a sweep, its sensitivity, and the sign
test on paired seeds.

Functions of results (final losses, histories), never of models: they sit beside the claims
and can be tested on numbers written by hand. Introduced in chapter 8.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats


def best_lr(final_loss: dict[float, float]) -> float:
    """The learning rate with the lowest final loss, between the grid's points (chapter 8).

    ``final_loss`` maps learning rates to final losses. Through the grid's best rate and its
    two neighbours goes a parabola in log(lr); its vertex is the estimate. At an edge of the
    grid, or where the three points do not curve upward, the best grid rate itself: the
    optimum is then not bracketed, and no estimate beyond the grid is made. A run that
    diverged (NaN, inf) counts as the worst loss.
    """
    if not final_loss:
        raise ValueError("best_lr needs the final loss of at least one learning rate")
    lrs = sorted(final_loss)
    loss = [final_loss[r] if math.isfinite(final_loss[r]) else math.inf for r in lrs]
    i = min(range(len(lrs)), key=loss.__getitem__)
    if i in (0, len(lrs) - 1) or not math.isfinite(loss[i - 1] + loss[i + 1]):
        return float(lrs[i])
    x = [math.log(r) for r in lrs[i - 1:i + 2]]
    y = loss[i - 1:i + 2]
    # the vertex of the parabola through three points (x0, y0), (x1, y1), (x2, y2)
    num = (x[1] - x[0]) ** 2 * (y[1] - y[2]) - (x[1] - x[2]) ** 2 * (y[1] - y[0])
    den = (x[1] - x[0]) * (y[1] - y[2]) - (x[1] - x[2]) * (y[1] - y[0])
    if den == 0:
        return float(lrs[i])
    return float(math.exp(x[1] - 0.5 * num / den))


def lr_sensitivity(final_loss: dict[float, float], init_loss: float) -> float:
    """Learning-rate sensitivity (Wortsman et al. 2024; chapter 8): how much worse than the
    best learning rate the others end, on average.

    ``final_loss`` maps each learning rate of a sweep to the run's final loss; a run that
    diverged (NaN, inf) or ended above the loss at initialisation counts as ``init_loss``.
    Returns mean over the rates of min(loss, init_loss) − the best loss: 0 when every rate
    does as well as the best, up to init_loss − best when all but one fail.
    """
    if not final_loss:
        raise ValueError("lr_sensitivity needs the final loss of at least one learning rate")
    capped = [min(v, init_loss) if math.isfinite(v) else init_loss for v in final_loss.values()]
    return sum(capped) / len(capped) - min(capped)


def paired_t_test(differences, *, alternative: str = "greater") -> float:
    """One-sided paired t-test on seeds: p for "the per-seed differences are greater (or,
    ``alternative="less"``, smaller) than 0 on average". For a ratio, pass its logs:
    ``paired_t_test(np.log(post / pre), alternative="less")``. Where one seed against the
    rest flips ``sign_test``, this weighs the margins."""
    return float(stats.ttest_1samp(np.asarray(differences, float), 0.0,
                                   alternative=alternative).pvalue)


def sign_test(successes) -> float:
    """One-sided sign test on paired seeds: the chance of at least this many successes among
    them if each seed were a fair coin flip, e.g. ``sign_test(ratio < 1)`` for "lower on as
    many seeds as this". With n seeds the smallest p is 2^-n (1/8 with 3 seeds, 1/64 with 6)."""
    flags = [bool(v) for v in successes]
    n, k = len(flags), sum(flags)
    return sum(math.comb(n, j) for j in range(k, n + 1)) / 2 ** n
