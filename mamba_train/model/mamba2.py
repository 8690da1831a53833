"""The Mamba-2 mixer and its residual block (Dao & Gu 2024, "Transformers are SSMs").

Parameter names and initialisation follow mamba_ssm's `Mamba2` so checkpoints map
one-to-one onto mamba_ssm and transformers' `Mamba2ForCausalLM` (see mamba_train.export).
The model knows nothing of parallelism; mamba_train.parallel wraps it.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from kernels import add_rmsnorm, causal_conv1d, mixer_body, rmsnorm_gated, ssd
from mamba_train.config import ModelConfig
from mamba_train.model.padded_rows import PaddedRowsLinear


class MixerState(NamedTuple):
    """Recurrent state carried across windows: what a later window needs of this one."""

    conv: torch.Tensor  # (batch, d_conv - 1, conv_dim): the last xBC rows before the conv
    ssm: torch.Tensor  # (batch, nheads, headdim, d_state), fp32


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """norm(x), in the dtype the next matmul reads (`_out_dtype`)."""
        weight = self._weight()
        return rmsnorm_gated(x, None, weight, eps=self.eps, group_size=x.shape[-1],
                             out_dtype=self._out_dtype(x, weight))

    def add_and_norm(self, x: torch.Tensor, update: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + update, norm of that), `update` the previous block's mixer output: the residual
        add and this norm as one kernel each way (kernels.add_rmsnorm)."""
        weight = self._weight()
        return add_rmsnorm(x, update, weight, eps=self.eps, out_dtype=self._out_dtype(x, weight),
                           **self._exchange_layout())

    def _weight(self) -> torch.Tensor:
        # the weight as the norm uses it (sequence parallelism routes it through a collective)
        return self.weight

    def _exchange_layout(self) -> dict:
        # kernels.add_rmsnorm's out_parts and gather_rank: how many terms the output's gradient
        # comes back in, and whose rows of a gathered tensor it is written into. None here; a
        # sequence-parallel block norm feeding in_proj's exchange sets both
        return {}

    @staticmethod
    def _out_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
        # The gated norm without a gate (one Triton kernel each way on a GPU), written in the
        # dtype the next matmul reads: autocast's, else the weight's (DeepSpeed's bf16 weights).
        # The fp32 residual stream's norm then never exists in fp32, nor its cast.
        device = x.device.type
        return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype


