"""A micro-batch's forward and backward replayed from a CUDA graph (train.cuda_graph).

An eager step enqueues a few thousand kernels, and at 370m their Python launch path takes
almost as long as the GPU runs them (bench/results/train-*.json: ours_enqueue_ms); a replay
is one launch. The recipe is PyTorch's for whole networks: warm-up calls on a side stream
(Triton compiles, the allocator settles, NCCL's communicators start), then the capture;
every replay reads its batch from static input buffers.

Two ways to hand the captured gradients on:
- `GraphedMicroStep` (one process): the gradients exist, zeroed, before the capture, so the
  captured backward adds into them. Replays accumulate over micro-batches as eager backward
  does, and the trainer zeroes them in place after each optimizer step (setting them to None
  would orphan the buffers the graph writes). Nothing runs outside the graph.
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


def capture_graph(fn: Callable[[dict], object], static: dict, warmup: int, before_capture: Callable[[], None] = None):
    """(graph, fn(static) as captured): fn warmed up on a side stream, then captured.
    before_capture runs between the two (on the capturing stream's side of the join)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn(static)
    torch.cuda.current_stream().wait_stream(side)
    if before_capture is not None:
        before_capture()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
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
    """`forward_backward(batch) -> detached loss` captured once on `example` and replayed for
    every later batch of the same shapes. `forward_backward` must run autocast with
    cache_enabled=False: the cache must not hold casts across the capture's boundary."""

    def __init__(self, forward_backward: Callable[[dict], torch.Tensor], model: nn.Module, example: dict,
                 warmup: int = 3):
        self.static = {k: v.clone() for k, v in example.items()}
        params = [p for p in model.parameters() if p.requires_grad]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        self.graph, self.loss = capture_graph(forward_backward, self.static, warmup,
                                              before_capture=lambda: torch._foreach_zero_([p.grad for p in params]))

    def __call__(self, batch: dict) -> torch.Tensor:
        """Replay on `batch`; returns the loss tensor the graph overwrites on its next replay."""
        _copy_into(self.static, batch)
        self.graph.replay()
        return self.loss


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
