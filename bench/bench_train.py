"""End-to-end training speed on one GPU: our Mamba2LM beside a plain LM of mamba_ssm's Mamba2 blocks.

Both run the same step (issue 9): fp32 parameters, bf16 autocast, fused AdamW, gradient
clipping at 1.0, seq 2048, the same token batch, the same padded vocabulary (tied head).
The anchor is mamba_ssm 2.3.2.post1's `Block(Mamba2)` with its Triton RMSNorm (fused add,
residual in fp32), on its unfused path (torch conv1d, `use_mem_eff_path=False`) and, when
the causal_conv1d extension imports, also on its fused path. Tokens/s are medians over the
timed steps after warm-up; MFU = model FLOPs (mamba_train.model.flops, the definition of
issue 9) / step time / the bf16 matmul rate measured in this run.

    PYTHONPATH=.anchor:. python bench/bench_train.py [--models 130m 370m 1.3b] [--profile]

Writes bench/results/train-<gpu>.json. `--profile` prints where one step of ours spends its
CUDA time instead (per kernel, and summed by kind).
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mamba_train.config import ModelConfig  # noqa: E402
from mamba_train.model import Mamba2LM, param_groups  # noqa: E402
from mamba_train.model.flops import training_flops_per_token  # noqa: E402
from mamba_train.train.metrics import measured_matmul_peak  # noqa: E402

VOCAB = 50277   # GPT-NeoX's tokenizer, as the Mamba papers; padded to 50304 for both models
# name: (d_model, n_layer, micro_batch) — issue 9's table
MODELS = {"130m": (768, 24, 16), "370m": (1024, 48, 8), "1.3b": (2048, 48, 4)}
SEQ = 2048


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

    def loss(self, input_ids, labels):
        hidden, residual = self.embedding(input_ids), None
        for layer in self.layers:
            hidden, residual = layer(hidden, residual)
        hidden = self.norm_f((hidden + residual).to(self.norm_f.weight.dtype))
        logits = F.linear(hidden, self.embedding.weight)
        return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())


def ours(d_model, n_layer):
    cfg = ModelConfig(d_model=d_model, n_layer=n_layer, vocab_size=VOCAB)
    return Mamba2LM(cfg), cfg


def make_step(model, groups):
    optimizer = torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)

    def step(input_ids, labels):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model.loss(input_ids, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step


def time_steps(step, batch, warmup, steps):
    for _ in range(warmup):
        step(*batch)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        step(*batch)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return statistics.median(times), torch.cuda.max_memory_allocated() / 2**30


def run_one(build, batch, warmup, steps):
    """(step seconds, peak GiB), or the error's text when it does not fit or fails."""
    model = step = None
    try:
        model, groups = build()
        step = make_step(model, groups)
        return time_steps(step, batch, warmup, steps)
    except torch.OutOfMemoryError:
        return "out of memory"
    finally:
        del model, step
        gc.collect()
        torch.cuda.empty_cache()


def profile(name, warmup=3):
    from torch.profiler import ProfilerActivity, profile as torch_profile
    d_model, n_layer, micro = MODELS[name]
    model, _ = ours(d_model, n_layer)
    model.cuda()
    step = make_step(model, param_groups(model, 0.1))
    batch = random_batch(micro, model.vocab_size)
    for _ in range(warmup):
        step(*batch)
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(2):
            step(*batch)
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    total = sum(e.self_device_time_total for e in events)
    kinds = defaultdict(float)
    for e in events:
        kinds[_kind(e.key)] += e.self_device_time_total
    print(f"# ours, {name}, micro {micro} x {SEQ}: CUDA time of 2 steps {total / 1e3:.1f} ms "
          f"(wall per step measured separately)")
    for kind, us in sorted(kinds.items(), key=lambda kv: -kv[1]):
        print(f"  {kind:28s} {us / 2e3:8.2f} ms/step  {100 * us / total:5.1f}%")
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=30, max_name_column_width=70))


