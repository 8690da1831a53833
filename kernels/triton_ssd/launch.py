"""Launch-side helpers shared by the stage launchers: tile sizes, launch settings, head splits."""

import triton

# Per launcher: the cap on its tile edges ("tile", default 64) and Triton launch options
# (num_warps, num_stages). Chosen from `bench/profile_ssd.py --sweep` on an H100 (numbers in
# bench/results/ssd-notes.md); a launcher not listed runs 64-wide tiles at Triton's defaults.
# Fixed settings rather than triton.autotune: the autotuner's per-call bookkeeping cost more
# launch time than it won at training shapes (measured, same notes).
SETTINGS: dict[str, dict] = {}


def settings(launcher):
    """(tile cap, launch options) of a launcher."""
    options = dict(SETTINGS.get(launcher, {}))
    return options.pop("tile", 64), options


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
