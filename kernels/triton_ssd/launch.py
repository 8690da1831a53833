"""Launch-side helpers shared by the stage launchers: tile sizes and head splits."""

import triton


def block(dim, cap=64):
    """Tile edge for a dimension: its next power of two, at least 16 (tl.dot's minimum), at most cap."""
    return max(16, min(cap, triton.next_power_of_2(dim)))


def head_splits(heads_per_group, most=8):
    """How many programs share one group's heads in the per-group backward kernels.

    With one group (g = 1) a program that loops over all h heads runs h dependent steps
    while few programs fill the GPU; splitting the heads over programs (each adding its
    fp32 partial atomically) trades that for atomic adds. The split divides the heads evenly.
    """
    return max(d for d in range(1, min(most, heads_per_group) + 1) if heads_per_group % d == 0)


def seq_strides(seq_idx):
    return seq_idx.stride() if seq_idx is not None else (0, 0)
