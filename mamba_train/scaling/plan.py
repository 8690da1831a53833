"""`scale plan`: an IsoFLOP grid (Chinchilla, Hoffmann et al. 2022, §3.2) of model
sizes per FLOP budget, one run config per point, and a SLURM job array.

Per budget C the sizes are log-spaced over a window (`span`, the ratio of largest to
smallest N) centred on Chinchilla's rule of thumb of 20 tokens per parameter, snapped to
the shape ladder (shapes.py) and slid inwards where it would leave the ladder or give a
model fewer than `min_steps` optimizer steps. Tokens D come from our exact count,
C = training_flops_per_token(shape) · D (model/flops.py), rounded to whole steps; the
FLOPs a point will actually spend are recorded next to its budget.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import yaml

from mamba_train.config import RunConfig, load_config
from mamba_train.launch.slurm import SlurmJob, render_array_sbatch
from mamba_train.scaling.shapes import TINY_RULE, Shape, ShapeRule, peak_lr

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_BASE = "configs/130m.yaml"
TINY_BASE = "configs/scaling/tiny.yaml"
TINY_RECIPE = "data_prep/scaling-tiny.yaml"  # `mamba-train prep` it for the data TINY_BASE reads
TOKENS_PER_PARAM_GUESS = 20.0  # Chinchilla's compute-optimal ratio: only centres the grid
PLAN_FILE, ARRAY_SCRIPT = "plan.json", "sweep.sbatch"


class ScalingError(ValueError):
    """A plan, a sweep or its results that cannot be used; the message names what and where."""


@dataclass
class Point:
    index: int  # position in the job array
    name: str
    budget: float  # the IsoFLOP budget C this point belongs to
    d_model: int
    n_layer: int
    params: int
    flops_per_token: int
    steps: int
    tokens: int  # steps · tokens per step
    flops: int  # flops_per_token · tokens: what the run will spend (≈ budget, to one step)
    lr: float
    warmup_steps: int
    config: str  # the point's run config


@dataclass
class Plan:
    budgets: list[float]
    points: list[Point]
    tokens_per_step: int
    vocab_size: int  # padded, as the model builds it
    tp: int
    tiny: bool
    base: str
    command: str = ""  # the `scale plan` command line that made it, for the report

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: dict) -> "Plan":
        return cls(**{**raw, "points": [Point(**p) for p in raw["points"]]})


def parse_budgets(text: str) -> list[float]:
    budgets = []
    for item in text.split(","):
        try:
            value = float(item)
        except ValueError:
            raise ScalingError(f"--budgets: {item!r} is not a number (expected e.g. 1e17,3e17,1e18)") from None
        if not math.isfinite(value) or value <= 0:
            raise ScalingError(f"--budgets: expected positive FLOP counts, found {item!r}")
        budgets.append(value)
    if len(budgets) < 2:
        raise ScalingError(f"--budgets: expected at least 2 budgets to fit N_opt(C), found {len(budgets)}")
    if len(set(budgets)) != len(budgets):
        raise ScalingError(f"--budgets: {text!r} repeats a budget")
    return sorted(budgets)


def make_plan(budgets: list[float], sizes: int, base_config: str | Path, tiny: bool = False, tp: int = 1,
              vocab_size: int = 0, span: float = 16.0, min_steps: int = 10) -> tuple[Plan, RunConfig]:
    """The grid, without touching the disk (configs get their paths in write_plan)."""
    if sizes < 3:
        raise ScalingError(f"--sizes: a parabola per budget needs at least 3 model sizes, found {sizes}")
    if span <= 1:
        raise ScalingError(f"--span: expected a ratio of largest to smallest model > 1, found {span}")
    base = load_config(base_config)
    vocab = _resolve_vocab(base, vocab_size, base_config)
    base.model.vocab_size = vocab
    padded = base.model.padded_vocab_size(tp)
    rule = replace(TINY_RULE if tiny else ShapeRule(), tp=tp)
    ladder = rule.ladder(base.model, padded)
    if not ladder:
        raise ScalingError(f"--tp {tp}: no width up to {rule.max_width} gives a head count divisible by {tp}")
    tokens_per_step = base.train.micro_batch * base.train.grad_accum * base.data.seq_len

    points: list[Point] = []
    for budget in sorted(budgets):
        for shape in _sizes_for_budget(budget, sizes, ladder, span, tokens_per_step, min_steps):
            steps = round(budget / (shape.flops_per_token * tokens_per_step))
            tokens = steps * tokens_per_step
            # GPT-3's table stops at 125M parameters; tiny models take the base config's (tuned) lr
            lr = base.optim.lr if tiny else peak_lr(shape.params)
            name = f"C{budget:.3g}-d{shape.model.d_model}-L{shape.model.n_layer}".replace("+", "")
            points.append(Point(index=len(points), name=name, budget=budget, d_model=shape.model.d_model,
                                n_layer=shape.model.n_layer, params=shape.params,
                                flops_per_token=shape.flops_per_token, steps=steps, tokens=tokens,
                                flops=shape.flops_per_token * tokens, lr=lr,
                                warmup_steps=max(1, round(steps / 10)), config=""))
    plan = Plan(budgets=sorted(budgets), points=points, tokens_per_step=tokens_per_step, vocab_size=padded, tp=tp,
                tiny=tiny, base=str(base_config))
    return plan, base


def _resolve_vocab(base: RunConfig, vocab_size: int, where) -> int:
    if vocab_size:
        return vocab_size
    if base.model.vocab_size:
        return base.model.vocab_size
    tokenizer = Path(base.data.tokenizer)
    if not tokenizer.exists():
        raise ScalingError(f"{where}: model.vocab_size is 0 (from the tokenizer) and the tokenizer "
                           f"{tokenizer} does not exist here: prepare the data first (mamba-train prep RECIPE; "
                           "data_prep/scaling-tiny.yaml for --tiny), or pass --vocab-size (the Pile's GPT-NeoX "
                           "tokenizer: 50277)")
    from mamba_train.data import load_tokenizer

    return load_tokenizer(tokenizer).vocab_size


def _sizes_for_budget(budget: float, sizes: int, ladder: list[Shape], span: float, tokens_per_step: int,
                      min_steps: int) -> list[Shape]:
    steps = np.array([budget / (s.flops_per_token * tokens_per_step) for s in ladder])
    feasible = [s for s, n in zip(ladder, steps) if n >= min_steps]
    smallest = ladder[0]
    if not feasible or feasible[0] is not smallest:
        need = min_steps * tokens_per_step * smallest.flops_per_token
        raise ScalingError(f"budget {budget:.3g} FLOPs is too small for the smallest model (d_model "
                           f"{smallest.model.d_model}, {smallest.params:,} params, {smallest.flops_per_token:,} "
                           f"FLOPs/token): {min_steps} steps of {tokens_per_step} tokens need {need:.3g} FLOPs")
    if len(feasible) < 3:
        raise ScalingError(f"budget {budget:.3g} FLOPs: only {len(feasible)} model size(s) get {min_steps} steps "
                           f"or more; an IsoFLOP parabola needs at least 3 (raise the budget or lower --min-steps)")
    log_n = np.log([s.params for s in feasible])
    # centre: the N (between ladder shapes, log-log interpolated) whose tokens per parameter are 20;
    # snapping the centre to a shape first would shift the whole grid by up to half a ladder step
    log_tpp = np.log([budget / s.flops_per_token / s.params for s in feasible])  # decreasing in N
    centre = float(np.interp(math.log(TOKENS_PER_PARAM_GUESS), log_tpp[::-1], log_n[::-1]))
    targets = centre + math.log(span) * np.linspace(-0.5, 0.5, sizes)
    targets += max(0.0, log_n[0] - targets[0]) - max(0.0, targets[-1] - log_n[-1])  # slide inside the ladder
    chosen = sorted({int(np.argmin(np.abs(log_n - t))) for t in targets})
    while len(chosen) < min(sizes, len(feasible)):  # snapping merged neighbours: add the nearest unused shape
        unused = [i for i in range(len(feasible)) if i not in chosen]
        chosen = sorted(chosen + [min(unused, key=lambda i: np.abs(targets - log_n[i]).min())])
    return [feasible[i] for i in chosen]


def write_plan(plan: Plan, base: RunConfig, out: str | Path, valid_tokens: int = 0) -> Path:
    """One run config per point under OUT/configs, OUT/plan.json and OUT/sweep.sbatch.
    `valid_tokens` > 0 evaluates every point on a fixed sample of that many validation
    tokens (OUT/data/valid-sample), so CPU sweeps do not spend their time evaluating."""
    out = Path(out)
    if (out / PLAN_FILE).exists():
        old = Plan.from_json(json.loads((out / PLAN_FILE).read_text()))
        if [asdict(p) | {"config": ""} for p in old.points] != [asdict(p) for p in plan.points]:
            raise ScalingError(f"{out / PLAN_FILE} already holds a different plan; its results would not match. "
                               f"Choose a new --out directory")
    (out / "configs").mkdir(parents=True, exist_ok=True)
    valid_prefix = base.data.valid_prefix
    if valid_tokens:
        valid_prefix = str(out / "data" / "valid-sample")
        write_valid_sample(base.data.valid_prefix, valid_prefix, valid_tokens)
    for point in plan.points:
        cfg = run_config(point, plan, base, out, valid_prefix)
        point.config = str(out / "configs" / f"{point.index:03d}-{point.name}.yaml")
        Path(point.config).write_text(f"# scale plan point {point.index}: budget {point.budget:.3g} FLOPs, "
                                      f"{point.params:,} params, {point.tokens:,} tokens\n"
                                      + yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    (out / PLAN_FILE).write_text(json.dumps(plan.to_json(), indent=1))
    (out / ARRAY_SCRIPT).write_text(array_script(plan, out))
    return out


def run_config(point: Point, plan: Plan, base: RunConfig, out: Path, valid_prefix: str) -> RunConfig:
    rule = replace(TINY_RULE if plan.tiny else ShapeRule(), tp=plan.tp)
    cfg = load_config(None, [])
    cfg.model = rule.model(point.d_model, base.model)
    cfg.data = replace(base.data, valid_prefix=valid_prefix)
    # cosine over exactly this run's tokens down to lr/10 (Chinchilla §4.1, Appendix B)
    cfg.optim = replace(base.optim, lr=point.lr, min_lr=point.lr / 10, warmup_steps=point.warmup_steps,
                        schedule="cosine")
    cfg.train = replace(base.train, steps=point.steps, eval_every=0)
    run_dir = out / "runs" / point.name
    cfg.checkpoint = replace(base.checkpoint, dir=str(run_dir / "checkpoints"),
                             every=0 if plan.tiny else base.checkpoint.every)
    cfg.logging = replace(base.logging, run_dir=str(run_dir), tensorboard=not plan.tiny and base.logging.tensorboard,
                          progress_bar="off")
    cfg.parallel = replace(base.parallel, tp=plan.tp)
    cfg.validate()
    return cfg


def write_valid_sample(source_prefix: str, out_prefix: str, max_tokens: int) -> None:
    """Whole documents, taken from each subset in turn, up to max_tokens tokens."""
    from mamba_train.data import IndexedDataset, IndexedDatasetWriter

    source = IndexedDataset(source_prefix)
    lengths = source.doc_lengths
    subsets = source.subset_ids if source.subset_ids is not None else np.zeros(len(lengths), dtype=np.int16)
    queues = [list(np.flatnonzero(subsets == s)) for s in np.unique(subsets)]
    chosen, total, progress = [], 0, True
    while progress:
        progress = False
        for queue in queues:
            while queue and total + lengths[queue[0]] > max_tokens:
                queue.pop(0)  # too long for what is left: try the subset's next document
            if queue:
                doc = queue.pop(0)
                chosen.append(doc)
                total += int(lengths[doc])
                progress = True
    if not chosen:
        raise ScalingError(f"{source_prefix}: no validation document has {max_tokens} tokens or fewer")
    with IndexedDatasetWriter(out_prefix, dtype=source.dtype) as writer:
        writer.add_documents_from(source, np.sort(np.array(chosen)))


def array_script(plan: Plan, out: Path) -> str:
    """The sweep's SLURM job array, rendered from launch/slurm.sbatch like a single run:
    task i trains point i through torchrun (tp processes on one node), and USR1 (120 s
    before the time limit) makes it checkpoint, exit 0 and requeue itself to resume from
    `latest`. sbatch options given at submission (`scale run --submit --sbatch=...`)
    override the resources chosen here."""
    out = Path(out).resolve()
    job = SlurmJob(job_name=f"scale-{out.name}", log_dir=out / "logs", nodes=1, procs_per_node=plan.tp,
                   gpus_per_node=0 if plan.tiny else plan.tp, cpus_per_task=2 if plan.tiny else 8)
    budgets = ", ".join(f"{b:.3g}" for b in plan.budgets)
    header = (f"# IsoFLOP sweep: {len(plan.points)} runs over budgets {budgets} FLOPs. Submit with\n"
              f"#   mamba-train scale run {out} --submit\n"
              f"# (it passes --array for the points without a result); when the array is done, collect and fit:\n"
              f"#   mamba-train scale run {out} && mamba-train scale fit {out}\n")
    return render_array_sbatch(job, [p.config for p in plan.points], header=header)


def load_plan(out: str | Path) -> Plan:
    path = Path(out) / PLAN_FILE
    if not path.is_file():
        raise ScalingError(f"{path}: no plan here; make one with `mamba-train scale plan --out {out}`")
    return Plan.from_json(json.loads(path.read_text()))