def _kind(kernel):
    k = kernel.lower()
    for label, needles in (("ssd (ours, triton)", ("_chunk_", "_bmm_", "_state_passing", "_gate_bwd")),
                           ("conv1d", ("conv",)), ("matmul", ("gemm", "cutlass", "sm90", "xmma", "matmul")),
                           ("cross-entropy/softmax", ("softmax", "nll", "cross_entropy", "log_softmax")),
                           ("optimizer", ("adam", "multi_tensor", "foreach")),
                           ("norm (rms, gated)", ("rms", "norm", "layer_norm")),
                           ("copies/casts", ("copy", "cast", "to_copy", "cat", "fill"))):
        if any(n in k for n in needles):
            return label
    return "elementwise/other"


def random_batch(micro, vocab):
    gen = torch.Generator(device="cuda").manual_seed(0)
    ids = torch.randint(0, VOCAB, (micro, SEQ + 1), device="cuda", generator=gen)
    return ids[:, :-1].contiguous(), ids[:, 1:].contiguous()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--no-anchor", action="store_true")
    parser.add_argument("--profile", action="store_true", help="per-kernel profile of ours at the first model")
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    if args.profile:
        return profile(args.models[0])
    gpu = torch.cuda.get_device_name()
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
          f"{'anchor tok/s':>12s} {'GiB':>6s} | {'fused tok/s':>11s} {'GiB':>6s} | {'x best':>6s}")
    out = Path(__file__).resolve().parent / "results" / f"train-{re.sub(r'[^A-Za-z0-9]+', '-', gpu).strip('-').lower()}.json"
    rows = []
    for name in args.models:
        d_model, n_layer, micro = MODELS[name]
        tokens = micro * SEQ

        def build_ours():
            model, _ = ours(d_model, n_layer)
            return model.cuda(), param_groups(model, 0.1)

        results = {"ours": run_one(build_ours, random_batch(micro, 0), args.warmup, args.steps)}
        for path in anchor_paths:
            def build_anchor(fused=path == "fused"):
                model = AnchorLM(d_model, n_layer, 50304, fused).cuda()
                return model, param_groups(model, 0.1)
            results[path] = run_one(build_anchor, random_batch(micro, 0), args.warmup, args.steps)
        cfg = ModelConfig(d_model=d_model, n_layer=n_layer, vocab_size=VOCAB)
        flops = training_flops_per_token(cfg, cfg.padded_vocab_size()) * tokens
        rate = {k: (tokens / v[0] if isinstance(v, tuple) else None) for k, v in results.items()}
        mem = {k: (v[1] if isinstance(v, tuple) else None) for k, v in results.items()}
        best_anchor = max((rate[p] for p in anchor_paths if rate.get(p)), default=None)
        row = dict(model=name, micro_batch=micro, seqlen=SEQ, gpu=gpu, peak_tflops=peak / 1e12,
                   ours_tokens_per_s=rate["ours"], anchor_tokens_per_s=rate.get("unfused"),
                   anchor_fused_tokens_per_s=rate.get("fused"),
                   ours_mfu=rate["ours"] and flops / tokens * rate["ours"] / peak,
                   anchor_mfu=best_anchor and flops / tokens * best_anchor / peak,
                   ours_peak_gib=mem["ours"], anchor_peak_gib=mem.get("unfused"),
                   anchor_fused_peak_gib=mem.get("fused"),
                   errors={k: v for k, v in results.items() if not isinstance(v, tuple)} or None)
        rows.append(row)
        f = (lambda v, w, d=0: f"{v:{w}.{d}f}" if v is not None else f"{'-':>{w}s}")
        print(f"{name:6s} {micro:5d} | {f(rate['ours'], 10)} {f(row['ours_mfu'] and 100 * row['ours_mfu'], 5, 1)}% "
              f"{f(mem['ours'], 6, 1)} | {f(rate.get('unfused'), 12)} {f(mem.get('unfused'), 6, 1)} | "
              f"{f(rate.get('fused'), 11)} {f(mem.get('fused'), 6, 1)} | "
              f"{f(best_anchor and rate['ours'] and rate['ours'] / best_anchor, 6, 2)}", flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(rows, indent=1) + "\n")
    print(f"# x best: ours / the anchor's faster path; wrote {out}")


if __name__ == "__main__":
    main()
