"""`mamba-train {prep,train,eval,export,launch,scale}`: one entry point for the whole stack.

Expected failures (bad config, bad data, bad checkpoint) print one `error:` line naming
what is wrong and exit with status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

if __name__ == "__main__":
    # Run as a trainer (torchrun and SLURM start `python -m mamba_train.cli`): record a stop
    # signal from the first instant, before the imports below take their seconds.
    from mamba_train.train.preemption import catch_early

    catch_early()

import argparse
import os
import sys
from pathlib import Path

from mamba_train.checkpoint import CheckpointError
from mamba_train.config import ConfigError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mamba-train", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    from mamba_train import launch
    from mamba_train.data import prep
    from mamba_train.scaling import cli as scale

    for name, module, help_text in (
            ("prep", prep, "build a corpus, train a tokenizer, write indexed data"),
            ("launch", launch, "start training through torchrun or SLURM"),
            ("scale", scale, "IsoFLOP scaling sweeps: plan, run, fit")):
        command = commands.add_parser(name, help=help_text)
        module.add_arguments(command)
        command.set_defaults(run=module.run)

    train = commands.add_parser("train", help="train a model from a YAML config")
    train.add_argument("config", help="YAML run config, e.g. configs/tiny-cpu.yaml")
    # default=[]: argparse counts a '*' positional without a default as required in its usage error
    train.add_argument("overrides", nargs="*", default=[], metavar="KEY=VALUE",
                       help="dotted overrides: optim.lr=1e-3")
    train.add_argument("--resume", metavar="auto|PATH",
                       help="'auto': continue from the newest complete checkpoint, if any; or a checkpoint directory")
    train.set_defaults(run=_train)

    evaluate = commands.add_parser("eval", help="perplexity and bits-per-byte, overall and per subset")
    evaluate.add_argument("--ckpt", required=True, help="a checkpoint directory, or a checkpoint root with `latest`")
    evaluate.add_argument("--data", metavar="NAME", help="indexed dataset prefix, or train/valid/test of the run's "
                          "data directory (default: the run's data.valid_prefix)")
    evaluate.add_argument("--window", type=positive_int, help="tokens per window; state is carried between windows "
                          "(default: the run's data.seq_len)")
    evaluate.add_argument("--rows", type=positive_int,
                          help="runs of documents scored side by side as one batch (default 1)")
    evaluate.add_argument("--max-tokens", type=positive_int,
                          help="evaluate only the leading whole documents within N tokens (at least one document)")
    evaluate.add_argument("--out", type=output_file, help="write the results as JSON to this file")
    evaluate.set_defaults(run=_eval)

    export = commands.add_parser("export", help="write a Hugging Face Mamba2ForCausalLM directory")
    export.add_argument("--ckpt", required=True, help="a checkpoint directory, or a checkpoint root with `latest`")
    export.add_argument("--out", required=True, type=output_dir,
                        help="output directory (the files export writes replace those already there)")
    export.set_defaults(run=_export)

    args, unknown = parser.parse_known_args(argv)
    # `train CONFIG a=1 --resume auto b=2`: argparse takes no positionals after an option, so
    # the overrides after it arrive here; they are overrides all the same, in their order
    stray = [arg for arg in unknown if args.command != "train" or arg.startswith("-") or "=" not in arg]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if unknown:
        args.overrides = [*args.overrides, *unknown]
    from mamba_train.data import DataError
    from mamba_train.train.loop import TrainingError

    try:
        return args.run(args)
    except (ConfigError, CheckpointError, TrainingError, DataError, launch.LaunchError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: no traceback (train has logged the checkpoint it keeps)
        if int(os.environ.get("RANK", "0")) == 0:   # one line per run, not per rank
            print(f"interrupted: mamba-train {args.command} stopped by Ctrl-C", file=sys.stderr)
        return 130   # 128 + SIGINT, as a shell reports it


def positive_int(text: str) -> int:
    """argparse `type=` for counts: None (not given) keeps meaning the default, so 0 and
    negatives are refused rather than quietly read as "the default" or "everything"."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, found {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, found {value}")
    return value


def output_file(text: str) -> str:
    """argparse `type=` for a file written at the end: refused now, not after the work."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a directory; give a file path, e.g. {path / 'eval.json'}")
    _check_parents(path)
    return text


def output_dir(text: str) -> str:
    """argparse `type=` for a directory written at the end: refused now, not after the work."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file, and the output is a directory; choose another path")
    _check_parents(path)
    return text


def _check_parents(path: Path) -> None:
    # the nearest existing parent must be a directory, or mkdir fails once the work is done
    parent = next((p for p in path.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise argparse.ArgumentTypeError(f"{path}: {parent} is a file, not a directory")


def _train(args) -> int:
    from mamba_train.config import load_config
    from mamba_train.train.loop import train

    cfg = load_config(args.config, args.overrides)
    result = train(cfg, resume=args.resume)
    # A stop on SIGUSR1/SIGTERM exits 0 too: the checkpoint is saved and SLURM requeues the job.
    ended = f"stopped by {result.stopped_by}" if result.stopped_by else "done"
    if int(os.environ.get("RANK", "0")) == 0:   # one line per run, not per rank
        print(f"{ended}: step {result.step}, checkpoint {result.checkpoint}")
    return 0


def _eval(args) -> int:
    from mamba_train.eval.command import run

    return run(args)


def _export(args) -> int:
    from mamba_train.checkpoint import load_trained_model
    from mamba_train.data import load_tokenizer
    from mamba_train.export import export_hf

    model, cfg, path, _ = load_trained_model(args.ckpt)
    tokenizer = load_tokenizer(cfg.data.tokenizer) if Path(cfg.data.tokenizer).exists() else None
    out = export_hf(model.cpu(), cfg.model, args.out, tokenizer)
    print(f"exported {path} to {out} (transformers.Mamba2ForCausalLM.from_pretrained('{out}')"
          f"{', AutoTokenizer too' if tokenizer else f'; the tokenizer {cfg.data.tokenizer} is not here to copy'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
