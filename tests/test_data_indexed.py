import struct

import numpy as np
import pytest

from mamba_train.data import IndexedDataset, IndexedDatasetError, IndexedDatasetWriter, token_dtype_for_vocab

DOCS = [[5, 6, 7, 0], [8, 0], [9, 10, 11, 12, 13, 0], [0]]


def write(prefix, docs=DOCS, dtype=np.uint16, meta=True):
    with IndexedDatasetWriter(prefix, dtype) as writer:
        for i, doc in enumerate(docs):
            if meta:
                writer.add_document(doc, utf8_bytes=10 * (i + 1), subset="code" if i % 2 else "prose")
            else:
                writer.add_document(doc)
    return prefix


def test_round_trip_with_sidecar(tmp_path):
    ds = IndexedDataset(write(tmp_path / "ds"))
    assert len(ds) == len(DOCS) and ds.dtype == np.uint16
    for i, doc in enumerate(DOCS):
        assert ds[i].tolist() == doc
    assert ds.doc_lengths.tolist() == [4, 2, 6, 1]
    assert ds.doc_offsets.tolist() == [0, 4, 6, 12]
    assert ds.num_tokens == 13 and ds.token_stream().tolist() == sum(DOCS, [])
    assert ds.max_token_id() == 13
    assert ds.utf8_bytes.tolist() == [10, 20, 30, 40]
    assert [ds.subset_names[i] for i in ds.subset_ids] == ["prose", "code", "prose", "code"]


def test_int32_for_vocab_beyond_uint16_and_no_sidecar(tmp_path):
    assert token_dtype_for_vocab(65536) == np.uint16 and token_dtype_for_vocab(65537) == np.int32
    docs = [[70000, 1], [2, 3, 200000]]
    ds = IndexedDataset(write(tmp_path / "big", docs, np.int32, meta=False))
    assert ds.dtype == np.int32 and [d.tolist() for d in (ds[0], ds[1])] == docs
    assert ds.utf8_bytes is None and ds.max_token_id() == 200000  # scanned: no sidecar


def test_byte_layout_is_megatron_mmidx(tmp_path):
    write(tmp_path / "ds")
    idx = (tmp_path / "ds.idx").read_bytes()
    assert idx[:9] == b"MMIDIDX\x00\x00"
    version, code, n_seq, n_doc = struct.unpack_from("<QBQQ", idx, 9)
    assert (version, code, n_seq, n_doc) == (1, 8, 4, 5)  # uint16 is megatron DType code 8
    offset = 9 + 8 + 1 + 8 + 8
    lengths = np.frombuffer(idx, "<i4", n_seq, offset)
    pointers = np.frombuffer(idx, "<i8", n_seq, offset + 4 * n_seq)
    doc_indices = np.frombuffer(idx, "<i8", n_doc, offset + 12 * n_seq)
    assert len(idx) == offset + 12 * n_seq + 8 * n_doc
    assert lengths.tolist() == [4, 2, 6, 1]
    assert pointers.tolist() == [0, 8, 12, 24]  # bytes, not tokens
    assert doc_indices.tolist() == [0, 1, 2, 3, 4]
    assert np.frombuffer((tmp_path / "ds.bin").read_bytes(), "<u2").tolist() == sum(DOCS, [])
    with np.load(tmp_path / "ds.docs.npz", allow_pickle=False) as docs:
        assert docs["utf8_bytes"].dtype == np.int64 and docs["subset_id"].dtype == np.int16
        assert docs["subset_names"].dtype.kind == "U"


def test_int32_is_megatron_code_4(tmp_path):
    write(tmp_path / "ds", dtype=np.int32)
    assert (tmp_path / "ds.idx").read_bytes()[17] == 4


def corrupt(path, data):
    path.write_bytes(data)


