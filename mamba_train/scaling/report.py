"""`scale fit` end to end: results.jsonl → both fits → plots → report.md and fit.json."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mamba_train.scaling.fit import (Approach2, Approach3, Observations, fit_approach2, fit_law,
                                     flops_per_token_model)
from mamba_train.scaling.plan import TINY_BASE, TINY_RECIPE, Plan, ScalingError, load_plan
from mamba_train.scaling.run import read_results

# Hoffmann et al. 2022: Table 2 (exponents with their 10th–90th percentile intervals where
# published) and eq. 10 / App. D.2 (approach 3's fitted law).
CHINCHILLA_APPROACH2 = {"a": 0.49, "b": 0.51}
CHINCHILLA_APPROACH3 = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28, "a": 0.46, "b": 0.54}


def collect(out: str | Path) -> tuple[Plan, list[dict]]:
    """The plan and one result per point, in plan order; every point must have one."""
    plan = load_plan(out)
    results = read_results(out)
    missing = [p.name for p in plan.points if p.name not in results]
    if missing:
        raise ScalingError(f"{Path(out) / 'results.jsonl'}: no result for {len(missing)} of {len(plan.points)} "
                           f"point(s): {', '.join(missing[:6])}{' …' if len(missing) > 6 else ''}; "
                           f"run `mamba-train scale run {out}` first")
    return plan, [results[p.name] for p in plan.points]


def fit_sweep(out: str | Path, report_dir: str | Path | None = None, bootstrap: int = 200,
              command: str | None = None, log=print) -> dict:
    plan, rows = collect(out)
    _require_fit_packages()
    obs = Observations.from_rows(rows)
    fit2 = fit_approach2(obs)
    fit3 = fit_law(obs.params, obs.tokens, obs.loss, bootstrap=bootstrap)
    flops_per_token = flops_per_token_model(obs.params, np.array([float(r["flops_per_token"]) for r in rows]))
    n_range = (obs.params.min() / 3, obs.params.max() * 3)  # the frontier is not extrapolated far from the runs

    from mamba_train.scaling.plots import plot_contours, plot_isoflops, plot_optimal

    report_dir = Path(report_dir or out)
    report_dir.mkdir(parents=True, exist_ok=True)
    figures = [plot_isoflops(obs, fit2, report_dir / "isoflop.png"),
               plot_optimal(obs, fit2, fit3, flops_per_token, n_range, report_dir / "optimal.png"),
               plot_contours(obs, fit2, fit3, flops_per_token, report_dir / "contours.png")]
    summary = _summary(fit2, fit3)
    (report_dir / "fit.json").write_text(json.dumps(summary, indent=1))
    (report_dir / "report.md").write_text(render(plan, rows, fit2, fit3, figures, out, command))
    for problem in fit2.problems():
        log(f"warning: {problem}; left out of the approach 2 power laws")
    for line in _headline(fit2, fit3):
        log(line)
    log(f"wrote {report_dir / 'report.md'}, {', '.join(str(f) for f in figures)}")
    return summary


def _require_fit_packages() -> None:
    import importlib.util

    missing = [name for name in ("scipy", "matplotlib") if importlib.util.find_spec(name) is None]
    if missing:
        raise ScalingError(f"`scale fit` needs {' and '.join(missing)}: pip install {' '.join(missing)}")


def _summary(fit2: Approach2, fit3: Approach3) -> dict:
    laws = {}
    for key, law in (("a", fit2.n_opt), ("b", fit2.d_opt)):
        laws[key] = None if law is None else law.exponent
        laws[f"{key}_stderr"] = None if law is None else law.stderr
    finite = lambda x: x if np.isfinite(x) else None  # noqa: E731 (JSON has no NaN)
    return {"approach2": {**laws, "minima": [{"budget": m.budget, "n_opt": finite(m.n_opt), "d_opt": finite(m.d_opt),
                                              "loss": finite(m.loss_opt), "inside_grid": m.inside,
                                              "problem": m.problem} for m in fit2.minima]},
            "approach3": {**fit3.law.values(), "intervals_95": fit3.intervals, "bootstrap": fit3.bootstrap,
                          "objective": fit3.objective}}


def _headline(fit2: Approach2, fit3: Approach3) -> list[str]:
    law = fit3.law
    approach2 = (f"approach 2: N_opt ∝ C^{fit2.n_opt.exponent:.3f}, D_opt ∝ C^{fit2.d_opt.exponent:.3f}"
                 if fit2.n_opt else f"approach 2: not determined ({len(fit2.measured)} of {len(fit2.minima)} "
                                    f"budgets have their minimum inside the grid; at least 2 needed)")
    return [approach2,
            f"approach 3: L = {law.E:.3f} + {law.A:.4g}/N^{law.alpha:.3f} + {law.B:.4g}/D^{law.beta:.3f} "
            f"(a = {law.a:.3f}, b = {law.b:.3f})"]


def _approach2_rows(fit2: Approach2) -> list[str]:
    rows = []
    for symbol, law, what in (("a", fit2.n_opt, "N_opt"), ("b", fit2.d_opt, "D_opt")):
        published = CHINCHILLA_APPROACH2[symbol]
        if law is None:
            rows.append(f"| approach 2: {symbol} in {what} ∝ C^{symbol} | not determined: fewer than 2 budgets have "
                        f"their minimum inside the grid | – | {published} |")
        else:
            rows.append(f"| approach 2: {symbol} in {what} ∝ C^{symbol} | {law.exponent:.3f} | "
                        f"± {law.half_width_95():.3f} (t-interval of the regression, {law.dof} dof) | {published} |")
    return rows


def _interval(fit3: Approach3, name: str, digits: int) -> str:
    if name not in fit3.intervals:
        return "–"
    lo, hi = fit3.intervals[name]
    return f"[{lo:.{digits}g}, {hi:.{digits}g}]"


def render(plan: Plan, rows: list[dict], fit2: Approach2, fit3: Approach3, figures: list[Path], out, command) -> str:
    law = fit3.law
    budgets = ", ".join(f"{b:.3g}" for b in plan.budgets)
    sizes = len(rows) / len(plan.budgets)
    lines = [
        "# Scaling sweep: compute-optimal Mamba-2 (Chinchilla approaches 2 and 3)", "",
        f"IsoFLOP sweep `{out}`: {len(plan.budgets)} budgets ({budgets} FLOPs) × {sizes:.3g} model sizes on average, "
        f"{len(rows)} runs, {plan.tokens_per_step:,} tokens per step, vocabulary {plan.vocab_size:,} (padded), "
        f"base config `{plan.base}`{' (tiny CPU mode)' if plan.tiny else ''}. N counts every parameter (the tied "
        f"embedding once); FLOPs are `mamba_train.model.flops.training_flops_per_token` × tokens "
        f"(6·N plus the SSD term).", ""]
    steps = [plan.command, f"mamba-train scale run {out}", command]
    if all(steps):
        prep = [f"mamba-train prep {TINY_RECIPE}   # the data of {TINY_BASE}"] if plan.base == TINY_BASE else []
        lines += ["Reproduce (from the repository root):", "", "```", *prep, *steps, "```", ""]
    lines += ["## Fitted values beside Chinchilla's", "",
              "| quantity | this sweep | 95% interval | Chinchilla (Hoffmann et al. 2022) |",
              "|---|---|---|---|",
              *_approach2_rows(fit2)]
    for name, digits in (("E", 3), ("A", 4), ("B", 4), ("alpha", 3), ("beta", 3), ("a", 3), ("b", 3)):
        label = {"alpha": "α", "beta": "β", "a": "a = β/(α+β)", "b": "b = α/(α+β)"}.get(name, name)
        value = law.values()[name]
        lines.append(f"| approach 3: {label} | {value:.{digits}g} | {_interval(fit3, name, digits)} "
                     f"(bootstrap, {fit3.bootstrap}×) | {CHINCHILLA_APPROACH3[name]} |")
    lines += ["", f"Approach 3: L(N, D) = {law.E:.3f} + {law.A:.4g} / N^{law.alpha:.3f} + {law.B:.4g} / "
                  f"D^{law.beta:.3f} (Huber δ = 1e-3 on log L, L-BFGS from the best starts of Chinchilla's grid).",
              "", "## IsoFLOP minima (approach 2)", "",
              "| budget C (FLOPs) | N_opt | D_opt | tokens per parameter | loss at minimum | minimum inside the grid |",
              "|---|---|---|---|---|---|"]
    for m in fit2.minima:
        if np.isfinite(m.n_opt):
            lines.append(f"| {m.budget:.3g} | {m.n_opt:,.0f} | {m.d_opt:,.0f} | {m.d_opt / m.n_opt:.3g} | "
                         f"{m.loss_opt:.4f} | {'yes' if m.inside else '**no**: extrapolated'} |")
        else:
            lines.append(f"| {m.budget:.3g} | – | – | – | – | **no**: the parabola opens downward |")
    lines += ["", "## Figures", ""]
    captions = {"isoflop.png": "IsoFLOP curves: final validation loss against N and D per budget; ★ marks each "
                               "parabola's minimum.",
                "optimal.png": "N_opt and D_opt against compute: the IsoFLOP minima with the approach 2 power laws, "
                               "and the efficient frontier of the approach 3 law.",
                "contours.png": "IsoLoss contours of the approach 3 law over compute and size, with the efficient "
                                "frontier and the runs."}
    for figure in figures:
        lines += [f"![{figure.stem}]({figure.name})", "", captions.get(figure.name, ""), ""]
    lines += ["## Runs", "", "| point | budget | d_model × n_layer | N | tokens | tokens/N | FLOPs spent | valid loss |",
              "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['budget']:.3g} | {r['d_model']} × {r['n_layer']} | {r['params']:,} | "
                     f"{r['tokens']:,} | {r['tokens'] / r['params']:.3g} | {r['flops']:.3g} | {r['loss']:.4f} |")
    lines += ["", "## Caveats", ""] + [f"- {c}" for c in caveats(plan, rows, fit2, fit3)]
    return "\n".join(lines) + "\n"


def caveats(plan: Plan, rows: list[dict], fit2: Approach2, fit3: Approach3) -> list[str]:
    notes = []
    budgets = sorted({r["budget"] for r in rows})
    best_is_smallest = [min((r for r in rows if r["budget"] == c), key=lambda r: r["loss"])["params"]
                        == min(r["params"] for r in rows if r["budget"] == c) for c in budgets]
    if all(best_is_smallest):
        notes.append("At every budget the smallest model trained has the lowest loss: the sweep sits where more "
                     "tokens help more than more parameters, and the compute-optimal size lies below its grid.")
    for problem in fit2.problems():
        notes.append(f"Budget {problem[len('budget '):]}. It is left out of the approach 2 power laws; plan it "
                     f"again with sizes that bracket the minimum.")
    ratio = [r["tokens"] / r["params"] for r in rows]
    if max(ratio) < 20:
        notes.append(f"Every run saw fewer than 20 tokens per parameter ({min(ratio):.2g}–{max(ratio):.2g}): far "
                     f"from Chinchilla's regime, so the exponents describe early training, not compute-optimal "
                     f"pretraining.")
    if plan.tiny:
        embedding = [plan.vocab_size * r["d_model"] / r["params"] for r in rows]
        params = [r["params"] for r in rows]
        head = (", and the output head most of the FLOPs, so N barely measures depth or width"
                if min(embedding) > 0.5 else "")
        notes.append(f"Tiny CPU mode: budgets sized to run in minutes on 2 CPU cores, models of {min(params):,}–"
                     f"{max(params):,} parameters. The {plan.vocab_size}-entry embedding is {min(embedding):.0%}–"
                     f"{max(embedding):.0%} of N{head}. The sweep tests the pipeline end to end and shows the "
                     f"IsoFLOP method at toy scale; its fitted values are not a Mamba-2 scaling law.")
    if fit3.law.E < 1e-3 * min(r["loss"] for r in rows):
        notes.append(f"Approach 3's E went to zero ({fit3.law.E:.2g}): these runs do not determine the irreducible "
                     f"loss, and the other four parameters absorb it; read its values and intervals as a fit to "
                     f"this range, not as a law.")
    if fit2.n_opt is not None and fit2.d_opt is not None:
        wa, wb = fit2.n_opt.half_width_95(), fit2.d_opt.half_width_95()
        if max(wa, wb) > 0.2:  # nan (2 budgets) compares False: the caveat below covers it
            notes.append(f"Approach 2's exponents are loose (a ± {wa:.2f}, b ± {wb:.2f}, {fit2.n_opt.dof} dof): "
                         f"noise in the runs moves each parabola's vertex, and N and D parabolas are fitted "
                         f"separately (a + b = {fit2.n_opt.exponent + fit2.d_opt.exponent:.2f}, not forced to 1). "
                         f"More budgets, a wider range of C or several seeds per point would tighten them.")
    if len(plan.budgets) < 4 and fit2.n_opt is not None:
        notes.append(f"{len(plan.budgets)} budgets: each approach 2 exponent is a line through "
                     f"{len(plan.budgets)} points, so its interval is wide"
                     + (" (none with 2 budgets)." if len(plan.budgets) < 3 else "."))
    return notes
