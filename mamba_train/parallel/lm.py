"""`parallelize_model`: the single-process Mamba2LM → this rank's TP/CP/SP shard.

torchtitan's split: the model file knows nothing of process groups; this function slices
its weights, swaps in megatron-core's parallel linears and embedding, and hangs the
context-parallel hook on each mixer. The blocks run unchanged. What changes at the ends
of the network lives in ParallelMamba2LM: the vocab-parallel embedding and tied head, and
the cross-entropy over the vocabulary shards (logits never gathered over the vocabulary).
With sequence parallelism each TP rank holds a share of the residual stream's tokens from
the embedding to norm_f, split by batch rows or by the sequence as the model's `TokenSplit`
chooses for each forward (sequence_parallel.py).

Inputs are this rank's piece: (batch, seq_len / cp) of input_ids, labels and seq_idx
(`context_parallel_piece` cuts it). `loss` is the mean over that piece's counted labels (not
IGNORE_INDEX); averaging the gradients over the DP×CP group (DeepSpeed, or `GradientBuckets`)
then gives the gradient of the mean over the global batch, as all pieces hold the same number
of counted labels (the data pipeline masks none: were labels ever masked, the pieces would
need the global count instead).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kernels import cross_entropy_rows, logsumexp_rows, softmax_grad_rows
from mamba_train.model import Mamba2LM
from mamba_train.model.loss import linear_cross_entropy
from mamba_train.model.mamba2 import run_blocks
from mamba_train.parallel.context_parallel import ContextParallel, all_gather_plain
from mamba_train.parallel.groups import ParallelDims, model_parallel_config
from mamba_train.parallel.sequence_parallel import SequenceParallelRMSNorm, TokenSplit
from mamba_train.parallel.tensor_parallel import _no_init, mark_tensor_parallel, shard_mixer, shard_state_dict


class ParallelMamba2LM(nn.Module):
    """Mamba2LM's forward and loss on one rank of a TP × CP layout. Its state dict has
    the TP=1 model's keys holding this TP rank's shards (`merge_state_dicts` joins them)."""

    def __init__(self, model: Mamba2LM, dims: ParallelDims):
        super().__init__()
        from megatron.core.tensor_parallel import VocabParallelEmbedding

        layout = dims.layout
        self.cfg, self.dims, self.vocab_size = model.cfg, dims, model.vocab_size
        self.sequence_parallel = layout.sequence_parallel
        full = shard_state_dict({"embedding.weight": model.embedding.weight.detach()}, model.cfg, layout.tp,
                                dims.tp_rank)
        mp_config = model_parallel_config(layout, model.embedding.weight.dtype)
        # With SP, `embed` scatters the lookup itself: megatron's reduce_scatter_embeddings would
        # always transpose it to seq-first
        self.embedding = VocabParallelEmbedding(model.vocab_size, model.cfg.d_model, init_method=_no_init,
                                                reduce_scatter_embeddings=False, config=mp_config,
                                                tp_group=dims.tp_group)
        with torch.no_grad():
            self.embedding.weight.copy_(full["embedding.weight"])
        mark_tensor_parallel(self.embedding.weight, dim=0)
        # the loss per row of logits: over this rank's vocabulary shard, completed over the TP group
        self._rows_loss = cross_entropy_rows if layout.tp == 1 else \
            _VocabParallelRows(dims.tp_group, self.embedding.vocab_start_index)
        self.layers = model.layers
        self.norm_f = model.norm_f
        self.context_parallel = ContextParallel(dims.cp_group, model.cfg.d_conv, symmetric=layout.cp_symmetric_memory) \
            if layout.cp > 1 else None
        # which tokens of the residual stream each TP rank holds under SP, chosen per forward
        self.token_split = TokenSplit(dims.tp_group, overlap=layout.tp_comm_overlap) if self.sequence_parallel \
            else None
        for layer in self.layers:
            shard_mixer(layer.mixer, dims, mp_config, self.token_split)
            layer.mixer.context_parallel = self.context_parallel
        if self.sequence_parallel:
            for layer in self.layers:
                layer.norm = SequenceParallelRMSNorm(layer.norm, dims.tp_group, self.token_split)
            self.norm_f = SequenceParallelRMSNorm(self.norm_f, dims.tp_group)

    def hidden_states(self, input_ids: torch.Tensor, seq_idx: torch.Tensor | None = None) -> torch.Tensor:
        # input_ids, seq_idx: (batch, local_len) → (batch, local_len, d_model) after norm_f, the
        # whole local piece on every TP rank
        from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region

        if self.context_parallel is not None:
            self.context_parallel.begin(seq_idx, input_ids.shape[0], input_ids.device)
        if self.token_split is not None:
            self.token_split.begin(*input_ids.shape)   # by batch rows if they divide, else by the sequence
        hidden = self.embed(input_ids)
        hidden = hidden.to(torch.promote_types(hidden.dtype, torch.float32))   # the fp32 residual stream
        if self.token_split is not None:
            self.token_split.prepare_overlap(hidden)
        # seq_idx is read by the mixers alone, which see the whole piece (after in_proj's gather)
        hidden = run_blocks(self.layers, self.norm_f, hidden, seq_idx)
        if self.token_split is not None:   # every rank's tokens; backward reduce-scatters
            return self.token_split.gather(hidden)
        # the head's input is replicated: backward sums its gradient over the vocab shards
        return copy_to_tensor_model_parallel_region(hidden, group=self.dims.tp_group)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        # input_ids: (batch, local_len) → (batch, local_len, d_model), summed over the vocabulary
        # shards; with SP only this rank's tokens of it (token_split)
        if self.token_split is None:
            return self.embedding(input_ids)   # all-reduced
        # megatron's VocabParallelEmbedding.forward up to its collective: this shard's rows,
        # zero for ids that another rank's shard holds
        local_ids = input_ids - self.embedding.vocab_start_index
        elsewhere = (local_ids < 0) | (local_ids >= self.embedding.weight.shape[0])
        rows = F.embedding(local_ids.masked_fill(elsewhere, 0), self.embedding.weight)
        return self.token_split.scatter_sum(rows.masked_fill(elsewhere[..., None], 0.0))

    def forward(self, input_ids: torch.Tensor, seq_idx: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> torch.Tensor:
        # → logits (batch, local_len, padded_vocab / tp): this rank's vocabulary slice; with
        # labels, the mean loss instead (so a DeepSpeed engine can be called like the model)
        if labels is not None:
            return self.loss(input_ids, labels, seq_idx)
        return F.linear(self.hidden_states(input_ids, seq_idx), self.embedding.weight)

    def loss(self, input_ids: torch.Tensor, labels: torch.Tensor, seq_idx: torch.Tensor | None = None,
             reduction: str = "mean") -> torch.Tensor:
        # labels: (batch, local_len) → mean (or sum) cross-entropy over this piece. The head and
        # the loss go a slice of tokens at a time, as on one GPU (model/loss.py); over a
        # vocabulary split by TP each row is completed by one small all-gather a slice
        hidden = self.hidden_states(input_ids, seq_idx)
        return linear_cross_entropy(hidden.flatten(0, 1), self.embedding.weight, labels.flatten(), reduction,
                                    rows_loss=self._rows_loss)


class _VocabParallelRows:
    """`kernels.cross_entropy_rows`'s contract over a vocabulary split across the TP group:
    each rank's pass gives its rows' log-sum-exp and the label's logit where it holds the
    label; one all-gather of those (2 numbers a row) completes every row on every rank, and
    the gradient pass runs from the whole row's log-sum-exp. Megatron's vocab-parallel
    cross-entropy does the same with three all-reduces and fp32 copies of the logits."""

    def __init__(self, group, vocab_start: int):
        self.group, self.vocab_start = group, vocab_start

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor, grad_scale: torch.Tensor | None) -> torch.Tensor:
        # logits: (rows, vocab / tp), this rank's columns; labels: (rows,) ids of the whole vocabulary
        local = labels - self.vocab_start   # outside [0, vocab / tp): another rank's (or ignored)
        lse, target = logsumexp_rows(logits, local)
        every = all_gather_plain(torch.stack([lse, target]), self.group)          # (tp, 2, rows)
        lse, target = torch.logsumexp(every[:, 0], dim=0), every[:, 1].sum(dim=0)
        if grad_scale is not None:
            softmax_grad_rows(logits, local, lse, grad_scale)
        return lse - target


def parallelize_model(model: Mamba2LM, dims: ParallelDims) -> ParallelMamba2LM:
    """Shard `model` (built identically on every rank, e.g. from one seed or the TP=1
    checkpoint) for this rank. The mixers are sharded in place; use the returned module."""
    if model.vocab_size % dims.layout.tp:
        raise ValueError(f"padded vocabulary {model.vocab_size} is not a multiple of tp={dims.layout.tp}: build the "
                         f"model with Mamba2LM(cfg, tp_size={dims.layout.tp})")
    return ParallelMamba2LM(model, dims)


def context_parallel_piece(tensor: torch.Tensor, dims: ParallelDims) -> torch.Tensor:
    """This CP rank's contiguous piece of a (batch, seq_len, ...) tensor."""
    cp, rank = dims.layout.cp, dims.cp_rank
    if tensor.shape[1] % cp:
        raise ValueError(f"sequence length {tensor.shape[1]} is not a multiple of cp={cp}")
    size = tensor.shape[1] // cp
    return tensor[:, rank * size:(rank + 1) * size]
