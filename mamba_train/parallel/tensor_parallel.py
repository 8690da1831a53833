"""Tensor parallelism for the Mamba-2 mixer, Megatron style (DESIGN §4).

Each of the tp ranks owns nheads/tp whole heads and ngroups/tp whole groups. The fused
in_proj output [z | x | B | C | dt] is therefore not split naively: rank r's rows are
[z_r | x_r | B_r | C_r | dt_r], its own slice of each part, so the mixer runs unchanged on
local sizes. in_proj is column-parallel (no forward communication), conv1d / dt_bias /
A_log / D / the gated norm go with their heads (the norm is per group, so it needs no
communication), and out_proj is row-parallel: its all-reduce is the block's one forward
collective (a reduce-scatter with sequence parallelism, where in_proj all-gathers: which
tokens each rank holds in between is `sequence_parallel.TokenSplit`'s). In training the mixer
multiplies by out_proj's weight inside `kernels.mixer_body` and calls the layer's
`reduce_partial` for that collective alone.

`shard_state_dict` / `merge_state_dicts` convert between the TP=1 checkpoint and one
state dict per TP rank (same key names, local tensors).
"""

from __future__ import annotations

import torch
from torch import nn

from mamba_train.config import ModelConfig
from mamba_train.model.padded_rows import padded_rows_linear

# ----------------------------------------------------------------------------- index maps


def _slice(total: int, tp: int, rank: int) -> torch.Tensor:
    step = total // tp
    return torch.arange(rank * step, (rank + 1) * step)


def conv_channels(cfg: ModelConfig, tp: int, rank: int) -> torch.Tensor:
    """Channels of the conv (xBC = [x | B | C]) that rank owns, in its local order."""
    bc = cfg.ngroups * cfg.d_state
    x = _slice(cfg.d_inner, tp, rank)
    B = cfg.d_inner + _slice(bc, tp, rank)
    C = cfg.d_inner + bc + _slice(bc, tp, rank)
    return torch.cat([x, B, C])


def in_proj_rows(cfg: ModelConfig, tp: int, rank: int) -> torch.Tensor:
    """Rows of the fused in_proj weight that rank owns: [z_r | x_r | B_r | C_r | dt_r]."""
    z = _slice(cfg.d_inner, tp, rank)
    xBC = cfg.d_inner + conv_channels(cfg, tp, rank)
    dt = cfg.d_inner + cfg.conv_dim + _slice(cfg.nheads, tp, rank)
    return torch.cat([z, xBC, dt])


def _mixer_index(cfg: ModelConfig, name: str, tp: int, rank: int) -> tuple[int, torch.Tensor] | None:
    """(dim, indices) of a mixer parameter's shard, or None if it is replicated."""
    heads = _slice(cfg.nheads, tp, rank)
    channels = _slice(cfg.d_inner, tp, rank)
    return {
        "in_proj.weight": (0, in_proj_rows(cfg, tp, rank)),
        "conv1d.weight": (0, conv_channels(cfg, tp, rank)),
        "conv1d.bias": (0, conv_channels(cfg, tp, rank)),
        "dt_bias": (0, heads),
        "A_log": (0, heads),
        "D": (0, channels if cfg.D_has_hdim else heads),
        "norm.weight": (0, channels),
        "out_proj.weight": (1, channels),
    }.get(name)


def _index(cfg: ModelConfig, key: str, tp: int, rank: int, vocab_rows: int) -> tuple[int, torch.Tensor] | None:
    if key == "embedding.weight":
        # VocabParallelEmbedding's contiguous vocab ranges; the tied head uses the same rows.
        return 0, _slice(vocab_rows, tp, rank)
    if ".mixer." in key:
        return _mixer_index(cfg, key.split(".mixer.", 1)[1], tp, rank)
    return None  # block norms and norm_f are replicated


def shard_tensor(key: str, full: torch.Tensor, cfg: ModelConfig, tp: int, rank: int) -> torch.Tensor:
    """One TP=1 tensor (a weight, or anything shaped like it: an Adam moment) → rank's shard."""
    vocab_rows = full.shape[0] if key == "embedding.weight" else 0
    if vocab_rows % tp:
        raise ValueError(f"embedding has {vocab_rows} rows, not a multiple of tp={tp}: build the TP=1 model with "
                         f"Mamba2LM(cfg, tp_size={tp}) so the vocabulary is padded for this layout")
    where = _index(cfg, key, tp, rank, vocab_rows)
    return full.clone() if where is None else full.index_select(where[0], where[1].to(full.device)).clone()


