"""The segment encoder (mamba_train/data/segments.py): a chunk cut where no token can
span, each distinct segment encoded once, the ids gathered back in document order."""

import numpy as np
import pytest

from mamba_train.data import segments
from mamba_train.data.segments import PairCuts, encode_in_segments


def encode_chars(texts):
    """A toy tokenizer whose ids are the characters, so any cut is safe."""
    return [[ord(c) for c in text] for text in texts]


def cut_everywhere(codes):
    return np.arange(1, len(codes))


def cut_nowhere(codes):
    return np.zeros(0, dtype=np.int64)


@pytest.mark.parametrize("cuts", [cut_everywhere, cut_nowhere, PairCuts(["ab", "b c", "\n\n"])])
@pytest.mark.parametrize("texts", [[], [""], ["", "ab", "", "", "c d", ""], ["abab  b c\n\n\nx", "é日☃ \x00"]])
def test_ids_and_ends_are_those_of_the_whole_texts(cuts, texts):
    ids, ends = encode_in_segments(texts, cuts, encode_chars)
    assert ids.dtype == np.int64 and ids.tolist() == [ord(c) for c in "".join(texts)]
    assert ends.tolist() == np.cumsum([len(t) for t in texts]).tolist()


def test_each_distinct_segment_is_encoded_once():
    seen = []

    def encode(texts):
        seen.extend(texts)
        return encode_chars(texts)

    encode_in_segments(["the cat the", " the dog"], PairCuts(["th", "he", "ca", "at", "do", "og"]), encode)
    assert seen == ["the", " ", "cat", "dog"]  # in one call, in first-seen order


def test_pair_cuts_cut_only_between_characters_no_piece_holds_side_by_side():
    cuts = PairCuts(["ab", "bc", "▁x"], same_chars=[(" ", "▁")])
    text = "abcab xa▁x"
    codes = np.frombuffer(text.encode("utf-32-le"), dtype="<u4")
    # a|b b|c c|a a|b b|␣ ␣|x x|a a|▁ ▁|x, with " " read as "▁": cuts at c|a, b|␣, x|a, a|▁
    assert cuts(codes).tolist() == [3, 5, 7, 8]


def test_a_chunk_holding_every_marker_character_is_cut_by_slicing():
    texts = ["".join(segments._MARKERS) + " tail", "x y"]
    ids, ends = encode_in_segments(texts, cut_everywhere, encode_chars)
    assert ids.tolist() == [ord(c) for c in "".join(texts)]


def test_a_lone_surrogate_is_left_to_the_caller():
    with pytest.raises(UnicodeEncodeError):
        encode_in_segments(["a\ud800b"], cut_everywhere, encode_chars)
