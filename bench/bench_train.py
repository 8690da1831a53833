"""End-to-end training speed on one GPU: our Mamba2LM beside a plain LM of mamba_ssm's Mamba2 blocks.

Both run the same step (issue 9): fp32 parameters, bf16 autocast, fused AdamW, gradient
clipping at 1.0 (folded into the optimizer as the trainer does), seq 2048, the same token batch, the same padded vocabulary (tied head).
The anchor is mamba_ssm 2.3.2.post1's `Block(Mamba2)` with its Triton RMSNorm (fused add,
residual in fp32), on its unfused path (torch conv1d, `use_mem_eff_path=False`) and, when
the causal_conv1d extension imports, also on its fused path. Tokens/s are medians over the
timed steps after warm-up; MFU = model FLOPs (mamba_train.model.flops, the definition of
issue 9) / step time / the bf16 matmul rate measured in this run.

    PYTHONPATH=.anchor:. python bench/bench_train.py [--models 130m 370m 1.3b] [--profile]
    PYTHONPATH=.anchor:. python bench/bench_train.py --curves [--curve-steps 300] [--curve-repeats 2]
                                                     [--data data/quickstart/train]

Writes bench/results/train-<gpu>.json. `--profile` prints where one step spends its CUDA time
instead, summed by kind side by side for ours and the anchor's unfused path, then per kernel.
`--curves` checks that speed did not change the math (issue 9): ours and the anchor (unfused
path) each train N steps from the same initial weights (mamba_ssm's init rule, drawn once and
loaded into both) on the same batches of a Megatron-indexed dataset, under the 130m config's
optimizer and a warm-up + cosine schedule; it prints both loss curves every 25 steps and the
largest relative gap of their 20-step moving averages (the issue asks < 1%), and writes
bench/results/train-curves-<gpu>.json. `--curve-repeats N` repeats that from N draws (seeds
SEED .. SEED + N - 1), compares the sides' mean curves and shows how far two runs of one side
drift apart.
Ours runs with the train.recompute of the model's shipped config (configs/<model>.yaml: 'none',
keeping every activation, where memory allows), or with `--recompute MODE`. `--cpu-profile` prints
where the CPU's time to enqueue ours' eager step goes (cProfile).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import MATMUL_KERNELS, cuda_kernel_events, results_path  # noqa: E402
from mamba_train.config import RECOMPUTE_MODES, DataConfig, ModelConfig, OptimConfig, load_config  # noqa: E402
from mamba_train.data import TrainLoader, build_train_samples, load_tokenizer  # noqa: E402
from mamba_train.model import Mamba2LM, param_groups, set_recompute  # noqa: E402
from mamba_train.model.flops import training_flops_per_token  # noqa: E402
from mamba_train.train.cuda_graph import GraphedMicroStep  # noqa: E402
from mamba_train.train.loop import clipped_step  # noqa: E402
from mamba_train.train.metrics import measured_matmul_peak  # noqa: E402
from mamba_train.train.schedule import lr_at  # noqa: E402

VOCAB = 50277   # GPT-NeoX's tokenizer, as the Mamba papers; padded to 50304 for both models
# name: (d_model, n_layer, micro_batch) — issue 9's table
MODELS = {"130m": (768, 24, 16), "370m": (1024, 48, 8), "1.3b": (2048, 48, 4)}
SEQ = 2048
SEED = 1234  # TrainConfig's and DataConfig's default: model init and sample order of --curves


class AnchorLM(nn.Module):
    """mamba_ssm's blocks in the plainest LM: embedding → Block(Mamba2)… → RMSNorm → tied head."""

    def __init__(self, d_model, n_layer, vocab, fused):
        super().__init__()
        from functools import partial

        from mamba_ssm.modules.block import Block
        from mamba_ssm.modules.mamba2 import Mamba2
        from mamba_ssm.ops.triton.layer_norm import RMSNorm

        self.embedding = nn.Embedding(vocab, d_model)
        mixer = partial(Mamba2, d_state=128, d_conv=4, expand=2, headdim=64, ngroups=1, chunk_size=256,
                        use_mem_eff_path=fused)
        self.layers = nn.ModuleList(
            Block(d_model, mixer, nn.Identity, norm_cls=partial(RMSNorm, eps=1e-5), fused_add_norm=True,
                  residual_in_fp32=True) for _ in range(n_layer))
        for i, layer in enumerate(self.layers):
            layer.mixer.layer_idx = i
        self.norm_f = RMSNorm(d_model, eps=1e-5)
        # mamba_ssm's `_init_weights` (models/mixer_seq_simple.py, n_residuals_per_layer=1), in its
        # order; restated because that module imports the compiled selective_scan_cuda (Mamba-1),
        # which the anchor does not carry. The Mamba2 linears have no bias to zero.
        nn.init.normal_(self.embedding.weight, std=0.02)
        for layer in self.layers:
            out_proj = layer.mixer.out_proj.weight
            nn.init.kaiming_uniform_(out_proj, a=math.sqrt(5))
            with torch.no_grad():
                out_proj /= math.sqrt(n_layer)

    def loss(self, input_ids, labels):
        hidden, residual = self.embedding(input_ids), None
        for layer in self.layers:
            hidden, residual = layer(hidden, residual)
        hidden = self.norm_f((hidden + residual).to(self.norm_f.weight.dtype))
        logits = F.linear(hidden, self.embedding.weight)
        return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())


