"""mamba-train's kernels: chunked SSD, causal depthwise conv1d, gated grouped RMSNorm, and the
cross-entropy of logit rows.

The public ops take the same arguments wherever they run:
- `ssd`: on CUDA tensors the Triton kernels (`kernels.triton_ssd`), elsewhere the torch
  reference (`kernels.reference`). No silent fallback: on a GPU without Triton it raises.
- `causal_conv1d`, `rmsnorm_gated`, `add_rmsnorm` (a block's residual add fused with the
  next norm), `cross_entropy_rows` (and its two passes for a vocabulary
  split over ranks, `logsumexp_rows` and `softmax_grad_rows`): likewise, on CUDA tensors the
  Triton kernels (`kernels.triton_conv`, `kernels.triton_norm`, `kernels.triton_xent`),
  elsewhere the torch reference.
- `mixer_body`: a Mamba-2 mixer from in_proj's output to out_proj's (conv, SSD, gated norm,
  out_proj); on CUDA one autograd Function over those kernels that keeps less for backward
  (`kernels.triton_mixer`), elsewhere the reference ops chained.
`ssd_sequential` is the token-by-token oracle the tests compare against.

Submodules are named for their implementation (`reference`, `triton_ssd`), never like an
op: the first import of a submodule `kernels.X` would replace the attribute `kernels.X`.

This package shares its import name with Hugging Face's `kernels` hub package. It must not
define `__version__`: transformers probes it to decide whether the hub package is installed.
"""

import importlib

from . import reference as _reference
from .reference import ssd_chunked, ssd_sequential


def _implementation(op: str, tensor, package: str, reference):
    """`op` for `tensor`: `kernels.<package>.<op>_triton` on a CUDA tensor, else `reference`.
    No silent fallback: on a GPU without Triton this raises."""
    if not tensor.is_cuda:
        return reference
    try:
        module = importlib.import_module(f".{package}", __name__)
    except ImportError as err:
        raise RuntimeError(f"kernels.{op} on a CUDA tensor needs Triton ({err}); install mamba-train[gpu]") from err
    return getattr(module, f"{op}_triton")


def ssd(x, dt, A, B, C, chunk_size, **kwargs):
    """Chunked SSD (Mamba-2); see `kernels.reference.ssd_chunked` for the arguments and
    their semantics, which the Triton path shares."""
    return _implementation("ssd", x, "triton_ssd", ssd_chunked)(x, dt, A, B, C, chunk_size, **kwargs)


def causal_conv1d(x, weight, bias=None, activation="silu", initial_state=None, return_final_state=False,
                  seq_idx=None):
    """Causal depthwise conv1d over channels-last x; see `kernels.reference.causal_conv1d`."""
    return _implementation("causal_conv1d", x, "triton_conv", _reference.causal_conv1d)(
        x, weight, bias, activation=activation, initial_state=initial_state, return_final_state=return_final_state,
        seq_idx=seq_idx)


def rmsnorm_gated(x, z, weight, eps=1e-5, group_size=None, out_dtype=None):
    """RMSNorm of x·silu(z) per group, times weight, in out_dtype (default x's); see
    `kernels.reference.rmsnorm_gated`."""
    return _implementation("rmsnorm_gated", x, "triton_norm", _reference.rmsnorm_gated)(
        x, z, weight, eps=eps, group_size=group_size, out_dtype=out_dtype)


def add_rmsnorm(residual, update, weight, eps=1e-5, out_dtype=None, out_parts=1, gather_rank=None):
    """(residual + update, RMSNorm of the sum times weight in out_dtype), the update given
    whole or as partial sums (parts, *residual's shape), the norm returned seen out_parts
    times for a consumer whose gradient comes as terms, and with gather_rank written into that
    rank's rows of a taller tensor; see `kernels.reference.add_rmsnorm`."""
    return _implementation("add_rmsnorm", residual, "triton_norm", _reference.add_rmsnorm)(
        residual, update, weight, eps=eps, out_dtype=out_dtype, out_parts=out_parts, gather_rank=gather_rank)


def mixer_body(zxbcdt, conv_weight, conv_bias, dt_bias, A, D, norm_weight, out_weight, *, ngroups, chunk_size,
               norm_eps=1e-5, dt_limit=(0.0, float("inf")), seq_idx=None, context_parallel=None,
               keep_activations=False, out_scatter=None):
    """A Mamba-2 mixer from in_proj's output [z | x | B | C | dt] to out_proj's, for a whole
    sequence or (with context_parallel) one rank's piece of it; see `kernels.reference.mixer_body`."""
    return _implementation("mixer_body", zxbcdt, "triton_mixer", _reference.mixer_body)(
        zxbcdt, conv_weight, conv_bias, dt_bias, A, D, norm_weight, out_weight, ngroups=ngroups,
        chunk_size=chunk_size, norm_eps=norm_eps, dt_limit=dt_limit, seq_idx=seq_idx,
        context_parallel=context_parallel, keep_activations=keep_activations, out_scatter=out_scatter)


def cross_entropy_rows(logits, labels, grad_scale=None):
    """Loss per row of (rows, vocab) logits and, with grad_scale, the gradient written over
    them; see `kernels.reference.cross_entropy_rows`."""
    return _implementation("cross_entropy_rows", logits, "triton_xent", _reference.cross_entropy_rows)(
        logits, labels, grad_scale)


def logsumexp_rows(logits, labels):
    """Per row of (rows, vocab) logits: log-sum-exp and the logit at the label where this
    vocabulary holds it; see `kernels.reference.logsumexp_rows`."""
    return _implementation("logsumexp_rows", logits, "triton_xent", _reference.logsumexp_rows)(logits, labels)


def softmax_grad_rows(logits, labels, lse, grad_scale):
    """(softmax − one-hot) · grad_scale written over the logits, from a given lse; see
    `kernels.reference.softmax_grad_rows`."""
    return _implementation("softmax_grad_rows", logits, "triton_xent", _reference.softmax_grad_rows)(
        logits, labels, lse, grad_scale)


__all__ = ["ssd", "ssd_sequential", "causal_conv1d", "rmsnorm_gated", "add_rmsnorm", "mixer_body", "cross_entropy_rows",
           "logsumexp_rows", "softmax_grad_rows"]
