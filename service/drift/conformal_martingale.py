"""Online tests of exchangeability on a stream of non-conformity scores (higher = more OOD).

- `OnlineConformalPValues`: smoothed conformal p-values of each new score against the calibration scores
  and every earlier stream score (Vovk, Gammerman and Shafer 2005, ch. 2 and 7). With random tie-breaking
  they are independent and uniform on [0, 1] while calibration and stream are exchangeable. Against the
  calibration set alone (`grow=False`) they are i.i.d. *given* the calibration set but not uniform, which
  a learning martingale detects on a long clean stream: kept for measurement only.
- `MixturePowerMartingale`: the power martingale prod eps * p^(eps - 1) mixed over a grid of eps (Vovk,
  "Testing randomness online", 2021). Under the null it is a non-negative martingale with initial value 1,
  so by Ville's inequality P(sup_n M_n >= 1 / delta) <= delta for a stream of any length.
- `ShiryaevRoberts`: S_n = (S_{n-1} + 1) * eps p_n^(eps - 1) per eps of the same grid, averaged over eps
  (Vovk, Petej, Nouretdinov, Ahlberg, Carlsson and Gammerman 2021, "Retrain or not retrain: conformal test
  martingales for change-point detection"). S_n - n is a martingale under the null, so the mean time to a
  false alarm at threshold c is at least c; after a change it grows at the rate of the betting gain,
  without the long recovery a martingale that has sunk on clean data needs.

Time per input is O(log n) (a `sortedcontainers.SortedList` of the reference scores) plus O(K) for K
betting components; memory is O(m + n) for m calibration and n stream scores.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from sortedcontainers import SortedList

from oodserve.scoring.conformal import as_non_conformity

DEFAULT_EPSILONS: tuple[float, ...] = tuple(float(e) for e in np.linspace(0.05, 0.95, 10))
"""The mixing grid of the power martingale: small eps bets hard on tiny p-values, large eps gently."""


class OnlineConformalPValues:
    """Smoothed conformal p-values of a stream against `calibration` (M,) plus the stream so far.

    p_n = (#{reference > s_n} + tau_n * (#{reference == s_n} + 1)) / (|reference| + 1), tau_n ~ U(0, 1),
    then s_n joins the reference when `grow` (the exchangeable, exactly uniform version)."""

    def __init__(self, calibration: np.ndarray, rng: np.random.Generator, grow: bool = True) -> None:
        self.reference = SortedList(as_non_conformity(calibration).tolist())
        self.calibration_size = len(self.reference)
        self.rng = rng
        self.grow = grow

    @property
    def stream_size(self) -> int:
        return len(self.reference) - self.calibration_size

    def p_values(self, scores: np.ndarray) -> np.ndarray:
        """The p-value of each score (N,) in order, each against the reference before it (then added)."""
        values = as_non_conformity(scores).tolist()
        taus = self.rng.random(len(values)).tolist()
        reference = self.reference
        out = np.empty(len(values))
        for index, (score, tau) in enumerate(zip(values, taus, strict=True)):
            size = len(reference)
            low = reference.bisect_left(score)
            high = reference.bisect_right(score)
            out[index] = ((size - high) + tau * (high - low + 1)) / (size + 1)
            if self.grow:
                reference.add(score)
        return out


P_VALUE_FLOOR = 1e-300
"""p-values are clamped to [P_VALUE_FLOOR, 1] before their log is taken."""


def _log_p(p: float) -> float:
    return math.log(min(max(p, P_VALUE_FLOOR), 1.0))


def log_betting_components(p_values: np.ndarray, epsilons: Sequence[float] = DEFAULT_EPSILONS) -> np.ndarray:
    """log(eps_k * p_i^(eps_k - 1)) for p-values (N,) and K epsilons: (N, K). Each eps * p^(eps - 1)
    integrates to 1 over [0, 1], so it is a valid betting function."""
    eps = np.asarray(epsilons, dtype=np.float64)
    logs = np.log(np.clip(np.asarray(p_values, dtype=np.float64), P_VALUE_FLOOR, 1.0))
    return np.log(eps)[None, :] + (eps - 1.0)[None, :] * logs[:, None]


def _logsumexp_rows(values: np.ndarray) -> np.ndarray:
    top = values.max(axis=1)
    return top + np.log(np.exp(values - top[:, None]).sum(axis=1))


def _logsumexp(values: list[float]) -> float:
    top = max(values)
    return top + math.log(sum(math.exp(value - top) for value in values))


SMALL_BATCH = 8
"""Up to this many p-values are handled with `math` on floats: numpy's per-call cost dominates there."""


class MixturePowerMartingale:
    """M_n = mean_k prod_{i <= n} eps_k p_i^(eps_k - 1), kept as log components (K,) for stability."""

    def __init__(self, epsilons: Sequence[float] = DEFAULT_EPSILONS) -> None:
        self.epsilons = tuple(epsilons)
        self._log_epsilons = [math.log(e) for e in self.epsilons]
        self.log_components = [0.0] * len(self.epsilons)
        self.log_max = 0.0
        """log of the largest value M has reached since the start (the quantity Ville's inequality bounds)."""

    @property
    def log_value(self) -> float:
        return _logsumexp(self.log_components) - math.log(len(self.epsilons))

    def update(self, p_values: np.ndarray) -> np.ndarray:
        """Multiply in p-values (N,); returns log M after each of them (N,)."""
        if len(p_values) == 0:
            return np.empty(0)
        if len(p_values) <= SMALL_BATCH:
            out = np.empty(len(p_values))
            components, mix = self.log_components, math.log(len(self.epsilons))
            for index, p in enumerate(np.asarray(p_values, dtype=np.float64).tolist()):
                log_p = _log_p(p)
                components = [c + le + (e - 1.0) * log_p for c, le, e in zip(components, self._log_epsilons, self.epsilons, strict=True)]
                out[index] = _logsumexp(components) - mix
            self.log_components = components
        else:
            start = np.asarray(self.log_components)[None, :]
            path = start + np.cumsum(log_betting_components(p_values, self.epsilons), axis=0)
            self.log_components = path[-1].tolist()
            out = _logsumexp_rows(path) - math.log(len(self.epsilons))
        self.log_max = max(self.log_max, float(out.max()))
        return out


class ShiryaevRoberts:
    """The conformal Shiryaev-Roberts statistic mixed over betting functions: S_n = mean_k S_n^(k) with
    S_n^(k) = (S_{n-1}^(k) + 1) eps_k p_n^(eps_k - 1), S_0^(k) = 0, kept as logs.

    Each S_n^(k) - n is a martingale under the null, so their mean is too, and the mean time to a false
    alarm at threshold c stays at least c. Mixing the statistics (not the betting functions within one
    step) lets the best eps for the shift win: a shift that turns a few percent of p-values tiny is lost
    on a per-step mixture, whose gain on the uniform majority is negative."""

    def __init__(self, epsilons: Sequence[float] = DEFAULT_EPSILONS) -> None:
        self.epsilons = tuple(epsilons)
        self._log_epsilons = [math.log(e) for e in self.epsilons]
        self.log_components = [-math.inf] * len(self.epsilons)
        self.log_max = -math.inf

    @property
    def log_value(self) -> float:
        return _logsumexp(self.log_components) - math.log(len(self.epsilons)) if max(self.log_components) > -math.inf else -math.inf

    def update(self, p_values: np.ndarray) -> np.ndarray:
        """Feed p-values (N,); returns log S after each of them (N,)."""
        out = np.empty(len(p_values))
        components, mix = self.log_components, math.log(len(self.epsilons))
        pairs = list(zip(self._log_epsilons, self.epsilons, strict=True))
        for index, p in enumerate(np.asarray(p_values, dtype=np.float64).tolist()):
            log_p = _log_p(p)
            # log(S + 1) = logaddexp(log S, 0), then times eps p^(eps - 1)
            components = [
                (c + math.log1p(math.exp(-c)) if c > 0 else math.log1p(math.exp(c))) + le + (e - 1.0) * log_p
                for c, (le, e) in zip(components, pairs, strict=True)
            ]
            out[index] = _logsumexp(components) - mix
        self.log_components = components
        if len(out):
            self.log_max = max(self.log_max, float(out.max()))
        return out