def ours(name, recompute=None):
    """Our LM at issue 9's size `name`, recomputing in backward what train.recompute says: the
    given mode, else the one configs/<name>.yaml trains with."""
    d_model, n_layer, _ = MODELS[name]
    model = Mamba2LM(ModelConfig(d_model=d_model, n_layer=n_layer, vocab_size=VOCAB))
    set_recompute(model, recompute or shipped_recompute(name))
    return model


def shipped_recompute(name):
    return load_config(Path(__file__).resolve().parents[1] / "configs" / f"{name}.yaml").train.recompute


def make_optimizer(groups, device_type):
    """Every timed step's optimizer, whichever model and path (issue 9: the same optimizer)."""
    return torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=device_type == "cuda")


def clip_and_step(optimizer, model, max_norm=1.0):
    # as the trainer does (mamba_train.train.loop.clipped_step): the clip folded into the fused
    # AdamW's pass over the gradients, for ours and the anchor alike
    params = [p for p in model.parameters() if p.grad is not None]
    clipped_step(optimizer, params, torch.nn.utils.get_total_norm([p.grad for p in params]), max_norm)


def make_step(model, groups):
    device_type = next(model.parameters()).device.type
    optimizer = make_optimizer(groups, device_type)

    def step(input_ids, labels, lr=None):
        if lr is not None:
            for group in optimizer.param_groups:
                group["lr"] = lr
        with torch.autocast(device_type, dtype=torch.bfloat16):
            loss = model.loss(input_ids, labels)
        loss.backward()
        clip_and_step(optimizer, model)
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step


def make_graphed_step(model, groups, batch):
    """make_step's step with forward and backward replayed from a CUDA graph, as the trainer
    runs it with train.cuda_graph (mamba_train.train.cuda_graph); clipping and the optimizer
    stay eager. The CPU then launches one graph instead of a few thousand kernels."""
    optimizer = make_optimizer(groups, "cuda")

    def forward_backward(b):
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
            loss = model.loss(b["input_ids"], b["labels"])
        loss.backward()
        return loss.detach()

    graphed = GraphedMicroStep(forward_backward, model, dict(input_ids=batch[0], labels=batch[1]))

    def step(input_ids, labels):
        loss = graphed(dict(input_ids=input_ids, labels=labels))   # writes the gradients: no zero_grad
        clip_and_step(optimizer, model)
        return loss

    return step


def time_steps(step, batch, warmup, steps, graphed=False):
    """(median step seconds, peak GiB, median seconds until step() returns: the CPU's share).
    Peak: the allocator's peak of allocated memory; for a CUDA-graphed step plus what the
    allocator holds unallocated when timing starts, an upper bound on the graph's private
    pool (reserved, not allocated, between replays)."""
    for _ in range(warmup):
        step(*batch)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    graph_pool = torch.cuda.memory_reserved() - torch.cuda.memory_allocated() if graphed else 0
    times, enqueue = [], []
    for _ in range(steps):
        started = time.perf_counter()
        step(*batch)
        enqueue.append(time.perf_counter() - started)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return (statistics.median(times), (torch.cuda.max_memory_allocated() + graph_pool) / 2**30,
            statistics.median(enqueue))


