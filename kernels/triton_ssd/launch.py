"""Launch-side helpers shared by the stage launchers: tile sizes and launch settings."""

import triton

# Per launcher: the cap on its tile edges ("tile", default 64) and Triton launch options
# (num_warps, num_stages). Chosen from `bench/profile_ssd.py --sweep` on an H100 (numbers in
# bench/results/ssd-notes.md); a launcher not listed runs 64-wide tiles at Triton's defaults.
# Fixed settings rather than triton.autotune: the autotuner's per-call bookkeeping cost more
# launch time than it won at training shapes (measured, same notes).
SETTINGS: dict[str, dict] = {
    # one pipeline stage: these tiles are re-read little, and deeper pipelining only adds
    # shared memory (b8 L2048 h32, ms: 0.359 → 0.222, 0.397 → 0.271)
    "chunk_scan_fwd": {"num_stages": 1},
    "chunk_scan_bwd_dx": {"num_stages": 1},
    "chunk_scan_bwd_dc": {"num_stages": 1},
    "chunk_state_bwd_db": {"num_stages": 1},
    "bmm_bwd_dcb": {"num_stages": 1},
}


def settings(launcher):
    """(tile cap, launch options) of a launcher."""
    options = dict(SETTINGS.get(launcher, {}))
    return options.pop("tile", 64), options


def block(dim, cap=64):
    """Tile edge for a dimension: its next power of two, at least 16 (tl.dot's minimum), at most cap."""
    return max(16, min(cap, triton.next_power_of_2(dim)))


def seq_strides(seq_idx):
    return seq_idx.stride() if seq_idx is not None else (0, 0)
