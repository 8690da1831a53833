"""Megatron-style indexed token datasets: `<prefix>.bin` holds the tokens of every
document back to back, `<prefix>.idx` says where each document starts.

The files are byte-compatible with megatron-core's `IndexedDataset` (the "MMIDIDX"
format), so data prepared here trains with Megatron and the other way round:

    .idx  magic   b"MMIDIDX\\x00\\x00"                      9 bytes
          version <Q = 1                                   8 bytes
          dtype   <B (megatron's DType code, see _DTYPE_CODES)
          sequence_count <Q  = n
          document_count <Q  = n + 1   (length of document_indices, as megatron writes it)
          sequence_lengths   int32[n]   tokens per sequence
          sequence_pointers  int64[n]   byte offset of each sequence in .bin
          document_indices   int64[n+1] = [0, 1, ..., n]: every sequence is one document
    .bin  the tokens, little-endian, in the dtype above

Reading treats each sequence as one document, which holds for everything written here
and for megatron's own preprocess_data output (without sentence splitting).

Beside them, `<prefix>.docs.npz` (ours, megatron ignores it) keeps per-document UTF-8
byte counts and subset ids, which bits-per-byte and per-subset evaluation need.
"""

from __future__ import annotations

import os
import struct
from array import array
from functools import cached_property
from pathlib import Path

import numpy as np

_MAGIC = b"MMIDIDX\x00\x00"
_VERSION = 1
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequence count, document count

# megatron.core.datasets.indexed_dataset.DType. There is no uint32 code: vocabularies
# beyond 65536 ids are stored as int32 (code 4), which holds any real vocabulary
# (< 2**31 ids) and is what megatron itself picks for large vocabularies.
_DTYPE_CODES = {
    np.dtype(np.uint8): 1,
    np.dtype(np.int8): 2,
    np.dtype(np.int16): 3,
    np.dtype(np.int32): 4,
    np.dtype(np.int64): 5,
    np.dtype(np.float64): 6,
    np.dtype(np.float32): 7,
    np.dtype(np.uint16): 8,
}
_CODE_DTYPES = {code: dtype for dtype, code in _DTYPE_CODES.items()}
_TOKEN_DTYPES = (np.dtype(np.uint16), np.dtype(np.int32))


class DataError(ValueError):
    """Base of every data-pipeline error (bad file, bad record, bad recipe): the CLI
    prints these as one line, without a traceback."""


class IndexedDatasetError(DataError):
    """A .bin/.idx/.docs.npz file that cannot be used; the message names the file."""