def merge_tensor(key: str, shards: list[torch.Tensor], cfg: ModelConfig) -> torch.Tensor:
    """One tensor's shards, in TP rank order → the TP=1 tensor (replicas: rank 0's copy)."""
    tp = len(shards)
    vocab_rows = shards[0].shape[0] * tp if key == "embedding.weight" else 0
    where = _index(cfg, key, tp, 0, vocab_rows)
    if where is None:
        return shards[0].clone()
    dim = where[0]
    shape = list(shards[0].shape)
    shape[dim] *= tp
    merged = shards[0].new_empty(shape)
    for rank, shard in enumerate(shards):
        merged.index_copy_(dim, _index(cfg, key, tp, rank, vocab_rows)[1].to(merged.device), shard)
    return merged


def shard_state_dict(full: dict[str, torch.Tensor], cfg: ModelConfig, tp: int, rank: int) -> dict[str, torch.Tensor]:
    """TP=1 state dict → rank's TP state dict (same keys)."""
    return {key: shard_tensor(key, tensor, cfg, tp, rank) for key, tensor in full.items()}


def merge_state_dicts(shards: list[dict[str, torch.Tensor]], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """One state dict per TP rank (rank order) → the TP=1 state dict."""
    return {key: merge_tensor(key, [shard[key] for shard in shards], cfg) for key in shards[0]}


# ----------------------------------------------------------------------------- modules


def _batch_first(linear_cls, in_proj: bool = False):
    """megatron's linears take (seq, batch, hidden) so that sequence parallelism gathers and
    scatters dim 0; the model is batch-first, so with SP on the layer hands its input to
    megatron as `token_split` says (as it is when the TP ranks split the batch rows, transposed
    when they split the sequence). in_proj (the column-parallel layer): over a TP group of one it
    takes the product with padded output rows (model/padded_rows.py), and with SP it gathers its
    input itself (forward below)."""

    class BatchFirst(linear_cls):
        # megatron's empty `_extra_state` would add a None entry to every state dict; keep
        # the keys those of the TP=1 model (its load hook and set_extra_state stay).
        get_extra_state = nn.Module.get_extra_state

        def __init__(self, *args, token_split=None, **kwargs):
            super().__init__(*args, **kwargs)
            # in_proj over a TP group of one (CP and DP runs): no collective in either direction
            self.pads_rows = in_proj and self.bias is None and self.tp_group.size() == 1
            # the model's TokenSplit (sequence_parallel.py), shared by its SP sites
            self.token_split = token_split
            if self.sequence_parallel and token_split is None:
                raise ValueError(f"{type(self).__name__}: sequence parallelism needs the model's token_split")

        def forward(self, x):
            # x: (batch, seqlen, in) → (batch, seqlen', out); bias is off, skip_bias_add keeps it out.
            if not (x.is_cuda and torch.is_autocast_enabled("cuda")):
                # Compute in the weights' dtype: with DeepSpeed's bf16 the weights are bf16 and
                # the residual stream fp32, and megatron's backward does not see a CPU autocast.
                # Under CUDA autocast a cast here would only add two copies.
                x = x.to(self.weight.dtype)
            if not self.sequence_parallel:
                if self.pads_rows:
                    # one rank: megatron's layer is a plain product, taken with the output rows
                    # the mixer's kernels load as aligned vectors (model/padded_rows.py)
                    return padded_rows_linear(x, self.weight)
                # Only SP's gather and scatter care which dim is the sequence. A transposed
                # input would also make the matmul a batch of one tiny product per token
                # (measured on an H100 at 1.3b: 3.6x slower steps).
                out, _ = super().forward(x)
                return out
            if in_proj:   # gathers once, keeping the gathered input for the weight's gradient
                return self.token_split.linear(x, self.weight)
            # megatron gathers (column-parallel) or scatters (row-parallel) dim 0
            out, _ = super().forward(self.token_split.to_split_first(x))
            return self.token_split.to_batch_first(out)

        def out_scatter(self):
            """What `kernels.mixer_body` takes as out_scatter in this forward: the model's
            TokenSplit when out_proj's product goes with the exchange of its rows
            (`TokenSplit.uses_collective_products`; the op then returns this rank's rows of
            every rank's term, for the next norm to sum), else None (the op returns the partial
            sum, and reduce_partial follows)."""
            split = self.token_split
            return split if self.sequence_parallel and split.uses_collective_products() else None

        def reduce_partial(self, partial):
            """A row-parallel layer's collective alone, for a caller that ran its matmul itself
            (`kernels.mixer_body` does, on this rank's columns of the weight): partial
            (batch, seqlen, out) → the sum over the TP group, as forward returns it (with SP,
            this rank's tokens of it)."""
            from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region

            if not self.sequence_parallel:
                return reduce_from_tensor_model_parallel_region(partial, group=self.tp_group)
            return self.token_split.scatter_sum(partial)

    BatchFirst.__name__ = BatchFirst.__qualname__ = f"BatchFirst{linear_cls.__name__}"
    return BatchFirst


def _linears():
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    return _batch_first(ColumnParallelLinear, in_proj=True), _batch_first(RowParallelLinear)


def _no_init(weight):  # weights are copied in from the TP=1 model
    return weight


@torch.no_grad()
def shard_mixer(mixer: nn.Module, dims, mp_config, token_split=None) -> None:
    """Turn a full mixer into rank dims.tp_rank's shard in place (weights sliced, not re-drawn).
    token_split: the model's `TokenSplit` under sequence parallelism, else None."""
    cfg, tp, rank = mixer.cfg, dims.layout.tp, dims.tp_rank
    full = {k: v.detach().clone() for k, v in mixer.state_dict().items()}
    ColumnLinear, RowLinear = _linears()
    mixer.nheads, mixer.ngroups, mixer.d_inner = cfg.nheads // tp, cfg.ngroups // tp, cfg.d_inner // tp
    mixer.split_sizes = tuple(size // tp for size in mixer.split_sizes)
    conv_dim = cfg.conv_dim // tp
    mixer.in_proj = ColumnLinear(cfg.d_model, sum(mixer.split_sizes) * tp, config=mp_config, init_method=_no_init,
                                 bias=False, gather_output=False, skip_bias_add=True, tp_group=dims.tp_group,
                                 token_split=token_split)
    mixer.out_proj = RowLinear(cfg.d_inner, cfg.d_model, config=mp_config, init_method=_no_init, bias=False,
                               input_is_parallel=True, skip_bias_add=True, tp_group=dims.tp_group,
                               token_split=token_split)
    mixer.conv1d = nn.Conv1d(conv_dim, conv_dim, cfg.d_conv, groups=conv_dim, padding=cfg.d_conv - 1, bias=True)
    for name in ("dt_bias", "A_log", "D"):
        setattr(mixer, name, nn.Parameter(torch.empty(getattr(mixer, name).shape[0] // tp)))
    mixer.norm.weight = nn.Parameter(torch.empty(cfg.d_inner // tp))
    shard = {}
    for key, tensor in full.items():
        where = _mixer_index(cfg, key, tp, rank)
        shard[key] = tensor if where is None else tensor.index_select(where[0], where[1].to(tensor.device))
    mixer.load_state_dict(shard, strict=False)
    missing = set(mixer.state_dict()) - set(shard)
    if missing:
        raise RuntimeError(f"shard_mixer: no weights for {sorted(missing)}")
    # Mark every sharded parameter as megatron marks its own: clipping (ours and DeepSpeed's)
    # sums their norms over the TP group and counts replicas once. megatron skips this for
    # its own linears when perform_initialization is off, so it is done here for all.
    for name in ("in_proj.weight", "conv1d.weight", "conv1d.bias", "dt_bias", "A_log", "D", "norm.weight"):
        mark_tensor_parallel(mixer.get_parameter(name), dim=0)
    mark_tensor_parallel(mixer.out_proj.weight, dim=1)


def mark_tensor_parallel(param: torch.Tensor, dim: int) -> None:
    from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

    set_tensor_model_parallel_attributes(param, is_parallel=True, dim=dim, stride=1)