def run_one(build, batch, warmup, steps, graphed=False):
    """(step seconds, peak GiB, enqueue seconds), or the error's text when it does not fit or fails."""
    model = step = None
    try:
        model, groups = build()
        step = make_graphed_step(model, groups, batch) if graphed else make_step(model, groups)
        return time_steps(step, batch, warmup, steps, graphed)
    except torch.OutOfMemoryError:
        return "out of memory"
    except RuntimeError as err:   # a capture that fails says why; the other columns still run
        if not graphed:
            raise
        return f"{type(err).__name__}: {str(err)[:300]}"
    finally:
        del model, step
        gc.collect()
        torch.cuda.empty_cache()


def profile(name, with_anchor, recompute=None, warmup=3, trace_dir=None):
    """Where one step's CUDA time goes, by kind, for ours and (with_anchor) the anchor's unfused
    path at the same shapes: the side-by-side says which kinds a slower step loses in. With
    trace_dir, each side's Chrome trace is written there too (`bench/trace_summary.py --by-op`
    names the operator behind every kernel)."""
    from torch.profiler import ProfilerActivity, profile as torch_profile
    d_model, n_layer, micro = MODELS[name]
    builders = {"ours": lambda: ours(name, recompute)}
    if with_anchor:
        builders["anchor"] = lambda: AnchorLM(d_model, n_layer, 50304, fused=False)
    by_kind, tables = {}, {}
    for side, build in builders.items():
        model = build().cuda()
        step = make_step(model, param_groups(model, 0.1))
        batch = random_batch(micro)
        for _ in range(warmup):
            step(*batch)
        torch.cuda.synchronize()
        with torch_profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            for _ in range(2):
                step(*batch)
            torch.cuda.synchronize()
        if trace_dir is not None:
            prof.export_chrome_trace(str(Path(trace_dir) / f"trace-{name}-{side}.json"))
        kinds = defaultdict(float)
        for e in cuda_kernel_events(prof):
            kinds[_kind(e.key)] += e.self_device_time_total / 2e3   # ms per step
        by_kind[side] = kinds
        tables[side] = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=30,
                                                 max_name_column_width=70)
        del model, step
        gc.collect()
        torch.cuda.empty_cache()
    sides = list(builders)
    print(f"# {name}, micro {micro} x {SEQ}: CUDA time per step by kind, ms (wall per step measured separately)")
    print(f"  {'kind':28s} " + " ".join(f"{s:>9s}" for s in sides))
    order = sorted(set().union(*by_kind.values()), key=lambda k: -by_kind["ours"].get(k, 0.0))
    for kind in order + ["total"]:
        vals = [sum(by_kind[s].values()) if kind == "total" else by_kind[s].get(kind, 0.0) for s in sides]
        print(f"  {kind:28s} " + " ".join(f"{v:9.2f}" for v in vals))
    for side in sides:
        print(f"# {side}: the 30 kernels with the most CUDA time (2 steps)")
        print(tables[side])


def cpu_profile(name, recompute=None, warmup=3, steps=3, rows=45):
    """Where the CPU's time to enqueue ours' eager step goes (cProfile, after warm-up): the
    Python behind each launch, which bounds a step whenever the GPU's share per rank is small
    (tensor or context parallel, small models)."""
    import cProfile
    import pstats
    micro = MODELS[name][2]
    model = ours(name, recompute).cuda()
    step, batch = make_step(model, param_groups(model, 0.1)), random_batch(micro)
    for _ in range(warmup):
        step(*batch)
    torch.cuda.synchronize()
    profiler = cProfile.Profile()
    started = time.perf_counter()
    profiler.enable()
    for _ in range(steps):
        step(*batch)
    profiler.disable()
    enqueue = (time.perf_counter() - started) / steps
    torch.cuda.synchronize()
    print(f"# {name}, micro {micro} x {SEQ}, {torch.cuda.get_device_name()}: wall time to enqueue an eager step "
          f"under cProfile {1e3 * enqueue:.1f} ms ({steps} steps; cProfile's own cost included, and any wait "
          f"of a launch on a full queue)")
    stats = pstats.Stats(profiler).strip_dirs()
    stats.sort_stats("tottime").print_stats(rows)
    stats.sort_stats("cumulative").print_stats(rows)
    stats.print_callers(r"jit.py:\d+\(__call__\)|_unwrap_if_constexpr")   # who pays Triton's per-launch Python


