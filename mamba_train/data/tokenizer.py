"""One small tokenizer interface over sentencepiece models and Hugging Face
`tokenizer.json` files, plus training a sentencepiece model for our own corpora.

`encode` never adds BOS/EOS: the data pipeline appends `eod_id` after each document
itself, so every tokenizer produces the same document layout. `encode_documents` is what
the pipeline calls: the same ids as `encode_batch`, as one array, and for sentencepiece
BPE models about twice as fast (segments.py).
"""

from __future__ import annotations

import io
import json
import os
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from itertools import chain
from pathlib import Path

import numpy as np

from mamba_train.data.indexed import DataError
from mamba_train.data.segments import PairCuts, encode_in_segments


class TokenizerError(DataError):
    """A tokenizer file that cannot be loaded or trained; the message names the file."""


class Tokenizer(ABC):
    path: Path  # the file it was loaded from (worker processes reload it from there)
    vocab_size: int
    eod_id: int  # appended after every document; the SSD state resets after it

    @abstractmethod
    def encode(self, text: str) -> list[int]: ...

    @abstractmethod
    def decode(self, ids: Iterable[int]) -> str: ...

    @abstractmethod
    def token(self, token_id: int) -> str:
        """The vocabulary entry of an id (a special token's name, e.g. the EOD's)."""

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(text) for text in texts]

    def encode_documents(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(ids, ends): encode_batch(texts) back to back as one int64 array, and where each
        text's ids end (ids[ends[i-1]:ends[i]] are text i's)."""
        encoded = self.encode_batch(texts)
        ends = np.cumsum([len(ids) for ids in encoded], dtype=np.int64)
        return np.fromiter(chain.from_iterable(encoded), dtype=np.int64, count=int(ends[-1]) if texts else 0), ends


class SentencePieceTokenizer(Tokenizer):
    def __init__(self, path: str | os.PathLike):
        import sentencepiece

        self.path = Path(path)
        if not self.path.is_file():
            raise TokenizerError(f"{self.path}: sentencepiece model not found")
        self._sp = sentencepiece.SentencePieceProcessor()
        try:
            self._sp.Load(str(self.path))
        except (OSError, RuntimeError) as error:
            raise TokenizerError(f"{self.path}: not a sentencepiece model ({error})") from None
        self.vocab_size = self._sp.GetPieceSize()
        self.eod_id = self._sp.eos_id()
        if self.eod_id < 0:
            raise TokenizerError(f"{self.path}: the model has no EOS piece to use as end-of-document")
        self.cuts = sentencepiece_cuts(self._sp)  # None: documents are encoded whole

    def encode(self, text: str) -> list[int]:
        return self._sp.EncodeAsIds(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # one thread: the data pipeline already runs one tokenizer per worker process
        return self._sp.Encode(texts, out_type=int, num_threads=1)

    def encode_documents(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        if self.cuts is not None:
            try:
                return encode_in_segments(texts, self.cuts, self.encode_batch)
            except UnicodeEncodeError:  # a lone surrogate: sentencepiece itself decides what happens
                pass
        return super().encode_documents(texts)

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.DecodeIds([int(i) for i in ids])

    def token(self, token_id: int) -> str:
        return self._sp.IdToPiece(int(token_id))


class HFTokenizer(Tokenizer):
    """A local Hugging Face `tokenizer.json` (e.g. GPT-NeoX's). The end-of-document id is
    the `eos_token` of a `tokenizer_config.json` beside it, else the first known EOS-like
    special token that the vocabulary has."""

    EOD_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eos|>")

    def __init__(self, path: str | os.PathLike):
        import tokenizers

        self.path = Path(path)
        if not self.path.is_file():
            raise TokenizerError(f"{self.path}: tokenizer.json not found")
        try:
            self._tok = tokenizers.Tokenizer.from_file(str(self.path))
        except Exception as error:  # the Rust side raises plain Exception subclasses
            raise TokenizerError(f"{self.path}: not a Hugging Face tokenizer file ({error})") from None
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        candidates = list(self.EOD_CANDIDATES)
        config = self.path.with_name("tokenizer_config.json")
        if config.is_file():
            eos = json.loads(config.read_text(encoding="utf-8")).get("eos_token")
            eos = eos.get("content") if isinstance(eos, dict) else eos
            if isinstance(eos, str):
                candidates.insert(0, eos)
        ids = [self._tok.token_to_id(token) for token in candidates]
        found = [i for i in ids if i is not None]
        if not found:
            raise TokenizerError(f"{self.path}: no end-of-document token; looked for {', '.join(candidates)}")
        self.eod_id = found[0]

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # encode_batch_fast (tokenizers >= 0.21) skips the character offsets we never use:
        # the same ids, about a third faster
        encode = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        return [e.ids for e in encode(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def token(self, token_id: int) -> str:
        return self._tok.id_to_token(int(token_id))


# A text with what the fast path must get right: runs of spaces, tabs and newlines, digits,
# punctuation, an unknown character (byte fallback), "▁" written out, a NUL.
_PROBE = ("def f(x):\n    return x  + 1\t# 12.5%  \n\n  Ünïcödé — 日本語 ✓ ▁a ▁ b\x00c  \r\n"
          "The quick brown fox, jumps; over the lazy dog... 'quote' \"dq\" {k: [1, 2]}   \n")


def sentencepiece_cuts(sp) -> PairCuts | None:
    """The places a model's encoding may be cut (segments.PairCuts), or None if cutting
    could change its ids: not BPE, a normalizer that is not character by character
    (NFKC, a dummy prefix, collapsed whitespace), no byte fallback (sentencepiece fuses
    runs of unknown characters into one <unk>), unused pieces (their resegmentation
    depends on the whole text), or a vocabulary with too many distinct characters. A
    probe text must also encode the same both ways, in case a sentencepiece version
    adds something these checks do not know."""
    try:
        from sentencepiece import sentencepiece_model_pb2 as spec
        model = spec.ModelProto.FromString(sp.serialized_model_proto())
    except Exception:  # protobuf missing or incompatible with the generated module: encode whole
        return None
    normalizer, trainer = model.normalizer_spec, model.trainer_spec
    piece_type = spec.ModelProto.SentencePiece
    if (trainer.model_type != spec.TrainerSpec.BPE or normalizer.precompiled_charsmap or normalizer.add_dummy_prefix
            or normalizer.remove_extra_whitespaces or trainer.treat_whitespace_as_suffix or not trainer.byte_fallback
            or any(p.type == piece_type.UNUSED for p in model.pieces)):
        return None
    pieces = [p.piece for p in model.pieces if p.type in (piece_type.NORMAL, piece_type.USER_DEFINED)]
    try:
        cuts = PairCuts(pieces, same_chars=[(" ", "\u2581")] if normalizer.escape_whitespaces else [])
    except ValueError:
        return None
    probe = [_PROBE, _PROBE[::-1], _PROBE * 3]
    whole = sp.Encode(probe, out_type=int, num_threads=1)
    ids, ends = encode_in_segments(probe, cuts, lambda texts: sp.Encode(texts, out_type=int, num_threads=1))
    if ids.tolist() != list(chain.from_iterable(whole)) or ends.tolist() != np.cumsum([len(w) for w in whole]).tolist():
        return None
    return cuts


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """A .model file → sentencepiece; a .json file → Hugging Face; a directory → the
    tokenizer.json or tokenizer.model inside it."""
    path = Path(path)
    if path.is_dir():
        for name in ("tokenizer.json", "tokenizer.model"):
            if (path / name).is_file():
                return load_tokenizer(path / name)
        raise TokenizerError(f"{path}: directory holds neither tokenizer.json nor tokenizer.model")
    if path.suffix == ".model":
        return SentencePieceTokenizer(path)
    if path.suffix == ".json":
        return HFTokenizer(path)
    raise TokenizerError(f"{path}: unknown tokenizer file (expected a sentencepiece .model or a tokenizer.json)")


# Training --------------------------------------------------------------------------------

# sentencepiece trains on "sentences" and silently drops longer ones, so documents are
# cut at line ends into pieces below this many bytes (newlines stay inside the pieces,
# so the model learns newline and indentation pieces, which code needs).
_MAX_PIECE_BYTES = 4096


def train_sentencepiece(texts: Iterable[str], out_prefix: str | os.PathLike, vocab_size: int,
                        model_type: str = "bpe", sample_docs: int = 20000, seed: int = 0,
                        max_doc_chars: int = 100_000, num_threads: int | None = None, byte_fallback: bool = True,
                        character_coverage: float = 0.9995) -> SentencePieceTokenizer:
    """Train on a uniform sample of `sample_docs` documents of `texts` (reservoir sampling
    with `seed`, so the stream is read once and never held whole); write
    `<out_prefix>.model` and return it loaded.

    Settings that make decode(encode(text)) == text for ordinary text: identity
    normalization, whitespace kept as is, no dummy prefix, byte fallback for characters
    outside the vocabulary (without it they become <unk>, id 0, and do not round-trip).
    EOS (id 1) is the end-of-document token; there is no BOS.
    """
    import sentencepiece

    if model_type not in ("bpe", "unigram"):
        raise TokenizerError(f"model_type: expected 'bpe' or 'unigram', found {model_type!r}")
    sample = _reservoir_sample(texts, sample_docs, seed, max_doc_chars)
    if not sample:
        raise TokenizerError("train_sentencepiece: no documents to train on")
    model = io.BytesIO()
    try:
        sentencepiece.SentencePieceTrainer.Train(
            sentence_iterator=_training_pieces(sample), model_writer=model,
            vocab_size=vocab_size, model_type=model_type,
            unk_id=0, eos_id=1, bos_id=-1, pad_id=-1, eos_piece="<|endoftext|>",
            byte_fallback=byte_fallback, character_coverage=character_coverage,
            normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
            allow_whitespace_only_pieces=True, split_digits=True,
            max_sentence_length=2 * _MAX_PIECE_BYTES, input_sentence_size=0, shuffle_input_sentence=False,
            num_threads=num_threads or os.cpu_count() or 1, minloglevel=2,
        )
    except RuntimeError as error:
        # e.g. "Vocabulary size is smaller than required_chars": name our knob
        raise TokenizerError(f"sentencepiece training failed (vocab_size={vocab_size}, "
                         f"model_type={model_type}): {error}") from None
    path = Path(f"{out_prefix}.model")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_bytes(model.getvalue())
    os.replace(tmp, path)  # atomic: a resumed prep may find and reuse it
    return SentencePieceTokenizer(path)


def _reservoir_sample(texts: Iterable[str], size: int, seed: int, max_chars: int) -> list[str]:
    """Algorithm R: after n items each one is in the sample with probability size/n."""
    rng = np.random.default_rng(seed)
    sample: list[str] = []
    for n, text in enumerate(texts):
        text = text[:max_chars]
        if n < size:
            sample.append(text)
        else:
            slot = int(rng.integers(0, n + 1))
            if slot < size:
                sample[slot] = text
    return sample


def _training_pieces(texts: list[str]) -> Iterator[str]:
    for text in texts:
        piece, piece_bytes = [], 0
        for line in text.splitlines(keepends=True):
            size = len(line.encode("utf-8"))
            if piece and piece_bytes + size > _MAX_PIECE_BYTES:
                yield "".join(piece)
                piece, piece_bytes = [], 0
            piece.append(line)
            piece_bytes += size
        if piece:
            yield "".join(piece)
