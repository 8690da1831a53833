"""Chinchilla-style scaling studies: plan an IsoFLOP grid, run it, fit and report (DESIGN §9)."""

from mamba_train.scaling.fit import Law, Observations, fit_approach2, fit_law
from mamba_train.scaling.plan import Plan, Point, ScalingError, load_plan, make_plan, write_plan
from mamba_train.scaling.run import read_results, run_plan

__all__ = ["Law", "Observations", "Plan", "Point", "ScalingError", "fit_approach2", "fit_law", "load_plan",
           "make_plan", "read_results", "run_plan", "write_plan"]
