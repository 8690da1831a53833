"""Sequence parallelism (Megatron's SP, Korthikanti et al. 2022, "Reducing Activation
Recomputation in Large Transformer Models" §4.2.2) for our batch-first model.

Between the mixers (the embedding, the norms, the residual add: all per token) each TP rank
holds 1/tp of the residual stream's tokens instead of all of them. in_proj all-gathers them
and out_proj reduce-scatters its partial sums instead of all-reducing them: the same bytes
as plain TP, and 1/tp of the activations between the blocks.

Since nothing between the mixers mixes tokens, any split of them works. megatron's
collectives (gather_from_sequence_parallel_region, reduce_scatter_to_sequence_parallel_region,
and those inside its column- and row-parallel linears) all split dim 0, megatron's sequence
dim. Our residual stream is batch-first, (batch, seqlen, d), so `TokenSplit` splits it

- by batch rows when the micro-batch is a multiple of tp: rank r holds rows
  [r·b/tp, (r+1)·b/tp), a dim-0 slice, and every collective takes the batch-first tensor as
  it is;
- else by the sequence (this rank's local_len a multiple of tp): rank r holds tokens
  [r·L/tp, (r+1)·L/tp) of every row, and each collective's input is transposed to seq-first
  and copied. Those copies cost more than SP saved at 1.3b on 2 H100s (docs/design-notes.md),
  so this is the fallback, for batches the rows cannot split (micro-batch 1, the last
  evaluation batch).

The choice is made once per forward (the batch differs between training and evaluation) in
`TokenSplit.begin`, and every SP site reads it from the one shared object. The mixers see the
whole batch and sequence (after in_proj's gather), so context parallelism and seq_idx, which
only the mixers read, are the same under either split.

With `parallel.tp_comm_overlap` and the rows split, in_proj's gather and out_proj's scatter
(forward and backward) go inside their matmuls: `gather_matmul` (in_proj's forward, out_proj's
backward) and `matmul_parts` (out_proj's forward, in_proj's backward) run over torch's
symmetric memory (`SymmetricExchange`, after torch's "async TP" ops): each product is cut by the
ranks' rows, and one rank's rows are copied over NVLink (copy engines, no SMs taken) while
another's are multiplied. `matmul_parts` stops before the scatter's sum, which a norm makes in
the pass it makes anyway (kernels.add_rmsnorm): the next one (the next block's, or norm_f) sums
out_proj's terms into the stream, and a block norm's backward sums in_proj's terms of its
output's gradient (`out_parts`; the first block's norm adds no update and gets the sum,
`matmul_scatter`). NCCL's collectives instead sat between the matmuls, 16.6 ms of a 123 ms
TP=2 step at 1.3b. Elsewhere (on the CPU, in the gloo tests) the same functions run the plain
collectives, so the tests check the fused path's autograd against one process.
"""

from __future__ import annotations

import warnings

import torch

from kernels.reference.norm import gathered_base
from kernels.wide_matmul import matmul_in_dtype
from mamba_train.model.mamba2 import RMSNorm
from mamba_train.parallel.symmetric_exchange import SymmetricExchange


