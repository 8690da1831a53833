"""Parquet and Hugging Face `datasets` sources, and skipping bad records on request."""

import json

import pytest
import zstandard

from mamba_train.data.corpus import CorpusError, SkippedRecords, read_documents, read_jsonl
from mamba_train.data.sources import expand, read_source, source_name

DOCS = [("Once upon a time.", "Books3"), ("def f(): pass\n", "Github"), ("café ☕ naïve", "Pile-CC")]


def write_parquet(path, rows, row_group_size=2):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=row_group_size)
    return path


def pile_rows():
    return [{"text": text, "meta": {"pile_set_name": subset}} for text, subset in DOCS]


def test_parquet_streams_text_with_pile_set_name_and_reports_bytes(tmp_path):
    path = write_parquet(tmp_path / "00.parquet", pile_rows() * 3)
    read = []
    assert list(read_documents(path, on_read=read.append)) == DOCS * 3
    assert len(read) == 5  # one report per row group of 2 rows
    flat = write_parquet(tmp_path / "flat.parquet", [{"text": "x", "pile_set_name": "Enron"}, {"text": "y"}])
    assert list(read_documents(flat)) == [("x", "Enron"), ("y", "flat")]


def test_parquet_without_text_column_or_with_null_text(tmp_path):
    path = write_parquet(tmp_path / "bad.parquet", [{"body": "x"}])
    with pytest.raises(CorpusError, match=r'bad\.parquet: no "text" column \(columns: body\)'):
        list(read_documents(path))
    nulls = write_parquet(tmp_path / "nulls.parquet", [{"text": "a"}, {"text": None}, {"text": "c"}])
    with pytest.raises(CorpusError, match=r'nulls\.parquet:row 1: "text" must be a string, found NoneType'):
        list(read_documents(nulls))
    skipped = SkippedRecords()
    assert [t for t, _ in read_documents(nulls, skipped)] == ["a", "c"] and skipped.count == 1
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(CorpusError, match=r"junk\.parquet: not a readable parquet file"):
        list(read_documents(tmp_path / "junk.parquet"))


def test_saved_hf_dataset_and_local_hf_data_dir(tmp_path):
    datasets = pytest.importorskip("datasets")
    saved = tmp_path / "saved"
    datasets.Dataset.from_list(pile_rows()).save_to_disk(str(saved))
    sources = expand([str(saved)])
    assert sources == [f"hf:{saved}"] and source_name(sources[0]) == "saved"
    assert list(read_source(sources[0])) == DOCS
    # a DatasetDict on disk: @split picks the split
    dd = tmp_path / "dd"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(pile_rows()[:1]),
                          "validation": datasets.Dataset.from_list(pile_rows()[1:])}).save_to_disk(str(dd))
    assert list(read_source(f"hf:{dd}@validation")) == DOCS[1:]
    with pytest.raises(CorpusError, match="no split 'test'"):
        list(read_source(f"hf:{dd}@test"))
    # load_dataset on a local folder of parquet files: what `hf:NAME` does with a hub name
    (tmp_path / "hub" / "data").mkdir(parents=True)
    write_parquet(tmp_path / "hub" / "data" / "train-00000.parquet", pile_rows())
    assert list(read_source(f"hf:{tmp_path / 'hub'}")) == DOCS


def test_hf_dataset_errors_name_the_spec(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list([{"body": "x"}]).save_to_disk(str(tmp_path / "nobody"))
    with pytest.raises(CorpusError, match=r'nobody: no "text" column'):
        list(read_source(f"hf:{tmp_path / 'nobody'}"))
    with pytest.raises(CorpusError, match=r"hf:.*missing: cannot open the dataset"):
        list(read_source(f"hf:{tmp_path / 'missing'}"))


def test_skip_bad_records_counts_invalid_json_missing_text_and_bad_utf8(tmp_path):
    lines = [json.dumps({"text": "good one"}).encode(), b'{"text": "broken', json.dumps({"meta": {}}).encode(),
             b'{"text": "caf\xe9"}', json.dumps({"text": "good two"}).encode()]
    path = tmp_path / "mixed.jsonl.zst"
    path.write_bytes(zstandard.ZstdCompressor().compress(b"\n".join(lines) + b"\n"))
    with pytest.raises(CorpusError, match=r"mixed\.jsonl\.zst:2: invalid JSON"):
        list(read_jsonl(path))  # the default: stop at the first bad line
    skipped = SkippedRecords()
    assert [t for t, _ in read_jsonl(path, skipped)] == ["good one", "good two"]
    assert skipped.count == 3
    assert [e.split(": ", 1)[0].rsplit("/", 1)[-1] for e in skipped.examples] == [
        "mixed.jsonl.zst:2", "mixed.jsonl.zst:3", "mixed.jsonl.zst:4"]


def test_truncated_zst_fails_even_when_skipping(tmp_path):
    whole = zstandard.ZstdCompressor().compress(b"".join(json.dumps({"text": f"doc {i}"}).encode() + b"\n"
                                                         for i in range(2000)))
    path = tmp_path / "cut.jsonl.zst"
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(CorpusError, match=r"cut\.jsonl\.zst: truncated zstd stream"):
        list(read_jsonl(path, SkippedRecords()))
