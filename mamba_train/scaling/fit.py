"""`scale fit`: Chinchilla's approaches 2 and 3 (Hoffmann et al. 2022, §3.2–3.3, App. D).

Approach 2: per FLOP budget, a parabola of the final loss in log N (and, separately,
in log D) locates the IsoFLOP minimum; N_opt(C) ∝ C^a and D_opt(C) ∝ C^b are then
straight lines in log-log space.

Approach 3: L(N, D) = E + A/N^α + B/D^β, fitted as Chinchilla does: with
θ = (a, b, e, α, β), A = exp a, B = exp b, E = exp e, minimise
Σ Huber_δ(LSE(a − α log N, b − β log D, e) − log L) with δ = 1e-3, by L-BFGS from the best
starts of their grid; bootstrap over the points gives the confidence intervals.
"""

from __future__ import annotations

import itertools
import math
import os
from dataclasses import dataclass, field

import numpy as np

from mamba_train.scaling.plan import ScalingError

HUBER_DELTA = 1e-3
# Chinchilla's initialisation grid (App. D.2)
GRID = {"alpha": np.arange(0, 2.01, 0.5), "beta": np.arange(0, 2.01, 0.5), "e": np.arange(-1, 1.01, 0.5),
        "a": np.arange(0, 25.01, 5), "b": np.arange(0, 25.01, 5)}


@dataclass
class Observations:
    budget: np.ndarray  # (points,) the IsoFLOP budget each point belongs to
    params: np.ndarray
    tokens: np.ndarray
    loss: np.ndarray
    flops: np.ndarray  # FLOPs actually spent
    names: list[str] = field(default_factory=list)

    @classmethod
    def from_rows(cls, rows: list[dict]) -> "Observations":
        bad = [r["name"] for r in rows if r.get("loss") is None or not math.isfinite(float(r["loss"]))]
        if bad:
            raise ScalingError(f"non-finite final loss at point(s) {', '.join(bad)}: the run diverged or failed. "
                               f"Rerun them (delete their lines from results.jsonl and their runs/ directories) "
                               f"or plan again with a lower learning rate")
        column = lambda key: np.array([float(r[key]) for r in rows])  # noqa: E731
        return cls(column("budget"), column("params"), column("tokens"), column("loss"), column("flops"),
                   [r["name"] for r in rows])

    def budgets(self) -> np.ndarray:
        return np.unique(self.budget)


# ---------------------------------------------------------------------------- approach 2
@dataclass
class IsoFlopMinimum:
    budget: float
    n_opt: float  # nan when the parabola has no minimum
    d_opt: float
    loss_opt: float
    coeffs_n: np.ndarray  # loss = polyval(coeffs_n, log10 N)
    coeffs_d: np.ndarray  # loss = polyval(coeffs_d, log10 D)
    n_range: tuple[float, float]  # the sizes trained at this budget
    problem: str = ""  # why this budget gives no measured optimum; "" when it does

    @property
    def inside(self) -> bool:
        return not self.problem


@dataclass
class PowerLaw:
    exponent: float
    coefficient: float  # value = coefficient · C^exponent
    stderr: float  # standard error of the exponent (nan with 2 budgets)
    dof: int  # degrees of freedom of that error: budgets − 2

    def half_width_95(self) -> float:
        """Half-width of the exponent's 95% t-interval (nan with 2 budgets)."""
        from scipy.stats import t

        return float(t.ppf(0.975, self.dof) * self.stderr) if self.dof > 0 else math.nan

    def __call__(self, compute):
        return self.coefficient * np.asarray(compute, dtype=float) ** self.exponent


@dataclass
class Approach2:
    minima: list[IsoFlopMinimum]  # one per budget, measured or not (see .problem)
    n_opt: PowerLaw | None  # None when fewer than 2 budgets have their minimum inside the grid
    d_opt: PowerLaw | None

    @property
    def measured(self) -> list[IsoFlopMinimum]:
        return [m for m in self.minima if m.inside]

    def problems(self) -> list[str]:
        return [f"budget {m.budget:.3g} FLOPs: {m.problem}" for m in self.minima if m.problem]


