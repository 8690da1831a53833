"""Mamba-2 language model: embedding → blocks → final RMSNorm → tied head."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mamba_train.config import RECOMPUTE_MODES, ModelConfig
from mamba_train.model.loss import linear_cross_entropy
from mamba_train.model.mamba2 import Mamba2Block, MixerState, RMSNorm, run_blocks


class Mamba2LM(nn.Module):
    def __init__(self, cfg: ModelConfig, tp_size: int = 1):
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError("model.vocab_size must be set (from the tokenizer) before building the model")
        self.cfg = cfg
        self.vocab_size = cfg.padded_vocab_size(tp_size)
        self.embedding = nn.Embedding(self.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Mamba2Block(cfg) for _ in range(cfg.n_layer))
        self.norm_f = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """mamba_ssm's `_init_weights`: N(0, 0.02) embedding, default (Kaiming-uniform)
        linears, then out_proj rescaled by 1/sqrt(n_layer) (GPT-2's prenorm-residual rule)
        so the residual stream's variance does not grow with depth."""
        nn.init.normal_(self.embedding.weight, std=self.cfg.initializer_range)
        for layer in self.layers:
            out_proj = layer.mixer.out_proj.weight
            nn.init.kaiming_uniform_(out_proj, a=math.sqrt(5))
            out_proj /= math.sqrt(self.cfg.n_layer)

    def forward(self, input_ids: torch.Tensor, seq_idx: torch.Tensor | None = None,
                states: list[MixerState] | None = None, return_states: bool = False):
        # input_ids, seq_idx: (batch, seqlen) → logits (batch, seqlen, padded vocab)
        out = run_blocks(self.layers, self.norm_f, self._embed(input_ids), seq_idx, states, return_states)
        hidden, new_states = out if return_states else (out, None)
        logits = F.linear(hidden, self.embedding.weight)
        return (logits, new_states) if return_states else logits

    def loss(self, input_ids: torch.Tensor, labels: torch.Tensor, seq_idx: torch.Tensor | None = None,
             reduction: str = "mean") -> torch.Tensor:
        # the head and the cross-entropy together, a slice of tokens at a time (model/loss.py):
        # the full logits never exist in fp32
        hidden = run_blocks(self.layers, self.norm_f, self._embed(input_ids), seq_idx)
        return linear_cross_entropy(hidden.flatten(0, 1), self.embedding.weight, labels.flatten(), reduction)

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        # the residual stream in fp32 at least (float64 models stay float64: the tests' oracle)
        embedded = self.embedding(input_ids)
        return embedded.to(torch.promote_types(embedded.dtype, torch.float32))


def set_recompute(model: nn.Module, mode: str) -> None:
    """What backward recomputes instead of keeping (train.recompute), for a Mamba2LM or the
    parallel LM that wraps its blocks: "none" keeps every activation, "mixer" recomputes each
    mixer's conv and gated-norm outputs (kernels.mixer_body), "block" reruns whole blocks."""
    if mode not in RECOMPUTE_MODES:
        raise ValueError(f"recompute: expected one of {RECOMPUTE_MODES}, found {mode!r}")
    for layer in model.layers:
        layer.recompute = mode == "block"
        layer.mixer.keep_activations = mode == "none"


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay the matrices (embedding, projections, conv filters) only;
    A_log, D, dt_bias, norm weights and biases are all 1-D and are never decayed."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
