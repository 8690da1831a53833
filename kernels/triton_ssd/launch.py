"""Launch-side helpers shared by the stage launchers: tile sizes, launch settings, the order of
the per-head grids, and the split of a group's heads over programs (with the partial outputs
it needs)."""

import functools
import math

import torch

from ..host_math import cdiv, next_power_of_2
from .split_sum import split_sum

# Launchers whose programs loop over a group's heads, and so take "heads_per_program".
HEAD_SPLIT_LAUNCHERS = ("bmm_bwd_dcb", "chunk_scan_bwd_dc", "chunk_state_bwd_db")
# Launchers with a tile over dstate, which "tile_dstate" caps apart from "tile" (a dstate of
# 128 in one tile reads the other operand once instead of twice).
DSTATE_LAUNCHERS = ("bmm_fwd", "chunk_state_fwd", "chunk_state_passing_fwd", "chunk_scan_fwd", "chunk_scan_bwd_dstates",
                    "chunk_scan_state_passing_bwd", "chunk_scan_bwd_dx", "chunk_scan_bwd_dc", "chunk_state_bwd_db")
# chunk_cumsum's launchers take "block_h": at most this many heads per program.
BLOCK_H_LAUNCHERS = ("chunk_cumsum_fwd", "chunk_cumsum_bwd")
# Launchers with a causal loop over the chunk's tokens, whose step "tile_k" caps apart from
# "tile" (chunk_scan_bwd_dx is faster stepping by 32 under 64-row tiles).
K_LAUNCHERS = ("chunk_scan_fwd", "chunk_scan_bwd_dx")
# Launchers with one program per (tile, batch × chunk, head) (the fused state passings: per
# (tile, batch, head)), whose "heads_fastest" orders the grid with the heads innermost
# (launch.head_grid, tiles.head_program_ids).
HEAD_GRID_LAUNCHERS = ("chunk_state_fwd", "chunk_state_passing_fwd", "chunk_scan_fwd", "chunk_scan_bwd_dstates",
                       "chunk_scan_state_passing_bwd", "chunk_scan_bwd_dx")
# The fused state passings, one program per (p tile × n tile, batch, head) walking the chunks:
# their "grid_programs" splits dstate into narrower tiles while the grid is below it
# (grid_dstate_block).
DSTATE_SPLIT_LAUNCHERS = ("chunk_state_passing_fwd", "chunk_scan_state_passing_bwd")
# Each launcher-specific setting and the launchers that take it (`settings` strips them from
# the Triton options; `bench/profile_ssd.py --sweep` tries them only where they apply).
SPECIFIC_SETTINGS = {"heads_per_program": HEAD_SPLIT_LAUNCHERS,
                     "grid_programs": HEAD_SPLIT_LAUNCHERS + DSTATE_SPLIT_LAUNCHERS,
                     "tile_dstate": DSTATE_LAUNCHERS, "block_h": BLOCK_H_LAUNCHERS, "tile_k": K_LAUNCHERS,
                     "heads_fastest": HEAD_GRID_LAUNCHERS}

