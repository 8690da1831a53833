"""Chinchilla approaches 2 and 3 on losses drawn from a known law plus noise: the fits
recover its exponents; bad results are refused with the point named."""

import re

import numpy as np
import pytest

from mamba_train.scaling import Law, Observations, ScalingError, fit_approach2, fit_law

# Chinchilla's own fit (Hoffmann et al. 2022, eq. 10) as the ground truth
TRUE = Law(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)
BUDGETS = [1e18, 3e18, 1e19, 3e19, 1e20, 3e20, 1e21]
NOISE = 1e-3  # multiplicative, on each loss


def true_optimum(budget: float) -> float:
    n = np.geomspace(1e6, 1e13, 200_001)
    return float(n[np.argmin(TRUE(n, budget / (6 * n)))])


def synthetic_rows(seed: int = 0, sizes: int = 9) -> list[dict]:
    """An IsoFLOP grid with C = 6·N·D, sizes log-spaced ×/÷ 4 around each true optimum."""
    rng = np.random.default_rng(seed)
    rows = []
    for budget in BUDGETS:
        for n in true_optimum(budget) * np.geomspace(1 / 4, 4, sizes):
            d = budget / (6 * n)
            loss = float(TRUE(n, d) * np.exp(rng.normal(0, NOISE)))
            rows.append({"name": f"C{budget:.0e}-N{n:.3g}", "budget": budget, "params": n, "tokens": d,
                         "flops": budget, "loss": loss})
    return rows


@pytest.fixture(scope="module")
def observations() -> Observations:
    return Observations.from_rows(synthetic_rows())


def test_approach2_recovers_the_allocation_exponents_within_2_percent(observations):
    fit = fit_approach2(observations)
    # the law's optimum: N_opt ∝ C^(β/(α+β)), D_opt ∝ C^(α/(α+β))
    assert fit.n_opt.exponent == pytest.approx(TRUE.a, rel=0.02)
    assert fit.d_opt.exponent == pytest.approx(TRUE.b, rel=0.02)
    assert all(m.inside for m in fit.minima)


def test_approach3_recovers_alpha_and_beta_within_2_percent(observations):
    fit = fit_law(observations.params, observations.tokens, observations.loss, bootstrap=0)
    assert fit.law.alpha == pytest.approx(TRUE.alpha, rel=0.02)
    assert fit.law.beta == pytest.approx(TRUE.beta, rel=0.02)
    assert fit.law.E == pytest.approx(TRUE.E, rel=0.02)


def test_bootstrap_intervals_bracket_the_fit():
    rows = synthetic_rows(seed=1, sizes=5)
    obs = Observations.from_rows(rows)
    fit = fit_law(obs.params, obs.tokens, obs.loss, bootstrap=8, starts=2)
    for name in ("alpha", "beta", "E"):
        lo, hi = fit.intervals[name]
        assert lo <= hi and lo < TRUE.values()[name] * 1.1 and hi > TRUE.values()[name] * 0.9


def test_a_non_finite_loss_is_refused_naming_the_point():
    rows = synthetic_rows()
    rows[4]["loss"] = float("nan")
    rows[7]["loss"] = None
    names = re.escape(f"{rows[4]['name']}, {rows[7]['name']}")
    with pytest.raises(ScalingError, match=f"non-finite final loss at point\\(s\\) {names}"):
        Observations.from_rows(rows)


def test_a_budget_with_fewer_than_3_sizes_is_refused_naming_it():
    rows = [r for r in synthetic_rows() if r["budget"] != 1e19 or r["params"] < true_optimum(1e19) / 2]
    with pytest.raises(ScalingError, match="budget 1e\\+19 FLOPs: 2 distinct model size"):
        fit_approach2(Observations.from_rows(rows))


def test_budgets_whose_minimum_is_not_bracketed_are_named_and_left_out():
    rows = synthetic_rows()
    smallest = true_optimum(1e18) / 4
    for r in rows:  # 1e18: losses fall all the way to the largest size; 3e18: they turn downwards
        if r["budget"] == 1e18:
            r["loss"] = 3.0 - 0.01 * np.log(r["params"] / smallest) + 0.0005 * np.log(r["params"] / smallest) ** 2
        if r["budget"] == 3e18:
            r["loss"] = 3.0 - 0.01 * np.log(r["params"] / smallest) ** 2
    fit = fit_approach2(Observations.from_rows(rows))
    problems = fit.problems()
    assert len(problems) == 2 and len(fit.measured) == len(BUDGETS) - 2
    assert problems[0].startswith("budget 1e+18 FLOPs: the parabola's minimum") and "above the largest" in problems[0]
    assert problems[1].startswith("budget 3e+18 FLOPs: the loss has no minimum over log N")
    assert fit.n_opt.exponent == pytest.approx(TRUE.a, rel=0.02)  # from the 5 measured budgets


def test_approach2_is_undetermined_with_fewer_than_2_bracketed_minima():
    rows = [r | {"loss": 3.0 + 0.01 * np.log(r["params"])} for r in synthetic_rows()]
    fit = fit_approach2(Observations.from_rows(rows))
    assert fit.n_opt is None and fit.d_opt is None and len(fit.problems()) == len(BUDGETS)
