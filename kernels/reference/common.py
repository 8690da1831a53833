"""What every reference op shares: the compute dtype and the argument checks' messages."""

import torch


def _compute_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _upcast(t, dtype):
    return None if t is None else t.to(dtype)


def _expect_shape(name, t, shape, what):
    if t is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)} {what}, found {tuple(t.shape)}")


def _expect_integer(name, t):
    if t is not None and (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool):
        raise ValueError(f"{name}: expected an integer tensor of document ids, found {t.dtype}")
