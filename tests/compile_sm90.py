"""Compiles kernels for an H100 (sm_90) without a GPU, as Triton's compiler does before a
launch: what the interpreter, which runs a kernel as Python, cannot check (the compiler's
typing, e.g. one function returning int64 in one branch and int32 in another). Run without
TRITON_INTERPRET (tests call it in a subprocess): `python tests/compile_sm90.py`."""

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource


def compile_for_sm90(cached_kernel, pointer_types: dict, constexprs: dict):
    """A @cached_launch @triton.jit kernel compiled for sm_90: pointers fp32 unless named in
    pointer_types, other arguments i32, constexprs given."""
    kernel = cached_kernel.kernel
    signature = {name: "constexpr" if name in constexprs else
                 pointer_types.get(name, "*fp32") if name.endswith("_ptr") else "i32" for name in kernel.arg_names}
    source = ASTSource(fn=kernel, signature=signature,
                       constexprs={(kernel.arg_names.index(name),): value for name, value in constexprs.items()})
    return triton.compile(source, target=GPUTarget("cuda", 90, 32))


def state_passing_with_boundary_states():
    # the two state-passing kernels that read context parallelism's boundary states, in each
    # form: gathered (WeightedStates) and read in place from each rank's buffer (PeerStates)
    from kernels.triton_ssd import state_passing
    for peers in (False, True):
        for kernel, prefix, flags in ((state_passing._state_passing_fwd_kernel, "INIT", dict(HAS_INIT=True)),
                                      (state_passing._state_passing_bwd_kernel, "DFINAL",
                                       dict(HAS_DFINAL=True, HAS_DINIT=False))):
            lower = prefix.lower()
            compile_for_sm90(kernel, {f"{lower}_ptr": "*bf16", f"{lower}_offsets_ptr": "*i64",
                                      f"{lower}_log_offsets_ptr": "*i64", "seq_idx_ptr": "*i32",
                                      "states_in_ptr": "*bf16", "dstates_ptr": "*bf16"},
                             {f"{prefix}_TERMS": 2, f"{prefix}_PEERS": peers, "HAS_SEQ": True, "ONTO_BASE": True,
                              "BLOCK": 1024, **flags})


if __name__ == "__main__":
    state_passing_with_boundary_states()
    print("compiled")
