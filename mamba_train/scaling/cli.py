"""`mamba-train scale {plan,run,fit}`: Chinchilla-style IsoFLOP scaling studies (DESIGN §9).

    mamba-train scale plan --budgets 1e17,3e17,1e18 --sizes 7 --out runs/scaling --vocab-size 50277
    mamba-train scale run runs/scaling            # sequentially here; --submit: the SLURM job array
    mamba-train scale fit runs/scaling --report docs/scaling
"""

from __future__ import annotations

import argparse
import shlex
import sys

from mamba_train.scaling.plan import DEFAULT_BASE, TINY_BASE, ScalingError

TINY_VALID_TOKENS = 32768
TINY_BUDGETS = "4e10,8e10,1.6e11,3.2e11"
TINY_SPAN = 8.0  # 5 sizes from ~110-220 down to ~3 tokens per parameter around 20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    steps = parser.add_subparsers(dest="scale_command", required=True, metavar="STEP")

    plan = steps.add_parser("plan", help="IsoFLOP grid: one config per (budget, size) and a SLURM job array")
    plan.add_argument("--budgets", help="comma-separated FLOP budgets, e.g. 1e17,3e17,1e18 "
                                        f"(default with --tiny: {TINY_BUDGETS})")
    plan.add_argument("--sizes", type=int, default=None, help="model sizes per budget (default 7; 5 with --tiny)")
    plan.add_argument("--out", required=True, help="sweep directory: configs/, plan.json, sweep.sbatch, runs/")
    plan.add_argument("--base", help=f"base run config: data, batch, optimizer (default {DEFAULT_BASE}; "
                                      f"{TINY_BASE} with --tiny)")
    plan.add_argument("--tiny", action="store_true", help="CPU mode: tiny shapes, the scaling-tiny data, a small "
                                                          "validation sample; the whole sweep takes minutes")
    plan.add_argument("--tp", type=int, default=1, help="tensor-parallel degree every shape must divide (default 1)")
    plan.add_argument("--vocab-size", type=int, default=0, help="tokenizer vocabulary, when the base config's "
                                                                "tokenizer is not on this machine")
    plan.add_argument("--span", type=float, default=None,
                      help=f"largest / smallest N per budget (default 16; {TINY_SPAN:g} with --tiny)")
    plan.add_argument("--min-steps", type=int, default=10, help="fewest optimizer steps a point may get (default 10)")
    plan.add_argument("--valid-tokens", type=int, default=None,
                      help=f"evaluate on a fixed sample of this many validation tokens (default: all; "
                           f"{TINY_VALID_TOKENS} with --tiny)")

    run = steps.add_parser("run", help="train the plan's unfinished points here, one by one (or --submit them)")
    run.add_argument("dir", help="sweep directory made by `scale plan`")
    run.add_argument("--submit", action="store_true", help="sbatch DIR/sweep.sbatch (a job array from "
                     "launch/slurm.sbatch) for the unfinished points; run again without it to collect")
    run.add_argument("--sbatch", action="append", default=[], metavar="OPTION",
                     help="extra sbatch option with --submit, e.g. --sbatch=--partition=gpu --sbatch=--time=4:00:00")

    fit = steps.add_parser("fit", help="approach 2 and 3 fits, plots and a markdown report")
    fit.add_argument("dir", help="sweep directory with results.jsonl")
    fit.add_argument("--report", help="where report.md and the PNGs go (default: the sweep directory)")
    fit.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples for approach 3 (default 200)")


def run(args: argparse.Namespace) -> int:
    try:
        if args.scale_command == "plan":
            return _plan(args)
        if args.scale_command == "run":
            from mamba_train.scaling.run import run_plan, submit

            submit(args.dir, args.sbatch) if args.submit else run_plan(args.dir)
            return 0
        if args.scale_command == "fit":
            from mamba_train.scaling.report import fit_sweep

            command = _command_line("fit", args.dir, report=args.report,
                                    bootstrap=args.bootstrap if args.bootstrap != 200 else None)
            fit_sweep(args.dir, args.report, bootstrap=args.bootstrap, command=command)
            return 0
    except ScalingError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    raise AssertionError(args.scale_command)


def _plan(args) -> int:
    from mamba_train.scaling.plan import make_plan, parse_budgets, write_plan

    if not args.budgets and not args.tiny:
        raise ScalingError("--budgets: give the FLOP budgets, e.g. --budgets 1e17,3e17,1e18 (or --tiny for a CPU sweep)")
    # 0 and negatives are mistakes, not "the default" (--sizes: make_plan wants at least 3)
    for option, value in (("--tp", args.tp), ("--min-steps", args.min_steps)):
        if value < 1:
            raise ScalingError(f"{option}: expected an integer >= 1, found {value}")
    if args.valid_tokens is not None and args.valid_tokens < 0:
        raise ScalingError(f"--valid-tokens: expected a number of tokens >= 0 (0: all), found {args.valid_tokens}")
    budgets = parse_budgets(args.budgets or TINY_BUDGETS)
    sizes = args.sizes if args.sizes is not None else (5 if args.tiny else 7)
    span = args.span if args.span is not None else (TINY_SPAN if args.tiny else 16.0)
    plan, base = make_plan(budgets, sizes, args.base or (TINY_BASE if args.tiny else DEFAULT_BASE), tiny=args.tiny,
                           tp=args.tp, vocab_size=args.vocab_size, span=span, min_steps=args.min_steps)
    valid_tokens = args.valid_tokens if args.valid_tokens is not None else (TINY_VALID_TOKENS if args.tiny else 0)
    plan.command = _command_line("plan", budgets=args.budgets, sizes=args.sizes, out=args.out, base=args.base,
                                 tiny=args.tiny, tp=args.tp if args.tp != 1 else None, vocab_size=args.vocab_size or None,
                                 span=args.span,
                                 min_steps=args.min_steps if args.min_steps != 10 else None,
                                 valid_tokens=args.valid_tokens)
    out = write_plan(plan, base, args.out, valid_tokens=valid_tokens)
    print(f"{'point':>5}  {'name':<26} {'params':>13} {'steps':>7} {'tokens':>15} {'FLOPs':>9}")
    for p in plan.points:
        print(f"{p.index:>5}  {p.name:<26} {p.params:>13,} {p.steps:>7} {p.tokens:>15,} {p.flops:>9.3g}")
    total = sum(p.flops for p in plan.points)
    print(f"{len(plan.points)} points, {total:.3g} FLOPs in all → {out}/plan.json, {out}/configs/, "
          f"{out}/sweep.sbatch\nnext: mamba-train scale run {out}")
    return 0


def _command_line(step: str, *positional, **options) -> str:
    """`mamba-train scale STEP ...` with the options that were given, for the report."""
    words = ["mamba-train", "scale", step, *map(str, positional)]
    for name, value in options.items():
        if value is True:
            words.append(f"--{name.replace('_', '-')}")
        elif value is not None and value is not False:
            words += [f"--{name.replace('_', '-')}", str(value)]
    return " ".join(shlex.quote(word) for word in words)
