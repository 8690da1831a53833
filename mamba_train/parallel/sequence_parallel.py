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
"""

from __future__ import annotations

import torch

from mamba_train.model.mamba2 import RMSNorm


class TokenSplit:
    """Which tokens of the batch-first residual stream this TP rank holds under SP. One object
    is shared by every SP site of a model: the embedding's reduce-scatter, each block's in_proj
    (gather) and out_proj (reduce-scatter), and the gather before the head.

    `begin(batch, local_len)` runs at the start of each forward (ParallelMamba2LM.hidden_states)
    and sets `dim`; a recomputing backward (train.recompute) reads it again, so a forward's
    backward runs before the next forward, as for ContextParallel."""

    BATCH_ROWS, SEQUENCE = 0, 1

    def __init__(self, tp_group):
        self.tp_group = tp_group
        self.tp = tp_group.size()
        self.dim: int | None = None   # of (batch, seqlen, d): BATCH_ROWS or SEQUENCE, set by begin

    def begin(self, batch: int, local_len: int) -> None:
        if batch % self.tp == 0:
            self.dim = self.BATCH_ROWS
        elif local_len % self.tp == 0:
            self.dim = self.SEQUENCE
        else:
            raise ValueError(f"sequence parallelism splits each forward's tokens over tp={self.tp} ranks, by batch "
                             f"rows (the batch, {batch}, must be a multiple of tp) or else by the sequence (this "
                             f"rank's {local_len} tokens a row must be a multiple of tp): neither is")

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


class SequenceParallelRMSNorm(RMSNorm):
    """A block norm under sequence parallelism: each TP rank normalises its share of the
    tokens (TokenSplit), so its weight's gradient is a partial sum over the TP group. The
    weight enters through megatron's copy_to_tensor_model_parallel_region (identity forward,
    all-reduce backward): the sum is part of the autograd graph, so it runs once wherever the
    backward runs (eagerly, or inside train.cuda_graph's captured one). A tensor hook on the
    weight would run again when the captured gradients are handed to the parameters."""

    def __init__(self, norm: RMSNorm, tp_group):
        super().__init__(norm.weight.shape[0], norm.eps)
        self.weight = norm.weight   # the same parameter: same key, same initialisation
        self.weight.sequence_parallel = True   # megatron's mark for such parameters
        self.tp_group = tp_group

    def _weight(self) -> torch.Tensor:
        from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region

        return copy_to_tensor_model_parallel_region(self.weight, group=self.tp_group)
