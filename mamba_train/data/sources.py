"""Where documents come from, beyond the Pile's jsonl.zst (corpus.py): parquet files and
Hugging Face `datasets` (a `save_to_disk` directory, or `hf:NAME` for `load_dataset`).

A *source* is a Path (a document file) or a string `hf:NAME_OR_PATH[@SPLIT]`. Every
source reads as a stream of (text, subset) pairs: parquet row group by row group, a
Hugging Face dataset batch by batch, so no source is ever held whole in memory. The
subset is `meta.pile_set_name` (a struct column, as the Pile's parquet mirrors store it)
or a `pile_set_name` column, else the file's or dataset's name.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

from mamba_train.data.corpus import CorpusError, SkippedRecords, expand_sources, read_documents

Source = Path | str
HF_PREFIX = "hf:"
_BATCH_ROWS = 1024  # rows per Arrow batch: a few MB of text at the Pile's document sizes


def expand(patterns: list[str], base: Path | None = None) -> list[Source]:
    """Sources for recipe entries: `hf:` specs as they are, a directory that holds a
    `save_to_disk` dataset as `hf:DIR`, anything else as file globs (corpus.expand_sources)."""
    sources: list[Source] = []
    for pattern in patterns:
        if pattern.startswith(HF_PREFIX):
            sources.append(pattern)
            continue
        full = Path(pattern if os.path.isabs(pattern) or base is None else base / pattern)
        if full.is_dir() and is_saved_hf_dataset(full):
            sources.append(HF_PREFIX + str(full))
        else:
            sources.extend(expand_sources([pattern], base))
    return sources


def is_saved_hf_dataset(directory: Path) -> bool:
    return (directory / "state.json").is_file() or (directory / "dataset_dict.json").is_file()


def read_source(source: Source, skipped: SkippedRecords | None = None,
                on_read: Callable[[int], None] | None = None) -> Iterator[tuple[str, str]]:
    if isinstance(source, str) and source.startswith(HF_PREFIX):
        return read_hf_dataset(source, skipped, on_read)
    return read_documents(Path(source), skipped, on_read)


def source_size(source: Source) -> int:
    """Bytes on disk (what `on_read` counts up to); 0 when unknown (a hub dataset)."""
    path = Path(source[len(HF_PREFIX):]) if isinstance(source, str) and source.startswith(HF_PREFIX) else Path(source)
    if path.is_file():
        return path.stat().st_size
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*.arrow"))
    return 0


def source_name(source: Source) -> str:
    """Short name: the default subset and the stem of the shard's output files."""
    if isinstance(source, str) and source.startswith(HF_PREFIX):
        spec = source[len(HF_PREFIX):].partition("@")[0].rstrip("/")
        return Path(spec).name or spec
    name = Path(source).name
    for suffix in (".zst", ".jsonl", ".parquet", ".txt"):
        name = name.removesuffix(suffix)
    return name


# Parquet ----------------------------------------------------------------------------------

def read_parquet(path: Path, skipped: SkippedRecords | None = None,
                 on_read: Callable[[int], None] | None = None) -> Iterator[tuple[str, str]]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as error:  # pyarrow raises ArrowInvalid/OSError for non-parquet bytes
        raise CorpusError(f"{path}: not a readable parquet file ({error})") from None
    columns = parquet.schema_arrow.names
    if "text" not in columns:
        raise CorpusError(f"{path}: no \"text\" column (columns: {', '.join(columns)})")
    wanted = ["text"] + [c for c in ("meta", "pile_set_name") if c in columns]
    row, file_size = 0, path.stat().st_size
    for group in range(parquet.num_row_groups):
        for batch in parquet.iter_batches(batch_size=_BATCH_ROWS, row_groups=[group], columns=wanted):
            table = batch.to_pydict()
            yield from _rows(table, path, row, source_name(path), skipped, what="row")
            row += batch.num_rows
        if on_read:  # the file's size shared out by rows, so the reports add up to source_size()
            rows = parquet.metadata.row_group(group).num_rows
            on_read(round(file_size * rows / max(parquet.metadata.num_rows, 1)))


def _rows(table: dict, where, first_row: int, default_subset: str, skipped: SkippedRecords | None,
          what: str) -> Iterator[tuple[str, str]]:
    """(text, subset) of one Arrow batch as a dict of columns; a row without string text
    is an error naming `where` and the row, or a counted skip."""
    metas = table.get("meta")
    names = table.get("pile_set_name")
    for i, text in enumerate(table["text"]):
        if not isinstance(text, str):
            message = f"{where}:{what} {first_row + i}: \"text\" must be a string, found {type(text).__name__}"
            if skipped is None:
                raise CorpusError(message)
            skipped.add(message)
            continue
        subset = None
        if metas is not None and isinstance(metas[i], dict):
            subset = metas[i].get("pile_set_name")
        if not subset and names is not None:
            subset = names[i]
        yield text, str(subset) if subset else default_subset


# Hugging Face datasets ------------------------------------------------------------------

def read_hf_dataset(spec: str, skipped: SkippedRecords | None = None,
                    on_read: Callable[[int], None] | None = None) -> Iterator[tuple[str, str]]:
    """`hf:DIR[@split]` (a `save_to_disk` directory) or `hf:NAME[@split]` (`load_dataset`,
    streamed, so a hub dataset is never downloaded whole; also local data directories)."""
    try:
        import datasets
    except ImportError:
        raise CorpusError(f"{spec}: reading Hugging Face datasets needs `pip install datasets`") from None
    name, _, split = spec[len(HF_PREFIX):].partition("@")
    path = Path(name)
    try:
        if path.is_dir() and is_saved_hf_dataset(path):
            dataset = datasets.load_from_disk(str(path))
            if isinstance(dataset, datasets.DatasetDict):
                split = split or "train"
                if split not in dataset:
                    raise CorpusError(f"{spec}: no split {split!r} (splits: {', '.join(dataset)})")
                dataset = dataset[split]
        else:
            dataset = datasets.load_dataset(name, split=split or "train", streaming=True)
    except CorpusError:
        raise
    except Exception as error:  # datasets raises many types (FileNotFoundError, DatasetNotFoundError, ...)
        raise CorpusError(f"{spec}: cannot open the dataset ({type(error).__name__}: {error})") from None
    columns = dataset.column_names
    if columns is not None and "text" not in columns:
        raise CorpusError(f"{spec}: no \"text\" column (columns: {', '.join(columns)})")
    row = 0
    for batch in dataset.iter(batch_size=_BATCH_ROWS):
        yield from _rows(batch, spec, row, source_name(spec), skipped, what="row")
        n = len(batch["text"])
        row += n
        if on_read:  # no per-batch disk figure: text bytes stand in for the progress bar
            on_read(sum(len(t) for t in batch["text"] if isinstance(t, str)))
