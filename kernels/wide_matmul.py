"""Products of narrow (bf16/fp16) operands written straight in a wider dtype (fp32).

Under autocast a weight's gradient is taken in bf16, written, read back and cast to the fp32
weight's dtype (autocast's cast of the weight hands it back so): 2 + 2 + 4 bytes moved an
element, and a bf16 rounding of the sum. cuBLAS can write the fp32 sum itself: 4 bytes and no
rounding. torch exposes that as the `out_dtype` overloads of mm and addmm, on CUDA only; on
other devices these fall back to the product and a cast (or an add).
"""

import torch


def matmul_in_dtype(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """a @ b (2-D) as a tensor of `dtype`, accumulated in fp32 and rounded once to `dtype`."""
    if a.is_cuda and a.dtype != dtype:
        return torch.mm(a, b, out_dtype=dtype)
    return (a @ b).to(dtype)


def add_matmul_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b (2-D), the product added into acc's wider dtype without a narrow copy."""
    if acc.is_cuda and a.dtype != acc.dtype:
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    else:
        acc += a @ b
