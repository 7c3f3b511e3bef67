"""Calibration-conditional p-values (Bates, Candès, Lei, Romano and Sesia 2023, "Testing for outliers with conformal
p-values", section 3).

With m calibration scores, the marginal conformal p-value of a statistic is (1 + c) / (m + 1), c = #{calibration >=
statistic}. Its false-positive rate at alpha, *given* the calibration draw, is U_(i), the i-th smallest of m uniforms
(i = the number of c values flagged), so it varies from draw to draw with standard deviation about
sqrt(alpha (1 - alpha) / m). A band b_1 <= ... <= b_m with P(U_(i) <= b_i for every i) >= 1 - delta makes
p~ = b_(c+1) a p-value whose conditional false-positive rate is at most alpha for every alpha at once, with
probability >= 1 - delta over the draw.

The band here is the pointwise Beta quantile b_i = F^-1_Beta(i, m + 1 - i)(1 - lambda), with lambda set by Monte Carlo
(seeded) so that the simultaneous coverage over i <= m * `alpha_max` is 1 - delta (Bates et al. 2023 list the Monte
Carlo calibration beside the Simes and DKWM bands; the pointwise-Beta shape is tightest in the small-alpha tail where
verdicts are made). Above `alpha_max` the band is 1: no alpha above it is served.
"""

from __future__ import annotations

import numpy as np
from scipy import special, stats
from tqdm import tqdm

DEFAULT_SIMULATIONS = 4000


def conditional_band(
    count: int, delta: float, alpha_max: float = 0.5, simulations: int = DEFAULT_SIMULATIONS, seed: int = 0
) -> np.ndarray:
    """(count + 1,) non-decreasing calibration-conditional p-values: entry c for c = #{calibration >= statistic}.

    count: m, the number of fused calibration scores; delta in (0, 1): the allowed probability that the calibration
    draw breaks the bound. Entries for c >= m * alpha_max are 1.
    """
    if count < 1 or not 0.0 < delta < 1.0 or not 0.0 < alpha_max <= 1.0:
        raise ValueError(f"need count >= 1, 0 < delta < 1 and 0 < alpha_max <= 1, got {count}, {delta}, {alpha_max}")
    ranks = np.arange(1, max(1, int(np.floor(count * alpha_max))) + 1)
    rng = np.random.default_rng(seed)
    smallest_tail = np.empty(simulations)
    chunk = max(1, 2_000_000 // max(count, 1))
    with tqdm(total=simulations, desc="conditional band", unit="draw", leave=False) as progress:
        for start in range(0, simulations, chunk):
            stop = min(simulations, start + chunk)
            uniforms = np.sort(rng.random((stop - start, count)), axis=1)[:, ranks - 1]
            # P(Beta(i, m + 1 - i) > U_(i)): small when the i-th order statistic sits unusually high
            tails = special.betaincc(ranks[None, :], count + 1 - ranks[None, :], uniforms)
            smallest_tail[start:stop] = tails.min(axis=1)
            progress.update(stop - start)
    level = float(np.quantile(smallest_tail, delta, method="lower"))
    band = np.ones(count + 1)
    band[: len(ranks)] = stats.beta.isf(level, ranks, count + 1 - ranks)
    return np.minimum(np.maximum.accumulate(band), 1.0)


def conditional_statement(delta: float, count: int, band: np.ndarray) -> str:
    """The guarantee in words, for the manifest and the fit summary."""
    at = {alpha: float(np.max(np.flatnonzero(band < alpha), initial=-1) + 1) / (count + 1) for alpha in (0.05, 0.01)}
    return (f"calibration-conditional (Bates et al. 2023): with probability >= {1 - delta:g} over the draw of the {count} "
            f"fused calibration scores, the false-positive rate is at most alpha for every alpha at once; the price: at "
            f"alpha 0.05 the verdict flags as if at a marginal alpha of {at[0.05]:.4f} (0.01: {at[0.01]:.4f})")
