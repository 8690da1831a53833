"""Export to Hugging Face transformers' `Mamba2ForCausalLM`: model.safetensors + config.json.

Our parameter names are mamba_ssm's; transformers renames the embedding and keeps the
rest, and ties the head to the embedding (so no `lm_head.weight` is written).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from mamba_train.config import ModelConfig
from mamba_train.data.tokenizer import Tokenizer


def hf_config(cfg: ModelConfig, vocab_size: int, eod_id: int | None = None) -> dict:
    return {
        "architectures": ["Mamba2ForCausalLM"],
        "model_type": "mamba2",
        "vocab_size": vocab_size,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layer,
        "state_size": cfg.d_state,
        "expand": cfg.expand,
        "head_dim": cfg.headdim,
        "num_heads": cfg.nheads,
        "n_groups": cfg.ngroups,
        "conv_kernel": cfg.d_conv,
        "chunk_size": cfg.chunk_size,
        "layer_norm_epsilon": cfg.norm_eps,
        "use_bias": False,
        "use_conv_bias": True,
        "hidden_act": "silu",
        "residual_in_fp32": True,
        "rms_norm": True,
        "norm_before_gate": False,
        "time_step_min": cfg.dt_min,
        "time_step_max": cfg.dt_max,
        "time_step_floor": cfg.dt_init_floor,
        # Written as JSON's `Infinity` when unbounded, as transformers' own save_pretrained does.
        "time_step_limit": list(cfg.dt_limit),
        "initializer_range": cfg.initializer_range,
        "tie_word_embeddings": True,
        "eos_token_id": eod_id,
        "pad_token_id": eod_id,
        "bos_token_id": None,
        "torch_dtype": "float32",
    }


def hf_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    renamed = {}
    for name, tensor in state_dict.items():
        if name == "embedding.weight":
            name = "embeddings.weight"
        renamed[f"backbone.{name}"] = tensor.detach().contiguous().cpu()
    return renamed


def export_hf(model, cfg: ModelConfig, out_dir: str | Path, tokenizer: Tokenizer | None = None) -> Path:
    """The model, and the run's tokenizer if given, as a directory that transformers'
    Mamba2ForCausalLM and AutoTokenizer (transformers >= 5 for a sentencepiece model) load."""
    if cfg.D_has_hdim:
        raise ValueError("transformers' Mamba2 has one D per head: export needs model.D_has_hdim=false")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(hf_state_dict(model.state_dict()), out_dir / "model.safetensors", metadata={"format": "pt"})
    eod_id = tokenizer.eod_id if tokenizer is not None else None
    (out_dir / "config.json").write_text(json.dumps(hf_config(cfg, model.vocab_size, eod_id), indent=1))
    if tokenizer is not None:
        # under the file name transformers looks for, whatever the run's file is called
        suffix = tokenizer.path.suffix
        shutil.copy(tokenizer.path, out_dir / ("tokenizer.model" if suffix == ".model" else "tokenizer.json"))
        # The class named, or AutoTokenizer picks mamba2's default (GPT-NeoX's), which reads our
        # sentencepiece model into other ids without a word; the generic fast tokenizer reads a
        # tokenizer.json as it is and converts a sentencepiece model. The EOD named, as neither
        # file says which special token ends a document.
        eod = tokenizer.token(tokenizer.eod_id)
        (out_dir / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eod, "pad_token": eod}, indent=1))
    return out_dir
