"""The public causal conv1d on Triton: the forward and backward kernels as one autograd Function."""

import torch

from ..reference.conv import _check_conv_inputs
from .conv1d import conv1d_bwd, conv1d_fwd


class CausalConv1dFunction(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, weight, bias, initial_state, seq_idx, activation, return_final_state):
        out, final_state = conv1d_fwd(x, weight, bias, initial_state, seq_idx, activation, return_final_state)
        # nothing but the inputs is saved: backward recomputes the pre-activation from x
        ctx.save_for_backward(x, weight, bias, initial_state, seq_idx)
        ctx.activation = activation
        # an unused output's gradient arrives as None, not as a tensor of zeros
        ctx.set_materialize_grads(False)
        return out, final_state

    @staticmethod
    def backward(ctx, dout, dfinal_state):
        x, weight, bias, initial_state, seq_idx = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(x)
        dx, dweight, dbias, dinit = conv1d_bwd(dout, dfinal_state, x, weight, bias, initial_state, seq_idx,
                                               ctx.activation)
        return dx, dweight, dbias, dinit, None, None, None


def causal_conv1d_triton(x, weight, bias=None, activation="silu", initial_state=None,
                         return_final_state=False, seq_idx=None):
    """Depthwise causal conv1d over channels-last x (Triton); same signature and result as
    `kernels.reference.causal_conv1d`: out (b, l, d) in x's dtype, and with
    `return_final_state` the last w-1 input rows of the last document (b, w-1, d)."""
    # x: (b, l, d)  weight: (d, w)  bias: (d,)  initial_state: (b, w-1, d)  seq_idx: (b, l)
    _check_conv_inputs(x, weight, bias, activation, initial_state, seq_idx)
    out, final_state = CausalConv1dFunction.apply(x, weight, bias, initial_state, seq_idx, activation,
                                                  return_final_state)
    return (out, final_state) if return_final_state else out
