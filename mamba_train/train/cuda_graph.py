"""A micro-batch's forward and backward replayed from a CUDA graph (train.cuda_graph).

An eager step enqueues a few thousand kernels, and at 370m their Python launch path takes
almost as long as the GPU runs them (bench/results/train-*.json: ours_enqueue_ms); a replay
is one launch. The recipe is PyTorch's for whole networks: warm-up calls on a side stream
(Triton compiles, the allocator settles, NCCL's communicators start), then the capture;
every replay reads its batch from static input buffers.

Two ways to hand the captured gradients on:
- `GraphedMicroStep` (one process): the captured backward leaves the gradients in `.grad`,
  as eager backward does. The first micro-batch of an optimizer step replays a graph captured
  with every `.grad` None, so its backward writes the gradients (into tensors of the graph's
  pool, which then stay the parameters' `.grad`); later micro-batches replay a second graph,
  captured with those gradients present, that adds into them. So nothing zeroes them between
  steps and nothing reads them before the first backward: at 1.3b a zeroing pass and an add
  pass over 5.4 GB of fp32 gradients a step (about 7 ms on an H100), and the gradients are
  allocated as the activations die, as after eager backward with set_to_none, instead of
  beside them (bench/results/train-*.json: ours_graph_peak_gib). The two graphs share one
  memory pool: they never run at once.
- `GraphedLoss` (a DeepSpeed engine): the graph computes the loss and the gradients into
  buffers of its own, and an autograd op over the parameters hands them on when the engine's
  backward runs. Every parameter then receives its gradient as after an eager backward, so
  the engine's gradient hooks, accumulation, reduction and step run unchanged, eagerly,
  outside the graph: nothing in DeepSpeed has to be capturable.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def capture_graph(fn: Callable[[dict], object], static: dict, warmup: int, before_capture: Callable[[], None] = None,
                  pool=None):
    """(graph, fn(static) as captured): fn warmed up on a side stream, then captured, into the
    memory pool of an earlier graph where `pool` (its `pool()`) is given. before_capture runs
    between the two (on the capturing stream's side of the join)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn(static)
    torch.cuda.current_stream().wait_stream(side)
    if before_capture is not None:
        before_capture()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = fn(static)
    return graph, out


def _copy_into(static: dict, batch: dict) -> None:
    for key, value in batch.items():
        buffer = static[key]
        if value.shape != buffer.shape:
            raise ValueError(f"train.cuda_graph: batch {key!r} has shape {tuple(value.shape)}, the captured step "
                             f"{tuple(buffer.shape)}; a graph replays fixed shapes (turn train.cuda_graph off for "
                             "batches that vary)")
        buffer.copy_(value, non_blocking=True)


class GraphedMicroStep:
    """`forward_backward(batch) -> detached loss` captured on `example` and replayed for every
    later batch of the same shapes: the first micro-batch of an optimizer step writes the
    parameters' gradients, later ones (`accumulate=True`; captured only where `accumulation`
    says they will come) add into them, as eager backward does. The optimizer steps on them
    and must leave them in place (no zero_grad: the next first replay overwrites them).
    `forward_backward` must run autocast with cache_enabled=False: the cache must not hold
    casts across the capture's boundary."""

    def __init__(self, forward_backward: Callable[[dict], torch.Tensor], model: nn.Module, example: dict,
                 accumulation: bool = False, warmup: int = 3):
        self.static = {k: v.clone() for k, v in example.items()}
        self.params = [p for p in model.parameters() if p.requires_grad]

        def drop_grads():   # so that the captured backward creates them
            for p in self.params:
                p.grad = None

        self.first, first_loss = capture_graph(forward_backward, self.static, warmup, before_capture=drop_grads)
        # the gradients the first graph writes (None where a parameter gets none): the
        # parameters must keep these very tensors, or the replays write where nothing reads
        self.grads = [p.grad for p in self.params]
        self.losses = {False: first_loss}
        self.accumulating = None
        if accumulation:   # its warm-up adds into the first graph's gradients: any values are overwritten
            self.accumulating, self.losses[True] = capture_graph(forward_backward, self.static, 1,
                                                                 pool=self.first.pool())

    def __call__(self, batch: dict, accumulate: bool = False) -> torch.Tensor:
        """Replay on `batch`, writing the gradients, or adding into them with `accumulate`; returns
        the loss tensor that the next replay (of either graph) overwrites."""
        if accumulate and self.accumulating is None:
            raise ValueError("GraphedMicroStep: accumulate=True needs the accumulating graph, captured with "
                             "accumulation=True")
        if any(p.grad is not g for p, g in zip(self.params, self.grads)):
            raise RuntimeError("train.cuda_graph: a parameter's .grad was replaced or set to None after the capture "
                               "(zero_grad?); the captured backward writes into the gradients it created, so they "
                               "must stay in place")
        _copy_into(self.static, batch)
        (self.accumulating if accumulate else self.first).replay()
        return self.losses[accumulate]


class GraphedLoss:
    """`loss_fn(module, batch)` (a scalar) and its gradients for the module's trainable
    parameters, computed together on each call, from one CUDA graph captured on `example` (or
    eagerly with capture=False: the same hand-over without a graph, which the CPU tests check
    against a plain backward).

    The call returns the loss as the output of one autograd op over the parameters; its
    backward gives each parameter the computed gradient times the incoming one. `scale` is the
    incoming gradient expected (an engine's 1/accum): the graph's backward starts from it, as
    the engine's own backward would, and the hand-over then multiplies by incoming / scale,
    exactly 1 in the gradients' dtype, which keeps torch's multi-tensor kernel on its fast
    path (a float32 factor on bf16 gradients would take one kernel per tensor). Backward must
    run before the next call, whose replay overwrites the gradients."""

    def __init__(self, module: nn.Module, loss_fn: Callable[[nn.Module, dict], torch.Tensor], example: dict,
                 capture: bool = True, warmup: int = 3, scale: float = 1.0):
        self.module, self.loss_fn, self.capture, self.scale = module, loss_fn, capture, scale
        self.names, self.params = zip(*[(n, p) for n, p in module.named_parameters() if p.requires_grad])
        self.calls = 0   # which call's gradients the buffers hold
        if capture:
            self.static = {k: v.clone() for k, v in example.items()}
            self.graph, (self.loss, self.grads) = capture_graph(self._loss_and_grads, self.static, warmup)

    def _loss_and_grads(self, batch: dict) -> tuple[torch.Tensor, list[torch.Tensor]]:
        # The gradients are taken with respect to views of the parameters, which the module
        # computes with in their place (autograd.grad, not backward, also leaves .grad and the
        # parameters' hooks alone). A backward that reached the parameters themselves would end in
        # their gradient accumulators: DeepSpeed keeps those alive from its setup, tied to the
        # default stream, and a captured backward that fed them would make the default stream
        # wait on the capture, which CUDA refuses. (_reparametrize_module is the context manager
        # behind torch.func.functional_call, which would call the module's forward, not loss_fn.)
        views = {name: p.view_as(p) for name, p in zip(self.names, self.params)}
        with torch.nn.utils.stateless._reparametrize_module(self.module, views):
            loss = self.loss_fn(self.module, batch)
        scaled = loss if self.scale == 1 else loss * self.scale
        grads = torch.autograd.grad(scaled, list(views.values()), allow_unused=True)
        return loss.detach(), [torch.zeros_like(p) if g is None else g for p, g in zip(self.params, grads)]

    def release(self) -> None:
        """Free the graph. Before its process group is destroyed: NCCL cannot destroy a
        communicator that a live graph has captured, and destroy_process_group hangs
        (pytorch/pytorch#115388)."""
        if self.capture:
            torch.cuda.synchronize()
            self.graph.reset()
            self.capture = False
        self.static = self.loss = self.grads = None

    def __call__(self, batch: dict) -> torch.Tensor:
        if self.capture:
            _copy_into(self.static, batch)
            self.graph.replay()
            loss, grads = self.loss, self.grads
        else:
            loss, grads = self._loss_and_grads(batch)
        self.calls += 1
        return _HandOver.apply(self, self.calls, loss, grads, *self.params)


class _HandOver(torch.autograd.Function):
    """loss (already computed, with its gradients) → the same loss as a function of the
    parameters, whose backward returns those gradients."""

    @staticmethod
    def forward(ctx, graphed: GraphedLoss, call: int, loss: torch.Tensor, grads: list[torch.Tensor], *params):
        ctx.graphed, ctx.call, ctx.grads = graphed, call, grads
        return loss.clone()   # the graph overwrites its own loss on the next replay

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.graphed.calls != ctx.call:
            raise RuntimeError("train.cuda_graph: a micro-batch's backward ran after the next micro-batch's forward, "
                               "which overwrote its gradients (call backward once after each forward)")
        # new tensors: the parameters' .grad may keep what they are given, and the buffers are reused
        factor = (grad_loss / ctx.graphed.scale).to(ctx.grads[0].dtype)
        return (None, None, None, None, *torch._foreach_mul(ctx.grads, factor))
