import json

import numpy as np
import pytest

from mamba_train.data import HFTokenizer, SentencePieceTokenizer, TokenizerError, load_tokenizer, train_sentencepiece

TEXTS = [f"def function_{i}(x):\n    return x * {i}  # the value\n\nThe quick brown fox {i}.\n" for i in range(200)]


def test_trained_sentencepiece_round_trips_and_has_eod_but_no_bos(tmp_path):
    tok = train_sentencepiece(iter(TEXTS), tmp_path / "sp", vocab_size=320, sample_docs=50)
    assert isinstance(tok, SentencePieceTokenizer) and (tmp_path / "sp.model").is_file()
    assert tok.vocab_size == 320 and tok.eod_id == 1
    assert tok._sp.bos_id() == -1
    for text in [TEXTS[3], "  two  spaces,\ttab\n\nand unseen: café 日本 ☃", " leading space"]:
        ids = tok.encode(text)
        assert tok.eod_id not in ids and tok.decode(ids) == text  # byte fallback: nothing is lost
    assert load_tokenizer(tmp_path / "sp.model").encode(TEXTS[0]) == tok.encode(TEXTS[0])
    assert tok.encode_batch(TEXTS[:3]) == [tok.encode(t) for t in TEXTS[:3]]


def test_training_is_deterministic(tmp_path):
    train_sentencepiece(iter(TEXTS), tmp_path / "a", vocab_size=300, sample_docs=64, seed=5)
    train_sentencepiece(iter(TEXTS), tmp_path / "b", vocab_size=300, sample_docs=64, seed=5)
    assert (tmp_path / "a.model").read_bytes() == (tmp_path / "b.model").read_bytes()


def test_too_small_vocab_names_the_knob(tmp_path):
    with pytest.raises(TokenizerError, match="vocab_size=200"):
        train_sentencepiece(iter(TEXTS), tmp_path / "sp", vocab_size=200)


def make_hf_tokenizer(directory, with_config: bool):
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<|endoftext|>", "</s>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXTS, trainer)
    tok.save(str(directory / "tokenizer.json"))
    if with_config:
        (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))


@pytest.mark.parametrize("with_config, eod_token", [(False, "<|endoftext|>"), (True, "</s>")])
def test_hf_tokenizer_json(tmp_path, with_config, eod_token):
    make_hf_tokenizer(tmp_path, with_config)
    tok = load_tokenizer(tmp_path)  # a directory resolves to its tokenizer.json
    assert isinstance(tok, HFTokenizer)
    assert tok.eod_id == tok._tok.token_to_id(eod_token)
    assert tok.vocab_size == tok._tok.get_vocab_size(with_added_tokens=True)
    text = TEXTS[7] + " café"
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode_batch([text, TEXTS[0]]) == [tok.encode(text), tok.encode(TEXTS[0])]


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(TokenizerError, match="missing.model: sentencepiece model not found"):
        load_tokenizer(tmp_path / "missing.model")
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match="junk.model: not a sentencepiece model"):
        load_tokenizer(tmp_path / "junk.model")
    with pytest.raises(TokenizerError, match="vocab.txt: unknown tokenizer file"):
        load_tokenizer(tmp_path / "vocab.txt")


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_model_types_and_byte_fallback_option(tmp_path, model_type):
    text = "naïve café ☃ snowman\n"
    words = "state space model chunk scan token window carry reset document loss byte".split()
    texts = TEXTS + [" ".join(words[(i * k) % len(words)] + str(k % 7) for k in range(30)) for i in range(200)]
    with_bytes = train_sentencepiece(texts, tmp_path / f"{model_type}-bytes", vocab_size=320, model_type=model_type)
    assert with_bytes.decode(with_bytes.encode(text)) == text  # ☃ is not in TEXTS: byte pieces carry it
    # without the 256 byte pieces this tiny text supports only a small vocabulary
    without = train_sentencepiece(texts, tmp_path / f"{model_type}-plain", vocab_size=60, model_type=model_type,
                                  byte_fallback=False)
    assert 0 in without.encode("☃")  # <unk>: what byte_fallback=False means


