"""BERT weights (Devlin et al. 2019) from Hugging Face `transformers` into `polyformer.models.bert`, and an encoder
carried from one of our checkpoints into another head (masked-LM pre-training -> classification fine-tuning).

BERT is our backbone post-LN, with learned positions added before an embedding LayerNorm (the model's), exact GELU,
biases everywhere and LayerNorm eps 1e-12. Its separate query / key / value projections are concatenated into our
fused `qkv` (ordered q, k, v); its `nn.Linear` weights are already (out, in), like ours.

`convert_bert` maps a `BertForMaskedLM` / `BertForSequenceClassification` / `BertModel` state dict to ours and says
what its shapes need; `bert_config` reads what only `config.json` knows; `load_hf_bert` is
`init_from="hf:<save_pretrained folder or hub name>"` for both of our BERT models. Parts the source lacks keep the
model's initialisation: the pooler and classifier (transformers' `BertForMaskedLM` has neither: a pre-trained encoder
gets a new head), the MLM head (a classifier's source).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from polyformer.weights import check_fits

# transformers' BERT layer parameter -> ours (each with .weight and .bias); q, k, v are fused separately.
_LAYER = {"attention.output.dense": "attn.proj", "attention.output.LayerNorm": "norm1",
          "intermediate.dense": "mlp.fc1", "output.dense": "mlp.fc2", "output.LayerNorm": "norm2"}  # fmt: skip
_HEAD = {"cls.predictions.transform.dense": "head.dense", "cls.predictions.transform.LayerNorm": "head.norm"}

# What every BERT is, whatever its size: the layout our backbone must have for the weights to mean the same function.
_LAYOUT = {"backbone.kv_heads": None, "backbone.norm": "layernorm", "backbone.prenorm": False,
           "backbone.bias": True, "backbone.position": "learned", "backbone.causal": False,
           "backbone.cross_attention": False, "backbone.window": None, "backbone.qk_norm": False}  # fmt: skip

# transformers' `hidden_act` names with an exact counterpart here.
_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}


def bert_config(config: dict[str, Any]) -> dict[str, Any]:
    """The `--model.` keys (dotted, as the CLI spells them) a BERT `config.json` (or `BertConfig.to_dict()`) fixes.
    `backbone.max_len` is not among them: a shorter context takes the first rows of BERT's position table."""
    activation = _ACTIVATIONS.get(config.get("hidden_act", "gelu"))
    if activation is None:
        raise ValueError(f"BERT activation {config['hidden_act']!r} is not supported ({', '.join(_ACTIVATIONS)})")
    if config.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"BERT position_embedding_type {config['position_embedding_type']!r}: only 'absolute' loads")
    width = config["hidden_size"]
    return {
        **_LAYOUT,
        "backbone.width": width,
        "backbone.depth": config["num_hidden_layers"],
        "backbone.heads": config["num_attention_heads"],
        "backbone.mlp_ratio": config["intermediate_size"] / width,
        "backbone.activation": activation,
        "backbone.norm_eps": config.get("layer_norm_eps", 1e-12),
        "vocab_size": config["vocab_size"],
        "type_vocab_size": config.get("type_vocab_size", 2),
    }


def convert_bert(state_dict: dict[str, Tensor], vocab_rows: int) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """A transformers BERT state dict -> (the `--model.` keys its shapes need, our state dict under `bert.`, `head.`
    and `classifier.`, holding only what the source has). The word embedding fills the first rows of our
    (vocab_rows, D) table; all of BERT's positions are kept (`load_hf_bert` cuts them to the model's context)."""
    sd = {k.removeprefix("bert."): v for k, v in state_dict.items()}
    words = sd["embeddings.word_embeddings.weight"]
    if words.shape[0] > vocab_rows:
        raise ValueError(
            f"BERT has {words.shape[0]} tokens but the model's vocabulary has {vocab_rows} rows; set "
            f"--model.vocab_size={words.shape[0]} (use BERT's tokenizer: data.tokenizer=<its tokenizer.json>)"
        )
    width = words.shape[1]
    embed = torch.zeros(vocab_rows, width, dtype=words.dtype)
    embed[: words.shape[0]] = words
    out = {
        "bert.embed.weight": embed,
        "bert.positions.weight": sd["embeddings.position_embeddings.weight"],
        "bert.token_types.weight": sd["embeddings.token_type_embeddings.weight"],
        "bert.embed_norm.weight": sd["embeddings.LayerNorm.weight"],
        "bert.embed_norm.bias": sd["embeddings.LayerNorm.bias"],
    }
    depth = len({k.split(".")[2] for k in sd if k.startswith("encoder.layer.")})
    for i in range(depth):
        theirs, ours = f"encoder.layer.{i}.", f"bert.backbone.blocks.{i}."
        for part in ("weight", "bias"):
            qkv = [sd[f"{theirs}attention.self.{n}.{part}"] for n in ("query", "key", "value")]
            out[f"{ours}attn.qkv.{part}"] = torch.cat(qkv, dim=0)
            for name, mine in _LAYER.items():
                out[f"{ours}{mine}.{part}"] = sd[f"{theirs}{name}.{part}"]
    if "pooler.dense.weight" in sd:
        out["pooler.weight"], out["pooler.bias"] = sd["pooler.dense.weight"], sd["pooler.dense.bias"]
    if "cls.predictions.bias" in sd:
        for name, mine in _HEAD.items():
            out[f"{mine}.weight"], out[f"{mine}.bias"] = sd[f"{name}.weight"], sd[f"{name}.bias"]
        bias = sd["cls.predictions.bias"]
        out["head.decoder.bias"] = torch.cat([bias, bias.new_zeros(vocab_rows - bias.shape[0])])
        out["head.decoder.weight"] = embed  # tied in BERT and here
    if "classifier.weight" in sd:
        out["classifier.weight"], out["classifier.bias"] = sd["classifier.weight"], sd["classifier.bias"]
    config = {
        **{k: v for k, v in _LAYOUT.items()},
        "backbone.width": width,
        "backbone.depth": depth,
        "backbone.mlp_ratio": sd["encoder.layer.0.intermediate.dense.weight"].shape[0] / width,
        "vocab_size": words.shape[0],
        "type_vocab_size": sd["embeddings.token_type_embeddings.weight"].shape[0],
    }
    return config, out


