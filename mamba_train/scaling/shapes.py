"""Model shapes from one rule, and the learning rate that goes with a size.

The rule follows the Mamba-2 paper's family (Dao & Gu 2024, Table 9; our configs/):
width d_model in steps of `width_step`, depth n_layer = d_model / `aspect` with aspect 32
(exactly the 130m 768×24 and 780m 1536×48 shapes), expand 2, headdim 64, d_state 128.
Tensor parallelism splits heads and B/C groups across ranks, so a shape is valid for a
TP degree `tp` only if nheads % tp == 0 and ngroups % tp == 0: we set ngroups = tp (the
paper's ngroups = 1 at tp = 1) and keep only widths whose head count divides by tp.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from mamba_train.config import ModelConfig
from mamba_train.model import count_params, training_flops_per_token


@dataclass(frozen=True)
class ShapeRule:
    headdim: int = 64
    d_state: int = 128
    expand: int = 2
    chunk_size: int = 256
    aspect: int = 32  # d_model / n_layer
    width_step: int = 64
    min_layers: int = 2
    max_width: int = 8192
    tp: int = 1

    def model(self, d_model: int, base: ModelConfig) -> ModelConfig:
        """The base config's model section with this rule's shape at width d_model."""
        n_layer = max(self.min_layers, round(d_model / self.aspect))
        return replace(base, d_model=d_model, n_layer=n_layer, d_state=self.d_state, expand=self.expand,
                       headdim=self.headdim, ngroups=self.tp, chunk_size=self.chunk_size)

    def valid_for_tp(self, cfg: ModelConfig) -> bool:
        return (cfg.d_inner % cfg.headdim == 0 and cfg.nheads % self.tp == 0 and cfg.ngroups % self.tp == 0
                and cfg.d_inner % self.tp == 0)

    def ladder(self, base: ModelConfig, vocab_size: int) -> list["Shape"]:
        """Every TP-valid shape of this rule up to max_width, smallest first."""
        shapes = []
        for d_model in range(self.width_step, self.max_width + 1, self.width_step):
            cfg = self.model(d_model, base)
            if not self.valid_for_tp(cfg):
                continue
            cfg.validate()
            shapes.append(Shape(cfg, count_params(cfg, vocab_size), training_flops_per_token(cfg, vocab_size)))
        return shapes


# The rule for CPU sweeps on the scaling-tiny data (384-piece vocabulary): 8-wide heads and
# states, widths in steps of 4 from 4 (one head), so the ladder reaches models of a few
# thousand parameters (the compute-optimal ones at CPU budgets) and is fine enough (about
# 1.5x in N per step at the small end) for 5 distinct sizes within a span of 5; chunks stay
# short (configs/scaling/tiny.yaml).
TINY_RULE = ShapeRule(headdim=8, d_state=8, chunk_size=32, width_step=4, max_width=512)


@dataclass(frozen=True)
class Shape:
    model: ModelConfig
    params: int  # N: all parameters, the tied embedding counted once (model.flops.count_params)
    flops_per_token: int  # training FLOPs per token (model.flops.training_flops_per_token)


# GPT-3's peak learning rates (Brown et al. 2020, Table 2.1) times 5: the Mamba papers'
# recipe, which configs/{130m,...,2.7b}.yaml use. Interpolated in log-log, flat beyond.
_LR_BY_PARAMS = ((125e6, 3e-3), (350e6, 1.5e-3), (760e6, 1.25e-3), (1.3e9, 1e-3), (2.7e9, 8e-4))


def peak_lr(params: float) -> float:
    points = _LR_BY_PARAMS
    if params <= points[0][0]:
        return points[0][1]
    for (n0, lr0), (n1, lr1) in zip(points, points[1:]):
        if params <= n1:
            t = math.log(params / n0) / math.log(n1 / n0)
            return float(math.exp(math.log(lr0) + t * math.log(lr1 / lr0)))
    return points[-1][1]
