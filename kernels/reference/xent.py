"""Cross-entropy by rows: whole, and as the two passes of a vocabulary split over ranks."""

import torch


def cross_entropy_rows(logits, labels, grad_scale=None):
    """Cross-entropy of each row (fp32 or wider), and with grad_scale its gradient in place.

    logits: (rows, vocab); labels: (rows,), negative for ignored rows (loss meaningless,
    gradient zero). With grad_scale (rows,), logits are overwritten by
    d(sum_r grad_scale[r] · loss[r]) / d logits = (softmax − one-hot) · grad_scale.
    """
    # logits: (r, v)  labels, grad_scale, loss: (r,)
    cdt = torch.promote_types(logits.dtype, torch.float32)
    values = logits.to(cdt)
    lse = torch.logsumexp(values, dim=-1)
    safe = labels.clamp_min(0).long()
    loss = lse - values.gather(1, safe[:, None]).squeeze(1)
    if grad_scale is not None:
        grad = torch.exp(values - lse[:, None])
        grad.scatter_add_(1, safe[:, None], torch.full_like(lse, -1.0)[:, None])
        grad *= grad_scale.to(cdt)[:, None] * (labels >= 0).to(cdt)[:, None]
        logits.copy_(grad)
    return loss


def logsumexp_rows(logits, labels):
    """The first half of cross_entropy_rows, for a vocabulary split over ranks: per row the
    log-sum-exp (fp32 or wider) and the logit at the label where 0 <= label < vocab, else 0.

    logits: (rows, vocab); labels: (rows,) → lse, target: (rows,)."""
    cdt = torch.promote_types(logits.dtype, torch.float32)
    values = logits.to(cdt)
    here = (labels >= 0) & (labels < logits.shape[1])
    target = values.gather(1, torch.where(here, labels, 0).long()[:, None]).squeeze(1)
    return torch.logsumexp(values, dim=-1), torch.where(here, target, 0.0)


def softmax_grad_rows(logits, labels, lse, grad_scale):
    """The second half: logits (rows, vocab) overwritten by (exp(logit − lse) − one-hot(label))
    · grad_scale per row, lse being the whole vocabulary's; a label outside [0, vocab) adds
    no one-hot (another rank holds it)."""
    cdt = torch.promote_types(logits.dtype, torch.float32)
    grad = torch.exp(logits.to(cdt) - lse.to(cdt)[:, None])
    here = (labels >= 0) & (labels < logits.shape[1])
    grad.scatter_add_(1, torch.where(here, labels, 0).long()[:, None], -here.to(cdt)[:, None])
    grad *= grad_scale.to(cdt)[:, None]
    logits.copy_(grad)
