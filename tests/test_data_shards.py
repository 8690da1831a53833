"""Tokenizing at scale: shards in worker processes, merge, resume, progress, megatron-core
compatibility, on small generated Pile-format shards with several subsets."""

import json

import numpy as np
import pytest
import zstandard

from mamba_train.data import IndexedDataset, load_tokenizer, train_sentencepiece
from mamba_train.data import shards as shards_module
from mamba_train.data.corpus import CorpusError
from mamba_train.data.prep import PrepError, Recipe, SourcesRecipe, TokenizerRecipe, prepare

SUBSETS = ("Pile-CC", "Github", "ArXiv", "Enron Emails")
WORDS = "the state of a scan is carried from chunk to chunk café über 数据 def return ( ) : 0 1 2".split()


def pile_shard(path, n_docs, seed):
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n_docs):
        text = "\n".join(" ".join(rng.choice(WORDS, rng.integers(2, 15))) for _ in range(rng.integers(1, 5)))
        docs.append({"text": text, "meta": {"pile_set_name": SUBSETS[rng.integers(len(SUBSETS))]}})
    path.write_bytes(zstandard.ZstdCompressor().compress(
        "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs).encode()))
    return docs


@pytest.fixture(scope="module")
def pile(tmp_path_factory):
    """Three Pile-format shards (docs in order) and a tokenizer trained on them once."""
    root = tmp_path_factory.mktemp("pile")
    docs = []
    for i in range(3):
        docs += pile_shard(root / f"{i:02d}.jsonl.zst", 150, seed=i)
    tokenizer = train_sentencepiece((d["text"] for d in docs), root / "tok", vocab_size=320, sample_docs=300)
    return root, docs, tokenizer.path


def recipe_for(root, tokenizer_path, out, **changes):
    recipe = Recipe(output=str(out), sources=SourcesRecipe(files=[str(root / "*.jsonl.zst")]),
                    tokenizer=TokenizerRecipe(path=str(tokenizer_path)), valid_fraction=0.1, test_fraction=0.1,
                    seed=5, shard_bytes=1)  # shard_bytes=1: every source its own shard
    for key, value in changes.items():
        setattr(recipe, key, value)
    return recipe


def split_bytes(out):
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.name.split(".")[0] in ("train", "valid", "test")}


def test_train_valid_test_hold_every_document_once_in_order(pile, tmp_path):
    root, docs, tokenizer_path = pile
    summary = prepare(recipe_for(root, tokenizer_path, tmp_path / "out"), workers=1, progress=False)
    assert summary["shards"] == 3 and set(summary["splits"]) == {"train", "valid", "test"}
    tok = load_tokenizer(tokenizer_path)
    codes = shards_module.split_of_documents(5, 0, len(docs), 0.1, 0.1)
    for code, name in enumerate(("train", "valid", "test")):
        ds = IndexedDataset(tmp_path / "out" / name)
        expected = [d for d, c in zip(docs, codes) if c == code]
        assert len(ds) == len(expected) == summary["splits"][name]["documents"] > 0
        for i in range(0, len(ds), 7):
            assert tok.decode(ds[i][:-1]) == expected[i]["text"] and ds[i][-1] == tok.eod_id
            assert ds.subset_names[ds.subset_ids[i]] == expected[i]["meta"]["pile_set_name"]
    assert sorted(summary["subsets"]) == sorted(SUBSETS)


def test_output_does_not_depend_on_workers_or_shard_grouping(pile, tmp_path):
    root, _, tokenizer_path = pile
    prepare(recipe_for(root, tokenizer_path, tmp_path / "one"), workers=1, progress=False)
    prepare(recipe_for(root, tokenizer_path, tmp_path / "two", chunk_bytes=3000), workers=2, progress=False)
    grouped = prepare(recipe_for(root, tokenizer_path, tmp_path / "grouped", shard_bytes=1 << 30), workers=1,
                      progress=False)
    assert grouped["shards"] == 1
    assert split_bytes(tmp_path / "one") == split_bytes(tmp_path / "two") == split_bytes(tmp_path / "grouped")


def test_interrupted_prep_resumes_without_redoing_finished_shards(pile, tmp_path, monkeypatch):
    root, _, tokenizer_path = pile
    prepare(recipe_for(root, tokenizer_path, tmp_path / "straight"), workers=1, progress=False)
    src = tmp_path / "src"
    src.mkdir()
    for path in sorted(root.glob("*.jsonl.zst")):
        (src / path.name).write_bytes(path.read_bytes())
    good_last = (src / "02.jsonl.zst").read_bytes()
    (src / "02.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(b'{"text": "cut\n'))
    recipe = recipe_for(src, tokenizer_path, tmp_path / "out")
    with pytest.raises(CorpusError, match=r"02\.jsonl\.zst:1: invalid JSON"):
        prepare(recipe, workers=1, progress=False)
    assert not (tmp_path / "out").exists()
    assert len(list((tmp_path / ".out.partial" / "shards").glob("*.done.json"))) == 2

    (src / "02.jsonl.zst").write_bytes(good_last)  # the fixed source: only its shard is redone
    calls = []
    real = shards_module._tokenize_shard
    monkeypatch.setattr(shards_module, "_tokenize_shard", lambda task, report: calls.append(task.sources) or
                        real(task, report))
    prepare(recipe, workers=1, progress=False)
    assert calls == [(str(src / "02.jsonl.zst"),)]
    assert split_bytes(tmp_path / "out") == split_bytes(tmp_path / "straight")
    assert not (tmp_path / ".out.partial").exists()  # removed once the output is in place


def test_a_changed_source_or_recipe_is_not_resumed(pile, tmp_path, monkeypatch):
    root, _, tokenizer_path = pile
    recipe = recipe_for(root, tokenizer_path, tmp_path / "out")
    work = tmp_path / ".out.partial"
    work.mkdir()
    (work / "recipe.json").write_text(json.dumps({"seed": "another recipe"}))
    (work / "stale").write_text("x")
    prepare(recipe, workers=1, progress=False)
    assert not work.exists()


def test_skip_bad_records_counts_them_in_the_summary(pile, tmp_path):
    root, docs, tokenizer_path = pile
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"oops": 1}\nnot json\n{"text": "also fine"}\n')
    recipe = recipe_for(root, tokenizer_path, tmp_path / "out", test_fraction=0.0)
    recipe.sources.files.append(str(bad))
    with pytest.raises(CorpusError, match=r"bad\.jsonl:2: expected an object"):
        prepare(recipe, workers=1, progress=False)
    recipe.skip_bad_records = True
    summary = prepare(recipe, workers=1, progress=False)
    assert summary["skipped_records"]["count"] == 2
    assert summary["skipped_records"]["examples"][0].endswith('bad.jsonl:2: expected an object with a "text" '
                                                              'field, found \'{"oops": 1}\'')
    assert sum(s["documents"] for s in summary["splits"].values()) == len(docs) + 2


def test_progress_bar_shows_documents_bytes_and_tokens_per_second(pile, tmp_path, capsys):
    root, docs, tokenizer_path = pile
    prepare(recipe_for(root, tokenizer_path, tmp_path / "out"), workers=2, progress=True)
    err = capsys.readouterr().err
    assert f"{len(docs)} docs" in err and "MB text" in err and "tok/s" in err and "tokenizing 3/3 shards" in err


@pytest.mark.parametrize("vocab_size", [320, 70000])
def test_megatron_core_opens_our_output(tmp_path, vocab_size):
    indexed = pytest.importorskip("megatron.core.datasets.indexed_dataset")
    from mamba_train.data import IndexedDatasetWriter, token_dtype_for_vocab

    rng = np.random.default_rng(0)
    documents = [rng.integers(0, vocab_size, n) for n in (5, 1, 300, 17)]
    prefix = tmp_path / "ds"
    with IndexedDatasetWriter(prefix, token_dtype_for_vocab(vocab_size)) as writer:
        for doc in documents:
            writer.add_document(doc, utf8_bytes=3 * len(doc), subset="x")
    theirs = indexed.IndexedDataset(str(prefix))
    assert len(theirs) == len(documents)
    assert theirs.sequence_lengths.tolist() == [len(d) for d in documents]
    assert theirs.document_indices.tolist() == list(range(len(documents) + 1))
    for i, doc in enumerate(documents):
        assert theirs[i].tolist() == doc.tolist()
    assert theirs.get(2, offset=10, length=5).tolist() == documents[2][10:15].tolist()


def test_megatron_core_opens_a_merged_prep_output(pile, tmp_path):
    indexed = pytest.importorskip("megatron.core.datasets.indexed_dataset")
    root, _, tokenizer_path = pile
    prepare(recipe_for(root, tokenizer_path, tmp_path / "out"), workers=1, progress=False)
    ours, theirs = IndexedDataset(tmp_path / "out" / "train"), indexed.IndexedDataset(str(tmp_path / "out" / "train"))
    assert len(theirs) == len(ours) and theirs.sequence_lengths.tolist() == ours.doc_lengths.tolist()
    assert all(theirs[i].tolist() == ours[i].tolist() for i in range(0, len(ours), 13))


def test_a_split_left_empty_is_an_error(pile, tmp_path):
    root, _, tokenizer_path = pile
    recipe = recipe_for(root, tokenizer_path, tmp_path / "out", valid_fraction=1e-9, test_fraction=0.0)
    with pytest.raises(PrepError, match="no documents for the valid split among 450"):
        prepare(recipe, workers=1, progress=False)


def test_a_bad_record_in_a_worker_fails_the_run_with_file_and_line(pile, tmp_path):
    root, _, tokenizer_path = pile
    src = tmp_path / "src"
    src.mkdir()
    for path in sorted(root.glob("*.jsonl.zst")):
        (src / path.name).write_bytes(path.read_bytes())
    (src / "01.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(b'{"text": "ok"}\n{"text": 3}\n'))
    with pytest.raises(CorpusError, match=r'01\.jsonl\.zst:2: "text" must be a string, found int'):
        prepare(recipe_for(src, tokenizer_path, tmp_path / "out"), workers=2, progress=False)
    assert not (tmp_path / "out").exists()


def test_hf_tokenizer_json_and_int32_tokens_through_prep(pile, tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    root, docs, _ = pile
    vocab = {f"<{i}>": i for i in range(70000)}  # beyond uint16: the output must be int32
    vocab.update({"<unk>": 70000, "<|endoftext|>": 70001})
    for i, ch in enumerate(sorted({c for d in docs for c in d["text"]})):
        vocab[ch] = 70002 + i
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Split("", behavior="isolated")
    (tmp_path / "hf").mkdir()
    tok.save(str(tmp_path / "hf" / "tokenizer.json"))
    summary = prepare(recipe_for(root, tmp_path / "hf", tmp_path / "out"), workers=1, progress=False)
    assert summary["tokenizer"]["kind"] == "HFTokenizer" and summary["token_dtype"] == "int32"
    train = IndexedDataset(tmp_path / "out" / "train")
    assert train.dtype == np.int32 and train[0][-1] == 70001 and train.max_token_id() >= 70002


def test_small_sources_are_grouped_but_every_worker_gets_a_shard(pile, tmp_path):
    root, _, tokenizer_path = pile
    big = 1 << 30
    assert prepare(recipe_for(root, tokenizer_path, tmp_path / "a", shard_bytes=big), workers=1,
                   progress=False)["shards"] == 1
    assert prepare(recipe_for(root, tokenizer_path, tmp_path / "b", shard_bytes=big), workers=3,
                   progress=False)["shards"] == 3


def test_tokenizing_workers_do_not_import_torch():
    """Each worker process imports the shards module; torch would cost seconds per start."""
    import subprocess
    import sys

    code = "import sys, mamba_train.data.shards, mamba_train.data.prep; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