# Per launcher: the cap on its tile edges ("tile", default 64), Triton launch options
# (num_warps, num_stages) and the launcher-specific keys above. Chosen from
# `bench/profile_ssd.py --sweep` on an H100 (numbers in bench/results/ssd-notes.md); a
# launcher not listed runs 64-wide tiles at Triton's defaults. Fixed settings rather than
# triton.autotune: the autotuner's per-call bookkeeping cost more launch time than it won at
# training shapes (measured, same notes).
SETTINGS: dict[str, dict] = {
    # one pipeline stage: these tiles are re-read little, and deeper pipelining only adds
    # shared memory (b8 L2048 h32, ms: 0.359 → 0.222, 0.397 → 0.271). After the bounds-only
    # CB loads, at b4 L2048 h64: chunk_scan_fwd 0.203 → 0.167 with dstate in one tile (C·states
    # is one dot), chunk_scan_bwd_dx 0.273 → 0.224 stepping its causal loop by 32
    # "heads_fastest" (b16 L2048 h24, 130m / b4 L2048 h64, 1.3b; ms): chunk_scan_bwd_dx 0.417 →
    # 0.295 / 0.203 → 0.197, chunk_scan_bwd_dstates 0.103 → 0.093 / 0.068 → 0.065,
    # chunk_state_fwd 0.114 → 0.107 / 0.077 → 0.075. chunk_scan_fwd only where CB outgrows
    # half the L2: 130m's CB (33.5 MB fp32 at b16) did not stay in an H100's 50 MB beside the
    # x it streams, so each head read it from memory again (0.321 ms against 0.162 at b8 L2048
    # h32, 2/3 of the work and a 16.8 MB CB); heads first, 0.321 → 0.296, but at b8 h32 0.162 →
    # 0.198 and at b4 h64 0.157 → 0.196. Those CBs were fp32; the forward's is now in C's dtype,
    # so 130m's (16.8 MB in bf16) takes the plain order as b8 h32's 16.8 MB did (the rule's
    # bytes; not yet measured at 130m)
    "chunk_scan_fwd": {"num_stages": 1, "tile_dstate": 128, "heads_fastest": 0.5},
    "chunk_scan_bwd_dx": {"num_stages": 1, "tile_k": 32, "heads_fastest": True},
    "chunk_scan_bwd_dstates": {"num_stages": 3, "tile_dstate": 128, "heads_fastest": True},   # 0.071 → 0.067
    "chunk_state_fwd": {"heads_fastest": True},
    # the fused state passings (b8 L2048 h32, ms, against 64-wide tiles with the heads first at
    # Triton's defaults): a chunk's dstate in one tile, the forward stepping 128 tokens at 2
    # stages 0.092 → 0.073, the backward at 3 stages 0.102 → 0.082 (grid in its plain order:
    # its 256 programs are all in flight at once). Below 256 programs dstate splits
    # (grid_dstate_block): at b4 L2048 h32, a TP=2 rank of 1.3b, forward 0.064 → 0.049, backward
    # 0.067 → 0.056; at 64 pairs (b1 L16384 h64) 0.394 → 0.223 and 0.442 → 0.293 (512: no better)
    "chunk_state_passing_fwd": {"tile": 128, "num_warps": 4, "num_stages": 2, "tile_dstate": 128,
                                "grid_programs": 256},
    "chunk_scan_state_passing_bwd": {"tile": 64, "num_warps": 4, "num_stages": 3, "tile_dstate": 128,
                                     "grid_programs": 256},
    "chunk_cumsum_bwd": {"num_warps": 8, "num_stages": 3, "block_h": 8},  # 0.026 → 0.020
    # A group's heads over several programs (head_split), as many as keep the grid within
    # "grid_programs". b4 L2048 h64 g1 (1.3b), ms: bmm_bwd_dcb 0.499 → 0.327 split, → 0.275 at
    # 3 stages once its head loop became the innermost loop (launch.whole). How far to split
    # depends on the grid: the sweep's best bmm_bwd_dcb split 1.3b's 64 heads 4 ways (512 → 2048
    # programs) but 130m's 24 heads (b16 L2048 h24: already 2048 programs) not at all (0.374 ms
    # as 12 + 12 → 0.312); chunk_scan_bwd_dc and chunk_state_bwd_db ran best as 128-wide tiles
    # at 8 warps and 3 stages split to about 128 programs: 1.3b 0.117 → 0.089 and 0.135 →
    # 0.096 (2 splits), 130m 0.154 → 0.117 and 0.215 → 0.141 (none)
    "chunk_scan_bwd_dc": {"tile": 128, "num_warps": 8, "num_stages": 3, "grid_programs": 128},
    "chunk_state_bwd_db": {"tile": 128, "num_warps": 8, "num_stages": 3, "grid_programs": 128},
    "bmm_bwd_dcb": {"num_stages": 3, "grid_programs": 2048},
}


# SETTINGS were chosen on bf16 inputs. fp32 operands take twice the shared memory in the same
# tiles, and some shipped tiles then do not fit: the fused forward's 128-token step asked 384 KB
# in fp32 against an H100's 227 KB a block. So for 4-byte inputs every launcher runs at most
# 64-wide tiles and two pipeline stages (fp32 training is for checks, not speed; a test runs
# every stage at full-size tiles on fp32 inputs, which on a GPU is the check that they fit).
WIDE_INPUT_CAPS = {"tile": 64, "tile_dstate": 64, "tile_k": 64, "num_stages": 2}
_UNSET = {"tile": 64, "num_stages": 3}   # a launcher's tile cap, and Triton's stages, when not set


def _options(launcher, dtype):
    """A launcher's SETTINGS for inputs of `dtype` (None: as shipped)."""
    options = SETTINGS.get(launcher, {})
    if dtype is None or dtype.itemsize < 4:
        return options
    capped = dict(options)
    for key, cap in WIDE_INPUT_CAPS.items():
        if key in options or key in _UNSET:
            capped[key] = min(options.get(key, _UNSET.get(key)), cap)
    return capped


def settings(launcher, dtype=None):
    """(tile cap, Triton launch options) of a launcher, for inputs of `dtype`."""
    options = {k: v for k, v in _options(launcher, dtype).items() if k not in SPECIFIC_SETTINGS}
    return options.pop("tile", 64), options


def _capped_block(launcher, key, dim, dtype):
    # a tile edge whose own setting `key` caps it apart from the launcher's "tile"
    options = _options(launcher, dtype)
    return block(dim, options.get(key, options.get("tile", 64)))


def dstate_block(launcher, dstate, dtype=None):
    """Tile edge over dstate: capped by the launcher's "tile_dstate", else by its "tile"."""
    return _capped_block(launcher, "tile_dstate", dstate, dtype)


def k_block(launcher, chunk_size, dtype=None):
    """Step of a causal loop over source tokens: capped by the launcher's "tile_k", else by its "tile"."""
    return _capped_block(launcher, "tile_k", chunk_size, dtype)


