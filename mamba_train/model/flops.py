"""Parameter and FLOP counts, from the config alone (no model needed).

Training FLOPs per token = 6 · params + 3 · (SSD forward FLOPs per token) · n_layer:
the matmul rule (2 forward + 4 backward per parameter per token; the tied head counts
once through the embedding) plus the part of SSD that no parameter accounts for. This
is the definition the speed anchor's MFU uses (issue 9), kept in one place.
"""

from __future__ import annotations

from mamba_train.config import ModelConfig


def count_params(cfg: ModelConfig, vocab_size: int) -> int:
    d_in_proj = 2 * cfg.d_inner + 2 * cfg.ngroups * cfg.d_state + cfg.nheads
    per_layer = (
        cfg.d_model  # block norm
        + cfg.d_model * d_in_proj  # in_proj
        + cfg.conv_dim * (cfg.d_conv + 1)  # depthwise conv weight + bias
        + 3 * cfg.nheads  # dt_bias, A_log, D (per head)
        + (cfg.d_inner - cfg.nheads if cfg.D_has_hdim else 0)
        + cfg.d_inner  # gated norm
        + cfg.d_inner * cfg.d_model  # out_proj
    )
    return vocab_size * cfg.d_model + cfg.n_layer * per_layer + cfg.d_model


def ssd_forward_flops_per_token(cfg: ModelConfig) -> int:
    """Forward FLOPs of chunked SSD per token per layer, counting whole Q×Q blocks as
    the kernels compute them (paper §6): C·Bᵀ per group, (C·Bᵀ∘L)·x per head, the
    chunk state Bᵀ·x, and the state readout C·h."""
    q, n, p, h, g = cfg.chunk_size, cfg.d_state, cfg.headdim, cfg.nheads, cfg.ngroups
    return 2 * q * n * g + 2 * q * p * h + 2 * n * p * h + 2 * n * p * h


def training_flops_per_token(cfg: ModelConfig, vocab_size: int) -> int:
    return 6 * count_params(cfg, vocab_size) + 3 * ssd_forward_flops_per_token(cfg) * cfg.n_layer