def token_dtype_for_vocab(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (halves disk and page cache), else int32 (see _DTYPE_CODES)."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.int32)


def dataset_files(prefix: str | os.PathLike) -> tuple[Path, Path, Path]:
    """(.bin, .idx, .docs.npz) paths of a dataset prefix."""
    prefix = str(prefix)
    return Path(prefix + ".bin"), Path(prefix + ".idx"), Path(prefix + ".docs.npz")


class IndexedDatasetWriter:
    """Writes one dataset document by document; a context manager.

    Everything goes to temporary files beside the final ones and is renamed only when the
    `with` block ends without an exception, so a crash never leaves a half-written
    dataset under the final name. The .idx is renamed last: it is what readers open first.
    """

    def __init__(self, prefix: str | os.PathLike, dtype=np.uint16):
        self.dtype = np.dtype(dtype)
        if self.dtype not in _TOKEN_DTYPES:
            raise ValueError(f"token dtype must be uint16 or int32, found {self.dtype}")
        self.bin_path, self.idx_path, self.docs_path = dataset_files(prefix)
        self._suffix = f".tmp-{os.getpid()}"
        self._bin_file = None
        # array('q') keeps per-document numbers compact (8 bytes each, not a Python int).
        self._lengths = array("q")
        self._utf8_bytes = array("q")
        self._subset_ids = array("h")
        self._subset_names: dict[str, int] = {}
        self._info = np.iinfo(self.dtype)
        self._max_token_id = -1  # kept in the sidecar so check_vocab need not scan the .bin

    def _tmp(self, path: Path) -> Path:
        return path.with_name(path.name + self._suffix)

    def __enter__(self) -> "IndexedDatasetWriter":
        self.bin_path.parent.mkdir(parents=True, exist_ok=True)
        self._bin_file = open(self._tmp(self.bin_path), "wb")
        return self

    def add_document(self, tokens, utf8_bytes: int | None = None, subset: str | None = None) -> None:
        """Append one document. `utf8_bytes` and `subset` go to the .docs.npz sidecar;
        give them for every document or for none."""
        if self._bin_file is None:
            raise RuntimeError("IndexedDatasetWriter.add_document called outside its `with` block")
        tokens = np.asarray(tokens)
        if tokens.ndim != 1:
            raise IndexedDatasetError(f"{self.bin_path}: a document must be a 1-D token list, found shape {tokens.shape}")
        if tokens.size and (tokens.min() < self._info.min or tokens.max() > self._info.max):
            raise IndexedDatasetError(f"{self.bin_path}: token ids [{tokens.min()}, {tokens.max()}] "
                             f"do not fit {self.dtype} (document {len(self._lengths)})")
        if tokens.size >= 2**31:
            raise IndexedDatasetError(f"{self.bin_path}: document {len(self._lengths)} has {tokens.size} tokens, "
                             "more than the format's int32 length allows")
        with_meta = utf8_bytes is not None or subset is not None
        if len(self._lengths) and with_meta != bool(len(self._utf8_bytes)):
            raise IndexedDatasetError(f"{self.bin_path}: give utf8_bytes and subset for every document or for none")
        if tokens.size:
            self._max_token_id = max(self._max_token_id, int(tokens.max()))
        self._bin_file.write(tokens.astype(self.dtype, copy=False).tobytes())
        self._lengths.append(tokens.size)
        if with_meta:
            self._utf8_bytes.append(-1 if utf8_bytes is None else int(utf8_bytes))
            self._subset_ids.append(self._subset_id(subset or "default"))

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray, utf8_bytes: list[int] | None = None,
                      subsets: list[str] | None = None) -> None:
        """Append len(lengths) documents whose tokens lie back to back in `tokens`, with one
        check and one write for all of them (a tokenizing worker adds a chunk of thousands
        of documents at a time); the same files as add_document for each in turn."""
        if self._bin_file is None:
            raise RuntimeError("IndexedDatasetWriter.add_documents called outside its `with` block")
        tokens, lengths = np.asarray(tokens), np.asarray(lengths, dtype=np.int64)
        if tokens.ndim != 1 or lengths.ndim != 1 or int(lengths.sum()) != tokens.size:
            raise IndexedDatasetError(f"{self.bin_path}: add_documents needs 1-D tokens and lengths that sum to "
                                      f"their count, found {tokens.size} tokens and lengths summing to {lengths.sum()}")
        if tokens.size and (tokens.min() < self._info.min or tokens.max() > self._info.max):
            first_bad = int(np.argmax((tokens < self._info.min) | (tokens > self._info.max)))
            document = len(self._lengths) + int(np.searchsorted(np.cumsum(lengths), first_bad, side="right"))
            raise IndexedDatasetError(f"{self.bin_path}: token id {tokens[first_bad]} does not fit {self.dtype} "
                                      f"(document {document})")
        if lengths.size and lengths.max() >= 2**31:
            document = len(self._lengths) + int(np.argmax(lengths >= 2**31))
            raise IndexedDatasetError(f"{self.bin_path}: document {document} has {lengths.max()} tokens, "
                                      "more than the format's int32 length allows")
        with_meta = utf8_bytes is not None or subsets is not None
        if len(self._lengths) and with_meta != bool(len(self._utf8_bytes)):
            raise IndexedDatasetError(f"{self.bin_path}: give utf8_bytes and subset for every document or for none")
        if with_meta and not (utf8_bytes is not None and subsets is not None
                              and len(utf8_bytes) == len(subsets) == len(lengths)):
            raise IndexedDatasetError(f"{self.bin_path}: add_documents needs utf8_bytes and subsets for each of "
                                      f"the {len(lengths)} documents, or neither")
        if tokens.size:
            self._max_token_id = max(self._max_token_id, int(tokens.max()))
        self._bin_file.write(tokens.astype(self.dtype, copy=False).tobytes())
        self._lengths.extend(lengths.tolist())
        if with_meta:
            self._utf8_bytes.extend(int(n) for n in utf8_bytes)
            self._subset_ids.extend(self._subset_id(subset or "default") for subset in subsets)

    def add_documents_from(self, dataset: "IndexedDataset", indices: np.ndarray) -> None:
        """Append documents `indices` (increasing) of another dataset with its sidecar, in
        bulk: merging per-shard outputs copies runs of consecutive documents as one slice
        instead of looping over documents in Python (the Pile has ~200M)."""
        if self._bin_file is None:
            raise RuntimeError("IndexedDatasetWriter.add_documents_from called outside its `with` block")
        if dataset.dtype != self.dtype:
            raise IndexedDatasetError(f"{dataset.bin_path}: tokens are {dataset.dtype}, "
                                      f"this dataset's are {self.dtype}")
        if dataset.utf8_bytes is None:
            raise IndexedDatasetError(f"{dataset.docs_path}: missing; merging needs every shard's sidecar")
        indices = np.asarray(indices, dtype=np.int64)
        if not indices.size:
            return
        if len(self._lengths) and not len(self._utf8_bytes):
            raise IndexedDatasetError(f"{self.bin_path}: give utf8_bytes and subset for every document or for none")
        # runs of consecutive documents: [run_starts[k], run_ends[k]) are contiguous tokens
        breaks = np.flatnonzero(np.diff(indices) != 1) + 1
        run_first = indices[np.concatenate([[0], breaks])]
        run_last = indices[np.concatenate([breaks - 1, [indices.size - 1]])]
        offsets, lengths, stream = dataset.doc_offsets, dataset.doc_lengths, dataset.token_stream()
        piece = 1 << 24  # tokens per write: bounds memory when a run is a whole shard
        for first, last in zip(run_first.tolist(), run_last.tolist()):
            begin, end = int(offsets[first]), int(offsets[last]) + int(lengths[last])
            for start in range(begin, end, piece):
                self._bin_file.write(stream[start:min(end, start + piece)].tobytes())
        self._lengths.extend(lengths[indices].astype(np.int64).tolist())
        self._utf8_bytes.extend(dataset.utf8_bytes[indices].tolist())
        remap = np.array([self._subset_id(name) for name in dataset.subset_names], dtype=np.int16)
        self._subset_ids.extend(remap[dataset.subset_ids[indices]].tolist())
        # the shard's maximum: an upper bound for the selected documents, which is what
        # the vocabulary check needs (it can only err towards refusing)
        self._max_token_id = max(self._max_token_id, dataset.max_token_id())

    def _subset_id(self, subset: str) -> int:
        if subset not in self._subset_names:
            if len(self._subset_names) >= np.iinfo(np.int16).max:
                raise IndexedDatasetError(f"{self.docs_path}: more than {np.iinfo(np.int16).max} subsets")
            self._subset_names[subset] = len(self._subset_names)
        return self._subset_names[subset]

    def __exit__(self, exc_type, exc, tb) -> None:
        self._bin_file.close()
        self._bin_file = None
        tmp_bin, tmp_idx, tmp_docs = (self._tmp(p) for p in (self.bin_path, self.idx_path, self.docs_path))
        try:
            if exc_type is None:
                has_docs = len(self._utf8_bytes) > 0
                self._write_index(tmp_idx)
                if has_docs:
                    self._write_docs(tmp_docs)
                os.replace(tmp_bin, self.bin_path)
                if has_docs:
                    os.replace(tmp_docs, self.docs_path)
                else:  # a stale sidecar from an earlier dataset under this prefix would lie
                    self.docs_path.unlink(missing_ok=True)
                os.replace(tmp_idx, self.idx_path)
        finally:
            for tmp in (tmp_bin, tmp_idx, tmp_docs):
                tmp.unlink(missing_ok=True)

    def _write_index(self, path: Path) -> None:
        count = len(self._lengths)
        lengths = np.frombuffer(self._lengths, dtype=np.int64) if count else np.zeros(0, np.int64)
        pointers = np.zeros(count, dtype=np.int64)
        np.cumsum(lengths[:-1] * self.dtype.itemsize, out=pointers[1:])
        with open(path, "wb") as f:
            f.write(_HEADER.pack(_MAGIC, _VERSION, _DTYPE_CODES[self.dtype], count, count + 1))
            f.write(lengths.astype("<i4").tobytes())
            f.write(pointers.astype("<i8").tobytes())
            f.write(np.arange(count + 1, dtype="<i8").tobytes())

    def _write_docs(self, path: Path) -> None:
        names = sorted(self._subset_names, key=self._subset_names.get)
        with open(path, "wb") as f:  # a file object, so numpy does not append ".npz" to the temp name
            np.savez(f, utf8_bytes=np.frombuffer(self._utf8_bytes, dtype=np.int64),
                     subset_id=np.frombuffer(self._subset_ids, dtype=np.int16),
                     subset_names=np.array(names, dtype=np.str_),
                     max_token_id=np.array(self._max_token_id, dtype=np.int64))