def _kind(kernel):
    k = kernel.lower()
    for label, needles in (("ssd", ("_chunk_", "_bmm_", "_state_passing", "_gate_bwd")),
                           ("conv1d", ("conv",)), ("matmul", MATMUL_KERNELS),
                           ("cross-entropy/softmax", ("softmax", "nll", "cross_entropy", "log_softmax")),
                           ("optimizer", ("adam", "multi_tensor", "foreach")),
                           ("norm (rms, gated)", ("rms", "norm", "layer_norm")),
                           ("copies/casts", ("copy", "cast", "to_copy", "cat", "fill"))):
        if any(n in k for n in needles):
            return label
    return "elementwise/other"


def curve_batches(prefix, micro, steps):
    """`steps` batches (input_ids, labels), each (micro, SEQ) int64 on the CPU: the training
    loop's packed samples of `prefix` in its shuffled order (seed SEED), wrapping into a new
    epoch when the data is shorter than the run. No seq_idx: the anchor's unfused path takes
    none without the causal_conv1d extension, so both models read each sample as one stream."""
    samples = build_train_samples(DataConfig(train_prefix=prefix, seq_len=SEQ, seed=SEED), steps * micro)
    loader = TrainLoader(samples, micro, seed=SEED)
    return samples, [(batch["input_ids"], batch["labels"]) for batch, _ in zip(loader, range(steps))]


def train_curve(model, batches, optim):
    """The loss of every step of `model` (on its device) over `batches`: make_step's step
    (bf16 autocast, AdamW, clip 1.0) with lr_at's warm-up + cosine schedule of `optim`."""
    device = next(model.parameters()).device
    step = make_step(model, param_groups(model, optim.weight_decay))
    losses = []
    for i, (input_ids, labels) in enumerate(batches):
        loss = step(input_ids.to(device), labels.to(device), lr=lr_at(i, optim, len(batches)))
        losses.append(loss.detach())  # read back once at the end: no wait for the GPU per step
    return torch.stack(losses).float().cpu().tolist()


def moving_average(values, window=20):
    return [statistics.fmean(values[max(0, i + 1 - window):i + 1]) for i in range(len(values))]


def mean_curve(runs):
    """The step-by-step mean of one side's loss curves."""
    return [statistics.fmean(step) for step in zip(*runs)]


def max_gap(curve, reference, start=50):
    """The largest |curve - reference| / reference of the 20-step moving averages from step `start`
    on (1-based), and the step where it is."""
    gaps = [abs(c - r) / r for c, r in zip(moving_average(curve), moving_average(reference))]
    step = max(range(start - 1, len(gaps)), key=gaps.__getitem__)
    return gaps[step], step + 1


def compare_curves(ours_runs, anchor_runs, start=50):
    """Issue 9's check on the loss curves of one or more runs a side, run i of each side from the
    same start: the gap between the sides' mean curves, each repeat's own gap, and with repeats
    the largest gap between two runs of one side (other starts), the scale against which a gap
    between the sides means something."""
    gap, step = max_gap(mean_curve(ours_runs), mean_curve(anchor_runs), start)
    result = dict(max_rel_diff_ma20=gap, max_rel_diff_step=step,
                  per_repeat_max_rel_diff_ma20=[max_gap(o, a, start)[0] for o, a in zip(ours_runs, anchor_runs)])
    for side, runs in (("ours", ours_runs), ("anchor", anchor_runs)):
        if len(runs) > 1:
            result[f"{side}_spread_ma20"] = max(max_gap(a, b, start)[0]
                                                for i, a in enumerate(runs) for b in runs[i + 1:])
    return result


