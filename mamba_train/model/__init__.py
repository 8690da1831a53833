from mamba_train.model.flops import count_params, ssd_forward_flops_per_token, training_flops_per_token
from mamba_train.model.lm import Mamba2LM, param_groups, set_recompute
from mamba_train.model.mamba2 import Mamba2Block, Mamba2Mixer, MixerState, RMSNorm

__all__ = ["Mamba2LM", "Mamba2Block", "Mamba2Mixer", "MixerState", "RMSNorm", "param_groups", "set_recompute",
           "count_params", "ssd_forward_flops_per_token", "training_flops_per_token"]