def isoflop_minimum(budget: float, params: np.ndarray, tokens: np.ndarray, loss: np.ndarray) -> IsoFlopMinimum:
    """The parabola's vertex; a budget whose losses do not turn up on both sides is kept
    with a `problem` (Chinchilla reads N_opt only where the IsoFLOP curve brackets it)."""
    if len(params) < 3 or len(np.unique(params)) < 3:
        raise ScalingError(f"budget {budget:.3g} FLOPs: {len(np.unique(params))} distinct model size(s) with "
                           f"results; a parabola needs at least 3")
    coeffs_n = np.polyfit(np.log10(params), loss, 2)
    coeffs_d = np.polyfit(np.log10(tokens), loss, 2)
    n_range = (float(params.min()), float(params.max()))
    if coeffs_n[0] <= 0 or coeffs_d[0] <= 0:
        return IsoFlopMinimum(budget, math.nan, math.nan, math.nan, coeffs_n, coeffs_d, n_range,
                              f"the loss has no minimum over log N (the parabola opens downward: losses "
                              f"{np.round(loss, 4).tolist()} from the smallest model to the largest)")
    x_n = float(np.clip(-coeffs_n[1] / (2 * coeffs_n[0]), -300, 300))  # a nearly flat parabola: far away
    x_d = float(np.clip(-coeffs_d[1] / (2 * coeffs_d[0]), -300, 300))
    problem = ""
    if not np.log10(n_range[0]) <= x_n <= np.log10(n_range[1]):
        side = "below the smallest" if x_n < np.log10(n_range[0]) else "above the largest"
        problem = (f"the parabola's minimum, N = {10**x_n:.3g}, lies {side} model trained "
                   f"({n_range[0]:,.0f}–{n_range[1]:,.0f} params): an extrapolation, not a measurement")
    return IsoFlopMinimum(budget, 10**x_n, 10**x_d, float(np.polyval(coeffs_n, x_n)), coeffs_n, coeffs_d, n_range,
                          problem)


def power_law(budgets: np.ndarray, values: np.ndarray) -> PowerLaw:
    x, y = np.log(budgets), np.log(values)
    slope, intercept = np.polyfit(x, y, 1)
    stderr = math.nan
    if len(x) > 2:
        residuals = y - (slope * x + intercept)
        stderr = float(np.sqrt(residuals @ residuals / (len(x) - 2) / ((x - x.mean()) @ (x - x.mean()))))
    return PowerLaw(float(slope), float(math.exp(intercept)), stderr, len(x) - 2)


def fit_approach2(obs: Observations) -> Approach2:
    """Per-budget minima, and the power laws through those inside their grids (at least 2)."""
    budgets = obs.budgets()
    if len(budgets) < 2:
        raise ScalingError(f"results cover {len(budgets)} FLOP budget(s); N_opt(C) needs at least 2")
    minima = []
    for budget in budgets:
        at = obs.budget == budget
        minima.append(isoflop_minimum(float(budget), obs.params[at], obs.tokens[at], obs.loss[at]))
    measured = [m for m in minima if m.inside]
    if len(measured) < 2:
        return Approach2(minima, None, None)
    compute = np.array([m.budget for m in measured])
    return Approach2(minima, power_law(compute, np.array([m.n_opt for m in measured])),
                     power_law(compute, np.array([m.d_opt for m in measured])))


# ---------------------------------------------------------------------------- approach 3
@dataclass
class Law:
    E: float
    A: float
    B: float
    alpha: float
    beta: float

    def __call__(self, params, tokens):
        return self.E + self.A / np.asarray(params, float) ** self.alpha + self.B / np.asarray(tokens, float) ** self.beta

    @property
    def a(self) -> float:
        """N_opt ∝ C^a under C ∝ N·D (Chinchilla eq. 4)."""
        return self.beta / (self.alpha + self.beta)

    @property
    def b(self) -> float:
        return self.alpha / (self.alpha + self.beta)

    def values(self) -> dict[str, float]:
        return {"E": self.E, "A": self.A, "B": self.B, "alpha": self.alpha, "beta": self.beta, "a": self.a,
                "b": self.b}


@dataclass
class Approach3:
    law: Law
    objective: float
    intervals: dict[str, tuple[float, float]]  # 95% bootstrap intervals, by name in Law.values()
    bootstrap: int


def _objective(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray, delta: float):
    """Σ Huber_δ(r)/δ and its gradient; r = LSE(a − α log N, b − β log D, e) − log L."""
    a, b, e, alpha, beta = theta
    terms = np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])
    top = terms.max(axis=0)
    weights = np.exp(terms - top)
    total = weights.sum(axis=0)
    r = top + np.log(total) - log_l
    weights /= total
    small = np.abs(r) <= delta
    value = np.where(small, 0.5 * r**2, delta * (np.abs(r) - 0.5 * delta)).sum() / delta
    dr = np.where(small, r, delta * np.sign(r)) / delta
    grad = np.array([dr @ weights[0], dr @ weights[1], dr @ weights[2], -(dr * weights[0]) @ log_n,
                     -(dr * weights[1]) @ log_d])
    return value, grad