def curves(name, prefix, tokenizer, steps, lr, gpu, repeats=1):
    """Train ours and the anchor (unfused) on the same batches, `repeats` times, each time both
    from one new draw of the initial weights; print and return the comparison (compare_curves)."""
    d_model, n_layer, micro = MODELS[name]
    # the 130m config's optimizer (configs/130m.yaml) with a warm-up scaled to the short run
    optim = OptimConfig(lr=lr, min_lr=1e-5, weight_decay=0.1, beta1=0.9, beta2=0.95, grad_clip=1.0,
                        warmup_steps=max(1, steps // 10))
    cfg = ModelConfig(d_model=d_model, n_layer=n_layer, vocab_size=load_tokenizer(tokenizer).vocab_size)
    vocab = cfg.padded_vocab_size()  # as the training loop pads it (a multiple of 128); the anchor's too
    samples, batches = curve_batches(prefix, micro, steps)
    samples.check_vocab(vocab)
    print(f"# loss curves, {name}: micro {micro} x {SEQ}, {steps} steps on {prefix} ({samples.num_samples} samples), "
          f"vocab {vocab}, lr {lr} (warm-up {optim.warmup_steps}, cosine to {optim.min_lr}), seed {SEED}, "
          f"{repeats} run(s) a side, anchor unfused, {gpu}, torch {torch.__version__}", flush=True)
    runs = {"ours": [], "anchor": []}
    for repeat in range(repeats):
        # Both sides start from the same weights: mamba_ssm's initialisation drawn once (seed
        # SEED + repeat), loaded into ours (the parameter names are the same). Drawn apart, each
        # model's draw is its own, and 300 steps kept a gap of about 1% that repeats with the
        # same seed could not tell from the draw's luck; shared, the curves differ by the
        # implementations alone, and each repeat draws a new start.
        torch.manual_seed(SEED + repeat)
        models = {"anchor": AnchorLM(d_model, n_layer, vocab, fused=False), "ours": Mamba2LM(cfg)}
        models["ours"].load_state_dict(models["anchor"].state_dict())   # copies: the anchor trains after ours
        for side in runs:
            model = models.pop(side).cuda()   # only the model in training held: freed after it
            started = time.perf_counter()
            runs[side].append(train_curve(model, batches, optim))
            print(f"# {side}, run {repeat + 1}: {steps} steps in {time.perf_counter() - started:.0f} s", flush=True)
            del model
            gc.collect()
            torch.cuda.empty_cache()
    losses = {side: mean_curve(side_runs) for side, side_runs in runs.items()}
    ours_ma, anchor_ma = moving_average(losses["ours"]), moving_average(losses["anchor"])
    print(f"{'step':>5s} | {'ours':>7s} {'anchor':>7s} | {'ma20 rel diff':>13s}" + ("   (means of the runs)" if repeats > 1 else ""))
    for i in range(24, steps, 25):
        print(f"{i + 1:5d} | {losses['ours'][i]:7.4f} {losses['anchor'][i]:7.4f} | "
              f"{100 * (ours_ma[i] - anchor_ma[i]) / anchor_ma[i]:+12.2f}%")
    comparison = compare_curves(runs["ours"], runs["anchor"])
    row = dict(gpu=gpu, model=name, steps=steps, micro_batch=micro, seqlen=SEQ, lr=lr,
               warmup_steps=optim.warmup_steps, repeats=repeats, ours_loss=losses["ours"],
               anchor_loss=losses["anchor"], **comparison,
               ours_last50=statistics.fmean(losses["ours"][-50:]),
               anchor_last50=statistics.fmean(losses["anchor"][-50:]))
    if repeats > 1:
        row.update(ours_runs=runs["ours"], anchor_runs=runs["anchor"])
    spread = (f"; each start's own gap: {', '.join(f'{100 * g:.2f}%' for g in comparison['per_repeat_max_rel_diff_ma20'])}"
              f"; two runs of one side from other starts differ by up to {100 * comparison['ours_spread_ma20']:.2f}% "
              f"(ours), {100 * comparison['anchor_spread_ma20']:.2f}% (anchor)" if repeats > 1 else "")
    print(f"# {name}: max |relative difference| of the 20-step moving averages over steps 50..{steps}: "
          f"{100 * row['max_rel_diff_ma20']:.2f}% at step {row['max_rel_diff_step']} (issue 9 asks < 1%){spread}; "
          f"mean loss of the last 50 steps: ours {row['ours_last50']:.4f}, anchor {row['anchor_last50']:.4f}",
          flush=True)
    return row


def write_curves(args, gpu):
    out = results_path("train-curves", gpu)
    rows = []
    for name in args.models:
        rows.append(curves(name, args.data, args.tokenizer, args.curve_steps, args.curve_lr, gpu, args.curve_repeats))
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(rows, indent=1) + "\n")
    print(f"# wrote {out}")


def random_batch(micro):
    gen = torch.Generator(device="cuda").manual_seed(0)
    ids = torch.randint(0, VOCAB, (micro, SEQ + 1), device="cuda", generator=gen)
    return ids[:, :-1].contiguous(), ids[:, 1:].contiguous()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", choices=list(MODELS), help="default: all; 130m with --curves")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--no-anchor", action="store_true")
    parser.add_argument("--graph", action="store_true", help="also ours with forward+backward in a CUDA graph")
    parser.add_argument("--micro-batch", type=int,
                        help="every model at this micro-batch instead of issue 9's (memory allowing larger ones)")
    parser.add_argument("--recompute", choices=RECOMPUTE_MODES,
                        help="ours with this train.recompute (default: each model's shipped config's)")
    parser.add_argument("--profile", action="store_true",
                        help="per-kernel profile of ours and the anchor (unfused) at the first model")
    parser.add_argument("--trace-dir", help="with --profile: write each side's Chrome trace there")
    parser.add_argument("--cpu-profile", action="store_true",
                        help="cProfile of ours' eager step at the first model: the Python behind its launches")
    parser.add_argument("--curves", action="store_true",
                        help="loss curves of ours and the anchor on the same data (default model 130m)")
    parser.add_argument("--curve-steps", type=int, default=300)
    parser.add_argument("--curve-lr", type=float, default=3e-3, help="peak lr (configs/130m.yaml's)")
    parser.add_argument("--curve-repeats", type=int, default=1,
                        help="--curves: runs a side; from 2 on, their means are compared and each side's spread shown")
    parser.add_argument("--data", default="data/quickstart/train", help="indexed dataset prefix for --curves")
    parser.add_argument("--tokenizer", default="data/quickstart/tokenizer.model", help="gives --curves the vocab size")
    args = parser.parse_args()
    args.models = args.models or (["130m"] if args.curves else list(MODELS))
    if args.curves and args.curve_steps < 50:
        parser.error(f"--curve-steps: the summary reads steps 50..N, found {args.curve_steps}")
    if args.curve_repeats < 1:
        parser.error(f"--curve-repeats: at least 1, found {args.curve_repeats}")
    torch.backends.cuda.matmul.allow_tf32 = True
    if args.cpu_profile:
        return cpu_profile(args.models[0], args.recompute)
    if args.profile:
        return profile(args.models[0], with_anchor=not args.no_anchor, recompute=args.recompute,
                       trace_dir=args.trace_dir)
    gpu = torch.cuda.get_device_name()
    if args.curves:
        return write_curves(args, gpu)
    peak = measured_matmul_peak(torch.device("cuda"))
    anchor_paths = []
    if not args.no_anchor:
        try:
            import mamba_ssm.modules.mamba2 as anchor_module
            anchor_paths = ["unfused"] + (["fused"] if anchor_module.causal_conv1d_fn is not None else [])
        except Exception as err:  # noqa: BLE001 - report and run without the anchor
            print(f"mamba_ssm not importable ({err!r}): anchor columns stay empty", file=sys.stderr)
    print(f"# training step, seq {SEQ}, bf16 autocast, fused AdamW, {gpu}, torch {torch.__version__}; "
          f"measured bf16 matmul peak {peak / 1e12:.0f} TFLOP/s; anchor paths: {anchor_paths or 'none'}")
    print(f"{'model':6s} {'micro':>5s} | {'ours tok/s':>10s} {'MFU':>6s} {'GiB':>6s} | "
          f"{'anchor tok/s':>12s} {'GiB':>6s} | {'fused tok/s':>11s} {'GiB':>6s} | {'x best':>6s}"
          + (f" | {'graph tok/s':>10s} {'MFU':>6s} {'GiB':>6s} {'x best':>6s}" if args.graph else ""))
    out = results_path("train", gpu)
    rows = []
    for name in args.models:
        d_model, n_layer, micro = MODELS[name]
        micro = args.micro_batch or micro
        tokens = micro * SEQ

        recompute = args.recompute or shipped_recompute(name)

        def build_ours():
            model = ours(name, recompute)
            return model.cuda(), param_groups(model, 0.1)

        results = {"ours": run_one(build_ours, random_batch(micro), args.warmup, args.steps)}
        if args.graph:
            results["graph"] = run_one(build_ours, random_batch(micro), args.warmup, args.steps, graphed=True)
        for path in anchor_paths:
            def build_anchor(fused=path == "fused"):
                model = AnchorLM(d_model, n_layer, 50304, fused).cuda()
                return model, param_groups(model, 0.1)
            results[path] = run_one(build_anchor, random_batch(micro), args.warmup, args.steps)
        cfg = ModelConfig(d_model=d_model, n_layer=n_layer, vocab_size=VOCAB)
        flops = training_flops_per_token(cfg, cfg.padded_vocab_size()) * tokens
        rate = {k: (tokens / v[0] if isinstance(v, tuple) else None) for k, v in results.items()}
        mem = {k: (v[1] if isinstance(v, tuple) else None) for k, v in results.items()}
        cpu = {k: (1e3 * v[2] if isinstance(v, tuple) else None) for k, v in results.items()}
        best_anchor = max((rate[p] for p in anchor_paths if rate.get(p)), default=None)
        row = dict(model=name, micro_batch=micro, seqlen=SEQ, gpu=gpu, peak_tflops=peak / 1e12,
                   ours_recompute=recompute, ours_tokens_per_s=rate["ours"],
                   anchor_tokens_per_s=rate.get("unfused"), anchor_fused_tokens_per_s=rate.get("fused"),
                   ours_mfu=rate["ours"] and flops / tokens * rate["ours"] / peak,
                   anchor_mfu=best_anchor and flops / tokens * best_anchor / peak,
                   ours_peak_gib=mem["ours"], anchor_peak_gib=mem.get("unfused"),
                   ours_enqueue_ms=cpu.get("ours"), ours_graph_tokens_per_s=rate.get("graph"),
                   ours_graph_peak_gib=mem.get("graph"),
                   ours_graph_mfu=rate.get("graph") and flops / tokens * rate["graph"] / peak,
                   graph_over_best_anchor=best_anchor and rate.get("graph") and rate["graph"] / best_anchor,
                   anchor_fused_peak_gib=mem.get("fused"),
                   errors={k: v for k, v in results.items() if not isinstance(v, tuple)} or None)
        rows.append(row)
        f = (lambda v, w, d=0: f"{v:{w}.{d}f}" if v is not None else f"{'-':>{w}s}")
        print(f"{name:6s} {micro:5d} | {f(rate['ours'], 10)} {f(row['ours_mfu'] and 100 * row['ours_mfu'], 5, 1)}% "
              f"{f(mem['ours'], 6, 1)} | {f(rate.get('unfused'), 12)} {f(mem.get('unfused'), 6, 1)} | "
              f"{f(rate.get('fused'), 11)} {f(mem.get('fused'), 6, 1)} | "
              f"{f(best_anchor and rate['ours'] and rate['ours'] / best_anchor, 6, 2)}"
              + (f" | {f(rate.get('graph'), 10)} {f(row['ours_graph_mfu'] and 100 * row['ours_graph_mfu'], 5, 1)}% "
                 f"{f(mem.get('graph'), 6, 1)} {f(row['graph_over_best_anchor'], 6, 2)}" if args.graph else ""), flush=True)
        print(f"#   {name}: ours' CPU time to enqueue a step {f(cpu['ours'], 0, 1)} ms of "
              f"{f(results['ours'][0] * 1e3 if cpu['ours'] else None, 0, 1)} ms", flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(rows, indent=1) + "\n")
    print(f"# x best: ours / the anchor's faster path; wrote {out}")


if __name__ == "__main__":
    main()
