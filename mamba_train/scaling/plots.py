"""The three figures of a scaling study (Chinchilla Figs. 2–4): IsoFLOP curves with their
minima, N_opt and D_opt against compute, and loss contours with the efficient frontier."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mamba_train.scaling.fit import Approach2, Approach3, Observations, efficient_frontier


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on cluster nodes
    import matplotlib.pyplot as plt

    return plt


def _log_axes(*axes, y: bool = False, grid: bool = True) -> None:
    for ax in axes:
        ax.set_xscale("log")
        if y:
            ax.set_yscale("log")
        if grid:
            ax.grid(True, which="both", alpha=0.3)


def _size_ticks(ax, params) -> None:
    """Ticks at the sizes trained, labelled 35k, 70k, ... (log minor labels collide here)."""
    from matplotlib.ticker import NullFormatter, NullLocator

    sizes = []
    for n in np.unique(params):  # thin out sizes closer than ×1.5, whose labels would overlap
        if not sizes or n / sizes[-1] >= 1.5:
            sizes.append(n)
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xticks(sizes, [_si(n) for n in sizes])


def _compute_ticks(ax, budgets) -> None:
    """Ticks at the budgets, labelled 4e+10, ... (log minor labels collide over one decade)."""
    from matplotlib.ticker import NullFormatter, NullLocator

    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xticks(list(budgets), [f"{c:.2g}" for c in budgets])


def _colors(n: int):
    plt = _pyplot()
    return plt.get_cmap("viridis")(np.linspace(0.0, 0.85, n))


def _si(value: float) -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if value >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.3g}"


def plot_isoflops(obs: Observations, fit: Approach2, path: Path) -> Path:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.2), sharey=True)
    for minimum, color in zip(fit.minima, _colors(len(fit.minima))):
        at = obs.budget == minimum.budget
        for ax, values, coeffs, best in ((axes[0], obs.params[at], minimum.coeffs_n, minimum.n_opt),
                                         (axes[1], obs.tokens[at], minimum.coeffs_d, minimum.d_opt)):
            ax.scatter(values, obs.loss[at], color=color, s=28, zorder=3)
            x = np.linspace(np.log10(values.min()) - 0.05, np.log10(values.max()) + 0.05, 200)
            ax.plot(10**x, np.polyval(coeffs, x), color=color, lw=1.5, label=f"C = {minimum.budget:.2g} FLOPs")
            if minimum.inside:
                ax.plot([best], [np.polyval(coeffs, np.log10(best))], marker="*", ms=16, color=color,
                        markeredgecolor="black", zorder=4)
            else:  # no measured minimum: ring the lowest run instead of drawing an extrapolated star
                lowest = int(np.argmin(obs.loss[at]))
                ax.plot([values[lowest]], [obs.loss[at][lowest]], marker="o", ms=14, mfc="none", mec=color,
                        mew=2, zorder=4)
        if minimum.inside:
            axes[0].annotate(f"N_opt {_si(minimum.n_opt)}", (minimum.n_opt, minimum.loss_opt),
                             textcoords="offset points", xytext=(0, -16), ha="center", fontsize=8)
    axes[0].set_xlabel("parameters N")
    axes[1].set_xlabel("training tokens D")
    axes[0].set_ylabel("final validation loss (nats/token)")
    axes[0].set_title("Loss vs model size at fixed compute")
    axes[1].set_title("Loss vs training tokens at fixed compute")
    _log_axes(*axes)
    _size_ticks(axes[0], obs.params)
    handles, labels = axes[1].get_legend_handles_labels()
    if any(m.inside for m in fit.minima):
        handles.append(plt.Line2D([], [], ls="none", marker="*", ms=12, color="grey", mec="black"))
        labels.append("parabola minimum (inside the grid)")
    if not all(m.inside for m in fit.minima):
        handles.append(plt.Line2D([], [], ls="none", marker="o", ms=11, mfc="none", mec="grey", mew=2))
        labels.append("lowest run: minimum not bracketed")
    # below the panels: inside either one it covers curves or minima
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), fontsize=8, frameon=False)
    fig.suptitle("IsoFLOP curves (Chinchilla approach 2): a parabola in log N / log D per budget")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_optimal(obs: Observations, fit2: Approach2, fit3: Approach3 | None, flops_per_token, n_range,
                 path: Path) -> Path:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    compute = np.array([m.budget for m in fit2.minima])
    span = np.geomspace(compute.min() / 3, compute.max() * 3, 50)
    frontier = efficient_frontier(fit3.law, span, flops_per_token, n_range) if fit3 else None
    measured = fit2.measured
    for ax, law, what, index in ((axes[0], fit2.n_opt, "N_opt (parameters)", 0),
                                 (axes[1], fit2.d_opt, "D_opt (tokens)", 1)):
        symbol = "a" if index == 0 else "b"
        trained = obs.params if index == 0 else obs.tokens
        ax.axhspan(trained.min(), trained.max(), color="grey", alpha=0.15, label="range trained")
        if measured:
            ax.scatter([m.budget for m in measured], [(m.n_opt, m.d_opt)[index] for m in measured], color="C0",
                       s=40, zorder=3, label="IsoFLOP minima inside their grid (approach 2)")
        unbracketed = [m.budget for m in fit2.minima if not m.inside]
        if unbracketed:
            lowest = [trained[obs.budget == c][np.argmin(obs.loss[obs.budget == c])] for c in unbracketed]
            ax.scatter(unbracketed, lowest, s=90, facecolors="none", edgecolors="C0", linewidths=2, zorder=3,
                       label="lowest-loss run (minimum not bracketed)")
        if law is not None:
            ax.plot(span, law(span), color="C0", label=f"approach 2 fit: ∝ C^{law.exponent:.3f} ({symbol})")
        else:
            ax.text(0.03, 0.45, "approach 2: fewer than 2 budgets with a bracketed minimum", fontsize=8,
                    transform=ax.transAxes, color="C0")
        if frontier is not None and np.isfinite(frontier[index]).sum() >= 2:
            ok = np.isfinite(frontier[index])
            slope = np.polyfit(np.log(span[ok]), np.log(frontier[index][ok]), 1)[0]
            ax.plot(span[ok], frontier[index][ok], color="C3", ls="--", label=f"approach 3 frontier: ∝ C^{slope:.3f}")
        elif frontier is not None:
            ax.text(0.03, 0.55, f"approach 3: the fitted law has no optimum\nfor N in [{_si(n_range[0])}, "
                                f"{_si(n_range[1])}]", fontsize=8, transform=ax.transAxes, color="C3")
        _log_axes(ax, y=True)
        ax.set_xlim(span.min(), span.max())
        _compute_ticks(ax, compute)
        ax.margins(y=0.08)
        ax.set_xlabel("training compute C (FLOPs)")
        ax.set_ylabel(what)
        ax.legend(fontsize=8)
    axes[0].set_title("Compute-optimal model size")
    axes[1].set_title("Compute-optimal training tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_contours(obs: Observations, fit2: Approach2, fit3: Approach3, flops_per_token, path: Path) -> Path:
    """Chinchilla Fig. 4 (left): IsoLoss contours of the fitted law over (C, N), the
    efficient frontier through their tangent points, and the runs."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 5.5))
    compute = np.geomspace(obs.flops.min() / 4, obs.flops.max() * 4, 200)
    params = np.geomspace(obs.params.min() / 4, obs.params.max() * 4, 200)
    grid_c, grid_n = np.meshgrid(compute, params)
    loss = fit3.law(grid_n, grid_c / flops_per_token(grid_n))
    levels = np.quantile(loss, np.linspace(0.02, 0.9, 14))
    contours = ax.contourf(grid_c, grid_n, loss, levels=np.unique(levels), cmap="magma_r", alpha=0.85,
                           extend="both")
    ax.contour(grid_c, grid_n, loss, levels=np.unique(levels), colors="black", linewidths=0.4, alpha=0.5)
    fig.colorbar(contours, ax=ax, label="predicted loss L(N, D = C / F(N))")
    n_opt, _ = efficient_frontier(fit3.law, compute, flops_per_token, (params.min(), params.max()))
    if np.isfinite(n_opt).any():
        ax.plot(compute, n_opt, color="C0", lw=2.5, label="efficient frontier (approach 3)")
    else:
        ax.text(0.03, 0.03, "no efficient frontier in this range: the fitted law always prefers the smallest N",
                fontsize=8, transform=ax.transAxes, color="C0", backgroundcolor="white")
    ax.scatter(obs.flops, obs.params, c="white", edgecolors="black", s=30, zorder=3, label="runs (FLOPs spent)")
    if fit2.measured:
        ax.scatter([m.budget for m in fit2.measured], [m.n_opt for m in fit2.measured], marker="*", s=220, c="C2",
                   edgecolors="black", zorder=4, label="IsoFLOP minima (approach 2)")
    _log_axes(ax, y=True, grid=False)
    ax.set_xlabel("training compute C (FLOPs)")
    ax.set_ylabel("parameters N")
    ax.set_title("IsoLoss contours of L = E + A/N^α + B/D^β")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
