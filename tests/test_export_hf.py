"""Our model exported to transformers' Mamba2ForCausalLM gives the same logits, and
transformers still imports and runs beside our top-level `kernels` package."""

import pytest
import torch

from mamba_train.config import ModelConfig
from mamba_train.export import export_hf
from mamba_train.model import Mamba2LM

transformers = pytest.importorskip("transformers")


def randomized_model(ngroups: int) -> Mamba2LM:
    torch.manual_seed(ngroups)
    cfg = ModelConfig(d_model=64, n_layer=2, d_state=16, headdim=16, expand=2, ngroups=ngroups, chunk_size=16,
                      vocab_size=200, dt_limit=(0.0, 0.2))
    model = Mamba2LM(cfg)
    # Move every parameter away from its initial constant so a swapped or ignored one shows.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "norm_f.weight", "D", "conv1d.bias")):
                p.add_(0.3 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("ngroups", [1, 2])
def test_transformers_mamba2_gives_our_logits(tmp_path, ngroups):
    model = randomized_model(ngroups).eval()
    export_hf(model, model.cfg, tmp_path)
    hf = transformers.Mamba2ForCausalLM.from_pretrained(tmp_path).eval()
    tokens = torch.randint(0, 200, (2, 45))  # 45: not a multiple of the chunk size
    with torch.no_grad():
        ours = model(tokens)
        theirs = hf(tokens, use_cache=False).logits
    assert theirs.shape == ours.shape
    assert (ours - theirs).abs().max().item() <= 1e-4


def test_transformers_does_not_mistake_our_kernels_package_for_its_own():
    import kernels  # ours
    from transformers.utils import import_utils

    assert hasattr(kernels, "ssd")
    assert not import_utils.is_kernels_available()


@pytest.mark.parametrize("kind", ["sentencepiece", "tokenizer.json"])
def test_autotokenizer_on_the_export_gives_our_tokenizers_ids_and_eod(tmp_path, kind):
    from mamba_train.data import load_tokenizer, train_sentencepiece
    from test_data_tokenizer import TEXTS, make_hf_tokenizer

    if kind == "sentencepiece":
        ours = train_sentencepiece(iter(TEXTS), tmp_path / "sp", vocab_size=320, sample_docs=50)
    else:
        make_hf_tokenizer(tmp_path, with_config=False)
        ours = load_tokenizer(tmp_path / "tokenizer.json")
    model = randomized_model(1)
    export_hf(model, model.cfg, tmp_path / "hf", ours)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert theirs.eos_token_id == theirs.pad_token_id == ours.eod_id
    for text in [TEXTS[7], "  two  spaces,\ttab\n\nand unseen: café 日本 ☃", " leading space", ""]:
        assert theirs(text)["input_ids"] == ours.encode(text), text   # no BOS or EOS added either