def grid_dstate_block(launcher, dstate, programs_per_dstate_tile, dtype=None):
    """dstate_block for a fused state passing, halved (down to 16) while its grid,
    `programs_per_dstate_tile` programs for each dstate tile, stays below the launcher's
    "grid_programs". The state's columns are independent, so narrower tiles only add programs
    (each reading the same x or dy tile): a tensor-parallel rank, with half the heads, would
    otherwise leave SMs idle at one program a (batch, head) pair."""
    edge, enough = dstate_block(launcher, dstate, dtype), _options(launcher, dtype).get("grid_programs", 0)
    while edge > 16 and cdiv(dstate, edge) * programs_per_dstate_tile < enough:
        edge //= 2
    return edge


def head_grid(launcher, tiles, batch_chunks, heads, shared=None):
    """(grid, HEADS_FASTEST) of a HEAD_GRID_LAUNCHERS launcher: (tiles, batch × chunks, heads),
    or the heads first (tiles.head_program_ids reads either) where its "heads_fastest" says:
    True always; a fraction f when `shared`, the group tensor every head re-reads (CB), is
    larger than f × the GPU's L2, so that head after head would read it from memory again."""
    option = SETTINGS.get(launcher, {}).get("heads_fastest")
    if option is True or (option and shared is not None
                          and shared.numel() * shared.element_size() > option * l2_bytes(shared.device)):
        return (heads, tiles, batch_chunks), True
    return (tiles, batch_chunks, heads), False


@functools.lru_cache(maxsize=None)
def l2_bytes(device):
    """The L2 cache of a CUDA device in bytes (infinite elsewhere: the interpreter has none)."""
    if device.type != "cuda":
        return math.inf
    return torch.cuda.get_device_properties(device).L2_cache_size


@functools.lru_cache(maxsize=None)
def sm_count(device):
    """The streaming multiprocessors of a CUDA device (0 elsewhere: the interpreter has none)."""
    if device.type != "cuda":
        return 0
    return torch.cuda.get_device_properties(device).multi_processor_count


def head_split(launcher, heads_per_group, programs):
    """(splits, heads per split) for a launcher whose programs loop over a group's heads.

    A group's heads may be spread over `splits` programs, each writing its own fp32 partial
    that the launcher sums: more programs in flight when the grid is small and a group has many
    heads (1.3b's 64 heads a group: 64 dependent iterations per program otherwise). The setting
    "grid_programs" splits as far as keeps the grid, `programs` without a split, within that
    many programs; "heads_per_program" (tests, sweeps) caps the heads a program instead. Either
    way the heads are shared out as evenly as the split count allows.
    """
    options = SETTINGS.get(launcher, {})
    if options.get("heads_per_program"):
        splits = cdiv(heads_per_group, min(options["heads_per_program"], heads_per_group))
    else:
        splits = max(1, min(heads_per_group, options.get("grid_programs", 0) // programs))
    per_split = cdiv(heads_per_group, splits)
    return cdiv(heads_per_group, per_split), per_split


def split_output(splits, shape, like):
    """Where a head-split launcher writes: (splits, *shape) fp32 partials, or one slice of
    `like`'s dtype when there is no split (no partials, no sum)."""
    dtype = torch.float32 if splits > 1 else like.dtype
    return torch.empty((splits, *shape), device=like.device, dtype=dtype)


def group_grad_output(launcher, B, C, heads_per_group, programs, out=None):
    """What the dB and dC launchers share: the head split of a grid of `programs` without it,
    and where the splits write: straight into `out` (B's shape, any strides: the kernels take
    the output's strides) when there is one split, else into fp32 partials.
    -> (splits, b, l, g, n) target, splits, heads per split"""
    assert B.stride() == C.stride(), "B and C must share strides"
    splits, heads_per_split = head_split(launcher, heads_per_group, programs)
    if splits == 1 and out is not None:
        assert out.shape == B.shape and out.dtype == B.dtype, "out must have B's shape and dtype"
        return out.unsqueeze(0), splits, heads_per_split
    return split_output(splits, B.shape, B), splits, heads_per_split


def sum_splits(partials, dtype, out=None):
    """The output from split_output's partials: the one slice as it is, or their sum in dtype
    (written into `out` where given; group_grad_output's one slice is already `out`)."""
    if partials.shape[0] == 1:
        return partials[0]
    if out is None:
        out = torch.empty(partials.shape[1:], device=partials.device, dtype=dtype)
    return split_sum(partials, out)


def block(dim, cap=64):
    """Tile edge for a dimension: its next power of two, at least 16 (tl.dot's minimum), at most cap."""
    return max(16, min(cap, next_power_of_2(dim)))


def whole(dim):
    """Tile edge covering all of a dimension: a head's p in the per-head loops, so that each head
    is one tl.dot and the head loop is the innermost loop. Triton's pipeliner overlaps the next
    iteration's loads with this one's dot in innermost loops at num_stages > 1 (an outer loop
    gets 2 stages at most, and only in some cases)."""
    return max(16, next_power_of_2(dim))


def seq_strides(seq_idx):
    return seq_idx.stride() if seq_idx is not None else (0, 0)
