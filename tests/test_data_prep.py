import argparse
import json
import re

import numpy as np
import pytest
import yaml
import zstandard

from mamba_train.data import CorpusError, IndexedDataset, load_tokenizer, prep
from mamba_train.data.prep import PrepError, load_recipe, prepare

WORDS = ("the a of model state scan chunk token byte file read write loop sum prime "
         "café naïve über 数据 -> == ( ) : , . 0 1 2 42").split()


def make_documents(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n):
        lines = [" ".join(rng.choice(WORDS, rng.integers(3, 12))) for _ in range(rng.integers(1, 6))]
        docs.append("\n".join(lines) + ("\n" if rng.random() < 0.5 else ""))
    return docs


@pytest.fixture
def corpus(tmp_path):
    """Three subsets: two inside a Pile-style jsonl.zst, one as a folder of .txt files.
    Returns (recipe path, documents in input order as (text, subset))."""
    source = tmp_path / "src"
    (source / "notes").mkdir(parents=True)
    documents = []
    records = []
    for i, text in enumerate(make_documents(240, seed=0)):
        subset = "code" if i % 3 else "prose"
        records.append(json.dumps({"text": text, "meta": {"pile_set_name": subset}}, ensure_ascii=False))
        documents.append((text, subset))
    (source / "00.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(("\n".join(records) + "\n").encode()))
    for i, text in enumerate(make_documents(60, seed=1)):
        (source / "notes" / f"{i:03d}.txt").write_text(text, encoding="utf-8")
        documents.append((text, "notes"))
    recipe = {
        "output": str(tmp_path / "out"),
        "sources": {"files": [str(source / "*.jsonl.zst"), str(source / "notes" / "*.txt")]},
        "tokenizer": {"vocab_size": 300, "sample_docs": 200},
        "valid_fraction": 0.1,
        "seed": 3,
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path, documents


def file_bytes(directory) -> dict:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.name != "prep.json"}


def test_prep_writes_train_valid_tokenizer_and_summary(corpus, tmp_path):
    recipe_path, documents = corpus
    summary = prepare(load_recipe(recipe_path), workers=1)
    out = tmp_path / "out"
    assert {p.name for p in out.iterdir()} == {"tokenizer.model", "prep.json", "train.bin", "train.idx",
                                               "train.docs.npz", "valid.bin", "valid.idx", "valid.docs.npz"}
    assert json.loads((out / "prep.json").read_text())["splits"] == summary["splits"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temp dirs left
    tok = load_tokenizer(out / "tokenizer.model")
    assert summary["tokenizer"] == {"file": "tokenizer.model", "kind": "SentencePieceTokenizer",
                                    "vocab_size": 300, "eod_id": tok.eod_id}
    train, valid = IndexedDataset(out / "train"), IndexedDataset(out / "valid")
    assert len(train) + len(valid) == len(documents) and len(valid) > 0
    assert summary["subsets"] == ["code", "notes", "prose"]

    # the split is the hash of (seed, index): rebuild it and compare every document
    expected = {"train": [], "valid": []}
    for index, doc in enumerate(documents):
        expected["valid" if prep._in_valid(3, index, 0.1) else "train"].append(doc)
    for name, ds in (("train", train), ("valid", valid)):
        assert len(ds) == len(expected[name]) == summary["splits"][name]["documents"]
        for i, (text, subset) in enumerate(expected[name]):
            tokens = ds[i]
            assert tokens[-1] == tok.eod_id and tok.eod_id not in tokens[:-1]  # one EOD, at the end
            assert tok.decode(tokens[:-1]) == text
            assert ds.subset_names[ds.subset_ids[i]] == subset
            assert ds.utf8_bytes[i] == len(text.encode("utf-8"))
        assert ds.max_token_id() < 300
    assert int(train.utf8_bytes.sum() + valid.utf8_bytes.sum()) == sum(len(t.encode()) for t, _ in documents)


def test_prep_is_deterministic_and_independent_of_workers(corpus, tmp_path):
    recipe_path, _ = corpus
    recipe = load_recipe(recipe_path)
    prepare(recipe, tmp_path / "one", workers=1)
    prepare(recipe, tmp_path / "again", workers=1)
    prepare(recipe.__class__(**{**recipe.__dict__, "chunk_bytes": 2000}), tmp_path / "two", workers=2)
    assert file_bytes(tmp_path / "one") == file_bytes(tmp_path / "again") == file_bytes(tmp_path / "two")


def test_existing_output_from_the_same_recipe_is_kept_as_up_to_date(corpus, tmp_path):
    recipe_path, _ = corpus
    recipe = load_recipe(recipe_path)
    summary = prepare(recipe, workers=1)
    before = file_bytes(tmp_path / "out")
    assert prepare(recipe, workers=1) == summary  # a rerun of the quickstart does not redo the work
    assert file_bytes(tmp_path / "out") == before


def test_existing_output_from_another_recipe_needs_force_and_stays_untouched(corpus, tmp_path):
    recipe_path, _ = corpus
    recipe = load_recipe(recipe_path)
    prepare(recipe, workers=1)
    before = file_bytes(tmp_path / "out")
    other = recipe.__class__(**{**recipe.__dict__, "seed": recipe.seed + 1})
    with pytest.raises(PrepError, match="already exists and was not built from this recipe; pass --force"):
        prepare(other, workers=1)
    assert file_bytes(tmp_path / "out") == before
    prepare(recipe, workers=1, force=True)
    assert file_bytes(tmp_path / "out") == before


def test_failure_midway_leaves_previous_output_untouched(corpus, tmp_path):
    recipe_path, _ = corpus
    recipe = load_recipe(recipe_path)
    prepare(recipe, workers=1)
    before = file_bytes(tmp_path / "out")
    bad = tmp_path / "src" / "notes" / "999.txt"
    bad.write_bytes(b"good line\nbad \xff byte\n")
    with pytest.raises(CorpusError, match=r"notes/999\.txt:2: invalid UTF-8 .* byte 14"):
        prepare(recipe, workers=1, force=True)
    assert file_bytes(tmp_path / "out") == before
    # the final temp dir is cleaned; the partial work is kept for a resume
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.partial", "out", "recipe.yaml", "src"]


def test_empty_input_is_an_error(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    (tmp_path / "blank.txt").write_text("")
    recipe = prep.Recipe(output=str(tmp_path / "out"),
                         sources=prep.SourcesRecipe(files=[str(tmp_path / "empty.jsonl"), str(tmp_path / "*.txt")]))
    with pytest.raises(PrepError, match="no documents in the sources"):
        prepare(recipe, workers=1)
    assert not (tmp_path / "out").exists()


def test_recipe_errors_name_the_key(tmp_path):
    path = tmp_path / "r.yaml"
    for raw, message in [
        ({"sources": {"files": ["x"]}, "tokenizer": {"vocab": 10}}, "unknown key tokenizer.vocab"),
        ({"sources": ["a.jsonl"], "valid_fraction": 2}, "valid_fraction: expected a number in"),
        ({"sources": {"local_corpus": {"max_mb": "big"}}}, "sources.local_corpus.max_mb: expected float"),
        ({"sources": {}}, "give a local_corpus block, files, or both"),
        ({"sources": {"files": ["nothing/here/*.jsonl"]}}, "matches no"),
    ]:
        path.write_text(yaml.safe_dump(raw))
        with pytest.raises(PrepError, match=message):
            prepare(load_recipe(path), tmp_path / "out", workers=1)


def test_cli_run_with_out_override(corpus, tmp_path, capsys):
    recipe_path, _ = corpus
    parser = argparse.ArgumentParser()
    prep.add_arguments(parser)
    assert prep.run(parser.parse_args([str(recipe_path), "--out", str(tmp_path / "cli"), "--workers", "1"])) == 0
    assert (tmp_path / "cli" / "train.bin").is_file() and "documents" in capsys.readouterr().out


def test_quickstart_recipe_loads(repo_root):
    recipe = load_recipe(repo_root / "data_prep" / "quickstart.yaml")
    assert recipe.output == "data/quickstart" and recipe.sources.local_corpus is not None
    assert 8 <= recipe.sources.local_corpus.max_mb <= 16 and recipe.tokenizer.vocab_size == 4096


def test_existing_tokenizer_is_copied_and_bad_records_fail_in_the_worker_pass(corpus, tmp_path):
    recipe_path, documents = corpus
    recipe = load_recipe(recipe_path)
    first = prepare(recipe, workers=1)
    recipe.tokenizer = prep.TokenizerRecipe(path=str(tmp_path / "out" / "tokenizer.model"))
    second = prepare(recipe, tmp_path / "reused", workers=2)
    assert second["splits"] == first["splits"]
    assert (tmp_path / "reused" / "train.bin").read_bytes() == (tmp_path / "out" / "train.bin").read_bytes()
    bad = tmp_path / "src" / "zz.jsonl.zst"
    bad.write_bytes(zstandard.ZstdCompressor().compress(b'{"text": "fine"}\n{"text": "broken\n'))
    recipe.sources.files.append(str(bad))
    with pytest.raises(CorpusError, match=r"zz\.jsonl\.zst:2: invalid JSON"):
        prepare(recipe, tmp_path / "reused", workers=2, force=True)
    assert (tmp_path / "reused" / "train.bin").read_bytes() == (tmp_path / "out" / "train.bin").read_bytes()


def test_pile_recipe_loads(repo_root):
    recipe = load_recipe(repo_root / "data_prep" / "pile.yaml")
    assert recipe.sources.files == ["/data/pile/train/*.jsonl.zst"] and recipe.tokenizer.path.endswith("tokenizer.json")
    assert recipe.valid_fraction > 0 and recipe.test_fraction > 0


def test_output_recorded_before_newer_recipe_keys_is_still_up_to_date(corpus, tmp_path):
    recipe_path, _ = corpus
    recipe = load_recipe(recipe_path)
    prepare(recipe, workers=1)
    summary = json.loads((tmp_path / "out" / "prep.json").read_text())
    for key in ("test_fraction", "shard_bytes", "skip_bad_records"):  # as an older prep wrote it
        del summary["recipe"][key]
    (tmp_path / "out" / "prep.json").write_text(json.dumps(summary))
    assert prepare(recipe, workers=1)["splits"] == summary["splits"]


def test_recipe_yaml_errors_name_the_file_line_and_column(tmp_path):
    path = tmp_path / "r.yaml"
    for text, message in [
        ("sources:\n  files: [a.jsonl\n", r"invalid YAML at line 3, column 1: expected ',' or '\]'"),
        ("seed: 1\nseed: 2\n", r"invalid YAML at line 2, column 1: found duplicate key 'seed' \(first at line 1\)"),
        ("- a.jsonl\n- b.jsonl\n", r"expected a mapping at the top level \(output:, sources:, tokenizer:, \.\.\.\), "
                                   r"found a list"),
    ]:
        path.write_text(text)
        with pytest.raises(PrepError, match=re.escape(str(path)) + ": " + message):
            load_recipe(path)


def test_missing_tokenizer_path_fails_before_any_corpus_is_built(tmp_path):
    recipe = prep.Recipe(output=str(tmp_path / "out"),
                         sources=prep.SourcesRecipe(local_corpus=prep.LocalCorpusRecipe()),
                         tokenizer=prep.TokenizerRecipe(path=str(tmp_path / "gone" / "tokenizer.json")))
    with pytest.raises(PrepError, match=r"tokenizer\.path: .*gone/tokenizer\.json does not exist "
                                        r".*leave tokenizer\.path out to train one"):
        prepare(recipe, workers=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no corpus, no partial work
