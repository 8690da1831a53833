import json
from pathlib import Path

import pytest
import zstandard

from mamba_train.data import CorpusError, build_local_corpus, read_documents, read_jsonl
from mamba_train.data.corpus import expand_sources
from mamba_train.data.local_corpus import LOCAL_SUBSETS, man_page_text

RECORDS = [
    {"text": "def f(x):\n    return x\n", "meta": {"pile_set_name": "Github"}},
    {"text": "Once upon a time, café ☕.", "meta": {"pile_set_name": "Books3"}},
    {"text": "no meta here"},
    {"text": "line\nbreaks\n\ninside", "meta": {"pile_set_name": "Github"}},
]


def jsonl_bytes(records) -> bytes:
    return b"".join(json.dumps(r, ensure_ascii=False).encode("utf-8") + b"\n" for r in records)


def write_zst(path: Path, data: bytes, frames: int = 1) -> Path:
    cut = len(data) // frames
    compressor = zstandard.ZstdCompressor()
    path.write_bytes(b"".join(compressor.compress(data[i * cut: None if i == frames - 1 else (i + 1) * cut])
                              for i in range(frames)))
    return path


@pytest.mark.parametrize("frames", [1, 3])
def test_read_jsonl_zst_yields_text_and_subset(tmp_path, frames):
    path = write_zst(tmp_path / "00.jsonl.zst", jsonl_bytes(RECORDS), frames)
    assert list(read_jsonl(path)) == [
        (RECORDS[0]["text"], "Github"), (RECORDS[1]["text"], "Books3"),
        ("no meta here", "00"),  # no pile_set_name: the file's name
        (RECORDS[3]["text"], "Github")]


def test_plain_jsonl_and_txt_documents(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(jsonl_bytes(RECORDS[:2]) + b"\n")  # blank line skipped
    (tmp_path / "essays").mkdir()
    (tmp_path / "essays" / "one.txt").write_text("A whole file\nis one document.\n", encoding="utf-8")
    assert [s for _, s in read_documents(tmp_path / "a.jsonl")] == ["Github", "Books3"]
    assert list(read_documents(tmp_path / "essays" / "one.txt")) == [("A whole file\nis one document.\n", "essays")]


def test_invalid_json_reports_file_and_line(tmp_path):
    path = write_zst(tmp_path / "bad.jsonl.zst", jsonl_bytes(RECORDS[:2]) + b'{"text": "oops",\n')
    with pytest.raises(CorpusError, match=r"bad\.jsonl\.zst:3: invalid JSON"):
        list(read_jsonl(path))


@pytest.mark.parametrize("record, message", [
    ({"meta": {}}, 'expected an object with a "text" field'),
    ({"text": 5}, '"text" must be a string, found int'),
    (["text"], 'expected an object with a "text" field'),
])
def test_missing_or_non_string_text_reports_file_and_line(tmp_path, record, message):
    path = tmp_path / "x.jsonl"
    path.write_bytes(jsonl_bytes(RECORDS[:1] + [record]))
    with pytest.raises(CorpusError, match=rf"x\.jsonl:2: {message}"):
        list(read_jsonl(path))


def test_truncated_zst_is_an_error(tmp_path):
    whole = write_zst(tmp_path / "whole.jsonl.zst", jsonl_bytes(RECORDS * 200)).read_bytes()
    path = tmp_path / "cut.jsonl.zst"
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(CorpusError, match=r"cut\.jsonl\.zst: truncated zstd stream"):
        list(read_jsonl(path))


def test_non_utf8_reports_file_line_and_byte(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(jsonl_bytes(RECORDS[:2]) + b'{"text": "caf\xe9"}\n')
    first_two = len(jsonl_bytes(RECORDS[:2]))
    with pytest.raises(CorpusError, match=rf"latin1\.jsonl:3: invalid UTF-8 .* byte {first_two + 13}"):
        list(read_jsonl(path))
    txt = tmp_path / "notes.txt"
    txt.write_bytes(b"fine\nstill fine\nbad \xff here\n")
    with pytest.raises(CorpusError, match=r"notes\.txt:3: invalid UTF-8 .* byte 20"):
        list(read_documents(txt))


def test_expand_sources_sorts_and_rejects_empty_patterns(tmp_path):
    for name in ("b.jsonl", "a.jsonl.zst", "c.txt", "skip.csv"):
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in expand_sources([str(tmp_path / "*")])] == ["a.jsonl.zst", "b.jsonl", "c.txt"]
    with pytest.raises(CorpusError, match="matches no"):
        expand_sources([str(tmp_path / "*.parquet")])


def test_man_page_text_drops_roff_markup(tmp_path):
    page = tmp_path / "ls.1"
    page.write_text('.\\" comment\n.de XX\n.ft R\n..\n.TH LS 1\n.SH NAME\nls \\- list \\fBdirectory\\fR contents\n'
                    '.PP\n.B \\-l\nlong listing\n')
    assert man_page_text(page) == "LS 1\nNAME\nls - list directory contents\n\n-l\nlong listing\n"


def test_local_corpus_is_deterministic_capped_and_has_subsets(tmp_path):
    a = build_local_corpus(tmp_path / "a", max_mb=0.3)
    b = build_local_corpus(tmp_path / "b", max_mb=0.3)
    assert a == b
    for entry in a["subsets"].values():
        assert (tmp_path / "a" / entry["file"]).read_bytes() == (tmp_path / "b" / entry["file"]).read_bytes()
    assert a["bytes"] <= 0.3e6 and a["bytes"] == sum(e["bytes"] for e in a["subsets"].values())
    filled = [name for name, entry in a["subsets"].items() if entry["docs"] > 0]
    has_system_docs = any(Path(d).is_dir() and any(Path(d).iterdir()) for d in ("/usr/share/doc", "/usr/share/man"))
    assert len(filled) >= (3 if has_system_docs else 2), a
    for name in filled:  # the shards read back as Pile-format records of their subset
        docs = list(read_jsonl(tmp_path / "a" / a["subsets"][name]["file"]))
        assert len(docs) == a["subsets"][name]["docs"]
        assert {subset for _, subset in docs} == {name}
        assert sum(len(text.encode()) for text, _ in docs) == a["subsets"][name]["bytes"]
    assert set(a["subsets"]) == set(LOCAL_SUBSETS)