class Mamba2Mixer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        # Sizes this module owns. Tensor parallelism (mamba_train.parallel) shrinks them to
        # one rank's whole heads and groups; forward reads only these, never cfg's totals.
        self.nheads, self.ngroups, self.d_inner = cfg.nheads, cfg.ngroups, cfg.d_inner
        d_inner, nheads, bc_dim = cfg.d_inner, cfg.nheads, cfg.ngroups * cfg.d_state
        # One fused projection, laid out [z | x | B | C | dt] as in mamba_ssm, its output rows
        # padded so that the mixer's kernels load them as aligned vectors (model/padded_rows.py)
        self.split_sizes = (d_inner, d_inner + 2 * bc_dim, nheads)
        self.in_proj = PaddedRowsLinear(cfg.d_model, sum(self.split_sizes))
        self.conv1d = nn.Conv1d(cfg.conv_dim, cfg.conv_dim, cfg.d_conv, groups=cfg.conv_dim,
                                padding=cfg.d_conv - 1, bias=True)
        self.dt_bias = nn.Parameter(torch.empty(nheads))
        self.A_log = nn.Parameter(torch.empty(nheads))
        self.D = nn.Parameter(torch.empty(d_inner if cfg.D_has_hdim else nheads))
        self.norm = RMSNorm(d_inner, cfg.norm_eps)
        self.out_proj = nn.Linear(d_inner, cfg.d_model, bias=False)
        # Context-parallel hook, set by mamba_train.parallel: it supplies the conv rows
        # before this rank's piece of the sequence and the state entering it. None on one
        # process. The hook holds the process groups; this module holds none.
        self.context_parallel = None
        # train.recompute="none" (set_recompute): backward keeps the conv's and the gated norm's
        # outputs instead of recomputing them (kernels.mixer_body)
        self.keep_activations = False
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self) -> None:
        cfg = self.cfg
        # dt log-uniform in [dt_min, dt_max], floored, stored as softplus⁻¹ so that
        # softplus(dt_bias) starts at that dt (mamba_ssm's initialisation).
        log_dt = torch.rand(cfg.nheads) * (math.log(cfg.dt_max) - math.log(cfg.dt_min)) + math.log(cfg.dt_min)
        dt = torch.exp(log_dt).clamp(min=cfg.dt_init_floor)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.A_log.copy_(torch.log(torch.empty(cfg.nheads).uniform_(*cfg.A_init_range)))
        self.D.fill_(1.0)

    def forward(self, u: torch.Tensor, seq_idx: torch.Tensor | None = None, state: MixerState | None = None,
                return_state: bool = False):
        # u: (batch, seqlen, d_model); seq_idx: (batch, seqlen) document ids. With sequence
        # parallelism u holds a slice of the sequence and in_proj gathers it: seqlen is
        # read after the projection.
        cfg, nheads, ngroups, d_inner = self.cfg, self.nheads, self.ngroups, self.d_inner
        zxbcdt = self.in_proj(u)
        D = self.D.view(nheads, cfg.headdim) if cfg.D_has_hdim else self.D
        A = -torch.exp(self.A_log.float())
        if state is None and not return_state:
            # The training path: the rest of the mixer as one op, which keeps less for backward
            # (kernels.mixer_body), under context parallelism too (the hook links this rank's
            # piece to the ones before it). Carried state (stateful evaluation) takes the ops one by one.
            # A row-parallel out_proj (mamba_train.parallel) holds this rank's columns of the
            # weight: with parallel.tp_comm_overlap and SP split by batch rows the op exchanges the
            # rows of its product itself (out_scatter) and returns this rank's rows of every rank's
            # term, which the next norm sums into the stream (add_rmsnorm); else it gives this
            # rank's partial sum and the layer's collective is due
            scatter_of_layer = getattr(self.out_proj, "out_scatter", None)
            out_scatter = None if scatter_of_layer is None else scatter_of_layer()
            out = mixer_body(zxbcdt, self.conv1d.weight.squeeze(1), self.conv1d.bias, self.dt_bias, A, D,
                             self.norm.weight, self.out_proj.weight, ngroups=ngroups, chunk_size=cfg.chunk_size,
                             norm_eps=cfg.norm_eps, dt_limit=cfg.dt_limit, seq_idx=seq_idx,
                             context_parallel=self.context_parallel, keep_activations=self.keep_activations,
                             out_scatter=out_scatter)
            reduce_partial = getattr(self.out_proj, "reduce_partial", None)
            return out if reduce_partial is None or out_scatter is not None else reduce_partial(out)
        if self.context_parallel is not None:
            raise ValueError("context parallelism runs the training path only: whole sequences from the start, "
                             "no carried state in or out (stateful evaluation runs on one process)")
        z, xBC, dt = zxbcdt.split(self.split_sizes, dim=-1)
        batch, seqlen, _ = xBC.shape
        conv_initial = None if state is None else state.conv
        xBC, conv_state = causal_conv1d(
            xBC, self.conv1d.weight.squeeze(1), self.conv1d.bias, activation="silu",
            initial_state=conv_initial, return_final_state=True, seq_idx=seq_idx)
        bc_dim = ngroups * cfg.d_state
        x, B, C = xBC.split((d_inner, bc_dim, bc_dim), dim=-1)
        C = C.reshape(batch, seqlen, ngroups, cfg.d_state)
        y, ssm_state = ssd(
            x.reshape(batch, seqlen, nheads, cfg.headdim), dt, A,
            B.reshape(batch, seqlen, ngroups, cfg.d_state), C,
            cfg.chunk_size, D=D, dt_bias=self.dt_bias, dt_softplus=True, dt_limit=cfg.dt_limit,
            initial_states=None if state is None else state.ssm, seq_idx=seq_idx, return_final_states=True)
        # Gate before the norm, per group: mamba_ssm's norm_before_gate=False.
        y = rmsnorm_gated(y.reshape(batch, seqlen, d_inner), z, self.norm.weight, eps=cfg.norm_eps,
                          group_size=d_inner // ngroups)
        out = self.out_proj(y)
        return (out, MixerState(conv_state, ssm_state)) if return_state else out


class Mamba2Block(nn.Module):
    """Pre-norm residual block; the residual stream is kept in fp32 (mamba_ssm's
    residual_in_fp32) so that bf16 rounding does not accumulate over depth.

    A block takes the stream and the previous block's mixer output not yet added to it, and
    returns its own mixer output and the stream with that update added: the add happens in the
    norm's kernel (mamba_ssm's fused_add_norm; `run_blocks` chains the blocks). The first block
    gets no update. Under parallel.tp_comm_overlap the update comes as the TP ranks' terms of
    it, (tp, *the stream's shape), which that kernel sums too.

    With `recompute` set (train.recompute="block", via `set_recompute`) a training forward keeps
    only the block's inputs, and backward runs the block again for what its own backward needs
    (activation checkpointing): about one more forward of compute, and one block's activations
    alive at a time instead of every block's."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mixer = Mamba2Mixer(cfg)
        self.recompute = False

    def forward(self, residual: torch.Tensor, update: torch.Tensor | None = None, seq_idx=None,
                state: MixerState | None = None, return_state: bool = False):
        # -> (mixer output, residual + update), and with return_state the mixer's state last
        if self.recompute and torch.is_grad_enabled() and state is None and not return_state:
            if update is not None and update.dim() > residual.dim():
                # the checkpoint keeps its inputs: the TP ranks' terms of the update would stay
                # tp tensors of the stream's size where their sum (rounded to their dtype) is one
                update = update.sum(0, dtype=update.dtype)   # a dtype given: autocast would sum in fp32
            # non-reentrant: the recomputation runs under the forward's autocast state, and a
            # context-parallel block repeats its collectives in the same order on every rank
            return checkpoint(self._residual_block, residual, update, seq_idx, use_reentrant=False)
        return self._residual_block(residual, update, seq_idx, state, return_state)

    def _residual_block(self, residual: torch.Tensor, update: torch.Tensor | None = None, seq_idx=None,
                        state: MixerState | None = None, return_state: bool = False):
        if update is None:
            normed = self.norm(residual)
        else:
            # update is in residual's dtype or a narrower one (bf16 under autocast): the sum
            # promotes it inside the kernel
            residual, normed = self.norm.add_and_norm(residual, update)
        out = self.mixer(normed, seq_idx=seq_idx, state=state, return_state=return_state)
        if return_state:
            out, state = out
            return out, residual, state
        return out, residual


def run_blocks(layers, norm_f: RMSNorm, residual: torch.Tensor, seq_idx=None,
               states: list[MixerState] | None = None, return_states: bool = False):
    """The residual stream from the embedding through the blocks to the final norm -> norm_f's
    output, and with states or return_states also each block's new state. Each block's mixer
    output joins the stream at the next norm, the last one's at norm_f."""
    update, new_states = None, []
    for i, layer in enumerate(layers):
        if return_states or states is not None:
            update, residual, state = layer(residual, update, seq_idx=seq_idx,
                                            state=None if states is None else states[i], return_state=True)
            new_states.append(state)
        else:
            update, residual = layer(residual, update, seq_idx=seq_idx)
    hidden = norm_f(residual) if update is None else norm_f.add_and_norm(residual, update)[1]
    return (hidden, new_states) if return_states else hidden