def _grid_values(log_n, log_d, log_l, delta) -> tuple[np.ndarray, np.ndarray]:
    starts = np.array(list(itertools.product(GRID["a"], GRID["b"], GRID["e"], GRID["alpha"], GRID["beta"])))
    a, b, e, alpha, beta = (starts[:, i:i + 1] for i in range(5))
    predicted = np.logaddexp(np.logaddexp(a - alpha * log_n, b - beta * log_d), e)
    r = predicted - log_l
    values = np.where(np.abs(r) <= delta, 0.5 * r**2, delta * (np.abs(r) - 0.5 * delta)).sum(axis=1) / delta
    return starts, values


def _minimise(starts, log_n, log_d, log_l, delta) -> tuple[np.ndarray, float]:
    # L-BFGS-B calls BLAS on 5×5 matrices; waking OpenBLAS's threads for them made the fit 3×
    # slower on 2 busy cores. scipy's OpenBLAS reads this when it loads, i.e. on first import.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    from scipy.optimize import minimize

    best_theta, best_value = None, math.inf
    bounds = [(None, None), (None, None), (None, None), (0.0, None), (0.0, None)]
    for start in starts:
        result = minimize(_objective, start, args=(log_n, log_d, log_l, delta), jac=True, method="L-BFGS-B",
                          bounds=bounds, options={"maxiter": 5000, "ftol": 1e-13, "gtol": 1e-9})
        if np.all(np.isfinite(result.x)) and result.fun < best_value:
            best_theta, best_value = result.x, float(result.fun)
    return best_theta, best_value


def _law(theta: np.ndarray) -> Law:
    a, b, e, alpha, beta = theta
    return Law(math.exp(e), math.exp(a), math.exp(b), float(alpha), float(beta))


def fit_law(params, tokens, loss, delta: float = HUBER_DELTA, starts: int = 8, bootstrap: int = 200,
            seed: int = 0) -> Approach3:
    """Approach 3 on (N, D, L) triples; `starts`: how many of the grid's best points L-BFGS
    starts from (Chinchilla's grid has 4500; the best few always contain the optimum's basin)."""
    log_n, log_d, log_l = np.log(params), np.log(tokens), np.log(loss)
    if len(log_l) < 5:
        raise ScalingError(f"approach 3 fits 5 parameters; found {len(log_l)} points")
    grid, values = _grid_values(log_n, log_d, log_l, delta)
    best_starts = grid[np.argsort(values)[:starts]]
    theta, value = _minimise(best_starts, log_n, log_d, log_l, delta)
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(bootstrap):
        pick = rng.integers(0, len(log_l), len(log_l))
        resampled = (log_n[pick], log_d[pick], log_l[pick])
        sample_theta, _ = _minimise(theta[None], *resampled, delta)  # resamples start at the full fit
        samples.append(_law(sample_theta).values())
    intervals = {}
    if samples:
        for name in samples[0]:
            column = np.array([s[name] for s in samples])
            intervals[name] = (float(np.percentile(column, 2.5)), float(np.percentile(column, 97.5)))
    return Approach3(_law(theta), value, intervals, bootstrap)


def flops_per_token_model(params: np.ndarray, flops_per_token: np.ndarray):
    """FLOPs per token as a function of N, from the sweep's exact counts: F/N is close to 6
    (plus the SSD and conv terms), so a line in log-log of F/N vs N extends it smoothly."""
    slope, intercept = np.polyfit(np.log(params), np.log(flops_per_token / params), 1)
    return lambda n: np.asarray(n, float) * np.exp(intercept + slope * np.log(np.asarray(n, float)))


def efficient_frontier(law: Law, compute: np.ndarray, flops_per_token, n_range: tuple[float, float]):
    """N_opt(C), D_opt(C) minimising the fitted law along each IsoFLOP line D = C / F(N);
    nan where the minimum is at an end of n_range (the law has no optimum inside it)."""
    n = np.geomspace(*n_range, 4000)
    n_opt, d_opt = [], []
    for c in np.atleast_1d(compute):
        d = c / flops_per_token(n)
        i = int(np.argmin(law(n, d)))
        inside = 0 < i < len(n) - 1
        n_opt.append(n[i] if inside else math.nan)
        d_opt.append(d[i] if inside else math.nan)
    return np.array(n_opt), np.array(d_opt)
