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

from kernels import causal_conv1d, rmsnorm_gated, ssd
from mamba_train.config import ModelConfig


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
        # Statistics in fp32 whatever the input dtype, as mamba_ssm and transformers do.
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


class Mamba2Mixer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        d_inner, nheads, bc_dim = cfg.d_inner, cfg.nheads, cfg.ngroups * cfg.d_state
        # One fused projection, laid out [z | x | B | C | dt] as in mamba_ssm.
        self.split_sizes = (d_inner, d_inner + 2 * bc_dim, nheads)
        self.in_proj = nn.Linear(cfg.d_model, sum(self.split_sizes), bias=False)
        self.conv1d = nn.Conv1d(cfg.conv_dim, cfg.conv_dim, cfg.d_conv, groups=cfg.conv_dim,
                                padding=cfg.d_conv - 1, bias=True)
        self.dt_bias = nn.Parameter(torch.empty(nheads))
        self.A_log = nn.Parameter(torch.empty(nheads))
        self.D = nn.Parameter(torch.empty(d_inner if cfg.D_has_hdim else nheads))
        self.norm = RMSNorm(d_inner, cfg.norm_eps)
        self.out_proj = nn.Linear(d_inner, cfg.d_model, bias=False)
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
        # u: (batch, seqlen, d_model); seq_idx: (batch, seqlen) document ids
        cfg = self.cfg
        batch, seqlen, _ = u.shape
        z, xBC, dt = self.in_proj(u).split(self.split_sizes, dim=-1)
        xBC, conv_state = causal_conv1d(
            xBC, self.conv1d.weight.squeeze(1), self.conv1d.bias, activation="silu",
            initial_state=None if state is None else state.conv, return_final_state=True, seq_idx=seq_idx)
        bc_dim = cfg.ngroups * cfg.d_state
        x, B, C = xBC.split((cfg.d_inner, bc_dim, bc_dim), dim=-1)
        D = self.D.view(cfg.nheads, cfg.headdim) if cfg.D_has_hdim else self.D
        y, ssm_state = ssd(
            x.reshape(batch, seqlen, cfg.nheads, cfg.headdim), dt, -torch.exp(self.A_log.float()),
            B.reshape(batch, seqlen, cfg.ngroups, cfg.d_state), C.reshape(batch, seqlen, cfg.ngroups, cfg.d_state),
            cfg.chunk_size, D=D, dt_bias=self.dt_bias, dt_softplus=True, dt_limit=cfg.dt_limit,
            initial_states=None if state is None else state.ssm, seq_idx=seq_idx, return_final_states=True)
        # Gate before the norm, per group: mamba_ssm's norm_before_gate=False.
        y = rmsnorm_gated(y.reshape(batch, seqlen, cfg.d_inner), z, self.norm.weight, eps=cfg.norm_eps,
                                  group_size=cfg.d_inner // cfg.ngroups)
        out = self.out_proj(y)
        return (out, MixerState(conv_state, ssm_state)) if return_state else out


class Mamba2Block(nn.Module):
    """Pre-norm residual block; the residual stream is kept in fp32 (mamba_ssm's
    residual_in_fp32) so that bf16 rounding does not accumulate over depth."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mixer = Mamba2Mixer(cfg)

    def forward(self, residual: torch.Tensor, seq_idx=None, state: MixerState | None = None,
                return_state: bool = False):
        out = self.mixer(self.norm(residual), seq_idx=seq_idx, state=state, return_state=return_state)
        if return_state:
            out, state = out
        residual = residual + out.float()
        return (residual, state) if return_state else residual