def test_trains_on_a_sample_of_n_documents(tmp_path):
    from mamba_train.data.tokenizer import _reservoir_sample

    sample = _reservoir_sample(iter(TEXTS), 10, seed=0, max_chars=1000)
    assert len(sample) == 10 and len(set(sample)) == 10 and set(sample) <= set(TEXTS)
    assert sample != TEXTS[:10]  # drawn from the whole stream, not its head


# The pipeline's encode_documents: for sentencepiece BPE it encodes each distinct segment
# of a chunk once (segments.py); the ids must be exactly those of whole documents.

HARD_TEXTS = [
    "",
    "  leading and trailing spaces   ",
    "tabs\tand\n\nnewlines\r\n  indented\n\t\tdeeper\n",
    "digits 1234567890 3.14159e-10 0x1F",
    "unseen: café 日本語 ☃ 🙂 and a NUL \x00 here",
    "the meta symbol written out: ▁ ▁▁x a▁b ▁ ",
    "a" * 3000 + " " + "ab " * 1000,
    " ",
] + TEXTS[:40]


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    return train_sentencepiece(iter(TEXTS), tmp_path_factory.mktemp("bpe") / "sp", vocab_size=360, sample_docs=200)


def random_texts(tok, n, seed):
    """Texts drawn from the vocabulary's own characters, spaces and a few unseen ones."""
    chars = sorted({c for i in range(tok.vocab_size) for c in tok._sp.id_to_piece(i).replace("▁", " ")
                    if not tok._sp.is_byte(i) and not tok._sp.is_control(i)} | set(" \n\t▁é☃"))
    rng = np.random.default_rng(seed)
    return ["".join(rng.choice(chars, rng.integers(0, 400))) for _ in range(n)]


def assert_same_as_whole_documents(tok, texts):
    ids, ends = tok.encode_documents(texts)
    whole = tok.encode_batch(texts)
    assert ends.tolist() == np.cumsum([len(w) for w in whole]).tolist()
    assert ids.tolist() == [i for w in whole for i in w]


def test_segment_encoder_gives_the_ids_of_whole_documents(bpe):
    assert bpe.cuts is not None  # the models the recipes train take the fast path
    assert_same_as_whole_documents(bpe, HARD_TEXTS)
    assert_same_as_whole_documents(bpe, random_texts(bpe, 300, seed=0))
    assert_same_as_whole_documents(bpe, [])


def with_spec(tok, tmp_path, name, change):
    from sentencepiece import sentencepiece_model_pb2 as spec

    model = spec.ModelProto.FromString(tok._sp.serialized_model_proto())
    change(model)
    (tmp_path / name).write_bytes(model.SerializeToString())
    return load_tokenizer(tmp_path / name)


def test_models_whose_ids_a_cut_could_change_are_encoded_whole(bpe, tmp_path):
    def dummy_prefix(model):
        model.normalizer_spec.add_dummy_prefix = True

    def unused_piece(model):
        model.pieces[-1].type = model.pieces[-1].UNUSED

    def unigram(model):
        model.trainer_spec.model_type = model.trainer_spec.UNIGRAM

    def no_byte_fallback(model):  # a run of unknown characters becomes one <unk>
        model.trainer_spec.byte_fallback = False
        kept = [piece for piece in model.pieces if piece.type != piece.BYTE]
        del model.pieces[:]
        model.pieces.extend(kept)

    for change in (dummy_prefix, unused_piece, unigram, no_byte_fallback):
        tok = with_spec(bpe, tmp_path, f"{change.__name__}.model", change)
        assert tok.cuts is None, change.__name__
        assert_same_as_whole_documents(tok, HARD_TEXTS)


def test_hf_tokenizer_documents_are_its_batch(tmp_path):
    make_hf_tokenizer(tmp_path, with_config=False)
    assert_same_as_whole_documents(load_tokenizer(tmp_path), HARD_TEXTS)