class IndexedDataset:
    """Read-only, memory-mapped view of `<prefix>.bin/.idx` (+ `.docs.npz` if present).

    `ds[i]` is document i's tokens (a view into the memmap, no copy); `token_stream()` is
    all tokens, documents back to back, which the packed loader slices directly.
    """

    def __init__(self, prefix: str | os.PathLike):
        self.prefix = str(prefix)
        self.bin_path, self.idx_path, self.docs_path = dataset_files(prefix)
        self._read_index()
        self._map_tokens()
        self.utf8_bytes = self.subset_ids = self.subset_names = None
        self._stored_max_token_id = None
        if self.docs_path.exists():
            self._read_docs()

    def _read_index(self) -> None:
        path = self.idx_path
        if not path.is_file():
            raise IndexedDatasetError(f"{path}: index file not found (dataset prefix {self.prefix!r})")
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(_HEADER.size)
        if head[: len(_MAGIC)] != _MAGIC[: len(head)]:
            raise IndexedDatasetError(f"{path}: not a Megatron MMIDIDX index "
                                      f"(expected magic {_MAGIC!r}, found {head[:len(_MAGIC)]!r})")
        if len(head) < _HEADER.size:
            raise IndexedDatasetError(f"{path}: truncated header ({size} bytes, need {_HEADER.size})")
        _, version, code, count, doc_count = _HEADER.unpack(head)
        if version != _VERSION:
            raise IndexedDatasetError(f"{path}: unsupported index version {version} (expected {_VERSION})")
        if code not in _CODE_DTYPES or _CODE_DTYPES[code] not in _TOKEN_DTYPES:
            known = ", ".join(f"{_DTYPE_CODES[d]} ({d})" for d in _TOKEN_DTYPES)
            raise IndexedDatasetError(f"{path}: unsupported dtype code {code} at byte 17 (token datasets use {known})")
        self.dtype = _CODE_DTYPES[code]
        expected = _HEADER.size + count * 4 + count * 8 + doc_count * 8
        if size < expected:
            raise IndexedDatasetError(f"{path}: truncated: {size} bytes, the header's {count} sequences "
                                      f"and {doc_count} document indices need {expected}")
        idx = np.memmap(path, dtype=np.uint8, mode="r")
        offset = _HEADER.size
        self._lengths = np.frombuffer(idx, dtype="<i4", count=count, offset=offset)
        self._pointers = np.frombuffer(idx, dtype="<i8", count=count, offset=offset + count * 4)
        self._document_indices = np.frombuffer(idx, dtype="<i8", count=doc_count, offset=offset + count * 12)
        self._num_docs = count

    def _map_tokens(self) -> None:
        path = self.bin_path
        if not path.is_file():
            raise IndexedDatasetError(f"{path}: token file not found (dataset prefix {self.prefix!r})")
        itemsize = self.dtype.itemsize
        # Checking the last document's end against the file size is O(1); a full pointer
        # check would read the whole index, which is slow at Pile scale (see verify()).
        expected = 0
        if self._num_docs:
            expected = int(self._pointers[-1]) + int(self._lengths[-1]) * itemsize
        size = path.stat().st_size
        if size != expected:
            raise IndexedDatasetError(f"{path}: {size} bytes, but {self.idx_path.name} describes "
                                      f"{expected} bytes ({self._num_docs} documents of {self.dtype})")
        # np.memmap refuses empty files; an empty dataset is a valid (if useless) dataset.
        self._tokens = (np.memmap(path, dtype=self.dtype, mode="r") if size
                       else np.zeros(0, dtype=self.dtype))

    def _read_docs(self) -> None:
        path = self.docs_path
        try:
            with np.load(path, allow_pickle=False) as docs:
                self.utf8_bytes = docs["utf8_bytes"].astype(np.int64, copy=False)
                self.subset_ids = docs["subset_id"].astype(np.int16, copy=False)
                self.subset_names = [str(name) for name in docs["subset_names"]]
                if "max_token_id" in docs:
                    self._stored_max_token_id = int(docs["max_token_id"])
        except (OSError, ValueError, KeyError) as error:
            raise IndexedDatasetError(f"{path}: unreadable document sidecar: {error}") from error
        for name, values in (("utf8_bytes", self.utf8_bytes), ("subset_id", self.subset_ids)):
            if len(values) != self._num_docs:
                raise IndexedDatasetError(f"{path}: {name} has {len(values)} entries, "
                                          f"{self.idx_path.name} has {self._num_docs} documents")
        if self._num_docs and not (0 <= self.subset_ids.min() and self.subset_ids.max() < len(self.subset_names)):
            raise IndexedDatasetError(f"{path}: subset ids outside [0, {len(self.subset_names)})")

    def __len__(self) -> int:
        return self._num_docs

    def __getitem__(self, i: int) -> np.ndarray:
        if not -self._num_docs <= i < self._num_docs:
            raise IndexError(f"document {i} out of range for {self.prefix} ({self._num_docs} documents)")
        start = int(self._pointers[i]) // self.dtype.itemsize
        return self._tokens[start : start + int(self._lengths[i])]

    @property
    def doc_lengths(self) -> np.ndarray:
        """(n,) int32 tokens per document (EOD included when the writer appended one)."""
        return self._lengths

    @cached_property
    def doc_offsets(self) -> np.ndarray:
        """(n,) int64 token offset where each document starts in token_stream()."""
        return self._pointers // self.dtype.itemsize

    def token_stream(self) -> np.ndarray:
        """(num_tokens,) every document's tokens back to back (a memmap; slicing reads only the slice)."""
        return self._tokens

    @property
    def num_tokens(self) -> int:
        return int(self._tokens.size)

    def max_token_id(self) -> int:
        """Largest token id in the dataset (-1 when empty): from the sidecar when it has
        it, else by reading the .bin in chunks (minutes at Pile scale)."""
        if self._stored_max_token_id is not None:
            return self._stored_max_token_id
        chunk = 1 << 26
        return max((int(self._tokens[i : i + chunk].max()) for i in range(0, self.num_tokens, chunk)), default=-1)

    def check_vocab(self, vocab_size: int) -> None:
        """Fail early, naming the file, if the data holds ids the model has no embedding for."""
        max_id = self.max_token_id()
        if max_id >= vocab_size:
            raise DataError(f"{self.bin_path}: token id {max_id} does not fit the model's vocabulary of "
                            f"{vocab_size}; the data was tokenized with a larger vocabulary "
                            "(check data.tokenizer and model.vocab_size)")

    def verify(self) -> None:
        """Full check that the pointers are the running sum of the lengths (reads all of .idx)."""
        expected = np.zeros(self._num_docs, dtype=np.int64)
        np.cumsum(self._lengths[:-1].astype(np.int64) * self.dtype.itemsize, out=expected[1:])
        bad = np.flatnonzero(expected != self._pointers)
        if bad.size:
            raise IndexedDatasetError(f"{self.idx_path}: sequence pointer {bad[0]} is {self._pointers[bad[0]]}, "
                                      f"expected {expected[bad[0]]} from the lengths before it")
        if (self._lengths < 0).any():
            raise IndexedDatasetError(f"{self.idx_path}: negative sequence length at {np.argmax(self._lengths < 0)}")

    def __repr__(self) -> str:
        return f"IndexedDataset({self.prefix!r}, docs={len(self)}, tokens={self.num_tokens}, dtype={self.dtype})"
