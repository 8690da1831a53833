"""Tokenizing a chunk of documents one distinct segment at a time: the same ids, about
twice as fast as the tokenizer's own batch call.

Text is mostly a small set of short strings repeated over and over (` the`, ` =`, `\\n    `):
a 1 MB chunk of the quickstart text, cut as below, is ~250,000 segments of which ~15,000
are distinct, holding ~12% of its characters. A tokenizer's batch call encodes every
occurrence anew. Here a chunk is cut only where no token can span the cut, each distinct
segment is encoded once, and numpy gathers the ids back into document order.

Nothing is kept from one chunk to the next: memory stays bounded, and a corpus that
repeats whole documents (as bench/bench_prep.py's input does) gains nothing from it.

Where a cut is safe depends on the tokenizer; `PairCuts` knows it for sentencepiece BPE.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from itertools import chain

import numpy as np

_CODE_POINTS = 0x110000
# Unicode noncharacters (never meant for interchange): one absent from a chunk marks the
# segment ends, so that str.split cuts it in one C loop
_MARKERS = [chr(code) for code in range(0xFDD0, 0xFDF0)]


class PairCuts:
    """Where a sentencepiece BPE encoding may be cut: between two characters that no
    vocabulary piece holds side by side.

    Why this is exact (sentencepiece's bpe_model.cc): BPE starts from single characters
    and repeatedly merges the adjacent pair of symbols whose concatenation is the
    best-scoring piece of the vocabulary, ties going to the leftmost pair. A merge across
    the cut would make a piece holding both characters around it, and there is none; so
    merges never join the two sides, each side goes through exactly the merges it would
    go through alone (in the same relative order), and encode(a + b) == encode(a) +
    encode(b). That holds only for a model whose normalizer works character by character
    and adds no dummy prefix, with byte fallback and without unused pieces
    (`sentencepiece_cuts` checks those).
    """

    MAX_CHARS = 4095  # (MAX_CHARS + 1)² booleans for the pair table: 16 MB at most

    def __init__(self, pieces: Iterable[str], same_chars: Iterable[tuple[str, str]] = ()):
        """`pieces`: every piece the model can produce from text (normal, user-defined);
        `same_chars`: (text character, the character it normalizes to), e.g. (" ", "▁")."""
        pairs = {pair for piece in pieces for pair in zip(piece, piece[1:])}
        chars = sorted({c for pair in pairs for c in pair})
        if len(chars) > self.MAX_CHARS:
            raise ValueError(f"{len(chars)} characters in adjacent pairs of the vocabulary, more than "
                             f"{self.MAX_CHARS}: the pair table would be too large")
        # class 0: a character that is in no pair, so a cut on either side of it is safe
        self._class = np.zeros(_CODE_POINTS, dtype=np.int32)
        self._class[[ord(c) for c in chars]] = np.arange(1, len(chars) + 1)
        for text_char, normalized in same_chars:
            self._class[ord(text_char)] = self._class[ord(normalized)]
        self._joined = np.zeros((len(chars) + 1, len(chars) + 1), dtype=bool)
        if pairs:
            left, right = zip(*pairs)
            self._joined[self._class[[ord(c) for c in left]], self._class[[ord(c) for c in right]]] = True

    def __call__(self, codes: np.ndarray) -> np.ndarray:
        """Positions p (0 < p < len(codes)) where the text (its code points) may be cut
        before codes[p], ascending."""
        classes = self._class[codes]
        return np.flatnonzero(~self._joined[classes[:-1], classes[1:]]) + 1


def encode_in_segments(texts: list[str], cuts: Callable[[np.ndarray], np.ndarray],
                       encode: Callable[[list[str]], list[list[int]]]) -> tuple[np.ndarray, np.ndarray]:
    """(ids, ends): the ids of all texts back to back (int64) and where each text's ids
    end; identical to concatenating encode(texts) when every cut is safe for `encode`.

    Raises UnicodeEncodeError for a text holding a lone surrogate (no UTF-32 form); the
    caller encodes such a chunk whole."""
    joined = "".join(texts)
    codes = np.frombuffer(joined.encode("utf-32-le"), dtype="<u4")  # one element per str index
    text_ends = np.cumsum([len(text) for text in texts], dtype=np.int64)
    ends = np.sort(np.concatenate([cuts(codes), text_ends]))  # segment ends: every cut, every text's end
    ends = ends[np.diff(ends, prepend=0) > 0]  # each once (empty texts end where the one before did)
    segments = _split(joined, codes, ends)
    # segments per text, cumulated: how many segments end at or before each text's end
    text_segment_ends = np.searchsorted(ends, text_ends, side="right")

    distinct: dict[str, int] = {}  # segment → its row among the distinct ones, in first-seen order
    rows = np.array([distinct.setdefault(segment, len(distinct)) for segment in segments], dtype=np.int64)
    encoded = encode(list(distinct))
    lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
    flat = np.fromiter(chain.from_iterable(encoded), dtype=np.int64, count=int(lengths.sum()))
    first = np.cumsum(lengths) - lengths  # where each distinct segment's ids start in `flat`

    # ids of segment k are flat[first[rows[k]] : first[rows[k]] + lengths[rows[k]]]: one gather
    segment_lengths = lengths[rows]
    segment_ends = np.cumsum(segment_lengths)
    total = int(segment_ends[-1]) if len(segment_ends) else 0
    ids = flat[np.arange(total) + np.repeat(first[rows] - (segment_ends - segment_lengths), segment_lengths)]
    return ids, np.concatenate([[0], segment_ends])[text_segment_ends]


def _split(joined: str, codes: np.ndarray, ends: np.ndarray) -> list[str]:
    """joined cut at `ends` (ascending, the last is len(joined)): a marker character put at
    every inner end and str.split, twice as fast as slicing segment by segment."""
    marker = next((m for m in _MARKERS if m not in joined), None)
    if marker is None:  # all 32 in one chunk: only a text made to defeat this gets here
        starts = [0] + ends[:-1].tolist()
        return [joined[start:end] for start, end in zip(starts, ends.tolist())]
    if not len(ends):
        return []
    marked = np.insert(codes, ends[:-1], ord(marker))
    return marked.tobytes().decode("utf-32-le").split(marker)
