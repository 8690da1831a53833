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
    # the state-passing kernels in context parallelism's forms: the gathered states summed as
    # loaded (WeightedStates), and a relayed state (bf16, in a peer's buffer) scaled as loaded,
    # with the final state or dinit written into a bf16 slot
    from kernels.triton_ssd import state_passing
    bf16 = {"seq_idx_ptr": "*i32", "states_in_ptr": "*bf16", "dstates_ptr": "*bf16"}
    for kernel, prefix, flags in ((state_passing._state_passing_fwd_kernel, "INIT", dict(HAS_INIT=True)),
                                  (state_passing._state_passing_bwd_kernel, "DFINAL", dict(HAS_DFINAL=True))):
        lower, out = prefix.lower(), "final_ptr" if prefix == "INIT" else "dinit_ptr"
        for terms in (2, 0):   # gathered, relayed
            compile_for_sm90(kernel, {f"{lower}_ptr": "*bf16", out: "*bf16", **bf16},
                             {f"{prefix}_TERMS": terms, f"{prefix}_SCALED": terms == 0, "HAS_SEQ": True,
                              "ONTO_BASE": terms > 0, "BLOCK": 1024, **flags,
                              **({"HAS_DINIT": terms == 0} if prefix == "DFINAL" else {})})
    tiles = {"HAS_SEQ": True, "BLOCK_P": 64, "BLOCK_N": 64, "BLOCK_K": 64, "HEADS_FASTEST": False}
    compile_for_sm90(state_passing._chunk_state_passing_fwd_kernel,
                     {"x_ptr": "*bf16", "B_ptr": "*bf16", "init_ptr": "*bf16", "final_ptr": "*bf16", **bf16},
                     {"HAS_INIT": True, "INIT_SCALED": True, **tiles})
    compile_for_sm90(state_passing._chunk_scan_state_passing_bwd_kernel,
                     {"dy_ptr": "*bf16", "C_ptr": "*bf16", "dfinal_ptr": "*bf16", "dinit_ptr": "*bf16", **bf16},
                     {"HAS_DFINAL": True, "DFINAL_SCALED": True, "HAS_DINIT": True, **tiles})


if __name__ == "__main__":
    state_passing_with_boundary_states()
    print("compiled")