def model_config(model: nn.Module) -> dict[str, Any]:
    """A BERT model's config as the dotted `--model.` keys `check_fits` compares."""
    import dataclasses

    cfg = model.cfg
    keys = {f"backbone.{k}": v for k, v in dataclasses.asdict(cfg.backbone).items()}
    keys.update({f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name != "backbone"})
    return keys


def _files(name_or_path: str) -> tuple[Path, Path]:
    folder = Path(name_or_path).expanduser()
    if folder.is_dir():
        config, weights = folder / "config.json", folder / "model.safetensors"
        if not (config.is_file() and weights.is_file()):
            raise FileNotFoundError(f"{folder} needs config.json and model.safetensors (BERT save_pretrained output)")
        return config, weights
    if name_or_path.startswith((".", "/", "~")):
        raise FileNotFoundError(f"BERT folder not found: {folder}")
    from huggingface_hub import hf_hub_download

    try:
        return tuple(Path(hf_hub_download(name_or_path, f)) for f in ("config.json", "model.safetensors"))  # type: ignore[return-value]
    except Exception as e:  # offline, no network, unknown repository
        failure = type(e).__name__
    raise ConnectionError(
        f"cannot fetch BERT weights {name_or_path!r} from the Hugging Face hub ({failure}); it needs the network "
        "once (then it is cached), or give a local save_pretrained folder: init_from='hf:<folder>'"
    )


def merge_into(model: nn.Module, state: dict[str, Tensor], source: str) -> dict[str, Tensor]:
    """`model`'s full state dict with `state`'s tensors in place of its own. Keys of `state` the model lacks (another
    head) are dropped; a classifier of another class count keeps the model's fresh one, with a warning."""
    full = model.state_dict()
    for key, value in state.items():
        if key not in full:
            continue
        if key.startswith("classifier.") and value.shape != full[key].shape:
            warnings.warn(
                f"{source}: its classifier has {value.shape[0]} classes, the model {full[key].shape[0]}: the "
                "classifier starts from scratch",
                stacklevel=2,
            )
            continue
        if value.shape != full[key].shape:
            raise ValueError(f"{source}: {key} has shape {tuple(value.shape)}, the model {tuple(full[key].shape)}")
        full[key] = value
    return full


def load_hf_bert(name: str, model: nn.Module) -> dict[str, Tensor]:
    """`init_from="hf:<name>"`: transformers BERT weights as `model`'s complete state dict, after checking that the
    model has BERT's architecture (every differing key named at once)."""
    from safetensors.torch import load_file

    source = f"hf:{name}"
    config_file, weights_file = _files(name)
    shapes, state = convert_bert(load_file(str(weights_file)), model.cfg.padded_vocab_size)
    check_fits(model_config(model), {**bert_config(json.loads(config_file.read_text())), **shapes}, source)
    positions, max_len = state["bert.positions.weight"], model.cfg.backbone.max_len
    if max_len > positions.shape[0]:
        raise ValueError(
            f"the weights {source!r} have {positions.shape[0]} learned positions: set "
            f"--model.backbone.max_len to at most {positions.shape[0]} (here {max_len})"
        )
    state["bert.positions.weight"] = positions[:max_len]
    return merge_into(model, state, source)


def load_encoder(model: nn.Module, source: str) -> None:
    """`init_from=<our .ckpt or .safetensors>` for a BERT model whose head may differ from the source's (a masked-LM
    checkpoint into a classifier: the pooler and classifier start fresh): the encoder (`bert.*`) must fit exactly,
    every config key that differs named."""
    from polyformer.weights import checkpoint_model_state

    if source.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(source)
    else:
        state = checkpoint_model_state(source)
    encoder = {k: v for k, v in state.items() if k.startswith("bert.")}
    if not encoder:
        raise ValueError(f"init_from={source!r} holds no BERT encoder (no bert.* weights): is it a BERT checkpoint?")
    theirs = {
        "backbone.width": encoder["bert.embed.weight"].shape[1],
        "backbone.depth": len({k.split(".")[3] for k in encoder if k.startswith("bert.backbone.blocks.")}),
        "type_vocab_size": encoder["bert.token_types.weight"].shape[0],
        "backbone.position": "learned" if "bert.positions.weight" in encoder else model.cfg.backbone.position,
        "backbone.prenorm": "bert.embed_norm.weight" not in encoder,
    }
    check_fits(model_config(model), theirs, source)
    rows = encoder["bert.embed.weight"].shape[0]
    if rows != model.cfg.padded_vocab_size:
        raise ValueError(
            f"init_from={source!r} has {rows} vocabulary rows, the model {model.cfg.padded_vocab_size}: use the data "
            "settings (tokenizer, bpe_vocab_size) the checkpoint was trained with"
        )
    try:
        model.load_state_dict(merge_into(model, state, source), strict=True)
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"init_from={source!r} does not fit this model: {' '.join(str(e).split())[:600]}") from None
