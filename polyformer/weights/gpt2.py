"""GPT-2 weights (Radford et al. 2019) from Hugging Face `transformers` into our language model.

GPT-2 is our backbone with pre-LN, learned positions, a final norm, tanh-GELU and a tied head. Its `Conv1D` layers
store weights as (in, out), the transpose of `nn.Linear`; its fused `c_attn` is ordered q, k, v like our `qkv`.
Reads a `GPT2LMHeadModel` state dict, a `save_pretrained` folder, or a hub name ("gpt2", "gpt2-medium", ...).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from polyformer.backbone import TransformerConfig

# Fields that must agree for GPT-2 weights to mean the same function in our backbone (dropout may differ).
_ARCHITECTURE = ("width", "depth", "heads", "kv_heads", "mlp_ratio", "activation", "norm", "norm_eps", "prenorm",
                 "final_norm", "bias", "position", "causal", "cross_attention", "window")  # fmt: skip


def gpt2_backbone_config(config: dict[str, Any]) -> TransformerConfig:
    """Our backbone settings for a GPT-2 `config.json` (or `GPT2Config.to_dict()`)."""
    if config.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"GPT-2 activation {config['activation_function']!r} is not supported (tanh GELU only)")
    width = config["n_embd"]
    return TransformerConfig(
        width=width,
        depth=config["n_layer"],
        heads=config["n_head"],
        mlp_ratio=(config.get("n_inner") or 4 * width) / width,
        activation="gelu_tanh",
        norm_eps=config.get("layer_norm_epsilon", 1e-5),
        dropout=config.get("resid_pdrop", 0.1),
        attention_dropout=config.get("attn_pdrop", 0.1),
        position="learned",
        max_len=config["n_positions"],
        causal=True,
    )


def convert_gpt2(state: dict[str, Tensor], cfg: TransformerConfig, vocab_rows: int) -> dict[str, Tensor]:
    """Map a GPT-2 state dict (with or without the "transformer." prefix) to `LanguageModel` keys. The token
    embedding is copied into the first rows of our (vocab_rows, D) table; the padded rows stay zero."""
    sd = {k.removeprefix("transformer."): v for k, v in state.items()}
    wte, wpe = sd["wte.weight"], sd["wpe.weight"]
    if wte.shape[0] > vocab_rows:
        raise ValueError(f"GPT-2 has {wte.shape[0]} tokens but the model's vocabulary has {vocab_rows} rows")
    if cfg.max_len > wpe.shape[0]:
        raise ValueError(f"backbone.max_len ({cfg.max_len}) exceeds GPT-2's {wpe.shape[0]} learned positions")
    embed = torch.zeros(vocab_rows, wte.shape[1], dtype=wte.dtype)
    embed[: wte.shape[0]] = wte
    out = {"embed.weight": embed, "head.weight": embed, "backbone.positions.weight": wpe[: cfg.max_len]}
    ours = {"ln_1": "norm1", "ln_2": "norm2", "attn.c_attn": "attn.qkv", "attn.c_proj": "attn.proj",
            "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}  # fmt: skip
    for i in range(cfg.depth):
        for theirs, mine in ours.items():
            w = sd[f"h.{i}.{theirs}.weight"]
            out[f"backbone.blocks.{i}.{mine}.weight"] = w if theirs.startswith("ln") else w.t().contiguous()  # Conv1D
            out[f"backbone.blocks.{i}.{mine}.bias"] = sd[f"h.{i}.{theirs}.bias"]
    out["backbone.norm.weight"], out["backbone.norm.bias"] = sd["ln_f.weight"], sd["ln_f.bias"]
    return out


def check_config(ours: TransformerConfig, theirs: TransformerConfig) -> None:
    for name in _ARCHITECTURE:
        if getattr(ours, name) != getattr(theirs, name):
            raise ValueError(
                f"model.backbone.{name} is {getattr(ours, name)!r} but the GPT-2 weights need {getattr(theirs, name)!r}"
            )


def _files(name_or_path: str) -> tuple[Path, Path]:
    folder = Path(name_or_path).expanduser()
    if folder.is_dir():
        config, weights = folder / "config.json", folder / "model.safetensors"
        if not (config.is_file() and weights.is_file()):
            raise FileNotFoundError(f"{folder} needs config.json and model.safetensors (GPT2 save_pretrained output)")
        return config, weights
    if name_or_path.startswith((".", "/", "~")):
        raise FileNotFoundError(f"GPT-2 folder not found: {folder}")
    from huggingface_hub import hf_hub_download

    try:
        return tuple(Path(hf_hub_download(name_or_path, f)) for f in ("config.json", "model.safetensors"))
    except Exception as e:  # offline, no network, unknown repository
        raise ConnectionError(
            f"cannot fetch GPT-2 weights {name_or_path!r} from the Hugging Face hub ({type(e).__name__}); it needs the "
            "network once (then it is cached), or give a local save_pretrained folder"
        ) from None


def load_gpt2_state_dict(name_or_path: str, cfg: TransformerConfig, vocab_rows: int) -> dict[str, Tensor]:
    """GPT-2 weights as a `LanguageModel` state dict, after checking that `cfg` is GPT-2's architecture."""
    from safetensors.torch import load_file

    config_file, weights_file = _files(name_or_path)
    check_config(cfg, gpt2_backbone_config(json.loads(config_file.read_text())))
    return convert_gpt2(load_file(str(weights_file)), cfg, vocab_rows)
