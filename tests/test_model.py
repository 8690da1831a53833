import pytest
import torch

from mamba_train.config import ModelConfig
from mamba_train.model import Mamba2LM, count_params, param_groups, set_recompute, ssd_forward_flops_per_token, \
    training_flops_per_token


def tiny(**overrides) -> ModelConfig:
    fields = dict(d_model=32, n_layer=2, d_state=8, headdim=8, expand=2, ngroups=2, chunk_size=8, vocab_size=100)
    fields.update(overrides)
    return ModelConfig(**fields)


def test_vocab_is_padded_to_a_multiple_of_128_times_tp():
    assert tiny().padded_vocab_size() == 128
    assert tiny(vocab_size=50277).padded_vocab_size() == 50304
    assert tiny(vocab_size=50277).padded_vocab_size(tp_size=4) == 50688


@pytest.mark.parametrize("cfg", [tiny(), tiny(D_has_hdim=True, ngroups=1), tiny(d_conv=2, expand=1)])
def test_param_count_formula_matches_the_module(cfg):
    model = Mamba2LM(cfg)
    assert count_params(cfg, model.vocab_size) == sum(p.numel() for p in model.parameters())


def test_flops_per_token_by_hand_for_the_130m_config():
    cfg = ModelConfig(vocab_size=50277)  # defaults are the 130m shape: 768 x 24, n 128, p 64, Q 256
    vocab = cfg.padded_vocab_size()
    nheads = 24
    in_proj = 768 * (2 * 1536 + 2 * 128 + 24)
    per_layer = 768 + in_proj + (1536 + 256) * 5 + 3 * 24 + 1536 + 1536 * 768
    params = vocab * 768 + 24 * per_layer + 768
    assert count_params(cfg, vocab) == params == 129_001_920
    # SSD per token per layer: CB (2·Q·N·G) + (CB∘L)x (2·Q·P·H) + chunk state and readout (2 · 2·N·P·H)
    ssd = 2 * 256 * 128 * 1 + 2 * 256 * 64 * nheads + 4 * 128 * 64 * nheads
    assert ssd_forward_flops_per_token(cfg) == ssd
    assert training_flops_per_token(cfg, vocab) == 6 * params + 3 * ssd * 24


def test_initialisation_follows_mamba_ssm():
    torch.manual_seed(0)
    cfg = tiny(n_layer=4, d_model=64)
    model = Mamba2LM(cfg)
    mixer = model.layers[0].mixer
    A = torch.exp(mixer.A_log)
    assert ((A >= 1) & (A <= 16)).all()
    dt = torch.nn.functional.softplus(mixer.dt_bias)
    assert ((dt >= cfg.dt_min * 0.999) & (dt <= cfg.dt_max * 1.001)).all()
    assert torch.equal(mixer.D, torch.ones_like(mixer.D))
    assert abs(model.embedding.weight.std().item() - 0.02) < 0.002
    # out_proj: Kaiming-uniform bound 1/sqrt(fan_in), then divided by sqrt(n_layer)
    bound = 1 / cfg.d_inner ** 0.5 / cfg.n_layer ** 0.5
    assert mixer.out_proj.weight.abs().max() <= bound
    assert mixer.out_proj.weight.abs().max() > 0.9 * bound


def test_no_weight_decay_on_A_log_D_dt_bias_norms_and_biases():
    model = Mamba2LM(tiny())
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = sorted(names[id(p)] for p in no_decay["params"])
    undecayed = ("A_log", "D", "dt_bias", "conv1d.bias", "norm.weight", "norm_f.weight")
    assert no_decay_names and all(name.endswith(undecayed) for name in no_decay_names)
    assert len(no_decay_names) == 6 * 2 + 1  # per layer: A_log, D, dt_bias, conv bias, 2 norms; + final norm
    assert all(p.ndim >= 2 for p in decay["params"]) and decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0


def test_documents_in_one_row_equal_documents_run_alone():
    torch.manual_seed(0)
    model = Mamba2LM(tiny()).double()
    first, second = torch.randint(0, 100, (1, 11)), torch.randint(0, 100, (1, 14))
    packed = torch.cat([first, second], dim=1)
    seq_idx = torch.tensor([[0] * 11 + [1] * 14], dtype=torch.int32)
    logits = model(packed, seq_idx=seq_idx)
    torch.testing.assert_close(logits[:, :11], model(first), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(logits[:, 11:], model(second), rtol=1e-10, atol=1e-10)


def test_carried_states_equal_one_long_forward():
    torch.manual_seed(0)
    model = Mamba2LM(tiny()).double()
    tokens = torch.randint(0, 100, (2, 37))
    whole = model(tokens)
    states, pieces = None, []
    for start in range(0, 37, 10):  # windows of 10: not a multiple of the chunk size
        logits, states = model(tokens[:, start:start + 10], states=states, return_states=True)
        pieces.append(logits)
    torch.testing.assert_close(torch.cat(pieces, dim=1), whole, rtol=1e-10, atol=1e-10)


def _saved_bytes_and_grads(model, input_ids, labels, seq_idx):
    """The loss, every gradient, and the bytes autograd kept for backward (its saved tensors)."""
    saved = []

    def keep(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        loss = model.loss(input_ids, labels, seq_idx)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, sum(saved)


def test_recompute_gives_the_same_gradients_and_keeps_far_less():
    # train.recompute='block': each block keeps only its input and runs again in backward
    cfg = ModelConfig(d_model=32, n_layer=4, d_state=16, headdim=16, chunk_size=16, vocab_size=64)
    torch.manual_seed(0)
    model = Mamba2LM(cfg)
    input_ids = torch.randint(0, 64, (2, 48))
    seq_idx = torch.zeros(2, 48, dtype=torch.int32)
    seq_idx[:, 30:] = 1
    plain = _saved_bytes_and_grads(model, input_ids, input_ids.roll(-1, 1), seq_idx)
    model.zero_grad(set_to_none=True)
    set_recompute(model, "block")
    assert all(layer.recompute for layer in model.layers)
    recomputed = _saved_bytes_and_grads(model, input_ids, input_ids.roll(-1, 1), seq_idx)
    assert torch.equal(plain[0], recomputed[0])
    for name, grad in plain[1].items():
        assert torch.equal(grad, recomputed[1][name]), name   # the same ops again, on the CPU bit for bit
    # the blocks' activations are gone but for their inputs: under a fifth of the bytes (here 3.5%)
    assert recomputed[2] < plain[2] / 5, (recomputed[2], plain[2])
    # the other modes only tell each mixer body whether to keep its conv and norm outputs
    for mode, keeps in (("none", True), ("mixer", False)):
        set_recompute(model, mode)
        assert all(not layer.recompute and layer.mixer.keep_activations == keeps for layer in model.layers)
    with pytest.raises(ValueError, match="recompute: expected one of"):
        set_recompute(model, True)
