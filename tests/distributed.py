"""The one helper that multi-process tests use: spawn gloo workers, and count collectives.

`run_workers(fn, world, *args)` starts `world` processes running `fn(rank, world, *args)`
in a fresh gloo process group; a worker's exception (an assertion) fails the test with
its traceback. Workers compare against the single-process model themselves (each builds
it from the same seed), so nothing but pass/fail crosses the process boundary.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
import sys
import traceback
import warnings
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, fn, world, port, args, backend):
    # what torchrun sets (DeepSpeed reads LOCAL_RANK)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    # 2 shared cores, up to 8 processes: one thread each or they thrash
    torch.set_num_threads(1)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    # a collective that one rank skips must fail the test, not hang it
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=90))
    try:
        fn(rank, world, *args)
    except BaseException:
        # Report and leave without the teardown: destroying the process group waits for the
        # other ranks, which may sit in a collective this rank will never join. On two GPUs a
        # failed assertion hung there, its traceback unprinted, until the call's time limit.
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


def run_workers(fn, world: int, *args, backend: str = "gloo") -> None:
    # gloo: fork, not spawn: each child would otherwise re-import torch, megatron-core and
    # DeepSpeed (seconds each, times 8 processes on 2 cores). Safe here: CPU only, and each
    # child runs one thread, so no OpenMP pool is shared across the fork. nccl (one GPU a
    # rank): spawn, since CUDA cannot be used in a forked child once the parent has used it.
    os.environ["DS_ACCELERATOR"] = "cpu" if backend == "gloo" else "cuda"   # read by DeepSpeed's import in the workers
    with warnings.catch_warnings():  # megatron's import-time notes about optional Apex / TE
        warnings.simplefilter("ignore")
        import megatron.core.tensor_parallel  # noqa: F401  (imported once, before the fork)

    torch.multiprocessing.start_processes(_entry, args=(fn, world, _free_port(), args, backend), nprocs=world,
                                          join=True, start_method="fork" if backend == "gloo" else "spawn")


# ----------------------------------------------------------------------------- counting

_COLLECTIVES = ("all_reduce", "all_gather_into_tensor", "_all_gather_base", "all_gather", "reduce_scatter_tensor",
                "_reduce_scatter_base", "reduce_scatter", "all_to_all_single", "broadcast", "send", "recv", "isend",
                "irecv")


def save_rank_results(root, rank: int, results: dict) -> None:
    """A worker's findings, as JSON for the test process to read (load_rank_results)."""
    (Path(root) / f"rank{rank}.json").write_text(json.dumps(results))


def load_rank_results(root, world: int) -> list[dict]:
    return [json.loads((Path(root) / f"rank{rank}.json").read_text()) for rank in range(world)]


def _nbytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    return 0


class CollectiveLog:
    def __init__(self):
        self.calls: list[tuple[str, int]] = []
        # (name, shapes of its tensor arguments: (output, input) for the all-gathers and
        # reduce-scatters into one tensor)
        self.shapes: list[tuple[str, tuple[tuple[int, ...], ...]]] = []

    def counts(self) -> Counter:
        return Counter(name for name, _ in self.calls)

    def bytes(self) -> int:
        return sum(size for _, size in self.calls)


@contextlib.contextmanager
def count_collectives():
    """Record every torch.distributed collective (name, bytes of its first tensor argument:
    what this rank sends or reduces; and, in `shapes`, its tensor arguments' shapes).
    megatron-core binds some functions at import (`dist_all_gather_func`,
    `dist_reduce_scatter_func` in mappings and layers), so those aliases are wrapped too."""
    from megatron.core.tensor_parallel import layers, mappings

    log = CollectiveLog()
    patched = []

    def wrap(owner, attr, name):
        original = getattr(owner, attr)

        def counted(*args, **kwargs):
            # all_gather_into_tensor / reduce_scatter_tensor: (output, input); count the input
            sent = args[1] if name in ("all_gather_into_tensor", "_all_gather_base", "reduce_scatter_tensor",
                                       "_reduce_scatter_base", "all_gather", "reduce_scatter",
                                       "all_to_all_single") else args[0]
            log.calls.append((name, _nbytes(sent)))
            log.shapes.append((name, tuple(tuple(a.shape) for a in args if isinstance(a, torch.Tensor))))
            return original(*args, **kwargs)

        setattr(owner, attr, counted)
        patched.append((owner, attr, original))

    for name in _COLLECTIVES:
        if hasattr(dist, name):
            wrap(dist, name, name)
    for module in (mappings, layers):
        for alias in ("dist_all_gather_func", "dist_reduce_scatter_func"):
            wrap(module, alias, getattr(module, alias).__name__)
    try:
        yield log
    finally:
        for owner, attr, original in reversed(patched):
            setattr(owner, attr, original)