@pytest.mark.parametrize("damage, message", [
    (lambda p: corrupt(p.with_suffix(".idx"), p.with_suffix(".idx").read_bytes()[:40]), "truncated"),
    (lambda p: corrupt(p.with_suffix(".idx"), p.with_suffix(".idx").read_bytes()[:20]), "truncated header"),
    (lambda p: corrupt(p.with_suffix(".idx"), b"XXXXXXXXX" + p.with_suffix(".idx").read_bytes()[9:]), "magic"),
    (lambda p: corrupt(p.with_suffix(".idx"), (lambda b: b[:9] + struct.pack("<Q", 7) + b[17:])(
        p.with_suffix(".idx").read_bytes())), "version 7"),
    (lambda p: corrupt(p.with_suffix(".idx"), (lambda b: b[:17] + bytes([7]) + b[18:])(
        p.with_suffix(".idx").read_bytes())), "dtype code 7"),
    (lambda p: p.with_suffix(".idx").unlink(), "not found"),
])
def test_bad_index_errors_name_the_idx_file(tmp_path, damage, message):
    prefix = write(tmp_path / "ds")
    damage(prefix)
    with pytest.raises(IndexedDatasetError, match=message) as error:
        IndexedDataset(prefix)
    assert str(tmp_path / "ds.idx") in str(error.value)


@pytest.mark.parametrize("damage", [lambda b: b[:-2], lambda b: b + b"\x00\x00", lambda b: None])
def test_bin_size_mismatch_or_missing_names_the_bin_file(tmp_path, damage):
    prefix = write(tmp_path / "ds")
    bin_path = tmp_path / "ds.bin"
    data = damage(bin_path.read_bytes())
    if data is None:
        bin_path.unlink()
    else:
        bin_path.write_bytes(data)
    with pytest.raises(IndexedDatasetError) as error:
        IndexedDataset(prefix)
    assert str(bin_path) in str(error.value)


def test_sidecar_with_wrong_count_names_the_sidecar(tmp_path):
    write(tmp_path / "a")
    write(tmp_path / "b", DOCS[:2])
    (tmp_path / "b.docs.npz").replace(tmp_path / "a.docs.npz")
    with pytest.raises(IndexedDatasetError, match="a.docs.npz: utf8_bytes has 2 entries"):
        IndexedDataset(tmp_path / "a")


def test_a_failed_write_leaves_nothing_under_the_final_name(tmp_path):
    write(tmp_path / "old")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(RuntimeError, match="boom"):
        with IndexedDatasetWriter(tmp_path / "old", np.uint16) as writer:
            writer.add_document([1, 2, 3], utf8_bytes=3, subset="x")
            raise RuntimeError("boom")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # old dataset intact, no temp files
    with pytest.raises(RuntimeError):
        with IndexedDatasetWriter(tmp_path / "new", np.uint16) as writer:
            writer.add_document([1])
            raise RuntimeError("boom")
    assert not list(tmp_path.glob("new*"))


def test_token_that_does_not_fit_the_dtype_is_an_error(tmp_path):
    with pytest.raises(IndexedDatasetError, match="do not fit uint16"):
        with IndexedDatasetWriter(tmp_path / "ds", np.uint16) as writer:
            writer.add_document([1, 70000])


def test_verify_catches_inconsistent_pointers(tmp_path):
    prefix = write(tmp_path / "ds")
    ds = IndexedDataset(prefix)
    ds.verify()
    idx = bytearray((tmp_path / "ds.idx").read_bytes())
    struct.pack_into("<q", idx, 34 + 4 * 4 + 8, 6)  # second pointer 8 → 6
    (tmp_path / "ds.idx").write_bytes(bytes(idx))
    with pytest.raises(IndexedDatasetError, match="sequence pointer 1"):
        IndexedDataset(prefix).verify()


def test_adding_a_chunk_of_documents_writes_the_same_files_as_one_by_one(tmp_path):
    write(tmp_path / "one")
    names = ["prose" if i % 2 == 0 else "code" for i in range(len(DOCS))]
    with IndexedDatasetWriter(tmp_path / "chunk", np.uint16) as writer:
        writer.add_documents(np.array(sum(DOCS[:1], [])), [len(DOCS[0])], [10], names[:1])
        writer.add_documents(np.array(sum(DOCS[1:], [])), [len(d) for d in DOCS[1:]], [20, 30, 40], names[1:])
    for suffix in (".bin", ".idx", ".docs.npz"):
        assert (tmp_path / f"chunk{suffix}").read_bytes() == (tmp_path / f"one{suffix}").read_bytes()


def test_a_chunk_with_a_token_that_does_not_fit_names_its_document(tmp_path):
    with pytest.raises(IndexedDatasetError, match=r"token id 70000 does not fit uint16 \(document 2\)"):
        with IndexedDatasetWriter(tmp_path / "ds", np.uint16) as writer:
            writer.add_document([1, 0])
            writer.add_documents(np.array([3, 0, 4, 70000, 0]), [2, 3])
