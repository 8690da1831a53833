"""Text corpora in the Pile's format: jsonl.zst shards of
`{"text": ..., "meta": {"pile_set_name": ...}}`.

`read_documents` streams (text, subset) pairs from .jsonl, .jsonl.zst, .txt and .parquet
files, never holding a file whole, and names file:line for every bad record (or counts
and skips it, given a SkippedRecords). The local corpus is built by local_corpus.py.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import zstandard

from mamba_train.data.indexed import DataError

DOC_SUFFIXES = (".jsonl", ".jsonl.zst", ".txt", ".parquet")


class CorpusError(DataError):
    """A source file that cannot be read as documents; the message names file and line."""


class SkippedRecords:
    """Opt-in tolerance for bad records: pass one to the readers and a bad line (invalid
    JSON or UTF-8, no string `text`) is counted here instead of stopping the run. Damage
    that loses an unknown amount of data (a truncated .zst) is still an error."""

    def __init__(self, keep_examples: int = 5):
        self.count = 0
        self.examples: list[str] = []  # the first few messages, file:line first
        self._keep = keep_examples

    def add(self, message: str) -> None:
        self.count += 1
        if len(self.examples) < self._keep:
            self.examples.append(message)

    def merge(self, count: int, examples: list[str]) -> None:
        self.count += count
        self.examples.extend(examples[: self._keep - len(self.examples)])


# ---------------------------------------------------------------------------------------
# Reading


def read_documents(path: str | os.PathLike, skipped: SkippedRecords | None = None,
                   on_read: Callable[[int], None] | None = None) -> Iterator[tuple[str, str]]:
    """(text, subset) for every document of a .jsonl, .jsonl.zst, .txt or .parquet file.

    A .txt file is one document whose subset is its directory's name; a jsonl record
    without `meta.pile_set_name` gets the file's name (without suffixes) as subset.
    `skipped`: count bad records there instead of raising; `on_read(n)`: called with the
    bytes read from disk as reading goes (progress bars and ETAs).
    """
    path = Path(path)
    if path.name.endswith((".jsonl", ".jsonl.zst")):
        yield from read_jsonl(path, skipped, on_read)
    elif path.name.endswith(".parquet"):
        from mamba_train.data.sources import read_parquet  # pyarrow only when needed

        yield from read_parquet(path, skipped, on_read)
    elif path.name.endswith(".txt"):
        data = path.read_bytes()
        if on_read:
            on_read(len(data))
        try:
            text = _decode(data, path, line=None, file_offset=0)
        except CorpusError as error:
            if skipped is None:
                raise
            skipped.add(str(error))
            return
        yield text, path.parent.name or "text"
    else:
        raise CorpusError(f"{path}: unsupported document file (expected one of {', '.join(DOC_SUFFIXES)})")


def read_jsonl(path: str | os.PathLike, skipped: SkippedRecords | None = None,
               on_read: Callable[[int], None] | None = None) -> Iterator[tuple[str, str]]:
    """(text, subset) per line of a .jsonl or .jsonl.zst file; blank lines are skipped."""
    path = Path(path)
    default_subset = path.name.removesuffix(".zst").removesuffix(".jsonl")
    lines = _zst_lines(path, on_read) if path.name.endswith(".zst") else _plain_lines(path, on_read)
    for line_no, file_offset, raw in lines:
        try:
            document = _parse_record(raw, path, line_no, file_offset, default_subset)
        except CorpusError as error:
            if skipped is None:
                raise
            skipped.add(str(error))
            continue
        if document is not None:
            yield document


def _parse_record(raw: bytes, path: Path, line_no: int, file_offset: int, default_subset: str
                  ) -> tuple[str, str] | None:
    line = _decode(raw, path, line_no, file_offset)
    if not line.strip():
        return None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise CorpusError(f"{path}:{line_no}: invalid JSON: {error.msg} at column {error.colno}") from None
    if not isinstance(record, dict) or "text" not in record:
        raise CorpusError(f"{path}:{line_no}: expected an object with a \"text\" field, "
                          f"found {_shorten(line.rstrip())}")
    text = record["text"]
    if not isinstance(text, str):
        raise CorpusError(f"{path}:{line_no}: \"text\" must be a string, found {type(text).__name__}")
    meta = record.get("meta")
    subset = meta.get("pile_set_name") if isinstance(meta, dict) else None
    return text, str(subset) if subset else default_subset


def expand_sources(patterns: list[str], base: Path | None = None) -> list[Path]:
    """Sorted files matched by paths/globs (relative ones from `base`); a pattern that
    matches no document file is an error, so a typo never silently drops a source."""
    files: list[Path] = []
    for pattern in patterns:
        full = pattern if os.path.isabs(pattern) or base is None else str(base / pattern)
        matches = sorted(Path(p) for p in glob.glob(full, recursive=True) if os.path.isfile(p))
        matches = [p for p in matches if p.name.endswith(DOC_SUFFIXES)]
        if not matches:
            raise CorpusError(f"source {pattern!r} matches no {'/'.join(DOC_SUFFIXES)} file")
        files.extend(matches)
    return files


def _plain_lines(path: Path, on_read: Callable[[int], None] | None = None) -> Iterator[tuple[int, int, bytes]]:
    offset = 0
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if on_read:
                on_read(len(raw))
            yield line_no, offset, raw
            offset += len(raw)


def _zst_lines(path: Path, on_read: Callable[[int], None] | None = None) -> Iterator[tuple[int, int, bytes]]:
    """Lines of a zstd file, frame after frame. zstandard's stream_reader returns a
    truncated file's data without complaint, so frames are decoded by hand to notice."""
    dctx = zstandard.ZstdDecompressor()
    frame, frame_fed = dctx.decompressobj(), 0
    pending, line_no, offset = b"", 0, 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            if on_read:
                on_read(len(chunk))
            out = []
            while chunk:
                try:
                    out.append(frame.decompress(chunk))
                except zstandard.ZstdError as error:
                    raise CorpusError(f"{path}: corrupt zstd data: {error}") from None
                frame_fed += len(chunk)
                chunk = b""
                if frame.eof:  # the next frame (if any) starts in the unused bytes
                    chunk = frame.unused_data
                    frame, frame_fed = dctx.decompressobj(), 0
            pending += b"".join(out)
            *complete, pending = pending.split(b"\n")
            for raw in complete:
                line_no += 1
                yield line_no, offset, raw
                offset += len(raw) + 1
    if frame_fed:
        raise CorpusError(f"{path}: truncated zstd stream: the last frame ends early "
                          f"(after line {line_no}, {offset + len(pending)} bytes decoded)")
    if pending:
        yield line_no + 1, offset, pending


def _decode(raw: bytes, path: Path, line: int | None, file_offset: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        if line is None:  # a whole file: say which line the bad byte is on
            line = raw.count(b"\n", 0, error.start) + 1
        where = f"byte {file_offset + error.start}" + (" of the decompressed stream" if path.suffix == ".zst" else "")
        raise CorpusError(f"{path}:{line}: invalid UTF-8 ({error.reason}) at {where}") from None


def _shorten(text: str, limit: int = 80) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")
