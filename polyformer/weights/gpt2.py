"""GPT-2 weights (Radford et al. 2019) from Hugging Face `transformers` into `polyformer.models.gpt.GPT`.

GPT-2 is our backbone with pre-LN, learned positions, a final norm, tanh-GELU and a tied head. Its `Conv1D` layers
store weights as (in, out), the transpose of `nn.Linear`; its fused `c_attn` is ordered q, k, v like our `qkv`.

`convert_gpt2` maps a `GPT2LMHeadModel` state dict to ours and says what its shapes need; `gpt2_config` reads what
only `config.json` knows (heads, activation, norm eps); `load_hf_gpt2` is `init_from="hf:<name or folder>"`: a
`save_pretrained` folder, or a hub name ("gpt2", "gpt2-medium", ...) fetched once and cached.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from polyformer.backbone import TransformerConfig
from polyformer.weights import check_fits

if TYPE_CHECKING:
    from polyformer.models.gpt import GPT

# GPT-2 block parameter -> ours (each with .weight and .bias).
_BLOCK = {"ln_1": "norm1", "ln_2": "norm2", "attn.c_attn": "attn.qkv", "attn.c_proj": "attn.proj",
          "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}  # fmt: skip

# What every GPT-2 is, whatever its size: the layout our backbone must have for the weights to mean the same
# function (dropout may differ).
_LAYOUT = {"backbone.kv_heads": None, "backbone.norm": "layernorm", "backbone.prenorm": True,
           "backbone.final_norm": True, "backbone.bias": True, "backbone.position": "learned",
           "backbone.causal": True, "backbone.cross_attention": False, "backbone.window": None}  # fmt: skip


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


def gpt2_config(config: dict[str, Any]) -> dict[str, Any]:
    """The `--model.` keys (dotted, as the CLI spells them) a GPT-2 `config.json` fixes, besides its shapes.
    `backbone.max_len` is not among them: a shorter context takes the first positions of GPT-2's table."""
    backbone = gpt2_backbone_config(config)
    return {
        **_LAYOUT,
        "backbone.width": backbone.width,
        "backbone.depth": backbone.depth,
        "backbone.heads": backbone.heads,
        "backbone.mlp_ratio": backbone.mlp_ratio,
        "backbone.activation": backbone.activation,
        "backbone.norm_eps": backbone.norm_eps,
    }


def convert_gpt2(state_dict: dict[str, Tensor], vocab_rows: int) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """A GPT-2 state dict (with or without the "transformer." prefix) -> (the `--model.` keys its shapes need, a
    `GPT` state dict). The token embedding fills the first rows of our (vocab_rows, D) table, the padded rows stay
    zero; the head is the same matrix (GPT-2's is tied). All of GPT-2's positions are kept (`load_hf_gpt2` cuts
    them to the model's context)."""
    sd = {k.removeprefix("transformer."): v for k, v in state_dict.items()}
    wte, wpe = sd["wte.weight"], sd["wpe.weight"]
    if wte.shape[0] > vocab_rows:
        raise ValueError(
            f"GPT-2 has {wte.shape[0]} tokens but the model's vocabulary has {vocab_rows} rows; set "
            f"--model.vocab_size to at least {wte.shape[0]} (use GPT-2's tokenizer: data.tokenizer=gpt2)"
        )
    width = wte.shape[1]
    embed = torch.zeros(vocab_rows, width, dtype=wte.dtype)
    embed[: wte.shape[0]] = wte
    out = {"embed.weight": embed, "backbone.positions.weight": wpe}
    depth = len({k.split(".")[1] for k in sd if k.startswith("h.")})
    for i in range(depth):
        for theirs, mine in _BLOCK.items():
            w = sd[f"h.{i}.{theirs}.weight"]
            out[f"backbone.blocks.{i}.{mine}.weight"] = w if theirs.startswith("ln") else w.t().contiguous()  # Conv1D
            out[f"backbone.blocks.{i}.{mine}.bias"] = sd[f"h.{i}.{theirs}.bias"]
    out["backbone.norm.weight"], out["backbone.norm.bias"] = sd["ln_f.weight"], sd["ln_f.bias"]
    out["head.weight"] = embed
    config = {
        **_LAYOUT,
        "backbone.width": width,
        "backbone.depth": depth,
        "backbone.mlp_ratio": sd["h.0.mlp.c_fc.weight"].shape[1] / width,  # Conv1D: (in, out)
    }
    return config, out


def model_config(model: GPT) -> dict[str, Any]:
    """A GPT's config as the dotted `--model.` keys `check_fits` compares."""
    cfg = model.cfg
    keys = {f"backbone.{k}": v for k, v in dataclasses.asdict(cfg.backbone).items()}
    keys.update({f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name != "backbone"})
    return keys


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
        config, weights = (Path(hf_hub_download(name_or_path, f)) for f in ("config.json", "model.safetensors"))
        return config, weights
    except Exception as e:  # offline, no network, unknown repository
        failure = type(e).__name__
    # Raised outside the except block, so the hub's own message is not even the context: the CLI, which reports the
    # innermost error of a chain, shows this one.
    raise ConnectionError(
        f"cannot fetch GPT-2 weights {name_or_path!r} from the Hugging Face hub ({failure}); it needs the network "
        "once (then it is cached), or give a local save_pretrained folder: init_from='hf:<folder>'"
    )


def load_hf_gpt2(name: str, model: GPT) -> dict[str, Tensor]:
    """`init_from="hf:<name>"`: GPT-2 weights (a hub name or a local `save_pretrained` folder) as `model`'s complete
    state dict, after checking that the model has GPT-2's architecture (every differing key named at once)."""
    from safetensors.torch import load_file

    source = f"hf:{name}"
    config_file, weights_file = _files(name)
    config, state = convert_gpt2(load_file(str(weights_file)), model.cfg.padded_vocab_size)
    check_fits(model_config(model), {**gpt2_config(json.loads(config_file.read_text())), **config}, source)
    positions, max_len = state["backbone.positions.weight"], model.cfg.backbone.max_len
    if max_len > positions.shape[0]:
        raise ValueError(
            f"the weights {source!r} have {positions.shape[0]} learned positions: set "
            f"--model.backbone.max_len to at most {positions.shape[0]} (here {max_len})"
        )
    state["backbone.positions.weight"] = positions[:max_len]
    return state
