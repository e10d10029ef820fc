"""GPT-2 weights (Radford et al. 2019) from Hugging Face `transformers` into `polyformer.models.gpt.GPT`.

GPT-2 is our backbone with pre-LN, learned positions, a final norm, tanh-GELU and a tied head. Its `Conv1D` layers
store weights as (in, out), the transpose of `nn.Linear`; its fused `c_attn` is ordered q, k, v like our `qkv`.

`convert_gpt2` maps a `GPT2LMHeadModel` state dict to ours and says what its shapes need; `gpt2_config` reads what
only `config.json` knows (heads, activation, norm eps); `load_hf_gpt2` is `init_from="hf:<name or folder>"`: a
`save_pretrained` folder, or a hub name ("gpt2", "gpt2-medium", ...) fetched once and cached.

The way out: `export_hf_gpt2` writes a `GPT` as a transformers GPT-2 folder (config, weights, optionally the
tokenizer) that `AutoModelForCausalLM.from_pretrained` loads, after `gpt2_export_problems` finds nothing to refuse.
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
    from polyformer.data.tokenizers import Tokenizer
    from polyformer.models.gpt import GPT

# GPT-2 block parameter -> ours (each with .weight and .bias).
_BLOCK = {"ln_1": "norm1", "ln_2": "norm2", "attn.c_attn": "attn.qkv", "attn.c_proj": "attn.proj",
          "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}  # fmt: skip

# What every GPT-2 is, whatever its size: the layout our backbone must have for the weights to mean the same
# function (dropout may differ).
_LAYOUT = {"backbone.kv_heads": None, "backbone.norm": "layernorm", "backbone.prenorm": True,
           "backbone.final_norm": True, "backbone.bias": True, "backbone.position": "learned",
           "backbone.causal": True, "backbone.cross_attention": False, "backbone.window": None}  # fmt: skip


# transformers' `activation_function` names (ACT2FN) with an exact counterpart here. GPT-2's own is "gelu_new", the
# tanh GELU written out; "gelu_pytorch_tanh" is the same function as torch's, which ours is, so export writes that.
_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "quick_gelu": "quick_gelu",
                "relu": "relu"}  # fmt: skip
_EXPORT_ACTIVATIONS = {"gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu", "quick_gelu": "quick_gelu", "relu": "relu"}


def gpt2_backbone_config(config: dict[str, Any]) -> TransformerConfig:
    """Our backbone settings for a GPT-2 `config.json` (or `GPT2Config.to_dict()`)."""
    activation = _ACTIVATIONS.get(config.get("activation_function", "gelu_new"))
    if activation is None:
        raise ValueError(
            f"GPT-2 activation {config['activation_function']!r} is not supported ({', '.join(_ACTIVATIONS)})"
        )
    width = config["n_embd"]
    return TransformerConfig(
        width=width,
        depth=config["n_layer"],
        heads=config["n_head"],
        mlp_ratio=(config.get("n_inner") or 4 * width) / width,
        activation=activation,
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


def gpt2_export_problems(model: GPT) -> list[str]:
    """Every setting of `model` that a transformers GPT-2 cannot express, as "model.<key>=<needed> (here <value>)".
    Derived from `TransformerConfig` field by field: free are the sizes, norm eps, context length (n_positions) and
    dropout (training only, written as GPT-2's three rates); a missing bias is written as zeros and a fixed position
    table (sinusoidal, or none: zeros) as GPT-2's learned one, the same function within GPT-2's context."""
    cfg, b = model.cfg, model.backbone.cfg
    wrong = []

    def need(key: str, needed: Any, here: Any) -> None:
        wrong.append(f"model.{key}={needed!r} (here {here!r})")

    if b.kv_heads not in (None, b.heads):
        need("backbone.kv_heads", None, b.kv_heads)  # GPT-2 has one key/value head per query head
    if b.activation not in _EXPORT_ACTIVATIONS:
        wrong.append(f"model.backbone.activation in {sorted(_EXPORT_ACTIVATIONS)} (here {b.activation!r})")
    if b.norm != "layernorm":
        need("backbone.norm", "layernorm", b.norm)
    if not b.prenorm:
        need("backbone.prenorm", True, b.prenorm)
    if not b.final_norm:
        need("backbone.final_norm", True, b.final_norm)  # GPT-2 always ends with ln_f
    if b.position == "rotary":
        need("backbone.position", "learned", b.position)
    if not b.causal:
        need("backbone.causal", True, b.causal)
    if b.cross_attention:
        need("backbone.cross_attention", False, b.cross_attention)
    if b.window is not None:
        need("backbone.window", None, b.window)  # GPT-2 attends to the whole context
    if not cfg.tie_embeddings:
        need("tie_embeddings", True, cfg.tie_embeddings)  # GPT-2's head is its token embedding
    if b.qk_norm:
        need("backbone.qk_norm", False, b.qk_norm)  # GPT-2's attention has no query/key norms
    if cfg.logit_softcap is not None:
        need("logit_softcap", None, cfg.logit_softcap)  # GPT-2's logits are the head's, uncapped
    return wrong


def gpt2_state_dict(model: GPT) -> dict[str, Tensor]:
    """`model`'s weights in `GPT2LMHeadModel` keys: the inverse of `convert_gpt2`. Only the first `vocab_size` rows
    of the padded embedding; the head is tied, so it is not written (transformers ties it on load)."""
    b = model.backbone.cfg
    ours = model.state_dict()
    width = b.width
    out = {"transformer.wte.weight": ours["embed.weight"][: model.cfg.vocab_size]}
    if b.position == "learned":
        out["transformer.wpe.weight"] = ours["backbone.positions.weight"]
    elif b.position == "sinusoidal":
        out["transformer.wpe.weight"] = model.backbone.positions.table[: b.max_len].float()
    else:  # no positions: a zero table adds nothing
        out["transformer.wpe.weight"] = ours["embed.weight"].new_zeros(b.max_len, width)
    for i in range(b.depth):
        for theirs, mine in _BLOCK.items():
            w = ours[f"backbone.blocks.{i}.{mine}.weight"]
            out[f"transformer.h.{i}.{theirs}.weight"] = w if theirs.startswith("ln") else w.t()  # Conv1D: (in, out)
            bias = ours.get(f"backbone.blocks.{i}.{mine}.bias")
            out[f"transformer.h.{i}.{theirs}.bias"] = w.new_zeros(w.shape[0]) if bias is None else bias
    out["transformer.ln_f.weight"] = ours["backbone.norm.weight"]
    out["transformer.ln_f.bias"] = ours.get("backbone.norm.bias", ours["backbone.norm.weight"].new_zeros(width))
    return out


def gpt2_config_json(model: GPT, tokenizer: Tokenizer | None = None) -> dict[str, Any]:
    """The `config.json` of a `GPT2LMHeadModel` computing what `model` computes."""
    b = model.backbone.cfg
    special = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    if tokenizer is not None:
        special = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id}
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": model.cfg.vocab_size,
        "n_positions": b.max_len,
        "n_embd": b.width,
        "n_layer": b.depth,
        "n_head": b.heads,
        "n_inner": b.mlp_hidden,
        "activation_function": _EXPORT_ACTIVATIONS[b.activation],
        "layer_norm_epsilon": b.norm_eps,
        "resid_pdrop": b.dropout,
        "embd_pdrop": b.dropout,  # ours drops the embeddings at the same rate as the residual branches
        "attn_pdrop": b.attention_dropout,
        "initializer_range": 0.02,
        "scale_attn_weights": True,  # 1 / sqrt(head dim), as SDPA
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "add_cross_attention": False,
        "tie_word_embeddings": True,
        "use_cache": True,
        "dtype": str(model.embed.weight.dtype).removeprefix("torch."),
        **special,
    }


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def export_hf_gpt2(model: GPT, out_dir: Path, tokenizer: Tokenizer | None = None, overwrite: bool = False) -> Path:
    """Write `model` as a transformers GPT-2 folder: `config.json` and `model.safetensors`, so that
    `AutoModelForCausalLM.from_pretrained(out_dir)` computes the same logits; with `tokenizer`, its `tokenizer.json`
    and the files naming its special tokens, so that `AutoTokenizer.from_pretrained(out_dir)` tokenizes as ours.
    Refuses (one ValueError naming every setting) a model GPT-2 cannot express, before writing anything. `convert_gpt2`
    of the written weights gives back the model's (with zero biases where the model has none)."""
    from polyformer.weights.export import prepare_out_dir, refuse, write_json, write_safetensors

    wrong = gpt2_export_problems(model)
    if tokenizer is not None and tokenizer.vocab_size > model.cfg.vocab_size:
        wrong.append(f"model.vocab_size>={tokenizer.vocab_size} (the tokenizer's; here {model.cfg.vocab_size})")
    refuse("GPT", "a transformers GPT-2", wrong)
    out = prepare_out_dir(out_dir, overwrite)
    write_safetensors(out / "model.safetensors", gpt2_state_dict(model))
    if tokenizer is None:
        for name in _TOKENIZER_FILES:  # an older export's tokenizer here would pass for this model's
            (out / name).unlink(missing_ok=True)
    else:
        _write_tokenizer(out, tokenizer, model.backbone.cfg.max_len)
    write_json(out / "config.json", gpt2_config_json(model, tokenizer))  # last: a folder with a config is complete
    return out


def _write_tokenizer(out: Path, tokenizer: Tokenizer, max_len: int) -> None:
    from polyformer.weights.export import write_atomic, write_json

    token = tokenizer.inner.id_to_token
    special = {
        "bos_token": token(tokenizer.bos_id),
        "eos_token": token(tokenizer.eos_id),
        "pad_token": token(tokenizer.pad_id),
        "unk_token": token(tokenizer.eos_id),  # byte-level vocabularies have no unknown token; GPT-2 names eos
    }
    write_atomic(out / "tokenizer.json", lambda tmp: tmp.write_text(tokenizer.to_json()))
    # The fast tokenizer class reads tokenizer.json as it is; GPT2Tokenizer would rebuild GPT-2's own pipeline.
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": max_len,
        "clean_up_tokenization_spaces": False,
        **special,
    }
    write_json(out / "tokenizer_config.json", config)
    write_json(out / "special_tokens_map.json", special)
