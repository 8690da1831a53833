"""Forward and backward of one micro-batch replayed from a CUDA graph (train.cuda_graph).

An eager step enqueues a few thousand kernels, and at 370m their Python launch path takes
almost as long as the GPU runs them (bench/results/train-*.json: ours_enqueue_ms); a replay
is one launch. The recipe is PyTorch's for whole networks: warm-up calls on a side stream
(Triton compiles, the allocator settles), then the capture; every replay reads its batch
from static input buffers.

The gradients exist (zeroed) before the capture, so the captured backward adds into them:
replays accumulate over micro-batches as eager backward does, and the trainer zeroes them in
place after each optimizer step. Setting them to None would orphan the buffers the graph
writes.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


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
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                forward_backward(self.static)
        torch.cuda.current_stream().wait_stream(side)
        torch._foreach_zero_([p.grad for p in params])
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.loss = forward_backward(self.static)

    def __call__(self, batch: dict) -> torch.Tensor:
        """Replay on `batch`; returns the loss tensor the graph overwrites on its next replay."""
        for key, value in batch.items():
            static = self.static[key]
            if value.shape != static.shape:
                raise ValueError(f"train.cuda_graph: batch {key!r} has shape {tuple(value.shape)}, the captured step "
                                 f"{tuple(static.shape)}; a graph replays fixed shapes (turn train.cuda_graph off for "
                                 "batches that vary)")
            static.copy_(value, non_blocking=True)
        self.graph.replay()
        return self.loss