class TokenSplit:
    """Which tokens of the batch-first residual stream this TP rank holds under SP. One object
    is shared by every SP site of a model: the embedding's reduce-scatter, each block's in_proj
    (gather) and out_proj (reduce-scatter, or the exchange of its terms), and the gather before
    the head. With `uses_collective_products()` in_proj is `linear` (backward `matmul_parts`)
    and the mixer body's out_proj product `matmul_parts` (backward `gather_matmul`): each
    collective goes with its matmul.

    `begin(batch, local_len)` runs at the start of each forward (ParallelMamba2LM.hidden_states)
    and sets `dim`; a recomputing backward (train.recompute) reads it again, so a forward's
    backward runs before the next forward, as for ContextParallel."""

    BATCH_ROWS, SEQUENCE = 0, 1

    def __init__(self, tp_group, overlap: bool = False):
        self.tp_group = tp_group
        self.tp, self.rank = tp_group.size(), tp_group.rank()
        self.dim: int | None = None   # of (batch, seqlen, d): BATCH_ROWS or SEQUENCE, set by begin
        # parallel.tp_comm_overlap: split by batch rows, in_proj's gather and out_proj's scatter
        # go with their matmuls (`gather_matmul`, `matmul_parts`, `matmul_scatter`), overlapped on CUDA
        self.overlap = overlap
        self._exchange: SymmetricExchange | None = None   # made by prepare_overlap, on CUDA
        self._captured = False   # whether a CUDA graph may hold the workspace's address

    def begin(self, batch: int, local_len: int) -> None:
        if batch % self.tp == 0:
            self.dim = self.BATCH_ROWS
        elif local_len % self.tp == 0:
            self.dim = self.SEQUENCE
        else:
            raise ValueError(f"sequence parallelism splits each forward's tokens over tp={self.tp} ranks, by batch "
                             f"rows (the batch, {batch}, must be a multiple of tp) or else by the sequence (this "
                             f"rank's {local_len} tokens a row must be a multiple of tp): neither is")

    def prepare_overlap(self, residual: torch.Tensor) -> None:
        """Before the blocks of a forward (residual: this rank's rows of the fp32 residual
        stream): the symmetric workspace the fused products share (SymmetricExchange), two
        regions each the size of the residual, the largest piece an exchange stages, and the
        fence that starts this forward's sequence of exchanges. Growing the workspace is
        collective and cannot happen inside a CUDA graph's capture: the first (eager) forward
        grows it, the captured ones find it."""
        if not self._overlaps(residual):
            return
        region_bytes = residual.numel() * residual.element_size()
        fits = self._exchange is not None and region_bytes <= self._exchange.region_bytes
        if torch.cuda.is_current_stream_capturing():
            if not fits:
                raise RuntimeError("tp_comm_overlap: run an eager forward of the captured batch's shape before "
                                   "capturing it: the symmetric workspace cannot grow inside a capture")
            self._captured = True
        elif not fits:
            if self._captured:
                # a larger workspace would free the one the graph writes to
                raise RuntimeError(f"tp_comm_overlap: a forward of {tuple(residual.shape)} rows a rank needs a "
                                   "larger symmetric workspace than the CUDA graph captured before it; capture the "
                                   "largest batch first, or turn train.cuda_graph off")
            from torch.distributed import _symmetric_memory as symm_mem

            with warnings.catch_warnings():
                # torch 2.11 and later (the GPU image, CI) warn that the call is no longer needed; older ones need it
                warnings.simplefilter("ignore", FutureWarning)
                symm_mem.enable_symm_mem_for_group(self.tp_group.group_name)
            self._exchange = SymmetricExchange(self.tp_group.group_name, region_bytes)
        self._exchange.fence()

    def uses_collective_products(self) -> bool:
        """Whether in_proj's gather and out_proj's scatter go with their matmuls in this forward
        (gather_matmul, matmul_parts; in_proj's backward matmul_parts, or matmul_scatter after
        a norm that adds no update): with `overlap`, split by batch rows. On CUDA each
        collective then overlaps its product; elsewhere (the gloo tests) the same functions run
        the plain collectives."""
        return self.overlap and self.dim == self.BATCH_ROWS

    def _overlaps(self, x: torch.Tensor) -> bool:
        return self.uses_collective_products() and x.is_cuda

    def gather_matmul(self, local: torch.Tensor, w_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """local: this rank's batch rows (b/tp, L, k), contiguous; w_t: (k, n) → (every rank's rows
        (b, L, k), those rows @ w_t (b, L, n)). With `overlap` on CUDA the product of this rank's
        rows runs while the other ranks' are copied in. No autograd: a caller's backward."""
        full = self._gathered_base(local)
        if self._overlaps(local):
            return self._exchange.gather_matmul(local, w_t, full)
        if full is None:
            full = local.new_empty((local.shape[0] * self.tp, *local.shape[1:]))
        else:   # in place already (the gloo path copies it again, rather than gather a tensor into itself)
            local = local.clone()
        torch.distributed.all_gather_into_tensor(full, local, group=self.tp_group)
        return full, full @ w_t

    def _gathered_base(self, local: torch.Tensor) -> torch.Tensor | None:
        # the tensor a producer wrote `local` into as this rank's rows, for the gather
        # (kernels.reference.norm.gathered_rows), else None
        return gathered_base(local, self.tp, self.rank)

    def matmul_scatter(self, a: torch.Tensor, w_t: torch.Tensor) -> torch.Tensor:
        """a: (b, L, k), this rank's term of a sum over the TP group; w_t: (k, n) → this rank's
        batch rows of Σ_ranks a @ w_t, (b/tp, L, n). With `overlap` on CUDA each rank's rows of
        the product are pulled by that rank while the next rows are computed. No autograd."""
        if self._overlaps(a):
            parts = self._exchange.matmul_parts(a, w_t)
            # autocast would sum in fp32 and give the gradient twice the bytes of the NCCL path's
            with torch.autocast("cuda", enabled=False):
                return parts.sum(0)
        partial = a @ w_t
        out = partial.new_empty((partial.shape[0] // self.tp, *partial.shape[1:]))
        torch.distributed.reduce_scatter_tensor(out, partial, group=self.tp_group)
        return out

    def matmul_parts(self, a: torch.Tensor, w_t: torch.Tensor) -> torch.Tensor:
        """matmul_scatter without its last step, the sum: a: (b, L, k), this rank's term; w_t:
        (k, n) → every rank's term of this rank's batch rows, (tp, b/tp, L, n), for a consumer
        that sums them in a pass it makes anyway (kernels.add_rmsnorm, the next block's norm:
        the stream's add). With `overlap` on CUDA the rows go as in matmul_scatter; elsewhere an
        all-to-all of the rows. No autograd."""
        if self._overlaps(a):
            return self._exchange.matmul_parts(a, w_t)
        parts = a.new_empty((self.tp, a.shape[0] // self.tp, *a.shape[1:-1], w_t.shape[1]))
        torch.distributed.all_to_all_single(parts, (a @ w_t).contiguous(), group=self.tp_group)
        return parts

    def linear(self, local: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """in_proj under SP: this rank's tokens (batch-first) → every token's product with weight
        (n, k), (b, L, n). The gathered input is kept for the weight's gradient: megatron's
        column-parallel layer keeps only this rank's tokens and gathers them again in backward
        (at 1.3b on 2 H100s that second gather, 32 MiB a layer, made SP 1.8 points slower than
        plain TP; without it the two are level, for (tp-1)/tp of the input kept in memory)."""
        if self.uses_collective_products():
            return _GatherLinear.apply(local, weight, self)
        return torch.matmul(self.gather(local).contiguous(), weight.t())

    def to_split_first(self, x: torch.Tensor) -> torch.Tensor:
        # x: (batch, seqlen, ...) → the tensor whose dim 0 megatron's collectives split: x itself
        # with the batch split; (seqlen, batch, ...) contiguous with the sequence split
        if self.dim is None:
            raise RuntimeError("TokenSplit.begin must run before the layers (ParallelMamba2LM.hidden_states does)")
        return x if self.dim == self.BATCH_ROWS else x.transpose(0, 1).contiguous()

    def to_batch_first(self, x: torch.Tensor) -> torch.Tensor:
        # to_split_first's inverse (a view with the sequence split)
        return x if self.dim == self.BATCH_ROWS else x.transpose(0, 1)

    def scatter_sum(self, partial: torch.Tensor) -> torch.Tensor:
        # partial: (batch, seqlen, d), this rank's term of a sum over the TP group → this rank's
        # tokens of the sum (backward: all-gather)
        from megatron.core.tensor_parallel import reduce_scatter_to_sequence_parallel_region

        return self.to_batch_first(reduce_scatter_to_sequence_parallel_region(self.to_split_first(partial),
                                                                              group=self.tp_group))

    def gather(self, local: torch.Tensor) -> torch.Tensor:
        # local: this rank's tokens → (batch, seqlen, d), every rank's (backward: reduce-scatter,
        # as the gradient reaching the whole tensor is a partial sum on each rank: the head's
        # vocabulary shard)
        from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

        return self.to_batch_first(gather_from_sequence_parallel_region(self.to_split_first(local),
                                                                        group=self.tp_group))


class _GatherLinear(torch.autograd.Function):
    """TokenSplit.linear with fused products: gather ∘ matmul forward; for the input's
    gradient matmul ∘ reduce-scatter, for the weight's the gathered input kept. Given the
    input seen once a rank, (tp, b/tp, L, k) with stride 0 (a block norm's output,
    kernels.add_rmsnorm's out_parts), the input's gradient is the scatter's terms unsummed,
    one a rank, and the norm's backward sums them in the pass it makes anyway."""

    @staticmethod
    def forward(ctx, local, weight, split):
        # local: (b/tp, L, k) or (tp, b/tp, L, k); weight: (n, k), cast to the input's dtype as
        # autocast would (cast again in backward rather than kept: 18 MB a layer at 1.3b, tp 2)
        ctx.terms = local.dim() == 4
        if ctx.terms:
            if local.stride(0) != 0:   # terms of a gradient make sense only for one tensor seen tp times
                raise ValueError("in_proj under tp_comm_overlap: a 4-D input must be one tensor seen once a rank "
                                 f"(stride 0 along dim 0, kernels.add_rmsnorm's out_parts), found strides "
                                 f"{local.stride()}")
            local = local[0]
        full, out = split.gather_matmul(local.contiguous(), weight.to(local.dtype).t())
        ctx.save_for_backward(full, weight)
        ctx.split = split
        return out

    @staticmethod
    def backward(ctx, grad):
        full, weight = ctx.saved_tensors
        grad = grad.to(full.dtype)
        w_t = weight.to(full.dtype)
        grad_local = ctx.split.matmul_parts(grad, w_t) if ctx.terms else ctx.split.matmul_scatter(grad, w_t)
        grad_weight = matmul_in_dtype(grad.flatten(0, -2).t(), full.flatten(0, -2), weight.dtype)
        return grad_local, grad_weight, None


class SequenceParallelRMSNorm(RMSNorm):
    """A block norm under sequence parallelism: each TP rank normalises its share of the
    tokens (TokenSplit), so its weight's gradient is a partial sum over the TP group. The
    weight enters through megatron's copy_to_tensor_model_parallel_region (identity forward,
    all-reduce backward): the sum is part of the autograd graph, so it runs once wherever the
    backward runs (eagerly, or inside train.cuda_graph's captured one). A tensor hook on the
    weight would run again when the captured gradients are handed to the parameters."""

    def __init__(self, norm: RMSNorm, tp_group, token_split: TokenSplit | None = None):
        super().__init__(norm.weight.shape[0], norm.eps)
        self.weight = norm.weight   # the same parameter: same key, same initialisation
        self.weight.sequence_parallel = True   # megatron's mark for such parameters
        self.tp_group = tp_group
        # a block norm's: where in_proj's exchange gives its input's gradient as the ranks'
        # terms (TokenSplit.linear), this norm's backward sums them (None: norm_f)
        self.token_split = token_split

    def _exchange_layout(self) -> dict:
        split = self.token_split
        if split is None or not split.uses_collective_products():
            return {}
        return {"out_parts": split.tp, "gather_rank": split.rank}

    def _weight(self) -> torch.Tensor:
        from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region

        return copy_to_tensor_model_parallel_region(self.weight, group=self.tp_group)
