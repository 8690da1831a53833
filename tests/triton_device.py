"""Where the Triton kernel tests run: on the GPU, or on the CPU under Triton's interpreter
(tests/conftest.py sets TRITON_INTERPRET=1 before anything imports triton when there is no GPU)."""

import pytest
import torch


def triton_device(kernel, package: str) -> str:
    """"cpu" if `kernel` (a triton.jit function of `package`) runs interpreted, else "cuda".
    Skips the calling test module when neither can run it: triton.jit picks interpreter or
    compiler when the kernel is defined, i.e. at the package's first import."""
    if type(kernel).__name__ == "InterpretedFunction":
        return "cpu"
    if not torch.cuda.is_available():
        pytest.skip(f"{package} was imported before TRITON_INTERPRET=1 was set (set it in the environment); "
                    "without CUDA the kernels need the interpreter", allow_module_level=True)
    return "cuda"
