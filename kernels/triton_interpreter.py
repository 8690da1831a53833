"""Imported by the Triton kernel modules whose loops run to a run-time bound, for Triton's CPU
interpreter (TRITON_INTERPRET=1, the tests' way to run kernels without a GPU).

Triton 3.6's interpreter turns a scalar into an int with int(array of shape (1,)), which
NumPy >= 2.4 refuses ("only 0-dimensional arrays can be converted to Python scalars"): every
`for k in range(0, n, BLOCK)` with a run-time n fails. This patches that one conversion, once;
compiled kernels are not affected.
"""

import os

if os.environ.get("TRITON_INTERPRET") == "1":
    import triton.runtime.interpreter as _interpreter

    _patch_lang_tensor = _interpreter._patch_lang_tensor

    def _patch_lang_tensor_index(tensor, scope):
        _patch_lang_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    if not getattr(_patch_lang_tensor, "_mamba_train_index_fix", False):
        _patch_lang_tensor_index._mamba_train_index_fix = True
        _interpreter._patch_lang_tensor = _patch_lang_tensor_index
