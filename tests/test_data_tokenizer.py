import json

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