# ----------------------------------------------------------------------------- tiny models


def tiny_config(ngroups: int = 2, n_layer: int = 2):
    from mamba_train.config import ModelConfig

    # nheads = expand·d_model / headdim = 4; chunk 8 so a 32-token sequence has 4 chunks
    return ModelConfig(d_model=16, n_layer=n_layer, d_state=8, d_conv=4, expand=2, headdim=8, ngroups=ngroups,
                       chunk_size=8, vocab_size=50)


def tiny_batch(cfg, batch: int, seq_len: int, doc_starts: list[list[int]], seed: int = 0):
    """input_ids, labels, seq_idx (batch, seq_len); row i's documents start at doc_starts[i]."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq_len + 1), generator=gen)
    seq_idx = torch.zeros(batch, seq_len, dtype=torch.int32)
    for row, starts in enumerate(doc_starts):
        for start in starts:
            seq_idx[row, start:] += 1
    return tokens[:, :-1], tokens[:, 1:], seq_idx


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5, what: str = "") -> None:
    """max |a - e| <= rel · max |e|: a relative bound on the whole tensor, as the issue states it."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    scale = expected.abs().max().item()
    error = (actual - expected).abs().max().item()
    assert error <= rel * max(scale, 1e-30), f"{what}: max error {error:.3e} > {rel} · {scale:.3e}"


def assert_grads_close(named_grads: dict, expected: dict, rel: float = 1e-5, rel_each: float = 3e-4) -> None:
    """All gradients together within `rel` (norm of the difference over the norm), and each
    tensor within `rel_each` (max-relative). Why two bounds: a few tiny per-head gradients
    (D with one head per rank) are sums of hundreds of cancelling fp32 terms. Measured
    against a float64 copy of the tiny model at TP=4: the single-process fp32 model is up
    to 2.8e-5 away on D, the TP=4 one up to 1.4e-4 (its partial sums are added in another
    order), so two fp32 summation orders cannot agree to 1e-5 there."""
    diff = sum((named_grads[k] - expected[k]).double().pow(2).sum() for k in named_grads).sqrt().item()
    norm = sum(expected[k].double().pow(2).sum() for k in named_grads).sqrt().item()
    assert diff <= rel * norm, f"all gradients: |diff| {diff:.3e} > {rel} · |grad| {norm:.3e}"
    for name, grad in named_grads.items():
        assert_close(grad, expected[name], rel=rel_each, what=f"grad of {name}")


def check_eager_and_replayed(run, check, fresh_inputs, lags, replays=3, describe=str):
    """A GPU exchange's test with a lagging rank: `run(inputs, lag)` on fresh inputs eagerly, with
    no lag and with each of `lags`, then captured in a CUDA graph for each lag and replayed
    `replays` times on fresh inputs copied into the captured ones; `check(outputs, inputs,
    what)` after each. describe(lag) names a lag in the messages."""
    from mamba_train.train.cuda_graph import capture_graph

    for lag in (None, *lags):
        inputs = fresh_inputs()
        check(run(inputs, lag), inputs, f"eager, {describe(lag)}")
    for lag in lags:
        static = fresh_inputs()
        graph, outs = capture_graph(lambda s: run(s, lag), static, warmup=1)
        for replay in range(replays):
            inputs = fresh_inputs()
            for key in static:
                static[key].copy_(inputs[key])
            graph.replay()
            check(outs, inputs, f"replay {replay}, {describe(lag)}")
    torch.cuda.synchronize()
